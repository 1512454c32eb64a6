//! Upstream clusters and their endpoints.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{Http2Settings, Name, TransportSocketMatch, UpstreamTransport};

/// `Cluster`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: Name,
    /// Stats name: `alt_stat_name` or `name`.
    pub stat_name: String,
    pub discovery: Discovery,
    /// `eds_cluster_config` of an EDS cluster.
    pub eds: Option<Eds>,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    /// Shared with the EDS assignment it came from (no copy per merge).
    pub localities: Arc<[LocalityEndpoints]>,
    pub dns: DnsSettings,
    pub protocol: UpstreamProtocol,
    pub http2: Http2Settings,
    /// `max_requests_per_connection`.
    pub max_requests_per_connection: Option<u32>,
    /// `upstream_connection_options.tcp_keepalive`: (time, interval,
    /// probes), each `None` = the system default.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Upstream connection idle timeout (default 1 h, as Envoy).
    pub idle_timeout: Option<Duration>,
    pub buffer_limit: u32,
    /// `common_lb_config.healthy_panic_threshold` (default 50%).
    pub panic_threshold: f64,
    /// `common_lb_config.locality_weighted_lb_config`: pick a locality by
    /// its `load_balancing_weight` (scaled by its health) before a host.
    pub locality_weighted: bool,
    /// The typed ring_hash/maglev policy's `consistent_hashing_lb_config.
    /// hash_policy`: when set, the request hash comes from it, not from the
    /// route's `hash_policy` (as Envoy).
    pub lb_hash_policy: Arc<[super::HashPolicy]>,
    /// `load_assignment.policy.overprovisioning_factor` (default 140).
    pub overprovisioning_factor: u32,
    /// `load_assignment.policy.weighted_priority_health`: a priority
    /// level's health is its healthy hosts' share of the level's weight,
    /// not of its host count.
    pub weighted_priority_health: bool,
    /// `slow_start_config` of a round robin or least request policy (legacy
    /// `round_robin_lb_config` / `least_request_lb_config` or the typed
    /// policy), when its window is positive.
    pub slow_start: Option<SlowStart>,
    /// `zone_aware_lb_config.fail_traffic_on_panic` (round robin, least
    /// request, random): a priority level in panic yields no host.
    pub fail_traffic_on_panic: bool,
    /// `zone_aware_lb_config` (round robin, least request, random): zone-aware
    /// routing against the bootstrap's local cluster.
    pub zone_aware: ZoneAware,
    /// `consistent_hashing_lb_config.hash_balance_factor` of a ring hash or
    /// Maglev cluster (at least 100): bounded loads, a host with more
    /// active requests than its share of factor/100 × the cluster's is
    /// passed over.
    pub hash_balance_factor: Option<u32>,
    /// The `override_host` typed policy: hosts named by the request first,
    /// then `lb` (its `fallback_policy`).
    pub override_host: Option<Arc<OverrideHost>>,
    /// `transport_socket` (plain or TLS).
    pub transport: UpstreamTransport,
    /// `transport_socket_matches`, tried in order against each endpoint's
    /// `envoy.transport_socket_match` metadata; the first match wins, else
    /// `transport`.
    pub transport_matches: Vec<TransportSocketMatch>,
    /// Upstream `filters` passed through (Istio's metadata exchange, whose
    /// ALPN weir does not offer).
    pub pass_through: Vec<super::PassThrough>,
    /// Upstream `filters`: Istio's metadata exchange, run on connections
    /// that negotiate its ALPN.
    pub metadata_exchange: Option<Arc<super::MetadataExchangeConfig>>,
    /// Cluster metadata `istio.alpn_override: "false"` (istiod's mark on
    /// clusters with user TLS settings): Istio's `istio.alpn` leaves their
    /// ALPN alone.
    pub istio_alpn_override_disabled: bool,
    /// `upstream_http_protocol_options.auto_sni`: TLS SNI from the upstream
    /// request's host (or `override_auto_sni_header`).
    pub auto_sni: bool,
    /// `auto_san_validation`: the upstream certificate must have a DNS SAN
    /// matching that SNI.
    pub auto_san_validation: bool,
    pub auto_sni_header: Option<http::HeaderName>,
    /// `circuit_breakers`: limits per routing priority (Envoy's defaults
    /// when a priority has no thresholds).
    pub circuit_breakers: CircuitBreakers,
    /// `outlier_detection` (`None`: no detector, as Envoy).
    pub outlier_detection: Option<OutlierDetection>,
    /// `health_checks[0]`: active health checking (`None`: hosts are not
    /// checked, as Envoy).
    pub health_check: Option<Arc<ActiveHealthCheck>>,
    /// `type: ORIGINAL_DST` (`lb_policy: CLUSTER_PROVIDED`): hosts made per
    /// request from where it was going (`None` for other types).
    pub original_dst: Option<Arc<OriginalDst>>,
}

/// An `ORIGINAL_DST` cluster's settings (`original_dst_lb_config` and
/// `cleanup_interval`), as Envoy's `OriginalDstCluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalDst {
    /// `cleanup_interval` (default 5 s): a host not picked for a whole
    /// interval and holding no connection is removed.
    pub cleanup_interval: Duration,
    /// `use_http_header`: the header naming the host (`http_header_name`,
    /// default `x-envoy-original-dst-host`).
    pub header: Option<http::HeaderName>,
    /// `upstream_port_override`: the port every host gets.
    pub port_override: Option<u16>,
    /// `metadata_key`: the dynamic metadata string (or first list entry)
    /// naming the host: namespace and path.
    pub metadata_key: Option<(String, Vec<String>)>,
}

impl Cluster {
    /// The transport for an endpoint with `metadata` (filter_metadata JSON).
    pub fn transport_for(&self, metadata: &serde_json::Value) -> &UpstreamTransport {
        let em = metadata.get("envoy.transport_socket_match");
        for m in &self.transport_matches {
            let ok = m
                .criteria
                .iter()
                .all(|(k, v)| em.and_then(|e| e.get(k)) == Some(v));
            if ok {
                return &m.transport;
            }
        }
        &self.transport
    }
}

/// TCP keepalive settings of upstream sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpKeepalive {
    pub time: Option<std::time::Duration>,
    pub interval: Option<std::time::Duration>,
    pub probes: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    Static,
    StrictDns,
    LogicalDns,
    /// Endpoints from EDS (`ClusterLoadAssignment` resources).
    Eds,
    /// `ORIGINAL_DST`: a host per destination the requests name, made on
    /// demand (no endpoints in the configuration).
    OriginalDst,
}

/// Where an EDS cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Eds {
    /// `service_name`, or the cluster's name.
    pub service_name: Name,
    pub source: super::ConfigSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choice_count` choices on active requests.
    LeastRequest {
        choice_count: u32,
    },
    Random,
    /// `RING_HASH` (or the `ring_hash` typed policy): Envoy's ketama ring.
    RingHash(RingHash),
    /// `MAGLEV` (or the `maglev` typed policy).
    Maglev(Maglev),
}

impl LbPolicy {
    /// A consistent-hash policy: hosts are picked by the request's hash
    /// (route `hash_policy`).
    pub fn is_hash(&self) -> bool {
        matches!(self, LbPolicy::RingHash(_) | LbPolicy::Maglev(_))
    }
}

/// `ZoneAwareLbConfig`'s routing knobs (Envoy's defaults when unset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneAware {
    /// `routing_enabled`: the percent of picks that try zone-aware routing
    /// (rounded to an integer, as Envoy; default 100).
    pub routing_enabled: u32,
    /// `min_cluster_size`: fewer healthy hosts at priority 0 disable it
    /// (default 6).
    pub min_cluster_size: u64,
}

impl Default for ZoneAware {
    fn default() -> Self {
        ZoneAware {
            routing_enabled: 100,
            min_cluster_size: 6,
        }
    }
}

/// `envoy.load_balancing_policies.override_host`: each request names its
/// hosts (`ip:port`, comma-separated) in the sources, read in order; a try
/// takes the next named address that is in the cluster's host set (any
/// health, as Envoy), and the cluster's `lb` (the `fallback_policy`) picks
/// once none is left.
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideHost {
    pub sources: Vec<OverrideHostSource>,
    /// `selected_host_key`: the dynamic metadata (namespace, key path) the
    /// picked host's `ip:port` is written to at each pick, named or
    /// fallback (Envoy 1.40 writes it for every pick).
    pub selected_host_key: Option<(String, Vec<String>)>,
}

/// `OverrideHost.OverrideHostSource`.
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideHostSource {
    /// The first value of a request header (`None`: a name no request can
    /// carry; Envoy accepts any header value as the name).
    Header(Option<http::HeaderName>),
    /// A string in the request's dynamic metadata: namespace and path.
    Metadata {
        namespace: String,
        path: Vec<String>,
    },
}

/// `SlowStartConfig`: a host that joins (or passes its active health
/// check again) takes a growing share of traffic during `window`: its
/// weight × max((elapsed / window)^(1 / aggression), min_weight).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    /// `aggression.default_value` (1.0 when unset; Envoy uses 1.0 for a
    /// value <= 0 or NaN).
    pub aggression: f64,
    /// `min_weight_percent` as a fraction (default 0.1).
    pub min_weight: f64,
}

impl SlowStart {
    /// The factor for a host healthy for `elapsed` (1.0 past the window),
    /// as Envoy's `applySlowStartFactor` (at least 1 ms elapsed).
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if elapsed >= self.window {
            return 1.0;
        }
        let ms = elapsed.as_millis().max(1) as f64;
        let t = ms / self.window.as_millis().max(1) as f64;
        let a = if self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let scaled = if a == 1.0 || t == 1.0 {
            t
        } else {
            t.powf(1.0 / a)
        };
        scaled.max(self.min_weight)
    }
}

/// `ring_hash_lb_config`, with Envoy's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingHash {
    /// `minimum_ring_size` (default 1024).
    pub minimum_ring_size: u64,
    /// `maximum_ring_size` (default 8M, at most 8M).
    pub maximum_ring_size: u64,
    pub hash_function: RingHashFunction,
    /// `use_hostname_for_hashing`: hosts are keyed by hostname, not address.
    pub use_hostname: bool,
}

impl Default for RingHash {
    fn default() -> Self {
        RingHash {
            minimum_ring_size: 1024,
            maximum_ring_size: 8 * 1024 * 1024,
            hash_function: RingHashFunction::XxHash,
            use_hostname: false,
        }
    }
}

/// `RingHashLbConfig.HashFunction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingHashFunction {
    XxHash,
    /// libstdc++'s 64-bit MurmurHash2 (`std::hash<std::string>`).
    MurmurHash2,
}

/// `maglev_lb_config`, with Envoy's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Maglev {
    /// `table_size` (default 65537; prime).
    pub table_size: u64,
    pub use_hostname: bool,
}

impl Default for Maglev {
    fn default() -> Self {
        Maglev {
            table_size: 65537,
            use_hostname: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFamily {
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DnsSettings {
    pub refresh_rate: Duration,
    pub respect_ttl: bool,
    pub family: DnsFamily,
}

/// How weir speaks HTTP to the cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// `use_downstream_protocol_config`.
    UseDownstream,
    /// `auto_config`: HTTP/2 when ALPN negotiates it; cleartext is HTTP/1.1.
    Auto,
}

/// `LocalityLbEndpoints`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityEndpoints {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
    pub priority: u32,
    pub weight: Option<u32>,
    pub endpoints: Vec<Endpoint>,
}

/// `LbEndpoint`.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub address: EndpointAddress,
    pub weight: u32,
    pub health: HealthStatus,
    pub hostname: String,
    /// `metadata.filter_metadata` as JSON, for `%UPSTREAM_METADATA%`.
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    /// A DNS name resolved by STRICT_DNS / LOGICAL_DNS clusters.
    Dns(String, u16),
    /// A Unix socket (`pipe`): gRPC clusters such as Istio's `xds-grpc`
    /// and `sds-grpc`. HTTP routes to such a cluster find no host (503).
    Pipe(std::path::PathBuf),
    /// `envoy_internal_address`: an internal listener of this process
    /// (`server_listener_name`), `endpoint_id` telling endpoints apart.
    Internal {
        listener: Name,
        endpoint_id: Name,
    },
}

impl std::fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointAddress::Ip(a) => write!(f, "{a}"),
            EndpointAddress::Dns(h, p) => write!(f, "{h}:{p}"),
            EndpointAddress::Pipe(p) => write!(f, "unix://{}", p.display()),
            // Envoy's `EnvoyInternalInstance::asString`.
            EndpointAddress::Internal {
                listener,
                endpoint_id,
            } => write!(f, "envoy://{listener}/{endpoint_id}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
    Degraded,
}

impl HealthStatus {
    /// Envoy routes to UNKNOWN, HEALTHY and DEGRADED hosts.
    pub fn is_usable(self) -> bool {
        matches!(
            self,
            HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded
        )
    }
}

/// `CircuitBreakers`: thresholds for the DEFAULT and HIGH routing
/// priorities (the first `thresholds` entry of each priority, as Envoy).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CircuitBreakers {
    pub default: Thresholds,
    pub high: Thresholds,
}

/// `CircuitBreakers.Thresholds` of one priority.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `retry_budget`: when set, the retry limit is a share of the active
    /// and pending requests instead of `max_retries`.
    pub retry_budget: Option<RetryBudget>,
    /// `track_remaining`: publish the `remaining_*` gauges.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    /// Envoy's defaults: 1024 connections, pending and active requests, 3
    /// concurrent retries.
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// `CircuitBreakers.Thresholds.RetryBudget`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// `budget_percent` (default 20%).
    pub budget_percent: f64,
    /// `min_retry_concurrency` (default 3).
    pub min_retry_concurrency: u32,
}

/// `OutlierDetection`, with Envoy's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierDetection {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Default: the larger of 300 s and `base_ejection_time`.
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` / 1000.
    pub success_rate_stdev_factor: f64,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub failure_percentage_threshold: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
    pub always_eject_one_host: bool,
}

impl Default for OutlierDetection {
    /// Envoy's defaults (`outlier_detection.proto`).
    fn default() -> Self {
        OutlierDetection {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_time_jitter: Duration::ZERO,
            max_ejection_percent: 10,
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            split_external_local_origin_errors: false,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1.9,
            enforcing_success_rate: 100,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            always_eject_one_host: false,
        }
    }
}

/// A cluster's active health check (`envoy.config.core.v3.HealthCheck`),
/// with Envoy's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveHealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Used while the cluster has never made an upstream connection
    /// (default 60 s).
    pub no_traffic_interval: Duration,
    /// For a healthy host while there is no traffic (default
    /// `no_traffic_interval`).
    pub no_traffic_healthy_interval: Duration,
    /// Default `interval`.
    pub unhealthy_interval: Duration,
    /// Default `unhealthy_interval`.
    pub unhealthy_edge_interval: Duration,
    /// Default `interval`.
    pub healthy_edge_interval: Duration,
    /// Default true.
    pub reuse_connection: bool,
    pub kind: HealthCheckKind,
    /// `tls_options.alpn_protocols`: the ALPN a TLS check connection
    /// offers instead of its transport's (empty: the transport's).
    pub alpn: Vec<Vec<u8>>,
    /// `transport_socket_match_criteria`, as endpoint `filter_metadata`
    /// (`{"envoy.transport_socket_match": criteria}`): when set, it alone
    /// picks the `transport_socket_matches` entry of check connections.
    pub transport_match: Option<serde_json::Value>,
}

/// What one check does.
#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheckKind {
    /// `http_health_check` (`GET`).
    Http {
        path: String,
        /// `host`, or the cluster name.
        host: String,
        /// `[start, end)` ranges; default `[200, 201)`.
        expected: Vec<(u16, u16)>,
        /// `codec_client_type: HTTP2` (prior knowledge, h2c).
        http2: bool,
        /// `request_headers_to_remove` (removed first, as Envoy's header
        /// parser), then `request_headers_to_add` (literal values).
        remove: Vec<http::HeaderName>,
        add: Vec<(super::HeaderAdd, http::HeaderValue)>,
    },
    /// `grpc_health_check`: `grpc.health.v1.Health/Check` over HTTP/2;
    /// healthy only on `SERVING`.
    Grpc {
        /// `service_name` (empty: the server's overall health).
        service_name: String,
        /// `authority`, or the cluster name.
        authority: String,
        /// `initial_metadata`: headers sent with every check.
        metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// `tcp_health_check`: `send` written after connecting; every
    /// `receive` block must then arrive, in order (connect-only when both
    /// are empty).
    Tcp {
        send: Vec<u8>,
        receive: Vec<Vec<u8>>,
    },
}
