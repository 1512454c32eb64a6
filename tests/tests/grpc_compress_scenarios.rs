//! `envoy.filters.http.grpc_stats` scenarios: a real gRPC upstream (HTTP/2,
//! gRPC framing, unary and streaming, statuses in trailers or
//! trailers-only) and real gRPC clients. Every test
//! runs against weir in-process by default and against real Envoy with
//! `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`).
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use weir_tests::scenario::{Http, Ports, Proxy};

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

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

/// A gRPC server over h2c: `/<svc>/Unary` answers one message, `Stream`
/// three (split across chunks, one header split too), `Fail` a
/// trailers-only `grpc-status: 13`, `FailLate` one message then
/// `grpc-status: 5` in trailers.
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
                        "Unary" => ok.body(grpc_body(vec![frame(b"hello")], Some("0"))),
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
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: ingress
          route_config:
            name: rc
            virtual_hosts:
            - name: main
              domains: ["*"]
              routes:
{routes}
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{clusters}"#,
        admin = p.admin,
        listen = p.listen,
    )
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
