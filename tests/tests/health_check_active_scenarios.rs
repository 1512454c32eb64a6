//! Active health checking (cluster `health_checks`) with real upstreams:
//! HTTP checks against echo upstreams whose default status the test
//! flips, TCP connect-only checks against a live and a closed port. Every
//! test runs against weir in-process by default and against real Envoy
//! with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`). Health
//! is read from the admin `/clusters` flags and the
//! `cluster.<c>.health_check.*` stats; every wait is bounded.
use std::time::Duration;

use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, chain, cluster, hcm, listener, route, stat_is, vhost, wait_stat,
};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream;

/// Common fields with short intervals (also while the cluster has no
/// traffic, so both proxies check at the same pace).
fn common(extra: Value) -> Value {
    weir_tests::config::merge(
        json!({
            "timeout": "1s", "interval": "0.1s", "no_traffic_interval": "0.1s",
            "unhealthy_threshold": 2, "healthy_threshold": 2,
        }),
        extra,
    )
}

fn start(ports: Vec<u16>, hc: Value) -> Proxy {
    Proxy::start(move |p| {
        bootstrap(
            p,
            vec![listener(
                "l",
                p.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![route("/", "c", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster("c", &ports, json!({"health_checks": [hc.clone()]}))],
        )
    })
}

/// The `health_flags` of `port` in `/clusters`, once it satisfies `ok`
/// (about 3 s at most); the last value either way.
async fn flags(p: &Proxy, port: u16, ok: impl Fn(&str) -> bool) -> String {
    let key = format!("c::127.0.0.1:{port}::health_flags::");
    let mut last = String::new();
    for _ in 0..150 {
        let t = p.admin("GET", "/clusters").await.text();
        last = t
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or("")
            .to_owned();
        if ok(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn http_check_fails_a_503_host_and_recovers() {
    let a = upstream::http1("a").await.expect("a");
    let b = upstream::http1("b").await.expect("b");
    b.set_default_status(503);
    let p = start(
        vec![a.port(), b.port()],
        common(json!({"http_health_check": {"path": "/healthz"}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, a.port(), |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    // The check request: GET path, Host = the cluster name, Envoy's agent.
    let hc = a.wait_requests(1).await;
    let first = hc.first().expect("a was checked");
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("GET", "/healthz")
    );
    assert_eq!(first.header("host"), Some("c"));
    assert_eq!(first.header("user-agent"), Some("Envoy/HC"));

    // b gets no traffic while failed.
    let http = Http::h1();
    for _ in 0..10 {
        let r = http.get(&format!("{}/x", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().upstream, "a");
    }
    let failures = p.stat("cluster.c.health_check.failure").await.unwrap_or(0);
    assert!(failures >= 1, "failure = {failures}");
    // Envoy 1.40 also counts some network failures against the 503 host
    // here (weir counts none: its connection stays up); only bound them.
    let nf = p
        .stat("cluster.c.health_check.network_failure")
        .await
        .unwrap_or(0);
    assert!(nf <= failures, "network_failure {nf} > failure {failures}");
    assert_eq!(
        p.stat("cluster.c.health_check.passive_failure").await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.c.health_check.verify_cluster").await,
        Some(0)
    );

    // Recovery after healthy_threshold passes; then both take traffic.
    b.set_default_status(0);
    stat_is(&p, "cluster.c.health_check.healthy", 2).await;
    assert_eq!(flags(&p, b.port(), |f| f == "healthy").await, "healthy");
    let mut seen_b = false;
    for _ in 0..20 {
        let r = http.get(&format!("{}/x", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        seen_b |= r.echo().upstream == "b";
    }
    // Envoy 1.40 was seen sending all of these to a although /clusters
    // shows b healthy (open question, see ARCHITECTURE.md); weir balances.
    if !p.target().is_envoy() {
        assert!(seen_b, "b takes traffic again");
    }
    let attempts = p.stat("cluster.c.health_check.attempt").await.unwrap_or(0);
    let success = p.stat("cluster.c.health_check.success").await.unwrap_or(0);
    let failure = p.stat("cluster.c.health_check.failure").await.unwrap_or(0);
    assert!(success >= 3, "success = {success}");
    // A check may be in flight between the reads.
    assert!(
        attempts >= success + failure,
        "{attempts} < {success} + {failure}"
    );

    // A healthy host answering an unexpected status is failed at once
    // (not after unhealthy_threshold).
    b.set_default_status(500);
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
}

#[tokio::test]
async fn expected_statuses_ranges_decide_health() {
    let a = upstream::http1("a").await.expect("a");
    let b = upstream::http1("b").await.expect("b");
    a.set_default_status(204);
    b.set_default_status(200);
    // [204, 205) only: 200 is not expected.
    let p = start(
        vec![a.port(), b.port()],
        common(json!({"http_health_check": {
            "path": "/ready", "host": "hc.example",
            "expected_statuses": [{"start": 204, "end": 205}],
        }})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, a.port(), |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let hc = b.wait_requests(1).await;
    assert_eq!(hc[0].header("host"), Some("hc.example"));
}

#[tokio::test]
async fn a_host_refusing_connections_is_failed() {
    let a = upstream::http1("a").await.expect("a");
    let closed = closed_port();
    let p = start(
        vec![a.port(), closed],
        common(json!({"http_health_check": {"path": "/healthz"}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(
        flags(&p, closed, |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let nf = wait_stat(&p, "cluster.c.health_check.network_failure", |v| {
        v.unwrap_or(0) >= 2
    })
    .await;
    assert!(nf.unwrap_or(0) >= 2, "network_failure = {nf:?}");
    let http = Http::h1();
    for _ in 0..6 {
        let r = http.get(&format!("{}/x", p.base()), &[]).await;
        assert_eq!((r.status, r.echo().upstream.as_str()), (200, "a"));
    }
}

#[tokio::test]
async fn tcp_connect_only_check() {
    let live = upstream::http1("live").await.expect("live");
    let closed = closed_port();
    let p = start(
        vec![live.port(), closed],
        common(json!({"tcp_health_check": {}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, live.port(), |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, closed, |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let s = wait_stat(&p, "cluster.c.health_check.success", |v| {
        v.unwrap_or(0) >= 2
    })
    .await;
    assert!(s.unwrap_or(0) >= 2, "success = {s:?}");
    let nf = p
        .stat("cluster.c.health_check.network_failure")
        .await
        .unwrap_or(0);
    assert!(nf >= 1, "network_failure = {nf}");
}

/// `start` with more cluster fields (`extra`, e.g. HTTP/2 upstream
/// options).
fn start_h2(ports: Vec<u16>, hc: Value) -> Proxy {
    Proxy::start(move |p| {
        bootstrap(
            p,
            vec![listener(
                "l",
                p.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![route("/", "c", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster(
                "c",
                &ports,
                weir_tests::config::h2_upstream(json!({"health_checks": [hc.clone()]})),
            )],
        )
    })
}

/// `codec_client_type: HTTP2`: the check is an HTTP/2 GET (prior
/// knowledge) with `:authority` the cluster name.
#[tokio::test]
async fn http2_check_fails_a_503_host() {
    let a = upstream::http2("a").await.expect("a");
    let b = upstream::http2("b").await.expect("b");
    b.set_default_status(503);
    let p = start_h2(
        vec![a.port(), b.port()],
        common(json!({"http_health_check": {"path": "/healthz", "codec_client_type": "HTTP2"}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let hc = a.wait_requests(1).await;
    let first = hc.first().expect("a was checked");
    assert_eq!(first.version, "HTTP/2.0");
    assert_eq!(
        (
            first.method.as_str(),
            first.path.as_str(),
            first.authority.as_str()
        ),
        ("GET", "/healthz", "c")
    );
    b.set_default_status(0);
    stat_is(&p, "cluster.c.health_check.healthy", 2).await;
}

/// What a gRPC health server saw: `:authority`, `x-hc` and the service.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

/// A `grpc.health.v1.Health` server over h2c (hand-framed gRPC on hyper):
/// answers every Check with the status in `status` (1 SERVING, 2
/// NOT_SERVING).
async fn grpc_health_server(
    status: std::sync::Arc<std::sync::atomic::AtomicU8>,
    seen: Seen,
) -> u16 {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (status, seen) = (status.clone(), seen.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (status, seen) = (status.clone(), seen.clone());
                        async move {
                            let authority = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .unwrap_or_default();
                            let x_hc = req
                                .headers()
                                .get("x-hc")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let path = req.uri().path().to_owned();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            // HealthCheckRequest { service = 1 } after the 5-byte prefix.
                            let service = body
                                .get(7..)
                                .map(|s| String::from_utf8_lossy(s).into_owned())
                                .unwrap_or_default();
                            assert_eq!(path, "/grpc.health.v1.Health/Check");
                            seen.lock().expect("lock").push((authority, x_hc, service));
                            let msg = [
                                0u8,
                                0,
                                0,
                                0,
                                2,
                                0x08,
                                status.load(std::sync::atomic::Ordering::Relaxed),
                            ];
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                                Ok(Frame::data(Bytes::copy_from_slice(&msg))),
                                Ok(Frame::trailers(trailers)),
                            ];
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(StreamBody::new(futures_util::stream::iter(frames)))
                                .expect("response");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    port
}

/// `grpc_health_check`: `grpc.health.v1.Health/Check` with `service_name`,
/// `authority` and `initial_metadata`; only SERVING is healthy.
#[tokio::test]
async fn grpc_check_serving_only() {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};
    let (sa, sb) = (Arc::new(AtomicU8::new(1)), Arc::new(AtomicU8::new(2)));
    let (seen_a, seen_b): (Seen, Seen) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let a = grpc_health_server(sa, seen_a.clone()).await;
    let b = grpc_health_server(sb.clone(), seen_b).await;
    let p = start_h2(
        vec![a, b],
        common(json!({"grpc_health_check": {
            "service_name": "svc",
            "authority": "health.test",
            "initial_metadata": [{"header": {"key": "x-hc", "value": "1"}}],
        }})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, a, |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, b, |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let first = seen_a
        .lock()
        .expect("lock")
        .first()
        .cloned()
        .expect("a was checked");
    assert_eq!(
        first,
        ("health.test".to_owned(), "1".to_owned(), "svc".to_owned())
    );
    sb.store(1, Ordering::Relaxed);
    stat_is(&p, "cluster.c.health_check.healthy", 2).await;
    assert_eq!(flags(&p, b, |f| f == "healthy").await, "healthy");
}

/// As Envoy: a gRPC health check needs an HTTP/2 cluster.
#[tokio::test]
async fn grpc_check_needs_an_http2_cluster() {
    use weir_tests::scenario::{StartOptions, Target};
    let r = Proxy::try_start(Target::from_env(), StartOptions::default(), |p| {
        bootstrap(
            p,
            vec![listener(
                "l",
                p.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![route("/", "c", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster(
                "c",
                &[closed_port()],
                json!({"health_checks": [common(json!({"grpc_health_check": {}}))]}),
            )],
        )
    });
    let Err(e) = r else {
        panic!("accepted a gRPC health check of an HTTP/1 cluster")
    };
    if !Target::from_env().is_envoy() {
        let e = format!("{e:#}");
        assert!(e.contains("health_checks[0].grpc_health_check"), "{e}");
    }
}

/// Checks go over the cluster's TLS transport socket (its SNI and trust):
/// the TLS host passes; a plaintext host fails the handshake (a network
/// failure) and stays failed.
#[tokio::test]
async fn http_check_over_the_clusters_tls_transport() {
    use weir_tests::tls::{self, LeafSpec, TestCa, TlsServerOptions};
    let ca = TestCa::new("hc root");
    let secure = tls::tls_upstream(TlsServerOptions::new(
        "secure",
        &ca.issue(LeafSpec::server("hc.test")),
    ))
    .await
    .expect("tls upstream");
    let plain = upstream::http1("plain").await.expect("plain");
    let (sp, pp) = (secure.port(), plain.port());
    let ca_pem = ca.pem();
    let p = Proxy::start(move |p| {
        bootstrap(
            p,
            vec![listener(
                "l",
                p.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![route("/", "c", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster(
                "c",
                &[sp, pp],
                json!({
                    "health_checks": [common(json!({"http_health_check": {"path": "/healthz"}}))],
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": "hc.test",
                        "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": ca_pem.clone()}}},
                    }},
                }),
            )],
        )
    });
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, sp, |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, pp, |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let nf = wait_stat(&p, "cluster.c.health_check.network_failure", |v| {
        v.is_some_and(|n| n >= 1)
    })
    .await;
    assert!(nf.is_some_and(|n| n >= 1), "network_failure {nf:?}");
    let conn = secure.last_connection().expect("a TLS check connection");
    assert_eq!(conn.sni.as_deref(), Some("hc.test"));
    // Requests go to the healthy TLS host only.
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().upstream, "secure");
}

/// `request_headers_to_remove` then `request_headers_to_add` (literal
/// values) shape the check request.
#[tokio::test]
async fn http_check_request_headers() {
    let a = upstream::http1("a").await.expect("a");
    let p = start(
        vec![a.port()],
        common(json!({"http_health_check": {
            "path": "/healthz",
            "request_headers_to_add": [
                {"header": {"key": "x-hc", "value": "yes"}},
                {"header": {"key": "x-hc", "value": "again"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"},
            ],
            "request_headers_to_remove": ["user-agent"],
        }})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    let hc = a.wait_requests(1).await;
    let first = hc.first().expect("a was checked");
    let values = |name: &str| -> Vec<&str> {
        first
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("x-hc"), ["yes", "again"]);
    assert!(values("user-agent").is_empty(), "{:?}", first.headers);
}

/// An upstream TLS context (`sni`, trusting `ca_pem`, offering `alpn`).
fn upstream_tls(sni: &str, ca_pem: &str, alpn: &[&str]) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": sni,
        "common_tls_context": {
            "alpn_protocols": alpn,
            "validation_context": {"trusted_ca": {"inline_string": ca_pem}},
        },
    }})
}

/// `tls_options.alpn_protocols`: check connections offer that list instead
/// of the TLS context's; without it they offer the context's.
#[tokio::test]
async fn tls_options_alpn_replaces_the_contexts_for_checks() {
    use weir_tests::tls::{self, LeafSpec, TestCa, TlsServerOptions};
    let ca = TestCa::new("hc alpn root");
    for (tls_options, want) in [
        (
            json!({"alpn_protocols": ["x-hc", "http/1.1"]}),
            ["x-hc", "http/1.1"],
        ),
        (Value::Null, ["x-data", "http/1.1"]),
    ] {
        let secure = tls::tls_upstream(
            TlsServerOptions::new("secure", &ca.issue(LeafSpec::server("hc.test")))
                .alpn(&["http/1.1"]),
        )
        .await
        .expect("tls upstream");
        let mut hc = common(json!({"http_health_check": {"path": "/healthz"}}));
        if !tls_options.is_null() {
            hc["tls_options"] = tls_options.clone();
        }
        let transport = upstream_tls("hc.test", &ca.pem(), &["x-data", "http/1.1"]);
        let sp = secure.port();
        let p = Proxy::start(move |p| {
            bootstrap(
                p,
                vec![],
                vec![cluster(
                    "c",
                    &[sp],
                    json!({"health_checks": [hc.clone()], "transport_socket": transport.clone()}),
                )],
            )
        });
        stat_is(&p, "cluster.c.health_check.healthy", 1).await;
        let conn = secure.wait_connection(1, Duration::from_secs(3)).await;
        assert_eq!(conn.offered_alpn, want, "tls_options {tls_options}");
    }
}

/// `transport_socket_match_criteria` alone picks the
/// `transport_socket_matches` entry of check connections (here the one
/// with SNI `hc.test`); requests keep the endpoint's transport (the
/// cluster's `transport_socket`, SNI `data.test`).
#[tokio::test]
async fn transport_socket_match_criteria_picks_the_checks_transport() {
    use weir_tests::tls::{self, LeafSpec, TestCa, TlsServerOptions};
    let ca = TestCa::new("hc match root");
    let secure = tls::tls_upstream(TlsServerOptions::new(
        "secure",
        &ca.issue(LeafSpec::server("hc.test")),
    ))
    .await
    .expect("tls upstream");
    let sp = secure.port();
    let ca_pem = ca.pem();
    let p = Proxy::start(move |p| {
        bootstrap(
            p,
            vec![listener(
                "l",
                p.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![route("/", "c", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster(
                "c",
                &[sp],
                json!({
                    "health_checks": [common(json!({
                        "http_health_check": {"path": "/healthz"},
                        "transport_socket_match_criteria": {"purpose": "hc"},
                    }))],
                    "transport_socket": upstream_tls("data.test", &ca_pem, &[]),
                    "transport_socket_matches": [{
                        "name": "hc", "match": {"purpose": "hc"},
                        "transport_socket": upstream_tls("hc.test", &ca_pem, &[]),
                    }],
                }),
            )],
        )
    });
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    let checks = secure.wait_connections(1, Duration::from_secs(3)).await;
    assert!(
        checks.iter().all(|c| c.sni.as_deref() == Some("hc.test")),
        "{:?}",
        checks.iter().map(|c| c.sni.clone()).collect::<Vec<_>>()
    );
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let data = secure.connections();
    assert!(
        data.iter().any(|c| c.sni.as_deref() == Some("data.test")),
        "{:?}",
        data.iter().map(|c| c.sni.clone()).collect::<Vec<_>>()
    );
}
