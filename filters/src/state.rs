//! Filter state and dynamic metadata: what filters leave for later filters,
//! the router, access logs and the stats filters (Envoy's
//! `StreamInfo::filterState()` and `dynamicMetadata()`).
//!
//! - [`FilterState`]: named objects. A request's own
//!   ([`FilterContext::filter_state`](crate::FilterContext)) lives as long
//!   as the request; the connection's
//!   ([`Downstream::filter_state`](crate::Downstream)) is set by network
//!   filters before the HCM runs and is read-only afterwards. Lookups from an
//!   HTTP filter see the request's entries first, then the connection's
//!   ([`FilterContext::filter_state_get`](crate::FilterContext::filter_state_get)).
//! - [`DynamicMetadata`]: per filter namespace, a JSON object (Envoy's
//!   `google.protobuf.Struct` per namespace), as RBAC's metadata matchers,
//!   `%DYNAMIC_METADATA(ns:key)%` and jwt_authn's `payload_in_metadata` use
//!   it.
//!
//! Both are empty vectors until a filter writes: a request with no such
//! filter allocates nothing.
use std::any::Any;
use std::sync::Arc;

use serde_json::{Map, Value};

/// An object in filter state. `serialize_as_string` is what
/// `%FILTER_STATE(key:PLAIN)%`, RBAC's `filter_state` string matcher and a
/// `filter_state` hash policy see (Envoy's `serializeAsString`).
pub trait StateObject: Any + Send + Sync + std::fmt::Debug {
    fn serialize_as_string(&self) -> Option<String> {
        None
    }
    /// What `%FILTER_STATE(key)%` / `%FILTER_STATE(key:TYPED)%` renders:
    /// Envoy's `serializeAsProto` as `MessageToJsonString` writes it. By
    /// default the string form as a JSON string (Envoy's string accessors
    /// serialize as a `StringValue`).
    fn serialize_as_json(&self) -> Option<String> {
        self.serialize_as_string()
            .map(|s| serde_json::Value::String(s).to_string())
    }
    /// For typed reads (`downcast_ref`).
    fn as_any(&self) -> &dyn Any;
    /// Whether a `filter_state` hash policy hashes this object (Envoy's
    /// `Hashable`: xxHash64 of its string form).
    fn hashable(&self) -> bool {
        false
    }
}

/// A string object that hash policies hash (Envoy's `envoy.hashable_string`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashableStringValue(pub String);

impl StateObject for HashableStringValue {
    fn serialize_as_string(&self) -> Option<String> {
        Some(self.0.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn hashable(&self) -> bool {
        true
    }
}

/// A plain string value (Envoy's `StringAccessor`), what
/// `set_filter_state` stores by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringValue(pub String);

impl StateObject for StringValue {
    fn serialize_as_string(&self) -> Option<String> {
        Some(self.0.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Filter state keys of addresses (Envoy's `Network::AddressObject`
/// factories): the `original_dst` listener filter of an internal listener
/// restores the connection's local and remote addresses from them
/// (Istio's waypoint sets them from the HBONE CONNECT with
/// `set_filter_state`, `shared_with_upstream: ONCE`).
pub const ORIGINAL_DST_LOCAL_IP: &str = "envoy.filters.listener.original_dst.local_ip";
pub const ORIGINAL_DST_REMOTE_IP: &str = "envoy.filters.listener.original_dst.remote_ip";
/// The host an `ORIGINAL_DST` cluster connects to when set (Envoy's
/// `envoy.network.transport_socket.original_dst_address`).
pub const ORIGINAL_DST_ADDRESS: &str = "envoy.network.transport_socket.original_dst_address";

/// An address in filter state (Envoy's `Network::AddressObject`: its
/// factory parses `ip:port`; the string form is the same; hashable; no
/// typed form, so `%FILTER_STATE(key)%` renders `-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressObject(pub std::net::SocketAddr);

impl AddressObject {
    /// As Envoy's address object factory
    /// (`Utility::parseInternetAddressAndPortNoThrow`): `[v6]:port` (the
    /// last `]:` splits) or `v4:port` (the last `:` splits); the port as
    /// `absl::SimpleAtoi` reads it (ASCII whitespace around it and a
    /// leading `+` allowed, decimal, at most 65535); the address in its
    /// strict numeric form (an IPv6 scope only as a number, `%2`).
    /// Anything else is no object.
    pub fn parse(value: &str) -> Option<AddressObject> {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
        if value.starts_with('[') {
            let pos = value.rfind("]:")?;
            let port = simple_atoi_port(&value[pos + 2..])?;
            let (ip, scope) = match value[1..pos].split_once('%') {
                Some((ip, scope)) => (ip, scope_id(scope)?),
                None => (&value[1..pos], 0),
            };
            let ip: Ipv6Addr = ip.parse().ok()?;
            return Some(AddressObject(SocketAddr::V6(SocketAddrV6::new(
                ip, port, 0, scope,
            ))));
        }
        let pos = value.rfind(':')?;
        let port = simple_atoi_port(&value[pos + 1..])?;
        let ip: Ipv4Addr = value[..pos].parse().ok()?;
        Some(AddressObject(SocketAddr::V4(SocketAddrV4::new(ip, port))))
    }
}

/// A port as `absl::SimpleAtoi` into a `uint64_t`, then at most 65535.
fn simple_atoi_port(s: &str) -> Option<u16> {
    // absl's whitespace: space, \t, \n, \v, \f, \r.
    let s = s.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r'));
    let digits = s.strip_prefix('+').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Leading zeros are fine; a value past u64 fails as absl's overflow.
    let v: u64 = digits.parse().ok()?;
    u16::try_from(v).ok()
}

/// A numeric IPv6 scope id (`getaddrinfo` with `AI_NUMERICHOST` also
/// takes an interface name; weir does not look names up).
fn scope_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl StateObject for AddressObject {
    fn serialize_as_string(&self) -> Option<String> {
        Some(self.0.to_string())
    }
    /// Envoy's address object has no proto form.
    fn serialize_as_json(&self) -> Option<String> {
        None
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn hashable(&self) -> bool {
        true
    }
}

/// Filter state key of the upstream ALPN override (Envoy's
/// `Network::ApplicationProtocols::key()`).
pub const APPLICATION_PROTOCOLS: &str = "envoy.network.application_protocols";

/// The ALPN list upstream TLS offers instead of the cluster's (Envoy's
/// `Network::ApplicationProtocols`, read by the router and `tcp_proxy` into
/// the transport socket options; pooled connections are keyed by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplicationProtocols {
    /// A fixed list (`set_filter_state` with the object factory
    /// `envoy.network.application_protocols`: the value split at `,`).
    List(Arc<[Vec<u8>]>),
    /// Istio's `istio.alpn`: the list for the upstream protocol the router
    /// uses (HTTP/1.0, HTTP/1.1, HTTP/2), resolved when it connects.
    ByProtocol(Arc<xds_client::config::IstioAlpnConfig>),
}

impl ApplicationProtocols {
    /// As Envoy's object factory: the bytes split at every `,`.
    pub fn from_bytes(value: &str) -> ApplicationProtocols {
        ApplicationProtocols::List(value.split(',').map(|p| p.as_bytes().to_vec()).collect())
    }

    /// The list to offer for upstream protocol `proto` (0 HTTP/1.0, 1
    /// HTTP/1.1, 2 HTTP/2; `tcp_proxy` asks for `None`). `None`: no
    /// override (an empty list, or `istio.alpn` without one for `proto`).
    pub fn resolve(&self, proto: Option<usize>) -> Option<Arc<[Vec<u8>]>> {
        let list = match self {
            ApplicationProtocols::List(l) => l.clone(),
            ApplicationProtocols::ByProtocol(c) => c.by_protocol.get(proto?)?.clone()?,
        };
        // An empty protocol cannot be offered (BoringSSL refuses the list).
        (!list.is_empty() && list.iter().all(|p| !p.is_empty() && p.len() <= 255)).then_some(list)
    }
}

impl StateObject for ApplicationProtocols {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// How an entry may be changed and whether it follows the request upstream
/// (Envoy's `StateType` and `StreamSharingMayImpactPooling`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateFlags {
    /// Envoy's `StateType::ReadOnly`: a later write of the key fails.
    pub read_only: bool,
    /// Whether (and how far) it follows the request to an internal
    /// upstream connection (`shared_with_upstream`).
    pub shared_with_upstream: xds_client::config::Sharing,
}

#[derive(Debug, Clone)]
struct Entry {
    key: Arc<str>,
    value: Arc<dyn StateObject>,
    flags: StateFlags,
}

/// Named filter-state objects (few per request: a vector, searched
/// linearly).
#[derive(Debug, Clone, Default)]
pub struct FilterState(Vec<Entry>);

/// Writing over a read-only entry (Envoy treats it as a bug and asserts;
/// weir reports it to the writer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOnlyKey(pub String);

impl std::fmt::Display for ReadOnlyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "filter state {:?} is read-only", self.0)
    }
}

impl FilterState {
    /// Sets `key` (replacing a mutable entry of the same key).
    pub fn set(
        &mut self,
        key: impl Into<Arc<str>>,
        value: Arc<dyn StateObject>,
        flags: StateFlags,
    ) -> Result<(), ReadOnlyKey> {
        let key = key.into();
        match self.0.iter_mut().find(|e| e.key == key) {
            Some(e) if e.flags.read_only => Err(ReadOnlyKey(key.to_string())),
            Some(e) => {
                e.value = value;
                e.flags = flags;
                Ok(())
            }
            None => {
                self.0.push(Entry { key, value, flags });
                Ok(())
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Arc<dyn StateObject>> {
        self.0.iter().find(|e| &*e.key == key).map(|e| &e.value)
    }

    /// The entry's value as `T`, when it is one.
    pub fn get_typed<T: 'static>(&self, key: &str) -> Option<&T> {
        self.get(key).and_then(|v| v.as_any().downcast_ref::<T>())
    }

    pub fn flags(&self, key: &str) -> Option<StateFlags> {
        self.0.iter().find(|e| &*e.key == key).map(|e| e.flags)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every entry, in the order first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn StateObject>, StateFlags)> {
        self.0.iter().map(|e| (&*e.key, &e.value, e.flags))
    }
}

/// Dynamic metadata: per filter namespace (e.g. `envoy.filters.http.jwt_authn`),
/// a JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DynamicMetadata(Vec<(String, Map<String, Value>)>);

impl DynamicMetadata {
    /// The namespace's object, if any filter wrote to it.
    pub fn namespace(&self, ns: &str) -> Option<&Map<String, Value>> {
        self.0.iter().find(|(n, _)| n == ns).map(|(_, m)| m)
    }

    /// The namespace's object to write into (created empty).
    pub fn namespace_mut(&mut self, ns: &str) -> &mut Map<String, Value> {
        let i = match self.0.iter().position(|(n, _)| n == ns) {
            Some(i) => i,
            None => {
                self.0.push((ns.to_owned(), Map::new()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    /// Merges `fields` into namespace `ns` (Envoy's `setDynamicMetadata`:
    /// top-level keys replace).
    pub fn merge(&mut self, ns: &str, fields: Map<String, Value>) {
        self.namespace_mut(ns).extend(fields);
    }

    /// The value at `path` (keys into nested objects) in namespace `ns`, as
    /// Envoy's `Metadata::metadataValue`.
    pub fn value(&self, ns: &str, path: &[&str]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.namespace(ns)?.get(*first)?;
        for k in rest {
            v = v.as_object()?.get(*k)?;
        }
        Some(v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Map<String, Value>)> {
        self.0.iter().map(|(n, m)| (n.as_str(), m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filter_state_replaces_mutable_and_keeps_read_only() {
        let mut s = FilterState::default();
        let ro = StateFlags {
            read_only: true,
            ..Default::default()
        };
        s.set(
            "a",
            Arc::new(StringValue("1".into())),
            StateFlags::default(),
        )
        .expect("test value");
        s.set("a", Arc::new(StringValue("2".into())), ro)
            .expect("test value");
        assert_eq!(
            s.get_typed::<StringValue>("a"),
            Some(&StringValue("2".into()))
        );
        assert_eq!(
            s.set(
                "a",
                Arc::new(StringValue("3".into())),
                StateFlags::default()
            ),
            Err(ReadOnlyKey("a".into()))
        );
        assert_eq!(
            s.get("a").and_then(|v| v.serialize_as_string()).as_deref(),
            Some("2")
        );
        assert!(s.get("b").is_none());
    }

    #[test]
    fn metadata_paths_and_merge() {
        let mut m = DynamicMetadata::default();
        assert!(m.is_empty());
        m.merge(
            "jwt",
            json!({"payload": {"iss": "x", "sub": {"a": 1}}})
                .as_object()
                .expect("test value")
                .clone(),
        );
        assert_eq!(m.value("jwt", &["payload", "iss"]), Some(&json!("x")));
        assert_eq!(m.value("jwt", &["payload", "sub", "a"]), Some(&json!(1)));
        assert_eq!(m.value("jwt", &["payload", "nope"]), None);
        assert_eq!(m.value("other", &["payload"]), None);
        m.merge(
            "jwt",
            json!({"payload": 2})
                .as_object()
                .expect("test value")
                .clone(),
        );
        assert_eq!(m.value("jwt", &["payload"]), Some(&json!(2)));
    }

    #[test]
    fn address_objects_parse_as_envoys_factory() {
        let ok = |s: &str| AddressObject::parse(s).map(|a| a.0.to_string());
        assert_eq!(ok("10.0.0.1:80").as_deref(), Some("10.0.0.1:80"));
        assert_eq!(ok("10.0.0.1:080").as_deref(), Some("10.0.0.1:80"));
        assert_eq!(ok("10.0.0.1:+80").as_deref(), Some("10.0.0.1:80"));
        assert_eq!(ok("10.0.0.1: 80 ").as_deref(), Some("10.0.0.1:80"));
        assert_eq!(ok("10.0.0.1:65535").as_deref(), Some("10.0.0.1:65535"));
        assert_eq!(ok("[::1]:9080").as_deref(), Some("[::1]:9080"));
        assert_eq!(ok("[fe80::1%2]:80").as_deref(), Some("[fe80::1%2]:80"));
        assert_eq!(
            ok("[::ffff:1.2.3.4]:1").as_deref(),
            Some("[::ffff:1.2.3.4]:1")
        );
        for bad in [
            "",
            ":",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:65536",
            "10.0.0.1:-1",
            "10.0.0.1:++1",
            "10.0.0.1:0x50",
            "10.0.0.1:99999999999999999999999",
            "01.0.0.1:80",
            "::1:80",
            "[::1]",
            "[::1]80",
            "[]:80",
            "[::1%]:80",
            "[::1%eth0]:80",
            "host:80",
            "1.2.3:80",
            " 10.0.0.1:80",
            "[",
            "[:",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        let a = AddressObject::parse("10.0.0.1:80").expect("parses");
        assert_eq!(a.serialize_as_json(), None);
        assert!(a.hashable());
    }
}
