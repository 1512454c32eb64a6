//! Upstream clusters at run time: hosts, load balancing, connection pools,
//! DNS refresh and cluster stats.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, OnceLock,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use rand::Rng;
use xds_client::config::{
    Cluster, Discovery, EndpointAddress, LbPolicy, OverrideHost, OverrideHostSource, SlowStart,
    UpstreamProtocol,
};

use crate::stats::{Counter, Gauge, Histogram, StatName, Store};

pub mod callout;
pub mod circuit_breaker;
pub mod dns;
pub mod h1;
pub mod hash_lb;
pub mod health_check;
pub mod original_dst;
pub mod outlier;
pub mod pool;
pub mod proxy_protocol;
pub mod zone;

pub use pool::{Client, PoolError, PoolKind};

/// One upstream host.
#[derive(Debug)]
pub struct Host {
    /// The socket address; for an internal host, a stand-in
    /// ([`crate::internal::InternalTarget::stand_in`]).
    pub addr: SocketAddr,
    /// An `envoy_internal_address` host: connections go to that internal
    /// listener in process.
    pub internal: Option<Arc<crate::internal::InternalHost>>,
    pub hostname: String,
    pub weight: u32,
    pub healthy: bool,
    pub priority: u32,
    /// The host's locality (shared by its locality's hosts), and that
    /// locality's `load_balancing_weight` (0 when unset, as Envoy).
    pub locality: Arc<hash_lb::LocalityKey>,
    pub locality_weight: u32,
    pub metadata: serde_json::Value,
    /// Requests in flight (least-request LB).
    pub active: AtomicU64,
    /// Outlier detection state, when the cluster has a detector (set once
    /// when the host joins the cluster's host set).
    pub outlier: OnceLock<Arc<outlier::HostMonitor>>,
    /// Active health check state, when the cluster has `health_checks`
    /// (set once when the host joins the cluster's host set).
    pub active_hc: OnceLock<Arc<health_check::HostState>>,
    /// Slow start: when the load balancer first saw the host healthy
    /// ([`clock_ms`]; 0 = not yet), Envoy's `lastHcPassTime` for hosts
    /// without active health checking. Carried over by address when the
    /// host set is replaced.
    pub since: AtomicU64,
}

#[cfg(test)]
impl Host {
    /// A healthy host of weight 1 at `addr` in priority 0, for unit tests
    /// (override fields with struct update syntax).
    pub(crate) fn test(addr: SocketAddr) -> Host {
        Host {
            addr,
            internal: None,
            hostname: String::new(),
            weight: 1,
            healthy: true,
            priority: 0,
            locality: Default::default(),
            locality_weight: 0,
            metadata: serde_json::Value::Null,
            active: AtomicU64::new(0),
            outlier: OnceLock::new(),
            active_hc: OnceLock::new(),
            since: AtomicU64::new(0),
        }
    }
}

/// Milliseconds on a process-wide monotonic clock, from 1 (0 means
/// "never" in [`Host::since`]).
pub fn clock_ms() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Host {
    /// The address workload discovery (WDS) looks this host up by, as
    /// istio/proxy: an IP host's own; an internal host's `original_dst`
    /// `local` endpoint metadata (none for `istio.double_hbone`).
    pub fn workload_addr(&self) -> Option<SocketAddr> {
        match &self.internal {
            Some(h) => h.workload_addr,
            None => Some(self.addr),
        }
    }

    /// Usable by the load balancer: healthy by EDS, not ejected by
    /// outlier detection (Envoy's FAILED_OUTLIER_CHECK) and not failing
    /// active health checks (FAILED_ACTIVE_HC).
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.healthy && !self.is_ejected() && !self.failed_active_hc()
    }

    #[inline]
    pub fn failed_active_hc(&self) -> bool {
        self.active_hc.get().is_some_and(|s| s.failed())
    }

    #[inline]
    pub fn is_ejected(&self) -> bool {
        self.outlier.get().is_some_and(|m| m.ejected())
    }

    /// Envoy's `lastHcPassTime` ([`clock_ms`], 0 = none): the last passing
    /// active check while the host was failing, else when the load
    /// balancer first saw it healthy.
    #[inline]
    pub fn last_pass(&self) -> u64 {
        match self.active_hc.get().map(|s| s.last_pass()) {
            Some(t) if t != 0 => t,
            _ => self.since.load(Relaxed),
        }
    }

    /// The host's weight for a pick at `now` ([`clock_ms`]) with slow
    /// start: scaled while it is healthy and within the window, as
    /// Envoy's `applySlowStartFactor`.
    fn slow_start_weight(&self, s: &SlowStart, now: u64) -> f64 {
        f64::from(self.weight) * self.slow_start_factor(s, now)
    }

    /// The slow-start factor alone (1.0 outside the window or unhealthy).
    fn slow_start_factor(&self, s: &SlowStart, now: u64) -> f64 {
        let t = self.last_pass();
        if t == 0 || !self.is_healthy() {
            return 1.0;
        }
        s.factor(Duration::from_millis(now.saturating_sub(t)))
    }
}

/// The hosts of a cluster at one moment; replaced whole on DNS changes.
#[derive(Debug, Default)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    /// Per priority level (ascending), the hosts to balance over and the
    /// share of traffic (percent) the level takes.
    pub priorities: Vec<PriorityLevel>,
    pub healthy_count: usize,
    /// Every host by address, across priorities and health (Envoy's
    /// `crossPriorityHostMap`), for `override_host` clusters only.
    pub by_addr: HashMap<SocketAddr, usize>,
    /// Zone-aware routing of priority 0 (with a local cluster).
    pub zone: Option<zone::ZoneRouting>,
    /// Slow start: picks before this time ([`clock_ms`]) weigh hosts by
    /// their slow-start factor (0: no host is in its window).
    pub slow_until: u64,
}

/// How [`HostSet::build_for`] computes priority loads and slow start,
/// from the cluster's configuration.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub panic_threshold: f64,
    pub overprovisioning_factor: u32,
    /// `weighted_priority_health`: health by weight, not host count.
    pub weighted_priority_health: bool,
    pub slow_start: Option<SlowStart>,
    /// Index hosts by address ([`HostSet::by_addr`]).
    pub by_addr: bool,
}

impl LoadOptions {
    pub fn of(c: &Cluster) -> LoadOptions {
        LoadOptions {
            panic_threshold: c.panic_threshold,
            overprovisioning_factor: c.overprovisioning_factor,
            weighted_priority_health: c.weighted_priority_health,
            slow_start: c.slow_start,
            by_addr: c.override_host.is_some(),
        }
    }
}

/// One priority level of a host set.
#[derive(Debug, Default)]
pub struct PriorityLevel {
    /// Indexes into `HostSet::hosts`: the healthy hosts, or all the level's
    /// hosts when the level is in panic.
    pub usable: Vec<usize>,
    /// Smooth weighted round-robin sequence when weights differ.
    pub weighted: Vec<usize>,
    /// Percent of requests for this level (all levels sum to 100).
    pub load: u32,
    /// Balancing over all the level's hosts (too few healthy).
    pub panic: bool,
    /// The consistent-hash table over `usable` (RING_HASH, MAGLEV).
    pub table: Option<(hash_lb::HashTable, hash_lb::TableStats)>,
    /// The table's hosts and normalized weights (bounded loads).
    pub normalized: Vec<(usize, f64)>,
    /// With `locality_weighted_lb_config`: the localities that can take
    /// traffic and their effective weights (summing to `locality_total`).
    pub localities: Vec<LocalityLevel>,
    pub locality_total: f64,
}

/// One locality of a priority level, for locality-weighted balancing.
#[derive(Debug, Default)]
pub struct LocalityLevel {
    /// Its healthy hosts (indexes into `HostSet::hosts`).
    pub usable: Vec<usize>,
    pub weighted: Vec<usize>,
    /// Envoy's effective locality weight: `load_balancing_weight` ×
    /// min(1, overprovisioning factor × healthy share).
    pub weight: f64,
}

impl PriorityLevel {
    /// The hosts one request balances over: with locality weights (and
    /// not in panic) a locality's, picked in proportion to its effective
    /// weight, as Envoy's `chooseHealthyLocality`; else the level's.
    fn source(&self) -> (&[usize], &[usize]) {
        if !self.panic && self.locality_total > 0.0 {
            let mut x = rand::rng().random::<f64>() * self.locality_total;
            for l in &self.localities {
                if x < l.weight {
                    return (&l.usable, &l.weighted);
                }
                x -= l.weight;
            }
            if let Some(l) = self.localities.last() {
                return (&l.usable, &l.weighted);
            }
        }
        (&self.usable, &self.weighted)
    }
}

impl HostSet {
    /// Builds the set as Envoy's load balancer sees it (default options:
    /// unweighted priority health, no slow start).
    pub fn build(
        hosts: Vec<Arc<Host>>,
        panic_threshold: f64,
        overprovisioning_factor: u32,
        lb: &LbPolicy,
        locality_weighted: bool,
        local: Option<&hash_lb::LocalityKey>,
    ) -> HostSet {
        let opts = LoadOptions {
            panic_threshold,
            overprovisioning_factor,
            weighted_priority_health: false,
            slow_start: None,
            by_addr: false,
        };
        Self::build_with(hosts, &opts, lb, locality_weighted, local)
    }

    /// [`HostSet::build_with`] with cluster `c`'s options.
    pub fn build_for(
        hosts: Vec<Arc<Host>>,
        c: &Cluster,
        local: Option<&hash_lb::LocalityKey>,
    ) -> HostSet {
        Self::build_with(
            hosts,
            &LoadOptions::of(c),
            &c.lb,
            c.locality_weighted,
            local,
        )
    }

    /// Builds the set as Envoy's `LoadBalancerBase` computes it (integer
    /// percents, as Envoy): each level's health is min(100, overprovisioning
    /// factor × healthy hosts / hosts) (by weight with
    /// `weighted_priority_health`); levels take load in priority order
    /// in proportion to their health over the normalised total (capped at
    /// 100), the rounding remainder going to the first level with health.
    /// No level is in panic while the normalised total is 100; below it a
    /// level whose healthy share is under the panic threshold balances over
    /// all its hosts, and when every level is in panic the load follows
    /// the levels' host counts.
    pub fn build_with(
        hosts: Vec<Arc<Host>>,
        opts: &LoadOptions,
        lb: &LbPolicy,
        locality_weighted: bool,
        local: Option<&hash_lb::LocalityKey>,
    ) -> HostSet {
        let overprovisioning_factor = opts.overprovisioning_factor;
        let panic_threshold = opts.panic_threshold.min(100.0);
        let healthy_count = hosts.iter().filter(|h| h.is_healthy()).count();
        let slow_until = opts.slow_start.map_or(0, |s| slow_start_until(&hosts, &s));
        let mut prios: Vec<u32> = hosts.iter().map(|h| h.priority).collect();
        prios.sort_unstable();
        prios.dedup();
        // Per level: its hosts, its healthy hosts, its health (0-100).
        let mut groups = Vec::new();
        let mut health = Vec::new();
        for p in &prios {
            let at: Vec<usize> = (0..hosts.len())
                .filter(|i| hosts[*i].priority == *p)
                .collect();
            let healthy: Vec<usize> = at
                .iter()
                .copied()
                .filter(|i| hosts[*i].is_healthy())
                .collect();
            let (healthy_w, total_w) = if opts.weighted_priority_health {
                let w = |v: &[usize]| v.iter().map(|i| u64::from(hosts[*i].weight)).sum::<u64>();
                (w(&healthy), w(&at))
            } else {
                (healthy.len() as u64, at.len() as u64)
            };
            health.push(
                (u64::from(overprovisioning_factor) * healthy_w)
                    .checked_div(total_w)
                    .unwrap_or(0)
                    .min(100),
            );
            groups.push((at, healthy));
        }
        let normalized = health.iter().sum::<u64>().min(100);
        let mut loads = vec![0u64; groups.len()];
        if normalized > 0 {
            let mut remaining = 100u64;
            for (i, h) in health.iter().enumerate() {
                loads[i] = (h * 100)
                    .checked_div(normalized)
                    .unwrap_or(0)
                    .min(remaining);
                remaining -= loads[i];
            }
            if let Some(first) = health.iter().position(|h| *h > 0) {
                loads[first] += remaining;
            }
        }
        let panics: Vec<bool> = groups
            .iter()
            .map(|(at, healthy)| {
                let pct = 100.0 * healthy.len() as f64 / at.len() as f64;
                // No healthy host at all is panic too, even at a 0%
                // threshold (Envoy 1.40 still routes when outlier
                // detection ejected every host).
                normalized < 100 && (pct < panic_threshold || healthy.is_empty())
            })
            .collect();
        if !groups.is_empty() && panics.iter().all(|p| *p) {
            // Total panic: the load follows each level's host count.
            let total: u64 = groups.iter().map(|g| g.0.len() as u64).sum();
            let mut remaining = 100u64;
            for (i, g) in groups.iter().enumerate() {
                loads[i] = 100 * g.0.len() as u64 / total;
                remaining -= loads[i];
            }
            loads[0] += remaining;
        } else if normalized == 0 {
            // Nothing healthy and no panic: Envoy gives P0 everything
            // (nothing is picked from it).
            if let Some(l) = loads.first_mut() {
                *l = 100;
            }
        }
        let mut levels = Vec::new();
        for (((at, healthy), panic), load) in groups.into_iter().zip(panics).zip(loads) {
            let (localities, locality_total) = if locality_weighted && !lb.is_hash() {
                locality_levels(&hosts, &at, overprovisioning_factor)
            } else {
                (Vec::new(), 0.0)
            };
            let usable = if panic { at.clone() } else { healthy };
            let (weighted, table, normalized) = if lb.is_hash() {
                let n = if locality_weighted {
                    hash_lb::normalize_localities(&hosts, &at, panic, local)
                } else {
                    let mut n = Vec::with_capacity(usable.len());
                    hash_lb::normalize(&hosts, &usable, 1.0, &mut n);
                    n
                };
                let table = hash_lb::HashTable::build_weighted(lb, &hosts, &n);
                (Vec::new(), table, n)
            } else {
                (weighted_sequence(&hosts, &usable), None, Vec::new())
            };
            levels.push(PriorityLevel {
                usable,
                weighted,
                load: load as u32,
                panic,
                table,
                normalized,
                localities,
                locality_total,
            });
        }
        let by_addr = if opts.by_addr {
            hosts.iter().enumerate().map(|(i, h)| (h.addr, i)).collect()
        } else {
            HashMap::new()
        };
        HostSet {
            hosts,
            priorities: levels,
            healthy_count,
            by_addr,
            zone: None,
            slow_until,
        }
    }

    /// Picks the priority level for a request hash, as Envoy's
    /// `choosePriority`: `hash % 100 + 1` against the cumulative loads.
    fn level_for_hash(&self, hash: u64) -> Option<&PriorityLevel> {
        let point = hash % 100 + 1;
        let mut cumulative = 0u64;
        for l in &self.priorities {
            cumulative += u64::from(l.load);
            if point <= cumulative {
                return Some(l);
            }
        }
        self.priorities.first()
    }

    /// The consistent-hash table stats of the last level that has a table
    /// (what Envoy's gauges show: each level's build overwrites them).
    pub fn table_stats(&self) -> Option<hash_lb::TableStats> {
        self.priorities
            .iter()
            .rev()
            .find_map(|l| l.table.as_ref().map(|t| t.1))
    }

    /// Picks the priority level for one request.
    fn level(&self) -> Option<&PriorityLevel> {
        if self.priorities.len() == 1 {
            return self.priorities.first().filter(|l| !l.usable.is_empty());
        }
        let mut roll = rand::rng().random_range(0..100u32);
        for l in &self.priorities {
            if roll < l.load && !l.usable.is_empty() {
                return Some(l);
            }
            roll = roll.saturating_sub(l.load);
        }
        self.priorities.iter().find(|l| !l.usable.is_empty())
    }
}

/// The hosts one request names for an `override_host` cluster, consumed
/// one per pick across its tries (Envoy's `OverrideHostFilterState`).
#[derive(Debug, Default)]
pub struct OverrideHosts {
    addrs: Vec<SocketAddr>,
    next: usize,
    /// An ORIGINAL_DST cluster's destination for this request (the caller
    /// sets it from [`original_dst::OriginalDstHosts::destination`]).
    pub original_dst: Option<SocketAddr>,
}

impl OverrideHosts {
    /// The addresses named by `o`'s sources, in source order: a header's
    /// first value or a metadata string, split at commas (blank entries
    /// skipped, entries trimmed), as Envoy's `getSelectedHosts`. Envoy
    /// looks each up by its text in the host map (`ip:port`, IPv6 in
    /// brackets); an entry that is not an address in that canonical form
    /// can never match, so it is dropped here.
    pub fn of(
        o: &OverrideHost,
        headers: &http::HeaderMap,
        metadata: Option<&filters::DynamicMetadata>,
    ) -> OverrideHosts {
        let mut addrs = Vec::new();
        for src in &o.sources {
            let value: Option<std::borrow::Cow<'_, str>> = match src {
                OverrideHostSource::Header(name) => name
                    .as_ref()
                    .and_then(|n| headers.get(n))
                    .map(|v| String::from_utf8_lossy(v.as_bytes())),
                OverrideHostSource::Metadata { namespace, path } => {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    metadata
                        .and_then(|m| m.value(namespace, &path))
                        .and_then(|v| v.as_str())
                        .map(std::borrow::Cow::Borrowed)
                }
            };
            let Some(value) = value else { continue };
            for entry in value.split(',') {
                let entry = entry.trim_matches(|c: char| c.is_ascii_whitespace());
                if let Ok(a) = entry.parse::<SocketAddr>() {
                    if a.to_string() == entry {
                        addrs.push(a);
                    }
                }
            }
        }
        OverrideHosts {
            addrs,
            next: 0,
            original_dst: None,
        }
    }

    /// The next named host in `set`, consuming the entries up to it.
    fn next_in(&mut self, set: &HostSet) -> Option<Arc<Host>> {
        while let Some(a) = self.addrs.get(self.next) {
            self.next += 1;
            if let Some(i) = set.by_addr.get(a) {
                return set.hosts.get(*i).cloned();
            }
        }
        None
    }
}

/// Slow start bookkeeping of a new host set: a healthy host without a pass
/// time gets "now" (Envoy's `recalculateHostsInSlowStart`); returns when
/// the last host still in its window leaves it (0: none is).
fn slow_start_until(hosts: &[Arc<Host>], s: &SlowStart) -> u64 {
    let now = clock_ms();
    let window = s.window.as_millis() as u64;
    let mut until = 0;
    for h in hosts.iter().filter(|h| h.is_healthy()) {
        if h.last_pass() == 0 {
            h.since.store(now, Relaxed);
        }
        let t = h.last_pass();
        if now.saturating_sub(t) <= window {
            until = until.max(t + window);
        }
    }
    until
}

/// A weighted random pick among `usable` (indexes into `hosts`) by each
/// host's slow-start weight (divided by its requests in flight + 1 for
/// least request, Envoy's `hostWeight` with the default bias): what
/// Envoy's EDF schedule does while a host is in slow start. `None` when
/// every host has the same factor (hosts that started together): the
/// shares are then the usual ones, and the usual pick keeps its order.
fn slow_start_pick(
    hosts: &[Arc<Host>],
    usable: &[usize],
    s: &SlowStart,
    least_request: bool,
    now: u64,
) -> Option<usize> {
    let first = hosts[*usable.first()?].slow_start_factor(s, now);
    if usable
        .iter()
        .all(|i| hosts[*i].slow_start_factor(s, now) == first)
    {
        return None;
    }
    let weight = |i: usize| {
        let h = &hosts[i];
        let w = h.slow_start_weight(s, now);
        if least_request {
            w / (h.active.load(Relaxed) as f64 + 1.0)
        } else {
            w
        }
    };
    let total: f64 = usable.iter().map(|i| weight(*i)).sum();
    if total <= 0.0 {
        return Some(usable[rand::rng().random_range(0..usable.len())]);
    }
    let mut x = rand::rng().random::<f64>() * total;
    for i in usable {
        let w = weight(*i);
        if x < w {
            return Some(*i);
        }
        x -= w;
    }
    usable.last().copied()
}

/// The localities of one priority level's hosts `at` with a positive
/// effective weight (Envoy's `effectiveLocalityWeight`), in assignment
/// order, and their total.
fn locality_levels(
    hosts: &[Arc<Host>],
    at: &[usize],
    overprovisioning_factor: u32,
) -> (Vec<LocalityLevel>, f64) {
    let mut groups: Vec<(&hash_lb::LocalityKey, Vec<usize>)> = Vec::new();
    for i in at {
        let loc = &*hosts[*i].locality;
        match groups.iter_mut().find(|g| g.0 == loc) {
            Some(g) => g.1.push(*i),
            None => groups.push((loc, vec![*i])),
        }
    }
    let mut out = Vec::new();
    let mut total = 0.0;
    for (_, members) in groups {
        let usable: Vec<usize> = members
            .iter()
            .copied()
            .filter(|i| hosts[*i].is_healthy())
            .collect();
        let availability = usable.len() as f64 / members.len() as f64;
        // A locality named twice takes its last entry's weight (Envoy's map).
        let last = *members.last().expect("a group has members");
        let weight = f64::from(hosts[last].locality_weight)
            * (f64::from(overprovisioning_factor) / 100.0 * availability).min(1.0);
        if weight > 0.0 && !usable.is_empty() {
            total += weight;
            out.push(LocalityLevel {
                weighted: weighted_sequence(hosts, &usable),
                usable,
                weight,
            });
        }
    }
    (out, total)
}

/// A smooth weighted round-robin sequence over one weight period, when the
/// hosts' weights differ (empty otherwise).
fn weighted_sequence(hosts: &[Arc<Host>], usable: &[usize]) -> Vec<usize> {
    let weights_differ = usable
        .windows(2)
        .any(|w| hosts[w[0]].weight != hosts[w[1]].weight);
    let mut weighted = Vec::new();
    if weights_differ {
        let total: i64 = usable.iter().map(|i| i64::from(hosts[*i].weight)).sum();
        let mut current = vec![0i64; usable.len()];
        for _ in 0..total.min(10_000) {
            let mut best = 0;
            for (k, i) in usable.iter().enumerate() {
                current[k] += i64::from(hosts[*i].weight);
                if current[k] > current[best] {
                    best = k;
                }
            }
            current[best] -= total;
            weighted.push(usable[best]);
        }
    }
    weighted
}

/// Envoy-named stats of one cluster.
pub struct ClusterStats {
    pub upstream_rq_total: Arc<Counter>,
    pub upstream_rq_xx: [Arc<Counter>; 5],
    pub upstream_rq_time: Arc<Histogram>,
    pub upstream_rq_active: Arc<Gauge>,
    pub upstream_cx_total: Arc<Counter>,
    pub upstream_cx_active: Arc<Gauge>,
    pub upstream_cx_connect_fail: Arc<Counter>,
    pub upstream_cx_connect_timeout: Arc<Counter>,
    pub upstream_cx_connect_attempts_exceeded: Arc<Counter>,
    pub upstream_rq_timeout: Arc<Counter>,
    pub upstream_rq_per_try_timeout: Arc<Counter>,
    pub upstream_cx_http1_total: Arc<Counter>,
    pub upstream_cx_idle_timeout: Arc<Counter>,
    pub upstream_cx_http2_total: Arc<Counter>,
    pub upstream_rq_retry: Arc<Counter>,
    pub upstream_rq_retry_success: Arc<Counter>,
    pub upstream_rq_retry_limit_exceeded: Arc<Counter>,
    pub upstream_rq_pending_failure_eject: Arc<Counter>,
    pub upstream_cx_destroy_remote: Arc<Counter>,
    pub upstream_rq_pending_overflow: Arc<Counter>,
    pub upstream_rq_active_overflow: Arc<Counter>,
    pub upstream_cx_pool_overflow: Arc<Counter>,
    pub upstream_rq_pending_total: Arc<Counter>,
    pub upstream_rq_pending_active: Arc<Gauge>,
    pub upstream_cx_overflow: Arc<Counter>,
    pub upstream_rq_retry_overflow: Arc<Counter>,
    /// Internal redirects followed / not followed (`internal_redirect_policy`).
    pub upstream_internal_redirect_succeeded_total: Arc<Counter>,
    pub upstream_internal_redirect_failed_total: Arc<Counter>,
    pub membership_healthy: Arc<Gauge>,
    pub membership_total: Arc<Gauge>,
    /// Hosts picked from a level in panic (Envoy's `lb_healthy_panic`).
    pub lb_healthy_panic: Arc<Counter>,
    /// Zone-aware routing (Envoy's names): rebuilds of the routing state
    /// and why one found no zone routing, then per pick how it routed.
    pub lb_recalculate_zone_structures: Arc<Counter>,
    pub lb_zone_cluster_too_small: Arc<Counter>,
    pub lb_local_cluster_not_ok: Arc<Counter>,
    pub lb_zone_routing_all_directly: Arc<Counter>,
    pub lb_zone_routing_sampled: Arc<Counter>,
    pub lb_zone_routing_cross_zone: Arc<Counter>,
    pub lb_zone_no_capacity_left: Arc<Counter>,
    pub update_success: Arc<Counter>,
    pub update_failure: Arc<Counter>,
    /// An ORIGINAL_DST header or metadata value that is not `ip:port`
    /// (every cluster has it, as Envoy's).
    pub original_dst_host_invalid: Arc<Counter>,
}

impl ClusterStats {
    fn new(store: &Store, name: &str) -> Self {
        let c = |s: &str| store.counter(StatName::tagged("cluster", name, s, "envoy_cluster_name"));
        let g = |s: &str| store.gauge(StatName::tagged("cluster", name, s, "envoy_cluster_name"));
        ClusterStats {
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_xx: [
                c("upstream_rq_1xx"),
                c("upstream_rq_2xx"),
                c("upstream_rq_3xx"),
                c("upstream_rq_4xx"),
                c("upstream_rq_5xx"),
            ],
            upstream_rq_time: store.histogram(StatName::tagged(
                "cluster",
                name,
                "upstream_rq_time",
                "envoy_cluster_name",
            )),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: g("upstream_cx_active"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_cx_connect_attempts_exceeded: c("upstream_cx_connect_attempts_exceeded"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_per_try_timeout: c("upstream_rq_per_try_timeout"),
            upstream_cx_http1_total: c("upstream_cx_http1_total"),
            upstream_cx_idle_timeout: c("upstream_cx_idle_timeout"),
            upstream_cx_http2_total: c("upstream_cx_http2_total"),
            upstream_rq_retry: c("upstream_rq_retry"),
            upstream_rq_retry_success: c("upstream_rq_retry_success"),
            upstream_rq_retry_limit_exceeded: c("upstream_rq_retry_limit_exceeded"),
            upstream_rq_pending_failure_eject: c("upstream_rq_pending_failure_eject"),
            upstream_cx_destroy_remote: c("upstream_cx_destroy_remote"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_rq_active_overflow: c("upstream_rq_active_overflow"),
            // max_connection_pools is rejected: never written.
            upstream_cx_pool_overflow: c("upstream_cx_pool_overflow"),
            upstream_rq_pending_total: c("upstream_rq_pending_total"),
            upstream_rq_pending_active: g("upstream_rq_pending_active"),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_rq_retry_overflow: c("upstream_rq_retry_overflow"),
            upstream_internal_redirect_succeeded_total: c(
                "upstream_internal_redirect_succeeded_total",
            ),
            upstream_internal_redirect_failed_total: c("upstream_internal_redirect_failed_total"),
            membership_healthy: g("membership_healthy"),
            membership_total: g("membership_total"),
            lb_healthy_panic: c("lb_healthy_panic"),
            lb_recalculate_zone_structures: c("lb_recalculate_zone_structures"),
            lb_zone_cluster_too_small: c("lb_zone_cluster_too_small"),
            lb_local_cluster_not_ok: c("lb_local_cluster_not_ok"),
            lb_zone_routing_all_directly: c("lb_zone_routing_all_directly"),
            lb_zone_routing_sampled: c("lb_zone_routing_sampled"),
            lb_zone_routing_cross_zone: c("lb_zone_routing_cross_zone"),
            lb_zone_no_capacity_left: c("lb_zone_no_capacity_left"),
            update_success: c("update_success"),
            update_failure: c("update_failure"),
            original_dst_host_invalid: c("original_dst_host_invalid"),
        }
    }

    /// Counts a response status (`upstream_rq_2xx`, ...).
    pub fn record_status(&self, status: u16) {
        let i = (status / 100) as usize;
        if (1..=5).contains(&i) {
            self.upstream_rq_xx[i - 1].inc();
        }
    }
}

/// A cluster at run time.
pub struct ClusterRuntime {
    pub config: Arc<Cluster>,
    /// A transport is `internal_upstream`: requests pass their shared
    /// filter state to internal hosts.
    pub internal_transport: bool,
    /// The configuration last applied (`config` with newer EDS endpoints).
    pub applied: ArcSwap<Cluster>,
    pub hosts: ArcSwap<HostSet>,
    pub stats: ClusterStats,
    /// Circuit breakers (shared with this cluster's pools on every worker).
    pub breakers: Arc<circuit_breaker::CircuitBreakers>,
    /// `outlier_detection`, when configured.
    pub outlier: Option<outlier::Detector>,
    /// `health_checks`, when configured.
    pub health_check: Option<health_check::Checker>,
    /// The hosts of an ORIGINAL_DST cluster (made per destination).
    pub original_dst: Option<original_dst::OriginalDstHosts>,
    /// Serialises host-set rebuilds (EDS/DNS updates on the control
    /// thread, ejections from workers and the detector's timer).
    rebuild: std::sync::Mutex<()>,
    rr: AtomicUsize,
    /// Connection pools per worker shard, protocol and routing priority
    /// (index `priority * 2 + protocol`).
    pools: Box<[[OnceLock<Arc<Client>>; 4]]>,
    /// HTTP/2 tunnel connections of `tcp_proxy` `tunneling_config` (one
    /// pool for every worker, see `crate::tunnel`).
    pub tunnels: crate::tunnel::TunnelPool,
    /// TLS contexts for `transport_socket` (index 0) and each
    /// `transport_socket_matches` entry (1..); `None` = plaintext.
    transports: Vec<Option<Arc<crate::tls::ClientTls>>>,
    /// Upstream filters passed through (`weir.pass_through_filter.*`).
    _pass_through: crate::metrics::PassThroughStats,
    /// The upstream `istio.metadata_exchange` (cluster `filters`).
    pub mx: Option<Arc<filters::istio::mx::MetadataExchange>>,
    /// `ring_hash_lb.*` / `maglev_lb.*` gauges of a consistent-hash cluster.
    table_gauges: Option<TableGauges>,
    /// The node's locality (bootstrap `node.locality`), first in a
    /// locality-weighted hash ring as in Envoy.
    local_locality: Option<Arc<hash_lb::LocalityKey>>,
    /// Zone-aware routing: this cluster is the local cluster (publishes its
    /// hosts) or routes by zone against it.
    local: LocalRole,
}

/// A cluster's part in zone-aware routing.
#[derive(Clone, Default)]
pub enum LocalRole {
    #[default]
    None,
    /// `cluster_manager.local_cluster_name` names this cluster.
    Publisher(Arc<zone::LocalCluster>),
    /// Round robin, least request or random with a local cluster: routes
    /// priority 0 by zone (the node's locality).
    Subscriber(Arc<zone::LocalCluster>),
}

/// The node's locality, when it has one.
fn node_locality(n: &xds_client::config::Node) -> Option<Arc<hash_lb::LocalityKey>> {
    (!n.region.is_empty() || !n.zone.is_empty() || !n.sub_zone.is_empty()).then(|| {
        Arc::new(hash_lb::LocalityKey {
            region: n.region.clone(),
            zone: n.zone.clone(),
            sub_zone: n.sub_zone.clone(),
        })
    })
}

/// Envoy's consistent-hash gauges: `cluster.<c>.ring_hash_lb.{size,
/// min_hashes_per_host, max_hashes_per_host}` or `cluster.<c>.maglev_lb.
/// {min_entries_per_host, max_entries_per_host}`.
struct TableGauges {
    size: Option<Arc<Gauge>>,
    min: Arc<Gauge>,
    max: Arc<Gauge>,
}

impl TableGauges {
    fn new(store: &Store, cluster: &str, lb: &LbPolicy) -> Option<TableGauges> {
        let g = |s: &str| {
            store.gauge(StatName::tagged(
                "cluster",
                cluster,
                s,
                "envoy_cluster_name",
            ))
        };
        match lb {
            LbPolicy::RingHash(_) => Some(TableGauges {
                size: Some(g("ring_hash_lb.size")),
                min: g("ring_hash_lb.min_hashes_per_host"),
                max: g("ring_hash_lb.max_hashes_per_host"),
            }),
            LbPolicy::Maglev(_) => Some(TableGauges {
                size: None,
                min: g("maglev_lb.min_entries_per_host"),
                max: g("maglev_lb.max_entries_per_host"),
            }),
            _ => None,
        }
    }

    fn set(&self, t: hash_lb::TableStats) {
        if let Some(s) = &self.size {
            s.set(t.size as i64);
        }
        self.min.set(t.min_per_host as i64);
        self.max.set(t.max_per_host as i64);
    }
}

impl ClusterRuntime {
    pub fn new(
        config: Arc<Cluster>,
        store: &Store,
        workers: usize,
        tls: &TlsEnv,
        local_locality: Option<Arc<hash_lb::LocalityKey>>,
        local: LocalRole,
    ) -> Result<Arc<Self>, String> {
        // Consistent-hash balancers have no zone-aware routing (Envoy's).
        let local = match local {
            LocalRole::Subscriber(_) if config.lb.is_hash() => LocalRole::None,
            r => r,
        };
        let stats = ClusterStats::new(store, &config.stat_name);
        let breakers = Arc::new(circuit_breaker::CircuitBreakers::new(
            &config.circuit_breakers,
            store,
            &config.stat_name,
        ));
        // `cluster.<name>.ssl.*` exist only for clusters with a TLS
        // transport, as Envoy's (its TLS context creates them).
        let mut ssl: Option<Arc<crate::metrics::SslStats>> = None;
        let mut transports = Vec::new();
        for t in std::iter::once(&config.transport)
            .chain(config.transport_matches.iter().map(|m| &m.transport))
        {
            transports.push(match t.tls() {
                None => None,
                Some(t) => {
                    let ssl = ssl
                        .get_or_insert_with(|| {
                            Arc::new(crate::metrics::SslStats::new(store, |s| {
                                StatName::tagged(
                                    "cluster",
                                    &config.stat_name,
                                    &format!("ssl.{s}"),
                                    "envoy_cluster_name",
                                )
                            }))
                        })
                        .clone();
                    let c = crate::tls::ClientTls::new(
                        t.clone(),
                        tls.secrets.clone(),
                        ssl,
                        config.auto_san_validation,
                    )?;
                    tls.registry.add_client(&c);
                    Some(c)
                }
            });
        }
        let outlier = config
            .outlier_detection
            .map(|o| outlier::Detector::new(o, store, &config.stat_name));
        let hosts = static_hosts(&config);
        if let Some(d) = &outlier {
            attach_monitors(d, &hosts);
        }
        let health_check = config
            .health_check
            .clone()
            .map(|h| health_check::Checker::new(h, store, &config.stat_name));
        if let Some(ck) = &health_check {
            ck.attach(&hosts);
        }
        stats.membership_total.set(hosts.len() as i64);
        let mut set = HostSet::build_for(hosts, &config, local_locality.as_deref());
        set.zone = zone_routing(
            &set.hosts,
            &config,
            &local,
            local_locality.as_deref(),
            &stats,
        );
        if let LocalRole::Publisher(l) = &local {
            l.publish(zone::LocalCounts::of(&set.hosts));
        }
        stats.membership_healthy.set(set.healthy_count as i64);
        let table_gauges = TableGauges::new(store, &config.stat_name, &config.lb);
        if let (Some(g), Some(t)) = (&table_gauges, set.table_stats()) {
            g.set(t);
        }
        let pass_through =
            crate::metrics::PassThroughStats::new(store, config.pass_through.iter().copied());
        let mx = config.metadata_exchange.as_ref().map(|m| {
            Arc::new(filters::istio::mx::MetadataExchange::new(
                m.clone(),
                &filters::istio::local_node(),
                filters::istio::mx::MxStats::with(|n| store.counter(StatName::plain(n))),
            ))
        });
        let internal_transport = std::iter::once(&config.transport)
            .chain(config.transport_matches.iter().map(|m| &m.transport))
            .any(|t| t.internal().is_some());
        let original_dst = config.original_dst.clone().map(|o| {
            original_dst::OriginalDstHosts::new(
                o,
                config.name.clone(),
                stats.original_dst_host_invalid.clone(),
            )
        });
        let rt = Arc::new(ClusterRuntime {
            internal_transport,
            original_dst,
            mx,
            applied: ArcSwap::new(config.clone()),
            config,
            hosts: ArcSwap::from_pointee(set),
            stats,
            breakers,
            outlier,
            health_check,
            rebuild: std::sync::Mutex::new(()),
            rr: AtomicUsize::new(0),
            pools: (0..workers + 1)
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            tunnels: Default::default(),
            transports,
            _pass_through: pass_through,
            table_gauges,
            local_locality,
            local,
        });
        if let LocalRole::Subscriber(l) = &rt.local {
            l.subscribe(&rt);
        }
        Ok(rt)
    }

    /// The TLS context for connections to `host` (`None` = plaintext).
    pub fn tls_for(&self, host: &Host) -> Option<&Arc<crate::tls::ClientTls>> {
        self.transports
            .get(self.transport_index(host))
            .and_then(Option::as_ref)
    }

    /// The PROXY protocol header settings for connections to `host`, if
    /// its transport sends one.
    pub fn proxy_protocol_for(
        &self,
        host: &Host,
    ) -> Option<&Arc<xds_client::config::ProxyProtocolUpstream>> {
        self.transport_at(self.transport_index(host)).1
    }

    /// Where a request to `host` goes: its address and transport socket
    /// (SNI, ALPN override and PROXY protocol source unset).
    pub fn dest(&self, host: &Host) -> pool::Dest<'_> {
        // One metadata match for both halves of the transport.
        let (tls, pp) = self.transport_at(self.transport_index(host));
        pool::Dest {
            internal: host.internal.as_ref().map(|h| pool::InternalDest {
                host: h.clone(),
                shared: None,
            }),
            addr: host.addr,
            tls,
            proxy_protocol: pp.map(|p| &**p),
            // `auto_host_sni`: the endpoint's hostname; `auto_sni` from the
            // request replaces it (the caller's `sni`).
            sni: tls.and_then(|t| t.host_sni(&host.hostname)),
            alpn: None,
            source: None,
        }
    }

    /// The TLS context and PROXY protocol settings of active health check
    /// connections to `host`: its transport, or with
    /// `transport_socket_match_criteria` (`metadata`), the entry those
    /// criteria alone match (Envoy's `transportSocketMatchMetadata`).
    pub fn check_transport(
        &self,
        host: &Host,
        metadata: Option<&serde_json::Value>,
    ) -> (
        Option<&Arc<crate::tls::ClientTls>>,
        Option<&Arc<xds_client::config::ProxyProtocolUpstream>>,
    ) {
        self.transport_at(self.transport_index_of(metadata.unwrap_or(&host.metadata)))
    }

    /// The TLS context and PROXY protocol settings of transport `i` (see
    /// [`Self::transport_index`]).
    fn transport_at(
        &self,
        i: usize,
    ) -> (
        Option<&Arc<crate::tls::ClientTls>>,
        Option<&Arc<xds_client::config::ProxyProtocolUpstream>>,
    ) {
        let tls = self.transports.get(i).and_then(Option::as_ref);
        let pp = match i {
            0 => self.config.transport.proxy_protocol(),
            i => self.config.transport_matches[i - 1]
                .transport
                .proxy_protocol(),
        };
        (tls, pp)
    }

    /// 0: `transport_socket`; i > 0: `transport_socket_matches[i - 1]`.
    fn transport_index(&self, host: &Host) -> usize {
        self.transport_index_of(&host.metadata)
    }

    /// [`Self::transport_index`] for endpoint `metadata`.
    fn transport_index_of(&self, metadata: &serde_json::Value) -> usize {
        if self.config.transport_matches.is_empty() {
            return 0;
        }
        let t = self.config.transport_for(metadata);
        if std::ptr::eq(t, &self.config.transport) {
            0
        } else {
            1 + self
                .config
                .transport_matches
                .iter()
                .position(|m| std::ptr::eq(&m.transport, t))
                .unwrap_or(0)
        }
    }

    /// Replaces the host set (DNS refresh, EDS). Pooled connections to
    /// hosts that left close.
    pub fn set_hosts(&self, hosts: Vec<Arc<Host>>) {
        let keep: std::collections::HashSet<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
        self.tunnels.retain_hosts(&keep);
        for slots in self.pools.iter() {
            for slot in slots {
                if let Some(p) = slot.get() {
                    p.retain_hosts(&keep);
                }
            }
        }
        self.replace_hosts(hosts);
        self.stats.update_success.inc();
    }

    /// Replaces the host set, leaving the pools alone (ORIGINAL_DST hosts
    /// come and go with their own pool bookkeeping).
    fn replace_hosts(&self, hosts: Vec<Arc<Host>>) {
        let _serial = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = &self.outlier {
            attach_monitors(d, &hosts);
        }
        if let Some(ck) = &self.health_check {
            ck.attach(&hosts);
        }
        self.stats.membership_total.set(hosts.len() as i64);
        if self.config.slow_start.is_some() {
            // A host that stays keeps its slow-start clock (Envoy updates
            // the host in place).
            let old = self.hosts.load();
            let since: HashMap<SocketAddr, u64> = old
                .hosts
                .iter()
                .map(|h| (h.addr, h.since.load(Relaxed)))
                .collect();
            for h in &hosts {
                if let Some(t) = since.get(&h.addr) {
                    h.since.store(*t, Relaxed);
                }
            }
        }
        let set = self.build_set(hosts);
        self.stats.membership_healthy.set(set.healthy_count as i64);
        self.publish_table_stats(&set);
        self.hosts.store(Arc::new(set));
    }

    /// Rebuilds the host set after an ejection or un-ejection (the same
    /// hosts, their health changed).
    pub(crate) fn refresh_health(&self) {
        let _serial = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let hosts = self.hosts.load().hosts.clone();
        let set = self.build_set(hosts);
        self.stats.membership_healthy.set(set.healthy_count as i64);
        self.publish_table_stats(&set);
        self.hosts.store(Arc::new(set));
    }

    /// A host set over `hosts` with the last applied configuration's
    /// assignment policy (EDS may change it) and this runtime's LB.
    fn build_set(&self, hosts: Vec<Arc<Host>>) -> HostSet {
        let applied = self.applied.load();
        let mut set = HostSet::build_with(
            hosts,
            &LoadOptions::of(&applied),
            &self.config.lb,
            self.config.locality_weighted,
            self.local_locality.as_deref(),
        );
        set.zone = zone_routing(
            &set.hosts,
            &self.config,
            &self.local,
            self.local_locality.as_deref(),
            &self.stats,
        );
        if let LocalRole::Publisher(l) = &self.local {
            l.publish(zone::LocalCounts::of(&set.hosts));
        }
        set
    }

    /// An HTTP status from `host`, for outlier detection.
    #[inline]
    pub fn outlier_http(&self, host: &Host, status: u16) {
        if let (Some(d), Some(m)) = (&self.outlier, host.outlier.get()) {
            let ev = m.put_http(status, &d.config);
            if ev != 0 && d.on_events(m, ev) {
                self.refresh_health();
            }
        }
    }

    /// A local-origin result for `host`, for outlier detection.
    #[inline]
    pub fn outlier_local(&self, host: &Host, r: outlier::LocalResult) {
        if let (Some(d), Some(m)) = (&self.outlier, host.outlier.get()) {
            let ev = m.put_local(r, &d.config);
            if ev != 0 && d.on_events(m, ev) {
                self.refresh_health();
            }
        }
    }

    /// One outlier detection interval (control runtime).
    fn outlier_tick(&self) {
        if let Some(d) = &self.outlier {
            if d.tick(tokio::time::Instant::now()) {
                self.refresh_health();
            }
        }
    }

    /// Publishes a new host set's consistent-hash table gauges.
    fn publish_table_stats(&self, set: &HostSet) {
        if let (Some(g), Some(t)) = (&self.table_gauges, set.table_stats()) {
            g.set(t);
        }
    }

    /// Picks a host by the request's hash (route `hash_policy`) on a
    /// consistent-hash cluster, as Envoy's thread-aware load balancer: no
    /// hash is a random one; the priority level is chosen by the hash too;
    /// `attempts` more picks (moving along the ring, perturbing the Maglev
    /// hash) while the host is one of `avoid`. Other policies ignore
    /// `hash`.
    pub fn choose_hashed(
        &self,
        hash: Option<u64>,
        avoid: &[SocketAddr],
        attempts: u32,
    ) -> Option<Arc<Host>> {
        if !self.config.lb.is_hash() {
            return self.choose(avoid, attempts);
        }
        let set = self.hosts.load();
        let h = hash.unwrap_or_else(|| rand::rng().random());
        let level = set.level_for_hash(h)?;
        if level.panic {
            self.stats.lb_healthy_panic.inc();
        }
        let (table, _) = level.table.as_ref()?;
        let mut pick = None;
        for attempt in 0..=attempts {
            let mut i = table.choose(h, attempt)?;
            if let Some(f) = self.config.hash_balance_factor {
                let cluster_active = self.stats.upstream_rq_active.value().max(0) as u64;
                i = hash_lb::bounded_pick(i, h, f, &level.normalized, cluster_active, |k| {
                    set.hosts[k].active.load(Relaxed)
                });
            }
            let host = set.hosts.get(i)?;
            pick = Some(host.clone());
            if !avoid.contains(&host.addr) {
                break;
            }
        }
        pick
    }

    /// Picks a host for one try of a request: the next host the request
    /// names when the cluster has the `override_host` policy (whatever its
    /// health, with no retry host predicate, as Envoy), else the cluster's
    /// (fallback) policy as [`ClusterRuntime::choose_hashed`].
    pub fn choose_request(
        &self,
        hash: Option<u64>,
        overrides: &mut OverrideHosts,
        avoid: &[SocketAddr],
        attempts: u32,
    ) -> Option<Arc<Host>> {
        if self.original_dst.is_some() {
            return self.original_dst_host_at(overrides.original_dst?);
        }
        if overrides.next < overrides.addrs.len() {
            if let Some(h) = overrides.next_in(&self.hosts.load()) {
                return Some(h);
            }
        }
        self.choose_hashed(hash, avoid, attempts)
    }

    /// The hosts a request names for this cluster (none without the
    /// `override_host` policy).
    /// `override_host` `selected_host_key`: writes the picked host's
    /// `ip:port` into the stream's dynamic metadata at the key's path
    /// (objects made along it), at every pick, as Envoy 1.40.
    pub fn record_selected_host(&self, md: &mut filters::DynamicMetadata, addr: SocketAddr) {
        let Some((ns, path)) = self
            .config
            .override_host
            .as_ref()
            .and_then(|o| o.selected_host_key.as_ref())
        else {
            return;
        };
        let Some((last, parents)) = path.split_last() else {
            return;
        };
        let mut m = md.namespace_mut(ns);
        for k in parents {
            let v = m
                .entry(k.clone())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !v.is_object() {
                *v = serde_json::Value::Object(Default::default());
            }
            let serde_json::Value::Object(next) = v else {
                return;
            };
            m = next;
        }
        m.insert(last.clone(), serde_json::Value::String(addr.to_string()));
    }

    pub fn override_hosts(
        &self,
        headers: &http::HeaderMap,
        metadata: Option<&filters::DynamicMetadata>,
    ) -> OverrideHosts {
        match &self.config.override_host {
            Some(o) => OverrideHosts::of(o, headers, metadata),
            None => OverrideHosts::default(),
        }
    }

    /// Picks a host; `avoid` lists hosts tried already (previous_hosts).
    /// An ORIGINAL_DST cluster has nothing to balance: no host without a
    /// destination ([`ClusterRuntime::original_dst_host`]).
    pub fn choose(&self, avoid: &[SocketAddr], attempts: u32) -> Option<Arc<Host>> {
        if self.original_dst.is_some() {
            return None;
        }
        if self.config.lb.is_hash() {
            // No request hash here (TCP, xDS): a random point, as Envoy.
            return self.choose_hashed(None, avoid, attempts);
        }
        let set = self.hosts.load();
        set.level()?;
        let pick = || -> Option<Arc<Host>> {
            let level = set.level().expect("checked above: a level has hosts");
            if level.panic {
                self.stats.lb_healthy_panic.inc();
                if self.config.fail_traffic_on_panic {
                    return None;
                }
            }
            let (usable, weighted) = match self.zone_source(&set, level) {
                ZonePick::Hosts(u, w) => (u, w),
                ZonePick::Fail => return None,
                ZonePick::Level => level.source(),
            };
            // A locality picked by zone may have no healthy host left (as
            // Envoy: no host).
            if usable.is_empty() {
                return None;
            }
            if let Some(s) = &self.config.slow_start {
                let now = clock_ms();
                if now < set.slow_until {
                    let lr = matches!(self.config.lb, LbPolicy::LeastRequest { .. });
                    if let Some(i) = slow_start_pick(&set.hosts, usable, s, lr, now) {
                        return Some(set.hosts[i].clone());
                    }
                }
            }
            let idx = match self.config.lb {
                LbPolicy::RoundRobin => {
                    let n = self.rr.fetch_add(1, Relaxed);
                    if weighted.is_empty() {
                        usable[n % usable.len()]
                    } else {
                        weighted[n % weighted.len()]
                    }
                }
                LbPolicy::Random | LbPolicy::RingHash(_) | LbPolicy::Maglev(_) => {
                    usable[rand::rng().random_range(0..usable.len())]
                }
                LbPolicy::LeastRequest { choice_count } => {
                    let mut rng = rand::rng();
                    let mut best = usable[rng.random_range(0..usable.len())];
                    for _ in 1..choice_count {
                        let c = usable[rng.random_range(0..usable.len())];
                        if set.hosts[c].active.load(Relaxed) < set.hosts[best].active.load(Relaxed)
                        {
                            best = c;
                        }
                    }
                    best
                }
            };
            Some(set.hosts[idx].clone())
        };
        let mut h = pick()?;
        for _ in 0..attempts {
            if !avoid.contains(&h.addr) {
                break;
            }
            h = pick()?;
        }
        Some(h)
    }

    /// Zone-aware routing for one pick from `level` (Envoy's
    /// `hostSourceToUse` after the panic and locality-weighted checks):
    /// priority 0 only, in `routing_enabled` percent of picks, not while
    /// the local cluster is in panic.
    fn zone_source<'a>(&self, set: &'a HostSet, level: &'a PriorityLevel) -> ZonePick<'a> {
        let Some(z) = set.zone.as_ref() else {
            return ZonePick::Level;
        };
        if level.panic
            || self.config.locality_weighted
            || !set
                .priorities
                .first()
                .is_some_and(|p0| std::ptr::eq(p0, level))
        {
            return ZonePick::Level;
        }
        if rand::rng().random_range(0..100u32) >= z.cfg.routing_enabled {
            return ZonePick::Level;
        }
        if z.local_panic {
            self.stats.lb_local_cluster_not_ok.inc();
            return if self.config.fail_traffic_on_panic {
                ZonePick::Fail
            } else {
                ZonePick::Level
            };
        }
        let l = z.choose_locality(&self.stats);
        ZonePick::Hosts(&l.usable, &l.weighted)
    }

    /// Takes over `old`'s pools (keeping connections to `hosts` only; for
    /// DNS clusters the host set comes later and trims them then).
    fn adopt_pools(&self, old: &ClusterRuntime, hosts: &[Arc<Host>]) {
        let keep: std::collections::HashSet<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
        let dns = matches!(
            self.config.discovery,
            Discovery::StrictDns | Discovery::LogicalDns
        );
        for (new, old) in self.pools.iter().zip(old.pools.iter()) {
            for (n, o) in new.iter().zip(old.iter()) {
                if let Some(p) = o.get() {
                    if !dns {
                        p.retain_hosts(&keep);
                    }
                    let _ = n.set(p.clone());
                }
            }
        }
    }

    /// This worker's pool for `kind` at the DEFAULT routing priority.
    pub fn pool(&self, kind: PoolKind) -> &Arc<Client> {
        self.pool_at(kind, xds_client::config::RoutingPriority::Default)
    }

    /// This worker's pool for `kind` and a route's priority.
    pub fn pool_at(
        &self,
        kind: PoolKind,
        priority: xds_client::config::RoutingPriority,
    ) -> &Arc<Client> {
        let shard = crate::stats_shard();
        let slot = &self.pools[shard % self.pools.len()][priority as usize * 2 + kind as usize];
        slot.get_or_init(|| {
            let pool = Arc::new(
                pool::build(
                    &self.config,
                    kind,
                    priority,
                    &self.stats,
                    self.breakers.clone(),
                )
                .with_metadata_exchange(self.mx.clone()),
            );
            // Close idle connections past the idle timeout, on this worker;
            // with PROXY protocol (keys per downstream connection) forget
            // the keys whose connections are gone, timeout or not.
            let pp = std::iter::once(&self.config.transport)
                .chain(self.config.transport_matches.iter().map(|m| &m.transport))
                .any(|t| t.proxy_protocol().is_some());
            let period = match self.config.idle_timeout {
                Some(t) => Some(t / 2),
                None if pp => Some(Duration::from_secs(60)),
                None => None,
            };
            if let Some(t) = period {
                let weak = Arc::downgrade(&pool);
                if tokio::runtime::Handle::try_current().is_ok() {
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(t.max(Duration::from_millis(100))).await;
                            match weak.upgrade() {
                                Some(p) => p.sweep(),
                                None => return,
                            }
                        }
                    });
                }
            }
            pool
        })
    }

    /// Which pool a request uses.
    pub fn pool_kind(&self, downstream_h2: bool) -> PoolKind {
        match self.config.protocol {
            UpstreamProtocol::Http2 => PoolKind::Http2,
            UpstreamProtocol::UseDownstream if downstream_h2 => PoolKind::Http2,
            _ => PoolKind::Http1,
        }
    }
}

/// What zone-aware routing makes of one pick.
enum ZonePick<'a> {
    /// A locality's healthy hosts (and their weighted sequence).
    Hosts(&'a [usize], &'a [usize]),
    /// No host (`fail_traffic_on_panic` with the local cluster in panic).
    Fail,
    /// The level's hosts, as without zone-aware routing.
    Level,
}

/// The zone-aware routing of a new host set of a cluster that routes by
/// zone (`None` otherwise, or when Envoy's checks rule it out).
fn zone_routing(
    hosts: &[Arc<Host>],
    config: &Cluster,
    role: &LocalRole,
    node: Option<&hash_lb::LocalityKey>,
    stats: &ClusterStats,
) -> Option<zone::ZoneRouting> {
    let LocalRole::Subscriber(l) = role else {
        return None;
    };
    let local = l.counts();
    // Without a node locality Envoy's local locality is the empty one.
    let none = hash_lb::LocalityKey::default();
    zone::ZoneRouting::build(
        hosts,
        &zone::ZoneInputs {
            local: &local,
            node: node.unwrap_or(&none),
            cfg: config.zone_aware,
            panic_threshold: config.panic_threshold,
            stats,
        },
    )
}

/// Whether connections pooled for one version of a cluster are right for
/// another: same protocol, transport (TLS contexts), timeouts and limits.
fn same_pool_settings(a: &Cluster, b: &Cluster) -> bool {
    a.protocol == b.protocol
        && a.http2 == b.http2
        && a.transport == b.transport
        && a.transport_matches == b.transport_matches
        && a.connect_timeout == b.connect_timeout
        && a.idle_timeout == b.idle_timeout
        && a.max_requests_per_connection == b.max_requests_per_connection
        && a.tcp_keepalive == b.tcp_keepalive
        && a.buffer_limit == b.buffer_limit
        && a.auto_sni == b.auto_sni
        && a.auto_san_validation == b.auto_san_validation
        && a.auto_sni_header == b.auto_sni_header
        && a.metadata_exchange == b.metadata_exchange
        // Adopted pools keep counting against their breakers.
        && a.circuit_breakers == b.circuit_breakers
}

/// Whether two versions of a cluster differ only in their endpoints.
fn same_but_endpoints(a: &Cluster, b: &Cluster) -> bool {
    let mut a = a.clone();
    a.localities = b.localities.clone();
    a.overprovisioning_factor = b.overprovisioning_factor;
    a.weighted_priority_health = b.weighted_priority_health;
    a == *b
}

/// Gives each host its outlier monitor (kept per address across host-set
/// changes).
fn attach_monitors(d: &outlier::Detector, hosts: &[Arc<Host>]) {
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
    for (h, m) in hosts.iter().zip(d.monitors_for(&addrs)) {
        let _ = h.outlier.set(m);
    }
}

/// Runs the outlier detector's interval timer until the runtime is gone
/// (on the control runtime).
pub async fn outlier_loop(weak: std::sync::Weak<ClusterRuntime>) {
    let Some(interval) = weak
        .upgrade()
        .and_then(|c| c.outlier.as_ref().map(|d| d.config.interval))
    else {
        return;
    };
    loop {
        tokio::time::sleep(interval).await;
        match weak.upgrade() {
            Some(c) => c.outlier_tick(),
            None => return,
        }
    }
}

/// Starts the control-runtime tasks a new cluster runtime needs: DNS
/// refresh for DNS clusters, the outlier detection timer.
pub fn spawn_control_tasks(c: &Arc<ClusterRuntime>) {
    if matches!(
        c.config.discovery,
        Discovery::StrictDns | Discovery::LogicalDns
    ) {
        tokio::spawn(dns::refresh_loop(Arc::downgrade(c)));
    }
    if c.outlier.is_some() {
        tokio::spawn(outlier_loop(Arc::downgrade(c)));
    }
    if c.original_dst.is_some() {
        tokio::spawn(original_dst::original_dst_loop(Arc::downgrade(c)));
    }
    if let Some(ck) = &c.health_check {
        ck.start(Arc::downgrade(c), &c.hosts.load().hosts);
    }
}

/// The hosts of a STATIC or EDS cluster (DNS clusters resolve later).
fn static_hosts(c: &Cluster) -> Vec<Arc<Host>> {
    if !matches!(c.discovery, Discovery::Static | Discovery::Eds) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for l in c.localities.iter() {
        let locality = Arc::new(hash_lb::LocalityKey {
            region: l.region.clone(),
            zone: l.zone.clone(),
            sub_zone: l.sub_zone.clone(),
        });
        for e in &l.endpoints {
            let (addr, internal) = match &e.address {
                EndpointAddress::Ip(addr) => (*addr, None),
                EndpointAddress::Internal {
                    listener,
                    endpoint_id,
                } => {
                    let t = crate::internal::InternalTarget {
                        listener: listener.clone(),
                        endpoint_id: endpoint_id.clone(),
                    };
                    let addr = t.stand_in();
                    (
                        addr,
                        Some(Arc::new(crate::internal::InternalHost::new(
                            t,
                            c,
                            &e.metadata,
                        ))),
                    )
                }
                EndpointAddress::Dns(..) | EndpointAddress::Pipe(_) => continue,
            };
            {
                out.push(Arc::new(Host {
                    addr,
                    internal,
                    hostname: e.hostname.clone(),
                    weight: e.weight,
                    healthy: e.health.is_usable(),
                    priority: l.priority,
                    locality: locality.clone(),
                    locality_weight: l.weight.unwrap_or(0),
                    metadata: e.metadata.clone(),
                    active: AtomicU64::new(0),
                    outlier: OnceLock::new(),
                    active_hc: OnceLock::new(),
                    since: AtomicU64::new(0),
                }));
            }
        }
    }
    out
}

/// The clusters by name, hashed with the pool's seeded hasher: every
/// request looks its cluster up once, and SipHash cost ~160 instructions.
pub type ClusterMap = HashMap<Arc<str>, Arc<ClusterRuntime>, pool::KeyHash>;

/// All clusters of the current snapshot. The map is swapped whole on a
/// configuration change; a request pins the runtime it picked.
pub struct ClusterManager {
    pub clusters: ArcSwap<ClusterMap>,
    /// `cluster_manager.local_cluster_name` and the hosts it publishes
    /// (static: fixed by the bootstrap).
    local: Option<(Arc<str>, Arc<zone::LocalCluster>)>,
}

/// What building TLS contexts needs: the secrets and the registry.
pub struct TlsEnv {
    pub secrets: crate::tls::server::Secrets,
    pub registry: Arc<crate::tls::Registry>,
}

impl ClusterManager {
    pub fn new(
        snapshot: &xds_client::config::Snapshot,
        store: &Store,
        workers: usize,
        tls: &TlsEnv,
    ) -> Result<Self, String> {
        let local = snapshot
            .local_cluster
            .clone()
            .map(|n| (n, Arc::new(zone::LocalCluster::default())));
        let mut m = ClusterManager {
            clusters: ArcSwap::from_pointee(ClusterMap::with_hasher(pool::KeyHash::new())),
            local,
        };
        let mut clusters = ClusterMap::with_hasher(pool::KeyHash::new());
        // The local cluster first: the others route against its hosts.
        let mut order: Vec<_> = snapshot.clusters.iter().collect();
        order.sort_by_key(|(k, _)| Some(*k) != m.local.as_ref().map(|l| &l.0));
        for (k, c) in order {
            clusters.insert(
                k.clone(),
                ClusterRuntime::new(
                    c.clone(),
                    store,
                    workers,
                    tls,
                    node_locality(&snapshot.node),
                    m.role(k),
                )?,
            );
        }
        m.clusters = ArcSwap::from_pointee(clusters);
        Ok(m)
    }

    /// Cluster `name`'s part in zone-aware routing.
    fn role(&self, name: &str) -> LocalRole {
        match &self.local {
            None => LocalRole::None,
            Some((n, l)) if &**n == name => LocalRole::Publisher(l.clone()),
            Some((_, l)) => LocalRole::Subscriber(l.clone()),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.clusters.load().get(name).cloned()
    }

    /// Applies a new snapshot's clusters: an unchanged cluster keeps its
    /// runtime (pools, stats, LB state); one whose only change is its
    /// endpoints (EDS) keeps its runtime and gets the new host set; others
    /// are built anew (the old runtime's pooled connections close when the
    /// last request using it finishes). `only`: the names of the clusters
    /// that may have changed, when the caller knows every other one is the
    /// same (an EDS update); the map is then swapped only if a runtime
    /// had to be built anew. Returns the new runtimes that need control
    /// tasks (DNS resolution, the outlier detection timer).
    pub fn apply(
        &self,
        snapshot: &xds_client::config::Snapshot,
        only: Option<&std::collections::BTreeSet<Arc<str>>>,
        store: &Store,
        workers: usize,
        tls: &TlsEnv,
    ) -> Vec<Arc<ClusterRuntime>> {
        let old = self.clusters.load_full();
        let local = node_locality(&snapshot.node);
        let mut fresh = Vec::new();
        let mut build = |name: &Arc<str>, c: &Arc<Cluster>| {
            Self::build(
                &old,
                name,
                c,
                store,
                workers,
                tls,
                &local,
                self.role(name),
                &mut fresh,
            )
        };
        if let Some(names) = only {
            let mut next: Option<ClusterMap> = None;
            for name in names {
                let Some(c) = snapshot.clusters.get(name) else {
                    continue;
                };
                if let Some(rt) = build(name, c) {
                    next.get_or_insert_with(|| (*old).clone())
                        .insert(name.clone(), rt);
                }
            }
            if let Some(next) = next {
                self.clusters.store(Arc::new(next));
            }
            return fresh;
        }
        let mut next = ClusterMap::with_capacity_and_hasher(snapshot.clusters.len(), *old.hasher());
        for (name, c) in &snapshot.clusters {
            match build(name, c) {
                Some(rt) => {
                    next.insert(name.clone(), rt);
                }
                None => {
                    if let Some(rt) = old.get(name) {
                        next.insert(name.clone(), rt.clone());
                    }
                }
            }
        }
        self.clusters.store(Arc::new(next));
        fresh
    }

    /// Brings cluster `name` to configuration `c`: `None` when its running
    /// runtime stays (unchanged, updated in place, or kept because the new
    /// one cannot be built), else the new runtime (pushed to `fresh` too
    /// when it needs DNS resolution).
    #[allow(clippy::too_many_arguments)]
    fn build(
        old: &ClusterMap,
        name: &Arc<str>,
        c: &Arc<Cluster>,
        store: &Store,
        workers: usize,
        tls: &TlsEnv,
        local: &Option<Arc<hash_lb::LocalityKey>>,
        role: LocalRole,
        fresh: &mut Vec<Arc<ClusterRuntime>>,
    ) -> Option<Arc<ClusterRuntime>> {
        if let Some(rt) = old.get(name) {
            let applied = rt.applied.load_full();
            if Arc::ptr_eq(&applied, c) || *applied == **c {
                return None;
            }
            if rt.config.discovery == Discovery::Eds && same_but_endpoints(&applied, c) {
                // `applied` first: the new host set takes its assignment
                // policy (overprovisioning factor, weighted health).
                rt.applied.store(c.clone());
                rt.set_hosts(static_hosts(c));
                return None;
            }
        }
        match ClusterRuntime::new(c.clone(), store, workers, tls, local.clone(), role) {
            Ok(rt) => {
                // A changed cluster whose connection settings are the
                // same keeps its pooled connections (to the endpoints
                // that remain).
                if let Some(old_rt) = old.get(name) {
                    if same_pool_settings(&old_rt.config, c) {
                        rt.adopt_pools(old_rt, &static_hosts(c));
                    }
                }
                if !matches!(c.discovery, Discovery::Static | Discovery::Eds)
                    || rt.outlier.is_some()
                    || rt.health_check.is_some()
                {
                    fresh.push(rt.clone());
                }
                Some(rt)
            }
            Err(e) => {
                tracing::error!(target: "config", cluster = %name, "cannot build cluster: {e}");
                None
            }
        }
    }

    /// Resolves DNS clusters once (startup warming, bounded by `timeout`).
    pub async fn warm(&self, timeout: Duration) {
        let all = self.clusters.load_full();
        let futs = all
            .values()
            .filter(|c| {
                matches!(
                    c.config.discovery,
                    Discovery::StrictDns | Discovery::LogicalDns
                )
            })
            .map(|c| dns::refresh_once(c.clone()));
        let _ = tokio::time::timeout(timeout, futures_util::future::join_all(futs)).await;
    }

    /// Spawns periodic DNS refresh and outlier detection timers on the
    /// current (control) runtime.
    pub fn spawn_dns_refresh(&self) {
        for c in self.clusters.load().values() {
            spawn_control_tasks(c);
        }
    }
}

/// Why a timed upstream TCP connect failed.
#[derive(Debug)]
pub(crate) enum TcpConnectError {
    /// The OS error's text without its code: "Connection refused".
    Io(String),
    /// `connect_timeout` passed.
    Timeout,
}

impl std::fmt::Display for TcpConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => f.write_str(e),
            Self::Timeout => f.write_str("connect timeout"),
        }
    }
}

/// TCP to an upstream host within `timeout`, with `TCP_NODELAY` and the
/// cluster's keepalive set. A failure counts `fail` (Envoy's
/// `upstream_cx_connect_fail`) and, on timeout, `timed_out`
/// (`upstream_cx_connect_timeout`). One helper for the pools, tcp_proxy,
/// CONNECT termination and tunnels.
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<&xds_client::config::TcpKeepalive>,
    fail: &Counter,
    timed_out: &Counter,
) -> Result<tokio::net::TcpStream, TcpConnectError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            if let Some(k) = keepalive {
                set_keepalive(&tcp, k);
            }
            Ok(tcp)
        }
        Ok(Err(e)) => {
            fail.inc();
            // "Connection refused (os error 111)" -> "Connection refused".
            let text = e.to_string();
            Err(TcpConnectError::Io(
                text.split(" (os error").next().unwrap_or(&text).to_owned(),
            ))
        }
        Err(_) => {
            fail.inc();
            timed_out.inc();
            Err(TcpConnectError::Timeout)
        }
    }
}

/// `upstream_connection_options.tcp_keepalive` on a new upstream socket.
pub fn set_keepalive(stream: &tokio::net::TcpStream, k: &xds_client::config::TcpKeepalive) {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(t);
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(i);
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

#[cfg(test)]
mod tests {
    //! Priority loads and slow start bookkeeping, against the numbers
    //! Envoy's `LoadBalancerBase` computes for the same host sets.
    use super::*;

    /// Hosts per level: (weight, healthy) each.
    fn set(levels: &[&[(u32, bool)]], opts: LoadOptions) -> HostSet {
        let mut hosts = Vec::new();
        let mut port = 1000;
        for (prio, level) in levels.iter().enumerate() {
            for (weight, healthy) in level.iter() {
                port += 1;
                hosts.push(Arc::new(Host {
                    weight: *weight,
                    healthy: *healthy,
                    priority: prio as u32,
                    ..Host::test(SocketAddr::from(([127, 0, 0, 1], port)))
                }));
            }
        }
        HostSet::build_with(hosts, &opts, &LbPolicy::RoundRobin, false, None)
    }

    fn opts(panic_threshold: f64) -> LoadOptions {
        LoadOptions {
            panic_threshold,
            overprovisioning_factor: 140,
            weighted_priority_health: false,
            slow_start: None,
            by_addr: false,
        }
    }

    fn loads(s: &HostSet) -> Vec<(u32, bool)> {
        s.priorities.iter().map(|l| (l.load, l.panic)).collect()
    }

    #[test]
    fn priority_loads_follow_envoys_integer_health() {
        let h = (1, true);
        let u = (1, false);
        // 46% healthy P0 (1 of 3 × 1.4), the rest to P1; no panic while
        // the total is 100, so P0 keeps only its healthy host.
        let s = set(&[&[h, u, u], &[h, h]], opts(50.0));
        assert_eq!(loads(&s), vec![(46, false), (54, false)]);
        assert_eq!(s.priorities[0].usable.len(), 1);
        // Health 14 / 28 / 14 (normalised 56) scales to 25 / 50 / 25.
        let tenth = |n: usize| {
            let mut v = vec![u; 10];
            v[..n].fill(h);
            v
        };
        let s = set(&[&tenth(1), &tenth(2), &tenth(1)], opts(0.0));
        assert_eq!(loads(&s), vec![(25, false), (50, false), (25, false)]);
        // 46 + 46 + 35 caps at 100: the last level gets what is left.
        let s = set(&[&[h, u, u], &[h, u, u], &[h, u, u, u]], opts(0.0));
        assert_eq!(loads(&s), vec![(46, false), (46, false), (8, false)]);
        // Every level in panic: the load follows host counts (4:2 is
        // 66 + 33, the remainder to P0).
        let s = set(&[&[h, u, u, u], &[u, u]], opts(50.0));
        assert_eq!(loads(&s), vec![(67, true), (33, true)]);
        assert_eq!(s.priorities[1].usable.len(), 2);
        // weighted_priority_health: 1 of 4 by weight is 35%.
        let mut o = opts(50.0);
        o.weighted_priority_health = true;
        let s = set(&[&[(1, true), (3, false)], &[h]], o);
        assert_eq!(loads(&s), vec![(35, false), (65, false)]);
        let s = set(&[&[(1, true), (3, false)], &[h]], opts(50.0));
        assert_eq!(loads(&s), vec![(70, false), (30, false)]);
    }

    #[test]
    fn slow_start_clock_starts_for_healthy_hosts_only() {
        let mut o = opts(50.0);
        o.slow_start = Some(SlowStart {
            window: Duration::from_secs(30),
            aggression: 1.0,
            min_weight: 0.1,
        });
        let s = set(&[&[(1, true), (1, false)]], o);
        assert!(s.slow_until > clock_ms());
        assert_ne!(s.hosts[0].since.load(Relaxed), 0);
        assert_eq!(s.hosts[1].since.load(Relaxed), 0);
        // Just started: weighed at the 10% floor; unhealthy: unscaled.
        let now = clock_ms();
        let s0 = o.slow_start.expect("set");
        assert!((s.hosts[0].slow_start_weight(&s0, now) - 0.1).abs() < 1e-9);
        assert_eq!(s.hosts[1].slow_start_weight(&s0, now), 1.0);
        // Past the window: full weight.
        let later = s.hosts[0].since.load(Relaxed) + 30_000;
        assert_eq!(s.hosts[0].slow_start_weight(&s0, later), 1.0);
    }
}
