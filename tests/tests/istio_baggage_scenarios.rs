//! Istio peer metadata over W3C `baggage` (`io.istio.http.peer_metadata.Config`
//! `baggage` discovery and propagation) and `istio.stats`' gRPC message
//! counters, with real sockets: echo upstreams that record the request
//! headers and answer with the headers a test asks for, an h2c gRPC
//! upstream, HTTP/1.1 and HTTP/2 clients; metrics are read as exact
//! Prometheus lines from admin `/stats/prometheus`.
//!
//! Weir only, whatever `WEIR_SCENARIO_TARGET` says: Envoy 1.40 has neither
//! the peer metadata filter nor `istio.stats` (istio/proxy's extensions).
//! Expectations follow istio/proxy's `peer_metadata/filter.cc`,
//! `extensions/common/metadata_object.cc` (baggage keys and rendering) and
//! `istio_stats.cc` plus its `testdata/metric/*_messages.yaml.tmpl`.
//!
//! ```sh
//! cargo test -p weir-tests --test istio_baggage_scenarios
//! ```
use bytes::Bytes;
use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, chain, cluster, filter, hcm, listener, merge, route, vhost, with_node,
};
use weir_tests::scenario::{echo_header, echo_headers, Http, Proxy, StartOptions, Target};
use weir_tests::upstream;

const TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
const GRPC_STATS: &str =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";
const NODE_ID: &str =
    "sidecar~10.0.0.7~reviews-v2-5b64f47978-9nshd.bookinfo~bookinfo.svc.cluster.local";
const REVIEWS: &str = "outbound|9080||reviews.bookinfo.svc.cluster.local";
const INBOUND: &str = "inbound|9080||";

/// This proxy's node (one for the whole suite: the Istio filters read the
/// process-wide node, as Envoy's `LocalInfo`), with a locality.
fn node() -> Value {
    json!({
        "id": NODE_ID,
        "cluster": "reviews.bookinfo",
        "locality": {"region": "us-east1", "zone": "us-east1-b"},
        "metadata": {
            "NAME": "reviews-v2-5b64f47978-9nshd",
            "NAMESPACE": "bookinfo",
            "CLUSTER_ID": "Kubernetes",
            "WORKLOAD_NAME": "reviews-v2",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v2",
            "ISTIO_VERSION": "1.28.0",
            "LABELS": {
                "app": "reviews",
                "version": "v2",
                "service.istio.io/canonical-name": "reviews",
                "service.istio.io/canonical-revision": "v2",
            },
        },
    })
}

/// The node as Istio's `WorkloadMetadataObject::baggage` renders it: the
/// workload under its owner's kind, service name and version (the app ones
/// are equal, so left out), namespace, cluster, pod, the node's locality.
const OUR_BAGGAGE: &str = "k8s.deployment.name=reviews-v2,service.name=reviews,\
     service.version=v2,k8s.namespace.name=bookinfo,k8s.cluster.name=Kubernetes,\
     k8s.instance.name=reviews-v2-5b64f47978-9nshd,cloud.region=us-east1,\
     cloud.availability_zone=us-east1-b";

/// An Istio filter config as istiod sends it (a TypedStruct).
fn istio_filter(name: &str, ty: &str, value: Value) -> Value {
    filter(
        name,
        TYPED_STRUCT,
        json!({"type_url": format!("type.googleapis.com/{ty}"), "value": value}),
    )
}

fn peer_metadata(config: Value) -> Value {
    istio_filter(
        "istio.metadata_exchange",
        "io.istio.http.peer_metadata.Config",
        config,
    )
}

fn stats() -> Value {
    istio_filter("istio.stats", "stats.PluginConfig", json!({}))
}

/// Starts weir (in-process unless `weir-bin` is asked for: Envoy has no
/// Istio filters).
fn start(config: impl Fn(&weir_tests::scenario::Ports) -> String) -> Proxy {
    let target = match Target::from_env() {
        Target::Envoy => Target::InProcess,
        t => t,
    };
    Proxy::start_with(target, StartOptions::default(), config)
}

/// One listener (`direction` INBOUND or OUTBOUND) with `filters` before the
/// router, everything routed to `cluster_name` (an h2 upstream if `h2`).
fn proxy(direction: &str, filters: Vec<Value>, cluster_name: &str, port: u16, h2: bool) -> Proxy {
    let cluster_name = cluster_name.to_owned();
    start(move |ports| {
        let l = merge(
            listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "l",
                    filters.clone(),
                    vec![vhost(
                        "all",
                        vec![route("/", &cluster_name, json!({}))],
                        json!({}),
                    )],
                    json!({}),
                )])],
            ),
            json!({"traffic_direction": direction}),
        );
        let extra = if h2 {
            weir_tests::config::h2_upstream(json!({}))
        } else {
            json!({})
        };
        with_node(
            bootstrap(ports, vec![l], vec![cluster(&cluster_name, &[port], extra)]),
            node(),
        )
    })
}

// --- a protobuf `Struct` encoder of our own (strings and nested structs),
// so the `x-envoy-peer-metadata` the tests send does not come from the code
// under test.

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

/// A workload's metadata as its sidecar sends it in `x-envoy-peer-metadata`.
fn mx_peer(workload: &str, ns: &str) -> String {
    peer_header(&json!({
        "NAMESPACE": ns, "WORKLOAD_NAME": workload, "CLUSTER_ID": "mx-cluster",
        "LABELS": {"app": workload, "version": "v9"},
    }))
}

/// The source side of a label set: workload, canonical service / revision,
/// namespace, app, version, cluster (`None`: no peer, Istio's defaults).
type Side<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
);

const NO_PEER: Side<'static> = (
    "unknown", "unknown", "latest", "unknown", "unknown", "unknown", "unknown",
);

/// The workload labels of the inbound (`destination` reporter, plain text)
/// listener, for a client `s` (the 20 labels the message counters have).
fn inbound_workload_labels(s: Side<'_>, host: &str) -> String {
    let (w, cs, cr, ns, app, ver, cl) = s;
    format!(
        "reporter=\"destination\",source_workload=\"{w}\",source_canonical_service=\"{cs}\",\
         source_canonical_revision=\"{cr}\",source_workload_namespace=\"{ns}\",\
         source_principal=\"unknown\",source_app=\"{app}\",source_version=\"{ver}\",\
         source_cluster=\"{cl}\",destination_workload=\"reviews-v2\",\
         destination_workload_namespace=\"bookinfo\",destination_principal=\"unknown\",\
         destination_app=\"reviews\",destination_version=\"v2\",\
         destination_service=\"{host}\",destination_canonical_service=\"reviews\",\
         destination_canonical_revision=\"v2\",destination_service_name=\"{host}\",\
         destination_service_namespace=\"bookinfo\",destination_cluster=\"Kubernetes\""
    )
}

/// `istio_requests_total`'s labels on the inbound listener.
fn inbound_labels(s: Side<'_>, host: &str) -> String {
    format!(
        "{},request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",\
         response_flags=\"-\",connection_security_policy=\"none\"",
        inbound_workload_labels(s, host)
    )
}

/// The outbound (`source` reporter) workload labels towards reviews, for
/// the upstream peer `d`.
fn outbound_workload_labels(d: Side<'_>) -> String {
    let (w, cs, cr, ns, app, ver, cl) = d;
    format!(
        "reporter=\"source\",source_workload=\"reviews-v2\",source_canonical_service=\"reviews\",\
         source_canonical_revision=\"v2\",source_workload_namespace=\"bookinfo\",\
         source_principal=\"unknown\",source_app=\"reviews\",source_version=\"v2\",\
         source_cluster=\"Kubernetes\",destination_workload=\"{w}\",\
         destination_workload_namespace=\"{ns}\",destination_principal=\"unknown\",\
         destination_app=\"{app}\",destination_version=\"{ver}\",\
         destination_service=\"reviews.bookinfo.svc.cluster.local\",\
         destination_canonical_service=\"{cs}\",destination_canonical_revision=\"{cr}\",\
         destination_service_name=\"reviews\",destination_service_namespace=\"bookinfo\",\
         destination_cluster=\"{cl}\""
    )
}

/// `/stats/prometheus` once `want` lines are all there (stats are recorded
/// when each response body ends, just after the client has it).
async fn prometheus(p: &Proxy, want: &[String]) -> String {
    let mut text = String::new();
    for _ in 0..100 {
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

fn count_lines(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Inbound: the client's `baggage` is its identity (first in the configured
/// order, so `x-envoy-peer-metadata` is not read, yet still removed); the
/// header reaches the app unchanged; the response carries ours. Without
/// `baggage` the next method finds the peer; an unusable `baggage` still
/// wins, with an empty peer (Istio's parser always yields one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_baggage_discovery_in_order() {
    let echo = upstream::http1("reviews").await.expect("echo");
    let p = proxy(
        "INBOUND",
        vec![
            peer_metadata(json!({
                "downstream_discovery": [{"baggage": {}}, {"istio_headers": {}}],
                "downstream_propagation": [{"baggage": {}}, {"istio_headers": {}}],
            })),
            stats(),
        ],
        INBOUND,
        echo.port(),
        false,
    );
    let url = format!("{}/reviews/1", p.base());
    // The destination service is the authority (no cluster service inbound).
    let host = p.addr().to_string();
    let client_baggage = "k8s.deployment.name=productpage-v1,service.name=productpage,\
                          service.version=v1,k8s.namespace.name=bookinfo-front,\
                          k8s.cluster.name=east,userid=42";
    let mx = mx_peer("ratings-v1", "mx-ns");
    for http in [Http::h1(), Http::h2c()] {
        let r = http
            .get(
                &url,
                &[
                    ("baggage", client_baggage),
                    ("x-envoy-peer-metadata", &mx),
                    ("x-envoy-peer-metadata-id", "ratings-id"),
                ],
            )
            .await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(echo_headers(&e, "baggage"), [client_baggage]);
        assert_eq!(echo_header(&e, "x-envoy-peer-metadata"), None);
        assert_eq!(echo_header(&e, "x-envoy-peer-metadata-id"), None);
        // Ours goes back; istio_headers was never asked, so it answers
        // nothing.
        assert_eq!(r.header_all("baggage"), [OUR_BAGGAGE]);
        assert_eq!(r.header("x-envoy-peer-metadata"), None);
        assert_eq!(r.header("x-envoy-peer-metadata-id"), None);
    }
    // No baggage: istio_headers finds the peer and answers.
    let r = Http::h1()
        .get(&url, &[("x-envoy-peer-metadata", &mx)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header_all("baggage"), [OUR_BAGGAGE]);
    assert!(r.header("x-envoy-peer-metadata").is_some());
    // Baggage without any key Istio knows: an empty peer, still first.
    let r = Http::h1()
        .get(
            &url,
            &[
                ("baggage", "userid=7, k8s.namespace.name=spaced"),
                ("x-envoy-peer-metadata", &mx),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        echo_headers(&r.echo(), "baggage"),
        ["userid=7, k8s.namespace.name=spaced"]
    );

    let from_baggage = (
        "productpage-v1",
        "productpage",
        "v1",
        "bookinfo-front",
        "productpage",
        "v1",
        "east",
    );
    let from_mx = (
        "ratings-v1",
        "unknown",
        "latest",
        "mx-ns",
        "ratings-v1",
        "v9",
        "mx-cluster",
    );
    let want = [
        format!(
            "istio_requests_total{{{}}} 2",
            inbound_labels(from_baggage, &host)
        ),
        format!(
            "istio_requests_total{{{}}} 1",
            inbound_labels(from_mx, &host)
        ),
        format!(
            "istio_requests_total{{{}}} 1",
            inbound_labels(NO_PEER, &host)
        ),
    ];
    let text = prometheus(&p, &want).await;
    assert_eq!(count_lines(&text, "istio_requests_total{"), 3, "{text}");
    // No gRPC, no message counters.
    assert_eq!(count_lines(&text, "istio_request_messages_total"), 0);
}

/// Outbound: `baggage` propagation replaces the client's header with ours
/// (one value); in `upstream_discovery` Istio ignores `baggage`, so the
/// upstream's answer is read from `x-envoy-peer-metadata` only and its
/// `baggage` reaches the client untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_baggage_propagation_and_upstream_discovery() {
    let echo = upstream::http1("reviews").await.expect("echo");
    let p = proxy(
        "OUTBOUND",
        vec![
            peer_metadata(json!({
                "upstream_discovery": [{"baggage": {}}, {"istio_headers": {}}],
                "upstream_propagation": [{"baggage": {}}],
            })),
            stats(),
        ],
        REVIEWS,
        echo.port(),
        false,
    );
    let url = format!("{}/reviews/1", p.base());
    let upstream_baggage = "k8s.deployment.name=ratings-v1,k8s.namespace.name=bookinfo";
    let mx = mx_peer("reviews-v3", "bookinfo");
    let r = Http::h1()
        .get(
            &url,
            &[
                ("baggage", "k8s.namespace.name=spoofed"),
                ("baggage", "service.name=spoofed"),
                ("x-echo-header-baggage", upstream_baggage),
                ("x-echo-header-x-envoy-peer-metadata", &mx),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(echo_headers(&r.echo(), "baggage"), [OUR_BAGGAGE]);
    // Only baggage is propagated.
    assert_eq!(echo_header(&r.echo(), "x-envoy-peer-metadata"), None);
    assert_eq!(r.header_all("baggage"), [upstream_baggage]);
    assert_eq!(r.header("x-envoy-peer-metadata"), None);
    // An upstream answering with baggage only stays unknown.
    let r = Http::h2c()
        .get(&url, &[("x-echo-header-baggage", upstream_baggage)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(echo_headers(&r.echo(), "baggage"), [OUR_BAGGAGE]);
    assert_eq!(r.header_all("baggage"), [upstream_baggage]);

    let tail = ",request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",\
                response_flags=\"-\",connection_security_policy=\"unknown\"";
    let from_mx = (
        "reviews-v3",
        "unknown",
        "latest",
        "bookinfo",
        "reviews-v3",
        "v9",
        "mx-cluster",
    );
    let want = [
        format!(
            "istio_requests_total{{{}{tail}}} 1",
            outbound_workload_labels(from_mx)
        ),
        format!(
            "istio_requests_total{{{}{tail}}} 1",
            outbound_workload_labels(NO_PEER)
        ),
    ];
    prometheus(&p, &want).await;
}

/// Message framing of one gRPC message.
fn grpc_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An h2c gRPC upstream: every call is read whole, then answered with
/// three messages and `grpc-status: 0` in the trailers.
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
                        let _ = req.into_body().collect().await;
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let mut body = grpc_frame(b"one");
                        body.extend(grpc_frame(b"two"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                Bytes::from(body),
                            )),
                            Ok(hyper::body::Frame::data(Bytes::from(grpc_frame(b"3")))),
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

/// `istio_request_messages_total` / `istio_response_messages_total`: from
/// `grpc_stats`' filter state object, summed over calls, with the 20
/// workload labels only (Istio counts them before adding the protocol,
/// code, flags and security policy labels). Plain HTTP requests create no
/// message counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_message_counters() {
    let (port, task) = grpc_upstream().await;
    let p = proxy(
        "OUTBOUND",
        vec![
            filter(
                "envoy.filters.http.grpc_stats",
                GRPC_STATS,
                json!({"emit_filter_state": true}),
            ),
            peer_metadata(json!({"upstream_discovery": [{"istio_headers": {}}]})),
            stats(),
        ],
        REVIEWS,
        port,
        true,
    );
    let url = format!("{}/bookinfo.Reviews/List", p.base());
    let mut body = grpc_frame(b"a");
    body.extend(grpc_frame(b"bb"));
    for _ in 0..2 {
        let r = Http::h2c()
            .send(
                "POST",
                &url,
                &[("content-type", "application/grpc"), ("te", "trailers")],
                Bytes::from(body.clone()),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let l = outbound_workload_labels(NO_PEER);
    let want = [
        format!("istio_request_messages_total{{{l}}} 4"),
        format!("istio_response_messages_total{{{l}}} 6"),
        format!(
            "istio_requests_total{{{l},request_protocol=\"grpc\",response_code=\"200\",\
             grpc_response_status=\"0\",response_flags=\"-\",\
             connection_security_policy=\"unknown\"}} 2"
        ),
        "# TYPE istio_request_messages_total counter".to_owned(),
        "# TYPE istio_response_messages_total counter".to_owned(),
    ];
    let text = prometheus(&p, &want).await;
    assert_eq!(count_lines(&text, "istio_request_messages_total{"), 1);
    assert_eq!(count_lines(&text, "istio_response_messages_total{"), 1);
    task.abort();
}

/// A baggage peer's locality is a dimension (`downstream_peer.region`,
/// `filter_state.downstream_peer.availability_zone`); the message counters
/// take `metrics` overrides like the others, but a dimension replacing a
/// label they do not have (`response_code`) adds nothing (Istio overrides
/// present tags only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baggage_locality_dimensions_and_message_overrides() {
    let (port, task) = grpc_upstream().await;
    let p = proxy(
        "INBOUND",
        vec![
            filter(
                "envoy.filters.http.grpc_stats",
                GRPC_STATS,
                json!({"emit_filter_state": true}),
            ),
            peer_metadata(json!({"downstream_discovery": [{"baggage": {}}]})),
            istio_filter(
                "istio.stats",
                "stats.PluginConfig",
                json!({"metrics": [
                    {"name": "requests_total", "dimensions": {
                        "peer_region": "downstream_peer.region",
                        "peer_zone": "filter_state.downstream_peer.availability_zone",
                    }},
                    {"name": "request_messages_total",
                     "dimensions": {"response_code": "'x'", "kind": "'msg'"},
                     "tags_to_remove": ["source_cluster"]},
                ]}),
            ),
        ],
        INBOUND,
        port,
        true,
    );
    let host = p.addr().to_string();
    let r = Http::h2c()
        .send(
            "POST",
            &format!("{}/bookinfo.Reviews/List", p.base()),
            &[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                (
                    "baggage",
                    "k8s.pod.name=client-0,k8s.namespace.name=front,\
                     cloud.region=eu-west1,cloud.availability_zone=eu-west1-a",
                ),
            ],
            Bytes::from(grpc_frame(b"q")),
        )
        .await;
    assert_eq!(r.status, 200);
    let client = (
        "client-0", "unknown", "latest", "front", "unknown", "unknown", "unknown",
    );
    let w = inbound_workload_labels(client, &host);
    let want = [
        format!(
            "istio_requests_total{{{w},request_protocol=\"grpc\",response_code=\"200\",\
             grpc_response_status=\"0\",response_flags=\"-\",\
             connection_security_policy=\"none\",peer_region=\"eu-west1\",\
             peer_zone=\"eu-west1-a\"}} 1"
        ),
        format!(
            "istio_request_messages_total{{{},kind=\"msg\"}} 1",
            w.replace(",source_cluster=\"unknown\"", "")
        ),
        format!("istio_response_messages_total{{{w}}} 3"),
    ];
    prometheus(&p, &want).await;
    task.abort();
}
