//! Outlier detection, as Envoy's `Outlier::DetectorImpl`.
//!
//! The request path only touches per-host atomics ([`HostMonitor`]):
//! consecutive-error counters and the success-rate buckets. When a counter
//! reaches its threshold the reporting worker takes the detector's lock
//! (rare) to decide the ejection, as Envoy's post to the main thread does.
//! A timer on the control runtime runs every `interval`: it un-ejects hosts
//! whose ejection time passed, evaluates success rate and failure
//! percentage, and decays the ejection back-off. An ejection or
//! un-ejection rebuilds the cluster's host set, so the load balancer skips
//! ejected hosts (or uses them in panic, as Envoy).
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use rand::Rng;
use tokio::time::Instant;
use xds_client::config::OutlierDetection;

use crate::stats::{Counter, Gauge, StatName, Store};

/// Why a host is ejected (Envoy's `OutlierEjectionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionType {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    SuccessRateLocalOrigin,
    FailurePercentage,
    FailurePercentageLocalOrigin,
}

/// A result the router or tcp_proxy reports besides HTTP status codes
/// (Envoy's `Outlier::Result` for local-origin events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalResult {
    /// The connection was made; the protocol on top decides the outcome.
    ConnectSuccess,
    /// The connection was made and that is the whole outcome (tcp_proxy).
    ConnectSuccessFinal,
    /// Connect failure or reset before a response.
    ConnectFailed,
    /// No response in time.
    Timeout,
}

/// Consecutive-error events a report can raise.
pub const EV_5XX: u8 = 1;
pub const EV_GATEWAY: u8 = 2;
pub const EV_LOCAL: u8 = 4;

/// Requests counted over one interval.
#[derive(Default)]
struct Bucket {
    success: AtomicU64,
    total: AtomicU64,
}

/// Two buckets: one written this interval, one read at the interval's end.
#[derive(Default)]
struct SuccessRateMonitor {
    buckets: [Bucket; 2],
    current: AtomicUsize,
    /// The rate last computed (percent; -1: none), shown in `/clusters`.
    rate_bits: AtomicU64,
}

impl SuccessRateMonitor {
    fn new() -> Self {
        let m = SuccessRateMonitor::default();
        m.rate_bits.store((-1f64).to_bits(), Relaxed);
        m
    }
    #[inline]
    fn bucket(&self) -> &Bucket {
        &self.buckets[self.current.load(Relaxed) & 1]
    }
    #[inline]
    fn total(&self) {
        self.bucket().total.fetch_add(1, Relaxed);
    }
    #[inline]
    fn success(&self) {
        self.bucket().success.fetch_add(1, Relaxed);
    }
    /// Swaps the buckets (Envoy's `updateCurrentWriter`): the one just
    /// written becomes readable, the other is cleared for writing.
    fn swap(&self) {
        let cur = self.current.load(Relaxed) & 1;
        let next = &self.buckets[cur ^ 1];
        next.success.store(0, Relaxed);
        next.total.store(0, Relaxed);
        self.current.store(cur ^ 1, Relaxed);
    }
    /// The last interval's success rate (percent) and request volume.
    fn rate_and_volume(&self) -> Option<(f64, u64)> {
        let b = &self.buckets[(self.current.load(Relaxed) & 1) ^ 1];
        let total = b.total.load(Relaxed);
        (total > 0).then(|| (b.success.load(Relaxed) as f64 * 100.0 / total as f64, total))
    }
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Relaxed))
    }
    fn set_rate(&self, r: f64) {
        self.rate_bits.store(r.to_bits(), Relaxed);
    }
}

/// Ejection bookkeeping of one host (detector lock only).
#[derive(Default)]
struct EjectState {
    num_ejections: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
    /// Multiplier of `base_ejection_time`.
    backoff: u32,
    jitter: Duration,
}

/// One host's outlier state; shared by every `Host` value with its address
/// in the cluster (host sets are rebuilt on EDS/DNS changes).
pub struct HostMonitor {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    external: SuccessRateMonitor,
    local: SuccessRateMonitor,
    ejected: AtomicBool,
    state: Mutex<EjectState>,
}

impl std::fmt::Debug for HostMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMonitor")
            .field("ejected", &self.ejected())
            .finish_non_exhaustive()
    }
}

impl HostMonitor {
    fn new() -> Self {
        HostMonitor {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            external: SuccessRateMonitor::new(),
            local: SuccessRateMonitor::new(),
            ejected: AtomicBool::new(false),
            state: Mutex::new(EjectState::default()),
        }
    }

    /// Envoy's `FAILED_OUTLIER_CHECK` health flag.
    #[inline]
    pub fn ejected(&self) -> bool {
        self.ejected.load(Relaxed)
    }

    /// Success rates shown in `/clusters`: (external, local origin).
    pub fn success_rates(&self) -> (f64, f64) {
        (self.external.rate(), self.local.rate())
    }

    /// An HTTP status from the host (Envoy's `putHttpResponseCode`).
    #[inline]
    pub fn put_http(&self, code: u16, cfg: &OutlierDetection) -> u8 {
        self.external.total();
        let mut ev = 0;
        if (500..600).contains(&code) {
            if matches!(code, 502..=504) {
                if self.consecutive_gateway.fetch_add(1, Relaxed) + 1
                    == cfg.consecutive_gateway_failure
                {
                    ev |= EV_GATEWAY;
                }
            } else {
                self.consecutive_gateway.store(0, Relaxed);
            }
            if self.consecutive_5xx.fetch_add(1, Relaxed) + 1 == cfg.consecutive_5xx {
                ev |= EV_5XX;
            }
        } else {
            self.external.success();
            self.consecutive_5xx.store(0, Relaxed);
            self.consecutive_gateway.store(0, Relaxed);
        }
        ev
    }

    /// A local-origin result (Envoy's `putResult`): without
    /// `split_external_local_origin_errors` mapped to an HTTP status
    /// (connect failure 503, timeout 504, final success 200).
    #[inline]
    pub fn put_local(&self, r: LocalResult, cfg: &OutlierDetection) -> u8 {
        if !cfg.split_external_local_origin_errors {
            return match r {
                LocalResult::ConnectSuccess => 0,
                LocalResult::ConnectSuccessFinal => self.put_http(200, cfg),
                LocalResult::ConnectFailed => self.put_http(503, cfg),
                LocalResult::Timeout => self.put_http(504, cfg),
            };
        }
        self.local.total();
        match r {
            LocalResult::ConnectSuccess | LocalResult::ConnectSuccessFinal => {
                self.local.success();
                self.consecutive_local.store(0, Relaxed);
                0
            }
            LocalResult::ConnectFailed | LocalResult::Timeout => {
                if self.consecutive_local.fetch_add(1, Relaxed) + 1
                    == cfg.consecutive_local_origin_failure
                {
                    EV_LOCAL
                } else {
                    0
                }
            }
        }
    }

    fn reset_counters(&self) {
        self.consecutive_5xx.store(0, Relaxed);
        self.consecutive_gateway.store(0, Relaxed);
        self.consecutive_local.store(0, Relaxed);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EjectState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `cluster.<c>.outlier_detection.*`, as Envoy.
struct Stats {
    ejections_active: Arc<Gauge>,
    ejections_overflow: Arc<Counter>,
    ejections_enforced_total: Arc<Counter>,
    /// Deprecated in Envoy, still counted.
    ejections_total: Arc<Counter>,
    ejections_consecutive_5xx: Arc<Counter>,
    ejections_success_rate: Arc<Counter>,
    /// (detected, enforced) per [`EjectionType`], in its order.
    by_type: [(Arc<Counter>, Arc<Counter>); 7],
}

impl Stats {
    fn new(store: &Store, cluster: &str) -> Self {
        let name = |s: &str| {
            StatName::tagged(
                "cluster",
                cluster,
                &format!("outlier_detection.{s}"),
                "envoy_cluster_name",
            )
        };
        let c = |s: &str| store.counter(name(s));
        let pair = |s: &str| {
            (
                c(&format!("ejections_detected_{s}")),
                c(&format!("ejections_enforced_{s}")),
            )
        };
        Stats {
            ejections_active: store.gauge(name("ejections_active")),
            ejections_overflow: c("ejections_overflow"),
            ejections_enforced_total: c("ejections_enforced_total"),
            ejections_total: c("ejections_total"),
            ejections_consecutive_5xx: c("ejections_consecutive_5xx"),
            ejections_success_rate: c("ejections_success_rate"),
            by_type: [
                pair("consecutive_5xx"),
                pair("consecutive_gateway_failure"),
                pair("consecutive_local_origin_failure"),
                pair("success_rate"),
                pair("local_origin_success_rate"),
                pair("failure_percentage"),
                pair("local_origin_failure_percentage"),
            ],
        }
    }

    fn pair(&self, t: EjectionType) -> &(Arc<Counter>, Arc<Counter>) {
        &self.by_type[t as usize]
    }
}

struct Inner {
    monitors: HashMap<SocketAddr, Arc<HostMonitor>>,
    active: u64,
    /// (average, ejection threshold) of the last success-rate evaluation,
    /// external then local origin; -1 when not computed.
    sr: [(f64, f64); 2],
}

/// The outlier detector of one cluster.
pub struct Detector {
    pub config: OutlierDetection,
    stats: Stats,
    inner: Mutex<Inner>,
}

impl Detector {
    pub fn new(config: OutlierDetection, store: &Store, cluster: &str) -> Self {
        Detector {
            config,
            stats: Stats::new(store, cluster),
            inner: Mutex::new(Inner {
                monitors: HashMap::new(),
                active: 0,
                sr: [(-1.0, -1.0); 2],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The monitors for a new host list: hosts that stay keep theirs,
    /// removed ones are forgotten (an ejected one no longer counts as
    /// active), new ones start clean.
    pub fn monitors_for(&self, addrs: &[SocketAddr]) -> Vec<Arc<HostMonitor>> {
        let mut inner = self.lock();
        let mut next = HashMap::with_capacity(addrs.len());
        let out: Vec<_> = addrs
            .iter()
            .map(|a| {
                next.entry(*a)
                    .or_insert_with(|| {
                        inner
                            .monitors
                            .get(a)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(HostMonitor::new()))
                    })
                    .clone()
            })
            .collect();
        let gone = inner
            .monitors
            .iter()
            .filter(|(a, m)| !next.contains_key(*a) && m.ejected())
            .count() as u64;
        inner.active = inner.active.saturating_sub(gone);
        inner.monitors = next;
        self.stats.ejections_active.set(inner.active as i64);
        out
    }

    /// The success-rate averages and thresholds for `/clusters`:
    /// (external average, external threshold, local average, local threshold).
    pub fn success_rate_nums(&self) -> (f64, f64, f64, f64) {
        let i = self.lock();
        (i.sr[0].0, i.sr[0].1, i.sr[1].0, i.sr[1].1)
    }

    /// Consecutive-error events raised by a report; returns whether a host
    /// was ejected (the host set must be rebuilt).
    pub fn on_events(&self, m: &Arc<HostMonitor>, ev: u8) -> bool {
        let mut changed = false;
        for (bit, t) in [
            (EV_GATEWAY, EjectionType::ConsecutiveGatewayFailure),
            (EV_5XX, EjectionType::Consecutive5xx),
            (EV_LOCAL, EjectionType::ConsecutiveLocalOriginFailure),
        ] {
            if ev & bit != 0 {
                changed |= self.on_consecutive_error(m, t);
            }
        }
        changed
    }

    /// Envoy's `onConsecutiveErrorWorker`.
    fn on_consecutive_error(&self, m: &Arc<HostMonitor>, t: EjectionType) -> bool {
        let mut inner = self.lock();
        // The host may have left the cluster meanwhile.
        if !inner.monitors.values().any(|x| Arc::ptr_eq(x, m)) || m.ejected() {
            return false;
        }
        self.stats.pair(t).0.inc();
        let changed = self.eject(&mut inner, m, t, Instant::now());
        match t {
            EjectionType::Consecutive5xx => {
                self.stats.ejections_consecutive_5xx.inc();
                m.consecutive_5xx.store(0, Relaxed);
            }
            EjectionType::ConsecutiveGatewayFailure => m.consecutive_gateway.store(0, Relaxed),
            _ => m.consecutive_local.store(0, Relaxed),
        }
        changed
    }

    fn enforcing(&self, t: EjectionType) -> u32 {
        let c = &self.config;
        match t {
            EjectionType::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionType::ConsecutiveLocalOriginFailure => {
                c.enforcing_consecutive_local_origin_failure
            }
            EjectionType::SuccessRate => c.enforcing_success_rate,
            EjectionType::SuccessRateLocalOrigin => c.enforcing_local_origin_success_rate,
            EjectionType::FailurePercentage => c.enforcing_failure_percentage,
            EjectionType::FailurePercentageLocalOrigin => {
                c.enforcing_failure_percentage_local_origin
            }
        }
    }

    /// Envoy's `ejectHost`; returns whether the host was ejected.
    fn eject(&self, inner: &mut Inner, m: &HostMonitor, t: EjectionType, now: Instant) -> bool {
        let max_pct = u64::from(self.config.max_ejection_percent.min(100));
        let hosts = inner.monitors.len().max(1) as f64;
        let ejected_pct = 100.0 * (inner.active + 1) as f64 / hosts;
        let mut should = ejected_pct <= max_pct as f64;
        if self.config.always_eject_one_host {
            should |= inner.active == 0;
        }
        if !should {
            self.stats.ejections_overflow.inc();
            return false;
        }
        if matches!(t, EjectionType::Consecutive5xx | EjectionType::SuccessRate) {
            self.stats.ejections_total.inc();
        }
        // `enforcing_*` is the chance (percent) that a detection ejects.
        if rand::rng().random_range(0..100u32) >= self.enforcing(t) {
            return false;
        }
        inner.active += 1;
        self.stats.ejections_active.set(inner.active as i64);
        self.stats.ejections_enforced_total.inc();
        self.stats.pair(t).1.inc();
        m.ejected.store(true, Relaxed);
        let mut st = m.state();
        st.num_ejections += 1;
        st.last_ejection = Some(now);
        let jitter_ms = self.config.max_ejection_time_jitter.as_millis() as u64;
        st.jitter = Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
        let base = self.config.base_ejection_time;
        if base.saturating_mul(st.backoff) < self.config.max_ejection_time.saturating_add(base) {
            st.backoff += 1;
        }
        true
    }

    /// One interval (Envoy's `onIntervalTimer`); returns whether any host
    /// was ejected or un-ejected.
    pub fn tick(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        let mut changed = false;
        let base = self.config.base_ejection_time;
        let max = self.config.max_ejection_time;
        let monitors: Vec<Arc<HostMonitor>> = inner.monitors.values().cloned().collect();
        for m in &monitors {
            if m.ejected() {
                let mut st = m.state();
                let due = base.saturating_mul(st.backoff).min(max) + st.jitter;
                if st
                    .last_ejection
                    .is_none_or(|t| now.duration_since(t) >= due)
                {
                    inner.active = inner.active.saturating_sub(1);
                    m.ejected.store(false, Relaxed);
                    m.reset_counters();
                    st.last_unejection = Some(now);
                    changed = true;
                }
            }
            m.external.swap();
            m.local.swap();
            m.external.set_rate(-1.0);
            m.local.set_rate(-1.0);
        }
        self.stats.ejections_active.set(inner.active as i64);
        changed |= self.success_rate_ejections(&mut inner, &monitors, false, now);
        changed |= self.success_rate_ejections(&mut inner, &monitors, true, now);
        for m in &monitors {
            if !m.ejected() {
                let mut st = m.state();
                if st
                    .last_unejection
                    .is_some_and(|t| now.duration_since(t) >= self.config.interval)
                {
                    st.backoff = st.backoff.saturating_sub(1);
                }
            }
        }
        changed
    }

    /// Envoy's `processSuccessRateEjections` for one origin.
    fn success_rate_ejections(
        &self,
        inner: &mut Inner,
        monitors: &[Arc<HostMonitor>],
        local: bool,
        now: Instant,
    ) -> bool {
        let c = &self.config;
        let slot = usize::from(local);
        inner.sr[slot] = (-1.0, -1.0);
        let n = monitors.len() as u64;
        if n < u64::from(c.success_rate_minimum_hosts)
            && n < u64::from(c.failure_percentage_minimum_hosts)
        {
            return false;
        }
        let sr_volume = u64::from(c.success_rate_request_volume);
        let fp_volume = u64::from(c.failure_percentage_request_volume);
        let mut sr_hosts = Vec::new();
        let mut fp_hosts = Vec::new();
        let mut sum = 0.0;
        for m in monitors {
            if m.ejected() {
                continue;
            }
            let mon = if local { &m.local } else { &m.external };
            let Some((rate, volume)) = mon.rate_and_volume() else {
                continue;
            };
            if volume >= sr_volume.min(fp_volume) {
                mon.set_rate(rate);
            }
            if volume >= sr_volume {
                sr_hosts.push((m.clone(), rate));
                sum += rate;
            }
            if volume >= fp_volume {
                fp_hosts.push((m.clone(), rate));
            }
        }
        let mut changed = false;
        if !sr_hosts.is_empty() && sr_hosts.len() as u64 >= u64::from(c.success_rate_minimum_hosts)
        {
            let mean = sum / sr_hosts.len() as f64;
            let var = sr_hosts
                .iter()
                .map(|(_, r)| (r - mean).powi(2))
                .sum::<f64>()
                / sr_hosts.len() as f64;
            let threshold = mean - c.success_rate_stdev_factor * var.sqrt();
            inner.sr[slot] = (mean, threshold);
            let t = if local {
                EjectionType::SuccessRateLocalOrigin
            } else {
                EjectionType::SuccessRate
            };
            for (m, rate) in &sr_hosts {
                if *rate < threshold {
                    self.stats.ejections_success_rate.inc();
                    self.stats.pair(t).0.inc();
                    changed |= self.eject(inner, m, t, now);
                }
            }
        }
        if !fp_hosts.is_empty()
            && fp_hosts.len() as u64 >= u64::from(c.failure_percentage_minimum_hosts)
        {
            let t = if local {
                EjectionType::FailurePercentageLocalOrigin
            } else {
                EjectionType::FailurePercentage
            };
            for (m, rate) in &fp_hosts {
                // A host the success-rate pass just ejected is not
                // ejected twice.
                if 100.0 - rate >= f64::from(c.failure_percentage_threshold) && !m.ejected() {
                    self.stats.pair(t).0.inc();
                    changed |= self.eject(inner, m, t, now);
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests;
