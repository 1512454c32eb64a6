//! Workload discovery (WDS): the `istio.workload.BootstrapExtension`
//! bootstrap extension and the `istio.workload.Workload` resources it
//! subscribes to, as istio/proxy's `workload_discovery` extension.
//!
//! The protobuf messages are written here from the public schema
//! (istio/proxy `discovery.proto` and `extension.proto`, themselves
//! derived from ztunnel's `workload.proto`), with only the fields weir
//! reads; the others are skipped when decoding.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::api::envoy::config::core::v3 as core;
use crate::config::{Workload, WorkloadKind};
use crate::error::{join, ConfigErrors};

/// The WDS resource type.
pub const WORKLOAD_TYPE_URL: &str = "type.googleapis.com/istio.workload.Workload";

/// Wire messages (`istio.workload`).
pub mod proto {
    /// `istio.workload.BootstrapExtension`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BootstrapExtension {
        #[prost(message, optional, tag = "1")]
        pub config_source: Option<super::core::ConfigSource>,
    }

    /// `istio.workload.Workload` (the fields peer metadata uses).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Workload {
        #[prost(string, tag = "20")]
        pub uid: String,
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(bytes = "vec", repeated, tag = "3")]
        pub addresses: Vec<Vec<u8>>,
        #[prost(string, tag = "4")]
        pub network: String,
        #[prost(string, tag = "6")]
        pub trust_domain: String,
        #[prost(string, tag = "7")]
        pub service_account: String,
        #[prost(string, tag = "10")]
        pub canonical_name: String,
        #[prost(string, tag = "11")]
        pub canonical_revision: String,
        /// `WorkloadType`.
        #[prost(int32, tag = "12")]
        pub workload_type: i32,
        #[prost(string, tag = "13")]
        pub workload_name: String,
        #[prost(string, tag = "18")]
        pub cluster_id: String,
        #[prost(message, optional, tag = "24")]
        pub locality: Option<Locality>,
    }

    /// `istio.workload.Locality`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Locality {
        #[prost(string, tag = "1")]
        pub region: String,
        #[prost(string, tag = "2")]
        pub zone: String,
        #[prost(string, tag = "3")]
        pub subzone: String,
    }
}

/// The extension's config source (`path`: the extension's `typed_config`).
/// Only `ads` is accepted: istiod serves WDS on the ADS stream, and weir
/// has no per-type WDS service to call otherwise.
pub fn bootstrap_extension(
    value: &[u8],
    path: &str,
) -> Result<crate::config::ConfigSource, ConfigErrors> {
    use prost::Message;
    let mut errs = ConfigErrors::default();
    let ext = match proto::BootstrapExtension::decode(value) {
        Ok(e) => e,
        Err(e) => {
            errs.push(
                path,
                format!("invalid istio.workload.BootstrapExtension: {e}"),
            );
            return Err(errs);
        }
    };
    let cs_path = join(path, "config_source");
    let Some(cs) = &ext.config_source else {
        errs.push(cs_path, "workload discovery needs a config_source");
        return Err(errs);
    };
    let cs = super::xds::config_source(cs, &cs_path)?;
    if cs.kind != crate::config::SourceKind::Ads {
        errs.push(
            cs_path,
            "only ads is supported for workload discovery (istiod serves WDS over ADS)",
        );
        return Err(errs);
    }
    Ok(cs)
}

/// Decodes one WDS resource. Rejected (NACK): undecodable bytes, an empty
/// `uid` (the resource name) and an address that is neither 4 nor 16 bytes.
pub fn workload(value: &[u8]) -> Result<Workload, (Option<String>, String)> {
    use prost::Message;
    let p =
        proto::Workload::decode(value).map_err(|e| (None, format!("undecodable Workload: {e}")))?;
    if p.uid.is_empty() {
        return Err((
            None,
            format!("Workload {:?}: uid (the resource name) is empty", p.name),
        ));
    }
    let mut addresses = Vec::with_capacity(p.addresses.len());
    for (i, a) in p.addresses.iter().enumerate() {
        let ip = match a.len() {
            4 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(a);
                IpAddr::V6(Ipv6Addr::from(b))
            }
            n => {
                return Err((
                    Some(p.uid.clone()),
                    format!(
                        "Workload {:?}: addresses[{i}]: {n} bytes, not an IPv4 (4) or IPv6 (16) address",
                        p.uid
                    ),
                ))
            }
        };
        addresses.push(ip);
    }
    let workload_type = match p.workload_type {
        1 => WorkloadKind::CronJob,
        2 => WorkloadKind::Pod,
        3 => WorkloadKind::Job,
        // DEPLOYMENT, and (as Istio's switch) any other value.
        _ => WorkloadKind::Deployment,
    };
    let (region, zone) = p.locality.map(|l| (l.region, l.zone)).unwrap_or_default();
    Ok(Workload {
        uid: p.uid,
        name: p.name,
        namespace: p.namespace,
        addresses,
        network: p.network,
        trust_domain: p.trust_domain,
        service_account: p.service_account,
        canonical_name: p.canonical_name,
        canonical_revision: p.canonical_revision,
        workload_type,
        workload_name: p.workload_name,
        cluster_id: p.cluster_id,
        region,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn encode(w: &proto::Workload) -> Vec<u8> {
        w.encode_to_vec()
    }

    #[test]
    fn decodes_addresses_and_type() {
        let w = proto::Workload {
            uid: "Kubernetes//Pod/ns/p".into(),
            addresses: vec![vec![10, 0, 0, 1], Ipv6Addr::LOCALHOST.octets().to_vec()],
            workload_type: 2,
            locality: Some(proto::Locality {
                region: "r".into(),
                zone: "z".into(),
                subzone: String::new(),
            }),
            ..Default::default()
        };
        let d = workload(&encode(&w)).expect("valid");
        assert_eq!(
            d.addresses,
            [IpAddr::from([10, 0, 0, 1]), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(d.workload_type, WorkloadKind::Pod);
        assert_eq!((d.region.as_str(), d.zone.as_str()), ("r", "z"));
        // An unknown type is a deployment, as Istio.
        let w = proto::Workload {
            workload_type: 9,
            ..w
        };
        assert_eq!(
            workload(&encode(&w)).expect("valid").workload_type,
            WorkloadKind::Deployment
        );
    }

    #[test]
    fn rejects_bad_address_and_missing_uid() {
        let w = proto::Workload {
            uid: "u".into(),
            addresses: vec![vec![1, 2, 3]],
            ..Default::default()
        };
        let (name, reason) = workload(&encode(&w)).expect_err("3 bytes");
        assert_eq!(name.as_deref(), Some("u"));
        assert!(reason.contains("addresses[0]: 3 bytes"), "{reason}");
        let w = proto::Workload {
            name: "pod".into(),
            ..Default::default()
        };
        let (_, reason) = workload(&encode(&w)).expect_err("no uid");
        assert!(reason.contains("uid"), "{reason}");
        assert!(workload(&[0xff, 0xff]).is_err());
    }
}
