//! `envoy.filters.http.grpc_stats`, as Envoy 1.40's `GrpcStatsFilter` and
//! `Grpc::ContextImpl`: per-cluster (and per-method) gRPC stats
//! `cluster.<c>.grpc[.<service>.<method>].{success,failure,total,<status>,
//! request_message_count,response_message_count,upstream_rq_time}`.
//!
//! The factory decides at `create` whether a request is gRPC (so other
//! requests cost nothing) and resolves its stats there: they are created
//! once per (cluster, method) and cached, since creating a stat may lock.
//!
//! With `emit_filter_state`, a gRPC request also gets Envoy's
//! `GrpcStatsObject` ([`GrpcStatsObject`]) in its filter state under
//! `envoy.filters.http.grpc_stats`: its message counts, shared (atomics)
//! by the request body observer and the response hooks and read when the
//! access log or `istio.stats` serializes it.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, PoisonError, RwLock,
    },
};

use bytes::Bytes;
use tokio::time::Instant;
use xds_client::config::{GrpcStatsConfig, GrpcStatsMethods};

use crate::http::{
    Action, Counter, FilterContext, Histogram, HttpFilter, HttpFilterFactory, RequestBodyObserver,
    RouteView, StatsScope,
};
use crate::state::{StateFlags, StateObject};

#[cfg(test)]
mod tests;

/// Methods with stats of their own per cluster, at most (with
/// `stats_for_all_methods`, where Envoy has no bound): later ones count in
/// the cluster's `grpc.*` bucket.
const MAX_METHODS: usize = 10_000;
/// Distinct `grpc-status` values counted per method, at most (Envoy counts
/// any string an upstream sends).
const MAX_STATUSES: usize = 32;

/// The filter state key of [`GrpcStatsObject`] (the filter's name, as
/// Envoy sets it).
pub const GRPC_STATS_STATE: &str = "envoy.filters.http.grpc_stats";

/// Envoy's `GrpcStatsObject`: the gRPC messages of the request and of the
/// response so far (`emit_filter_state`). Envoy sets it at the first message
/// either way; weir puts it in the filter state with the request headers and
/// serializes nothing until a message was counted, which renders and
/// matches the same (`-` before the first message).
#[derive(Debug, Default)]
pub struct GrpcStatsObject {
    request: AtomicU64,
    response: AtomicU64,
}

impl GrpcStatsObject {
    pub fn request_message_count(&self) -> u64 {
        self.request.load(Relaxed)
    }

    pub fn response_message_count(&self) -> u64 {
        self.response.load(Relaxed)
    }

    /// Whether Envoy would have the object: a message was counted.
    pub fn emitted(&self) -> bool {
        self.request_message_count() > 0 || self.response_message_count() > 0
    }

    /// Both counts, when [emitted](Self::emitted).
    fn counts(&self) -> Option<(u64, u64)> {
        let c = (self.request_message_count(), self.response_message_count());
        (c != (0, 0)).then_some(c)
    }
}

impl StateObject for GrpcStatsObject {
    /// `<request>,<response>`, as Envoy's `serializeAsString`.
    fn serialize_as_string(&self) -> Option<String> {
        let (rq, rs) = self.counts()?;
        Some(format!("{rq},{rs}"))
    }

    /// The `grpc_stats.v3.FilterObject` proto as Envoy's
    /// `MessageToJsonString` renders it: camelCase names, 64-bit integers
    /// as strings, zero fields left out.
    fn serialize_as_json(&self) -> Option<String> {
        use std::fmt::Write;
        let (rq, rs) = self.counts()?;
        let mut out = String::with_capacity(64);
        out.push('{');
        if rq > 0 {
            let _ = write!(out, "\"requestMessageCount\":\"{rq}\"");
        }
        if rs > 0 {
            if rq > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"responseMessageCount\":\"{rs}\"");
        }
        out.push('}');
        Some(out)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A `grpc-status` value and its counter.
type StatusCounter = (Box<str>, Arc<dyn Counter>);

/// The stats of one (cluster, method), or of a cluster's `grpc.*` bucket.
pub struct MethodStats {
    scope: Arc<dyn StatsScope>,
    cluster: Box<str>,
    /// `grpc.` or `grpc.<service>.<method>.`.
    prefix: Box<str>,
    success: Arc<dyn Counter>,
    failure: Arc<dyn Counter>,
    total: Arc<dyn Counter>,
    request_messages: Arc<dyn Counter>,
    response_messages: Arc<dyn Counter>,
    upstream_rq_time: Option<Arc<dyn Histogram>>,
    /// Per `grpc-status` value, created on first use.
    statuses: RwLock<Vec<StatusCounter>>,
}

impl MethodStats {
    fn new(
        scope: &Arc<dyn StatsScope>,
        cluster: &str,
        prefix: String,
        upstream: bool,
    ) -> MethodStats {
        let c = |s: &str| scope.cluster_counter(cluster, &format!("{prefix}{s}"));
        MethodStats {
            success: c("success"),
            failure: c("failure"),
            total: c("total"),
            request_messages: c("request_message_count"),
            response_messages: c("response_message_count"),
            upstream_rq_time: upstream
                .then(|| scope.cluster_histogram(cluster, &format!("{prefix}upstream_rq_time"))),
            scope: scope.clone(),
            cluster: cluster.into(),
            prefix: prefix.into(),
            statuses: RwLock::new(Vec::new()),
        }
    }

    /// Envoy's `chargeStat(.., grpc_status)`: the status's own counter,
    /// then success (status `0`) or failure, and total.
    fn charge_status(&self, status: &[u8]) {
        let Ok(status) = std::str::from_utf8(status) else {
            // A header value Envoy would read as bytes; counted as failure.
            self.charge(false);
            return;
        };
        let found = self
            .statuses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(s, _)| &**s == status)
            .map(|(_, c)| c.clone());
        let counter = found.or_else(|| {
            let mut w = self
                .statuses
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((_, c)) = w.iter().find(|(s, _)| &**s == status) {
                return Some(c.clone());
            }
            if w.len() >= MAX_STATUSES {
                return None;
            }
            let c = self
                .scope
                .cluster_counter(&self.cluster, &format!("{}{status}", self.prefix));
            w.push((status.into(), c.clone()));
            Some(c)
        });
        if let Some(c) = counter {
            c.inc();
        }
        self.charge(status == "0");
    }

    fn charge(&self, success: bool) {
        if success {
            self.success.inc();
        } else {
            self.failure.inc();
        }
        self.total.inc();
    }
}

/// One cluster's stats: its bucket and its methods (by `service/method`).
struct ClusterStats {
    bucket: Option<Arc<MethodStats>>,
    methods: HashMap<Box<str>, Arc<MethodStats>>,
}

pub struct GrpcStatsFactory {
    name: String,
    config: Arc<GrpcStatsConfig>,
    stats: Arc<dyn StatsScope>,
    cache: RwLock<HashMap<Box<str>, ClusterStats>>,
    /// [`GRPC_STATS_STATE`], with `emit_filter_state` (shared by the
    /// requests' filter state entries).
    state_key: Option<Arc<str>>,
}

impl std::fmt::Debug for GrpcStatsFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcStatsFactory")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Envoy's `Common::hasGrpcContentType`: `application/grpc`, optionally
/// followed by `+<subtype>` (not `;` parameters, not `grpc-web`).
pub fn grpc_content_type(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'+')
    })
}

/// Envoy's `Common::resolveServiceAndMethod`: the path without its query,
/// split on `/` (empty pieces dropped), must have exactly two pieces.
fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let path = path.split('?').next().unwrap_or_default();
    let mut it = path.split('/').filter(|p| !p.is_empty());
    let service = it.next()?;
    let method = it.next()?;
    it.next().is_none().then_some((service, method))
}

impl GrpcStatsFactory {
    pub fn new(
        name: impl Into<String>,
        config: Arc<GrpcStatsConfig>,
        stats: &Arc<dyn StatsScope>,
    ) -> Self {
        GrpcStatsFactory {
            name: name.into(),
            state_key: config.emit_filter_state.then(|| GRPC_STATS_STATE.into()),
            config,
            stats: stats.clone(),
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The cluster's stats entry, created on first use (write lock).
    fn with_cluster<T>(&self, cluster: &str, f: impl FnOnce(&mut ClusterStats) -> T) -> T {
        let mut w = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        let c = w.entry(cluster.into()).or_insert_with(|| ClusterStats {
            bucket: None,
            methods: HashMap::new(),
        });
        f(c)
    }

    /// The cluster's `grpc.*` bucket, created on first use (as Envoy
    /// creates a stat when it first charges it).
    fn bucket(&self, cluster: &str) -> Arc<MethodStats> {
        if let Some(b) = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .and_then(|c| c.bucket.clone())
        {
            return b;
        }
        self.with_cluster(cluster, |c| self.bucket_in(c, cluster))
    }

    fn bucket_in(&self, c: &mut ClusterStats, cluster: &str) -> Arc<MethodStats> {
        c.bucket
            .get_or_insert_with(|| {
                Arc::new(MethodStats::new(
                    &self.stats,
                    cluster,
                    "grpc.".into(),
                    self.config.enable_upstream_stats,
                ))
            })
            .clone()
    }

    /// The stats of `service`.`method` on `cluster`, cached under `key`
    /// (`service/method`).
    fn method(&self, cluster: &str, key: &str, service: &str, method: &str) -> Arc<MethodStats> {
        if let Some(m) = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .and_then(|c| c.methods.get(key))
        {
            return m.clone();
        }
        self.with_cluster(cluster, |c| {
            if let Some(m) = c.methods.get(key) {
                return m.clone();
            }
            if c.methods.len() >= MAX_METHODS {
                return self.bucket_in(c, cluster);
            }
            let m = Arc::new(MethodStats::new(
                &self.stats,
                cluster,
                format!("grpc.{service}.{method}."),
                self.config.enable_upstream_stats,
            ));
            c.methods.insert(key.into(), m.clone());
            m
        })
    }
}

impl HttpFilterFactory for GrpcStatsFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // Not gRPC: nothing to count, no instance. A gRPC request without
        // an upstream cluster (Envoy's `clusterInfo()` is null for direct
        // responses) or without a `/service/method` path has no stats, but
        // its messages still go to the filter state object.
        let req = route.request?;
        if !grpc_content_type(&req.headers) {
            return None;
        }
        let stats = route.cluster.and_then(|c| self.resolve(c, req.uri.path()));
        let state = self.state_key.as_ref().map(|k| State {
            key: k.clone(),
            object: Arc::new(GrpcStatsObject::default()),
        });
        if stats.is_none() && state.is_none() {
            return None;
        }
        Some(Box::new(GrpcStatsFilter::new(stats, state, &self.config)))
    }
}

impl GrpcStatsFactory {
    /// The stats a request to `path` on `cluster` charges; `None` when the
    /// path is not `/service/method`.
    fn resolve(&self, cluster: &str, path: &str) -> Option<Arc<MethodStats>> {
        use std::borrow::Cow;
        let (s, m) = service_and_method(path)?;
        let own = match &self.config.methods {
            GrpcStatsMethods::All => true,
            GrpcStatsMethods::None => false,
            GrpcStatsMethods::Allowlist(l) => l.iter().any(|(ls, lm)| ls == s && lm == m),
        };
        if !own {
            return Some(self.bucket(cluster));
        }
        // Only `stats_for_all_methods` replaces dots (as Envoy).
        let replace = matches!(self.config.methods, GrpcStatsMethods::All)
            && self.config.replace_dots_in_grpc_service_name
            && s.contains('.');
        let service: Cow<'_, str> = if replace {
            Cow::Owned(s.replace('.', "_"))
        } else {
            Cow::Borrowed(s)
        };
        // A canonical `/service/method` path is its own key (no
        // allocation once the method is known).
        let key: Cow<'_, str> = if !replace && path.len() == s.len() + m.len() + 2 {
            Cow::Borrowed(&path[1..])
        } else {
            Cow::Owned(format!("{service}/{m}"))
        };
        Some(self.method(cluster, &key, &service, m))
    }
}

/// Counts gRPC messages in a byte stream by their 5-byte frame headers
/// (flag, 4-byte big-endian length), across chunks. As Envoy's
/// `Grpc::FrameInspector`, a frame counts when its first byte is seen.
#[derive(Debug, Default, Clone)]
pub struct FrameCounter {
    /// Bytes of the current header seen (0: at a frame boundary).
    header: u8,
    /// The length read so far (while in a header).
    len: u32,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    pub frames: u64,
}

impl FrameCounter {
    /// Inspects `data`; returns the frames that started in it.
    pub fn inspect(&mut self, mut data: &[u8]) -> u64 {
        let before = self.frames;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                self.skip -= n;
                data = &data[n as usize..];
                continue;
            }
            let b = data[0];
            data = &data[1..];
            match self.header {
                0 => {
                    self.frames += 1;
                    self.len = 0;
                    self.header = 1;
                }
                1..=3 => {
                    self.len = (self.len << 8) | u32::from(b);
                    self.header += 1;
                }
                _ => {
                    self.len = (self.len << 8) | u32::from(b);
                    self.header = 0;
                    self.skip = u64::from(self.len);
                }
            }
        }
        self.frames - before
    }
}

/// When the request body ended (µs after the instance was created), for
/// `upstream_rq_time`; written by the request body observer.
#[derive(Debug, Default)]
struct SentAt(AtomicU64);

/// The request's [`GrpcStatsObject`] and its key (`emit_filter_state`).
struct State {
    key: Arc<str>,
    object: Arc<GrpcStatsObject>,
}

struct GrpcStatsFilter {
    /// `None`: no cluster or no `/service/method` path (only the filter
    /// state object counts).
    stats: Option<Arc<MethodStats>>,
    state: Option<State>,
    created: Instant,
    sent: Option<Arc<SentAt>>,
    grpc_response: bool,
    /// The response has a body (its headers did not end the stream).
    body: bool,
    responses: FrameCounter,
}

impl GrpcStatsFilter {
    fn new(
        stats: Option<Arc<MethodStats>>,
        state: Option<State>,
        config: &GrpcStatsConfig,
    ) -> Self {
        GrpcStatsFilter {
            created: Instant::now(),
            sent: (stats.is_some() && config.enable_upstream_stats)
                .then(|| Arc::new(SentAt::default())),
            stats,
            state,
            grpc_response: false,
            body: false,
            responses: FrameCounter::default(),
        }
    }

    /// `upstream_rq_time`: from the end of the request (its body, else its
    /// headers) to the end of the response, in milliseconds.
    fn charge_upstream(&self) {
        let h = self
            .stats
            .as_ref()
            .and_then(|s| s.upstream_rq_time.as_ref());
        if let (Some(h), Some(sent)) = (h, &self.sent) {
            let since = std::time::Duration::from_micros(sent.0.load(Relaxed));
            let d = self.created.elapsed().saturating_sub(since);
            h.record(d.as_millis() as u64);
        }
    }
}

struct RequestCounter {
    stats: Option<Arc<MethodStats>>,
    object: Option<Arc<GrpcStatsObject>>,
    frames: FrameCounter,
    created: Instant,
    sent: Option<Arc<SentAt>>,
}

impl RequestBodyObserver for RequestCounter {
    fn on_data(&mut self, data: &Bytes) {
        let n = self.frames.inspect(data);
        if n > 0 {
            if let Some(s) = &self.stats {
                s.request_messages.add(n);
            }
            if let Some(o) = &self.object {
                o.request.fetch_add(n, Relaxed);
            }
        }
    }
    fn on_end(&mut self) {
        if let Some(s) = &self.sent {
            s.0.store(self.created.elapsed().as_micros() as u64, Relaxed);
        }
    }
}

impl HttpFilter for GrpcStatsFilter {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        _head: &mut http::request::Parts,
    ) -> Action {
        if let Some(st) = &self.state {
            // A read-only entry of the same key (set by an earlier filter)
            // stays: Envoy asserts on such a write.
            let _ = cx
                .filter_state
                .set(st.key.clone(), st.object.clone(), StateFlags::default());
        }
        Action::Continue
    }

    fn request_body_observer(&mut self) -> Option<Box<dyn RequestBodyObserver>> {
        Some(Box::new(RequestCounter {
            stats: self.stats.clone(),
            object: self.state.as_ref().map(|s| s.object.clone()),
            frames: FrameCounter::default(),
            created: self.created,
            sent: self.sent.clone(),
        }))
    }

    fn on_response_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        // Envoy's `isGrpcResponseHeaders`: trailers-only needs grpc-status;
        // otherwise a 200 with a gRPC content type.
        let status = head.headers.get("grpc-status");
        self.body = !cx.end_stream;
        self.grpc_response = if cx.end_stream {
            status.is_some()
        } else {
            head.status == http::StatusCode::OK && grpc_content_type(&head.headers)
        };
        if let (Some(stats), Some(s)) = (&self.stats, status) {
            stats.charge_status(s.as_bytes());
        }
        if cx.end_stream {
            self.charge_upstream();
        }
        Action::Continue
    }

    fn wants_response_body(&self) -> bool {
        // Trailers carry the status whether or not the response looks like
        // gRPC (Envoy charges them for any gRPC request); without stats
        // only a gRPC response's messages count.
        self.body && (self.stats.is_some() || self.grpc_response)
    }

    fn on_response_data(&mut self, data: &mut Bytes, _end_of_stream: bool) {
        if self.grpc_response {
            let n = self.responses.inspect(data);
            if n > 0 {
                if let Some(s) = &self.stats {
                    s.response_messages.add(n);
                }
                if let Some(st) = &self.state {
                    st.object.response.fetch_add(n, Relaxed);
                }
            }
        }
    }

    fn on_response_trailers(&mut self, trailers: &mut http::HeaderMap, _data: &mut Bytes) {
        let Some(stats) = &self.stats else { return };
        if let Some(s) = trailers.get("grpc-status") {
            stats.charge_status(s.as_bytes());
        }
        self.charge_upstream();
    }
}
