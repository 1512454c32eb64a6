//! CONNECT termination in the HTTP connection manager (the HBONE
//! `connect_terminate` shape): a route with `connect_matcher` and
//! `upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]` opens a
//! TCP connection to a host of its cluster, answers `200`, and copies bytes
//! both ways. HTTP/2 classic CONNECT over h2c and over mTLS (ALPN h2), and
//! HTTP/1.1 CONNECT; real TCP upstreams (echo, sink, source).
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test connect_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test connect_scenarios
//! ```
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{
    bootstrap, chain, cluster, connect_route, connect_terminate_upgrade, downstream_mtls_h2,
    file_log, filter, hcm, hcm_connect, listener, log_path, merge,
};
use weir_tests::scenario::Proxy;
use weir_tests::tcp::{self, echo_once};
use weir_tests::tunnel::{h1_connect, H2Conn};

const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// How long one read through a tunnel may wait.
const WAIT: Duration = Duration::from_secs(10);

/// A proxy whose listener `l` terminates CONNECT: `vhosts` (a default one
/// to `up` when empty), HTTP `filters`, more HCM fields in `extra`.
fn start(vhosts: Vec<Value>, filters: Vec<Value>, extra: Value, clusters: Vec<Value>) -> Proxy {
    Proxy::start(move |ports| {
        let vh = if vhosts.is_empty() {
            vec![
                json!({"name": "vh", "domains": ["*"], "routes": [connect_route("up", connect_terminate_upgrade())]}),
            ]
        } else {
            vhosts.clone()
        };
        let h = hcm("ingress", filters.clone(), vh, hcm_connect(extra.clone()));
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            clusters.clone(),
        )
    })
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// HTTP/2 classic CONNECT over h2c: 200 with no content-length, bytes
/// echoed both ways, and the client's END_STREAM half-closes the upstream
/// (the echo server then finishes and the tunnel reads EOF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connect_echo_and_half_close() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = start(
        vec![],
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut o = c.connect("10.96.1.201:9080", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    assert!(o.headers.get("content-length").is_none(), "{:?}", o.headers);
    echo_once(&mut o.stream, b"hello through the tunnel").await;
    echo_once(&mut o.stream, b"and again").await;
    // Downstream half-close: the upstream sees EOF, finishes, closes; the
    // tunnel then ends cleanly.
    o.stream.shutdown().await.expect("END_STREAM");
    let rest = tokio::time::timeout(WAIT, o.stream.read_all(1024))
        .await
        .expect("EOF in time")
        .expect("clean end");
    assert!(rest.is_empty(), "{rest:?}");
    let r = echo.wait_results(1, WAIT).await;
    assert_eq!(r[0], Ok(33));
    assert!(!c.is_closed());
}

/// 16 MiB each way through one tunnel (to an echo upstream, verified byte
/// for byte while both directions flow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_both_directions() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = start(
        vec![],
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    let (mut r, mut w) = tokio::io::split(o.stream);
    const LEN: u64 = 16 << 20;
    let writer = async move {
        tcp::write_pattern(&mut w, LEN).await?;
        w.shutdown().await?;
        std::io::Result::Ok(w)
    };
    let (_, got) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::try_join!(writer, tcp::read_verify_pattern(&mut r))
    })
    .await
    .expect("transfer in time")
    .expect("transfer");
    assert_eq!(got, LEN);
    assert_eq!(echo.wait_results(1, WAIT).await[0], Ok(LEN));
}

/// A server-first upstream: its bytes arrive before the client sends any,
/// and its close (after its FIN) ends the tunnel: as Envoy 1.40 by default
/// (`allow_multiplexed_upstream_half_close` off), the downstream stream ends
/// once the upstream is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_upstream_ends_the_stream() {
    const LEN: u64 = 1 << 20;
    let src = tcp::tcp_source_server(LEN).await.expect("source");
    let port = src.port();
    let p = start(
        vec![],
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    let got = tokio::time::timeout(WAIT, tcp::read_verify_pattern(&mut o.stream))
        .await
        .expect("banner in time")
        .expect("banner verified");
    assert_eq!(got, LEN);
    assert_eq!(src.wait_results(1, WAIT).await[0], Ok(LEN));
    assert!(!c.is_closed());
}

/// Upload to a sink: 16 MiB from the client, verified by the upstream; the
/// client's END_STREAM is the upstream's EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_to_sink_ends_with_downstream_half_close() {
    let sink = tcp::tcp_sink_server().await.expect("sink");
    let port = sink.port();
    let p = start(
        vec![],
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    const LEN: u64 = 16 << 20;
    tokio::time::timeout(
        Duration::from_secs(60),
        tcp::write_pattern(&mut o.stream, LEN),
    )
    .await
    .expect("upload in time")
    .expect("upload");
    o.stream.shutdown().await.expect("END_STREAM");
    assert_eq!(
        sink.wait_results(1, Duration::from_secs(20)).await[0],
        Ok(LEN)
    );
}

/// Several tunnels on one HTTP/2 connection, one to a dead upstream: that
/// stream gets 503 (connect failure) while the others keep flowing, and
/// the connection stays up for new streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_stream_among_many() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let (port, dead) = (echo.port(), dead_port());
    let vhosts = vec![
        json!({"name": "dead", "domains": ["dead.example:80"], "routes": [connect_route("dead", connect_terminate_upgrade())]}),
        json!({"name": "vh", "domains": ["*"], "routes": [connect_route("up", connect_terminate_upgrade())]}),
    ];
    let p = start(
        vhosts,
        vec![],
        json!({}),
        vec![
            cluster("up", &[port], json!({})),
            cluster("dead", &[dead], json!({})),
        ],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut tunnels = Vec::new();
    for i in 0..4 {
        let mut o = c
            .connect(&format!("10.0.0.{i}:80"), &[])
            .await
            .expect("CONNECT");
        assert_eq!(o.status, 200);
        echo_once(&mut o.stream, format!("first {i}").as_bytes()).await;
        tunnels.push(o.stream);
    }
    let mut failed = c.connect("dead.example:80", &[]).await.expect("CONNECT");
    assert_eq!(failed.status, 503);
    let body = failed.stream.read_all(4096).await.expect("503 body");
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers"),
        "{body}"
    );
    for (i, t) in tunnels.iter_mut().enumerate() {
        echo_once(t, format!("second {i}").as_bytes()).await;
    }
    let mut o = c.connect("10.0.0.9:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    echo_once(&mut o.stream, b"after the failure").await;
    assert!(!c.is_closed());
}

/// 200 tunnels one after the other on one connection, each echoing and
/// ending with the client's half-close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_streams_on_one_connection() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = start(
        vec![],
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    for i in 0..200 {
        let mut o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
        assert_eq!(o.status, 200, "stream {i}");
        echo_once(&mut o.stream, format!("stream {i}").as_bytes()).await;
        o.stream.shutdown().await.expect("END_STREAM");
        let rest = tokio::time::timeout(WAIT, o.stream.read_all(64))
            .await
            .expect("EOF in time")
            .expect("clean end");
        assert!(rest.is_empty());
    }
    assert_eq!(echo.wait_results(200, WAIT).await.len(), 200);
}

/// HTTP/1.1 `CONNECT host:port`: 200, then the connection is the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connect() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = start(
        vec![],
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let mut o = h1_connect(p.addr(), "10.0.0.1:80", &[])
        .await
        .expect("CONNECT");
    assert_eq!(o.status, 200, "{}", o.head);
    assert!(o.rest.is_empty());
    assert!(o.header("content-length").is_none(), "{}", o.head);
    o.stream.write_all(b"ping over h1").await.expect("write");
    let mut got = [0u8; 12];
    tokio::time::timeout(WAIT, o.stream.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&got, b"ping over h1");
    o.stream.shutdown().await.expect("FIN");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, o.stream.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .expect("clean end");
    assert!(rest.is_empty());
}

/// CONNECT not enabled. The HCM has no CONNECT upgrade and the route none:
/// the upgrade is refused (403). A route disabling it refuses it too, even
/// with the HCM's enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_not_enabled_is_forbidden() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let vhosts = vec![
        json!({"name": "off", "domains": ["off.example:80"], "routes": [connect_route("up", json!([{"upgrade_type": "CONNECT", "enabled": false}]))]}),
        json!({"name": "vh", "domains": ["*"], "routes": [connect_route("up", json!([]))]}),
    ];
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![],
            vhosts.clone(),
            json!({"http2_protocol_options": {"allow_connect": true}}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("up", &[port], json!({}))],
        )
    });
    // A connection each: Envoy ends the HTTP/2 connection (GOAWAY) after
    // refusing an upgrade; weir keeps it (ARCHITECTURE.md "CONNECT
    // termination").
    for authority in ["10.0.0.1:80", "off.example:80"] {
        let c = H2Conn::h2c(p.addr()).await.expect("h2c");
        let mut o = c.connect(authority, &[]).await.expect("CONNECT");
        assert_eq!(o.status, 403, "{authority}");
        assert!(o.stream.read_all(64).await.expect("body").is_empty());
    }
    let o = h1_connect(p.addr(), "10.0.0.1:80", &[])
        .await
        .expect("CONNECT");
    assert_eq!(o.status, 403, "{}", o.head);
    assert_eq!(echo.connections(), 0);
}

/// A CONNECT that matches no route (only a prefix route): 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_a_connect_route_is_404() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let vhosts = vec![json!({"name": "vh", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "up", "upgrade_configs": connect_terminate_upgrade()}},
    ]})];
    let p = start(
        vhosts,
        vec![],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 404);
    assert_eq!(echo.connections(), 0);
}

/// RBAC runs on the CONNECT request's headers first: a deny is a 403 and
/// no upstream connection is made; an allowed stream tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_deny_is_403() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let rbac = filter(
        "envoy.filters.http.rbac",
        RBAC,
        json!({"rules": {"action": "DENY", "policies": {"deny-blocked": {
            "permissions": [{"header": {"name": ":authority", "string_match": {"exact": "10.0.0.66:80"}}}],
            "principals": [{"any": true}],
        }}}}),
    );
    let p = start(
        vec![],
        vec![rbac],
        json!({}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut o = c.connect("10.0.0.66:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 403);
    let body = o.stream.read_all(1024).await.expect("body");
    assert_eq!(String::from_utf8_lossy(&body), "RBAC: access denied");
    assert_eq!(echo.connections(), 0);
    let mut o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    echo_once(&mut o.stream, b"allowed").await;
}

/// Failures answer as the router: an unknown cluster (`cluster_header`)
/// 503 (NC), a cluster without hosts 503 (UH), a dead host 503 (UF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_answer_like_the_router() {
    let path = log_path("connect", "failures");
    let dead = dead_port();
    let vhosts = vec![
        json!({"name": "nc", "domains": ["nc.example:80"], "routes": [
            {"match": {"connect_matcher": {}}, "route": {"cluster_header": "x-cluster", "upgrade_configs": connect_terminate_upgrade()}},
        ]}),
        json!({"name": "uh", "domains": ["uh.example:80"], "routes": [connect_route("empty", connect_terminate_upgrade())]}),
        json!({"name": "uf", "domains": ["uf.example:80"], "routes": [connect_route("dead", connect_terminate_upgrade())]}),
    ];
    let log = file_log(
        &path,
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:AUTHORITY)%\n",
    );
    let p = start(
        vhosts,
        vec![],
        json!({"access_log": [log]}),
        vec![
            cluster("empty", &[], json!({})),
            cluster("dead", &[dead], json!({})),
        ],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    for a in ["nc.example:80", "uh.example:80", "uf.example:80"] {
        let o = c
            .connect(a, &[("x-cluster", "missing")])
            .await
            .expect("CONNECT");
        assert_eq!(o.status, 503, "{a}");
    }
    let lines = p.log_lines(&path, 3).await;
    assert_eq!(
        lines,
        vec![
            "503 NC nc.example:80",
            "503 UH uh.example:80",
            "503 UF uf.example:80"
        ]
    );
}

/// The access log is written when the tunnel ends, with its byte counts,
/// the upstream host and cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_at_the_end_of_the_tunnel() {
    let path = log_path("connect", "end");
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let log = file_log(
        &path,
        "%REQ(:METHOD)% %REQ(:AUTHORITY)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% \
         %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER%\n",
    );
    let p = start(
        vec![],
        vec![],
        json!({"access_log": [log]}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    echo_once(&mut o.stream, b"12345").await;
    echo_once(&mut o.stream, b"678").await;
    // Nothing is logged while the tunnel is open.
    p.flush_logs().await;
    assert_eq!(std::fs::read_to_string(&path).unwrap_or_default(), "");
    o.stream.shutdown().await.expect("END_STREAM");
    let rest = o.stream.read_all(64).await.expect("clean end");
    assert!(rest.is_empty());
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(
        lines,
        vec![format!(
            "CONNECT 10.0.0.1:80 HTTP/2 200 - 8 8 127.0.0.1:{port} up"
        )]
    );
}

/// HBONE's transport: mutual TLS with ALPN h2 (a SPIFFE client
/// certificate), then CONNECT streams over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_mtls_h2() {
    use weir_tests::tls::{LeafSpec, TempDir, TestCa, TlsClient};
    let ca = TestCa::new("connect root");
    let dir = TempDir::new("connect-mtls").expect("temp dir");
    let files = ca
        .issue(LeafSpec::server("waypoint.example"))
        .write_files(&dir, "server");
    let ca_file = dir.write("ca.pem", ca.pem());
    let client = ca.issue(LeafSpec::spiffe("spiffe://cluster.local/ns/a/sa/b"));
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let tls = downstream_mtls_h2(&files, &ca_file);
    let path = log_path("connect", "mtls");
    let log = file_log(
        &path,
        "%RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% %BYTES_RECEIVED%\n",
    );
    let p = Proxy::start(move |ports| {
        let vh = vec![
            json!({"name": "vh", "domains": ["*"], "routes": [connect_route("up", connect_terminate_upgrade())]}),
        ];
        let h = hcm(
            "ingress",
            vec![],
            vh,
            hcm_connect(json!({"access_log": [log.clone()]})),
        );
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![merge(
                    chain(vec![h]),
                    json!({"transport_socket": tls.clone()}),
                )],
            )],
            vec![cluster("up", &[port], json!({}))],
        )
    });
    let c = TlsClient::builder()
        .trust(&ca)
        .client_cert(&client)
        .alpn(&["h2"])
        .build();
    let (stream, info) = c.connect(p.addr(), "waypoint.example").await.expect("TLS");
    assert_eq!(info.alpn.as_deref(), Some("h2"));
    let conn = H2Conn::over(stream).await.expect("h2");
    let mut a = conn
        .connect("10.96.1.201:9080", &[])
        .await
        .expect("CONNECT");
    let mut b = conn
        .connect("10.96.1.202:9080", &[])
        .await
        .expect("CONNECT");
    assert_eq!((a.status, b.status), (200, 200));
    echo_once(&mut a.stream, b"over mtls a").await;
    echo_once(&mut b.stream, b"over mtls b!").await;
    a.stream.shutdown().await.expect("END_STREAM");
    assert!(a.stream.read_all(64).await.expect("end").is_empty());
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, vec!["200 spiffe://cluster.local/ns/a/sa/b 11"]);
    echo_once(&mut b.stream, b"still open").await;
}

/// The route's CONNECT upgrade is enough (the HCM enables none), and
/// classic HTTP/2 CONNECT needs no `allow_connect` (that setting is about
/// extended CONNECT, RFC 8441): the tunnel is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_upgrade_alone_without_allow_connect() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        let vh = vec![
            json!({"name": "vh", "domains": ["*"], "routes": [connect_route("up", connect_terminate_upgrade())]}),
        ];
        let h = hcm("ingress", vec![], vh, json!({}));
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("up", &[port], json!({}))],
        )
    });
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut o = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    assert_eq!(o.status, 200);
    echo_once(&mut o.stream, b"no allow_connect").await;
    let mut o = h1_connect(p.addr(), "10.0.0.1:80", &[])
        .await
        .expect("CONNECT");
    assert_eq!(o.status, 200, "{}", o.head);
    o.stream.write_all(b"h1").await.expect("write");
    let mut got = [0u8; 2];
    tokio::time::timeout(WAIT, o.stream.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&got, b"h1");
}

/// The client resets one tunnel mid-transfer: only that stream ends (its
/// upstream connection is closed, the log says `DR`, Envoy's downstream
/// remote reset); another tunnel on the same connection keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_stream_ends_only_its_tunnel() {
    let path = log_path("connect", "reset");
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let log = file_log(
        &path,
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:AUTHORITY)%\n",
    );
    let p = start(
        vec![],
        vec![],
        json!({"access_log": [log]}),
        vec![cluster("up", &[port], json!({}))],
    );
    let c = H2Conn::h2c(p.addr()).await.expect("h2c");
    let mut a = c.connect("10.0.0.1:80", &[]).await.expect("CONNECT");
    let mut b = c.connect("10.0.0.2:80", &[]).await.expect("CONNECT");
    assert_eq!((a.status, b.status), (200, 200));
    echo_once(&mut a.stream, b"before the reset").await;
    echo_once(&mut b.stream, b"b before").await;
    a.stream.reset();
    // The reset tunnel's upstream connection is closed.
    let r = echo.wait_results(1, WAIT).await;
    assert_eq!(r.len(), 1, "{r:?}");
    echo_once(&mut b.stream, b"b after the reset").await;
    assert!(!c.is_closed());
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, vec!["200 DR 10.0.0.1:80"]);
}
