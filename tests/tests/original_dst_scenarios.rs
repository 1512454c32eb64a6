//! `ORIGINAL_DST` clusters (`lb_policy: CLUSTER_PROVIDED`, Istio's
//! `connect_originate` shape): each request or connection names where it
//! goes (filter state `envoy.network.transport_socket.original_dst_address`,
//! the `use_http_header` header, or the connection's local address restored
//! by a listener filter), `upstream_port_override` replaces the port, and the
//! cluster makes a host per destination, removed after `cleanup_interval`
//! when unused.
//!
//! Upstreams listen on other loopback addresses (127.0.0.2, 127.0.0.3, all
//! local) on one shared port and report their name, so the destination a
//! proxy picked is visible in the answer. Every test runs against weir
//! in-process by default and against real Envoy 1.40 with
//! `WEIR_SCENARIO_TARGET=envoy`, which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test original_dst_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test original_dst_scenarios
//! ```
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{
    bootstrap, chain, file_log, filter, h2_upstream, hcm, log_path, route, stat_is, tcp_proxy,
    vhost, wait_stat, UPSTREAM_TLS,
};
use weir_tests::scenario::{Ports, Proxy, StartOptions, Target};
use weir_tests::tls::{LeafSpec, TestCa, TlsServerOptions};
use weir_tests::upstream::{echo_at, EchoServer, EchoView, Proto};

const KEY: &str = "envoy.network.transport_socket.original_dst_address";
const NET_SFS: &str =
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config";
const HTTP_SFS: &str =
    "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config";
const PROXY_PROTOCOL: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";
const WAIT: Duration = Duration::from_secs(10);
const LOG: &str = "%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST%\n";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Two HTTP echo upstreams, `up2` on 127.0.0.2 and `up3` on 127.0.0.3, on
/// the same port (returned).
async fn upstream_pair(proto: Proto) -> (EchoServer, EchoServer, u16) {
    for _ in 0..20 {
        let a = echo_at("up2", proto, SocketAddr::new(ip(2), 0))
            .await
            .expect("bind 127.0.0.2");
        let port = a.port();
        if let Ok(b) = echo_at("up3", proto, SocketAddr::new(ip(3), port)).await {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// The ORIGINAL_DST cluster `od` (`lb`: its `original_dst_lb_config`;
/// `extra`: more fields).
fn od_cluster(lb: Value, extra: Value) -> Value {
    weir_tests::config::merge(
        json!({
            "name": "od", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "1s", "original_dst_lb_config": lb,
        }),
        extra,
    )
}

/// A listener named `name` on `ip:port`.
fn listener_at(name: &str, ip: IpAddr, port: u16, chains: Vec<Value>, extra: Value) -> Value {
    weir_tests::config::merge(
        json!({"name": name,
               "address": {"socket_address": {"address": ip.to_string(), "port_value": port}},
               "filter_chains": chains}),
        extra,
    )
}

/// Listener `l` (HTTP, `h`) on 127.0.0.2 and `l2` (`tcp_proxy` to `od`)
/// on 127.0.0.3, each naming the address the client connected to as the
/// original destination.
fn loopback_listeners(ports: &Ports, h: &Value) -> Vec<Value> {
    let sfs = net_sfs("%DOWNSTREAM_LOCAL_ADDRESS%");
    vec![
        listener_at(
            "l",
            ip(2),
            ports.listen,
            vec![chain(vec![sfs.clone(), h.clone()])],
            json!({}),
        ),
        listener_at(
            "l2",
            ip(3),
            ports.listen2,
            vec![chain(vec![sfs, tcp_proxy("odtcp", "od", json!({}))])],
            json!({}),
        ),
    ]
}

/// The network `set_filter_state` filter setting the original destination
/// from `format` at connection start.
fn net_sfs(format: &str) -> Value {
    filter(
        "envoy.filters.network.set_filter_state",
        NET_SFS,
        json!({"on_new_connection": [{
            "object_key": KEY,
            "format_string": {"text_format_source": {"inline_string": format}},
        }]}),
    )
}

/// The HTTP `set_filter_state` filter setting the original destination
/// from `format` on request headers.
fn http_sfs(format: &str) -> Value {
    filter(
        "envoy.filters.http.set_filter_state",
        HTTP_SFS,
        json!({"on_request_headers": [{
            "object_key": KEY,
            "format_string": {"text_format_source": {"inline_string": format}},
        }]}),
    )
}

/// An HCM routing everything to `od`, with HTTP `filters` and an access log.
fn od_hcm(filters: Vec<Value>, log: &std::path::Path) -> Value {
    hcm(
        "ingress",
        filters,
        vec![vhost("vh", vec![route("/", "od", json!({}))], json!({}))],
        json!({"access_log": [file_log(log, LOG)]}),
    )
}

/// Where listener `l` (or `l2`) of `p` is, on `ip`: in-process the bound
/// port, for a process the chosen one.
fn at(p: &Proxy, ip: IpAddr, second: bool) -> SocketAddr {
    let a = if second { p.addr2() } else { p.addr() };
    SocketAddr::new(ip, a.port())
}

/// One HTTP/1.1 request (`connection: close`) on a fresh connection to
/// `addr`, after `prefix` bytes (a PROXY protocol header); the status and
/// body (status 0 when the connection closed without an answer).
async fn get(addr: SocketAddr, prefix: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = prefix.to_vec();
    req.extend_from_slice(b"GET /od HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The upstream that answered (`""` when the answer is not an echo).
fn upstream_of(body: &str) -> String {
    serde_json::from_str::<EchoView>(body)
        .map(|v| v.upstream)
        .unwrap_or_default()
}

/// The `/clusters` lines of cluster `od`.
async fn od_clusters(p: &Proxy) -> Vec<String> {
    let r = p.admin("GET", "/clusters").await;
    r.text()
        .lines()
        .filter(|l| l.starts_with("od::"))
        .map(str::to_owned)
        .collect()
}

/// A PROXY protocol v1 header from 10.1.1.1:4000 to `dst`.
fn pp_v1(dst: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 10.1.1.1 {} 4000 {}\r\n", dst.ip(), dst.port()).into_bytes()
}

/// The local address a PROXY protocol header restores is the destination
/// (Envoy's `localAddressRestored()`), with `upstream_port_override`; a
/// connection without the header has no restored address: 503 `UH` (as
/// Envoy: the address a client connected to is not a destination unless a
/// listener filter restored it). Hosts show in `/clusters` with Envoy's
/// host names (cluster name and address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_local_address_with_port_override() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "restored");
    let h = od_hcm(vec![], &log);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![h.clone()])],
                json!({"listener_filters": [{
                    "name": "envoy.filters.listener.proxy_protocol",
                    "typed_config": {"@type": PROXY_PROTOCOL, "allow_requests_without_proxy_protocol": true},
                }]}),
            )],
            vec![od_cluster(
                json!({"upstream_port_override": port}),
                json!({}),
            )],
        )
    });
    let l = at(&p, ip(1), false);
    for (last, want) in [(2, "up2"), (3, "up3"), (2, "up2")] {
        let (status, body) = get(l, &pp_v1(SocketAddr::new(ip(last), 80)), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(upstream_of(&body), want, "{body}");
    }
    // No PROXY header: the local address was not restored.
    let (status, body) = get(l, b"", &[]).await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    let lines = p.log_lines(&log, 4).await;
    assert_eq!(
        lines,
        vec![
            format!("200 - 127.0.0.2:{port}"),
            format!("200 - 127.0.0.3:{port}"),
            format!("200 - 127.0.0.2:{port}"),
            "503 UH -".to_owned(),
        ]
    );
    let c = od_clusters(&p).await;
    for last in [2, 3] {
        let h = format!("od::127.0.0.{last}:{port}");
        for line in [
            format!("{h}::hostname::od127.0.0.{last}:{port}"),
            format!("{h}::health_flags::healthy"),
            format!("{h}::weight::1"),
            format!("{h}::priority::0"),
            format!("{h}::rq_active::0"),
        ] {
            assert!(c.contains(&line), "{line}: {c:#?}");
        }
    }
    assert_eq!(
        wait_stat(&p, "cluster.od.membership_total", |v| v == Some(2)).await,
        Some(2)
    );
    assert_eq!(p.stat("cluster.od.membership_healthy").await, Some(2));
    // Hosts made on demand are no discovery update.
    assert_eq!(p.stat("cluster.od.update_success").await, Some(0));
}

/// Listeners on two loopback addresses whose network `set_filter_state`
/// names the address the client connected to: each reaches the upstream
/// on its own address (the override port), for HTTP and for `tcp_proxy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_listeners_name_their_address_in_filter_state() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "loopback");
    let h = od_hcm(vec![], &log);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            loopback_listeners(ports, &h),
            vec![od_cluster(
                json!({"upstream_port_override": port}),
                json!({}),
            )],
        )
    });
    let (status, body) = get(at(&p, ip(2), false), b"", &[]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up2"),
        "{body}"
    );
    // tcp_proxy: the raw HTTP request goes through to 127.0.0.3.
    let (status, body) = get(at(&p, ip(3), true), b"", &[]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up3"),
        "{body}"
    );
    assert_eq!(p.stat("tcp.odtcp.downstream_cx_total").await, Some(1));
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(lines, vec![format!("200 - 127.0.0.2:{port}")]);
}

/// The HTTP `set_filter_state` object and the `use_http_header` header:
/// filter state first, then the header (first value); an invalid header
/// counts `original_dst_host_invalid` and gives no host; neither gives no
/// host (503 `UH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_filter_state_then_header() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "header");
    let h = od_hcm(vec![http_sfs("%REQ(x-target)%")], &log);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![h.clone()])],
                json!({}),
            )],
            vec![od_cluster(json!({"use_http_header": true}), json!({}))],
        )
    });
    let l = at(&p, ip(1), false);
    let t2 = format!("127.0.0.2:{port}");
    let t3 = format!("127.0.0.3:{port}");
    type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (vec![("x-envoy-original-dst-host", &t2)], 200, "up2"),
        (vec![("x-target", &t3)], 200, "up3"),
        // Filter state wins over the header.
        (
            vec![("x-target", &t3), ("x-envoy-original-dst-host", &t2)],
            200,
            "up3",
        ),
        // Not `ip:port`: no object is set, the header decides.
        (
            vec![("x-target", "nope"), ("x-envoy-original-dst-host", &t2)],
            200,
            "up2",
        ),
        (
            vec![("x-envoy-original-dst-host", "not-an-address")],
            503,
            "",
        ),
        (vec![], 503, ""),
    ];
    for (headers, status, up) in &cases {
        let (s, body) = get(l, b"", headers).await;
        assert_eq!(
            (s, upstream_of(&body).as_str()),
            (*status, *up),
            "{headers:?}: {body}"
        );
    }
    assert_eq!(
        p.stat("cluster.od.original_dst_host_invalid").await,
        Some(1)
    );
    let lines = p.log_lines(&log, cases.len()).await;
    assert_eq!(lines.last().map(String::as_str), Some("503 UH -"));
}

/// TLS origination to ORIGINAL_DST hosts: HTTP/2 over TLS with the
/// cluster's SAN matcher checked against each destination's certificate
/// (127.0.0.2 presents the expected SPIFFE identity, 127.0.0.3 another: 503
/// `UF`), SNI from the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_checks_each_destinations_san() {
    let ca = TestCa::new("od-ca");
    let good = ca.issue(LeafSpec::spiffe("spiffe://td/ns/a/sa/two").ip(ip(2)));
    let other = ca.issue(LeafSpec::spiffe("spiffe://td/ns/a/sa/three").ip(ip(3)));
    let (a, port) = {
        let mut r = None;
        for _ in 0..20 {
            let a = weir_tests::tls::tls_upstream(
                TlsServerOptions::new("tls2", &good).bind(SocketAddr::new(ip(2), 0)),
            )
            .await
            .expect("tls upstream");
            let port = a.addr().port();
            if let Ok(b) = weir_tests::tls::tls_upstream(
                TlsServerOptions::new("tls3", &other).bind(SocketAddr::new(ip(3), port)),
            )
            .await
            {
                r = Some(((a, b), port));
                break;
            }
        }
        r.expect("a port on both addresses")
    };
    let log = log_path("original_dst", "tls");
    let h = od_hcm(vec![], &log);
    let ca_pem = ca.pem();
    let p = Proxy::start(move |ports| {
        let tls = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS, "sni": "od.example",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": {"inline_string": ca_pem},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/a/sa/two"}},
                    ],
                },
            },
        }});
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![h.clone()])],
                json!({}),
            )],
            vec![od_cluster(
                json!({"use_http_header": true}),
                h2_upstream(json!({"transport_socket": tls})),
            )],
        )
    });
    let l = at(&p, ip(1), false);
    let (status, body) = get(
        l,
        b"",
        &[("x-envoy-original-dst-host", &format!("127.0.0.2:{port}"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: EchoView = serde_json::from_str(&body).expect("echo");
    assert_eq!(
        (v.upstream.as_str(), v.version.as_str()),
        ("tls2", "HTTP/2.0")
    );
    let (status, _) = get(
        l,
        b"",
        &[("x-envoy-original-dst-host", &format!("127.0.0.3:{port}"))],
    )
    .await;
    assert_eq!(status, 503);
    let lines = p.log_lines(&log, 2).await;
    assert_eq!(
        lines,
        vec![
            format!("200 - 127.0.0.2:{port}"),
            format!("503 UF 127.0.0.3:{port}")
        ]
    );
    assert_eq!(
        a.0.last_connection().and_then(|r| r.sni).as_deref(),
        Some("od.example")
    );
}

/// Hosts not picked for a `cleanup_interval` and holding no connection are
/// removed (gone from `/clusters`, `membership_total` back to 0); a host
/// with an open `tcp_proxy` connection stays until it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_hosts_are_cleaned_up() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "cleanup");
    let h = od_hcm(vec![], &log);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            loopback_listeners(ports, &h),
            vec![od_cluster(
                json!({"upstream_port_override": port}),
                // Long enough that a loaded machine sees the host before
                // its first cleanup.
                json!({"cleanup_interval": "1.5s",
                       // Pooled connections go quickly, so nothing keeps
                       // the HTTP host.
                       "common_http_protocol_options": {"idle_timeout": "0.2s"}}),
            )],
        )
    });
    // An HTTP request to 127.0.0.2, and a tcp_proxy connection to
    // 127.0.0.3 held open.
    let (status, _) = get(at(&p, ip(2), false), b"", &[]).await;
    assert_eq!(status, 200);
    let mut held = tokio::net::TcpStream::connect(at(&p, ip(3), true))
        .await
        .expect("connect");
    held.write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, held.read(&mut buf))
        .await
        .expect("answer")
        .expect("read");
    assert!(n > 0);
    let host2 = format!("od::127.0.0.2:{port}::");
    let host3 = format!("od::127.0.0.3:{port}::");
    let c = od_clusters(&p).await;
    assert!(c.iter().any(|l| l.starts_with(&host2)), "{c:#?}");
    assert!(c.iter().any(|l| l.starts_with(&host3)), "{c:#?}");
    // The idle HTTP host goes; the held one stays.
    let mut gone = false;
    for _ in 0..50 {
        let c = od_clusters(&p).await;
        if !c.iter().any(|l| l.starts_with(&host2)) {
            assert!(c.iter().any(|l| l.starts_with(&host3)), "{c:#?}");
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "127.0.0.2 was not cleaned up");
    // Still held after more intervals.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let c = od_clusters(&p).await;
    assert!(c.iter().any(|l| l.starts_with(&host3)), "{c:#?}");
    drop(held);
    let v = wait_stat(&p, "cluster.od.membership_total", |v| v == Some(0)).await;
    let v = match v {
        Some(0) => v,
        _ => {
            tokio::time::sleep(Duration::from_secs(4)).await;
            p.stat("cluster.od.membership_total").await
        }
    };
    assert_eq!(v, Some(0));
    assert!(od_clusters(&p).await.iter().all(|l| !l.starts_with(&host3)));
    // A new request makes the host again.
    let (status, _) = get(at(&p, ip(2), false), b"", &[]).await;
    assert_eq!(status, 200);
}

/// Invalid ORIGINAL_DST configurations are refused at startup by both
/// proxies; weir names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_rejected() {
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"name": "od", "type": "ORIGINAL_DST", "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s"}),
            "static_resources.clusters[0].lb_policy",
            "Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'",
        ),
        (
            json!({"name": "od", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"}),
            "static_resources.clusters[0].lb_policy",
            "cluster provided LB specified but cluster 'od' did not provide one",
        ),
        (
            od_cluster(
                json!({}),
                json!({"load_assignment": {"cluster_name": "od"}}),
            ),
            "static_resources.clusters[0].load_assignment",
            "ORIGINAL_DST clusters must have no load assignment configured",
        ),
        (
            od_cluster(json!({"http_header_name": "x-dst"}), json!({})),
            "static_resources.clusters[0].original_dst_lb_config.http_header_name",
            "Set use_http_header to true if http_header_name is desired",
        ),
        (
            od_cluster(json!({"upstream_port_override": 70000}), json!({})),
            "static_resources.clusters[0].original_dst_lb_config.upstream_port_override",
            "less than or equal to 65535",
        ),
        (
            od_cluster(json!({}), json!({"cleanup_interval": "0s"})),
            "static_resources.clusters[0].cleanup_interval",
            "greater than 0s",
        ),
    ];
    let target = Target::from_env();
    for (cluster, path, text) in cases {
        let c = cluster.clone();
        let r = Proxy::try_start(target, StartOptions::default(), move |ports| {
            bootstrap(ports, vec![], vec![c.clone()])
        });
        let Err(e) = r else {
            panic!("{target:?} accepted {cluster}");
        };
        let msg = format!("{e:#}");
        if !target.is_envoy() {
            assert!(msg.contains(path) && msg.contains(text), "{msg}");
        }
    }
}

/// A PROXY protocol v2 header (TCP4) from 10.1.1.1:4000 to `dst` with
/// `tlvs`.
fn pp_v2(dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = vec![10, 1, 1, 1];
    match dst.ip() {
        IpAddr::V4(v) => body.extend_from_slice(&v.octets()),
        IpAddr::V6(_) => panic!("v4 only"),
    }
    body.extend_from_slice(&4000u16.to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    for (t, v) in tlvs {
        body.push(*t);
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// `metadata_key`: a string in the connection's dynamic metadata (here a
/// PROXY protocol TLV the listener filter's `rules` store) names the
/// destination, before the restored local address, for `tcp_proxy` and
/// for HTTP (Envoy reads the connection's metadata after the request's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_key_names_the_destination() {
    metadata_key_case(false).await;
    metadata_key_case(true).await;
}

async fn metadata_key_case(http: bool) {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "metadata");
    let network = if http {
        od_hcm(vec![], &log)
    } else {
        tcp_proxy("odtcp", "od", json!({}))
    };
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![network.clone()])],
                json!({"listener_filters": [{
                    "name": "envoy.filters.listener.proxy_protocol",
                    "typed_config": {"@type": PROXY_PROTOCOL, "rules": [
                        {"tlv_type": 224, "on_tlv_present": {"metadata_namespace": "od", "key": "dst"}},
                    ]},
                }]}),
            )],
            vec![od_cluster(
                json!({"metadata_key": {"key": "od", "path": [{"key": "dst"}]}}),
                json!({}),
            )],
        )
    });
    let l = at(&p, ip(1), false);
    let t3 = format!("127.0.0.3:{port}");
    // The TLV wins over the restored local address (127.0.0.2).
    let hdr = pp_v2(SocketAddr::new(ip(2), port), &[(224, t3.as_bytes())]);
    let (status, body) = get(l, &hdr, &[]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up3"),
        "{body}"
    );
    // Without the TLV the restored local address decides.
    let hdr = pp_v2(SocketAddr::new(ip(2), port), &[]);
    let (status, body) = get(l, &hdr, &[]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up2"),
        "{body}"
    );
    // Not `ip:port`: counted, then the local address.
    let hdr = pp_v2(SocketAddr::new(ip(2), port), &[(224, b"nope")]);
    let (status, body) = get(l, &hdr, &[]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up2"),
        "{body}"
    );
    assert_eq!(
        p.stat("cluster.od.original_dst_host_invalid").await,
        Some(1)
    );
}

/// CONNECT termination (the HBONE shape) to an ORIGINAL_DST cluster: the
/// HTTP `set_filter_state` turns the CONNECT authority into the
/// destination; the tunnel reaches that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_the_authority() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![http_sfs("%REQ(:AUTHORITY)%")],
            vec![json!({"name": "vh", "domains": ["*"], "routes": [{
                "match": {"connect_matcher": {}},
                "route": {"cluster": "od", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
            }]})],
            json!({"upgrade_configs": [{"upgrade_type": "CONNECT"}],
                   "http2_protocol_options": {"allow_connect": true}}),
        );
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![h])],
                json!({}),
            )],
            vec![od_cluster(json!({}), json!({}))],
        )
    });
    let c = weir_tests::tunnel::H2Conn::h2c(at(&p, ip(1), false))
        .await
        .expect("h2c");
    for (last, want) in [(3, "up3"), (2, "up2")] {
        let mut o = c
            .connect(&format!("127.0.0.{last}:{port}"), &[])
            .await
            .expect("CONNECT");
        assert_eq!(o.status, 200);
        o.stream
            .write_all(b"GET /t HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let got = tokio::time::timeout(WAIT, o.stream.read_all(1 << 16))
            .await
            .expect("answer in time")
            .expect("read");
        let text = String::from_utf8_lossy(&got);
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        assert_eq!(upstream_of(body), want, "{text}");
    }
}

/// Circuit breakers apply to ORIGINAL_DST hosts: at `max_connections`
/// tcp_proxy closes the next connection (`upstream_cx_overflow`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_apply() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(2),
                ports.listen,
                vec![chain(vec![
                    net_sfs("%DOWNSTREAM_LOCAL_ADDRESS%"),
                    tcp_proxy("odtcp", "od", json!({})),
                ])],
                json!({}),
            )],
            vec![od_cluster(
                json!({"upstream_port_override": port}),
                json!({"circuit_breakers": {"thresholds": [{"max_connections": 1}]}}),
            )],
        )
    });
    let l = at(&p, ip(2), false);
    let mut held = tokio::net::TcpStream::connect(l).await.expect("connect");
    held.write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, held.read(&mut buf))
        .await
        .expect("answer")
        .expect("read");
    assert!(n > 0);
    let (status, _) = get(l, b"", &[]).await;
    assert_eq!(status, 0, "the second connection is closed");
    assert_eq!(p.stat("cluster.od.upstream_cx_overflow").await, Some(1));
    drop(held);
}

/// Active health checks and outlier detection are accepted, as Envoy:
/// hosts made on demand are checked once the cluster knows them, and their
/// health does not decide the pick (the destination does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_run_on_made_hosts() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "hc");
    let h = od_hcm(vec![], &log);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![h.clone()])],
                json!({}),
            )],
            vec![od_cluster(
                json!({"use_http_header": true}),
                json!({
                    "health_checks": [{"timeout": "1s", "interval": "0.2s",
                        "unhealthy_threshold": 1, "healthy_threshold": 1,
                        "http_health_check": {"path": "/healthz"}}],
                    "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 100},
                }),
            )],
        )
    });
    let l = at(&p, ip(1), false);
    let t2 = format!("127.0.0.2:{port}");
    assert_eq!(p.stat("cluster.od.health_check.attempt").await, Some(0));
    let (status, body) = get(l, b"", &[("x-envoy-original-dst-host", &t2)]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up2"),
        "{body}"
    );
    let n = wait_stat(&p, "cluster.od.health_check.success", |v| {
        v.unwrap_or(0) > 0
    })
    .await;
    assert!(n.unwrap_or(0) > 0, "{n:?}");
    // A 5xx ejects the host, which is still picked (ORIGINAL_DST looks at
    // the destination only).
    let (status, _) = get(
        l,
        b"",
        &[("x-envoy-original-dst-host", &t2), ("x-echo-status", "503")],
    )
    .await;
    assert_eq!(status, 503);
    stat_is(&p, "cluster.od.outlier_detection.ejections_active", 1).await;
    let (status, body) = get(l, b"", &[("x-envoy-original-dst-host", &t2)]).await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "up2"),
        "{body}"
    );
}

/// A request mirrored to an ORIGINAL_DST cluster goes where its headers
/// say (`use_http_header`): the shadow reaches 127.0.0.3 while the request
/// itself is answered by the route's cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_follows_the_header() {
    let (_a, b, port) = upstream_pair(Proto::Http1).await;
    let main = weir_tests::upstream::http1("main").await.expect("main");
    let main_port = main.port();
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost(
                "vh",
                vec![route(
                    "/",
                    "main",
                    json!({"route": {"cluster": "main", "request_mirror_policies": [{"cluster": "od"}]}}),
                )],
                json!({}),
            )],
            json!({}),
        );
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(1),
                ports.listen,
                vec![chain(vec![h])],
                json!({}),
            )],
            vec![
                od_cluster(json!({"use_http_header": true}), json!({})),
                weir_tests::config::cluster("main", &[main_port], json!({})),
            ],
        )
    });
    let t3 = format!("127.0.0.3:{port}");
    let (status, body) = get(
        at(&p, ip(1), false),
        b"",
        &[("x-envoy-original-dst-host", &t3)],
    )
    .await;
    assert_eq!(
        (status, upstream_of(&body).as_str()),
        (200, "main"),
        "{body}"
    );
    let seen = tokio::time::timeout(WAIT, b.wait_requests(1))
        .await
        .expect("the shadow arrives");
    assert_eq!(seen[0].path, "/od");
}

/// A pooled (idle, keep-alive) upstream connection keeps its host across
/// cleanup rounds: only the cluster's idle timeout lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_keeps_its_host() {
    let (_a, _b, port) = upstream_pair(Proto::Http1).await;
    let log = log_path("original_dst", "pooled");
    let h = od_hcm(vec![], &log);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener_at(
                "l",
                ip(2),
                ports.listen,
                vec![chain(vec![
                    net_sfs("%DOWNSTREAM_LOCAL_ADDRESS%"),
                    h.clone(),
                ])],
                json!({}),
            )],
            vec![od_cluster(
                json!({"upstream_port_override": port}),
                json!({"cleanup_interval": "0.3s"}),
            )],
        )
    });
    let (status, _) = get(at(&p, ip(2), false), b"", &[]).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let host = format!("od::127.0.0.2:{port}::hostname::od127.0.0.2:{port}");
    let c = od_clusters(&p).await;
    assert!(c.contains(&host), "{c:#?}");
    assert_eq!(p.stat("cluster.od.membership_total").await, Some(1));
}
