//! The `envoy.filters.listener.proxy_protocol` listener filter beyond the
//! addresses (which `tcp_scenarios.rs` covers): `rules` (v2 TLVs into the
//! connection's dynamic metadata), `stat_prefix` and `disallowed_versions`.
//!
//! What Envoy 1.40 does, and these tests check:
//!
//! - a TLV whose type has a rule sets `key` (in `metadata_namespace`, else
//!   `envoy.filters.listener.proxy_protocol`) to its value as a string:
//!   invalid UTF-8 bytes become `!` (`SANITIZED_UTF8`), or the value is
//!   base64 (`BASE64`); of repeated TLVs (or two types with the same key)
//!   the first in the header wins, of two rules for one type the last;
//!   `LOCAL` headers set nothing;
//! - the metadata is the *connection's*: tcp_proxy's access log and the
//!   network RBAC filter's `metadata` principals see it, HTTP streams do
//!   not (their access log prints `-`, HTTP RBAC `metadata` does not
//!   match);
//! - stats are `proxy_proto.[<stat_prefix>.]versions.v1|v2.found|
//!   disallowed|error` and `not_found_allowed|not_found_disallowed`, plus
//!   the unprefixed `downstream_cx_proxy_proto_error`;
//! - a disallowed version closes the connection (`found` and `disallowed`
//!   count, not the error counter); with
//!   `allow_requests_without_proxy_protocol` its signature is not looked
//!   for and the bytes pass on unchanged (`not_found_allowed`); all
//!   versions disallowed is a configuration error.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`:
//!
//! ```sh
//! cargo test -p weir-tests --test proxy_protocol_listener_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test proxy_protocol_listener_scenarios
//! ```
use std::net::SocketAddr;
use std::time::Duration;

use filters::listener::proxy_protocol::{encode_v1, encode_v2, encode_v2_local};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, filter, hcm, log_path, sock, stat_is, tcp_proxy, vhost,
};
use weir_tests::scenario::{Ports, Proxy, StartOptions, Target};
use weir_tests::tcp::tcp_echo_server;

const PP: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";
const NET_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const NS: &str = "envoy.filters.listener.proxy_protocol";
const SUITE: &str = "pp-listener";
const WAIT: Duration = Duration::from_secs(5);

// === helpers ===

/// The proxy_protocol listener filter with `fields`.
fn pp(fields: Value) -> Value {
    filter("envoy.filters.listener.proxy_protocol", PP, fields)
}

/// A listener named `name` on `port` with listener filters `lf` and one
/// chain of `filters`.
fn listener(name: &str, port: u16, lf: Vec<Value>, filters: Vec<Value>) -> Value {
    json!({
        "name": name, "address": sock(port),
        "listener_filters": lf,
        "filter_chains": [chain(filters)],
    })
}

/// An HCM answering 200 `ok` to everything, with `http_filters` and
/// `extra` HCM fields.
fn direct_hcm(http_filters: Vec<Value>, extra: Value) -> Value {
    hcm(
        "h",
        http_filters,
        vec![vhost(
            "v",
            vec![json!({"match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "ok"}}})],
            json!({}),
        )],
        extra,
    )
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A v2 header from 192.0.2.1:1234 to 198.51.100.1:80 with `tlvs`.
fn v2(tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let tlvs: Vec<(u8, Vec<u8>)> = tlvs.iter().map(|(t, v)| (*t, v.to_vec())).collect();
    encode_v2(sa("192.0.2.1:1234"), sa("198.51.100.1:80"), &tlvs).expect("v2")
}

fn v1() -> Vec<u8> {
    encode_v1(sa("192.0.2.9:1111"), sa("198.51.100.1:80"))
}

/// Sends `bytes` and reads until the proxy closes (bounded by [`WAIT`]).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The proxy may close before reading everything.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("the proxy closes in time");
    got
}

/// Sends `bytes` through a tcp_proxy to an echo server and reads back
/// `want` bytes (fewer if the proxy closes first; bounded by [`WAIT`]),
/// then closes. No half-close before the echo: Envoy closes a connection
/// whose peer shut down while its listener filters were still reading.
async fn echo_through(addr: SocketAddr, bytes: &[u8], want: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut got = vec![0u8; want];
    let mut n = 0;
    while n < want {
        match tokio::time::timeout(WAIT, s.read(&mut got[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => n += k,
            Err(_) => panic!("no echo in time: {:?}", &got[..n]),
        }
    }
    got.truncate(n);
    got
}

/// `GET /` (connection: close) after `prefix`: the status, or `None` when
/// the connection closed without a response.
async fn get_after(addr: SocketAddr, prefix: &[u8]) -> Option<u16> {
    let mut req = prefix.to_vec();
    req.extend_from_slice(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let got = exchange(addr, &req).await;
    let text = String::from_utf8_lossy(&got);
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?;
    Some(status.parse().expect("a status code"))
}

fn tcp_log(path: &std::path::Path) -> Value {
    json!({"access_log": [file_log(
        path,
        "%DOWNSTREAM_REMOTE_ADDRESS% pp=%DYNAMIC_METADATA(envoy.filters.listener.proxy_protocol)% \
         custom=%DYNAMIC_METADATA(ns.custom:custom)%\n",
    )]})
}

/// The RBAC policy letting only connections whose TLV set `tenant` to
/// `good` through.
fn tenant_rules() -> Value {
    json!({"action": "ALLOW", "policies": {"tenant": {
        "permissions": [{"any": true}],
        "principals": [{"metadata": {
            "filter": NS, "path": [{"key": "tenant"}],
            "value": {"string_match": {"exact": "good"}},
        }}],
    }}})
}

// === rules ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_set_connection_metadata_seen_by_the_tcp_proxy_log() {
    let echo = tcp_echo_server().await.expect("echo");
    let path = log_path(SUITE, "tcp-rules");
    let (port, log) = (echo.port(), tcp_log(&path));
    let p = Proxy::start(move |ports| {
        let rules = json!({"rules": [
            {"tlv_type": 0x01, "on_tlv_present": {"key": "alpn"}},
            {"tlv_type": 0x02, "on_tlv_present": {"key": "authority"}},
            {"tlv_type": 0xE0, "on_tlv_present": {"key": "custom", "metadata_namespace": "ns.custom"}},
            {"tlv_type": 0xE1, "on_tlv_present": {"key": "bin"}},
            {"tlv_type": 0xE2, "on_tlv_present": {"key": "b64", "value_string_encoding": "BASE64"}},
            // Two rules for one type: the last applies.
            {"tlv_type": 0xE3, "on_tlv_present": {"key": "first"}},
            {"tlv_type": 0xE3, "on_tlv_present": {"key": "second"}},
            // Two types, one key: the first TLV in the header wins.
            {"tlv_type": 0xE4, "on_tlv_present": {"key": "shared"}},
            {"tlv_type": 0xE5, "on_tlv_present": {"key": "shared"}},
            // No pair: Envoy keeps the empty key.
            {"tlv_type": 0xE6},
            {"tlv_type": 0xE7, "on_tlv_present": {"key": "empty"}},
        ]});
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![pp(rules)],
                vec![tcp_proxy("t", "echo", log.clone())],
            )],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    let header = v2(&[
        (0x01, b"h2"),
        (0x02, b"authority.example"),
        (0xE0, b"tenant-a"),
        (0xE1, b"a\xffb\xc3\x28c\xe2\x82"),
        (0xE2, b"\x00\x01\xfe"),
        (0xE3, b"x3"),
        (0xE5, b"from-e5"),
        (0xE4, b"from-e4"),
        (0xE6, b"no-pair"),
        (0xE7, b""),
        (0xEE, b"no rule"),
        // A repeated type: the first value stays.
        (0x02, b"repeated"),
    ]);
    let mut bytes = header;
    bytes.extend_from_slice(b"ping");
    assert_eq!(echo_through(p.addr(), &bytes, 4).await, b"ping");
    // No rule matches: nothing is set.
    let mut bytes = v2(&[(0xEE, b"x")]);
    bytes.extend_from_slice(b"pong");
    assert_eq!(echo_through(p.addr(), &bytes, 4).await, b"pong");
    // A LOCAL header's TLVs are skipped; v1 has none.
    let mut local = encode_v2_local();
    local.truncate(14);
    let tlv = [0xE0, 0, 5, b'l', b'o', b'c', b'a', b'l'];
    local.extend_from_slice(&(tlv.len() as u16).to_be_bytes());
    local.extend_from_slice(&tlv);
    local.extend_from_slice(b"local");
    assert_eq!(echo_through(p.addr(), &local, 5).await, b"local");
    let mut bytes = v1();
    bytes.extend_from_slice(b"v1");
    assert_eq!(echo_through(p.addr(), &bytes, 2).await, b"v1");

    let lines = p.log_lines(&path, 4).await;
    let want_pp = json!({
        "": "no-pair", "alpn": "h2", "authority": "authority.example", "b64": "AAH+",
        "bin": "a!b!(c!!", "empty": "", "second": "x3", "shared": "from-e5",
    });
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (with, mut without): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|l| l.contains(" pp={"));
    let (addr, rest) = with[0].split_once(" pp=").expect("pp=");
    assert_eq!(addr, "192.0.2.1:1234");
    let (md, custom) = rest.split_once(" custom=").expect("custom=");
    let md: Value = serde_json::from_str(md).unwrap_or_else(|e| panic!("{md}: {e}"));
    assert_eq!(md, want_pp);
    assert_eq!(custom, "tenant-a");
    without.sort();
    // LOCAL keeps the socket's own address.
    assert!(
        without[0].starts_with("127.0.0.1:") && without[0].ends_with(" pp=- custom=-"),
        "{without:?}"
    );
    assert_eq!(
        without[1..],
        [
            "192.0.2.1:1234 pp=- custom=-",
            "192.0.2.9:1111 pp=- custom=-"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_streams_do_not_see_connection_metadata() {
    let path = log_path(SUITE, "http-rules");
    let log = path.to_path_buf();
    let p = Proxy::start(move |ports| {
        let rules = json!({"rules": [
            {"tlv_type": 0x02, "on_tlv_present": {"key": "authority"}},
            {"tlv_type": 0xE0, "on_tlv_present": {"key": "tenant"}},
        ]});
        let fmt = "%DOWNSTREAM_REMOTE_ADDRESS% pp=%DYNAMIC_METADATA(envoy.filters.listener.proxy_protocol)% \
                   authority=%DYNAMIC_METADATA(envoy.filters.listener.proxy_protocol:authority)%\n";
        let open = direct_hcm(vec![], json!({"access_log": [file_log(&log, fmt)]}));
        let rbac = direct_hcm(
            vec![filter(
                "envoy.filters.http.rbac",
                HTTP_RBAC,
                json!({"rules": tenant_rules()}),
            )],
            json!({}),
        );
        bootstrap(
            ports,
            vec![
                listener("l", ports.listen, vec![pp(rules.clone())], vec![open]),
                listener("l2", ports.listen2, vec![pp(rules)], vec![rbac]),
            ],
            vec![],
        )
    });
    let header = v2(&[(0x02, b"authority.example"), (0xE0, b"good")]);
    assert_eq!(get_after(p.addr(), &header).await, Some(200));
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, ["192.0.2.1:1234 pp=- authority=-"]);
    // HTTP RBAC's `metadata` principal reads the stream's metadata, which
    // starts empty: the connection's TLV does not let the request through.
    assert_eq!(get_after(p.addr2(), &header).await, Some(403));
    stat_is(&p, "http.h.rbac.denied", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rbac_metadata_principal_sees_the_tlv() {
    let p = Proxy::start(move |ports| {
        let rules = json!({"rules": [{"tlv_type": 0xE0, "on_tlv_present": {"key": "tenant"}}]});
        let rbac = filter(
            "envoy.filters.network.rbac",
            NET_RBAC,
            json!({"stat_prefix": "r", "rules": tenant_rules()}),
        );
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![pp(rules)],
                vec![rbac, direct_hcm(vec![], json!({}))],
            )],
            vec![],
        )
    });
    assert_eq!(
        get_after(p.addr(), &v2(&[(0xE0, b"good")])).await,
        Some(200)
    );
    assert_eq!(get_after(p.addr(), &v2(&[(0xE0, b"bad")])).await, None);
    assert_eq!(get_after(p.addr(), &v2(&[])).await, None);
    assert_eq!(get_after(p.addr(), &v2(&[(0xE1, b"good")])).await, None);
    stat_is(&p, "r.rbac.allowed", 1).await;
    stat_is(&p, "r.rbac.denied", 3).await;
}

// === stats ===

const COUNTERS: [&str; 8] = [
    "versions.v1.found",
    "versions.v1.disallowed",
    "versions.v1.error",
    "versions.v2.found",
    "versions.v2.disallowed",
    "versions.v2.error",
    "not_found_allowed",
    "not_found_disallowed",
];

async fn counters(p: &Proxy, root: &str) -> Vec<Option<i64>> {
    let mut out = Vec::new();
    for c in COUNTERS {
        out.push(p.stat(&format!("{root}{c}")).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_with_and_without_stat_prefix() {
    let p = Proxy::start(move |ports| {
        let app = || vec![direct_hcm(vec![], json!({}))];
        bootstrap(
            ports,
            vec![
                listener(
                    "l",
                    ports.listen,
                    vec![pp(json!({"stat_prefix": "pfx"}))],
                    app(),
                ),
                listener(
                    "l2",
                    ports.listen2,
                    vec![pp(json!({"allow_requests_without_proxy_protocol": true}))],
                    app(),
                ),
            ],
            vec![],
        )
    });
    // Every counter exists (0) before any connection.
    assert_eq!(counters(&p, "proxy_proto.pfx.").await, vec![Some(0); 8]);
    assert_eq!(counters(&p, "proxy_proto.").await, vec![Some(0); 8]);
    assert_eq!(p.stat("downstream_cx_proxy_proto_error").await, Some(0));

    assert_eq!(get_after(p.addr(), &v1()).await, Some(200));
    assert_eq!(get_after(p.addr(), &v2(&[])).await, Some(200));
    assert_eq!(get_after(p.addr(), &v2(&[])).await, Some(200));
    assert_eq!(get_after(p.addr(), b"").await, None);
    assert_eq!(get_after(p.addr(), b"PROXY TCP4 nope\r\n").await, None);
    let mut bad_family = v2(&[]);
    bad_family[13] = 0x31;
    assert_eq!(get_after(p.addr(), &bad_family).await, None);

    assert_eq!(get_after(p.addr2(), b"").await, Some(200));
    assert_eq!(get_after(p.addr2(), &v2(&[])).await, Some(200));

    stat_is(&p, "downstream_cx_proxy_proto_error", 3).await;
    stat_is(&p, "proxy_proto.pfx.versions.v2.error", 1).await;
    assert_eq!(
        counters(&p, "proxy_proto.pfx.").await,
        [1, 0, 1, 2, 0, 1, 0, 1].map(Some)
    );
    assert_eq!(
        counters(&p, "proxy_proto.").await,
        [0, 0, 0, 1, 0, 0, 1, 0].map(Some)
    );
}

// === disallowed_versions ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_versions_close_or_pass_through() {
    let echo = tcp_echo_server().await.expect("echo");
    let path = log_path(SUITE, "disallowed");
    let (port, log) = (echo.port(), tcp_log(&path));
    let p = Proxy::start(move |ports| {
        let proxy = || vec![tcp_proxy("t", "echo", log.clone())];
        bootstrap(
            ports,
            vec![
                listener(
                    "l",
                    ports.listen,
                    vec![pp(
                        json!({"stat_prefix": "strict", "disallowed_versions": ["V1"]}),
                    )],
                    proxy(),
                ),
                listener(
                    "l2",
                    ports.listen2,
                    vec![pp(json!({
                        "stat_prefix": "lax", "disallowed_versions": ["V2"],
                        "allow_requests_without_proxy_protocol": true,
                    }))],
                    proxy(),
                ),
            ],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    let with = |mut header: Vec<u8>, data: &[u8]| {
        header.extend_from_slice(data);
        header
    };
    // Strict, v1 disallowed: closed once the line is in, parsed or not.
    assert_eq!(exchange(p.addr(), &with(v1(), b"x")).await, b"");
    assert_eq!(exchange(p.addr(), b"PROXY garbage\r\nx").await, b"");
    assert_eq!(
        echo_through(p.addr(), &with(v2(&[]), b"v2"), 2).await,
        b"v2"
    );
    stat_is(&p, "proxy_proto.strict.versions.v1.disallowed", 2).await;
    stat_is(&p, "proxy_proto.strict.versions.v1.found", 2).await;
    assert_eq!(
        p.stat("proxy_proto.strict.versions.v1.error").await,
        Some(0)
    );
    assert_eq!(p.stat("downstream_cx_proxy_proto_error").await, Some(0));
    stat_is(&p, "proxy_proto.strict.versions.v2.found", 1).await;

    // Lax, v2 disallowed: a v2 header is payload, passed on unchanged.
    let header = v2(&[(0xE0, b"v")]);
    let bytes = with(header, b"after");
    assert_eq!(echo_through(p.addr2(), &bytes, bytes.len()).await, bytes);
    assert_eq!(echo_through(p.addr2(), &with(v1(), b"v1"), 2).await, b"v1");
    stat_is(&p, "proxy_proto.lax.not_found_allowed", 1).await;
    stat_is(&p, "proxy_proto.lax.versions.v1.found", 1).await;
    assert_eq!(p.stat("proxy_proto.lax.versions.v2.found").await, Some(0));
    assert_eq!(
        p.stat("proxy_proto.lax.versions.v2.disallowed").await,
        Some(0)
    );

    let mut lines = p.log_lines(&path, 3).await;
    lines.sort();
    assert_eq!(lines.len(), 3, "{lines:?}");
    // The v2 header passed through: the socket's own address.
    assert!(lines[0].starts_with("127.0.0.1:"), "{lines:?}");
    assert_eq!(
        lines[1..],
        [
            "192.0.2.1:1234 pp=- custom=-",
            "192.0.2.9:1111 pp=- custom=-"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_versions_disallowed_is_a_configuration_error() {
    let config = |ports: &Ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![pp(json!({"disallowed_versions": ["V1", "V2"]}))],
                vec![direct_hcm(vec![], json!({}))],
            )],
            vec![],
        )
    };
    let target = Target::from_env();
    let err = match Proxy::try_start(target, StartOptions::default(), config) {
        Ok(_) => panic!("{target:?} started with every version disallowed"),
        Err(e) => format!("{e:#}"),
    };
    if target == Target::InProcess {
        assert!(
            err.contains("disallowed_versions: all PROXY protocol versions are disallowed"),
            "{err}"
        );
    }
}
