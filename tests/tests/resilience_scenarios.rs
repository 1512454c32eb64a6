//! Cluster resilience scenarios with real upstreams: circuit breakers
//! (`circuit_breakers`) and outlier detection (`outlier_detection`).
//! Every test runs against weir in-process by default and against real
//! Envoy with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`).
//! Waits poll the admin interface with bounded timeouts, never racing sleeps.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{yaml_bootstrap, yaml_cluster, yaml_file_log, HttpYaml, TCP_PROXY};
use weir_tests::scenario::{Http, Ports, Proxy, Resp, StartOptions, Target};
use weir_tests::upstream::{self, EchoServer};

/// A bootstrap with one HTTP listener `l` whose access log writes
/// `%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %REQ(:PATH)%`
/// to `log`.
fn http_config(p: &Ports, log: &std::path::Path, routes: &str, clusters: &str) -> String {
    HttpYaml {
        hcm: &yaml_file_log(
            log,
            "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %REQ(:PATH)%",
            10,
        ),
        routes,
        clusters,
        ..HttpYaml::default()
    }
    .render(p)
}

/// One route `prefix -> cluster` with extra route-action fields.
fn route(prefix: &str, cluster: &str, action_extra: &str) -> String {
    format!("              - match: {{prefix: \"{prefix}\"}}\n                route: {{cluster: {cluster}{action_extra}}}\n")
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> weir_tests::tmp::TempFile {
    weir_tests::config::log_path("resilience", name)
}

async fn echo(name: &str) -> EchoServer {
    upstream::http1(name).await.expect("echo upstream")
}

/// Polls stat `name` until `ok` holds (at most ~5 s); returns the last value.
async fn wait_stat(p: &Proxy, name: &str, ok: impl Fn(Option<i64>) -> bool) -> Option<i64> {
    let mut v = None;
    for _ in 0..100 {
        v = p.stat(name).await;
        if ok(v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("stat {name} never reached the expected value (last {v:?})");
}

/// A GET in the background.
fn spawn_get(url: String, headers: Vec<(&'static str, String)>) -> tokio::task::JoinHandle<Resp> {
    tokio::spawn(async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Http::h1().get(&url, &h).await
    })
}

const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

// ------------------------------------------------------------ circuit breakers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_gauges_exist_for_both_priorities() {
    let a = echo("a").await;
    let log = log_path("gauges");
    let clusters = yaml_cluster("a", &[a.port()], "")
        + &yaml_cluster(
            "t",
            &[a.port()],
            "    circuit_breakers:\n      thresholds:\n      - {max_connections: 5, max_pending_requests: 6, max_requests: 7, max_retries: 8, track_remaining: true}\n",
        );
    let routes = route("/", "a", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    for prio in ["default", "high"] {
        for g in [
            "cx_open",
            "cx_pool_open",
            "rq_open",
            "rq_pending_open",
            "rq_retry_open",
        ] {
            let n = format!("cluster.a.circuit_breakers.{prio}.{g}");
            assert_eq!(p.stat(&n).await, Some(0), "{n}");
        }
        // Without track_remaining there are no remaining_* gauges.
        let n = format!("cluster.a.circuit_breakers.{prio}.remaining_rq");
        assert_eq!(p.stat(&n).await, None, "{n}");
    }
    for (g, v) in [("cx", 5), ("pending", 6), ("rq", 7), ("retries", 8)] {
        let n = format!("cluster.t.circuit_breakers.default.remaining_{g}");
        assert_eq!(p.stat(&n).await, Some(v), "{n}");
    }
    // HIGH has Envoy's defaults and no track_remaining.
    assert_eq!(
        p.stat("cluster.t.circuit_breakers.high.remaining_rq").await,
        None
    );
    for c in [
        "upstream_rq_pending_overflow",
        "upstream_rq_active_overflow",
        "upstream_cx_overflow",
        "upstream_cx_pool_overflow",
        "upstream_rq_retry_overflow",
    ] {
        let n = format!("cluster.a.{c}");
        assert_eq!(p.stat(&n).await, Some(0), "{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_overflow_is_503_uo() {
    let a = echo("a").await;
    let log = log_path("max_requests");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {max_requests: 1, track_remaining: true}\n",
    );
    let routes = route("/", "a", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    let slow = spawn_get(
        format!("{}/slow", p.base()),
        vec![("x-echo-delay-ms", "1500".into())],
    );
    wait_stat(&p, "cluster.a.circuit_breakers.default.rq_open", |v| {
        v == Some(1)
    })
    .await;
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.remaining_rq")
            .await,
        Some(0)
    );
    let r = Http::h1().get(&format!("{}/over", p.base()), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), OVERFLOW_BODY);
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(
        p.stat("cluster.a.upstream_rq_active_overflow").await,
        Some(1)
    );
    assert_eq!(
        p.stat("cluster.a.upstream_rq_pending_overflow").await,
        Some(0)
    );
    let s = slow.await.expect("slow request");
    assert_eq!(s.status, 200);
    wait_stat(&p, "cluster.a.circuit_breakers.default.rq_open", |v| {
        v == Some(0)
    })
    .await;
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.remaining_rq")
            .await,
        Some(1)
    );
    let ok = Http::h1().get(&format!("{}/after", p.base()), &[]).await;
    assert_eq!(ok.status, 200);
    let lines = p.log_lines(&log, 3).await;
    assert!(
        lines.contains(&"503 UO upstream_reset_before_response_started{overflow} /over".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"200 - via_upstream /slow".to_owned()),
        "{lines:?}"
    );
}

/// HTTP/2 upstream: a second request multiplexed on the connection is
/// still refused at max_requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_applies_to_http2_streams() {
    let a = upstream::http2("a").await.expect("h2 upstream");
    let log = log_path("max_requests_h2");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}\n    circuit_breakers:\n      thresholds:\n      - {max_requests: 1}\n",
    );
    let routes = route("/", "a", "");
    // One worker (as the Envoy target): one HTTP/2 connection per worker.
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    let p = Proxy::start_with(Target::from_env(), opts, |ports| {
        http_config(ports, &log, &routes, &clusters)
    });
    let slow = spawn_get(
        format!("{}/slow", p.base()),
        vec![("x-echo-delay-ms", "1500".into())],
    );
    wait_stat(&p, "cluster.a.circuit_breakers.default.rq_open", |v| {
        v == Some(1)
    })
    .await;
    let r = Http::h1().get(&format!("{}/over", p.base()), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (503, OVERFLOW_BODY));
    assert_eq!(
        p.stat("cluster.a.upstream_rq_active_overflow").await,
        Some(1)
    );
    assert_eq!(slow.await.expect("slow").status, 200);
    assert_eq!(p.stat("cluster.a.upstream_cx_http2_total").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_wait_for_a_connection_then_overflow() {
    let a = echo("a").await;
    let log = log_path("pending");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {max_connections: 1, max_pending_requests: 1, track_remaining: true}\n",
    );
    let routes = route("/", "a", "");
    // One worker, as the Envoy target runs (--concurrency 1): pools are per
    // worker, and a worker whose pool has no connection to the host always
    // makes one (Envoy's rule), so B must share A's worker.
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    let p = Proxy::start_with(Target::from_env(), opts, |ports| {
        http_config(ports, &log, &routes, &clusters)
    });
    // A holds the only connection.
    let first = spawn_get(
        format!("{}/first", p.base()),
        vec![("x-echo-delay-ms", "1500".into())],
    );
    wait_stat(&p, "cluster.a.circuit_breakers.default.cx_open", |v| {
        v == Some(1)
    })
    .await;
    wait_stat(&p, "cluster.a.upstream_rq_active", |v| v == Some(1)).await;
    // B waits for it (pending), at the pending limit.
    let second = spawn_get(format!("{}/second", p.base()), vec![]);
    wait_stat(
        &p,
        "cluster.a.circuit_breakers.default.rq_pending_open",
        |v| v == Some(1),
    )
    .await;
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.remaining_pending")
            .await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.remaining_cx")
            .await,
        Some(0)
    );
    assert!(p.stat("cluster.a.upstream_cx_overflow").await.unwrap_or(0) >= 1);
    // C finds the pending queue full.
    let r = Http::h1().get(&format!("{}/third", p.base()), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), OVERFLOW_BODY);
    assert_eq!(
        p.stat("cluster.a.upstream_rq_pending_overflow").await,
        Some(1)
    );
    // A finishes; B takes its connection.
    assert_eq!(first.await.expect("first").status, 200);
    let b = second.await.expect("second");
    assert_eq!(b.status, 200);
    assert_eq!(p.stat("cluster.a.upstream_cx_total").await, Some(1));
    wait_stat(
        &p,
        "cluster.a.circuit_breakers.default.rq_pending_open",
        |v| v == Some(0),
    )
    .await;
    let lines = p.log_lines(&log, 3).await;
    assert!(
        lines
            .contains(&"503 UO upstream_reset_before_response_started{overflow} /third".to_owned()),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_overflow_keeps_the_response_and_flags_uo() {
    let a = echo("a").await;
    let log = log_path("retries");
    // max_retries 0: no retry may start. The budget cluster: 0% with no
    // minimum concurrency allows none either.
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {max_retries: 0}\n",
    ) + &yaml_cluster(
        "b",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {track_remaining: true, retry_budget: {budget_percent: {value: 0}, min_retry_concurrency: 0}}\n",
    );
    let retry = ", retry_policy: {retry_on: 5xx, num_retries: 2}";
    let routes = route("/a", "a", retry) + &route("/b", "b", retry);
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    for c in ["a", "b"] {
        let r = Http::h1()
            .get(&format!("{}/{c}", p.base()), &[("x-echo-status", "503")])
            .await;
        assert_eq!(r.status, 503, "{c}");
        assert_eq!(
            r.header("x-echo-seen"),
            Some("0"),
            "{c}: the upstream's answer"
        );
        assert_eq!(
            p.stat(&format!("cluster.{c}.upstream_rq_retry_overflow"))
                .await,
            Some(1)
        );
        assert_eq!(
            p.stat(&format!("cluster.{c}.upstream_rq_retry")).await,
            Some(0)
        );
    }
    // With a budget the remaining gauge stays 0, as Envoy.
    assert_eq!(
        p.stat("cluster.b.circuit_breakers.default.remaining_retries")
            .await,
        Some(0)
    );
    let lines = p.log_lines(&log, 2).await;
    assert!(
        lines.contains(&"503 UO via_upstream /a".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"503 UO via_upstream /b".to_owned()),
        "{lines:?}"
    );
}

// ------------------------------------------------- routing priority (HIGH)

/// A route's `priority` picks the cluster's thresholds: with HIGH's
/// `max_requests` at 1, a second concurrent request on the HIGH route
/// overflows while the DEFAULT route (default thresholds) still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_route_overflows_high_max_requests_only() {
    let a = echo("a").await;
    let log = log_path("high_max_requests");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {priority: HIGH, max_requests: 1, track_remaining: true}\n",
    );
    let routes = route("/hi", "a", ", priority: HIGH") + &route("/", "a", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.remaining_rq").await,
        Some(1)
    );
    let slow = spawn_get(
        format!("{}/hi/slow", p.base()),
        vec![("x-echo-delay-ms", "1500".into())],
    );
    wait_stat(&p, "cluster.a.circuit_breakers.high.rq_open", |v| {
        v == Some(1)
    })
    .await;
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.remaining_rq").await,
        Some(0)
    );
    let r = Http::h1().get(&format!("{}/hi/over", p.base()), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (503, OVERFLOW_BODY));
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(
        p.stat("cluster.a.upstream_rq_active_overflow").await,
        Some(1)
    );
    // The same concurrency on the DEFAULT route is within its limits.
    let d = Http::h1().get(&format!("{}/default", p.base()), &[]).await;
    assert_eq!(d.status, 200);
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.rq_open").await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.a.upstream_rq_active_overflow").await,
        Some(1)
    );
    assert_eq!(slow.await.expect("slow").status, 200);
    wait_stat(&p, "cluster.a.circuit_breakers.high.rq_open", |v| {
        v == Some(0)
    })
    .await;
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.remaining_rq").await,
        Some(1)
    );
    let lines = p.log_lines(&log, 3).await;
    for want in [
        "503 UO upstream_reset_before_response_started{overflow} /hi/over",
        "200 - via_upstream /default",
        "200 - via_upstream /hi/slow",
    ] {
        assert!(lines.contains(&want.to_owned()), "{want}: {lines:?}");
    }
}

/// The reverse: DEFAULT's `max_requests` at 1 overflows the DEFAULT route
/// while a HIGH route (default HIGH thresholds) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_route_overflow_leaves_the_high_route_alone() {
    let a = echo("a").await;
    let log = log_path("default_max_requests");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {priority: DEFAULT, max_requests: 1}\n      - {priority: HIGH, max_requests: 100, track_remaining: true}\n",
    );
    let routes = route("/hi", "a", ", priority: HIGH") + &route("/", "a", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    let slow = spawn_get(
        format!("{}/slow", p.base()),
        vec![("x-echo-delay-ms", "1500".into())],
    );
    wait_stat(&p, "cluster.a.circuit_breakers.default.rq_open", |v| {
        v == Some(1)
    })
    .await;
    let r = Http::h1().get(&format!("{}/over", p.base()), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (503, OVERFLOW_BODY));
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    let h = Http::h1().get(&format!("{}/hi/ok", p.base()), &[]).await;
    assert_eq!(h.status, 200);
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.rq_open").await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.remaining_rq").await,
        Some(100)
    );
    assert_eq!(
        p.stat("cluster.a.upstream_rq_active_overflow").await,
        Some(1)
    );
    assert_eq!(slow.await.expect("slow").status, 200);
    let lines = p.log_lines(&log, 3).await;
    for want in [
        "503 UO upstream_reset_before_response_started{overflow} /over",
        "200 - via_upstream /hi/ok",
    ] {
        assert!(lines.contains(&want.to_owned()), "{want}: {lines:?}");
    }
}

/// HIGH routes take their connections from the cluster's HIGH pool, under
/// HIGH's `max_connections` and `max_pending_requests`; a DEFAULT route
/// never reuses them (Envoy keys connection pools by priority).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_connections_come_from_their_own_pool() {
    let a = echo("a").await;
    let log = log_path("high_pool");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {priority: HIGH, max_connections: 1, max_pending_requests: 1, track_remaining: true}\n",
    );
    let routes = route("/hi", "a", ", priority: HIGH") + &route("/", "a", "");
    // One worker, as the Envoy target: pools are per worker.
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    let p = Proxy::start_with(Target::from_env(), opts, |ports| {
        http_config(ports, &log, &routes, &clusters)
    });
    // A warm HIGH connection, idle afterwards.
    let w = Http::h1().get(&format!("{}/hi/warm", p.base()), &[]).await;
    assert_eq!(w.status, 200);
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.cx_open").await,
        Some(1)
    );
    // The DEFAULT route does not take it: a connection of its own.
    let d = Http::h1().get(&format!("{}/default", p.base()), &[]).await;
    assert_eq!(d.status, 200);
    assert_eq!(p.stat("cluster.a.upstream_cx_total").await, Some(2));
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.cx_open").await,
        Some(0)
    );
    // A slow HIGH request holds the HIGH connection (reused).
    let first = spawn_get(
        format!("{}/hi/first", p.base()),
        vec![("x-echo-delay-ms", "1500".into())],
    );
    wait_stat(&p, "cluster.a.upstream_rq_active", |v| v == Some(1)).await;
    // The next HIGH request waits for it, at HIGH's pending limit.
    let second = spawn_get(format!("{}/hi/second", p.base()), vec![]);
    wait_stat(&p, "cluster.a.circuit_breakers.high.rq_pending_open", |v| {
        v == Some(1)
    })
    .await;
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.remaining_pending")
            .await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.high.remaining_cx").await,
        Some(0)
    );
    assert!(p.stat("cluster.a.upstream_cx_overflow").await.unwrap_or(0) >= 1);
    // A third finds HIGH's pending queue full...
    let r = Http::h1().get(&format!("{}/hi/third", p.base()), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (503, OVERFLOW_BODY));
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(
        p.stat("cluster.a.upstream_rq_pending_overflow").await,
        Some(1)
    );
    // ...while the DEFAULT route still passes.
    let d2 = Http::h1().get(&format!("{}/default2", p.base()), &[]).await;
    assert_eq!(d2.status, 200);
    assert_eq!(
        p.stat("cluster.a.circuit_breakers.default.rq_pending_open")
            .await,
        Some(0)
    );
    assert_eq!(first.await.expect("first").status, 200);
    assert_eq!(second.await.expect("second").status, 200);
    // Both HIGH requests used the one HIGH connection.
    assert_eq!(p.stat("cluster.a.upstream_cx_total").await, Some(2));
    wait_stat(&p, "cluster.a.circuit_breakers.high.rq_pending_open", |v| {
        v == Some(0)
    })
    .await;
    let lines = p.log_lines(&log, 6).await;
    assert!(
        lines.contains(
            &"503 UO upstream_reset_before_response_started{overflow} /hi/third".to_owned()
        ),
        "{lines:?}"
    );
}

/// Retries on a HIGH route count against HIGH's `max_retries` or retry
/// budget; the DEFAULT route keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_route_uses_high_retry_limits() {
    let a = echo("a").await;
    let log = log_path("high_retries");
    let clusters = yaml_cluster(
        "a",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {priority: HIGH, max_retries: 0}\n",
    ) + &yaml_cluster(
        "b",
        &[a.port()],
        "    circuit_breakers:\n      thresholds:\n      - {priority: HIGH, track_remaining: true, retry_budget: {budget_percent: {value: 0}, min_retry_concurrency: 0}}\n",
    );
    let retry = "retry_policy: {retry_on: 5xx, num_retries: 2}";
    let routes = route("/a/hi", "a", &format!(", priority: HIGH, {retry}"))
        + &route("/b/hi", "b", &format!(", priority: HIGH, {retry}"))
        + &route("/a", "a", &format!(", {retry}"));
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    for c in ["a", "b"] {
        let r = Http::h1()
            .get(&format!("{}/{c}/hi", p.base()), &[("x-echo-status", "503")])
            .await;
        assert_eq!(r.status, 503, "{c}");
        assert_eq!(r.header("x-echo-seen"), Some("0"), "{c}");
        assert_eq!(
            p.stat(&format!("cluster.{c}.upstream_rq_retry_overflow"))
                .await,
            Some(1),
            "{c}"
        );
    }
    assert_eq!(
        p.stat("cluster.b.circuit_breakers.high.remaining_retries")
            .await,
        Some(0)
    );
    // DEFAULT keeps Envoy's default max_retries (3): both retries run.
    let r = Http::h1()
        .get(
            &format!("{}/a/default", p.base()),
            &[("x-echo-status", "503")],
        )
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(p.stat("cluster.a.upstream_rq_retry").await, Some(2));
    assert_eq!(
        p.stat("cluster.a.upstream_rq_retry_overflow").await,
        Some(1)
    );
    let lines = p.log_lines(&log, 3).await;
    for want in ["503 UO via_upstream /a/hi", "503 UO via_upstream /b/hi"] {
        assert!(lines.contains(&want.to_owned()), "{want}: {lines:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" /a/default") && !l.contains("UO")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_connections_count_against_max_connections() {
    let up = weir_tests::tcp::tcp_echo_server().await.expect("tcp echo");
    let log = log_path("tcp");
    let tcp = format!(
        r#"      - name: tcp
        typed_config:
          "@type": {TCP_PROXY}
          stat_prefix: t
          cluster: e
{access}"#,
        access = yaml_file_log(&log, "%RESPONSE_FLAGS%", 10),
    );
    let cluster = yaml_cluster(
        "e",
        &[up.port()],
        "    circuit_breakers:\n      thresholds:\n      - {max_connections: 1}\n",
    );
    let p = Proxy::start(|p| yaml_bootstrap(p, "", &tcp, &cluster));
    let mut first = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    first.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), first.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"ping");
    wait_stat(&p, "cluster.e.circuit_breakers.default.cx_open", |v| {
        v == Some(1)
    })
    .await;
    // The second connection is closed at once.
    let mut second = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0)) || n.is_err(), "{n:?}");
    assert_eq!(p.stat("cluster.e.upstream_cx_overflow").await, Some(1));
    drop(first);
    wait_stat(&p, "cluster.e.circuit_breakers.default.cx_open", |v| {
        v == Some(0)
    })
    .await;
    let lines = p.log_lines(&log, 2).await;
    assert!(lines.contains(&"UO".to_owned()), "{lines:?}");
}

// ----------------------------------------------------------- outlier detection

/// An HTTP/1.1 upstream answering every request with the status in
/// `status` (changeable while it runs) and its `name` in `x-upstream`.
struct StatusServer {
    port: u16,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    async fn start(name: &'static str, status: u16) -> StatusServer {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let st = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(status));
        let shared = st.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let code = st.load(Ordering::Relaxed);
                        async move {
                            http::Response::builder()
                                .status(code)
                                .header("x-upstream", name)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        StatusServer {
            port,
            status: st,
            task,
        }
    }

    fn set(&self, status: u16) {
        self.status
            .store(status, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `health_flags` of `port` in cluster `c` from admin `/clusters`.
async fn health_flags(p: &Proxy, c: &str, port: u16) -> String {
    let r = p.admin("GET", "/clusters").await;
    let key = format!("{c}::127.0.0.1:{port}::health_flags::");
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&key).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {key} in /clusters:\n{}", r.text()))
}

/// Sends GETs to `path` until the outlier detector ejected a host (at most
/// 40 requests); returns the statuses seen.
async fn until_ejected(p: &Proxy, path: &str) -> Vec<u16> {
    let mut seen = Vec::new();
    for _ in 0..40 {
        let r = Http::h1().get(&format!("{}{path}", p.base()), &[]).await;
        seen.push(r.status);
        if p.stat("cluster.c.outlier_detection.ejections_active").await == Some(1) {
            return seen;
        }
    }
    panic!("no ejection after {seen:?}");
}

fn od_cluster(ports: &[u16], od: &str, extra: &str) -> String {
    yaml_cluster(
        "c",
        ports,
        &format!("    outlier_detection: {{{od}}}\n{extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_a_host_until_base_ejection_time() {
    let good = StatusServer::start("good", 200).await;
    let bad = StatusServer::start("bad", 500).await;
    let log = log_path("od_5xx");
    let clusters = od_cluster(
        &[good.port, bad.port],
        "consecutive_5xx: 3, interval: 0.1s, base_ejection_time: 1s, max_ejection_percent: 100",
        "",
    );
    let routes = route("/", "c", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    assert_eq!(
        p.stat("cluster.c.outlier_detection.ejections_active").await,
        Some(0)
    );
    assert_eq!(health_flags(&p, "c", bad.port).await, "healthy");
    let seen = until_ejected(&p, "/").await;
    assert_eq!(seen.iter().filter(|s| **s == 500).count(), 3, "{seen:?}");
    assert_eq!(
        health_flags(&p, "c", bad.port).await,
        "/failed_outlier_check"
    );
    assert_eq!(health_flags(&p, "c", good.port).await, "healthy");
    for (s, v) in [
        ("ejections_enforced_consecutive_5xx", 1),
        ("ejections_detected_consecutive_5xx", 1),
        ("ejections_enforced_total", 1),
        ("ejections_total", 1),
        ("ejections_consecutive_5xx", 1),
        ("ejections_overflow", 0),
        ("ejections_detected_consecutive_gateway_failure", 0),
    ] {
        let n = format!("cluster.c.outlier_detection.{s}");
        assert_eq!(p.stat(&n).await, Some(v), "{n}");
    }
    assert_eq!(p.stat("cluster.c.membership_healthy").await, Some(1));
    // Only the good host is used while the bad one is ejected.
    for _ in 0..6 {
        let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
        assert_eq!((r.status, r.header("x-upstream")), (200, Some("good")));
    }
    // It has recovered; after base_ejection_time it is back.
    bad.set(200);
    wait_stat(&p, "cluster.c.outlier_detection.ejections_active", |v| {
        v == Some(0)
    })
    .await;
    assert_eq!(health_flags(&p, "c", bad.port).await, "healthy");
    assert_eq!(p.stat("cluster.c.membership_healthy").await, Some(2));
    let mut upstreams = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        upstreams.insert(r.header("x-upstream").unwrap_or_default().to_owned());
    }
    assert!(upstreams.contains("bad"), "{upstreams:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_gateway_failures_eject_when_enforced() {
    let good = StatusServer::start("good", 200).await;
    let bad = StatusServer::start("bad", 503).await;
    let log = log_path("od_gw");
    let clusters = od_cluster(
        &[good.port, bad.port],
        "consecutive_5xx: 100, consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100, interval: 0.1s, base_ejection_time: 30s, max_ejection_percent: 100",
        "",
    );
    let routes = route("/", "c", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    let seen = until_ejected(&p, "/").await;
    assert_eq!(seen.iter().filter(|s| **s == 503).count(), 2, "{seen:?}");
    for (s, v) in [
        ("ejections_enforced_consecutive_gateway_failure", 1),
        ("ejections_detected_consecutive_gateway_failure", 1),
        ("ejections_enforced_total", 1),
        ("ejections_enforced_consecutive_5xx", 0),
        // The deprecated total counts only 5xx and success-rate ejections.
        ("ejections_total", 0),
    ] {
        let n = format!("cluster.c.outlier_detection.{s}");
        assert_eq!(p.stat(&n).await, Some(v), "{n}");
    }
    assert_eq!(
        health_flags(&p, "c", bad.port).await,
        "/failed_outlier_check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_origin_failures_split_from_5xx() {
    let good = StatusServer::start("good", 200).await;
    // A port nothing listens on: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let log = log_path("od_local");
    let clusters = od_cluster(
        &[good.port, dead],
        "split_external_local_origin_errors: true, consecutive_local_origin_failure: 2, interval: 0.1s, base_ejection_time: 30s, max_ejection_percent: 100",
        "",
    );
    let routes = route("/", "c", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    let seen = until_ejected(&p, "/").await;
    assert_eq!(seen.iter().filter(|s| **s == 503).count(), 2, "{seen:?}");
    for (s, v) in [
        ("ejections_enforced_consecutive_local_origin_failure", 1),
        ("ejections_detected_consecutive_local_origin_failure", 1),
        ("ejections_detected_consecutive_5xx", 0),
        ("ejections_detected_consecutive_gateway_failure", 0),
    ] {
        let n = format!("cluster.c.outlier_detection.{s}");
        assert_eq!(p.stat(&n).await, Some(v), "{n}");
    }
    assert_eq!(health_flags(&p, "c", dead).await, "/failed_outlier_check");
    for _ in 0..4 {
        let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 200);
    }
}

/// Istio's DestinationRule `outlierDetection` (consecutive5xxErrors,
/// consecutiveGatewayErrors, interval, baseEjectionTime,
/// maxEjectionPercent) with `minHealthPercent` (healthy_panic_threshold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_outlier_fields_and_panic_threshold() {
    let a = StatusServer::start("a", 502).await;
    let b = StatusServer::start("b", 502).await;
    let log = log_path("od_istio");
    let istio = "consecutive_5xx: 2, enforcing_consecutive_5xx: 100, consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100, enforcing_success_rate: 0, interval: 0.1s, base_ejection_time: 30s";
    // At most half the hosts: the second ejection overflows.
    let capped = od_cluster(
        &[a.port, b.port],
        &format!("{istio}, max_ejection_percent: 50"),
        "",
    );
    // Every host may go; with no panic threshold nothing is left.
    let all = yaml_cluster(
        "d",
        &[a.port, b.port],
        &format!("    outlier_detection: {{{istio}, max_ejection_percent: 100}}\n    common_lb_config: {{healthy_panic_threshold: {{value: 0}}}}\n"),
    );
    let clusters = capped + &all;
    let routes = route("/d", "d", "") + &route("/", "c", "");
    let p = Proxy::start(|ports| http_config(ports, &log, &routes, &clusters));
    until_ejected(&p, "/").await;
    for _ in 0..6 {
        let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 502);
    }
    assert_eq!(
        p.stat("cluster.c.outlier_detection.ejections_active").await,
        Some(1)
    );
    assert!(
        p.stat("cluster.c.outlier_detection.ejections_overflow")
            .await
            .unwrap_or(0)
            >= 1
    );
    // Every host of d may be ejected. With all of them out (and even a 0%
    // panic threshold) Envoy still balances over them.
    for _ in 0..20 {
        Http::h1().get(&format!("{}/d", p.base()), &[]).await;
        if p.stat("cluster.d.outlier_detection.ejections_active").await == Some(2) {
            break;
        }
    }
    assert_eq!(
        p.stat("cluster.d.outlier_detection.ejections_active").await,
        Some(2)
    );
    assert_eq!(health_flags(&p, "d", a.port).await, "/failed_outlier_check");
    assert_eq!(health_flags(&p, "d", b.port).await, "/failed_outlier_check");
    assert_eq!(p.stat("cluster.d.membership_healthy").await, Some(0));
    for _ in 0..4 {
        let r = Http::h1().get(&format!("{}/d", p.base()), &[]).await;
        assert_eq!(r.status, 502);
    }
}
