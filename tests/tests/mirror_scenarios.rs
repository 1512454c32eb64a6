//! Route `request_mirror_policies` (request shadowing) with real upstreams:
//! a primary echo upstream whose answer the client gets, and a shadow echo
//! upstream that records what it was sent.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test mirror_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test mirror_scenarios
//! ```
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use weir_tests::config::{bootstrap, chain, cluster, hcm, listener, route, stat_is, vhost};
use weir_tests::scenario::{echo_header, Http, Proxy};
use weir_tests::upstream::{self, EchoView};

/// A proxy routing `/` to `main` with `mirrors` (request mirror policies),
/// and clusters `main` and `shadow`.
async fn proxy(mirrors: Value) -> (Proxy, upstream::EchoServer, upstream::EchoServer) {
    let main = upstream::http1("main").await.expect("main upstream");
    let shadow = upstream::http1("shadow").await.expect("shadow upstream");
    let (mp, sp) = (main.port(), shadow.port());
    let p = Proxy::start(move |ports| {
        let r = route(
            "/",
            "main",
            json!({"route": {"cluster": "main", "request_mirror_policies": mirrors.clone()}}),
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
            vec![
                cluster("main", &[mp], json!({})),
                cluster("shadow", &[sp], json!({})),
            ],
        )
    });
    (p, main, shadow)
}

fn host(v: &EchoView) -> Option<&str> {
    echo_header(v, "host")
}

/// Every request is copied to the shadow cluster with `-shadow` appended
/// to the host name (before a port), the same method, path, headers and
/// body; the client gets the primary's answer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_shadowed_with_the_shadow_host() {
    let (p, main, shadow) = proxy(json!([{"cluster": "shadow"}])).await;
    let c = Http::h1();
    let url = format!("{}/a?x=1", p.base());
    let r = c
        .get(&url, &[("host", "api.example.com:8080"), ("x-tag", "t1")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().upstream, "main");
    let r = c
        .send(
            "POST",
            &format!("{}/b", p.base()),
            &[("host", "svc"), ("x-tag", "t2")],
            Bytes::from_static(b"hello shadow"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().upstream, "main");
    let got = shadow.wait_requests(2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let (a, b) = (&got[0], &got[1]);
    assert_eq!((a.method.as_str(), a.path.as_str()), ("GET", "/a?x=1"));
    assert_eq!(host(a), Some("api.example.com-shadow:8080"));
    assert_eq!(echo_header(a, "x-tag"), Some("t1"));
    assert_eq!((b.method.as_str(), b.path.as_str()), ("POST", "/b"));
    assert_eq!(host(b), Some("svc-shadow"));
    assert_eq!(echo_header(b, "x-tag"), Some("t2"));
    assert_eq!(b.body_len, 12);
    // The primary saw the original host.
    let m = main.requests();
    assert_eq!(host(&m[0]), Some("api.example.com:8080"));
    stat_is(&p, "cluster.shadow.upstream_rq_2xx", 2).await;
    stat_is(&p, "cluster.shadow.upstream_rq_total", 2).await;
}

/// `runtime_fraction` 0% never shadows; `cluster_header` names the shadow
/// cluster per request (an unknown one is skipped);
/// `disable_shadow_host_suffix_append` keeps the host; header mutations
/// apply to the copy only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraction_cluster_header_and_mutations() {
    let (p, main, shadow) = proxy(json!([
        {"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 0}}},
        {"cluster_header": "x-mirror-to", "disable_shadow_host_suffix_append": true,
         "request_headers_mutations": [
            {"append": {"header": {"key": "x-shadow", "value": "yes"}}},
            {"remove": "x-secret"},
         ]},
    ]))
    .await;
    let c = Http::h1();
    let base = p.base();
    let r = c
        .get(
            &format!("{base}/1"),
            &[("host", "h1"), ("x-mirror-to", "shadow"), ("x-secret", "s")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c
        .get(
            &format!("{base}/2"),
            &[("host", "h2"), ("x-mirror-to", "nope")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c.get(&format!("{base}/3"), &[("host", "h3")]).await;
    assert_eq!(r.status, 200);
    let got = shadow.wait_requests(1).await;
    // Give a stray second copy time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got2 = shadow.requests();
    assert_eq!(got2.len(), 1, "{got2:?}");
    let s = &got[0];
    assert_eq!(s.path, "/1");
    assert_eq!(host(s), Some("h1"));
    assert_eq!(echo_header(s, "x-shadow"), Some("yes"));
    assert_eq!(echo_header(s, "x-secret"), None);
    let m = main.requests();
    assert_eq!(m.len(), 3);
    assert_eq!(echo_header(&m[0], "x-shadow"), None);
    assert_eq!(echo_header(&m[0], "x-secret"), Some("s"));
}
