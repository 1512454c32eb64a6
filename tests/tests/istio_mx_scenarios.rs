//! Istio's TCP metadata exchange (`envoy.tcp.metadataexchange.config.MetadataExchange`:
//! the listener's network filter and the cluster filter, ALPN
//! `istio-peer-exchange`) and `istio.alpn`, with real sockets: two weirs
//! talking mTLS to each other, a hand-written peer speaking the wire format
//! (magic, length, `google.protobuf.Any` of a `Struct`; encoded here, not
//! by the code under test), peers without the exchange, and a real TLS
//! upstream recording the ALPN offered.
//!
//! Envoy 1.40 has neither filter (they are istio/proxy's extensions), so
//! this suite runs against weir only, whatever `WEIR_SCENARIO_TARGET`
//! says; the behaviour follows istio/proxy's `metadata_exchange.cc` and
//! `alpn_filter.cc`. Both weirs run in this process and so share one node
//! (weir's node is process-wide, as Envoy's `LocalInfo`): the exchanged
//! peer of each is that node.
//!
//! ```sh
//! cargo test -p weir-tests --test istio_mx_scenarios
//! ```
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{
    bootstrap, chain, cluster, filter, hcm, listener, merge, route, stat_is, tcp_proxy, vhost,
    with_node, DOWNSTREAM_TLS, UPSTREAM_TLS,
};
use weir_tests::scenario::{Http, Ports, Proxy, StartOptions, Target};
use weir_tests::tls::{self, LeafSpec, TempDir, TestCa, TlsClient, TlsServerOptions};

const TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
const MAGIC: [u8; 4] = [0x3D, 0x23, 0x04, 0x67];
const CLIENT_SAN: &str = "spiffe://cluster.local/ns/apps/sa/client";
const SERVER_SAN: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const INBOUND: &str = "inbound|9080||";
const OUTBOUND: &str = "outbound|9080||ratings.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(5);

/// The node both weirs run as (a ratings sidecar).
fn node() -> Value {
    json!({
        "id": "sidecar~10.0.0.7~ratings-v1-1.default~default.svc.cluster.local",
        "metadata": {
            "NAME": "ratings-v1-1", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
            "WORKLOAD_NAME": "ratings-v1",
            "LABELS": {
                "app": "ratings", "version": "v1",
                "service.istio.io/canonical-name": "ratings",
                "service.istio.io/canonical-revision": "v1",
            },
        },
    })
}

fn istio_filter(name: &str, ty: &str, value: Value) -> Value {
    filter(
        name,
        TYPED_STRUCT,
        json!({"type_url": format!("type.googleapis.com/{ty}"), "value": value}),
    )
}

fn mx() -> Value {
    istio_filter(
        "istio.metadata_exchange",
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        json!({"protocol": "istio-peer-exchange"}),
    )
}

fn stats() -> Value {
    istio_filter("istio.stats", "stats.PluginConfig", json!({}))
}

fn start(config: impl Fn(&Ports) -> String) -> Proxy {
    Proxy::start_with(Target::InProcess, StartOptions::default(), config)
}

/// The server side: an inbound mTLS listener offering `istio-peer-exchange`
/// with the exchange, istio.stats and tcp_proxy to a TCP echo.
async fn server(ca: &TestCa, dir: &TempDir) -> (Proxy, weir_tests::tcp::TcpServer) {
    let echo = weir_tests::tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let files = ca
        .issue(LeafSpec::spiffe(SERVER_SAN).dns("ratings"))
        .write_files(dir, "server");
    let ca_file = dir.write("ca.pem", ca.pem());
    let tls = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWNSTREAM_TLS,
        "require_client_certificate": true,
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificates": [{
                "certificate_chain": {"filename": files.chain.display().to_string()},
                "private_key": {"filename": files.key.display().to_string()},
            }],
            "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
        },
    }});
    let p = start(move |ports| {
        let c = merge(
            chain(vec![mx(), stats(), tcp_proxy(INBOUND, INBOUND, json!({}))]),
            json!({"transport_socket": tls}),
        );
        let l = merge(
            listener("l", ports.listen, vec![c]),
            json!({"traffic_direction": "INBOUND"}),
        );
        with_node(
            bootstrap(ports, vec![l], vec![cluster(INBOUND, &[port], json!({}))]),
            node(),
        )
    });
    (p, echo)
}

/// A metric line's value once it has all `labels` (substrings of the label
/// set), waiting for it; panics after [`WAIT`].
async fn metric(p: &Proxy, name: &str, labels: &[&str], want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = p.admin("GET", "/stats/prometheus").await.text();
        let hit = text.lines().find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') && labels.iter().all(|x| r.contains(x)))
        });
        if let Some(l) = hit {
            let v: u64 = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("value");
            // Connections are reported at close, after the client saw its
            // bytes: wait for the expected value, return the last one seen.
            if v == want || tokio::time::Instant::now() >= deadline {
                return v;
            }
        } else if tokio::time::Instant::now() >= deadline {
            let istio: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_")).collect();
            panic!("no {name} with {labels:?} in:\n{}", istio.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Client weir (tcp_proxy, cluster filter, mTLS offering
/// `istio-peer-exchange`) to server weir (the listener's filter): the bytes
/// arrive unchanged both ways, and each side's `istio_tcp_*` metrics carry
/// the peer it learnt from the exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_to_weir_exchange_labels_both_sides() {
    let ca = TestCa::new("istio root");
    let dir = TempDir::new("istio-mx").expect("temp dir");
    let (s, echo) = server(&ca, &dir).await;
    let s_port = s.addr().port();
    let client = ca
        .issue(LeafSpec::spiffe(CLIENT_SAN))
        .write_files(&dir, "client");
    let c = start(move |ports| {
        let l = merge(
            listener(
                "l",
                ports.listen,
                vec![chain(vec![
                    stats(),
                    tcp_proxy(OUTBOUND, OUTBOUND, json!({})),
                ])],
            ),
            json!({"traffic_direction": "OUTBOUND"}),
        );
        let up = cluster(
            OUTBOUND,
            &[s_port],
            json!({
                "filters": [mx()],
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": UPSTREAM_TLS, "sni": "ratings",
                    "common_tls_context": {
                        "alpn_protocols": ["istio-peer-exchange", "istio"],
                        "tls_certificates": [{
                            "certificate_chain": {"filename": client.chain.display().to_string()},
                            "private_key": {"filename": client.key.display().to_string()},
                        }],
                    },
                }},
            }),
        );
        with_node(bootstrap(ports, vec![l], vec![up]), node())
    });
    for len in [100_000, 10] {
        let t = weir_tests::tcp::stream_through(c.addr(), len)
            .await
            .expect("through both");
        assert_eq!(t.received, len, "pattern intact both ways");
    }
    assert_eq!(echo.bytes(), 100_010, "the echo saw only application bytes");
    // The client (reporter source) knows the server's workload.
    let src = [
        "reporter=\"source\"",
        "source_workload=\"ratings-v1\"",
        "destination_workload=\"ratings-v1\"",
        "destination_workload_namespace=\"default\"",
        "destination_app=\"ratings\"",
        "destination_canonical_service=\"ratings\"",
        "destination_canonical_revision=\"v1\"",
        "destination_cluster=\"Kubernetes\"",
        "request_protocol=\"tcp\"",
        // As Istio: the upstream TLS connection's certificates.
        "source_principal=\"spiffe://cluster.local/ns/apps/sa/client\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/ratings\"",
    ];
    assert_eq!(
        metric(&c, "istio_tcp_connections_closed_total", &src, 2).await,
        2
    );
    assert_eq!(
        metric(&c, "istio_tcp_sent_bytes_total", &src, 100_010).await,
        100_010
    );
    // The server (reporter destination) knows the client's workload and
    // certificate.
    let dst = [
        "reporter=\"destination\"",
        "source_workload=\"ratings-v1\"",
        "source_canonical_service=\"ratings\"",
        "source_principal=\"spiffe://cluster.local/ns/apps/sa/client\"",
        "source_workload_namespace=\"apps\"",
        "source_app=\"ratings\"",
        "source_cluster=\"Kubernetes\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/ratings\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(
        metric(&s, "istio_tcp_connections_opened_total", &dst, 2).await,
        2
    );
    assert_eq!(
        metric(&s, "istio_tcp_received_bytes_total", &dst, 100_010).await,
        100_010
    );
    for p in [&c, &s] {
        stat_is(p, "metadata_exchange.alpn_protocol_found", 2).await;
        stat_is(p, "metadata_exchange.metadata_added", 2).await;
    }
}

// --- the wire format, encoded here (not by the code under test)

fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    varint(bytes.len(), out);
    out.extend_from_slice(bytes);
}

/// `google.protobuf.Struct` of `v` (strings and objects), keys in order.
fn pb_struct(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    keys.sort();
    for k in keys {
        let mut value = Vec::new();
        match &v[k] {
            Value::String(s) => field(0x1a, s.as_bytes(), &mut value),
            o @ Value::Object(_) => field(0x2a, &pb_struct(o), &mut value),
            other => panic!("unsupported {other}"),
        }
        let mut entry = Vec::new();
        field(0x0a, k.as_bytes(), &mut entry);
        field(0x12, &value, &mut entry);
        field(0x0a, &entry, &mut out);
    }
    out
}

/// A whole exchange header for peer metadata `md`.
fn exchange_header(md: Value, id: &str) -> Vec<u8> {
    let st = pb_struct(&json!({"x-envoy-peer-metadata": md, "x-envoy-peer-metadata-id": id}));
    let mut any = Vec::new();
    field(
        0x0a,
        b"type.googleapis.com/google.protobuf.Struct",
        &mut any,
    );
    field(0x12, &st, &mut any);
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(any.len() as u32).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

/// Reads one exchange header and returns the `Any`'s bytes.
async fn read_header<R: AsyncReadExt + Unpin>(r: &mut R) -> Vec<u8> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).await.expect("initial header");
    assert_eq!(head[..4], MAGIC, "the server's magic");
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.expect("proxy data");
    body
}

/// A hand-written peer speaking the exchange: the server answers with its
/// own header first (magic, length, an `Any` of a `Struct` with its node's
/// workload fields and id), strips the peer's from what goes upstream,
/// and labels its metrics with the peer's workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_peer_speaks_the_wire_format() {
    let ca = TestCa::new("istio root");
    let dir = TempDir::new("istio-mx").expect("temp dir");
    let (s, echo) = server(&ca, &dir).await;
    let leaf = ca.issue(LeafSpec::spiffe(CLIENT_SAN));
    let client = TlsClient::builder()
        .trust(&ca)
        .alpn(&["istio-peer-exchange"])
        .client_cert(&leaf)
        .build();
    let (mut conn, info) = client.connect(s.addr(), "ratings").await.expect("mtls");
    assert_eq!(info.alpn.as_deref(), Some("istio-peer-exchange"));
    let mut out = exchange_header(
        json!({
            "NAME": "hand-1", "NAMESPACE": "apps", "CLUSTER_ID": "remote",
            "WORKLOAD_NAME": "hand-client",
            "LABELS": {"app": "hand", "version": "v9"},
        }),
        "sidecar~10.1.1.1~hand-1.apps~apps.svc.cluster.local",
    );
    out.extend_from_slice(b"hello through the exchange");
    conn.write_all(&out).await.expect("write");
    let any = read_header(&mut conn).await;
    let text = String::from_utf8_lossy(&any);
    for want in [
        "type.googleapis.com/google.protobuf.Struct",
        "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id",
        "sidecar~10.0.0.7~ratings-v1-1.default~default.svc.cluster.local",
        "WORKLOAD_NAME",
        "ratings-v1",
        "service.istio.io/canonical-name",
    ] {
        assert!(text.contains(want), "{want} in {text:?}");
    }
    let mut back = vec![0u8; 26];
    conn.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, b"hello through the exchange");
    conn.shutdown().await.expect("close");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(echo.bytes(), 26);
    let dst = [
        "reporter=\"destination\"",
        "source_workload=\"hand-client\"",
        "source_workload_namespace=\"apps\"",
        "source_app=\"hand\"",
        "source_version=\"v9\"",
        "source_cluster=\"remote\"",
        "destination_workload=\"ratings-v1\"",
    ];
    assert_eq!(
        metric(&s, "istio_tcp_connections_closed_total", &dst, 1).await,
        1
    );
    assert_eq!(
        metric(&s, "istio_tcp_received_bytes_total", &dst, 26).await,
        26
    );
}

/// Peers without the exchange: without the ALPN the bytes pass unchanged
/// and nothing is written (`alpn_protocol_not_found`); with the ALPN but
/// no header of theirs, the server's header comes first and their bytes
/// still pass unchanged (`initial_header_not_found`), as Istio's filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_exchange_pass_unchanged() {
    let ca = TestCa::new("istio root");
    let dir = TempDir::new("istio-mx").expect("temp dir");
    let (s, echo) = server(&ca, &dir).await;
    let leaf = ca.issue(LeafSpec::spiffe(CLIENT_SAN));
    let payload = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    for (alpn, exchange) in [("istio", false), ("istio-peer-exchange", true)] {
        let client = TlsClient::builder()
            .trust(&ca)
            .alpn(&[alpn])
            .client_cert(&leaf)
            .build();
        let (mut conn, _) = client.connect(s.addr(), "ratings").await.expect("mtls");
        conn.write_all(payload).await.expect("write");
        if exchange {
            read_header(&mut conn).await;
        }
        let mut back = vec![0u8; payload.len()];
        conn.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, payload, "{alpn}");
        conn.shutdown().await.expect("close");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "{alpn}: {rest:?}");
    }
    assert_eq!(echo.bytes(), 2 * payload.len() as u64);
    stat_is(&s, "metadata_exchange.alpn_protocol_not_found", 1).await;
    stat_is(&s, "metadata_exchange.alpn_protocol_found", 1).await;
    stat_is(&s, "metadata_exchange.initial_header_not_found", 1).await;
    // No peer: Istio's unknowns.
    let dst = [
        "reporter=\"destination\"",
        "source_workload=\"unknown\"",
        "source_principal=\"spiffe://cluster.local/ns/apps/sa/client\"",
    ];
    assert_eq!(
        metric(&s, "istio_tcp_connections_closed_total", &dst, 2).await,
        2
    );
}

/// `istio.alpn`: upstream TLS offers the list configured for the upstream
/// protocol (HTTP/1.1 and HTTP/2 clusters), instead of the cluster's,
/// except on clusters istiod marks `istio.alpn_override: "false"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_alpn_overrides_upstream_alpn_by_protocol() {
    let ca = TestCa::new("root");
    let leaf = ca.issue(LeafSpec::server("up.test"));
    let h1 = tls::tls_upstream(TlsServerOptions::new("h1", &leaf))
        .await
        .expect("h1 upstream");
    let h2 = tls::tls_upstream(TlsServerOptions::new("h2", &leaf))
        .await
        .expect("h2 upstream");
    let ext = tls::tls_upstream(TlsServerOptions::new("ext", &leaf).alpn(&[]))
        .await
        .expect("ext upstream");
    let (p1, p2, p3) = (h1.port(), h2.port(), ext.port());
    let p = start(move |ports| {
        let alpn = istio_filter(
            "istio.alpn",
            "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            json!({"alpn_override": [
                {"upstream_protocol": "HTTP10", "alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]},
            ]}),
        );
        let h = hcm(
            "gw",
            vec![alpn],
            vec![vhost(
                "vh",
                vec![
                    route("/h2", "h2", json!({})),
                    route("/ext", "ext", json!({})),
                    route("/", "h1", json!({})),
                ],
                json!({}),
            )],
            json!({}),
        );
        let tls = json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS, "sni": "up.test",
            "common_tls_context": {"alpn_protocols": ["istio-peer-exchange", "istio"]},
        }}});
        // Every proxy of this suite runs as the same node: the node is
        // process-wide and the tests run in parallel.
        let b = bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("h1", &[p1], tls.clone()),
                cluster("h2", &[p2], weir_tests::config::h2_upstream(tls.clone())),
                // istiod's mark on clusters with user TLS settings.
                cluster(
                    "ext",
                    &[p3],
                    merge(
                        tls.clone(),
                        json!({"metadata": {"filter_metadata": {"istio": {"alpn_override": "false"}}}}),
                    ),
                ),
            ],
        );
        with_node(b, node())
    });
    let r = Http::h1().get(&format!("{}/a", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream-alpn"), Some("http/1.1"));
    let r = Http::h1().get(&format!("{}/h2", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream-alpn"), Some("h2"));
    assert_eq!(
        h1.wait_connection(1, WAIT).await.offered_alpn,
        ["istio-http/1.1", "istio", "http/1.1"]
    );
    assert_eq!(
        h2.wait_connection(1, WAIT).await.offered_alpn,
        ["istio-h2", "istio", "h2"]
    );
    // `alpn_override: "false"`: the cluster's own ALPN (the server has no
    // ALPN: none negotiated, HTTP/1.1 spoken).
    let r = Http::h1().get(&format!("{}/ext", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        ext.wait_connection(1, WAIT).await.offered_alpn,
        ["istio-peer-exchange", "istio"]
    );
}
