//! Istio's `istio.stats` HTTP filter (`stats.PluginConfig`), as istio/proxy's
//! `istio_stats.cc`: at the end of each stream, `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and
//! `istio_response_bytes` in the `istiocustom` namespace, labelled with the
//! reporter, the source and destination workloads (this node's metadata,
//! the peers in filter state, the TLS peer identity, the upstream cluster)
//! and the response; for gRPC with `grpc_stats`' filter state object,
//! `istio_request_messages_total` / `istio_response_messages_total` with
//! the workload labels only (as Istio, which counts them before it adds the
//! response's).
//!
//! Hot path: the labels are formatted once per distinct label set. A
//! request encodes its inputs (peer objects, cluster, host, code, flags,
//! dimension values) into a per-thread byte buffer, the exact cache key,
//! and finds its stats in a bounded cache with one hash of that buffer;
//! only a new label set builds strings and stats.
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

use http::HeaderValue;
use xds_client::config::{DimensionExpr, IstioStatsConfig};

use super::{LocalNode, PeerInfo, DOWNSTREAM_PEER, UPSTREAM_PEER};
use crate::grpc_stats::{GrpcStatsObject, GRPC_STATS_STATE};
use crate::http::{
    Counter, FilterContext, Histogram, HttpFilter, HttpFilterFactory, RouteView, StatsScope,
    StreamEnd,
};

/// Filter state keys of the peer's and our principal (Istio's
/// `istio_authn` filter sets them; `set_filter_state` may too).
const PEER_PRINCIPAL: &str = "io.istio.peer_principal";
const LOCAL_PRINCIPAL: &str = "io.istio.local_principal";

/// Istio's custom stat namespace (rendered without it and without `envoy_`).
pub const NAMESPACE: &str = "istiocustom";
/// Distinct label sets cached per filter config; past it a label set's
/// stats are looked up in the store per request (correct, slower).
const CACHE_LIMIT: usize = 10_000;

/// The HTTP metrics, in Istio's names (without `istio_`).
const METRICS: [&str; 6] = [
    "requests_total",
    "request_duration_milliseconds",
    "request_bytes",
    "response_bytes",
    "request_messages_total",
    "response_messages_total",
];

/// The labels the message counters do not have (`request_protocol` to
/// `connection_security_policy`).
const RESPONSE_LABELS: [usize; 5] = [20, 21, 22, 23, 24];

/// Istio's standard labels, in the order it emits them.
pub const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's `Reporter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// Outbound listener (and gateways): `source`.
    ClientSidecar,
    /// Inbound listener: `destination`.
    ServerSidecar,
    /// `reporter: SERVER_GATEWAY`: `waypoint`.
    ServerGateway,
}

impl Reporter {
    pub fn of(c: &IstioStatsConfig) -> Reporter {
        if c.server_gateway {
            Reporter::ServerGateway
        } else if c.inbound {
            Reporter::ServerSidecar
        } else {
            Reporter::ClientSidecar
        }
    }
    fn label(self) -> &'static str {
        match self {
            Reporter::ClientSidecar => "source",
            Reporter::ServerSidecar => "destination",
            Reporter::ServerGateway => "waypoint",
        }
    }
}

/// What one metric's labels become (Istio's `MetricOverrides`).
#[derive(Debug, Default, Clone)]
struct MetricPlan {
    drop: bool,
    /// Per standard label: `None` keep, `Some(None)` remove, `Some(Some(e))`
    /// replace by expression `e`'s value.
    overrides: [Option<Option<usize>>; 25],
    /// Labels added after the standard ones: (name, expression).
    additions: Vec<(String, usize)>,
}

fn plans(c: &IstioStatsConfig) -> [MetricPlan; 6] {
    METRICS.map(|m| plan_of(c, m))
}

/// The plan of standard metric `metric` (Istio's name without `istio_`).
fn plan_of(c: &IstioStatsConfig, metric: &str) -> MetricPlan {
    let mut plan = MetricPlan::default();
    for m in &c.metrics {
        if !m.name.is_empty() && m.name != metric {
            continue;
        }
        if m.drop {
            // As Istio: only a named standard metric is dropped.
            if !m.name.is_empty() {
                plan.drop = true;
            }
            continue;
        }
        for tag in &m.tags_to_remove {
            if let Some(i) = LABELS.iter().position(|l| l == tag) {
                plan.overrides[i] = Some(None);
            }
        }
        for (tag, e) in &m.dimensions {
            match LABELS.iter().position(|l| l == tag) {
                Some(i) => plan.overrides[i] = Some(Some(*e)),
                None => plan.additions.push((tag.clone(), *e)),
            }
        }
    }
    plan
}

/// Built once per config.
#[derive(Debug)]
pub struct IstioStatsFactory {
    name: Arc<str>,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<IstioStatsConfig>,
    reporter: Reporter,
    local: Arc<LocalNode>,
    scope: Arc<dyn StatsScope>,
    plans: [MetricPlan; 6],
    /// Request / response header names the dimensions read, in expression
    /// order (captured at the header phases; empty without such dimensions).
    request_headers: Vec<http::HeaderName>,
    response_headers: Vec<http::HeaderName>,
    /// Keyed by the encoded label inputs (exact: no collisions).
    cache: RwLock<HashMap<Box<[u8]>, Arc<Metrics>>>,
    /// This config's identity for the per-thread last-hit entry (unique per
    /// factory, never reused, unlike an address).
    id: u64,
}

/// Source of [`Inner::id`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The stats of one label set (`None`: dropped by config).
struct Metrics {
    requests: Option<Arc<dyn Counter>>,
    duration: Option<Arc<dyn Histogram>>,
    request_bytes: Option<Arc<dyn Histogram>>,
    response_bytes: Option<Arc<dyn Histogram>>,
    /// gRPC streams with a [`GrpcStatsObject`] only.
    request_messages: Option<Arc<dyn Counter>>,
    response_messages: Option<Arc<dyn Counter>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl IstioStatsFactory {
    pub fn new(
        name: Arc<str>,
        config: Arc<IstioStatsConfig>,
        local: Arc<LocalNode>,
        stats: &Arc<dyn StatsScope>,
    ) -> Self {
        let header = |want_request: bool| {
            config
                .expressions
                .iter()
                .filter_map(|e| match (e, want_request) {
                    (DimensionExpr::RequestHeader(h), true)
                    | (DimensionExpr::ResponseHeader(h), false) => {
                        http::HeaderName::from_bytes(h.as_bytes()).ok()
                    }
                    _ => None,
                })
                .collect()
        };
        let scope = stats.root().unwrap_or_else(|| stats.clone());
        IstioStatsFactory {
            name,
            inner: Arc::new(Inner {
                reporter: Reporter::of(&config),
                plans: plans(&config),
                request_headers: header(true),
                response_headers: header(false),
                config,
                local,
                scope,
                cache: RwLock::new(HashMap::new()),
                id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            }),
        }
    }
}

impl HttpFilterFactory for IstioStatsFactory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // The response's `grpc-status` header is read only for requests
        // that may be gRPC (a content type starting `application/grpc`,
        // wider than the proxy's `grpc` test): the others never use it.
        let grpc = route.request.is_none_or(|r| {
            r.headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        });
        Some(Box::new(IstioStats {
            inner: self.inner.clone(),
            grpc,
            grpc_status: None,
            request_headers: Vec::new(),
            response_headers: Vec::new(),
        }))
    }
}

/// One request's instance.
struct IstioStats {
    inner: Arc<Inner>,
    /// The request may be gRPC (see `create`).
    grpc: bool,
    /// `grpc-status` in the response headers (trailers-only gRPC).
    grpc_status: Option<u32>,
    request_headers: Vec<Option<HeaderValue>>,
    response_headers: Vec<Option<HeaderValue>>,
}

impl HttpFilter for IstioStats {
    fn on_request_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> crate::http::Action {
        if !self.inner.request_headers.is_empty() {
            self.request_headers = self
                .inner
                .request_headers
                .iter()
                .map(|h| head.headers.get(h).cloned())
                .collect();
        }
        crate::http::Action::Continue
    }

    fn on_response_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> crate::http::Action {
        if self.grpc {
            self.grpc_status = head
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
        }
        if !self.inner.response_headers.is_empty() {
            self.response_headers = self
                .inner
                .response_headers
                .iter()
                .map(|h| head.headers.get(h).cloned())
                .collect();
        }
        crate::http::Action::Continue
    }

    fn wants_log(&self) -> bool {
        true
    }

    fn on_stream_end(&mut self, cx: &FilterContext, end: &StreamEnd<'_>) {
        let peer = |key: &str| {
            cx.filter_state_get(key)
                .and_then(|v| v.as_any().downcast_ref::<PeerInfo>())
        };
        let ds = cx.downstream.as_deref();
        let principal = |key: &str| {
            cx.filter_state_get(key)
                .and_then(|v| v.as_any().downcast_ref::<crate::StringValue>())
                .map(|v| v.0.as_str())
        };
        let (peer_uri_san, local_uri_san) = if self.inner.reporter == Reporter::ClientSidecar {
            // As Istio: the upstream TLS connection's certificates.
            (end.upstream_peer_uri_san, end.upstream_local_uri_san)
        } else {
            match (principal(PEER_PRINCIPAL), principal(LOCAL_PRINCIPAL)) {
                (None, None) => (
                    ds.and_then(|d| d.peer_uri_sans.first()).map(String::as_str),
                    ds.and_then(|d| d.local_uri_sans.first())
                        .map(String::as_str),
                ),
                set => set,
            }
        };
        // As Istio: gRPC message counts come from `grpc_stats`' filter
        // state object, which Envoy creates at the first message.
        let messages = end
            .grpc
            .then(|| {
                cx.filter_state_get(GRPC_STATS_STATE)
                    .and_then(|v| v.as_any().downcast_ref::<GrpcStatsObject>())
                    .filter(|o| o.emitted())
                    .map(|o| (o.request_message_count(), o.response_message_count()))
            })
            .flatten();
        let input = Input {
            downstream_peer: peer(DOWNSTREAM_PEER),
            upstream_peer: peer(UPSTREAM_PEER),
            peer_uri_san,
            local_uri_san,
            tls: ds.is_some_and(|d| d.tls),
            messages: messages.is_some(),
            grpc_status: if end.grpc {
                Some(
                    end.grpc_status
                        .or(self.grpc_status)
                        .unwrap_or_else(|| grpc_from_http(end.response_code)),
                )
            } else {
                None
            },
            end,
            request_headers: &self.request_headers,
            response_headers: &self.response_headers,
        };
        let m = self.inner.metrics(&input);
        if let Some(c) = &m.requests {
            c.inc();
        }
        if let Some(h) = &m.duration {
            h.record(end.duration.as_millis() as u64);
        }
        // As Istio: the downstream wire bytes (headers and framing too).
        if let Some(h) = &m.request_bytes {
            h.record(end.request_wire_bytes);
        }
        if let Some(h) = &m.response_bytes {
            h.record(end.response_wire_bytes);
        }
        if let Some((rq, rs)) = messages {
            // Zero counts too: Istio adds them (creating the counter).
            if let Some(c) = &m.request_messages {
                c.add(rq);
            }
            if let Some(c) = &m.response_messages {
                c.add(rs);
            }
        }
    }
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`, for gRPC responses without
/// a `grpc-status`.
fn grpc_from_http(code: u16) -> u32 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// Everything the labels depend on, borrowed for one request.
struct Input<'a> {
    downstream_peer: Option<&'a PeerInfo>,
    upstream_peer: Option<&'a PeerInfo>,
    /// Server reporters: the downstream peer's and our principal (filter
    /// state `io.istio.peer_principal` / `io.istio.local_principal` when
    /// either is set, else the TLS certificates' first URI SANs). Client
    /// reporter: the upstream TLS connection's peer and local URI SANs.
    peer_uri_san: Option<&'a str>,
    local_uri_san: Option<&'a str>,
    tls: bool,
    /// A gRPC stream whose message counts are known.
    messages: bool,
    grpc_status: Option<u32>,
    end: &'a StreamEnd<'a>,
    request_headers: &'a [Option<HeaderValue>],
    response_headers: &'a [Option<HeaderValue>],
}

/// A dimension expression's value (`None`: Istio's evaluation error,
/// rendered `unknown`).
#[derive(Hash)]
enum Val<'a> {
    Str(&'a str),
    Num(u64),
    Missing,
}

impl Val<'_> {
    fn render(&self) -> String {
        match self {
            Val::Str(s) => (*s).to_owned(),
            Val::Num(n) => n.to_string(),
            Val::Missing => "unknown".to_owned(),
        }
    }
}

impl Inner {
    fn eval<'a>(&self, i: usize, input: &Input<'a>) -> Val<'a> {
        let e = input.end;
        let header = |names: &[http::HeaderName], vals: &'a [Option<HeaderValue>], want: &str| {
            names
                .iter()
                .position(|n| n.as_str() == want)
                .and_then(|p| vals.get(p))
                .and_then(|v| v.as_ref())
                .and_then(|v| v.to_str().ok())
                .map_or(Val::Missing, Val::Str)
        };
        let peer = |p: Option<&'a PeerInfo>, f| match p.map(|p| p.field(f)) {
            Some(v) if !v.is_empty() => Val::Str(v),
            _ => Val::Missing,
        };
        match &self.config.expressions[i] {
            DimensionExpr::Literal(_) => Val::Missing, // resolved when rendered
            DimensionExpr::RequestHost => Val::Str(e.authority),
            DimensionExpr::RequestMethod => Val::Str(e.method.as_str()),
            DimensionExpr::RequestPath => Val::Str(e.path),
            DimensionExpr::RequestUrlPath => {
                Val::Str(e.path.split(['?', '#']).next().unwrap_or_default())
            }
            DimensionExpr::RequestScheme => Val::Str(e.scheme),
            DimensionExpr::RequestProtocol => Val::Str(e.protocol),
            DimensionExpr::RequestHeader(h) => {
                header(&self.request_headers, input.request_headers, h)
            }
            DimensionExpr::ResponseCode => Val::Num(u64::from(e.response_code)),
            DimensionExpr::ResponseHeader(h) => {
                header(&self.response_headers, input.response_headers, h)
            }
            DimensionExpr::ClusterName => e.cluster.map_or(Val::Missing, Val::Str),
            DimensionExpr::RouteName => e.route_name.map_or(Val::Missing, Val::Str),
            DimensionExpr::UpstreamPeer(f) => peer(input.upstream_peer, *f),
            DimensionExpr::DownstreamPeer(f) => peer(input.downstream_peer, *f),
        }
    }

    /// The host used for `destination_service` (Istio's `Host` fallback).
    fn host<'a>(&self, input: &Input<'a>) -> Option<&'a str> {
        (!self.config.disable_host_header_fallback && !input.end.authority.is_empty())
            .then_some(input.end.authority)
    }

    /// The stats for this request's label set, cached by the label inputs
    /// themselves: their `Hash` byte stream (length-prefixed and
    /// terminated, so it encodes the inputs exactly) is written into a
    /// per-thread buffer and looked up with one hash of it.
    fn metrics(&self, input: &Input<'_>) -> Arc<Metrics> {
        /// The key buffer, and the last label set this thread looked up:
        /// consecutive requests mostly share one, found by comparing the
        /// key bytes (no hash, no lock).
        #[derive(Default)]
        struct Keys {
            key: Vec<u8>,
            last_id: u64,
            last_key: Vec<u8>,
            last: Option<Arc<Metrics>>,
        }
        thread_local! {
            static KEYS: std::cell::RefCell<Keys> = std::cell::RefCell::new(Keys::default());
        }
        let e = input.end;
        KEYS.with(|keys| {
            let keys = &mut *keys.borrow_mut();
            let key = &mut keys.key;
            key.clear();
            let h = &mut KeyBytes(key);
            input.downstream_peer.hash(h);
            input.upstream_peer.hash(h);
            input.peer_uri_san.hash(h);
            input.local_uri_san.hash(h);
            input.tls.hash(h);
            input.messages.hash(h);
            input.grpc_status.hash(h);
            e.grpc.hash(h);
            e.response_code.hash(h);
            e.flags.hash(h);
            e.cluster.hash(h);
            e.route_name
                .filter(|r| *r == "block_all" || *r == "allow_any")
                .hash(h);
            self.host(input).hash(h);
            for i in 0..self.config.expressions.len() {
                self.eval(i, input).hash(h);
            }
            if keys.last_id == self.id && keys.last_key == *key {
                if let Some(m) = &keys.last {
                    return m.clone();
                }
            }
            let cached = self
                .cache
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key[..])
                .cloned();
            let m = match cached {
                Some(m) => m,
                None => {
                    let m = Arc::new(self.build(input));
                    let mut c = self.cache.write().unwrap_or_else(PoisonError::into_inner);
                    if c.len() < CACHE_LIMIT {
                        c.insert(key[..].into(), m.clone());
                    }
                    m
                }
            };
            keys.last_id = self.id;
            keys.last_key.clone_from(key);
            keys.last = Some(m.clone());
            m
        })
    }

    /// Formats the label sets and creates the stats (a new label set only).
    fn build(&self, input: &Input<'_>) -> Metrics {
        let std = standard_labels(self.reporter, &self.local.peer, input, self.host(input));
        let values: Vec<String> = (0..self.config.expressions.len())
            .map(|i| match &self.config.expressions[i] {
                DimensionExpr::Literal(s) => s.clone(),
                _ => self.eval(i, input).render(),
            })
            .collect();
        let make_without = |i: usize, skip: &[usize]| -> Option<Vec<(String, String)>> {
            (!self.plans[i].drop).then(|| apply_plan(&self.plans[i], &std, &values, skip))
        };
        let make = |i: usize| make_without(i, &[]);
        // Created for streams that count messages only (else they would be
        // rendered at 0 for every label set).
        let messages = |i: usize| {
            input
                .messages
                .then(|| make_without(i, &RESPONSE_LABELS))
                .flatten()
                .map(|l| {
                    self.scope.labeled_counter(
                        NAMESPACE,
                        &format!("istio_{}", METRICS[i]),
                        &refs(&l),
                    )
                })
        };
        let hist = |i: usize| {
            make(i).map(|l| {
                self.scope
                    .labeled_histogram(NAMESPACE, &format!("istio_{}", METRICS[i]), &refs(&l))
            })
        };
        Metrics {
            requests: make(0).map(|l| {
                self.scope
                    .labeled_counter(NAMESPACE, "istio_requests_total", &refs(&l))
            }),
            duration: hist(1),
            request_bytes: hist(2),
            response_bytes: hist(3),
            request_messages: messages(4),
            response_messages: messages(5),
        }
    }
}

fn refs(l: &[(String, String)]) -> Vec<(&str, &str)> {
    l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The TCP metrics (Istio's network `istio.stats`), in Istio's names.
const TCP_METRICS: [&str; 4] = [
    "tcp_connections_opened_total",
    "tcp_connections_closed_total",
    "tcp_sent_bytes_total",
    "tcp_received_bytes_total",
];

/// Istio's network `istio.stats` in front of `tcp_proxy`. Without the TCP
/// metadata exchange (weir has none) Istio reports a connection when it
/// closes: opened, closed and the bytes each way, with the HTTP labels but
/// `request_protocol="tcp"` and no `response_code` / `grpc_response_status`.
/// Labels are formatted once per connection, at its close.
#[derive(Debug)]
pub struct IstioTcpStatsFactory {
    name: Arc<str>,
    config: Arc<IstioStatsConfig>,
    reporter: Reporter,
    local: Arc<LocalNode>,
    scope: Arc<dyn StatsScope>,
    /// Plans of [`TCP_METRICS`].
    plans: Vec<MetricPlan>,
}

impl IstioTcpStatsFactory {
    pub fn new(
        name: Arc<str>,
        config: Arc<IstioStatsConfig>,
        local: Arc<LocalNode>,
        stats: &Arc<dyn StatsScope>,
    ) -> Self {
        let scope = stats.root().unwrap_or_else(|| stats.clone());
        IstioTcpStatsFactory {
            name,
            reporter: Reporter::of(&config),
            plans: TCP_METRICS.iter().map(|m| plan_of(&config, m)).collect(),
            config,
            local,
            scope,
        }
    }
}

impl crate::network::NetworkFilterFactory for IstioTcpStatsFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_close(
        &self,
        conn: &crate::network::ConnectionInfo<'_>,
        end: &crate::network::ConnEnd<'_>,
    ) {
        let method = http::Method::GET;
        let stream = StreamEnd {
            response_code: 0,
            flags: end.flags,
            flags_short: end.flags_short,
            request_body_bytes: 0,
            response_body_bytes: 0,
            request_wire_bytes: 0,
            response_wire_bytes: 0,
            duration: std::time::Duration::ZERO,
            grpc: false,
            grpc_status: None,
            authority: "",
            path: "",
            method: &method,
            protocol: "",
            scheme: "",
            cluster: end.cluster,
            route_name: None,
            upstream_peer_uri_san: None,
            upstream_local_uri_san: None,
        };
        // The peers the metadata exchange found (connection filter state).
        let peer = |key: &str| conn.filter_state.and_then(|s| s.get_typed::<PeerInfo>(key));
        let input = Input {
            downstream_peer: peer(DOWNSTREAM_PEER),
            upstream_peer: peer(UPSTREAM_PEER),
            peer_uri_san: if self.reporter == Reporter::ClientSidecar {
                conn.upstream_sans.1
            } else {
                conn.peer
                    .and_then(|p| p.uri_sans.first())
                    .map(String::as_str)
            },
            local_uri_san: if self.reporter == Reporter::ClientSidecar {
                conn.upstream_sans.0
            } else {
                conn.local_uri_sans.first().map(String::as_str)
            },
            tls: conn.tls,
            messages: false,
            grpc_status: None,
            end: &stream,
            request_headers: &[],
            response_headers: &[],
        };
        let mut std = standard_labels(self.reporter, &self.local.peer, &input, None);
        std[20] = "tcp".to_owned();
        // Request-only expressions have nothing to read on a connection.
        let values: Vec<String> = self
            .config
            .expressions
            .iter()
            .map(|e| match e {
                DimensionExpr::Literal(s) => s.clone(),
                DimensionExpr::ClusterName => end.cluster.unwrap_or("unknown").to_owned(),
                _ => "unknown".to_owned(),
            })
            .collect();
        let amounts = [1, 1, end.bytes_sent, end.bytes_received];
        for (i, p) in self.plans.iter().enumerate() {
            if p.drop {
                continue;
            }
            let l = apply_plan(p, &std, &values, &[21, 22]);
            self.scope
                .labeled_counter(NAMESPACE, &format!("istio_{}", TCP_METRICS[i]), &refs(&l))
                .add(amounts[i]);
        }
    }
}

/// The labels of one metric: the standard ones (but `skip`) with the
/// plan's overrides, then its additions.
fn apply_plan(
    p: &MetricPlan,
    std: &[String],
    values: &[String],
    skip: &[usize],
) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(LABELS.len() + p.additions.len());
    for (i, v) in std.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        match p.overrides[i] {
            None => out.push((LABELS[i].to_owned(), v.clone())),
            Some(None) => {}
            Some(Some(e)) => out.push((LABELS[i].to_owned(), values[e].clone())),
        }
    }
    for (k, e) in &p.additions {
        out.push((k.clone(), values[*e].clone()));
    }
    out
}

/// A "hasher" that keeps the bytes it is fed: the exact cache key.
struct KeyBytes<'a>(&'a mut Vec<u8>);

impl Hasher for KeyBytes<'_> {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes)
    }
}

/// The destination service from the cluster, as Istio reads the cluster's
/// `istio.services[0]` metadata: weir has no cluster metadata here, so the
/// host comes from Istio's cluster name (`outbound|<port>|<subset>|<host>`,
/// and a waypoint's `inbound-vip|<port>|<protocol>|<host>`, whose
/// `istio.services` istiod fills with that host);
/// the short name and namespace from a Kubernetes service host
/// (`<name>.<namespace>.svc.<domain>`), else the name is the host.
fn cluster_service(cluster: &str) -> Option<(&str, &str, &str)> {
    let mut parts = cluster.split('|');
    let dir = parts.next()?;
    if dir != "outbound" && dir != "inbound" && dir != "inbound-vip" {
        return None;
    }
    let host = parts.nth(2)?;
    if host.is_empty() || parts.next().is_some() {
        return None;
    }
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or(host);
    let ns = labels.next();
    match (ns, labels.next()) {
        (Some(ns), Some("svc")) => Some((host, name, ns)),
        _ => Some((host, host, "")),
    }
}

/// Istio's `getNamespace`: `<domain>/ns/<namespace>/sa/<account>`.
fn san_namespace(san: &str) -> Option<&str> {
    let i = san.find("/ns/")? + 4;
    let rest = &san[i..];
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The 25 standard label values, in [`LABELS`] order (Istio's
/// `populatePeerInfo` and `log`).
fn standard_labels(
    reporter: Reporter,
    local: &PeerInfo,
    input: &Input<'_>,
    host_header: Option<&str>,
) -> Vec<String> {
    const UNKNOWN: &str = "unknown";
    let e = input.end;
    let or = |v: &str, d: &str| if v.is_empty() { d } else { v }.to_owned();
    let pf = |p: Option<&PeerInfo>, f: fn(&PeerInfo) -> &str, d: &str| {
        or(p.map(f).unwrap_or_default(), d)
    };
    // Destination service: the Host header, then the cluster.
    let mut service_host = host_header.unwrap_or_default();
    let mut service_name = service_host;
    let mut service_namespace = "";
    match e.route_name {
        Some("block_all") => service_name = "BlackHoleCluster",
        Some("allow_any") => service_name = "PassthroughCluster",
        _ => match e.cluster {
            Some(
                c @ ("BlackHoleCluster"
                | "PassthroughCluster"
                | "InboundPassthroughCluster"
                | "InboundPassthroughClusterIpv4"
                | "InboundPassthroughClusterIpv6"),
            ) => service_name = c,
            Some(c) => {
                if let Some((h, n, ns)) = cluster_service(c) {
                    service_host = h;
                    service_name = n;
                    service_namespace = ns;
                }
            }
            None => {}
        },
    }
    let server = reporter != Reporter::ClientSidecar;
    let mut peer_san = input.peer_uri_san.unwrap_or_default();
    let local_san = input.local_uri_san.unwrap_or_default();
    if !server && peer_san.is_empty() {
        // As Istio: without an upstream certificate, the endpoint peer's
        // identity (known from workload discovery).
        peer_san = input
            .upstream_peer
            .map(|p| p.identity.as_str())
            .unwrap_or_default();
    }
    let (peer, mtls) = if server {
        // As Istio: mutual TLS when both principals are known.
        (
            input.downstream_peer,
            Some(!peer_san.is_empty() && !local_san.is_empty()),
        )
    } else {
        (input.upstream_peer, None)
    };
    let peer_namespace = san_namespace(peer_san)
        .filter(|n| !n.is_empty())
        .or(peer.map(|p| p.namespace.as_str()))
        .unwrap_or_default();
    let mut v: Vec<String> = Vec::with_capacity(LABELS.len());
    v.push(reporter.label().to_owned());
    if server {
        v.push(pf(peer, |p| &p.workload, UNKNOWN));
        v.push(pf(peer, |p| &p.canonical_name, UNKNOWN));
        v.push(pf(peer, |p| &p.canonical_revision, "latest"));
        v.push(or(peer_namespace, UNKNOWN));
        v.push(or(peer_san, UNKNOWN));
        v.push(pf(peer, |p| &p.app, UNKNOWN));
        v.push(pf(peer, |p| &p.version, UNKNOWN));
        v.push(pf(peer, |p| &p.cluster, UNKNOWN));
        if reporter == Reporter::ServerGateway {
            let ep = input.upstream_peer;
            v.push(pf(ep, |p| &p.workload, UNKNOWN));
            v.push(pf(ep, |p| &p.namespace, UNKNOWN));
            // As Istio (istio/proxy #5514): the endpoint peer's identity (known
            // from workload discovery), not our own certificate.
            v.push(pf(ep, |p| &p.identity, UNKNOWN));
            v.push(pf(ep, |p| &p.app, UNKNOWN));
            v.push(pf(ep, |p| &p.version, UNKNOWN));
            v.push(or(service_host, UNKNOWN));
            v.push(pf(ep, |p| &p.canonical_name, UNKNOWN));
            v.push(pf(ep, |p| &p.canonical_revision, UNKNOWN));
            v.push(or(service_name, UNKNOWN));
            v.push(or(service_namespace, UNKNOWN));
            v.push(pf(ep, |p| &p.cluster, UNKNOWN));
        } else {
            v.push(local.workload.clone());
            v.push(local.namespace.clone());
            v.push(or(local_san, UNKNOWN));
            v.push(local.app.clone());
            v.push(local.version.clone());
            v.push(or(service_host, &local.canonical_name));
            v.push(local.canonical_name.clone());
            v.push(local.canonical_revision.clone());
            v.push(or(service_name, &local.canonical_name));
            v.push(local.namespace.clone());
            v.push(local.cluster.clone());
        }
    } else {
        v.push(local.workload.clone());
        v.push(local.canonical_name.clone());
        v.push(local.canonical_revision.clone());
        v.push(local.namespace.clone());
        v.push(or(local_san, UNKNOWN));
        v.push(local.app.clone());
        v.push(local.version.clone());
        v.push(local.cluster.clone());
        v.push(pf(peer, |p| &p.workload, UNKNOWN));
        v.push(or(peer_namespace, UNKNOWN));
        v.push(or(peer_san, UNKNOWN));
        v.push(pf(peer, |p| &p.app, UNKNOWN));
        v.push(pf(peer, |p| &p.version, UNKNOWN));
        v.push(or(service_host, UNKNOWN));
        v.push(pf(peer, |p| &p.canonical_name, UNKNOWN));
        v.push(pf(peer, |p| &p.canonical_revision, "latest"));
        v.push(or(service_name, UNKNOWN));
        v.push(if service_namespace.is_empty() {
            or(peer_namespace, UNKNOWN)
        } else {
            service_namespace.to_owned()
        });
        v.push(pf(peer, |p| &p.cluster, UNKNOWN));
    }
    v.push(if e.grpc { "grpc" } else { "http" }.to_owned());
    v.push(e.response_code.to_string());
    v.push(input.grpc_status.map(|s| s.to_string()).unwrap_or_default());
    v.push((e.flags_short)(e.flags));
    v.push(
        match mtls {
            Some(true) => "mutual_tls",
            Some(false) => "none",
            None => UNKNOWN,
        }
        .to_owned(),
    );
    v
}

#[cfg(test)]
mod tests;
