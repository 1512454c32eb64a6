//! TCP-level scenarios with real sockets: tcp_proxy (half-close, big
//! transfers, idle timeout, connect attempts, sni_cluster), TLS passthrough
//! and termination, filter-chain selection (`FilterChainMatch`), and the
//! listener filters tls_inspector, http_inspector and proxy_protocol.
//!
//! Like `scenarios_more.rs`, every test runs against weir in-process by
//! default and against real Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`
//! (see `weir_tests::scenario`); the expectations are Envoy's, checked
//! against it:
//!
//! ```sh
//! cargo test -p weir-tests --test tcp_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test tcp_scenarios
//! ```
//!
//! Bootstraps are built as JSON (a YAML subset both proxies read).
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use filters::listener::proxy_protocol::{encode_v1, encode_v2};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::client::{self, H2Request, Outcome};
use weir_tests::scenario::{echo_header, Ports, Proxy, Target};
use weir_tests::tcp::{self, HelloCapture};
use weir_tests::tls::{LeafSpec, TempDir, TestCa, TlsClient, TlsServerOptions};
use weir_tests::upstream;

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const SNI_CLUSTER: &str =
    "type.googleapis.com/envoy.extensions.filters.network.sni_cluster.v3.SniCluster";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const FILE_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";

/// How long a single read in these tests may wait.
const WAIT: Duration = Duration::from_secs(5);

// === bootstrap building ===

fn sock(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// Adds `extra`'s fields to `base` (both objects).
fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// A bootstrap with listener `l` (its fields after name and address in
/// `l`) and `clusters`.
fn bootstrap(p: &Ports, l: &Value, clusters: &[Value]) -> String {
    let l = merge(json!({"name": "l", "address": sock(p.listen)}), l.clone());
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": [l], "clusters": clusters},
    })
    .to_string()
}

/// Starts the target on listener `l` and `clusters`.
fn start(l: Value, clusters: Vec<Value>) -> Proxy {
    Proxy::start(move |p| bootstrap(p, &l, &clusters))
}

/// A STATIC round-robin cluster over 127.0.0.1 ports.
fn cluster(name: &str, ports: &[u16]) -> Value {
    let eps: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": sock(*p)}}))
        .collect();
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
    })
}

/// A filter chain: `filters`, and `filter_chain_match` unless null.
fn chain(matcher: Value, filters: Vec<Value>) -> Value {
    let mut c = json!({ "filters": filters });
    if !matcher.is_null() {
        c["filter_chain_match"] = matcher;
    }
    c
}

/// A tcp_proxy network filter (`extra`: more TcpProxy fields).
fn tcp_proxy(stat_prefix: &str, cluster: &str, extra: Value) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": merge(
            json!({"@type": TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster}),
            extra,
        ),
    })
}

fn sni_cluster() -> Value {
    json!({"name": "envoy.filters.network.sni_cluster", "typed_config": {"@type": SNI_CLUSTER}})
}

/// An HCM network filter with `vhosts` (`extra`: more HCM fields).
fn hcm(vhosts: Value, extra: Value) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": merge(
            json!({
                "@type": HCM, "stat_prefix": "ingress",
                "route_config": {"name": "rc", "virtual_hosts": vhosts},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
            }),
            extra,
        ),
    })
}

/// An HCM answering every request with 200 and `body`.
fn direct(body: &str) -> Value {
    hcm(
        json!([{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
        ]}]),
        json!({}),
    )
}

fn listener_filter(name: &str, ty: &str, cfg: Value) -> Value {
    json!({
        "name": name,
        "typed_config": merge(json!({"@type": format!("type.googleapis.com/{ty}")}), cfg),
    })
}

fn tls_inspector() -> Value {
    listener_filter(
        "envoy.filters.listener.tls_inspector",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        json!({}),
    )
}

fn http_inspector() -> Value {
    listener_filter(
        "envoy.filters.listener.http_inspector",
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        json!({}),
    )
}

fn proxy_protocol(allow_without: bool) -> Value {
    listener_filter(
        "envoy.filters.listener.proxy_protocol",
        "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
        json!({ "allow_requests_without_proxy_protocol": allow_without }),
    )
}

/// A DownstreamTlsContext transport socket serving `files`.
fn downstream_tls(files: &weir_tests::tls::LeafFiles) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "common_tls_context": {"tls_certificates": [{
                "certificate_chain": {"filename": files.chain},
                "private_key": {"filename": files.key},
            }]},
        },
    })
}

// === helpers ===

/// `listener.<address>.<name>`: the listener's stat scope, named after the
/// bound address.
fn listener_stat(p: &Proxy, name: &str) -> String {
    format!("listener.127.0.0.1_{}.{name}", p.addr().port())
}

/// tcp_proxy `access_log` fields writing one line per connection to `path`.
fn tcp_log(path: &std::path::Path) -> Value {
    json!({"access_log": [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": FILE_LOG, "path": path,
            "log_format": {"text_format_source": {"inline_string":
                "%RESPONSE_FLAGS% %UPSTREAM_CLUSTER% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %REQUESTED_SERVER_NAME%\n"}},
        },
    }]})
}

/// Waits until stat `name` is `want` (stats may settle after a close).
async fn stat_is(p: &Proxy, name: &str, want: i64) {
    let mut last = None;
    for _ in 0..100 {
        last = p.stat(name).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} = {last:?}, want {want}");
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s
}

/// Reads until EOF or a reset and returns what arrived; panics if the
/// connection is still open after `within`.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!(
                "still open after {within:?}; read {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads exactly `n` bytes (within [`WAIT`]).
async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("read in time")
        .expect("read");
    buf
}

/// Sends `hello` (raw ClientHello records) and returns what came back
/// before the connection closed.
async fn send_hello(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut s = connect(addr).await;
    s.write_all(hello).await.expect("write hello");
    read_to_close(&mut s, WAIT).await
}

/// A ClientHello for `sni` (rustls, offering h2 and http/1.1).
fn hello(sni: &str) -> Vec<u8> {
    TlsClient::builder()
        .insecure()
        .alpn(&["h2", "http/1.1"])
        .build()
        .client_hello(sni)
}

/// `GET path` over HTTP/1.1 after `prefix` (e.g. a PROXY protocol header).
/// `None`: closed without a response.
async fn get_after(
    addr: SocketAddr,
    prefix: &[u8],
    path: &str,
    host: &str,
) -> Option<(u16, String)> {
    let mut s = connect(addr).await;
    let mut req = prefix.to_vec();
    req.extend_from_slice(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes());
    // The proxy may close before reading everything.
    let _ = s.write_all(&req).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(&got) {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .expect("a content-length response");
            if got.len() >= n + len {
                let body = String::from_utf8_lossy(&got[n..n + len]).into_owned();
                return Some((resp.code.expect("status"), body));
            }
        }
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => panic!(
                "no complete response in time: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) if got.is_empty() => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                panic!("closed mid-response: {:?}", String::from_utf8_lossy(&got))
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The body of a 200 for `GET /` after `prefix`; panics otherwise.
async fn body_after(addr: SocketAddr, prefix: &[u8]) -> String {
    match get_after(addr, prefix, "/", "x").await {
        Some((200, body)) => body,
        other => panic!("want a 200, got {other:?}"),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> weir_tests::tmp::TempFile {
    weir_tests::config::log_path("tcp-scenarios", name)
}

/// A port on 127.0.0.1 that refuses connections (bound, then released).
fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Hello-capture servers for chain identification.
async fn captures<const N: usize>() -> [HelloCapture; N] {
    let mut v = Vec::with_capacity(N);
    for _ in 0..N {
        v.push(tcp::hello_capture_server().await.expect("capture server"));
    }
    v.try_into().unwrap_or_else(|_| unreachable!())
}

/// Which of `caps` received ClientHellos, as counts.
/// The capture counts once they add up to `want`'s total (or after ~1 s).
async fn settled_counts(caps: &[HelloCapture], want: &[usize]) -> Vec<usize> {
    let mut counts = capture_counts(caps);
    for _ in 0..100 {
        if counts.iter().sum::<usize>() == want.iter().sum::<usize>() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        counts = capture_counts(caps);
    }
    counts
}

fn capture_counts(caps: &[HelloCapture]) -> Vec<usize> {
    caps.iter().map(|c| c.captures().len()).collect()
}

// === 1. tcp_proxy basics ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_round_trip_half_close_and_stats() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let source = tcp::tcp_source_server(100_000).await.expect("source");
    let path = log_path("round-trip");
    let p = start(
        json!({"filter_chains": [
            chain(json!({"source_ports": [1]}), vec![tcp_proxy("unused", "source", json!({}))]),
            chain(Value::Null, vec![tcp_proxy("echo", "echo", tcp_log(&path))]),
        ]}),
        vec![
            cluster("echo", &[echo.port()]),
            cluster("source", &[source.port()]),
        ],
    );
    let mut s = connect(p.addr()).await;
    s.write_all(b"hello ").await.expect("write");
    assert_eq!(read_n(&mut s, 6).await, b"hello ");
    // Byte counters move while the connection is open.
    stat_is(&p, "tcp.echo.downstream_cx_rx_bytes_total", 6).await;
    stat_is(&p, "tcp.echo.downstream_cx_tx_bytes_total", 6).await;
    s.write_all(b"world, half-closed").await.expect("write");
    // Half-close: the proxy must still deliver every echoed byte, then EOF.
    s.shutdown().await.expect("shutdown");
    let rest = read_to_close(&mut s, WAIT).await;
    assert_eq!(rest, b"world, half-closed");
    let results = echo.wait_results(1, WAIT).await;
    assert_eq!(results, [Ok(24)], "the echo saw all bytes then EOF");
    assert_eq!(echo.connections(), 1);
    stat_is(&p, "tcp.echo.downstream_cx_total", 1).await;
    stat_is(&p, "tcp.echo.downstream_cx_rx_bytes_total", 24).await;
    stat_is(&p, "tcp.echo.downstream_cx_tx_bytes_total", 24).await;
    stat_is(&p, "tcp.echo.downstream_cx_no_route", 0).await;
    assert_eq!(p.stat("tcp.unused.downstream_cx_total").await, Some(0));
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, [format!("- echo {} 24 24 -", echo.addr())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_upstream_half_close_keeps_downstream_writable() {
    // The upstream writes, then shuts down its write side and reads to EOF:
    // the client gets everything then EOF, and can still send afterwards.
    const LEN: u64 = 300_000;
    let source = tcp::tcp_source_server(LEN).await.expect("source");
    let p = start(
        json!({"filter_chains": [chain(Value::Null, vec![tcp_proxy("src", "source", json!({}))])]}),
        vec![cluster("source", &[source.port()])],
    );
    let s = connect(p.addr()).await;
    let (mut r, mut w) = s.into_split();
    let got = tokio::time::timeout(WAIT, tcp::read_verify_pattern(&mut r))
        .await
        .expect("in time")
        .expect("pattern");
    assert_eq!(got, LEN, "all upstream bytes, then EOF");
    // Still writable: the source reads to EOF before it finishes.
    w.write_all(b"after upstream EOF").await.expect("write");
    w.shutdown().await.expect("shutdown");
    assert_eq!(source.wait_results(1, WAIT).await, [Ok(LEN)]);
    stat_is(&p, "tcp.src.downstream_cx_rx_bytes_total", 18).await;
    stat_is(&p, "tcp.src.downstream_cx_tx_bytes_total", LEN as i64).await;
}

// === 2. big transfer, bounded memory ===

/// The bytes streamed by [`tcp_proxy_big_transfer_bounded_memory`]:
/// `WEIR_BIG_TRANSFER_BYTES`, default 1 GiB.
fn big_transfer_bytes() -> u64 {
    std::env::var("WEIR_BIG_TRANSFER_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

/// This process's resident set size.
fn vm_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The proxy's memory: this process's RSS in-process, else admin
/// `/memory` `allocated` (Envoy: tcmalloc's allocated bytes).
async fn proxy_memory(p: &Proxy) -> u64 {
    if p.server().is_some() {
        return vm_rss();
    }
    let r = p.admin("GET", "/memory").await;
    let v = r.json();
    let a = &v["allocated"];
    a.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| a.as_u64())
        .unwrap_or_else(|| panic!("/memory: {}", r.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_big_transfer_bounded_memory() {
    let len = big_transfer_bytes();
    let sink = tcp::tcp_sink_server().await.expect("sink");
    let p = start(
        json!({"filter_chains": [chain(Value::Null, vec![tcp_proxy("big", "sink", json!({}))])]}),
        vec![cluster("sink", &[sink.port()])],
    );
    // Warm up (worker buffers, pools), then measure.
    let mut s = connect(p.addr()).await;
    tcp::write_pattern(&mut s, 1 << 20).await.expect("warm-up");
    s.shutdown().await.expect("shutdown");
    assert_eq!(read_to_close(&mut s, WAIT).await, b"");
    assert_eq!(sink.wait_results(1, WAIT).await, [Ok(1 << 20)]);
    let before = proxy_memory(&p).await;
    let started = Instant::now();
    let mut s = connect(p.addr()).await;
    tcp::write_pattern(&mut s, len).await.expect("stream");
    s.shutdown().await.expect("shutdown");
    assert_eq!(read_to_close(&mut s, Duration::from_secs(60)).await, b"");
    let results = sink.wait_results(2, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert_eq!(results[1], Ok(len), "the sink verified every byte");
    let after = proxy_memory(&p).await;
    let growth = after.saturating_sub(before);
    eprintln!(
        "{len} bytes through {:?} in {elapsed:?} ({:.0} MiB/s); memory {} -> {} MiB",
        p.target(),
        len as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        before >> 20,
        after >> 20
    );
    assert!(
        growth < 64 << 20,
        "memory grew by {} MiB over a {len}-byte transfer",
        growth >> 20
    );
    stat_is(
        &p,
        "tcp.big.downstream_cx_rx_bytes_total",
        (len + (1 << 20)) as i64,
    )
    .await;
}

// === 3. timeouts, connect attempts, unknown clusters ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_idle_timeout_closes_both_sides() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let path = log_path("idle");
    let p = start(
        json!({"filter_chains": [chain(Value::Null, vec![
            tcp_proxy("idle", "echo", merge(json!({"idle_timeout": "0.5s"}), tcp_log(&path))),
        ])]}),
        vec![cluster("echo", &[echo.port()])],
    );
    let mut s = connect(p.addr()).await;
    // Activity resets the timer: 3 exchanges 0.3 s apart outlive 0.5 s.
    for i in 0..3 {
        let msg = format!("ping {i}");
        s.write_all(msg.as_bytes()).await.expect("write");
        assert_eq!(read_n(&mut s, msg.len()).await, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let quiet = Instant::now();
    let rest = read_to_close(&mut s, Duration::from_secs(5)).await;
    let idle = quiet.elapsed() + Duration::from_millis(300);
    assert!(rest.is_empty());
    assert!(
        idle >= Duration::from_millis(450) && idle < Duration::from_secs(3),
        "closed after {idle:?} idle"
    );
    stat_is(&p, "tcp.idle.idle_timeout", 1).await;
    // The upstream side was closed too.
    assert_eq!(echo.wait_results(1, WAIT).await, [Ok(18)]);
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, [format!("- echo {} 18 18 -", echo.addr())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_max_connect_attempts_skips_a_refusing_endpoint() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let dead = refused_port();
    let p = start(
        json!({"filter_chains": [chain(Value::Null, vec![
            tcp_proxy("retry", "two", json!({"max_connect_attempts": 2})),
        ])]}),
        vec![cluster("two", &[dead, echo.port()])],
    );
    // Round robin over [dead, echo] (per worker, from a random start in
    // Envoy): with two attempts every connection gets through, and of 4
    // connections on at most 2 workers some first attempts hit the dead
    // endpoint.
    for i in 0..4 {
        let mut s = connect(p.addr()).await;
        let msg = format!("attempt {i}");
        s.write_all(msg.as_bytes()).await.expect("write");
        assert_eq!(
            read_n(&mut s, msg.len()).await,
            msg.as_bytes(),
            "connection {i}"
        );
    }
    let fails = p
        .stat("cluster.two.upstream_cx_connect_fail")
        .await
        .expect("stat");
    assert!((1..=4).contains(&fails), "connect failures: {fails}");
    assert_eq!(echo.connections(), 4);
    // Failed connections count as created ones.
    stat_is(&p, "cluster.two.upstream_cx_total", 4 + fails).await;
    stat_is(&p, "tcp.retry.downstream_cx_total", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_single_attempt_to_a_refusing_endpoint_closes() {
    let dead = refused_port();
    let path = log_path("refused");
    let p = start(
        json!({"filter_chains": [chain(Value::Null, vec![tcp_proxy("dead", "dead", tcp_log(&path))])]}),
        vec![cluster("dead", &[dead])],
    );
    let mut s = connect(p.addr()).await;
    let _ = s.write_all(b"anyone?").await;
    assert_eq!(read_to_close(&mut s, WAIT).await, b"");
    stat_is(&p, "cluster.dead.upstream_cx_connect_fail", 1).await;
    // A failed connection still counts as one created.
    stat_is(&p, "cluster.dead.upstream_cx_total", 1).await;
    stat_is(&p, "tcp.dead.downstream_cx_total", 1).await;
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, [format!("UF,URX dead 127.0.0.1:{dead} 0 0 -")]);
    stat_is(&p, "cluster.dead.upstream_cx_connect_attempts_exceeded", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_unknown_cluster_closes_the_connection() {
    // Envoy loads a tcp_proxy naming a cluster that does not exist (as
    // `cluster` or in `weighted_clusters`): it resolves the cluster per
    // connection, closes it and counts downstream_cx_no_route.
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let path = log_path("unknown-cluster");
    for (prefix, spec) in [
        ("static", json!({"cluster": "missing"})),
        (
            "weighted",
            json!({"weighted_clusters": {"clusters": [{"name": "missing", "weight": 1}]}}),
        ),
    ] {
        let mut tp = tcp_proxy(prefix, "x", tcp_log(&path));
        let cfg = tp["typed_config"].as_object_mut().expect("object");
        cfg.remove("cluster");
        cfg.extend(spec.as_object().expect("object").clone());
        let l = json!({"filter_chains": [chain(Value::Null, vec![tp])]});
        let clusters = vec![cluster("echo", &[echo.port()])];
        let p = match Proxy::try_start(Target::from_env(), Default::default(), move |ports| {
            bootstrap(ports, &l, &clusters)
        }) {
            Ok(p) => p,
            Err(e) => panic!("{prefix}: {e:#}"),
        };
        let mut s = connect(p.addr()).await;
        let _ = s.write_all(b"anyone?").await;
        assert_eq!(read_to_close(&mut s, WAIT).await, b"", "{prefix}");
        stat_is(&p, &format!("tcp.{prefix}.downstream_cx_no_route"), 1).await;
        stat_is(&p, &format!("tcp.{prefix}.downstream_cx_total"), 1).await;
        let lines = p.log_lines(&path, 1).await;
        assert_eq!(
            lines.last().map(String::as_str),
            Some("NC - - 0 0 -"),
            "{prefix}"
        );
    }
    assert_eq!(echo.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_cluster_unknown_sni_closes_and_no_sni_uses_the_cluster() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let [known] = captures::<1>().await;
    let path = log_path("sni-unknown");
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [chain(Value::Null, vec![sni_cluster(), tcp_proxy("sni", "fallback", tcp_log(&path))])],
        }),
        vec![
            cluster("fallback", &[echo.port()]),
            cluster("known.example.com", &[known.port()]),
        ],
    );
    // SNI naming no cluster: closed, counted as no route.
    assert_eq!(
        send_hello(p.addr(), &hello("unknown.example.com")).await,
        b""
    );
    stat_is(&p, "tcp.sni.downstream_cx_no_route", 1).await;
    // SNI naming a cluster: there.
    let h = hello("known.example.com");
    assert_eq!(send_hello(p.addr(), &h).await, b"");
    assert_eq!(known.wait_capture(1, WAIT).await, h);
    // No SNI (plain bytes): the configured cluster.
    let mut s = connect(p.addr()).await;
    s.write_all(b"plain").await.expect("write");
    assert_eq!(read_n(&mut s, 5).await, b"plain");
    assert_eq!(echo.connections(), 1);
    s.shutdown().await.expect("shutdown");
    assert_eq!(read_to_close(&mut s, WAIT).await, b"");
    assert_eq!(p.stat("tcp.sni.downstream_cx_no_route").await, Some(1));
    // Lines are written when each connection closes: compare as a set (a
    // loaded machine may close the passthrough after the plain one).
    let mut lines = p.log_lines(&path, 3).await;
    lines.sort();
    let mut want = [
        "NC - - 0 0 unknown.example.com".to_owned(),
        format!(
            "- known.example.com {} {} 0 known.example.com",
            known.addr(),
            h.len()
        ),
        format!("- fallback {} 5 5 -", echo.addr()),
    ];
    want.sort();
    assert_eq!(lines, want);
}

// === 4. SNI passthrough ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_passthrough_forwards_the_client_hello_untouched() {
    let ca = TestCa::new("passthrough-ca");
    let leaf = ca.issue(LeafSpec::server("tls.example.com"));
    let tls_echo = weir_tests::tls::tls_tcp_echo(TlsServerOptions::new("backend", &leaf))
        .await
        .expect("tls echo");
    let [capture] = captures::<1>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [chain(Value::Null, vec![sni_cluster(), tcp_proxy("pt", "none", json!({}))])],
        }),
        vec![
            cluster("none", &[refused_port()]),
            cluster("raw.example.com", &[capture.port()]),
            cluster("tls.example.com", &[tls_echo.port()]),
        ],
    );
    // Byte for byte: what the client sent is what the upstream got.
    let h = hello("raw.example.com");
    assert_eq!(send_hello(p.addr(), &h).await, b"");
    let got = capture.wait_capture(1, WAIT).await;
    assert_eq!(got, h, "the ClientHello reached the upstream untouched");
    assert_eq!(
        tcp::client_hello_sni(&got).as_deref(),
        Some("raw.example.com")
    );
    assert_eq!(tcp::client_hello_alpn(&got), ["h2", "http/1.1"]);
    // End to end: the client handshakes with the backend itself.
    let client = TlsClient::new(&ca);
    let (mut tls, info) = client
        .connect(p.addr(), "tls.example.com")
        .await
        .expect("handshake through the passthrough");
    assert!(info.peer_cert().expect("server cert").is(&leaf));
    tls.write_all(b"over tls").await.expect("write");
    let mut buf = [0u8; 8];
    tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf, b"over tls");
    let rec = tls_echo.wait_connection(1, WAIT).await;
    assert_eq!(rec.sni.as_deref(), Some("tls.example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_cluster_istio_auto_passthrough() {
    // Istio renders AUTO_PASSTHROUGH gateways with "SNI-DNAT" clusters named
    // exactly like the SNI (`outbound_.PORT_.SUBSET_.HOST`), so plain
    // sni_cluster routes them.
    const SNI: &str = "outbound_.9000_._.echo.default.svc.cluster.local";
    let [dnat, mesh] = captures::<2>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [chain(
                json!({"server_names": ["*.svc.cluster.local"]}),
                vec![sni_cluster(), tcp_proxy("ap", "none", json!({}))],
            )],
        }),
        vec![
            cluster("none", &[refused_port()]),
            cluster(SNI, &[dnat.port()]),
            cluster(
                "outbound|9000||echo.default.svc.cluster.local",
                &[mesh.port()],
            ),
        ],
    );
    let h = hello(SNI);
    assert_eq!(send_hello(p.addr(), &h).await, b"");
    assert_eq!(dnat.wait_capture(1, WAIT).await, h);
    assert_eq!(capture_counts(&[dnat, mesh]), [1, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_cluster_does_not_rewrite_istio_sni_to_the_mesh_cluster_name() {
    // Without the SNI-DNAT cluster, Envoy's sni_cluster does not map
    // `outbound_.9000_._.HOST` onto `outbound|9000||HOST`: no route.
    const SNI: &str = "outbound_.9000_._.echo.default.svc.cluster.local";
    let [mesh] = captures::<1>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [chain(Value::Null, vec![sni_cluster(), tcp_proxy("ap", "none", json!({}))])],
        }),
        vec![
            cluster("none", &[refused_port()]),
            cluster(
                "outbound|9000||echo.default.svc.cluster.local",
                &[mesh.port()],
            ),
        ],
    );
    assert_eq!(send_hello(p.addr(), &hello(SNI)).await, b"");
    stat_is(&p, "tcp.ap.downstream_cx_no_route", 1).await;
    assert!(mesh.captures().is_empty());
}

// === 5. filter-chain matching ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_destination_port() {
    // The destination is what PROXY protocol says (Envoy restores the local
    // address), so ports other than the listener's can be matched.
    let p = start(
        json!({
            "listener_filters": [proxy_protocol(false)],
            "filter_chains": [
                chain(json!({"destination_port": 8443}), vec![direct("port-8443")]),
                chain(json!({"destination_port": 8080}), vec![direct("port-8080")]),
                chain(Value::Null, vec![direct("any-port")]),
            ],
        }),
        vec![],
    );
    let src = sa("192.0.2.10:40000");
    for (dst, want) in [
        ("198.51.100.1:8443", "port-8443"),
        ("198.51.100.1:8080", "port-8080"),
        ("198.51.100.1:9999", "any-port"),
    ] {
        let body = body_after(p.addr(), &encode_v1(src, sa(dst))).await;
        assert_eq!(body, want, "{dst}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_server_names_exact_then_longest_wildcard() {
    let caps = captures::<4>().await;
    let ports: Vec<u16> = caps.iter().map(|c| c.port()).collect();
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [
                chain(json!({"server_names": ["*.example.com"]}), vec![tcp_proxy("wild", "wild", json!({}))]),
                chain(json!({"server_names": ["www.example.com"]}), vec![tcp_proxy("exact", "exact", json!({}))]),
                chain(json!({"server_names": ["*.a.example.com"]}), vec![tcp_proxy("wild_a", "wild_a", json!({}))]),
                chain(Value::Null, vec![tcp_proxy("none", "none", json!({}))]),
            ],
        }),
        vec![
            cluster("exact", &[ports[0]]),
            cluster("wild", &[ports[1]]),
            cluster("wild_a", &[ports[2]]),
            cluster("none", &[ports[3]]),
        ],
    );
    let no_sni = TlsClient::builder()
        .insecure()
        .no_sni()
        .build()
        .client_hello("www.example.com");
    for (name, h, want) in [
        ("www.example.com", hello("www.example.com"), [1, 0, 0, 0]),
        ("WWW.Example.COM", hello("WWW.Example.COM"), [2, 0, 0, 0]),
        ("x.example.com", hello("x.example.com"), [2, 1, 0, 0]),
        (
            "deep.x.example.com",
            hello("deep.x.example.com"),
            [2, 2, 0, 0],
        ),
        ("x.a.example.com", hello("x.a.example.com"), [2, 2, 1, 0]),
        ("a.example.com", hello("a.example.com"), [2, 3, 1, 0]),
        ("example.com", hello("example.com"), [2, 3, 1, 1]),
        ("other.org", hello("other.org"), [2, 3, 1, 2]),
        ("(no SNI)", no_sni, [2, 3, 1, 3]),
    ] {
        assert_eq!(send_hello(p.addr(), &h).await, b"", "{name}");
        assert_eq!(settled_counts(&caps, &want).await, want, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_server_names_need_tls_inspector() {
    // Envoy does not add tls_inspector by itself: without it no SNI is
    // known and a server_names chain never matches.
    let [a, any] = captures::<2>().await;
    let p = start(
        json!({"filter_chains": [
            chain(json!({"server_names": ["a.example.com"]}), vec![tcp_proxy("a", "a", json!({}))]),
            chain(Value::Null, vec![tcp_proxy("any", "any", json!({}))]),
        ]}),
        vec![cluster("a", &[a.port()]), cluster("any", &[any.port()])],
    );
    let h = hello("a.example.com");
    assert_eq!(send_hello(p.addr(), &h).await, b"");
    assert_eq!(any.wait_capture(1, WAIT).await, h);
    assert_eq!(capture_counts(&[a, any]), [0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_transport_protocol_tls_vs_plaintext() {
    let [tls_up] = captures::<1>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [
                chain(json!({"transport_protocol": "tls"}), vec![tcp_proxy("tls", "tls", json!({}))]),
                chain(json!({"transport_protocol": "raw_buffer"}), vec![direct("plaintext chain")]),
            ],
        }),
        vec![cluster("tls", &[tls_up.port()])],
    );
    // Same port: an HTTP request and a TLS handshake.
    assert_eq!(body_after(p.addr(), b"").await, "plaintext chain");
    let h = hello("any.example.com");
    assert_eq!(send_hello(p.addr(), &h).await, b"");
    assert_eq!(tls_up.wait_capture(1, WAIT).await, h);
    stat_is(&p, "tls_inspector.tls_found", 1).await;
    stat_is(&p, "tls_inspector.tls_not_found", 1).await;
    stat_is(&p, "tls_inspector.sni_found", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_application_protocols_by_http_inspector() {
    let p = start(
        json!({
            "listener_filters": [http_inspector()],
            "filter_chains": [
                chain(json!({"application_protocols": ["h2c"]}), vec![direct("h2c chain")]),
                chain(json!({"application_protocols": ["http/1.1"]}), vec![direct("http/1.1 chain")]),
            ],
        }),
        vec![],
    );
    assert_eq!(body_after(p.addr(), b"").await, "http/1.1 chain");
    let req = H2Request {
        method: "GET".into(),
        scheme: "http".into(),
        authority: "x".into(),
        path: "/".into(),
        headers: vec![],
        body: Default::default(),
    };
    match client::h2c(p.addr(), &req, WAIT).await {
        Outcome::Response(r) => {
            assert_eq!(r.status, 200);
            assert_eq!(&r.body[..], b"h2c chain");
        }
        other => panic!("h2c: {other:?}"),
    }
    stat_is(&p, "http_inspector.http11_found", 1).await;
    stat_is(&p, "http_inspector.http2_found", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_application_protocols_from_tls_alpn() {
    // The first ALPN protocol offered that some chain names wins.
    let caps = captures::<3>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [
                chain(json!({"application_protocols": ["h2"]}), vec![tcp_proxy("h2", "h2", json!({}))]),
                chain(json!({"application_protocols": ["http/1.1"]}), vec![tcp_proxy("h1", "h1", json!({}))]),
                chain(Value::Null, vec![tcp_proxy("other", "other", json!({}))]),
            ],
        }),
        vec![
            cluster("h2", &[caps[0].port()]),
            cluster("h1", &[caps[1].port()]),
            cluster("other", &[caps[2].port()]),
        ],
    );
    let with_alpn = |alpn: &[&str]| {
        TlsClient::builder()
            .insecure()
            .alpn(alpn)
            .build()
            .client_hello("alpn.example.com")
    };
    for (alpn, want) in [
        (&["h2", "http/1.1"][..], [1, 0, 0]),
        (&["http/1.1", "h2"][..], [1, 1, 0]),
        (&["spdy/3", "h2"][..], [2, 1, 0]),
        (&["spdy/3"][..], [2, 1, 1]),
        (&[][..], [2, 1, 2]),
    ] {
        assert_eq!(
            send_hello(p.addr(), &with_alpn(alpn)).await,
            b"",
            "{alpn:?}"
        );
        assert_eq!(settled_counts(&caps, &want).await, want, "{alpn:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_destination_port_before_server_name() {
    // Criteria narrow in Envoy's order: the destination port chain wins over
    // the exact server name chain. The PROXY header itself is consumed.
    let [port_chain, name_chain] = captures::<2>().await;
    let p = start(
        json!({
            "listener_filters": [proxy_protocol(false), tls_inspector()],
            "filter_chains": [
                chain(json!({"destination_port": 8443}), vec![tcp_proxy("port", "port", json!({}))]),
                chain(json!({"server_names": ["a.example.com"]}), vec![tcp_proxy("name", "name", json!({}))]),
            ],
        }),
        vec![
            cluster("port", &[port_chain.port()]),
            cluster("name", &[name_chain.port()]),
        ],
    );
    let h = hello("a.example.com");
    let src = sa("192.0.2.10:40000");
    let mut bytes = encode_v1(src, sa("198.51.100.1:8443"));
    bytes.extend_from_slice(&h);
    assert_eq!(send_hello(p.addr(), &bytes).await, b"");
    assert_eq!(port_chain.wait_capture(1, WAIT).await, h);
    let mut bytes = encode_v2(src, sa("198.51.100.1:443"), &[]).expect("v2");
    bytes.extend_from_slice(&h);
    assert_eq!(send_hello(p.addr(), &bytes).await, b"");
    assert_eq!(name_chain.wait_capture(1, WAIT).await, h);
    assert_eq!(capture_counts(&[port_chain, name_chain]), [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_source_type_and_source_prefix_ranges() {
    // Sources come from PROXY protocol headers (the connections themselves
    // are all from 127.0.0.1).
    let p = start(
        json!({
            "listener_filters": [proxy_protocol(true)],
            "filter_chains": [
                chain(json!({"source_type": "SAME_IP_OR_LOOPBACK"}), vec![direct("local")]),
                chain(json!({"source_prefix_ranges": [{"address_prefix": "203.0.113.0", "prefix_len": 24}]}), vec![direct("src /24")]),
                chain(json!({"source_prefix_ranges": [{"address_prefix": "203.0.113.7", "prefix_len": 32}]}), vec![direct("src /32")]),
                chain(json!({"direct_source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}), vec![direct("direct 10/8")]),
                chain(Value::Null, vec![direct("other")]),
            ],
        }),
        vec![],
    );
    let dst = sa("198.51.100.1:80");
    for (src, want) in [
        ("203.0.113.7:1000", "src /32"),
        ("203.0.113.9:1000", "src /24"),
        ("192.0.2.1:1000", "other"),
        ("127.0.0.1:1000", "local"),
        // Envoy's loopback test is the canonical address only, not 127/8.
        ("127.0.0.9:1000", "other"),
        // Same IP as the destination counts as local.
        ("198.51.100.1:1000", "local"),
    ] {
        let body = body_after(p.addr(), &encode_v1(sa(src), dst)).await;
        assert_eq!(body, want, "source {src}");
    }
    // Without a header the source is the socket's: loopback.
    assert_eq!(body_after(p.addr(), b"").await, "local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_default_filter_chain_when_nothing_matches() {
    let [a, d] = captures::<2>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [chain(json!({"server_names": ["a.example.com"]}), vec![tcp_proxy("a", "a", json!({}))])],
            "default_filter_chain": {"filters": [tcp_proxy("default", "d", json!({}))]},
        }),
        vec![cluster("a", &[a.port()]), cluster("d", &[d.port()])],
    );
    let ha = hello("a.example.com");
    let hb = hello("b.example.com");
    assert_eq!(send_hello(p.addr(), &ha).await, b"");
    assert_eq!(send_hello(p.addr(), &hb).await, b"");
    assert_eq!(a.wait_capture(1, WAIT).await, ha);
    assert_eq!(d.wait_capture(1, WAIT).await, hb);
    assert_eq!(
        p.stat(&listener_stat(&p, "no_filter_chain_match")).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_no_match_no_default_closes_and_counts() {
    let [a] = captures::<1>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [chain(json!({"server_names": ["a.example.com"]}), vec![tcp_proxy("a", "a", json!({}))])],
        }),
        vec![cluster("a", &[a.port()])],
    );
    assert_eq!(send_hello(p.addr(), &hello("b.example.com")).await, b"");
    // Plaintext has no SNI either.
    assert_eq!(get_after(p.addr(), b"", "/", "x").await, None);
    stat_is(&p, &listener_stat(&p, "no_filter_chain_match"), 2).await;
    assert!(a.captures().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_match_does_not_backtrack_from_the_best_server_name() {
    // The a.example.com chain wins on server name, then fails on transport
    // protocol; Envoy does not fall back to the catch-all chain.
    let [a, any] = captures::<2>().await;
    let p = start(
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chains": [
                chain(
                    json!({"server_names": ["a.example.com"], "transport_protocol": "raw_buffer"}),
                    vec![tcp_proxy("a", "a", json!({}))],
                ),
                chain(Value::Null, vec![tcp_proxy("any", "any", json!({}))]),
            ],
        }),
        vec![cluster("a", &[a.port()]), cluster("any", &[any.port()])],
    );
    assert_eq!(send_hello(p.addr(), &hello("a.example.com")).await, b"");
    stat_is(&p, &listener_stat(&p, "no_filter_chain_match"), 1).await;
    // Control: another name reaches the catch-all.
    let hb = hello("b.example.com");
    assert_eq!(send_hello(p.addr(), &hb).await, b"");
    assert_eq!(any.wait_capture(1, WAIT).await, hb);
    assert_eq!(capture_counts(&[a, any]), [0, 1]);
}

// === 6. proxy_protocol ===

fn xff_log_listener(
    path: &std::path::Path,
    echo_port: u16,
    allow_without: bool,
) -> (Value, Vec<Value>) {
    let log = json!({
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": FILE_LOG, "path": path,
            "log_format": {"text_format_source": {"inline_string":
                "%REQ(:PATH)% %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% direct=%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%\n"}},
        },
    });
    let l = json!({
        "listener_filters": [proxy_protocol(allow_without)],
        "filter_chains": [chain(Value::Null, vec![hcm(
            json!([{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}]),
            json!({"use_remote_address": true, "access_log": [log]}),
        )])],
    });
    (l, vec![cluster("echo", &[echo_port])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_set_the_downstream_address() {
    let echo = upstream::http1("echo").await.expect("echo");
    let path = log_path("proxy-protocol");
    let (l, clusters) = xff_log_listener(&path, echo.port(), false);
    let p = start(l, clusters);
    let v1 = encode_v1(sa("203.0.113.7:4567"), sa("198.51.100.1:80"));
    let v2 = encode_v2(sa("[2001:db8::7]:5678"), sa("[2001:db8::1]:443"), &[]).expect("v2");
    let v2_tlv = encode_v2(
        sa("192.0.2.44:6789"),
        sa("198.51.100.2:8080"),
        &[(0x02, b"authority.example".to_vec()), (0xE0, vec![1, 2, 3])],
    )
    .expect("v2");
    for (prefix, path, xff) in [
        (&v1, "/v1", "203.0.113.7"),
        (&v2, "/v2", "2001:db8::7"),
        (&v2_tlv, "/v2-tlv", "192.0.2.44"),
    ] {
        let (status, body) = get_after(p.addr(), prefix, path, "x")
            .await
            .unwrap_or_else(|| panic!("{path}: closed"));
        assert_eq!(status, 200, "{path}: {body}");
        let v: upstream::EchoView = serde_json::from_str(&body).expect("echo body");
        assert_eq!(echo_header(&v, "x-forwarded-for"), Some(xff), "{path}");
    }
    let lines = p.log_lines(&path, 3).await;
    let addresses: Vec<&str> = lines
        .iter()
        .map(|l| l.split(" direct=").next().unwrap_or_default())
        .collect();
    assert_eq!(
        addresses,
        [
            "/v1 203.0.113.7:4567 198.51.100.1:80",
            "/v2 [2001:db8::7]:5678 [2001:db8::1]:443",
            "/v2-tlv 192.0.2.44:6789 198.51.100.2:8080",
        ]
    );
    // The directly connected peer stays the socket's.
    let direct: Vec<&str> = lines
        .iter()
        .map(|l| l.split(" direct=").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(direct, ["127.0.0.1"; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_required_unless_allowed() {
    let echo = upstream::http1("echo").await.expect("echo");
    let path = log_path("proxy-protocol-required");
    let (l, clusters) = xff_log_listener(&path, echo.port(), false);
    let strict = start(l, clusters);
    assert_eq!(get_after(strict.addr(), b"", "/none", "x").await, None);
    let path2 = log_path("proxy-protocol-allowed");
    let (l, clusters) = xff_log_listener(&path2, echo.port(), true);
    let lax = start(l, clusters);
    let (status, body) = get_after(lax.addr(), b"", "/none", "x")
        .await
        .expect("a response");
    assert_eq!(status, 200);
    let v: upstream::EchoView = serde_json::from_str(&body).expect("echo body");
    // A loopback peer: Envoy appends its own local address (the host's first
    // non-loopback IPv4 address) to x-forwarded-for instead.
    let local = weir::netif::first_non_loopback(false).expect("a non-loopback address");
    assert_eq!(
        echo_header(&v, "x-forwarded-for"),
        Some(local.to_string().as_str()),
        "{body}"
    );
    assert_eq!(
        echo_header(&v, "x-envoy-external-address"),
        Some("127.0.0.1")
    );
    // A header is still honoured when allowed.
    let v1 = encode_v1(sa("203.0.113.8:1111"), sa("198.51.100.1:80"));
    let (status, body) = get_after(lax.addr(), &v1, "/with", "x")
        .await
        .expect("a response");
    assert_eq!(status, 200);
    let v: upstream::EchoView = serde_json::from_str(&body).expect("echo body");
    assert_eq!(echo_header(&v, "x-forwarded-for"), Some("203.0.113.8"));
    stat_is(&lax, "proxy_proto.not_found_allowed", 1).await;
    stat_is(&strict, "proxy_proto.not_found_disallowed", 1).await;
    stat_is(&lax, "proxy_proto.versions.v1.found", 1).await;
}

// === 7. listener_filters_timeout ===

fn timeout_listener(
    continue_on_timeout: bool,
    source_port: u16,
    tls_port: u16,
) -> (Value, Vec<Value>) {
    (
        json!({
            "listener_filters": [tls_inspector()],
            "listener_filters_timeout": "0.3s",
            "continue_on_listener_filters_timeout": continue_on_timeout,
            "filter_chains": [
                chain(json!({"transport_protocol": "tls"}), vec![tcp_proxy("tls", "tls", json!({}))]),
                chain(json!({"transport_protocol": "raw_buffer"}), vec![tcp_proxy("raw", "source", json!({}))]),
            ],
        }),
        vec![
            cluster("source", &[source_port]),
            cluster("tls", &[tls_port]),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_filters_timeout_closes_a_silent_client() {
    let source = tcp::tcp_source_server(1000).await.expect("source");
    let [tls_up] = captures::<1>().await;
    let (l, clusters) = timeout_listener(false, source.port(), tls_up.port());
    let p = start(l, clusters);
    let started = Instant::now();
    let mut s = connect(p.addr()).await;
    assert_eq!(read_to_close(&mut s, WAIT).await, b"");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    stat_is(&p, &listener_stat(&p, "downstream_pre_cx_timeout"), 1).await;
    assert_eq!(source.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_filters_timeout_continue_reaches_the_raw_buffer_chain() {
    // A server-first protocol: the client sends nothing and waits for the
    // server's bytes.
    const LEN: u64 = 1000;
    let source = tcp::tcp_source_server(LEN).await.expect("source");
    let [tls_up] = captures::<1>().await;
    let (l, clusters) = timeout_listener(true, source.port(), tls_up.port());
    let p = start(l, clusters);
    let started = Instant::now();
    let s = connect(p.addr()).await;
    let (mut r, mut w) = s.into_split();
    let got = tokio::time::timeout(WAIT, tcp::read_verify_pattern(&mut r))
        .await
        .expect("in time")
        .expect("pattern");
    let waited = started.elapsed();
    assert_eq!(got, LEN);
    assert!(
        waited >= Duration::from_millis(250),
        "data before the timeout: {waited:?}"
    );
    w.shutdown().await.expect("shutdown");
    assert_eq!(source.wait_results(1, WAIT).await, [Ok(LEN)]);
    stat_is(&p, &listener_stat(&p, "downstream_pre_cx_timeout"), 1).await;
    assert!(tls_up.captures().is_empty());
}

// === 8. HTTPS redirects ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_require_tls_and_route_redirect() {
    // Listener l: Istio's `httpsRedirect: true` (virtual host require_tls:
    // ALL). Listener l2: a route-level `redirect: {https_redirect: true}`.
    let require_tls = json!({"filter_chains": [chain(Value::Null, vec![hcm(
        json!([{"name": "v", "domains": ["*"], "require_tls": "ALL", "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "insecure"}}}
        ]}]),
        json!({}),
    )])]});
    let route_redirect = json!({"filter_chains": [chain(Value::Null, vec![hcm(
        json!([{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "redirect": {"https_redirect": true}}
        ]}]),
        json!({}),
    )])]});
    // Two proxies rather than two listeners on one: weir rejects two
    // listeners on 127.0.0.1:0 in-process (see the report).
    let p = start(require_tls, vec![]);
    let p2 = start(route_redirect, vec![]);
    // (request line target, Host, Location from require_tls, from the route)
    let h1_cases = [
        (
            "/p?q=1",
            "example.com",
            "https://example.com/p?q=1",
            "https://example.com/p?q=1",
        ),
        (
            "/p",
            "example.com:8080",
            "https://example.com:8080/p",
            "https://example.com:8080/p",
        ),
        (
            "/p",
            "example.com:80",
            "https://example.com:80/p",
            "https://example.com/p",
        ),
        (
            "http://abs.example.com:8443/a?b",
            "ignored.example.com",
            "https://abs.example.com:8443/a?b",
            "https://abs.example.com:8443/a?b",
        ),
        (
            "http://abs.example.com/a",
            "ignored.example.com",
            "https://abs.example.com/a",
            "https://abs.example.com/a",
        ),
    ];
    for (target, host, want_l, want_l2) in h1_cases {
        for (addr, want) in [(p.addr(), want_l), (p2.addr(), want_l2)] {
            let req = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n");
            match client::http1_raw(addr, req.as_bytes(), WAIT).await {
                Outcome::Response(r) => {
                    assert_eq!(r.status, 301, "{target} {host} on {addr}");
                    assert_eq!(
                        r.header("location"),
                        Some(want),
                        "{target} {host} on {addr}"
                    );
                    assert!(r.body.is_empty());
                }
                other => panic!("{target} {host}: {other:?}"),
            }
        }
    }
    let h2_cases = [
        (
            "example.com",
            "/h2?z=1",
            "https://example.com/h2?z=1",
            "https://example.com/h2?z=1",
        ),
        (
            "example.com:8080",
            "/h2",
            "https://example.com:8080/h2",
            "https://example.com:8080/h2",
        ),
        (
            "example.com:80",
            "/h2",
            "https://example.com:80/h2",
            "https://example.com/h2",
        ),
    ];
    for (authority, path, want_l, want_l2) in h2_cases {
        for (addr, want) in [(p.addr(), want_l), (p2.addr(), want_l2)] {
            let req = H2Request {
                method: "GET".into(),
                scheme: "http".into(),
                authority: authority.into(),
                path: path.into(),
                headers: vec![],
                body: Default::default(),
            };
            match client::h2c(addr, &req, WAIT).await {
                Outcome::Response(r) => {
                    assert_eq!(r.status, 301, "h2 {authority}{path} on {addr}");
                    assert_eq!(
                        r.header("location"),
                        Some(want),
                        "h2 {authority}{path} on {addr}"
                    );
                }
                other => panic!("h2 {authority}{path}: {other:?}"),
            }
        }
    }
}

// === 9. TLS termination + tcp_proxy ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_then_plaintext_tcp_proxy() {
    let ca = TestCa::new("termination-ca");
    let leaf = ca.issue(LeafSpec::server("tcp.example.com"));
    let dir = TempDir::new("tcp-scenarios").expect("temp dir");
    let files = leaf.write_files(&dir, "server");
    // The requested server name is what tls_inspector found: without it,
    // Envoy's sni_cluster and %REQUESTED_SERVER_NAME% see no SNI even
    // though the TLS handshake had one.
    for inspector in [false, true] {
        let echo = tcp::tcp_echo_server().await.expect("echo");
        let by_sni = tcp::tcp_echo_server().await.expect("echo");
        let path = log_path(&format!("tls-termination-{inspector}"));
        let mut fc = chain(
            Value::Null,
            vec![sni_cluster(), tcp_proxy("tls_term", "echo", tcp_log(&path))],
        );
        fc["transport_socket"] = downstream_tls(&files);
        let filters = if inspector {
            vec![tls_inspector()]
        } else {
            vec![]
        };
        let p = start(
            json!({"listener_filters": filters, "filter_chains": [fc]}),
            vec![
                cluster("echo", &[echo.port()]),
                cluster("tcp.example.com", &[by_sni.port()]),
            ],
        );
        let client = TlsClient::new(&ca);
        let (mut tls, info) = client
            .connect(p.addr(), "tcp.example.com")
            .await
            .expect("handshake with the proxy");
        assert!(info.peer_cert().expect("cert").is(&leaf));
        tls.write_all(b"terminated").await.expect("write");
        let mut buf = [0u8; 10];
        tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&buf, b"terminated");
        tls.shutdown().await.expect("close_notify");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
        // The upstream saw exactly the plaintext, then EOF.
        let (up, name, sni) = if inspector {
            (&by_sni, "tcp.example.com", "tcp.example.com")
        } else {
            (&echo, "echo", "-")
        };
        assert_eq!(
            up.wait_results(1, WAIT).await,
            [Ok(10)],
            "inspector: {inspector}"
        );
        stat_is(&p, "tcp.tls_term.downstream_cx_rx_bytes_total", 10).await;
        stat_is(&p, &listener_stat(&p, "ssl.handshake"), 1).await;
        let lines = p.log_lines(&path, 1).await;
        assert_eq!(lines, [format!("- {name} {} 10 10 {sni}", up.addr())]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_hcm_requested_server_name_needs_tls_inspector() {
    let ca = TestCa::new("hcm-termination-ca");
    let leaf = ca.issue(LeafSpec::server("h.example.com"));
    let dir = TempDir::new("tcp-scenarios-hcm").expect("temp dir");
    let files = leaf.write_files(&dir, "server");
    for inspector in [false, true] {
        let path = log_path(&format!("hcm-termination-{inspector}"));
        let log = json!({
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": FILE_LOG, "path": path.display().to_string(),
                "log_format": {"text_format_source": {"inline_string":
                    "%REQ(:PATH)% %DOWNSTREAM_TLS_VERSION% sni=%REQUESTED_SERVER_NAME%\n"}},
            },
        });
        let vhosts = json!([{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "over tls"}}}
        ]}]);
        let mut fc = chain(Value::Null, vec![hcm(vhosts, json!({"access_log": [log]}))]);
        fc["transport_socket"] = downstream_tls(&files);
        let filters = if inspector {
            vec![tls_inspector()]
        } else {
            vec![]
        };
        let p = start(
            json!({"listener_filters": filters, "filter_chains": [fc]}),
            vec![],
        );
        let r = TlsClient::new(&ca)
            .get(p.addr(), "h.example.com", "/tls")
            .await
            .expect("GET over TLS");
        assert_eq!((r.status, r.text().as_str()), (200, "over tls"));
        let lines = p.log_lines(&path, 1).await;
        let (head, sni) = lines[0].split_once(" sni=").expect("log line");
        assert_eq!(head, "/tls TLSv1.3");
        let want = if inspector { "h.example.com" } else { "-" };
        assert_eq!(sni, want, "inspector: {inspector}");
    }
}

// === upstream PROXY protocol transport socket ===

/// `envoy.transport_sockets.upstream_proxy_protocol` on the cluster: the
/// upstream first receives a PROXY header with the downstream connection's
/// addresses (v1 text, v2 binary), then the client's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_upstream_proxy_protocol_header() {
    use filters::listener::{proxy_protocol as pp, Inspect};
    let echo = tcp::tcp_echo_server().await.expect("echo");
    for (name, version) in [("v1", "V1"), ("v2", "V2")] {
        let mut c = cluster(name, &[echo.port()]);
        c["transport_socket"] = json!({
            "name": "envoy.transport_sockets.upstream_proxy_protocol",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport",
                "config": {"version": version},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
                },
            },
        });
        let p = start(
            json!({"filter_chains": [chain(Value::Null, vec![tcp_proxy(name, name, json!({}))])]}),
            vec![c],
        );
        let mut s = connect(p.addr()).await;
        let client = s.local_addr().expect("local addr");
        s.write_all(b"payload").await.expect("write");
        s.shutdown().await.expect("shutdown");
        // The echo returns the header the proxy sent, then the payload.
        let got = read_to_close(&mut s, WAIT).await;
        let header = match pp::parse(&got) {
            Inspect::Done(Ok(h)) => h,
            other => panic!("{name}: no PROXY header in {got:?}: {other:?}"),
        };
        assert_eq!(header.version, if name == "v1" { 1 } else { 2 }, "{name}");
        assert_eq!(
            header.addresses,
            Some((client, p.addr())),
            "{name}: source and destination are the downstream connection's"
        );
        assert_eq!(&got[header.len..], b"payload", "{name}");
    }
}
