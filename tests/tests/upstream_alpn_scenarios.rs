//! The upstream ALPN override: filter state
//! `envoy.network.application_protocols` (set here by `set_filter_state`,
//! HTTP and network) replaces the ALPN list upstream TLS offers, for the
//! router and for `tcp_proxy`, and upstream connections made with
//! different lists are not shared. A real TLS upstream records what each
//! handshake offered. Also the upstream TLS connection's certificates in
//! access logs (`%UPSTREAM_PEER_URI_SAN%` and friends) with a mutual-TLS
//! upstream presenting SPIFFE certificates.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (Envoy registers the
//! `envoy.network.application_protocols` object factory), which is how the
//! expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test upstream_alpn_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test upstream_alpn_scenarios
//! ```
//!
//! Istio's `istio.alpn`, which sets the same object, is weir-only
//! (`istio_mx_scenarios`).
use std::time::Duration;

use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, chain, cluster, filter, hcm, listener, route, tcp_proxy, vhost,
};
use weir_tests::scenario::{Http, Proxy, StartOptions, Target};
use weir_tests::tcp;
use weir_tests::tls::{self, LeafSpec, TestCa, TlsServerOptions};

const HTTP_SFS: &str =
    "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config";
const NET_SFS: &str =
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config";
const TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const KEY: &str = "envoy.network.application_protocols";
const WAIT: Duration = Duration::from_secs(5);

/// A `FilterStateValue` of the ALPN object from `format`.
fn alpn_value(format: &str) -> Value {
    json!({
        "object_key": KEY,
        "format_string": {"text_format_source": {"inline_string": format}},
    })
}

/// `extra` with upstream TLS (SNI `up.test`) offering `alpn` by default.
fn upstream_tls(alpn: &[&str]) -> Value {
    json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS, "sni": "up.test",
        "common_tls_context": {"alpn_protocols": alpn},
    }}})
}

/// The router offers the filter state's list instead of the cluster's; a
/// request without it offers the cluster's; each distinct list gets its own
/// upstream connection, and a list seen before reuses its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_filter_state_overrides_upstream_alpn_and_keys_the_pool() {
    let ca = TestCa::new("root");
    let leaf = ca.issue(LeafSpec::server("up.test"));
    let up = tls::tls_upstream(TlsServerOptions::new("up", &leaf).alpn(&["http/1.1"]))
        .await
        .expect("tls upstream");
    let port = up.port();
    // One worker (as the Envoy target): the client's requests share one
    // upstream pool.
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    let p = Proxy::start_with(Target::from_env(), opts, move |ports| {
        let sfs = filter(
            "envoy.filters.http.set_filter_state",
            HTTP_SFS,
            json!({"on_request_headers": [alpn_value("%REQ(x-alpn)%")]}),
        );
        let with = hcm(
            "with",
            vec![sfs],
            vec![vhost("vh", vec![route("/", "up", json!({}))], json!({}))],
            json!({}),
        );
        let without = hcm(
            "without",
            vec![],
            vec![vhost("vh", vec![route("/", "up", json!({}))], json!({}))],
            json!({}),
        );
        bootstrap(
            ports,
            vec![
                listener("l", ports.listen, vec![chain(vec![with])]),
                listener("l2", ports.listen2, vec![chain(vec![without])]),
            ],
            vec![cluster(
                "up",
                &[port],
                upstream_tls(&["x-cluster", "http/1.1"]),
            )],
        )
    });
    let h = Http::h1();
    let base2 = format!("http://{}", p.addr2());
    let r = h.get(&format!("{base2}/plain"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let c = up.wait_connection(1, WAIT).await;
    assert_eq!(c.offered_alpn, ["x-cluster", "http/1.1"]);

    // One client connection: one worker, one upstream pool.
    let base = p.base();
    for (i, list) in ["x-one,http/1.1", "x-two,http/1.1", "x-one,http/1.1"]
        .into_iter()
        .enumerate()
    {
        let r = h.get(&format!("{base}/r{i}"), &[("x-alpn", list)]).await;
        assert_eq!(r.status, 200, "{list}: {}", r.text());
        assert_eq!(r.header("x-upstream-alpn"), Some("http/1.1"));
    }
    let conns = up.wait_connections(3, WAIT).await;
    let offered: Vec<Vec<String>> = conns.iter().map(|c| c.offered_alpn.clone()).collect();
    assert_eq!(
        offered,
        [
            vec!["x-cluster", "http/1.1"],
            vec!["x-one", "http/1.1"],
            vec!["x-two", "http/1.1"],
        ],
        "the third request reuses the x-one connection"
    );
    // No fourth connection shows up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.connections().len(), 3);
}

/// `tcp_proxy` offers the list the network `set_filter_state` put into the
/// connection's filter state, in place of the cluster's (none here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_offers_the_connection_filter_state_alpn() {
    let ca = TestCa::new("root");
    let leaf = ca.issue(LeafSpec::server("up.test"));
    // No ALPN on the server: it accepts whatever is offered.
    let up = tls::tls_tcp_echo(TlsServerOptions::new("up", &leaf).alpn(&[]))
        .await
        .expect("tls echo");
    let port = up.port();
    let p = Proxy::start(move |ports| {
        let sfs = filter(
            "envoy.filters.network.set_filter_state",
            NET_SFS,
            json!({"on_new_connection": [alpn_value("x-tcp,istio-peer-exchange")]}),
        );
        bootstrap(
            ports,
            vec![
                listener(
                    "l",
                    ports.listen,
                    vec![chain(vec![sfs, tcp_proxy("tcp", "up", json!({}))])],
                ),
                listener(
                    "l2",
                    ports.listen2,
                    vec![chain(vec![tcp_proxy("tcp2", "up", json!({}))])],
                ),
            ],
            vec![cluster("up", &[port], upstream_tls(&[]))],
        )
    });
    let t = tcp::stream_through(p.addr(), 1024)
        .await
        .expect("through l");
    assert_eq!(t.received, 1024);
    let c = up.wait_connection(1, WAIT).await;
    assert_eq!(c.offered_alpn, ["x-tcp", "istio-peer-exchange"]);
    // Without the object: no ALPN at all (tcp_proxy has no default).
    let t = tcp::stream_through(p.addr2(), 10)
        .await
        .expect("through l2");
    assert_eq!(t.received, 10);
    let c = up.wait_connection(2, WAIT).await;
    assert!(c.offered_alpn.is_empty(), "{c:?}");
}

/// The upstream TLS connection's certificates in the access log
/// (`%UPSTREAM_PEER_URI_SAN%`, `%UPSTREAM_LOCAL_URI_SAN%`,
/// `%UPSTREAM_PEER_SUBJECT%`, ...): a mutual-TLS upstream with SPIFFE
/// certificates on both sides, two requests over one pooled connection (the
/// second reuses what the first connection found), and a plain-text cluster,
/// whose entries have none (`-`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificates_in_the_access_log() {
    const PEER: &str = "spiffe://cluster.local/ns/default/sa/productpage";
    const LOCAL: &str = "spiffe://cluster.local/ns/istio-system/sa/gateway";
    let ca = TestCa::new("mesh root");
    let dir = tls::TempDir::new("upstream-sans").expect("temp dir");
    let leaf = ca.issue(LeafSpec::server("up.test").uri(PEER));
    let up = tls::tls_upstream(
        TlsServerOptions::new("up", &leaf)
            .alpn(&["http/1.1"])
            .require_client_cert(&ca),
    )
    .await
    .expect("tls upstream");
    let plain = weir_tests::upstream::http1("plain").await.expect("echo");
    let client = ca
        .issue(LeafSpec::client("gateway").uri(LOCAL))
        .write_files(&dir, "client");
    let ca_file = dir.write("ca.pem", ca.pem());
    let log = dir.path().join("access.log");
    let (tls_port, plain_port) = (up.port(), plain.port());
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    let log2 = log.clone();
    let p = Proxy::start_with(Target::from_env(), opts, move |ports| {
        let format = "%REQ(:PATH)% %UPSTREAM_PEER_URI_SAN% %UPSTREAM_LOCAL_URI_SAN% \
                      %UPSTREAM_PEER_SUBJECT% %UPSTREAM_PEER_DNS_SAN% %UPSTREAM_LOCAL_DNS_SAN% \
                      [%UPSTREAM_PEER_ISSUER%]\n";
        let h = hcm(
            "h",
            vec![],
            vec![vhost(
                "vh",
                vec![
                    route("/plain", "plain", json!({})),
                    route("/", "up", json!({})),
                ],
                json!({}),
            )],
            json!({"access_log": [weir_tests::config::file_log(&log2, format)]}),
        );
        let tls = json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TLS, "sni": "up.test",
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": client.chain.display().to_string()},
                    "private_key": {"filename": client.key.display().to_string()},
                }],
                "validation_context": {
                    "trusted_ca": {"filename": ca_file.display().to_string()},
                },
            },
        }}});
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("up", &[tls_port], tls),
                cluster("plain", &[plain_port], json!({})),
            ],
        )
    });
    let h = Http::h1();
    for path in ["/a", "/b", "/plain"] {
        let r = h.get(&format!("{}{path}", p.base()), &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(up.wait_connections(1, WAIT).await.len(), 1);
    let lines = p.log_lines(&log, 3).await;
    let tls_line = |path: &str| {
        format!("{path} {PEER} {LOCAL} CN=up.test up.test - [O=weir tests,CN=mesh root]")
    };
    assert_eq!(
        lines,
        [
            tls_line("/a"),
            tls_line("/b"),
            "/plain - - - - - [-]".to_owned()
        ]
    );
}
