//! Istio's peer object (`WorkloadMetadataObject`) and its wire forms, as
//! istio/proxy's `metadata_object.cc`: `x-envoy-peer-metadata` (base64 of
//! a protobuf `google.protobuf.Struct` of node metadata: `NAME`,
//! `NAMESPACE`, `CLUSTER_ID`, `WORKLOAD_NAME`, `OWNER`, `LABELS`, `REGION`,
//! `AVAILABILITY_ZONE`) and the W3C `baggage` header (`k8s.namespace.name=..,
//! service.name=..,...`).
use std::any::Any;
use std::collections::BTreeMap;

use prost::Message;
use prost_types::{value::Kind, Struct, Value};
use xds_client::config::PeerField;

use crate::state::StateObject;

const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
/// Kubernetes' recommended labels win over `app` / `version` (Istio).
const APP_NAME_QUALIFIED: &str = "app.kubernetes.io/name";
const APP_VERSION_QUALIFIED: &str = "app.kubernetes.io/version";
const OWNER_PREFIX: &str = "kubernetes://apis/apps/v1/namespaces/";
const WORKLOAD_TYPES: [&str; 4] = ["pod", "deployment", "job", "cronjob"];

/// A peer's (or this proxy's) workload identity, as Istio's
/// `WorkloadMetadataObject`. Stored in filter state as `downstream_peer` /
/// `upstream_peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    /// `NAME` (the pod).
    pub name: String,
    pub namespace: String,
    /// `CLUSTER_ID`.
    pub cluster: String,
    /// `WORKLOAD_NAME`.
    pub workload: String,
    /// Label `service.istio.io/canonical-name`.
    pub canonical_name: String,
    /// Label `service.istio.io/canonical-revision`.
    pub canonical_revision: String,
    /// Label `app`.
    pub app: String,
    /// Label `version`.
    pub version: String,
    /// From `OWNER` (`pod`, `deployment`, `job`, `cronjob`).
    pub workload_type: Option<&'static str>,
    /// The SPIFFE identity (never carried by the headers).
    pub identity: String,
    /// `REGION` (or the node's `locality.region` for our own).
    pub region: String,
    /// `AVAILABILITY_ZONE` (or the node's `locality.zone` for our own).
    pub zone: String,
    /// `additional_labels` found in `LABELS`, in key order.
    pub labels: Vec<(String, String)>,
}

impl PeerInfo {
    /// As Istio's `convertStructToWorkloadMetadata`.
    pub fn from_struct(s: &Struct, additional_labels: &[String]) -> PeerInfo {
        let text = |k: &str| match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(v)) => v.clone(),
            _ => String::new(),
        };
        let mut p = PeerInfo {
            name: text("NAME"),
            namespace: text("NAMESPACE"),
            cluster: text("CLUSTER_ID"),
            workload: text("WORKLOAD_NAME"),
            region: text("REGION"),
            zone: text("AVAILABILITY_ZONE"),
            ..Default::default()
        };
        p.workload_type = parse_owner(&text("OWNER"), &p.workload);
        if let Some(labels) = labels_of(s) {
            for (k, v) in &labels.fields {
                let Some(Kind::StringValue(v)) = &v.kind else {
                    continue;
                };
                match k.as_str() {
                    CANONICAL_NAME => p.canonical_name = v.clone(),
                    CANONICAL_REVISION => p.canonical_revision = v.clone(),
                    "app" | "version" => {}
                    APP_NAME_QUALIFIED => p.app = v.clone(),
                    APP_VERSION_QUALIFIED => p.version = v.clone(),
                    k if additional_labels.iter().any(|a| a == k) => {
                        p.labels.push((k.to_owned(), v.clone()))
                    }
                    _ => {}
                }
            }
        }
        // The qualified labels win whatever the map order (as Istio).
        let label = |k: &str| match labels_of(s).and_then(|l| l.fields.get(k)) {
            Some(Value {
                kind: Some(Kind::StringValue(v)),
            }) => Some(v.clone()),
            _ => None,
        };
        if p.app.is_empty() {
            p.app = label("app").unwrap_or_default();
        }
        if p.version.is_empty() {
            p.version = label("version").unwrap_or_default();
        }
        p
    }

    /// This proxy's peer object, as Istio's propagation methods build it:
    /// the node metadata, the node's `locality` filling `REGION` /
    /// `AVAILABILITY_ZONE` when the metadata has none.
    pub fn local(
        metadata: &serde_json::Value,
        region: &str,
        zone: &str,
        additional_labels: &[String],
    ) -> PeerInfo {
        let mut p = PeerInfo::from_json(metadata, additional_labels);
        if p.region.is_empty() {
            p.region = region.to_owned();
        }
        if p.zone.is_empty() {
            p.zone = zone.to_owned();
        }
        p
    }

    /// As Istio's `convertBaggageToWorkloadMetadata`: the value is split at
    /// `,`, each member at its first `=` (the value ends at a second `=`);
    /// nothing is trimmed or percent-decoded and W3C properties (`;..`)
    /// stay in the value, as Istio. Unknown keys and members without `=`
    /// are ignored, so any value yields a peer (possibly empty). The
    /// service and app names (and versions) default to each other.
    pub fn from_baggage(value: &[u8]) -> PeerInfo {
        let mut p = PeerInfo::default();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        for member in value.split(|b| *b == b',') {
            let mut parts = member.split(|b| *b == b'=');
            let key = parts.next().unwrap_or_default();
            let v = parts.next().unwrap_or_default();
            match key {
                b"k8s.namespace.name" => p.namespace = text(v),
                b"k8s.cluster.name" => p.cluster = text(v),
                b"service.name" => {
                    p.canonical_name = text(v);
                    if p.app.is_empty() {
                        p.app = text(v);
                    }
                }
                b"service.version" => {
                    p.canonical_revision = text(v);
                    if p.version.is_empty() {
                        p.version = text(v);
                    }
                }
                b"app.name" => {
                    p.app = text(v);
                    if p.canonical_name.is_empty() {
                        p.canonical_name = text(v);
                    }
                }
                b"app.version" => {
                    p.version = text(v);
                    if p.canonical_revision.is_empty() {
                        p.canonical_revision = text(v);
                    }
                }
                b"k8s.deployment.name"
                | b"k8s.pod.name"
                | b"k8s.cronjob.name"
                | b"k8s.job.name" => {
                    p.workload = text(v);
                    // `k8s.<type>.name`: the type is the second token.
                    let kind = &key[4..key.len() - 5];
                    p.workload_type = WORKLOAD_TYPES
                        .iter()
                        .copied()
                        .find(|t| t.as_bytes() == kind);
                }
                b"k8s.instance.name" => p.name = text(v),
                b"cloud.region" => p.region = text(v),
                b"cloud.availability_zone" => p.zone = text(v),
                _ => {}
            }
        }
        p
    }

    /// As Istio's `WorkloadMetadataObject::baggage`: the `baggage` value
    /// this peer propagates. Keys in Istio's order: `k8s.<type>.name` (type
    /// `pod` when unknown), `service.name`, `app.name` (when not the
    /// service name), `service.version`, `app.version` (likewise),
    /// `k8s.namespace.name`, `k8s.cluster.name`, `k8s.instance.name`,
    /// `cloud.region`, `cloud.availability_zone`; empty values are left
    /// out and nothing is encoded (as Istio).
    pub fn baggage(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if !self.workload.is_empty() {
            let kind = self.workload_type.unwrap_or("pod");
            parts.push(format!("k8s.{kind}.name={}", self.workload));
        }
        // Istio reads the service name through `field()`, which always has
        // a value: the canonical name is never replaced by the app here.
        let mut add = |k: &str, v: &str| {
            if !v.is_empty() {
                parts.push(format!("{k}={v}"));
            }
        };
        add("service.name", &self.canonical_name);
        if self.app != self.canonical_name {
            add("app.name", &self.app);
        }
        add("service.version", &self.canonical_revision);
        if self.version != self.canonical_revision {
            add("app.version", &self.version);
        }
        add("k8s.namespace.name", &self.namespace);
        add("k8s.cluster.name", &self.cluster);
        add("k8s.instance.name", &self.name);
        add("cloud.region", &self.region);
        add("cloud.availability_zone", &self.zone);
        parts.join(",")
    }

    /// The same from JSON node metadata (the bootstrap's `node.metadata`).
    pub fn from_json(v: &serde_json::Value, additional_labels: &[String]) -> PeerInfo {
        PeerInfo::from_struct(&json_struct(v), additional_labels)
    }

    /// As Istio's `convertWorkloadMetadataToStruct`.
    pub fn to_struct(&self) -> Struct {
        let mut fields = BTreeMap::new();
        let put = |m: &mut BTreeMap<String, Value>, k: &str, v: &str| {
            if !v.is_empty() {
                m.insert(k.to_owned(), string_value(v));
            }
        };
        put(&mut fields, "NAME", &self.name);
        put(&mut fields, "NAMESPACE", &self.namespace);
        put(&mut fields, "WORKLOAD_NAME", &self.workload);
        put(&mut fields, "CLUSTER_ID", &self.cluster);
        let mut labels = BTreeMap::new();
        put(&mut labels, CANONICAL_NAME, &self.canonical_name);
        put(&mut labels, CANONICAL_REVISION, &self.canonical_revision);
        put(&mut labels, "app", &self.app);
        put(&mut labels, "version", &self.version);
        for (k, v) in &self.labels {
            labels.insert(k.clone(), string_value(v));
        }
        fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: labels })),
            },
        );
        if let Some(t) = self.workload_type {
            let owner = format!("{OWNER_PREFIX}{}/{t}s/{}", self.namespace, self.workload);
            fields.insert("OWNER".into(), string_value(&owner));
        }
        put(&mut fields, "REGION", &self.region);
        put(&mut fields, "AVAILABILITY_ZONE", &self.zone);
        Struct { fields }
    }

    /// Decodes an `x-envoy-peer-metadata` value; `None` when it is not
    /// base64 of a `Struct` (Istio then finds no peer).
    pub fn decode_header(value: &[u8], additional_labels: &[String]) -> Option<PeerInfo> {
        let bytes = base64_decode(value)?;
        let s = Struct::decode(bytes.as_slice()).ok()?;
        Some(PeerInfo::from_struct(&s, additional_labels))
    }

    /// The `x-envoy-peer-metadata` value for this peer (maps serialise in
    /// key order: Istio's deterministic serialisation).
    pub fn encode_header(&self) -> String {
        base64_encode(&self.to_struct().encode_to_vec())
    }

    /// A field by Istio's token name (`upstream_peer.workload`).
    pub fn field(&self, f: PeerField) -> &str {
        match f {
            PeerField::Name => &self.name,
            PeerField::Namespace => &self.namespace,
            PeerField::Cluster => &self.cluster,
            PeerField::Service => &self.canonical_name,
            PeerField::Revision => &self.canonical_revision,
            PeerField::App => &self.app,
            PeerField::Version => &self.version,
            PeerField::Workload => &self.workload,
            PeerField::Type => self.workload_type.unwrap_or(""),
            PeerField::Region => &self.region,
            PeerField::Zone => &self.zone,
        }
    }
}

impl StateObject for PeerInfo {
    /// As Istio's `serializeAsString`: `type=..,workload=..,name=..,...`.
    fn serialize_as_string(&self) -> Option<String> {
        let mut parts: Vec<String> = Vec::new();
        let mut add = |k: &str, v: &str| {
            if !v.is_empty() {
                parts.push(format!("{k}={v}"));
            }
        };
        add("type", self.workload_type.unwrap_or(""));
        add("workload", &self.workload);
        add("name", &self.name);
        add("cluster", &self.cluster);
        add("namespace", &self.namespace);
        add("service", &self.canonical_name);
        add("revision", &self.canonical_revision);
        add("app", &self.app);
        add("version", &self.version);
        add("region", &self.region);
        add("availability_zone", &self.zone);
        for (k, v) in &self.labels {
            parts.push(format!("labels[]{k}={v}"));
        }
        Some(parts.join(","))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// As Istio's `parseOwner`: the workload type from
/// `kubernetes://apis/apps/v1/namespaces/<ns>/<type>s/<workload>`.
fn parse_owner(owner: &str, workload: &str) -> Option<&'static str> {
    if owner.len() <= workload.len() + 2 {
        return None;
    }
    let head = owner.get(..owner.len() - workload.len() - 2)?;
    let suffix = &head[head.rfind('/')? + 1..];
    WORKLOAD_TYPES.iter().copied().find(|t| *t == suffix)
}

fn labels_of(s: &Struct) -> Option<&Struct> {
    match s.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(l)) => Some(l),
        _ => None,
    }
}

fn string_value(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    }
}

fn json_struct(v: &serde_json::Value) -> Struct {
    match json_value(v).kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    }
}

fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (Envoy's `Base64::encode`).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional (Envoy's `decodeWithoutPadding`);
/// `None` on any other character.
pub fn base64_decode(data: &[u8]) -> Option<Vec<u8>> {
    let data = match data.iter().position(|b| *b == b'=') {
        Some(i) if data[i..].iter().all(|b| *b == b'=') && data.len() - i <= 2 => &data[..i],
        Some(_) => return None,
        None => data,
    };
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for b in data {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // A single leftover character cannot be a whole byte.
    (data.len() % 4 != 1).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            let e = base64_encode(s);
            assert_eq!(base64_decode(e.as_bytes()).as_deref(), Some(s));
            assert_eq!(
                base64_decode(e.trim_end_matches('=').as_bytes()).as_deref(),
                Some(s)
            );
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode(b"Zm9v!"), None);
        assert_eq!(base64_decode(b"Z"), None);
    }

    #[test]
    fn header_round_trip_and_fields() {
        let md = serde_json::json!({
            "NAME": "productpage-v1-84975bc778-pxz2w",
            "NAMESPACE": "default",
            "CLUSTER_ID": "client-cluster",
            "WORKLOAD_NAME": "productpage-v1",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
            "ISTIO_VERSION": "1.5-dev",
            "LABELS": {
                "app": "productpage", "version": "v1", "role": "client",
                "service.istio.io/canonical-name": "productpage-v1",
                "service.istio.io/canonical-revision": "version-1",
            },
        });
        let p = PeerInfo::from_json(&md, &["role".into()]);
        assert_eq!(p.workload, "productpage-v1");
        assert_eq!(p.workload_type, Some("deployment"));
        assert_eq!(p.canonical_revision, "version-1");
        assert_eq!(p.labels, [("role".to_owned(), "client".to_owned())]);
        let h = p.encode_header();
        let back = PeerInfo::decode_header(h.as_bytes(), &["role".into()]).expect("decodes");
        assert_eq!(back, p);
        // Fields Istio does not carry are not in the header.
        let s = Struct::decode(base64_decode(h.as_bytes()).expect("b64").as_slice()).expect("pb");
        assert!(!s.fields.contains_key("ISTIO_VERSION"));
        assert_eq!(
            p.serialize_as_string().as_deref(),
            Some(
                "type=deployment,workload=productpage-v1,name=productpage-v1-84975bc778-pxz2w,\
                 cluster=client-cluster,namespace=default,service=productpage-v1,\
                 revision=version-1,app=productpage,version=v1,labels[]role=client"
            )
        );
        assert_eq!(p.field(PeerField::Service), "productpage-v1");
        assert!(PeerInfo::decode_header(b"not base64!", &[]).is_none());
    }

    #[test]
    fn baggage_is_parsed_as_istio() {
        // As istio/proxy's metadata_object_test: service and app default to
        // each other; the workload type is the key's second token.
        let p = PeerInfo::from_baggage(
            b"k8s.cluster.name=c1,k8s.namespace.name=apps,k8s.deployment.name=client-v2,\
              service.name=client,service.version=v2,k8s.instance.name=client-v2-abc,\
              cloud.region=eu,cloud.availability_zone=eu-1a,other=x",
        );
        assert_eq!(
            p,
            PeerInfo {
                name: "client-v2-abc".into(),
                namespace: "apps".into(),
                cluster: "c1".into(),
                workload: "client-v2".into(),
                canonical_name: "client".into(),
                canonical_revision: "v2".into(),
                app: "client".into(),
                version: "v2".into(),
                workload_type: Some("deployment"),
                region: "eu".into(),
                zone: "eu-1a".into(),
                ..Default::default()
            }
        );
        let p = PeerInfo::from_baggage(b"app.name=a,service.name=s,app.version=1,k8s.pod.name=p");
        assert_eq!((p.app.as_str(), p.canonical_name.as_str()), ("a", "s"));
        assert_eq!(
            (p.version.as_str(), p.canonical_revision.as_str()),
            ("1", "1")
        );
        assert_eq!(p.workload_type, Some("pod"));
        // Nothing trimmed or decoded; `=` ends the value; junk ignored.
        let p = PeerInfo::from_baggage(
            b" k8s.namespace.name=x,k8s.cluster.name=a%20b;p=1,service.name=v=w,=,,junk",
        );
        assert_eq!(p.namespace, "");
        assert_eq!(p.cluster, "a%20b;p");
        assert_eq!(p.canonical_name, "v");
        assert_eq!(PeerInfo::from_baggage(b""), PeerInfo::default());
    }

    #[test]
    fn baggage_is_rendered_as_istio() {
        let md = serde_json::json!({
            "NAME": "gw-1", "NAMESPACE": "istio-system", "CLUSTER_ID": "Kubernetes",
            "WORKLOAD_NAME": "gw",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/istio-system/deployments/gw",
            "LABELS": {
                "app": "gateway", "version": "v1",
                "service.istio.io/canonical-name": "gw",
                "service.istio.io/canonical-revision": "v1",
            },
        });
        assert_eq!(
            PeerInfo::local(&md, "eu", "eu-1a", &[]).baggage(),
            "k8s.deployment.name=gw,service.name=gw,app.name=gateway,service.version=v1,\
             k8s.namespace.name=istio-system,k8s.cluster.name=Kubernetes,\
             k8s.instance.name=gw-1,cloud.region=eu,cloud.availability_zone=eu-1a"
        );
        // No canonical labels: Istio still reads the (empty) canonical name,
        // so the app goes as `app.name`; an unknown type is `pod`.
        let md = serde_json::json!({"WORKLOAD_NAME": "w", "REGION": "r",
            "LABELS": {"app": "a", "app.kubernetes.io/name": "q"}});
        assert_eq!(
            PeerInfo::local(&md, "other", "", &[]).baggage(),
            "k8s.pod.name=w,app.name=q,cloud.region=r"
        );
        assert_eq!(PeerInfo::default().baggage(), "");
    }

    #[test]
    fn owner_types() {
        let o = "kubernetes://apis/apps/v1/namespaces/ns/cronjobs/w";
        assert_eq!(parse_owner(o, "w"), Some("cronjob"));
        assert_eq!(
            parse_owner(o, "longer-than-owner-name-really-long-x-y-z-w-v-u"),
            None
        );
        assert_eq!(parse_owner("kubernetes://x/things/w", "w"), None);
    }
}
