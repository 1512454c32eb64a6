//! Router extras: `hedge_policy` (hedging on per-try timeout) and
//! `internal_redirect_policy`, with real echo upstreams (slow ones for
//! hedging, redirecting ones for internal redirects).
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test router_extras_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test router_extras_scenarios
//! ```
use serde_json::{json, Value};
use weir_tests::config::{bootstrap, chain, cluster, hcm, listener, route, stat_is, vhost};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream;

// === hedging ===

/// A proxy routing `/` to one echo upstream with `retry` as the route's
/// retry policy (1 ms back-off), `route_extra` merged into the route
/// action and `vhost_extra` into the virtual host.
async fn hedge_proxy(
    retry: Value,
    route_extra: Value,
    vhost_extra: Value,
) -> (Proxy, upstream::EchoServer) {
    hedge_proxy_with(retry, route_extra, vhost_extra, json!({})).await
}

/// [`hedge_proxy`] with `cluster_extra` merged into cluster `a`.
async fn hedge_proxy_with(
    retry: Value,
    route_extra: Value,
    vhost_extra: Value,
    cluster_extra: Value,
) -> (Proxy, upstream::EchoServer) {
    let echo = upstream::http1("a").await.expect("echo upstream");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        let mut policy = json!({"retry_back_off": {"base_interval": "0.001s"}});
        if let (Some(o), Value::Object(e)) = (policy.as_object_mut(), retry.clone()) {
            o.extend(e);
        }
        let mut action = json!({"cluster": "a", "retry_policy": policy});
        if let (Some(o), Value::Object(e)) = (action.as_object_mut(), route_extra.clone()) {
            o.extend(e);
        }
        let r = route("/", "a", json!({"route": action}));
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![r], vhost_extra.clone())],
            json!({}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("a", &[port], cluster_extra.clone())],
        )
    });
    (p, echo)
}

fn hedge_on() -> Value {
    json!({"hedge_policy": {"hedge_on_per_try_timeout": true}})
}

/// A try slower than the per-try timeout is not cancelled: a hedge is sent
/// and the first try, answering first, wins. Envoy counts the hedge as a
/// retry but not as a per-try timeout (nor a retry success: the winner is
/// the try that was hedged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_first_try_still_wins() {
    let (p, echo) = hedge_proxy(
        json!({"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}),
        json!({"timeout": "3s"}),
        hedge_on(),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[("x-echo-id", "first"), ("x-echo-delay-ms", "500")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The first request the upstream saw answered.
    assert_eq!(r.header("x-echo-seen"), Some("1"));
    // The hedge was sent, then reset (the echo records only the requests
    // it answered).
    stat_is(&p, "cluster.a.upstream_rq_total", 2).await;
    assert_eq!(echo.requests().len(), 1);
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
    stat_is(&p, "cluster.a.upstream_rq_per_try_timeout", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_timeout", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_retry_success", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_2xx", 1).await;
}

/// The hedge answers first: its response wins and the slow first try is
/// reset (counted as a retry success, as Envoy's retry state does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faster_hedge_wins() {
    let (p, echo) = hedge_proxy(
        json!({"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}),
        json!({"timeout": "3s"}),
        hedge_on(),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-echo-id", "fast"),
                ("x-echo-delay-ms", "1500"),
                ("x-echo-delay-times", "1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo-seen"), Some("2"));
    stat_is(&p, "cluster.a.upstream_rq_total", 2).await;
    assert_eq!(echo.requests().len(), 1);
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
    stat_is(&p, "cluster.a.upstream_rq_retry_success", 1).await;
    stat_is(&p, "cluster.a.upstream_rq_per_try_timeout", 0).await;
}

/// Hedges count against `num_retries`: past it the tries keep running
/// until the global timeout, which resets every one of them (Envoy counts
/// an upstream timeout per try in flight) and answers 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_stop_at_num_retries_then_global_timeout() {
    let (p, echo) = hedge_proxy(
        json!({"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.1s"}),
        json!({"timeout": "0.6s"}),
        hedge_on(),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[("x-echo-id", "slow"), ("x-echo-delay-ms", "2000")],
        )
        .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(echo.requests().is_empty());
    stat_is(&p, "cluster.a.upstream_rq_retry", 2).await;
    stat_is(&p, "cluster.a.upstream_rq_retry_limit_exceeded", 1).await;
    stat_is(&p, "cluster.a.upstream_rq_timeout", 3).await;
    stat_is(&p, "cluster.a.upstream_rq_per_try_timeout", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_total", 3).await;
}

/// A hedge is sent on a per-try timeout whatever `retry_on` says (here
/// only `retriable-4xx`: Envoy's `shouldHedgeRetryPerTryTimeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_is_sent_whatever_retry_on_says() {
    let (p, echo) = hedge_proxy(
        json!({"retry_on": "retriable-4xx", "num_retries": 1, "per_try_timeout": "0.2s"}),
        json!({"timeout": "3s"}),
        hedge_on(),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-echo-id", "any"),
                ("x-echo-delay-ms", "1500"),
                ("x-echo-delay-times", "1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo-seen"), Some("2"));
    stat_is(&p, "cluster.a.upstream_rq_total", 2).await;
    assert_eq!(echo.requests().len(), 1);
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
}

/// A try that was hedged is not retried on its own failure, and its
/// failure does not end the request while another try is in flight: the
/// first try's late 503 is dropped and the hedge's 200 answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_hedged_try_waits_for_the_others() {
    let (p, echo) = hedge_proxy(
        json!({"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.3s"}),
        json!({"timeout": "3s"}),
        hedge_on(),
    )
    .await;
    // Request 1: 503 after 500 ms; request 2 (the hedge, at 300 ms): 200
    // after 500 ms.
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-echo-id", "late"),
                ("x-echo-delay-ms", "500"),
                ("x-echo-delay-times", "2"),
                ("x-echo-status", "503"),
                ("x-echo-fail-times", "1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo-seen"), Some("2"));
    assert_eq!(echo.wait_requests(2).await.len(), 2);
    stat_is(&p, "cluster.a.upstream_rq_total", 2).await;
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
    // The hedge's own per-try timeout found no retry left.
    stat_is(&p, "cluster.a.upstream_rq_retry_limit_exceeded", 1).await;
}

/// The route's `hedge_policy` replaces the virtual host's: with hedging
/// off on the route, a per-try timeout cancels the try as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_hedge_policy_overrides_the_virtual_host() {
    let (p, _echo) = hedge_proxy(
        json!({"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}),
        json!({"timeout": "3s", "hedge_policy": {"hedge_on_per_try_timeout": false}}),
        hedge_on(),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[("x-echo-id", "off"), ("x-echo-delay-ms", "500")],
        )
        .await;
    assert_eq!(r.status, 504);
    stat_is(&p, "cluster.a.upstream_rq_total", 2).await;
    stat_is(&p, "cluster.a.upstream_rq_per_try_timeout", 2).await;
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
}

// === internal redirects ===

/// A proxy with route `ra` (`/a` to upstream `a`, whose requests without
/// `x-echo-status` answer `a_status`) carrying `policy` as its
/// `internal_redirect_policy`, and route `to-b` (`/b` to upstream `b`).
async fn redirect_proxy(
    policy: Value,
    a_status: u16,
) -> (Proxy, upstream::EchoServer, upstream::EchoServer) {
    let a = upstream::http1("a").await.expect("upstream a");
    let b = upstream::http1("b").await.expect("upstream b");
    a.set_default_status(a_status);
    let (ap, bp) = (a.port(), b.port());
    let p = Proxy::start(move |ports| {
        let ra = json!({
            "name": "ra",
            "match": {"prefix": "/a"},
            "route": {"cluster": "a", "internal_redirect_policy": policy.clone()},
        });
        let rb = json!({"name": "to-b", "match": {"prefix": "/b"}, "route": {"cluster": "b"}});
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![ra, rb], json!({}))],
            json!({}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("a", &[ap], json!({})),
                cluster("b", &[bp], json!({})),
            ],
        )
    });
    (p, a, b)
}

/// A 302 with an absolute `location` is followed: the request is routed
/// again from the new URL (route `to-b`, upstream `b`, the new host and
/// path) with `x-envoy-original-url`, and the client sees only `b`'s answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_is_followed_and_routed_again() {
    let (p, a, b) = redirect_proxy(json!({}), 302).await;
    let r = Http::h1()
        .get(
            &format!("{}/a/start", p.base()),
            &[(
                "x-echo-header-location",
                "http://redirected.example/b/next?q=1",
            )],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.echo();
    assert_eq!(seen.upstream, "b");
    assert_eq!(seen.path, "/b/next?q=1");
    assert_eq!(
        weir_tests::scenario::echo_header(&seen, "host"),
        Some("redirected.example")
    );
    let original = format!("{}/a/start", p.base());
    assert_eq!(
        weir_tests::scenario::echo_header(&seen, "x-envoy-original-url"),
        Some(original.as_str())
    );
    assert_eq!(a.requests().len(), 1);
    assert_eq!(b.requests().len(), 1);
    // The recreated request is not sanitized again: the same
    // x-forwarded-for and request id as the first one.
    let first = &a.requests()[0];
    for h in ["x-forwarded-for", "x-request-id", "x-forwarded-proto"] {
        assert_eq!(
            weir_tests::scenario::echo_header(&seen, h),
            weir_tests::scenario::echo_header(first, h),
            "{h}"
        );
    }
    stat_is(
        &p,
        "cluster.a.upstream_internal_redirect_succeeded_total",
        1,
    )
    .await;
    stat_is(&p, "cluster.a.upstream_internal_redirect_failed_total", 0).await;
}

/// The deprecated `internal_redirect_action: HANDLE_INTERNAL_REDIRECT`
/// (with `max_internal_redirects`) is an internal redirect policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprecated_internal_redirect_action() {
    let a = upstream::http1("a").await.expect("upstream a");
    let b = upstream::http1("b").await.expect("upstream b");
    a.set_default_status(302);
    let (ap, bp) = (a.port(), b.port());
    let p = Proxy::start(move |ports| {
        let ra = json!({
            "match": {"prefix": "/a"},
            "route": {"cluster": "a", "internal_redirect_action": "HANDLE_INTERNAL_REDIRECT",
                      "max_internal_redirects": 2},
        });
        let rb = json!({"match": {"prefix": "/b"}, "route": {"cluster": "b"}});
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![ra, rb], json!({}))],
            json!({}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("a", &[ap], json!({})),
                cluster("b", &[bp], json!({})),
            ],
        )
    });
    let c = Http::h1();
    let r = c
        .get(
            &format!("{}/a/1", p.base()),
            &[("x-echo-header-location", "http://redirected.example/a/2")],
        )
        .await;
    // Two redirects allowed: /a/1 -> /a/2 -> /a/2, the third 302 passes.
    assert_eq!(r.status, 302);
    let reqs = a.wait_requests(3).await;
    assert_eq!(reqs.len(), 3);
    // Each redirect sets `x-envoy-original-url` to the URL it redirected.
    let original = format!("{}/a/1", p.base());
    let urls: Vec<_> = reqs
        .iter()
        .map(|v| weir_tests::scenario::echo_header(v, "x-envoy-original-url"))
        .collect();
    assert_eq!(
        urls,
        vec![
            None,
            Some(original.as_str()),
            Some("http://redirected.example/a/2")
        ]
    );
    let r = c
        .get(
            &format!("{}/a/1", p.base()),
            &[("x-echo-header-location", "http://redirected.example/b/x")],
        )
        .await;
    assert_eq!((r.status, r.echo().upstream.as_str()), (200, "b"));
    stat_is(
        &p,
        "cluster.a.upstream_internal_redirect_succeeded_total",
        3,
    )
    .await;
    stat_is(&p, "cluster.a.upstream_internal_redirect_failed_total", 1).await;
}

/// Only `redirect_response_codes` (default: 302) are followed; another 3xx
/// reaches the client unchanged and counts as nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_codes_pass_through() {
    let (p, a, b) = redirect_proxy(json!({}), 301).await;
    let r = Http::h1()
        .get(
            &format!("{}/a/start", p.base()),
            &[("x-echo-header-location", "http://redirected.example/b/next")],
        )
        .await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("http://redirected.example/b/next")
    );
    assert_eq!(a.requests().len(), 1);
    assert!(b.requests().is_empty());
    stat_is(
        &p,
        "cluster.a.upstream_internal_redirect_succeeded_total",
        0,
    )
    .await;
    stat_is(&p, "cluster.a.upstream_internal_redirect_failed_total", 0).await;
}

/// `max_internal_redirects` (default 1) is shared by the whole request:
/// the second redirect is passed to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_stop_at_max_internal_redirects() {
    let (p, a, _b) = redirect_proxy(json!({}), 302).await;
    let r = Http::h1()
        .get(
            &format!("{}/a/start", p.base()),
            &[(
                "x-echo-header-location",
                "http://redirected.example/a/again",
            )],
        )
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("http://redirected.example/a/again")
    );
    let reqs = a.wait_requests(2).await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].path, "/a/again");
    stat_is(
        &p,
        "cluster.a.upstream_internal_redirect_succeeded_total",
        1,
    )
    .await;
    stat_is(&p, "cluster.a.upstream_internal_redirect_failed_total", 1).await;
    stat_is(
        &p,
        "http.ingress.passthrough_internal_redirect_too_many_redirects",
        1,
    )
    .await;
}

/// `previous_routes`: a route is a redirect target at most once, whatever
/// `max_internal_redirects` allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_routes_predicate_refuses_a_route_twice() {
    let (p, a, _b) = redirect_proxy(
        json!({
            "max_internal_redirects": 5,
            "predicates": [{
                "name": "previous_routes",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.internal_redirect.previous_routes.v3.PreviousRoutesConfig"},
            }],
        }),
        302,
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/a/start", p.base()),
            &[(
                "x-echo-header-location",
                "http://redirected.example/a/again",
            )],
        )
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(a.wait_requests(2).await.len(), 2);
    stat_is(
        &p,
        "cluster.a.upstream_internal_redirect_succeeded_total",
        1,
    )
    .await;
    stat_is(
        &p,
        "http.ingress.passthrough_internal_redirect_predicate",
        1,
    )
    .await;
}

/// `allow_listed_routes`: a target route not listed is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_listed_routes_predicate() {
    let (p, a, b) = redirect_proxy(
        json!({
            "predicates": [{
                "name": "allow_listed",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig",
                    "allowed_route_names": ["elsewhere"],
                },
            }],
        }),
        302,
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/a/start", p.base()),
            &[("x-echo-header-location", "http://redirected.example/b/next")],
        )
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(a.requests().len(), 1);
    assert!(b.requests().is_empty());
    stat_is(&p, "cluster.a.upstream_internal_redirect_failed_total", 1).await;
    stat_is(
        &p,
        "http.ingress.passthrough_internal_redirect_predicate",
        1,
    )
    .await;
}

/// A relative `location` is a bad location, an `https` target from an
/// `http` request an unsafe scheme (without `allow_cross_scheme_redirect`):
/// both reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_location_and_cross_scheme_pass_through() {
    let (p, a, b) = redirect_proxy(json!({}), 302).await;
    let c = Http::h1();
    let r = c
        .get(
            &format!("{}/a/start", p.base()),
            &[("x-echo-header-location", "/b/next")],
        )
        .await;
    assert_eq!((r.status, r.header("location")), (302, Some("/b/next")));
    let r = c
        .get(
            &format!("{}/a/start", p.base()),
            &[(
                "x-echo-header-location",
                "https://redirected.example/b/next",
            )],
        )
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(a.requests().len(), 2);
    assert!(b.requests().is_empty());
    stat_is(&p, "cluster.a.upstream_internal_redirect_failed_total", 2).await;
    stat_is(
        &p,
        "http.ingress.passthrough_internal_redirect_bad_location",
        1,
    )
    .await;
    stat_is(
        &p,
        "http.ingress.passthrough_internal_redirect_unsafe_scheme",
        1,
    )
    .await;
}

/// A 303 (when listed) turns a POST into a GET without its body;
/// `response_headers_to_copy` copies the redirect's headers into the new
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn see_other_becomes_get_and_headers_are_copied() {
    let (p, a, b) = redirect_proxy(
        json!({"redirect_response_codes": [303], "response_headers_to_copy": ["x-copied"]}),
        303,
    )
    .await;
    let r = Http::h1()
        .send(
            "POST",
            &format!("{}/a/form", p.base()),
            &[
                ("x-echo-header-location", "http://redirected.example/b/done"),
                ("x-echo-header-x-copied", "from-a"),
            ],
            bytes::Bytes::from_static(b"hello"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.echo();
    assert_eq!((seen.upstream.as_str(), seen.method.as_str()), ("b", "GET"));
    assert_eq!(seen.body_len, 0);
    assert_eq!(
        weir_tests::scenario::echo_header(&seen, "x-copied"),
        Some("from-a")
    );
    assert_eq!(
        weir_tests::scenario::echo_header(&seen, "content-length"),
        None
    );
    assert_eq!(a.requests()[0].body_len, 5);
    assert_eq!(b.requests().len(), 1);
    stat_is(
        &p,
        "cluster.a.upstream_internal_redirect_succeeded_total",
        1,
    )
    .await;
}

/// A 307 keeps the method and replays the (buffered) body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_redirect_replays_the_body() {
    let (p, _a, b) = redirect_proxy(json!({"redirect_response_codes": [307]}), 307).await;
    let r = Http::h1()
        .send(
            "POST",
            &format!("{}/a/form", p.base()),
            &[("x-echo-header-location", "http://redirected.example/b/done")],
            bytes::Bytes::from_static(b"hello"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.echo();
    assert_eq!(
        (seen.upstream.as_str(), seen.method.as_str()),
        ("b", "POST")
    );
    assert_eq!(seen.body_len, 5);
    assert_eq!(b.requests().len(), 1);
}

// === retry host predicates and retry request headers ===

/// A proxy routing `/` to cluster `m` (RANDOM) over `x` (metadata
/// `x_meta` under `envoy.lb`) and `y`, with `retry` as the route's retry
/// policy (1 ms back-off); 127.0.0.1 is internal (x-envoy-* headers are
/// trusted).
async fn pair_proxy(
    retry: Value,
    x_meta: Value,
) -> (Proxy, upstream::EchoServer, upstream::EchoServer) {
    let x = upstream::http1("x").await.expect("upstream x");
    let y = upstream::http1("y").await.expect("upstream y");
    let (xp, yp) = (x.port(), y.port());
    let p = Proxy::start(move |ports| {
        let mut policy = json!({"retry_back_off": {"base_interval": "0.001s"}});
        if let (Some(o), Value::Object(e)) = (policy.as_object_mut(), retry.clone()) {
            o.extend(e);
        }
        let r = route(
            "/",
            "m",
            json!({"route": {"cluster": "m", "retry_policy": policy}}),
        );
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![r], json!({}))],
            json!({
                "use_remote_address": true,
                "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]},
            }),
        );
        let m = json!({
            "name": "m", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "RANDOM",
            "load_assignment": {"cluster_name": "m", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": weir_tests::config::sock(xp)},
                 "metadata": {"filter_metadata": {"envoy.lb": x_meta.clone()}}},
                {"endpoint": {"address": weir_tests::config::sock(yp)}},
            ]}]},
        });
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![m],
        )
    });
    (p, x, y)
}

fn ids(e: &upstream::EchoServer) -> Vec<String> {
    let mut v: Vec<String> = e
        .requests()
        .iter()
        .filter_map(|r| weir_tests::scenario::echo_header(r, "x-echo-id").map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// `previous_hosts` with `host_selection_retry_max_attempts`: the retry
/// re-picks (here up to 50 times) until it finds a host not tried yet, so
/// with two hosts every request's retry goes to the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_hosts_reselects_up_to_max_attempts() {
    let (p, x, y) = pair_proxy(
        json!({
            "retry_on": "5xx", "num_retries": 1, "host_selection_retry_max_attempts": 50,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }],
        }),
        json!({}),
    )
    .await;
    let c = Http::h1();
    for i in 0..10 {
        let id = format!("ph{i}");
        // Every host answers its first request of an id with 503: the
        // retry, on the other host, fails too.
        let r = c
            .get(
                &format!("{}/", p.base()),
                &[
                    ("x-echo-id", &id),
                    ("x-echo-status", "503"),
                    ("x-echo-fail-times", "1"),
                ],
            )
            .await;
        assert_eq!(r.status, 503, "{id}");
    }
    // Each id reached each host exactly once.
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..10).map(|i| format!("ph{i}")).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&x), want);
    assert_eq!(ids(&y), want);
    stat_is(&p, "cluster.m.upstream_rq_retry", 10).await;
}

/// Sends 10 requests (ids `{prefix}0..9`) whose first request of an id on
/// each host answers 503 (retried once under `5xx`), and checks that no
/// retry went to `x`: `x` saw each id at most once (a first try), `y` saw
/// every id (the retry, or the first try and its retry).
async fn retries_avoid_x(
    p: &Proxy,
    x: &upstream::EchoServer,
    y: &upstream::EchoServer,
    prefix: &str,
) {
    let c = Http::h1();
    let mut answered = 0;
    for i in 0..10 {
        let id = format!("{prefix}{i}");
        let r = c
            .get(
                &format!("{}/", p.base()),
                &[
                    ("x-echo-id", &id),
                    ("x-echo-status", "503"),
                    ("x-echo-fail-times", "1"),
                ],
            )
            .await;
        answered += usize::from(r.status == 200);
    }
    let (xi, yi) = (ids(x), ids(y));
    let mut dedup = xi.clone();
    dedup.dedup();
    assert_eq!(dedup, xi, "a retry went to x");
    for i in 0..10 {
        assert!(
            yi.contains(&format!("{prefix}{i}")),
            "{prefix}{i} never reached y"
        );
    }
    // A request whose first try went to `y` was retried on `y` (200).
    assert_eq!(answered + xi.len(), 10);
    assert_eq!(xi.len() + yi.len(), 20);
    stat_is(p, "cluster.m.upstream_rq_retry", 10).await;
}

/// `omit_canary_hosts`: a retry re-picks a canary host (`envoy.lb`
/// metadata `canary: true`). As Envoy, the retry host predicates apply to
/// retries only: the first try may go to the canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omit_canary_hosts_avoids_canaries_on_retry() {
    let (p, x, y) = pair_proxy(
        json!({
            "retry_on": "5xx", "num_retries": 1, "host_selection_retry_max_attempts": 50,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.omit_canary_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate"},
            }],
        }),
        json!({"canary": true}),
    )
    .await;
    retries_avoid_x(&p, &x, &y, "oc").await;
}

/// `omit_host_metadata`: a retry re-picks hosts carrying every listed
/// `envoy.lb` label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omit_host_metadata_avoids_labelled_hosts_on_retry() {
    let (p, x, y) = pair_proxy(
        json!({
            "retry_on": "5xx", "num_retries": 1, "host_selection_retry_max_attempts": 50,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.omit_host_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.omit_host_metadata.v3.OmitHostMetadataConfig",
                    "metadata_match": {"filter_metadata": {"envoy.lb": {"stage": "drain"}}},
                },
            }],
        }),
        json!({"stage": "drain", "other": "x"}),
    )
    .await;
    retries_avoid_x(&p, &x, &y, "om").await;
}

/// `x-envoy-retriable-header-names` (trusted): under `retriable-headers`,
/// a response carrying one of the named headers is retried; the request
/// header is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_header_names_request_header() {
    let (p, x, y) = pair_proxy(
        json!({"retry_on": "retriable-headers", "num_retries": 1}),
        json!({}),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-envoy-retriable-header-names", "x-try-again,x-other"),
                ("x-echo-header-x-try-again", "1"),
                ("x-echo-id", "rh"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    // Retried once: two requests in all, over the two hosts.
    let all: Vec<_> = x.requests().into_iter().chain(y.requests()).collect();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|v| weir_tests::scenario::echo_header(
        v,
        "x-envoy-retriable-header-names"
    )
    .is_none()));
    stat_is(&p, "cluster.m.upstream_rq_retry", 1).await;
}

/// A trusted `x-envoy-hedge-on-per-try-timeout: true` turns hedging on for
/// the request (and is consumed): the slow first try is not cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_request_header_turns_hedging_on() {
    let (p, x, y) = pair_proxy(
        json!({"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}),
        json!({}),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-envoy-hedge-on-per-try-timeout", "true"),
                ("x-echo-delay-ms", "500"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let winner = r.echo();
    assert_eq!(
        weir_tests::scenario::echo_header(&winner, "x-envoy-hedge-on-per-try-timeout"),
        None
    );
    stat_is(&p, "cluster.m.upstream_rq_total", 2).await;
    stat_is(&p, "cluster.m.upstream_rq_retry", 1).await;
    stat_is(&p, "cluster.m.upstream_rq_per_try_timeout", 0).await;
    drop((x, y));
}

/// An HTTP/2 downstream request is redirected the same way (the new
/// authority and path replace `:authority` and `:path`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_is_followed_for_http2_downstreams() {
    let (p, a, b) = redirect_proxy(json!({}), 302).await;
    let r = Http::h2c()
        .get(
            &format!("{}/a/start", p.base()),
            &[("x-echo-header-location", "http://redirected.example/b/h2")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.echo();
    assert_eq!((seen.upstream.as_str(), seen.path.as_str()), ("b", "/b/h2"));
    assert_eq!(
        weir_tests::scenario::echo_header(&seen, "host"),
        Some("redirected.example")
    );
    assert_eq!(a.requests().len(), 1);
    assert_eq!(b.requests().len(), 1);
}

/// The recreated stream is a request of its own: counted in
/// `downstream_rq_total` (not by status: it sent no response) and logged,
/// as Envoy, with the redirect's status and the request headers and
/// cluster as changed for the redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_request_is_logged_once() {
    let a = upstream::http1("a").await.expect("upstream a");
    let b = upstream::http1("b").await.expect("upstream b");
    a.set_default_status(302);
    let (ap, bp) = (a.port(), b.port());
    let log = weir_tests::config::log_path("router_extras", "redirect");
    let log2 = log.to_path_buf();
    let p = Proxy::start(move |ports| {
        let ra = json!({
            "match": {"prefix": "/a"},
            "route": {"cluster": "a", "internal_redirect_policy": {}},
        });
        let rb = json!({"match": {"prefix": "/b"}, "route": {"cluster": "b"}});
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![ra, rb], json!({}))],
            json!({"access_log": [weir_tests::config::file_log(
                &log2,
                "%RESPONSE_CODE% %UPSTREAM_CLUSTER% %REQ(:PATH)% %REQ(X-ENVOY-ORIGINAL-URL)%\n",
            )]}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("a", &[ap], json!({})),
                cluster("b", &[bp], json!({})),
            ],
        )
    });
    let c = Http::h1();
    let r = c
        .get(
            &format!("{}/a/start", p.base()),
            &[("x-echo-header-location", "http://redirected.example/b/next")],
        )
        .await;
    assert_eq!(r.status, 200);
    // A plain request afterwards: its line shows the log is complete.
    let r = c.get(&format!("{}/b/plain", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    let lines = p.log_lines(&log, 3).await;
    let original = format!("{}/a/start", p.base());
    assert_eq!(
        lines,
        vec![
            format!("302 b /b/next {original}"),
            format!("200 b /b/next {original}"),
            "200 b /b/plain -".to_owned(),
        ]
    );
    stat_is(&p, "http.ingress.downstream_rq_total", 3).await;
    stat_is(&p, "http.ingress.downstream_rq_2xx", 2).await;
    stat_is(&p, "http.ingress.downstream_rq_3xx", 0).await;
    stat_is(&p, "http.ingress.downstream_rq_active", 0).await;
}

/// A hedge is a retry for the `max_retries` circuit breaker: at 0 the hedge
/// overflows (`upstream_rq_retry_overflow`) and the first try, still
/// running, answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_overflowing_max_retries_keeps_the_first_try() {
    let (p, _echo) = hedge_proxy_with(
        json!({"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.2s"}),
        json!({"timeout": "3s"}),
        hedge_on(),
        json!({"circuit_breakers": {"thresholds": [{"max_retries": 0}]}}),
    )
    .await;
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[("x-echo-id", "ovf"), ("x-echo-delay-ms", "500")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo-seen"), Some("1"));
    stat_is(&p, "cluster.a.upstream_rq_retry_overflow", 1).await;
    stat_is(&p, "cluster.a.upstream_rq_retry", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_total", 1).await;
}
