//! TLS scenarios with real TLS peers: termination (DownstreamTlsContext on
//! filter chains), mTLS and certificate validation, static SDS, session
//! resumption, certificate rotation, identity in headers and logs, admin
//! views, and origination (UpstreamTlsContext on clusters). Every test runs
//! against weir in-process by default and against Envoy with
//! `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`), which is how
//! the expectations were checked; the few weir-only assertions say so.
//!
//! Clients are rustls ([`TlsClient`]) unless a test says `openssl`; upstreams
//! are [`tls::tls_upstream`] (TLS) and [`upstream::http1`] (plaintext).
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weir_tests::assert_eventually;
use weir_tests::scenario::{echo_header, Http, Ports, Proxy, Target};
use weir_tests::tls::{
    self, ClientAuth, HandshakeError, KeyType, Leaf, LeafFiles, LeafSpec, SigAlgs, TempDir, TestCa,
    TlsClient, TlsRequest, TlsServerOptions, TlsVersions,
};
use weir_tests::upstream;

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const DTLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UTLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const RAW: &str = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
const ROUTER: &str = "{name: envoy.filters.http.router, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}";
const TLS_INSPECTOR: &str = "{name: envoy.filters.listener.tls_inspector, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}";
const HTTP_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The workload identity of a client in the mesh.
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
/// Another workload of the same trust domain.
const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";
/// weir's own identity (a URI SAN on its server certificate: XFCC `By=`).
const GATEWAY: &str = "spiffe://cluster.local/ns/istio-system/sa/gateway";

// ---------------------------------------------------------------- config

/// YAML double-quoted string (Rust's debug quoting is compatible for the
/// paths, URIs and format strings used here).
fn q(s: impl std::fmt::Display) -> String {
    format!("{:?}", s.to_string())
}

/// A `TlsCertificate` naming the chain and key files.
fn cert(f: &LeafFiles) -> String {
    format!(
        "{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}",
        q(f.chain.display()),
        q(f.key.display())
    )
}

/// `filename:` data source.
fn file(p: &Path) -> String {
    format!("{{filename: {}}}", q(p.display()))
}

/// A filter chain: optional SNI match, optional DownstreamTlsContext (the
/// fields inside its `typed_config`), an HCM with extra fields and routes.
#[derive(Clone, Default)]
struct Chain {
    server_names: Vec<String>,
    tls: Option<String>,
    hcm: String,
    routes: String,
}

impl Chain {
    /// A chain whose only route answers `200 <body>`.
    fn direct(body: &str) -> Chain {
        Chain {
            routes: format!("[{}]", direct("/", body)),
            ..Chain::default()
        }
    }

    /// A chain whose only route goes to `cluster`.
    fn to(cluster: &str) -> Chain {
        Chain {
            routes: format!("[{{match: {{prefix: \"/\"}}, route: {{cluster: {cluster}}}}}]"),
            ..Chain::default()
        }
    }

    fn names(mut self, names: &[&str]) -> Chain {
        self.server_names = names.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// DownstreamTlsContext fields (flow-mapping contents).
    fn tls(mut self, fields: &str) -> Chain {
        self.tls = Some(fields.to_owned());
        self
    }

    /// Extra HCM fields (flow-mapping contents, no trailing comma).
    fn hcm(mut self, fields: &str) -> Chain {
        self.hcm = fields.to_owned();
        self
    }

    /// Replaces the routes (a flow list).
    fn routes(mut self, routes: &str) -> Chain {
        self.routes = routes.to_owned();
        self
    }

    fn render(&self) -> String {
        let mut s = String::from("    - ");
        if !self.server_names.is_empty() {
            let names: Vec<String> = self.server_names.iter().map(q).collect();
            s.push_str(&format!(
                "filter_chain_match: {{server_names: [{}]}}\n      ",
                names.join(", ")
            ));
        }
        if let Some(t) = &self.tls {
            s.push_str(&format!(
                "transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{\"@type\": {DTLS}, {t}}}}}\n      "
            ));
        }
        let hcm = if self.hcm.is_empty() {
            String::new()
        } else {
            format!("{}, ", self.hcm)
        };
        s.push_str(&format!(
            "filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config: {{\"@type\": {HCM}, stat_prefix: ingress, {hcm}route_config: {{name: rc, virtual_hosts: [{{name: v, domains: [\"*\"], routes: {routes}}}]}}, http_filters: [{ROUTER}]}}\n",
            routes = self.routes
        ));
        s
    }
}

/// `{match: {prefix}, direct_response: 200 body}`.
fn direct(prefix: &str, body: &str) -> String {
    format!(
        "{{match: {{prefix: {}}}, direct_response: {{status: 200, body: {{inline_string: {}}}}}}}",
        q(prefix),
        q(body)
    )
}

/// `{match: {prefix}, route: {cluster}}`.
fn route(prefix: &str, cluster: &str) -> String {
    format!(
        "{{match: {{prefix: {}}}, route: {{cluster: {cluster}}}}}",
        q(prefix)
    )
}

/// A listener: its chains and whether tls_inspector runs first.
#[derive(Clone, Default)]
struct Listener {
    chains: Vec<Chain>,
    inspector: bool,
}

impl Listener {
    fn new(chains: Vec<Chain>) -> Listener {
        Listener {
            chains,
            inspector: false,
        }
    }

    /// With tls_inspector (needed for `server_names` matching).
    fn sni(chains: Vec<Chain>) -> Listener {
        Listener {
            chains,
            inspector: true,
        }
    }

    fn render(&self, name: &str, port: u16) -> String {
        let mut s = format!(
            "  - name: {name}\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n"
        );
        if self.inspector {
            s.push_str(&format!("    listener_filters: [{TLS_INSPECTOR}]\n"));
        }
        s.push_str("    filter_chains:\n");
        for c in &self.chains {
            s.push_str(&c.render());
        }
        s
    }
}

/// A bootstrap: listener `l`, clusters, static secrets. Scenarios that need
/// two listeners start two proxies: in-process every port is 0, and weir
/// rejects two listeners on port 0 as duplicate addresses (Envoy exempts
/// port 0 from that check).
#[derive(Clone, Default)]
struct Cfg {
    l: Listener,
    /// Cluster flow mappings (see [`cluster`]).
    clusters: Vec<String>,
    /// `static_resources.secrets` flow mappings.
    secrets: Vec<String>,
}

impl Cfg {
    fn new(l: Listener) -> Cfg {
        Cfg {
            l,
            ..Cfg::default()
        }
    }

    fn cluster(mut self, c: String) -> Cfg {
        self.clusters.push(c);
        self
    }

    fn secret(mut self, s: String) -> Cfg {
        self.secrets.push(s);
        self
    }

    fn render(&self, p: &Ports) -> String {
        let mut s = format!(
            "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\nstatic_resources:\n",
            p.admin
        );
        if !self.secrets.is_empty() {
            s.push_str("  secrets:\n");
            for sec in &self.secrets {
                s.push_str(&format!("  - {sec}\n"));
            }
        }
        s.push_str("  listeners:\n");
        s.push_str(&self.l.render("l", p.listen));
        if self.clusters.is_empty() {
            s.push_str("  clusters: []\n");
        } else {
            s.push_str("  clusters:\n");
            for c in &self.clusters {
                s.push_str(&format!("  - {c}\n"));
            }
        }
        s
    }

    fn start(&self) -> Proxy {
        let c = self.clone();
        Proxy::start(move |p| c.render(p))
    }

    /// With one worker: upstream pools are per worker, so a test about
    /// connection reuse across downstream connections needs a single one.
    fn start_one_worker(&self) -> Proxy {
        let c = self.clone();
        // (Process targets always run with one worker.)
        let opts = weir_tests::scenario::StartOptions {
            concurrency: Some(1),
            ..Default::default()
        };
        Proxy::start_with(Target::from_env(), opts, move |p| c.render(p))
    }
}

/// A STATIC cluster; each endpoint is `(port, extra lb_endpoint fields)`;
/// `extra` holds more cluster fields (flow-mapping contents).
fn cluster(name: &str, eps: &[(u16, &str)], extra: &str) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|(port, more)| {
            let more = if more.is_empty() {
                String::new()
            } else {
                format!(", {more}")
            };
            format!("{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}{more}}}")
        })
        .collect();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("{extra}, ")
    };
    format!(
        "{{name: {name}, type: STATIC, connect_timeout: 2s, {extra}load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{}]}}]}}}}",
        eps.join(", ")
    )
}

/// A cluster `transport_socket` with an UpstreamTlsContext (its fields).
fn upstream_tls(fields: &str) -> String {
    format!(
        "transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{\"@type\": {UTLS}, {fields}}}}}"
    )
}

/// `typed_extension_protocol_options` with an HttpProtocolOptions body.
fn http_options(body: &str) -> String {
    format!(
        "typed_extension_protocol_options: {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{\"@type\": {HTTP_OPTIONS}, {body}}}}}"
    )
}

/// A file access log with `format` (a text format; `\n` is added).
fn access_log(path: &Path, format: &str) -> String {
    format!(
        "access_log: [{{name: envoy.access_loggers.file, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}, log_format: {{text_format_source: {{inline_string: {}}}}}}}}}]",
        q(path.display()),
        q(format!("{format}\n"))
    )
}

// ---------------------------------------------------------------- helpers

/// Runs `f` to completion from synchronous code inside a multi-thread
/// runtime (for [`assert_eventually!`] conditions that need I/O).
fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// `listener.<addr>.<stat>` as Envoy names listener stats.
fn lstat(addr: SocketAddr, stat: &str) -> String {
    format!("listener.{}.{stat}", addr.to_string().replace(':', "_"))
}

/// Waits until stat `name` reads `want` (stats are bumped by the server
/// side, which can finish a moment after the client did).
fn wait_stat(p: &Proxy, name: &str, want: i64) {
    assert_eventually!(
        block(p.stat(name)) == Some(want),
        "{name} = {:?}, want {want}",
        block(p.stat(name))
    );
}

/// A CA with a server certificate for `names` (the first also the CN), its
/// files in `dir` and the CA file.
struct Pki {
    ca: TestCa,
    server: Leaf,
    files: LeafFiles,
    ca_file: std::path::PathBuf,
    dir: TempDir,
}

impl Pki {
    fn new(names: &[&str]) -> Pki {
        Pki::with_spec(names, |s| s)
    }

    fn with_spec(names: &[&str], f: impl FnOnce(LeafSpec) -> LeafSpec) -> Pki {
        let ca = TestCa::new("weir test root");
        let mut spec = LeafSpec::server(names[0]);
        for n in &names[1..] {
            spec = spec.dns(n);
        }
        let server = ca.issue(f(spec));
        let dir = TempDir::new("tls-scenarios").expect("temp dir");
        let files = server.write_files(&dir, "server");
        let ca_file = dir.write("ca.pem", ca.pem());
        Pki {
            ca,
            server,
            files,
            ca_file,
            dir,
        }
    }

    /// `common_tls_context` with the server certificate and `more` fields.
    fn common(&self, more: &str) -> String {
        let more = if more.is_empty() {
            String::new()
        } else {
            format!(", {more}")
        };
        format!(
            "common_tls_context: {{tls_certificates: [{}]{more}}}",
            cert(&self.files)
        )
    }

    /// mTLS: the certificate, a validation context trusting this CA plus
    /// `validation` fields, and `require_client_certificate`.
    fn mtls(&self, validation: &str, require: bool) -> String {
        let v = if validation.is_empty() {
            String::new()
        } else {
            format!(", {validation}")
        };
        format!(
            "{}, require_client_certificate: {require}",
            self.common(&format!(
                "validation_context: {{trusted_ca: {}{v}}}",
                file(&self.ca_file)
            ))
        )
    }

    fn client(&self) -> tls::TlsClientBuilder {
        TlsClient::builder().trust(&self.ca)
    }
}

/// Percent-decodes (XFCC `Cert=`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits an XFCC element into its `key=value` pairs, in order.
fn xfcc_pairs(element: &str) -> Vec<(String, String)> {
    element
        .split(';')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

// ================================================================ downstream

/// 1. ALPN: h2 and http/1.1 by ALPN; a client offering only protocols weir
/// does not list still completes the handshake, without ALPN, and is
/// answered over HTTP/1.1 (Envoy's behaviour; stock rustls would abort).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_selects_h2_or_http1_and_unknown_alpn_falls_back() {
    let pki = Pki::new(&["example.com"]);
    let echo = upstream::http1("echo").await.expect("echo");
    let p = Cfg::new(Listener::new(vec![Chain::to("echo")
        .tls(&pki.common("alpn_protocols: [h2, http/1.1]"))
        .routes(&format!(
            "[{{match: {{prefix: \"/\"}}, route: {{cluster: echo}}, request_headers_to_add: [{{header: {{key: x-downstream-protocol, value: {}}}}}]}}]",
            q("%PROTOCOL%")
        ))]))
    .cluster(cluster("echo", &[(echo.port(), "")], ""))
    .start();

    let cases: [(&[&str], Option<&str>, http::Version, &str); 5] = [
        (&["h2"], Some("h2"), http::Version::HTTP_2, "HTTP/2"),
        (
            &["http/1.1"],
            Some("http/1.1"),
            http::Version::HTTP_11,
            "HTTP/1.1",
        ),
        // The server's preference order decides, not the client's.
        (
            &["http/1.1", "h2"],
            Some("h2"),
            http::Version::HTTP_2,
            "HTTP/2",
        ),
        (&["foo"], None, http::Version::HTTP_11, "HTTP/1.1"),
        (&[], None, http::Version::HTTP_11, "HTTP/1.1"),
    ];
    for (offer, alpn, version, proto) in cases {
        let c = pki.client().alpn(offer).build();
        let r = c
            .get(p.addr(), "example.com", "/alpn")
            .await
            .unwrap_or_else(|e| panic!("offer {offer:?}: {e:#}"));
        assert_eq!(r.status, 200, "offer {offer:?}: {}", r.text());
        assert_eq!(r.tls.alpn.as_deref(), alpn, "offer {offer:?}");
        assert_eq!(r.version, version, "offer {offer:?}");
        let e = r.echo();
        assert_eq!(
            echo_header(&e, "x-downstream-protocol"),
            Some(proto),
            "offer {offer:?}"
        );
        assert_eq!(e.path, "/alpn");
        assert!(r.tls.peer_cert().expect("server cert").is(&pki.server));
    }
    wait_stat(&p, &lstat(p.addr(), "ssl.handshake"), 5);
}

/// 2. An ECDSA P-256 and an RSA 2048 certificate on one chain: the client's
/// signature schemes decide which one it gets, on TLS 1.3 and 1.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecdsa_or_rsa_certificate_by_client_signature_schemes() {
    let ca = TestCa::new("root");
    let ecdsa = ca.issue(LeafSpec::server("example.com"));
    let rsa = ca.issue(LeafSpec::server("example.com").key(KeyType::Rsa2048));
    let dir = TempDir::new("tls-two-certs").expect("dir");
    let (fe, fr) = (
        ecdsa.write_files(&dir, "ecdsa"),
        rsa.write_files(&dir, "rsa"),
    );
    let p = Cfg::new(Listener::new(vec![Chain::direct("ok").tls(&format!(
        "common_tls_context: {{tls_certificates: [{}, {}]}}",
        cert(&fe),
        cert(&fr)
    ))]))
    .start();

    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        for (sig, want) in [(SigAlgs::EcdsaOnly, &ecdsa), (SigAlgs::RsaOnly, &rsa)] {
            let c = TlsClient::builder()
                .trust(&ca)
                .versions(versions)
                .sig_algs(sig)
                .build();
            let r = c
                .get(p.addr(), "example.com", "/")
                .await
                .unwrap_or_else(|e| panic!("{versions:?} {sig:?}: {e:#}"));
            assert_eq!(r.text(), "ok");
            let got = r.tls.peer_cert().expect("server cert");
            assert!(
                got.is(want),
                "{versions:?} {sig:?}: got a {:?} certificate",
                got.key_alg
            );
            assert_eq!(r.tls.is_tls13(), versions == TlsVersions::Tls13Only);
        }
    }
}

/// 2'. weir's own identity (`%DOWNSTREAM_LOCAL_URI_SAN%`, XFCC `By=`) is
/// the certificate this connection was given, not the first configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_identity_is_the_presented_certificate() {
    let ca = TestCa::new("root");
    let ecdsa_id = "spiffe://cluster.local/ns/edge/sa/ecdsa";
    let rsa_id = "spiffe://cluster.local/ns/edge/sa/rsa";
    let ecdsa = ca.issue(LeafSpec::server("example.com").uri(ecdsa_id));
    let rsa = ca.issue(
        LeafSpec::server("example.com")
            .uri(rsa_id)
            .key(KeyType::Rsa2048),
    );
    let dir = TempDir::new("tls-local-id").expect("dir");
    let (fe, fr) = (
        ecdsa.write_files(&dir, "ecdsa"),
        rsa.write_files(&dir, "rsa"),
    );
    let ca_file = dir.write("ca.pem", ca.pem());
    let echo = upstream::http1("echo").await.expect("echo");
    let p = Cfg::new(Listener::new(vec![Chain::to("echo")
        .tls(&format!(
            "common_tls_context: {{tls_certificates: [{}, {}], validation_context: {{trusted_ca: {}}}}}",
            cert(&fe),
            cert(&fr),
            file(&ca_file)
        ))
        .hcm("forward_client_cert_details: SANITIZE_SET")
        .routes(&format!(
            "[{{match: {{prefix: \"/\"}}, route: {{cluster: echo}}, request_headers_to_add: [{{header: {{key: x-local-uri, value: {}}}}}]}}]",
            q("%DOWNSTREAM_LOCAL_URI_SAN%")
        ))]))
    .cluster(cluster("echo", &[(echo.port(), "")], ""))
    .start();
    let client_cert = ca.issue(LeafSpec::spiffe(SLEEP));
    for (sig, id, leaf) in [
        (SigAlgs::RsaOnly, rsa_id, &rsa),
        (SigAlgs::EcdsaOnly, ecdsa_id, &ecdsa),
    ] {
        let r = TlsClient::builder()
            .trust(&ca)
            .sig_algs(sig)
            .client_cert(&client_cert)
            .build()
            .get(p.addr(), "example.com", "/")
            .await
            .unwrap_or_else(|e| panic!("{sig:?}: {e:#}"));
        assert!(r.tls.peer_cert().expect("cert").is(leaf), "{sig:?}");
        let e = r.echo();
        assert_eq!(echo_header(&e, "x-local-uri"), Some(id), "{sig:?}");
        let xfcc = echo_header(&e, XFCC).unwrap_or_default();
        assert!(xfcc.starts_with(&format!("By={id};")), "{sig:?}: {xfcc}");
    }
}

/// 3. SNI filter-chain selection (tls_inspector): an exact name beats a
/// wildcard, the longest wildcard wins, no SNI (or an unknown name) goes to
/// the chain without server_names; on a listener without such a chain an
/// unmatched connection is closed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_the_filter_chain() {
    let ca = TestCa::new("root");
    let dir = TempDir::new("tls-sni").expect("dir");
    let leaf = |name: &str, stem: &str| {
        let l = ca.issue(LeafSpec::server(name));
        let f = l.write_files(&dir, stem);
        (l, f)
    };
    let (exact, f_exact) = leaf("api.example.com", "exact");
    let (wild, f_wild) = leaf("*.example.com", "wild");
    let (longer, f_longer) = leaf("*.foo.example.com", "longer");
    let (default, f_default) = leaf("default.test", "default");
    let (only, f_only) = leaf("only.example.com", "only");
    let chain = |body: &str, names: &[&str], f: &LeafFiles| {
        Chain::direct(body).names(names).tls(&format!(
            "common_tls_context: {{tls_certificates: [{}]}}",
            cert(f)
        ))
    };
    let p = Cfg::new(Listener::sni(vec![
        chain("wildcard", &["*.example.com"], &f_wild),
        chain("exact", &["api.example.com"], &f_exact),
        chain("longer-wildcard", &["*.foo.example.com"], &f_longer),
        chain("default", &[], &f_default),
    ]))
    .start();
    let p2 = Cfg::new(Listener::sni(vec![chain(
        "only",
        &["only.example.com"],
        &f_only,
    )]))
    .start();

    let c = TlsClient::builder().trust(&ca).build();
    // A certificate wildcard covers one label only, but chain wildcards
    // match any depth: the deeper names are checked without verification.
    let any_cert = TlsClient::builder().insecure().build();
    for (sni, body, leaf) in [
        ("api.example.com", "exact", &exact),
        ("www.example.com", "wildcard", &wild),
        ("x.foo.example.com", "longer-wildcard", &longer),
        ("a.b.foo.example.com", "longer-wildcard", &longer),
        ("deep.bar.example.com", "wildcard", &wild),
    ] {
        let client = if sni.matches('.').count() > 2 {
            &any_cert
        } else {
            &c
        };
        let r = client.get(p.addr(), sni, "/").await.expect(sni);
        assert_eq!(r.text(), body, "SNI {sni}");
        assert!(r.tls.peer_cert().expect("cert").is(leaf), "SNI {sni}");
    }
    // No SNI at all, and a name no chain lists: the chain without
    // server_names (the client verifies the certificate for default.test).
    let no_sni = TlsClient::builder().trust(&ca).no_sni().build();
    let r = no_sni
        .get(p.addr(), "default.test", "/")
        .await
        .expect("no SNI");
    assert_eq!(r.text(), "default");
    assert!(r.tls.peer_cert().expect("cert").is(&default));
    let r = any_cert
        .get(p.addr(), "unknown.test", "/")
        .await
        .expect("unknown SNI");
    assert_eq!(r.text(), "default");

    // p2's listener has no catch-all chain.
    let r = c.get(p2.addr(), "only.example.com", "/").await.expect("p2");
    assert_eq!(r.text(), "only");
    assert!(r.tls.peer_cert().expect("cert").is(&only));
    let err = any_cert
        .handshake(p2.addr(), "nope.example.com")
        .await
        .expect_err("no chain matches");
    assert!(
        matches!(err, HandshakeError::Closed(_)),
        "closed without a TLS answer: {err}"
    );
    let err = no_sni
        .handshake(p2.addr(), "only.example.com")
        .await
        .expect_err("no SNI, no chain");
    assert!(matches!(err, HandshakeError::Closed(_)), "{err}");
    wait_stat(&p2, &lstat(p2.addr(), "no_filter_chain_match"), 2);
    wait_stat(&p, &lstat(p.addr(), "no_filter_chain_match"), 0);
}

/// 4a. `require_client_certificate`: a valid client certificate works; none,
/// an expired one and one from another CA are refused at the handshake
/// (rustls and `openssl s_client`), and the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_missing_expired_and_foreign_certificates_at_handshake() {
    let pki = Pki::new(&["mtls.test"]);
    let other_ca = TestCa::new("other root");
    let good = pki.ca.issue(LeafSpec::client("good").uri(SLEEP));
    let expired = pki.ca.issue(LeafSpec::client("old").expired());
    let foreign = other_ca.issue(LeafSpec::client("stranger"));
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("hello mtls").tls(&pki.mtls("", true))
    ]))
    .start();
    let hs = lstat(p.addr(), "ssl.handshake");

    let r = pki
        .client()
        .client_cert(&good)
        .build()
        .get(p.addr(), "mtls.test", "/")
        .await
        .expect("valid client certificate");
    assert_eq!((r.status, r.text().as_str()), (200, "hello mtls"));
    wait_stat(&p, &hs, 1);

    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let cases = [
            (None, "CertificateRequired"),
            (Some(&expired), "CertificateExpired"),
            (Some(&foreign), "UnknownCA"),
        ];
        for (leaf, alert) in cases {
            let mut b = pki.client().versions(versions);
            if let Some(l) = leaf {
                b = b.client_cert(l);
            }
            let err = b
                .build()
                .handshake(p.addr(), "mtls.test")
                .await
                .expect_err("refused at the handshake");
            let HandshakeError::Alert(a) = &err else {
                panic!("{versions:?} {leaf:?}: want an alert, got {err}");
            };
            // TLS 1.2 has no certificate_required alert.
            if !(versions == TlsVersions::Tls12Only && leaf.is_none()) {
                assert_eq!(a, alert, "{versions:?} {leaf:?}");
            }
        }
    }
    // Nothing but the one good handshake completed.
    wait_stat(&p, &lstat(p.addr(), "ssl.fail_verify_error"), 4);
    assert_eq!(p.stat(&hs).await, Some(1));

    // The same with OpenSSL's client: no certificate is refused inside the
    // TLS 1.2 handshake; the good certificate is accepted.
    let ca = pki.ca_file.display().to_string();
    let out = tls::openssl_s_client(
        p.addr(),
        Some("mtls.test"),
        &["-tls1_2", "-CAfile", &ca, "-verify_return_error"],
    )
    .await;
    assert!(
        !out.success(),
        "s_client without a certificate: {}",
        out.combined()
    );
    assert!(
        out.combined().contains("alert"),
        "refused by an alert: {}",
        out.combined()
    );
    let files = good.write_files(&pki.dir, "good");
    let out = tls::openssl_s_client(
        p.addr(),
        Some("mtls.test"),
        &[
            "-tls1_2",
            "-CAfile",
            &ca,
            "-verify_return_error",
            "-cert",
            &files.cert.display().to_string(),
            "-key",
            &files.key.display().to_string(),
        ],
    )
    .await;
    assert!(
        out.success(),
        "s_client with a good certificate: {}",
        out.combined()
    );
    assert_eq!(out.s_client_protocol().as_deref(), Some("TLSv1.2"));
    wait_stat(&p, &hs, 2);
}

/// 4b. As Envoy, refused client certificates are counted as
/// `ssl.fail_verify_*` and not as `ssl.connection_error`, and
/// `ssl.no_certificate` counts *successful* handshakes without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_stats_split_verification_failures_from_connection_errors() {
    let pki = Pki::new(&["mtls.test"]);
    let other_ca = TestCa::new("other root");
    let expired = pki.ca.issue(LeafSpec::client("old").expired());
    let foreign = other_ca.issue(LeafSpec::client("stranger"));
    let good = pki.ca.issue(LeafSpec::client("good"));
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("required").tls(&pki.mtls("", true))
    ]))
    .start();
    let s = |n: &str| lstat(p.addr(), n);
    for leaf in [&expired, &foreign] {
        pki.client()
            .client_cert(leaf)
            .build()
            .handshake(p.addr(), "mtls.test")
            .await
            .expect_err("refused");
    }
    // A client that does not trust weir's certificate: a connection error.
    TlsClient::builder()
        .trust(&other_ca)
        .client_cert(&good)
        .build()
        .handshake(p.addr(), "mtls.test")
        .await
        .expect_err("weir's certificate is not trusted");
    wait_stat(&p, &s("ssl.fail_verify_error"), 2);
    wait_stat(&p, &s("ssl.connection_error"), 1);
    assert_eq!(p.stat(&s("ssl.handshake")).await, Some(0));
    assert_eq!(p.stat(&s("ssl.no_certificate")).await, Some(0));

    // Optional client certificates: a handshake without one succeeds and is
    // counted as no_certificate; one with a certificate is not.
    let p2 = Cfg::new(Listener::new(vec![
        Chain::direct("optional").tls(&pki.mtls("", false))
    ]))
    .start();
    let r = pki
        .client()
        .build()
        .get(p2.addr(), "mtls.test", "/")
        .await
        .expect("anonymous");
    assert_eq!(r.text(), "optional");
    let r = pki
        .client()
        .client_cert(&good)
        .build()
        .get(p2.addr(), "mtls.test", "/")
        .await
        .expect("with a certificate");
    assert_eq!(r.text(), "optional");
    let s2 = |n: &str| lstat(p2.addr(), n);
    wait_stat(&p2, &s2("ssl.handshake"), 2);
    wait_stat(&p2, &s2("ssl.no_certificate"), 1);
}

/// 4c. `require_sni` is a hidden field Envoy 1.40 does not implement: a
/// ClientHello without SNI is still served, by Envoy and by weir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_sni_is_accepted_without_effect_as_envoy() {
    let pki = Pki::new(&["sni.test"]);
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("sni").tls(&format!("{}, require_sni: true", pki.common("")))
    ]))
    .start();
    for client in [pki.client().build(), pki.client().no_sni().build()] {
        let r = client.get(p.addr(), "sni.test", "/").await.expect("served");
        assert_eq!(r.text(), "sni");
    }
    wait_stat(&p, &lstat(p.addr(), "ssl.handshake"), 2);
}

/// 4b'. A missing client certificate is `ssl.fail_verify_no_cert`, not a
/// connection error (Envoy's `drainErrorQueue`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_missing_certificate_counts_fail_verify_no_cert() {
    let pki = Pki::new(&["mtls.test"]);
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("required").tls(&pki.mtls("", true))
    ]))
    .start();
    let s = |n: &str| lstat(p.addr(), n);
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        pki.client()
            .versions(versions)
            .build()
            .handshake(p.addr(), "mtls.test")
            .await
            .expect_err("refused");
    }
    wait_stat(&p, &s("ssl.fail_verify_no_cert"), 2);
    assert_eq!(p.stat(&s("ssl.connection_error")).await, Some(0));
    assert_eq!(p.stat(&s("ssl.no_certificate")).await, Some(0));
}

/// 4c. SAN matchers, certificate pins and CRLs on client certificates, one
/// filter chain (by SNI) per rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_san_matchers_pins_and_crl() {
    let names = [
        "uri.test",
        "prefix.test",
        "suffix.test",
        "hash.test",
        "spki.test",
        "crl.test",
    ];
    let pki = Pki::new(&names);
    let sleep = pki.ca.issue(
        LeafSpec::client("sleep")
            .uri(SLEEP)
            .dns("client-7.clients.example.com"),
    );
    let other = pki
        .ca
        .issue(LeafSpec::client("other").uri(OTHER).dns("svc.other.org"));
    let revoked = pki.ca.issue(LeafSpec::client("revoked").uri(SLEEP));
    let crl_file = pki.dir.write("ca.crl", pki.ca.crl(&[&revoked]).pem);
    let rule = |name: &str, v: String| {
        Chain::direct(&format!("ok {name}"))
            .names(&[name])
            .tls(&pki.mtls(&v, true))
    };
    let p = Cfg::new(Listener::sni(vec![
        rule(
            "uri.test",
            format!(
                "match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: {}}}}}]",
                q(SLEEP)
            ),
        ),
        rule(
            "prefix.test",
            "match_typed_subject_alt_names: [{san_type: DNS, matcher: {prefix: \"client-\"}}]"
                .to_owned(),
        ),
        rule(
            "suffix.test",
            "match_typed_subject_alt_names: [{san_type: DNS, matcher: {suffix: \".clients.example.com\"}}]"
                .to_owned(),
        ),
        rule(
            "hash.test",
            format!(
                "verify_certificate_hash: [{}]",
                q(sleep.sha256_fingerprint_colons())
            ),
        ),
        rule(
            "spki.test",
            format!("verify_certificate_spki: [{}]", q(&sleep.spki_sha256_base64)),
        ),
        rule("crl.test", format!("crl: {}", file(&crl_file))),
    ]))
    .start();

    let accepted = |leaf: &Leaf, sni: &'static str| {
        let c = pki.client().client_cert(leaf).build();
        let addr = p.addr();
        async move {
            let r = c
                .get(addr, sni, "/")
                .await
                .unwrap_or_else(|e| panic!("{sni}: {e:#}"));
            assert_eq!(r.text(), format!("ok {sni}"));
        }
    };
    let refused = |leaf: &Leaf, sni: &'static str| {
        let c = pki.client().client_cert(leaf).build();
        let addr = p.addr();
        async move {
            let err = c.handshake(addr, sni).await.expect_err(sni);
            assert!(
                err.alert().is_some(),
                "{sni}: refused by an alert, got {err}"
            );
        }
    };
    for sni in names {
        if sni == "crl.test" {
            accepted(&sleep, sni).await;
            refused(&revoked, sni).await;
            // The other certificate is not revoked.
            accepted(&other, sni).await;
        } else {
            accepted(&sleep, sni).await;
            refused(&other, sni).await;
        }
    }
    // The revoked certificate is fine where no CRL is configured.
    accepted(&revoked, "uri.test").await;

    let s = |n: &str| lstat(p.addr(), n);
    // uri, prefix, suffix refused `other` by SAN; hash and spki by pin;
    // the CRL by chain verification.
    wait_stat(&p, &s("ssl.fail_verify_san"), 3);
    wait_stat(&p, &s("ssl.fail_verify_cert_hash"), 2);
    wait_stat(&p, &s("ssl.fail_verify_error"), 1);
    wait_stat(&p, &s("ssl.handshake"), 8);
}

/// 5. Static SDS: the server certificate and the trusted CA come from
/// `static_resources.secrets`, directly and through a
/// `combined_validation_context` whose default context adds a SAN matcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_sds_secrets_and_combined_validation_context() {
    let pki = Pki::new(&["sds.test", "combined.test"]);
    let other_ca = TestCa::new("other root");
    let sleep = pki.ca.issue(LeafSpec::spiffe(SLEEP));
    let other = pki.ca.issue(LeafSpec::spiffe(OTHER));
    let foreign = other_ca.issue(LeafSpec::spiffe(SLEEP));
    let sds_cert = "tls_certificate_sds_secret_configs: [{name: server}]";
    let p = Cfg::new(Listener::sni(vec![
        Chain::direct("ok sds").names(&["sds.test"]).tls(&format!(
            "common_tls_context: {{{sds_cert}, validation_context_sds_secret_config: {{name: mesh-ca}}}}, require_client_certificate: true"
        )),
        Chain::direct("ok combined").names(&["combined.test"]).tls(&format!(
            "common_tls_context: {{{sds_cert}, combined_validation_context: {{default_validation_context: {{match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: {}}}}}]}}, validation_context_sds_secret_config: {{name: mesh-ca}}}}}}, require_client_certificate: true",
            q(SLEEP)
        )),
    ]))
    .secret(format!("{{name: server, tls_certificate: {}}}", cert(&pki.files)))
    .secret(format!(
        "{{name: mesh-ca, validation_context: {{trusted_ca: {}}}}}",
        file(&pki.ca_file)
    ))
    .start();

    let get = |leaf: &Leaf, sni: &'static str| {
        let c = pki.client().client_cert(leaf).build();
        let addr = p.addr();
        async move { c.get(addr, sni, "/").await }
    };
    let r = get(&sleep, "sds.test").await.expect("sds, sleep");
    assert_eq!(r.text(), "ok sds");
    assert!(r.tls.peer_cert().expect("cert").is(&pki.server));
    let r = get(&other, "sds.test").await.expect("sds, other");
    assert_eq!(r.text(), "ok sds");
    let r = get(&sleep, "combined.test").await.expect("combined, sleep");
    assert_eq!(r.text(), "ok combined");
    assert!(r.tls.peer_cert().expect("cert").is(&pki.server));

    for (leaf, sni) in [
        (&other, "combined.test"),
        (&foreign, "combined.test"),
        (&foreign, "sds.test"),
    ] {
        let err = pki
            .client()
            .client_cert(leaf)
            .build()
            .handshake(p.addr(), sni)
            .await
            .expect_err(sni);
        assert!(err.alert().is_some(), "{sni} {leaf:?}: {err}");
    }
    wait_stat(&p, &lstat(p.addr(), "ssl.fail_verify_san"), 1);
    wait_stat(&p, &lstat(p.addr(), "ssl.fail_verify_error"), 2);
}

/// 6. Session resumption with the same client configuration: TLS 1.3
/// tickets, TLS 1.2 tickets, and the TLS 1.2 session cache when stateless
/// resumption is disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumption_tls13_and_tls12() {
    let pki = Pki::new(&["tickets.test", "cache.test"]);
    let tls12 = "tls_params: {tls_maximum_protocol_version: TLSv1_2}";
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("resumable").tls(&pki.common(""))
    ]))
    .start();
    let p2 = Cfg::new(Listener::sni(vec![
        Chain::direct("tickets")
            .names(&["tickets.test"])
            .tls(&pki.common(tls12)),
        Chain::direct("cache").names(&["cache.test"]).tls(&format!(
            "{}, disable_stateless_session_resumption: true",
            pki.common(tls12)
        )),
    ]))
    .start();

    let check = |addr: SocketAddr, sni: &'static str, version: &'static str| {
        let c = pki.client().build();
        let fresh_client = pki.client().build();
        async move {
            let first = c.get(addr, sni, "/").await.expect("first");
            assert_eq!(first.status, 200);
            assert!(
                !first.tls.resumed,
                "{sni}: the first connection is a full handshake"
            );
            assert_eq!(first.tls.version, version);
            // TLS 1.3 tickets arrive after the handshake: the request above
            // read them. The second connection resumes.
            let second = c.get(addr, sni, "/").await.expect("second");
            assert_eq!(second.status, 200);
            assert!(second.tls.resumed, "{sni}: the second connection resumes");
            assert_eq!(second.tls.version, version);
            // A client without the session does a full handshake.
            let fresh = fresh_client.get(addr, sni, "/").await.expect("fresh");
            assert!(!fresh.tls.resumed);
        }
    };
    check(p.addr(), "tickets.test", "TLSv1_3").await;
    check(p2.addr(), "tickets.test", "TLSv1_2").await;
    check(p2.addr(), "cache.test", "TLSv1_2").await;
    wait_stat(&p, &lstat(p.addr(), "ssl.session_reused"), 1);
    wait_stat(&p2, &lstat(p2.addr(), "ssl.session_reused"), 2);
    wait_stat(&p2, &lstat(p2.addr(), "ssl.handshake"), 6);
}

/// 6'. A resumed mTLS session still carries the client's identity (it is
/// not presented again): route matching and identity headers see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_mtls_session_keeps_the_peer_identity() {
    let pki = Pki::new(&["example.com"]);
    let echo = upstream::http1("echo").await.expect("echo");
    let p = Cfg::new(Listener::new(vec![Chain::to("echo")
        .tls(&pki.mtls("", true))
        .routes(&format!(
            "[{{match: {{prefix: \"/\", tls_context: {{presented: true}}}}, route: {{cluster: echo}}, request_headers_to_add: [{{header: {{key: x-peer-uri, value: {}}}}}]}}]",
            q("%DOWNSTREAM_PEER_URI_SAN%")
        ))]))
    .cluster(cluster("echo", &[(echo.port(), "")], ""))
    .start();
    let sleep = pki.ca.issue(LeafSpec::spiffe(SLEEP));
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let c = pki.client().client_cert(&sleep).versions(versions).build();
        for resumed in [false, true] {
            let r = c
                .get(p.addr(), "example.com", "/")
                .await
                .unwrap_or_else(|e| panic!("{versions:?}: {e:#}"));
            assert_eq!(r.tls.resumed, resumed, "{versions:?}");
            assert_eq!(
                r.status,
                200,
                "{versions:?} resumed={resumed}: {}",
                r.text()
            );
            assert_eq!(
                echo_header(&r.echo(), "x-peer-uri"),
                Some(SLEEP),
                "{versions:?} resumed={resumed}"
            );
        }
    }
    wait_stat(&p, &lstat(p.addr(), "ssl.session_reused"), 2);
}

/// 7. Rotation: certificate files rewritten with a certificate from a new
/// CA and a new SAN; within seconds new handshakes get it, while an h2
/// connection established before keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_files_are_picked_up_by_new_handshakes() {
    if Target::from_env().is_envoy() {
        // Envoy reloads certificates from SDS (file-based SDS with a
        // watched directory), not from static `filename:` data sources.
        eprintln!("weir-only: static certificate files are not watched by Envoy");
        return;
    }
    let pki = Pki::new(&["example.com"]);
    let new_ca = TestCa::new("rotated root");
    let rotated = new_ca.issue(LeafSpec::server("example.com").dns("new.example.com"));
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("rotating").tls(&pki.common("alpn_protocols: [h2, http/1.1]"))
    ]))
    .start();

    let client = TlsClient::builder()
        .trust(&pki.ca)
        .trust(&new_ca)
        .alpn(&["h2"])
        .resumption(false)
        .build();
    let mut h2 = client.http(p.addr(), "example.com").await.expect("h2");
    assert_eq!(h2.version(), http::Version::HTTP_2);
    assert!(h2.tls.peer_cert().expect("cert").is(&pki.server));
    let r = h2.send(TlsRequest::get("/before")).await.expect("before");
    assert_eq!(r.text(), "rotating");

    // Like a Kubernetes secret update: key and chain change together.
    rotated.write_files(&pki.dir, "server");
    assert_eventually!(
        block(client.handshake(p.addr(), "example.com"))
            .ok()
            .and_then(|t| t.peer_cert().map(|c| c.is(&rotated)))
            == Some(true),
        retries: 300,
        "new handshakes still get the old certificate: {:?}",
        client.last_peer_chain().map(|c| c[0].clone())
    );
    // The new SAN is served too (only the rotated certificate has it).
    let r = client
        .get(p.addr(), "new.example.com", "/")
        .await
        .expect("new name");
    assert_eq!(r.text(), "rotating");

    // The connection from before the rotation still works.
    let r = h2.send(TlsRequest::get("/after")).await.expect("after");
    assert_eq!((r.status, r.text().as_str()), (200, "rotating"));

    // Clients trusting only the old CA now fail verification.
    let err = pki
        .client()
        .build()
        .handshake(p.addr(), "example.com")
        .await
        .expect_err("old trust");
    assert!(matches!(err, HandshakeError::Local(_)), "{err}");

    // /certs shows the new certificate.
    let certs = p.admin("GET", "/certs").await.json();
    let serials: Vec<String> = certs["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["serial_number"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(serials, vec![rotated.info().serial_hex], "{certs}");
}

/// 8a. The downstream identity reaches the upstream through
/// `request_headers_to_add` and the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_identity_in_request_headers_and_access_log() {
    let pki = Pki::new(&["example.com"]);
    let echo = upstream::http1("echo").await.expect("echo");
    let log = pki.dir.path().join("access.log");
    let headers = [
        ("x-peer-uri", "%DOWNSTREAM_PEER_URI_SAN%"),
        ("x-tls-version", "%DOWNSTREAM_TLS_VERSION%"),
        ("x-peer-subject", "%DOWNSTREAM_PEER_SUBJECT%"),
        ("x-sni", "%REQUESTED_SERVER_NAME%"),
        ("x-peer-sha256", "%DOWNSTREAM_PEER_FINGERPRINT_256%"),
    ];
    let add: Vec<String> = headers
        .iter()
        .map(|(k, v)| format!("{{header: {{key: {k}, value: {}}}}}", q(v)))
        .collect();
    // Envoy knows the requested server name from tls_inspector.
    let p = Cfg::new(Listener::sni(vec![Chain::to("echo")
        .tls(&pki.mtls("", true))
        .hcm(&access_log(
            &log,
            "%REQ(:PATH)% %DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_TLS_VERSION% %DOWNSTREAM_TLS_CIPHER% %REQUESTED_SERVER_NAME%",
        ))
        .routes(&format!(
            "[{{match: {{prefix: \"/\"}}, route: {{cluster: echo}}, request_headers_to_add: [{}]}}]",
            add.join(", ")
        ))]))
    .cluster(cluster("echo", &[(echo.port(), "")], ""))
    .start();

    let sleep = pki.ca.issue(LeafSpec::client("sleep").uri(SLEEP));
    for (versions, name) in [
        (TlsVersions::Tls13Only, "TLSv1.3"),
        (TlsVersions::Tls12Only, "TLSv1.2"),
    ] {
        let r = pki
            .client()
            .client_cert(&sleep)
            .versions(versions)
            .build()
            .get(p.addr(), "example.com", &format!("/{name}"))
            .await
            .expect("request");
        let e = r.echo();
        assert_eq!(echo_header(&e, "x-peer-uri"), Some(SLEEP));
        assert_eq!(echo_header(&e, "x-tls-version"), Some(name));
        assert_eq!(echo_header(&e, "x-peer-subject"), Some("CN=sleep"));
        assert_eq!(echo_header(&e, "x-sni"), Some("example.com"));
        assert_eq!(
            echo_header(&e, "x-peer-sha256"),
            Some(sleep.sha256_fingerprint.as_str())
        );
    }
    p.flush_logs().await;
    let text = std::fs::read_to_string(&log).expect("access log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with(&format!("/TLSv1.3 {SLEEP} TLSv1.3 TLS_")),
        "{text}"
    );
    assert!(lines[0].ends_with(" example.com"), "{text}");
    assert!(
        lines[1].starts_with(&format!("/TLSv1.2 {SLEEP} TLSv1.2 ECDHE-ECDSA-")),
        "{text}"
    );
}

/// XFCC test bed: one chain per `forward_client_cert_details` mode (by
/// SNI), optional client certificates, and weir's certificate carrying a
/// URI SAN (for `By=`).
struct XfccBed {
    pki: Pki,
    sleep: Leaf,
    p: Proxy,
    _echo: upstream::EchoServer,
}

const XFCC: &str = "x-forwarded-client-cert";

impl XfccBed {
    async fn new() -> XfccBed {
        let modes = [
            ("set.test", "SANITIZE_SET", "set_current_client_cert_details: {subject: true, uri: true, dns: true, cert: true}"),
            ("append.test", "APPEND_FORWARD", "set_current_client_cert_details: {uri: true}"),
            ("sanitize.test", "SANITIZE", ""),
            ("forward.test", "FORWARD_ONLY", ""),
            ("always.test", "ALWAYS_FORWARD_ONLY", ""),
        ];
        let names: Vec<&str> = modes.iter().map(|m| m.0).collect();
        let pki = Pki::with_spec(&names, |s| s.uri(GATEWAY));
        let echo = upstream::http1("echo").await.expect("echo");
        let chains = modes
            .iter()
            .map(|(sni, mode, details)| {
                let details = if details.is_empty() {
                    String::new()
                } else {
                    format!(", {details}")
                };
                Chain::to("echo")
                    .names(&[sni])
                    .tls(&pki.mtls("", false))
                    .hcm(&format!("forward_client_cert_details: {mode}{details}"))
            })
            .collect();
        let p = Cfg::new(Listener::sni(chains))
            .cluster(cluster("echo", &[(echo.port(), "")], ""))
            .start();
        let sleep = pki.ca.issue(
            LeafSpec::client("sleep")
                .uri(SLEEP)
                .dns("sleep.default.svc"),
        );
        XfccBed {
            pki,
            sleep,
            p,
            _echo: echo,
        }
    }

    /// The XFCC the upstream received for a request to `sni` carrying
    /// `sent`, with or without the client certificate.
    async fn xfcc(&self, sni: &str, with_cert: bool, sent: Option<&str>) -> Option<String> {
        let mut b = self.pki.client();
        if with_cert {
            b = b.client_cert(&self.sleep);
        }
        let mut req = TlsRequest::get("/");
        if let Some(s) = sent {
            req = req.header(XFCC, s);
        }
        let r = b
            .build()
            .request(self.p.addr(), sni, req)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e:#}"));
        assert_eq!(r.status, 200, "{sni}: {}", r.text());
        echo_header(&r.echo(), XFCC).map(str::to_owned)
    }
}

/// 8b. `forward_client_cert_details` on TLS connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfcc_modes_with_client_certificates() {
    let bed = XfccBed::new().await;
    let hash = bed.sleep.sha256_fingerprint.clone();

    // SANITIZE_SET: the client's header is replaced by this hop's element.
    let got = bed
        .xfcc("set.test", true, Some("By=spiffe://evil;Hash=00"))
        .await
        .expect("SANITIZE_SET sets the header");
    assert!(!got.contains("evil"), "{got}");
    let mut pairs = xfcc_pairs(&got);
    let cert = pairs
        .iter()
        .find(|(k, _)| k == "Cert")
        .map(|(_, v)| v.clone())
        .expect("Cert=");
    let pem = percent_decode(cert.trim_matches('"'));
    assert_eq!(
        pem.trim(),
        bed.sleep.cert_pem.trim(),
        "Cert= is the URL-encoded PEM"
    );
    pairs.retain(|(k, _)| k != "Cert");
    pairs.sort();
    let mut want = vec![
        ("By".to_owned(), GATEWAY.to_owned()),
        ("Hash".to_owned(), hash.clone()),
        ("Subject".to_owned(), "\"CN=sleep\"".to_owned()),
        ("URI".to_owned(), SLEEP.to_owned()),
        ("DNS".to_owned(), "sleep.default.svc".to_owned()),
    ];
    want.sort();
    assert_eq!(pairs, want, "{got}");

    // APPEND_FORWARD: appended to what the client sent.
    let sent = "By=spiffe://upstream-hop;Hash=abc";
    let got = bed.xfcc("append.test", true, Some(sent)).await;
    assert_eq!(
        got.as_deref(),
        Some(format!("{sent},By={GATEWAY};Hash={hash};URI={SLEEP}").as_str())
    );
    let got = bed.xfcc("append.test", true, None).await;
    assert_eq!(
        got.as_deref(),
        Some(format!("By={GATEWAY};Hash={hash};URI={SLEEP}").as_str())
    );

    // SANITIZE removes; FORWARD_ONLY forwards untouched.
    assert_eq!(bed.xfcc("sanitize.test", true, Some(sent)).await, None);
    assert_eq!(
        bed.xfcc("forward.test", true, Some(sent)).await.as_deref(),
        Some(sent)
    );
    assert_eq!(bed.xfcc("forward.test", true, None).await, None);

    // TLS without a client certificate: like plaintext, only
    // ALWAYS_FORWARD_ONLY keeps the client's header.
    for sni in ["set.test", "append.test", "sanitize.test", "forward.test"] {
        assert_eq!(bed.xfcc(sni, false, Some(sent)).await, None, "{sni}");
    }
    assert_eq!(
        bed.xfcc("always.test", false, Some(sent)).await.as_deref(),
        Some(sent)
    );
    assert_eq!(
        bed.xfcc("always.test", true, Some(sent)).await.as_deref(),
        Some(sent)
    );
}

/// 8b'. The XFCC element lists its keys in Envoy's order: By, Hash, then
/// the details in the order Cert, Chain, Subject, URI, DNS
/// (`ConnectionManagerUtility::mutateXfccRequestHeader` walks
/// `setCurrentClientCertDetails()`, which the HCM config builds in that
/// order), and `URI=` is present even when the certificate has no URI SAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfcc_element_order_as_envoy() {
    let bed = XfccBed::new().await;
    let got = bed
        .xfcc("set.test", true, None)
        .await
        .expect("SANITIZE_SET");
    let keys: Vec<String> = xfcc_pairs(&got).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        ["By", "Hash", "Cert", "Subject", "URI", "DNS"],
        "{got}"
    );

    // A client certificate without URI SAN still yields `URI=`.
    let plain = bed.pki.ca.issue(LeafSpec::client("plain"));
    let r = bed
        .pki
        .client()
        .client_cert(&plain)
        .build()
        .get(bed.p.addr(), "append.test", "/")
        .await
        .expect("request");
    let xfcc = echo_header(&r.echo(), XFCC).map(str::to_owned);
    assert_eq!(
        xfcc,
        Some(format!(
            "By={GATEWAY};Hash={};URI=",
            plain.sha256_fingerprint
        ))
    );
}

/// 8c. On a plaintext listener XFCC is removed in every mode but
/// ALWAYS_FORWARD_ONLY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfcc_on_plaintext_listener() {
    let echo = upstream::http1("echo").await.expect("echo");
    let sent = "By=spiffe://a;Hash=abc;URI=spiffe://b";
    for (mode, kept) in [
        ("SANITIZE", false),
        ("SANITIZE_SET", false),
        ("APPEND_FORWARD", false),
        ("FORWARD_ONLY", false),
        ("ALWAYS_FORWARD_ONLY", true),
    ] {
        let p = Cfg::new(Listener::new(vec![
            Chain::to("echo").hcm(&format!("forward_client_cert_details: {mode}"))
        ]))
        .cluster(cluster("echo", &[(echo.port(), "")], ""))
        .start();
        let r = Http::h1()
            .get(&format!("{}/", p.base()), &[(XFCC, sent)])
            .await;
        assert_eq!(r.status, 200);
        let got = echo_header(&r.echo(), XFCC).map(str::to_owned);
        assert_eq!(got.as_deref(), kept.then_some(sent), "{mode}");
    }
}

/// 8d. A route with `tls_context: {presented: true}` only matches requests
/// on connections that presented a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_tls_context_presented_matches_only_mtls() {
    let pki = Pki::new(&["example.com"]);
    let routes = format!(
        "[{{match: {{prefix: \"/\", tls_context: {{presented: true}}}}, direct_response: {{status: 200, body: {{inline_string: mtls}}}}}}, {}]",
        direct("/", "anonymous")
    );
    let p = Cfg::new(Listener::new(vec![Chain::default()
        .routes(&routes)
        .tls(&pki.mtls("", false))]))
    .start();
    let plain = Cfg::new(Listener::new(vec![Chain::default().routes(&routes)])).start();
    let sleep = pki.ca.issue(LeafSpec::spiffe(SLEEP));
    let r = pki
        .client()
        .client_cert(&sleep)
        .build()
        .get(p.addr(), "example.com", "/")
        .await
        .expect("mtls");
    assert_eq!(r.text(), "mtls");
    let r = pki
        .client()
        .build()
        .get(p.addr(), "example.com", "/")
        .await
        .expect("tls");
    assert_eq!(r.text(), "anonymous");
    let r = Http::h1().get(&format!("{}/", plain.base()), &[]).await;
    assert_eq!(r.text(), "anonymous");
}

/// 9a. TLS 1.0 and 1.1 are never negotiated: OpenSSL's client asking for
/// exactly 1.1 or 1.0 fails, the same client with 1.2 succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls10_and_tls11_are_refused() {
    let pki = Pki::new(&["example.com"]);
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("modern").tls(&pki.common(""))
    ]))
    .start();
    let ca = pki.ca_file.display().to_string();
    // SECLEVEL=0 so the client itself is willing to speak 1.0/1.1.
    let args = |v: &'static str| {
        ["-CAfile", &ca, "-cipher", "DEFAULT@SECLEVEL=0", v].map(|s| s.to_owned())
    };
    for v in ["-tls1_1", "-tls1"] {
        let a = args(v);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = tls::openssl_s_client(p.addr(), Some("example.com"), &a).await;
        assert!(!out.success(), "{v}: {}", out.combined());
        let text = out.combined().to_lowercase();
        // The ClientHello went out and the server answered with an alert
        // (rustls: handshake_failure, BoringSSL: protocol_version).
        assert!(!text.contains("no protocols available"), "{v}: {text}");
        assert!(text.contains("alert"), "{v}: refused by the server: {text}");
        assert_eq!(
            out.s_client_cipher().as_deref(),
            Some("(NONE)"),
            "{v}: {text}"
        );
    }
    let a = args("-tls1_2");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = tls::openssl_s_client(p.addr(), Some("example.com"), &a).await;
    assert!(out.success(), "{}", out.combined());
    assert_eq!(out.s_client_protocol().as_deref(), Some("TLSv1.2"));
}

/// 9a'. TLS 1.3 takes the client's cipher suite order, as BoringSSL
/// (Envoy) on a CPU with AES instructions, although `prefer_client_ciphers`
/// is off (it is about TLS 1.2): a client preferring AES-128-GCM (Go,
/// BoringSSL clients) or ChaCha20 gets it; OpenSSL's default order gets
/// AES-256-GCM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_cipher_suite_follows_client_order() {
    let pki = Pki::new(&["example.com"]);
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("modern").tls(&pki.common(""))
    ]))
    .start();
    let ca = pki.ca_file.display().to_string();
    for order in [
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384",
    ] {
        let args = ["-CAfile", &ca, "-tls1_3", "-ciphersuites", order];
        let out = tls::openssl_s_client(p.addr(), Some("example.com"), &args).await;
        assert!(out.success(), "{order}: {}", out.combined());
        assert_eq!(out.s_client_protocol().as_deref(), Some("TLSv1.3"));
        let first = order.split(':').next().expect("first suite");
        assert_eq!(
            out.s_client_cipher().as_deref(),
            Some(first),
            "offered {order}: {}",
            out.combined()
        );
    }
}

/// 9b. Configuration errors in `tls_params` name the field.
#[test]
fn tls_params_errors_name_the_field() {
    let pki = Pki::new(&["example.com"]);
    let render = |params: &str| {
        Cfg::new(Listener::new(vec![
            Chain::direct("x").tls(&pki.common(&format!("tls_params: {{{params}}}")))
        ]))
        .render(&Ports {
            listen: 0,
            listen2: 0,
            admin: 0,
        })
    };
    let err = |params: &str| {
        let yaml = render(params);
        match xds_client::load_bootstrap(Some(&yaml), None, Default::default()) {
            Ok(_) => panic!("accepted tls_params {{{params}}}"),
            Err(e) => e.to_string(),
        }
    };
    let e = err("cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256, NOT-A-CIPHER]");
    assert!(
        e.contains("common_tls_context.tls_params.cipher_suites[1]") && e.contains("NOT-A-CIPHER"),
        "{e}"
    );
    let e = err("tls_maximum_protocol_version: TLSv1_1");
    assert!(
        e.contains("common_tls_context.tls_params.tls_maximum_protocol_version"),
        "{e}"
    );
    let e = err("ecdh_curves: [P-521]");
    assert!(e.contains("tls_params.ecdh_curves[0]"), "{e}");
    // The same context with valid parameters loads.
    let ok = render(
        "tls_minimum_protocol_version: TLSv1_2, cipher_suites: [ECDHE-ECDSA-AES128-GCM-SHA256]",
    );
    xds_client::load_bootstrap(Some(&ok), None, Default::default()).expect("valid tls_params");
}

/// 10a. `/certs` lists the chain's certificate (serial, SANs, days until
/// expiration) and the trusted CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certs_lists_certificates() {
    let pki = Pki::with_spec(&["example.com", "www.example.com"], |s| s.uri(GATEWAY));
    let p = Cfg::new(Listener::new(vec![
        Chain::direct("x").tls(&pki.mtls("", false))
    ]))
    .start();
    let v = p.admin("GET", "/certs").await.json();
    let certs = v["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{v}");
    let chain = certs[0]["cert_chain"].as_array().expect("cert_chain");
    assert_eq!(chain.len(), 1, "{v}");
    let c = &chain[0];
    assert_eq!(
        c["serial_number"],
        pki.server.info().serial_hex.as_str(),
        "{v}"
    );
    assert_eq!(
        c["path"],
        pki.files.chain.display().to_string().as_str(),
        "{v}"
    );
    let sans = c["subject_alt_names"].as_array().expect("sans");
    for want in [
        serde_json::json!({"dns": "example.com"}),
        serde_json::json!({"dns": "www.example.com"}),
        serde_json::json!({"uri": GATEWAY}),
    ] {
        assert!(sans.contains(&want), "{want} in {v}");
    }
    let days: u64 = c["days_until_expiration"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("days_until_expiration");
    assert!((28..=30).contains(&days), "{v}");
    let ca = certs[0]["ca_cert"].as_array().expect("ca_cert");
    assert_eq!(ca.len(), 1, "{v}");
    assert_eq!(
        ca[0]["serial_number"],
        tls::CertInfo::parse(&pki.ca.der()).serial_hex.as_str(),
        "{v}"
    );
}

/// 10b. `/config_dump` never shows private keys: an inline key (on a
/// listener and in a static secret) is dumped as `[redacted]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_redacts_inline_private_keys() {
    let pki = Pki::new(&["example.com"]);
    let inline = format!(
        "{{certificate_chain: {{inline_string: {}}}, private_key: {{inline_string: {}}}}}",
        q(&pki.server.chain_pem),
        q(&pki.server.key_pem)
    );
    let p = Cfg::new(Listener::new(vec![Chain::direct("inline").tls(&format!(
        "common_tls_context: {{tls_certificates: [{inline}]}}"
    ))]))
    .secret(format!("{{name: spare, tls_certificate: {inline}}}"))
    .start();
    // The inline certificate is served.
    let r = pki
        .client()
        .build()
        .get(p.addr(), "example.com", "/")
        .await
        .expect("request");
    assert_eq!(r.text(), "inline");

    let dump = p.admin("GET", "/config_dump").await;
    assert_eq!(dump.status, 200);
    let text = dump.text();
    for line in pki
        .server
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
    {
        assert!(!text.contains(line), "key material in /config_dump");
    }
    assert!(!text.contains("PRIVATE KEY"), "key PEM in /config_dump");
    // Both keys, each in the bootstrap dump and in the listeners / secrets
    // dump.
    let redacted = text.matches("\"[redacted]\"").count();
    assert_eq!(redacted, 4, "listener and secret keys redacted: {text}");
    // The certificate itself is not secret.
    let cert_line = pki.server.cert_pem.lines().nth(1).expect("PEM body");
    assert!(text.contains(cert_line), "the certificate is dumped");
}

// ================================================================ upstream

/// 11. Origination: SNI, trusted CA and a DNS SAN matcher; a wrong SAN or
/// an untrusted CA fail with 503 UF and a transport failure reason; no
/// validation context accepts any certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_sni_and_server_certificate_validation() {
    let up_ca = TestCa::new("upstream root");
    let other_ca = TestCa::new("unrelated root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "api",
        &up_ca.issue(LeafSpec::server("api.example.com")),
    ))
    .await
    .expect("tls upstream");
    let dir = TempDir::new("tls-egress").expect("dir");
    let ca = dir.write("up-ca.pem", up_ca.pem());
    let other = dir.write("other-ca.pem", other_ca.pem());
    let log = dir.path().join("access.log");
    let tls_cluster = |name: &str, validation: &str| {
        let common = if validation.is_empty() {
            String::new()
        } else {
            format!(", common_tls_context: {{validation_context: {{{validation}}}}}")
        };
        cluster(
            name,
            &[(up.port(), "")],
            &upstream_tls(&format!("sni: api.example.com{common}")),
        )
    };
    let san = |name: &str| {
        format!("match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: {name}}}}}]")
    };
    let p = Cfg::new(Listener::new(vec![Chain::default()
        .hcm(&access_log(
            &log,
            "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_TRANSPORT_FAILURE_REASON%",
        ))
        .routes(&format!(
            "[{}, {}, {}, {}]",
            route("/good", "good"),
            route("/wrong-san", "wrongsan"),
            route("/untrusted", "untrusted"),
            route("/any", "any")
        ))]))
    .cluster(tls_cluster(
        "good",
        &format!("trusted_ca: {}, {}", file(&ca), san("api.example.com")),
    ))
    .cluster(tls_cluster(
        "wrongsan",
        &format!("trusted_ca: {}, {}", file(&ca), san("other.example.com")),
    ))
    .cluster(tls_cluster(
        "untrusted",
        &format!("trusted_ca: {}", file(&other)),
    ))
    .cluster(tls_cluster("any", ""))
    .start();

    let http = Http::h1();
    let base = p.base();
    let r = http.get(&format!("{base}/good"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().upstream, "api");
    assert_eq!(r.header("x-upstream-sni"), Some("api.example.com"));
    let r = http.get(&format!("{base}/any"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream-sni"), Some("api.example.com"));
    for path in ["/wrong-san", "/untrusted"] {
        let r = http.get(&format!("{base}{path}"), &[]).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert!(
            r.text()
                .starts_with("upstream connect error or disconnect/reset before headers"),
            "{path}: {}",
            r.text()
        );
    }
    // Every connection reached the upstream with the configured SNI.
    let conns = up.wait_connections(4, Duration::from_secs(5)).await;
    assert!(
        conns
            .iter()
            .all(|c| c.sni.as_deref() == Some("api.example.com")),
        "{conns:?}"
    );

    p.flush_logs().await;
    let text = std::fs::read_to_string(&log).expect("access log");
    let line = |path: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{path} ")))
            .unwrap_or_else(|| panic!("no log line for {path}: {text}"))
            .to_owned()
    };
    assert_eq!(line("/good"), "/good 200 - -");
    for path in ["/wrong-san", "/untrusted"] {
        let l = line(path);
        let mut f = l.splitn(4, ' ');
        let (_, code, flags, reason) = (f.next(), f.next(), f.next(), f.next().unwrap_or(""));
        assert_eq!((code, flags), (Some("503"), Some("UF")), "{l}");
        assert_ne!(reason, "-", "{l}");
        assert!(reason.contains("CERTIFICATE_VERIFY_FAILED"), "{l}");
    }
    wait_stat(&p, "cluster.wrongsan.ssl.fail_verify_san", 1);
    wait_stat(&p, "cluster.untrusted.ssl.fail_verify_error", 1);
    wait_stat(&p, "cluster.good.ssl.handshake", 1);
    assert_eq!(p.stat("cluster.wrongsan.ssl.handshake").await, Some(0));
    // As Envoy: verification failures are not connection errors.
    assert_eq!(
        p.stat("cluster.wrongsan.ssl.connection_error").await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.untrusted.ssl.connection_error").await,
        Some(0)
    );
}

/// 11b. As a client, the proxy offers Envoy's (BoringSSL's) suite order:
/// AES-128-GCM first, for TLS 1.2 (Envoy's default maximum upstream) and
/// TLS 1.3; an upstream that follows the client's order (rustls' default
/// here) negotiates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_offers_aes128_first() {
    let up_ca = TestCa::new("upstream root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "api",
        &up_ca.issue(LeafSpec::server("api.example.com")),
    ))
    .await
    .expect("tls upstream");
    let tls_cluster = |name: &str, params: &str| {
        cluster(
            name,
            &[(up.port(), "")],
            &upstream_tls(&format!(
                "sni: api.example.com, common_tls_context: {{tls_params: {{{params}}}}}"
            )),
        )
    };
    let p = Cfg::new(Listener::new(vec![Chain::default().routes(&format!(
        "[{}, {}]",
        route("/v12", "v12"),
        route("/v13", "v13")
    ))]))
    .cluster(tls_cluster("v12", ""))
    .cluster(tls_cluster("v13", "tls_maximum_protocol_version: TLSv1_3"))
    .start();
    let http = Http::h1();
    let base = p.base();
    for (path, version, first) in [
        ("/v12", "TLSv1_2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        ("/v13", "TLSv1_3", "TLS13_AES_128_GCM_SHA256"),
    ] {
        let r = http.get(&format!("{base}{path}"), &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("x-upstream-tls-version"), Some(version), "{path}");
        let c = up.last_connection().expect("a connection");
        assert_eq!(
            c.offered_cipher_suites.first().map(String::as_str),
            Some(first),
            "{path}: offered {:?}",
            c.offered_cipher_suites
        );
        let tls = c.tls.expect("handshake done");
        assert_eq!(tls.cipher_suite, first, "{path}");
    }
}

/// 12. Upstream mTLS: the cluster presents its workload certificate to an
/// upstream that requires one; without it the upstream refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mtls_presents_the_client_certificate() {
    let mesh = TestCa::new("mesh root");
    let up = tls::tls_upstream(
        TlsServerOptions::new("reviews", &mesh.issue(LeafSpec::server("reviews.test")))
            .client_auth(ClientAuth::required(&mesh)),
    )
    .await
    .expect("tls upstream");
    let dir = TempDir::new("tls-upstream-mtls").expect("dir");
    let sleep = mesh.issue(LeafSpec::spiffe(SLEEP));
    let files = sleep.write_files(&dir, "sleep");
    let ca = dir.write("mesh.pem", mesh.pem());
    let p = Cfg::new(Listener::new(vec![Chain::default().routes(&format!(
        "[{}, {}]",
        route("/with-cert", "mtls"),
        route("/without-cert", "tlsonly")
    ))]))
    .cluster(cluster(
        "mtls",
        &[(up.port(), "")],
        &upstream_tls(&format!(
            "sni: reviews.test, common_tls_context: {{tls_certificates: [{}], validation_context: {{trusted_ca: {}}}}}",
            cert(&files),
            file(&ca)
        )),
    ))
    .cluster(cluster(
        "tlsonly",
        &[(up.port(), "")],
        &upstream_tls(&format!(
            "sni: reviews.test, common_tls_context: {{validation_context: {{trusted_ca: {}}}}}",
            file(&ca)
        )),
    ))
    .start();
    let r = Http::h1()
        .get(&format!("{}/with-cert", p.base()), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream-client-cert-uri-san"), Some(SLEEP));
    assert_eq!(
        r.header("x-upstream-client-cert-sha256"),
        Some(sleep.sha256_fingerprint.as_str())
    );
    let c = up.wait_connection(1, Duration::from_secs(5)).await;
    assert!(c.client_cert().expect("client cert").is(&sleep));

    let r = Http::h1()
        .get(&format!("{}/without-cert", p.base()), &[])
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let c = up.wait_connection(2, Duration::from_secs(5)).await;
    assert!(c.error.is_some(), "the upstream refused it: {c:?}");
}

/// 13. `transport_socket_matches` as Istio writes them: endpoints labelled
/// `tlsMode: istio` get TLS, the others plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_socket_matches_by_endpoint_metadata() {
    let mesh = TestCa::new("mesh root");
    let tls_up = tls::tls_upstream(TlsServerOptions::new(
        "sidecar",
        &mesh.issue(LeafSpec::server("reviews.test")),
    ))
    .await
    .expect("tls upstream");
    let plain = upstream::http1("plain").await.expect("plain upstream");
    let dir = TempDir::new("tls-ts-match").expect("dir");
    let ca = dir.write("mesh.pem", mesh.pem());
    let matches = format!(
        "transport_socket_matches: [{{name: tlsMode-istio, match: {{tlsMode: istio}}, transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{\"@type\": {UTLS}, sni: reviews.test, common_tls_context: {{validation_context: {{trusted_ca: {}}}}}}}}}}}, {{name: tlsMode-disabled, match: {{}}, transport_socket: {{name: envoy.transport_sockets.raw_buffer, typed_config: {{\"@type\": {RAW}}}}}}}], lb_policy: ROUND_ROBIN",
        file(&ca)
    );
    let p = Cfg::new(Listener::new(vec![Chain::to("reviews")]))
        .cluster(cluster(
            "reviews",
            &[
                (
                    tls_up.port(),
                    "metadata: {filter_metadata: {envoy.transport_socket_match: {tlsMode: istio}}}",
                ),
                (plain.port(), ""),
            ],
            &matches,
        ))
        .start();
    let http = Http::h1();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let r = http.get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let who = r.echo().upstream;
        let tls_version = r.header("x-upstream-tls-version").map(str::to_owned);
        match who.as_str() {
            "sidecar" => assert!(tls_version.is_some(), "TLS to the istio endpoint"),
            "plain" => assert_eq!(tls_version, None),
            other => panic!("unexpected upstream {other}"),
        }
        *seen.entry(who).or_insert(0) += 1;
    }
    assert_eq!(seen.get("sidecar"), Some(&2), "{seen:?}");
    assert_eq!(seen.get("plain"), Some(&2), "{seen:?}");
    assert!(tls_up
        .connections()
        .iter()
        .all(|c| c.tls.is_some() && c.sni.as_deref() == Some("reviews.test")));
}

/// Upstreams for the ALPN tests: offering h2 and http/1.1, http/1.1 only,
/// and no ALPN at all; the same certificate for `backend.test`.
struct AlpnBed {
    ca_file: std::path::PathBuf,
    h2_up: tls::TlsServer,
    h1_up: tls::TlsServer,
    no_alpn_up: tls::TlsServer,
    _dir: TempDir,
}

impl AlpnBed {
    async fn new() -> AlpnBed {
        let ca = TestCa::new("root");
        let leaf = ca.issue(LeafSpec::server("backend.test"));
        let dir = TempDir::new("tls-alpn").expect("dir");
        AlpnBed {
            ca_file: dir.write("ca.pem", ca.pem()),
            h2_up: tls::tls_upstream(TlsServerOptions::new("h2-capable", &leaf))
                .await
                .expect("h2 upstream"),
            h1_up: tls::tls_upstream(TlsServerOptions::new("h1-only", &leaf).alpn(&["http/1.1"]))
                .await
                .expect("h1 upstream"),
            no_alpn_up: tls::tls_upstream(TlsServerOptions::new("no-alpn", &leaf).alpn(&[]))
                .await
                .expect("no-alpn upstream"),
            _dir: dir,
        }
    }

    /// Cluster fields: TLS to backend.test (with `common` fields such as
    /// `alpn_protocols: [..], `) and `protocol` HttpProtocolOptions.
    fn fields(&self, common: &str, protocol: &str) -> String {
        let tls = upstream_tls(&format!(
            "sni: backend.test, common_tls_context: {{{common}validation_context: {{trusted_ca: {}}}}}",
            file(&self.ca_file)
        ));
        if protocol.is_empty() {
            tls
        } else {
            format!("{tls}, {}", http_options(protocol))
        }
    }
}

/// `GET base+path` expecting 200.
async fn get_ok(p: &Proxy, path: &str) -> weir_tests::scenario::Resp {
    let r = Http::h1().get(&format!("{}{path}", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r
}

/// 14a. Upstream ALPN: `auto_config` over TLS to an upstream offering only
/// http/1.1 speaks HTTP/1.1, explicit HTTP/2 over TLS offers and speaks h2,
/// and a configured `alpn_protocols` (Istio's) is exactly what the upstream
/// is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_alpn_explicit_h2_auto_fallback_and_configured_protocols() {
    let bed = AlpnBed::new().await;
    let p = Cfg::new(Listener::new(vec![Chain::default().routes(&format!(
        "[{}, {}, {}]",
        route("/auto-h1", "auto_h1"),
        route("/explicit", "explicit"),
        route("/istio", "istio")
    ))]))
    .cluster(cluster(
        "auto_h1",
        &[(bed.h1_up.port(), "")],
        &bed.fields("", "auto_config: {}"),
    ))
    .cluster(cluster(
        "explicit",
        &[(bed.h2_up.port(), "")],
        &bed.fields("", "explicit_http_config: {http2_protocol_options: {}}"),
    ))
    .cluster(cluster(
        "istio",
        &[(bed.no_alpn_up.port(), "")],
        &bed.fields("alpn_protocols: [istio-peer-exchange, istio], ", ""),
    ))
    .start();

    let r = get_ok(&p, "/auto-h1").await;
    assert_eq!(r.echo().version, "HTTP/1.1");
    assert_eq!(r.header("x-upstream-alpn"), Some("http/1.1"));
    let r = get_ok(&p, "/explicit").await;
    assert_eq!(r.echo().version, "HTTP/2.0");
    assert_eq!(r.header("x-upstream-alpn"), Some("h2"));
    let r = get_ok(&p, "/istio").await;
    assert_eq!(r.echo().version, "HTTP/1.1");
    assert_eq!(r.header("x-upstream-alpn"), None);

    let offered = |s: &tls::TlsServer| s.connections()[0].offered_alpn.clone();
    // auto_config offers both.
    assert_eq!(offered(&bed.h1_up), ["h2", "http/1.1"]);
    assert_eq!(offered(&bed.h2_up), ["h2"]);
    assert_eq!(offered(&bed.no_alpn_up), ["istio-peer-exchange", "istio"]);
}

/// 14b. `auto_config` over TLS to an upstream offering h2: ALPN picks h2
/// and the request arrives over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_alpn_auto_config_negotiates_h2() {
    let bed = AlpnBed::new().await;
    let p = Cfg::new(Listener::new(vec![Chain::to("auto_h2")]))
        .cluster(cluster(
            "auto_h2",
            &[(bed.h2_up.port(), "")],
            &bed.fields("", "auto_config: {}"),
        ))
        .start_one_worker();
    for i in 0..2 {
        let r = get_ok(&p, "/auto").await;
        assert_eq!(r.echo().version, "HTTP/2.0", "request {i}");
        assert_eq!(r.echo().authority, format!("{}", p.addr()), "request {i}");
        assert_eq!(r.header("x-upstream-alpn"), Some("h2"));
    }
    // Both requests shared the one h2 connection.
    assert_eq!(bed.h2_up.connections().len(), 1);
    assert_eq!(bed.h2_up.connections()[0].offered_alpn, ["h2", "http/1.1"]);
}

/// 15. `upstream_http_protocol_options` `auto_sni` + `auto_san_validation`
/// (what Istio renders for TLS origination without an explicit SNI): the
/// SNI is the request's host, connections are pooled per SNI, and the
/// upstream certificate must carry that host as a DNS SAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_auto_sni_and_auto_san_validation() {
    let up_ca = TestCa::new("auto-sni root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "api",
        &up_ca.issue(LeafSpec::server("api.example.com").dns("www.example.com")),
    ))
    .await
    .expect("tls upstream");
    let dir = TempDir::new("tls-auto-sni").expect("dir");
    let ca = dir.write("up-ca.pem", up_ca.pem());
    let p = Cfg::new(Listener::new(vec![Chain::default()
        .hcm("")
        .routes(&format!("[{}]", route("/", "auto")))]))
    .cluster(cluster(
        "auto",
        &[(up.port(), "")],
        &format!(
            "{}, {}",
            upstream_tls(&format!(
                "common_tls_context: {{validation_context: {{trusted_ca: {}}}}}",
                file(&ca)
            )),
            http_options(
                "explicit_http_config: {http_protocol_options: {}}, upstream_http_protocol_options: {auto_sni: true, auto_san_validation: true}"
            )
        ),
    ))
    .start();
    let http = Http::h1();
    let base = p.base();
    for host in ["api.example.com", "www.example.com:8443"] {
        let r = http.get(&format!("{base}/"), &[("host", host)]).await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        let want = host.split(':').next().unwrap_or_default();
        assert_eq!(r.header("x-upstream-sni"), Some(want), "{host}");
    }
    // A host the certificate does not name: the handshake's SAN check fails.
    let r = http
        .get(&format!("{base}/"), &[("host", "evil.example.com")])
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let conns = up.wait_connections(3, Duration::from_secs(5)).await;
    let snis: Vec<Option<String>> = conns.iter().map(|c| c.sni.clone()).collect();
    assert!(
        snis.contains(&Some("evil.example.com".to_owned())),
        "the refused connection offered the request's host: {snis:?}"
    );
}
