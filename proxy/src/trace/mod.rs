//! Spans (HCM `tracing.provider`): the OpenTelemetry tracer, as Envoy
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
use xds_client::config::{CustomTagValue, OpenTelemetryProvider, TraceProvider, TracingConfig};

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

/// `tracing.opentelemetry.*` (Envoy's names).
struct OtelStats {
    spans_sent: Arc<Counter>,
    timer_flushed: Arc<Counter>,
    /// weir-only: spans dropped because the buffer was full.
    spans_dropped: Arc<Counter>,
}

/// One provider's exporter: shared by the requests of an HCM.
pub struct Tracer {
    provider: OpenTelemetryProvider,
    callouts: Arc<dyn Callouts>,
    node_id: String,
    zone: String,
    buffer: Mutex<Vec<otlp::Span>>,
    in_flight: Arc<AtomicUsize>,
    stats: OtelStats,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("cluster", &self.provider.grpc.cluster)
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
        let TraceProvider::OpenTelemetry(p) = provider;
        let c = |s: &str| store.counter(StatName::plain(format!("tracing.opentelemetry.{s}")));
        let t = Arc::new(Tracer {
            provider: p.clone(),
            callouts,
            node_id: node.id.clone(),
            zone: node.zone.clone(),
            buffer: Mutex::new(Vec::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
            stats: OtelStats {
                spans_sent: c("spans_sent"),
                timer_flushed: c("timer_flushed"),
                spans_dropped: c("spans_dropped"),
            },
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
        headers: &HeaderMap,
        traced: bool,
        start: SystemTime,
        host: &str,
    ) -> Option<Box<ActiveSpan>> {
        let mut rng = rand::rng();
        let (trace_id, parent, sampled, tracestate, remote) = match extract_w3c(headers) {
            Incoming::Invalid => return None,
            Incoming::None => (
                rng.random::<[u8; 16]>(),
                Vec::new(),
                traced,
                String::new(),
                false,
            ),
            Incoming::Context(c) => (
                c.trace_id,
                c.span_id.to_vec(),
                c.sampled,
                c.tracestate,
                true,
            ),
        };
        let span_id = rng.random::<[u8; 8]>();
        let name = if cfg.egress {
            format!("egress {host}")
        } else {
            "ingress".to_owned()
        };
        let mut flags = FLAG_HAS_IS_REMOTE | u32::from(sampled);
        if remote {
            flags |= FLAG_IS_REMOTE;
        }
        let span = otlp::Span {
            trace_id: trace_id.to_vec(),
            span_id: span_id.to_vec(),
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
            request_tags: Vec::new(),
            max_path: cfg.max_path_tag_length,
            custom: cfg.custom_tags.clone(),
            header_tags: Vec::new(),
        }))
    }

    /// Buffers a finished, sampled span; exports at `MIN_FLUSH_SPANS`.
    fn record(&self, span: otlp::Span) {
        let ready = {
            let Ok(mut b) = self.buffer.lock() else {
                return;
            };
            if b.len() >= MAX_BUFFERED {
                self.stats.spans_dropped.inc();
                return;
            }
            b.push(span);
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
        let req = self.export_request(spans);
        let g = &self.provider.grpc;
        let call = filters::callout::grpc_unary::<_, otlp::ExportTraceServiceResponse>(
            &*self.callouts,
            &g.cluster,
            &g.authority,
            otlp::EXPORT_PATH,
            &req,
            g.timeout.unwrap_or(EXPORT_TIMEOUT),
            &g.initial_metadata,
        );
        let in_flight = self.in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        rt.spawn(async move {
            if let Err(e) = call.await {
                tracing::debug!(error = %e, "opentelemetry export failed");
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// The export of `spans` with the resource Envoy describes itself by
    /// (`service.name` and the telemetry SDK attributes, as weir's own).
    fn export_request(&self, spans: Vec<otlp::Span>) -> otlp::ExportTraceServiceRequest {
        otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(otlp::Resource {
                    attributes: vec![
                        otlp::KeyValue::string("telemetry.sdk.language", "rust"),
                        otlp::KeyValue::string("telemetry.sdk.name", "weir"),
                        otlp::KeyValue::string("service.name", &self.provider.service_name),
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
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The facts of a finished stream a span is tagged with.
pub struct StreamEnd<'a> {
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

    /// Writes the span's context into the upstream request, as Envoy's
    /// OpenTelemetry `injectContext` (an empty `tracestate` included).
    pub fn inject(&self, h: &mut HeaderMap) {
        let tp = format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.span.trace_id),
            to_hex(&self.span.span_id),
            u8::from(self.sampled)
        );
        if let Ok(v) = HeaderValue::from_str(&tp) {
            h.insert(TRACEPARENT.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.span.trace_state) {
            h.insert(TRACESTATE.clone(), v);
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
        span.end_time_unix_nano = unix_nanos(SystemTime::now());
        tracer.record(span);
    }
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
}
