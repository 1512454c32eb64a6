//! More scenario tests: real sockets, real echo upstreams, Envoy-compatible
//! expectations. Every test here runs against weir in-process by default
//! and against real Envoy with `WEIR_SCENARIO_TARGET=envoy` (see
//! `weir_tests::scenario`), which is how the expectations were checked.
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use weir_tests::config::HttpYaml;
use weir_tests::scenario::{echo_header, echo_headers, Http, Ports, Proxy, Target};
use weir_tests::upstream::{self, EchoServer};

/// A bootstrap with one HTTP listener `l`.
#[derive(Default, Clone)]
struct Cfg {
    /// Top-level bootstrap fields (`overload_manager`, `stats_config`, ...).
    top: String,
    /// Extra fields of listener `l` (indented 4).
    listener: String,
    /// Extra HCM fields (indented 10).
    hcm: String,
    /// Virtual hosts (list items indented 12).
    vhosts: String,
    /// Clusters (list items indented 2).
    clusters: String,
}

impl Cfg {
    fn new(vhosts: &str, clusters: &str) -> Cfg {
        Cfg {
            vhosts: vhosts.to_owned(),
            clusters: clusters.to_owned(),
            ..Cfg::default()
        }
    }
    fn hcm(mut self, s: &str) -> Cfg {
        self.hcm = s.to_owned();
        self
    }
    fn top(mut self, s: &str) -> Cfg {
        self.top = s.to_owned();
        self
    }
    fn listener(mut self, s: &str) -> Cfg {
        self.listener = s.to_owned();
        self
    }
    fn render(&self, p: &Ports) -> String {
        let Cfg {
            top,
            listener,
            hcm,
            vhosts,
            clusters,
        } = self;
        HttpYaml {
            top,
            listener,
            hcm,
            vhosts,
            clusters,
            ..HttpYaml::default()
        }
        .render(p)
    }
    fn start(&self) -> Proxy {
        let c = self.clone();
        Proxy::start(move |p| c.render(p))
    }
}

/// A vhost matching every domain with the given routes (list items at 14).
fn vhost(routes: &str) -> String {
    format!(
        "            - name: main\n              domains: [\"*\"]\n              routes:\n{routes}"
    )
}

/// One route `prefix -> cluster` (with extra route-action fields).
fn route(prefix: &str, cluster: &str, action_extra: &str) -> String {
    format!("              - match: {{prefix: \"{prefix}\"}}\n                route: {{cluster: {cluster}{action_extra}}}\n")
}

/// A STATIC cluster; `endpoints` are `lb_endpoints` list items (indent 8).
fn cluster_eps(name: &str, extra: &str, localities: &str) -> String {
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n{localities}"
    )
}

/// A locality with `priority` and the given upstreams; `ep_extra[i]` adds
/// fields to the i-th `lb_endpoint` (e.g. `health_status: UNHEALTHY`).
fn locality(priority: u32, eps: &[(u16, &str)]) -> String {
    let mut s = format!("      - priority: {priority}\n        lb_endpoints:\n");
    for (port, extra) in eps {
        s.push_str(&format!(
            "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}\n"
        ));
        if !extra.is_empty() {
            s.push_str(&format!("          {extra}\n"));
        }
    }
    s
}

fn cluster(name: &str, port: u16) -> String {
    cluster_eps(name, "", &locality(0, &[(port, "")]))
}

const H2_UPSTREAM: &str = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}\n";

async fn echo(name: &str) -> EchoServer {
    upstream::http1(name).await.expect("echo upstream")
}

/// Sends `n` sequential GETs and counts the answering upstreams.
async fn spread(
    http: &Http,
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let r = http.get(url, headers).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *m.entry(r.echo().upstream).or_insert(0) += 1;
    }
    m
}

fn count(m: &BTreeMap<String, usize>, k: &str) -> usize {
    m.get(k).copied().unwrap_or(0)
}

// ---------------------------------------------------------------- load balancing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_round_robin_spreads_evenly() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    let eps = locality(0, &[(a.port(), ""), (b.port(), ""), (c.port(), "")]);
    let p = Cfg::new(
        &vhost(&route("/", "rr", "")),
        &cluster_eps("rr", "    lb_policy: ROUND_ROBIN\n", &eps),
    )
    .start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 30).await;
    assert_eq!(
        (count(&m, "a"), count(&m, "b"), count(&m, "c")),
        (10, 10, 10),
        "{m:?}"
    );
    assert_eq!(p.stat("cluster.rr.upstream_rq_total").await, Some(30));
    assert_eq!(p.stat("cluster.rr.membership_total").await, Some(3));
    assert_eq!(p.stat("cluster.rr.membership_healthy").await, Some(3));
    // A plaintext cluster has no `ssl.*` stats (Envoy's TLS context makes them).
    assert_eq!(p.stat("cluster.rr.ssl.handshake").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_weights_are_respected() {
    let (a, b) = (echo("a").await, echo("b").await);
    let eps = locality(
        0,
        &[
            (a.port(), "load_balancing_weight: 1"),
            (b.port(), "load_balancing_weight: 2"),
        ],
    );
    let p = Cfg::new(&vhost(&route("/", "w", "")), &cluster_eps("w", "", &eps)).start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 60).await;
    // Weighted round robin: 1:2 over 60 requests.
    assert!((18..=22).contains(&count(&m, "a")), "{m:?}");
    assert!((38..=42).contains(&count(&m, "b")), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_random_reaches_every_host() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    let eps = locality(0, &[(a.port(), ""), (b.port(), ""), (c.port(), "")]);
    let p = Cfg::new(
        &vhost(&route("/", "rnd", "")),
        &cluster_eps("rnd", "    lb_policy: RANDOM\n", &eps),
    )
    .start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 60).await;
    // (2/3)^60 per host: never misses one in practice.
    for h in ["a", "b", "c"] {
        assert!(count(&m, h) >= 1, "{h} never chosen: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_least_request_avoids_the_busy_host() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    let eps = locality(0, &[(a.port(), ""), (b.port(), ""), (c.port(), "")]);
    // choice_count 20 over 3 hosts: the busy host is the only candidate
    // with probability 3^-20.
    let p = Cfg::new(
        &vhost(&route("/", "lr", "")),
        &cluster_eps(
            "lr",
            "    lb_policy: LEAST_REQUEST\n    least_request_lb_config: {choice_count: 20}\n",
            &eps,
        ),
    )
    .start();
    let http = Http::h1();
    let slow = {
        let http = http.clone();
        let url = format!("{}/slow", p.base());
        tokio::spawn(async move { http.get(&url, &[("x-echo-delay-ms", "1000")]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = spread(&http, &format!("{}/fast", p.base()), &[], 12).await;
    let busy = slow.await.expect("slow request").echo().upstream;
    assert_eq!(count(&m, &busy), 0, "busy host {busy} chosen: {m:?}");
    assert_eq!(m.values().sum::<usize>(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_priorities_fail_over_only_when_priority_0_is_unhealthy() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    let healthy = format!(
        "{}{}",
        locality(0, &[(a.port(), ""), (b.port(), "")]),
        locality(1, &[(c.port(), "")])
    );
    let unhealthy = format!(
        "{}{}",
        locality(
            0,
            &[
                (a.port(), "health_status: UNHEALTHY"),
                (b.port(), "health_status: UNHEALTHY")
            ]
        ),
        locality(1, &[(c.port(), "")])
    );
    let clusters = format!(
        "{}{}",
        cluster_eps("p_ok", "", &healthy),
        cluster_eps("p_down", "", &unhealthy)
    );
    let routes = format!(
        "{}{}",
        route("/ok", "p_ok", ""),
        route("/down", "p_down", "")
    );
    let p = Cfg::new(&vhost(&routes), &clusters).start();
    let http = Http::h1();
    let m = spread(&http, &format!("{}/ok", p.base()), &[], 20).await;
    assert_eq!(
        count(&m, "c"),
        0,
        "priority 1 used while priority 0 is healthy: {m:?}"
    );
    assert_eq!(count(&m, "a") + count(&m, "b"), 20);
    let m = spread(&http, &format!("{}/down", p.base()), &[], 10).await;
    assert_eq!(count(&m, "c"), 10, "{m:?}");
    assert_eq!(p.stat("cluster.p_down.membership_healthy").await, Some(1));
    assert_eq!(p.stat("cluster.p_down.membership_total").await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_priority_spill_over_follows_overprovisioning_factor() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    // Priority 0 is 50% healthy: with the default overprovisioning factor
    // 1.4 it takes 70% of the traffic and priority 1 the remaining 30%.
    let eps = format!(
        "{}{}",
        locality(0, &[(a.port(), ""), (b.port(), "health_status: UNHEALTHY")]),
        locality(1, &[(c.port(), "")])
    );
    let p = Cfg::new(&vhost(&route("/", "p", "")), &cluster_eps("p", "", &eps)).start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 200).await;
    assert_eq!(count(&m, "b"), 0, "{m:?}");
    // Expected 60 of 200 (sd ~6.5).
    assert!((35..=85).contains(&count(&m, "c")), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_unhealthy_and_draining_endpoints_are_excluded() {
    let (a, b, c, d) = (
        echo("a").await,
        echo("b").await,
        echo("c").await,
        echo("d").await,
    );
    // 2 of 4 healthy: 50%, not below the 50% panic threshold.
    let eps = locality(
        0,
        &[
            (a.port(), ""),
            (b.port(), "health_status: HEALTHY"),
            (c.port(), "health_status: UNHEALTHY"),
            (d.port(), "health_status: DRAINING"),
        ],
    );
    let p = Cfg::new(&vhost(&route("/", "h", "")), &cluster_eps("h", "", &eps)).start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 20).await;
    assert_eq!((count(&m, "a"), count(&m, "b")), (10, 10), "{m:?}");
    assert_eq!(p.stat("cluster.h.membership_healthy").await, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_panic_mode_routes_to_all_hosts_when_too_few_are_healthy() {
    let (a, b, c) = (echo("a").await, echo("b").await, echo("c").await);
    // 1 of 3 healthy: 33% < the 50% panic threshold (raw percentage of the
    // host set, as Envoy's isHostSetInPanic): every host gets traffic.
    let eps = locality(
        0,
        &[
            (a.port(), ""),
            (b.port(), "health_status: UNHEALTHY"),
            (c.port(), "health_status: UNHEALTHY"),
        ],
    );
    let p = Cfg::new(&vhost(&route("/", "h", "")), &cluster_eps("h", "", &eps)).start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 30).await;
    for h in ["a", "b", "c"] {
        assert!(count(&m, h) >= 1, "{h} not used in panic mode: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_traffic() {
    let (a, b) = (echo("a").await, echo("b").await);
    let routes = r#"              - match: {prefix: "/"}
                route:
                  weighted_clusters:
                    clusters:
                    - name: ca
                      weight: 50
                      request_headers_to_add: [{header: {key: x-picked, value: ca}}]
                    - name: cb
                      weight: 50
                      request_headers_to_add: [{header: {key: x-picked, value: cb}}]
"#;
    let clusters = format!("{}{}", cluster("ca", a.port()), cluster("cb", b.port()));
    let p = Cfg::new(&vhost(routes), &clusters).start();
    let http = Http::h1();
    let mut m = BTreeMap::new();
    for _ in 0..200 {
        let v = http.get(&format!("{}/", p.base()), &[]).await.echo();
        let picked = echo_header(&v, "x-picked").unwrap_or("-").to_owned();
        assert_eq!(
            picked,
            format!("c{}", v.upstream),
            "per-cluster headers follow the pick"
        );
        *m.entry(v.upstream).or_insert(0usize) += 1;
    }
    // Expected 100 each (sd ~7).
    assert!((70..=130).contains(&count(&m, "a")), "{m:?}");
    assert_eq!(count(&m, "a") + count(&m, "b"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_header_routing() {
    let (a, b) = (echo("a").await, echo("b").await);
    let routes = r#"              - match: {prefix: "/nf"}
                route: {cluster_header: x-cluster, cluster_not_found_response_code: NOT_FOUND}
              - match: {prefix: "/"}
                route: {cluster_header: x-cluster}
"#;
    let clusters = format!("{}{}", cluster("ca", a.port()), cluster("cb", b.port()));
    let p = Cfg::new(&vhost(routes), &clusters).start();
    let http = Http::h1();
    let url = format!("{}/x", p.base());
    assert_eq!(
        http.get(&url, &[("x-cluster", "ca")]).await.echo().upstream,
        "a"
    );
    let v = http.get(&url, &[("x-cluster", "cb")]).await.echo();
    assert_eq!(v.upstream, "b");
    assert_eq!(
        echo_header(&v, "x-cluster"),
        Some("cb"),
        "the header is forwarded"
    );
    let r = http.get(&url, &[("x-cluster", "nope")]).await;
    assert_eq!(r.status, 503, "unknown cluster: {}", r.text());
    let r = http.get(&url, &[]).await;
    assert_eq!(r.status, 503, "missing header");
    let r = http
        .get(&format!("{}/nf", p.base()), &[("x-cluster", "nope")])
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(p.stat("http.ingress.no_cluster").await, Some(3));
}

// ---------------------------------------------------------------- header formatting

/// The current UTC year (days-from-civil inverse).
fn current_year() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_header_formatting_commands() {
    // Set before the proxy starts (a process inherits it).
    std::env::set_var("WEIR_SCENARIO_ENV_VALUE", "from-env");
    let a = echo("a").await;
    let routes = r#"              - match: {prefix: "/"}
                route: {cluster: a}
                request_headers_to_add:
                - header: {key: x-local, value: "%DOWNSTREAM_LOCAL_ADDRESS%"}
                - header: {key: x-proto, value: "%PROTOCOL%"}
                - header: {key: x-year, value: "%START_TIME(%Y)%"}
                - header: {key: x-host, value: "%HOSTNAME%"}
                - header: {key: x-env, value: "%ENVIRONMENT(WEIR_SCENARIO_ENV_VALUE)%"}
                - header: {key: x-copy, value: "in=%REQ(x-in)%"}
                response_headers_to_add:
                - header: {key: x-resp-copy, value: "%RESP(x-from-upstream)%"}
                - header: {key: x-resp-proto, value: "%PROTOCOL%"}
                response_headers_to_remove: [x-echo-seen]
"#;
    let p = Cfg::new(&vhost(routes), &cluster("a", a.port())).start();
    for (http, proto) in [(Http::h1(), "HTTP/1.1"), (Http::h2c(), "HTTP/2")] {
        let r = http
            .get(
                &format!("{}/f", p.base()),
                &[("x-in", "hello"), ("x-echo-header-x-from-upstream", "up")],
            )
            .await;
        assert_eq!(r.status, 200);
        let v = r.echo();
        let h = |n: &str| echo_header(&v, n).map(str::to_owned);
        assert_eq!(h("x-local"), Some(p.addr().to_string()));
        assert_eq!(h("x-proto").as_deref(), Some(proto));
        assert_eq!(h("x-year"), Some(current_year().to_string()));
        assert_eq!(h("x-host"), Some(hostname()));
        assert_eq!(h("x-env").as_deref(), Some("from-env"));
        assert_eq!(h("x-copy").as_deref(), Some("in=hello"));
        assert_eq!(r.header("x-resp-copy"), Some("up"));
        assert_eq!(r.header("x-resp-proto"), Some(proto));
        assert_eq!(r.header("x-echo-seen"), None, "removed from the response");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_metadata_in_headers() {
    let a = echo("a").await;
    let routes = r#"              - match: {prefix: "/"}
                route: {cluster: meta}
                request_headers_to_add:
                - header: {key: x-meta, value: "%UPSTREAM_METADATA([\"ns\", \"key\"])%"}
                response_headers_to_add:
                - header: {key: x-resp-meta, value: "%UPSTREAM_METADATA([\"ns\", \"key\"])%"}
"#;
    let eps = locality(
        0,
        &[(
            a.port(),
            "metadata: {filter_metadata: {ns: {key: meta-value}}}",
        )],
    );
    let p = Cfg::new(&vhost(routes), &cluster_eps("meta", "", &eps)).start();
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    // Envoy 1.40 renders request headers before the router picks the host:
    // upstream metadata is empty there (and the header omitted); response
    // headers see the chosen host.
    assert_eq!(echo_header(&r.echo(), "x-meta"), None);
    assert_eq!(r.header("x-resp-meta"), Some("meta-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_metadata_numbers_render_as_envoy() {
    let a = echo("a").await;
    let routes = r#"              - match: {prefix: "/"}
                route: {cluster: meta}
                response_headers_to_add:
                - header: {key: x-int, value: "%UPSTREAM_METADATA([\"ns\", \"int\"])%"}
                - header: {key: x-float, value: "%UPSTREAM_METADATA([\"ns\", \"float\"])%"}
                - header: {key: x-bool, value: "%UPSTREAM_METADATA([\"ns\", \"bool\"])%"}
"#;
    let eps = locality(
        0,
        &[(
            a.port(),
            "metadata: {filter_metadata: {ns: {int: 7, float: 2.5, bool: true}}}",
        )],
    );
    let p = Cfg::new(&vhost(routes), &cluster_eps("meta", "", &eps)).start();
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.header("x-int"), Some("7"));
    assert_eq!(r.header("x-float"), Some("2.5"));
    assert_eq!(r.header("x-bool"), Some("true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_append_actions_keep_empty_value_and_removal() {
    let a = echo("a").await;
    let routes = r#"              - match: {prefix: "/"}
                route: {cluster: a}
                request_headers_to_add:
                - header: {key: x-app, value: appended}
                  append_action: APPEND_IF_EXISTS_OR_ADD
                - header: {key: x-app-new, value: added}
                  append_action: APPEND_IF_EXISTS_OR_ADD
                - header: {key: x-aia, value: new}
                  append_action: ADD_IF_ABSENT
                - header: {key: x-aia-new, value: new}
                  append_action: ADD_IF_ABSENT
                - header: {key: x-oie, value: new}
                  append_action: OVERWRITE_IF_EXISTS
                - header: {key: x-oie-new, value: new}
                  append_action: OVERWRITE_IF_EXISTS
                - header: {key: x-oieoa, value: new}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - header: {key: x-oieoa-new, value: new}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - header: {key: x-empty-dropped, value: "%REQ(x-missing)%"}
                - header: {key: x-empty-kept, value: "%REQ(x-missing)%"}
                  keep_empty_value: true
                request_headers_to_remove: [x-remove-me]
                response_headers_to_add:
                - header: {key: x-r-app, value: added}
                  append_action: APPEND_IF_EXISTS_OR_ADD
                - header: {key: x-r-oie, value: new}
                  append_action: OVERWRITE_IF_EXISTS
                - header: {key: x-r-aia, value: new}
                  append_action: ADD_IF_ABSENT
"#;
    let p = Cfg::new(&vhost(routes), &cluster("a", a.port())).start();
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-app", "orig"),
                ("x-aia", "orig"),
                ("x-oie", "orig"),
                ("x-oieoa", "orig"),
                ("x-remove-me", "yes"),
                ("x-echo-header-x-r-app", "up"),
                ("x-echo-header-x-r-oie", "up"),
                ("x-echo-header-x-r-aia", "up"),
            ],
        )
        .await;
    let v = r.echo();
    let all = |n: &str| echo_headers(&v, n);
    assert_eq!(all("x-app"), ["orig", "appended"]);
    assert_eq!(all("x-app-new"), ["added"]);
    assert_eq!(all("x-aia"), ["orig"]);
    assert_eq!(all("x-aia-new"), ["new"]);
    assert_eq!(all("x-oie"), ["new"]);
    assert!(all("x-oie-new").is_empty());
    assert_eq!(all("x-oieoa"), ["new"]);
    assert_eq!(all("x-oieoa-new"), ["new"]);
    assert!(
        all("x-empty-dropped").is_empty(),
        "empty values are dropped"
    );
    assert_eq!(all("x-empty-kept"), [""], "keep_empty_value");
    assert!(all("x-remove-me").is_empty());
    assert_eq!(r.header_all("x-r-app"), ["up", "added"]);
    assert_eq!(r.header_all("x-r-oie"), ["new"]);
    assert_eq!(r.header_all("x-r-aia"), ["up"]);
}

// ---------------------------------------------------------------- path normalisation

async fn raw_get(p: &Proxy, target: &str, host: &str) -> weir_tests::client::Reply {
    let req = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    match weir_tests::client::http1_raw(p.addr(), req.as_bytes(), Duration::from_secs(5)).await {
        weir_tests::client::Outcome::Response(r) => r,
        other => panic!("GET {target}: {other:?}"),
    }
}

fn reply_echo(r: &weir_tests::client::Reply) -> weir_tests::upstream::EchoView {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| {
        panic!(
            "not an echo body ({e}): {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalisation_merge_slashes_and_escaped_slash_redirect() {
    let a = echo("a").await;
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          normalize_path: true\n          merge_slashes: true\n          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n")
        .start();
    let r = raw_get(&p, "/a/../b/./c?q=1", "x").await;
    assert_eq!(r.status, 200);
    assert_eq!(reply_echo(&r).path, "/b/c?q=1");
    let r = raw_get(&p, "//a///b//", "x").await;
    assert_eq!(reply_echo(&r).path, "/a/b/");
    let r = raw_get(&p, "/%61%62c/x", "x").await;
    assert_eq!(reply_echo(&r).path, "/abc/x", "unreserved escapes decoded");
    let r = raw_get(&p, "/a%2Fb?x=1", "x").await;
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(r.header("location"), Some("/a/b?x=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slashes_reject_and_unescape_and_forward() {
    let a = echo("a").await;
    let reject = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          path_with_escaped_slashes_action: REJECT_REQUEST\n")
        .start();
    let r = raw_get(&reject, "/a%2fb", "x").await;
    assert_eq!(r.status, 400);
    let r = raw_get(&reject, "/a%5Cb", "x").await;
    assert_eq!(r.status, 400, "backslash escapes too");
    let r = raw_get(&reject, "/a/b", "x").await;
    assert_eq!(r.status, 200);
    let fwd = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD\n")
        .start();
    let r = raw_get(&fwd, "/a%2Fb%2f", "x").await;
    assert_eq!(reply_echo(&r).path, "/a/b/");
    let keep = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          path_with_escaped_slashes_action: KEEP_UNCHANGED\n")
        .start();
    let r = raw_get(&keep, "/a%2Fb", "x").await;
    assert_eq!(reply_echo(&r).path, "/a%2Fb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_any_host_port_affects_virtual_host_matching() {
    let a = echo("a").await;
    let vh = format!(
        "            - name: ex\n              domains: [\"example.com\"]\n              routes:\n{}",
        route("/", "a", "")
    );
    let strip = Cfg::new(&vh, &cluster("a", a.port()))
        .hcm("          strip_any_host_port: true\n")
        .start();
    let r = raw_get(&strip, "/", "example.com:8080").await;
    assert_eq!(r.status, 200);
    let v = reply_echo(&r);
    assert_eq!(
        echo_header(&v, "host"),
        Some("example.com"),
        "port stripped"
    );
    let plain = Cfg::new(&vh, &cluster("a", a.port())).start();
    let r = raw_get(&plain, "/", "example.com:8080").await;
    assert_eq!(r.status, 404, "no vhost for example.com:8080");
    let r = raw_get(&plain, "/", "example.com").await;
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------- timeouts and retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_slow_first_attempt() {
    let a = echo("a").await;
    let extra = ", retry_policy: {retry_on: 5xx, num_retries: 2, per_try_timeout: 0.1s, retry_back_off: {base_interval: 0.001s}}";
    let p = Cfg::new(&vhost(&route("/", "a", extra)), &cluster("a", a.port())).start();
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-echo-id", "pt1"),
                ("x-echo-delay-ms", "600"),
                ("x-echo-delay-times", "1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().seen, 2, "the second attempt answered");
    assert_eq!(p.stat("cluster.a.upstream_rq_retry").await, Some(1));
    assert_eq!(p.stat("cluster.a.upstream_rq_retry_success").await, Some(1));
    // Every attempt too slow: 504 after the retries.
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[("x-echo-id", "pt2"), ("x-echo-delay-ms", "600")],
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout")
    );
    assert_eq!(p.stat("cluster.a.upstream_rq_retry").await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_are_counted() {
    let a = echo("a").await;
    let extra = ", retry_policy: {retry_on: 5xx, num_retries: 1, per_try_timeout: 0.1s, retry_back_off: {base_interval: 0.001s}}";
    let p = Cfg::new(&vhost(&route("/", "a", extra)), &cluster("a", a.port())).start();
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-echo-id", "c1"),
                ("x-echo-delay-ms", "600"),
                ("x-echo-delay-times", "1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        p.stat("cluster.a.upstream_rq_per_try_timeout").await,
        Some(1)
    );
    assert_eq!(p.stat("cluster.a.upstream_rq_timeout").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_status_codes() {
    let a = echo("a").await;
    let extra = ", retry_policy: {retry_on: retriable-status-codes, retriable_status_codes: [418], num_retries: 2, retry_back_off: {base_interval: 0.001s}}";
    let p = Cfg::new(&vhost(&route("/", "a", extra)), &cluster("a", a.port())).start();
    let http = Http::h1();
    let url = format!("{}/", p.base());
    let r = http
        .get(
            &url,
            &[
                ("x-echo-status", "418"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "s1"),
            ],
        )
        .await;
    assert_eq!((r.status, r.echo().seen), (200, 2));
    // 500 is not listed: no retry.
    let r = http
        .get(&url, &[("x-echo-status", "500"), ("x-echo-id", "s2")])
        .await;
    assert_eq!((r.status, r.header("x-echo-seen")), (500, Some("1")));
    // Always 418: retries exhausted, the upstream's 418 comes back.
    let r = http
        .get(&url, &[("x-echo-status", "418"), ("x-echo-id", "s3")])
        .await;
    assert_eq!((r.status, r.header("x-echo-seen")), (418, Some("3")));
    assert_eq!(p.stat("cluster.a.upstream_rq_retry").await, Some(3));
    assert_eq!(
        p.stat("cluster.a.upstream_rq_retry_limit_exceeded").await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_host_predicate_previous_hosts_picks_the_other_host() {
    let (a, b) = (echo("a").await, echo("b").await);
    let extra = r#", retry_policy: {retry_on: 5xx, num_retries: 1, retry_back_off: {base_interval: 0.001s}, host_selection_retry_max_attempts: 60, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}"#;
    let eps = locality(0, &[(a.port(), ""), (b.port(), "")]);
    // RANDOM: without the predicate half the retries would hit the same host.
    let p = Cfg::new(
        &vhost(&route("/", "ab", extra)),
        &cluster_eps("ab", "    lb_policy: RANDOM\n", &eps),
    )
    .start();
    let http = Http::h1();
    for i in 0..12 {
        let id = format!("ph{i}");
        let r = http
            .get(
                &format!("{}/", p.base()),
                &[("x-echo-status", "503"), ("x-echo-id", &id)],
            )
            .await;
        assert_eq!(r.status, 503);
        // The retry reached a host that had not seen this id yet.
        assert_eq!(r.header("x-echo-seen"), Some("1"), "request {i}");
    }
    assert_eq!(p.stat("cluster.ab.upstream_rq_retry").await, Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rq_timeout_header_is_honoured_only_from_internal_requests() {
    let a = echo("a").await;
    let internal = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          use_remote_address: true\n          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.1, prefix_len: 32}]}\n");
    let external = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          use_remote_address: true\n          internal_address_config: {cidr_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]}\n");
    let http = Http::h1();
    let p = internal.start();
    let url = format!("{}/", p.base());
    let r = http
        .get(
            &url,
            &[
                ("x-envoy-upstream-rq-timeout-ms", "100"),
                ("x-echo-delay-ms", "700"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "upstream request timeout")
    );
    let r = http
        .get(&url, &[("x-envoy-upstream-rq-timeout-ms", "250")])
        .await;
    let v = r.echo();
    assert_eq!(
        echo_header(&v, "x-envoy-expected-rq-timeout-ms"),
        Some("250")
    );
    assert_eq!(
        echo_header(&v, "x-envoy-upstream-rq-timeout-ms"),
        None,
        "consumed"
    );
    assert_eq!(echo_header(&v, "x-envoy-internal"), Some("true"));
    drop(p);
    let p = external.start();
    let r = http
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-envoy-upstream-rq-timeout-ms", "100"),
                ("x-echo-delay-ms", "400"),
            ],
        )
        .await;
    assert_eq!(
        r.status, 200,
        "an external request's timeout header is ignored"
    );
    let v = r.echo();
    assert_eq!(
        echo_header(&v, "x-envoy-expected-rq-timeout-ms"),
        Some("15000")
    );
    assert_eq!(echo_header(&v, "x-envoy-internal"), None);
}

// ---------------------------------------------------------------- admin

/// A proxy with one echo-backed route, three requests already served.
async fn admin_fixture() -> (Proxy, EchoServer) {
    let a = echo("a").await;
    let clusters = format!("{}{}", cluster("a", a.port()), cluster("b", a.port()));
    let p = Cfg::new(&vhost(&route("/", "a", "")), &clusters).start();
    let http = Http::h1();
    for _ in 0..3 {
        assert_eq!(http.get(&format!("{}/", p.base()), &[]).await.status, 200);
    }
    (p, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_stats_usedonly_filter_json_and_reset_counters() {
    let (p, _a) = admin_fixture().await;
    let r = p
        .admin("GET", "/stats?usedonly&filter=%5Ecluster%5C.a%5C.")
        .await;
    assert_eq!(r.status, 200);
    let t = r.text();
    assert!(
        t.lines().any(|l| l == "cluster.a.upstream_rq_total: 3"),
        "{t}"
    );
    assert!(
        t.lines().any(|l| l == "cluster.a.upstream_rq_2xx: 3"),
        "{t}"
    );
    assert!(
        !t.contains("upstream_rq_retry"),
        "unused counters hidden: {t}"
    );
    assert!(t.lines().all(|l| l.starts_with("cluster.a.")), "{t}");
    let r = p
        .admin(
            "GET",
            "/stats?format=json&filter=%5Ecluster%5C.a%5C.upstream_rq_%28total%7C2xx%29%24",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        serde_json::json!({"stats": [
            {"name": "cluster.a.upstream_rq_2xx", "value": 3},
            {"name": "cluster.a.upstream_rq_total", "value": 3},
        ]})
    );
    let r = p.admin("GET", "/stats?filter=%28").await;
    assert_eq!(r.status, 400, "invalid regex: {}", r.text());
    let r = p.admin("POST", "/reset_counters").await;
    assert_eq!((r.status, r.text().as_str()), (200, "OK\n"));
    assert_eq!(p.stat("cluster.a.upstream_rq_total").await, Some(0));
    assert_eq!(p.stat("http.ingress.downstream_rq_total").await, Some(0));
    // Gauges are not counters: membership stays.
    assert_eq!(p.stat("cluster.a.membership_total").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clusters_and_listeners_json() {
    let (p, a) = admin_fixture().await;
    let r = p.admin("GET", "/clusters?format=json").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let statuses = v["cluster_statuses"].as_array().expect("cluster_statuses");
    let ca = statuses
        .iter()
        .find(|c| c["name"] == "a")
        .expect("cluster a");
    let h = &ca["host_statuses"][0];
    assert_eq!(h["address"]["socket_address"]["address"], "127.0.0.1");
    assert_eq!(h["address"]["socket_address"]["port_value"], a.port());
    assert_eq!(h["health_status"]["eds_health_status"], "HEALTHY");
    assert_eq!(h["weight"], 1);
    assert!(statuses.iter().any(|c| c["name"] == "b"));
    let r = p.admin("GET", "/listeners?format=json").await;
    assert_eq!(
        r.json(),
        serde_json::json!({"listener_statuses": [{
            "name": "l",
            "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": p.addr().port()}},
        }]})
    );
    let r = p.admin("GET", "/listeners").await;
    assert_eq!(r.text(), format!("l::{}\n", p.addr()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_dump_static_clusters_and_name_regex() {
    let (p, _a) = admin_fixture().await;
    let r = p
        .admin("GET", "/config_dump?resource=static_clusters")
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let configs = v["configs"].as_array().expect("configs");
    let names: Vec<_> = configs
        .iter()
        .map(|c| c["cluster"]["name"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["a", "b"]);
    let r = p
        .admin(
            "GET",
            "/config_dump?resource=static_clusters&name_regex=%5Eb%24",
        )
        .await;
    let v = r.json();
    let configs = v["configs"].as_array().expect("configs");
    assert_eq!(configs.len(), 1);
    assert_eq!(configs[0]["cluster"]["name"], "b");
    let r = p.admin("GET", "/config_dump?name_regex=%5El%24").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("ListenersConfigDump"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_dump_has_envoy_shape() {
    let (p, _a) = admin_fixture().await;
    let r = p
        .admin("GET", "/config_dump?resource=static_clusters")
        .await;
    let v = r.json();
    let c = &v["configs"][0];
    assert_eq!(
        c["@type"],
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.StaticCluster"
    );
    assert_eq!(
        c["cluster"]["@type"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(c["cluster"]["connect_timeout"], "1s", "proto field names");
    assert!(c["last_updated"].is_string());
    let r = p
        .admin(
            "GET",
            "/config_dump?resource=static_clusters&name_regex=%5Enone%24",
        )
        .await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({})));
    let r = p
        .admin("GET", "/config_dump?resource=dynamic_active_clusters")
        .await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_misc_endpoints() {
    let (p, _a) = admin_fixture().await;
    let r = p.admin("GET", "/nope").await;
    assert_eq!(r.status, 404);
    assert!(
        r.text().starts_with("invalid path. admin commands are"),
        "{}",
        r.text()
    );
    let r = p.admin("GET", "/certs").await;
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"certificates": []}))
    );
    let r = p.admin("GET", "/runtime").await;
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"entries": {}, "layers": []}))
    );
    let r = p.admin("GET", "/memory").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    for k in ["allocated", "heap_size", "total_physical_bytes"] {
        let n: u64 = v[k]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{k}: {v}"));
        assert!(n > 0, "{k}: {v}");
    }
    for path in [
        "/quitquitquit",
        "/healthcheck/fail",
        "/reset_counters",
        "/drain_listeners",
    ] {
        assert_eq!(p.admin("GET", path).await.status, 405, "GET {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_memory_has_envoy_fields() {
    let (p, _a) = admin_fixture().await;
    let v = p.admin("GET", "/memory").await.json();
    for k in [
        "allocated",
        "heap_size",
        "pageheap_unmapped",
        "pageheap_free",
        "total_thread_cache",
        "total_physical_bytes",
    ] {
        assert!(
            v[k].as_str().is_some_and(|s| s.parse::<u64>().is_ok()),
            "{k}: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_logging_levels() {
    let (p, _a) = admin_fixture().await;
    let r = p.admin("GET", "/logging").await;
    assert_eq!(r.status, 405, "GET /logging: {}", r.text());
    let r = p.admin("POST", "/logging").await;
    assert_eq!(r.status, 200);
    let t = r.text();
    assert!(t.starts_with("active loggers:\n"), "{t}");
    assert!(t.lines().any(|l| l == "  admin: warning"), "{t}");
    let r = p.admin("POST", "/logging?level=debug").await;
    let t = r.text();
    let levels: Vec<_> = t.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert!(
        levels.len() > 1 && levels.iter().all(|l| l.ends_with(": debug")),
        "{t}"
    );
    let r = p
        .admin("POST", "/logging?paths=admin:trace,router:error")
        .await;
    let t = r.text();
    assert_eq!(r.status, 200, "{t}");
    assert!(t.lines().any(|l| l == "  admin: trace"), "{t}");
    assert!(t.lines().any(|l| l == "  router: error"), "{t}");
    let r = p.admin("POST", "/logging?router=info").await;
    assert!(
        r.text().lines().any(|l| l == "  router: info"),
        "{}",
        r.text()
    );
    assert_eq!(p.admin("POST", "/logging?level=bogus").await.status, 400);
    assert_eq!(
        p.admin("POST", "/logging?paths=bogus:info").await.status,
        400
    );
    assert_eq!(p.admin("POST", "/logging?level=warning").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_logging_rejects_unknown_levels() {
    let (p, _a) = admin_fixture().await;
    let r = p.admin("POST", "/logging?level=bogus").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = p.admin("POST", "/logging?level=warning").await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("active loggers:\n"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_healthcheck_fail_and_ok() {
    let (p, _a) = admin_fixture().await;
    assert_eq!(p.admin("POST", "/healthcheck/fail").await.status, 200);
    let r = p.admin("GET", "/ready").await;
    assert_eq!((r.status, r.text().as_str()), (503, "DRAINING\n"));
    assert_eq!(
        p.admin("GET", "/server_info").await.json()["state"],
        "DRAINING"
    );
    assert_eq!(p.stat("server.live").await, Some(0));
    // Health-check failed: HTTP/1 responses close the connection (drain close).
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(p.admin("POST", "/healthcheck/ok").await.status, 200);
    let r = p.admin("GET", "/ready").await;
    assert_eq!((r.status, r.text().as_str()), (200, "LIVE\n"));
    assert_eq!(p.stat("server.live").await, Some(1));
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.header("connection"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_listeners_stops_new_connections_admin_keeps_answering() {
    let (p, _a) = admin_fixture().await;
    let r = p.admin("POST", "/drain_listeners").await;
    assert_eq!((r.status, r.text().as_str()), (200, "OK\n"));
    let mut refused = false;
    for _ in 0..50 {
        match tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(p.addr()),
        )
        .await
        {
            Ok(Err(_)) => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused, "the listener still accepts after /drain_listeners");
    let r = p.admin("GET", "/stats?filter=%5Eserver%5C.state%24").await;
    assert_eq!(r.status, 200, "admin keeps answering");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_listeners_keeps_the_server_live() {
    let (p, _a) = admin_fixture().await;
    assert_eq!(p.admin("POST", "/drain_listeners").await.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = p.admin("GET", "/ready").await;
    assert_eq!((r.status, r.text().as_str()), (200, "LIVE\n"));
    assert_eq!(p.stat("server.state").await, Some(0));
    assert_eq!(p.stat("listener_manager.listener_stopped").await, Some(1));
}

// ---------------------------------------------------------------- stats matcher

async fn stat_names(p: &Proxy) -> Vec<String> {
    let r = p.admin("GET", "/stats").await;
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(n, _)| n.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_matcher_inclusion_list() {
    let a = echo("a").await;
    let top = "stats_config:\n  stats_matcher:\n    inclusion_list:\n      patterns:\n      - prefix: \"cluster.a.\"\n      - exact: \"http.ingress.downstream_rq_total\"\n";
    let clusters = format!("{}{}", cluster("a", a.port()), cluster("b", a.port()));
    let p = Cfg::new(&vhost(&route("/", "a", "")), &clusters)
        .top(top)
        .start();
    assert_eq!(
        Http::h1().get(&format!("{}/", p.base()), &[]).await.status,
        200
    );
    let names = stat_names(&p).await;
    assert!(
        names.iter().any(|n| n == "cluster.a.upstream_rq_total"),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n == "http.ingress.downstream_rq_total"),
        "{names:?}"
    );
    let stray: Vec<_> = names
        .iter()
        .filter(|n| !n.starts_with("cluster.a.") && *n != "http.ingress.downstream_rq_total")
        .collect();
    assert!(stray.is_empty(), "not included: {stray:?}");
    assert_eq!(p.stat("cluster.a.upstream_rq_total").await, Some(1));
    assert_eq!(p.stat("http.ingress.downstream_rq_total").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_matcher_exclusion_list() {
    let a = echo("a").await;
    let top = "stats_config:\n  stats_matcher:\n    exclusion_list:\n      patterns:\n      - prefix: \"cluster.\"\n      - safe_regex: {regex: \"^http\\\\..*_rq_[0-9]xx$\"}\n";
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .top(top)
        .start();
    assert_eq!(
        Http::h1().get(&format!("{}/", p.base()), &[]).await.status,
        200
    );
    let names = stat_names(&p).await;
    assert!(
        !names.iter().any(|n| n.starts_with("cluster.")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n == "http.ingress.downstream_rq_2xx"),
        "{names:?}"
    );
    assert_eq!(p.stat("http.ingress.downstream_rq_total").await, Some(1));
    assert_eq!(p.stat("server.live").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_matcher_reject_all() {
    let a = echo("a").await;
    let top = "stats_config:\n  stats_matcher: {reject_all: true}\n";
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .top(top)
        .start();
    assert_eq!(
        Http::h1().get(&format!("{}/", p.base()), &[]).await.status,
        200
    );
    let names = stat_names(&p).await;
    assert!(names.is_empty(), "{names:?}");
}

// ---------------------------------------------------------------- overload manager

const OVERLOAD_2: &str = r#"overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: 2
"#;

/// Opens a connection and completes one keep-alive request on it.
async fn open_conn(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

/// Whether a new connection is closed without an answer.
async fn refused(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("connection neither answered nor closed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_global_downstream_max_connections() {
    let routes = "              - match: {prefix: \"/\"}\n                direct_response: {status: 200, body: {inline_string: ok}}\n";
    let p = Cfg::new(&vhost(routes), "").top(OVERLOAD_2).start();
    let c1 = open_conn(p.addr()).await;
    let c2 = open_conn(p.addr()).await;
    assert!(refused(p.addr()).await, "the third connection is closed");
    drop((c1, c2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Room again.
    let c3 = open_conn(p.addr()).await;
    drop(c3);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_overflow_is_counted_on_the_listener() {
    let routes =
        "              - match: {prefix: \"/\"}\n                direct_response: {status: 200}\n";
    let p = Cfg::new(&vhost(routes), "").top(OVERLOAD_2).start();
    let c1 = open_conn(p.addr()).await;
    let c2 = open_conn(p.addr()).await;
    assert!(refused(p.addr()).await);
    drop((c1, c2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let prefix = format!("listener.127.0.0.1_{}", p.addr().port());
    assert_eq!(
        p.stat(&format!("{prefix}.downstream_global_cx_overflow"))
            .await,
        Some(1)
    );
    // downstream_cx_overflow is the listener's own connection limit.
    assert_eq!(
        p.stat(&format!("{prefix}.downstream_cx_overflow")).await,
        Some(0)
    );
}

// ---------------------------------------------------------------- HTTP/2

const BODY_100K: usize = 100 * 1024;

async fn h2_fixture() -> (Proxy, EchoServer, EchoServer) {
    let a = echo("a").await;
    let b = upstream::http2("b").await.expect("h2 upstream");
    let routes = format!("{}{}", route("/h1", "a", ""), route("/h2", "b", ""));
    let clusters = format!(
        "{}{}",
        cluster("a", a.port()),
        cluster_eps("b", H2_UPSTREAM, &locality(0, &[(b.port(), "")]))
    );
    (Cfg::new(&vhost(&routes), &clusters).start(), a, b)
}

async fn bodies_both_ways(http: &Http, url: &str, upstream_version: &str) {
    let body = Bytes::from(vec![b'z'; BODY_100K]);
    let r = http.send("POST", url, &[], body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.echo();
    assert_eq!(v.body_len, BODY_100K, "request body arrives whole");
    assert_eq!(v.version, upstream_version);
    assert_eq!(v.method, "POST");
    let size = BODY_100K.to_string();
    let r = http
        .send("POST", url, &[("x-echo-body-size", &size)], body)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), BODY_100K, "response body arrives whole");
    assert!(r.body.iter().all(|b| *b == b'a'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_to_h1_upstream_with_large_bodies() {
    let (p, _a, _b) = h2_fixture().await;
    let http = Http::h2c();
    bodies_both_ways(&http, &format!("{}/h1", p.base()), "HTTP/1.1").await;
    let r = http.get(&format!("{}/h1", p.base()), &[]).await;
    assert_eq!(r.version, http::Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_downstream_to_h2_upstream_with_large_bodies() {
    let (p, _a, _b) = h2_fixture().await;
    let http = Http::h1();
    bodies_both_ways(&http, &format!("{}/h2", p.base()), "HTTP/2.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_protocol_stats() {
    let (p, _a, _b) = h2_fixture().await;
    let h1 = Http::h1();
    let h2 = Http::h2c();
    assert_eq!(h1.get(&format!("{}/h1", p.base()), &[]).await.status, 200);
    assert_eq!(h2.get(&format!("{}/h2", p.base()), &[]).await.status, 200);
    assert_eq!(
        p.stat("http.ingress.downstream_cx_http1_total").await,
        Some(1)
    );
    assert_eq!(
        p.stat("http.ingress.downstream_cx_http2_total").await,
        Some(1)
    );
    assert_eq!(p.stat("cluster.a.upstream_cx_http1_total").await, Some(1));
    assert_eq!(p.stat("cluster.b.upstream_cx_http2_total").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_many_concurrent_streams_on_one_connection() {
    let (p, _a, _b) = h2_fixture().await;
    let stream = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    let (send, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut send = send.clone();
        let authority = p.addr().to_string();
        tasks.push(tokio::spawn(async move {
            send = send.ready().await.expect("ready");
            let path = if i % 2 == 0 { "/h1" } else { "/h2" };
            let req = http::Request::get(format!("http://{authority}{path}/{i}"))
                .header("x-echo-delay-ms", "200")
                .body(())
                .expect("request");
            let (resp, _) = send.send_request(req, true).expect("send");
            let resp = resp.await.expect("response");
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut data = Vec::new();
            while let Some(c) = body.data().await {
                let c = c.expect("data");
                let _ = body.flow_control().release_capacity(c.len());
                data.extend_from_slice(&c);
            }
            let v: weir_tests::upstream::EchoView =
                serde_json::from_slice(&data).expect("echo json");
            (status, v.path)
        }));
    }
    let started = std::time::Instant::now();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, path) = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("in time")
            .expect("task");
        assert_eq!(status, 200);
        assert!(path.ends_with(&format!("/{i}")), "{path}");
    }
    // Concurrent, not serialised: far less than 50 x 200 ms.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    driver.abort();
    assert_eq!(p.stat("http.ingress.downstream_cx_total").await, Some(1));
    assert_eq!(p.stat("http.ingress.downstream_rq_total").await, Some(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_concurrent_streams_is_advertised() {
    let routes = "              - match: {prefix: \"/\"}\n                direct_response: {status: 200, body: {inline_string: ok}}\n";
    let p = Cfg::new(&vhost(routes), "")
        .hcm("          http2_protocol_options: {max_concurrent_streams: 7}\n")
        .start();
    let stream = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    let (send, mut conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let req = async {
        let mut send = send.ready().await.expect("ready");
        let r = http::Request::get(format!("http://{}/", p.addr()))
            .body(())
            .expect("request");
        let (resp, _) = send.send_request(r, true).expect("send");
        resp.await.expect("response").status()
    };
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            s = req => s,
            r = &mut conn => panic!("connection ended: {r:?}"),
        }
    })
    .await
    .expect("in time");
    assert_eq!(status, 200);
    assert_eq!(conn.max_concurrent_send_streams(), 7);
}

// ---------------------------------------------------------------- access logs

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> weir_tests::tmp::TempFile {
    weir_tests::config::log_path("scenarios-more", name)
}

fn file_log(path: &std::path::Path, format: &str, filter: &str) -> String {
    format!(
        "          - name: envoy.access_loggers.file\n{filter}            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n              log_format:\n{format}",
        path.display()
    )
}

const TEXT_FORMAT: &str =
    "                text_format_source: {inline_string: \"%RESPONSE_CODE% %REQ(:PATH)%\\n\"}\n";

fn access_log_routes() -> String {
    format!(
        "{}              - match: {{prefix: \"/err\"}}\n                direct_response: {{status: 503}}\n",
        route("/ok", "a", "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_json_format_has_typed_values() {
    let a = echo("a").await;
    let path = log_path("json");
    let json = "                json_format:\n                  code: \"%RESPONSE_CODE%\"\n                  method: \"%REQ(:METHOD)%\"\n                  path: \"%REQ(:PATH)%\"\n                  proto: \"%PROTOCOL%\"\n                  cluster: \"%UPSTREAM_CLUSTER%\"\n                  flags: \"%RESPONSE_FLAGS%\"\n                  bytes: \"%BYTES_SENT%\"\n                  missing: \"%REQ(x-missing)%\"\n                  mixed: \"code=%RESPONSE_CODE%\"\n                  nested: {route: \"%ROUTE_NAME%\"}\n";
    let hcm = format!("          access_log:\n{}", file_log(&path, json, ""));
    let p = Cfg::new(&vhost(&access_log_routes()), &cluster("a", a.port()))
        .hcm(&hcm)
        .start();
    let http = Http::h1();
    let r = http
        .get(
            &format!("{}/ok?x=1", p.base()),
            &[("x-echo-body-size", "5")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = http.get(&format!("{}/nothing", p.base()), &[]).await;
    assert_eq!(r.status, 404);
    let lines = p.log_lines(&path, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let v: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(
        v[0]["code"],
        serde_json::json!(200),
        "a number: {}",
        lines[0]
    );
    assert_eq!(v[0]["bytes"], serde_json::json!(5));
    assert_eq!(v[0]["method"], "GET");
    assert_eq!(v[0]["path"], "/ok?x=1");
    assert_eq!(v[0]["proto"], "HTTP/1.1");
    assert_eq!(v[0]["cluster"], "a");
    assert_eq!(v[0]["flags"], "-");
    assert_eq!(v[0]["missing"], serde_json::Value::Null);
    assert_eq!(v[0]["mixed"], "code=200");
    assert_eq!(v[1]["code"], serde_json::json!(404));
    assert_eq!(v[1]["cluster"], serde_json::Value::Null);
    // (%RESPONSE_FLAGS% of local replies: local_replies_carry_only_their_own_flags.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_status_code_and_response_flag_filters() {
    let a = echo("a").await;
    let errors = log_path("errors");
    let nr = log_path("nr");
    let hcm = format!(
        "          access_log:\n{}{}",
        file_log(
            &errors,
            TEXT_FORMAT,
            "            filter: {status_code_filter: {comparison: {op: GE, value: {default_value: 400, runtime_key: k}}}}\n"
        ),
        file_log(&nr, TEXT_FORMAT, "            filter: {response_flag_filter: {flags: [NR]}}\n"),
    );
    let p = Cfg::new(&vhost(&access_log_routes()), &cluster("a", a.port()))
        .hcm(&hcm)
        .start();
    let http = Http::h1();
    for (path, status) in [("/ok", 200), ("/err", 503), ("/nothing", 404), ("/ok", 200)] {
        let r = http.get(&format!("{}{path}", p.base()), &[]).await;
        assert_eq!(r.status, status, "{path}");
    }
    let e = p.log_lines(&errors, 2).await;
    assert_eq!(e, ["503 /err", "404 /nothing"]);
    let n = p.log_lines(&nr, 1).await;
    assert_eq!(n, ["404 /nothing"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_carry_only_their_own_flags() {
    let a = echo("a").await;
    let path = log_path("flags");
    let fmt = "                text_format_source: {inline_string: \"%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS%\\n\"}\n";
    let hcm = format!("          access_log:\n{}", file_log(&path, fmt, ""));
    let routes = format!(
        "{}              - match: {{prefix: \"/body\"}}\n                direct_response: {{status: 200, body: {{inline_string: hi}}}}\n",
        access_log_routes()
    );
    let p = Cfg::new(&vhost(&routes), &cluster("a", a.port()))
        .hcm(&hcm)
        .start();
    let http = Http::h1();
    for (path, status) in [
        ("/err", 503),
        ("/nothing", 404),
        ("/body", 200),
        ("/ok", 200),
    ] {
        let r = http.get(&format!("{}{path}", p.base()), &[]).await;
        assert_eq!(r.status, status, "{path}");
    }
    let lines = p.log_lines(&path, 4).await;
    assert_eq!(
        lines,
        ["503 /err -", "404 /nothing NR", "200 /body -", "200 /ok -"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_access_log_logs_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = log_path("listener");
    let listener = format!(
        "    access_log:\n    - name: envoy.access_loggers.file\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n        path: {}\n        log_format: {{text_format_source: {{inline_string: \"conn %DOWNSTREAM_LOCAL_ADDRESS% %RESPONSE_CODE% %REQ(:PATH)%\\n\"}}}}\n",
        path.display()
    );
    let routes = "              - match: {prefix: \"/\"}\n                direct_response: {status: 200, body: {inline_string: ok}}\n";
    let p = Cfg::new(&vhost(routes), "").listener(&listener).start();
    let mut s = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    for i in 0..2 {
        s.write_all(format!("GET /r{i} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Envoy logs a listener's access log once per connection, when it
    // closes, without HTTP-level values.
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines, [format!("conn {} 0 -", p.addr())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_access_log_from_the_binary() {
    // Needs a process to read its stdout: the weir binary (cargo build -p
    // weir), or Envoy with WEIR_SCENARIO_TARGET=envoy.
    let target = match Target::from_env() {
        Target::Envoy => Target::Envoy,
        _ => Target::WeirBin,
    };
    let a = echo("a").await;
    let hcm = "          access_log:\n          - name: envoy.access_loggers.stdout\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n              log_format: {text_format_source: {inline_string: \"stdout-line %RESPONSE_CODE% %REQ(:PATH)% %UPSTREAM_CLUSTER%\\n\"}}\n";
    let cfg = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port())).hcm(hcm);
    let p = Proxy::start_with(target, Default::default(), |ports| cfg.render(ports));
    let http = Http::h1();
    for i in 0..3 {
        let r = http.get(&format!("{}/s{i}", p.base()), &[]).await;
        assert_eq!(r.status, 200);
    }
    let proc = p.process().expect("a process");
    let mut lines = Vec::new();
    for _ in 0..60 {
        lines = proc
            .stdout()
            .lines()
            .filter(|l| l.starts_with("stdout-line"))
            .map(str::to_owned)
            .collect();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lines,
        [
            "stdout-line 200 /s0 a",
            "stdout-line 200 /s1 a",
            "stdout-line 200 /s2 a"
        ]
    );
}

// ---------------------------------------------------------------- HCM timeouts and connection limits

/// Reads until EOF (or `limit`): whether the peer closed, and what came.
async fn read_until_close(s: &mut tokio::net::TcpStream, limit: Duration) -> (bool, String) {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (false, String::from_utf8_lossy(&all).into_owned()),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&all).into_owned()),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a POST whose body never completes (5 of 10 bytes) and reads
/// until the proxy closes: the raw response.
async fn incomplete_post(p: &Proxy) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhalf.")
        .await
        .expect("write");
    let (closed, got) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "not closed: {got}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_timeouts_with_an_incomplete_request_are_408() {
    let a = echo("a").await;
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          stream_idle_timeout: 0.2s\n")
        .start();
    let got = incomplete_post(&p).await;
    assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nstream timeout"), "{got}");
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          common_http_protocol_options: {max_stream_duration: 0.2s}\n")
        .start();
    let got = incomplete_post(&p).await;
    assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
    assert!(
        got.ends_with("\r\n\r\ndownstream duration timeout"),
        "{got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_timeouts_after_a_complete_request_are_504() {
    let a = echo("a").await;
    let slow = [("x-echo-delay-ms", "1500")];
    let http = Http::h1();
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          stream_idle_timeout: 0.2s\n")
        .start();
    let r = http.get(&format!("{}/", p.base()), &slow).await;
    assert_eq!((r.status, r.text().as_str()), (504, "stream timeout"));
    assert_eq!(
        p.stat("http.ingress.downstream_rq_idle_timeout").await,
        Some(1)
    );
    // The route's idle_timeout overrides the HCM's stream_idle_timeout.
    let routes = format!(
        "{}{}",
        route("/quick", "a", ", idle_timeout: 0.2s"),
        route("/", "a", "")
    );
    let p = Cfg::new(&vhost(&routes), &cluster("a", a.port()))
        .hcm("          stream_idle_timeout: 5s\n")
        .start();
    let r = http.get(&format!("{}/quick", p.base()), &slow).await;
    assert_eq!((r.status, r.text().as_str()), (504, "stream timeout"));
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          common_http_protocol_options: {max_stream_duration: 0.2s}\n")
        .start();
    let r = http.get(&format!("{}/", p.base()), &slow).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (504, "downstream duration timeout")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_idle_timeout_overrides_stream_idle_timeout() {
    let a = echo("a").await;
    let routes = format!(
        "{}{}",
        route("/quick", "a", ", idle_timeout: 0.2s"),
        route("/", "a", "")
    );
    let p = Cfg::new(&vhost(&routes), &cluster("a", a.port()))
        .hcm("          stream_idle_timeout: 5s\n")
        .start();
    let http = Http::h1();
    let r = http
        .get(
            &format!("{}/quick", p.base()),
            &[("x-echo-delay-ms", "1500")],
        )
        .await;
    assert_eq!(r.text(), "stream timeout");
    let r = http
        .get(&format!("{}/", p.base()), &[("x-echo-delay-ms", "400")])
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_is_counted() {
    let a = echo("a").await;
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          common_http_protocol_options: {max_stream_duration: 0.2s}\n")
        .start();
    let r = Http::h1()
        .get(&format!("{}/", p.base()), &[("x-echo-delay-ms", "1500")])
        .await;
    assert!(r.status >= 400);
    assert_eq!(
        p.stat("http.ingress.downstream_rq_max_duration_reached")
            .await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_for_a_slow_request_body() {
    let a = echo("a").await;
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          request_timeout: 0.3s\n")
        .start();
    let got = incomplete_post(&p).await;
    assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nrequest timeout"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_closes_and_is_counted() {
    let a = echo("a").await;
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          request_timeout: 0.3s\n")
        .start();
    let got = incomplete_post(&p).await;
    assert!(
        got.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{got}"
    );
    assert_eq!(p.stat("http.ingress.downstream_rq_timeout").await, Some(1));
}

const OK_ROUTE: &str =
    "              - match: {prefix: \"/\"}\n                direct_response: {status: 200, body: {inline_string: ok}}\n";

/// Sends one request on a fresh connection, then waits for the proxy to
/// close it: (closed, elapsed since the response, everything read).
async fn close_after_one_request(p: &Proxy) -> (bool, Duration, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let t = std::time::Instant::now();
    let (closed, rest) = read_until_close(&mut s, Duration::from_secs(4)).await;
    (closed, t.elapsed(), format!("{head}{rest}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_idle_timeout_closes_idle_connections() {
    // Envoy drains (drain_timeout) before closing an idle HTTP/1 connection.
    let p = Cfg::new(&vhost(OK_ROUTE), "")
        .hcm("          drain_timeout: 0.1s\n          common_http_protocol_options: {idle_timeout: 0.3s}\n")
        .start();
    let (closed, after, got) = close_after_one_request(&p).await;
    assert!(closed, "still open after {after:?}: {got}");
    assert!(
        after >= Duration::from_millis(250),
        "closed too early: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_closes_connections() {
    let p = Cfg::new(&vhost(OK_ROUTE), "")
        .hcm("          drain_timeout: 0.1s\n          common_http_protocol_options: {max_connection_duration: 0.3s}\n")
        .start();
    let (closed, after, got) = close_after_one_request(&p).await;
    assert!(closed, "still open after {after:?}: {got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_timeouts_are_counted() {
    let p = Cfg::new(&vhost(OK_ROUTE), "")
        .hcm("          drain_timeout: 0.1s\n          common_http_protocol_options: {idle_timeout: 0.3s}\n")
        .start();
    assert!(close_after_one_request(&p).await.0);
    assert_eq!(
        p.stat("http.ingress.downstream_cx_idle_timeout").await,
        Some(1)
    );
    let p = Cfg::new(&vhost(OK_ROUTE), "")
        .hcm("          drain_timeout: 0.1s\n          common_http_protocol_options: {max_connection_duration: 0.3s}\n")
        .start();
    assert!(close_after_one_request(&p).await.0);
    assert_eq!(
        p.stat("http.ingress.downstream_cx_max_duration_reached")
            .await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_max_requests_per_connection() {
    use tokio::io::AsyncWriteExt;
    let p = Cfg::new(&vhost(OK_ROUTE), "")
        .hcm("          common_http_protocol_options: {max_requests_per_connection: 2}\n")
        .start();
    let mut s = tokio::net::TcpStream::connect(p.addr())
        .await
        .expect("connect");
    s.write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let (closed, got) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "{got}");
    let responses: Vec<_> = got.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 2, "{got}");
    assert!(
        !responses[0]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{got}"
    );
    assert!(
        responses[1]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{got}"
    );
    assert_eq!(
        p.stat("http.ingress.downstream_cx_max_requests_reached")
            .await,
        Some(1)
    );
}

// ---------------------------------------------------------------- more access-log commands

const COMMANDS_FORMAT: &str = "                text_format_source: {inline_string: \"%RESPONSE_CODE%~%RESPONSE_CODE_DETAILS%~%RESPONSE_FLAGS%~%UPSTREAM_HOST%~%UPSTREAM_CLUSTER%~%ROUTE_NAME%~%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%~%BYTES_RECEIVED%~%BYTES_SENT%~%UPSTREAM_REQUEST_ATTEMPT_COUNT%~%REQ(:AUTHORITY)%~%REQ(:METHOD)%\\n\"}\n";

/// A proxy logging [`COMMANDS_FORMAT`] with routes `/rw/` (prefix rewrite
/// to cluster a), `/dead` (a closed port, one connect-failure retry) and
/// `/direct`.
async fn commands_fixture(log: &std::path::Path) -> (Proxy, EchoServer, u16) {
    let a = echo("a").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let hcm = format!(
        "          access_log:\n{}",
        file_log(log, COMMANDS_FORMAT, "")
    );
    let routes = format!(
        "              - name: rw\n                match: {{prefix: \"/rw/\"}}\n                route: {{cluster: a, prefix_rewrite: /}}\n              - name: dead\n                match: {{prefix: \"/dead\"}}\n                route: {{cluster: dead, retry_policy: {{retry_on: connect-failure, num_retries: 1, retry_back_off: {{base_interval: 0.001s}}}}}}\n              - name: direct\n                match: {{prefix: \"/direct\"}}\n                direct_response: {{status: 200, body: {{inline_string: hello}}}}\n{}",
        route("/", "a", "")
    );
    let clusters = format!("{}{}", cluster("a", a.port()), cluster("dead", dead_port));
    (
        Cfg::new(&vhost(&routes), &clusters).hcm(&hcm).start(),
        a,
        dead_port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_commands_and_details() {
    let path = log_path("commands");
    let (p, a, _) = commands_fixture(&path).await;
    let http = Http::h1();
    let r = http
        .get(
            &format!("{}/rw/x", p.base()),
            &[("host", "h.example"), ("x-echo-body-size", "3")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = http
        .get(&format!("{}/direct", p.base()), &[("host", "h.example")])
        .await;
    assert_eq!(r.status, 200);
    let r = http
        .get(&format!("{}/dead", p.base()), &[("host", "h.example")])
        .await;
    assert_eq!(r.status, 503);
    let lines = p.log_lines(&path, 3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[..2],
        [
            format!(
                "200~via_upstream~-~127.0.0.1:{}~a~rw~/rw/x~0~3~1~h.example~GET",
                a.port()
            ),
            "200~direct_response~-~-~-~direct~/direct~0~5~0~h.example~GET".to_owned(),
        ]
    );
    // The connect failure: both flags, two attempts, Envoy's body length.
    let f: Vec<&str> = lines[2].split('~').collect();
    assert_eq!(f[0], "503");
    assert!(
        f[1].starts_with("upstream_reset_before_response_started{remote_connection_failure"),
        "{}",
        lines[2]
    );
    let mut flags: Vec<&str> = f[2].split(',').collect();
    flags.sort_unstable();
    assert_eq!(flags, ["UF", "URX"]);
    assert_eq!(
        f[4..],
        ["dead", "dead", "/dead", "0", "121", "2", "h.example", "GET"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_bytes_received() {
    let path = log_path("bytes");
    let (p, _a, _) = commands_fixture(&path).await;
    let r = Http::h1()
        .send(
            "POST",
            &format!("{}/rw/x", p.base()),
            &[("x-echo-body-size", "3")],
            Bytes::from_static(b"12345"),
        )
        .await;
    assert_eq!(r.status, 200);
    let lines = p.log_lines(&path, 1).await;
    let f: Vec<&str> = lines
        .first()
        .map(|l| l.split('~').collect())
        .unwrap_or_default();
    assert_eq!(f.get(7..9), Some(&["5", "3"][..]), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_connect_failure_details_as_envoy() {
    let path = log_path("connfail");
    let (p, _a, dead_port) = commands_fixture(&path).await;
    let r = Http::h1()
        .get(&format!("{}/dead", p.base()), &[("host", "h.example")])
        .await;
    assert_eq!(r.status, 503);
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(
        lines,
        [format!("503~upstream_reset_before_response_started{{remote_connection_failure|delayed_connect_error:_Connection_refused}}~URX,UF~127.0.0.1:{dead_port}~dead~dead~/dead~0~121~2~h.example~GET")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_default_format() {
    let a = echo("a").await;
    let path = log_path("default");
    let hcm = format!(
        "          access_log:\n          - name: envoy.access_loggers.file\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n",
        path.display()
    );
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm(&hcm)
        .start();
    let r = Http::h1()
        .get(
            &format!("{}/d?q=1", p.base()),
            &[
                ("user-agent", "ua/1"),
                ("x-request-id", "rid-1"),
                ("x-forwarded-for", "192.0.2.1"),
                ("x-echo-body-size", "4"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let lines = p.log_lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    // [2024-01-02T03:04:05.678Z] "GET /d?q=1 HTTP/1.1" 200 - 0 4 1 0 "192.0.2.1" "ua/1" "rid-1" "127.0.0.1:port" "127.0.0.1:port"
    let (ts, rest) = l.split_once("] ").expect("timestamp");
    let ts = ts.strip_prefix('[').expect("[");
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    assert!(ts.starts_with(&current_year().to_string()), "{ts}");
    let (quoted, rest) = rest.split_once("\" ").expect("request line");
    assert_eq!(quoted, "\"GET /d?q=1 HTTP/1.1");
    let fields: Vec<&str> = rest.split(' ').collect();
    assert_eq!(&fields[..4], ["200", "-", "0", "4"], "{l}");
    assert!(fields[4].parse::<u64>().is_ok(), "duration: {l}");
    assert!(
        fields[5].parse::<u64>().is_ok(),
        "upstream service time: {l}"
    );
    let tail = fields[6..].join(" ");
    assert_eq!(
        tail,
        format!(
            "\"192.0.2.1\" \"ua/1\" \"rid-1\" \"{}\" \"127.0.0.1:{}\"",
            p.addr(),
            a.port()
        )
    );
}

// ---------------------------------------------------------------- more retries

/// A raw HTTP/1.1 upstream: the first `drop_first` connections are closed
/// as soon as a request head arrives; later ones answer `200 ok` and close.
async fn flaky_upstream(drop_first: usize) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            let drop_it = n <= drop_first;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&b[..k]),
                    }
                }
                if drop_it {
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_reset_recovers_from_a_dropped_connection() {
    let (up, _t) = flaky_upstream(1).await;
    let routes = format!(
        "{}{}",
        route("/retry", "f", ", retry_policy: {retry_on: reset, num_retries: 1, retry_back_off: {base_interval: 0.001s}}"),
        route("/", "f", "")
    );
    let p = Cfg::new(&vhost(&routes), &cluster("f", up.port())).start();
    let http = Http::h1();
    let r = http.get(&format!("{}/retry", p.base()), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(p.stat("cluster.f.upstream_rq_retry").await, Some(1));
    drop(_t);
    let (up2, _t2) = flaky_upstream(1).await;
    let p = Cfg::new(&vhost(&routes), &cluster("f", up2.port())).start();
    let r = http.get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_count_headers() {
    let a = echo("a").await;
    let vh = format!(
        "            - name: main\n              domains: [\"*\"]\n              include_request_attempt_count: true\n              include_attempt_count_in_response: true\n              routes:\n{}",
        route("/", "a", ", retry_policy: {retry_on: 5xx, num_retries: 2, retry_back_off: {base_interval: 0.001s}}")
    );
    let p = Cfg::new(&vh, &cluster("a", a.port())).start();
    let http = Http::h1();
    let r = http
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-echo-status", "503"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "ac1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(echo_header(&r.echo(), "x-envoy-attempt-count"), Some("2"));
    assert_eq!(r.header("x-envoy-attempt-count"), Some("2"));
    let r = http.get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(echo_header(&r.echo(), "x-envoy-attempt-count"), Some("1"));
    assert_eq!(r.header("x-envoy-attempt-count"), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_headers_from_internal_requests() {
    let a = echo("a").await;
    let p = Cfg::new(&vhost(&route("/", "a", "")), &cluster("a", a.port()))
        .hcm("          use_remote_address: true\n          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.1, prefix_len: 32}]}\n")
        .start();
    let http = Http::h1();
    let url = format!("{}/", p.base());
    let r = http
        .get(
            &url,
            &[
                ("x-envoy-retry-on", "5xx"),
                ("x-envoy-max-retries", "2"),
                ("x-echo-status", "503"),
                ("x-echo-fail-times", "2"),
                ("x-echo-id", "ih1"),
            ],
        )
        .await;
    assert_eq!((r.status, r.echo().seen), (200, 3));
    let v = r.echo();
    assert_eq!(echo_header(&v, "x-envoy-retry-on"), None, "consumed");
    assert_eq!(echo_header(&v, "x-envoy-max-retries"), None, "consumed");
    let r = http
        .get(
            &url,
            &[
                ("x-envoy-retry-on", "retriable-status-codes"),
                ("x-envoy-retriable-status-codes", "409"),
                ("x-echo-status", "409"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "ih2"),
            ],
        )
        .await;
    assert_eq!((r.status, r.echo().seen), (200, 2));
    assert_eq!(p.stat("cluster.a.upstream_rq_retry").await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_retries_reach_the_live_host() {
    let a = echo("a").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let eps = locality(0, &[(dead_port, ""), (a.port(), "")]);
    let extra = ", retry_policy: {retry_on: connect-failure, num_retries: 3, retry_back_off: {base_interval: 0.001s}}";
    let p = Cfg::new(
        &vhost(&route("/", "mix", extra)),
        &cluster_eps("mix", "", &eps),
    )
    .start();
    let m = spread(&Http::h1(), &format!("{}/", p.base()), &[], 10).await;
    assert_eq!(count(&m, "a"), 10, "{m:?}");
    assert!(
        p.stat("cluster.mix.upstream_cx_connect_fail")
            .await
            .unwrap_or(0)
            >= 1
    );
    assert!(p.stat("cluster.mix.upstream_rq_retry").await.unwrap_or(0) >= 1);
}

// ---------------------------------------------------------------- graceful drain, /clusters text

fn fast_immediate_drain(o: &mut weir::cli::Options) {
    o.drain_time_s = 1;
    o.drain_strategy = weir::cli::DrainStrategy::Immediate;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_listeners_keeps_accepting_then_stops() {
    let cfg = Cfg::new(&vhost(OK_ROUTE), "");
    let opts = weir_tests::scenario::StartOptions {
        args: ["--drain-time-s", "1", "--drain-strategy", "immediate"]
            .map(String::from)
            .to_vec(),
        in_process: Some(fast_immediate_drain),
        concurrency: None,
    };
    let p = Proxy::start_with(Target::from_env(), opts, |ports| cfg.render(ports));
    let r = p.admin("POST", "/drain_listeners?graceful").await;
    assert_eq!(r.status, 200);
    let started = std::time::Instant::now();
    // During the drain period: still accepted, but connections close.
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(started.elapsed() < Duration::from_millis(800));
    let mut stopped = false;
    for _ in 0..100 {
        if refused(p.addr()).await {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stopped, "still accepting after the drain time");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        p.admin("GET", "/ready").await.status,
        200,
        "the server stays live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clusters_text_shows_health_weight_and_priority() {
    let (a, b) = (echo("a").await, echo("b").await);
    let eps = format!(
        "{}{}",
        locality(0, &[(a.port(), "load_balancing_weight: 3")]),
        locality(1, &[(b.port(), "health_status: UNHEALTHY")])
    );
    let p = Cfg::new(&vhost(&route("/", "c", "")), &cluster_eps("c", "", &eps)).start();
    let t = p.admin("GET", "/clusters").await.text();
    let ha = format!("c::127.0.0.1:{}::", a.port());
    let hb = format!("c::127.0.0.1:{}::", b.port());
    for line in [
        format!("{ha}health_flags::healthy"),
        format!("{ha}weight::3"),
        format!("{ha}priority::0"),
        format!("{hb}health_flags::/failed_eds_health"),
        format!("{hb}priority::1"),
        "c::observability_name::c".to_owned(),
    ] {
        assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
    }
}

// ---------------------------------------------------------------- upstream protocol options

const USE_DOWNSTREAM: &str = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        use_downstream_protocol_config: {http_protocol_options: {}, http2_protocol_options: {}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_downstream_protocol_config_follows_the_client() {
    // One upstream per protocol: a wrong pick fails the request.
    let h1 = echo("h1").await;
    let h2 = upstream::http2("h2").await.expect("h2 upstream");
    let routes = format!("{}{}", route("/one", "c1", ""), route("/two", "c2", ""));
    let clusters = format!(
        "{}{}",
        cluster_eps("c1", USE_DOWNSTREAM, &locality(0, &[(h1.port(), "")])),
        cluster_eps("c2", USE_DOWNSTREAM, &locality(0, &[(h2.port(), "")]))
    );
    let p = Cfg::new(&vhost(&routes), &clusters).start();
    let v = Http::h1()
        .get(&format!("{}/one", p.base()), &[])
        .await
        .echo();
    assert_eq!(v.version, "HTTP/1.1");
    let v = Http::h2c()
        .get(&format!("{}/two", p.base()), &[])
        .await
        .echo();
    assert_eq!(v.version, "HTTP/2.0");
}

const UPSTREAM_IDLE: &str = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {idle_timeout: 0.2s}\n        explicit_http_config: {http_protocol_options: {}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_idle_timeout_closes_pooled_connections() {
    let a = echo("a").await;
    let p = Cfg::new(
        &vhost(&route("/", "a", "")),
        &cluster_eps("a", UPSTREAM_IDLE, &locality(0, &[(a.port(), "")])),
    )
    .start();
    assert_eq!(
        Http::h1().get(&format!("{}/", p.base()), &[]).await.status,
        200
    );
    assert_eq!(p.stat("cluster.a.upstream_cx_active").await, Some(1));
    let mut active = Some(1);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        active = p.stat("cluster.a.upstream_cx_active").await;
        if active == Some(0) {
            break;
        }
    }
    assert_eq!(active, Some(0), "the idle upstream connection is closed");
    // A new request opens a new connection.
    assert_eq!(
        Http::h1().get(&format!("{}/", p.base()), &[]).await.status,
        200
    );
    assert_eq!(p.stat("cluster.a.upstream_cx_total").await, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_idle_timeout_is_counted() {
    let a = echo("a").await;
    let p = Cfg::new(
        &vhost(&route("/", "a", "")),
        &cluster_eps("a", UPSTREAM_IDLE, &locality(0, &[(a.port(), "")])),
    )
    .start();
    assert_eq!(
        Http::h1().get(&format!("{}/", p.base()), &[]).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(p.stat("cluster.a.upstream_cx_idle_timeout").await, Some(1));
}

// ---------------------------------------------------------------- bodies and retries, rewrites

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_request_body_is_replayed_on_retry() {
    let a = echo("a").await;
    let extra =
        ", retry_policy: {retry_on: 5xx, num_retries: 1, retry_back_off: {base_interval: 0.001s}}";
    let p = Cfg::new(&vhost(&route("/", "a", extra)), &cluster("a", a.port())).start();
    // Envoy buffers up to the connection buffer limit (1 MiB) for retries.
    let r = Http::h1()
        .send(
            "POST",
            &format!("{}/", p.base()),
            &[
                ("x-echo-status", "503"),
                ("x-echo-fail-times", "1"),
                ("x-echo-id", "big"),
            ],
            Bytes::from(vec![b'q'; BODY_100K]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.echo();
    assert_eq!((v.seen, v.body_len), (2, BODY_100K));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_header_from_internal_requests() {
    let a = echo("a").await;
    let extra =
        ", retry_policy: {retry_on: 5xx, num_retries: 1, retry_back_off: {base_interval: 0.001s}}";
    let p = Cfg::new(&vhost(&route("/", "a", extra)), &cluster("a", a.port()))
        .hcm("          use_remote_address: true\n          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.1, prefix_len: 32}]}\n")
        .start();
    let r = Http::h1()
        .get(
            &format!("{}/", p.base()),
            &[
                ("x-envoy-upstream-rq-per-try-timeout-ms", "100"),
                ("x-echo-delay-ms", "600"),
                ("x-echo-delay-times", "1"),
                ("x-echo-id", "ptt"),
            ],
        )
        .await;
    assert_eq!((r.status, r.echo().seen), (200, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_response_body_from_a_file() {
    let body = log_path("body");
    let path = body.with_extension("txt");
    std::fs::write(&path, "from a file\n").expect("write body");
    let routes = format!(
        "              - match: {{prefix: \"/\"}}\n                direct_response: {{status: 200, body: {{filename: {}}}}}\n",
        path.display()
    );
    let p = Cfg::new(&vhost(&routes), "").start();
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "from a file\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rewrites_and_x_forwarded_host() {
    let a = echo("a").await;
    let routes = format!(
        "{}{}{}",
        route("/lit", "a", ", host_rewrite_literal: lit.internal, append_x_forwarded_host: true"),
        route("/hdr", "a", ", host_rewrite_header: x-target-host"),
        route(
            "/re",
            "a",
            ", host_rewrite_path_regex: {pattern: {regex: \"^/re/([a-z]+)/.*$\"}, substitution: \"\\\\1.svc\"}"
        )
    );
    let p = Cfg::new(&vhost(&routes), &cluster("a", a.port())).start();
    let http = Http::h1();
    let v = http
        .get(&format!("{}/lit", p.base()), &[("host", "orig.example")])
        .await
        .echo();
    assert_eq!(echo_header(&v, "host"), Some("lit.internal"));
    assert_eq!(echo_header(&v, "x-forwarded-host"), Some("orig.example"));
    assert_eq!(
        echo_header(&v, "x-envoy-original-host"),
        Some("orig.example")
    );
    let v = http
        .get(
            &format!("{}/hdr", p.base()),
            &[("host", "orig.example"), ("x-target-host", "from.header")],
        )
        .await
        .echo();
    assert_eq!(echo_header(&v, "host"), Some("from.header"));
    let v = http
        .get(
            &format!("{}/re/abc/x", p.base()),
            &[("host", "orig.example")],
        )
        .await
        .echo();
    assert_eq!(echo_header(&v, "host"), Some("abc.svc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_host_rewrite_uses_the_dns_hostname() {
    let a = echo("a").await;
    let clusters = format!(
        "  - name: dns\n    type: STRICT_DNS\n    dns_lookup_family: V4_ONLY\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: dns\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: localhost, port_value: {}}}}}}}\n",
        a.port()
    );
    let p = Cfg::new(
        &vhost(&route("/", "dns", ", auto_host_rewrite: true")),
        &clusters,
    )
    .start();
    let v = Http::h1()
        .get(&format!("{}/", p.base()), &[("host", "orig.example")])
        .await
        .echo();
    assert_eq!(echo_header(&v, "host"), Some("localhost"));
}

/// The deprecated route `max_grpc_timeout` (Istio renders `0s`): a gRPC
/// request's timeout is its `grpc-timeout` (none = no timeout), capped by a
/// non-zero value; other requests keep the route `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_grpc_timeout_replaces_the_route_timeout_for_grpc() {
    let a = echo("a").await;
    let http = Http::h1();
    let grpc = ("content-type", "application/grpc");
    let slow = ("x-echo-delay-ms", "600");
    let p = Cfg::new(
        &vhost(&route("/", "a", ", timeout: 0.3s, max_grpc_timeout: 0s")),
        &cluster("a", a.port()),
    )
    .start();
    let url = format!("{}/", p.base());
    // Not gRPC: the route timeout.
    assert_eq!(http.get(&url, &[slow]).await.status, 504);
    // gRPC without grpc-timeout: no timeout at all.
    let r = http.get(&url, &[slow, grpc]).await;
    assert_eq!(
        (r.status, r.header("grpc-status")),
        (200, None),
        "{}",
        r.text()
    );
    // gRPC with grpc-timeout: that timeout (a gRPC local reply: HTTP 200,
    // grpc-status 14: Envoy maps 504 to UNAVAILABLE).
    let deadline = ("grpc-timeout", "100m");
    let r = http.get(&url, &[slow, grpc, deadline]).await;
    assert_eq!((r.status, r.header("grpc-status")), (200, Some("14")));
    drop(p);
    // A non-zero max caps it.
    let p = Cfg::new(
        &vhost(&route("/", "a", ", timeout: 5s, max_grpc_timeout: 0.2s")),
        &cluster("a", a.port()),
    )
    .start();
    let url = format!("{}/", p.base());
    let r = http.get(&url, &[slow, grpc, ("grpc-timeout", "10S")]).await;
    assert_eq!(r.header("grpc-status"), Some("14"));
    let r = http.get(&url, &[slow, grpc]).await;
    assert_eq!(
        r.header("grpc-status"),
        Some("14"),
        "no grpc-timeout: the cap"
    );
}
