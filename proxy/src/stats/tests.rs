use std::sync::Barrier;

use super::*;

#[test]
fn shards_sum_and_matcher_filters() {
    let s = Store::new(
        2,
        StatsConfig::Include(vec![xds_client::config::StringMatcher {
            kind: xds_client::config::StringMatch::Prefix("keep.".into()),
            ignore_case: false,
        }]),
    );
    let c = s.counter(StatName::plain("keep.a"));
    let dropped = s.counter(StatName::plain("drop.b"));
    c.inc();
    set_worker_shard(0);
    c.add(2);
    dropped.inc();
    assert_eq!(s.get("keep.a"), Some(3));
    assert_eq!(s.get("drop.b"), None);
    assert_eq!(dropped.value(), 1);
    let h = s.histogram(StatName::plain("keep.h"));
    h.record_us(700);
    h.record_us(3_000);
    let snap = h.snapshot();
    assert_eq!(snap.count, 2);
    assert_eq!(snap.cumulative[1], 1); // <= 1ms
    assert_eq!(snap.cumulative[2], 2); // <= 5ms
}

#[test]
fn never_written_stats_read_zero_and_render() {
    let s = Store::new(3, StatsConfig::default());
    let tagged = |rest: &str| StatName::tagged("cluster", "c1", rest, "envoy_cluster_name");
    let c = s.counter(tagged("upstream_rq_total"));
    let g = s.gauge(tagged("upstream_cx_active"));
    let h = s.histogram(tagged("upstream_rq_time"));
    let t = s.text(StatName::plain("cluster_manager.cds.version_text"));
    // Reads, a reset and setting a gauge to 0 leave the shards unallocated.
    s.reset_counters();
    g.set(0);
    assert_eq!((c.value(), g.value(), h.quantile(0.5)), (0, 0, None));
    assert!(c.shards.written().is_none());
    assert!(g.shards.written().is_none());
    assert!(h.shards.written().is_none());
    assert_eq!(s.get("cluster.c1.upstream_rq_total"), Some(0));
    assert_eq!(s.get("cluster.c1.upstream_cx_active"), Some(0));
    assert_eq!(s.get("cluster.c1.upstream_rq_time"), Some(0));
    let mut seen = Vec::new();
    s.visit(|n, v| {
        let v = match v {
            StatValue::Counter(c) => format!("counter {c}"),
            StatValue::Gauge(g) => format!("gauge {g}"),
            StatValue::Histogram(h) => {
                assert_eq!(h.cumulative, vec![0; BUCKETS.len()]);
                format!("histogram {} {}", h.count, h.sum_ms)
            }
            StatValue::Text(t) => format!("text {t:?}"),
        };
        seen.push(format!("{} {} {v}", n.name(), n.tag_extracted()));
    });
    assert_eq!(
        seen,
        [
            "cluster.c1.upstream_cx_active cluster.upstream_cx_active gauge 0",
            "cluster.c1.upstream_rq_time cluster.upstream_rq_time histogram 0 0",
            "cluster.c1.upstream_rq_total cluster.upstream_rq_total counter 0",
            "cluster_manager.cds.version_text cluster_manager.cds.version_text text \"\"",
        ]
    );
    // The first write allocates the shards; the stat stays the same one.
    c.inc();
    g.set(5);
    h.record_us(2_000);
    t.set("v1");
    assert_eq!(c.shards.written().map(<[_]>::len), Some(4));
    assert_eq!(s.get("cluster.c1.upstream_rq_total"), Some(1));
    assert_eq!(s.get("cluster.c1.upstream_cx_active"), Some(5));
    assert_eq!(s.get("cluster.c1.upstream_rq_time"), Some(1));
    s.reset_counters();
    assert_eq!(c.value(), 0);
}

/// Threads pinned to different shards race on the first write of fresh
/// stats (a barrier releases them together): the shards are allocated
/// once, so no update is lost.
#[test]
fn first_write_races_from_several_threads() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 2_000;
    let s = Store::new(THREADS, StatsConfig::default());
    let name = |i: usize, rest: &str| StatName::tagged("cluster", &format!("c{i}"), rest, "t");
    let counters: Vec<_> = (0..32).map(|i| s.counter(name(i, "rq"))).collect();
    let gauges: Vec<_> = (0..32).map(|i| s.gauge(name(i, "active"))).collect();
    let hists: Vec<_> = (0..32).map(|i| s.histogram(name(i, "time"))).collect();
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (counters, gauges, hists, barrier) = (&counters, &gauges, &hists, &barrier);
            scope.spawn(move || {
                set_worker_shard(t);
                barrier.wait();
                for _ in 0..ROUNDS {
                    for ((c, g), h) in counters.iter().zip(gauges).zip(hists) {
                        c.inc();
                        g.add(2);
                        g.dec();
                        h.record_us(700);
                    }
                }
            });
        }
    });
    let want = THREADS as u64 * ROUNDS;
    for ((c, g), h) in counters.iter().zip(&gauges).zip(&hists) {
        assert_eq!(c.value(), want);
        assert_eq!(g.value(), want as i64);
        let snap = h.snapshot();
        assert_eq!((snap.count, snap.cumulative[1]), (want, want));
        assert_eq!(c.shards.written().map(<[_]>::len), Some(THREADS + 1));
    }
}

/// What `StatName` stored before tags became a range of the name:
/// (name, tag-extracted name, tags).
fn old_model(prefix: &str, value: &str, rest: &str, tag: &str) -> (String, String, Vec<String>) {
    (
        format!("{prefix}.{value}.{rest}"),
        format!("{prefix}.{rest}"),
        vec![format!("{tag}={value}")],
    )
}

fn rendered(n: StatNameRef<'_>) -> (String, String, Vec<String>) {
    (
        n.name().to_owned(),
        n.tag_extracted().into_owned(),
        n.tags().map(|(k, v)| format!("{k}={v}")).collect(),
    )
}

#[test]
fn names_and_tags_render_as_before() {
    let cases = [
        ("cluster", "c1", "upstream_rq_total", "envoy_cluster_name"),
        (
            "cluster",
            "outbound|443||svc.ns.svc.cluster.local",
            "ssl.handshake",
            "envoy_cluster_name",
        ),
        (
            "listener",
            "0.0.0.0_8080",
            "downstream_cx_total",
            "envoy_listener_address",
        ),
        (
            "listener",
            "[::]_443",
            "ssl.session_reused",
            "envoy_listener_address",
        ),
        (
            "http",
            "ingress_http",
            "downstream_rq_2xx",
            "envoy_http_conn_manager_prefix",
        ),
        (
            "http",
            "a.b",
            "rq_direct_response",
            "envoy_http_conn_manager_prefix",
        ),
        (
            "tcp",
            "db",
            "downstream_cx_rx_bytes_total",
            "envoy_tcp_prefix",
        ),
        // Degenerate values and rests keep the old string arithmetic.
        ("cluster", "", "upstream_rq_total", "envoy_cluster_name"),
        ("cluster", "c1", "", "envoy_cluster_name"),
        ("cluster", "é.ü", "x", "envoy_cluster_name"),
    ];
    let s = Store::new(1, StatsConfig::default());
    let mut want = Vec::new();
    for (prefix, value, rest, tag) in cases {
        let n = StatName::tagged(prefix, value, rest, tag);
        assert_eq!(rendered(n.view()), old_model(prefix, value, rest, tag));
        want.push(old_model(prefix, value, rest, tag));
        s.counter(n);
    }
    for plain in ["server.live", "cluster_manager.cds.update_attempt", "x"] {
        let n = StatName::plain(plain);
        let old = (plain.to_owned(), plain.to_owned(), vec![]);
        assert_eq!(rendered(n.view()), old);
        want.push(old);
        s.gauge(n);
    }
    // The store hands out the same renderings, in name order.
    want.sort();
    let mut got = Vec::new();
    s.visit(|n, _| got.push(rendered(n)));
    assert_eq!(got, want);
}

#[test]
fn a_name_of_another_kind_is_replaced_and_rejected_stats_keep_no_name() {
    let s = Store::new(
        1,
        StatsConfig::Include(vec![xds_client::config::StringMatcher {
            kind: xds_client::config::StringMatch::Prefix("keep.".into()),
            ignore_case: false,
        }]),
    );
    let c = s.counter(StatName::plain("keep.x"));
    c.add(4);
    assert_eq!(s.get("keep.x"), Some(4));
    let g = s.gauge(StatName::plain("keep.x"));
    g.set(-2);
    assert_eq!(s.get("keep.x"), Some(-2));
    assert!(Arc::ptr_eq(&g, &s.gauge(StatName::plain("keep.x"))));
    let dropped = s.counter(StatName::tagged("drop", "v", "y", "t"));
    assert!(dropped.head.name.is_empty());
    dropped.inc();
    assert_eq!(dropped.value(), 1);
}

/// The per-stat footprint this layout exists for (64-bit targets): a
/// counter or gauge is 56 bytes inside its `Arc` (72 with the counts), a
/// slot in the store's index is 16.
#[test]
#[cfg(target_pointer_width = "64")]
fn stat_sizes() {
    assert_eq!(std::mem::size_of::<Counter>(), 56);
    assert_eq!(std::mem::size_of::<Gauge>(), 56);
    assert_eq!(std::mem::size_of::<Histogram>(), 56);
    assert_eq!(std::mem::size_of::<Stat>(), 16);
}

#[test]
fn a_second_tag_is_extracted_too() {
    // `http.<prefix>.fault.<downstream_cluster>.<stat>`, as the fault filter
    // names its per-downstream-cluster stats.
    let name = "http.ingress.fault.web.aborts_injected";
    let n = StatName::tagged(
        "http",
        "ingress",
        "fault.web.aborts_injected",
        "envoy_http_conn_manager_prefix",
    )
    .with_second_tag(
        "http.ingress.fault.".len(),
        "web".len(),
        "envoy_fault_downstream_cluster",
    );
    let v = n.view();
    assert_eq!(v.name(), name);
    assert_eq!(v.tag_extracted(), "http.fault.aborts_injected");
    // Sorted by tag name, as Envoy's Prometheus labels.
    assert_eq!(
        v.tags().collect::<Vec<_>>(),
        [
            ("envoy_fault_downstream_cluster", "web"),
            ("envoy_http_conn_manager_prefix", "ingress")
        ]
    );
    // A range that is not a dot-terminated segment after the first tag is
    // ignored.
    let bad = StatName::tagged("http", "ingress", "x.y", "envoy_http_conn_manager_prefix")
        .with_second_tag(0, 4, "envoy_fault_downstream_cluster");
    assert_eq!(bad.view().tags().count(), 1);
}
