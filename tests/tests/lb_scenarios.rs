//! Consistent-hash load balancing (`RING_HASH`, `MAGLEV`, the typed
//! `load_balancing_policy`) with route `hash_policy`, over several real echo
//! upstreams that name themselves.
//!
//! The host each key should reach is computed with weir's own table
//! construction (`weir::upstream::hash_lb`) from the upstreams' actual
//! addresses; every test runs against weir in-process by default and
//! against real Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`, which is how
//! weir's rings, Maglev tables, host keys and request hashes were checked to
//! pick the same host as Envoy. Locality-weighted round robin / least
//! request are checked by their traffic shares over a few hundred requests
//! (Envoy's EDF order and weir's weighted draw differ in sequence only), in
//! windows that exclude the unweighted and unscaled outcomes:
//!
//! ```sh
//! cargo test -p weir-tests --test lb_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test lb_scenarios
//! ```
use std::collections::{BTreeMap, HashSet};
use std::sync::{atomic::AtomicU64, Arc, OnceLock};

use serde_json::{json, Value};
use weir::upstream::hash_lb::{normalize_localities, xxhash64, HashTable, LocalityKey};
use weir::upstream::Host;
use weir_tests::config::{
    bootstrap, chain, cluster, hcm, listener, sock, stat_is, tcp_proxy, vhost,
};
use weir_tests::scenario::{Http, Proxy};
use weir_tests::upstream::{self, EchoServer};
use xds_client::config::{LbPolicy, Maglev, RingHash, RingHashFunction};

/// One endpoint of the test cluster.
#[derive(Clone)]
struct Ep {
    port: u16,
    weight: u32,
    /// `metadata.filter_metadata["envoy.lb"].hash_key`.
    hash_key: Option<&'static str>,
    /// `endpoint.hostname`.
    hostname: Option<&'static str>,
    healthy: bool,
    /// The locality's priority.
    priority: u32,
}

fn ep(port: u16) -> Ep {
    Ep {
        port,
        weight: 1,
        hash_key: None,
        hostname: None,
        healthy: true,
        priority: 0,
    }
}

/// `n` echo upstreams named `u0`, `u1`, ...
async fn upstreams(n: usize) -> Vec<EchoServer> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(upstream::http1(&format!("u{i}")).await.expect("echo"));
    }
    out
}

/// The `load_assignment` of cluster `hashed` with `eps` (one locality per
/// priority).
fn assignment(eps: &[Ep]) -> Value {
    let mut prios: Vec<u32> = eps.iter().map(|e| e.priority).collect();
    prios.sort_unstable();
    prios.dedup();
    let localities: Vec<Value> = prios
        .iter()
        .map(|p| {
            let at: Vec<Ep> = eps.iter().filter(|e| e.priority == *p).cloned().collect();
            json!({"priority": p, "lb_endpoints": lb_endpoints(&at)})
        })
        .collect();
    json!({"cluster_name": "hashed", "endpoints": localities})
}

fn lb_endpoints(eps: &[Ep]) -> Vec<Value> {
    eps.iter()
        .map(|e| {
            let mut v = json!({
                "endpoint": {"address": sock(e.port)},
                "load_balancing_weight": e.weight,
            });
            if let Some(h) = e.hostname {
                v["endpoint"]["hostname"] = json!(h);
            }
            if !e.healthy {
                v["health_status"] = json!("UNHEALTHY");
            }
            if let Some(k) = e.hash_key {
                v["metadata"] = json!({"filter_metadata": {"envoy.lb": {"hash_key": k}}});
            }
            v
        })
        .collect()
}

/// A proxy routing `/` to cluster `hashed` (`lb`: its LB fields) with the
/// route's `hash_policy`.
fn start(eps: &[Ep], lb: Value, hash_policy: Value) -> Proxy {
    let mut extra = lb;
    extra["load_assignment"] = assignment(eps);
    let c = cluster("hashed", &[], extra);
    let r = json!({"match": {"prefix": "/"}, "route": {"cluster": "hashed", "hash_policy": hash_policy}});
    Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![r.clone()], json!({}))],
                    json!({}),
                )])],
            )],
            vec![c.clone()],
        )
    })
}

/// The endpoint (index into `eps`) weir's table picks for `hash` over the
/// healthy endpoints: the expectation both weir and Envoy must meet.
fn expected(lb: &LbPolicy, eps: &[Ep], hash: u64) -> usize {
    let usable: Vec<usize> = (0..eps.len()).filter(|i| eps[*i].healthy).collect();
    table(lb, eps, &usable).choose(hash, 0).expect("a host")
}

/// weir's table over `usable` (indexes into `eps`).
fn table(lb: &LbPolicy, eps: &[Ep], usable: &[usize]) -> HashTable {
    let hosts: Vec<Arc<Host>> = eps
        .iter()
        .map(|e| {
            let metadata = match e.hash_key {
                Some(k) => json!({"envoy.lb": {"hash_key": k}}),
                None => Value::Null,
            };
            Arc::new(Host {
                addr: format!("127.0.0.1:{}", e.port).parse().expect("addr"),
                internal: None,
                hostname: e.hostname.unwrap_or_default().to_owned(),
                weight: e.weight,
                healthy: e.healthy,
                priority: 0,
                locality: Default::default(),
                locality_weight: 0,
                metadata,
                active: AtomicU64::new(0),
                outlier: OnceLock::new(),
                active_hc: OnceLock::new(),
                since: AtomicU64::new(0),
            })
        })
        .collect();
    HashTable::build(lb, &hosts, usable).expect("a table").0
}

/// Sends `GET path` with `headers` twice; both must reach the same upstream,
/// whose name is returned.
async fn sticky(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> String {
    let c = Http::h1();
    let url = format!("{}{path}", p.base());
    let a = c.get(&url, headers).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let b = c.get(&url, headers).await;
    let (a, b) = (a.echo().upstream, b.echo().upstream);
    assert_eq!(
        a, b,
        "{path} {headers:?}: the same key reaches the same host"
    );
    a
}

fn keys() -> Vec<String> {
    (0..24).map(|i| format!("user-{i}")).collect()
}

/// RING_HASH with default ring sizes, hashing a header: every key reaches
/// the host Envoy's ring (keys `127.0.0.1:<port>_<i>`, xxHash64) gives it,
/// and the keys spread over all hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_header_keys_reach_envoys_host() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    let mut seen = HashSet::new();
    for k in keys() {
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "key {k}");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 3, "keys spread over every host");
    stat_is(&p, "cluster.hashed.ring_hash_lb.size", 1026).await;
    stat_is(&p, "cluster.hashed.ring_hash_lb.min_hashes_per_host", 342).await;
    stat_is(&p, "cluster.hashed.ring_hash_lb.max_hashes_per_host", 342).await;
}

/// Weights: a host of weight 3 gets three times the ring points of a host
/// of weight 1 (and the keys Envoy gives it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_weights() {
    let ups = upstreams(2).await;
    let mut eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    eps[1].weight = 3;
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    for k in keys() {
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "key {k}");
    }
    stat_is(&p, "cluster.hashed.ring_hash_lb.size", 1024).await;
    stat_is(&p, "cluster.hashed.ring_hash_lb.min_hashes_per_host", 256).await;
    stat_is(&p, "cluster.hashed.ring_hash_lb.max_hashes_per_host", 768).await;
}

/// `ring_hash_lb_config` with MURMUR_HASH_2 and a small ring, and a header
/// `regex_rewrite`: `tenant-a/1` and `tenant-a/2` hash as `tenant-a`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_murmur_and_header_rewrite() {
    let ups = upstreams(4).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH", "ring_hash_lb_config": {
            "minimum_ring_size": 64, "maximum_ring_size": 256, "hash_function": "MURMUR_HASH_2",
        }}),
        json!([{"header": {"header_name": "x-tenant", "regex_rewrite": {
            "pattern": {"regex": "/.*$"}, "substitution": "",
        }}}]),
    );
    let lb = LbPolicy::RingHash(RingHash {
        minimum_ring_size: 64,
        maximum_ring_size: 256,
        hash_function: RingHashFunction::MurmurHash2,
        use_hostname: false,
    });
    for t in [
        "tenant-a", "tenant-b", "tenant-c", "tenant-d", "tenant-e", "tenant-f",
    ] {
        let one = sticky(&p, "/", &[("x-tenant", &format!("{t}/1"))]).await;
        let two = sticky(&p, "/", &[("x-tenant", &format!("{t}/2"))]).await;
        assert_eq!(one, two, "{t}: rewritten to the same key");
        let want = expected(&lb, &eps, xxhash64(t.as_bytes(), 0));
        assert_eq!(one, format!("u{want}"), "tenant {t}");
    }
    stat_is(&p, "cluster.hashed.ring_hash_lb.size", 64).await;
}

/// MAGLEV hashing a query parameter, hosts keyed by their endpoint metadata
/// `envoy.lb`/`hash_key`; the table gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_query_parameter_and_metadata_hash_key() {
    let ups = upstreams(3).await;
    let names = ["alpha", "beta", "gamma"];
    let eps: Vec<Ep> = ups
        .iter()
        .zip(names)
        .map(|(u, n)| Ep {
            hash_key: Some(n),
            ..ep(u.port())
        })
        .collect();
    let p = start(
        &eps,
        json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 1021}}),
        json!([{"query_parameter": {"name": "session"}}]),
    );
    let lb = LbPolicy::Maglev(Maglev {
        table_size: 1021,
        use_hostname: false,
    });
    let mut seen = HashSet::new();
    for k in keys() {
        let got = sticky(&p, &format!("/q?a=1&session={k}&session=other"), &[]).await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "session {k}");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 3);
    // The table's spread, as Envoy reports it.
    let (min, max) = maglev_counts(&eps, 1021);
    stat_is(&p, "cluster.hashed.maglev_lb.min_entries_per_host", min).await;
    stat_is(&p, "cluster.hashed.maglev_lb.max_entries_per_host", max).await;
}

/// Fewest and most table entries per host of a Maglev table over `eps`.
fn maglev_counts(eps: &[Ep], size: u64) -> (i64, i64) {
    let lb = LbPolicy::Maglev(Maglev {
        table_size: size,
        use_hostname: false,
    });
    let mut counts: BTreeMap<usize, i64> = BTreeMap::new();
    for slot in 0..size {
        *counts.entry(expected(&lb, eps, slot)).or_default() += 1;
    }
    let min = counts.values().copied().min().unwrap_or(0);
    let max = counts.values().copied().max().unwrap_or(0);
    (min, max)
}

/// An unhealthy endpoint is left out of the ring: its keys move; the other
/// hosts' keys mostly stay (the ring gives each remaining host more points,
/// as Envoy's does, so a few of them move too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_host_only_remaps_its_keys() {
    let ups = upstreams(3).await;
    let all: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let mut eps = all.clone();
    eps[2].healthy = false;
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    let (mut orphaned, mut kept, mut others) = (0, 0, 0);
    for i in 0..96 {
        let k = format!("key-{i}");
        let h = xxhash64(k.as_bytes(), 0);
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        assert_ne!(got, "u2", "the unhealthy host gets nothing");
        assert_eq!(got, format!("u{}", expected(&lb, &eps, h)), "key {k}");
        let before = expected(&lb, &all, h);
        if before == 2 {
            orphaned += 1;
        } else {
            others += 1;
            if got == format!("u{before}") {
                kept += 1;
            }
        }
    }
    assert!(orphaned > 0, "some keys were the unhealthy host's");
    assert!(
        kept * 10 >= others * 6,
        "{kept} of {others} keys of healthy hosts kept their host"
    );
}

/// A cookie policy with a `ttl`: a request without the cookie gets one
/// (`Set-Cookie: name="<16 hex>"; Max-Age=<ttl>; Path=<path>; <attributes>;
/// HttpOnly`, as Envoy formats it); sending it back reaches the same host;
/// a request that has the cookie gets no new one. Without `ttl` a missing
/// cookie yields no hash and no cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_generated_and_followed() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([
            {"cookie": {"name": "plain"}},
            {"cookie": {"name": "sticky", "ttl": "3600s", "path": "/app",
                        "attributes": [{"name": "SameSite", "value": "Lax"}, {"name": "Secure"}]}},
        ]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    let c = Http::h1();
    let url = format!("{}/app", p.base());
    let first = c.get(&url, &[]).await;
    assert_eq!(first.status, 200);
    let set = first.header_all("set-cookie");
    assert_eq!(set.len(), 1, "{set:?}");
    let v = &set[0];
    let value = v
        .strip_prefix("sticky=\"")
        .and_then(|r| r.split_once('"'))
        .map(|(val, _)| val.to_owned())
        .unwrap_or_else(|| panic!("cookie format: {v}"));
    assert_eq!(value.len(), 16, "{v}");
    assert!(
        value
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{v}"
    );
    assert_eq!(
        v,
        &format!("sticky=\"{value}\"; Max-Age=3600; Path=/app; SameSite=Lax; Secure; HttpOnly")
    );
    let want = format!("u{}", expected(&lb, &eps, xxhash64(value.as_bytes(), 0)));
    assert_eq!(first.echo().upstream, want, "the generated cookie's host");
    let cookie = format!("sticky={value}");
    for _ in 0..3 {
        let r = c.get(&url, &[("cookie", &cookie)]).await;
        assert_eq!(r.echo().upstream, want);
        assert!(r.header("set-cookie").is_none(), "cookie present: none set");
    }
    // A quoted cookie value hashes the same; the plain (no ttl) policy
    // combines with it when present.
    let quoted = format!("sticky=\"{value}\"");
    let r = c.get(&url, &[("cookie", &quoted)]).await;
    assert_eq!(r.echo().upstream, want);
    for k in keys() {
        let cookie = format!("plain={k}; sticky={value}");
        let got = sticky(&p, "/app", &[("cookie", &cookie)]).await;
        let h = xxhash64(k.as_bytes(), 0).rotate_left(1) ^ xxhash64(value.as_bytes(), 0);
        assert_eq!(got, format!("u{}", expected(&lb, &eps, h)), "plain={k}");
    }
}

/// `connection_properties.source_ip`, combined with a `terminal` header
/// policy placed first: with the header only the header counts; without it
/// the source IP (127.0.0.1) decides. Hosts are keyed by their hostnames
/// (the typed `maglev` policy's `use_hostname_for_hashing`; Envoy allows
/// the `common_lb_config` one on STRICT_DNS clusters only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_and_terminal_policies() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups
        .iter()
        .zip(["web-0.svc", "web-1.svc", "web-2.svc"])
        .map(|(u, h)| Ep {
            hostname: Some(h),
            ..ep(u.port())
        })
        .collect();
    let p = start(
        &eps,
        json!({"load_balancing_policy": {"policies": [
            {"typed_extension_config": {"name": "envoy.load_balancing_policies.maglev", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
                "consistent_hashing_lb_config": {"use_hostname_for_hashing": true},
            }}},
        ]}}),
        json!([
            {"header": {"header_name": "x-user"}, "terminal": true},
            {"connection_properties": {"source_ip": true}},
        ]),
    );
    let lb = LbPolicy::Maglev(Maglev {
        use_hostname: true,
        ..Maglev::default()
    });
    let ip = sticky(&p, "/", &[]).await;
    assert_eq!(
        ip,
        format!("u{}", expected(&lb, &eps, xxhash64(b"127.0.0.1", 0)))
    );
    for k in keys() {
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "terminal header {k}");
    }
}

/// The typed `load_balancing_policy` Istio emits: the first policy of the
/// list (`ring_hash` here, over `lb_policy`), with its own ring sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_ring_hash_policy() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"load_balancing_policy": {"policies": [
            {"typed_extension_config": {"name": "envoy.load_balancing_policies.ring_hash", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
                "minimum_ring_size": 128,
            }}},
            {"typed_extension_config": {"name": "envoy.load_balancing_policies.round_robin", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
            }}},
        ]}}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash {
        minimum_ring_size: 128,
        ..RingHash::default()
    });
    for k in keys() {
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "key {k}");
    }
    stat_is(&p, "cluster.hashed.ring_hash_lb.size", 129).await;
}

/// A request whose policies yield no hash (header absent) gets a random
/// host, as Envoy: requests spread over the hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hash_is_random() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let c = Http::h1();
    let mut seen = HashSet::new();
    for _ in 0..60 {
        let r = c.get(&format!("{}/", p.base()), &[]).await;
        seen.insert(r.echo().upstream);
    }
    assert!(seen.len() >= 2, "random spread: {seen:?}");
}

/// A level below the panic threshold (1 of 3 healthy < 50%) balances over
/// all its hosts, unhealthy ones included, each pick counted in
/// `lb_healthy_panic`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_level_hashes_over_all_hosts() {
    let ups = upstreams(3).await;
    let mut eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    eps[1].healthy = false;
    eps[2].healthy = false;
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    let all = table(&lb, &eps, &[0, 1, 2]);
    let mut seen = HashSet::new();
    for k in keys() {
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        let want = all.choose(xxhash64(k.as_bytes(), 0), 0).expect("host");
        assert_eq!(got, format!("u{want}"), "key {k}");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 3, "unhealthy hosts take keys in panic");
    stat_is(
        &p,
        "cluster.hashed.lb_healthy_panic",
        2 * keys().len() as i64,
    )
    .await;
}

/// Priorities: the hash picks the level too (`hash % 100 + 1` against the
/// levels' loads). Priority 0 has 1 of 2 hosts healthy: 50% × the
/// overprovisioning factor 1.4 = 70% of the keys stay there (on its healthy
/// host), the rest go to priority 1's ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_level_chosen_by_the_hash() {
    let ups = upstreams(4).await;
    let mut eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    eps[1].healthy = false;
    eps[2].priority = 1;
    eps[3].priority = 1;
    let p = start(
        &eps,
        json!({"lb_policy": "MAGLEV"}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::Maglev(Maglev::default());
    let p1 = table(&lb, &eps, &[2, 3]);
    let (mut low, mut high) = (0, 0);
    for i in 0..48 {
        let k = format!("key-{i}");
        let h = xxhash64(k.as_bytes(), 0);
        let got = sticky(&p, "/", &[("x-user", &k)]).await;
        let want = if h % 100 < 70 {
            low += 1;
            0
        } else {
            high += 1;
            p1.choose(h, 0).expect("host")
        };
        assert_eq!(
            got,
            format!("u{want}"),
            "key {k} (hash % 100 = {})",
            h % 100
        );
    }
    assert!(low > 0 && high > 0, "both levels used: {low} / {high}");
}

/// A retry with the `previous_hosts` predicate on a hash LB: the next pick
/// moves along the ring (ring hash) or perturbs the hash (Maglev) until
/// the host is not one tried already, as Envoy's `chooseHost(hash,
/// attempt)`. One endpoint refuses connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_moves_to_the_next_host_of_the_table() {
    let ups = upstreams(2).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    eps.push(ep(dead));
    for (policy, lb) in [
        ("RING_HASH", LbPolicy::RingHash(RingHash::default())),
        ("MAGLEV", LbPolicy::Maglev(Maglev::default())),
    ] {
        let mut extra = json!({"lb_policy": policy});
        extra["load_assignment"] = assignment(&eps);
        let c = cluster("hashed", &[], extra);
        let r = json!({"match": {"prefix": "/"}, "route": {
            "cluster": "hashed",
            "hash_policy": [{"header": {"header_name": "x-user"}}],
            "retry_policy": {
                "retry_on": "connect-failure", "num_retries": 2,
                "host_selection_retry_max_attempts": 5,
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            },
        }});
        let p = Proxy::start(move |ports| {
            bootstrap(
                ports,
                vec![listener(
                    "l",
                    ports.listen,
                    vec![chain(vec![hcm(
                        "ingress",
                        vec![],
                        vec![vhost("vh", vec![r.clone()], json!({}))],
                        json!({}),
                    )])],
                )],
                vec![c.clone()],
            )
        });
        let t = table(&lb, &eps, &[0, 1, 2]);
        let mut retried = 0;
        for k in keys() {
            let h = xxhash64(k.as_bytes(), 0);
            let first = t.choose(h, 0).expect("host");
            let want = if first == 2 {
                retried += 1;
                // The first of 6 picks that is not the dead host; when all
                // are, every attempt fails (503), as in Envoy.
                (0..=5)
                    .map(|a| t.choose(h, a).expect("host"))
                    .find(|i| *i != 2)
            } else {
                Some(first)
            };
            match want {
                Some(want) => {
                    let got = sticky(&p, "/", &[("x-user", &k)]).await;
                    assert_eq!(got, format!("u{want}"), "{policy} key {k}");
                }
                None => {
                    let r = Http::h1()
                        .get(&format!("{}/", p.base()), &[("x-user", &k)])
                        .await;
                    assert_eq!(r.status, 503, "{policy} key {k}: only the dead host");
                }
            }
        }
        assert!(retried > 0, "{policy}: some keys start on the dead host");
    }
}

/// `tcp_proxy` with `hash_policy: [{source_ip: {}}]`: every connection from
/// 127.0.0.1 reaches the host of that IP on the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_source_ip_hash() {
    let ups = upstreams(4).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let mut extra = json!({"lb_policy": "RING_HASH"});
    extra["load_assignment"] = assignment(&eps);
    let c = cluster("hashed", &[], extra);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![tcp_proxy(
                    "tcp",
                    "hashed",
                    json!({"hash_policy": [{"source_ip": {}}]}),
                )])],
            )],
            vec![c.clone()],
        )
    });
    let lb = LbPolicy::RingHash(RingHash::default());
    let want = format!("u{}", expected(&lb, &eps, xxhash64(b"127.0.0.1", 0)));
    for _ in 0..8 {
        // A new client each time: a new connection, hashed again.
        let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().upstream, want);
    }
}

/// `tcp_proxy` with `hash_policy: [{filter_state: {key}}]`: the network
/// `set_filter_state` stores each connection's downstream address (an
/// `envoy.hashable_string`, so it hashes as xxHash64 of the string), and
/// every connection reaches the ring's host for its own `127.0.0.1:<port>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_filter_state_hash() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ups = upstreams(4).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let mut extra = json!({"lb_policy": "RING_HASH"});
    extra["load_assignment"] = assignment(&eps);
    let c = cluster("hashed", &[], extra);
    let sfs = weir_tests::config::filter(
        "envoy.filters.network.set_filter_state",
        "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
        json!({"on_new_connection": [{
            "object_key": "lb.key", "factory_key": "envoy.hashable_string",
            "format_string": {"text_format_source": {"inline_string": "%DOWNSTREAM_REMOTE_ADDRESS%"}},
        }]}),
    );
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![
                    sfs.clone(),
                    tcp_proxy(
                        "tcp",
                        "hashed",
                        json!({"hash_policy": [{"filter_state": {"key": "lb.key"}}]}),
                    ),
                ])],
            )],
            vec![c.clone()],
        )
    });
    let lb = LbPolicy::RingHash(RingHash::default());
    let mut seen = HashSet::new();
    for _ in 0..16 {
        let mut s = tokio::net::TcpStream::connect(p.addr())
            .await
            .expect("connect");
        let me = s.local_addr().expect("local address").to_string();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        let text = String::from_utf8_lossy(&buf);
        let body = text.split("\r\n\r\n").nth(1).expect("a body");
        let echo: Value = serde_json::from_str(body).expect("echo JSON");
        let want = format!("u{}", expected(&lb, &eps, xxhash64(me.as_bytes(), 0)));
        assert_eq!(echo["upstream"], want.as_str(), "connection from {me}");
        seen.insert(want);
    }
    assert!(seen.len() > 1, "the keys spread over the ring: {seen:?}");
}

/// Hashing the host: `header_name: host` (or Envoy's `:authority`) hashes
/// the request's authority, over HTTP/1.1 (`Host`) and HTTP/2 (`:authority`)
/// alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_authority_hash() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let lb = LbPolicy::RingHash(RingHash::default());
    for name in ["host", ":authority"] {
        let p = start(
            &eps,
            json!({"lb_policy": "RING_HASH"}),
            json!([{"header": {"header_name": name}}]),
        );
        for h in ["example.com", "api.example.com", "shop.example.org", "a.b"] {
            let got = sticky(&p, "/", &[("host", h)]).await;
            let want = expected(&lb, &eps, xxhash64(h.as_bytes(), 0));
            assert_eq!(got, format!("u{want}"), "{name}: {h}");
        }
        let authority = p.addr().to_string();
        let want = format!(
            "u{}",
            expected(&lb, &eps, xxhash64(authority.as_bytes(), 0))
        );
        for _ in 0..3 {
            let r = Http::h2c().get(&format!("{}/", p.base()), &[]).await;
            assert_eq!(r.echo().upstream, want, "{name} over HTTP/2: {authority}");
        }
    }
}

/// A cluster `lw` (round robin, `locality_weighted_lb_config`) with one
/// locality per `(zone, load_balancing_weight, endpoints)` and a proxy
/// routing `/` to it.
fn start_localities(zones: &[(&str, Option<u32>, Vec<Ep>)]) -> Proxy {
    start_localities_with(
        zones,
        json!({"common_lb_config": {"locality_weighted_lb_config": {}}}),
    )
}

/// [`start_localities`] with other LB fields (`lb`) for the cluster.
fn start_localities_with(zones: &[(&str, Option<u32>, Vec<Ep>)], lb: Value) -> Proxy {
    let localities: Vec<Value> = zones
        .iter()
        .map(|(zone, weight, eps)| {
            let mut l = json!({
                "locality": {"region": "r", "zone": zone},
                "lb_endpoints": lb_endpoints(eps),
            });
            if let Some(w) = weight {
                l["load_balancing_weight"] = json!(w);
            }
            l
        })
        .collect();
    let mut extra = lb;
    extra["load_assignment"] = json!({"cluster_name": "lw", "endpoints": localities});
    let c = cluster("lw", &[], extra);
    let r = json!({"match": {"prefix": "/"}, "route": {"cluster": "lw"}});
    Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![r.clone()], json!({}))],
                    json!({}),
                )])],
            )],
            vec![c.clone()],
        )
    })
}

/// How many of `n` requests each upstream answered.
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

/// `locality_weighted_lb_config`: localities take traffic in proportion to
/// their `load_balancing_weight` (1:4 here, whatever their host counts:
/// plain round robin would give u0 a third), hosts share their locality's
/// part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_weights_split_traffic() {
    let ups = upstreams(3).await;
    let p = start_localities(&[
        ("a", Some(1), vec![ep(ups[0].port())]),
        ("b", Some(4), vec![ep(ups[1].port()), ep(ups[2].port())]),
    ]);
    let s = spread(&p, 500).await;
    let n = |u: &str| s.get(u).copied().unwrap_or(0);
    assert!((70..=130).contains(&n("u0")), "zone a ~20%: {s:?}");
    assert!(
        n("u1") >= 150 && n("u2") >= 150,
        "zone b's hosts share 80%: {s:?}"
    );
}

/// A locality's weight is scaled by its health (healthy share × the
/// overprovisioning factor 1.4, at most 1): two thirds of zone a are
/// unhealthy, so it weighs 0.47 against zone b's 1 (32% of the requests;
/// unscaled weights would give it 50%, plain round robin 25%). A locality
/// without a weight gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_weights_follow_health() {
    let ups = upstreams(4).await;
    let down = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        Ep {
            healthy: false,
            ..ep(l.local_addr().expect("addr").port())
        }
    };
    let p = start_localities(&[
        ("a", Some(1), vec![ep(ups[0].port()), down(), down()]),
        (
            "b",
            Some(1),
            vec![ep(ups[1].port()), ep(ups[2].port()), ep(ups[3].port())],
        ),
    ]);
    let s = spread(&p, 1600).await;
    let n = |u: &str| s.get(u).copied().unwrap_or(0);
    assert!((450..=570).contains(&n("u0")), "zone a ~32%: {s:?}");
    drop(p);
    let p = start_localities(&[
        ("a", None, vec![ep(ups[0].port())]),
        ("b", Some(1), vec![ep(ups[1].port())]),
    ]);
    let s = spread(&p, 40).await;
    assert_eq!(
        s.get("u1").copied(),
        Some(40),
        "the weightless zone gets nothing: {s:?}"
    );
}

/// A header sent more than once hashes all its values, sorted, each value's
/// hash seeding the next (`b`, `a` hashes as xxHash64(`b`, seed
/// xxHash64(`a`))), in either order; Maglev with endpoint weights 1:2:3
/// fills its table by weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_header_values_and_weighted_maglev() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups
        .iter()
        .zip([1, 2, 3])
        .map(|(u, w)| Ep {
            weight: w,
            ..ep(u.port())
        })
        .collect();
    let p = start(
        &eps,
        json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 211}}),
        json!([{"header": {"header_name": "x-user"}}]),
    );
    let lb = LbPolicy::Maglev(Maglev {
        table_size: 211,
        use_hostname: false,
    });
    for i in 0..16 {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        let one = sticky(&p, "/", &[("x-user", &b), ("x-user", &a)]).await;
        let two = sticky(&p, "/", &[("x-user", &a), ("x-user", &b)]).await;
        assert_eq!(one, two, "order does not matter");
        let h = xxhash64(b.as_bytes(), xxhash64(a.as_bytes(), 0));
        let want = expected(&lb, &eps, h);
        assert_eq!(one, format!("u{want}"), "{a} + {b}");
    }
    let (min, max) = maglev_counts(&eps, 211);
    stat_is(&p, "cluster.hashed.maglev_lb.min_entries_per_host", min).await;
    stat_is(&p, "cluster.hashed.maglev_lb.max_entries_per_host", max).await;
}

/// Cookies over HTTP/2: split `cookie` headers (crumbs) are read like one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_crumbs_over_http2() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"cookie": {"name": "session"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    let c = Http::h2c();
    for k in keys() {
        let session = format!("session={k}");
        let r = c
            .get(
                &format!("{}/", p.base()),
                &[
                    ("cookie", "theme=dark"),
                    ("cookie", &session),
                    ("cookie", "x=1"),
                ],
            )
            .await;
        assert_eq!(r.status, 200);
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(r.echo().upstream, format!("u{want}"), "session {k}");
    }
}

/// Query parameters are hashed as they appear (not percent-decoded); a
/// parameter without `=` has the empty value; a later policy on a missing
/// parameter adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameter_raw_values() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"query_parameter": {"name": "k"}}, {"query_parameter": {"name": "absent"}}]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    for (q, v) in [
        ("k=a%20b", "a%20b"),
        ("k=x+y&k=z", "x+y"),
        ("z=1&k", ""),
        ("k=&z=2", ""),
        ("k=%2Fpath", "%2Fpath"),
        ("k=caf%C3%A9", "caf%C3%A9"),
    ] {
        let got = sticky(&p, &format!("/p?{q}"), &[]).await;
        let want = expected(&lb, &eps, xxhash64(v.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "?{q}");
    }
}

/// Behind `x-forwarded-for` (no `use_remote_address`): `source_ip` hashes
/// the forwarded address, while a generated cookie's value is xxHash64 of
/// the connection's own peer address followed by the listener's address,
/// in hex (one value per connection, whatever `x-forwarded-for` says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_address_for_source_ip_and_cookie() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([
            {"cookie": {"name": "c", "ttl": "0s"}, "terminal": true},
            {"connection_properties": {"source_ip": true}},
        ]),
    );
    let lb = LbPolicy::RingHash(RingHash::default());
    let mut s = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    let me = s.local_addr().expect("local address");
    s.write_all(
        b"GET / HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 10.1.2.3\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let seed = format!("{me}{}", p.addr());
    let value = format!("{:016x}", xxhash64(seed.as_bytes(), 0));
    // A zero ttl: a session cookie (no Max-Age).
    let want_cookie = format!("set-cookie: c=\"{value}\"; HttpOnly");
    assert!(
        text.lines().any(|l| l.eq_ignore_ascii_case(&want_cookie)),
        "{want_cookie} in {text}"
    );
    let want = expected(&lb, &eps, xxhash64(value.as_bytes(), 0));
    assert!(
        text.contains(&format!("\"upstream\":\"u{want}\"")),
        "u{want} in {text}"
    );
    // With the cookie, the terminal cookie policy alone decides.
    for k in keys() {
        let cookie = format!("c={k}");
        let got = sticky(
            &p,
            "/",
            &[("x-forwarded-for", "10.1.2.3"), ("cookie", &cookie)],
        )
        .await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "cookie {k}");
    }
    drop(p);
    let p = start(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!([{"connection_properties": {"source_ip": true}}]),
    );
    for ip in ["10.1.2.3", "192.168.7.9", "10.0.0.200", "172.16.5.4"] {
        let got = sticky(&p, "/", &[("x-forwarded-for", ip)]).await;
        let want = expected(&lb, &eps, xxhash64(ip.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "xff {ip}");
    }
}

/// A typed policy's own `consistent_hashing_lb_config.hash_policy` decides
/// the request hash instead of the route's `hash_policy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_hash_policy_overrides_the_routes() {
    let ups = upstreams(3).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let p = start(
        &eps,
        json!({"load_balancing_policy": {"policies": [
            {"typed_extension_config": {"name": "envoy.load_balancing_policies.maglev", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
                "consistent_hashing_lb_config": {"hash_policy": [{"header": {"header_name": "x-lb"}}]},
            }}},
        ]}}),
        json!([{"header": {"header_name": "x-route"}}]),
    );
    let lb = LbPolicy::Maglev(Maglev::default());
    for k in keys() {
        let other = format!("{k}-route");
        let got = sticky(&p, "/", &[("x-lb", &k), ("x-route", &other)]).await;
        let want = expected(&lb, &eps, xxhash64(k.as_bytes(), 0));
        assert_eq!(got, format!("u{want}"), "x-lb {k}");
    }
}

/// `tcp_proxy` without a hash policy in front of a Maglev policy with its
/// own `source_ip` hash policy: every connection reaches the host of
/// 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_follows_the_clusters_hash_policy() {
    let ups = upstreams(4).await;
    let eps: Vec<Ep> = ups.iter().map(|u| ep(u.port())).collect();
    let mut extra = json!({"load_balancing_policy": {"policies": [
        {"typed_extension_config": {"name": "envoy.load_balancing_policies.maglev", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
            "consistent_hashing_lb_config": {"hash_policy": [{"connection_properties": {"source_ip": true}}]},
        }}},
    ]}});
    extra["load_assignment"] = assignment(&eps);
    let c = cluster("hashed", &[], extra);
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![tcp_proxy("tcp", "hashed", json!({}))])],
            )],
            vec![c.clone()],
        )
    });
    let lb = LbPolicy::Maglev(Maglev::default());
    let want = format!("u{}", expected(&lb, &eps, xxhash64(b"127.0.0.1", 0)));
    for _ in 0..12 {
        // A new client each time: a new connection, hashed again.
        let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
        assert_eq!(r.echo().upstream, want);
    }
}

/// Zones for a locality-weighted cluster: `(zone, weight, endpoints)`.
type Zones<'a> = [(&'a str, Option<u32>, Vec<Ep>)];

/// The endpoint (index into the zones' endpoints, flattened in order) the
/// locality-weighted table picks for `hash`, with `local` the node's zone.
fn expected_zones(lb: &LbPolicy, zones: &Zones<'_>, local: Option<&str>, hash: u64) -> usize {
    let mut hosts = Vec::new();
    for (zone, weight, eps) in zones {
        let key = Arc::new(LocalityKey {
            region: "r".into(),
            zone: (*zone).into(),
            sub_zone: String::new(),
        });
        for e in eps {
            hosts.push(Arc::new(Host {
                addr: format!("127.0.0.1:{}", e.port).parse().expect("addr"),
                internal: None,
                hostname: String::new(),
                weight: e.weight,
                healthy: e.healthy,
                priority: 0,
                locality: key.clone(),
                locality_weight: weight.unwrap_or(0),
                metadata: Value::Null,
                active: AtomicU64::new(0),
                outlier: OnceLock::new(),
                active_hc: OnceLock::new(),
                since: AtomicU64::new(0),
            }));
        }
    }
    let local = local.map(|z| LocalityKey {
        region: "r".into(),
        zone: z.into(),
        sub_zone: String::new(),
    });
    let at: Vec<usize> = (0..hosts.len()).collect();
    let n = normalize_localities(&hosts, &at, false, local.as_ref());
    let (t, _) = HashTable::build_weighted(lb, &hosts, &n).expect("a table");
    t.choose(hash, 0).expect("a host")
}

/// A ring-hash proxy over locality-weighted `zones` (listed out of order:
/// Envoy sorts them, the node's own zone first), the node in `local`.
fn start_zones(zones: &Zones<'_>, local: Option<&str>) -> Proxy {
    let localities: Vec<Value> = zones
        .iter()
        .map(|(zone, weight, eps)| {
            let mut l = json!({
                "locality": {"region": "r", "zone": zone},
                "lb_endpoints": lb_endpoints(eps),
            });
            if let Some(w) = weight {
                l["load_balancing_weight"] = json!(w);
            }
            l
        })
        .collect();
    let c = cluster(
        "hashed",
        &[],
        json!({
            "lb_policy": "RING_HASH",
            "common_lb_config": {"locality_weighted_lb_config": {}},
            "load_assignment": {"cluster_name": "hashed", "endpoints": localities},
        }),
    );
    let r = json!({"match": {"prefix": "/"}, "route": {
        "cluster": "hashed", "hash_policy": [{"header": {"header_name": "x-user"}}],
    }});
    let local = local.map(str::to_owned);
    Proxy::start(move |ports| {
        let b = bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![],
                    vec![vhost("vh", vec![r.clone()], json!({}))],
                    json!({}),
                )])],
            )],
            vec![c.clone()],
        );
        let mut v: Value = serde_json::from_str(&b).expect("bootstrap json");
        if let Some(z) = &local {
            v["node"] = json!({"id": "n", "cluster": "c", "locality": {"region": "r", "zone": z}});
        }
        v.to_string()
    })
}

/// Ring hash with locality weights: each locality's share of the ring is
/// its `load_balancing_weight` over the total, split among its healthy
/// hosts; localities are laid out sorted by name, the node's own first, so
/// every key reaches the host Envoy's ring gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_with_locality_weights() {
    let ups = upstreams(5).await;
    let e = |i: usize| ep(ups[i].port());
    let zones = [
        ("c", Some(1), vec![e(0), e(1)]),
        ("a", Some(3), vec![e(2)]),
        ("b", None, vec![e(3)]),
        ("d", Some(2), vec![Ep { weight: 3, ..e(4) }]),
    ];
    // Upstream names by the flattened endpoint order above.
    let names = ["u0", "u1", "u2", "u3", "u4"];
    let lb = LbPolicy::RingHash(RingHash::default());
    for local in [None, Some("d")] {
        let p = start_zones(&zones, local);
        let mut seen = HashSet::new();
        for k in keys() {
            let got = sticky(&p, "/", &[("x-user", &k)]).await;
            let want = expected_zones(&lb, &zones, local, xxhash64(k.as_bytes(), 0));
            assert_eq!(got, names[want], "key {k} (local zone {local:?})");
            seen.insert(got);
        }
        assert!(!seen.contains("u3"), "zone b has no weight");
    }
}

/// The typed `least_request` policy's `locality_lb_config.
/// locality_weighted_lb_config` (what Envoy Gateway emits) weighs
/// localities the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_policy_locality_weights() {
    let ups = upstreams(3).await;
    let p = start_localities_with(
        &[
            ("a", Some(1), vec![ep(ups[0].port())]),
            ("b", Some(4), vec![ep(ups[1].port()), ep(ups[2].port())]),
        ],
        json!({"load_balancing_policy": {"policies": [
            {"typed_extension_config": {"name": "envoy.load_balancing_policies.least_request", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                "locality_lb_config": {"locality_weighted_lb_config": {}},
            }}},
        ]}}),
    );
    let s = spread(&p, 500).await;
    let n = |u: &str| s.get(u).copied().unwrap_or(0);
    assert!((70..=130).contains(&n("u0")), "zone a ~20%: {s:?}");
}
