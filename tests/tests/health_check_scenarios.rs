//! `envoy.filters.http.health_check` with a real echo upstream, real HTTP
//! clients and the admin `/healthcheck/fail` / `/healthcheck/ok` switch.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test health_check_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test health_check_scenarios
//! ```
use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap_with, chain, cluster, file_log, filter, hcm, listener, log_path, route, vhost,
};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream;

const HEALTH_CHECK: &str =
    "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n";

/// A proxy (node cluster `gw`) with the health_check filter (`fields`;
/// health checks are `GET /healthz`), a route to an echo upstream, an
/// empty cluster `empty`, and an access log.
async fn proxy(
    name: &str,
    fields: Value,
) -> (Proxy, upstream::EchoServer, weir_tests::tmp::TempFile) {
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let port = echo.port();
    let log = log_path("health-check", name);
    let l = log.to_path_buf();
    let p = Proxy::start(move |ports| {
        let mut f = json!({"headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}]});
        if let (Some(o), Value::Object(e)) = (f.as_object_mut(), fields.clone()) {
            o.extend(e);
        }
        let h = hcm(
            "ingress",
            vec![filter("envoy.filters.http.health_check", HEALTH_CHECK, f)],
            vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
            json!({"access_log": [file_log(&l, LOG_FORMAT)]}),
        );
        bootstrap_with(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![
                cluster("echo", &[port], json!({})),
                json!({"name": "empty", "type": "STATIC", "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "empty"}}),
            ],
            json!({"node": {"id": "n1", "cluster": "gw"}}),
        )
    });
    (p, echo, log)
}

/// Without pass-through, health checks are answered here (200, empty
/// body, the local cluster named); other requests go upstream. Failing
/// health checks (admin) makes them 503 `LH` and marks every other
/// response with `x-envoy-immediate-health-check-fail`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_locally_and_failed_by_admin() {
    let (p, _echo, log) = proxy("local", json!({"pass_through_mode": false})).await;
    let c = Http::h1();
    let base = p.base();
    let r = c.get(&format!("{base}/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "");
    assert_eq!(
        r.header("x-envoy-upstream-healthchecked-cluster"),
        Some("gw")
    );
    let r = c.get(&format!("{base}/other"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().path, "/other");
    assert_eq!(r.header("x-envoy-upstream-healthchecked-cluster"), None);
    assert_eq!(r.header("x-envoy-immediate-health-check-fail"), None);

    assert_eq!(p.admin("POST", "/healthcheck/fail").await.status, 200);
    let r = c.get(&format!("{base}/healthz"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-envoy-upstream-healthchecked-cluster"),
        Some("gw")
    );
    let r = c.get(&format!("{base}/other"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-envoy-immediate-health-check-fail"),
        Some("true")
    );
    assert_eq!(p.admin("POST", "/healthcheck/ok").await.status, 200);
    let r = c.get(&format!("{base}/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    let lines = p.log_lines(&log, 5).await;
    assert_eq!(
        lines,
        [
            "200 - health_check_ok",
            "200 - via_upstream",
            "503 LH health_check_failed",
            "200 - via_upstream",
            "200 - health_check_ok",
        ]
    );
}

/// `cluster_min_healthy_percentages`: a missing cluster, or an empty one
/// with a non-zero minimum, fails the health check; an empty one with a
/// zero minimum and a healthy one pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_minimum_healthy_percentages() {
    for (min, want, details) in [
        (
            json!({"echo": {"value": 100.0}}),
            200,
            "- health_check_ok_cluster_healthy",
        ),
        (
            json!({"echo": {"value": 100.0}, "empty": {"value": 0.0}}),
            200,
            "- health_check_ok_cluster_healthy",
        ),
        (
            json!({"empty": {"value": 50.0}}),
            503,
            "LH health_check_failed_cluster_empty",
        ),
        (
            json!({"nope": {"value": 10.0}}),
            503,
            "LH health_check_failed_no_cluster_found",
        ),
    ] {
        let (p, _echo, log) = proxy(
            "clusters",
            json!({"pass_through_mode": false, "cluster_min_healthy_percentages": min}),
        )
        .await;
        let r = Http::h1().get(&format!("{}/healthz", p.base()), &[]).await;
        assert_eq!(r.status, want, "{min}");
        let lines = p.log_lines(&log, 1).await;
        assert_eq!(lines, [format!("{want} {details}")], "{min}");
    }
}

/// Pass-through: health checks go upstream, and with `cache_time` the
/// upstream's answer is reused (the upstream is not asked again) until the
/// cache period ends. A failing server answers 503 itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_with_cache() {
    let (p, _echo, log) = proxy(
        "pass",
        json!({"pass_through_mode": true, "cache_time": "30s"}),
    )
    .await;
    let c = Http::h1();
    let hz = format!("{}/healthz", p.base());
    let up = [("x-echo-status", "503")];
    let r = c.get(&hz, &up).await;
    assert_eq!(r.status, 503);
    assert!(r.header("x-echo-seen").is_some(), "from upstream");
    assert_eq!(
        r.header("x-envoy-upstream-healthchecked-cluster"),
        Some("gw")
    );
    // Cached: answered here without reaching the upstream.
    let r = c.get(&hz, &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-echo-seen"), None);
    assert_eq!(p.admin("POST", "/healthcheck/fail").await.status, 200);
    let r = c.get(&hz, &[]).await;
    assert_eq!(r.status, 503);
    let lines = p.log_lines(&log, 3).await;
    assert_eq!(
        lines,
        [
            "503 - via_upstream",
            "503 LH health_check_cached",
            "503 LH health_check_failed",
        ]
    );
}
