//! Token extraction, statuses and requirement evaluation, with keys made by
//! ring in the test (ES256, EdDSA) and tokens signed with them.
use std::sync::Arc;

use base64::Engine;
use ring::signature::{self, KeyPair};
use serde_json::{json, Value};
use xds_client::config::{
    FilterOverride, Jwks, JwtAuthn, JwtPerRoute, JwtProvider, JwtRequirement, JwtRule, PathMatch,
    PerFilterConfig, PerFilterConfigs, RouteMatch,
};

use super::token::{Jwt, Status};
use super::*;
use crate::http::{NoStats, RouteView};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An ES256 key pair and its JWK.
struct Es256 {
    pair: signature::EcdsaKeyPair,
    jwk: Value,
}

fn es256(kid: &str) -> Es256 {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate");
    let pair = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .expect("key");
    let point = pair.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
        "x": b64(&point[1..33]), "y": b64(&point[33..65])});
    Es256 { pair, jwk }
}

impl Es256 {
    fn sign(&self, header: Value, payload: &Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .expect("sign");
        format!("{signed}.{}", b64(sig.as_ref()))
    }

    fn token(&self, payload: Value) -> String {
        let kid = self.jwk["kid"].as_str().unwrap_or("");
        self.sign(json!({"alg": "ES256", "kid": kid}), &payload)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn provider(name: &str, issuer: &str, keys: &[&Value]) -> JwtProvider {
    let jwks = json!({ "keys": keys }).to_string();
    JwtProvider {
        name: name.into(),
        issuer: issuer.into(),
        audiences: vec![],
        forward: false,
        from_headers: vec![],
        from_params: vec![],
        from_cookies: vec![],
        forward_payload_header: None,
        pad_forward_payload_header: false,
        payload_in_metadata: String::new(),
        header_in_metadata: String::new(),
        clock_skew_seconds: 0,
        claim_to_headers: vec![],
        jwks: JwksSource::Local(Arc::new(Jwks::parse(&jwks).expect("jwks"))),
    }
}

fn all_paths() -> RouteMatch {
    RouteMatch {
        path: PathMatch::Prefix("/".into()),
        case_sensitive: true,
        headers: vec![],
        query: vec![],
        grpc: false,
        runtime_fraction_ppm: None,
        tls_presented: None,
        tls_validated: None,
    }
}

fn config(providers: Vec<JwtProvider>, requires: JwtRequirement) -> JwtAuthn {
    let mut providers: Vec<Arc<JwtProvider>> = providers.into_iter().map(Arc::new).collect();
    providers.sort_by(|a, b| a.name.cmp(&b.name));
    JwtAuthn {
        providers,
        rules: vec![JwtRule {
            matcher: all_paths(),
            requires: Some(Arc::new(requires)),
        }],
        requirement_map: vec![],
        bypass_cors_preflight: false,
        strip_failure_response: false,
    }
}

fn factory(c: JwtAuthn) -> JwtAuthnFactory {
    let stats: Arc<dyn StatsScope> = Arc::new(NoStats);
    let callouts: Arc<dyn Callouts> = Arc::new(crate::callout::NoCallouts);
    JwtAuthnFactory::new("jwt".into(), Arc::new(c), &stats, &callouts)
}

fn head(path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::get(path).header("host", "example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

/// Runs the filter; `Ok(cx)` when allowed, else the reply (with the
/// `www-authenticate` its response phase adds).
fn run(
    f: &JwtAuthnFactory,
    view: &RouteView<'_>,
    head: &mut http::request::Parts,
) -> Result<FilterContext, (LocalReply, Option<String>)> {
    let mut inst = f.create(view).expect("instance");
    let mut cx = FilterContext::default();
    match inst.on_request_headers(&mut cx, head) {
        Action::Continue => Ok(cx),
        Action::Respond(r) => {
            let (mut resp, _) = http::Response::new(()).into_parts();
            inst.on_response_headers(&mut cx, &mut resp);
            let www = resp
                .headers
                .get("www-authenticate")
                .map(|v| v.to_str().expect("ascii").to_owned());
            Err((r, www))
        }
        Action::Wait(_) => panic!("jwt_authn never waits"),
    }
}

fn provider_req(i: usize) -> JwtRequirement {
    JwtRequirement::Provider {
        provider: i,
        audiences: None,
    }
}

#[test]
fn parse_statuses_as_jwt_verify_lib() {
    assert_eq!(Jwt::parse("a.b").err(), Some(Status::JwtBadFormat));
    assert_eq!(Jwt::parse("a.b.c.d").err(), Some(Status::JwtBadFormat));
    // Empty sections are skipped, as absl::SkipEmpty.
    assert_eq!(
        Jwt::parse("!..b.c").err(),
        Some(Status::JwtHeaderParseErrorBadBase64)
    );
    assert_eq!(
        Jwt::parse("!!.b.c").err(),
        Some(Status::JwtHeaderParseErrorBadBase64)
    );
    let h = |v: Value| b64(v.to_string().as_bytes());
    assert_eq!(
        Jwt::parse(&format!("{}.e30.c2ln", b64(b"[1]"))).err(),
        Some(Status::JwtHeaderParseErrorBadJson)
    );
    assert_eq!(
        Jwt::parse(&format!("{}.e30.c2ln", h(json!({"alg": 1})))).err(),
        Some(Status::JwtHeaderBadAlg)
    );
    assert_eq!(
        Jwt::parse(&format!("{}.e30.c2ln", h(json!({"alg": "none"})))).err(),
        Some(Status::JwtHeaderNotImplementedAlg)
    );
    assert_eq!(
        Jwt::parse(&format!(
            "{}.e30.c2ln",
            h(json!({"alg": "RS256", "kid": 3}))
        ))
        .err(),
        Some(Status::JwtHeaderBadKid)
    );
    let rs = h(json!({"alg": "RS256"}));
    for (payload, status) in [
        (json!({"iss": 1}), Status::JwtPayloadParseErrorIssNotString),
        (
            json!({"exp": "x"}),
            Status::JwtPayloadParseErrorExpNotInteger,
        ),
        (
            json!({"exp": -1}),
            Status::JwtPayloadParseErrorExpOutOfRange,
        ),
        (
            json!({"nbf": true}),
            Status::JwtPayloadParseErrorNbfNotInteger,
        ),
        (
            json!({"aud": [1]}),
            Status::JwtPayloadParseErrorAudNotString,
        ),
    ] {
        assert_eq!(
            Jwt::parse(&format!("{rs}.{}.c2ln", h(payload))).err(),
            Some(status)
        );
    }
    assert_eq!(
        Jwt::parse(&format!("{rs}.e30.!!")).err(),
        Some(Status::JwtSignatureParseErrorBadBase64)
    );
    let t = format!(
        "{rs}.{}.c2ln",
        h(json!({"iss": "i", "aud": "a", "exp": 10, "nbf": 5}))
    );
    let j = Jwt::parse(&t).expect("parsed");
    assert_eq!(j.audiences, vec!["a".to_owned()]);
    assert_eq!(j.check_time(4, 0), Status::JwtNotYetValid);
    assert_eq!(j.check_time(4, 1), Status::Ok);
    assert_eq!(j.check_time(11, 0), Status::JwtExpired);
    assert_eq!(j.check_time(11, 1), Status::Ok);
}

#[test]
fn valid_token_adds_headers_metadata_and_removes_itself() {
    let k = es256("k1");
    let mut p = provider("p", "https://issuer", &[&k.jwk]);
    p.forward_payload_header = Some(HeaderName::from_static("x-payload"));
    p.claim_to_headers = vec![
        (HeaderName::from_static("x-sub"), "sub".into()),
        (HeaderName::from_static("x-n"), "nested.n".into()),
    ];
    p.payload_in_metadata = "payload".into();
    let f = factory(config(vec![p], provider_req(0)));
    let payload = json!({"iss": "https://issuer", "sub": "alice", "nested": {"n": 7},
        "exp": now() + 600});
    let token = k.token(payload.clone());
    let mut h = head(
        "/x",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-sub", "forged"),
        ],
    );
    let cx = run(&f, &RouteView::empty(), &mut h).expect("allowed");
    assert!(h.headers.get("authorization").is_none(), "forward: false");
    assert_eq!(h.headers.get_all("x-sub").iter().count(), 1);
    assert_eq!(h.headers["x-sub"], "alice");
    assert_eq!(h.headers["x-n"], "7");
    let seg = token.split('.').nth(1).expect("payload");
    assert_eq!(h.headers["x-payload"], seg);
    assert_eq!(
        cx.metadata.value(METADATA_NAMESPACE, &["payload", "sub"]),
        Some(&json!("alice"))
    );
}

#[test]
fn failures_answer_as_envoy() {
    let k = es256("k1");
    let other = es256("k1");
    let mut p = provider("p", "iss", &[&k.jwk]);
    p.audiences = vec!["api".into()];
    let f = factory(config(vec![p], provider_req(0)));
    let call = |token: Option<String>| {
        let mut headers = vec![("x-forwarded-proto".to_owned(), "http".to_owned())];
        if let Some(t) = token {
            headers.push(("authorization".into(), format!("Bearer {t}")));
        }
        let hs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        run(&f, &RouteView::empty(), &mut head("/p?q=1", &hs)).err()
    };
    let (r, www) = call(None).expect("missing");
    assert_eq!(r.status, 401);
    assert_eq!(r.body, "Jwt is missing");
    assert_eq!(r.details, "jwt_authn_access_denied{Jwt_is_missing}");
    assert_eq!(
        www.as_deref(),
        Some("Bearer realm=\"http://example.com/p?q=1\"")
    );
    let good = json!({"iss": "iss", "aud": "api"});
    let cases = [
        (
            k.token(merge(&good, json!({"exp": now() - 120}))),
            401,
            "Jwt is expired",
        ),
        (
            k.token(merge(&good, json!({"nbf": now() + 120}))),
            401,
            "Jwt not yet valid",
        ),
        (
            k.token(merge(&good, json!({"iss": "other"}))),
            401,
            "Jwt issuer is not configured",
        ),
        (
            k.token(merge(&good, json!({"aud": ["x", "y"]}))),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (other.token(good.clone()), 401, "Jwt verification fails"),
        (
            other.sign(json!({"alg": "ES256", "kid": "nope"}), &good),
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "not-a-jwt".into(),
            401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ];
    for (token, code, body) in cases {
        let (r, www) = call(Some(token)).expect(body);
        assert_eq!((r.status.as_u16(), &r.body[..]), (code, body.as_bytes()));
        assert_eq!(
            www.as_deref(),
            Some("Bearer realm=\"http://example.com/p?q=1\", error=\"invalid_token\"")
        );
    }
    // Within the default 60 s of clock skew.
    assert!(call(Some(k.token(merge(&good, json!({"exp": now() - 30}))))).is_none());
    // The audience check ignores the scheme and a trailing slash.
    assert!(call(Some(k.token(merge(&good, json!({"aud": "https://api/"}))))).is_none());
}

fn merge(a: &Value, b: Value) -> Value {
    let mut a = a.clone();
    if let (Some(o), Value::Object(b)) = (a.as_object_mut(), b) {
        o.extend(b);
    }
    a
}

#[test]
fn extraction_locations() {
    let k = es256("k1");
    let good = k.token(json!({"iss": "iss"}));
    // Defaults: Authorization Bearer, then access_token.
    let f = factory(config(
        vec![provider("p", "iss", &[&k.jwk])],
        provider_req(0),
    ));
    let mut h = head(&format!("/a?x=1&access_token={good}&y=2"), &[]);
    assert!(run(&f, &RouteView::empty(), &mut h).is_ok());
    assert_eq!(
        h.uri.path_and_query().map(|p| p.as_str()),
        Some("/a?x=1&y=2")
    );
    // A custom header with a prefix found anywhere in the value; the
    // Authorization header is not looked at then.
    let mut p = provider("p", "iss", &[&k.jwk]);
    p.from_headers = vec![(HeaderName::from_static("x-jwt"), "Tok ".into())];
    p.forward = true;
    let f = factory(config(vec![p], provider_req(0)));
    let mut h = head("/", &[("x-jwt", &format!("a=b, Tok {good}"))]);
    assert!(run(&f, &RouteView::empty(), &mut h).is_ok());
    assert!(h.headers.get("x-jwt").is_some(), "forward: true keeps it");
    let mut h = head("/", &[("authorization", &format!("Bearer {good}"))]);
    assert_eq!(
        run(&f, &RouteView::empty(), &mut h).err().map(|e| e.0.body),
        Some(Bytes::from_static(b"Jwt is missing"))
    );
    // Cookies and params.
    let mut p = provider("p", "iss", &[&k.jwk]);
    p.from_cookies = vec!["session".into()];
    p.from_params = vec!["t".into()];
    let f = factory(config(vec![p], provider_req(0)));
    let mut h = head("/", &[("cookie", &format!("a=1; session={good}"))]);
    assert!(run(&f, &RouteView::empty(), &mut h).is_ok());
    let mut h = head(&format!("/?t={good}"), &[]);
    assert!(run(&f, &RouteView::empty(), &mut h).is_ok());
    assert_eq!(h.uri.path_and_query().map(|p| p.as_str()), Some("/"));
    // Every token found must be good.
    let mut h = head(&format!("/?t={good}"), &[("cookie", "session=bad.bad.bad")]);
    assert!(run(&f, &RouteView::empty(), &mut h).is_err());
}

#[test]
fn requirements_any_all_and_allow() {
    let a = es256("a");
    let b = es256("b");
    let pa = provider("a", "issuer-a", &[&a.jwk]);
    let mut pb = provider("b", "issuer-b", &[&b.jwk]);
    pb.from_headers = vec![(HeaderName::from_static("x-b"), String::new())];
    let ta = a.token(json!({"iss": "issuer-a"}));
    let tb = b.token(json!({"iss": "issuer-b"}));
    let expired = a.token(json!({"iss": "issuer-a", "exp": 1}));
    let any = JwtRequirement::Any {
        requirements: vec![provider_req(0), provider_req(1)],
        allow_missing: false,
        allow_missing_or_failed: false,
    };
    let all = JwtRequirement::All(vec![provider_req(0), provider_req(1)]);
    let bearer = |t: &str| format!("Bearer {t}");
    type Case<'a> = (&'a [(&'a str, String)], Option<&'a str>);
    let check = |req: JwtRequirement, cases: &[Case<'_>]| {
        let f = factory(config(vec![pa.clone(), pb.clone()], req));
        for (headers, want) in cases {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = run(&f, &RouteView::empty(), &mut head("/", &hs))
                .err()
                .map(|e| String::from_utf8_lossy(&e.0.body).into_owned());
            assert_eq!(got.as_deref(), *want, "{headers:?}");
        }
    };
    check(
        any,
        &[
            (&[("authorization", bearer(&ta))], None),
            (&[("x-b", tb.clone())], None),
            (&[], Some("Jwt is missing")),
            // A real error wins over a missing token.
            (
                &[("authorization", bearer(&expired))],
                Some("Jwt is expired"),
            ),
        ],
    );
    check(
        all,
        &[
            (&[("authorization", bearer(&ta)), ("x-b", tb.clone())], None),
            (&[("authorization", bearer(&ta))], Some("Jwt is missing")),
        ],
    );
    check(
        JwtRequirement::AllowMissing,
        &[
            (&[], None),
            (&[("x-b", tb.clone())], None),
            (
                &[("authorization", bearer(&expired))],
                Some("Jwt is expired"),
            ),
        ],
    );
    check(
        JwtRequirement::AllowMissingOrFailed,
        &[(&[], None), (&[("authorization", bearer(&expired))], None)],
    );
    check(
        JwtRequirement::Any {
            requirements: vec![provider_req(0)],
            allow_missing: true,
            allow_missing_or_failed: false,
        },
        &[
            (&[], None),
            (
                &[("authorization", bearer(&expired))],
                Some("Jwt is expired"),
            ),
        ],
    );
}

#[test]
fn per_route_requirement_name_and_cors_bypass() {
    let k = es256("k");
    let mut c = config(vec![provider("p", "iss", &[&k.jwk])], provider_req(0));
    c.requirement_map = vec![("open".into(), Arc::new(JwtRequirement::AllowMissing))];
    c.bypass_cors_preflight = true;
    let f = factory(c);
    let per = |o: JwtPerRoute| {
        PerFilterConfigs(vec![(
            "jwt".into(),
            PerFilterConfig {
                disabled: None,
                config: Some(FilterOverride::JwtAuthn(o)),
            },
        )])
    };
    let empty = PerFilterConfigs::default();
    let open = per(JwtPerRoute::RequirementName("open".into()));
    let view = |p| RouteView {
        per_filter: [p, &empty, &empty],
        cluster: None,
        request: None,
        rate_limits: None,
    };
    assert!(run(&f, &view(&open), &mut head("/", &[])).is_ok());
    assert!(run(&f, &RouteView::empty(), &mut head("/", &[])).is_err());
    let off = per(JwtPerRoute::Disabled);
    assert!(run(&f, &view(&off), &mut head("/", &[])).is_ok());
    let wrong = per(JwtPerRoute::RequirementName("nope".into()));
    let (r, www) = run(&f, &view(&wrong), &mut head("/", &[])).expect_err("403");
    assert_eq!(r.status, 403);
    assert_eq!(
        r.body,
        "Failed JWT authentication: Wrong requirement_name: nope. It should be one of [open]"
    );
    assert_eq!(
        r.details,
        "jwt_authn_access_denied{Wrong_requirement_name:_nope._It_should_be_one_of_[open]}"
    );
    assert_eq!(www, None);
    // A CORS preflight passes without a token.
    let mut h = http::Request::builder()
        .method("OPTIONS")
        .uri("/")
        .header("origin", "https://a")
        .header("access-control-request-method", "GET")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    assert!(run(&f, &RouteView::empty(), &mut h).is_ok());
}

#[test]
fn eddsa_and_claim_rendering() {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("generate");
    let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())});
    let mut p = provider("p", "", &[&jwk]);
    p.claim_to_headers = vec![
        (HeaderName::from_static("x-f"), "f".into()),
        (HeaderName::from_static("x-b"), "b".into()),
        (HeaderName::from_static("x-l"), "l".into()),
    ];
    let f = factory(config(vec![p], provider_req(0)));
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"EdDSA"}"#),
        b64(json!({"iss": "any", "f": 1.5, "b": true, "l": [1]})
            .to_string()
            .as_bytes())
    );
    let token = format!("{signed}.{}", b64(pair.sign(signed.as_bytes()).as_ref()));
    let mut h = head("/", &[("authorization", &format!("Bearer {token}"))]);
    assert!(run(&f, &RouteView::empty(), &mut h).is_ok());
    assert_eq!(h.headers["x-f"], "1.500000");
    assert_eq!(h.headers["x-b"], "true");
    assert!(h.headers.get("x-l").is_none());
    // A short EdDSA signature.
    let short = format!("{signed}.{}", b64(b"short"));
    let mut h = head("/", &[("authorization", &format!("Bearer {short}"))]);
    assert_eq!(
        run(&f, &RouteView::empty(), &mut h).err().map(|e| e.0.body),
        Some(Bytes::from_static(b"Jwt ED25519 signature is wrong length"))
    );
}
