//! Istio's telemetry filters: peer metadata
//! (`io.istio.http.peer_metadata.Config`) and `istio.stats`
//! (`stats.PluginConfig`), validated.

/// `io.istio.http.peer_metadata.Config`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerMetadataConfig {
    /// `downstream_discovery`, in order (the first method with a result wins).
    pub downstream_discovery: Vec<PeerDiscovery>,
    /// `upstream_discovery` (from the response headers).
    pub upstream_discovery: Vec<PeerDiscovery>,
    /// `downstream_propagation` (response headers).
    pub downstream_propagation: Vec<PeerPropagation>,
    /// `upstream_propagation` (request headers).
    pub upstream_propagation: Vec<PeerPropagation>,
    /// `shared_with_upstream`: the peer filter state is shared with the
    /// upstream connection once (as Istio's filter).
    pub shared_with_upstream: super::Sharing,
    /// `additional_labels`: peer labels kept besides Istio's four.
    pub additional_labels: Vec<String>,
}

/// A `DiscoveryMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDiscovery {
    /// `istio_headers`: `x-envoy-peer-metadata` / `-id`, removed after.
    IstioHeaders,
    /// `baggage`: the request's first `baggage` header, as Istio parses it
    /// (any value yields a peer; the header is kept). Downstream only: Istio
    /// ignores it in `upstream_discovery` (with a warning), so does the
    /// translator.
    Baggage,
    /// `workload_discovery`: the peer's address looked up among the
    /// workloads WDS delivered (bootstrap extension
    /// `istio.workload.BootstrapExtension`); without that extension
    /// nothing is found, as Istio without a provider.
    WorkloadDiscovery,
}

/// A `PropagationMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPropagation {
    /// `istio_headers`: our node's id and metadata.
    IstioHeaders {
        /// `skip_external_clusters`: not to `PassthroughCluster`.
        skip_external_clusters: bool,
    },
    /// `baggage`: our node metadata as a `baggage` header (replacing any),
    /// on every request (upstream) or response (downstream).
    Baggage,
}

/// `stats.PluginConfig` (HTTP filter).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IstioStatsConfig {
    /// `disable_host_header_fallback`.
    pub disable_host_header_fallback: bool,
    /// `reporter: SERVER_GATEWAY` (`waypoint`); else the listener's
    /// direction decides.
    pub server_gateway: bool,
    /// The listener's `traffic_direction` is INBOUND (set by the listener
    /// translator): the reporter is `destination`, else `source`.
    pub inbound: bool,
    /// `metrics`, in order.
    pub metrics: Vec<IstioMetricConfig>,
    /// The distinct dimension expressions, by index.
    pub expressions: Vec<DimensionExpr>,
}

/// One `metrics` entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IstioMetricConfig {
    /// `name` without the `istio_` prefix; empty: every metric.
    pub name: String,
    /// `dimensions`, sorted by tag: tag -> index into
    /// [`IstioStatsConfig::expressions`].
    pub dimensions: Vec<(String, usize)>,
    /// `tags_to_remove`.
    pub tags_to_remove: Vec<String>,
    /// `drop`.
    pub drop: bool,
}

/// The CEL forms weir evaluates for `dimensions` (the attribute reads
/// people write; anything else is rejected naming the field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimensionExpr {
    /// A string literal (`'text'` or `"text"`).
    Literal(String),
    /// `request.host` (`:authority`).
    RequestHost,
    /// `request.method`.
    RequestMethod,
    /// `request.path` (with the query).
    RequestPath,
    /// `request.url_path` (without the query).
    RequestUrlPath,
    /// `request.scheme`.
    RequestScheme,
    /// `request.protocol` (`HTTP/1.1`, `HTTP/2`).
    RequestProtocol,
    /// `request.headers['name']` (lower-cased name).
    RequestHeader(String),
    /// `response.code`.
    ResponseCode,
    /// `response.headers['name']`.
    ResponseHeader(String),
    /// `xds.cluster_name`.
    ClusterName,
    /// `xds.route_name`.
    RouteName,
    /// `upstream_peer.<field>` / `filter_state.upstream_peer.<field>`.
    UpstreamPeer(PeerField),
    /// `downstream_peer.<field>` / `filter_state.downstream_peer.<field>`.
    DownstreamPeer(PeerField),
}

/// The fields of Istio's peer object (`WorkloadMetadataObject` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerField {
    /// `name`
    Name,
    /// `namespace`
    Namespace,
    /// `cluster`
    Cluster,
    /// `service` (canonical name)
    Service,
    /// `revision` (canonical revision)
    Revision,
    /// `app`
    App,
    /// `version`
    Version,
    /// `workload`
    Workload,
    /// `type`
    Type,
    /// `region`
    Region,
    /// `availability_zone`
    Zone,
}

impl PeerField {
    /// The field of Istio's token name.
    pub fn from_token(t: &str) -> Option<PeerField> {
        Some(match t {
            "name" => PeerField::Name,
            "namespace" => PeerField::Namespace,
            "cluster" => PeerField::Cluster,
            "service" => PeerField::Service,
            "revision" => PeerField::Revision,
            "app" => PeerField::App,
            "version" => PeerField::Version,
            "workload" => PeerField::Workload,
            "type" => PeerField::Type,
            "region" => PeerField::Region,
            "availability_zone" => PeerField::Zone,
            _ => return None,
        })
    }
}

/// `istio.alpn` (`istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`):
/// the ALPN list to offer upstream, per upstream HTTP protocol.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IstioAlpnConfig {
    /// `alpn_override` per `upstream_protocol`: HTTP10, HTTP11, HTTP2 (the
    /// first entry of a protocol wins, as Istio's map insert; an empty list
    /// overrides nothing).
    pub by_protocol: [Option<std::sync::Arc<[Vec<u8>]>>; 3],
}

/// Istio's TCP metadata exchange
/// (`envoy.tcp.metadataexchange.config.MetadataExchange`), downstream (a
/// listener's network filter) or upstream (a cluster's `filters`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataExchangeConfig {
    /// `protocol`: the ALPN that starts the exchange (never empty).
    pub protocol: String,
    /// `additional_labels`: peer labels kept besides Istio's four.
    pub additional_labels: Vec<String>,
    /// `enable_discovery`: when the peer sent no header, look it up in
    /// workload discovery (WDS) by its address.
    pub enable_discovery: bool,
}

/// One workload from WDS (`istio.workload.Workload`), reduced to what
/// Istio's peer metadata reads of it. Values are as received (Istio's
/// defaults for elided fields are applied when the peer object is built).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    /// `uid`: the resource name.
    pub uid: String,
    /// `name` (the pod).
    pub name: String,
    pub namespace: String,
    /// `addresses`, each 4 or 16 bytes on the wire.
    pub addresses: Vec<std::net::IpAddr>,
    /// `network` (empty: the default network).
    pub network: String,
    pub trust_domain: String,
    pub service_account: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_type: WorkloadKind,
    pub workload_name: String,
    pub cluster_id: String,
    /// `locality.region`.
    pub region: String,
    /// `locality.zone`.
    pub zone: String,
}

/// `istio.workload.WorkloadType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkloadKind {
    /// `DEPLOYMENT` (0), and any value Istio does not know.
    #[default]
    Deployment,
    CronJob,
    Pod,
    Job,
}
