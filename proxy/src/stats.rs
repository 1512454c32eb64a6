//! Envoy-named statistics with per-worker shards.
//!
//! Every stat is created at config time (never on the request path) and
//! handed to the data path as an `Arc`. Updates touch only the calling
//! worker's cache-line-padded shard (no locks, no shared cache lines);
//! reads (admin, on the control runtime) sum the shards.
//!
//! A stat allocates its shards on its first write: a large xDS config has
//! hundreds of thousands of stats (35 per cluster) and most of them are
//! never written, so until then a stat reads 0 and costs an empty
//! `OnceLock` instead of `shards * 64` bytes.
use std::{
    cell::Cell,
    collections::BTreeMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, OnceLock, RwLock,
    },
};

use xds_client::config::StatsConfig;

/// Shards per stat: workers plus the control runtime. Index 0 is control.
const MAX_SHARDS: usize = 64;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Binds the current thread to a shard (worker `i` uses shard `i + 1`).
pub fn set_worker_shard(i: usize) {
    SHARD.with(|s| s.set((i + 1) % MAX_SHARDS));
}

pub fn current_shard() -> usize {
    shard()
}

fn shard() -> usize {
    SHARD.with(Cell::get)
}

#[repr(align(64))]
#[derive(Default)]
struct PaddedU64(AtomicU64);

#[repr(align(64))]
#[derive(Default)]
struct PaddedI64(AtomicI64);

/// A stat's shards, allocated on its first write: a stat that is never
/// written costs this empty cell, not `shards * 64` bytes.
struct Shards<T>(OnceLock<Box<[T]>>);

impl<T: Default> Shards<T> {
    const fn new() -> Self {
        Shards(OnceLock::new())
    }

    /// The shards, allocating `n` of them if this is the first write. After
    /// the first write this is one load and a branch before the caller's
    /// atomic op; several threads racing on the first write allocate once
    /// (the others wait for it).
    #[inline]
    fn get_or_alloc(&self, n: u8) -> &[T] {
        match self.0.get() {
            Some(s) => s,
            None => self.alloc(n),
        }
    }

    #[cold]
    #[inline(never)]
    fn alloc(&self, n: u8) -> &[T] {
        self.0
            .get_or_init(|| (0..n.max(1)).map(|_| T::default()).collect())
    }

    /// The shards if the stat was ever written.
    fn written(&self) -> Option<&[T]> {
        self.0.get().map(|s| &s[..])
    }
}

/// A monotonically increasing counter.
pub struct Counter {
    shards: Shards<PaddedU64>,
    /// The shard count to allocate on the first write.
    n: u8,
}

impl Counter {
    fn new(n: u8) -> Self {
        Counter {
            shards: Shards::new(),
            n,
        }
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, v: u64) {
        let shards = self.shards.get_or_alloc(self.n);
        shards[shard() % shards.len()].0.fetch_add(v, Relaxed);
    }
    pub fn value(&self) -> u64 {
        self.shards
            .written()
            .map_or(0, |s| s.iter().map(|s| s.0.load(Relaxed)).sum())
    }
    fn reset(&self) {
        for s in self.shards.written().unwrap_or_default() {
            s.0.store(0, Relaxed);
        }
    }
}

/// A gauge; increments and decrements may happen on different shards, the
/// sum is the value.
pub struct Gauge {
    shards: Shards<PaddedI64>,
    /// The shard count to allocate on the first write.
    n: u8,
}

impl Gauge {
    fn new(n: u8) -> Self {
        Gauge {
            shards: Shards::new(),
            n,
        }
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn dec(&self) {
        self.add(-1);
    }
    #[inline]
    pub fn add(&self, v: i64) {
        let shards = self.shards.get_or_alloc(self.n);
        shards[shard() % shards.len()].0.fetch_add(v, Relaxed);
    }
    /// Sets the gauge (control-side gauges only: clears the other shards).
    pub fn set(&self, v: i64) {
        // Setting a never-written gauge to 0 leaves it unallocated: it
        // already reads 0.
        let shards = match self.shards.written() {
            Some(s) => s,
            None if v == 0 => return,
            None => self.shards.get_or_alloc(self.n),
        };
        for (i, s) in shards.iter().enumerate() {
            s.0.store(if i == 0 { v } else { 0 }, Relaxed);
        }
    }
    pub fn value(&self) -> i64 {
        self.shards
            .written()
            .map_or(0, |s| s.iter().map(|s| s.0.load(Relaxed)).sum())
    }
}

/// Envoy's default histogram buckets (milliseconds).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[repr(align(64))]
#[derive(Default)]
struct HistShard {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

/// A latency histogram in milliseconds.
pub struct Histogram {
    shards: Shards<HistShard>,
    n: u8,
}

/// A merged view of a histogram.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot {
    /// Cumulative counts per bucket.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_ms: f64,
}

impl Histogram {
    fn new(n: u8) -> Self {
        Histogram {
            shards: Shards::new(),
            n,
        }
    }
    /// Records a value in microseconds.
    #[inline]
    pub fn record_us(&self, us: u64) {
        let shards = self.shards.get_or_alloc(self.n);
        let s = &shards[shard() % shards.len()];
        let ms = us as f64 / 1000.0;
        if let Some(i) = BUCKETS.iter().position(|b| ms <= *b) {
            s.buckets[i].fetch_add(1, Relaxed);
        }
        s.count.fetch_add(1, Relaxed);
        s.sum_us.fetch_add(us, Relaxed);
    }
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut per = vec![0u64; BUCKETS.len()];
        let mut count = 0;
        let mut sum = 0;
        for s in self.shards.written().unwrap_or_default() {
            for (i, b) in s.buckets.iter().enumerate() {
                per[i] += b.load(Relaxed);
            }
            count += s.count.load(Relaxed);
            sum += s.sum_us.load(Relaxed);
        }
        let mut acc = 0;
        let cumulative = per
            .iter()
            .map(|v| {
                acc += v;
                acc
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count,
            sum_ms: sum as f64 / 1000.0,
        }
    }
    /// An approximate quantile (bucket upper bound interpolation).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let s = self.snapshot();
        if s.count == 0 {
            return None;
        }
        let target = (q * s.count as f64).ceil() as u64;
        for (i, c) in s.cumulative.iter().enumerate() {
            if *c >= target {
                return Some(BUCKETS[i]);
            }
        }
        Some(f64::INFINITY)
    }
}

/// A stat's identity: its Envoy name plus the tags Envoy's default tag
/// extractors would pull out of it (for Prometheus output).
#[derive(Debug, Clone)]
pub struct StatName {
    pub name: String,
    pub tag_extracted: String,
    pub tags: Vec<(&'static str, String)>,
}

impl StatName {
    pub fn plain(name: impl Into<String>) -> Self {
        let name = name.into();
        StatName {
            tag_extracted: name.clone(),
            name,
            tags: vec![],
        }
    }
    /// `<prefix>.<value>.<rest>` with the value extracted as tag `tag`.
    pub fn tagged(prefix: &str, value: &str, rest: &str, tag: &'static str) -> Self {
        StatName {
            name: format!("{prefix}.{value}.{rest}"),
            tag_extracted: format!("{prefix}.{rest}"),
            tags: vec![(tag, value.to_owned())],
        }
    }
}

enum Stat {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
    Text(Arc<TextReadout>),
}

/// A text readout (Envoy's `version_text`): set rarely, from the control
/// thread.
#[derive(Default)]
pub struct TextReadout(std::sync::Mutex<String>);

impl TextReadout {
    pub fn set(&self, v: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = v.to_owned();
    }
    pub fn value(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Entry {
    name: StatName,
    stat: Stat,
}

/// The stats store. Creation takes a write lock (config time only).
pub struct Store {
    shards: u8,
    matcher: RwLock<StatsConfig>,
    stats: RwLock<BTreeMap<String, Entry>>,
}

impl Store {
    pub fn new(workers: usize, matcher: StatsConfig) -> Arc<Self> {
        let shards = (workers + 1).clamp(1, MAX_SHARDS);
        Arc::new(Store {
            shards: u8::try_from(shards).expect("MAX_SHARDS fits in a u8"),
            matcher: RwLock::new(matcher),
            stats: RwLock::new(BTreeMap::new()),
        })
    }

    fn accepted(&self, name: &str) -> bool {
        self.matcher.read().map(|m| m.accepts(name)).unwrap_or(true)
    }

    pub fn counter(&self, name: StatName) -> Arc<Counter> {
        let mut map = self.stats.write().expect("stats lock");
        if let Some(Entry {
            stat: Stat::Counter(c),
            ..
        }) = map.get(&name.name)
        {
            return c.clone();
        }
        let c = Arc::new(Counter::new(self.shards));
        if self.accepted(&name.name) {
            map.insert(
                name.name.clone(),
                Entry {
                    name,
                    stat: Stat::Counter(c.clone()),
                },
            );
        }
        c
    }

    pub fn gauge(&self, name: StatName) -> Arc<Gauge> {
        let mut map = self.stats.write().expect("stats lock");
        if let Some(Entry {
            stat: Stat::Gauge(g),
            ..
        }) = map.get(&name.name)
        {
            return g.clone();
        }
        let g = Arc::new(Gauge::new(self.shards));
        if self.accepted(&name.name) {
            map.insert(
                name.name.clone(),
                Entry {
                    name,
                    stat: Stat::Gauge(g.clone()),
                },
            );
        }
        g
    }

    pub fn text(&self, name: StatName) -> Arc<TextReadout> {
        let mut map = self.stats.write().expect("stats lock");
        if let Some(Entry {
            stat: Stat::Text(t),
            ..
        }) = map.get(&name.name)
        {
            return t.clone();
        }
        let t = Arc::new(TextReadout::default());
        if self.accepted(&name.name) {
            map.insert(
                name.name.clone(),
                Entry {
                    name,
                    stat: Stat::Text(t.clone()),
                },
            );
        }
        t
    }

    pub fn histogram(&self, name: StatName) -> Arc<Histogram> {
        let mut map = self.stats.write().expect("stats lock");
        if let Some(Entry {
            stat: Stat::Histogram(h),
            ..
        }) = map.get(&name.name)
        {
            return h.clone();
        }
        let h = Arc::new(Histogram::new(self.shards));
        if self.accepted(&name.name) {
            map.insert(
                name.name.clone(),
                Entry {
                    name,
                    stat: Stat::Histogram(h.clone()),
                },
            );
        }
        h
    }

    /// Zeroes every counter (`/reset_counters`).
    pub fn reset_counters(&self) {
        for e in self.stats.read().expect("stats lock").values() {
            if let Stat::Counter(c) = &e.stat {
                c.reset();
            }
        }
    }

    /// Visits every stat in name order.
    pub fn visit(&self, mut f: impl FnMut(&StatName, StatValue)) {
        for e in self.stats.read().expect("stats lock").values() {
            let v = match &e.stat {
                Stat::Counter(c) => StatValue::Counter(c.value()),
                Stat::Gauge(g) => StatValue::Gauge(g.value()),
                Stat::Histogram(h) => StatValue::Histogram(h.snapshot()),
                Stat::Text(t) => StatValue::Text(t.value()),
            };
            f(&e.name, v);
        }
    }

    /// Reads one counter or gauge by name (tests and admin).
    pub fn get(&self, name: &str) -> Option<i64> {
        self.stats
            .read()
            .expect("stats lock")
            .get(name)
            .map(|e| match &e.stat {
                Stat::Counter(c) => c.value() as i64,
                Stat::Gauge(g) => g.value(),
                Stat::Histogram(h) => h.snapshot().count as i64,
                Stat::Text(_) => 0,
            })
    }
}

/// A value read from the store.
pub enum StatValue {
    Counter(u64),
    Gauge(i64),
    Histogram(HistogramSnapshot),
    Text(String),
}

#[cfg(test)]
mod tests;
