//! Host selection beyond the balancing policy proper: the `override_host`
//! typed policy (hosts named by a request header or by dynamic metadata,
//! then its `fallback_policy`), zone-aware routing against the bootstrap's
//! `cluster_manager.local_cluster_name`, and bounded loads on consistent
//! hashing (`hash_balance_factor`).
//!
//! Real echo upstreams name themselves; shares are counted over bounded
//! request runs, and zone-aware routing is checked with Envoy's per-pick
//! counters (`lb_zone_routing_all_directly`, `_sampled`, `_cross_zone`,
//! `lb_local_cluster_not_ok`), which must equal the responses each zone
//! gave. The counters Envoy bumps when it rebuilds the routing state
//! (`lb_recalculate_zone_structures`, `lb_zone_cluster_too_small`) count
//! once per load balancer instance in Envoy (main thread and each worker)
//! and once per host set in weir: they are only checked to be non-zero.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`:
//!
//! ```sh
//! cargo test -p weir-tests --test lb_zone_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test lb_zone_scenarios
//! ```
use std::collections::BTreeMap;

use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, bootstrap_with, chain, filter, hcm, listener, merge, sock, stat_is, wait_stat,
};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream::{self, EchoServer};

const OVERRIDE_HOST: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost";
const ROUND_ROBIN: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const EXT_AUTHZ: &str = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";

/// `n` echo upstreams named `u0`, `u1`, ...
async fn upstreams(n: usize) -> Vec<EchoServer> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(upstream::http1(&format!("u{i}")).await.expect("echo"));
    }
    out
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A listener routing `/` to cluster `c` (`route`: more route action
/// fields) behind `http_filters`.
fn ingress(port: u16, http_filters: Vec<Value>, route: Value) -> Value {
    let r = json!({"match": {"prefix": "/"}, "route": merge(json!({"cluster": "c"}), route)});
    listener(
        "l",
        port,
        vec![chain(vec![hcm(
            "ingress",
            http_filters,
            vec![json!({"name": "vh", "domains": ["*"], "routes": [r]})],
            json!({}),
        )])],
    )
}

/// How many of `n` requests (with `headers`) each upstream answered (every
/// one must be 200).
async fn spread(p: &Proxy, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
    let c = Http::h1();
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let r = c.get(&format!("{}/", p.base()), headers).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *out.entry(r.echo().upstream).or_default() += 1;
    }
    out
}

fn count(s: &BTreeMap<String, usize>, u: &str) -> usize {
    s.get(u).copied().unwrap_or(0)
}

// --- override_host ----------------------------------------------------

/// The `override_host` policy with `sources`, falling back to round robin.
fn override_policy(sources: Value) -> Value {
    json!({"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": OVERRIDE_HOST,
            "override_host_sources": sources,
            "fallback_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.round_robin",
                "typed_config": {"@type": ROUND_ROBIN},
            }}]},
        },
    }}]})
}

/// Cluster `c` over `endpoints` (LbEndpoint JSON) with the override
/// policy reading header `x-dest`.
fn override_cluster(endpoints: Vec<Value>) -> Value {
    json!({
        "name": "c", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": endpoints}]},
        "load_balancing_policy": override_policy(json!([{"header": "x-dest"}])),
    })
}

fn ep(port: u16) -> Value {
    json!({"endpoint": {"address": sock(port)}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_header_names_the_host() {
    let us = upstreams(3).await;
    let eps: Vec<Value> = us.iter().map(|u| ep(u.port())).collect();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![ingress(ports.listen, vec![], json!({}))],
            vec![override_cluster(eps.clone())],
        )
    });
    // The named host, every time.
    let b = addr(us[1].port());
    let s = spread(&p, 12, &[("x-dest", &b)]).await;
    assert_eq!(count(&s, "u1"), 12, "{s:?}");
    // No header: the fallback round robin spreads over all three.
    let s = spread(&p, 30, &[]).await;
    for u in ["u0", "u1", "u2"] {
        assert!(count(&s, u) >= 5, "{u}: {s:?}");
    }
    // A list: entries not in the cluster are skipped (blanks and spaces
    // around entries too).
    let list = format!("10.255.255.1:80, ,  {} ,{}", addr(us[2].port()), b);
    let s = spread(&p, 6, &[("x-dest", &list)]).await;
    assert_eq!(count(&s, "u2"), 6, "{s:?}");
    // Only unknown or malformed entries: the fallback policy.
    for bad in [
        addr(dead_port()),
        format!("localhost:{}", us[0].port()),
        "not an address".to_owned(),
    ] {
        let s = spread(&p, 30, &[("x-dest", &bad)]).await;
        for u in ["u0", "u1", "u2"] {
            assert!(count(&s, u) >= 5, "{bad}: {u}: {s:?}");
        }
    }
}

/// As Envoy (its host map lookup does not check health): a named host is
/// used even when EDS marks it unhealthy, which the fallback never picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_ignores_host_health() {
    let us = upstreams(3).await;
    let mut eps: Vec<Value> = us.iter().map(|u| ep(u.port())).collect();
    eps[1]["health_status"] = json!("UNHEALTHY");
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![ingress(ports.listen, vec![], json!({}))],
            vec![override_cluster(eps.clone())],
        )
    });
    let s = spread(&p, 5, &[("x-dest", &addr(us[1].port()))]).await;
    assert_eq!(count(&s, "u1"), 5, "{s:?}");
    let s = spread(&p, 20, &[]).await;
    assert_eq!(count(&s, "u1"), 0, "{s:?}");
    assert!(count(&s, "u0") >= 5 && count(&s, "u2") >= 5, "{s:?}");
}

/// Each try takes the next named host; once the list is used up the
/// fallback policy picks (with the retry host predicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_list_serves_retries() {
    let us = upstreams(2).await;
    let dead = dead_port();
    let eps = vec![ep(dead), ep(us[0].port()), ep(us[1].port())];
    let retry = json!({"retry_policy": {
        "retry_on": "connect-failure", "num_retries": 1,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }],
        "host_selection_retry_max_attempts": 5,
    }});
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![ingress(ports.listen, vec![], retry.clone())],
            vec![override_cluster(eps.clone())],
        )
    });
    // The dead host first, then the second named host.
    let list = format!("{},{}", addr(dead), addr(us[1].port()));
    let s = spread(&p, 4, &[("x-dest", &list)]).await;
    assert_eq!(count(&s, "u1"), 4, "{s:?}");
    stat_is(&p, "cluster.c.upstream_rq_retry", 4).await;
    // Only the dead host named: the retry falls back to round robin,
    // which avoids the host already tried.
    let s = spread(&p, 6, &[("x-dest", &addr(dead))]).await;
    assert_eq!(count(&s, "u0") + count(&s, "u1"), 6, "{s:?}");
    stat_is(&p, "cluster.c.upstream_rq_retry", 10).await;
}

/// The `metadata` source: an address ext_authz put in the request's
/// dynamic metadata (`dynamic_metadata_from_headers` of its HTTP service;
/// the echo authorization server copies it from the check request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_from_dynamic_metadata() {
    let us = upstreams(3).await;
    let authz = upstream::http1("authz").await.expect("authz");
    let eps: Vec<Value> = us.iter().map(|u| ep(u.port())).collect();
    let authz_port = authz.port();
    let p = Proxy::start(move |ports| {
        let mut c = override_cluster(eps.clone());
        c["load_balancing_policy"] = override_policy(json!([
            {"metadata": {"key": "envoy.filters.http.ext_authz", "path": [{"key": "x-dest"}]}},
            {"header": "x-dest"},
        ]));
        let authz_filter = filter(
            "envoy.filters.http.ext_authz",
            EXT_AUTHZ,
            json!({"http_service": {
                "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "2s"},
                "authorization_request": {
                    "allowed_headers": {"patterns": [{"exact": "x-echo-header-x-dest"}]},
                },
                "authorization_response": {
                    "dynamic_metadata_from_headers": {"patterns": [{"exact": "x-dest"}]},
                },
            }}),
        );
        bootstrap(
            ports,
            vec![ingress(ports.listen, vec![authz_filter], json!({}))],
            vec![
                c,
                json!({
                    "name": "authz", "type": "STATIC", "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "authz", "endpoints": [{"lb_endpoints": [ep(authz_port)]}]},
                }),
            ],
        )
    });
    let want = addr(us[2].port());
    let s = spread(&p, 6, &[("x-echo-header-x-dest", &want)]).await;
    assert_eq!(count(&s, "u2"), 6, "{s:?}");
    // The metadata source comes first: its host wins over the header's.
    let s = spread(
        &p,
        4,
        &[
            ("x-echo-header-x-dest", &want),
            ("x-dest", &addr(us[0].port())),
        ],
    )
    .await;
    assert_eq!(count(&s, "u2"), 4, "{s:?}");
    // No metadata: the header source.
    let s = spread(&p, 4, &[("x-dest", &addr(us[0].port()))]).await;
    assert_eq!(count(&s, "u0"), 4, "{s:?}");
}

/// `selected_host_key`: every pick writes the picked host's `ip:port` to
/// the stream's dynamic metadata (a nested path makes objects), where
/// `%DYNAMIC_METADATA%` finds it, here in a response header: a named host,
/// a fallback pick (Envoy 1.40 writes those too), and a retry after a
/// named dead host (the last pick wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_selected_host_key_names_the_picked_host() {
    let us = upstreams(3).await;
    let dead = dead_port();
    let mut eps: Vec<Value> = us.iter().map(|u| ep(u.port())).collect();
    eps.push(ep(dead));
    let route = json!({"retry_policy": {"retry_on": "connect-failure", "num_retries": 1}});
    let p = Proxy::start(move |ports| {
        let mut c = override_cluster(eps.clone());
        c["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"]
            ["selected_host_key"] =
            json!({"key": "envoy.lb", "path": [{"key": "a"}, {"key": "served"}]});
        let mut l = ingress(ports.listen, vec![], route.clone());
        l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
            ["response_headers_to_add"] = json!([
            {"header": {"key": "x-served", "value": "%DYNAMIC_METADATA(envoy.lb:a:served)%"}},
        ]);
        bootstrap(ports, vec![l], vec![c])
    });
    let h = Http::h1();
    let url = format!("{}/", p.base());
    let named = addr(us[1].port());
    let r = h.get(&url, &[("x-dest", &named)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().upstream, "u1");
    assert_eq!(r.header("x-served"), Some(named.as_str()));
    // No header: the fallback's pick.
    for _ in 0..3 {
        let r = h.get(&url, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let served = r.echo().upstream;
        let i: usize = served[1..].parse().expect("u<i>");
        assert_eq!(r.header("x-served"), Some(addr(us[i].port()).as_str()));
    }
    // The named dead host fails to connect; the retry's pick is written.
    let list = format!("{},{}", addr(dead), addr(us[2].port()));
    let r = h.get(&url, &[("x-dest", &list)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().upstream, "u2");
    assert_eq!(r.header("x-served"), Some(addr(us[2].port()).as_str()));
}

/// A mirror to an `override_host` cluster follows the shadow's headers
/// (Envoy's async client hands them to the load balancer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_on_a_mirror_cluster() {
    let us = upstreams(3).await;
    let main = upstream::http1("main").await.expect("echo");
    let eps: Vec<Value> = us.iter().map(|u| ep(u.port())).collect();
    let main_port = main.port();
    let p = Proxy::start(move |ports| {
        let r = json!({"match": {"prefix": "/"}, "route": {
            "cluster": "main",
            "request_mirror_policies": [{"cluster": "c"}],
        }});
        let l = listener(
            "l",
            ports.listen,
            vec![chain(vec![hcm(
                "ingress",
                vec![],
                vec![json!({"name": "vh", "domains": ["*"], "routes": [r]})],
                json!({}),
            )])],
        );
        let main = json!({
            "name": "main", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "main", "endpoints": [{"lb_endpoints": [ep(main_port)]}]},
        });
        bootstrap(ports, vec![l], vec![main, override_cluster(eps.clone())])
    });
    let s = spread(&p, 4, &[("x-dest", &addr(us[2].port()))]).await;
    assert_eq!(count(&s, "main"), 4, "{s:?}");
    assert_eq!(us[2].wait_requests(4).await.len(), 4);
    stat_is(&p, "cluster.c.upstream_rq_total", 4).await;
    assert!(us[0].requests().is_empty() && us[1].requests().is_empty());
}

// --- zone-aware routing -------------------------------------------------

/// LbEndpoints grouped in localities: (zone, ports, health status).
fn zoned(name: &str, zones: &[(&str, Vec<u16>, &str)], extra: Value) -> Value {
    let localities: Vec<Value> = zones
        .iter()
        .map(|(z, ports, health)| {
            let eps: Vec<Value> = ports
                .iter()
                .map(|p| json!({"endpoint": {"address": sock(*p)}, "health_status": health}))
                .collect();
            json!({"locality": {"zone": z}, "lb_endpoints": eps})
        })
        .collect();
    merge(
        json!({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": localities},
        }),
        extra,
    )
}

/// `n` ports nothing listens on (local cluster members: never connected).
fn dead_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| dead_port()).collect()
}

/// A proxy in zone `node_zone` whose local cluster is `local` and whose
/// cluster `c` is `upstream`.
fn zone_proxy(node_zone: &'static str, local: Value, upstream: Value) -> Proxy {
    Proxy::start(move |ports| {
        bootstrap_with(
            ports,
            vec![ingress(ports.listen, vec![], json!({}))],
            vec![local.clone(), upstream.clone()],
            json!({
                "node": {"id": "zone-node", "cluster": "local", "locality": {"zone": node_zone}},
                "cluster_manager": {"local_cluster_name": "local"},
            }),
        )
    })
}

/// Echo upstreams `u0..u{n}`: the first `n / 2` in zone `za`, the rest in
/// `zb`; returns the upstreams and cluster `c` (with `extra` fields).
async fn two_zone_upstream(n: usize, za: &str, zb: &str, extra: Value) -> (Vec<EchoServer>, Value) {
    let us = upstreams(n).await;
    let ports: Vec<u16> = us.iter().map(EchoServer::port).collect();
    let (a, b) = ports.split_at(n / 2);
    let c = zoned(
        "c",
        &[(za, a.to_vec(), "HEALTHY"), (zb, b.to_vec(), "HEALTHY")],
        extra,
    );
    (us, c)
}

/// Responses from the first half (`u0..u{n/2}`) and the second half.
fn halves(s: &BTreeMap<String, usize>, n: usize) -> (usize, usize) {
    let first: usize = (0..n / 2).map(|i| count(s, &format!("u{i}"))).sum();
    let total: usize = s.values().sum();
    (first, total - first)
}

async fn counter(p: &Proxy, name: &str) -> i64 {
    p.stat(&format!("cluster.c.{name}")).await.unwrap_or(-1)
}

/// The local zone's share of the local cluster (1 of 2) is no more than
/// its share of the upstream (3 of 6): every pick stays in the zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_all_directly() {
    let (_us, c) = two_zone_upstream(6, "a", "b", json!({})).await;
    let d = dead_ports(2);
    let local = zoned(
        "local",
        &[("a", vec![d[0]], "HEALTHY"), ("b", vec![d[1]], "HEALTHY")],
        json!({}),
    );
    let p = zone_proxy("a", local, c);
    let s = spread(&p, 30, &[]).await;
    assert_eq!(halves(&s, 6), (30, 0), "{s:?}");
    for u in ["u0", "u1", "u2"] {
        assert!(count(&s, u) >= 5, "{u}: {s:?}");
    }
    stat_is(&p, "cluster.c.lb_zone_routing_all_directly", 30).await;
    assert_eq!(counter(&p, "lb_zone_routing_sampled").await, 0);
    assert_eq!(counter(&p, "lb_zone_routing_cross_zone").await, 0);
    assert!(counter(&p, "lb_recalculate_zone_structures").await > 0);
    // The local cluster itself does not route by zone.
    assert_eq!(
        p.stat("cluster.local.lb_recalculate_zone_structures").await,
        Some(0)
    );
}

/// 3 of 4 local hosts but half the upstream in the local zone: 2/3 of the
/// picks stay (sampled), the rest cross to the zone with spare capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_residual_split() {
    let (_us, c) = two_zone_upstream(6, "a", "b", json!({})).await;
    let d = dead_ports(4);
    let local = zoned(
        "local",
        &[
            ("a", d[..3].to_vec(), "HEALTHY"),
            ("b", vec![d[3]], "HEALTHY"),
        ],
        json!({}),
    );
    let p = zone_proxy("a", local, c);
    let n = 300;
    let s = spread(&p, n, &[]).await;
    let (near, far) = halves(&s, 6);
    // Expected 200 / 100 (local_percent_to_route 6666 of 10000).
    assert!((160..=240).contains(&near), "{s:?}");
    stat_is(&p, "cluster.c.lb_zone_routing_sampled", near as i64).await;
    stat_is(&p, "cluster.c.lb_zone_routing_cross_zone", far as i64).await;
    assert_eq!(counter(&p, "lb_zone_routing_all_directly").await, 0);
    assert_eq!(counter(&p, "lb_zone_no_capacity_left").await, 0);
}

/// No upstream host in the local zone: every pick crosses, to the zones
/// whose upstream share exceeds their local share (here only `b`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_cross_zone_by_spare_capacity() {
    let (_us, c) = two_zone_upstream(6, "b", "c", json!({})).await;
    let d = dead_ports(4);
    let local = zoned(
        "local",
        &[
            ("a", vec![d[0]], "HEALTHY"),
            ("b", vec![d[1]], "HEALTHY"),
            ("c", d[2..].to_vec(), "HEALTHY"),
        ],
        json!({}),
    );
    let p = zone_proxy("a", local, c);
    let s = spread(&p, 30, &[]).await;
    // Zone b: 50% upstream against 25% local; zone c: 50% against 50%.
    assert_eq!(halves(&s, 6), (30, 0), "{s:?}");
    stat_is(&p, "cluster.c.lb_zone_routing_cross_zone", 30).await;
    assert_eq!(counter(&p, "lb_zone_routing_sampled").await, 0);
}

/// Fewer healthy upstream hosts than `min_cluster_size` (default 6): no
/// zone routing; with `min_cluster_size: 2` the same hosts route by zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_needs_min_cluster_size() {
    for (extra, direct) in [
        (json!({}), false),
        (
            json!({"common_lb_config": {"zone_aware_lb_config": {"min_cluster_size": 2}}}),
            true,
        ),
    ] {
        let (_us, c) = two_zone_upstream(4, "a", "b", extra).await;
        let d = dead_ports(2);
        let local = zoned(
            "local",
            &[("a", vec![d[0]], "HEALTHY"), ("b", vec![d[1]], "HEALTHY")],
            json!({}),
        );
        let p = zone_proxy("a", local, c);
        let s = spread(&p, 40, &[]).await;
        let (near, far) = halves(&s, 4);
        if direct {
            assert_eq!((near, far), (40, 0), "{s:?}");
            stat_is(&p, "cluster.c.lb_zone_routing_all_directly", 40).await;
            assert_eq!(counter(&p, "lb_zone_cluster_too_small").await, 0);
        } else {
            assert!(near >= 10 && far >= 10, "{s:?}");
            assert_eq!(counter(&p, "lb_zone_routing_all_directly").await, 0);
            assert!(counter(&p, "lb_zone_cluster_too_small").await > 0);
        }
    }
}

/// The local cluster has no host in the node's zone: Envoy counts the
/// local cluster as not OK and balances over every zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_needs_the_node_zone_in_the_local_cluster() {
    let (_us, c) = two_zone_upstream(6, "a", "b", json!({})).await;
    let d = dead_ports(2);
    let local = zoned(
        "local",
        &[("b", vec![d[0]], "HEALTHY"), ("c", vec![d[1]], "HEALTHY")],
        json!({}),
    );
    let p = zone_proxy("a", local, c);
    let s = spread(&p, 40, &[]).await;
    let (near, far) = halves(&s, 6);
    assert!(near >= 10 && far >= 10, "{s:?}");
    let not_ok = wait_stat(&p, "cluster.c.lb_local_cluster_not_ok", |v| {
        v.is_some_and(|v| v > 0)
    })
    .await;
    assert!(not_ok.is_some_and(|v| v > 0), "{not_ok:?}");
    assert_eq!(counter(&p, "lb_zone_routing_all_directly").await, 0);
    assert_eq!(counter(&p, "lb_zone_routing_cross_zone").await, 0);
}

/// `routing_enabled: 0` (typed round robin): no pick routes by zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_enabled_percent() {
    let rr = json!({"load_balancing_policy": {"policies": [{"typed_extension_config": {
        "name": "rr",
        "typed_config": {
            "@type": ROUND_ROBIN,
            "locality_lb_config": {"zone_aware_lb_config": {"routing_enabled": {"value": 0}}},
        },
    }}]}});
    let (_us, c) = two_zone_upstream(6, "a", "b", rr).await;
    let d = dead_ports(2);
    let local = zoned(
        "local",
        &[("a", vec![d[0]], "HEALTHY"), ("b", vec![d[1]], "HEALTHY")],
        json!({}),
    );
    let p = zone_proxy("a", local, c);
    let s = spread(&p, 40, &[]).await;
    let (near, far) = halves(&s, 6);
    assert!(near >= 10 && far >= 10, "{s:?}");
    assert_eq!(counter(&p, "lb_zone_routing_all_directly").await, 0);
    assert!(counter(&p, "lb_recalculate_zone_structures").await > 0);
}

/// The local cluster in panic (1 of 3 hosts healthy, under the 50%
/// threshold): each pick counts `lb_local_cluster_not_ok` and balances
/// over every zone; with `fail_traffic_on_panic` it finds no host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_routing_with_the_local_cluster_in_panic() {
    for fail in [false, true] {
        let extra =
            json!({"common_lb_config": {"zone_aware_lb_config": {"fail_traffic_on_panic": fail}}});
        let (_us, c) = two_zone_upstream(6, "a", "b", extra).await;
        let d = dead_ports(3);
        let local = zoned(
            "local",
            &[
                ("a", vec![d[0]], "HEALTHY"),
                ("b", d[1..].to_vec(), "UNHEALTHY"),
            ],
            json!({}),
        );
        let p = zone_proxy("a", local, c);
        if fail {
            let http = Http::h1();
            for _ in 0..5 {
                let r = http.get(&format!("{}/", p.base()), &[]).await;
                assert_eq!(r.status, 503, "{}", r.text());
            }
            stat_is(&p, "cluster.c.lb_local_cluster_not_ok", 5).await;
            continue;
        }
        let s = spread(&p, 40, &[]).await;
        let (near, far) = halves(&s, 6);
        assert!(near >= 10 && far >= 10, "{s:?}");
        stat_is(&p, "cluster.c.lb_local_cluster_not_ok", 40).await;
        assert_eq!(counter(&p, "lb_zone_routing_all_directly").await, 0);
    }
}

// --- bounded loads (hash_balance_factor) --------------------------------

/// Cluster `c` over `ports` with consistent-hash policy `lb` and
/// `hash_balance_factor`, hashed by header `x-key`.
fn bounded_proxy(ports: Vec<u16>, lb: &'static str, factor: u32) -> Proxy {
    Proxy::start(move |p| {
        let eps: Vec<Value> = ports.iter().map(|p| ep(*p)).collect();
        let c = json!({
            "name": "c", "type": "STATIC", "connect_timeout": "1s", "lb_policy": lb,
            "common_lb_config": {"consistent_hashing_lb_config": {"hash_balance_factor": factor}},
            "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]},
        });
        let hash = json!({"hash_policy": [{"header": {"header_name": "x-key"}}]});
        bootstrap(p, vec![ingress(p.listen, vec![], hash)], vec![c])
    })
}

/// Two requests held open on the key's host: at `hash_balance_factor`
/// 100 the third is over that host's slots (⌈3 × 100 / 100⌉ / 3 hosts =
/// 1) and goes to the first host of Envoy's seeded probe order; at 150 the
/// host still has a free slot (⌈⌈3 × 1.5⌉ / 3⌉ = 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_balance_factor_bounds_a_hosts_load() {
    use weir::upstream::hash_lb::{bounded_pick, xxhash64};
    let us = upstreams(3).await;
    let ports: Vec<u16> = us.iter().map(EchoServer::port).collect();
    let key = "user-7";
    for (lb, factor) in [("RING_HASH", 100), ("MAGLEV", 100), ("RING_HASH", 150)] {
        let p = bounded_proxy(ports.clone(), lb, factor);
        let http = Http::h1();
        let url = format!("{}/", p.base());
        // Unloaded: the table's host, every time.
        let s = spread(&p, 3, &[("x-key", key)]).await;
        assert_eq!(s.len(), 1, "{lb}: {s:?}");
        let first = s.keys().next().expect("one host").clone();
        // One at a time, so that each is picked with the load before it.
        let mut tasks = Vec::new();
        for n in 1..=2 {
            let (http, url) = (http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                http.get(&url, &[("x-key", key), ("x-echo-delay-ms", "1500")])
                    .await
            }));
            stat_is(&p, "cluster.c.upstream_rq_active", n).await;
        }
        let r = http.get(&url, &[("x-key", key)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let quick = r.echo().upstream;
        if factor == 150 {
            assert_eq!(quick, first, "{lb} {factor}");
        } else {
            let i: usize = first[1..].parse().expect("u<i>");
            let n = [(0, 1.0 / 3.0), (1, 1.0 / 3.0), (2, 1.0 / 3.0)];
            let load = |k: usize| if k == i { 2 } else { 0 };
            let want = bounded_pick(i, xxhash64(key.as_bytes(), 0), factor, &n, 2, load);
            assert_ne!(quick, first, "{lb} {factor}");
            assert_eq!(quick, format!("u{want}"), "{lb} {factor}");
        }
        for t in tasks {
            let r = t.await.expect("held request");
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echo().upstream, first, "{lb} {factor}");
        }
    }
}
