//! Spans (HCM `tracing.provider`): the OpenTelemetry and Zipkin tracers, as Envoy
//! 1.40's `envoy.tracers.opentelemetry` with its gRPC exporter.
//!
//! A traced HCM starts one span per request right after the trace
//! decision: it continues an incoming W3C `traceparent` (trace id, its
//! span id as the parent, its sampled flag, `tracestate`) or starts a new
//! trace sampled by the decision; an invalid `traceparent` makes no span
//! at all (Envoy's null span). The router injects the span's own context
//! (`traceparent`, and `tracestate`, empty or not) into the upstream
//! request. When the response ends the span gets Envoy's tags in Envoy's
//! order and, if sampled, goes to the tracer's buffer; the buffer is
//! exported (`TraceService/Export` through the configured cluster) when
//! it holds `MIN_FLUSH_SPANS` spans, and by a timer every
//! `FLUSH_INTERVAL` (Envoy's runtime defaults). The buffer is bounded
//! (`MAX_BUFFERED` spans, more are dropped and counted) and exports in
//! flight are bounded too: the data path never waits for a collector.
pub mod otlp;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use filters::callout::Callouts;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;
use xds_client::config::{CustomTagValue, TraceProvider, TracingConfig};

use crate::stats::{Counter, StatName, Store};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Envoy's `tracing.opentelemetry.min_flush_spans` default.
pub const MIN_FLUSH_SPANS: usize = 5;
/// Envoy's `tracing.opentelemetry.flush_interval_ms` default.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Spans kept while exports cannot keep up; more are dropped.
pub const MAX_BUFFERED: usize = 1024;
/// Exports in flight at once; past it spans wait in the buffer.
const MAX_IN_FLIGHT: usize = 8;
/// One export's deadline when `grpc_service.timeout` is unset.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// OTLP span flags: the `is_remote` bit of the parent is known (Envoy 1.40
/// sets it on every span), and the parent is remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// A span context carried by a `traceparent` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub tracestate: String,
}

/// What a request's headers say about an incoming trace.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// No `traceparent`.
    None,
    /// A `traceparent` that does not parse: Envoy makes no span.
    Invalid,
    Context(SpanContext),
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn to_hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Reads W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all
/// zero) and `tracestate` (several headers joined with `,`).
pub fn extract_w3c(h: &HeaderMap) -> Incoming {
    let Some(tp) = h.get(&TRACEPARENT) else {
        return Incoming::None;
    };
    let Ok(tp) = tp.to_str() else {
        return Incoming::Invalid;
    };
    let parts: Vec<&str> = tp.split('-').collect();
    let (version, trace, span, flags) = match parts.as_slice() {
        [v, t, s, f] if tp.len() == 55 => (*v, *t, *s, *f),
        _ => return Incoming::Invalid,
    };
    let (Some(_), Some(trace_id), Some(span_id), Some(flags)) = (
        hex_to::<1>(version),
        hex_to::<16>(trace),
        hex_to::<8>(span),
        hex_to::<1>(flags),
    ) else {
        return Incoming::Invalid;
    };
    if trace_id == [0; 16] || span_id == [0; 8] {
        return Incoming::Invalid;
    }
    let tracestate = h
        .get_all(&TRACESTATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    Incoming::Context(SpanContext {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
        tracestate,
    })
}

/// How a span context travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    W3c,
    B3Multi,
    B3Single,
}

/// A B3 context.
#[derive(Debug, PartialEq, Eq)]
pub struct B3Context {
    /// 8 or 16 bytes.
    pub trace_id: Vec<u8>,
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    /// `None`: the header did not say (the trace decision decides).
    pub sampled: Option<bool>,
    /// It came in the single `b3` header.
    pub single: bool,
}

/// What B3 headers say.
#[derive(Debug, PartialEq, Eq)]
pub enum B3 {
    /// No ids (a bare sampling decision at most).
    None(Option<bool>),
    /// Ids that do not parse: Envoy makes no span.
    Invalid,
    Context(B3Context),
}

fn b3_sampled(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_trace_id(s: &str) -> Option<Vec<u8>> {
    match s.len() {
        16 => hex_to::<8>(s).map(|b| b.to_vec()),
        32 => hex_to::<16>(s).map(|b| b.to_vec()),
        _ => None,
    }
}

fn b3_parent(p: Option<&str>) -> Result<Option<[u8; 8]>, ()> {
    match p {
        Some(p) => hex_to::<8>(p).map(Some).ok_or(()),
        None => Ok(None),
    }
}

/// Reads B3: the single `b3` header (`trace-span[-sampled[-parent]]`, or
/// a bare sampling state) first, else `x-b3-traceid`, `x-b3-spanid`,
/// `x-b3-parentspanid`, `x-b3-sampled` and `x-b3-flags` (debug: sampled).
pub fn extract_b3(h: &HeaderMap) -> B3 {
    let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(v) = text("b3") {
        let parts: Vec<&str> = v.split('-').collect();
        if parts.len() == 1 {
            return B3::None(b3_sampled(parts[0]));
        }
        if parts.len() > 4 {
            return B3::Invalid;
        }
        let (Some(trace_id), Some(span_id)) = (b3_trace_id(parts[0]), hex_to::<8>(parts[1])) else {
            return B3::Invalid;
        };
        let sampled = match parts.get(2) {
            Some(s) => match b3_sampled(s) {
                Some(v) => Some(v),
                None => return B3::Invalid,
            },
            None => None,
        };
        let Ok(parent_id) = b3_parent(parts.get(3).copied()) else {
            return B3::Invalid;
        };
        return B3::Context(B3Context {
            trace_id,
            span_id,
            parent_id,
            sampled,
            single: true,
        });
    }
    let sampled = if text("x-b3-flags") == Some("1") {
        Some(true)
    } else {
        text("x-b3-sampled").and_then(b3_sampled)
    };
    let (Some(t), Some(s)) = (text("x-b3-traceid"), text("x-b3-spanid")) else {
        return B3::None(sampled);
    };
    let (Some(trace_id), Some(span_id)) = (b3_trace_id(t), hex_to::<8>(s)) else {
        return B3::Invalid;
    };
    let Ok(parent_id) = b3_parent(text("x-b3-parentspanid")) else {
        return B3::Invalid;
    };
    B3::Context(B3Context {
        trace_id,
        span_id,
        parent_id,
        sampled,
        single: false,
    })
}

/// The tracer's counters: `tracing.opentelemetry.*` or `tracing.zipkin.*`
/// (Envoy's names; `spans_dropped` is weir's, for a full buffer).
struct TracerStats {
    spans_sent: Arc<Counter>,
    timer_flushed: Arc<Counter>,
    spans_dropped: Arc<Counter>,
    /// Zipkin: a 202 answer.
    reports_sent: Arc<Counter>,
    /// Zipkin: another answer.
    reports_dropped: Arc<Counter>,
    /// Zipkin: no answer.
    reports_failed: Arc<Counter>,
}

/// A finished span waiting for export.
enum Buffered {
    Otlp(otlp::Span),
    Zipkin(serde_json::Value),
}

/// One provider's exporter: shared by the requests of an HCM.
pub struct Tracer {
    provider: TraceProvider,
    callouts: Arc<dyn Callouts>,
    node_id: String,
    zone: String,
    /// Zipkin's `localEndpoint`: the node's cluster and the host's address.
    local_cluster: String,
    local_ip: Option<std::net::IpAddr>,
    buffer: Mutex<Vec<Buffered>>,
    in_flight: Arc<AtomicUsize>,
    stats: Arc<TracerStats>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("provider", &self.provider)
            .finish()
    }
}

impl Tracer {
    /// The tracer of `provider`; its flush timer runs on the current tokio
    /// runtime (if any) for as long as the tracer lives.
    pub fn new(
        provider: &TraceProvider,
        callouts: Arc<dyn Callouts>,
        store: &Store,
        node: &xds_client::config::Node,
    ) -> Arc<Tracer> {
        let prefix = match provider {
            TraceProvider::OpenTelemetry(_) => "opentelemetry",
            TraceProvider::Zipkin(_) => "zipkin",
        };
        let c = |s: &str| store.counter(StatName::plain(format!("tracing.{prefix}.{s}")));
        let zipkin = matches!(provider, TraceProvider::Zipkin(_));
        let t = Arc::new(Tracer {
            provider: provider.clone(),
            callouts,
            node_id: node.id.clone(),
            zone: node.zone.clone(),
            local_cluster: node.cluster.clone(),
            local_ip: if zipkin {
                crate::netif::first_non_loopback(false)
            } else {
                None
            },
            buffer: Mutex::new(Vec::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
            stats: Arc::new(TracerStats {
                spans_sent: c("spans_sent"),
                timer_flushed: c("timer_flushed"),
                spans_dropped: c("spans_dropped"),
                reports_sent: c("reports_sent"),
                reports_dropped: c("reports_dropped"),
                reports_failed: c("reports_failed"),
            }),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Tracer> = Arc::downgrade(&t);
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(FLUSH_INTERVAL).await;
                    let Some(t) = weak.upgrade() else { return };
                    t.stats.timer_flushed.inc();
                    t.flush();
                }
            });
        }
        t
    }

    /// Starts the span of a request (`None`: Envoy's null span, for an
    /// invalid `traceparent`).
    pub fn start_span(
        self: &Arc<Tracer>,
        cfg: &TracingConfig,
        route_tags: &[xds_client::config::CustomTag],
        headers: &HeaderMap,
        traced: bool,
        start: SystemTime,
        host: &str,
    ) -> Option<Box<ActiveSpan>> {
        let mut rng = rand::rng();
        let mut span_id = rng.random::<[u8; 8]>().to_vec();
        let (trace_id, parent, sampled, tracestate, remote, style, name) = match &self.provider {
            TraceProvider::OpenTelemetry(_) => {
                let name = if cfg.egress {
                    format!("egress {host}")
                } else {
                    "ingress".to_owned()
                };
                match extract_w3c(headers) {
                    Incoming::Invalid => return None,
                    Incoming::None => {
                        let t = rng.random::<[u8; 16]>().to_vec();
                        (
                            t,
                            Vec::new(),
                            traced,
                            String::new(),
                            false,
                            Style::W3c,
                            name,
                        )
                    }
                    Incoming::Context(c) => (
                        c.trace_id.to_vec(),
                        c.span_id.to_vec(),
                        c.sampled,
                        c.tracestate,
                        true,
                        Style::W3c,
                        name,
                    ),
                }
            }
            // Envoy 1.40's Zipkin spans are named after the host.
            TraceProvider::Zipkin(z) => match extract_b3(headers) {
                B3::Invalid => return None,
                B3::None(s) => {
                    // A root span's 64-bit trace id is its span id (Envoy).
                    let t = if z.trace_id_128bit {
                        rng.random::<[u8; 16]>().to_vec()
                    } else {
                        span_id.clone()
                    };
                    let sampled = s.unwrap_or(traced);
                    (
                        t,
                        Vec::new(),
                        sampled,
                        String::new(),
                        false,
                        Style::B3Multi,
                        host.to_owned(),
                    )
                }
                B3::Context(c) => {
                    let parent = if z.shared_span_context && !cfg.egress {
                        // The server span shares the caller's span id.
                        span_id = c.span_id.to_vec();
                        c.parent_id.map(|p| p.to_vec()).unwrap_or_default()
                    } else {
                        c.span_id.to_vec()
                    };
                    let style = if c.single {
                        Style::B3Single
                    } else {
                        Style::B3Multi
                    };
                    let sampled = c.sampled.unwrap_or(traced);
                    (
                        c.trace_id,
                        parent,
                        sampled,
                        String::new(),
                        true,
                        style,
                        host.to_owned(),
                    )
                }
            },
        };
        let mut flags = FLAG_HAS_IS_REMOTE | u32::from(sampled);
        if remote {
            flags |= FLAG_IS_REMOTE;
        }
        let span = otlp::Span {
            trace_id,
            span_id,
            trace_state: tracestate,
            parent_span_id: parent,
            flags,
            name,
            kind: if cfg.egress {
                otlp::span_kind::CLIENT
            } else {
                otlp::span_kind::SERVER
            },
            start_time_unix_nano: unix_nanos(start),
            attributes: vec![
                otlp::KeyValue::string("node_id", &self.node_id),
                otlp::KeyValue::string("zone", &self.zone),
            ],
            ..Default::default()
        };
        Some(Box::new(ActiveSpan {
            tracer: self.clone(),
            span,
            sampled,
            style,
            request_tags: Vec::new(),
            max_path: cfg.max_path_tag_length,
            custom: merge_tags(&cfg.custom_tags, route_tags),
            header_tags: Vec::new(),
        }))
    }

    /// Buffers a finished, sampled span; exports at `MIN_FLUSH_SPANS`.
    fn record(&self, span: otlp::Span) {
        let item = match &self.provider {
            TraceProvider::OpenTelemetry(_) => Buffered::Otlp(span),
            TraceProvider::Zipkin(z) => Buffered::Zipkin(self.zipkin_json(z, span)),
        };
        let ready = {
            let Ok(mut b) = self.buffer.lock() else {
                return;
            };
            if b.len() >= MAX_BUFFERED {
                self.stats.spans_dropped.inc();
                return;
            }
            b.push(item);
            b.len() >= MIN_FLUSH_SPANS
        };
        if ready {
            self.flush();
        }
    }

    /// Sends what the buffer holds (unless too many exports are in flight:
    /// the spans then wait for the next flush).
    fn flush(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            return;
        }
        let spans = match self.buffer.lock() {
            Ok(mut b) if !b.is_empty() => std::mem::take(&mut *b),
            _ => return,
        };
        self.stats.spans_sent.add(spans.len() as u64);
        let in_flight = self.in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        match &self.provider {
            TraceProvider::OpenTelemetry(p) => {
                let spans = spans
                    .into_iter()
                    .filter_map(|b| match b {
                        Buffered::Otlp(s) => Some(s),
                        Buffered::Zipkin(_) => None,
                    })
                    .collect();
                let req = self.export_request(&p.service_name, spans);
                let g = &p.grpc;
                let call = filters::callout::grpc_unary::<_, otlp::ExportTraceServiceResponse>(
                    &*self.callouts,
                    &g.cluster,
                    &g.authority,
                    otlp::EXPORT_PATH,
                    &req,
                    g.timeout.unwrap_or(EXPORT_TIMEOUT),
                    &g.initial_metadata,
                );
                rt.spawn(async move {
                    if let Err(e) = call.await {
                        tracing::debug!(error = %e, "opentelemetry export failed");
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            TraceProvider::Zipkin(z) => {
                let body: Vec<serde_json::Value> = spans
                    .into_iter()
                    .filter_map(|b| match b {
                        Buffered::Zipkin(v) => Some(v),
                        Buffered::Otlp(_) => None,
                    })
                    .collect();
                let body = serde_json::to_vec(&body).unwrap_or_default();
                let mut headers = HeaderMap::new();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let req = filters::callout::CalloutRequest {
                    method: http::Method::POST,
                    path_and_query: z.endpoint.clone(),
                    authority: z.hostname.clone(),
                    headers,
                    body: body.into(),
                };
                let call = self
                    .callouts
                    .send(&z.cluster, req, EXPORT_TIMEOUT, 64 * 1024);
                let stats = self.stats.clone();
                rt.spawn(async move {
                    // As Envoy: only a 202 counts as sent.
                    match call.await {
                        Ok(r) if r.status == http::StatusCode::ACCEPTED => stats.reports_sent.inc(),
                        Ok(_) => stats.reports_dropped.inc(),
                        Err(e) => {
                            tracing::debug!(error = %e, "zipkin report failed");
                            stats.reports_failed.inc();
                        }
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    /// The export of `spans` with the resource Envoy describes itself by
    /// (`service.name` and the telemetry SDK attributes, as weir's own).
    fn export_request(
        &self,
        service_name: &str,
        spans: Vec<otlp::Span>,
    ) -> otlp::ExportTraceServiceRequest {
        otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(otlp::Resource {
                    attributes: vec![
                        otlp::KeyValue::string("telemetry.sdk.language", "rust"),
                        otlp::KeyValue::string("telemetry.sdk.name", "weir"),
                        otlp::KeyValue::string("service.name", service_name),
                        otlp::KeyValue::string("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
                    ],
                    dropped_attributes_count: 0,
                }),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: None,
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// A span as Zipkin's JSON v2, as Envoy 1.40 writes it (`shared` on a
    /// server span with a shared context, an `ss` annotation at its end).
    fn zipkin_json(
        &self,
        z: &xds_client::config::ZipkinProvider,
        s: otlp::Span,
    ) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let server = s.kind == otlp::span_kind::SERVER;
        let us = |n: u64| n / 1000;
        let mut o = Map::new();
        o.insert("traceId".into(), to_hex(&s.trace_id).into());
        o.insert("id".into(), to_hex(&s.span_id).into());
        if !s.parent_span_id.is_empty() {
            o.insert("parentId".into(), to_hex(&s.parent_span_id).into());
        }
        o.insert(
            "kind".into(),
            (if server { "SERVER" } else { "CLIENT" }).into(),
        );
        o.insert("timestamp".into(), us(s.start_time_unix_nano).into());
        o.insert(
            "duration".into(),
            us(s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano)).into(),
        );
        let mut ep = Map::new();
        ep.insert("serviceName".into(), self.local_cluster.clone().into());
        match self.local_ip {
            Some(std::net::IpAddr::V4(ip)) => {
                ep.insert("ipv4".into(), ip.to_string().into());
            }
            Some(std::net::IpAddr::V6(ip)) => {
                ep.insert("ipv6".into(), ip.to_string().into());
            }
            None => {}
        }
        ep.insert("port".into(), 0.into());
        o.insert("localEndpoint".into(), Value::Object(ep));
        if server && z.shared_span_context {
            o.insert("shared".into(), true.into());
        }
        let tags: Map<String, Value> = s
            .attributes
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), Value::from(kv.text()?))))
            .collect();
        o.insert("tags".into(), Value::Object(tags));
        let ann = if server {
            json!([{"timestamp": us(s.end_time_unix_nano), "value": "ss"}])
        } else {
            json!([
                {"timestamp": us(s.start_time_unix_nano), "value": "cs"},
                {"timestamp": us(s.end_time_unix_nano), "value": "cr"},
            ])
        };
        o.insert("annotations".into(), ann);
        o.insert("name".into(), s.name.into());
        Value::Object(o)
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The facts of a finished stream a span is tagged with.
pub struct StreamEnd<'a> {
    /// `grpc-status` and `grpc-message` of the response headers, else the
    /// status of its trailers.
    pub grpc_status: Option<String>,
    pub grpc_message: Option<String>,
    pub request_size: u64,
    pub response_size: u64,
    pub upstream_cluster: Option<&'a str>,
    /// 0: no response.
    pub status: u16,
    pub flags: String,
}

/// A request's span, from the trace decision to the end of the response.
pub struct ActiveSpan {
    tracer: Arc<Tracer>,
    span: otlp::Span,
    sampled: bool,
    /// How the context travels (as it came in, for B3).
    style: Style,
    /// Tags from the request headers (Envoy reads them at the end from
    /// the request as the router sent it).
    request_tags: Vec<otlp::KeyValue>,
    max_path: usize,
    custom: Vec<xds_client::config::CustomTag>,
    /// The request-header custom tags' values, in `custom`'s order.
    header_tags: Vec<String>,
}

impl ActiveSpan {
    /// Reads the request's tags from `h` (called again after the router's
    /// rewrites, which Envoy's tags show). `peer`: the direct remote IP.
    pub fn set_request(
        &mut self,
        h: &HeaderMap,
        method: &str,
        path: &str,
        protocol: &str,
        peer: &str,
    ) {
        let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        let mut tags = Vec::with_capacity(10);
        if let Some(id) = text("x-request-id") {
            tags.push(otlp::KeyValue::string("guid:x-request-id", id));
        }
        // As Envoy's `buildOriginalUri`: x-forwarded-proto, host, the
        // original path (before a rewrite) cut to max_path_tag_length.
        let path = text("x-envoy-original-path").unwrap_or(path);
        let mut cut = path.len().min(self.max_path);
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        let url = format!(
            "{}://{}{}",
            text("x-forwarded-proto").unwrap_or(""),
            text("host").unwrap_or(""),
            &path[..cut]
        );
        tags.push(otlp::KeyValue::string("http.url", &url));
        tags.push(otlp::KeyValue::string("http.method", method));
        tags.push(otlp::KeyValue::string(
            "downstream_cluster",
            text("x-envoy-downstream-service-cluster").unwrap_or("-"),
        ));
        tags.push(otlp::KeyValue::string(
            "user_agent",
            text("user-agent").unwrap_or("-"),
        ));
        tags.push(otlp::KeyValue::string("http.protocol", protocol));
        tags.push(otlp::KeyValue::string("peer.address", peer));
        if let Some(c) = text("x-client-trace-id") {
            tags.push(otlp::KeyValue::string("guid:x-client-trace-id", c));
        }
        // As Envoy's `addGrpcRequestTags`, for a gRPC request.
        if text("content-type").is_some_and(|c| c.starts_with("application/grpc")) {
            tags.push(otlp::KeyValue::string("grpc.path", path));
            for (tag, h) in [
                ("grpc.authority", "host"),
                ("grpc.content_type", "content-type"),
                ("grpc.timeout", "grpc-timeout"),
            ] {
                if let Some(v) = text(h) {
                    tags.push(otlp::KeyValue::string(tag, v));
                }
            }
        }
        self.request_tags = tags;
        // Custom request-header tags read the same headers.
        self.header_tags = self
            .custom
            .iter()
            .filter_map(|c| match &c.value {
                CustomTagValue::RequestHeader(n, default) => Some(
                    h.get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(default.as_str())
                        .to_owned(),
                ),
                _ => None,
            })
            .collect();
    }

    /// Writes the span's context into the upstream request: Envoy's
    /// OpenTelemetry `injectContext` (`traceparent`, and `tracestate`,
    /// empty or not), or Zipkin's B3 in the style it came in (multi
    /// headers for a new trace).
    pub fn inject(&self, h: &mut HeaderMap) {
        let trace = to_hex(&self.span.trace_id);
        let span = to_hex(&self.span.span_id);
        let set = |h: &mut HeaderMap, n: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(n, v);
            }
        };
        match self.style {
            Style::W3c => {
                let tp = format!("00-{trace}-{span}-{:02x}", u8::from(self.sampled));
                set(h, "traceparent", &tp);
                set(h, "tracestate", &self.span.trace_state);
            }
            Style::B3Multi => {
                set(h, "x-b3-traceid", &trace);
                set(h, "x-b3-spanid", &span);
                if !self.span.parent_span_id.is_empty() {
                    set(h, "x-b3-parentspanid", &to_hex(&self.span.parent_span_id));
                }
                set(h, "x-b3-sampled", if self.sampled { "1" } else { "0" });
            }
            Style::B3Single => {
                let mut v = format!("{trace}-{span}-{}", u8::from(self.sampled));
                if !self.span.parent_span_id.is_empty() {
                    v.push('-');
                    v.push_str(&to_hex(&self.span.parent_span_id));
                }
                set(h, "b3", &v);
            }
        }
    }

    /// Tags the span as Envoy's `finalizeDownstreamSpan` and hands it to
    /// the tracer when sampled.
    pub fn finish(self: Box<Self>, end: &StreamEnd<'_>) {
        let ActiveSpan {
            tracer,
            mut span,
            sampled,
            request_tags,
            custom,
            header_tags,
            ..
        } = *self;
        if !sampled {
            return;
        }
        span.attributes.extend(request_tags);
        let mut header_tags = header_tags.into_iter();
        let a = &mut span.attributes;
        a.push(otlp::KeyValue::string(
            "request_size",
            &end.request_size.to_string(),
        ));
        a.push(otlp::KeyValue::string(
            "response_size",
            &end.response_size.to_string(),
        ));
        a.push(otlp::KeyValue::string("component", "proxy"));
        if let Some(c) = end.upstream_cluster {
            a.push(otlp::KeyValue::string("upstream_cluster", c));
            a.push(otlp::KeyValue::string("upstream_cluster.name", c));
        }
        a.push(otlp::KeyValue::string(
            "http.status_code",
            &end.status.to_string(),
        ));
        a.push(otlp::KeyValue::string("response_flags", &end.flags));
        if end.status == 0 || end.status >= 500 {
            a.push(otlp::KeyValue::string("error", "true"));
        }
        for c in &custom {
            let v = match &c.value {
                CustomTagValue::Literal(v) | CustomTagValue::Environment(v) => Some(v.clone()),
                CustomTagValue::RequestHeader(..) => header_tags.next(),
            };
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                set_tag(a, &c.tag, &v);
            }
        }
        // As Envoy's `addGrpcResponseTags`: server-side failures are errors.
        if let Some(st) = &end.grpc_status {
            set_tag(a, "grpc.status_code", st);
            if let Some(m) = &end.grpc_message {
                set_tag(a, "grpc.message", m);
            }
            if matches!(st.as_str(), "2" | "4" | "8" | "12" | "13" | "14" | "15") {
                set_tag(a, "error", "true");
            }
        }
        span.end_time_unix_nano = unix_nanos(SystemTime::now());
        tracer.record(span);
    }
}

/// The HCM's custom tags with the route's over them (Envoy's
/// `ActiveStream::customTags`).
fn merge_tags(
    hcm: &[xds_client::config::CustomTag],
    route: &[xds_client::config::CustomTag],
) -> Vec<xds_client::config::CustomTag> {
    if route.is_empty() {
        return hcm.to_vec();
    }
    let mut out: Vec<_> = hcm
        .iter()
        .filter(|t| !route.iter().any(|r| r.tag == t.tag))
        .cloned()
        .collect();
    out.extend(route.iter().cloned());
    out
}

/// Sets a tag, replacing one of the same key (OTel attribute keys are
/// unique; Envoy's `setTag` overwrites).
fn set_tag(a: &mut Vec<otlp::KeyValue>, key: &str, value: &str) {
    match a.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => *kv = otlp::KeyValue::string(key, value),
        None => a.push(otlp::KeyValue::string(key, value)),
    }
}

pub static X_ENVOY_DECORATOR_OPERATION: HeaderName =
    HeaderName::from_static("x-envoy-decorator-operation");

/// A stream's span in its `StreamInfo`, and the route decorator's
/// operation the response carries. A clone is empty: the span ends once,
/// with the original stream.
#[derive(Default)]
pub struct SpanSlot {
    pub span: Option<Box<ActiveSpan>>,
    /// Ingress: the decorated operation to answer with
    /// (`x-envoy-decorator-operation`).
    pub response_operation: Option<Arc<str>>,
    /// Egress: the response's `x-envoy-decorator-operation` renames the span.
    pub egress: bool,
}

impl Clone for SpanSlot {
    fn clone(&self) -> Self {
        SpanSlot::default()
    }
}

impl std::fmt::Debug for SpanSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.span.is_some() {
            "Span"
        } else {
            "NoSpan"
        })
    }
}

impl SpanSlot {
    /// As Envoy's `traceRequest` once the route is known: the route's
    /// decorator names the span; on ingress a request's
    /// `x-envoy-decorator-operation` overrides it (and is removed), on
    /// egress the decorator's operation goes upstream in that header.
    pub fn decorate(
        &mut self,
        egress: bool,
        decorator: Option<&xds_client::config::Decorator>,
        h: &mut HeaderMap,
    ) {
        self.egress = egress;
        if let (Some(d), Some(s)) = (decorator, &mut self.span) {
            s.span.name = d.operation.to_string();
        }
        let mut decorated = decorator
            .filter(|d| d.propagate)
            .map(|d| d.operation.clone());
        if egress {
            if let Some(op) = &decorated {
                if let Ok(v) = HeaderValue::from_str(op) {
                    h.insert(X_ENVOY_DECORATOR_OPERATION.clone(), v);
                }
            }
            return;
        }
        if let Some(v) = h.remove(&X_ENVOY_DECORATOR_OPERATION) {
            if !v.is_empty() {
                if let (Some(s), Ok(op)) = (&mut self.span, v.to_str()) {
                    s.span.name = op.to_owned();
                }
                decorated = None;
            }
        }
        self.response_operation = decorated;
    }

    /// The response side: ingress answers with the decorated operation;
    /// egress takes the upstream's as the span name (and removes it).
    pub fn on_response(&mut self, h: &mut HeaderMap) {
        if self.egress {
            if let Some(v) = h.remove(&X_ENVOY_DECORATOR_OPERATION) {
                if let (Some(s), Ok(op)) = (&mut self.span, v.to_str()) {
                    if !op.is_empty() {
                        s.span.name = op.to_owned();
                    }
                }
            }
        } else if let Some(op) = &self.response_operation {
            if let Ok(v) = HeaderValue::from_str(op) {
                h.insert(X_ENVOY_DECORATOR_OPERATION.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_str(tp).expect("value"));
        h
    }

    #[test]
    fn traceparent_parses_and_rejects() {
        let Incoming::Context(c) = extract_w3c(&h(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )) else {
            panic!("valid traceparent");
        };
        assert_eq!(to_hex(&c.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(to_hex(&c.span_id), "b7ad6b7169203331");
        assert!(c.sampled);
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
        ] {
            assert_eq!(extract_w3c(&h(bad)), Incoming::Invalid, "{bad}");
        }
        assert_eq!(extract_w3c(&HeaderMap::new()), Incoming::None);
    }

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn b3_single_and_multi() {
        let B3::Context(c) = extract_b3(&hm(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )])) else {
            panic!("single b3");
        };
        assert!(c.single);
        assert_eq!(to_hex(&c.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(to_hex(&c.span_id), "e457b5a2e4d86bd1");
        assert_eq!(
            c.parent_id.map(|p| to_hex(&p)).as_deref(),
            Some("05e3ac9a4f6e3b90")
        );
        assert_eq!(c.sampled, Some(true));
        let B3::Context(c) = extract_b3(&hm(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
            ("x-b3-sampled", "0"),
        ])) else {
            panic!("multi b3");
        };
        assert!(!c.single);
        assert_eq!(c.trace_id.len(), 8);
        assert_eq!(c.parent_id, None);
        assert_eq!(c.sampled, Some(true), "debug flag samples");
        assert_eq!(extract_b3(&hm(&[("b3", "0")])), B3::None(Some(false)));
        assert_eq!(
            extract_b3(&hm(&[("x-b3-sampled", "1")])),
            B3::None(Some(true))
        );
        for bad in [
            &[("b3", "xyz-e457b5a2e4d86bd1")][..],
            &[("b3", "463ac35c9f6413ad-e457b5a2e4d86bd1-7")][..],
            &[
                ("x-b3-traceid", "463ac35c9f6413a"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ][..],
            &[
                ("x-b3-traceid", "463ac35c9f6413ad"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-parentspanid", "zz"),
            ][..],
        ] {
            assert_eq!(extract_b3(&hm(bad)), B3::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn route_tags_replace_hcm_tags_of_the_same_name() {
        use xds_client::config::CustomTag;
        let t = |tag: &str, v: &str| CustomTag {
            tag: tag.into(),
            value: CustomTagValue::Literal(v.into()),
        };
        let merged = merge_tags(&[t("a", "1"), t("b", "2")], &[t("a", "3")]);
        assert_eq!(merged, vec![t("b", "2"), t("a", "3")]);
    }
}
