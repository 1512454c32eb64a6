//! Tests of the TLS and TCP test infrastructure itself (`weir_tests::tls`,
//! `weir_tests::tcp`): real sockets, real TLS, no proxy involved.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::scenario::echo_header;
use weir_tests::tcp;
use weir_tests::tls::{
    self, ClientAuth, Eku, HandshakeError, KeyAlg, KeyType, LeafSpec, SigAlgs, TempDir, TestCa,
    TlsClient, TlsRequest, TlsServerOptions, TlsVersions,
};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn mtls_round_trip_h2_and_http1() {
    let ca = TestCa::new("root");
    let server = ca.issue(LeafSpec::server("backend.test"));
    let client = ca.issue(LeafSpec::spiffe(SLEEP));
    let up = tls::tls_upstream(TlsServerOptions::new("backend", &server).require_client_cert(&ca))
        .await
        .expect("upstream");

    let req = TlsRequest::get("/hello?x=1").header("x-test", "1");
    let r = tls::https_get(up.addr(), "backend.test", &["h2"], &ca, Some(&client), req)
        .await
        .expect("h2 request");
    assert_eq!(r.status, 200);
    assert_eq!(r.tls.alpn.as_deref(), Some("h2"));
    assert!(r.tls.peer_cert().expect("server cert").is(&server));
    let echo = r.echo();
    assert_eq!(echo.upstream, "backend");
    assert_eq!(echo.version, "HTTP/2.0");
    assert_eq!(echo.path, "/hello?x=1");
    assert_eq!(echo.authority, "backend.test");
    assert_eq!(echo_header(&echo, "x-test"), Some("1"));
    assert_eq!(r.header("x-upstream-sni"), Some("backend.test"));
    assert_eq!(r.header("x-upstream-alpn"), Some("h2"));
    assert_eq!(r.header("x-upstream-client-cert-uri-san"), Some(SLEEP));
    assert_eq!(
        r.header("x-upstream-client-cert-sha256"),
        Some(client.sha256_fingerprint.as_str())
    );

    let c = TlsClient::builder()
        .trust(&ca)
        .alpn(&["http/1.1"])
        .client_cert(&client)
        .build();
    let r = c
        .request(
            up.addr(),
            "backend.test",
            TlsRequest::new("POST", "/p")
                .header("x-echo-status", "201")
                .body("abc"),
        )
        .await
        .expect("http/1.1 request");
    assert_eq!(r.status, 201);
    assert_eq!(r.echo().version, "HTTP/1.1");
    assert_eq!(r.echo().body_len, 3);
    assert_eq!(r.header("x-upstream-alpn"), Some("http/1.1"));

    // No ALPN: the server sniffs; HTTP/1.1 from this client.
    let c = TlsClient::builder().trust(&ca).client_cert(&client).build();
    let r = c
        .get(up.addr(), "backend.test", "/")
        .await
        .expect("no alpn");
    assert_eq!(r.tls.alpn, None);
    assert_eq!(r.echo().version, "HTTP/1.1");

    let conns = up.connections();
    assert_eq!(conns.len(), 3);
    assert_eq!(conns[0].offered_alpn, vec!["h2"]);
    let cert = conns[0].client_cert().expect("client cert recorded");
    assert_eq!(cert.uri_sans, vec![SLEEP]);
    assert!(cert.is(&client));
}

#[tokio::test]
async fn several_requests_on_one_connection() {
    let ca = TestCa::new("root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "b",
        &ca.issue(LeafSpec::server("b.test")),
    ))
    .await
    .expect("upstream");
    for alpn in ["h2", "http/1.1"] {
        let c = TlsClient::builder().trust(&ca).alpn(&[alpn]).build();
        let mut conn = c.http(up.addr(), "b.test").await.expect("connect");
        for i in 0..3 {
            let r = conn
                .send(TlsRequest::get("/").header("x-echo-id", alpn))
                .await
                .expect("send");
            assert_eq!(r.echo().seen, i + 1);
        }
    }
    assert_eq!(up.connections().len(), 2);
}

#[tokio::test]
async fn client_certificate_refused_at_handshake() {
    let ca = TestCa::new("root");
    let other = TestCa::new("other root");
    let up = tls::tls_upstream(
        TlsServerOptions::new("b", &ca.issue(LeafSpec::server("b.test"))).require_client_cert(&ca),
    )
    .await
    .expect("upstream");
    let good = ca.issue(LeafSpec::client("good"));
    let expired = ca.issue(LeafSpec::client("old").expired());
    let untrusted = other.issue(LeafSpec::client("stranger"));
    let server_only = ca.issue(LeafSpec::new("no-client-eku").eku(Eku::Server));

    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let client = |leaf: Option<&tls::Leaf>| {
            let mut b = TlsClient::builder().trust(&ca).versions(versions);
            if let Some(l) = leaf {
                b = b.client_cert(l);
            }
            b.build()
        };
        let ok = client(Some(&good))
            .handshake(up.addr(), "b.test")
            .await
            .expect("good client cert accepted");
        assert_eq!(ok.is_tls13(), versions == TlsVersions::Tls13Only);

        let cases = [
            (None, "CertificateRequired"),
            (Some(&expired), "CertificateExpired"),
            (Some(&untrusted), "UnknownCA"),
            (Some(&server_only), ""),
        ];
        for (leaf, alert) in cases {
            let err = client(leaf)
                .handshake(up.addr(), "b.test")
                .await
                .expect_err("refused");
            let HandshakeError::Alert(a) = &err else {
                panic!("{versions:?} {leaf:?}: want an alert, got {err}");
            };
            if !alert.is_empty() {
                assert_eq!(a, alert, "{versions:?} {leaf:?}");
            }
        }
    }
    let conns = up.wait_connections(10, WAIT).await;
    let refused = conns.iter().filter(|c| c.error.is_some()).count();
    assert_eq!(refused, 8);
}

#[tokio::test]
async fn server_certificate_checked_by_client() {
    let ca = TestCa::new("root");
    let expired = ca.issue(LeafSpec::server("b.test").expired());
    let up = tls::tls_tcp_echo(TlsServerOptions::new("b", &expired))
        .await
        .expect("server");
    let c = TlsClient::new(&ca);
    let err = c.handshake(up.addr(), "b.test").await.expect_err("expired");
    assert!(
        matches!(&err, HandshakeError::Local(e) if e.contains("expired")),
        "{err}"
    );
    // The client still reports what it was shown.
    let seen = c.last_peer_chain().expect("chain seen");
    assert!(seen[0].is(&expired));

    // Wrong name.
    let err = c
        .handshake(up.addr(), "other.test")
        .await
        .expect_err("name");
    assert!(matches!(err, HandshakeError::Local(_)), "{err}");
    // Untrusted CA.
    let err = TlsClient::new(&TestCa::new("x"))
        .handshake(up.addr(), "b.test")
        .await
        .expect_err("untrusted");
    assert!(matches!(err, HandshakeError::Local(_)), "{err}");
    // Insecure: accepted, and the certificate is reported.
    let info = TlsClient::builder()
        .insecure()
        .build()
        .handshake(up.addr(), "anything")
        .await
        .expect("insecure");
    assert!(info.peer_cert().expect("cert").is(&expired));
}

#[tokio::test]
async fn rsa_or_ecdsa_certificate_chosen_by_client_capabilities() {
    let ca = TestCa::new("root");
    let ecdsa = ca.issue(LeafSpec::server("dual.test"));
    let rsa = ca.issue(LeafSpec::server("dual.test").key(KeyType::Rsa2048));
    assert_eq!(rsa.info().key_alg, KeyAlg::Rsa);
    let up = tls::tls_tcp_echo(TlsServerOptions::new("dual", &ecdsa).alt_cert(&rsa))
        .await
        .expect("server");
    let mut n = 0;
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        for (sig, want) in [
            (SigAlgs::EcdsaOnly, KeyAlg::EcdsaP256),
            (SigAlgs::RsaOnly, KeyAlg::Rsa),
            (SigAlgs::Any, KeyAlg::EcdsaP256),
        ] {
            let c = TlsClient::builder()
                .trust(&ca)
                .versions(versions)
                .sig_algs(sig)
                .build();
            let info = c
                .handshake(up.addr(), "dual.test")
                .await
                .expect("handshake");
            let cert = info.peer_cert().expect("cert");
            assert_eq!(cert.key_alg, want, "{versions:?} {sig:?}");
            n += 1;
            let rec = up.wait_connection(n, WAIT).await;
            match sig {
                SigAlgs::EcdsaOnly => assert!(
                    rec.offered_sig_schemes
                        .iter()
                        .all(|s| s.starts_with("ECDSA"))
                        && rec
                            .offered_cipher_suites
                            .iter()
                            .all(|s| !s.contains("_RSA_")),
                    "{rec:?}"
                ),
                SigAlgs::RsaOnly => {
                    assert!(
                        rec.offered_sig_schemes.iter().all(|s| s.starts_with("RSA")),
                        "{rec:?}"
                    )
                }
                SigAlgs::Any => {}
            }
        }
    }
    // An ECDSA-only client cannot talk to an RSA-only server.
    let rsa_only = tls::tls_tcp_echo(TlsServerOptions::new("rsa", &rsa))
        .await
        .expect("server");
    let err = TlsClient::builder()
        .trust(&ca)
        .sig_algs(SigAlgs::EcdsaOnly)
        .build()
        .handshake(rsa_only.addr(), "dual.test")
        .await
        .expect_err("no common signature scheme");
    assert!(err.alert().is_some(), "{err}");
}

#[tokio::test]
async fn session_resumption() {
    let ca = TestCa::new("root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "b",
        &ca.issue(LeafSpec::server("b.test")),
    ))
    .await
    .expect("upstream");
    let mut n = 0;
    for versions in [TlsVersions::Tls13Only, TlsVersions::Tls12Only] {
        let c = TlsClient::builder().trust(&ca).versions(versions).build();
        let first = c.handshake(up.addr(), "b.test").await.expect("first");
        assert!(!first.resumed);
        let second = c.handshake(up.addr(), "b.test").await.expect("second");
        assert!(second.resumed, "{versions:?}");
        n += 2;
        let rec = up.wait_connection(n, WAIT).await;
        assert_eq!(rec.tls.map(|t| t.resumed), Some(true));
        // Resumption off / another client: full handshakes.
        let off = TlsClient::builder()
            .trust(&ca)
            .versions(versions)
            .resumption(false)
            .build();
        off.handshake(up.addr(), "b.test").await.expect("1");
        assert!(!off.handshake(up.addr(), "b.test").await.expect("2").resumed);
        let fresh = TlsClient::new(&ca);
        assert!(
            !fresh
                .handshake(up.addr(), "b.test")
                .await
                .expect("3")
                .resumed
        );
        n += 3;
    }
    // Over HTTP too: the upstream reports it.
    let c = TlsClient::builder().trust(&ca).alpn(&["h2"]).build();
    c.get(up.addr(), "b.test", "/").await.expect("1");
    // The ticket arrives after the handshake; give it a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = c.get(up.addr(), "b.test", "/").await.expect("2");
    assert!(r.tls.resumed);
    assert_eq!(r.header("x-upstream-tls-resumed"), Some("true"));
}

#[tokio::test]
async fn sni_alpn_versions_and_certificate_by_sni() {
    let ca = TestCa::new("root");
    let a = ca.issue(LeafSpec::server("a.test"));
    let b = ca.issue(LeafSpec::server("b.test"));
    let up = tls::tls_tcp_echo(
        TlsServerOptions::new("s", &a)
            .sni_cert("b.test", &b)
            .alpn(&["x-proto"])
            .versions(TlsVersions::Tls12Only),
    )
    .await
    .expect("server");
    let c = TlsClient::builder()
        .trust(&ca)
        .alpn(&["x-other", "x-proto"])
        .build();
    let info = c.handshake(up.addr(), "b.test").await.expect("b");
    assert!(info.peer_cert().expect("cert").is(&b));
    assert_eq!(info.version, "TLSv1_2");
    assert_eq!(info.alpn.as_deref(), Some("x-proto"));
    let rec = up.wait_connection(1, WAIT).await;
    assert_eq!(rec.sni.as_deref(), Some("b.test"));
    assert_eq!(rec.offered_alpn, vec!["x-other", "x-proto"]);

    let info = c.handshake(up.addr(), "a.test").await.expect("a");
    assert!(info.peer_cert().expect("cert").is(&a));

    // No SNI: the default certificate, and the server saw none.
    let info = TlsClient::builder()
        .trust(&ca)
        .no_sni()
        .build()
        .handshake(up.addr(), "a.test")
        .await
        .expect("no sni");
    assert!(info.peer_cert().expect("cert").is(&a));
    assert_eq!(up.wait_connection(3, WAIT).await.sni, None);

    // TLS 1.3-only client against a TLS 1.2-only server.
    let err = TlsClient::builder()
        .trust(&ca)
        .versions(TlsVersions::Tls13Only)
        .build()
        .handshake(up.addr(), "a.test")
        .await
        .expect_err("version");
    assert_eq!(err.alert(), Some("ProtocolVersion"), "{err}");

    // Restricted key exchange is visible on both sides.
    let info = TlsClient::builder()
        .trust(&ca)
        .kx_groups(&[tls::KxGroup::P384])
        .build()
        .handshake(up.addr(), "a.test")
        .await
        .expect("p384");
    assert_eq!(info.kx_group.as_deref(), Some("secp384r1"));
}

#[tokio::test]
async fn tls_tcp_echo_with_half_close() {
    let ca = TestCa::new("root");
    let up = tls::tls_tcp_echo(TlsServerOptions::new(
        "e",
        &ca.issue(LeafSpec::server("e.test")),
    ))
    .await
    .expect("server");
    let (mut s, info) = TlsClient::new(&ca)
        .connect(up.addr(), "e.test")
        .await
        .expect("connect");
    assert_eq!(info.alpn, None);
    let payload = vec![7u8; 300_000];
    let (mut r, mut w) = tokio::io::split(&mut s);
    let write = async {
        w.write_all(&payload).await?;
        w.shutdown().await
    };
    let mut got = Vec::new();
    let (wr, rd) = tokio::join!(write, r.read_to_end(&mut got));
    wr.expect("write");
    rd.expect("read");
    assert_eq!(got, payload);
    assert_eq!(up.bytes_echoed(), payload.len() as u64);
}

#[tokio::test]
async fn certificates_hashes_crl_and_chains() {
    let ca = TestCa::new("root");
    let inter = ca.intermediate("intermediate");
    let leaf = inter.issue(
        LeafSpec::server("svc.test")
            .dns("*.svc.test")
            .uri("spiffe://td/ns/a/sa/b")
            .ip("127.0.0.1".parse().expect("ip"))
            .email("ops@svc.test"),
    );
    let info = leaf.info();
    assert_eq!(info.subject_cn.as_deref(), Some("svc.test"));
    assert_eq!(info.issuer_cn.as_deref(), Some("intermediate"));
    assert_eq!(info.dns_sans, vec!["svc.test", "*.svc.test"]);
    assert_eq!(info.uri_sans, vec!["spiffe://td/ns/a/sa/b"]);
    assert_eq!(info.email_sans, vec!["ops@svc.test"]);
    assert_eq!(info.ip_sans.len(), 1);
    assert_eq!(info.key_alg, KeyAlg::EcdsaP256);
    assert_eq!(leaf.chain_der.len(), 3);
    assert_eq!(leaf.chain_pem.matches("BEGIN CERTIFICATE").count(), 3);

    // Files, checked against the openssl CLI.
    let dir = TempDir::new("infra").expect("tempdir");
    let files = leaf.write_files(&dir, "svc");
    let cert_path = files.cert.to_string_lossy().into_owned();
    let fp = tls::run_cli(
        "openssl",
        &[
            "x509".into(),
            "-noout".into(),
            "-fingerprint".into(),
            "-sha256".into(),
            "-in".into(),
            cert_path.clone(),
        ],
        b"",
        WAIT,
    )
    .await;
    assert!(fp.success(), "{fp:?}");
    assert!(
        fp.stdout
            .trim()
            .ends_with(&leaf.sha256_fingerprint_colons()),
        "{} vs {}",
        fp.stdout,
        leaf.sha256_fingerprint_colons()
    );
    let spki = tls::run_cli(
        "sh",
        &[
            "-c".into(),
            format!(
                "openssl x509 -in {cert_path} -pubkey -noout | openssl pkey -pubin -outform der \
                 | openssl dgst -sha256 -binary | openssl base64"
            ),
        ],
        b"",
        WAIT,
    )
    .await;
    assert_eq!(spki.stdout.trim(), leaf.spki_sha256_base64);
    let root_path = dir.write("root.pem", ca.pem());
    let verify = tls::run_cli(
        "openssl",
        &[
            "verify".into(),
            "-CAfile".into(),
            root_path.to_string_lossy().into_owned(),
            "-untrusted".into(),
            dir.write("inter.pem", inter.pem())
                .to_string_lossy()
                .into_owned(),
            cert_path,
        ],
        b"",
        WAIT,
    )
    .await;
    assert!(verify.success(), "{verify:?}");

    // CRL: openssl reads it; a rustls server refuses the revoked client.
    let revoked = ca.issue(LeafSpec::client("revoked"));
    let fine = ca.issue(LeafSpec::client("fine"));
    let crl = ca.crl(&[&revoked]);
    assert!(crl.pem.starts_with("-----BEGIN X509 CRL-----"));
    let crl_path = dir.write("ca.crl", &crl.pem);
    let text = tls::run_cli(
        "openssl",
        &[
            "crl".into(),
            "-noout".into(),
            "-text".into(),
            "-in".into(),
            crl_path.to_string_lossy().into_owned(),
        ],
        b"",
        WAIT,
    )
    .await;
    let serial = revoked.info().serial_hex.to_uppercase();
    assert!(text.stdout.contains(&serial), "{serial} in {}", text.stdout);
    let up = tls::tls_tcp_echo(
        TlsServerOptions::new("crl", &ca.issue(LeafSpec::server("crl.test")))
            .client_auth(ClientAuth::required(&ca))
            .crl(&crl),
    )
    .await
    .expect("server");
    let hs = |leaf: &tls::Leaf| TlsClient::builder().trust(&ca).client_cert(leaf).build();
    hs(&fine)
        .handshake(up.addr(), "crl.test")
        .await
        .expect("not revoked");
    let err = hs(&revoked)
        .handshake(up.addr(), "crl.test")
        .await
        .expect_err("revoked");
    assert_eq!(err.alert(), Some("CertificateRevoked"), "{err}");

    // A leaf of the intermediate verifies for a client trusting the root.
    let up = tls::tls_tcp_echo(TlsServerOptions::new("i", &leaf))
        .await
        .expect("server");
    let info = TlsClient::new(&ca)
        .handshake(up.addr(), "x.svc.test")
        .await
        .expect("chain");
    assert_eq!(info.peer_chain.len(), 3);
    drop(dir);
}

#[tokio::test]
async fn openssl_and_curl_clients() {
    let ca = TestCa::new("root");
    let up = tls::tls_upstream(TlsServerOptions::new(
        "b",
        &ca.issue(LeafSpec::server("b.test")),
    ))
    .await
    .expect("upstream");
    let dir = TempDir::new("cli").expect("tempdir");
    let ca_path = dir.write("ca.pem", ca.pem());
    let ca_path = ca_path.to_str().expect("utf-8 path");

    let out = tls::openssl_s_client(
        up.addr(),
        Some("b.test"),
        &["-alpn", "h2", "-CAfile", ca_path, "-tls1_3"],
    )
    .await;
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.field("ALPN protocol").as_deref(), Some("h2"), "{out:?}");
    assert_eq!(
        out.s_client_protocol().as_deref(),
        Some("TLSv1.3"),
        "{out:?}"
    );
    assert_eq!(
        out.s_client_cipher().as_deref(),
        Some("TLS_AES_256_GCM_SHA384"),
        "{out:?}"
    );
    assert_eq!(
        out.field("Verify return code").as_deref(),
        Some("0 (ok)"),
        "{out:?}"
    );
    assert!(out.peer_cert_pem().is_some());
    assert_eq!(
        up.wait_connection(1, WAIT).await.sni.as_deref(),
        Some("b.test")
    );

    let url = format!("https://b.test:{}/curl", up.port());
    let resolve = tls::curl_resolve("b.test", up.addr());
    let out = tls::curl(&[
        &resolve[0],
        &resolve[1],
        "--cacert",
        ca_path,
        "--http2",
        "-D",
        "-",
        &url,
    ])
    .await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.starts_with("HTTP/2 200"), "{}", out.stdout);
    assert!(out.stdout.contains("x-upstream-alpn: h2"), "{}", out.stdout);
}

#[tokio::test]
async fn client_hello_captured_untouched() {
    let cap = tcp::hello_capture_server().await.expect("capture");
    let c = TlsClient::builder()
        .insecure()
        .alpn(&["h2", "http/1.1"])
        .build();
    let hello = c.client_hello("passthrough.test");
    assert_eq!(
        tcp::client_hello_sni(&hello).as_deref(),
        Some("passthrough.test")
    );
    assert_eq!(tcp::client_hello_alpn(&hello), vec!["h2", "http/1.1"]);
    let mut s = TcpStream::connect(cap.addr()).await.expect("connect");
    s.write_all(&hello).await.expect("write");
    assert_eq!(cap.wait_capture(1, WAIT).await, hello);

    // A real handshake attempt: the capture closes, the client sees that.
    let err = c
        .handshake(cap.addr(), "other.test")
        .await
        .expect_err("no server");
    assert!(matches!(err, HandshakeError::Closed(_)), "{err}");
    let second = cap.wait_capture(2, WAIT).await;
    assert_eq!(
        tcp::client_hello_sni(&second).as_deref(),
        Some("other.test")
    );
}

#[tokio::test]
async fn tcp_echo_half_close() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let mut s = TcpStream::connect(echo.addr()).await.expect("connect");
    s.write_all(b"hello").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read to EOF");
    assert_eq!(got, b"hello");
    assert_eq!(echo.wait_results(1, WAIT).await, vec![Ok(5)]);
    assert_eq!(echo.connections(), 1);
    assert_eq!(echo.peers()[0], s.local_addr().expect("local"));
    assert_eq!(echo.active(), 0);
}

#[tokio::test]
async fn pattern_stream_64_mib_through_echo() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let len = 64u64 << 20;
    let t = tcp::stream_through(echo.addr(), len).await.expect("stream");
    assert_eq!(t.received, len);
    assert_eq!(echo.bytes(), len);
}

#[tokio::test]
async fn pattern_sink_source_and_corruption() {
    let len = 3_000_017u64;
    let source = tcp::tcp_source_server(len).await.expect("source");
    let mut s = TcpStream::connect(source.addr()).await.expect("connect");
    assert_eq!(tcp::read_verify_pattern(&mut s).await.expect("verify"), len);
    drop(s);

    let sink = tcp::tcp_sink_server().await.expect("sink");
    let mut s = TcpStream::connect(sink.addr()).await.expect("connect");
    tcp::write_pattern(&mut s, len).await.expect("write");
    s.shutdown().await.expect("shutdown");
    assert_eq!(sink.wait_results(1, WAIT).await, vec![Ok(len)]);

    // A dropped chunk is caught, at the right offset.
    let mut buf = vec![0u8; 200_000];
    tcp::fill_pattern(0, &mut buf);
    assert_eq!(tcp::check_pattern(0, &buf), Ok(()));
    assert_eq!(tcp::check_pattern(7, &buf[7..]), Ok(()));
    let mut skipped = buf[..100_000].to_vec();
    skipped.extend_from_slice(&buf[100_000 + 4096..]);
    assert_eq!(tcp::check_pattern(0, &skipped), Err(100_000));
    let mut s = TcpStream::connect(sink.addr()).await.expect("connect");
    s.write_all(&skipped).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let r = sink.wait_results(2, WAIT).await;
    assert!(r[1].as_ref().is_err_and(|e| e.contains("100000")), "{r:?}");
}
