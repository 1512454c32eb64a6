//! Validated, immutable configuration types.
//!
//! Everything here is built once by [`crate::translate`] from Envoy protos,
//! shared behind `Arc`, and never mutated; the data path reads only these
//! types, never protos. `PartialEq` lets the listener manager and pools diff
//! an old snapshot against a new one.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

pub mod cluster;
pub mod compressor;
pub mod cors;
pub mod ext_authz;
pub mod fault;
pub mod format;
pub mod grpc_stats;
pub mod hcm;
pub mod header_mutation;
pub mod health_check;
pub mod istio;
pub mod jwt_authn;
pub mod local_ratelimit;
pub mod match_tree;
pub mod matcher;
pub mod network;
pub mod per_filter;
pub mod ratelimit;
pub mod rbac;
pub mod route;
pub mod runtime_slot;
pub mod set_filter_state;
pub mod tcp;
pub mod tls;
pub mod xds;

pub use cluster::*;
pub use compressor::*;
pub use cors::*;
pub use ext_authz::*;
pub use fault::*;
pub use format::*;
pub use grpc_stats::*;
pub use hcm::*;
pub use header_mutation::*;
pub use health_check::*;
pub use istio::*;
pub use jwt_authn::*;
pub use local_ratelimit::*;
pub use match_tree::*;
pub use matcher::*;
pub use network::*;
pub use per_filter::*;
pub use ratelimit::*;
pub use rbac::*;
pub use route::*;
pub use runtime_slot::*;
pub use set_filter_state::*;
pub use tcp::*;
pub use tls::*;
pub use xds::*;

/// A shared, immutable name.
pub type Name = Arc<str>;

/// The clusters of a snapshot, by name (sorted, as a `BTreeMap`).
pub type ClusterMap = imbl::OrdMap<Name, Arc<Cluster>>;

/// One complete, consistent configuration: what a worker pins for the life
/// of a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub node: Node,
    pub admin: Option<Admin>,
    pub listeners: Vec<Arc<Listener>>,
    /// A persistent map: cloning a snapshot to change one cluster (EDS)
    /// shares everything else, instead of copying thousands of entries.
    pub clusters: ClusterMap,
    /// `static_resources.secrets` by name.
    pub secrets: BTreeMap<Name, Arc<Secret>>,
    /// Route configurations fetched by RDS, by name (empty without xDS).
    pub routes: BTreeMap<Name, Arc<RouteConfig>>,
    /// `dynamic_resources`: where LDS and CDS come from.
    pub dynamic: DynamicConfig,
    pub stats: StatsConfig,
    /// `overload_manager` `envoy.resource_monitors.global_downstream_max_connections`
    /// (or `downstream_connections`) limit.
    pub max_downstream_connections: Option<u64>,
    /// The bootstrap's `tracing.http`: the provider of every HCM whose
    /// `tracing` names none (Envoy's fallback).
    pub default_tracer: Option<Arc<TraceProvider>>,
    /// `cluster_manager.local_cluster_name`: the static cluster whose hosts
    /// give zone-aware routing the local zone distribution.
    pub local_cluster: Option<Name>,
    /// `bootstrap_extensions` `envoy.bootstrap.internal_listener`: the
    /// per-direction buffer of an internal connection, in bytes (`None`:
    /// no extension, internal listeners are rejected).
    pub internal_listener_buffer: Option<usize>,
}

/// `node` identity.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub zone: String,
    pub region: String,
    pub sub_zone: String,
    /// `node.metadata` as JSON, for `/server_info` and `%ENVIRONMENT%`-style lookups.
    pub metadata: serde_json::Value,
}

/// `admin` server.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: ListenAddress,
    pub access_logs: Vec<Arc<AccessLog>>,
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenAddress {
    Socket(SocketAddr),
    Pipe(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Socket(a) => write!(f, "{a}"),
            ListenAddress::Pipe(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `stats_config`: only `stats_matcher` changes behaviour.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StatsConfig {
    #[default]
    All,
    /// `reject_all: true`.
    None,
    /// `inclusion_list`: a stat is kept when any matcher matches its name.
    Include(Vec<StringMatcher>),
    /// `exclusion_list`: a stat is dropped when any matcher matches its name.
    Exclude(Vec<StringMatcher>),
}

impl StatsConfig {
    /// Whether stat `name` is instantiated.
    pub fn accepts(&self, name: &str) -> bool {
        match self {
            StatsConfig::All => true,
            StatsConfig::None => false,
            StatsConfig::Include(ms) => ms.iter().any(|m| m.matches(name)),
            StatsConfig::Exclude(ms) => !ms.iter().any(|m| m.matches(name)),
        }
    }
}

/// A listener: one bound address and its filter chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: Name,
    pub address: SocketAddr,
    /// Stats prefix: `listener.<stat_prefix or address>.`
    pub stat_prefix: String,
    pub socket: SocketOptions,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB): caps buffered
    /// bytes per connection in each direction.
    pub buffer_limit: u32,
    /// `filter_chains`, selected per connection by [`FilterChainMatch`].
    pub filter_chains: Vec<Arc<FilterChain>>,
    pub default_filter_chain: Option<Arc<FilterChain>>,
    /// `listener_filters`, in order.
    pub listener_filters: Vec<ListenerFilter>,
    /// `listener_filters[i].filter_disabled`, by index: the filter is
    /// skipped for a connection the predicate matches.
    pub listener_filters_disabled: Vec<Option<ListenerFilterPredicate>>,
    /// `filter_chain_matcher`: selects a chain by name in place of the
    /// chains' `filter_chain_match` (`None`: the `FilterChainMatch` order).
    pub filter_chain_matcher: Option<Arc<MatchTree<ChainAction>>>,
    /// `listener_filters_timeout` (default 15 s; `None` = 0 = no timeout).
    pub listener_filters_timeout: Option<Duration>,
    pub continue_on_listener_filters_timeout: bool,
    pub access_logs: Vec<Arc<AccessLog>>,
    /// `traffic_direction: INBOUND`, used by `/drain_listeners?inboundonly`.
    pub inbound: bool,
    /// `ignore_global_conn_limit` or `bypass_overload_manager`: connections
    /// are not counted against the global downstream connection limit.
    pub unlimited: bool,
    /// `internal_listener: {}`: not bound; reached by name from clusters
    /// whose endpoints are `envoy_internal_address`es (`address` is then
    /// unspecified).
    pub internal: bool,
}

/// Socket settings applied with socket2.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketOptions {
    /// `enable_reuse_port` (default true, as Envoy).
    pub reuse_port: bool,
    /// `tcp_backlog_size` (default 1024? Envoy: SOMAXCONN-like 128).
    pub backlog: u32,
    /// `socket_options` with level SOL_SOCKET / IPPROTO_TCP and an int value.
    pub raw: Vec<RawSocketOption>,
    /// `freebind`.
    pub freebind: bool,
}

/// One `socket_options` entry applied with setsockopt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSocketOption {
    pub level: i32,
    pub name: i32,
    pub value: RawSocketValue,
    /// `state`: STATE_PREBIND (0), STATE_BOUND (1) or STATE_LISTENING (2).
    pub state: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSocketValue {
    Int(i64),
    Bytes(Vec<u8>),
}

/// A filter chain: match criteria, transport socket and network filters.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    pub name: Name,
    pub matcher: FilterChainMatch,
    /// `transport_socket` `envoy.transport_sockets.tls`; `None` = raw_buffer.
    pub tls: Option<Arc<DownstreamTls>>,
    /// `transport_socket_connect_timeout`: TLS handshake deadline.
    pub transport_connect_timeout: Option<Duration>,
    pub filter: NetworkFilter,
    /// Network filters weir runs before `filter`, in order.
    pub read_filters: Vec<ReadFilterConfig>,
    /// Network filters before `filter` that weir accepts without running
    /// (ARCHITECTURE.md "Pass-through filters").
    pub pass_through: Vec<PassThrough>,
    /// Field path (`static_resources.listeners[0].filter_chains[1]`).
    pub path: String,
}

/// The terminal network filter of a chain.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilter {
    Http(Arc<HttpConnectionManager>),
    Tcp(Arc<TcpProxy>),
}

/// `listener_filters` weir implements.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenerFilter {
    TlsInspector,
    HttpInspector,
    ProxyProtocol(ProxyProtocolConfig),
    /// `envoy.filters.listener.original_dst`: restores the destination
    /// (SO_ORIGINAL_DST on sockets; filter state or passed-through
    /// metadata on internal connections).
    OriginalDst,
}

/// A `filter_chain_matcher` action (`google.protobuf.StringValue`): a
/// chain's name, resolved at translation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainAction {
    pub name: Name,
    /// The index in `filter_chains`; `None` for a name no chain has (the
    /// default chain is not named by the matcher): such a match selects no
    /// chain, as in Envoy.
    pub index: Option<usize>,
}

/// `ListenerFilterChainMatchPredicate`, evaluated on the connection's
/// destination port (as restored by PROXY protocol).
#[derive(Debug, Clone, PartialEq)]
pub enum ListenerFilterPredicate {
    Any,
    /// `destination_port_range`: `start <= port < end`.
    DestinationPorts {
        start: u32,
        end: u32,
    },
    Not(Box<ListenerFilterPredicate>),
    And(Vec<ListenerFilterPredicate>),
    Or(Vec<ListenerFilterPredicate>),
}

impl ListenerFilterPredicate {
    pub fn matches(&self, port: u16) -> bool {
        match self {
            ListenerFilterPredicate::Any => true,
            ListenerFilterPredicate::DestinationPorts { start, end } => {
                *start <= u32::from(port) && u32::from(port) < *end
            }
            ListenerFilterPredicate::Not(p) => !p.matches(port),
            ListenerFilterPredicate::And(v) => v.iter().all(|p| p.matches(port)),
            ListenerFilterPredicate::Or(v) => v.iter().any(|p| p.matches(port)),
        }
    }
}

/// `envoy.filters.listener.proxy_protocol`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocolConfig {
    pub allow_requests_without_proxy_protocol: bool,
    /// `rules`: TLVs copied into the connection's dynamic metadata, at
    /// most one per TLV type (as Envoy's map, a later rule for a type
    /// replaces an earlier one), in rule order.
    pub rules: Vec<TlvRule>,
    /// `stat_prefix`: stats are `proxy_proto.<stat_prefix>.*` (empty:
    /// `proxy_proto.*`).
    pub stat_prefix: String,
    /// Versions not in `disallowed_versions`.
    pub allow_v1: bool,
    pub allow_v2: bool,
    /// `pass_through_tlvs`: the TLVs kept for an upstream PROXY protocol
    /// header (Envoy's `envoy.network.proxy_protocol_options`); unset keeps
    /// none.
    pub pass_through: TlvPassThrough,
}

/// One `ProxyProtocol.rules` entry: a v2 TLV of `tlv_type` sets
/// `key` in dynamic metadata namespace `namespace`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlvRule {
    pub tlv_type: u8,
    /// `metadata_namespace`, or `envoy.filters.listener.proxy_protocol`.
    pub namespace: String,
    pub key: String,
    /// `value_string_encoding: BASE64`; else `SANITIZED_UTF8`.
    pub base64: bool,
}

/// `FilterChainMatch`. Empty fields match anything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<Cidr>,
    /// Lower-cased; `*.example.com` wildcards allowed.
    pub server_names: Vec<String>,
    /// `tls` or `raw_buffer` (empty = any).
    pub transport_protocol: String,
    pub application_protocols: Vec<String>,
    pub direct_source_prefix_ranges: Vec<Cidr>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<Cidr>,
    pub source_ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceType {
    #[default]
    Any,
    SameIpOrLoopback,
    External,
}

/// Default timeouts etc. reused across modules.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
