//! Istio telemetry: the peer metadata filter (`io.istio.http.peer_metadata.Config`)
//! and `istio.stats` (`stats.PluginConfig`) with real sockets: an echo
//! upstream, HTTP/1.1 and HTTP/2 clients, an mTLS client with a SPIFFE
//! certificate; the metrics are read as exact Prometheus lines from admin
//! `/stats/prometheus`.
//!
//! Envoy 1.40 has no `istio.stats` (it is istio/proxy's extension), so this
//! suite runs against weir only, whatever `WEIR_SCENARIO_TARGET` says; the
//! expected names, labels and values follow istio/proxy's `istio_stats.cc`
//! and its `testdata/metric/*.yaml.tmpl`.
//!
//! ```sh
//! cargo test -p weir-tests --test istio_stats_scenarios
//! ```
use std::net::SocketAddr;

use bytes::Bytes;
use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, chain, cluster, filter, hcm, listener, route, vhost, with_node,
};
use weir_tests::scenario::{echo_header, Http, Proxy, StartOptions, Target};
use weir_tests::tls::{LeafSpec, TempDir, TestCa, TlsClient, TlsRequest};
use weir_tests::upstream;

const TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
const DOWNSTREAM_TLS: &str = weir_tests::config::DOWNSTREAM_TLS;
const NODE_ID: &str =
    "router~10.0.0.1~istio-ingressgateway-1.istio-system~istio-system.svc.cluster.local";
const PRODUCTPAGE: &str = "outbound|9080||productpage.default.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.default.svc.cluster.local";
const CLIENT_SAN: &str = "spiffe://cluster.local/ns/apps/sa/client";
const GW_SAN: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";

/// The gateway's node (what pilot-agent puts in the bootstrap).
fn node() -> Value {
    json!({
        "id": NODE_ID,
        "cluster": "istio-ingressgateway.istio-system",
        "metadata": {
            "NAME": "istio-ingressgateway-1",
            "NAMESPACE": "istio-system",
            "CLUSTER_ID": "Kubernetes",
            "WORKLOAD_NAME": "istio-ingressgateway",
            "ISTIO_VERSION": "1.28.0",
            "LABELS": {
                "app": "istio-ingressgateway",
                "istio": "ingressgateway",
                "service.istio.io/canonical-name": "istio-ingressgateway",
                "service.istio.io/canonical-revision": "latest",
            },
        },
    })
}

/// An Istio filter config as istiod sends it (a TypedStruct).
fn istio_filter(name: &str, ty: &str, value: Value) -> Value {
    filter(
        name,
        TYPED_STRUCT,
        json!({"type_url": format!("type.googleapis.com/{ty}"), "value": value}),
    )
}

/// istiod's gateway peer metadata filter.
fn gateway_peer_metadata() -> Value {
    istio_filter(
        "istio.metadata_exchange",
        "io.istio.http.peer_metadata.Config",
        json!({
            "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
            "upstream_propagation": [{"istio_headers": {"skip_external_clusters": true}}],
        }),
    )
}

fn stats(config: Value) -> Value {
    istio_filter("istio.stats", "stats.PluginConfig", config)
}

/// Starts weir (in-process unless `weir-bin` is asked for: Envoy has no
/// `istio.stats`).
fn start(config: impl Fn(&weir_tests::scenario::Ports) -> String) -> Proxy {
    let target = match Target::from_env() {
        Target::Envoy => Target::InProcess,
        t => t,
    };
    Proxy::start_with(target, StartOptions::default(), config)
}

/// A gateway-shaped outbound listener: peer metadata, istio.stats
/// (`stats_config`), router; `/` to productpage, `/ratings` to a port
/// nobody listens on.
fn gateway(echo_port: u16, dead_port: u16, stats_config: Value) -> Proxy {
    start(move |ports| {
        let l = listener(
            "l",
            ports.listen,
            vec![chain(vec![hcm(
                "outbound_0.0.0.0_8080",
                vec![gateway_peer_metadata(), stats(stats_config.clone())],
                vec![vhost(
                    "bookinfo",
                    vec![
                        route("/ratings", RATINGS, json!({})),
                        route("/", PRODUCTPAGE, json!({})),
                    ],
                    json!({}),
                )],
                json!({}),
            )])],
        );
        let l = weir_tests::config::merge(l, json!({"traffic_direction": "OUTBOUND"}));
        with_node(
            bootstrap(
                ports,
                vec![l],
                vec![
                    cluster(PRODUCTPAGE, &[echo_port], json!({})),
                    cluster(RATINGS, &[dead_port], json!({})),
                ],
            ),
            node(),
        )
    })
}

// --- a protobuf `Struct` encoder of our own (strings and nested structs),
// so the header the tests send does not come from the code under test.

fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    varint(bytes.len(), out);
    out.extend_from_slice(bytes);
}

/// `google.protobuf.Struct` of `v` (an object of strings and objects),
/// keys in order (deterministic serialisation).
fn pb_struct(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    keys.sort();
    for k in keys {
        let mut value = Vec::new();
        match &v[k] {
            Value::String(s) => field(0x1a, s.as_bytes(), &mut value),
            o @ Value::Object(_) => field(0x2a, &pb_struct(o), &mut value),
            other => panic!("unsupported {other}"),
        }
        let mut entry = Vec::new();
        field(0x0a, k.as_bytes(), &mut entry);
        field(0x12, &value, &mut entry);
        field(0x0a, &entry, &mut out);
    }
    out
}

fn peer_header(v: &Value) -> String {
    weir_tests::tls::base64(&pb_struct(v))
}

/// The productpage workload's peer metadata, as its sidecar sends it.
fn productpage() -> Value {
    json!({
        "NAME": "productpage-v1-84975bc778-pxz2w",
        "NAMESPACE": "default",
        "CLUSTER_ID": "server-cluster",
        "WORKLOAD_NAME": "productpage-v1",
        "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
        "LABELS": {
            "app": "productpage", "version": "v1",
            "service.istio.io/canonical-name": "productpage",
            "service.istio.io/canonical-revision": "v1",
        },
    })
}

/// The labels Istio's gateway (reporter `source`) gives a request to
/// productpage whose sidecar answered with its peer metadata.
fn gateway_labels(service: &str, name: &str, code: u16, flags: &str, peer: bool) -> String {
    let (w, ns, app, ver, cs, cr, cl) = if peer {
        (
            "productpage-v1",
            "default",
            "productpage",
            "v1",
            "productpage",
            "v1",
            "server-cluster",
        )
    } else {
        (
            "unknown", "unknown", "unknown", "unknown", "unknown", "latest", "unknown",
        )
    };
    format!(
        "reporter=\"source\",source_workload=\"istio-ingressgateway\",\
         source_canonical_service=\"istio-ingressgateway\",source_canonical_revision=\"latest\",\
         source_workload_namespace=\"istio-system\",source_principal=\"unknown\",\
         source_app=\"istio-ingressgateway\",source_version=\"\",source_cluster=\"Kubernetes\",\
         destination_workload=\"{w}\",destination_workload_namespace=\"{ns}\",\
         destination_principal=\"unknown\",destination_app=\"{app}\",destination_version=\"{ver}\",\
         destination_service=\"{service}\",destination_canonical_service=\"{cs}\",\
         destination_canonical_revision=\"{cr}\",destination_service_name=\"{name}\",\
         destination_service_namespace=\"default\",destination_cluster=\"{cl}\",\
         request_protocol=\"http\",response_code=\"{code}\",grpc_response_status=\"\",\
         response_flags=\"{flags}\",connection_security_policy=\"unknown\""
    )
}

/// `/stats/prometheus` once `want` lines are all there (the stats are
/// recorded when each response body ends, just after the client has it).
async fn prometheus(p: &Proxy, want: &[String]) -> String {
    let mut text = String::new();
    // Up to 10 s: a loaded CI machine can be slow to end the stream.
    for _ in 0..500 {
        text = p.admin("GET", "/stats/prometheus").await.text();
        if want.iter().all(|w| text.lines().any(|l| l == w)) {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let istio: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_")).collect();
    panic!(
        "missing {:#?}\nin istio lines:\n{}",
        want.iter()
            .filter(|w| !text.lines().any(|l| l == *w))
            .collect::<Vec<_>>(),
        istio.join("\n")
    );
}

async fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_counts_by_code_and_flags_with_upstream_peer() {
    let echo = upstream::http1("productpage").await.expect("echo");
    let p = gateway(echo.port(), dead_port().await, json!({}));
    let base = p.base();
    let peer = peer_header(&productpage());
    let echo_peer = "x-echo-header-x-envoy-peer-metadata";
    // Two 200s (HTTP/1.1 and HTTP/2), one 404, from a sidecar that answers
    // with its peer metadata.
    for http in [Http::h1(), Http::h2c()] {
        let r = http
            .get(
                &format!("{base}/productpage"),
                &[(echo_peer, &peer), ("x-envoy-peer-metadata", "Zm9v")],
            )
            .await;
        assert_eq!(r.status, 200);
        // The upstream's peer headers are read and removed.
        assert_eq!(r.header("x-envoy-peer-metadata"), None);
        // Ours replace the client's on the way upstream.
        let e = r.echo();
        assert_eq!(echo_header(&e, "x-envoy-peer-metadata-id"), Some(NODE_ID));
        let mut me = node()["metadata"].clone();
        let m = me.as_object_mut().expect("object");
        m.remove("ISTIO_VERSION");
        m["LABELS"].as_object_mut().expect("labels").remove("istio");
        assert_eq!(
            echo_header(&e, "x-envoy-peer-metadata"),
            Some(peer_header(&me).as_str())
        );
    }
    let r = Http::h1()
        .get(
            &format!("{base}/missing"),
            &[(echo_peer, &peer), ("x-echo-status", "404")],
        )
        .await;
    assert_eq!(r.status, 404);
    // No upstream listening: 503 UF, and no peer metadata came back.
    let r = Http::h1().get(&format!("{base}/ratings"), &[]).await;
    assert_eq!(r.status, 503);
    let svc = "productpage.default.svc.cluster.local";
    let ok = gateway_labels(svc, "productpage", 200, "-", true);
    let nf = gateway_labels(svc, "productpage", 404, "-", true);
    let uf = gateway_labels(
        "ratings.default.svc.cluster.local",
        "ratings",
        503,
        "UF",
        false,
    );
    let want = [
        format!("istio_requests_total{{{ok}}} 2"),
        format!("istio_requests_total{{{nf}}} 1"),
        format!("istio_requests_total{{{uf}}} 1"),
    ];
    let text = prometheus(&p, &want).await;
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("# TYPE istio_requests_total "))
            .collect::<Vec<_>>(),
        ["# TYPE istio_requests_total counter"]
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count(),
        3,
        "{text}"
    );
    // The text form keeps Envoy's joined name.
    let t = p
        .admin("GET", "/stats?filter=istio_requests_total")
        .await
        .text();
    assert!(
        t.lines().any(|l| l.starts_with("istiocustom.istio_requests_total.reporter.source.source_workload.istio-ingressgateway.") && l.ends_with(": 2")),
        "{t}"
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The length of the complete HTTP/1.1 response at the start of `buf`
/// (`content-length` or chunked without trailers), once it is all there.
fn response_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if let Some(n) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let total = head_end + n.trim().parse::<usize>().ok()?;
        return (buf.len() >= total).then_some(total);
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // The last chunk follows the previous chunk's CRLF (or the head).
    let rest = &buf[head_end - 2..];
    find(rest, b"\r\n0\r\n\r\n").map(|i| head_end - 2 + i + 7)
}

/// Writes `raw` on `s` and reads one response: every byte the client got.
async fn exchange(s: &mut tokio::net::TcpStream, raw: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(raw).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(n) = response_len(&buf) {
            assert_eq!(n, buf.len(), "one response, nothing after it");
            return buf;
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An upstream that answers every request (without a body) with a chunked
/// response of two chunks, `hello` and `abc`.
async fn chunked_upstream() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(i) = find(&buf, b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        let resp: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                            5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n";
                        if s.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (port, task)
}

/// `istio_request_bytes` / `istio_response_bytes` record the downstream
/// wire bytes, as Istio (Envoy's downstream bytes meter: request line or
/// status line, headers, framing and body), checked against the bytes a
/// raw HTTP/1.1 client wrote and read: a request with a body and a
/// `content-length` response, then, on the same connection, a request whose
/// response weir sends chunked (the chunk framing counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_and_wire_size_histograms() {
    let echo = upstream::http1("productpage").await.expect("echo");
    let (chunked_port, task) = chunked_upstream().await;
    let p = gateway(echo.port(), chunked_port, json!({}));
    let mut s = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    let rq1: &[u8] = b"POST /productpage HTTP/1.1\r\nhost: bookinfo.example.com\r\n\
        x-echo-body-size: 700\r\ncontent-length: 3\r\n\r\nabc";
    let rs1 = exchange(&mut s, rq1).await;
    assert!(rs1.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(rs1.ends_with(&[b'a'; 700]));
    let rq2: &[u8] =
        b"GET /ratings HTTP/1.1\r\nhost: bookinfo.example.com\r\nuser-agent: raw\r\n\r\n";
    let rs2 = exchange(&mut s, rq2).await;
    assert!(
        rs2.ends_with(b"0\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&rs2)
    );
    let l = gateway_labels(
        "productpage.default.svc.cluster.local",
        "productpage",
        200,
        "-",
        false,
    );
    let l2 = gateway_labels(
        "ratings.default.svc.cluster.local",
        "ratings",
        200,
        "-",
        false,
    );
    let want = [
        format!("istio_request_bytes_bucket{{{l},le=\"100\"}} 0"),
        format!("istio_request_bytes_bucket{{{l},le=\"250\"}} 1"),
        format!("istio_request_bytes_sum{{{l}}} {}", rq1.len()),
        format!("istio_request_bytes_count{{{l}}} 1"),
        format!("istio_response_bytes_bucket{{{l},le=\"500\"}} 0"),
        format!("istio_response_bytes_bucket{{{l},le=\"1000\"}} 1"),
        format!("istio_response_bytes_sum{{{l}}} {}", rs1.len()),
        format!("istio_response_bytes_count{{{l}}} 1"),
        format!("istio_request_bytes_sum{{{l2}}} {}", rq2.len()),
        format!("istio_response_bytes_sum{{{l2}}} {}", rs2.len()),
        format!("istio_request_duration_milliseconds_bucket{{{l},le=\"3600000\"}} 1"),
        format!("istio_request_duration_milliseconds_count{{{l}}} 1"),
        "# TYPE istio_request_duration_milliseconds histogram".to_owned(),
    ];
    let text = prometheus(&p, &want).await;
    // Envoy's default buckets, from 0.5 ms.
    assert!(
        text.lines().any(
            |x| x.starts_with("istio_request_duration_milliseconds_bucket{")
                && x.contains("le=\"0.5\"")
        ),
        "{text}"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_dimensions_tags_to_remove_and_drop() {
    let echo = upstream::http1("productpage").await.expect("echo");
    let config = json!({
        "disable_host_header_fallback": true,
        "metrics": [
            {"name": "request_bytes", "drop": true},
            {"tags_to_remove": ["response_flags", "grpc_response_status", "source_principal"]},
            {"name": "requests_total", "dimensions": {
                "source_app": "'edge'",
                "team": "request.headers['x-team']",
                "host": "request.host",
                "peer_ns": "upstream_peer.namespace",
            }},
        ],
        "rotation_interval": "60s",
    });
    let p = gateway(echo.port(), dead_port().await, config);
    let peer = peer_header(&productpage());
    let r = Http::h1()
        .get(
            &format!("{}/productpage", p.base()),
            &[
                ("host", "bookinfo.example.com"),
                ("x-team", "blue"),
                ("x-echo-header-x-envoy-peer-metadata", &peer),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let l = "reporter=\"source\",source_workload=\"istio-ingressgateway\",\
             source_canonical_service=\"istio-ingressgateway\",source_canonical_revision=\"latest\",\
             source_workload_namespace=\"istio-system\",\
             source_app=\"edge\",source_version=\"\",source_cluster=\"Kubernetes\",\
             destination_workload=\"productpage-v1\",destination_workload_namespace=\"default\",\
             destination_principal=\"unknown\",destination_app=\"productpage\",destination_version=\"v1\",\
             destination_service=\"productpage.default.svc.cluster.local\",destination_canonical_service=\"productpage\",\
             destination_canonical_revision=\"v1\",destination_service_name=\"productpage\",\
             destination_service_namespace=\"default\",destination_cluster=\"server-cluster\",\
             request_protocol=\"http\",response_code=\"200\",\
             connection_security_policy=\"unknown\",host=\"bookinfo.example.com\",peer_ns=\"default\",team=\"blue\"";
    let want = [format!("istio_requests_total{{{l}}} 1")];
    let text = prometheus(&p, &want).await;
    // Dropped; the others lose the removed tags but keep the standard
    // source_app.
    assert!(!text.contains("istio_request_bytes"), "{text}");
    let resp = text
        .lines()
        .find(|x| x.starts_with("istio_response_bytes_count{"))
        .expect("response bytes");
    assert!(
        resp.contains("source_app=\"istio-ingressgateway\""),
        "{resp}"
    );
    assert!(!resp.contains("response_flags="), "{resp}");
    assert!(!resp.contains("team="), "{resp}");
}

/// A gRPC upstream (h2c): every call answers 200 with one message and
/// trailers `grpc-status: 5`.
async fn grpc_upstream() -> (u16, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt, StreamBody};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        // Read the call before answering.
                        let _ = req.into_body().collect().await;
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                Bytes::from_static(b"\0\0\0\0\x01a"),
                            )),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(futures_util::stream::iter(frames));
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .expect("response"),
                        )
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_from_trailers() {
    let (port, task) = grpc_upstream().await;
    let p = start(move |ports| {
        let l = weir_tests::config::merge(
            listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "outbound_0.0.0.0_8080",
                    vec![gateway_peer_metadata(), stats(json!({}))],
                    vec![vhost(
                        "grpc",
                        vec![route("/", PRODUCTPAGE, json!({}))],
                        json!({}),
                    )],
                    json!({}),
                )])],
            ),
            json!({"traffic_direction": "OUTBOUND"}),
        );
        with_node(
            bootstrap(
                ports,
                vec![l],
                vec![cluster(
                    PRODUCTPAGE,
                    &[port],
                    weir_tests::config::h2_upstream(json!({})),
                )],
            ),
            node(),
        )
    });
    let r = Http::h2c()
        .send(
            "POST",
            &format!("{}/bookinfo.Reviews/Get", p.base()),
            &[("content-type", "application/grpc"), ("te", "trailers")],
            Bytes::from_static(b"\0\0\0\0\0"),
        )
        .await;
    assert_eq!(r.status, 200);
    let l = gateway_labels(
        "productpage.default.svc.cluster.local",
        "productpage",
        200,
        "-",
        false,
    )
    .replace("request_protocol=\"http\"", "request_protocol=\"grpc\"")
    .replace("grpc_response_status=\"\"", "grpc_response_status=\"5\"");
    prometheus(&p, &[format!("istio_requests_total{{{l}}} 1")]).await;
    task.abort();
}

/// A TLS listener requiring a client certificate from `ca`.
fn mtls(ca: &TestCa, dir: &TempDir) -> Value {
    let files = ca
        .issue(LeafSpec::server("productpage.default.svc.cluster.local").uri(GW_SAN))
        .write_files(dir, "server");
    let ca_file = dir.write("ca.pem", ca.pem());
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWNSTREAM_TLS,
        "require_client_certificate": true,
        "common_tls_context": {
            "tls_certificates": [{
                "certificate_chain": {"filename": files.chain.display().to_string()},
                "private_key": {"filename": files.key.display().to_string()},
            }],
            "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
        },
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_mtls_principal_and_downstream_peer() {
    let ca = TestCa::new("istio root");
    let dir = TempDir::new("istio-stats").expect("temp dir");
    let echo = upstream::http1("app").await.expect("echo");
    let port = echo.port();
    let tls = mtls(&ca, &dir);
    let p = start(move |ports| {
        let peer_md = istio_filter(
            "istio.metadata_exchange",
            "io.istio.http.peer_metadata.Config",
            json!({
                "downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                "downstream_propagation": [{"istio_headers": {}}],
            }),
        );
        let mut c = chain(vec![hcm(
            "inbound_0.0.0.0_9080",
            vec![peer_md, stats(json!({}))],
            vec![vhost(
                "inbound",
                vec![route("/", "inbound|9080||", json!({}))],
                json!({}),
            )],
            json!({}),
        )]);
        c["transport_socket"] = tls.clone();
        let l = weir_tests::config::merge(
            listener("l", ports.listen, vec![c]),
            json!({"traffic_direction": "INBOUND"}),
        );
        with_node(
            bootstrap(
                ports,
                vec![l],
                vec![cluster("inbound|9080||", &[port], json!({}))],
            ),
            node(),
        )
    });
    let addr: SocketAddr = p.addr();
    let client_md = json!({
        "NAMESPACE": "apps", "WORKLOAD_NAME": "client", "CLUSTER_ID": "c1",
        "LABELS": {"app": "client", "version": "v2"},
    });
    let client = TlsClient::builder()
        .trust(&ca)
        .client_cert(&ca.issue(LeafSpec::spiffe(CLIENT_SAN)))
        .build();
    let r = client
        .request(
            addr,
            "productpage.default.svc.cluster.local",
            TlsRequest::get("/reviews")
                .header("x-envoy-peer-metadata", &peer_header(&client_md))
                .header(
                    "x-envoy-peer-metadata-id",
                    "sidecar~1~client.apps~apps.svc.cluster.local",
                ),
        )
        .await
        .expect("mtls request");
    assert_eq!(r.status, 200, "{}", r.text());
    // Stripped before the upstream; ours answer the client.
    let e = r.echo();
    assert_eq!(echo_header(&e, "x-envoy-peer-metadata"), None);
    assert_eq!(echo_header(&e, "x-envoy-peer-metadata-id"), None);
    assert_eq!(r.header("x-envoy-peer-metadata-id"), Some(NODE_ID));
    assert!(r.header("x-envoy-peer-metadata").is_some());
    let l = format!(
        "reporter=\"destination\",source_workload=\"client\",source_canonical_service=\"unknown\",\
         source_canonical_revision=\"latest\",source_workload_namespace=\"apps\",\
         source_principal=\"{CLIENT_SAN}\",source_app=\"client\",source_version=\"v2\",\
         source_cluster=\"c1\",destination_workload=\"istio-ingressgateway\",\
         destination_workload_namespace=\"istio-system\",destination_principal=\"{GW_SAN}\",\
         destination_app=\"istio-ingressgateway\",destination_version=\"\",\
         destination_service=\"productpage.default.svc.cluster.local\",\
         destination_canonical_service=\"istio-ingressgateway\",destination_canonical_revision=\"latest\",\
         destination_service_name=\"productpage.default.svc.cluster.local\",\
         destination_service_namespace=\"istio-system\",destination_cluster=\"Kubernetes\",\
         request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",\
         response_flags=\"-\",connection_security_policy=\"mutual_tls\""
    );
    prometheus(&p, &[format!("istio_requests_total{{{l}}} 1")]).await;
}

/// The `source` reporter's principals come from the upstream mutual-TLS
/// connection, as Istio's (`upstreamSslConnection()`): ours is
/// `source_principal`, the upstream's `destination_principal` (its
/// `/ns/<namespace>/` the destination namespace); the security policy
/// stays `unknown` for the source reporter, as Istio's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_principals_from_the_upstream_mtls_connection() {
    const PRODUCTPAGE_SAN: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    let ca = TestCa::new("istio root");
    let dir = TempDir::new("istio-stats-up").expect("temp dir");
    let leaf =
        ca.issue(LeafSpec::server("productpage.default.svc.cluster.local").uri(PRODUCTPAGE_SAN));
    let up = weir_tests::tls::tls_upstream(
        weir_tests::tls::TlsServerOptions::new("productpage", &leaf)
            .alpn(&["http/1.1"])
            .require_client_cert(&ca),
    )
    .await
    .expect("tls upstream");
    let gw = ca
        .issue(LeafSpec::client("gateway").uri(GW_SAN))
        .write_files(&dir, "gw");
    let ca_file = dir.write("ca.pem", ca.pem());
    let port = up.port();
    let p = start(move |ports| {
        let l = listener(
            "l",
            ports.listen,
            vec![chain(vec![hcm(
                "outbound_0.0.0.0_8080",
                vec![gateway_peer_metadata(), stats(json!({}))],
                vec![vhost(
                    "bookinfo",
                    vec![route("/", PRODUCTPAGE, json!({}))],
                    json!({}),
                )],
                json!({}),
            )])],
        );
        let l = weir_tests::config::merge(l, json!({"traffic_direction": "OUTBOUND"}));
        let tls = json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "productpage.default.svc.cluster.local",
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": gw.chain.display().to_string()},
                    "private_key": {"filename": gw.key.display().to_string()},
                }],
                "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
            },
        }}});
        with_node(
            bootstrap(ports, vec![l], vec![cluster(PRODUCTPAGE, &[port], tls)]),
            node(),
        )
    });
    for http in [Http::h1(), Http::h1()] {
        let r = http.get(&format!("{}/productpage", p.base()), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let l = gateway_labels(
        "productpage.default.svc.cluster.local",
        "productpage",
        200,
        "-",
        false,
    )
    .replace(
        "source_principal=\"unknown\"",
        &format!("source_principal=\"{GW_SAN}\""),
    )
    .replace(
        "destination_workload_namespace=\"unknown\"",
        "destination_workload_namespace=\"default\"",
    )
    .replace(
        "destination_principal=\"unknown\"",
        &format!("destination_principal=\"{PRODUCTPAGE_SAN}\""),
    );
    prometheus(&p, &[format!("istio_requests_total{{{l}}} 2")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_fields_are_rejected_by_path() {
    for (config, path) in [
        (
            json!({"metrics": [{"dimensions": {"x": "size(request.path)"}}]}),
            "metrics[0].dimensions[x]",
        ),
        (
            json!({"definitions": [{"name": "custom", "value": "1"}]}),
            "definitions",
        ),
    ] {
        let r = Proxy::try_start(Target::InProcess, StartOptions::default(), move |ports| {
            bootstrap(
                ports,
                vec![listener(
                    "l",
                    ports.listen,
                    vec![chain(vec![hcm(
                        "s",
                        vec![stats(config.clone())],
                        vec![],
                        json!({}),
                    )])],
                )],
                vec![],
            )
        });
        let e = format!("{:#}", r.err().expect("rejected"));
        assert!(e.contains(path), "{path}: {e}");
    }
}

/// The network `istio.stats` in front of `tcp_proxy` (istiod's TCP chains):
/// without the TCP metadata exchange Istio reports each connection when it
/// closes, with `request_protocol="tcp"` and no response code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_and_bytes() {
    let echo = weir_tests::tcp::tcp_echo_server().await.expect("tcp echo");
    let port = echo.port();
    const MONGO: &str = "outbound|27017||mongo.db.svc.cluster.local";
    let p = start(move |ports| {
        let l = weir_tests::config::merge(
            listener(
                "l",
                ports.listen,
                vec![chain(vec![
                    stats(json!({"tcp_reporting_duration": "5s"})),
                    weir_tests::config::tcp_proxy(MONGO, MONGO, json!({})),
                ])],
            ),
            json!({"traffic_direction": "OUTBOUND"}),
        );
        with_node(
            bootstrap(ports, vec![l], vec![cluster(MONGO, &[port], json!({}))]),
            node(),
        )
    });
    for _ in 0..2 {
        let t = weir_tests::tcp::stream_through(p.addr(), 4096)
            .await
            .expect("tcp_proxy");
        assert_eq!(t.received, 4096);
    }
    let l = "reporter=\"source\",source_workload=\"istio-ingressgateway\",\
             source_canonical_service=\"istio-ingressgateway\",source_canonical_revision=\"latest\",\
             source_workload_namespace=\"istio-system\",source_principal=\"unknown\",\
             source_app=\"istio-ingressgateway\",source_version=\"\",source_cluster=\"Kubernetes\",\
             destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",\
             destination_principal=\"unknown\",destination_app=\"unknown\",destination_version=\"unknown\",\
             destination_service=\"mongo.db.svc.cluster.local\",destination_canonical_service=\"unknown\",\
             destination_canonical_revision=\"latest\",destination_service_name=\"mongo\",\
             destination_service_namespace=\"db\",destination_cluster=\"unknown\",\
             request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"unknown\"";
    prometheus(
        &p,
        &[
            format!("istio_tcp_connections_opened_total{{{l}}} 2"),
            format!("istio_tcp_connections_closed_total{{{l}}} 2"),
            format!("istio_tcp_sent_bytes_total{{{l}}} 8192"),
            format!("istio_tcp_received_bytes_total{{{l}}} 8192"),
        ],
    )
    .await;
}
