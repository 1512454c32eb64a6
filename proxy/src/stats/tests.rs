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
        seen.push(format!("{} {} {v}", n.name, n.tag_extracted));
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
