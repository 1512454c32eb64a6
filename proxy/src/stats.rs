//! Envoy-named statistics with per-worker shards.
//!
//! Every stat is created at config time (never on the request path) and
//! handed to the data path as an `Arc`. Updates touch only the calling
//! worker's cache-line-padded shard (no locks, no shared cache lines);
//! reads (admin, on the control runtime) sum the shards.
//!
//! Memory: a large xDS config has hundreds of thousands of stats (35 per
//! cluster) and most of them are never written. So a stat allocates its
//! shards on its first write (until then it reads 0 and costs an empty
//! `OnceLock`), keeps its name once (the store's index borrows it from the
//! stat), and keeps its tag as a byte range of that name plus an interned tag
//! name instead of strings of its own.
use std::{
    borrow::{Borrow, Cow},
    cell::Cell,
    cmp::Ordering,
    collections::BTreeSet,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, OnceLock, PoisonError, RwLock,
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
    head: Head,
}

impl Counter {
    fn new(head: Head) -> Self {
        Counter {
            shards: Shards::new(),
            head,
        }
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, v: u64) {
        let shards = self.shards.get_or_alloc(self.head.shards);
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
    head: Head,
}

impl Gauge {
    fn new(head: Head) -> Self {
        Gauge {
            shards: Shards::new(),
            head,
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
        let shards = self.shards.get_or_alloc(self.head.shards);
        shards[shard() % shards.len()].0.fetch_add(v, Relaxed);
    }
    /// Sets the gauge (control-side gauges only: clears the other shards).
    pub fn set(&self, v: i64) {
        // Setting a never-written gauge to 0 leaves it unallocated: it
        // already reads 0.
        let shards = match self.shards.written() {
            Some(s) => s,
            None if v == 0 => return,
            None => self.shards.get_or_alloc(self.head.shards),
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
    head: Head,
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
    fn new(head: Head) -> Self {
        Histogram {
            shards: Shards::new(),
            head,
        }
    }
    /// Records a value in microseconds.
    #[inline]
    pub fn record_us(&self, us: u64) {
        let shards = self.shards.get_or_alloc(self.head.shards);
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

/// Tag names (`envoy_cluster_name`, ...), interned: a stat keeps a one-byte
/// index (`Tag::id`, 0 = untagged) instead of a 16-byte `&'static str`. Tag
/// names are literals in the code, so there are only a handful.
static TAG_NAMES: RwLock<Vec<&'static str>> = RwLock::new(Vec::new());

fn intern_tag(tag: &'static str) -> u8 {
    let find = |v: &[&'static str]| v.iter().position(|t| *t == tag);
    // (The read guard is dropped before the write lock is taken.)
    let known = find(&TAG_NAMES.read().unwrap_or_else(PoisonError::into_inner));
    let index = known.unwrap_or_else(|| {
        let mut v = TAG_NAMES.write().unwrap_or_else(PoisonError::into_inner);
        find(&v).unwrap_or_else(|| {
            v.push(tag);
            v.len() - 1
        })
    });
    u8::try_from(index + 1).expect("fewer than 256 distinct tag names (they are code literals)")
}

fn tag_name(id: u8) -> &'static str {
    TAG_NAMES.read().unwrap_or_else(PoisonError::into_inner)[usize::from(id) - 1]
}

/// Where a stat's tag values sit in its name: `name[start..end]`, each
/// followed by a dot (at most two: `http.<prefix>.fault.<cluster>.<stat>`
/// has the HCM prefix and the fault filter's downstream cluster). As
/// Envoy's tag extraction, the tag-extracted name is the name without the
/// values and their dots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tag {
    start: u16,
    end: u16,
    /// `TAG_NAMES[id - 1]`; 0 = untagged.
    id: u8,
    /// A second tag after the first (`id2` 0 = none).
    id2: u8,
    start2: u16,
    end2: u16,
}

fn offset(i: usize) -> u16 {
    u16::try_from(i).expect("tagged stat names are shorter than 64 KiB")
}

/// A stat's identity: its Envoy name plus the tag Envoy's default tag
/// extractors would pull out of it (for Prometheus output).
#[derive(Debug, Clone)]
pub struct StatName {
    name: Box<str>,
    tag: Tag,
}

impl StatName {
    pub fn plain(name: impl Into<String>) -> Self {
        StatName {
            name: name.into().into_boxed_str(),
            tag: Tag::default(),
        }
    }
    /// `<prefix>.<value>.<rest>` with the value extracted as tag `tag`.
    /// An empty `prefix` puts the value first (`<value>.<rest>`).
    pub fn tagged(prefix: &str, value: &str, rest: &str, tag: &'static str) -> Self {
        // Sized exactly, so the boxed name keeps no spare capacity.
        let mut name = String::with_capacity(prefix.len() + value.len() + rest.len() + 2);
        if !prefix.is_empty() {
            name.push_str(prefix);
            name.push('.');
        }
        for part in [value, ".", rest] {
            name.push_str(part);
        }
        let start = if prefix.is_empty() {
            0
        } else {
            prefix.len() + 1
        };
        StatName {
            name: name.into_boxed_str(),
            tag: Tag {
                start: offset(start),
                end: offset(start + value.len()),
                id: intern_tag(tag),
                ..Tag::default()
            },
        }
    }

    /// Adds a second tag: the `len` bytes at `start` of the name (after the
    /// first tag's value, and followed by a dot).
    pub fn with_second_tag(mut self, start: usize, len: usize, tag: &'static str) -> Self {
        let end = start + len;
        let first_end = usize::from(self.tag.end);
        if self.tag.id != 0
            && start > first_end
            && self.name.as_bytes().get(end) == Some(&b'.')
            && self.name.is_char_boundary(start)
        {
            self.tag.start2 = offset(start);
            self.tag.end2 = offset(end);
            self.tag.id2 = intern_tag(tag);
        }
        self
    }
    #[cfg(test)]
    fn view(&self) -> StatNameRef<'_> {
        StatNameRef {
            name: &self.name,
            tag: self.tag,
        }
    }
}

/// A stored stat's name as [`Store::visit`] hands it out.
#[derive(Debug, Clone, Copy)]
pub struct StatNameRef<'a> {
    name: &'a str,
    tag: Tag,
}

impl<'a> StatNameRef<'a> {
    /// The full Envoy name (`cluster.c1.upstream_rq_total`).
    pub fn name(&self) -> &'a str {
        self.name
    }
    /// The name without its tag value (`cluster.upstream_rq_total`).
    pub fn tag_extracted(&self) -> Cow<'a, str> {
        if self.tag.id == 0 {
            return Cow::Borrowed(self.name);
        }
        let (start, end) = (usize::from(self.tag.start), usize::from(self.tag.end));
        // Skip each value and the dot after it.
        if self.tag.id2 == 0 {
            return Cow::Owned([&self.name[..start], &self.name[end + 1..]].concat());
        }
        let (start2, end2) = (usize::from(self.tag.start2), usize::from(self.tag.end2));
        Cow::Owned(
            [
                &self.name[..start],
                &self.name[end + 1..start2],
                &self.name[end2 + 1..],
            ]
            .concat(),
        )
    }
    /// The extracted tags as (tag name, value), sorted by tag name (as
    /// Envoy's Prometheus output orders labels): none, one or two.
    pub fn tags(&self) -> impl Iterator<Item = (&'static str, &'a str)> {
        let name = self.name;
        let tag = self.tag;
        let first = (tag.id != 0).then(|| {
            (
                tag_name(tag.id),
                &name[usize::from(tag.start)..usize::from(tag.end)],
            )
        });
        let second = (tag.id2 != 0).then(|| {
            (
                tag_name(tag.id2),
                &name[usize::from(tag.start2)..usize::from(tag.end2)],
            )
        });
        let (a, b) = match (first, second) {
            (Some(f), Some(s)) if s.0 < f.0 => (Some(s), Some(f)),
            other => other,
        };
        a.into_iter().chain(b)
    }
}

/// What every stat keeps besides its value: its name and tag (the store's
/// index borrows the name from here) and its shard count. Flat rather than
/// a `StatName` plus a count: 32 bytes instead of 40, which keeps a counter
/// at 56 (see `tests::stat_sizes`).
struct Head {
    name: Box<str>,
    tag: Tag,
    shards: u8,
}

impl Head {
    fn name_ref(&self) -> StatNameRef<'_> {
        StatNameRef {
            name: &self.name,
            tag: self.tag,
        }
    }
}

enum Stat {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
    Text(Arc<TextReadout>),
}

impl Stat {
    fn head(&self) -> &Head {
        match self {
            Stat::Counter(c) => &c.head,
            Stat::Gauge(g) => &g.head,
            Stat::Histogram(h) => &h.head,
            Stat::Text(t) => &t.head,
        }
    }
}

// The store is a set of stats ordered (and looked up) by name.
impl Borrow<str> for Stat {
    fn borrow(&self) -> &str {
        &self.head().name
    }
}

impl PartialEq for Stat {
    fn eq(&self, other: &Self) -> bool {
        self.head().name == other.head().name
    }
}

impl Eq for Stat {}

impl PartialOrd for Stat {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stat {
    fn cmp(&self, other: &Self) -> Ordering {
        self.head().name.cmp(&other.head().name)
    }
}

/// A text readout (Envoy's `version_text`): set rarely, from the control
/// thread.
pub struct TextReadout {
    value: std::sync::Mutex<String>,
    head: Head,
}

impl TextReadout {
    fn new(head: Head) -> Self {
        TextReadout {
            value: Default::default(),
            head,
        }
    }
    pub fn set(&self, v: &str) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = v.to_owned();
    }
    pub fn value(&self) -> String {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The stats store. Creation takes a write lock (config time only).
pub struct Store {
    shards: u8,
    matcher: RwLock<StatsConfig>,
    stats: RwLock<BTreeSet<Stat>>,
    /// Stats in a custom namespace with explicit labels (Istio's
    /// `istiocustom.*`), by their Envoy name
    /// (`<namespace>.<name>.<label>.<value>...`). Created when a filter sees
    /// a new label set, not only at config time.
    labeled: RwLock<std::collections::BTreeMap<Box<str>, Labeled>>,
}

/// A labeled stat: its namespace, name and labels, and its value.
pub struct Labeled {
    pub namespace: Box<str>,
    pub name: Box<str>,
    pub labels: Box<[(Box<str>, Box<str>)]>,
    stat: LabeledKind,
}

enum LabeledKind {
    Counter(Arc<Counter>),
    Histogram(Arc<Histogram>),
}

impl Store {
    pub fn new(workers: usize, matcher: StatsConfig) -> Arc<Self> {
        let shards = (workers + 1).clamp(1, MAX_SHARDS);
        Arc::new(Store {
            shards: u8::try_from(shards).expect("MAX_SHARDS fits in a u8"),
            matcher: RwLock::new(matcher),
            stats: RwLock::new(BTreeSet::new()),
            labeled: RwLock::new(Default::default()),
        })
    }

    /// Envoy's name of a labeled stat: `<namespace>.<name>.<k>.<v>...`.
    fn labeled_name(namespace: &str, name: &str, labels: &[(&str, &str)]) -> String {
        let mut full = format!("{namespace}.{name}");
        for (k, v) in labels {
            full.push('.');
            full.push_str(k);
            full.push('.');
            full.push_str(v);
        }
        full
    }

    fn labeled(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        counter: bool,
    ) -> LabeledKind {
        let full = Self::labeled_name(namespace, name, labels);
        let existing = |l: &Labeled| match (&l.stat, counter) {
            (LabeledKind::Counter(c), true) => Some(LabeledKind::Counter(c.clone())),
            (LabeledKind::Histogram(h), false) => Some(LabeledKind::Histogram(h.clone())),
            _ => None,
        };
        if let Some(k) = self
            .labeled
            .read()
            .expect("stats lock")
            .get(full.as_str())
            .and_then(existing)
        {
            return k;
        }
        let head = || Head {
            name: Box::default(),
            tag: Tag::default(),
            shards: self.shards,
        };
        let stat = if counter {
            LabeledKind::Counter(Arc::new(Counter::new(head())))
        } else {
            LabeledKind::Histogram(Arc::new(Histogram::new(head())))
        };
        let ret = match &stat {
            LabeledKind::Counter(c) => LabeledKind::Counter(c.clone()),
            LabeledKind::Histogram(h) => LabeledKind::Histogram(h.clone()),
        };
        if !self.accepted(&full) {
            return ret;
        }
        let mut map = self.labeled.write().expect("stats lock");
        if let Some(k) = map.get(full.as_str()).and_then(existing) {
            return k;
        }
        map.insert(
            full.into(),
            Labeled {
                namespace: namespace.into(),
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                stat,
            },
        );
        ret
    }

    /// A counter in a custom namespace with labels (see [`Labeled`]).
    pub fn labeled_counter(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<Counter> {
        match self.labeled(namespace, name, labels, true) {
            LabeledKind::Counter(c) => c,
            LabeledKind::Histogram(_) => unreachable!("asked for a counter"),
        }
    }

    /// A histogram in a custom namespace with labels (see [`Labeled`]).
    pub fn labeled_histogram(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<Histogram> {
        match self.labeled(namespace, name, labels, false) {
            LabeledKind::Histogram(h) => h,
            LabeledKind::Counter(_) => unreachable!("asked for a histogram"),
        }
    }

    /// Visits every labeled stat in Envoy-name order.
    pub fn visit_labeled(&self, mut f: impl FnMut(&str, &Labeled, StatValue)) {
        for (full, l) in self.labeled.read().expect("stats lock").iter() {
            let v = match &l.stat {
                LabeledKind::Counter(c) => StatValue::Counter(c.value()),
                LabeledKind::Histogram(h) => StatValue::Histogram(h.snapshot()),
            };
            f(full, l, v);
        }
    }

    fn accepted(&self, name: &str) -> bool {
        self.matcher.read().map(|m| m.accepts(name)).unwrap_or(true)
    }

    /// The stat of that name and kind (`existing` picks the kind), else a
    /// new one, stored if the stats matcher accepts the name (a rejected
    /// stat still works, it is just not listed, and keeps no name).
    fn get_or_create<T>(
        &self,
        name: StatName,
        existing: fn(&Stat) -> Option<&Arc<T>>,
        make: fn(Head) -> T,
        wrap: fn(Arc<T>) -> Stat,
    ) -> Arc<T> {
        let mut set = self.stats.write().expect("stats lock");
        if let Some(t) = set.get(&*name.name).and_then(existing) {
            return t.clone();
        }
        let accepted = self.accepted(&name.name);
        let head = if accepted {
            Head {
                name: name.name,
                tag: name.tag,
                shards: self.shards,
            }
        } else {
            Head {
                name: Box::default(),
                tag: Tag::default(),
                shards: self.shards,
            }
        };
        let t = Arc::new(make(head));
        if accepted {
            // A stat of another kind under that name is replaced, as before.
            set.replace(wrap(t.clone()));
        }
        t
    }

    pub fn counter(&self, name: StatName) -> Arc<Counter> {
        self.get_or_create(
            name,
            |s| match s {
                Stat::Counter(c) => Some(c),
                _ => None,
            },
            Counter::new,
            Stat::Counter,
        )
    }

    pub fn gauge(&self, name: StatName) -> Arc<Gauge> {
        self.get_or_create(
            name,
            |s| match s {
                Stat::Gauge(g) => Some(g),
                _ => None,
            },
            Gauge::new,
            Stat::Gauge,
        )
    }

    pub fn text(&self, name: StatName) -> Arc<TextReadout> {
        self.get_or_create(
            name,
            |s| match s {
                Stat::Text(t) => Some(t),
                _ => None,
            },
            TextReadout::new,
            Stat::Text,
        )
    }

    pub fn histogram(&self, name: StatName) -> Arc<Histogram> {
        self.get_or_create(
            name,
            |s| match s {
                Stat::Histogram(h) => Some(h),
                _ => None,
            },
            Histogram::new,
            Stat::Histogram,
        )
    }

    /// Zeroes every counter (`/reset_counters`).
    pub fn reset_counters(&self) {
        for s in self.stats.read().expect("stats lock").iter() {
            if let Stat::Counter(c) = s {
                c.reset();
            }
        }
        for l in self.labeled.read().expect("stats lock").values() {
            if let LabeledKind::Counter(c) = &l.stat {
                c.reset();
            }
        }
    }

    /// Visits every stat in name order.
    pub fn visit(&self, mut f: impl FnMut(StatNameRef<'_>, StatValue)) {
        for s in self.stats.read().expect("stats lock").iter() {
            let v = match s {
                Stat::Counter(c) => StatValue::Counter(c.value()),
                Stat::Gauge(g) => StatValue::Gauge(g.value()),
                Stat::Histogram(h) => StatValue::Histogram(h.snapshot()),
                Stat::Text(t) => StatValue::Text(t.value()),
            };
            f(s.head().name_ref(), v);
        }
    }

    /// Reads one counter or gauge by name (tests and admin).
    pub fn get(&self, name: &str) -> Option<i64> {
        self.stats
            .read()
            .expect("stats lock")
            .get(name)
            .map(|s| match s {
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
