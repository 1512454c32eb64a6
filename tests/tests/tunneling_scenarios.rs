//! `tcp_proxy` `tunneling_config`: HBONE origination. Each downstream TCP
//! connection becomes an HTTP/2 CONNECT (or POST) stream, over mTLS (TLS
//! 1.3, ALPN `h2`, SPIFFE certificates made at run time) to a test HBONE
//! server ([`weir_tests::hbone_server`]) or to weir's own CONNECT
//! termination; HTTP/1.1 CONNECT when the cluster has no HTTP/2 options.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 as the originator with `WEIR_SCENARIO_TARGET=envoy` (same
//! config, same traffic, same assertions):
//!
//! ```sh
//! cargo test -p weir-tests --test tunneling_scenarios
//! WEIR_SCENARIO_TARGET=envoy ENVOY_BIN=... cargo test -p weir-tests --test tunneling_scenarios
//! ```
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, listener, log_path, merge, stat_is, tcp_proxy,
};
use weir_tests::hbone_server::{Behavior, HboneOptions, HboneProto, HboneServer};
use weir_tests::scenario::{Proxy, StartOptions, Target};
use weir_tests::tcp;
use weir_tests::tls::{Leaf, LeafFiles, TempDir, TestCa, TlsServerOptions, TlsVersions};

const WAIT: Duration = Duration::from_secs(10);
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const HTTP_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const LOG: &str =
    "%UPSTREAM_HOST% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_CLUSTER%\n";

const WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const ZTUNNEL: &str = "spiffe://cluster.local/ns/default/sa/ztunnel";

/// The mesh: one CA, the waypoint's (client) and the destination ztunnel's
/// (server) certificates, their files.
struct Mesh {
    ca: TestCa,
    dir: TempDir,
    waypoint: LeafFiles,
    ztunnel: Leaf,
    ca_file: String,
}

impl Mesh {
    fn new() -> Mesh {
        let ca = TestCa::new("mesh-root");
        let dir = TempDir::new("tunneling").expect("tmp");
        let waypoint = ca.issue(weir_tests::tls::LeafSpec::spiffe(WAYPOINT));
        let ztunnel = ca.issue(weir_tests::tls::LeafSpec::spiffe(ZTUNNEL));
        let waypoint = waypoint.write_files(&dir, "waypoint");
        let ca_file = dir.write("ca.pem", ca.pem()).display().to_string();
        Mesh {
            ca,
            dir,
            waypoint,
            ztunnel,
            ca_file,
        }
    }

    /// The destination's HBONE server: TLS 1.3 only, ALPN h2 (or
    /// http/1.1), client certificate required.
    async fn server(&self, proto: HboneProto, behavior: Behavior, max: Option<u32>) -> HboneServer {
        let alpn: &[&str] = match proto {
            HboneProto::Http2 => &["h2"],
            HboneProto::Http1 => &["http/1.1"],
        };
        HboneServer::start(HboneOptions {
            tls: TlsServerOptions::new("ztunnel", &self.ztunnel)
                .alpn(alpn)
                .require_client_cert(&self.ca)
                .versions(TlsVersions::Tls13Only),
            proto,
            behavior,
            max_concurrent_streams: max,
        })
        .await
        .expect("hbone server")
    }

    /// `connect_originate`'s transport: TLS 1.3, the waypoint's
    /// certificate, SAN prefix `san_prefix`, ALPN `alpn`.
    fn transport(&self, san_prefix: &str, alpn: &[&str]) -> Value {
        json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_3",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                "alpn_protocols": alpn,
                "tls_certificates": [{
                    "certificate_chain": {"filename": self.waypoint.chain.display().to_string()},
                    "private_key": {"filename": self.waypoint.key.display().to_string()},
                }],
                "validation_context": {
                    "trusted_ca": {"filename": self.ca_file},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": san_prefix}},
                    ],
                },
            },
        }})
    }

    /// The `connect_originate` cluster to `port`: HTTP/2 with
    /// `allow_connect` (`h2: false`: HTTP/1.1), `extra` cluster fields.
    fn cluster(&self, port: u16, h2: bool, common: Value, extra: Value) -> Value {
        let opts = if h2 {
            json!({
                "@type": HTTP_OPTIONS,
                "common_http_protocol_options": common,
                "explicit_http_config": {"http2_protocol_options": {"allow_connect": true}},
            })
        } else {
            json!({
                "@type": HTTP_OPTIONS,
                "common_http_protocol_options": common,
                "explicit_http_config": {"http_protocol_options": {}},
            })
        };
        let alpn: &[&str] = if h2 { &["h2"] } else { &["http/1.1"] };
        cluster(
            "connect_originate",
            &[port],
            merge(
                json!({
                    "transport_socket": self.transport("spiffe://cluster.local/", alpn),
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts,
                    },
                }),
                extra,
            ),
        )
    }
}

/// tcp_proxy with `tunneling` (the `tunneling_config`) and an access log.
fn tunnel_proxy(tunneling: Value, log: &std::path::Path) -> Value {
    tunnel_proxy_format(tunneling, log, LOG)
}

/// [`tunnel_proxy`] with the access log's `format`.
fn tunnel_proxy_format(tunneling: Value, log: &std::path::Path, format: &str) -> Value {
    tcp_proxy(
        "connect_originate",
        "connect_originate",
        json!({
            "tunneling_config": tunneling,
            "access_log": [file_log(log, format)],
        }),
    )
}

fn start(filter: Value, cluster: Value) -> Proxy {
    Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![filter.clone()])],
            )],
            vec![cluster.clone()],
        )
    })
}

/// Writes `msg` and reads it back.
async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(got, msg);
}

/// Reads until EOF; `Err` on a reset.
async fn read_to_end(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("end in time")?;
    Ok(out)
}

/// Istio's `connect_originate`: `%DOWNSTREAM_LOCAL_ADDRESS%` becomes the
/// CONNECT authority, `headers_to_add` (formatted) are added, the waypoint
/// presents its SPIFFE certificate over TLS 1.3 with ALPN h2; bytes go
/// both ways; the client's FIN is the stream's END_STREAM; the access log
/// names the upstream host and the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_authority_headers_and_identity() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "identity");
    let p = start(
        tunnel_proxy(
            json!({
                "hostname": "%DOWNSTREAM_LOCAL_ADDRESS%",
                "headers_to_add": [
                    {"header": {"key": "baggage", "value": "k8s.namespace.name=default"}},
                    {"header": {"key": "x-local-port", "value": "%DOWNSTREAM_LOCAL_PORT%"}},
                ],
            }),
            &log,
        ),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"hello through HBONE").await;
    c.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
    let seen = srv.wait_seen(1, WAIT).await;
    let s = &seen[0];
    assert_eq!(s.method, "CONNECT");
    assert_eq!(s.authority, p.addr().to_string());
    assert_eq!(s.scheme, None, "{s:?}");
    assert_eq!(
        s.headers.get("baggage").expect("baggage"),
        "k8s.namespace.name=default"
    );
    assert_eq!(
        s.headers.get("x-local-port").expect("x-local-port"),
        &p.addr().port().to_string()
    );
    assert_eq!(srv.wait_end(0, WAIT).await, Ok(19));
    let hs = &srv.handshakes()[0];
    let tls = hs.tls.as_ref().expect("handshake");
    assert!(tls.is_tls13());
    assert_eq!(tls.alpn.as_deref(), Some("h2"));
    assert_eq!(
        hs.client_cert().expect("client cert").uri_sans,
        vec![WAYPOINT.to_owned()]
    );
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(
        lines[0],
        format!("{} - 19 19 connect_originate", srv.addr())
    );
    stat_is(&p, "cluster.connect_originate.upstream_cx_http2_total", 1).await;
    stat_is(&p, "cluster.connect_originate.upstream_rq_total", 1).await;
    stat_is(&p, "cluster.connect_originate.upstream_rq_active", 0).await;
    stat_is(&p, "cluster.connect_originate.upstream_cx_active", 1).await;
}

/// `%UPSTREAM_LOCAL_ADDRESS%` of a tunnel is the local address of the
/// HTTP/2 connection that carries it (shared by the tunnels on it), over
/// HTTP/1.1 that of the tunnel's own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_local_address_is_the_tunnel_connection() {
    let mesh = Mesh::new();
    for h2 in [true, false] {
        let proto = if h2 {
            HboneProto::Http2
        } else {
            HboneProto::Http1
        };
        let srv = mesh.server(proto, Behavior::Echo, None).await;
        let log = log_path("tunneling", if h2 { "local-h2" } else { "local-h1" });
        let p = start(
            tunnel_proxy_format(
                json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}),
                &log,
                "%UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_PORT%\n",
            ),
            mesh.cluster(srv.port(), h2, json!({}), json!({})),
        );
        for _ in 0..2 {
            let mut c = TcpStream::connect(p.addr()).await.expect("connect");
            echo(&mut c, b"local address").await;
            c.shutdown().await.expect("FIN");
            assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
        }
        let peers: Vec<_> = srv.handshakes().iter().map(|h| h.peer).collect();
        assert_eq!(peers.len(), if h2 { 1 } else { 2 }, "{peers:?}");
        let lines = p.log_lines(&log, 2).await;
        let expected: Vec<String> = (0..2)
            .map(|i| {
                let a = peers[if h2 { 0 } else { i }];
                format!("{a} {}", a.port())
            })
            .collect();
        assert_eq!(lines, expected, "h2: {h2}");
    }
}

/// `use_post`: `POST post_path` with `:scheme https` (TLS upstream) and
/// the hostname as `:authority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_instead_of_connect() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "post");
    let p = start(
        tunnel_proxy(
            json!({"hostname": "dest.example:8080", "use_post": true, "post_path": "/tunnel"}),
            &log,
        ),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"posted bytes").await;
    c.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
    let s = &srv.wait_seen(1, WAIT).await[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.authority, "dest.example:8080");
    assert_eq!(s.path.as_deref(), Some("/tunnel"));
    assert_eq!(s.scheme.as_deref(), Some("https"));
    assert_eq!(srv.wait_end(0, WAIT).await, Ok(12));
}

/// A cluster without HTTP/2 options tunnels with HTTP/1.1 `CONNECT` (one
/// upstream connection per tunnel); the downstream FIN half-closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connect_upstream() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http1, Behavior::Echo, None).await;
    let log = log_path("tunneling", "h1");
    let p = start(
        tunnel_proxy(
            json!({
                "hostname": "%DOWNSTREAM_LOCAL_ADDRESS%",
                "headers_to_add": [{"header": {"key": "x-tunnel", "value": "h1"}}],
            }),
            &log,
        ),
        mesh.cluster(srv.port(), false, json!({}), json!({})),
    );
    for i in 0..2 {
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        echo(&mut c, b"over http/1.1").await;
        c.shutdown().await.expect("FIN");
        assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
        let s = &srv.wait_seen(i + 1, WAIT).await[i];
        assert_eq!(s.method, "CONNECT");
        assert_eq!(s.authority, p.addr().to_string());
        assert_eq!(s.headers.get("host").expect("host"), &p.addr().to_string());
        assert_eq!(s.headers.get("x-tunnel").expect("x-tunnel"), "h1");
        assert_eq!(srv.wait_end(i, WAIT).await, Ok(13));
    }
    // No reuse of an HTTP/1.1 tunnel connection.
    assert_eq!(srv.tls_connections(), 2);
    stat_is(&p, "cluster.connect_originate.upstream_cx_http1_total", 2).await;
}

/// 24 concurrent downstream connections ride one pooled HTTP/2
/// connection (one TLS handshake on the server), each its own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_http2_connection() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "many");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let addr = p.addr();
    let mut tasks = Vec::new();
    for i in 0..24u32 {
        tasks.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            echo(&mut c, format!("stream {i}").as_bytes()).await;
            c
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.expect("task"));
    }
    assert_eq!(srv.wait_seen(24, WAIT).await.len(), 24);
    assert_eq!(srv.tls_connections(), 1, "{:?}", srv.handshakes());
    stat_is(&p, "cluster.connect_originate.upstream_rq_active", 24).await;
    for mut c in conns {
        c.shutdown().await.expect("FIN");
        assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
    }
    stat_is(&p, "cluster.connect_originate.upstream_rq_active", 0).await;
    stat_is(&p, "cluster.connect_originate.upstream_rq_total", 24).await;
    stat_is(&p, "cluster.connect_originate.upstream_cx_total", 1).await;
}

/// The peer's SETTINGS_MAX_CONCURRENT_STREAMS (2) caps a connection: the
/// third open tunnel gets a second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_connection_opens_another() {
    let mesh = Mesh::new();
    let srv = mesh
        .server(HboneProto::Http2, Behavior::Echo, Some(2))
        .await;
    let log = log_path("tunneling", "full");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut conns = Vec::new();
    for i in 0..5u32 {
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        echo(&mut c, format!("stream {i}").as_bytes()).await;
        conns.push(c);
    }
    assert_eq!(srv.tls_connections(), 3, "{:?}", srv.seen());
    let per_conn = |n: usize| srv.seen().iter().filter(|s| s.conn == n).count();
    assert_eq!((per_conn(0), per_conn(1), per_conn(2)), (2, 2, 1));
    stat_is(&p, "cluster.connect_originate.upstream_cx_http2_total", 3).await;
}

/// A refused stream (the server answers 503) closes only its downstream
/// connection: the pooled connection and the other tunnel on it go on.
/// As Envoy: a remote connection failure with the attempts used up (UF,
/// URX), `upstream_cx_connect_attempts_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_closes_only_its_connection() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "refused");
    let filter = tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log);
    let cl = mesh.cluster(srv.port(), true, json!({}), json!({}));
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![
                listener("l", ports.listen, vec![chain(vec![filter.clone()])]),
                listener("l2", ports.listen2, vec![chain(vec![filter.clone()])]),
            ],
            vec![cl.clone()],
        )
    });
    srv.refuse(&p.addr2().to_string(), 503);
    let mut good = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut good, b"before").await;
    let mut bad = TcpStream::connect(p.addr2()).await.expect("connect");
    let _ = bad.write_all(b"never tunnelled").await;
    let r = read_to_end(&mut bad).await;
    assert!(matches!(&r, Ok(b) if b.is_empty()) || r.is_err(), "{r:?}");
    echo(&mut good, b"after").await;
    good.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut good).await.expect("clean end").is_empty());
    assert_eq!(srv.tls_connections(), 1);
    let seen = srv.wait_seen(2, WAIT).await;
    assert_eq!(seen[1].status, 503);
    let lines = p.log_lines(&log, 2).await;
    assert!(
        lines.contains(&format!("{} UF,URX 0 0 connect_originate", srv.addr())),
        "{lines:?}"
    );
    stat_is(
        &p,
        "cluster.connect_originate.upstream_cx_connect_attempts_exceeded",
        1,
    )
    .await;
}

/// Half-close both ways: the server sends a banner and ends its side (the
/// client reads it, then EOF), the client keeps writing, then ends its side
/// (the server sees END_STREAM after every byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_directions() {
    const BANNER: u64 = 100_000;
    let mesh = Mesh::new();
    let srv = mesh
        .server(HboneProto::Http2, Behavior::Banner(BANNER), None)
        .await;
    let log = log_path("tunneling", "half");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    let got = tokio::time::timeout(WAIT, tcp::read_verify_pattern(&mut c))
        .await
        .expect("banner in time")
        .expect("banner");
    assert_eq!(got, BANNER);
    // The upstream's END_STREAM was our EOF; our side still writes.
    tokio::time::timeout(WAIT, tcp::write_pattern(&mut c, 5000))
        .await
        .expect("write in time")
        .expect("write after upstream end");
    c.shutdown().await.expect("FIN");
    assert_eq!(srv.wait_end(0, WAIT).await, Ok(5000));
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(
        lines[0],
        format!("{} - 5000 {BANNER} connect_originate", srv.addr())
    );
}

/// 4 MiB each way through one tunnel, verified byte for byte while both
/// directions flow (flow control on both sides of the proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_mib_each_way() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "big");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let t = tokio::time::timeout(
        Duration::from_secs(60),
        tcp::stream_through(p.addr(), 4 << 20),
    )
    .await
    .expect("transfer in time")
    .expect("transfer");
    assert_eq!(t.received, 4 << 20, "{t:?}");
    assert_eq!(srv.wait_end(0, WAIT).await, Ok(4 << 20));
}

/// The destination's certificate does not match the cluster's SAN prefix:
/// the handshake fails, the downstream connection closes (UF, URX), no
/// request reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_mismatch_fails_the_handshake() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "san");
    let cl = mesh.cluster(
        srv.port(),
        true,
        json!({}),
        json!({"transport_socket": mesh.transport("spiffe://cluster.local/ns/other/", &["h2"])}),
    );
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        cl,
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    let _ = c.write_all(b"x").await;
    let r = read_to_end(&mut c).await;
    assert!(matches!(&r, Ok(b) if b.is_empty()) || r.is_err(), "{r:?}");
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(
        lines[0],
        format!("{} UF,URX 0 0 connect_originate", srv.addr())
    );
    assert_eq!(srv.tls_connections(), 0);
    assert!(srv.seen().is_empty());
    stat_is(&p, "cluster.connect_originate.ssl.fail_verify_san", 1).await;
}

/// The pooled connection closes after the cluster's `idle_timeout` with no
/// stream (`upstream_cx_idle_timeout`); the next tunnel makes a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_the_pooled_connection() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "idle");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({"idle_timeout": "0.4s"}), json!({})),
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"one").await;
    // Busy: a stream keeps the connection past the timeout.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(srv.open_connections(), 1);
    echo(&mut c, b"still").await;
    c.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
    srv.wait_until(WAIT, "pooled connection closed", |s| {
        s.open_connections() == 0
    })
    .await;
    stat_is(&p, "cluster.connect_originate.upstream_cx_idle_timeout", 1).await;
    stat_is(&p, "cluster.connect_originate.upstream_cx_active", 0).await;
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"two").await;
    assert_eq!(srv.tls_connections(), 2);
}

/// `connection_keepalive`: a peer that stops answering PINGs has its
/// pooled connection closed after the timeout, and the tunnel on it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_a_hung_connection() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "keepalive");
    let mut cl = mesh.cluster(srv.port(), true, json!({}), json!({}));
    cl["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        ["http2_protocol_options"]["connection_keepalive"] =
        json!({"interval": "0.2s", "timeout": "0.3s"});
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        cl,
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"alive").await;
    // PINGs answered: the idle tunnel stays up past several intervals.
    tokio::time::sleep(Duration::from_millis(800)).await;
    echo(&mut c, b"still alive").await;
    srv.freeze_connections();
    let r = read_to_end(&mut c).await;
    assert!(matches!(&r, Ok(b) if b.is_empty()) || r.is_err(), "{r:?}");
    stat_is(&p, "cluster.connect_originate.upstream_cx_active", 0).await;
    srv.close_connections();
}

/// A server-first protocol through the tunnel, with the HBONE server
/// forwarding to the authority (a TCP source that speaks first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_forwarded() {
    const LEN: u64 = 1 << 20;
    let mesh = Mesh::new();
    let src = tcp::tcp_source_server(LEN).await.expect("source");
    let srv = mesh
        .server(HboneProto::Http2, Behavior::Forward, None)
        .await;
    let log = log_path("tunneling", "forward");
    let p = start(
        tunnel_proxy(
            json!({"hostname": format!("127.0.0.1:{}", src.port())}),
            &log,
        ),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    let got = tokio::time::timeout(WAIT, tcp::read_verify_pattern(&mut c))
        .await
        .expect("bytes in time")
        .expect("bytes verified");
    assert_eq!(got, LEN);
    // Our FIN (END_STREAM through the tunnel) lets the source finish.
    c.shutdown().await.expect("FIN");
    assert_eq!(src.wait_results(1, WAIT).await[0], Ok(LEN));
    assert_eq!(srv.wait_end(0, WAIT).await, Ok(0));
}

/// A proxy (`target`) terminating HBONE in Istio's `connect_terminate`
/// shape (mTLS with the ztunnel certificate, HTTP/2 `allow_connect`, a
/// `connect_matcher` route) to a TCP echo on `echo_port`.
fn terminator(target: Target, mesh: &Mesh, echo_port: u16) -> Proxy {
    let zt = mesh.ztunnel.write_files(&mesh.dir, "ztunnel");
    let ca_file = mesh.ca_file.clone();
    Proxy::start_with(target, StartOptions::default(), move |ports| {
        let h = weir_tests::config::hcm(
            "connect_terminate",
            vec![],
            vec![json!({"name": "vh", "domains": ["*"], "routes": [{
                "match": {"connect_matcher": {}},
                "route": {"cluster": "echo", "upgrade_configs": [
                    {"upgrade_type": "CONNECT", "connect_config": {}},
                ]},
            }]})],
            json!({
                "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                "http2_protocol_options": {"allow_connect": true},
            }),
        );
        let mut ch = chain(vec![h]);
        ch["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_3"},
                "alpn_protocols": ["h2"],
                "tls_certificates": [{
                    "certificate_chain": {"filename": zt.chain.display().to_string()},
                    "private_key": {"filename": zt.key.display().to_string()},
                }],
                "validation_context": {"trusted_ca": {"filename": ca_file}},
            },
        }});
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![ch])],
            vec![cluster("echo", &[echo_port], json!({}))],
        )
    })
}

/// The originator under test in front of `far` (a terminator): 1 MiB each
/// way through the tunnel, the access log names the far end.
async fn through_terminator(far: Target, name: &str) {
    let mesh = Mesh::new();
    let echo_srv = tcp::tcp_echo_server().await.expect("echo");
    let terminator = terminator(far, &mesh, echo_srv.port());
    let log = log_path("tunneling", name);
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(terminator.addr().port(), true, json!({}), json!({})),
    );
    let t = tokio::time::timeout(
        Duration::from_secs(60),
        tcp::stream_through(p.addr(), 1 << 20),
    )
    .await
    .expect("transfer in time")
    .expect("transfer");
    assert_eq!(t.received, 1 << 20, "{t:?}");
    assert_eq!(echo_srv.wait_results(1, WAIT).await[0], Ok(1 << 20));
    let lines = p.log_lines(&log, 1).await;
    let far: SocketAddr = terminator.addr();
    assert_eq!(
        lines[0],
        format!("{far} - {} {} connect_originate", 1 << 20, 1 << 20)
    );
}

/// weir's own CONNECT termination is the far end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_terminates_what_the_originator_sends() {
    through_terminator(Target::InProcess, "weir-far").await;
}

/// Envoy's CONNECT termination is the far end (Envoy 1.40, whatever the
/// originator under test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_terminates_what_the_originator_sends() {
    through_terminator(Target::Envoy, "envoy-far").await;
}

/// A downstream reset (RST) resets its stream only: the other tunnel on
/// the same pooled connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_reset_resets_only_its_stream() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "reset");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut a = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut a, b"a").await;
    let mut b = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut b, b"b").await;
    // RST instead of FIN.
    #[allow(deprecated)] // SO_LINGER 0 on purpose: the close is a reset.
    a.set_linger(Some(Duration::ZERO)).expect("linger");
    drop(a);
    let end = srv.wait_end(0, WAIT).await;
    assert!(end.is_err(), "a reset, not an end of stream: {end:?}");
    echo(&mut b, b"b still flows").await;
    b.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut b).await.expect("clean end").is_empty());
    assert_eq!(srv.wait_end(1, WAIT).await, Ok(14));
    assert_eq!(srv.tls_connections(), 1);
}

/// A pooled connection the peer dropped is replaced: the next tunnel
/// opens a new connection and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_connection_is_replaced() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "dead");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(srv.port(), true, json!({}), json!({})),
    );
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"first").await;
    c.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut c).await.expect("clean end").is_empty());
    srv.close_connections();
    srv.wait_until(WAIT, "connections closed", |s| s.open_connections() == 0)
        .await;
    stat_is(&p, "cluster.connect_originate.upstream_cx_active", 0).await;
    let mut c = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut c, b"second").await;
    assert_eq!(srv.tls_connections(), 2);
    stat_is(&p, "cluster.connect_originate.upstream_cx_http2_total", 2).await;
}

/// `max_requests` 1: a second concurrent tunnel overflows (the stream is
/// refused by the pool, `upstream_rq_active_overflow`), its downstream
/// connection closes; the first goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_limits_streams() {
    let mesh = Mesh::new();
    let srv = mesh.server(HboneProto::Http2, Behavior::Echo, None).await;
    let log = log_path("tunneling", "overflow");
    let p = start(
        tunnel_proxy(json!({"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}), &log),
        mesh.cluster(
            srv.port(),
            true,
            json!({}),
            json!({"circuit_breakers": {"thresholds": [{"max_requests": 1}]}}),
        ),
    );
    let mut a = TcpStream::connect(p.addr()).await.expect("connect");
    echo(&mut a, b"first").await;
    let mut b = TcpStream::connect(p.addr()).await.expect("connect");
    let _ = b.write_all(b"x").await;
    let r = read_to_end(&mut b).await;
    assert!(matches!(&r, Ok(v) if v.is_empty()) || r.is_err(), "{r:?}");
    stat_is(
        &p,
        "cluster.connect_originate.upstream_rq_active_overflow",
        1,
    )
    .await;
    stat_is(
        &p,
        "cluster.connect_originate.upstream_cx_connect_attempts_exceeded",
        1,
    )
    .await;
    // The first stream waited for the connection being made.
    stat_is(&p, "cluster.connect_originate.upstream_rq_pending_total", 1).await;
    stat_is(&p, "cluster.connect_originate.upstream_rq_total", 1).await;
    // As Envoy: a local close before connecting, attempts used up (URX,
    // not UF).
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(
        lines[0],
        format!("{} URX 0 0 connect_originate", srv.addr())
    );
    echo(&mut a, b"first again").await;
    a.shutdown().await.expect("FIN");
    assert!(read_to_end(&mut a).await.expect("clean end").is_empty());
    assert_eq!(srv.seen().len(), 1);
}

/// Fields weir does not implement are refused with their path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_fields_are_rejected() {
    if Target::from_env().is_envoy() {
        return;
    }
    for (cfg, field) in [
        (
            json!({"hostname": "h:1", "propagate_response_headers": true}),
            "tunneling_config.propagate_response_headers",
        ),
        (
            json!({"hostname": "h:1", "post_path": "/x"}),
            "tunneling_config.post_path",
        ),
    ] {
        let f = tcp_proxy("t", "c", json!({"tunneling_config": cfg}));
        let r = Proxy::try_start(Target::InProcess, StartOptions::default(), move |ports| {
            bootstrap(
                ports,
                vec![listener("l", ports.listen, vec![chain(vec![f.clone()])])],
                vec![cluster("c", &[1], json!({}))],
            )
        });
        let e = format!("{:#}", r.err().expect("rejected"));
        assert!(e.contains(field), "{e}");
    }
}
