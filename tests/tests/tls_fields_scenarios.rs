//! TLS context fields beyond the basics (`tls_scenarios`): explicit session
//! ticket keys (`session_ticket_keys`, `session_ticket_keys_sds_secret_config`
//! with a static `session_ticket_keys` secret) and `tls_params.signature_algorithms`
//! (downstream and upstream).
//!
//! Every test runs against weir in-process by default and against Envoy
//! with `WEIR_SCENARIO_TARGET=envoy`, which is how the expectations were
//! checked. Resumption is observed by a rustls client that shares its
//! session cache across connections to *different* proxies (the cache is
//! keyed by server name), so a session issued by one proxy is offered to
//! another; the ticket formats differ between weir and Envoy, which does
//! not matter here since both proxies of a test are the same target.
//! Config errors are checked for their field path on weir and for a
//! refused start on Envoy.
use std::net::SocketAddr;

use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap_with, chain, cluster, hcm, listener, route, sock, stat_is, vhost,
};
use weir_tests::config::{merge, DOWNSTREAM_TLS, UPSTREAM_TLS};
use weir_tests::scenario::{Ports, Proxy, StartOptions, Target};
use weir_tests::tls::{
    self, KeyType, Leaf, LeafFiles, LeafSpec, TempDir, TestCa, TlsClient, TlsServerOptions,
    TlsVersions,
};

// ---------------------------------------------------------------- helpers

/// A CA, a server certificate for `name` and its files.
struct Pki {
    ca: TestCa,
    files: LeafFiles,
    _dir: TempDir,
}

impl Pki {
    fn new(name: &str, key: KeyType) -> Pki {
        let ca = TestCa::new("weir tls-fields root");
        let leaf = ca.issue(LeafSpec::server(name).key(key));
        let dir = TempDir::new("tls-fields").expect("temp dir");
        let files = leaf.write_files(&dir, "server");
        Pki {
            ca,
            files,
            _dir: dir,
        }
    }

    fn cert(&self) -> Value {
        json!({
            "certificate_chain": {"filename": self.files.chain.display().to_string()},
            "private_key": {"filename": self.files.key.display().to_string()},
        })
    }

    /// `common_tls_context` with the server certificate (`extra`: more fields).
    fn common(&self, extra: Value) -> Value {
        merge(json!({"tls_certificates": [self.cert()]}), extra)
    }
}

/// A filter chain answering `200 <body>` on every path, behind a
/// DownstreamTlsContext with `tls` fields.
fn tls_chain(tls: Value, body: &str) -> Value {
    merge(
        chain(vec![hcm(
            "ingress",
            vec![],
            vec![vhost(
                "v",
                vec![
                    json!({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}),
                ],
                json!({}),
            )],
            json!({}),
        )]),
        json!({"transport_socket": {"name": "envoy.transport_sockets.tls",
            "typed_config": merge(json!({"@type": DOWNSTREAM_TLS}), tls)}}),
    )
}

/// A bootstrap with listener `l` (`chain`, behind tls_inspector),
/// `clusters` and static `secrets`.
fn config(p: &Ports, chain: Value, clusters: Vec<Value>, secrets: Vec<Value>) -> String {
    let mut l = listener("l", p.listen, vec![chain]);
    l["listener_filters"] = json!([{"name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": [l], "clusters": clusters, "secrets": secrets},
    })
    .to_string()
}

fn start(chain: Value, secrets: Vec<Value>) -> Proxy {
    Proxy::start(move |p| config(p, chain.clone(), vec![], secrets.clone()))
}

/// `listener.<addr>.<stat>` as Envoy names listener stats.
fn lstat(addr: SocketAddr, stat: &str) -> String {
    format!("listener.{}.{stat}", addr.to_string().replace(':', "_"))
}

/// An 80-byte ticket key (Envoy's layout: 16 name, 32 HMAC, 32 AES) whose
/// bytes all derive from `seed`.
fn ticket_key(seed: u8) -> Vec<u8> {
    (0..80u8)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)))
        .collect()
}

/// An inline-bytes DataSource.
fn bytes(b: &[u8]) -> Value {
    json!({"inline_bytes": tls::base64(b)})
}

fn keys(list: &[&[u8]]) -> Value {
    json!({"keys": list.iter().map(|k| bytes(k)).collect::<Vec<_>>()})
}

/// A bootstrap is refused: on weir, the error is returned (to check the
/// field path); on Envoy, the process does not start.
fn refused(render: impl Fn(&Ports) -> String) -> Option<String> {
    let target = Target::from_env();
    if target.is_envoy() {
        let started = Proxy::try_start(target, StartOptions::default(), render);
        assert!(started.is_err(), "Envoy accepted the configuration");
        return None;
    }
    let yaml = render(&Ports {
        listen: 0,
        listen2: 0,
        admin: 0,
    });
    match xds_client::load_bootstrap(Some(&yaml), None, Default::default()) {
        Ok(_) => panic!("weir accepted the configuration:\n{yaml}"),
        Err(e) => Some(e.to_string()),
    }
}

// ================================================================ tickets

/// Explicit ticket keys: a session from one proxy resumes on another with
/// the same keys (inline, or a static `session_ticket_keys` secret), not on
/// one with other keys, and still on one that rotated (new key first, the
/// old one second). TLS 1.3 and TLS 1.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ticket_keys_resume_across_proxies_and_rotation() {
    let pki = Pki::new("tickets.test", KeyType::EcdsaP256);
    let (a, b) = (ticket_key(1), ticket_key(2));
    let inline = |list: &[&[u8]]| {
        tls_chain(
            json!({"common_tls_context": pki.common(json!({})), "session_ticket_keys": keys(list)}),
            "ok",
        )
    };
    let issuer = start(inline(&[&a]), vec![]);
    // The same keys from a static secret.
    let same = start(
        tls_chain(
            json!({"common_tls_context": pki.common(json!({})),
                "session_ticket_keys_sds_secret_config": {"name": "stk"}}),
            "ok",
        ),
        vec![json!({"name": "stk", "session_ticket_keys": keys(&[&a])})],
    );
    let other = start(inline(&[&b]), vec![]);
    let rotated = start(inline(&[&b, &a]), vec![]);

    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        for (to, resumes, what) in [
            (&same, true, "same keys (static secret)"),
            (&other, false, "other keys"),
            (&rotated, true, "rotated keys, the old one second"),
        ] {
            // A fresh client per case: its only session is the issuer's.
            let c = TlsClient::builder()
                .trust(&pki.ca)
                .versions(versions)
                .build();
            let first = c
                .get(issuer.addr(), "tickets.test", "/")
                .await
                .unwrap_or_else(|e| panic!("{versions:?} {what}: {e:#}"));
            assert_eq!(first.status, 200);
            assert!(
                !first.tls.resumed,
                "{versions:?} {what}: a full handshake first"
            );
            let second = c
                .get(to.addr(), "tickets.test", "/")
                .await
                .unwrap_or_else(|e| panic!("{versions:?} {what}: {e:#}"));
            assert_eq!(second.status, 200);
            assert_eq!(second.tls.resumed, resumes, "{versions:?} {what}");
        }
    }
    stat_is(&same, &lstat(same.addr(), "ssl.session_reused"), 2).await;
    stat_is(&rotated, &lstat(rotated.addr(), "ssl.session_reused"), 2).await;
    stat_is(&other, &lstat(other.addr(), "ssl.handshake"), 2).await;
    stat_is(&other, &lstat(other.addr(), "ssl.session_reused"), 0).await;
}

/// Shared keys do not carry a session into a context that would not have
/// accepted its handshake: another filter-chain server name (part of
/// Envoy's session id context) means a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ticket_keys_stay_within_the_session_context() {
    let pki = Pki::new("tickets.test", KeyType::EcdsaP256);
    let a = ticket_key(1);
    let tls =
        json!({"common_tls_context": pki.common(json!({})), "session_ticket_keys": keys(&[&a])});
    let issuer = start(tls_chain(tls.clone(), "ok"), vec![]);
    let named = start(
        merge(
            tls_chain(tls, "ok"),
            json!({"filter_chain_match": {"server_names": ["tickets.test"]}}),
        ),
        vec![],
    );
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let c = TlsClient::builder()
            .trust(&pki.ca)
            .versions(versions)
            .build();
        let first = c
            .get(issuer.addr(), "tickets.test", "/")
            .await
            .expect("issuer");
        assert!(!first.tls.resumed);
        let second = c
            .get(named.addr(), "tickets.test", "/")
            .await
            .expect("named");
        assert_eq!(second.status, 200);
        assert!(!second.tls.resumed, "{versions:?}: another session context");
        // That chain's own sessions resume there.
        let third = c
            .get(named.addr(), "tickets.test", "/")
            .await
            .expect("again");
        assert!(third.tls.resumed, "{versions:?}: its own session");
    }
}

/// Ticket key errors: a key that is not 80 bytes (Envoy's message), no
/// keys, and a secret name that is not a static secret.
#[test]
fn ticket_key_errors_name_the_field() {
    let pki = Pki::new("tickets.test", KeyType::EcdsaP256);
    let render = |tls: Value, secrets: Vec<Value>| {
        let chain = tls_chain(tls, "x");
        move |p: &Ports| config(p, chain.clone(), vec![], secrets.clone())
    };
    let common = pki.common(json!({}));
    let short = vec![7u8; 79];
    if let Some(e) = refused(render(
        json!({"common_tls_context": common, "session_ticket_keys": keys(&[&ticket_key(1), &short])}),
        vec![],
    )) {
        assert!(
            e.contains("session_ticket_keys.keys[1]")
                && e.contains(
                    "Incorrect TLS session ticket key length. Length 79, expected length 80."
                ),
            "{e}"
        );
    }
    if let Some(e) = refused(render(
        json!({"common_tls_context": common, "session_ticket_keys": {"keys": []}}),
        vec![],
    )) {
        assert!(e.contains("session_ticket_keys"), "{e}");
    }
    if let Some(e) = refused(render(
        json!({"common_tls_context": common, "session_ticket_keys_sds_secret_config": {"name": "nope"}}),
        vec![],
    )) {
        assert!(
            e.contains("session_ticket_keys_sds_secret_config")
                && e.contains("Unknown tls session ticket keys: nope"),
            "{e}"
        );
    }
    if let Some(e) = refused(render(
        json!({"common_tls_context": common, "session_ticket_keys_sds_secret_config": {"name": "stk"}}),
        vec![json!({"name": "stk", "session_ticket_keys": keys(&[&short])})],
    )) {
        assert!(e.contains("secrets[0].session_ticket_keys.keys[0]"), "{e}");
    }
}

// ================================================================ signature algorithms

/// `signature_algorithms` restricts what the server signs with: an ECDSA
/// certificate with only RSA schemes allowed fails every handshake; with
/// `ecdsa_secp256r1_sha256` it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_signature_algorithms_restrict_our_signature() {
    let pki = Pki::new("sig.test", KeyType::EcdsaP256);
    let chain = |algs: &[&str]| {
        tls_chain(
            json!({"common_tls_context": pki.common(json!({"tls_params": {"signature_algorithms": algs}}))}),
            "ok",
        )
    };
    let rsa_only = start(chain(&["rsa_pss_rsae_sha256", "rsa_pkcs1_sha256"]), vec![]);
    let ecdsa = start(chain(&["ecdsa_secp256r1_sha256"]), vec![]);
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let c = TlsClient::builder()
            .trust(&pki.ca)
            .versions(versions)
            .resumption(false)
            .build();
        assert!(
            c.handshake(rsa_only.addr(), "sig.test").await.is_err(),
            "{versions:?}: no allowed scheme fits the ECDSA key"
        );
        let ok = c.get(ecdsa.addr(), "sig.test", "/").await.expect("ecdsa");
        assert_eq!(ok.status, 200, "{versions:?}");
    }
}

/// `signature_algorithms` restricts the client certificates accepted: with
/// only `ecdsa_secp256r1_sha256`, an RSA client certificate cannot sign the
/// handshake (the client sends none and the required certificate is
/// missing), an ECDSA one passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_signature_algorithms() {
    let pki = Pki::new("mtls.test", KeyType::EcdsaP256);
    let dir = TempDir::new("tls-fields-ca").expect("dir");
    let ca_file = dir.write("ca.pem", pki.ca.pem());
    let p = start(
        tls_chain(
            json!({
                "common_tls_context": pki.common(json!({
                    "tls_params": {"signature_algorithms": ["ecdsa_secp256r1_sha256"]},
                    "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
                })),
                "require_client_certificate": true,
            }),
            "ok",
        ),
        vec![],
    );
    let rsa: Leaf = pki
        .ca
        .issue(LeafSpec::client("rsa-client").key(KeyType::Rsa2048));
    let ecdsa: Leaf = pki.ca.issue(LeafSpec::client("ecdsa-client"));
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let client = |leaf: &Leaf| {
            TlsClient::builder()
                .trust(&pki.ca)
                .versions(versions)
                .client_cert(leaf)
                .resumption(false)
                .build()
        };
        let refused = client(&rsa).get(p.addr(), "mtls.test", "/").await;
        assert!(refused.is_err(), "{versions:?}: RSA client certificate");
        let ok = client(&ecdsa)
            .get(p.addr(), "mtls.test", "/")
            .await
            .unwrap_or_else(|e| panic!("{versions:?}: {e:#}"));
        assert_eq!(ok.status, 200);
    }
}

/// Upstream `signature_algorithms`: weir (Envoy) offers only these schemes,
/// so an upstream whose certificate cannot sign with them fails the
/// handshake (503); one that can is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_signature_algorithms() {
    let ca = TestCa::new("upstream root");
    let rsa_up = tls::tls_upstream(TlsServerOptions::new(
        "rsa",
        &ca.issue(LeafSpec::server("up.test").key(KeyType::Rsa2048)),
    ))
    .await
    .expect("rsa upstream");
    let ecdsa_up = tls::tls_upstream(TlsServerOptions::new(
        "ecdsa",
        &ca.issue(LeafSpec::server("up.test")),
    ))
    .await
    .expect("ecdsa upstream");
    let utls = json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM_TLS, "sni": "up.test",
        "common_tls_context": {"tls_params": {"signature_algorithms": ["ecdsa_secp256r1_sha256"]}},
    }}});
    let clusters = vec![
        cluster("rsa", &[rsa_up.port()], utls.clone()),
        cluster("ecdsa", &[ecdsa_up.port()], utls),
    ];
    let p = Proxy::start(move |ports| {
        let hcm = hcm(
            "ingress",
            vec![],
            vec![vhost(
                "v",
                vec![
                    route("/rsa", "rsa", json!({})),
                    route("/ecdsa", "ecdsa", json!({})),
                ],
                json!({}),
            )],
            json!({}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![hcm])])],
            clusters.clone(),
            json!({}),
        )
    });
    let http = weir_tests::scenario::Http::h1();
    let r = http.get(&format!("{}/ecdsa", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http.get(&format!("{}/rsa", p.base()), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
}

/// Unknown signature algorithm names are errors naming the entry.
#[test]
fn signature_algorithm_errors_name_the_field() {
    let pki = Pki::new("sig.test", KeyType::EcdsaP256);
    let tls = json!({"common_tls_context": pki.common(json!({
        "tls_params": {"signature_algorithms": ["ecdsa_secp256r1_sha256", "not_an_algorithm"]}
    }))});
    let chain = tls_chain(tls, "x");
    if let Some(e) = refused(move |p| config(p, chain.clone(), vec![], vec![])) {
        assert!(
            e.contains("tls_params.signature_algorithms[1]") && e.contains("not_an_algorithm"),
            "{e}"
        );
    }
}
