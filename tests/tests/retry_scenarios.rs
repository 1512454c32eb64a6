//! Retry policy conditions beyond status codes: `retriable_headers`,
//! `retriable_request_headers`, `envoy-ratelimited`, the gRPC conditions
//! and `rate_limited_retry_back_off`, with
//! a real echo upstream that counts attempts per `x-echo-id`.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test retry_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test retry_scenarios
//! ```
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use weir_tests::config::{bootstrap, chain, cluster, hcm, listener, route, stat_is, vhost};
use weir_tests::scenario::{Http, Proxy, Resp};
use weir_tests::upstream;

/// A proxy routing `/` to an echo upstream with `retry` as the route's
/// retry policy (a 1 ms back-off unless `retry` sets one).
async fn proxy(retry: Value) -> (Proxy, upstream::EchoServer) {
    let echo = upstream::http1("a").await.expect("echo upstream");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        let mut policy = json!({"retry_back_off": {"base_interval": "0.001s"}});
        if let (Some(o), Value::Object(e)) = (policy.as_object_mut(), retry.clone()) {
            o.extend(e);
        }
        let r = route(
            "/",
            "a",
            json!({"route": {"cluster": "a", "retry_policy": policy}}),
        );
        let h = hcm(
            "ingress",
            vec![],
            vec![vhost("vh", vec![r], json!({}))],
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

fn seen(r: &Resp) -> Option<&str> {
    r.header("x-echo-seen")
}

/// `retriable-headers`: a response matching a `retriable_headers` matcher
/// (a regular header, or `:status`) is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_response_headers() {
    let (p, _echo) = proxy(json!({
        "retry_on": "retriable-headers", "num_retries": 2,
        "retriable_headers": [
            {"name": "x-upstream-retry", "string_match": {"exact": "yes"}},
            {"name": ":status", "string_match": {"exact": "418"}},
        ],
    }))
    .await;
    let c = Http::h1();
    let url = format!("{}/", p.base());
    // Always carries the header: every retry is spent.
    let r = c
        .get(
            &url,
            &[
                ("x-echo-header-x-upstream-retry", "yes"),
                ("x-echo-id", "h1"),
            ],
        )
        .await;
    assert_eq!((r.status, seen(&r)), (200, Some("3")));
    // Another value: no retry.
    let r = c
        .get(
            &url,
            &[
                ("x-echo-header-x-upstream-retry", "no"),
                ("x-echo-id", "h2"),
            ],
        )
        .await;
    assert_eq!((r.status, seen(&r)), (200, Some("1")));
    // :status 418 once, then 200.
    let r = c
        .get(
            &url,
            &[
                ("x-echo-status", "418"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "h3"),
            ],
        )
        .await;
    assert_eq!((r.status, seen(&r)), (200, Some("2")));
    stat_is(&p, "cluster.a.upstream_rq_retry", 3).await;
}

/// `retriable_request_headers`: only matching requests are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_request_headers_select_requests() {
    let (p, _echo) = proxy(json!({
        "retry_on": "5xx", "num_retries": 1,
        "retriable_request_headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
    }))
    .await;
    let c = Http::h1();
    let url = format!("{}/", p.base());
    let r = c
        .get(
            &url,
            &[
                ("x-echo-status", "500"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "g"),
            ],
        )
        .await;
    assert_eq!((r.status, seen(&r)), (200, Some("2")));
    let r = c
        .send(
            "POST",
            &url,
            &[
                ("x-echo-status", "500"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "p"),
            ],
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!((r.status, seen(&r)), (500, Some("1")));
}

/// `envoy-ratelimited` retries a response carrying `x-envoy-ratelimited`;
/// the gRPC conditions read a trailers-only `grpc-status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimited_and_grpc_conditions() {
    let (p, _echo) =
        proxy(json!({"retry_on": "envoy-ratelimited,unavailable", "num_retries": 1})).await;
    let c = Http::h1();
    let url = format!("{}/", p.base());
    let r = c
        .get(
            &url,
            &[
                ("x-echo-header-x-envoy-ratelimited", "true"),
                ("x-echo-id", "r"),
            ],
        )
        .await;
    assert_eq!(seen(&r), Some("2"));
    let r = c
        .get(
            &url,
            &[("x-echo-header-grpc-status", "14"), ("x-echo-id", "u")],
        )
        .await;
    assert_eq!(seen(&r), Some("2"));
    // grpc-status 1 (cancelled) is not among the conditions.
    let r = c
        .get(
            &url,
            &[("x-echo-header-grpc-status", "1"), ("x-echo-id", "c")],
        )
        .await;
    assert_eq!(seen(&r), Some("1"));
}

/// `rate_limited_retry_back_off`: a retriable response's reset header
/// (seconds) sets the wait before the retry (at least that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_back_off_waits_for_the_reset_header() {
    let (p, _echo) = proxy(json!({
        "retry_on": "5xx", "num_retries": 1,
        "rate_limited_retry_back_off": {
            "reset_headers": [{"name": "retry-after", "format": "SECONDS"}],
            "max_interval": "5s",
        },
    }))
    .await;
    let c = Http::h1();
    let url = format!("{}/", p.base());
    let start = Instant::now();
    let r = c
        .get(
            &url,
            &[
                ("x-echo-status", "503"),
                ("x-echo-fail-times", "1"),
                ("x-echo-header-retry-after", "1"),
                ("x-echo-id", "b"),
            ],
        )
        .await;
    let took = start.elapsed();
    assert_eq!((r.status, seen(&r)), (200, Some("2")));
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    assert!(took < Duration::from_millis(3000), "{took:?}");
}
