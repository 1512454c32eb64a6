//! Load-balancing extras, checked by traffic shares over real echo upstreams
//! that name themselves: slow start (`slow_start_config` of round robin and
//! least request, legacy and typed), the priority load split (Envoy's
//! integer health with the overprovisioning factor, `weighted_priority_health`,
//! panic only below a normalised health of 100, total panic by host count).
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`. Shares are checked over a
//! few hundred sequential requests in windows that exclude the outcome
//! without the feature (Envoy's EDF order and weir's weighted draw differ in
//! sequence only). Hosts are added at run time by EDS from the in-process
//! control plane (`weir_tests::xds`):
//!
//! ```sh
//! cargo test -p weir-tests --test lb_more_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test lb_more_scenarios
//! ```
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use weir_tests::config::{
    bootstrap, bootstrap_with, chain, cluster, hcm, listener, sock, wait_stat,
};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream::{self, EchoServer};
use weir_tests::xds::{any_from_yaml, type_url as t, ControlPlane};

const WAIT: Duration = Duration::from_secs(15);

/// `n` echo upstreams named `u0`, `u1`, ...
async fn upstreams(n: usize) -> Vec<EchoServer> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(upstream::http1(&format!("u{i}")).await.expect("echo"));
    }
    out
}

/// A port nothing listens on (an endpoint that must never be picked).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A listener routing `/` to cluster `c`.
fn ingress(port: u16) -> Value {
    let r = json!({"match": {"prefix": "/"}, "route": {"cluster": "c"}});
    listener(
        "l",
        port,
        vec![chain(vec![hcm(
            "ingress",
            vec![],
            vec![json!({"name": "vh", "domains": ["*"], "routes": [r]})],
            json!({}),
        )])],
    )
}

/// How many of `n` requests each upstream answered (every one must be 200).
async fn spread(p: &Proxy, n: usize) -> BTreeMap<String, usize> {
    let c = Http::h1();
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let r = c.get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *out.entry(r.echo().upstream).or_default() += 1;
    }
    out
}

fn count(s: &BTreeMap<String, usize>, u: &str) -> usize {
    s.get(u).copied().unwrap_or(0)
}

// --- slow start -------------------------------------------------------

/// A proxy whose cluster `c` (EDS over ADS from `cp`, LB fields `lb`)
/// takes its endpoints from the control plane.
fn start_eds(cp: &ControlPlane, lb: Value) -> Proxy {
    let addr = cp.addr().expect("TCP control plane");
    let mut c = json!({
        "name": "c", "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
    });
    if let (Some(o), Value::Object(e)) = (c.as_object_mut(), lb) {
        o.extend(e);
    }
    let xds = json!({
        "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}}},
        ]}]},
    });
    Proxy::start(move |ports| {
        bootstrap_with(
            ports,
            vec![ingress(ports.listen)],
            vec![c.clone(), xds.clone()],
            json!({
                "node": {"id": "lb-node", "cluster": "lb-cluster"},
                "dynamic_resources": {"ads_config": {
                    "api_type": "GRPC", "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                }},
            }),
        )
    })
}

/// Pushes cluster `c`'s endpoints (`ports`, one locality); with `ack`,
/// waits for the proxy's ACK.
async fn push_endpoints(cp: &ControlPlane, ports: &[u16], ack: bool) {
    let eps: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": sock(*p)}}))
        .collect();
    let cla = json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]});
    let any = any_from_yaml(t::ENDPOINT, &cla.to_string()).expect("cla");
    let v = cp.set(t::ENDPOINT, vec![any]).expect("eds");
    if !ack {
        return;
    }
    cp.wait_for_ack(t::ENDPOINT, &v, WAIT)
        .await
        .unwrap_or_else(|e| panic!("EDS ACK: {e:#}"));
}

/// Waits until the proxy's cluster `c` has `n` hosts.
async fn members(p: &Proxy, n: i64) {
    let got = wait_stat(p, "cluster.c.membership_total", |v| v == Some(n)).await;
    assert_eq!(got, Some(n), "cluster.c.membership_total");
}

/// Legacy `round_robin_lb_config.slow_start_config` (3 s window, default
/// aggression 1 and minimum weight 10%): three hosts past their window, a
/// fourth added by EDS takes max(elapsed / window, 10%) of a full weight
/// at first (well under its 25% share; Envoy weighs it so in its EDF
/// schedule), and its full share once the window is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_slow_start_ramps_up_a_new_host() {
    let cp = ControlPlane::start().await.expect("control plane");
    let ups = upstreams(4).await;
    let ports: Vec<u16> = ups.iter().map(|u| u.port()).collect();
    push_endpoints(&cp, &ports[..3], false).await;
    let p = start_eds(
        &cp,
        json!({"round_robin_lb_config": {"slow_start_config": {"slow_start_window": "3s"}}}),
    );
    members(&p, 3).await;
    // The first hosts started their own window with the cluster: let it
    // pass (they all weigh the same meanwhile, so shares stay even).
    let s = spread(&p, 60).await;
    for u in ["u0", "u1", "u2"] {
        assert!((10..=30).contains(&count(&s, u)), "even shares: {s:?}");
    }
    tokio::time::sleep(Duration::from_millis(3300)).await;
    push_endpoints(&cp, &ports, true).await;
    members(&p, 4).await;
    let added = tokio::time::Instant::now();
    let s = spread(&p, 150).await;
    let early = added.elapsed();
    assert!(
        count(&s, "u3") <= 22,
        "the new host is in slow start ({early:?} into its window): {s:?}"
    );
    // Past the window: the full share (25%).
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(added.elapsed())).await;
    let s = spread(&p, 240).await;
    assert!(
        (35..=90).contains(&count(&s, "u3")),
        "full share after the window: {s:?}"
    );
}

/// Typed `least_request` policy with `slow_start_config` (3 s window,
/// `min_weight_percent` 50): next to one settled host, a new host weighs
/// max(elapsed / 3 s, 0.5) during its first 1.5 s, about a third of the
/// requests (10% would be the default floor, half without slow start),
/// then half once the window is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_slow_start_minimum_weight() {
    let cp = ControlPlane::start().await.expect("control plane");
    let ups = upstreams(2).await;
    let ports: Vec<u16> = ups.iter().map(|u| u.port()).collect();
    push_endpoints(&cp, &ports[..1], false).await;
    let p = start_eds(
        &cp,
        json!({"load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.least_request",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                "slow_start_config": {"slow_start_window": "3s", "min_weight_percent": {"value": 50}},
            },
        }}]}}),
    );
    members(&p, 1).await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    push_endpoints(&cp, &ports, true).await;
    members(&p, 2).await;
    let added = tokio::time::Instant::now();
    let s = spread(&p, 150).await;
    let early = added.elapsed();
    assert!(
        (28..=68).contains(&count(&s, "u1")),
        "the new host weighs half of a settled one ({early:?} in): {s:?}"
    );
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(added.elapsed())).await;
    let s = spread(&p, 200).await;
    assert!(
        (75..=125).contains(&count(&s, "u1")),
        "an even split after the window: {s:?}"
    );
}

/// A static cluster's hosts all start their slow start together (when the
/// cluster is created): equal weights throughout, so round robin's shares
/// stay even inside the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_starting_together_share_evenly() {
    let ups = upstreams(3).await;
    let ports: Vec<u16> = ups.iter().map(|u| u.port()).collect();
    let c = cluster(
        "c",
        &ports,
        json!({"round_robin_lb_config": {"slow_start_config": {
            "slow_start_window": "60s", "aggression": {"default_value": 2.0, "runtime_key": "a"},
        }}}),
    );
    let p =
        Proxy::start(move |ports| bootstrap(ports, vec![ingress(ports.listen)], vec![c.clone()]));
    let s = spread(&p, 150).await;
    for u in ["u0", "u1", "u2"] {
        assert!((30..=70).contains(&count(&s, u)), "even shares: {s:?}");
    }
}

/// With active health checking a host's slow start begins when it passes
/// its check (Envoy's `lastHcPassTime`), not when it joined: u3 fails its
/// checks (503) past the others' window, then passes and ramps up like a
/// new host (3 s window), taking its full share after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_begins_when_a_host_passes_its_health_check() {
    let ups = upstreams(4).await;
    ups[3].set_default_status(503);
    let ports: Vec<u16> = ups.iter().map(|u| u.port()).collect();
    let hc = json!({
        "timeout": "1s", "interval": "0.1s", "no_traffic_interval": "0.1s",
        "unhealthy_threshold": 1, "healthy_threshold": 1,
        "http_health_check": {"path": "/hc"},
    });
    let c = cluster(
        "c",
        &ports,
        json!({
            "health_checks": [hc],
            "round_robin_lb_config": {"slow_start_config": {"slow_start_window": "3s"}},
        }),
    );
    let p =
        Proxy::start(move |ports| bootstrap(ports, vec![ingress(ports.listen)], vec![c.clone()]));
    let healthy = |n: i64| {
        let p = &p;
        async move {
            let got = wait_stat(p, "cluster.c.membership_healthy", |v| v == Some(n)).await;
            assert_eq!(got, Some(n), "cluster.c.membership_healthy");
        }
    };
    healthy(3).await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let s = spread(&p, 60).await;
    assert_eq!(count(&s, "u3"), 0, "u3 fails its checks: {s:?}");
    ups[3].set_default_status(200);
    healthy(4).await;
    let passed = tokio::time::Instant::now();
    let s = spread(&p, 150).await;
    assert!(
        count(&s, "u3") <= 22,
        "u3 is in slow start ({:?} after its check passed): {s:?}",
        passed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(passed.elapsed())).await;
    let s = spread(&p, 240).await;
    assert!(
        (35..=90).contains(&count(&s, "u3")),
        "full share after the window: {s:?}"
    );
}

// --- priority load split ----------------------------------------------

/// One endpoint: (port, weight, healthy).
type Ep = (u16, u32, bool);

/// A proxy with static cluster `c` (round robin) over one locality per
/// priority, `policy`: the `load_assignment.policy`.
fn start_priorities(levels: &[Vec<Ep>], policy: Value, common: Value) -> Proxy {
    let endpoints: Vec<Value> = levels
        .iter()
        .enumerate()
        .map(|(prio, eps)| {
            let lbe: Vec<Value> = eps
                .iter()
                .map(|(port, w, healthy)| {
                    json!({
                        "endpoint": {"address": sock(*port)},
                        "load_balancing_weight": w,
                        "health_status": if *healthy { "HEALTHY" } else { "UNHEALTHY" },
                    })
                })
                .collect();
            json!({"priority": prio, "lb_endpoints": lbe})
        })
        .collect();
    let mut la = json!({"cluster_name": "c", "endpoints": endpoints});
    if !policy.is_null() {
        la["policy"] = policy;
    }
    let mut c = cluster("c", &[], json!({"load_assignment": la}));
    if !common.is_null() {
        c["common_lb_config"] = common;
    }
    Proxy::start(move |ports| bootstrap(ports, vec![ingress(ports.listen)], vec![c.clone()]))
}

/// `weighted_priority_health`: P0's health is its healthy weight over its
/// total weight (1 of 4 × 1.4 = 35%, so P0 takes 35% and P1 65%), not its
/// healthy host count (1 of 2 × 1.4 = 70%, as without the flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_priority_health_splits_by_weight() {
    let ups = upstreams(2).await;
    let levels = vec![
        vec![(ups[0].port(), 1, true), (dead_port(), 3, false)],
        vec![(ups[1].port(), 1, true)],
    ];
    let p = start_priorities(
        &levels,
        json!({"weighted_priority_health": true}),
        Value::Null,
    );
    let s = spread(&p, 300).await;
    assert!((70..=140).contains(&count(&s, "u0")), "P0 takes 35%: {s:?}");
    drop(p);
    let p = start_priorities(&levels, Value::Null, Value::Null);
    let s = spread(&p, 300).await;
    assert!(
        (170..=250).contains(&count(&s, "u0")),
        "P0 takes 70%: {s:?}"
    );
}

/// `overprovisioning_factor` 200: P0 with one healthy host of three is
/// 66% healthy (not 46% as with the default 140), and takes that share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overprovisioning_factor_scales_priority_health() {
    let ups = upstreams(2).await;
    let levels = vec![
        vec![
            (ups[0].port(), 1, true),
            (dead_port(), 1, false),
            (dead_port(), 1, false),
        ],
        vec![(ups[1].port(), 1, true)],
    ];
    let p = start_priorities(
        &levels,
        json!({"overprovisioning_factor": 200}),
        Value::Null,
    );
    let s = spread(&p, 300).await;
    assert!(
        (165..=235).contains(&count(&s, "u0")),
        "P0 takes 66%: {s:?}"
    );
    drop(p);
    let p = start_priorities(&levels, Value::Null, Value::Null);
    let s = spread(&p, 300).await;
    assert!(
        (105..=175).contains(&count(&s, "u0")),
        "P0 takes 46%: {s:?}"
    );
}

/// P0 is a third healthy (under the 50% panic threshold), but P0 and P1
/// together are fully healthy (normalised health 100): Envoy puts no level
/// in panic, so P0's 46% goes to its healthy host only and the unhealthy
/// ones get nothing (every request succeeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_panic_while_priorities_cover_the_load() {
    let ups = upstreams(3).await;
    let levels = vec![
        vec![
            (ups[0].port(), 1, true),
            (dead_port(), 1, false),
            (dead_port(), 1, false),
        ],
        vec![(ups[1].port(), 1, true), (ups[2].port(), 1, true)],
    ];
    let p = start_priorities(&levels, Value::Null, Value::Null);
    let s = spread(&p, 300).await;
    assert!(
        (105..=175).contains(&count(&s, "u0")),
        "P0 takes 46%: {s:?}"
    );
    let panics = p.stat("cluster.c.lb_healthy_panic").await.unwrap_or(0);
    assert_eq!(panics, 0, "no level is in panic");
}

/// Every level in panic (P0 a quarter healthy, P1 not at all; normalised
/// health 35): the load follows the levels' host counts (P0 4 of 6 hosts:
/// 67%, P1 33%), and each level balances over all its hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_panic_splits_by_host_count() {
    let ups = upstreams(6).await;
    let levels = vec![
        vec![
            (ups[0].port(), 1, true),
            (ups[1].port(), 1, false),
            (ups[2].port(), 1, false),
            (ups[3].port(), 1, false),
        ],
        vec![(ups[4].port(), 1, false), (ups[5].port(), 1, false)],
    ];
    let p = start_priorities(&levels, Value::Null, Value::Null);
    let s = spread(&p, 300).await;
    let p1 = count(&s, "u4") + count(&s, "u5");
    assert!((65..=135).contains(&p1), "P1 takes 33%: {s:?}");
    assert!(
        count(&s, "u1") >= 20,
        "P0 in panic uses its unhealthy hosts: {s:?}"
    );
    let panics = p.stat("cluster.c.lb_healthy_panic").await.unwrap_or(0);
    assert!(panics >= 300, "every pick is a panic pick: {panics}");
}

// --- zone-aware routing without a local cluster -------------------------

/// `common_lb_config.zone_aware_lb_config.fail_traffic_on_panic`: one
/// healthy host of three puts the level in panic (33% < 50%); Envoy then
/// fails the request (503, no healthy upstream) instead of balancing over
/// all hosts. Without a local cluster `routing_enabled` and
/// `min_cluster_size` change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_traffic_on_panic() {
    let ups = upstreams(3).await;
    let levels = vec![vec![
        (ups[0].port(), 1, true),
        (ups[1].port(), 1, false),
        (ups[2].port(), 1, false),
    ]];
    let p = start_priorities(
        &levels,
        Value::Null,
        json!({"zone_aware_lb_config": {
            "fail_traffic_on_panic": true, "routing_enabled": {"value": 100}, "min_cluster_size": 1,
        }}),
    );
    let c = Http::h1();
    for _ in 0..5 {
        let r = c.get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "no healthy upstream");
    }
    drop(p);
    // Without it the level in panic balances over every host.
    let p = start_priorities(
        &levels,
        Value::Null,
        json!({"zone_aware_lb_config": {"routing_enabled": {"value": 50}, "min_cluster_size": 2}}),
    );
    let s = spread(&p, 90).await;
    for u in ["u0", "u1", "u2"] {
        assert!(count(&s, u) >= 15, "panic uses every host: {s:?}");
    }
}

/// The typed round robin policy's `locality_lb_config.zone_aware_lb_config`
/// with `fail_traffic_on_panic`: the same, and a healthy level is
/// balanced as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_zone_aware_fail_traffic_on_panic() {
    let ups = upstreams(3).await;
    let typed = json!({"load_balancing_policy": {"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.round_robin",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
            "locality_lb_config": {"zone_aware_lb_config": {"fail_traffic_on_panic": true}},
        },
    }}]}});
    let start = |healthy: bool| {
        let eps: Vec<Value> = ups
            .iter()
            .enumerate()
            .map(|(i, u)| {
                json!({
                    "endpoint": {"address": sock(u.port())},
                    "health_status": if i == 0 || healthy { "HEALTHY" } else { "UNHEALTHY" },
                })
            })
            .collect();
        let mut c = cluster("c", &[], typed.clone());
        c["load_assignment"] = json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]});
        Proxy::start(move |ports| bootstrap(ports, vec![ingress(ports.listen)], vec![c.clone()]))
    };
    let p = start(false);
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    drop(p);
    let p = start(true);
    let s = spread(&p, 60).await;
    for u in ["u0", "u1", "u2"] {
        assert!((10..=30).contains(&count(&s, u)), "round robin: {s:?}");
    }
}
