//! `envoy.filters.http.jwt_authn` (Istio's RequestAuthentication) with real
//! sockets: a real echo upstream, real HTTP/1.1 and HTTP/2 clients, tokens
//! signed in the test with keys made in the test (RSA by `openssl genpkey`,
//! EC by ring), and RBAC reading the verified claims from dynamic metadata.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`, which is how the
//! expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test jwt_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test jwt_scenarios
//! ```
use std::time::{SystemTime, UNIX_EPOCH};

use ring::signature::{self, KeyPair};
use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, filter, hcm, listener, log_path, route, stat_is, vhost,
};
use weir_tests::scenario::{echo_header, Http, Proxy, Resp};
use weir_tests::tls::base64 as std_base64;
use weir_tests::upstream;

const JWT: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
const JWT_PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";
const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_CODE_DETAILS%\n";

const RSA_ISS: &str = "https://rsa.example";
const EC_ISS: &str = "https://ec.example";

/// Base64url without padding (JWS).
fn b64(b: &[u8]) -> String {
    std_base64(b)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A signing key and its public JWK.
enum Key {
    Rsa(signature::RsaKeyPair),
    Ec(signature::EcdsaKeyPair),
}

struct Signer {
    key: Key,
    kid: String,
}

impl Signer {
    /// An RSA-2048 key from `openssl genpkey` (ring cannot generate RSA).
    fn rsa(kid: &str) -> Signer {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("run openssl genpkey");
        assert!(out.status.success(), "openssl genpkey failed");
        // `-outform DER` writes a PKCS#1 RSAPrivateKey.
        let pair = signature::RsaKeyPair::from_der(&out.stdout).expect("PKCS#1 RSA key");
        Signer {
            key: Key::Rsa(pair),
            kid: kid.into(),
        }
    }

    fn ec(kid: &str) -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate");
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key");
        Signer {
            key: Key::Ec(pair),
            kid: kid.into(),
        }
    }

    fn jwk(&self) -> Value {
        match &self.key {
            Key::Rsa(k) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "alg": "RS256", "kid": self.kid,
                    "n": b64(&c.n), "e": b64(&c.e)})
            }
            Key::Ec(k) => {
                let pt = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": self.kid,
                    "x": b64(&pt[1..33]), "y": b64(&pt[33..65])})
            }
        }
    }

    fn jwks(&self) -> String {
        json!({"keys": [self.jwk()]}).to_string()
    }

    fn token(&self, payload: &Value) -> String {
        let rng = ring::rand::SystemRandom::new();
        let alg = match self.key {
            Key::Rsa(_) => "RS256",
            Key::Ec(_) => "ES256",
        };
        let header = json!({"alg": alg, "kid": self.kid, "typ": "JWT"});
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let sig = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    signed.as_bytes(),
                    &mut sig,
                )
                .expect("sign");
                sig
            }
            Key::Ec(k) => k
                .sign(&rng, signed.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
        };
        format!("{signed}.{}", b64(&sig))
    }
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Waits for the access log's `n`-th line (1-based) and returns it.
async fn log_line(p: &Proxy, path: &std::path::Path, n: usize) -> String {
    p.log_lines(path, n)
        .await
        .get(n - 1)
        .cloned()
        .unwrap_or_default()
}

fn expect_denied(r: &Resp, code: u16, body: &str, realm: &str, invalid: bool) {
    assert_eq!((r.status, r.text().as_str()), (code, body));
    let want = if invalid {
        format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
    } else {
        format!("Bearer realm=\"{realm}\"")
    };
    assert_eq!(r.header("www-authenticate"), Some(want.as_str()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_requirements_and_failures() {
    let up = upstream::http1("echo").await.expect("upstream");
    let rsa = Signer::rsa("r1");
    let ec = Signer::ec("e1");
    let log = log_path("jwt", "tokens");
    let jwt = json!({
        "providers": {
            "rsa": {
                "issuer": RSA_ISS, "audiences": ["api"],
                "local_jwks": {"inline_string": rsa.jwks()},
                "forward_payload_header": "x-jwt-payload",
                "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}],
                "payload_in_metadata": "rsa",
            },
            "ec": {
                "issuer": EC_ISS,
                "local_jwks": {"inline_string": ec.jwks()},
                "from_headers": [{"name": "x-token", "value_prefix": "Token "}],
                "from_params": ["jwt"],
                "forward": true,
            },
        },
        "requirement_map": {
            "ec": {"provider_name": "ec"},
            "any": {"requires_any": {"requirements": [
                {"provider_name": "rsa"}, {"provider_name": "ec"}]}},
            "optional": {"requires_any": {"requirements": [
                {"provider_name": "rsa"}, {"allow_missing": {}}]}},
        },
        "rules": [
            {"match": {"prefix": "/rsa"}, "requires": {"provider_name": "rsa"}},
            {"match": {"prefix": "/ec"}, "requirement_name": "ec"},
            {"match": {"prefix": "/any"}, "requirement_name": "any"},
            {"match": {"prefix": "/optional"}, "requirement_name": "optional"},
            {"match": {"prefix": "/open"}},
            {"match": {"prefix": "/per-route"}, "requires": {"provider_name": "rsa"}},
        ],
    });
    let port = up.port();
    let log_file = log.to_path_buf();
    let p = Proxy::start(move |ports| {
        let per_route = json!({"typed_per_filter_config": {"jwt": {
            "@type": JWT_PER_ROUTE, "requirement_name": "ec"}}});
        let wrong = json!({"typed_per_filter_config": {"jwt": {
            "@type": JWT_PER_ROUTE, "requirement_name": "nope"}}});
        let off = json!({"typed_per_filter_config": {"jwt": {
            "@type": JWT_PER_ROUTE, "disabled": true}}});
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "jwt",
                    vec![filter("jwt", JWT, jwt.clone())],
                    vec![vhost(
                        "vh",
                        vec![
                            route("/per-route", "echo", per_route),
                            route("/wrong-name", "echo", wrong),
                            route("/disabled", "echo", off),
                            route("/", "echo", json!({})),
                        ],
                        json!({}),
                    )],
                    json!({"access_log": [file_log(&log_file, LOG_FORMAT)]}),
                )])],
            )],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    let base = p.base();
    let host = p.addr().to_string();
    let h1 = Http::h1();
    let (mut allowed, mut denied) = (0, 0);
    let mut lines = 0;

    // A valid RS256 token: claim and payload headers added, the token
    // removed (forward: false).
    let payload = json!({"iss": RSA_ISS, "sub": "alice", "aud": "api", "exp": now() + 600});
    let good = rsa.token(&payload);
    let r = h1
        .get(
            &format!("{base}/rsa"),
            &[("authorization", &bearer(&good)), ("x-sub", "forged")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(echo_header(&e, "x-sub"), Some("alice"));
    assert_eq!(
        echo_header(&e, "x-jwt-payload"),
        good.split('.').nth(1),
        "the payload segment as sent"
    );
    assert_eq!(echo_header(&e, "authorization"), None);
    allowed += 1;
    lines += 1;

    // Missing token: 401 without error="invalid_token".
    let r = h1.get(&format!("{base}/rsa/x?a=b"), &[]).await;
    expect_denied(
        &r,
        401,
        "Jwt is missing",
        &format!("http://{host}/rsa/x?a=b"),
        false,
    );
    denied += 1;
    lines += 1;
    assert_eq!(
        log_line(&p, &log, lines).await,
        "401 /rsa/x?a=b jwt_authn_access_denied{Jwt_is_missing}"
    );

    let realm = format!("http://{host}/rsa");
    let cases = [
        (
            rsa.token(&json!({"iss": RSA_ISS, "aud": "api", "exp": now() - 3600})),
            401,
            "Jwt is expired",
        ),
        (
            rsa.token(&json!({"iss": "https://other.example", "aud": "api"})),
            401,
            "Jwt issuer is not configured",
        ),
        (
            rsa.token(&json!({"iss": RSA_ISS, "aud": ["web", "mobile"]})),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (
            // A signature of other content.
            {
                let other = rsa.token(&json!({"iss": RSA_ISS, "aud": "api", "sub": "mallory"}));
                let mut parts: Vec<&str> = good.split('.').collect();
                parts[2] = other.split('.').nth(2).expect("signature");
                parts.join(".")
            },
            401,
            "Jwt verification fails",
        ),
        (
            "abc.def".to_owned(),
            401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ];
    for (token, code, body) in &cases {
        let r = h1
            .get(&format!("{base}/rsa"), &[("authorization", &bearer(token))])
            .await;
        expect_denied(&r, *code, body, &realm, true);
        denied += 1;
        lines += 1;
    }
    assert_eq!(
        log_line(&p, &log, lines - 2).await,
        "403 /rsa jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}"
    );

    // ES256 in a custom header with a value prefix (kept: forward: true),
    // and in a query parameter; not in Authorization.
    let ec_good = ec.token(&json!({"iss": EC_ISS, "sub": "bob"}));
    let r = h1
        .get(
            &format!("{base}/ec"),
            &[("x-token", &format!("Token {ec_good}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echo_header(&r.echo(), "x-token"),
        Some(format!("Token {ec_good}").as_str())
    );
    allowed += 1;
    let r = h1.get(&format!("{base}/ec?jwt={ec_good}"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;
    let r = h1
        .get(
            &format!("{base}/ec"),
            &[("authorization", &bearer(&ec_good))],
        )
        .await;
    assert_eq!((r.status, r.text().as_str()), (401, "Jwt is missing"));
    denied += 1;

    // requires_any: either provider; none is missing.
    let h2 = Http::h2c();
    let r = h2
        .get(
            &format!("{base}/any"),
            &[("x-token", &format!("Token {ec_good}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;
    let r = h2
        .get(&format!("{base}/any"), &[("authorization", &bearer(&good))])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;
    let r = h2.get(&format!("{base}/any"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "Jwt is missing"));
    denied += 1;

    // requires_any with allow_missing: no token passes, a bad one fails.
    let r = h1.get(&format!("{base}/optional"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;
    let r = h1
        .get(
            &format!("{base}/optional"),
            &[("authorization", &bearer(&cases[0].0))],
        )
        .await;
    assert_eq!((r.status, r.text().as_str()), (401, "Jwt is expired"));
    denied += 1;

    // A rule without a requirement verifies nothing.
    let r = h1.get(&format!("{base}/open"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;

    // Per-route requirement_name replaces the rules; a wrong name is 403.
    let r = h1.get(&format!("{base}/per-route"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "Jwt is missing"));
    denied += 1;
    let r = h1
        .get(
            &format!("{base}/per-route"),
            &[("x-token", &format!("Token {ec_good}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;
    let r = h1.get(&format!("{base}/wrong-name"), &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            403,
            "Failed JWT authentication: Wrong requirement_name: nope. It should be one of [any,ec,optional]"
        )
    );
    assert_eq!(r.header("www-authenticate"), None);
    denied += 1;
    let r = h1.get(&format!("{base}/disabled"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    allowed += 1;

    stat_is(&p, "http.jwt.jwt_authn.allowed", allowed).await;
    stat_is(&p, "http.jwt.jwt_authn.denied", denied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_by_claim_in_metadata() {
    let up = upstream::http1("echo").await.expect("upstream");
    let ec = Signer::ec("e1");
    // Istio's RequestAuthentication: the issuer's payload in metadata,
    // tokens optional; its AuthorizationPolicy on
    // `request.auth.claims[groups]`: a metadata principal whose claim is a
    // string or a list.
    let jwt = json!({
        "providers": {"origins-0": {
            "issuer": EC_ISS,
            "local_jwks": {"inline_string": ec.jwks()},
            "payload_in_metadata": EC_ISS,
        }},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
        "bypass_cors_preflight": true,
    });
    let claim = |value: Value| {
        json!({"metadata": {"filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": EC_ISS}, {"key": "groups"}], "value": value}})
    };
    let admin = json!({"string_match": {"exact": "admin"}});
    let rbac = json!({"rules": {"action": "ALLOW", "policies": {"ns[default]-policy[admins]-rule[0]": {
        "permissions": [{"and_rules": {"rules": [{"any": true}]}}],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
            claim(json!({"list_match": {"one_of": admin}})),
            claim(admin.clone()),
        ]}}]}}],
    }}}});
    let port = up.port();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "gw",
                    vec![
                        filter("envoy.filters.http.jwt_authn", JWT, jwt.clone()),
                        filter("envoy.filters.http.rbac", RBAC, rbac.clone()),
                    ],
                    vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    let base = p.base();
    let h1 = Http::h1();
    let token = |groups: Value| ec.token(&json!({"iss": EC_ISS, "sub": "u", "groups": groups}));
    for (groups, want) in [
        (json!(["dev", "admin"]), 200),
        (json!("admin"), 200),
        (json!(["dev"]), 403),
        (json!({"admin": true}), 403),
    ] {
        let r = h1
            .get(
                &format!("{base}/"),
                &[("authorization", &bearer(&token(groups.clone())))],
            )
            .await;
        assert_eq!(r.status, want, "groups {groups}: {}", r.text());
    }
    // No token: jwt_authn lets it through, RBAC finds no claim.
    let r = h1.get(&format!("{base}/"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (403, "RBAC: access denied"));
    // A bad token is refused by jwt_authn before RBAC runs.
    let r = h1
        .get(&format!("{base}/"), &[("authorization", "Bearer a.b.c")])
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    // A CORS preflight bypasses jwt_authn (RBAC still denies it).
    let r = h1
        .send(
            "OPTIONS",
            &format!("{base}/"),
            &[
                ("origin", "https://a.example"),
                ("access-control-request-method", "GET"),
            ],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    stat_is(&p, "http.gw.jwt_authn.cors_preflight_bypassed", 1).await;
    stat_is(&p, "http.gw.jwt_authn.allowed", 6).await;
    stat_is(&p, "http.gw.jwt_authn.denied", 1).await;
    stat_is(&p, "http.gw.rbac.allowed", 2).await;
    stat_is(&p, "http.gw.rbac.denied", 4).await;
}

/// A JWKS server: `GET /jwks` answers `jwks`, anything else 500; counts
/// the requests per path.
async fn jwks_server(jwks: String) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let jwks = jwks.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .expect("head end")
                        + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    seen.lock().expect("seen").push(path.clone());
                    let (status, body) = if path == "/jwks" {
                        ("200 OK", jwks.clone())
                    } else {
                        ("500 Internal Server Error", "down".to_owned())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jwks_fetched_on_first_use_and_cached() {
    let up = upstream::http1("echo").await.expect("upstream");
    let ec = Signer::ec("e1");
    let (jwks_port, seen) = jwks_server(ec.jwks()).await;
    let remote = |path: &str| {
        json!({"http_uri": {"uri": format!("http://jwks.example{path}"), "cluster": "jwks",
            "timeout": "5s"}, "cache_duration": "300s"})
    };
    let jwt = json!({
        "providers": {
            "remote": {"issuer": EC_ISS, "remote_jwks": remote("/jwks"),
                "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}]},
            "down": {"issuer": "https://down.example", "remote_jwks": remote("/down"),
                "from_headers": [{"name": "x-down"}]},
        },
        "rules": [
            {"match": {"prefix": "/down"}, "requires": {"provider_name": "down"}},
            {"match": {"prefix": "/"}, "requires": {"provider_name": "remote"}},
        ],
    });
    let port = up.port();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "jwt",
                    vec![filter("jwt", JWT, jwt.clone())],
                    vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![
                cluster("echo", &[port], json!({})),
                cluster("jwks", &[jwks_port], json!({})),
            ],
        )
    });
    let base = p.base();
    let h1 = Http::h1();
    // No token: nothing to fetch for.
    let r = h1.get(&format!("{base}/"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "Jwt is missing"));
    assert!(seen.lock().expect("seen").is_empty());
    // The first token fetches the JWKS, the next ones use the cache.
    for sub in ["a", "b", "c"] {
        let t = ec.token(&json!({"iss": EC_ISS, "sub": sub}));
        let r = h1
            .get(&format!("{base}/"), &[("authorization", &bearer(&t))])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(echo_header(&r.echo(), "x-sub"), Some(sub));
    }
    assert_eq!(*seen.lock().expect("seen"), vec!["/jwks".to_owned()]);
    // A failed fetch fails the token and is not cached.
    let t = ec.token(&json!({"iss": "https://down.example"}));
    for _ in 0..2 {
        let r = h1.get(&format!("{base}/down"), &[("x-down", &t)]).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (401, "Jwks remote fetch is failed")
        );
    }
    assert_eq!(seen.lock().expect("seen").len(), 3);
    stat_is(&p, "http.jwt.jwt_authn.jwks_fetch_success", 1).await;
    stat_is(&p, "http.jwt.jwt_authn.jwks_fetch_failed", 2).await;
    stat_is(&p, "http.jwt.jwt_authn.allowed", 3).await;
    stat_is(&p, "http.jwt.jwt_authn.denied", 3).await;
}
