//! The ambient waypoint pipeline end to end, shaped after istiod's
//! waypoint (`../shared/fixtures/istio/waypoint/*.json`), static bootstrap
//! (built by `weir_tests::waypoint`, shared with `benches/hbone.sh`):
//!
//! ```text
//! HBONE client (mTLS, SPIFFE, h2 CONNECT VIP:PORT)
//!  -> connect_terminate (TLS 1.3, h2, connect_authority set_filter_state ONCE)
//!  -> cluster main_internal (STATIC, envoy_internal_address main_internal)
//!  -> internal listener main_internal (original_dst + http_inspector,
//!     filter_chain_matcher: IPMatcher on the VIP -> DestinationPortInput)
//!     chain inbound-vip|PORT|http|svc (HCM: fault, cors, router)
//!     chain inbound-vip|PORT|tcp|svc  (tcp_proxy)
//!  -> cluster inbound-vip|PORT|…|svc (STATIC internal endpoint
//!     connect_originate, host metadata original_dst local POD_IP:TARGET_PORT,
//!     internal_upstream passing that metadata)
//!  -> internal listener connect_originate (original_dst, tcp_proxy
//!     tunneling_config hostname %DOWNSTREAM_LOCAL_ADDRESS%)
//!  -> cluster connect_originate (ORIGINAL_DST, upstream_port_override,
//!     mTLS 1.3 with the waypoint's identity, SAN prefix, h2 allow_connect)
//!  -> test HBONE server (forward mode) on POD_IP
//!  -> the app (HTTP echo / TCP echo) on POD_IP:TARGET_PORT.
//! ```
//!
//! POD_IP is 127.0.0.1 (the test HBONE server listens there); the VIPs are
//! other loopback addresses, never connected to: they only travel as the
//! CONNECT authority and the restored local address. istio/proxy's own
//! filters (`peer_metadata`, `istio.stats`) are not in the chains: Envoy
//! 1.40 (the oracle) does not have them; their behaviour is checked in
//! their own suites.
//!
//! Every test runs against weir in-process by default and against Envoy
//! 1.40 with `WEIR_SCENARIO_TARGET=envoy`, same config and assertions:
//!
//! ```sh
//! cargo test -p weir-tests --test waypoint_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test waypoint_scenarios
//! ```
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::log_path;
use weir_tests::hbone::{read_n, H2Tunnel};
use weir_tests::hbone_server::HboneServer;
use weir_tests::scenario::{Proxy, Target};
use weir_tests::tcp;
use weir_tests::waypoint::{
    connect_originate_cluster, connect_originate_listener, connect_terminate, inbound_vip_cluster,
    internal_cluster, internal_listener_extension, internal_upstream, main_internal, Apps, Mesh,
    HTTP_CHAIN, HTTP_VIP, ORIGINAL_DST_NS, POD_IP, TCP_CHAIN, TCP_VIP, WAYPOINT_ID,
};

const WAIT: Duration = Duration::from_secs(10);

/// Everything one test needs running.
struct Setup {
    m: Mesh,
    p: Proxy,
    hbone: HboneServer,
    app: weir_tests::upstream::EchoServer,
    tcp_app: tcp::TcpServer,
    main_log: PathBuf,
    terminate_log: PathBuf,
    originate_log: PathBuf,
}

async fn setup(name: &str) -> Setup {
    let m = Mesh::new();
    let app = weir_tests::upstream::http1("details").await.expect("app");
    let tcp_app = tcp::tcp_echo_server().await.expect("tcp app");
    let hbone = m.hbone_server().await;
    let main_log = log_path("waypoint", &format!("{name}-main"));
    let terminate_log = log_path("waypoint", &format!("{name}-terminate"));
    let originate_log = log_path("waypoint", &format!("{name}-originate"));
    let p = weir_tests::waypoint::start(
        &m,
        &Apps {
            http_port: app.port(),
            tcp_port: tcp_app.port(),
            hbone_port: hbone.port(),
            main_log: Some(main_log.clone()),
            terminate_log: Some(terminate_log.clone()),
            originate_log: Some(originate_log.clone()),
        },
    );
    Setup {
        m,
        p,
        hbone,
        app,
        tcp_app,
        main_log,
        terminate_log,
        originate_log,
    }
}

/// One HTTP/1.1 request on the tunnel (keep-alive); status and body.
async fn get(t: &mut H2Tunnel, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: details.default.svc.cluster.local\r\n\r\n");
    t.write_all(req.as_bytes()).await.expect("write request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, t.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read head");
        assert_eq!(
            n,
            1,
            "EOF in the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let body = read_n(t, len, WAIT).await.expect("body");
    (status, String::from_utf8(body).expect("utf-8 body"))
}

// === HTTP ===

/// HTTP requests through the whole pipeline reach the app and answer;
/// the HBONE server saw `CONNECT POD_IP:TARGET_PORT` from the waypoint's
/// certificate; many requests on two client tunnels share one HBONE
/// connection to the destination; `main_internal`'s access log shows the
/// VIP as the local address and the client's address as the remote one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_the_waypoint() {
    let s = setup("http").await;
    let (c, tls) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
    assert_eq!(tls.version, Some(rustls::ProtocolVersion::TLSv1_3));
    let mut a = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(a.status, 200);
    for i in 0..3 {
        let (status, body) = get(&mut a.stream, &format!("/a/{i}")).await;
        assert_eq!(status, 200, "{body}");
        let v: weir_tests::upstream::EchoView = serde_json::from_str(&body).expect("echo view");
        assert_eq!(v.upstream, "details");
        assert_eq!(v.path, format!("/a/{i}"));
    }
    let mut b = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(b.status, 200);
    for i in 0..3 {
        let (status, body) = get(&mut b.stream, &format!("/b/{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("\"/b/{i}\"")), "{body}");
    }
    assert_eq!(s.app.requests().len(), 6);
    // The HBONE server: CONNECT to the pod's app address, on one TLS
    // connection that presented the waypoint's certificate.
    let seen = s.hbone.wait_seen(1, WAIT).await;
    let want = format!("{POD_IP}:{}", s.app.port());
    assert!(!seen.is_empty());
    for r in &seen {
        assert_eq!(r.method, "CONNECT");
        assert_eq!(r.authority, want);
        assert_eq!(r.path, None);
        assert_eq!(r.conn, 0);
    }
    assert_eq!(s.hbone.tls_connections(), 1);
    let hs = s.hbone.handshakes();
    assert_eq!(hs.len(), 1, "{hs:?}");
    let cert = hs[0].client_cert().expect("client certificate");
    assert_eq!(cert.uri_sans, vec![WAYPOINT_ID.to_owned()]);
    // The access logs: the client's address as connect_terminate saw it is
    // main_internal's remote address; the VIP is its local address.
    a.stream.shutdown().await.expect("END_STREAM");
    b.stream.shutdown().await.expect("END_STREAM");
    let term = s.p.log_lines(&s.terminate_log, 2).await;
    assert_eq!(term.len(), 2, "{term:?}");
    let client_addr = term[0].split(' ').next().expect("remote").to_owned();
    assert!(client_addr.starts_with("127.0.0.1:"), "{term:?}");
    assert_eq!(term[0], format!("{client_addr} {HTTP_VIP} 200"));
    let main = s.p.log_lines(&s.main_log, 6).await;
    assert_eq!(main.len(), 6, "{main:?}");
    for l in &main {
        assert_eq!(l, &format!("{HTTP_VIP} {client_addr} {HTTP_CHAIN} 200"));
    }
}

// === TCP ===

/// The TCP chain passes bytes both ways; the client's half-close reaches
/// the app, whose echo and close come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_the_waypoint_with_half_close() {
    let s = setup("tcp").await;
    let (c, _) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
    let mut t = c.connect(TCP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(t.status, 200);
    // Not HTTP at the first byte: http_inspector decides at once (text
    // without a line end keeps it waiting for more, on both targets).
    let first = b"\x00\x01\x02 binary through the waypoint";
    t.stream.write_all(first).await.expect("write");
    let got = read_n(&mut t.stream, first.len(), WAIT)
        .await
        .expect("echo");
    assert_eq!(got, first);
    t.stream.write_all(b"last words").await.expect("write");
    t.stream.shutdown().await.expect("END_STREAM");
    let rest = tokio::time::timeout(WAIT, t.stream.read_all(1024))
        .await
        .expect("end in time")
        .expect("clean end");
    assert_eq!(rest, b"last words");
    let results = s.tcp_app.wait_results(1, WAIT).await;
    assert_eq!(results, vec![Ok(first.len() as u64 + 10)]);
    let seen = s.hbone.wait_seen(1, WAIT).await;
    assert_eq!(seen[0].authority, format!("{POD_IP}:{}", s.tcp_app.port()));
    // connect_originate restored the pod's address and tunnelled to the
    // HBONE port.
    let lines = s.p.log_lines(&s.originate_log, 1).await;
    assert_eq!(
        lines,
        vec![format!(
            "{POD_IP}:{} {} - -",
            s.tcp_app.port(),
            s.hbone.addr()
        )]
    );
}

// === no such service ===

/// A VIP (or a port of a known VIP) no chain matches. `main_internal`
/// runs `http_inspector`, so the internal connection is taken (and the
/// CONNECT answered 200, on both targets) before the chain is looked up;
/// at the client's first bytes no chain matches and `main_internal` closes
/// the connection: Envoy resets the CONNECT stream (`CONNECT_ERROR`),
/// weir ends it (END_STREAM, no bytes: its in-process pipe has no reset;
/// a documented difference). Nothing reaches the HBONE server and the
/// client's HBONE connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vip_is_refused() {
    let s = setup("unknown").await;
    let (c, _) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
    for authority in ["127.0.0.99:9080", "127.0.0.10:7777"] {
        let mut t = c.connect(authority, &[]).await.expect("answer");
        assert_eq!(t.status, 200, "{authority}");
        t.stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let end = tokio::time::timeout(WAIT, t.stream.read_all(1024))
            .await
            .expect("end in time");
        if Target::from_env().is_envoy() {
            let e = end.expect_err("reset");
            assert!(e.to_string().contains("CONNECT_ERROR"), "{authority}: {e}");
        } else {
            assert_eq!(end.expect("end"), b"", "{authority}");
        }
    }
    assert!(s.hbone.seen().is_empty());
    assert_eq!(s.app.requests().len(), 0);
    let mut ok = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(ok.status, 200);
    let (status, _) = get(&mut ok.stream, "/after").await;
    assert_eq!(status, 200);
    assert_eq!(s.app.requests().len(), 1);
}

// === sharing ===

/// Two client HBONE connections, eight concurrent CONNECT tunnels, five
/// requests each: every request answers, and every tunnel the waypoint
/// opens to the destination rides one HBONE (TLS, HTTP/2) connection;
/// each is a `CONNECT POD_IP:TARGET_PORT` stream on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tunnels_share_one_hbone_connection() {
    let s = setup("share").await;
    let mut conns = Vec::new();
    for _ in 0..2 {
        let (c, _) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
        conns.push(c);
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut t = conns[i % 2].connect(HTTP_VIP, &[]).await.expect("CONNECT");
        assert_eq!(t.status, 200);
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                let (status, body) = get(&mut t.stream, &format!("/t{i}/{j}")).await;
                assert_eq!(status, 200, "{body}");
                assert!(body.contains(&format!("\"/t{i}/{j}\"")), "{body}");
            }
            t.stream.shutdown().await.expect("END_STREAM");
        }));
    }
    for t in tasks {
        t.await.expect("tunnel task");
    }
    assert_eq!(s.app.requests().len(), 40);
    let seen = s.hbone.wait_seen(1, WAIT).await;
    let want = format!("{POD_IP}:{}", s.app.port());
    assert!(!seen.is_empty() && seen.len() <= 8, "{}", seen.len());
    for r in &seen {
        assert_eq!(
            (r.method.as_str(), r.authority.as_str(), r.conn),
            ("CONNECT", want.as_str(), 0)
        );
    }
    assert_eq!(s.hbone.tls_connections(), 1);
    let main = s.p.log_lines(&s.main_log, 40).await;
    assert_eq!(main.len(), 40);
    assert!(
        main.iter()
            .all(|l| l.starts_with(&format!("{HTTP_VIP} 127.0.0.1:"))),
        "{main:?}"
    );
}

// === over delta ADS ===

/// The same resources delivered over delta ADS as istiod does (LDS: the
/// three listeners; CDS: `main_internal`, `connect_originate` and the
/// `inbound-vip` cluster as EDS; EDS: its internal endpoint with the
/// pod's address in the host metadata), certificates as static secrets:
/// requests go through to the app on one HBONE connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_over_delta_ads() {
    use weir_tests::xds::{type_url as t, ControlPlane};
    let m = Mesh::new();
    let app = weir_tests::upstream::http1("details").await.expect("app");
    let hbone = m.hbone_server().await;
    let cp = ControlPlane::start().await.expect("control plane");
    let port = weir_tests::free_port();
    let a = Apps {
        http_port: app.port(),
        tcp_port: 9,
        hbone_port: hbone.port(),
        main_log: Some(log_path("waypoint", "ads-main")),
        terminate_log: Some(log_path("waypoint", "ads-terminate")),
        originate_log: Some(log_path("waypoint", "ads-originate")),
    };
    let listeners = [
        connect_terminate(port, &a.terminate_log),
        main_internal(&a),
        connect_originate_listener(&a.originate_log),
    ]
    .map(|l| l.to_string());
    let vip = json!({
        "name": HTTP_CHAIN, "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {
            "eds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "service_name": HTTP_CHAIN,
        },
        "transport_socket": internal_upstream(),
    })
    .to_string();
    let clusters = [
        internal_cluster(
            "main_internal",
            "main_internal",
            Value::Null,
            internal_upstream(),
        )
        .to_string(),
        vip,
        inbound_vip_cluster(TCP_CHAIN, 9).to_string(),
        connect_originate_cluster(hbone.port()).to_string(),
    ];
    let cla = json!({"cluster_name": HTTP_CHAIN, "endpoints": [{"lb_endpoints": [{
        "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "connect_originate"}}},
        "metadata": {"filter_metadata": {ORIGINAL_DST_NS: {"local": format!("{POD_IP}:{}", app.port())}}},
    }]}]})
    .to_string();
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    cp.set_yaml(t::CLUSTER, &refs(&clusters)).expect("cds");
    cp.set_yaml(t::ENDPOINT, &[&cla]).expect("eds");
    let v = cp.set_yaml(t::LISTENER, &refs(&listeners)).expect("lds");
    let _p = Proxy::start(|ports| {
        let mut b: Value = serde_yaml::from_str(&cp.ads_bootstrap(
            "{id: waypoint~127.0.0.1~waypoint.default~default.svc.cluster.local, cluster: waypoint}",
            true,
            ports.admin,
        ))
        .expect("bootstrap yaml");
        b["bootstrap_extensions"] = internal_listener_extension();
        b["static_resources"]["secrets"] = m.secrets();
        b.to_string()
    });
    for ty in [t::CLUSTER, t::ENDPOINT, t::LISTENER] {
        cp.wait_for_ack(ty, &v, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{ty}: {e:#}"));
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // The listener may take a moment to bind after the ACK.
    let deadline = tokio::time::Instant::now() + WAIT;
    let c = loop {
        match m.client().connect(addr).await {
            Ok((c, _)) => break c,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("HBONE: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    for i in 0..2 {
        let mut t = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
        assert_eq!(t.status, 200);
        for j in 0..3 {
            let (status, body) = get(&mut t.stream, &format!("/ads/{i}/{j}")).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"upstream\":\"details\""), "{body}");
        }
    }
    assert_eq!(app.requests().len(), 6);
    let seen = hbone.wait_seen(1, WAIT).await;
    assert_eq!(seen[0].authority, format!("{POD_IP}:{}", app.port()));
    assert_eq!(hbone.tls_connections(), 1);
}
