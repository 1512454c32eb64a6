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
use xds_client::config::{Cluster, Discovery, EndpointAddress, LbPolicy, UpstreamProtocol};

use crate::stats::{Counter, Gauge, Histogram, StatName, Store};

pub mod callout;
pub mod circuit_breaker;
pub mod dns;
pub mod hash_lb;
pub mod health_check;
pub mod outlier;
pub mod pool;

pub use pool::{Client, PoolError, PoolKind};

/// One upstream host.
#[derive(Debug)]
pub struct Host {
    pub addr: SocketAddr,
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
}

impl Host {
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
}

/// The hosts of a cluster at one moment; replaced whole on DNS changes.
#[derive(Debug, Default)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    /// Per priority level (ascending), the hosts to balance over and the
    /// share of traffic (percent) the level takes.
    pub priorities: Vec<PriorityLevel>,
    pub healthy_count: usize,
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
    /// Builds the set as Envoy's load balancer sees it: each level's health
    /// (healthy share × overprovisioning factor, capped at 100%) takes
    /// traffic in priority order; what is left spills to the next level; a
    /// level below the panic threshold balances over all its hosts.
    pub fn build(
        hosts: Vec<Arc<Host>>,
        panic_threshold: f64,
        overprovisioning_factor: u32,
        lb: &LbPolicy,
        locality_weighted: bool,
        local: Option<&hash_lb::LocalityKey>,
    ) -> HostSet {
        let healthy_count = hosts.iter().filter(|h| h.is_healthy()).count();
        let mut prios: Vec<u32> = hosts.iter().map(|h| h.priority).collect();
        prios.sort_unstable();
        prios.dedup();
        let mut levels = Vec::new();
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
            let pct = 100.0 * healthy.len() as f64 / at.len() as f64;
            health.push((pct * f64::from(overprovisioning_factor) / 100.0).min(100.0));
            // No healthy host at all is panic too, even at a 0% threshold
            // (Envoy 1.40 still routes when outlier detection ejected
            // every host).
            let panic = pct < panic_threshold || healthy.is_empty();
            let (localities, locality_total) = if locality_weighted && !lb.is_hash() {
                locality_levels(&hosts, &at, overprovisioning_factor)
            } else {
                (Vec::new(), 0.0)
            };
            let usable = if panic { at.clone() } else { healthy };
            let (weighted, table) = if lb.is_hash() && locality_weighted {
                let n = hash_lb::normalize_localities(&hosts, &at, panic, local);
                (
                    Vec::new(),
                    hash_lb::HashTable::build_weighted(lb, &hosts, &n),
                )
            } else if lb.is_hash() {
                (Vec::new(), hash_lb::HashTable::build(lb, &hosts, &usable))
            } else {
                (weighted_sequence(&hosts, &usable), None)
            };
            levels.push(PriorityLevel {
                usable,
                weighted,
                load: 0,
                panic,
                table,
                localities,
                locality_total,
            });
        }
        let total: f64 = health.iter().sum();
        if total <= 0.0 {
            // Nothing healthy anywhere: everything goes to the first level (panic).
            if let Some(l) = levels.first_mut() {
                l.load = 100;
            }
        } else {
            let mut remaining = 100.0;
            let mut loads: Vec<f64> = health
                .iter()
                .map(|h| {
                    let l = h.min(remaining);
                    remaining -= l;
                    l
                })
                .collect();
            if total < 100.0 {
                // Not enough healthy capacity in all levels: scale up (Envoy
                // normalises the priority load to 100%).
                loads = health.iter().map(|h| h * 100.0 / total).collect();
            }
            // Integer percents that sum to exactly 100.
            let mut assigned = 0u32;
            let n = levels.len();
            for (i, l) in levels.iter_mut().enumerate() {
                l.load = if i + 1 == n {
                    100 - assigned
                } else {
                    loads[i].round() as u32
                };
                l.load = l.load.min(100 - assigned);
                assigned += l.load;
            }
        }
        HostSet {
            hosts,
            priorities: levels,
            healthy_count,
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
    pub update_success: Arc<Counter>,
    pub update_failure: Arc<Counter>,
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
            update_success: c("update_success"),
            update_failure: c("update_failure"),
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
    /// Serialises host-set rebuilds (EDS/DNS updates on the control
    /// thread, ejections from workers and the detector's timer).
    rebuild: std::sync::Mutex<()>,
    rr: AtomicUsize,
    /// Connection pools per worker shard, protocol and routing priority
    /// (index `priority * 2 + protocol`).
    pools: Box<[[OnceLock<Arc<Client>>; 4]]>,
    /// TLS contexts for `transport_socket` (index 0) and each
    /// `transport_socket_matches` entry (1..); `None` = plaintext.
    transports: Vec<Option<Arc<crate::tls::ClientTls>>>,
    /// Upstream filters passed through (`weir.pass_through_filter.*`).
    _pass_through: crate::metrics::PassThroughStats,
    /// `ring_hash_lb.*` / `maglev_lb.*` gauges of a consistent-hash cluster.
    table_gauges: Option<TableGauges>,
    /// The node's locality (bootstrap `node.locality`), first in a
    /// locality-weighted hash ring as in Envoy.
    local_locality: Option<Arc<hash_lb::LocalityKey>>,
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
    ) -> Result<Arc<Self>, String> {
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
        let set = HostSet::build(
            hosts,
            config.panic_threshold,
            config.overprovisioning_factor,
            &config.lb,
            config.locality_weighted,
            local_locality.as_deref(),
        );
        stats.membership_healthy.set(set.healthy_count as i64);
        let table_gauges = TableGauges::new(store, &config.stat_name, &config.lb);
        if let (Some(g), Some(t)) = (&table_gauges, set.table_stats()) {
            g.set(t);
        }
        let pass_through =
            crate::metrics::PassThroughStats::new(store, config.pass_through.iter().copied());
        Ok(Arc::new(ClusterRuntime {
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
            transports,
            _pass_through: pass_through,
            table_gauges,
            local_locality,
        }))
    }

    /// The TLS context for connections to `host` (`None` = plaintext).
    pub fn tls_for(&self, host: &Host) -> Option<&Arc<crate::tls::ClientTls>> {
        self.transports
            .get(self.transport_index(host))
            .and_then(Option::as_ref)
    }

    /// The PROXY protocol version to send to `host` first, if any.
    pub fn proxy_protocol_for(&self, host: &Host) -> Option<u8> {
        match self.transport_index(host) {
            0 => self.config.transport.proxy_protocol(),
            i => self.config.transport_matches[i - 1]
                .transport
                .proxy_protocol(),
        }
    }

    /// 0: `transport_socket`; i > 0: `transport_socket_matches[i - 1]`.
    fn transport_index(&self, host: &Host) -> usize {
        if self.config.transport_matches.is_empty() {
            return 0;
        }
        let t = self.config.transport_for(&host.metadata);
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
        for slots in self.pools.iter() {
            for slot in slots {
                if let Some(p) = slot.get() {
                    p.retain_hosts(&keep);
                }
            }
        }
        let _serial = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = &self.outlier {
            attach_monitors(d, &hosts);
        }
        if let Some(ck) = &self.health_check {
            ck.attach(&hosts);
        }
        self.stats.membership_total.set(hosts.len() as i64);
        let set = HostSet::build(
            hosts,
            self.config.panic_threshold,
            self.config.overprovisioning_factor,
            &self.config.lb,
            self.config.locality_weighted,
            self.local_locality.as_deref(),
        );
        self.stats.membership_healthy.set(set.healthy_count as i64);
        self.publish_table_stats(&set);
        self.hosts.store(Arc::new(set));
        self.stats.update_success.inc();
    }

    /// Rebuilds the host set after an ejection or un-ejection (the same
    /// hosts, their health changed).
    fn refresh_health(&self) {
        let _serial = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let hosts = self.hosts.load().hosts.clone();
        let set = HostSet::build(
            hosts,
            self.config.panic_threshold,
            self.config.overprovisioning_factor,
            &self.config.lb,
            self.config.locality_weighted,
            self.local_locality.as_deref(),
        );
        self.stats.membership_healthy.set(set.healthy_count as i64);
        self.publish_table_stats(&set);
        self.hosts.store(Arc::new(set));
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
            let host = set.hosts.get(table.choose(h, attempt)?)?;
            pick = Some(host.clone());
            if !avoid.contains(&host.addr) {
                break;
            }
        }
        pick
    }

    /// Picks a host; `avoid` lists hosts tried already (previous_hosts).
    pub fn choose(&self, avoid: &[SocketAddr], attempts: u32) -> Option<Arc<Host>> {
        if self.config.lb.is_hash() {
            // No request hash here (TCP, xDS): a random point, as Envoy.
            return self.choose_hashed(None, avoid, attempts);
        }
        let set = self.hosts.load();
        set.level()?;
        let pick = || -> Arc<Host> {
            let level = set.level().expect("checked above: a level has hosts");
            if level.panic {
                self.stats.lb_healthy_panic.inc();
            }
            let (usable, weighted) = level.source();
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
            set.hosts[idx].clone()
        };
        let mut h = pick();
        for _ in 0..attempts {
            if !avoid.contains(&h.addr) {
                break;
            }
            h = pick();
        }
        Some(h)
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
            let pool = Arc::new(pool::build(
                &self.config,
                kind,
                priority,
                &self.stats,
                self.breakers.clone(),
            ));
            // Close idle connections past the idle timeout, on this worker.
            if let Some(t) = self.config.idle_timeout {
                let weak = Arc::downgrade(&pool);
                if tokio::runtime::Handle::try_current().is_ok() {
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep((t / 2).max(Duration::from_millis(100))).await;
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
        // Adopted pools keep counting against their breakers.
        && a.circuit_breakers == b.circuit_breakers
}

/// Whether two versions of a cluster differ only in their endpoints.
fn same_but_endpoints(a: &Cluster, b: &Cluster) -> bool {
    let mut a = a.clone();
    a.localities = b.localities.clone();
    a.overprovisioning_factor = b.overprovisioning_factor;
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
            if let EndpointAddress::Ip(addr) = e.address {
                out.push(Arc::new(Host {
                    addr,
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
                }));
            }
        }
    }
    out
}

/// All clusters of the current snapshot. The map is swapped whole on a
/// configuration change; a request pins the runtime it picked.
pub struct ClusterManager {
    pub clusters: ArcSwap<HashMap<Arc<str>, Arc<ClusterRuntime>>>,
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
        let mut clusters = HashMap::new();
        for (k, c) in &snapshot.clusters {
            clusters.insert(
                k.clone(),
                ClusterRuntime::new(
                    c.clone(),
                    store,
                    workers,
                    tls,
                    node_locality(&snapshot.node),
                )?,
            );
        }
        Ok(ClusterManager {
            clusters: ArcSwap::from_pointee(clusters),
        })
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
        if let Some(names) = only {
            let mut next: Option<HashMap<Arc<str>, Arc<ClusterRuntime>>> = None;
            for name in names {
                let Some(c) = snapshot.clusters.get(name) else {
                    continue;
                };
                if let Some(rt) =
                    Self::build(&old, name, c, store, workers, tls, &local, &mut fresh)
                {
                    next.get_or_insert_with(|| (*old).clone())
                        .insert(name.clone(), rt);
                }
            }
            if let Some(next) = next {
                self.clusters.store(Arc::new(next));
            }
            return fresh;
        }
        let mut next = HashMap::with_capacity(snapshot.clusters.len());
        for (name, c) in &snapshot.clusters {
            match Self::build(&old, name, c, store, workers, tls, &local, &mut fresh) {
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
        old: &HashMap<Arc<str>, Arc<ClusterRuntime>>,
        name: &Arc<str>,
        c: &Arc<Cluster>,
        store: &Store,
        workers: usize,
        tls: &TlsEnv,
        local: &Option<Arc<hash_lb::LocalityKey>>,
        fresh: &mut Vec<Arc<ClusterRuntime>>,
    ) -> Option<Arc<ClusterRuntime>> {
        if let Some(rt) = old.get(name) {
            let applied = rt.applied.load_full();
            if Arc::ptr_eq(&applied, c) || *applied == **c {
                return None;
            }
            if rt.config.discovery == Discovery::Eds && same_but_endpoints(&applied, c) {
                rt.set_hosts(static_hosts(c));
                rt.applied.store(c.clone());
                return None;
            }
        }
        match ClusterRuntime::new(c.clone(), store, workers, tls, local.clone()) {
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
