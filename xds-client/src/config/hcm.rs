//! `envoy.filters.network.http_connection_manager` and access logs.
use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue};

use super::{CompressorConfig, FaultConfig, Format, GrpcStatsConfig, HttpRbac, Name, RouteConfig};

/// Where an HCM's routes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteSource {
    /// `route_config`.
    Static(Arc<RouteConfig>),
    /// `rds`: fetched by name, swapped in per request.
    Rds(super::Rds),
}

impl RouteSource {
    /// The inline route configuration, if any.
    pub fn inline(&self) -> Option<&Arc<RouteConfig>> {
        match self {
            RouteSource::Static(r) => Some(r),
            RouteSource::Rds(_) => None,
        }
    }
}

/// The HTTP connection manager of a filter chain.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec: Codec,
    /// The inline `route_config`, or the RDS name to fetch.
    pub routes: RouteSource,
    pub http_filters: Vec<HttpFilterConfig>,
    pub access_logs: Vec<Arc<AccessLog>>,
    /// `common_http_protocol_options.idle_timeout` (default 1 h; `0s` disables).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration`.
    pub max_connection_duration: Option<Duration>,
    /// `common_http_protocol_options.max_headers_count` (default 100).
    pub max_headers_count: u32,
    /// `common_http_protocol_options.max_stream_duration`.
    pub max_stream_duration: Option<Duration>,
    pub headers_with_underscores: UnderscoreAction,
    /// `common_http_protocol_options.max_requests_per_connection`.
    pub max_requests_per_connection: Option<u32>,
    /// `stream_idle_timeout` (default 5 min; `0s` disables).
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout` (default disabled).
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout` (default disabled).
    pub request_headers_timeout: Option<Duration>,
    /// `max_request_headers_kb` (default 60).
    pub max_request_headers_kb: u32,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub via: Option<HeaderValue>,
    /// `server_name` (default `envoy`, as Envoy).
    pub server_name: HeaderValue,
    pub server_header_transformation: ServerHeaderTransformation,
    /// `generate_request_id` (default true).
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashesAction,
    pub strip_port: StripPort,
    /// `upgrade_configs`: enabled upgrade types (lowercase), e.g. `websocket`.
    pub upgrades: Vec<String>,
    pub forward_client_cert: ForwardClientCert,
    /// `set_current_client_cert_details`, in Envoy's order.
    pub client_cert_details: Vec<ClientCertDetail>,
    pub internal_address: InternalAddressConfig,
    pub http1: Http1Settings,
    pub http2: Http2Settings,
    /// `append_x_forwarded_port`.
    pub append_x_forwarded_port: bool,
    /// `add_user_agent`: fill x-envoy-downstream-service-cluster / -node.
    pub add_user_agent: bool,
    /// `drain_timeout` (default 5 s): the GOAWAY grace period.
    pub drain_timeout: Duration,
    /// `delayed_close_timeout` is accepted; weir closes after the flush.
    pub proxy_100_continue: bool,
    /// `tracing`: the trace decision (no tracer provider: no spans).
    pub tracing: Option<TracingConfig>,
    /// `request_id_extension`'s `UuidRequestIdConfig`.
    pub request_id: RequestIdConfig,
}

/// HCM `tracing`, validated. Sampling rates are per 10,000 (Envoy turns
/// the `Percent`s into `FractionalPercent`s over `TEN_THOUSAND`).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// `client_sampling` (default 100%): requests with `x-client-trace-id`.
    pub client_sampling: u32,
    /// `random_sampling` (default 100%).
    pub random_sampling: u32,
    /// `overall_sampling` (default 100%): caps the others.
    pub overall_sampling: u32,
    /// `provider`: who gets the spans (`None`: the decision only).
    pub provider: Option<Arc<TraceProvider>>,
    /// `max_path_tag_length` (default 256): the path's share of `http.url`.
    pub max_path_tag_length: usize,
    /// `custom_tags`, applied last to every span.
    pub custom_tags: Vec<CustomTag>,
    /// The listener's `traffic_direction` is OUTBOUND: Envoy's `egress`
    /// operation (span name `egress <host>`, kind CLIENT).
    pub egress: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            client_sampling: 10_000,
            random_sampling: 10_000,
            overall_sampling: 10_000,
            provider: None,
            max_path_tag_length: 256,
            custom_tags: Vec::new(),
            egress: false,
        }
    }
}

/// A tracer provider (HCM `tracing.provider`).
#[derive(Debug, Clone, PartialEq)]
pub enum TraceProvider {
    /// `envoy.tracers.opentelemetry`: OTLP over gRPC.
    OpenTelemetry(OpenTelemetryProvider),
    /// `envoy.tracers.zipkin`: JSON v2 over HTTP.
    Zipkin(ZipkinProvider),
}

/// `ZipkinConfig` (`HTTP_JSON`).
#[derive(Debug, Clone, PartialEq)]
pub struct ZipkinProvider {
    /// `collector_cluster`.
    pub cluster: Name,
    /// `collector_endpoint`: the path reports are POSTed to.
    pub endpoint: String,
    /// `collector_hostname` (default: the cluster name).
    pub hostname: String,
    /// `trace_id_128bit` (default false): new traces get 128-bit ids.
    pub trace_id_128bit: bool,
    /// `shared_span_context` (default true): the server span reuses the
    /// incoming span id.
    pub shared_span_context: bool,
}

/// `OpenTelemetryConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTelemetryProvider {
    /// `grpc_service` (envoy_grpc): where `TraceService/Export` goes.
    pub grpc: super::GrpcService,
    /// `service_name` (default `unknown_service:envoy`, as Envoy).
    pub service_name: String,
}

/// One `custom_tags` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomTag {
    pub tag: String,
    pub value: CustomTagValue,
}

/// Where a custom tag's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomTagValue {
    /// `literal.value`.
    Literal(String),
    /// `environment`: read once at translation, `default_value` when unset.
    Environment(String),
    /// `request_header.name`, else `default_value` (no tag when empty).
    RequestHeader(HeaderName, String),
}

/// Envoy's UUID request ID extension (`UuidRequestIdConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestIdConfig {
    /// `pack_trace_reason` (default true): the trace decision is written
    /// into the x-request-id UUID.
    pub pack_trace_reason: bool,
    /// `use_request_id_for_trace_sampling` (default true).
    pub use_request_id_for_trace_sampling: bool,
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        RequestIdConfig {
            pack_trace_reason: true,
            use_request_id_for_trace_sampling: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoreAction {
    #[default]
    Allow,
    RejectRequest,
    DropHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeaderTransformation {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashesAction {
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripPort {
    None,
    /// `strip_matching_host_port`: strip when it equals the listener port.
    Matching,
    /// `strip_any_host_port`.
    Any,
}

/// Fields of `x-forwarded-client-cert` beyond `By` and `Hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertDetail {
    Subject,
    Uri,
    Cert,
    Chain,
    Dns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardClientCert {
    Sanitize,
    ForwardOnly,
    AppendForward,
    SanitizeSet,
    AlwaysForwardOnly,
}

/// Which downstream addresses count as internal (for x-envoy-* trust and
/// `require_tls: EXTERNAL_ONLY`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InternalAddressConfig {
    pub unix_sockets: bool,
    pub cidrs: Vec<Cidr>,
}

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len.min(32)))
                };
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len.min(128)))
                };
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// HTTP/1 server settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Http1Settings {
    pub accept_http_10: bool,
    pub default_host_for_http_10: Option<String>,
}

/// HTTP/2 settings (server and upstream), Envoy's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    pub allow_connect: bool,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: 2_147_483_647,
            initial_stream_window_size: 268_435_456,
            initial_connection_window_size: 268_435_456,
            allow_connect: false,
            keepalive_interval: None,
            keepalive_timeout: None,
        }
    }
}

/// An HTTP filter in the chain: a closed set, one variant per filter weir
/// implements (the factory in `filters` matches on it).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpFilterConfig {
    pub name: Name,
    pub kind: HttpFilterKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HttpFilterKind {
    /// `envoy.filters.http.router`: terminal.
    Router(RouterConfig),
    /// `envoy.filters.http.fault`. An empty config (no `delay`, no `abort`)
    /// still matters: routes may override it (`typed_per_filter_config`).
    Fault(Arc<FaultConfig>),
    /// `envoy.filters.http.cors`: no config of its own; its policies are
    /// per route ([`FilterOverride::Cors`]).
    Cors,
    /// `envoy.filters.http.grpc_stats`.
    GrpcStats(Arc<GrpcStatsConfig>),
    /// `envoy.filters.http.compressor`.
    Compressor(Arc<CompressorConfig>),
    /// `envoy.filters.http.local_ratelimit`. Without `filter_enabled` or a
    /// bucket it does nothing, but routes may override it.
    LocalRateLimit(Arc<super::HttpLocalRateLimit>),
    /// `envoy.filters.http.rbac`. Without rules (or shadow rules) it still
    /// matters: routes may override it (`RBACPerRoute`).
    Rbac(Arc<HttpRbac>),
    /// `envoy.filters.http.buffer`: `max_request_bytes`.
    Buffer(u32),
    /// `envoy.filters.http.health_check`.
    HealthCheck(Arc<super::HealthCheckConfig>),
    /// `envoy.filters.http.header_mutation`. Without mutations it still
    /// matters: routes may add theirs (`HeaderMutationPerRoute`).
    HeaderMutation(Arc<super::HeaderMutationConfig>),
    /// `envoy.filters.http.set_filter_state`.
    SetFilterState(Arc<super::SetFilterState>),
    /// `envoy.filters.http.ext_authz`.
    ExtAuthz(Arc<super::ExtAuthz>),
    /// `envoy.filters.http.ratelimit` (the global rate limit service).
    RateLimit(Arc<super::HttpRateLimit>),
    /// Istio's peer metadata filter (`io.istio.http.peer_metadata.Config`).
    PeerMetadata(Arc<super::PeerMetadataConfig>),
    /// Istio's `istio.stats` HTTP filter (`stats.PluginConfig`).
    IstioStats(Arc<super::IstioStatsConfig>),
    /// Istio's `istio.alpn`: the upstream ALPN by upstream protocol.
    IstioAlpn(Arc<super::IstioAlpnConfig>),
    /// `envoy.filters.http.jwt_authn`.
    JwtAuthn(Arc<super::JwtAuthn>),
    /// A filter accepted and not run until the traffic-policy work
    /// implements it (ARCHITECTURE.md "Pass-through filters"); not built
    /// into the request path, counted in `weir.pass_through_filter.*`.
    PassThrough(PassThrough),
}

/// Filters weir accepts without running them (HTTP and network). Each one
/// is listed, with what is missing, in ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PassThrough {
    /// Istio's network `istio.stats` (`stats.PluginConfig`) in front of the
    /// HCM (in front of `tcp_proxy` it runs).
    IstioStats,
    /// Istio's network `istio.metadata_exchange` (accepted only where the
    /// exchange cannot start).
    MetadataExchange,
}

impl PassThrough {
    /// The last component of the stat `weir.pass_through_filter.<name>`.
    pub fn stat_name(self) -> &'static str {
        match self {
            PassThrough::IstioStats => "istio_stats",
            PassThrough::MetadataExchange => "metadata_exchange",
        }
    }
}

impl HttpConnectionManager {
    /// The pass-through filters of the HTTP filter chain, in order.
    pub fn pass_through(&self) -> impl Iterator<Item = PassThrough> + '_ {
        self.http_filters.iter().filter_map(|f| match f.kind {
            HttpFilterKind::PassThrough(p) => Some(p),
            _ => None,
        })
    }
}

/// `envoy.extensions.filters.http.router.v3.Router`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouterConfig {
    /// `suppress_envoy_headers`.
    pub suppress_envoy_headers: bool,
    /// `start_child_span` is accepted (tracing is not built yet).
    pub respect_expected_rq_timeout: bool,
}

/// An access log sink with its filter and format.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    pub sink: AccessLogSink,
    pub format: LogFormat,
    pub filter: Option<AccessLogFilter>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AccessLogSink {
    File(PathBuf),
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// Text; Envoy's default format when none is given. Always ends in `\n`.
    Text(Format),
    /// `json_format`: keys in config order, values formats (`None` operators
    /// render as JSON null, as Envoy).
    Json(Vec<(String, JsonFormatValue)>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum JsonFormatValue {
    Format(Format),
    Nested(Vec<(String, JsonFormatValue)>),
    Number(f64),
    Bool(bool),
}

/// `AccessLogFilter` (the subset weir implements).
#[derive(Debug, Clone, PartialEq)]
pub enum AccessLogFilter {
    Status(Comparison),
    Duration(Comparison),
    /// `response_flag_filter`: any of these flags (empty = any flag set).
    ResponseFlag(Vec<String>),
    NotHealthCheck,
    And(Vec<AccessLogFilter>),
    Or(Vec<AccessLogFilter>),
    /// `header_filter`.
    Header(super::HeaderMatcher),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub op: CmpOp,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Comparison {
    pub fn eval(&self, v: u64) -> bool {
        match self.op {
            CmpOp::Eq => v == self.value,
            CmpOp::Ge => v >= self.value,
            CmpOp::Le => v <= self.value,
            CmpOp::Ne => v != self.value,
        }
    }
}
