//! `envoy.filters.http.cors` scenarios: real sockets, a real echo upstream.
//! Every test runs against weir in-process by default and against real
//! Envoy with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked.
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use weir_tests::config::{yaml_cluster, yaml_file_log, HttpYaml};
use weir_tests::scenario::{Http, Ports, Proxy, Resp};
use weir_tests::tmp::TempFile;
use weir_tests::upstream::{self, EchoServer};

const POLICY: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%";

/// A bootstrap: listener `l` with the CORS filter (then, optionally, the
/// fault filter) and the router, an access log, cluster `a` (the echo
/// upstream).
#[derive(Clone)]
struct Cfg {
    /// Routes of the one virtual host (list items at indent 14).
    routes: String,
    /// Extra virtual host fields (indent 14).
    vhost_extra: String,
    /// Extra route configuration fields (indent 12).
    rc_extra: String,
    /// The fault filter's HTTPFault body, after the CORS filter (empty: none).
    fault: String,
    /// Shared by the clone the bootstrap closure renders.
    log: Arc<TempFile>,
    port: u16,
}

impl Cfg {
    fn new(routes: &str, up: &EchoServer, log: &str) -> Cfg {
        Cfg {
            routes: routes.to_owned(),
            vhost_extra: String::new(),
            rc_extra: String::new(),
            fault: String::new(),
            log: Arc::new(log_path(log)),
            port: up.port(),
        }
    }

    fn render(&self, p: &Ports) -> String {
        let Cfg {
            routes,
            vhost_extra,
            rc_extra,
            fault,
            log,
            port,
        } = self;
        let fault = if fault.is_empty() {
            String::new()
        } else {
            format!(
                "          - name: envoy.filters.http.fault\n            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, {fault}}}\n"
            )
        };
        HttpYaml {
            hcm: &yaml_file_log(log, LOG_FORMAT, 10),
            rc: rc_extra,
            vhost: vhost_extra,
            routes,
            filters: &format!(
                "          - name: envoy.filters.http.cors\n            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}\n{fault}"
            ),
            clusters: &yaml_cluster("a", &[*port], ""),
            ..HttpYaml::default()
        }
        .render(p)
    }

    fn start(&self) -> Proxy {
        let c = self.clone();
        Proxy::start(move |p| c.render(p))
    }
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> TempFile {
    weir_tests::config::log_path("cors", name)
}

/// One route `prefix -> a` with extra route fields (indent 16).
fn route(prefix: &str, extra: &str) -> String {
    format!("              - match: {{prefix: \"{prefix}\"}}\n                route: {{cluster: a}}\n{extra}")
}

/// `typed_per_filter_config` with a CORS policy (its body, without
/// `@type`) at `indent`.
fn policy(indent: usize, body: &str) -> String {
    let pad = " ".repeat(indent);
    format!("{pad}typed_per_filter_config:\n{pad}  envoy.filters.http.cors: {{\"@type\": {POLICY}, {body}}}\n")
}

async fn echo() -> EchoServer {
    upstream::http1("a").await.expect("echo upstream")
}

async fn lines(p: &Proxy, log: &Path, n: usize) -> Vec<String> {
    p.log_lines(log, n).await
}

const ORIGIN: &str = "https://app.example";

/// A preflight from `origin` asking for PUT with two headers.
async fn preflight(p: &Proxy, path: &str, origin: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![
        ("origin", origin),
        ("access-control-request-method", "PUT"),
        ("access-control-request-headers", "x-a,x-b"),
    ];
    h.extend_from_slice(extra);
    Http::h1()
        .send("OPTIONS", &format!("{}{path}", p.base()), &h, Bytes::new())
        .await
}

/// Whether the echo upstream answered.
fn upstream_answered(r: &Resp) -> bool {
    r.header("x-echo-seen").is_some()
}

const CORS_HEADERS: &[&str] = &[
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
    "access-control-expose-headers",
    "access-control-allow-private-network",
];

/// The CORS headers of a response, sorted, as `name: value`.
fn cors_headers(r: &Resp) -> Vec<String> {
    let mut v: Vec<String> = CORS_HEADERS
        .iter()
        .flat_map(|n| {
            r.header_all(n)
                .into_iter()
                .map(move |v| format!("{n}: {v}"))
        })
        .collect();
    v.sort();
    v
}

const FULL: &str = r#"allow_origin_string_match: [{exact: "https://app.example"}], allow_methods: "GET, PUT", allow_headers: "x-a", expose_headers: "x-e1, x-e2", max_age: "600", allow_credentials: true"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_allowed_is_answered() {
    let up = echo().await;
    let c = Cfg::new(&route("/", &policy(16, FULL)), &up, "preflight");
    let p = c.start();
    let r = preflight(&p, "/x", ORIGIN, &[]).await;
    assert_eq!(r.status, 200);
    assert!(!upstream_answered(&r));
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("0"));
    assert_eq!(r.header("content-type"), None);
    // The filter's response phase sees its own answer: expose-headers too.
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: x-a",
            "access-control-allow-methods: GET, PUT",
            "access-control-allow-origin: https://app.example",
            "access-control-expose-headers: x-e1, x-e2",
            "access-control-max-age: 600",
        ]
    );
    // HTTP/2 too.
    let r = Http::h2c()
        .send(
            "OPTIONS",
            &format!("{}/h2", p.base()),
            &[("origin", ORIGIN), ("access-control-request-method", "GET")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(!upstream_answered(&r));
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(
        lines(&p, &c.log, 2).await,
        ["200 /x - cors_response", "200 /h2 - cors_response"]
    );
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(2));
    assert_eq!(p.stat("http.ingress.cors.origin_invalid").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_wildcards_and_private_network() {
    let up = echo().await;
    let c = Cfg::new(
        &route(
            "/",
            &policy(
                16,
                r#"allow_origin_string_match: [{exact: "*"}], allow_methods: "*", allow_headers: "*", allow_private_network_access: true"#,
            ),
        ),
        &up,
        "wildcards",
    );
    let p = c.start();
    let r = preflight(
        &p,
        "/x",
        "https://any.example",
        &[("access-control-request-private-network", "true")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!upstream_answered(&r));
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-headers: x-a,x-b",
            "access-control-allow-methods: PUT",
            "access-control-allow-origin: https://any.example",
            "access-control-allow-private-network: true",
        ]
    );
    // Without the private-network request header: no answer to it.
    let r = preflight(&p, "/x", "https://any.example", &[]).await;
    assert_eq!(r.header("access-control-allow-private-network"), None);
    // `*` with no requested headers echoes an empty value.
    let r = Http::h1()
        .send(
            "OPTIONS",
            &format!("{}/x", p.base()),
            &[("origin", ORIGIN), ("access-control-request-method", "GET")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-headers: ",
            "access-control-allow-methods: GET",
            "access-control-allow-origin: https://app.example",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_from_other_origin() {
    let up = echo().await;
    let routes = format!(
        "{}{}",
        route(
            "/strict",
            &policy(
                16,
                &format!("{FULL}, forward_not_matching_preflights: false")
            )
        ),
        route("/", &policy(16, FULL)),
    );
    let c = Cfg::new(&routes, &up, "other");
    let p = c.start();
    // Default: forwarded to the upstream, the response left alone.
    let r = preflight(&p, "/x", "https://evil.example", &[]).await;
    assert_eq!(r.status, 200);
    assert!(upstream_answered(&r));
    assert_eq!(r.echo().method, "OPTIONS");
    assert!(cors_headers(&r).is_empty(), "{:?}", cors_headers(&r));
    // Not forwarded: answered without allow-origin (nor expose-headers).
    let r = preflight(&p, "/strict", "https://evil.example", &[]).await;
    assert_eq!(r.status, 200);
    assert!(!upstream_answered(&r));
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: x-a",
            "access-control-allow-methods: GET, PUT",
            "access-control-max-age: 600",
        ]
    );
    assert_eq!(
        lines(&p, &c.log, 2).await,
        ["200 /x - via_upstream", "200 /strict - cors_response"]
    );
    assert_eq!(p.stat("http.ingress.cors.origin_invalid").await, Some(2));
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actual_requests_get_headers() {
    let up = echo().await;
    let c = Cfg::new(&route("/", &policy(16, FULL)), &up, "actual");
    let p = c.start();
    let h1 = Http::h1();
    let url = format!("{}/x", p.base());
    // The upstream's own CORS headers are replaced.
    let r = h1
        .get(
            &url,
            &[
                ("origin", ORIGIN),
                ("x-echo-header-access-control-allow-origin", "upstream"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(upstream_answered(&r));
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-origin: https://app.example",
            "access-control-expose-headers: x-e1, x-e2",
        ]
    );
    // Another origin: left alone.
    let r = h1
        .get(
            &url,
            &[
                ("origin", "https://evil.example"),
                ("x-echo-header-access-control-allow-origin", "upstream"),
            ],
        )
        .await;
    assert_eq!(cors_headers(&r), ["access-control-allow-origin: upstream"]);
    // No origin: not a CORS request, not counted.
    let r = h1.get(&url, &[]).await;
    assert!(cors_headers(&r).is_empty());
    // OPTIONS without a requested method is an actual request.
    let r = h1
        .send("OPTIONS", &url, &[("origin", ORIGIN)], Bytes::new())
        .await;
    assert!(upstream_answered(&r));
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    // An upstream error status gets the headers too.
    let r = h1
        .get(&url, &[("origin", ORIGIN), ("x-echo-status", "500")])
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(3));
    assert_eq!(p.stat("http.ingress.cors.origin_invalid").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_vhost_and_route_configuration_policies() {
    let up = echo().await;
    let routes = format!(
        "{}{}",
        // Only methods on the route: origins and the rest from the vhost.
        route("/route", &policy(16, r#"allow_methods: "PATCH""#)),
        route("/", ""),
    );
    let mut c = Cfg::new(&routes, &up, "levels");
    c.vhost_extra = policy(
        14,
        r#"allow_origin_string_match: [{exact: "https://app.example"}], allow_methods: "GET", max_age: "5""#,
    );
    c.rc_extra = policy(
        12,
        r#"allow_origin_string_match: [{exact: "https://rc.example"}], max_age: "9", allow_credentials: true"#,
    );
    let p = c.start();
    let r = preflight(&p, "/route", ORIGIN, &[]).await;
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-methods: PATCH",
            "access-control-allow-origin: https://app.example",
            "access-control-max-age: 5",
        ]
    );
    let r = preflight(&p, "/other", ORIGIN, &[]).await;
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-methods: GET",
            "access-control-allow-origin: https://app.example",
            "access-control-max-age: 5",
        ]
    );
    // The route configuration's origins are hidden by the vhost's.
    let r = preflight(&p, "/other", "https://rc.example", &[]).await;
    assert!(upstream_answered(&r));
    assert!(cors_headers(&r).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_per_route_and_direct_responses() {
    let up = echo().await;
    let routes = format!(
        "{}{}{}",
        route(
            "/off",
            "                typed_per_filter_config:\n                  envoy.filters.http.cors: {\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true}\n"
        ),
        "              - match: {prefix: \"/direct\"}\n                direct_response: {status: 204}\n",
        route(
            "/wrapped",
            &format!("                typed_per_filter_config:\n                  envoy.filters.http.cors: {{\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {{\"@type\": {POLICY}, allow_methods: \"DELETE\"}}}}\n")
        ),
    );
    let mut c = Cfg::new(&format!("{routes}{}", route("/", "")), &up, "disabled");
    c.vhost_extra = policy(14, FULL);
    let p = c.start();
    let r = preflight(&p, "/off", ORIGIN, &[]).await;
    assert!(upstream_answered(&r));
    assert!(cors_headers(&r).is_empty());
    // Direct responses have no route entry: the filter does nothing.
    let r = preflight(&p, "/direct", ORIGIN, &[]).await;
    assert_eq!(r.status, 204);
    assert!(cors_headers(&r).is_empty());
    let r = preflight(&p, "/wrapped", ORIGIN, &[]).await;
    assert!(!upstream_answered(&r));
    assert_eq!(r.header("access-control-allow-methods"), Some("DELETE"));
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_enabled_off_and_shadow() {
    let up = echo().await;
    let routes = format!(
        "{}{}{}",
        route(
            "/off",
            &policy(
                16,
                &format!("{FULL}, filter_enabled: {{default_value: {{numerator: 0}}, runtime_key: cors.off}}")
            )
        ),
        route(
            "/shadow",
            &policy(
                16,
                &format!("{FULL}, filter_enabled: {{default_value: {{numerator: 0}}}}, shadow_enabled: {{default_value: {{numerator: 100}}, runtime_key: cors.shadow}}")
            )
        ),
        route(
            "/both",
            &policy(
                16,
                &format!("{FULL}, shadow_enabled: {{default_value: {{numerator: 100}}}}")
            )
        ),
    );
    let c = Cfg::new(&routes, &up, "shadow");
    let p = c.start();
    // Off: nothing happens, nothing is counted.
    let r = preflight(&p, "/off", ORIGIN, &[]).await;
    assert!(upstream_answered(&r));
    assert!(cors_headers(&r).is_empty());
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(0));
    // Shadow: origins are counted, nothing is enforced.
    let r = preflight(&p, "/shadow", ORIGIN, &[]).await;
    assert!(upstream_answered(&r));
    assert!(cors_headers(&r).is_empty());
    let r = Http::h1()
        .get(
            &format!("{}/shadow", p.base()),
            &[("origin", "https://evil.example")],
        )
        .await;
    assert!(cors_headers(&r).is_empty());
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(1));
    assert_eq!(p.stat("http.ingress.cors.origin_invalid").await, Some(1));
    // Enabled and shadow: enforced.
    let r = preflight(&p, "/both", ORIGIN, &[]).await;
    assert!(!upstream_answered(&r));
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_matchers() {
    let up = echo().await;
    let c = Cfg::new(
        &route(
            "/",
            &policy(
                16,
                r#"allow_origin_string_match: [{safe_regex: {regex: "https://[a-z]+\\.regex\\.example"}}, {suffix: ".Suffix.Example", ignore_case: true}, {prefix: "http://prefix"}, {contains: "contains"}]"#,
            ),
        ),
        &up,
        "matchers",
    );
    let p = c.start();
    let h1 = Http::h1();
    let url = format!("{}/x", p.base());
    for (origin, allowed) in [
        ("https://abc.regex.example", true),
        ("https://abc.regex.example.evil", false),
        ("https://ABC.regex.example", false),
        ("https://x.suffix.example", true),
        ("http://prefix.example", true),
        ("https://prefix.example", false),
        ("null-contains-x", true),
        ("https://other.example", false),
    ] {
        let r = h1.get(&url, &[("origin", origin)]).await;
        let want = allowed.then_some(origin);
        assert_eq!(r.header("access-control-allow-origin"), want, "{origin}");
    }
    assert_eq!(p.stat("http.ingress.cors.origin_valid").await, Some(4));
    assert_eq!(p.stat("http.ingress.cors.origin_invalid").await, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_cors_fields() {
    let up = echo().await;
    let routes = format!(
        "{}{}{}",
        // The route action's policy: only methods; the rest from the vhost's.
        "              - match: {prefix: \"/legacy\"}\n                route: {cluster: a, cors: {allow_methods: \"PATCH\"}}\n",
        // A typed_per_filter_config policy hides both legacy ones.
        route(
            "/typed",
            &policy(16, r#"allow_origin_string_match: [{exact: "https://typed.example"}]"#)
        ),
        route("/", ""),
    );
    let mut c = Cfg::new(&routes, &up, "legacy");
    c.vhost_extra = format!("              cors: {{{FULL}}}\n");
    let p = c.start();
    let r = preflight(&p, "/legacy", ORIGIN, &[]).await;
    assert!(!upstream_answered(&r));
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: x-a",
            "access-control-allow-methods: PATCH",
            "access-control-allow-origin: https://app.example",
            "access-control-expose-headers: x-e1, x-e2",
            "access-control-max-age: 600",
        ]
    );
    let r = preflight(&p, "/vhost", ORIGIN, &[]).await;
    assert!(!upstream_answered(&r));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    let r = preflight(&p, "/typed", ORIGIN, &[]).await;
    assert!(upstream_answered(&r), "the legacy policies are ignored");
    let r = preflight(&p, "/typed", "https://typed.example", &[]).await;
    assert!(!upstream_answered(&r));
    assert_eq!(
        cors_headers(&r),
        ["access-control-allow-origin: https://typed.example"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_of_later_filters_get_headers() {
    let up = echo().await;
    let mut c = Cfg::new(&route("/", &policy(16, FULL)), &up, "local");
    c.fault = "abort: {http_status: 503, percentage: {numerator: 100}}".into();
    let p = c.start();
    let r = Http::h1()
        .get(&format!("{}/x", p.base()), &[("origin", ORIGIN)])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "fault filter abort");
    assert_eq!(
        cors_headers(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-origin: https://app.example",
            "access-control-expose-headers: x-e1, x-e2",
        ]
    );
    // A preflight is answered by the CORS filter before the fault filter.
    let r = preflight(&p, "/x", ORIGIN, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        lines(&p, &c.log, 2).await,
        ["503 /x FI fault_filter_abort", "200 /x - cors_response"]
    );
}
