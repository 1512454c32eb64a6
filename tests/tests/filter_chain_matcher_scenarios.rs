//! A listener's `filter_chain_matcher` (the xDS matcher API selecting a
//! filter chain by name), the `xds.type.matcher.v3.IPMatcher` tree, the
//! network inputs (destination IP and port, server name, transport and
//! application protocol, filter state) and listener filters'
//! `filter_disabled`, on real TCP listeners bound to `0.0.0.0:P` and reached
//! through different 127.0.0.x destination addresses (Linux routes all of
//! 127/8 to lo).
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`; the expectations are
//! Envoy's, checked against it:
//!
//! ```sh
//! cargo test -p weir-tests --test filter_chain_matcher_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test filter_chain_matcher_scenarios
//! ```
//!
//! Each chain identifies itself: an HCM answering with its own body, or a
//! tcp_proxy to its own upstream.
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::client::{self, H2Request, Outcome};
use weir_tests::config::{merge, sock, stat_is, tcp_proxy};
use weir_tests::scenario::{Ports, Proxy, StartOptions, Target};
use weir_tests::tcp::{self, HelloCapture};
use weir_tests::tls::TlsClient;

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const NET_SET_FILTER_STATE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config";

/// How long a single read in these tests may wait.
const WAIT: Duration = Duration::from_secs(5);

// === bootstrap building ===

/// A bootstrap whose listener `l` (stat prefix `fcm`) binds `0.0.0.0:port`
/// with the fields of `l`.
fn bootstrap(p: &Ports, port: u16, l: &Value, clusters: &[Value]) -> String {
    let l = merge(
        json!({
            "name": "l", "stat_prefix": "fcm",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        }),
        l.clone(),
    );
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": [l], "clusters": clusters},
    })
    .to_string()
}

/// Starts the target with listener `l` on `port` (chosen up front: the
/// port map tests name it).
fn start(port: u16, l: Value, clusters: Vec<Value>) -> Proxy {
    Proxy::start(move |p| bootstrap(p, port, &l, &clusters))
}

fn try_start(l: Value) -> anyhow::Result<Proxy> {
    let port = weir_tests::free_port();
    Proxy::try_start(Target::from_env(), StartOptions::default(), move |p| {
        bootstrap(p, port, &l, &[])
    })
}

/// A STATIC cluster on 127.0.0.1 `port`.
fn cluster(name: &str, port: u16) -> Value {
    weir_tests::config::cluster(name, &[port], json!({}))
}

/// A named filter chain with `filters`.
fn named(name: &str, filters: Vec<Value>) -> Value {
    json!({"name": name, "filters": filters})
}

/// An HCM answering every request with 200 and `body`.
fn direct(body: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM, "stat_prefix": "ingress",
            "route_config": {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
            ]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
        },
    })
}

/// A chain named `name` answering HTTP with body `name`.
fn http_chain(name: &str) -> Value {
    named(name, vec![direct(name)])
}

/// A chain named `name` proxying TCP to cluster `name`.
fn tcp_chain(name: &str) -> Value {
    named(name, vec![tcp_proxy(name, name, json!({}))])
}

fn listener_filter(name: &str, ty: &str) -> Value {
    json!({"name": name, "typed_config": {"@type": format!("type.googleapis.com/{ty}")}})
}

fn tls_inspector() -> Value {
    listener_filter(
        "envoy.filters.listener.tls_inspector",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    )
}

fn http_inspector() -> Value {
    listener_filter(
        "envoy.filters.listener.http_inspector",
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    )
}

// === matcher building ===

/// A network input (`DestinationIPInput`, ...).
fn input(ty: &str) -> Value {
    json!({"name": ty, "typed_config": {
        "@type": format!("type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.{ty}"),
    }})
}

/// `on_match` selecting chain `name`.
fn to(name: &str) -> Value {
    json!({"action": {"name": "chain", "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": name,
    }}})
}

/// `on_match` running a nested matcher.
fn nested(m: Value) -> Value {
    json!({ "matcher": m })
}

/// A matcher with `on_no_match` unless null.
fn with_no_match(mut m: Value, on_no_match: Value) -> Value {
    if !on_no_match.is_null() {
        m["on_no_match"] = on_no_match;
    }
    m
}

/// An exact match map on `input`.
fn exact(input: Value, map: Value, on_no_match: Value) -> Value {
    with_no_match(
        json!({"matcher_tree": {"input": input, "exact_match_map": {"map": map}}}),
        on_no_match,
    )
}

/// One `IPRangeMatcher`: CIDR ranges, `exclusive`, `on_match`.
fn ranges(cidrs: &[(&str, u32)], exclusive: bool, on_match: Value) -> Value {
    let r: Vec<Value> = cidrs
        .iter()
        .map(|(a, l)| json!({"address_prefix": a, "prefix_len": l}))
        .collect();
    json!({"ranges": r, "exclusive": exclusive, "on_match": on_match})
}

/// An IP tree (`xds.type.matcher.v3.IPMatcher`) on `input`.
fn ip_tree(input: Value, range_matchers: Vec<Value>, on_no_match: Value) -> Value {
    with_no_match(
        json!({"matcher_tree": {"input": input, "custom_match": {
            "name": "ip",
            "typed_config": {
                "@type": "type.googleapis.com/xds.type.matcher.v3.IPMatcher",
                "range_matchers": range_matchers,
            },
        }}}),
        on_no_match,
    )
}

/// A matcher that never matches here: no connection has this SNI.
fn never() -> Value {
    exact(
        input("ServerNameInput"),
        json!({"never.example": to("nowhere")}),
        Value::Null,
    )
}

// === clients ===

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s
}

/// Reads until EOF or a reset; panics if still open after `within`.
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

/// `GET /` over HTTP/1.1 to `ip:port`: the body of a 200, or `None` when
/// the connection closes without a response.
async fn get(ip: &str, port: u16) -> Option<String> {
    let mut s = connect(format!("{ip}:{port}").parse().expect("addr")).await;
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let got = read_to_close(&mut s, WAIT).await;
    if got.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").expect("a complete response");
    Some(body.to_owned())
}

/// The body `ip:port` answers, panicking on a close.
async fn body(ip: &str, port: u16) -> String {
    get(ip, port)
        .await
        .unwrap_or_else(|| panic!("{ip}:{port} closed without a response"))
}

/// An h2c (prior knowledge) `GET /` to `addr`: the body of a 200.
async fn h2c_body(addr: SocketAddr) -> String {
    let req = H2Request {
        method: "GET".into(),
        scheme: "http".into(),
        authority: "x".into(),
        path: "/".into(),
        headers: vec![],
        body: Default::default(),
    };
    match client::h2c(addr, &req, WAIT).await {
        Outcome::Response(r) => {
            assert_eq!(r.status, 200);
            String::from_utf8_lossy(&r.body).into_owned()
        }
        other => panic!("h2c: {other:?}"),
    }
}

/// Sends a ClientHello and reads until the proxy closes.
async fn send_hello(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut s = connect(addr).await;
    s.write_all(hello).await.expect("write hello");
    read_to_close(&mut s, WAIT).await
}

/// A ClientHello for `sni` offering `alpn`.
fn hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
    TlsClient::builder()
        .insecure()
        .alpn(alpn)
        .build()
        .client_hello(sni)
}

/// Hello-capture servers, one per TLS chain.
async fn captures<const N: usize>() -> [HelloCapture; N] {
    let mut v = Vec::with_capacity(N);
    for _ in 0..N {
        v.push(tcp::hello_capture_server().await.expect("capture server"));
    }
    v.try_into().unwrap_or_else(|_| unreachable!())
}

fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// === the IP tree ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_tree_longest_prefix_first_and_nested_fall_through() {
    // 127.0.0.2/32 has a nested matcher that does not match: Envoy falls
    // back to the next longest range containing the address (/24).
    // 127.0.0.3/32 wins over /24 and /8; declaration order does not matter.
    let port = weir_tests::free_port();
    let m = ip_tree(
        input("DestinationIPInput"),
        vec![
            ranges(&[("127.0.0.0", 8)], false, to("c8")),
            ranges(&[("127.0.0.0", 24)], false, to("c24")),
            ranges(&[("127.0.0.2", 32)], false, nested(never())),
            ranges(&[("127.0.0.3", 32)], false, to("c32")),
        ],
        to("none"),
    );
    let p = start(
        port,
        json!({
            "filter_chain_matcher": m,
            "filter_chains": [http_chain("c8"), http_chain("c24"), http_chain("c32"), http_chain("none")],
        }),
        vec![],
    );
    assert_eq!(body("127.0.0.3", port).await, "c32");
    assert_eq!(body("127.0.0.2", port).await, "c24");
    assert_eq!(body("127.0.0.9", port).await, "c24");
    assert_eq!(body("127.0.1.1", port).await, "c8");
    stat_is(&p, "listener.fcm.no_filter_chain_match", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_tree_exclusive_range_is_skipped_after_a_longer_one() {
    // An `exclusive` range is not tried when a longer range was tried
    // first, even one whose nested matcher did not match: 127.0.0.2 skips
    // the exclusive /24 and lands on /8. As the only (longest) candidate
    // the exclusive /24 still matches.
    let port = weir_tests::free_port();
    let m = ip_tree(
        input("DestinationIPInput"),
        vec![
            ranges(&[("127.0.0.2", 32)], false, nested(never())),
            ranges(&[("127.0.0.0", 24)], true, to("x24")),
            ranges(&[("127.0.0.0", 8)], false, to("c8")),
        ],
        Value::Null,
    );
    let p = start(
        port,
        json!({
            "filter_chain_matcher": m,
            "filter_chains": [http_chain("x24"), http_chain("c8")],
        }),
        vec![],
    );
    assert_eq!(body("127.0.0.2", port).await, "c8");
    assert_eq!(body("127.0.0.5", port).await, "x24");
    assert_eq!(body("127.0.2.1", port).await, "c8");
    stat_is(&p, "listener.fcm.no_filter_chain_match", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_shaped_ip_then_port_then_application_protocol() {
    // The shape of istiod's waypoint `main_internal` listener: destination
    // IP tree → destination port map → application protocol map (keys as
    // Envoy renders the list: `'http/1.1'`, `'h2c'`), on_no_match a TCP
    // chain. http_inspector reports HTTP/1.0 as `http/1.0`: no key, so TCP.
    let port = weir_tests::free_port();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let by_protocol = exact(
        input("ApplicationProtocolInput"),
        json!({"'http/1.1'": to("http"), "'h2c'": to("h2c")}),
        to("tcp"),
    );
    let m = ip_tree(
        input("DestinationIPInput"),
        vec![
            ranges(
                &[("127.0.0.2", 32)],
                false,
                nested(exact(
                    input("DestinationPortInput"),
                    json!({ port.to_string(): nested(by_protocol) }),
                    Value::Null,
                )),
            ),
            ranges(
                &[("127.0.0.3", 32)],
                false,
                nested(exact(
                    input("DestinationPortInput"),
                    json!({"1": to("http")}),
                    Value::Null,
                )),
            ),
        ],
        Value::Null,
    );
    let p = start(
        port,
        json!({
            "listener_filters": [http_inspector()],
            "filter_chain_matcher": m,
            "filter_chains": [http_chain("http"), http_chain("h2c"), tcp_chain("tcp")],
            "default_filter_chain": {"filters": [direct("default")]},
        }),
        vec![cluster("tcp", echo.port())],
    );
    assert_eq!(body("127.0.0.2", port).await, "http");
    assert_eq!(
        h2c_body(SocketAddr::from(([127, 0, 0, 2], port))).await,
        "h2c"
    );
    // HTTP/1.0 reaches the TCP chain: the echo upstream returns the request.
    let req = b"GET / HTTP/1.0\r\n\r\n";
    let mut s = connect(SocketAddr::from(([127, 0, 0, 2], port))).await;
    s.write_all(req).await.expect("write");
    let mut back = vec![0u8; req.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&back[..], &req[..]);
    drop(s);
    // 127.0.0.3: the port map has no entry for this port, the tree no
    // on_no_match: the default chain.
    assert_eq!(body("127.0.0.3", port).await, "default");
    stat_is(&p, "http_inspector.http11_found", 2).await;
    stat_is(&p, "http_inspector.http2_found", 1).await;
    stat_is(&p, "http_inspector.http10_found", 1).await;
}

// === other inputs ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_protocols_from_tls_alpn_render_as_a_quoted_list() {
    // tls_inspector's ALPN list, as Envoy renders it: every protocol
    // quoted, comma separated, in the client's order. No ALPN: no data,
    // so on_no_match.
    let port = weir_tests::free_port();
    let [both, h1, other] = captures::<3>().await;
    let m = exact(
        input("ApplicationProtocolInput"),
        json!({"'h2','http/1.1'": to("both"), "'http/1.1'": to("h1")}),
        to("other"),
    );
    let _p = start(
        port,
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chain_matcher": m,
            "filter_chains": [tcp_chain("both"), tcp_chain("h1"), tcp_chain("other")],
        }),
        vec![
            cluster("both", both.port()),
            cluster("h1", h1.port()),
            cluster("other", other.port()),
        ],
    );
    let h = hello("alpn.example.com", &["h2", "http/1.1"]);
    assert_eq!(send_hello(lo(port), &h).await, b"");
    assert_eq!(both.wait_capture(1, WAIT).await, h);
    let h = hello("alpn.example.com", &["http/1.1"]);
    assert_eq!(send_hello(lo(port), &h).await, b"");
    assert_eq!(h1.wait_capture(1, WAIT).await, h);
    // The other order is another key.
    let h = hello("alpn.example.com", &["http/1.1", "h2"]);
    assert_eq!(send_hello(lo(port), &h).await, b"");
    assert_eq!(other.wait_capture(1, WAIT).await, h);
    let h = hello("alpn.example.com", &[]);
    assert_eq!(send_hello(lo(port), &h).await, b"");
    assert_eq!(other.wait_capture(2, WAIT).await, h);
    assert_eq!(both.captures().len(), 1);
    assert_eq!(h1.captures().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_protocol_and_server_name_inputs() {
    // TransportProtocolInput is `tls` after tls_inspector found a
    // ClientHello and `raw_buffer` otherwise (Envoy sets the default before
    // chain selection). Under `tls`, ServerNameInput picks by SNI; an SNI
    // without a key has no on_no_match here: the default chain.
    let port = weir_tests::free_port();
    let [a, dflt] = captures::<2>().await;
    let m = exact(
        input("TransportProtocolInput"),
        json!({
            "tls": nested(exact(input("ServerNameInput"), json!({"a.example.com": to("a")}), Value::Null)),
            "raw_buffer": to("plain"),
        }),
        Value::Null,
    );
    let p = start(
        port,
        json!({
            "listener_filters": [tls_inspector()],
            "filter_chain_matcher": m,
            "filter_chains": [tcp_chain("a"), http_chain("plain")],
            "default_filter_chain": {"filters": [tcp_proxy("dflt", "dflt", json!({}))]},
        }),
        vec![cluster("a", a.port()), cluster("dflt", dflt.port())],
    );
    assert_eq!(body("127.0.0.1", port).await, "plain");
    let ha = hello("a.example.com", &["h2"]);
    assert_eq!(send_hello(lo(port), &ha).await, b"");
    assert_eq!(a.wait_capture(1, WAIT).await, ha);
    let hb = hello("b.example.com", &["h2"]);
    assert_eq!(send_hello(lo(port), &hb).await, b"");
    assert_eq!(dflt.wait_capture(1, WAIT).await, hb);
    assert_eq!(a.captures().len(), 1);
    stat_is(&p, "listener.fcm.no_filter_chain_match", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_state_input_does_not_see_the_chains_own_filter_state() {
    // The matcher runs before the chain's network filters: a network
    // set_filter_state in the chain cannot steer its own selection (on a
    // TCP listener nothing sets connection filter state earlier), so the
    // FilterStateInput has no data and on_no_match decides.
    let port = weir_tests::free_port();
    let set = json!({
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": {"@type": NET_SET_FILTER_STATE, "on_new_connection": [{
            "object_key": "fcm.key", "factory_key": "envoy.string",
            "format_string": {"text_format_source": {"inline_string": "yes"}},
        }]},
    });
    let m = json!({
        "matcher_list": {"matchers": [{
            "predicate": {"single_predicate": {
                "input": json!({"name": "fs", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
                    "key": "fcm.key",
                }}),
                "value_match": {"exact": "yes"},
            }},
            "on_match": to("state"),
        }]},
        "on_no_match": to("no_state"),
    });
    let _p = start(
        port,
        json!({
            "filter_chain_matcher": m,
            "filter_chains": [
                named("state", vec![set.clone(), direct("state")]),
                named("no_state", vec![set, direct("no_state")]),
            ],
        }),
        vec![],
    );
    assert_eq!(body("127.0.0.1", port).await, "no_state");
    assert_eq!(body("127.0.0.1", port).await, "no_state");
}

/// `GET /` from `src` (a loopback address the client binds) to
/// `dst:port`: the body of the 200.
async fn body_from(src: [u8; 4], dst: [u8; 4], port: u16) -> String {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((src, 0))).expect("bind");
    let mut s = sock
        .connect(SocketAddr::from((dst, port)))
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let got = String::from_utf8_lossy(&read_to_close(&mut s, WAIT).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    got.split_once("\r\n\r\n").expect("complete").1.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_type_input_is_local_for_loopback_or_the_same_ip() {
    // SourceTypeInput gives `local` for Envoy's isSameIpOrLoopback (the
    // canonical loopback address, or source IP = destination IP) and no
    // data otherwise; other 127/8 sources are not loopback to Envoy.
    let port = weir_tests::free_port();
    let m = exact(
        input("SourceTypeInput"),
        json!({"local": to("local")}),
        to("external"),
    );
    let _p = start(
        port,
        json!({
            "filter_chain_matcher": m,
            "filter_chains": [http_chain("local"), http_chain("external")],
        }),
        vec![],
    );
    assert_eq!(
        body_from([127, 0, 0, 1], [127, 0, 0, 6], port).await,
        "local"
    );
    assert_eq!(
        body_from([127, 0, 0, 7], [127, 0, 0, 7], port).await,
        "local"
    );
    assert_eq!(
        body_from([127, 0, 0, 5], [127, 0, 0, 6], port).await,
        "external"
    );
}

// === no chain ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_match_naming_no_chain_closes_even_with_a_default_chain() {
    // Envoy resolves the action's name among `filter_chains` when a
    // connection matches: an unknown name, or the default chain's name
    // (the default chain is not among them), selects no chain: closed and
    // counted, without falling back to the default chain. No match at all
    // does take the default chain.
    let port = weir_tests::free_port();
    let m = ip_tree(
        input("DestinationIPInput"),
        vec![
            ranges(&[("127.0.0.2", 32)], false, to("missing")),
            ranges(&[("127.0.0.3", 32)], false, to("dflt")),
            ranges(&[("127.0.0.4", 32)], false, to("known")),
        ],
        Value::Null,
    );
    let p = start(
        port,
        json!({
            "filter_chain_matcher": m,
            "filter_chains": [http_chain("known")],
            "default_filter_chain": {"name": "dflt", "filters": [direct("default")]},
        }),
        vec![],
    );
    assert_eq!(body("127.0.0.4", port).await, "known");
    assert_eq!(get("127.0.0.2", port).await, None);
    assert_eq!(get("127.0.0.3", port).await, None);
    assert_eq!(body("127.0.0.5", port).await, "default");
    stat_is(&p, "listener.fcm.no_filter_chain_match", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_match_without_a_default_chain_closes_and_counts() {
    let port = weir_tests::free_port();
    let m = exact(
        input("DestinationIPInput"),
        json!({"127.0.0.2": to("two")}),
        Value::Null,
    );
    let p = start(
        port,
        json!({"filter_chain_matcher": m, "filter_chains": [http_chain("two")]}),
        vec![],
    );
    assert_eq!(body("127.0.0.2", port).await, "two");
    assert_eq!(get("127.0.0.3", port).await, None);
    stat_is(&p, "listener.fcm.no_filter_chain_match", 1).await;
}

// === filter_disabled ===

/// Connects to a listener whose only listener filter is http_inspector with
/// `filter_disabled: disabled`, in front of a server-first upstream. When
/// the inspector is disabled the upstream's bytes arrive at once; otherwise
/// the inspector waits for the client (nothing within 300 ms), and sending
/// non-HTTP bytes lets the connection through. Returns whether it was
/// disabled.
async fn http_inspector_disabled_by(disabled: impl Fn(u16) -> Value) -> bool {
    const LEN: u64 = 1000;
    let port = weir_tests::free_port();
    let upstream = tcp::tcp_source_server(LEN).await.expect("source");
    let mut inspector = http_inspector();
    inspector["filter_disabled"] = disabled(port);
    let p = start(
        port,
        json!({
            "listener_filters": [inspector],
            "listener_filters_timeout": "10s",
            "filter_chains": [tcp_chain("src")],
        }),
        vec![cluster("src", upstream.port())],
    );
    let mut s = connect(lo(port)).await;
    let mut buf = vec![0u8; LEN as usize];
    let first = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf[..1])).await;
    let was_disabled = match first {
        Ok(Ok(1)) => true,
        Ok(other) => panic!("read {other:?}"),
        Err(_) => {
            // The inspector waits for the client's first bytes.
            s.write_all(b"\x00\x01not http\r\n").await.expect("write");
            let n = tokio::time::timeout(WAIT, s.read(&mut buf[..1]))
                .await
                .expect("data after the inspector")
                .expect("read");
            assert_eq!(n, 1);
            false
        }
    };
    tokio::time::timeout(WAIT, s.read_exact(&mut buf[1..]))
        .await
        .expect("the rest in time")
        .expect("the rest");
    assert_eq!(tcp::check_pattern(0, &buf), Ok(()));
    let not_found = if was_disabled { 0 } else { 1 };
    stat_is(&p, "http_inspector.http_not_found", not_found).await;
    was_disabled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_disabled_skips_http_inspector_for_a_server_first_port() {
    let range =
        |start: u32, end: u32| json!({"destination_port_range": {"start": start, "end": end}});
    // [port, port + 1) holds the port; the end is exclusive.
    assert!(http_inspector_disabled_by(|p| range(p.into(), u32::from(p) + 1)).await);
    assert!(!http_inspector_disabled_by(|p| range(u32::from(p) + 1, u32::from(p) + 2)).await);
    assert!(!http_inspector_disabled_by(|p| range(u32::from(p) - 1, p.into())).await);
    assert!(http_inspector_disabled_by(|_| json!({"any_match": true})).await);
    assert!(!http_inspector_disabled_by(|_| json!({"not_match": {"any_match": true}})).await);
    assert!(
        http_inspector_disabled_by(|p| json!({"and_match": {"rules": [
            range(1, 65535),
            {"not_match": range(u32::from(p) + 1, 65535)},
        ]}}))
        .await
    );
    assert!(
        !http_inspector_disabled_by(|p| json!({"or_match": {"rules": [
            range(1, p.into()),
            range(u32::from(p) + 1, 65535),
        ]}}))
        .await
    );
}

// === configuration ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matcher_ignores_filter_chain_match_and_its_duplicates() {
    // With a matcher, Envoy ignores the chains' `filter_chain_match`
    // (logged at debug level), so identical ones are no error and a chain
    // whose criteria would never match is still selected by name.
    let port = weir_tests::free_port();
    let mut a = http_chain("a");
    a["filter_chain_match"] = json!({"server_names": ["only.example.com"]});
    let mut b = http_chain("b");
    b["filter_chain_match"] = json!({"server_names": ["only.example.com"]});
    let m = exact(
        input("DestinationIPInput"),
        json!({"127.0.0.2": to("a")}),
        to("b"),
    );
    let _p = start(
        port,
        json!({"filter_chain_matcher": m, "filter_chains": [a, b]}),
        vec![],
    );
    assert_eq!(body("127.0.0.2", port).await, "a");
    assert_eq!(body("127.0.0.3", port).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configurations_are_rejected_by_both() {
    let m = exact(
        input("DestinationIPInput"),
        json!({"127.0.0.2": to("a")}),
        Value::Null,
    );
    let bool_action = json!({"matcher_tree": {"input": input("DestinationIPInput"), "exact_match_map": {"map": {
        "127.0.0.2": {"action": {"name": "b", "typed_config": {
            "@type": "type.googleapis.com/google.protobuf.BoolValue", "value": true}}},
    }}}});
    let empty_ranges = ip_tree(
        input("DestinationIPInput"),
        vec![json!({"ranges": [], "on_match": to("a")})],
        Value::Null,
    );
    let mut one_rule = http_inspector();
    one_rule["filter_disabled"] = json!({"or_match": {"rules": [{"any_match": true}]}});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a chain without a name",
            json!({"filter_chain_matcher": m, "filter_chains": [http_chain("a"), {"filters": [direct("x")]}]}),
            "filter_chains[1].name",
        ),
        (
            "two chains with one name",
            json!({"filter_chain_matcher": m, "filter_chains": [http_chain("a"), http_chain("a")]}),
            "filter_chains[1].name",
        ),
        (
            "an action that is no StringValue",
            json!({"filter_chain_matcher": bool_action, "filter_chains": [http_chain("a")]}),
            "map[\"127.0.0.2\"].action.typed_config",
        ),
        (
            "an IP range matcher without ranges",
            json!({"filter_chain_matcher": empty_ranges, "filter_chains": [http_chain("a")]}),
            "range_matchers[0].ranges",
        ),
        (
            "a predicate set with one rule",
            json!({"listener_filters": [one_rule], "filter_chains": [http_chain("a")]}),
            "listener_filters[0].filter_disabled.or_match.rules",
        ),
    ];
    for (what, l, field) in cases {
        let Err(e) = try_start(l) else {
            panic!("{what}: accepted");
        };
        if !Target::from_env().is_envoy() {
            let e = format!("{e:#}");
            assert!(e.contains(field), "{what}: {field} not in {e}");
        }
    }
}
