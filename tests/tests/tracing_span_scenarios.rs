//! Tracing with span providers: the Zipkin tracer (JSON v2 to a real HTTP
//! collector, B3 continued) and the OpenTelemetry tracer (OTLP over gRPC to
//! a real collector that records every `ExportTraceServiceRequest`), W3C
//! `traceparent`/`tracestate` continued and injected into the upstream
//! request, spans named, kinded and tagged as Envoy 1.40's.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`, which is how the
//! expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test tracing_span_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test tracing_span_scenarios
//! ```
//!
//! Envoy's OpenTelemetry tracer flushes its buffer at 5 spans
//! (`tracing.opentelemetry.min_flush_spans`) or every 5 s: the tests send
//! 5 traced requests on one connection (one Envoy worker) so that the
//! spans arrive without waiting for the timer.
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde_json::{json, Value};
use weir::trace::otlp;
use weir_tests::config::{
    bootstrap_with, chain, cluster, h2_upstream, hcm, listener, merge, route, vhost,
};
use weir_tests::scenario::{echo_header, Http, Proxy};
use weir_tests::upstream;

const OTEL: &str = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig";

/// A gRPC OTLP TraceService collector (HTTP/2 on 127.0.0.1:0) recording
/// every export: its path, `:authority` and decoded request.
struct OtlpCollector {
    port: u16,
    seen: Arc<Mutex<Vec<(String, otlp::ExportTraceServiceRequest)>>>,
}

impl OtlpCollector {
    async fn start() -> OtlpCollector {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<(String, otlp::ExportTraceServiceRequest)>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            if let Ok(b) = body {
                                // One uncompressed length-prefixed message.
                                if b.len() >= 5 && b[0] == 0 {
                                    if let Ok(m) = otlp::ExportTraceServiceRequest::decode(&b[5..])
                                    {
                                        seen.lock().expect("lock").push((path, m));
                                    }
                                }
                            }
                            let reply = otlp::ExportTraceServiceResponse::default().encode_to_vec();
                            let mut framed = vec![0u8];
                            framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                            framed.extend_from_slice(&reply);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let body =
                                http_body_util::StreamBody::new(futures_util::stream::iter(vec![
                                    Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(
                                        framed,
                                    ))),
                                    Ok(hyper::body::Frame::trailers(trailers)),
                                ]));
                            let resp = hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .expect("response");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        OtlpCollector { port, seen }
    }

    /// Every span received so far with its resource attributes.
    fn spans(&self) -> Vec<(Vec<otlp::KeyValue>, otlp::Span)> {
        let seen = self.seen.lock().expect("lock");
        let mut out = Vec::new();
        for (_, req) in seen.iter() {
            for rs in &req.resource_spans {
                let res = rs
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((res.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }

    /// Waits (10 s at most) for `n` spans.
    async fn wait_spans(&self, n: usize) -> Vec<(Vec<otlp::KeyValue>, otlp::Span)> {
        for _ in 0..200 {
            if self.spans().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.spans()
    }
}

fn attr(attrs: &[otlp::KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.text())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A proxy routing `/` to echo cluster `up`, with HCM `tracing` (plus
/// `tracing_extra`) whose provider is OpenTelemetry to cluster `otel`.
fn otel_bootstrap(
    ports: &weir_tests::scenario::Ports,
    up: u16,
    collector: u16,
    otel: Value,
    tracing_extra: Value,
    route_extra: Value,
) -> String {
    let tracing = merge(
        json!({"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": merge(json!({"@type": OTEL}), otel)}}),
        tracing_extra,
    );
    let h = hcm(
        "ingress",
        vec![],
        vec![vhost("vh", vec![route("/", "up", route_extra)], json!({}))],
        json!({"tracing": tracing}),
    );
    bootstrap_with(
        ports,
        vec![listener("l", ports.listen, vec![chain(vec![h])])],
        vec![
            cluster("up", &[up], json!({})),
            cluster("otel", &[collector], h2_upstream(json!({}))),
        ],
        json!({"node": {"id": "node-1", "cluster": "c1", "locality": {"zone": "zone-a"}}}),
    )
}

const OTEL_SVC: &str = "otel";

fn otel_provider() -> Value {
    json!({"grpc_service": {"envoy_grpc": {"cluster_name": OTEL_SVC}}, "service_name": "svc"})
}

/// An echo upstream, a collector and a proxy whose HCM traces to it.
async fn setup(
    tracing_extra: Value,
    route_extra: Value,
) -> (Proxy, upstream::EchoServer, OtlpCollector) {
    let up = upstream::http1("up").await.expect("upstream");
    let col = OtlpCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        otel_bootstrap(
            ports,
            upp,
            cp,
            otel_provider(),
            tracing_extra.clone(),
            route_extra.clone(),
        )
    });
    (p, up, col)
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";

/// The span whose trace id is `trace`.
fn span_of<'a>(
    spans: &'a [(Vec<otlp::KeyValue>, otlp::Span)],
    trace: &str,
) -> &'a (Vec<otlp::KeyValue>, otlp::Span) {
    spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == trace)
        .unwrap_or_else(|| panic!("no span of trace {trace}"))
}

/// A server span per request, named `ingress`, tagged as Envoy 1.40 in
/// its order; the first request's `traceparent` is continued (its trace
/// id, its span id as the parent, its `tracestate`, the remote-parent
/// flag) and every upstream request carries the span's own context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_spans_continue_w3c_context_and_carry_envoy_tags() {
    let (p, up, col) = setup(json!({}), json!({})).await;
    let http = Http::h1();
    let mut seen = Vec::new();
    for i in 0..5 {
        let tp = format!("00-{TRACE}-{PARENT}-01");
        let hs: Vec<(&str, &str)> = if i == 0 {
            vec![("traceparent", &tp), ("tracestate", "a=b")]
        } else {
            vec![]
        };
        let r = http.get(&format!("{}/p{i}?q=1", p.base()), &hs).await;
        assert_eq!(r.status, 200);
        seen.push((r.echo(), r.body.len()));
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5, "one span per request");
    assert_eq!(
        col.seen.lock().expect("lock")[0].0,
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    for (i, (echo, body_len)) in seen.iter().enumerate() {
        let tp = echo_header(echo, "traceparent").expect("traceparent upstream");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "{tp}");
        let (res, s) = span_of(&spans, parts[1]);
        assert_eq!(hex(&s.span_id), parts[2], "upstream parent is the span");
        assert_eq!(attr(res, "service.name").as_deref(), Some("svc"));
        assert_eq!(s.name, "ingress");
        assert_eq!(s.kind, otlp::span_kind::SERVER);
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
        if i == 0 {
            assert_eq!(parts[1], TRACE, "the incoming trace continues");
            assert_eq!(hex(&s.parent_span_id), PARENT);
            assert_eq!(s.trace_state, "a=b");
            assert_eq!(echo_header(echo, "tracestate"), Some("a=b"));
            // Envoy 1.40: HAS_IS_REMOTE | IS_REMOTE | sampled.
            assert_eq!(s.flags, 0x301);
        } else {
            assert_ne!(parts[1], TRACE);
            assert!(s.parent_span_id.is_empty());
            assert_eq!(s.trace_state, "");
            // Envoy injects an empty tracestate too.
            assert_eq!(echo_header(echo, "tracestate"), Some(""));
            assert_eq!(s.flags, 0x101);
        }
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "node_id",
                "zone",
                "guid:x-request-id",
                "http.url",
                "http.method",
                "downstream_cluster",
                "user_agent",
                "http.protocol",
                "peer.address",
                "request_size",
                "response_size",
                "component",
                "upstream_cluster",
                "upstream_cluster.name",
                "http.status_code",
                "response_flags",
            ]
        );
        let a = |k: &str| attr(&s.attributes, k);
        assert_eq!(a("node_id").as_deref(), Some("node-1"));
        assert_eq!(a("zone").as_deref(), Some("zone-a"));
        assert_eq!(
            a("guid:x-request-id").as_deref(),
            echo_header(echo, "x-request-id")
        );
        assert_eq!(
            a("http.url"),
            Some(format!("http://127.0.0.1:{}/p{i}?q=1", p.addr().port()))
        );
        assert_eq!(a("http.method").as_deref(), Some("GET"));
        assert_eq!(a("downstream_cluster").as_deref(), Some("-"));
        assert_eq!(a("user_agent").as_deref(), Some("-"));
        assert_eq!(a("http.protocol").as_deref(), Some("HTTP/1.1"));
        assert_eq!(a("peer.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(a("request_size").as_deref(), Some("0"));
        assert_eq!(a("response_size"), Some(body_len.to_string()));
        assert_eq!(a("component").as_deref(), Some("proxy"));
        assert_eq!(a("upstream_cluster").as_deref(), Some("up"));
        assert_eq!(a("upstream_cluster.name").as_deref(), Some("up"));
        assert_eq!(a("http.status_code").as_deref(), Some("200"));
        assert_eq!(a("response_flags").as_deref(), Some("-"));
    }
    assert_eq!(up.requests().len(), 5);
    weir_tests::config::stat_is(&p, "tracing.opentelemetry.spans_sent", 5).await;
}

/// An unsampled incoming context is continued (upstream sees its trace
/// with flags `00`) but its span is not exported; an invalid
/// `traceparent` makes no span and passes upstream untouched (Envoy's
/// null span injects nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_and_invalid_contexts_export_nothing() {
    let (p, up, col) = setup(json!({}), json!({})).await;
    let http = Http::h1();
    let unsampled = format!("00-{TRACE}-{PARENT}-00");
    let r = http
        .get(&format!("{}/u", p.base()), &[("traceparent", &unsampled)])
        .await;
    let tp = echo_header(&r.echo(), "traceparent")
        .expect("traceparent")
        .to_owned();
    assert!(tp.starts_with(&format!("00-{TRACE}-")), "{tp}");
    assert!(tp.ends_with("-00"), "{tp}");
    assert_ne!(tp, unsampled, "a new span id");
    let invalid = "00-xyz-b7ad6b7169203331-01";
    let r = http
        .get(&format!("{}/i", p.base()), &[("traceparent", invalid)])
        .await;
    assert_eq!(echo_header(&r.echo(), "traceparent"), Some(invalid));
    assert_eq!(echo_header(&r.echo(), "tracestate"), None);
    for i in 0..5 {
        http.get(&format!("{}/s{i}", p.base()), &[]).await;
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    for (_, s) in &spans {
        assert_ne!(hex(&s.trace_id), TRACE, "the unsampled span is not sent");
        let url = attr(&s.attributes, "http.url").unwrap_or_default();
        assert!(url.contains("/s"), "{url}");
    }
    assert_eq!(up.requests().len(), 7);
}

/// A request not traced by the decision (random_sampling 0) still gets a
/// context upstream, unsampled; nothing is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_traced_requests_propagate_unsampled() {
    let (p, _up, col) = setup(json!({"random_sampling": {"value": 0}}), json!({})).await;
    let http = Http::h1();
    for _ in 0..5 {
        let r = http.get(&format!("{}/", p.base()), &[]).await;
        let tp = echo_header(&r.echo(), "traceparent")
            .expect("traceparent")
            .to_owned();
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
        assert_eq!(tp.len(), 55);
    }
    weir_tests::config::stat_is(&p, "http.ingress.tracing.not_traceable", 5).await;
    assert!(col.spans().is_empty());
}

/// Failed and unrouted requests: `error` when the status is 5xx, the
/// response flags, no upstream cluster without a route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_flags_and_status_tags() {
    let dead = weir_tests::free_port();
    let up = upstream::http1("up").await.expect("upstream");
    let col = OtlpCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost(
                "vh",
                vec![
                    route("/dead", "dead", json!({})),
                    route("/ok", "up", json!({})),
                ],
                json!({}),
            )],
            json!({"tracing": {"provider": {"name": "envoy.tracers.opentelemetry",
                "typed_config": merge(json!({"@type": OTEL}), otel_provider())}}}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("up", &[upp], json!({})),
                cluster("dead", &[dead], json!({})),
                cluster(OTEL_SVC, &[cp], h2_upstream(json!({}))),
            ],
            json!({"node": {"id": "n", "locality": {"zone": "z"}}}),
        )
    });
    let http = Http::h1();
    let mut want = Vec::new();
    for path in ["/dead", "/none", "/ok", "/dead", "/none"] {
        let r = http
            .get(&format!("{}{path}", p.base()), &[("user-agent", "ua/1")])
            .await;
        want.push((path, r.status));
    }
    assert_eq!(want[0].1, 503);
    assert_eq!(want[1].1, 404);
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    for (_, s) in &spans {
        let a = |k: &str| attr(&s.attributes, k);
        let url = a("http.url").unwrap_or_default();
        assert_eq!(a("user_agent").as_deref(), Some("ua/1"));
        if url.ends_with("/dead") {
            assert_eq!(a("http.status_code").as_deref(), Some("503"));
            assert_eq!(a("response_flags").as_deref(), Some("UF"));
            assert_eq!(a("error").as_deref(), Some("true"));
            assert_eq!(a("upstream_cluster").as_deref(), Some("dead"));
        } else if url.ends_with("/none") {
            assert_eq!(a("http.status_code").as_deref(), Some("404"));
            assert_eq!(a("response_flags").as_deref(), Some("NR"));
            assert_eq!(a("error"), None);
            assert_eq!(a("upstream_cluster"), None);
        } else {
            assert_eq!(a("http.status_code").as_deref(), Some("200"));
            assert_eq!(a("error"), None);
        }
    }
}

/// `custom_tags` (literal, environment, request header) come last;
/// `max_path_tag_length` cuts the path in `http.url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_tags_and_max_path_tag_length() {
    let (p, _up, col) = setup(
        json!({
            "max_path_tag_length": 4,
            "custom_tags": [
                {"tag": "lit", "literal": {"value": "v1"}},
                {"tag": "env", "environment": {"name": "WEIR_TEST_SURELY_UNSET", "default_value": "dflt"}},
                {"tag": "hdr", "request_header": {"name": "x-tag", "default_value": "none"}},
            ],
        }),
        json!({}),
    )
    .await;
    let http = Http::h1();
    for i in 0..5 {
        let hs: Vec<(&str, &str)> = if i == 0 {
            vec![("x-tag", "t0")]
        } else {
            vec![]
        };
        http.get(&format!("{}/abcdef{i}", p.base()), &hs).await;
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    let mut hdr = Vec::new();
    for (_, s) in &spans {
        let a = |k: &str| attr(&s.attributes, k);
        assert_eq!(
            a("http.url"),
            Some(format!("http://127.0.0.1:{}/abc", p.addr().port()))
        );
        assert_eq!(a("lit").as_deref(), Some("v1"));
        assert_eq!(a("env").as_deref(), Some("dflt"));
        hdr.push(a("hdr").unwrap_or_default());
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        // Last, in no fixed order (Envoy keeps them in a hash map).
        let mut last = keys[keys.len() - 3..].to_vec();
        last.sort();
        assert_eq!(last, ["env", "hdr", "lit"]);
    }
    hdr.sort();
    assert_eq!(hdr, ["none", "none", "none", "none", "t0"]);
}

/// Route `decorator`: its operation names the span and, propagated,
/// answers in `x-envoy-decorator-operation`; a request's
/// `x-envoy-decorator-operation` overrides the name (ingress), is not
/// forwarded, and then nothing is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_decorator_names_the_span() {
    let up = upstream::http1("up").await.expect("upstream");
    let col = OtlpCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost(
                "vh",
                vec![
                    route("/a", "up", json!({"decorator": {"operation": "op-a"}})),
                    route(
                        "/b",
                        "up",
                        json!({"decorator": {"operation": "op-b", "propagate": false}}),
                    ),
                ],
                json!({}),
            )],
            json!({"tracing": {"provider": {"name": "envoy.tracers.opentelemetry",
                "typed_config": merge(json!({"@type": OTEL}), otel_provider())}}}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("up", &[upp], json!({})),
                cluster(OTEL_SVC, &[cp], h2_upstream(json!({}))),
            ],
            json!({}),
        )
    });
    let http = Http::h1();
    let mut names = Vec::new();
    for (path, over) in [
        ("/a", None),
        ("/a", Some("over")),
        ("/b", None),
        ("/a", None),
        ("/b", None),
    ] {
        let hs: Vec<(&str, &str)> = over
            .map(|o| vec![("x-envoy-decorator-operation", o)])
            .unwrap_or_default();
        let r = http.get(&format!("{}{path}", p.base()), &hs).await;
        assert_eq!(r.status, 200);
        assert_eq!(echo_header(&r.echo(), "x-envoy-decorator-operation"), None);
        let want = match (path, over) {
            ("/a", None) => Some("op-a"),
            _ => None,
        };
        assert_eq!(
            r.header("x-envoy-decorator-operation"),
            want,
            "{path} {over:?}"
        );
        names.push(over.unwrap_or(if path == "/a" { "op-a" } else { "op-b" }));
    }
    let spans = col.wait_spans(5).await;
    let mut got: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    got.sort();
    names.sort();
    assert_eq!(got, names);
}

/// With HCM `tracing` but no provider (Envoy's null tracer), the route
/// decorator still answers in `x-envoy-decorator-operation`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decorator_without_provider_still_answers() {
    let up = upstream::http1("up").await.expect("upstream");
    let upp = up.port();
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost(
                "vh",
                vec![route(
                    "/",
                    "up",
                    json!({"decorator": {"operation": "op-a"}}),
                )],
                json!({}),
            )],
            json!({"tracing": {}}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("up", &[upp], json!({}))],
            json!({}),
        )
    });
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-envoy-decorator-operation"), Some("op-a"));
    assert_eq!(echo_header(&r.echo(), "traceparent"), None);
}

const ZIPKIN: &str = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig";

/// An HTTP Zipkin collector recording every report: path, headers, body.
struct ZipkinCollector {
    port: u16,
    seen: Arc<Mutex<Vec<(String, http::HeaderMap, Value)>>>,
}

impl ZipkinCollector {
    async fn start() -> ZipkinCollector {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<(String, http::HeaderMap, Value)>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            if let Ok(b) = body {
                                let v = serde_json::from_slice(&b).unwrap_or(Value::Null);
                                seen.lock().expect("lock").push((path, headers, v));
                            }
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(202)
                                    .body(http_body_util::Empty::<Bytes>::new())
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        ZipkinCollector { port, seen }
    }

    fn spans(&self) -> Vec<Value> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|(_, _, v)| v.as_array().cloned().unwrap_or_default())
            .collect()
    }

    async fn wait_spans(&self, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            if self.spans().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.spans()
    }
}

/// The Zipkin tracer: B3 continued (multi headers and the single `b3`
/// header, each passed on in its own style), the server span sharing the
/// caller's span id (`shared_span_context` default), named after the
/// host; new traces get a 64-bit trace id equal to the root span's id;
/// W3C `traceparent` is not read. Spans go as JSON v2 to the collector
/// endpoint with Envoy's tags, `localEndpoint` and `ss` annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipkin_spans_continue_b3_and_report_json_v2() {
    let up = upstream::http1("up").await.expect("upstream");
    let col = ZipkinCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![route("/", "up", json!({}))], json!({}))],
            json!({"tracing": {"provider": {"name": "envoy.tracers.zipkin",
                "typed_config": {"@type": ZIPKIN, "collector_cluster": "zipkin",
                    "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON"}}}}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("up", &[upp], json!({})),
                cluster("zipkin", &[cp], json!({})),
            ],
            json!({"node": {"id": "node-1", "cluster": "c1", "locality": {"zone": "zone-a"}}}),
        )
    });
    let http = Http::h1();
    let single = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90";
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ],
        vec![("b3", single)],
        vec![
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ],
        vec![("traceparent", tp)],
        vec![],
    ];
    let mut echoes = Vec::new();
    for (i, hs) in cases.iter().enumerate() {
        let r = http.get(&format!("{}/z{i}", p.base()), hs).await;
        assert_eq!(r.status, 200);
        echoes.push(r.echo());
    }
    let h = |i: usize, n: &str| echo_header(&echoes[i], n).map(str::to_owned);
    assert_eq!(
        h(0, "x-b3-traceid").as_deref(),
        Some("463ac35c9f6413ad48485a3953bb6124")
    );
    assert_eq!(h(0, "x-b3-spanid").as_deref(), Some("a2fb4a1d1a96d312"));
    assert_eq!(
        h(0, "x-b3-parentspanid").as_deref(),
        Some("0020000000000001")
    );
    assert_eq!(h(0, "x-b3-sampled").as_deref(), Some("1"));
    assert_eq!(h(0, "b3"), None);
    assert_eq!(h(1, "b3").as_deref(), Some(single));
    assert_eq!(h(1, "x-b3-traceid"), None);
    assert_eq!(h(2, "x-b3-traceid").as_deref(), Some("463ac35c9f6413ad"));
    assert_eq!(h(2, "x-b3-sampled").as_deref(), Some("1"));
    assert_eq!(h(2, "x-b3-parentspanid"), None);
    assert_eq!(h(3, "traceparent").as_deref(), Some(tp));
    assert_eq!(h(3, "tracestate"), None);
    for i in [3, 4] {
        let t = h(i, "x-b3-traceid").expect("a new trace");
        assert_eq!(t.len(), 16);
        assert_eq!(
            h(i, "x-b3-spanid"),
            Some(t),
            "a root's trace id is its span id"
        );
        assert_eq!(h(i, "x-b3-sampled").as_deref(), Some("1"));
        assert_eq!(h(i, "x-b3-parentspanid"), None);
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    {
        let seen = col.seen.lock().expect("lock");
        assert_eq!(seen.len(), 1, "one report of 5 spans");
        let (path, headers, _) = &seen[0];
        assert_eq!(path, "/api/v2/spans");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["host"], "zipkin");
    }
    let by_id = |id: &str| -> Value {
        spans
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no span {id}: {spans:?}"))
    };
    let host = format!("127.0.0.1:{}", p.addr().port());
    let s0 = by_id("a2fb4a1d1a96d312");
    assert_eq!(s0["traceId"], "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(s0["parentId"], "0020000000000001");
    let s1 = by_id("e457b5a2e4d86bd1");
    assert_eq!(s1["traceId"], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(s1["parentId"], "05e3ac9a4f6e3b90");
    for i in [3, 4] {
        let id = h(i, "x-b3-spanid").expect("span id");
        let s = by_id(&id);
        assert_eq!(s["traceId"], id.as_str());
        assert!(s.get("parentId").is_none());
    }
    for (i, s) in spans.iter().enumerate() {
        assert_eq!(s["kind"], "SERVER", "{s}");
        assert_eq!(s["name"], host.as_str());
        assert_eq!(s["shared"], true);
        assert_eq!(s["localEndpoint"]["serviceName"], "c1");
        assert_eq!(s["localEndpoint"]["port"], 0);
        let ip = s["localEndpoint"]["ipv4"].as_str().unwrap_or_default();
        assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{s}");
        assert!(s["timestamp"].as_u64().is_some() && s["duration"].as_u64().is_some());
        assert_eq!(s["annotations"][0]["value"], "ss");
        let tags = s["tags"].as_object().expect("tags");
        let mut keys: Vec<&str> = tags.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "component",
                "downstream_cluster",
                "guid:x-request-id",
                "http.method",
                "http.protocol",
                "http.status_code",
                "http.url",
                "node_id",
                "peer.address",
                "request_size",
                "response_flags",
                "response_size",
                "upstream_cluster",
                "upstream_cluster.name",
                "user_agent",
                "zone",
            ],
            "span {i}"
        );
        assert_eq!(tags["node_id"], "node-1");
        assert_eq!(tags["zone"], "zone-a");
        assert_eq!(tags["http.status_code"], "200");
        assert_eq!(tags["upstream_cluster"], "up");
        assert_eq!(tags["component"], "proxy");
        let url = tags["http.url"].as_str().unwrap_or_default();
        assert!(url.starts_with(&format!("http://{host}/z")), "{url}");
    }
    weir_tests::config::stat_is(&p, "tracing.zipkin.spans_sent", 5).await;
    weir_tests::config::stat_is(&p, "tracing.zipkin.reports_sent", 1).await;
}

/// The bootstrap's `tracing.http` (Istio's Zipkin block) is the provider
/// of an HCM whose `tracing` names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tracing_http_is_the_default_provider() {
    let up = upstream::http1("up").await.expect("upstream");
    let col = ZipkinCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![route("/", "up", json!({}))], json!({}))],
            json!({"tracing": {"random_sampling": {"value": 100}}}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("up", &[upp], json!({})),
                cluster("zipkin", &[cp], json!({})),
            ],
            json!({
                "node": {"id": "sidecar~10.0.0.1~app.ns~ns.svc.cluster.local", "cluster": "app.ns"},
                "tracing": {"http": {"name": "envoy.tracers.zipkin", "typed_config": {
                    "@type": ZIPKIN, "collector_cluster": "zipkin",
                    "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON",
                    "trace_id_128bit": true, "shared_span_context": false,
                }}},
            }),
        )
    });
    let http = Http::h1();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = http.get(&format!("{}/b{i}", p.base()), &[]).await;
        let e = r.echo();
        let t = echo_header(&e, "x-b3-traceid")
            .expect("x-b3-traceid")
            .to_owned();
        assert_eq!(t.len(), 32, "trace_id_128bit");
        ids.push((
            t,
            echo_header(&e, "x-b3-spanid").expect("span id").to_owned(),
        ));
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    for (t, s) in &ids {
        let span = spans
            .iter()
            .find(|v| v["id"] == s.as_str())
            .unwrap_or_else(|| panic!("no span {s}"));
        assert_eq!(span["traceId"], t.as_str());
        assert_eq!(span["localEndpoint"]["serviceName"], "app.ns");
        assert!(span.get("shared").is_none(), "shared_span_context false");
        assert_eq!(
            span["tags"]["node_id"],
            "sidecar~10.0.0.1~app.ns~ns.svc.cluster.local"
        );
    }
}

/// A route's `tracing` samples instead of the HCM's (its unset samplings
/// are 100%) and its custom tags replace the HCM's of the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_tracing_overrides_sampling_and_tags() {
    let up = upstream::http1("up").await.expect("upstream");
    let col = OtlpCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost(
                "vh",
                vec![
                    route(
                        "/on",
                        "up",
                        json!({"tracing": {"custom_tags": [{"tag": "a", "literal": {"value": "route"}}]}}),
                    ),
                    route("/off", "up", json!({})),
                ],
                json!({}),
            )],
            json!({"tracing": {
                "random_sampling": {"value": 0},
                "custom_tags": [
                    {"tag": "a", "literal": {"value": "hcm"}},
                    {"tag": "b", "literal": {"value": "hcm-b"}},
                ],
                "provider": {"name": "envoy.tracers.opentelemetry",
                    "typed_config": merge(json!({"@type": OTEL}), otel_provider())}}}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("up", &[upp], json!({})),
                cluster(OTEL_SVC, &[cp], h2_upstream(json!({}))),
            ],
            json!({}),
        )
    });
    let http = Http::h1();
    for _ in 0..2 {
        let r = http.get(&format!("{}/off", p.base()), &[]).await;
        let tp = echo_header(&r.echo(), "traceparent")
            .expect("traceparent")
            .to_owned();
        assert!(tp.ends_with("-00"), "{tp}");
    }
    for _ in 0..5 {
        let r = http.get(&format!("{}/on", p.base()), &[]).await;
        let tp = echo_header(&r.echo(), "traceparent")
            .expect("traceparent")
            .to_owned();
        assert!(tp.ends_with("-01"), "{tp}");
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    for (_, s) in &spans {
        assert_eq!(attr(&s.attributes, "a").as_deref(), Some("route"));
        assert_eq!(attr(&s.attributes, "b").as_deref(), Some("hcm-b"));
    }
    weir_tests::config::stat_is(&p, "http.ingress.tracing.random_sampling", 5).await;
    weir_tests::config::stat_is(&p, "http.ingress.tracing.not_traceable", 2).await;
}

/// A gRPC request's span gets Envoy's `grpc.*` tags: the request's path,
/// authority, content type and timeout, the answer's `grpc-status` and
/// `grpc-message`, and `error` for a server-side failure status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_get_grpc_tags() {
    let (p, _up, col) = setup(json!({}), json!({})).await;
    let http = Http::h1();
    for i in 0..5 {
        let status = if i == 0 { "14" } else { "5" };
        let r = http
            .send(
                "POST",
                &format!("{}/pkg.Svc/M{i}", p.base()),
                &[
                    ("content-type", "application/grpc"),
                    ("grpc-timeout", "5S"),
                    ("x-echo-header-grpc-status", status),
                    ("x-echo-header-grpc-message", "down"),
                ],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    for (_, s) in &spans {
        let a = |k: &str| attr(&s.attributes, k);
        let path = a("grpc.path").unwrap_or_default();
        assert!(path.starts_with("/pkg.Svc/M"), "{path}");
        assert_eq!(
            a("grpc.authority"),
            Some(format!("127.0.0.1:{}", p.addr().port()))
        );
        assert_eq!(a("grpc.content_type").as_deref(), Some("application/grpc"));
        assert_eq!(a("grpc.timeout").as_deref(), Some("5S"));
        assert_eq!(a("grpc.message").as_deref(), Some("down"));
        if path.ends_with("M0") {
            assert_eq!(a("grpc.status_code").as_deref(), Some("14"));
            assert_eq!(a("error").as_deref(), Some("true"));
        } else {
            assert_eq!(a("grpc.status_code").as_deref(), Some("5"));
            assert_eq!(a("error"), None, "NOT_FOUND is the client's");
        }
    }
}

/// On an OUTBOUND listener the span is Envoy's `egress <host>` of kind
/// CLIENT, and a propagated route decorator goes upstream in
/// `x-envoy-decorator-operation` (and names the span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_listeners_make_egress_client_spans() {
    let up = upstream::http1("up").await.expect("upstream");
    let col = OtlpCollector::start().await;
    let (upp, cp) = (up.port(), col.port);
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "egress",
            vec![],
            vec![vhost(
                "vh",
                vec![
                    route("/dec", "up", json!({"decorator": {"operation": "op-e"}})),
                    route("/", "up", json!({})),
                ],
                json!({}),
            )],
            json!({"tracing": {"provider": {"name": "envoy.tracers.opentelemetry",
                "typed_config": merge(json!({"@type": OTEL}), otel_provider())}}}),
        );
        let mut l = listener("l", ports.listen, vec![chain(vec![h])]);
        l["traffic_direction"] = json!("OUTBOUND");
        bootstrap_with(
            ports,
            vec![l],
            vec![
                cluster("up", &[upp], json!({})),
                cluster(OTEL_SVC, &[cp], h2_upstream(json!({}))),
            ],
            json!({}),
        )
    });
    let http = Http::h1();
    for i in 0..5 {
        let path = if i == 0 { "/dec" } else { "/plain" };
        let r = http
            .get(
                &format!("{}{path}", p.base()),
                &[("host", "svc.example:8080")],
            )
            .await;
        assert_eq!(r.status, 200);
        let want = (i == 0).then_some("op-e");
        assert_eq!(echo_header(&r.echo(), "x-envoy-decorator-operation"), want);
        assert_eq!(r.header("x-envoy-decorator-operation"), None);
    }
    let spans = col.wait_spans(5).await;
    assert_eq!(spans.len(), 5);
    let mut names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "egress svc.example:8080",
            "egress svc.example:8080",
            "egress svc.example:8080",
            "egress svc.example:8080",
            "op-e"
        ]
    );
    for (_, s) in &spans {
        assert_eq!(s.kind, otlp::span_kind::CLIENT);
    }
}
