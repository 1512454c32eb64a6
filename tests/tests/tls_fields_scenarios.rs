//! TLS context fields beyond the basics (`tls_scenarios`): explicit session
//! ticket keys (`session_ticket_keys`, `session_ticket_keys_sds_secret_config`
//! with a static `session_ticket_keys` secret), `tls_params.signature_algorithms`
//! (downstream and upstream), and OCSP stapling (`TlsCertificate.ocsp_staple`,
//! `ocsp_staple_policy`, observed with `openssl s_client -status`).
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

// ================================================================ OCSP stapling

/// A DER element.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend([0x81, n as u8]);
    } else {
        out.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn der_seq(parts: &[Vec<u8>]) -> Vec<u8> {
    der(0x30, &parts.concat())
}

/// `YYYYMMDDHHMMSSZ` for `unix` seconds.
fn generalized_time(unix: i64) -> Vec<u8> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    der(0x18, s.as_bytes())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A minimal successful basic OCSP response for the certificate with
/// `serial` (status good), `nextUpdate` at `next_update` (none: `None`).
/// Unsigned (an empty signature): neither Envoy nor weir checks the
/// signature of a configured response, and the clients here only print it.
fn ocsp_response(serial: &[u8], next_update: Option<i64>) -> Vec<u8> {
    const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
    const SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    const BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];
    let cert_id = der_seq(&[
        der_seq(&[der(0x06, SHA1), vec![0x05, 0x00]]),
        der(0x04, &[0x11; 20]),
        der(0x04, &[0x22; 20]),
        der(0x02, serial),
    ]);
    let mut single = vec![cert_id, vec![0x80, 0x00], generalized_time(now() - 3600)];
    if let Some(t) = next_update {
        single.push(der(0xa0, &generalized_time(t)));
    }
    let data = der_seq(&[
        der(0xa2, &der(0x04, &[0x33; 20])),
        generalized_time(now() - 3600),
        der_seq(&[der_seq(&single)]),
    ]);
    let basic = der_seq(&[
        data,
        der_seq(&[der(0x06, SHA256_RSA), vec![0x05, 0x00]]),
        der(0x03, &[0x00]),
    ]);
    der_seq(&[
        der(0x0a, &[0x00]),
        der(0xa0, &der_seq(&[der(0x06, BASIC), der(0x04, &basic)])),
    ])
}

/// The serial number of `leaf` (DER INTEGER content).
fn serial(leaf: &Leaf) -> Vec<u8> {
    let hex = tls::CertInfo::parse(leaf.cert_der.as_ref()).serial_hex;
    let hex: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let mut out: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect();
    if out.first().is_some_and(|b| *b >= 0x80) {
        out.insert(0, 0);
    }
    out
}

/// A server certificate with an OCSP response file and a policy.
struct Stapled {
    ca_file: std::path::PathBuf,
    leaf: Leaf,
    files: LeafFiles,
    dir: TempDir,
}

impl Stapled {
    fn new() -> Stapled {
        let ca = TestCa::new("weir ocsp root");
        let leaf = ca.issue(LeafSpec::server("ocsp.test"));
        let dir = TempDir::new("tls-fields-ocsp").expect("dir");
        let files = leaf.write_files(&dir, "server");
        let ca_file = dir.write("ca.pem", ca.pem());
        Stapled {
            ca_file,
            leaf,
            files,
            dir,
        }
    }

    /// A chain whose certificate staples `response` (none: no
    /// `ocsp_staple`) under `policy`.
    fn chain(&self, response: Option<&[u8]>, policy: &str) -> Value {
        let mut cert = json!({
            "certificate_chain": {"filename": self.files.chain.display().to_string()},
            "private_key": {"filename": self.files.key.display().to_string()},
        });
        if let Some(r) = response {
            let path = self.dir.write(&format!("ocsp-{}.der", r.len()), r);
            cert["ocsp_staple"] = json!({"filename": path.display().to_string()});
        }
        tls_chain(
            json!({"common_tls_context": {"tls_certificates": [cert]}, "ocsp_staple_policy": policy}),
            "ok",
        )
    }

    /// `openssl s_client` (asking for the status with `status`): whether
    /// the handshake succeeded and whether a response was stapled.
    async fn handshake(&self, addr: SocketAddr, status: bool) -> (bool, bool) {
        let ca = self.ca_file.display().to_string();
        let mut args = vec!["-CAfile", ca.as_str(), "-verify_return_error"];
        if status {
            args.push("-status");
        }
        let out = tls::openssl_s_client(addr, Some("ocsp.test"), &args).await;
        let text = out.combined();
        let ok = out.success() && out.s_client_protocol().is_some();
        (ok, text.contains("OCSP Response Status: successful"))
    }
}

/// LENIENT_STAPLING (the default): a good response is stapled for clients
/// that ask; an expired one (or one without `nextUpdate`) is not, and the
/// handshake still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_lenient_staples_good_responses_and_omits_expired_ones() {
    let s = Stapled::new();
    let good = ocsp_response(&serial(&s.leaf), Some(now() + 86_400));
    let expired = ocsp_response(&serial(&s.leaf), Some(now() - 60));
    let p = start(s.chain(Some(&good), "LENIENT_STAPLING"), vec![]);
    assert_eq!(s.handshake(p.addr(), true).await, (true, true));
    assert_eq!(s.handshake(p.addr(), false).await, (true, false));
    stat_is(&p, &lstat(p.addr(), "ssl.ocsp_staple_requests"), 1).await;
    stat_is(&p, &lstat(p.addr(), "ssl.ocsp_staple_responses"), 1).await;

    for stale in [expired, ocsp_response(&serial(&s.leaf), None)] {
        let p = start(s.chain(Some(&stale), "LENIENT_STAPLING"), vec![]);
        assert_eq!(s.handshake(p.addr(), true).await, (true, false));
        stat_is(&p, &lstat(p.addr(), "ssl.ocsp_staple_omitted"), 1).await;
    }
}

/// STRICT_STAPLING: an expired response fails the handshake of a client
/// that asks for the status (`ssl.ocsp_staple_failed`), not of one that
/// does not; without a response the certificate is used unstapled.
/// MUST_STAPLE: a good response is stapled, an expired one fails clients
/// that ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_strict_and_must_staple_fail_expired_responses() {
    let s = Stapled::new();
    let good = ocsp_response(&serial(&s.leaf), Some(now() + 86_400));
    let expired = ocsp_response(&serial(&s.leaf), Some(now() - 60));

    let strict = start(s.chain(Some(&expired), "STRICT_STAPLING"), vec![]);
    assert!(!s.handshake(strict.addr(), true).await.0);
    assert_eq!(s.handshake(strict.addr(), false).await, (true, false));
    stat_is(&strict, &lstat(strict.addr(), "ssl.ocsp_staple_failed"), 1).await;
    let none = start(s.chain(None, "STRICT_STAPLING"), vec![]);
    assert_eq!(s.handshake(none.addr(), true).await, (true, false));

    let must = start(s.chain(Some(&good), "MUST_STAPLE"), vec![]);
    assert_eq!(s.handshake(must.addr(), true).await, (true, true));
    let must_expired = start(s.chain(Some(&expired), "MUST_STAPLE"), vec![]);
    assert!(!s.handshake(must_expired.addr(), true).await.0);
    assert_eq!(s.handshake(must_expired.addr(), false).await, (true, false));
}

/// Config errors, as Envoy's: MUST_STAPLE without a response, a response
/// for another certificate, and bytes that are not an OCSP response. These
/// are found when the context is built (weir: at start).
#[test]
fn ocsp_config_errors() {
    let s = Stapled::new();
    let target = Target::from_env();
    let refused = |chain: Value| -> String {
        match Proxy::try_start(target, StartOptions::default(), move |p| {
            config(p, chain.clone(), vec![], vec![])
        }) {
            Ok(_) => panic!("{target:?} accepted the configuration"),
            Err(e) => format!("{e:#}"),
        }
    };
    let weir = !target.is_envoy();
    let e = refused(s.chain(None, "MUST_STAPLE"));
    assert!(
        !weir || e.contains("Required OCSP response is missing from TLS context"),
        "{e}"
    );
    let other = ocsp_response(&[0x01, 0x02, 0x03], Some(now() + 86_400));
    let e = refused(s.chain(Some(&other), "LENIENT_STAPLING"));
    assert!(
        !weir || e.contains("OCSP response does not match its TLS certificate"),
        "{e}"
    );
    let e = refused(s.chain(Some(b"not der"), "LENIENT_STAPLING"));
    assert!(!weir || e.contains("ocsp_staple"), "{e}");
}

// ================================================================ auto_host_sni

/// A STATIC cluster to `port` whose endpoint has `hostname` (empty: none),
/// with an UpstreamTlsContext of `tls` fields and `extra` cluster fields.
fn host_cluster(name: &str, port: u16, hostname: &str, tls: Value, extra: Value) -> Value {
    let mut endpoint = json!({"address": sock(port)});
    if !hostname.is_empty() {
        endpoint["hostname"] = json!(hostname);
    }
    merge(
        json!({
            "name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls",
                "typed_config": merge(json!({"@type": UPSTREAM_TLS}), tls)},
        }),
        extra,
    )
}

/// A proxy routing `/<cluster>` to each cluster (the route prefix is the
/// cluster name).
fn router(clusters: Vec<Value>) -> Proxy {
    let routes: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let n = c["name"].as_str().unwrap_or_default().to_owned();
            route(&format!("/{n}"), &n, json!({}))
        })
        .collect();
    Proxy::start(move |ports| {
        let hcm = hcm(
            "ingress",
            vec![],
            vec![vhost("v", routes.clone(), json!({}))],
            json!({}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![hcm])])],
            clusters.clone(),
            json!({}),
        )
    })
}

/// `auto_host_sni`: the SNI is the endpoint's `hostname`; without one, the
/// context's `sni`; `auto_sni` (the request's host) wins over both, as
/// Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_host_sni_uses_the_endpoint_hostname() {
    let ca = TestCa::new("auto-host-sni root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "up",
        &ca.issue(LeafSpec::server("host.example.com")),
    ))
    .await
    .expect("tls upstream");
    let tls = json!({"sni": "default.example.com", "auto_host_sni": true});
    let auto_sni = json!({"typed_extension_protocol_options": {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": weir_tests::config::HTTP_PROTOCOL_OPTIONS,
        "explicit_http_config": {"http_protocol_options": {}},
        "upstream_http_protocol_options": {"auto_sni": true},
    }}});
    let p = router(vec![
        host_cluster(
            "named",
            up.port(),
            "host.example.com",
            tls.clone(),
            json!({}),
        ),
        host_cluster("unnamed", up.port(), "", tls.clone(), json!({})),
        host_cluster("both", up.port(), "host.example.com", tls, auto_sni),
    ]);
    let http = weir_tests::scenario::Http::h1();
    for (path, host, want) in [
        ("/named", "front.test", "host.example.com"),
        ("/unnamed", "front.test", "default.example.com"),
        ("/both", "request.example.com", "request.example.com"),
    ] {
        let r = http
            .get(&format!("{}{path}", p.base()), &[("host", host)])
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("x-upstream-sni"), Some(want), "{path}");
    }
}

/// `auto_sni_san_validation`: the upstream certificate must carry the SNI
/// sent (here from `auto_host_sni`) as a DNS SAN, and that check replaces
/// the validation context's SAN matchers (one that matches nothing here).
/// Without a validation context it is a config error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sni_san_validation_checks_the_sni_sent() {
    let ca = TestCa::new("auto-sni-san root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "up",
        &ca.issue(LeafSpec::server("host.example.com")),
    ))
    .await
    .expect("tls upstream");
    let dir = TempDir::new("tls-fields-san").expect("dir");
    let ca_file = dir.write("ca.pem", ca.pem());
    let tls = json!({
        "auto_host_sni": true, "auto_sni_san_validation": true,
        "common_tls_context": {"validation_context": {
            "trusted_ca": {"filename": ca_file.display().to_string()},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "nothing.example.com"}}],
        }},
    });
    let p = router(vec![
        host_cluster(
            "good",
            up.port(),
            "host.example.com",
            tls.clone(),
            json!({}),
        ),
        host_cluster("bad", up.port(), "evil.example.com", tls, json!({})),
    ]);
    let http = weir_tests::scenario::Http::h1();
    let r = http.get(&format!("{}/good", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream-sni"), Some("host.example.com"));
    let r = http.get(&format!("{}/bad", p.base()), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let conns = up
        .wait_connections(2, std::time::Duration::from_secs(5))
        .await;
    assert!(
        conns
            .iter()
            .any(|c| c.sni.as_deref() == Some("evil.example.com")),
        "the refused connection sent the endpoint's hostname"
    );

    // No validation context: refused.
    let cluster = host_cluster(
        "c",
        up.port(),
        "host.example.com",
        json!({"auto_sni_san_validation": true}),
        json!({}),
    );
    let target = Target::from_env();
    let started = Proxy::try_start(target, StartOptions::default(), move |ports| {
        bootstrap_with(ports, vec![], vec![cluster.clone()], json!({}))
    });
    match started {
        Ok(_) => panic!("{target:?} accepted auto_sni_san_validation without a validation context"),
        Err(e) => assert!(
            target.is_envoy() || format!("{e:#}").contains("auto_sni_san_validation"),
            "{e:#}"
        ),
    }
}

/// `/config_dump` never shows ticket keys (Envoy's `keys` is a sensitive
/// field: redacted as `[redacted]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_redacts_ticket_keys() {
    let pki = Pki::new("tickets.test", KeyType::EcdsaP256);
    let key = ticket_key(9);
    let p = start(
        tls_chain(
            json!({"common_tls_context": pki.common(json!({})), "session_ticket_keys": keys(&[&key])}),
            "ok",
        ),
        vec![json!({"name": "stk", "session_ticket_keys": keys(&[&key])})],
    );
    let dump = p.admin("GET", "/config_dump").await;
    assert_eq!(dump.status, 200);
    let text = dump.text();
    assert!(text.contains("session_ticket_keys"), "{text}");
    assert!(
        !text.contains(&tls::base64(&key)),
        "ticket key in /config_dump"
    );
}
