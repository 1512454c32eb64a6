//! Scenario tests: weir in-process on real sockets against real upstreams.
use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use weir_tests::config::{yaml_cluster, HttpYaml};
use weir_tests::scenario::Ports;
use weir_tests::upstream::{self, EchoView};

struct Weir {
    server: Option<weir::Server>,
}

impl Weir {
    fn start(yaml: &str) -> Weir {
        let opts = xds_client::bootstrap::ParseOptions::default();
        let (b, s) = xds_client::load_bootstrap(Some(yaml), None, opts).expect("config is valid");
        let server =
            weir::Server::start(weir::cli::Options::for_test(2), b, s).expect("server starts");
        Weir {
            server: Some(server),
        }
    }
    fn addr(&self) -> SocketAddr {
        self.server
            .as_ref()
            .expect("running")
            .listener_addr("l")
            .expect("listener l")
    }
    fn admin(&self) -> SocketAddr {
        self.server
            .as_ref()
            .expect("running")
            .admin_addr()
            .expect("admin")
    }
    fn stat(&self, name: &str) -> Option<i64> {
        self.server
            .as_ref()
            .expect("running")
            .shared
            .stats
            .get(name)
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.begin_shutdown();
        }
    }
}

/// A bootstrap (every port 0) with virtual host list items `routes`,
/// cluster list items `clusters` and more HCM fields `hcm_extra`.
fn config(routes: &str, clusters: &str, hcm_extra: &str) -> String {
    let any = Ports {
        listen: 0,
        listen2: 0,
        admin: 0,
    };
    HttpYaml {
        hcm: hcm_extra,
        vhosts: routes,
        clusters,
        ..HttpYaml::default()
    }
    .render(&any)
}

fn cluster(name: &str, port: u16, extra: &str) -> String {
    yaml_cluster(name, &[port], extra)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(
    c: &HttpClient,
    url: String,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    let mut b = http::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, h, body)
}

fn echo_view(b: &Bytes) -> EchoView {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("echo json: {e}: {}", String::from_utf8_lossy(b)))
}

fn header<'a>(v: &'a EchoView, name: &str) -> Option<&'a str> {
    v.header(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_rewrites_headers_and_local_replies() {
    let up = upstream::http1("a").await.expect("upstream");
    let routes = r#"            - name: main
              domains: ["example.com", "*.wild.com"]
              request_headers_to_add:
              - header: {key: x-vhost, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
              routes:
              - match: {prefix: /api/}
                route: {cluster: a, prefix_rewrite: /v2/, host_rewrite_literal: backend.internal}
                response_headers_to_add:
                - header: {key: x-route, value: api}
              - match: {path: /moved}
                redirect: {https_redirect: true, strip_query: true}
              - match: {safe_regex: {regex: "/re/[0-9]+"}}
                direct_response: {status: 418, body: {inline_string: teapot}}
              - match: {prefix: /h, headers: [{name: x-m, string_match: {exact: yes}}]}
                direct_response: {status: 200, body: {inline_string: header-hit}}
"#;
    let w = Weir::start(&config(routes, &cluster("a", up.port(), ""), ""));
    let c = client();
    let base = format!("http://{}", w.addr());
    let (s, h, b) = get(&c, format!("{base}/api/x?q=1"), &[("host", "example.com")]).await;
    assert_eq!(s, 200);
    let v = echo_view(&b);
    assert_eq!(v.path, "/v2/x?q=1");
    assert_eq!(header(&v, "host"), Some("backend.internal"));
    assert_eq!(header(&v, "x-vhost"), Some("127.0.0.1"));
    assert_eq!(header(&v, "x-envoy-original-path"), Some("/api/x?q=1"));
    assert_eq!(header(&v, "x-forwarded-proto"), Some("http"));
    assert!(header(&v, "x-request-id").is_some_and(|id| id.len() == 36));
    assert_eq!(header(&v, "x-envoy-expected-rq-timeout-ms"), Some("15000"));
    assert_eq!(h.get("x-route").map(|v| v.as_bytes()), Some(&b"api"[..]));
    assert!(h.contains_key("x-envoy-upstream-service-time"));
    assert_eq!(h.get("server").map(|v| v.as_bytes()), Some(&b"envoy"[..]));

    let (s, h, _) = get(&c, format!("{base}/moved?a=b"), &[("host", "example.com")]).await;
    assert_eq!(s, 301);
    assert_eq!(h["location"], "https://example.com/moved");
    let (s, _, b) = get(&c, format!("{base}/re/42"), &[("host", "x.wild.com")]).await;
    assert_eq!((s, &b[..]), (418, &b"teapot"[..]));
    let (s, _, _) = get(&c, format!("{base}/re/x"), &[("host", "x.wild.com")]).await;
    assert_eq!(s, 404, "no route");
    let (s, _, _) = get(&c, format!("{base}/"), &[("host", "other.com")]).await;
    assert_eq!(s, 404, "no virtual host");
    let (s, _, b) = get(
        &c,
        format!("{base}/h"),
        &[("host", "example.com"), ("x-m", "yes")],
    )
    .await;
    assert_eq!((s, &b[..]), (200, &b"header-hit"[..]));
    assert_eq!(w.stat("http.ingress.no_route"), Some(2));
    assert!(w.stat("http.ingress.downstream_rq_total").unwrap_or(0) >= 6);
    assert_eq!(w.stat("cluster.a.upstream_rq_2xx"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_and_connect_failures() {
    let up = upstream::http1("a").await.expect("upstream");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /retry}
                route:
                  cluster: a
                  retry_policy: {retry_on: "5xx", num_retries: 2, retry_back_off: {base_interval: 0.001s}}
              - match: {prefix: /slow}
                route: {cluster: a, timeout: 0.2s}
              - match: {prefix: /dead}
                route: {cluster: dead}
"#;
    let clusters = format!(
        "{}{}",
        cluster("a", up.port(), ""),
        cluster("dead", dead_port, "")
    );
    let w = Weir::start(&config(routes, &clusters, ""));
    let c = client();
    let base = format!("http://{}", w.addr());
    // Fails twice, then succeeds on the third attempt.
    let (s, _, b) = get(
        &c,
        format!("{base}/retry"),
        &[
            ("x-echo-status", "503"),
            ("x-echo-fail-times", "2"),
            ("x-echo-id", "r1"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(echo_view(&b).seen, 3);
    assert_eq!(w.stat("cluster.a.upstream_rq_retry"), Some(2));
    // Always failing: retries exhausted, the upstream's 503 is returned.
    let (s, _, _) = get(
        &c,
        format!("{base}/retry"),
        &[("x-echo-status", "503"), ("x-echo-id", "r2")],
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(
        w.stat("cluster.a.upstream_rq_retry_limit_exceeded"),
        Some(1)
    );
    let (s, _, b) = get(&c, format!("{base}/slow"), &[("x-echo-delay-ms", "1000")]).await;
    assert_eq!((s, &b[..]), (504, &b"upstream request timeout"[..]));
    assert_eq!(w.stat("cluster.a.upstream_rq_timeout"), Some(1));
    let (s, _, b) = get(&c, format!("{base}/dead"), &[]).await;
    assert_eq!(s, 503);
    assert!(
        String::from_utf8_lossy(&b).starts_with("upstream connect error"),
        "{b:?}"
    );
    assert!(w.stat("cluster.dead.upstream_cx_connect_fail").unwrap_or(0) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reuse_h2_upstream_and_h2c_downstream() {
    let up1 = upstream::http1("a").await.expect("upstream");
    let up2 = upstream::http2("b").await.expect("upstream");
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /b}
                route: {cluster: b}
              - match: {prefix: /}
                route: {cluster: a}
"#;
    let h2opts = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}\n";
    let clusters = format!(
        "{}{}",
        cluster("a", up1.port(), ""),
        cluster("b", up2.port(), h2opts)
    );
    let w = Weir::start(&config(routes, &clusters, ""));
    let c = client();
    let base = format!("http://{}", w.addr());
    for _ in 0..20 {
        let (s, _, _) = get(&c, format!("{base}/a"), &[]).await;
        assert_eq!(s, 200);
    }
    // Sequential requests reuse pooled connections (at most one per worker).
    assert!(
        w.stat("cluster.a.upstream_cx_total").unwrap_or(99) <= 2,
        "{:?}",
        w.stat("cluster.a.upstream_cx_total")
    );
    let (s, _, b) = get(&c, format!("{base}/b"), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(echo_view(&b).version, "HTTP/2.0");
    // Downstream h2c with prior knowledge.
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (s, _, b) = get(&h2, format!("{base}/a"), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(echo_view(&b).upstream, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response: {status: 200}
"#;
    let w = Weir::start(&config(routes, &cluster("a", 1, ""), ""));
    let c = client();
    let admin = format!("http://{}", w.admin());
    let (s, _, b) = get(&c, format!("{admin}/ready"), &[]).await;
    assert_eq!((s, &b[..]), (200, &b"LIVE\n"[..]));
    let (s, _, b) = get(&c, format!("{admin}/stats?filter=^server\\.state$"), &[]).await;
    assert_eq!((s, &b[..]), (200, &b"server.state: 0\n"[..]));
    let (s, _, b) = get(&c, format!("{admin}/stats/prometheus"), &[]).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b)
        .contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"a\"} 0"));
    let (s, _, b) = get(&c, format!("{admin}/clusters"), &[]).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).contains("a::127.0.0.1:1::health_flags::healthy"));
    let (s, _, _) = get(&c, format!("{admin}/quitquitquit"), &[]).await;
    assert_eq!(s, 405, "mutating endpoints require POST");
    let (s, _, b) = get(&c, format!("{admin}/config_dump"), &[]).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).contains("BootstrapConfigDump"));
    let (s, _, b) = get(
        &c,
        format!("{admin}/config_dump?resource=static_clusters&mask=cluster.name,cluster.connect_timeout"),
        &[],
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
    let cl = &v["configs"][0]["cluster"];
    assert_eq!(
        (&cl["name"], &cl["connect_timeout"]),
        (&serde_json::json!("a"), &serde_json::json!("1s")),
        "proto field names"
    );
    assert!(cl.get("type").is_none(), "masked: {cl}");
    let (_, _, b) = get(
        &c,
        format!("{admin}/config_dump?include_eds&resource=static_endpoint_configs"),
        &[],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["configs"][0]["endpoint_config"]["cluster_name"], "a");
    let (s, _, _) = get(&c, format!("{admin}/config_dump?resource=nope"), &[]).await;
    assert_eq!(s, 400);
    let (s, _, b) = get(&c, format!("{admin}/server_info"), &[]).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).contains("\"state\": \"LIVE\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_file_lines() {
    let path = weir_tests::config::log_path("al", "access");
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response: {status: 201, body: {inline_string: hello}}
"#;
    let extra = format!(
        "          access_log:\n          - name: f\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n              log_format: {{text_format_source: {{inline_string: \"%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %BYTES_SENT% %PROTOCOL%\\n\"}}}}\n",
        path.display()
    );
    let w = Weir::start(&config(routes, &cluster("a", 1, ""), &extra));
    let c = client();
    let (s, _, _) = get(&c, format!("http://{}/x?y=1", w.addr()), &[]).await;
    assert_eq!(s, 201);
    w.server.as_ref().expect("running").shared.writer.flush();
    // The hook runs when the body finishes; allow the writer a moment.
    let mut text = String::new();
    for _ in 0..100 {
        w.server.as_ref().expect("running").shared.writer.flush();
        text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(text, "GET /x?y=1 201 5 HTTP/1.1\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_dns_cluster_resolves_localhost() {
    let up = upstream::http1("dns").await.expect("upstream");
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: dns}
"#;
    let clusters = format!(
        "  - name: dns\n    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: dns\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: localhost, port_value: {}}}}}}}\n",
        up.port()
    );
    let w = Weir::start(&config(routes, &clusters, ""));
    let (s, _, b) = get(&client(), format!("http://{}/", w.addr()), &[]).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(w.stat("cluster.dns.membership_total"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests() {
    let up = upstream::http1("a").await.expect("upstream");
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: a}
"#;
    let mut w = Weir::start(&config(routes, &cluster("a", up.port(), ""), ""));
    let base = format!("http://{}", w.addr());
    let c = client();
    let inflight: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            let url = format!("{base}/slow");
            tokio::spawn(async move { get(&c, url, &[("x-echo-delay-ms", "300")]).await.0 })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = w.server.take().expect("running");
    let t0 = std::time::Instant::now();
    server.begin_shutdown();
    for t in inflight {
        assert_eq!(
            t.await.expect("task"),
            200,
            "accepted requests complete during drain"
        );
    }
    // New connections are refused once draining.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(w_addr(&base)).await.is_err());
    tokio::task::spawn_blocking(move || server.wait())
        .await
        .expect("exits");
    assert!(t0.elapsed() < Duration::from_secs(5), "exits once drained");
}

fn w_addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().expect("addr")
}

#[test]
fn invalid_config_names_every_field() {
    let yaml = config(
        "            - name: v\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                route: {cluster: nope, bogus_field: 1}\n",
        "  - name: c\n    type: EDS\n    lb_policy: CLUSTER_PROVIDED\n",
        "",
    );
    let err =
        xds_client::load_bootstrap(Some(&yaml), None, Default::default()).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("route.bogus_field"), "{text}");
    let yaml = config(
        "            - name: v\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                route: {cluster: nope}\n",
        "  - name: c\n    type: EDS\n    lb_policy: CLUSTER_PROVIDED\n",
        "",
    );
    let err =
        xds_client::load_bootstrap(Some(&yaml), None, Default::default()).expect_err("invalid");
    let text = err.to_string();
    assert!(
        text.contains(
            "static_resources.clusters[0].eds_cluster_config: an EDS cluster needs eds_cluster_config"
        ),
        "{text}"
    );
    assert!(
        text.contains("static_resources.clusters[0].lb_policy"),
        "{text}"
    );
}

/// A raw upstream that accepts one websocket upgrade and echoes bytes.
async fn ws_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_spliced_and_unconfigured_upgrade_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = ws_upstream().await;
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: ws}
"#;
    let upgrades = "          upgrade_configs: [{upgrade_type: websocket}]\n";
    let w = Weir::start(&config(routes, &cluster("ws", up.port(), ""), upgrades));
    let mut s = tokio::net::TcpStream::connect(w.addr())
        .await
        .expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.expect("read head");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping-bytes").await.expect("write");
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&got, b"ping-bytes");

    // Without upgrade_configs the upgrade is refused.
    let w2 = Weir::start(&config(routes, &cluster("ws", up.port(), ""), ""));
    let (st, _, _) = get(
        &client(),
        format!("http://{}/chat", w2.addr()),
        &[("upgrade", "websocket"), ("connection", "upgrade")],
    )
    .await;
    assert_eq!(st, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_gets_authority_and_max_requests_per_connection() {
    let up = upstream::http2("b").await.expect("upstream");
    let h1up = upstream::http1("a").await.expect("upstream");
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /b}
                route: {cluster: b}
              - match: {prefix: /}
                route: {cluster: a}
"#;
    let h2opts = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}\n";
    let h1opts = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {max_requests_per_connection: 2}\n        explicit_http_config: {http_protocol_options: {}}\n";
    let clusters = format!(
        "{}{}",
        cluster("b", up.port(), h2opts),
        cluster("a", h1up.port(), h1opts)
    );
    let w = Weir::start(&config(routes, &clusters, ""));
    let c = client();
    let (s, _, b) = get(
        &c,
        format!("http://{}/b", w.addr()),
        &[("host", "svc.example")],
    )
    .await;
    assert_eq!(s, 200);
    let v = echo_view(&b);
    assert_eq!(v.authority, "svc.example");
    for _ in 0..6 {
        assert_eq!(get(&c, format!("http://{}/a", w.addr()), &[]).await.0, 200);
    }
    // 6 sequential requests, at most 2 per connection: at least 3 connections.
    assert!(
        w.stat("cluster.a.upstream_cx_total").unwrap_or(0) >= 3,
        "{:?}",
        w.stat("cluster.a.upstream_cx_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_timers_idle_request_duration_and_connection_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream::http1("a").await.expect("upstream");
    let routes = r#"            - name: main
              domains: ["*"]
              routes:
              - match: {prefix: /route-idle}
                route: {cluster: a, idle_timeout: 0.2s, timeout: 0s}
              - match: {prefix: /msd}
                route: {cluster: a, timeout: 0s, max_stream_duration: {max_stream_duration: 0.2s}}
              - match: {prefix: /}
                route: {cluster: a, timeout: 0s}
"#;
    let hcm = "          stream_idle_timeout: 0.3s\n          request_timeout: 0.3s\n          common_http_protocol_options: {idle_timeout: 0.3s}\n";
    let w = Weir::start(&config(routes, &cluster("a", up.port(), ""), hcm));
    let c = client();
    let base = format!("http://{}", w.addr());
    // The upstream is silent longer than the stream idle timeout; the
    // request was complete, so Envoy answers 504.
    let (s, _, b) = get(&c, format!("{base}/slow"), &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!((s, &b[..]), (504, &b"stream timeout"[..]));
    // A route's idle_timeout overrides the HCM's.
    let t = std::time::Instant::now();
    let (s, _, _) = get(
        &c,
        format!("{base}/route-idle"),
        &[("x-echo-delay-ms", "2000")],
    )
    .await;
    assert_eq!(s, 504);
    assert!(t.elapsed() < Duration::from_millis(1500));
    let (s, _, b) = get(&c, format!("{base}/msd"), &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!((s, &b[..]), (504, &b"downstream duration timeout"[..]));
    assert_eq!(w.stat("http.ingress.downstream_rq_idle_timeout"), Some(2));
    assert_eq!(
        w.stat("http.ingress.downstream_rq_max_duration_reached"),
        Some(1)
    );
    // request_timeout: the body never completes.
    let mut s = tokio::net::TcpStream::connect(w.addr())
        .await
        .expect("connect");
    s.write_all(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nabc")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.ends_with("request timeout"), "{text}");
    // The HCM idle timeout closes a connection with no streams.
    let mut s = tokio::net::TcpStream::connect(w.addr())
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .expect("write");
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response");
    let t = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed in time")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "idle connection closed after ~0.3s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_access_log() {
    let path = weir_tests::config::log_path("admin-al", "admin");
    let routes = "            - name: v\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                direct_response: {status: 200}\n";
    let yaml = config(routes, &cluster("a", 1, ""), "").replace(
        "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}",
        &format!(
            "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n  access_log:\n  - name: f\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n      path: {}\n      log_format: {{text_format_source: {{inline_string: \"%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%\\n\"}}}}\n",
            path.display()
        ),
    );
    let w = Weir::start(&yaml);
    let (s, _, _) = get(&client(), format!("http://{}/ready", w.admin()), &[]).await;
    assert_eq!(s, 200);
    let mut text = String::new();
    for _ in 0..100 {
        w.server.as_ref().expect("running").shared.writer.flush();
        text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(text, "GET /ready 200\n");
}
