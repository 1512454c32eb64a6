use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Mutex;

use xds_client::config::{
    FaultConfig, Fraction, Pattern, PerFilterConfig, PerFilterConfigs, StringMatch, StringMatcher,
};

use super::*;
use crate::http::Gauge;

const NAME: &str = "envoy.filters.http.cors";

/// Counters by name, created on demand.
#[derive(Debug, Default)]
struct Recorder(Mutex<BTreeMap<String, Arc<Cell>>>);

#[derive(Debug, Default)]
struct Cell(AtomicI64);

impl Counter for Cell {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
}
impl Gauge for Cell {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    fn value(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

impl Recorder {
    fn cell(&self, name: &str) -> Arc<Cell> {
        let mut m = self.0.lock().expect("lock");
        m.entry(name.to_owned()).or_default().clone()
    }
    fn get(&self, name: &str) -> Option<i64> {
        let m = self.0.lock().expect("lock");
        m.get(name).map(|c| c.0.load(Relaxed))
    }
}

#[derive(Debug)]
struct Scope(Arc<Recorder>);

impl StatsScope for Scope {
    fn counter(&self, name: &str) -> Arc<dyn Counter> {
        self.0.cell(name)
    }
    fn gauge(&self, name: &str) -> Arc<dyn Gauge> {
        self.0.cell(name)
    }
}

fn factory() -> (CorsFactory, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = Arc::new(Scope(rec.clone()));
    (CorsFactory::new(NAME.into(), &scope), rec)
}

fn exact(s: &str) -> StringMatcher {
    StringMatcher::exact(s)
}

fn value(s: &'static str) -> Option<HeaderValue> {
    Some(HeaderValue::from_static(s))
}

fn policy(origins: Vec<StringMatcher>) -> CorsPolicy {
    CorsPolicy {
        allow_origins: origins,
        ..Default::default()
    }
}

fn level(key: &str, p: CorsPolicy) -> PerFilterConfigs {
    PerFilterConfigs(vec![(
        key.into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Cors(Arc::new(p))),
        },
    )])
}

fn view<'a>(levels: [&'a PerFilterConfigs; 3]) -> RouteView<'a> {
    RouteView {
        per_filter: levels,
        cluster: Some("a"),
        request: None,
        rate_limits: None,
    }
}

fn request(method: &str, kv: &[(&'static str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri("/x");
    for (k, v) in kv {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn response() -> http::response::Parts {
    http::Response::builder()
        .header("access-control-allow-origin", "upstream")
        .body(())
        .expect("response")
        .into_parts()
        .0
}

/// Runs both phases; returns the request's action and the response (the
/// local reply's when the filter answered).
fn exchange(
    f: &mut Box<dyn HttpFilter>,
    method: &str,
    kv: &[(&'static str, &str)],
) -> (Option<LocalReply>, http::response::Parts) {
    let mut cx = FilterContext::default();
    let mut req = request(method, kv);
    let lr = match f.on_request_headers(&mut cx, &mut req) {
        Action::Continue => None,
        Action::Respond(r) => Some(r),
        Action::Wait(_) => panic!("the CORS filter never waits"),
    };
    let mut resp = if lr.is_some() {
        http::Response::new(()).into_parts().0
    } else {
        response()
    };
    assert!(matches!(
        f.on_response_headers(&mut cx, &mut resp),
        Action::Continue
    ));
    (lr, resp)
}

fn hdr<'a>(p: &'a http::response::Parts, name: &str) -> Option<&'a str> {
    p.headers.get(name).and_then(|v| v.to_str().ok())
}

const PREFLIGHT: &[(&str, &str)] = &[
    ("origin", "https://a.example"),
    ("access-control-request-method", "PUT"),
    ("access-control-request-headers", "x-a, x-b"),
];

#[test]
fn no_policy_no_instance() {
    let (f, _) = factory();
    assert!(f.create(&RouteView::empty()).is_none());
    // Another filter's config under the CORS filter's name is not a policy.
    let other = PerFilterConfigs(vec![(
        NAME.into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Fault(Arc::new(FaultConfig::default()))),
        },
    )]);
    let empty = PerFilterConfigs::default();
    assert!(f.create(&view([&other, &empty, &empty])).is_none());
    // Direct responses and redirects (no cluster) have no route entry.
    let p = level(NAME, policy(vec![exact("*")]));
    assert!(f
        .create(&RouteView {
            per_filter: [&p, &empty, &empty],
            cluster: None,
            request: None,
            rate_limits: None,
        })
        .is_none());
}

#[test]
fn preflight_allowed() {
    let (f, rec) = factory();
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://a.example")],
            allow_methods: value("GET, PUT"),
            allow_headers: value("x-a"),
            expose_headers: value("x-e"),
            max_age: value("600"),
            allow_credentials: Some(true),
            ..Default::default()
        },
    );
    let empty = PerFilterConfigs::default();
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    let lr = lr.expect("preflight answered");
    assert_eq!(lr.status, 200);
    assert!(lr.body.is_empty());
    assert_eq!(lr.details, CORS_RESPONSE);
    assert_eq!(
        hdr(&resp, "access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(hdr(&resp, "access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(hdr(&resp, "access-control-allow-headers"), Some("x-a"));
    assert_eq!(hdr(&resp, "access-control-max-age"), Some("600"));
    assert_eq!(hdr(&resp, "access-control-allow-credentials"), Some("true"));
    // The filter's response phase sees its own answer, as Envoy's.
    assert_eq!(hdr(&resp, "access-control-expose-headers"), Some("x-e"));
    assert_eq!(hdr(&resp, "access-control-allow-private-network"), None);
    assert_eq!(rec.get("cors.origin_valid"), Some(1));
    assert_eq!(rec.get("cors.origin_invalid"), Some(0));
}

#[test]
fn preflight_wildcards_echo_the_request() {
    let (f, _) = factory();
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("*")],
            allow_methods: value("*"),
            allow_headers: value("*"),
            allow_private_network_access: Some(true),
            ..Default::default()
        },
    );
    let empty = PerFilterConfigs::default();
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let mut kv = PREFLIGHT.to_vec();
    kv.push(("access-control-request-private-network", "true"));
    let (lr, resp) = exchange(&mut i, "OPTIONS", &kv);
    assert!(lr.is_some());
    // A matcher that matches `*` allows every origin.
    assert_eq!(
        hdr(&resp, "access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(hdr(&resp, "access-control-allow-methods"), Some("PUT"));
    assert_eq!(hdr(&resp, "access-control-allow-headers"), Some("x-a, x-b"));
    assert_eq!(
        hdr(&resp, "access-control-allow-private-network"),
        Some("true")
    );
    assert_eq!(hdr(&resp, "access-control-allow-credentials"), None);
}

#[test]
fn preflight_with_disallowed_origin() {
    let (f, rec) = factory();
    let empty = PerFilterConfigs::default();
    // Default: forwarded, response untouched.
    let p = level(NAME, policy(vec![exact("https://b.example")]));
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_none());
    assert_eq!(hdr(&resp, "access-control-allow-origin"), Some("upstream"));
    assert_eq!(rec.get("cors.origin_invalid"), Some(1));
    // Not forwarded: answered without allow-origin.
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://b.example")],
            allow_methods: value("GET"),
            forward_not_matching_preflights: Some(false),
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_some());
    assert_eq!(hdr(&resp, "access-control-allow-origin"), None);
    assert_eq!(hdr(&resp, "access-control-allow-methods"), Some("GET"));
    assert_eq!(rec.get("cors.origin_invalid"), Some(2));
}

#[test]
fn actual_requests() {
    let (f, rec) = factory();
    let empty = PerFilterConfigs::default();
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![StringMatcher {
                kind: StringMatch::Regex(Pattern::full(r"https://.*\.example").expect("re")),
                ignore_case: false,
            }],
            expose_headers: value("x-e"),
            allow_credentials: Some(true),
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "GET", &[("origin", "https://a.example")]);
    assert!(lr.is_none());
    assert_eq!(
        hdr(&resp, "access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(hdr(&resp, "access-control-allow-credentials"), Some("true"));
    assert_eq!(hdr(&resp, "access-control-expose-headers"), Some("x-e"));
    // Not matching: the upstream's headers stay.
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (_, resp) = exchange(&mut i, "GET", &[("origin", "http://a.example")]);
    assert_eq!(hdr(&resp, "access-control-allow-origin"), Some("upstream"));
    assert_eq!(hdr(&resp, "access-control-expose-headers"), None);
    // No origin, or an OPTIONS without a requested method: not counted.
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "GET", &[]);
    assert!(lr.is_none());
    assert_eq!(hdr(&resp, "access-control-allow-origin"), Some("upstream"));
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", &[("origin", "https://a.example")]);
    assert!(lr.is_none(), "not a preflight");
    assert_eq!(
        hdr(&resp, "access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(rec.get("cors.origin_valid"), Some(2));
    assert_eq!(rec.get("cors.origin_invalid"), Some(1));
}

#[test]
fn fields_resolve_most_specific_first() {
    let (f, _) = factory();
    let route = level(
        NAME,
        CorsPolicy {
            allow_methods: value("PUT"),
            ..Default::default()
        },
    );
    let vhost = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://a.example")],
            allow_methods: value("GET"),
            max_age: value("5"),
            ..Default::default()
        },
    );
    let rc = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://other")],
            max_age: value("9"),
            allow_credentials: Some(true),
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&route, &vhost, &rc])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_some());
    assert_eq!(
        hdr(&resp, "access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(hdr(&resp, "access-control-allow-methods"), Some("PUT"));
    assert_eq!(hdr(&resp, "access-control-max-age"), Some("5"));
    assert_eq!(hdr(&resp, "access-control-allow-credentials"), Some("true"));
}

#[test]
fn legacy_policies_only_without_per_filter_ones() {
    let (f, _) = factory();
    let empty = PerFilterConfigs::default();
    let legacy_route = level(LEGACY_CORS_KEY, policy(vec![exact("https://a.example")]));
    let legacy_vhost = level(
        LEGACY_CORS_KEY,
        CorsPolicy {
            allow_methods: value("GET"),
            ..Default::default()
        },
    );
    let mut i = f
        .create(&view([&legacy_route, &legacy_vhost, &empty]))
        .expect("legacy");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_some());
    assert_eq!(hdr(&resp, "access-control-allow-methods"), Some("GET"));
    // A typed_per_filter_config policy anywhere hides the legacy ones.
    let rc = level(NAME, policy(vec![exact("https://b.example")]));
    let mut i = f
        .create(&view([&legacy_route, &legacy_vhost, &rc]))
        .expect("per-filter");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_none(), "origin not allowed by the per-filter policy");
    assert_eq!(hdr(&resp, "access-control-allow-origin"), Some("upstream"));
    // The route configuration has no legacy field.
    assert!(f.create(&view([&empty, &empty, &legacy_route])).is_none());
}

#[test]
fn filter_enabled_and_shadow() {
    let (f, rec) = factory();
    let empty = PerFilterConfigs::default();
    let off = Some(Fraction {
        numerator: 0,
        denominator: 100,
    });
    let on = Some(Fraction {
        numerator: 100,
        denominator: 100,
    });
    // Disabled: nothing happens, nothing is counted.
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://a.example")],
            filter_enabled: off,
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_none());
    assert_eq!(hdr(&resp, "access-control-allow-origin"), Some("upstream"));
    assert_eq!(rec.get("cors.origin_valid"), Some(0));
    // Shadow: counted, not enforced.
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://a.example")],
            filter_enabled: off,
            shadow_enabled: on,
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    let (lr, resp) = exchange(&mut i, "OPTIONS", PREFLIGHT);
    assert!(lr.is_none());
    assert_eq!(hdr(&resp, "access-control-allow-origin"), Some("upstream"));
    assert_eq!(rec.get("cors.origin_valid"), Some(1));
    // Enabled and shadow: enforced.
    let p = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://a.example")],
            shadow_enabled: on,
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&p, &empty, &empty])).expect("instance");
    assert!(exchange(&mut i, "OPTIONS", PREFLIGHT).0.is_some());
    // Only the most specific policy's switch counts.
    let route = level(
        NAME,
        CorsPolicy {
            filter_enabled: off,
            ..Default::default()
        },
    );
    let vhost = level(
        NAME,
        CorsPolicy {
            allow_origins: vec![exact("https://a.example")],
            filter_enabled: on,
            ..Default::default()
        },
    );
    let mut i = f.create(&view([&route, &vhost, &empty])).expect("instance");
    assert!(exchange(&mut i, "OPTIONS", PREFLIGHT).0.is_none());
}

#[test]
fn repeated_request_headers_are_joined() {
    let mut h = HeaderMap::new();
    h.append("origin", HeaderValue::from_static("a"));
    h.append("origin", HeaderValue::from_static("b"));
    assert_eq!(inline_value(&h, "origin"), "a,b");
    assert_eq!(inline_value(&h, "absent"), "");
}
