//! Micro-benchmarks of the per-request config lookups and config-time
//! parsing. Route tables come from generated YAML through the real parser and
//! translator (`weir_benches::route_table`). Method and results:
//! benches/README.md.
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, Method};
use weir_benches::{route_table, routes_yaml, snapshot, vhosts_yaml};
use xds_client::config::{RequestInfo, RouteConfig};
use xds_client::translate::{parse_format, DEFAULT_ACCESS_LOG_FORMAT};

static GET: Method = Method::GET;

fn request<'a>(path: &'a str, authority: &'a str, headers: &'a HeaderMap) -> RequestInfo<'a> {
    RequestInfo {
        method: &GET,
        path,
        query: None,
        full_path: path,
        authority,
        scheme: "http",
        headers,
        is_connect: false,
        peer_cert: false,
        random_ppm: 0,
    }
}

/// What the router does per request: pick the virtual host, then the route.
fn lookup<'a>(rc: &'a RouteConfig, req: &RequestInfo<'_>) -> Option<&'a str> {
    let vh = rc.select_vhost(req.authority)?;
    vh.select_route(req).map(|r| &*r.name)
}

fn route_match(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    let headers = HeaderMap::new();
    for n in [1usize, 100, 10_000] {
        let rc = route_table(&routes_yaml(n));
        // A hit on the last prefix route: every route before it is tried.
        let last_prefix = (0..n)
            .rev()
            .find(|i| i % 10 != 9 && i % 25 != 24 && i % 50 != 49);
        let hit_path = format!("/svc{}/items/42", last_prefix.expect("n >= 1"));
        let hit = request(&hit_path, "bench.example.com", &headers);
        assert!(lookup(&rc, &hit).is_some(), "hit path must match");
        g.bench_with_input(BenchmarkId::new("hit_last", n), &hit, |b, req| {
            b.iter(|| lookup(black_box(&rc), black_box(req)))
        });
        // A miss: every route is tried and none matches.
        let miss = request("/nothing/here", "bench.example.com", &headers);
        assert!(lookup(&rc, &miss).is_none(), "miss path must not match");
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, req| {
            b.iter(|| lookup(black_box(&rc), black_box(req)))
        });
    }
    g.finish();
}

fn vhost_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("vhost_select");
    for n in [10usize, 1_000] {
        let rc = route_table(&vhosts_yaml(n));
        let last = n - 1;
        let cases = [
            ("exact", format!("svc{last}.example.com")),
            ("exact_port", format!("svc{last}.example.com:443")),
            ("exact_upper", format!("SVC{last}.Example.COM")),
            ("suffix_wildcard", format!("api.svc{last}.example.org")),
            ("catch_all", "unknown.example.net".to_owned()),
        ];
        for (name, host) in cases {
            assert!(rc.select_vhost(&host).is_some(), "{host} selects a vhost");
            g.bench_with_input(BenchmarkId::new(name, n), &host, |b, host| {
                b.iter(|| rc.select_vhost(black_box(host)).map(|v| v.name.len()))
            });
        }
    }
    g.finish();
}

fn format_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("format_parse");
    let cases = [
        ("envoy_default_access_log", DEFAULT_ACCESS_LOG_FORMAT),
        ("header_value", "%REQ(x-request-id)%"),
        ("literal", "weir-gateway"),
    ];
    for (name, s) in cases {
        g.throughput(Throughput::Bytes(s.len() as u64));
        g.bench_with_input(name, s, |b, s| b.iter(|| parse_format(black_box(s))));
    }
    g.finish();
}

fn translate(c: &mut Criterion) {
    // Config time, not the data path: YAML text -> proto -> validated
    // snapshot, for a route table of n routes.
    let mut g = c.benchmark_group("bootstrap_translate");
    g.sample_size(10);
    for n in [100usize, 1_000] {
        let yaml = routes_yaml(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &yaml, |b, y| {
            b.iter(|| snapshot(black_box(y)))
        });
    }
    g.finish();
}

// === proxy benches ===

/// A listener whose route config mutates headers at three levels: literal
/// values, `%VAR%` commands and removals.
const MUTATIONS_YAML: &str = r#"
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: b
          route_config:
            request_headers_to_add:
            - header: {key: x-global, value: global}
            response_headers_to_remove: [x-internal]
            virtual_hosts:
            - name: v
              domains: ["*"]
              request_headers_to_add:
              - header: {key: x-client, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              request_headers_to_remove: [x-debug]
              routes:
              - match: {prefix: /}
                route: {cluster: c}
                request_headers_to_add:
                - header: {key: x-route, value: api}
                - header: {key: x-echo-ua, value: "%REQ(user-agent)%"}
                  append_action: ADD_IF_ABSENT
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
"#;

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "bench.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("x-debug", "1"),
        ("x-request-id", "0b8e6c8a-1f3e-4b1e-9a55-4c0a6a3d1c1e"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, v.parse().expect("header value"));
    }
    h
}

fn header_mutation(c: &mut Criterion) {
    let rc = route_table(MUTATIONS_YAML);
    let vh = rc.vhosts[0].clone();
    let route = &vh.routes[0];
    let info = weir::http::info::StreamInfo::new(
        weir::http::info::now_instant(),
        "HTTP/1.1",
        Method::GET,
        "/items/42".into(),
        "bench.example.com".into(),
        "http",
        "127.0.0.1:40000".parse().expect("addr"),
        "127.0.0.1:10000".parse().expect("addr"),
        1,
    );
    let base = request_headers();
    let levels = [&route.headers, &vh.headers, &rc.headers];
    let mut g = c.benchmark_group("header_mutation");
    g.throughput(Throughput::Elements(1));
    // The clone is part of both benches, so compare them with each other.
    g.bench_function("clone_only", |b| b.iter(|| black_box(base.clone())));
    g.bench_function("three_levels", |b| {
        b.iter(|| {
            let mut h = base.clone();
            weir::http::headers::apply_levels(&mut h, &levels, true, false, &info);
            black_box(h)
        })
    });
    g.finish();
}

/// A do-nothing filter, to price the chain runner itself.
struct Pass;

impl filters::HttpFilter for Pass {}

#[derive(Debug)]
struct PassFactory;

impl filters::HttpFilterFactory for PassFactory {
    fn name(&self) -> &str {
        "pass"
    }
    fn create(&self, _: &filters::RouteView<'_>) -> Option<Box<dyn filters::HttpFilter>> {
        Some(Box::new(Pass))
    }
}

/// Polls a future that never waits once, without a runtime.
fn poll_once<T>(f: impl std::future::Future<Output = Option<T>>) -> Option<T> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => None,
    }
}

fn filter_chain(c: &mut Criterion) {
    let stats: std::sync::Arc<dyn filters::StatsScope> = std::sync::Arc::new(filters::NoStats);
    let router_only = filters::FilterChain::build(&[], &stats);
    let mut three = filters::FilterChain::build(&[], &stats);
    // istiod's empty HTTPFault: the factory is in the chain and creates
    // nothing for a route without overrides.
    let empty_fault = filters::FilterChain::build(
        &[xds_client::config::HttpFilterConfig {
            name: "envoy.filters.http.fault".into(),
            kind: xds_client::config::HttpFilterKind::Fault(Default::default()),
        }],
        &stats,
    );
    for _ in 0..3 {
        three.filters.push(std::sync::Arc::new(PassFactory));
    }
    let (head, _) = http::Request::get("/items/42")
        .header("host", "bench.example.com")
        .body(())
        .expect("request")
        .into_parts();
    let mut g = c.benchmark_group("filter_chain");
    for (name, chain) in [
        ("router_only", &router_only),
        ("empty_fault", &empty_fault),
        ("three_filters", &three),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut inst = if chain.is_router_only() {
                    filters::Instances::new()
                } else {
                    chain.instantiate(&filters::RouteView::empty())
                };
                let mut cx = filters::FilterContext::default();
                let mut h = head.clone();
                // No filter here waits: the runner is ready at once.
                let r = poll_once(filters::run_request_headers(&mut inst, &mut cx, &mut h));
                black_box((r.is_none(), h))
            })
        });
    }
    g.finish();
}

/// The stats hot path: one update of a stat already written once, from a
/// worker thread (its own shard).
fn stats_update(c: &mut Criterion) {
    use weir::stats::{set_worker_shard, StatName, Store};
    let store = Store::new(2, Default::default());
    set_worker_shard(0);
    let counter = store.counter(StatName::tagged(
        "cluster",
        "c0",
        "upstream_rq_total",
        "envoy_cluster_name",
    ));
    let gauge = store.gauge(StatName::tagged(
        "cluster",
        "c0",
        "upstream_rq_active",
        "envoy_cluster_name",
    ));
    let hist = store.histogram(StatName::tagged(
        "cluster",
        "c0",
        "upstream_rq_time",
        "envoy_cluster_name",
    ));
    counter.inc();
    gauge.inc();
    hist.record_us(1);
    let mut g = c.benchmark_group("stats");
    g.bench_function("counter_inc", |b| b.iter(|| black_box(&counter).inc()));
    g.bench_function("gauge_add", |b| {
        b.iter(|| black_box(&gauge).add(black_box(1)))
    });
    g.bench_function("histogram_record", |b| {
        b.iter(|| black_box(&hist).record_us(black_box(1_500)))
    });
    g.finish();
}

fn config() -> Criterion {
    // Short runs keep `cargo bench -p weir-benches` to a couple of minutes on
    // 2 cores; the lookups are nanoseconds, so 2 s per bench is plenty.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = micro;
    config = config();
    targets = route_match, vhost_select, format_parse, translate, header_mutation, filter_chain,
        stats_update
}
criterion_main!(micro);
