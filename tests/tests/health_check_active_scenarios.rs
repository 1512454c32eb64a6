//! Active health checking (cluster `health_checks`) with real upstreams:
//! HTTP checks against echo upstreams whose default status the test
//! flips, TCP connect-only checks against a live and a closed port. Every
//! test runs against weir in-process by default and against real Envoy
//! with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`). Health
//! is read from the admin `/clusters` flags and the
//! `cluster.<c>.health_check.*` stats; every wait is bounded.
use std::time::Duration;

use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, chain, cluster, hcm, listener, route, stat_is, vhost, wait_stat,
};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream;

/// Common fields with short intervals (also while the cluster has no
/// traffic, so both proxies check at the same pace).
fn common(extra: Value) -> Value {
    weir_tests::config::merge(
        json!({
            "timeout": "1s", "interval": "0.1s", "no_traffic_interval": "0.1s",
            "unhealthy_threshold": 2, "healthy_threshold": 2,
        }),
        extra,
    )
}

fn start(ports: Vec<u16>, hc: Value) -> Proxy {
    Proxy::start(move |p| {
        bootstrap(
            p,
            vec![listener(
                "l",
                p.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![route("/", "c", json!({}))], json!({}))],
                    json!({}),
                )])],
            )],
            vec![cluster("c", &ports, json!({"health_checks": [hc.clone()]}))],
        )
    })
}

/// The `health_flags` of `port` in `/clusters`, once it satisfies `ok`
/// (about 3 s at most); the last value either way.
async fn flags(p: &Proxy, port: u16, ok: impl Fn(&str) -> bool) -> String {
    let key = format!("c::127.0.0.1:{port}::health_flags::");
    let mut last = String::new();
    for _ in 0..150 {
        let t = p.admin("GET", "/clusters").await.text();
        last = t
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or("")
            .to_owned();
        if ok(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn http_check_fails_a_503_host_and_recovers() {
    let a = upstream::http1("a").await.expect("a");
    let b = upstream::http1("b").await.expect("b");
    b.set_default_status(503);
    let p = start(
        vec![a.port(), b.port()],
        common(json!({"http_health_check": {"path": "/healthz"}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, a.port(), |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    // The check request: GET path, Host = the cluster name, Envoy's agent.
    let hc = a.wait_requests(1).await;
    let first = hc.first().expect("a was checked");
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("GET", "/healthz")
    );
    let host = first
        .headers
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.as_str());
    assert_eq!(host, Some("c"));
    let agent = first
        .headers
        .iter()
        .find(|(k, _)| k == "user-agent")
        .map(|(_, v)| v.as_str());
    assert_eq!(agent, Some("Envoy/HC"));

    // b gets no traffic while failed.
    let http = Http::h1();
    for _ in 0..10 {
        let r = http.get(&format!("{}/x", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().upstream, "a");
    }
    let failures = p.stat("cluster.c.health_check.failure").await.unwrap_or(0);
    assert!(failures >= 1, "failure = {failures}");
    // Envoy 1.40 also counts some network failures against the 503 host
    // here (weir counts none: its connection stays up); only bound them.
    let nf = p
        .stat("cluster.c.health_check.network_failure")
        .await
        .unwrap_or(0);
    assert!(nf <= failures, "network_failure {nf} > failure {failures}");
    assert_eq!(
        p.stat("cluster.c.health_check.passive_failure").await,
        Some(0)
    );
    assert_eq!(
        p.stat("cluster.c.health_check.verify_cluster").await,
        Some(0)
    );

    // Recovery after healthy_threshold passes; then both take traffic.
    b.set_default_status(0);
    stat_is(&p, "cluster.c.health_check.healthy", 2).await;
    assert_eq!(flags(&p, b.port(), |f| f == "healthy").await, "healthy");
    let mut seen_b = false;
    for _ in 0..20 {
        let r = http.get(&format!("{}/x", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        seen_b |= r.echo().upstream == "b";
    }
    // Envoy 1.40 was seen sending all of these to a although /clusters
    // shows b healthy (open question, see ARCHITECTURE.md); weir balances.
    if !p.target().is_envoy() {
        assert!(seen_b, "b takes traffic again");
    }
    let attempts = p.stat("cluster.c.health_check.attempt").await.unwrap_or(0);
    let success = p.stat("cluster.c.health_check.success").await.unwrap_or(0);
    let failure = p.stat("cluster.c.health_check.failure").await.unwrap_or(0);
    assert!(success >= 3, "success = {success}");
    // A check may be in flight between the reads.
    assert!(
        attempts >= success + failure,
        "{attempts} < {success} + {failure}"
    );

    // A healthy host answering an unexpected status is failed at once
    // (not after unhealthy_threshold).
    b.set_default_status(500);
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
}

#[tokio::test]
async fn expected_statuses_ranges_decide_health() {
    let a = upstream::http1("a").await.expect("a");
    let b = upstream::http1("b").await.expect("b");
    a.set_default_status(204);
    b.set_default_status(200);
    // [204, 205) only: 200 is not expected.
    let p = start(
        vec![a.port(), b.port()],
        common(json!({"http_health_check": {
            "path": "/ready", "host": "hc.example",
            "expected_statuses": [{"start": 204, "end": 205}],
        }})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, a.port(), |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, b.port(), |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let hc = b.wait_requests(1).await;
    let host = hc[0]
        .headers
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.as_str());
    assert_eq!(host, Some("hc.example"));
}

#[tokio::test]
async fn a_host_refusing_connections_is_failed() {
    let a = upstream::http1("a").await.expect("a");
    let closed = closed_port();
    let p = start(
        vec![a.port(), closed],
        common(json!({"http_health_check": {"path": "/healthz"}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(
        flags(&p, closed, |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let nf = wait_stat(&p, "cluster.c.health_check.network_failure", |v| {
        v.unwrap_or(0) >= 2
    })
    .await;
    assert!(nf.unwrap_or(0) >= 2, "network_failure = {nf:?}");
    let http = Http::h1();
    for _ in 0..6 {
        let r = http.get(&format!("{}/x", p.base()), &[]).await;
        assert_eq!((r.status, r.echo().upstream.as_str()), (200, "a"));
    }
}

#[tokio::test]
async fn tcp_connect_only_check() {
    let live = upstream::http1("live").await.expect("live");
    let closed = closed_port();
    let p = start(
        vec![live.port(), closed],
        common(json!({"tcp_health_check": {}})),
    );
    stat_is(&p, "cluster.c.health_check.healthy", 1).await;
    assert_eq!(flags(&p, live.port(), |f| f == "healthy").await, "healthy");
    assert_eq!(
        flags(&p, closed, |f| f == "/failed_active_hc").await,
        "/failed_active_hc"
    );
    let s = wait_stat(&p, "cluster.c.health_check.success", |v| {
        v.unwrap_or(0) >= 2
    })
    .await;
    assert!(s.unwrap_or(0) >= 2, "success = {s:?}");
    let nf = p
        .stat("cluster.c.health_check.network_failure")
        .await
        .unwrap_or(0);
    assert!(nf >= 1, "network_failure = {nf}");
}
