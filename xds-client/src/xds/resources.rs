//! xDS resource types and the translation of one resource.
use std::sync::Arc;

use prost::Message;

use crate::api::envoy::config::{
    cluster::v3 as cds, endpoint::v3 as eds, listener::v3 as lds, route::v3 as rds,
};
use crate::api::envoy::extensions::transport_sockets::tls::v3 as sds;
use crate::api::google::protobuf::Any;
use crate::config::{Cluster, Discovery, Listener, LocalityEndpoints, Name, RouteConfig, Secret};
use crate::error::ConfigErrors;
use crate::translate;

/// The resource types weir subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Listener,
    Route,
    Cluster,
    Endpoint,
    Secret,
    /// WDS: `istio.workload.Workload` (istio/proxy's workload discovery).
    Workload,
}

/// `envoy.service.discovery.v3.Resource`, the wrapper some servers put
/// around SotW resources.
const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

impl ResourceType {
    pub const ALL: [ResourceType; 6] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
        ResourceType::Secret,
        ResourceType::Workload,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
            ResourceType::Workload => translate::workload::WORKLOAD_TYPE_URL,
        }
    }

    pub fn from_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// LDS, CDS and WDS subscribe to everything (wildcard); the others by
    /// name.
    pub fn wildcard(self) -> bool {
        matches!(
            self,
            ResourceType::Listener | ResourceType::Cluster | ResourceType::Workload
        )
    }

    /// Envoy's short name (`lds`, `rds`, ...), for stats and logs.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
            ResourceType::Secret => "sds",
            ResourceType::Workload => "wds",
        }
    }

    /// The gRPC method of the type's own (non-aggregated) service.
    pub fn grpc_path(self, delta: bool) -> &'static str {
        match (self, delta) {
            (ResourceType::Listener, false) => {
                "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners"
            }
            (ResourceType::Listener, true) => {
                "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners"
            }
            (ResourceType::Route, false) => {
                "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes"
            }
            (ResourceType::Route, true) => {
                "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes"
            }
            (ResourceType::Cluster, false) => {
                "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters"
            }
            (ResourceType::Cluster, true) => {
                "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters"
            }
            (ResourceType::Endpoint, false) => {
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints"
            }
            (ResourceType::Endpoint, true) => {
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints"
            }
            (ResourceType::Secret, false) => {
                "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
            }
            (ResourceType::Secret, true) => {
                "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets"
            }
            // WDS has no service of its own: only `ads` is accepted for it
            // (see `translate::workload`), so this is never dialled.
            (ResourceType::Workload, false) => {
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
            }
            (ResourceType::Workload, true) => {
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
            }
        }
    }
}

/// An EDS `ClusterLoadAssignment`, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    pub localities: Arc<[LocalityEndpoints]>,
    pub overprovisioning_factor: u32,
    /// `policy.weighted_priority_health`.
    pub weighted_priority_health: bool,
}

/// One translated resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Listener(Arc<Listener>),
    Route(Arc<RouteConfig>),
    Cluster(Arc<Cluster>),
    Endpoint(Arc<Endpoints>),
    Secret(Arc<Secret>),
    Workload(Arc<crate::config::Workload>),
}

/// Why one resource was rejected: its name when known, and the reason
/// (field path and message) for the NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub name: Option<Name>,
    pub reason: String,
}

/// Unwraps an `envoy.service.discovery.v3.Resource` wrapper, if any.
pub fn unwrap_any(any: &Any) -> Result<(Option<String>, Any), String> {
    if any.type_url != RESOURCE_WRAPPER {
        return Ok((None, any.clone()));
    }
    let r = crate::api::envoy::service::discovery::v3::Resource::decode(any.value.as_slice())
        .map_err(|e| format!("invalid Resource wrapper: {e}"))?;
    match r.resource {
        Some(inner) => Ok((Some(r.name), inner)),
        None => Err(format!("Resource {:?} has no resource", r.name)),
    }
}

fn describe(rt: ResourceType, name: &str, errs: ConfigErrors) -> String {
    let kind = match rt {
        ResourceType::Listener => "Listener",
        ResourceType::Route => "RouteConfiguration",
        ResourceType::Cluster => "Cluster",
        ResourceType::Endpoint => "ClusterLoadAssignment",
        ResourceType::Secret => "Secret",
        ResourceType::Workload => "Workload",
    };
    let details: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
    format!("{kind} {name:?}: {}", details.join("; "))
}

/// Decodes, checks against the supported-field table, and translates one
/// resource of type `rt`.
pub fn decode(rt: ResourceType, any: &Any) -> Result<(Name, Resource), Rejected> {
    let bad = |name: Option<&str>, reason: String| Rejected {
        name: name.map(Into::into),
        reason,
    };
    if any.type_url != rt.type_url() {
        return Err(bad(
            None,
            format!(
                "resource of type {:?} in a {} response",
                any.type_url,
                rt.type_url()
            ),
        ));
    }
    let v = any.value.as_slice();
    macro_rules! go {
        ($proto:ty, $name:expr, $translate:expr, $wrap:expr) => {{
            let p =
                <$proto>::decode(v).map_err(|e| bad(None, format!("undecodable resource: {e}")))?;
            let name: String = $name(&p);
            let mut errs = crate::support::check_proto(&p, "");
            match $translate(&p) {
                Ok(r) if errs.is_empty() => Ok((Name::from(name.as_str()), $wrap(r))),
                Ok(_) => Err(bad(Some(&name), describe(rt, &name, errs))),
                Err(e) => {
                    errs.extend(e);
                    errs.dedup();
                    Err(bad(Some(&name), describe(rt, &name, errs)))
                }
            }
        }};
    }
    match rt {
        ResourceType::Listener => go!(
            lds::Listener,
            |p: &lds::Listener| p.name.clone(),
            |p: &lds::Listener| {
                if p.name.is_empty() {
                    let mut e = ConfigErrors::default();
                    e.push("name", "an LDS listener needs a name");
                    return Err(e);
                }
                translate::listener::listener(p, "")
            },
            |l| Resource::Listener(Arc::new(l))
        ),
        ResourceType::Route => go!(
            rds::RouteConfiguration,
            |p: &rds::RouteConfiguration| p.name.clone(),
            |p: &rds::RouteConfiguration| translate::route::route_config(p, ""),
            |r| Resource::Route(Arc::new(r))
        ),
        ResourceType::Cluster => go!(
            cds::Cluster,
            |p: &cds::Cluster| p.name.clone(),
            |p: &cds::Cluster| translate::cluster::cluster(p, ""),
            |c| Resource::Cluster(Arc::new(c))
        ),
        ResourceType::Endpoint => go!(
            eds::ClusterLoadAssignment,
            |p: &eds::ClusterLoadAssignment| p.cluster_name.clone(),
            |p: &eds::ClusterLoadAssignment| translate::cluster::load_assignment(
                p,
                "",
                Discovery::Eds
            )
            .map(|(localities, overprovisioning_factor)| Endpoints {
                localities: localities.into(),
                overprovisioning_factor,
                weighted_priority_health: translate::cluster::weighted_priority_health(p),
            }),
            |e| Resource::Endpoint(Arc::new(e))
        ),
        ResourceType::Secret => go!(
            sds::Secret,
            |p: &sds::Secret| p.name.clone(),
            |p: &sds::Secret| translate::tls::secret(p, "").map(|(_, s)| s),
            |s| Resource::Secret(Arc::new(s))
        ),
        // Data, not configuration: fields weir does not read are skipped
        // (as a proxy built from an older schema does), not refused.
        ResourceType::Workload => match translate::workload::workload(v) {
            Ok(w) => Ok((Name::from(w.uid.as_str()), Resource::Workload(Arc::new(w)))),
            Err((name, reason)) => Err(bad(name.as_deref(), reason)),
        },
    }
}
