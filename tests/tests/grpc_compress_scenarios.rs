//! `envoy.filters.http.grpc_stats` and `envoy.filters.http.compressor`
//! scenarios: a real gRPC upstream (HTTP/2, gRPC framing, unary and
//! streaming, statuses in trailers or trailers-only), a real HTTP/1 upstream
//! serving text, real clients that decompress what they get. Every test
//! runs against weir in-process by default and against real Envoy with
//! `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`).
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use weir_tests::config::{yaml_bootstrap, HttpYaml};
use weir_tests::scenario::{Http, Ports, Proxy};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One gRPC message: flag 0, big-endian length, payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn grpc_body(chunks: Vec<Vec<u8>>, status: Option<&str>) -> BoxBody {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .into_iter()
        .map(|c| Ok(Frame::data(Bytes::from(c))))
        .collect();
    if let Some(s) = status {
        let mut t = http::HeaderMap::new();
        t.insert(
            "grpc-status",
            http::HeaderValue::from_str(s).expect("status"),
        );
        frames.push(Ok(Frame::trailers(t)));
    }
    BodyExt::boxed(StreamBody::new(stream::iter(frames)))
}

/// A gRPC server over h2c: `/<svc>/Unary` (and the client-streaming
/// `Collect`) answers one message, `Stream` three (split across chunks, one
/// header split too), `Fail` a trailers-only `grpc-status: 13`, anything
/// else (`FailLate`) one message then `grpc-status: 5` in trailers.
async fn grpc_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    // Read the whole request (its messages are counted by the proxy).
                    let _ = req.into_body().collect().await;
                    let ok = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc");
                    let method = path.rsplit('/').next().unwrap_or_default().to_owned();
                    let r = match method.as_str() {
                        "Unary" | "Collect" => ok.body(grpc_body(vec![frame(b"hello")], Some("0"))),
                        "Stream" => {
                            let mut all = frame(b"one");
                            all.extend(frame(b"two"));
                            all.extend(frame(&[7u8; 100]));
                            // Chunks cut through a message and a header.
                            let (a, rest) = all.split_at(6);
                            let (b, c) = rest.split_at(5);
                            ok.body(grpc_body(
                                vec![a.to_vec(), b.to_vec(), c.to_vec()],
                                Some("0"),
                            ))
                        }
                        "Fail" => ok
                            .header("grpc-status", "13")
                            .body(BodyExt::boxed(Full::new(Bytes::new()))),
                        _ => ok.body(grpc_body(vec![frame(b"partial")], Some("5"))),
                    };
                    Ok::<_, Infallible>(r.expect("response"))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/1 server (echoing the request's accept-encoding in `x-ae`):
/// `/text` 2200 bytes of text/plain with content-length,
/// `/chunked` the same streamed in chunks without a length, `/small` ten
/// bytes, `/etag` with a strong etag, `/png` image/png, `/json`
/// application/json.
async fn text_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let body = text();
                    // What the upstream got as accept-encoding.
                    let seen = req
                        .headers()
                        .get("accept-encoding")
                        .cloned()
                        .unwrap_or(http::HeaderValue::from_static("-"));
                    let b = http::Response::builder().status(200).header("x-ae", seen);
                    let r = match req.uri().path() {
                        "/chunked" => {
                            let chunks: Vec<Vec<u8>> =
                                body.chunks(700).map(<[u8]>::to_vec).collect();
                            b.header("content-type", "text/plain; charset=utf-8")
                                .body(grpc_body(chunks, None))
                        }
                        "/small" => b
                            .header("content-type", "text/plain")
                            .body(BodyExt::boxed(Full::new(Bytes::from_static(b"0123456789")))),
                        p => {
                            let (ct, etag) = match p {
                                "/png" => ("image/png", None),
                                "/json" => ("application/json", None),
                                "/etag" => ("text/plain", Some("\"v1\"")),
                                _ => ("text/plain", None),
                            };
                            let mut b = b.header("content-type", ct);
                            if let Some(e) = etag {
                                b = b.header("etag", e);
                            }
                            b.body(BodyExt::boxed(Full::new(Bytes::from(body))))
                        }
                    };
                    Ok::<_, Infallible>(r.expect("response"))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn text() -> Vec<u8> {
    (0..100)
        .map(|i| format!("line {i:03} of some text\n"))
        .collect::<String>()
        .into_bytes()
}

fn cluster(name: &str, addr: SocketAddr, h2: bool) -> String {
    let proto = if h2 {
        ", typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {\"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {http2_protocol_options: {}}}}"
    } else {
        ""
    };
    format!(
        "  - {{name: {name}, type: STATIC, connect_timeout: 1s{proto}, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}}}\n",
        port = addr.port()
    )
}

/// A bootstrap with `filters` (HTTP filter list items at indent 10, before
/// the router), `routes` (indent 14) and `clusters` (indent 2).
fn bootstrap(p: &Ports, filters: &str, routes: &str, clusters: &str) -> String {
    bootstrap_hcm(p, "", filters, routes, clusters)
}

/// [`bootstrap`] with more HCM fields (`hcm`: lines at indent 10).
fn bootstrap_hcm(p: &Ports, hcm: &str, filters: &str, routes: &str, clusters: &str) -> String {
    HttpYaml {
        hcm,
        filters,
        routes,
        clusters,
        ..HttpYaml::default()
    }
    .render(p)
}

// --- gRPC stats

const GRPC_STATS: &str =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";

fn grpc_proxy(up: SocketAddr, config: &str) -> Proxy {
    let filters = format!(
        "          - name: envoy.filters.http.grpc_stats\n            typed_config: {{\"@type\": {GRPC_STATS}{config}}}\n"
    );
    let routes = "              - {match: {prefix: \"/\"}, route: {cluster: grpc}}\n";
    let clusters = cluster("grpc", up, true);
    Proxy::start(move |p| bootstrap(p, &filters, routes, &clusters))
}

struct GrpcResp {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// A gRPC call over h2c with `messages` in the request.
async fn call(p: &Proxy, path: &str, messages: &[&[u8]]) -> GrpcResp {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let body: Vec<u8> = messages.iter().flat_map(|m| frame(m)).collect();
    let req = http::Request::post(format!("{}{path}", p.base()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let c = resp.into_body().collect().await.expect("body");
    let trailers = c.trailers().cloned();
    GrpcResp {
        status,
        headers,
        body: c.to_bytes(),
        trailers,
    }
}

fn grpc_status(r: &GrpcResp) -> Option<&str> {
    r.trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| r.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stats_per_method() {
    let up = grpc_upstream().await;
    let p = grpc_proxy(up, ", stats_for_all_methods: true");
    let r = call(&p, "/pkg.Svc/Unary", &[b"a", b"bb"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(grpc_status(&r), Some("0"));
    assert_eq!(&r.body[..], &frame(b"hello")[..]);
    let r = call(&p, "/pkg.Svc/Stream", &[b"x"]).await;
    assert_eq!(grpc_status(&r), Some("0"));
    assert_eq!(r.body.len(), 3 * 5 + 3 + 3 + 100);
    let r = call(&p, "/pkg.Svc/Fail", &[]).await;
    assert_eq!(grpc_status(&r), Some("13"));
    assert!(r.trailers.is_none(), "trailers-only response");
    let r = call(&p, "/pkg.Svc/FailLate", &[b"q"]).await;
    assert_eq!(grpc_status(&r), Some("5"));
    let s = "cluster.grpc.grpc.pkg.Svc.";
    assert_eq!(p.stat(&format!("{s}Unary.success")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}Unary.total")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}Unary.0")).await, Some(1));
    assert_eq!(
        p.stat(&format!("{s}Unary.request_message_count")).await,
        Some(2)
    );
    assert_eq!(
        p.stat(&format!("{s}Unary.response_message_count")).await,
        Some(1)
    );
    assert_eq!(
        p.stat(&format!("{s}Stream.response_message_count")).await,
        Some(3)
    );
    assert_eq!(
        p.stat(&format!("{s}Stream.request_message_count")).await,
        Some(1)
    );
    assert_eq!(p.stat(&format!("{s}Stream.success")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}Fail.failure")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}Fail.13")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}Fail.total")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}FailLate.failure")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}FailLate.5")).await, Some(1));
    assert_eq!(
        p.stat(&format!("{s}FailLate.response_message_count")).await,
        Some(1)
    );
    // No bucket stats, and no upstream time without enable_upstream_stats.
    assert_eq!(p.stat("cluster.grpc.grpc.total").await, None);
    let all = p
        .admin("GET", "/stats?filter=upstream_rq_time")
        .await
        .text();
    assert!(
        !all.contains("grpc.pkg.Svc.Unary.upstream_rq_time"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stats_default_bucket_and_allowlist() {
    let up = grpc_upstream().await;
    // Default: every method in the cluster's bucket.
    let p = grpc_proxy(up, "");
    call(&p, "/pkg.Svc/Unary", &[b"a"]).await;
    call(&p, "/pkg.Svc/Fail", &[]).await;
    assert_eq!(p.stat("cluster.grpc.grpc.success").await, Some(1));
    assert_eq!(p.stat("cluster.grpc.grpc.failure").await, Some(1));
    assert_eq!(p.stat("cluster.grpc.grpc.total").await, Some(2));
    assert_eq!(
        p.stat("cluster.grpc.grpc.request_message_count").await,
        Some(1)
    );
    assert_eq!(
        p.stat("cluster.grpc.grpc.pkg.Svc.Unary.success").await,
        None
    );
    // Non-gRPC requests are not counted.
    let r = Http::h2c()
        .send(
            "POST",
            &format!("{}/pkg.Svc/Unary", p.base()),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(p.stat("cluster.grpc.grpc.total").await, Some(2));
    drop(p);

    let p = grpc_proxy(
        up,
        ", individual_method_stats_allowlist: {services: [{name: pkg.Svc, method_names: [Unary]}]}, enable_upstream_stats: true",
    );
    call(&p, "/pkg.Svc/Unary", &[b"a"]).await;
    call(&p, "/pkg.Svc/Stream", &[b"a"]).await;
    assert_eq!(
        p.stat("cluster.grpc.grpc.pkg.Svc.Unary.success").await,
        Some(1)
    );
    assert_eq!(p.stat("cluster.grpc.grpc.success").await, Some(1));
    assert_eq!(
        p.stat("cluster.grpc.grpc.response_message_count").await,
        Some(3)
    );
    assert_eq!(
        p.stat("cluster.grpc.grpc.pkg.Svc.Stream.success").await,
        None
    );
    let all = p
        .admin("GET", "/stats?filter=upstream_rq_time")
        .await
        .text();
    assert!(
        all.contains("cluster.grpc.grpc.pkg.Svc.Unary.upstream_rq_time"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stats_replace_dots() {
    let up = grpc_upstream().await;
    let p = grpc_proxy(
        up,
        ", stats_for_all_methods: true, replace_dots_in_grpc_service_name: true",
    );
    call(&p, "/a.b.Svc/Unary", &[b"a"]).await;
    assert_eq!(
        p.stat("cluster.grpc.grpc.a_b_Svc.Unary.success").await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stats_count_local_replies() {
    // A cluster without endpoints: the proxy answers the gRPC request
    // itself (no healthy upstream, grpc-status 14).
    let filters = format!(
        "          - name: envoy.filters.http.grpc_stats\n            typed_config: {{\"@type\": {GRPC_STATS}, stats_for_all_methods: true}}\n"
    );
    let routes = "              - {match: {prefix: \"/\"}, route: {cluster: dead}}\n";
    let clusters = "  - {name: dead, type: STATIC, connect_timeout: 1s, load_assignment: {cluster_name: dead, endpoints: []}}\n";
    let p = Proxy::start(move |p| bootstrap(p, &filters, routes, clusters));
    let r = call(&p, "/pkg.Svc/Unary", &[b"a"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(grpc_status(&r), Some("14"));
    assert_eq!(
        r.headers.get("grpc-message").and_then(|v| v.to_str().ok()),
        Some("no healthy upstream")
    );
    assert_eq!(p.stat("cluster.dead.grpc.pkg.Svc.Unary.14").await, Some(1));
    assert_eq!(
        p.stat("cluster.dead.grpc.pkg.Svc.Unary.failure").await,
        Some(1)
    );
    assert_eq!(
        p.stat("cluster.dead.grpc.pkg.Svc.Unary.total").await,
        Some(1)
    );
}

/// `emit_filter_state`: the `envoy.filters.http.grpc_stats` object (message
/// counts so far) as access logs render it, plain (`<request>,<response>`)
/// and typed (the `FilterObject` proto as JSON); no object before a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stats_emit_filter_state() {
    let up = grpc_upstream().await;
    let log = weir_tests::config::log_path("grpc_compress", "grpc_state");
    let hcm = format!(
        "          access_log:\n          - name: envoy.access_loggers.file\n            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {path}, log_format: {{text_format_source: {{inline_string: \"%REQ(:PATH)% %FILTER_STATE(envoy.filters.http.grpc_stats:PLAIN)% %FILTER_STATE(envoy.filters.http.grpc_stats:TYPED)% %FILTER_STATE(envoy.filters.http.grpc_stats)%\\n\"}}}}}}\n",
        path = log.display()
    );
    let filters = format!(
        "          - name: envoy.filters.http.grpc_stats\n            typed_config: {{\"@type\": {GRPC_STATS}, emit_filter_state: true}}\n"
    );
    let routes = "              - {match: {prefix: \"/\"}, route: {cluster: grpc}}\n";
    let clusters = cluster("grpc", up, true);
    let p = Proxy::start(move |p| bootstrap_hcm(p, &hcm, &filters, routes, &clusters));

    // Unary: one message each way.
    let r = call(&p, "/pkg.Svc/Unary", &[b"a"]).await;
    assert_eq!(grpc_status(&r), Some("0"));
    // Client streaming: three messages in separate DATA frames, one back.
    let r = call_streaming(&p, "/pkg.Svc/Collect", &[b"x", b"yy", &[9u8; 300]]).await;
    assert_eq!(grpc_status(&r), Some("0"));
    assert_eq!(&r.body[..], &frame(b"hello")[..]);
    // Server streaming: three responses.
    call(&p, "/pkg.Svc/Stream", &[b"x"]).await;
    // No request message, one response message: the zero is left out of
    // the typed form.
    let r = call(&p, "/pkg.Svc/FailLate", &[]).await;
    assert_eq!(grpc_status(&r), Some("5"));
    // No message at all (trailers-only): no object.
    let r = call(&p, "/pkg.Svc/Fail", &[]).await;
    assert_eq!(grpc_status(&r), Some("13"));
    // Not a `/service/method` path: no stats, but the object counts.
    let r = call(&p, "/only-one", &[b"a", b"b"]).await;
    assert_eq!(grpc_status(&r), Some("5"));

    let lines = p.log_lines(&log, 6).await;
    let line = |path: &str| {
        lines
            .iter()
            .find(|l| l.split(' ').next() == Some(path))
            .unwrap_or_else(|| panic!("no log line for {path}: {lines:?}"))
            .clone()
    };
    assert_eq!(
        line("/pkg.Svc/Unary"),
        r#"/pkg.Svc/Unary 1,1 {"requestMessageCount":"1","responseMessageCount":"1"} {"requestMessageCount":"1","responseMessageCount":"1"}"#
    );
    assert_eq!(
        line("/pkg.Svc/Collect"),
        r#"/pkg.Svc/Collect 3,1 {"requestMessageCount":"3","responseMessageCount":"1"} {"requestMessageCount":"3","responseMessageCount":"1"}"#
    );
    assert_eq!(
        line("/pkg.Svc/Stream"),
        r#"/pkg.Svc/Stream 1,3 {"requestMessageCount":"1","responseMessageCount":"3"} {"requestMessageCount":"1","responseMessageCount":"3"}"#
    );
    assert_eq!(
        line("/pkg.Svc/FailLate"),
        r#"/pkg.Svc/FailLate 0,1 {"responseMessageCount":"1"} {"responseMessageCount":"1"}"#
    );
    assert_eq!(line("/pkg.Svc/Fail"), "/pkg.Svc/Fail - - -");
    assert_eq!(
        line("/only-one"),
        r#"/only-one 2,1 {"requestMessageCount":"2","responseMessageCount":"1"} {"requestMessageCount":"2","responseMessageCount":"1"}"#
    );
    // The filter state does not change the stats.
    assert_eq!(p.stat("cluster.grpc.grpc.total").await, Some(5));
    assert_eq!(
        p.stat("cluster.grpc.grpc.request_message_count").await,
        Some(5)
    );
}

/// A client-streaming gRPC call over h2c: each message its own DATA frame.
async fn call_streaming(p: &Proxy, path: &str, messages: &[&[u8]]) -> GrpcResp {
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let frames: Vec<Vec<u8>> = messages.iter().map(|m| frame(m)).collect();
    let req = http::Request::post(format!("{}{path}", p.base()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(grpc_body(frames, None))
        .expect("request");
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let c = resp.into_body().collect().await.expect("body");
    let trailers = c.trailers().cloned();
    GrpcResp {
        status,
        headers,
        body: c.to_bytes(),
        trailers,
    }
}

// --- compressor

const COMPRESSOR: &str =
    "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor";

fn compressor(name: &str, lib: &str, lib_type: &str, extra: &str) -> String {
    format!(
        "          - name: {name}\n            typed_config: {{\"@type\": {COMPRESSOR}, compressor_library: {{name: {lib}, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.compression.{lib_type}}}}}{extra}}}\n"
    )
}

fn gzip_filter(extra: &str) -> String {
    compressor("gz", "lib_gz", "gzip.compressor.v3.Gzip", extra)
}

fn text_proxy(up: SocketAddr, filters: String, routes: &str) -> Proxy {
    let routes = routes.to_owned();
    let clusters = cluster("text", up, false);
    Proxy::start(move |p| bootstrap(p, &filters, &routes, &clusters))
}

const ALL_TEXT: &str = "              - {match: {prefix: \"/\"}, route: {cluster: text}}\n";

fn decode(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("gzip");
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("brotli");
        }
        Some("zstd") => out = zstd::decode_all(body).expect("zstd"),
        Some(other) => panic!("unexpected encoding {other}"),
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_compresses_text() {
    let up = text_upstream().await;
    let p = text_proxy(up, gzip_filter(""), ALL_TEXT);
    for (client, path) in [
        (Http::h1(), "/text"),
        (Http::h1(), "/chunked"),
        (Http::h2c(), "/text"),
    ] {
        let r = client
            .get(
                &format!("{}{path}", p.base()),
                &[("accept-encoding", "gzip")],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some("gzip"), "{path}");
        assert_eq!(r.header("vary"), Some("Accept-Encoding"));
        assert_eq!(r.header("content-length"), None);
        assert_eq!(decode(Some("gzip"), &r.body), text(), "{path}");
    }
    let s = "http.ingress.compressor.lib_gz.gzip.";
    assert_eq!(p.stat(&format!("{s}compressed")).await, Some(3));
    assert_eq!(p.stat(&format!("{s}header_compressor_used")).await, Some(3));
    assert_eq!(
        p.stat(&format!("{s}total_uncompressed_bytes")).await,
        Some(3 * text().len() as i64)
    );
    assert_eq!(p.stat(&format!("{s}request.not_compressed")).await, Some(3));
    assert_eq!(p.stat(&format!("{s}request.compressed")).await, Some(0));
    assert!(p
        .stat(&format!("{s}total_compressed_bytes"))
        .await
        .is_some_and(|n| n > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_skipped() {
    let up = text_upstream().await;
    let p = text_proxy(
        up,
        gzip_filter(", response_direction_config: {common_config: {min_content_length: 100}}"),
        ALL_TEXT,
    );
    let base = p.base();
    let h = Http::h1();
    // No accept-encoding.
    let r = h.get(&format!("{base}/text"), &[]).await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
    assert_eq!(r.body, text());
    // Too small, not an allowed type, identity wanted, gzip refused.
    let r = h
        .get(&format!("{base}/small"), &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(
        (r.header("content-encoding"), r.header("vary")),
        (None, None)
    );
    let r = h
        .get(&format!("{base}/png"), &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("content-length"), Some(&*text().len().to_string()));
    let r = h
        .get(
            &format!("{base}/text"),
            &[("accept-encoding", "gzip;q=0.5, identity")],
        )
        .await;
    assert_eq!(r.header("content-encoding"), None);
    let r = h
        .get(
            &format!("{base}/text"),
            &[("accept-encoding", "gzip;q=0, br")],
        )
        .await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, text());
    // A strong etag is dropped when compressing.
    let r = h
        .get(&format!("{base}/etag"), &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("etag"), None);
    // HEAD: no body, not compressed.
    let r = h
        .send(
            "HEAD",
            &format!("{base}/text"),
            &[("accept-encoding", "gzip")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.header("content-encoding"), None);
    let s = "http.ingress.compressor.lib_gz.gzip.";
    assert_eq!(p.stat(&format!("{s}no_accept_header")).await, Some(1));
    assert_eq!(
        p.stat(&format!("{s}response.content_length_too_small"))
            .await,
        Some(1)
    );
    assert_eq!(p.stat(&format!("{s}header_identity")).await, Some(1));
    // The image/png response counts too: no compressor is allowed for its
    // type, so the encoding decision finds no valid choice.
    assert_eq!(p.stat(&format!("{s}header_not_valid")).await, Some(2));
    assert_eq!(p.stat(&format!("{s}response.compressed")).await, Some(1));
    assert_eq!(
        p.stat(&format!("{s}response.not_compressed")).await,
        Some(6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_between_libraries() {
    let up = text_upstream().await;
    let filters = format!(
        "{}{}{}",
        compressor("br", "lib_br", "brotli.compressor.v3.Brotli", ""),
        compressor("zs", "lib_zs", "zstd.compressor.v3.Zstd", ""),
        gzip_filter(""),
    );
    let p = text_proxy(up, filters, ALL_TEXT);
    for (accept, want) in [
        ("gzip, deflate, br, zstd", Some("gzip")),
        ("br;q=0.9, gzip;q=0.5", Some("br")),
        ("zstd", Some("zstd")),
        ("*", Some("br")),
        ("deflate", None),
    ] {
        for client in [Http::h1(), Http::h2c()] {
            let r = client
                .get(
                    &format!("{}/json", p.base()),
                    &[("accept-encoding", accept)],
                )
                .await;
            assert_eq!(r.header("content-encoding"), want, "{accept}");
            assert_eq!(decode(want, &r.body), text(), "{accept}");
        }
    }
    assert_eq!(
        p.stat("http.ingress.compressor.lib_gz.gzip.header_compressor_overshadowed")
            .await,
        Some(4)
    );
    assert_eq!(
        p.stat("http.ingress.compressor.lib_br.brotli.header_wildcard")
            .await,
        Some(2)
    );
    assert_eq!(
        p.stat("http.ingress.compressor.lib_zs.zstd.compressed")
            .await,
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_disable_and_accept_encoding_removal() {
    let up = text_upstream().await;
    let routes = "              - match: {prefix: \"/off\"}\n                route: {cluster: text, prefix_rewrite: /text}\n                typed_per_filter_config:\n                  gz: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.CompressorPerRoute, disabled: true}\n              - {match: {prefix: \"/\"}, route: {cluster: text}}\n";
    let p = text_proxy(
        up,
        gzip_filter(", response_direction_config: {remove_accept_encoding_header: true}"),
        routes,
    );
    let r = Http::h1()
        .get(&format!("{}/off", p.base()), &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, text());
    // Disabled on the route: the header is not removed either.
    assert_eq!(r.header("x-ae"), Some("gzip"));
    let r = Http::h1()
        .get(
            &format!("{}/text", p.base()),
            &[("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("x-ae"), Some("-"));
    assert_eq!(decode(Some("gzip"), &r.body), text());
}

/// The HCM of pilot-agent's Prometheus listener (15090), verbatim from
/// istio/istio `pkg/bootstrap/testdata/default_golden.json`: brotli, zstd
/// and gzip compressors before the router.
const ISTIO_PROMETHEUS_HCM: &str = r#"{"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "codec_type": "AUTO", "stat_prefix": "stats", "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [{"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}]}]}, "http_filters": [{"name": "envoy.filters.http.compressor.brotli", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor", "compressor_library": {"name": "stats_brotli", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli"}}, "response_direction_config": {"common_config": {"content_type": ["text/plain", "application/vnd.google.protobuf", "application/openmetrics-text", "application/openmetrics-protobuf"]}}}}, {"name": "envoy.filters.http.compressor.zstd", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor", "compressor_library": {"name": "stats_zstd", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd"}}, "response_direction_config": {"common_config": {"content_type": ["text/plain", "application/vnd.google.protobuf", "application/openmetrics-text", "application/openmetrics-protobuf"]}}}}, {"name": "envoy.filters.http.compressor.gzip", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor", "compressor_library": {"name": "stats_gzip", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip"}}, "response_direction_config": {"common_config": {"content_type": ["text/plain", "application/vnd.google.protobuf", "application/openmetrics-text", "application/openmetrics-protobuf"]}}}}, {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_prometheus_listener_compresses() {
    let up = text_upstream().await;
    let clusters = cluster("prometheus_stats", up, false);
    let hcm = format!(
        "      - name: envoy.filters.network.http_connection_manager\n        typed_config: {ISTIO_PROMETHEUS_HCM}\n"
    );
    let p = Proxy::start(move |p| yaml_bootstrap(p, "", &hcm, &clusters));
    // Prometheus asks for gzip; curl-like clients for several.
    for (accept, want) in [
        ("gzip", Some("gzip")),
        // Equal q-values: the first in the header wins (no choose_first).
        ("br, gzip", Some("br")),
        ("zstd;q=1, gzip;q=0.5", Some("zstd")),
        ("br", Some("br")),
        ("", None),
    ] {
        let headers: &[(&str, &str)] = if accept.is_empty() {
            &[]
        } else {
            &[("accept-encoding", accept)]
        };
        let r = Http::h1()
            .get(&format!("{}/stats/prometheus", p.base()), headers)
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), want, "{accept}");
        assert_eq!(decode(want, &r.body), text(), "{accept}");
    }
    let s = "http.stats.compressor.stats_gzip.gzip.";
    assert_eq!(p.stat(&format!("{s}response.compressed")).await, Some(1));
    assert_eq!(p.stat(&format!("{s}header_compressor_used")).await, Some(1));
    assert_eq!(
        p.stat(&format!("{s}header_compressor_overshadowed")).await,
        Some(3)
    );
    assert_eq!(p.stat(&format!("{s}no_accept_header")).await, Some(1));
    assert_eq!(
        p.stat("http.stats.compressor.stats_zstd.zstd.response.compressed")
            .await,
        Some(1)
    );
    assert_eq!(
        p.stat("http.stats.compressor.stats_brotli.brotli.response.compressed")
            .await,
        Some(2)
    );
}
