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
            vec![cluster("a", &[port], json!({}))],
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
    assert_eq!(echo.wait_requests(2).await.len(), 2);
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
    stat_is(&p, "cluster.a.upstream_rq_per_try_timeout", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_timeout", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_retry_success", 0).await;
    stat_is(&p, "cluster.a.upstream_rq_200", 1).await;
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
    assert_eq!(echo.wait_requests(2).await.len(), 2);
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
    assert_eq!(echo.wait_requests(3).await.len(), 3);
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
    assert_eq!(echo.wait_requests(2).await.len(), 2);
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
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
    // The hedge's own per-try timeout found no retry left.
    stat_is(&p, "cluster.a.upstream_rq_retry_limit_exceeded", 1).await;
}

/// The route's `hedge_policy` replaces the virtual host's: with hedging
/// off on the route, a per-try timeout cancels the try as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_hedge_policy_overrides_the_virtual_host() {
    let (p, echo) = hedge_proxy(
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
    assert_eq!(echo.wait_requests(2).await.len(), 2);
    stat_is(&p, "cluster.a.upstream_rq_per_try_timeout", 2).await;
    stat_is(&p, "cluster.a.upstream_rq_retry", 1).await;
}
