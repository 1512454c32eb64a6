//! HBONE termination as istiod configures it: the waypoint's
//! `connect_terminate` listener, field for field as in
//! `../shared/fixtures/istio/waypoint/waypoint_configdump.json` (TLS 1.3
//! only, ALPN h2, client certificate required and validated against
//! `ROOTCA` with a URI-SAN prefix matcher, certificates by SDS name,
//! HTTP/2 `max_concurrent_streams: 100` with `allow_connect` and
//! keepalive PINGs, `stream_idle_timeout: 0s`, XFCC `APPEND_FORWARD`, the
//! `connect_authority` `set_filter_state` filter, the CONNECT route), with
//! the SDS secrets `default` and `ROOTCA` static in the bootstrap and the
//! route's cluster `main_internal` a STATIC TCP cluster (the internal
//! listener is another piece of work). Traffic comes from
//! [`weir_tests::hbone::HboneClient`], a client shaped after ztunnel (mTLS
//! with a SPIFFE certificate, no SNI, many CONNECT streams on one HTTP/2
//! connection, `baggage`/`forwarded`/`traceparent` headers), and from raw
//! HTTP/2 frames for what such a client never sends.
//!
//! Every test runs against weir in-process and against Envoy 1.40
//! (`WEIR_SCENARIO_TARGET=envoy`), which is where the expectations come
//! from, except the Istio peer metadata filter
//! (`waypoint_downstream_peer_metadata`): it is istio/proxy's, not
//! Envoy's, so it is in the chain for weir only and its test is weir only.
//!
//! ```sh
//! cargo test -p weir-tests --test hbone_terminate_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test hbone_terminate_scenarios
//! ```
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_tests::config::{cluster, file_log, filter, log_path, sock};
use weir_tests::hbone::raw::{self, Answer, RawConn};
use weir_tests::hbone::{read_n, H2Conn, H2Tunnel, HboneClient};
use weir_tests::scenario::{Proxy, Target};
use weir_tests::tcp;
use weir_tests::tls::{LeafSpec, TestCa, TlsClient, TlsVersions};
use weir_tests::waypoint::{connect_terminate_to, Mesh, CLIENT_ID, WAYPOINT_ID};

const WAIT: Duration = Duration::from_secs(10);
const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";

/// A client with another identity from the mesh's root.
fn client_as(m: &Mesh, id: &str) -> HboneClient {
    HboneClient::new(&m.ca, &m.ca.issue(LeafSpec::spiffe(id)))
}

/// What a test varies around the fixed `connect_terminate` shape.
struct Opts {
    /// `main_internal`'s endpoints (127.0.0.1 ports).
    upstream: Vec<u16>,
    /// HTTP filters after `connect_authority`, before the router.
    filters: Vec<Value>,
    /// `connection_keepalive` interval and timeout (istiod: 10 s / 20 s).
    keepalive: (&'static str, &'static str),
    access_log: Option<(PathBuf, &'static str)>,
}

impl Opts {
    fn to(port: u16) -> Opts {
        Opts {
            upstream: vec![port],
            filters: vec![],
            keepalive: ("10s", "20s"),
            access_log: None,
        }
    }
}

/// istiod's `connect_terminate` (named `l` for the harness; the shared
/// waypoint builder's) with the test's filters, keepalive and access log,
/// and the static secrets and cluster it needs.
fn waypoint(m: &Mesh, o: Opts) -> Proxy {
    let secrets = m.secrets();
    Proxy::start(move |ports| {
        let mut listener = connect_terminate_to(ports.listen, "main_internal", &None);
        let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
        let filters = hcm["http_filters"].as_array_mut().expect("http filters");
        // [connect_authority, router]: the test's filters go between.
        for (i, f) in o.filters.iter().enumerate() {
            filters.insert(1 + i, f.clone());
        }
        if !Target::from_env().is_envoy() {
            filters.insert(
                0,
                json!({"name": "waypoint_downstream_peer_metadata", "typed_config": {
                    "@type": TYPED_STRUCT,
                    "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
                    "value": {
                        "downstream_discovery": [{"baggage": {}}, {"workload_discovery": {}}],
                        "shared_with_upstream": true,
                    },
                }}),
            );
        }
        hcm["http2_protocol_options"]["connection_keepalive"] =
            json!({"interval": o.keepalive.0, "timeout": o.keepalive.1});
        if let Some((path, format)) = &o.access_log {
            hcm["access_log"] = json!([file_log(path, format)]);
        }
        json!({
            "admin": {"address": sock(ports.admin)},
            "static_resources": {
                "listeners": [listener],
                "clusters": [cluster("main_internal", &o.upstream, json!({}))],
                "secrets": secrets,
            },
        })
        .to_string()
    })
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The headers ztunnel sends with its CONNECT.
fn ztunnel_headers(peer: SocketAddr) -> Vec<(String, String)> {
    vec![
        (
            "baggage".into(),
            "k8s.deployment.name=productpage-v1,service.name=productpage,service.version=v1,\
             k8s.namespace.name=app,k8s.cluster.name=Kubernetes"
                .into(),
        ),
        ("forwarded".into(), format!("for={}", peer.ip())),
        (
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        ),
    ]
}

async fn connect_z(c: &H2Conn, authority: &str) -> weir_tests::hbone::Opened {
    let peer: SocketAddr = "10.244.0.7:0".parse().expect("addr");
    let h = ztunnel_headers(peer);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    c.connect(authority, &h).await.expect("CONNECT")
}

/// Writes `msg` into the tunnel and reads the same back.
async fn echo_once(t: &mut H2Tunnel, msg: &[u8]) {
    t.write_all(msg).await.expect("write");
    let got = read_n(t, msg.len(), WAIT).await.expect("echo");
    assert_eq!(got, msg);
}

/// The exact shape loads and tunnels: TLS 1.3, ALPN h2, the waypoint's
/// SPIFFE identity, no SNI; CONNECT `VIP:PORT` with ztunnel's headers is
/// 200 without content-length; bytes echo; the client's half-close ends
/// the tunnel cleanly. The access log shows the filter state
/// `connect_authority` set, as Envoy renders it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_shape_tunnels_and_sets_filter_state() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let path = log_path("hbone", "state");
    let mut o = Opts::to(echo.port());
    o.access_log = Some((
        path.to_path_buf(),
        "%RESPONSE_CODE% %FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)% \
         %FILTER_STATE(io.istio.peer_principal:PLAIN)% %FILTER_STATE(io.istio.local_principal:PLAIN)% \
         %FILTER_STATE(io.istio.peer_principal)% %DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_LOCAL_URI_SAN% \
         %BYTES_RECEIVED% %BYTES_SENT%\n",
    ));
    let p = waypoint(&m, o);
    let (c, tls) = m.client().connect(p.addr()).await.expect("HBONE");
    assert_eq!(tls.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(tls.alpn.as_deref(), Some(&b"h2"[..]));
    let server = tls.server_cert.expect("server cert");
    assert_eq!(server.uri_sans, vec![WAYPOINT_ID.to_owned()]);
    let mut o = connect_z(&c, "10.96.1.201:9080").await;
    assert_eq!(o.status, 200);
    assert!(o.headers.get("content-length").is_none(), "{:?}", o.headers);
    // `server_name`, a date, nothing else (as Envoy).
    assert_eq!(o.headers.len(), 2, "{:?}", o.headers);
    assert_eq!(o.headers["server"], "istio-envoy");
    assert!(o.headers.contains_key("date"));
    echo_once(&mut o.stream, b"hello through hbone").await;
    o.stream.shutdown().await.expect("END_STREAM");
    let rest = tokio::time::timeout(WAIT, o.stream.read_all(64))
        .await
        .expect("EOF in time")
        .expect("clean end");
    assert!(rest.is_empty());
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(
        lines,
        vec![format!(
            "200 10.96.1.201:9080 {CLIENT_ID} {WAYPOINT_ID} \"{CLIENT_ID}\" {CLIENT_ID} {WAYPOINT_ID} 19 19"
        )]
    );
    assert!(!c.is_closed());
}

/// The address objects and their string/typed forms: the remote address
/// object is the client's address; `%FILTER_STATE(key)%` (typed) of an
/// address object renders as Envoy does. A host name authority (valid
/// CONNECT) tunnels but is no address, so `local_ip` is not set; a
/// port with a `+` and leading zeros is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_objects_in_the_access_log() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let path = log_path("hbone", "address");
    let mut o = Opts::to(echo.port());
    o.access_log = Some((
        path.to_path_buf(),
        "%REQ(:AUTHORITY)% %FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)% \
         %FILTER_STATE(envoy.filters.listener.original_dst.local_ip)% \
         %FILTER_STATE(envoy.filters.listener.original_dst.remote_ip:PLAIN)% %DOWNSTREAM_REMOTE_ADDRESS%\n",
    ));
    let p = waypoint(&m, o);
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    for a in [
        "10.96.1.201:9080",
        "[fd00::1]:80",
        "reviews.app:9080",
        "10.0.0.1:+080",
    ] {
        let mut o = connect_z(&c, a).await;
        assert_eq!(o.status, 200, "{a}");
        o.stream.shutdown().await.expect("END_STREAM");
        let _ = o.stream.read_all(64).await;
    }
    let lines = p.log_lines(&path, 4).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    let fields: Vec<Vec<&str>> = lines.iter().map(|l| l.split(' ').collect()).collect();
    for f in &fields {
        // remote_ip is the client's address, as DOWNSTREAM_REMOTE_ADDRESS.
        assert_eq!(f[3], f[4], "{f:?}");
        assert!(f[3].starts_with("127.0.0.1:"), "{f:?}");
    }
    assert_eq!(
        &fields[0][..3],
        &["10.96.1.201:9080", "10.96.1.201:9080", "-"]
    );
    assert_eq!(&fields[1][..3], &["[fd00::1]:80", "[fd00::1]:80", "-"]);
    assert_eq!(&fields[2][..3], &["reviews.app:9080", "-", "-"]);
    // The port as absl::SimpleAtoi reads it.
    assert_eq!(&fields[3][..3], &["10.0.0.1:+080", "10.0.0.1:80", "-"]);
}

/// `use_remote_address: false`: the downstream remote address (and so the
/// `remote_ip` address object) comes from `x-forwarded-for` when a CONNECT
/// carries one (ztunnel sends `forwarded`, which is not read), as Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_address_from_xff_without_use_remote_address() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let path = log_path("hbone", "xff");
    let mut o = Opts::to(echo.port());
    o.access_log = Some((
        path.to_path_buf(),
        "%FILTER_STATE(envoy.filters.listener.original_dst.remote_ip:PLAIN)% \
         %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%\n",
    ));
    let p = waypoint(&m, o);
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    for h in [
        vec![("x-forwarded-for", "10.244.0.9")],
        vec![("x-forwarded-for", "192.0.2.1, 10.244.0.10")],
        vec![("forwarded", "for=10.244.0.11")],
    ] {
        let mut o = c.connect("10.0.0.1:80", &h).await.expect("CONNECT");
        assert_eq!(o.status, 200);
        o.stream.shutdown().await.expect("END_STREAM");
        let _ = o.stream.read_all(64).await;
    }
    let lines = p.log_lines(&path, 3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], "10.244.0.9:0 10.244.0.9:0 127.0.0.1");
    assert_eq!(lines[1], "10.244.0.10:0 10.244.0.10:0 127.0.0.1");
    let f: Vec<&str> = lines[2].split(' ').collect();
    assert!(f[0].starts_with("127.0.0.1:") && f[0] == f[1], "{f:?}");
}

/// The TLS requirements: a client without a certificate, with TLS 1.2
/// only, with an identity outside the trust domain's prefix, or from
/// another root is refused; the mesh client is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_requirements_as_istiod_sets_them() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let p = waypoint(&m, Opts::to(echo.port()));
    let base = || {
        TlsClient::builder()
            .insecure()
            .alpn(&["h2"])
            .no_sni()
            .verdict_wait(Duration::from_millis(500))
    };
    let ok = base().client_cert(&m.client).build();
    ok.handshake(p.addr(), "127.0.0.1")
        .await
        .expect("mesh client accepted");
    let none = base().build();
    assert!(none.handshake(p.addr(), "127.0.0.1").await.is_err());
    let tls12 = base()
        .client_cert(&m.client)
        .versions(TlsVersions::Tls12Only)
        .build();
    assert!(tls12.handshake(p.addr(), "127.0.0.1").await.is_err());
    let other_td =
        m.ca.issue(LeafSpec::spiffe("spiffe://other.td/ns/app/sa/client"));
    let c = base().client_cert(&other_td).build();
    assert!(c.handshake(p.addr(), "127.0.0.1").await.is_err());
    let other_ca = TestCa::new("another root");
    let stranger = other_ca.issue(LeafSpec::spiffe(CLIENT_ID));
    let c = base().client_cert(&stranger).build();
    assert!(c.handshake(p.addr(), "127.0.0.1").await.is_err());
    // The refused handshakes reached no upstream; the mesh client tunnels.
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut o = connect_z(&c, "10.0.0.1:80").await;
    assert_eq!(o.status, 200);
    echo_once(&mut o.stream, b"ok").await;
    assert_eq!(echo.connections(), 1);
}

/// How a stream was answered, then how a next one on the same connection
/// was (`None`: the connection is gone).
type Outcome = (Answer, Option<Answer>);

/// One raw CONNECT with `authority` on a fresh HBONE connection: how the
/// server answers stream 1, and then whether a good CONNECT on stream 3
/// of the same connection is answered (`None`: the connection is gone).
async fn raw_answer(m: &Mesh, addr: SocketAddr, authority: &[u8]) -> Outcome {
    let (tls, _) = m.client().tls(addr).await.expect("TLS");
    let mut r = RawConn::start(tls).await.expect("preface");
    r.connect(1, authority).await.expect("HEADERS");
    let first = r.answer(1, WAIT).await.expect("answer");
    if matches!(first, Answer::Closed | Answer::GoAway(_)) {
        return (first, None);
    }
    if r.connect(3, b"10.0.0.1:80").await.is_err() {
        return (first, None);
    }
    let next = r.answer(3, WAIT).await.expect("answer");
    (first, Some(next))
}

/// Authorities that are not `ip:port`, measured against Envoy 1.40. The
/// route has `domains: ["*"]` and the cluster is not an original
/// destination one, so whatever the HTTP/2 codec accepts tunnels (no port,
/// a port out of range, a name): Envoy does not check CONNECT authorities
/// further (the address filter state is simply not set, see
/// `address_objects_in_the_access_log`). What the codec refuses (empty, a
/// space, control bytes) Envoy answers by closing the connection
/// (`stream_error_on_invalid_http_message` is off); weir's codec (the h2
/// crate) resets only that stream with PROTOCOL_ERROR and the connection
/// goes on, and it also refuses an unbalanced `[` that Envoy's codec takes
/// (ARCHITECTURE.md "HBONE termination").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorities() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let p = waypoint(&m, Opts::to(echo.port()));
    let envoy = p.target().is_envoy();
    let ok = (Answer::Status(Some(200)), Some(Answer::Status(Some(200))));
    let refused = if envoy {
        (Answer::Closed, None)
    } else {
        (
            Answer::Reset(raw::PROTOCOL_ERROR),
            Some(Answer::Status(Some(200))),
        )
    };
    let cases: Vec<(&[u8], Outcome)> = vec![
        (b"10.0.0.1:80", ok.clone()),
        (b"10.0.0.1", ok.clone()),
        (b"10.0.0.1:99999", ok.clone()),
        (b"10.0.0.1:+80", ok.clone()),
        (b"garbage", ok.clone()),
        (b"", refused.clone()),
        (b"a b:80", refused.clone()),
        (b"\x01\x02:80", refused.clone()),
        (b"[::1", if envoy { ok.clone() } else { refused.clone() }),
    ];
    let mut got = Vec::new();
    let mut want = Vec::new();
    for (a, w) in cases {
        let a_text = String::from_utf8_lossy(a).into_owned();
        got.push((a_text.clone(), raw_answer(&m, p.addr(), a).await));
        want.push((a_text, w));
    }
    assert_eq!(got, want);
}

/// An RBAC deny on the client's identity is 403 and opens no upstream
/// connection; another identity on the same listener tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_deny_is_403() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let mut o = Opts::to(echo.port());
    o.filters = vec![filter(
        "envoy.filters.http.rbac",
        RBAC,
        json!({"rules": {"action": "DENY", "policies": {"deny-sleep": {
            "permissions": [{"any": true}],
            "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/app/sa/sleep"}}}],
        }}}}),
    )];
    let p = waypoint(&m, o);
    let (c, _) = client_as(&m, "spiffe://cluster.local/ns/app/sa/sleep")
        .connect(p.addr())
        .await
        .expect("HBONE");
    let mut o = connect_z(&c, "10.0.0.1:80").await;
    assert_eq!(o.status, 403);
    let body = o.stream.read_all(1024).await.expect("body");
    assert_eq!(String::from_utf8_lossy(&body), "RBAC: access denied");
    assert_eq!(echo.connections(), 0);
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut o = connect_z(&c, "10.0.0.1:80").await;
    assert_eq!(o.status, 200);
    echo_once(&mut o.stream, b"allowed").await;
}

/// A dead upstream refuses that stream only (503); tunnels already open
/// on the connection keep flowing and new ones open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_503_on_that_stream_only() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let dead = dead_port();
    // Two endpoints: round robin alternates between the live and the dead.
    let mut o = Opts::to(echo.port());
    o.upstream = vec![echo.port(), dead];
    o.filters = vec![];
    let p = waypoint(&m, o);
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        let mut o = connect_z(&c, &format!("10.0.0.{i}:80")).await;
        match o.status {
            200 => {
                echo_once(&mut o.stream, format!("first {i}").as_bytes()).await;
                open.push(o.stream);
            }
            503 => {
                let body = o.stream.read_all(4096).await.expect("503 body");
                let body = String::from_utf8_lossy(&body);
                assert!(
                    body.starts_with("upstream connect error or disconnect/reset before headers"),
                    "{body}"
                );
                refused += 1;
            }
            s => panic!("status {s}"),
        }
    }
    assert_eq!((open.len(), refused), (3, 3));
    for (i, t) in open.iter_mut().enumerate() {
        echo_once(t, format!("second {i}").as_bytes()).await;
    }
    assert!(!c.is_closed());
}

/// `max_concurrent_streams: 100`: a client that ignores the setting and
/// opens a 101st CONNECT gets that stream refused (RST_STREAM
/// REFUSED_STREAM); the 100 others are answered and keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101st_concurrent_stream_is_refused() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let p = waypoint(&m, Opts::to(echo.port()));
    let (tls, _) = m.client().tls(p.addr()).await.expect("TLS");
    let mut r = RawConn::start(tls).await.expect("preface");
    for i in 0..101u32 {
        r.connect(2 * i + 1, format!("10.0.0.{}:80", i % 250).as_bytes())
            .await
            .expect("HEADERS");
    }
    let mut answered = std::collections::BTreeSet::new();
    let mut refused = Vec::new();
    let deadline = Instant::now() + WAIT;
    while answered.len() + refused.len() < 101 && Instant::now() < deadline {
        let f = r.next(WAIT).await.expect("frame").expect("open");
        match f.kind {
            raw::HEADERS => {
                answered.insert(f.stream);
            }
            raw::RST_STREAM => refused.push((f.stream, f.error_code())),
            raw::GOAWAY => panic!("GOAWAY {:?}", f.error_code()),
            raw::PING if f.is_ping() => r.answer_ping(&f).await.expect("PING ACK"),
            _ => {}
        }
    }
    assert_eq!(refused, vec![(201, Some(raw::REFUSED_STREAM))]);
    assert_eq!(answered.len(), 100);
    // The first stream still tunnels.
    r.data(1, b"still here", false).await.expect("DATA");
    let mut got = Vec::new();
    while got.len() < 10 {
        let f = r.next(WAIT).await.expect("frame").expect("open");
        match f.kind {
            raw::DATA if f.stream == 1 => got.extend_from_slice(&f.payload),
            raw::PING if f.is_ping() => r.answer_ping(&f).await.expect("PING ACK"),
            _ => {}
        }
    }
    assert_eq!(got, b"still here");
}

/// Many concurrent tunnels on one connection (150: the client keeps 100
/// open at a time, as the server allows) and many sequential ones; every
/// byte echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_and_sequential_streams() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let p = waypoint(&m, Opts::to(echo.port()));
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let c = std::sync::Arc::new(c);
    let mut tasks = Vec::new();
    for i in 0..150u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut o = connect_z(&c, &format!("10.0.{}.{}:80", i / 200, i % 200)).await;
            assert_eq!(o.status, 200);
            let msg = format!("tunnel {i}");
            for _ in 0..3 {
                echo_once(&mut o.stream, msg.as_bytes()).await;
            }
            o.stream.shutdown().await.expect("END_STREAM");
            assert!(o.stream.read_all(64).await.expect("EOF").is_empty());
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("in time")
            .expect("tunnel");
    }
    for i in 0..100 {
        let mut o = connect_z(&c, "10.0.0.1:80").await;
        assert_eq!(o.status, 200, "stream {i}");
        echo_once(&mut o.stream, format!("seq {i}").as_bytes()).await;
        o.stream.shutdown().await.expect("END_STREAM");
        assert!(o.stream.read_all(64).await.expect("EOF").is_empty());
    }
    assert_eq!(echo.wait_results(250, WAIT).await.len(), 250);
    assert!(!c.is_closed());
}

/// A reset tunnel ends alone: its upstream connection closes, the other
/// tunnel on the connection keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_stream_ends_only_its_tunnel() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let p = waypoint(&m, Opts::to(echo.port()));
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut a = connect_z(&c, "10.0.0.1:80").await;
    let mut b = connect_z(&c, "10.0.0.2:80").await;
    assert_eq!((a.status, b.status), (200, 200));
    echo_once(&mut a.stream, b"a").await;
    echo_once(&mut b.stream, b"b").await;
    a.stream.reset();
    assert_eq!(echo.wait_results(1, WAIT).await.len(), 1);
    echo_once(&mut b.stream, b"b after the reset").await;
    assert!(!c.is_closed());
}

/// A server-first upstream that also needs the client's half-close: it
/// greets first, reads the client's bytes to EOF, then answers with their
/// count and closes. So the banner arrives before the client writes, the
/// client's END_STREAM reaches the upstream as FIN while the upstream
/// still sends, and the upstream's close ends the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_and_half_close_both_ways() {
    let m = Mesh::new();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        s.write_all(b"220 ready\n").await.expect("banner");
        let mut n = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            let k = s.read(&mut buf).await.expect("read");
            if k == 0 {
                break;
            }
            n += k;
        }
        s.write_all(format!("got {n}\n").as_bytes())
            .await
            .expect("answer");
        s.shutdown().await.expect("FIN");
    });
    let p = waypoint(&m, Opts::to(port));
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut o = connect_z(&c, "10.0.0.1:25").await;
    assert_eq!(o.status, 200);
    let banner = read_n(&mut o.stream, 10, WAIT).await.expect("banner");
    assert_eq!(banner, b"220 ready\n");
    o.stream.write_all(&[7u8; 5000]).await.expect("write");
    o.stream.shutdown().await.expect("END_STREAM");
    let rest = tokio::time::timeout(WAIT, o.stream.read_all(64))
        .await
        .expect("in time")
        .expect("clean end");
    assert_eq!(rest, b"got 5000\n");
    server.await.expect("upstream");
    assert!(!c.is_closed());
}

/// 16 MiB each way through one tunnel at once (echo upstream, verified
/// byte for byte), flow-controlled by HTTP/2 windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_each_way() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let p = waypoint(&m, Opts::to(echo.port()));
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let o = connect_z(&c, "10.0.0.1:80").await;
    assert_eq!(o.status, 200);
    let (mut r, mut w) = tokio::io::split(o.stream);
    const LEN: u64 = 16 << 20;
    let writer = async move {
        tcp::write_pattern(&mut w, LEN).await?;
        w.shutdown().await?;
        std::io::Result::Ok(w)
    };
    let (_, got) = tokio::time::timeout(Duration::from_secs(90), async {
        tokio::try_join!(writer, tcp::read_verify_pattern(&mut r))
    })
    .await
    .expect("transfer in time")
    .expect("transfer");
    assert_eq!(got, LEN);
    assert_eq!(echo.wait_results(1, WAIT).await[0], Ok(LEN));
}

/// `connection_keepalive` (short values here; istiod uses 10 s / 20 s):
/// the server PINGs an idle connection; a client that answers keeps it
/// (an idle tunnel still works after several intervals); a client that
/// stops answering is disconnected after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_and_closes_a_silent_peer() {
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let mut o = Opts::to(echo.port());
    o.keepalive = ("1s", "1s");
    let p = waypoint(&m, o);
    // Silent: reads frames, answers nothing.
    let (tls, _) = m.client().tls(p.addr()).await.expect("TLS");
    let mut r = RawConn::start(tls).await.expect("preface");
    let start = Instant::now();
    let mut pings = 0;
    let end = loop {
        match r.next(Duration::from_secs(10)).await.expect("frame") {
            None => break "eof".to_owned(),
            Some(f) if f.kind == raw::GOAWAY => break format!("goaway {:?}", f.error_code()),
            Some(f) if f.is_ping() => pings += 1,
            Some(_) => {}
        }
    };
    let took = start.elapsed();
    assert!(pings >= 1, "no PING before the end ({end})");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "closed after {took:?} ({end})"
    );
    // Answering: an idle tunnel outlives several intervals.
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut o = connect_z(&c, "10.0.0.1:80").await;
    assert_eq!(o.status, 200);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    echo_once(&mut o.stream, b"after idle").await;
    assert!(!c.is_closed());
}

/// Istio's peer metadata from the CONNECT's `baggage` (weir only: the
/// filter is istio/proxy's): `downstream_peer` is set from ztunnel's
/// baggage, next to the `connect_authority` state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baggage_peer_metadata() {
    if Target::from_env().is_envoy() {
        return;
    }
    let m = Mesh::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let path = log_path("hbone", "baggage");
    let mut o = Opts::to(echo.port());
    o.access_log = Some((
        path.to_path_buf(),
        "%FILTER_STATE(downstream_peer:PLAIN)% %FILTER_STATE(io.istio.peer_principal:PLAIN)%\n",
    ));
    let p = waypoint(&m, o);
    let (c, _) = m.client().connect(p.addr()).await.expect("HBONE");
    let mut o = connect_z(&c, "10.0.0.1:80").await;
    assert_eq!(o.status, 200);
    o.stream.shutdown().await.expect("END_STREAM");
    let _ = o.stream.read_all(64).await;
    // Without baggage: no peer.
    let mut o = c.connect("10.0.0.2:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    o.stream.shutdown().await.expect("END_STREAM");
    let _ = o.stream.read_all(64).await;
    let lines = p.log_lines(&path, 2).await;
    assert_eq!(
        lines,
        vec![
            format!(
                "type=deployment,workload=productpage-v1,cluster=Kubernetes,namespace=app,\
                 service=productpage,revision=v1,app=productpage,version=v1 {CLIENT_ID}"
            ),
            format!("- {CLIENT_ID}"),
        ]
    );
}
