//! Cluster circuit breakers, as Envoy's `ResourceManagerImpl`: per routing
//! priority, a limit on connections, pending requests, active requests and
//! concurrent retries (or a retry budget).
//!
//! Counts are one atomic per resource per cluster, shared by every worker
//! (Envoy's are too); the `*_open` gauge is written only when the breaker
//! changes state, the `remaining_*` gauges only with `track_remaining`. As
//! in Envoy, concurrent increments may briefly overshoot a limit.
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    Arc,
};

use xds_client::config::{CircuitBreakers as Config, RetryBudget, RoutingPriority, Thresholds};

use crate::stats::{Gauge, StatName, Store};

/// One resource's limit and current use.
pub struct Limit {
    max: u64,
    current: AtomicU64,
    open: AtomicBool,
    open_gauge: Arc<Gauge>,
    remaining: Option<Arc<Gauge>>,
}

impl Limit {
    fn new(max: u64, open_gauge: Arc<Gauge>, remaining: Option<Arc<Gauge>>) -> Self {
        if let Some(r) = &remaining {
            r.set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        // A limit of 0 is open from the start, as Envoy's gauge after its
        // first update; Envoy publishes it only on the first change.
        Limit {
            max,
            current: AtomicU64::new(0),
            open: AtomicBool::new(false),
            open_gauge,
            remaining,
        }
    }

    /// Whether one more may be created (Envoy's `canCreate`).
    #[inline]
    pub fn can_create(&self) -> bool {
        self.current.load(Relaxed) < self.max
    }

    #[inline]
    pub fn count(&self) -> u64 {
        self.current.load(Relaxed)
    }

    #[inline]
    pub fn inc(&self) {
        let n = self.current.fetch_add(1, Relaxed) + 1;
        self.update(n, self.max);
    }

    #[inline]
    pub fn dec(&self) {
        let n = self.current.fetch_sub(1, Relaxed).saturating_sub(1);
        self.update(n, self.max);
    }

    #[inline]
    fn update(&self, n: u64, max: u64) {
        if let Some(r) = &self.remaining {
            r.set(i64::try_from(max.saturating_sub(n)).unwrap_or(i64::MAX));
        }
        // Read first: the flag's cache line is written only on a change.
        let open = n >= max;
        if self.open.load(Relaxed) != open && self.open.swap(open, Relaxed) != open {
            self.open_gauge.set(i64::from(open));
        }
    }

    /// Counts one use until the guard drops.
    pub fn guard(&self) -> LimitGuard<'_> {
        self.inc();
        LimitGuard(self)
    }
}

/// One counted use of a [`Limit`], given back on drop.
pub struct LimitGuard<'a>(&'a Limit);

impl Drop for LimitGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The retry limit: `max_retries`, or a budget relative to the active and
/// pending requests.
pub struct Retries {
    limit: Limit,
    budget: Option<RetryBudget>,
}

impl Retries {
    /// The current maximum (Envoy's `RetryBudgetImpl::max`).
    fn max(&self, rm: &ResourceManager) -> u64 {
        match self.budget {
            None => self.limit.max,
            Some(b) => {
                let active = rm.requests.count() + rm.pending.count();
                ((b.budget_percent / 100.0 * active as f64) as u64)
                    .max(u64::from(b.min_retry_concurrency))
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.limit.count()
    }
}

/// The limits of one routing priority.
pub struct ResourceManager {
    pub connections: Limit,
    pub pending: Limit,
    pub requests: Limit,
    pub retries: Retries,
    /// `max_connection_pools` is rejected at config time; its gauge exists
    /// as Envoy's.
    _cx_pool_open: Arc<Gauge>,
}

impl ResourceManager {
    fn new(t: &Thresholds, store: &Store, cluster: &str, priority: &str) -> Self {
        let g = |s: &str| {
            store.gauge(StatName::tagged(
                "cluster",
                cluster,
                &format!("circuit_breakers.{priority}.{s}"),
                "envoy_cluster_name",
            ))
        };
        let remaining = |s: &str| t.track_remaining.then(|| g(s));
        let retries_remaining = remaining("remaining_retries");
        let retries = Retries {
            limit: Limit::new(
                u64::from(t.max_retries),
                g("rq_retry_open"),
                // With a budget the remaining count depends on other
                // resources: Envoy keeps the gauge at 0.
                if t.retry_budget.is_some() {
                    if let Some(r) = &retries_remaining {
                        r.set(0);
                    }
                    None
                } else {
                    retries_remaining
                },
            ),
            budget: t.retry_budget,
        };
        ResourceManager {
            connections: Limit::new(
                u64::from(t.max_connections),
                g("cx_open"),
                remaining("remaining_cx"),
            ),
            pending: Limit::new(
                u64::from(t.max_pending_requests),
                g("rq_pending_open"),
                remaining("remaining_pending"),
            ),
            requests: Limit::new(
                u64::from(t.max_requests),
                g("rq_open"),
                remaining("remaining_rq"),
            ),
            retries,
            _cx_pool_open: g("cx_pool_open"),
        }
    }

    /// The current limits (connections, pending, requests, retries), for
    /// `/clusters`; with a retry budget the retry limit follows the load.
    pub fn maxes(&self) -> [u64; 4] {
        [
            self.connections.max,
            self.pending.max,
            self.requests.max,
            self.retries.max(self),
        ]
    }

    /// Whether one more retry may start (Envoy's `retries().canCreate()`).
    pub fn can_retry(&self) -> bool {
        self.retries.count() < self.retries.max(self)
    }

    /// Counts a scheduled retry until the guard drops (Envoy holds it from
    /// the retry decision to the retried attempt's outcome).
    pub fn retry_guard(&self) -> LimitGuard<'_> {
        let max = self.retries.max(self);
        let n = self.retries.limit.current.fetch_add(1, Relaxed) + 1;
        self.retries.limit.update(n, max);
        LimitGuard(&self.retries.limit)
    }
}

/// The circuit breakers of a cluster, per routing priority.
pub struct CircuitBreakers {
    pub default: ResourceManager,
    pub high: ResourceManager,
}

impl CircuitBreakers {
    pub fn new(c: &Config, store: &Store, cluster: &str) -> Self {
        CircuitBreakers {
            default: ResourceManager::new(&c.default, store, cluster, "default"),
            high: ResourceManager::new(&c.high, store, cluster, "high"),
        }
    }

    /// The limits of a route's priority (Envoy's `resourceManager(priority)`).
    #[inline]
    pub fn at(&self, p: RoutingPriority) -> &ResourceManager {
        match p {
            RoutingPriority::Default => &self.default,
            RoutingPriority::High => &self.high,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<Store> {
        Store::new(1, Default::default())
    }

    #[test]
    fn limit_opens_at_max_and_tracks_remaining() {
        let s = store();
        let t = Thresholds {
            max_requests: 2,
            track_remaining: true,
            ..Default::default()
        };
        let rm = ResourceManager::new(&t, &s, "c", "default");
        assert_eq!(
            s.get("cluster.c.circuit_breakers.default.remaining_rq"),
            Some(2)
        );
        let a = rm.requests.guard();
        assert!(rm.requests.can_create());
        let b = rm.requests.guard();
        assert!(!rm.requests.can_create());
        assert_eq!(s.get("cluster.c.circuit_breakers.default.rq_open"), Some(1));
        assert_eq!(
            s.get("cluster.c.circuit_breakers.default.remaining_rq"),
            Some(0)
        );
        drop(a);
        assert!(rm.requests.can_create());
        assert_eq!(s.get("cluster.c.circuit_breakers.default.rq_open"), Some(0));
        assert_eq!(
            s.get("cluster.c.circuit_breakers.default.remaining_rq"),
            Some(1)
        );
        drop(b);
        assert_eq!(rm.requests.count(), 0);
        assert_eq!(
            s.get("cluster.c.circuit_breakers.default.remaining_cx"),
            Some(1024)
        );
        // Without track_remaining there are no remaining gauges.
        let s2 = store();
        let _rm = ResourceManager::new(&Thresholds::default(), &s2, "c", "high");
        assert_eq!(s2.get("cluster.c.circuit_breakers.high.remaining_cx"), None);
        assert_eq!(s2.get("cluster.c.circuit_breakers.high.cx_open"), Some(0));
    }

    #[test]
    fn retry_budget_scales_with_active_requests() {
        let s = store();
        let t = Thresholds {
            retry_budget: Some(RetryBudget {
                budget_percent: 50.0,
                min_retry_concurrency: 1,
            }),
            ..Default::default()
        };
        let rm = ResourceManager::new(&t, &s, "c", "default");
        // No traffic: the minimum concurrency applies.
        assert!(rm.can_retry());
        let r1 = rm.retry_guard();
        assert!(!rm.can_retry());
        // Four active requests: 50% allows two retries.
        let g: Vec<_> = (0..4).map(|_| rm.requests.guard()).collect();
        assert!(rm.can_retry());
        let _r2 = rm.retry_guard();
        assert!(!rm.can_retry());
        drop(r1);
        assert!(rm.can_retry());
        drop(g);
    }

    #[test]
    fn a_routing_priority_uses_its_own_limits() {
        let s = store();
        let c = Config {
            high: Thresholds {
                max_requests: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let cb = CircuitBreakers::new(&c, &s, "c");
        let _g = cb.at(RoutingPriority::High).requests.guard();
        assert!(!cb.at(RoutingPriority::High).requests.can_create());
        assert!(cb.at(RoutingPriority::Default).requests.can_create());
        assert_eq!(s.get("cluster.c.circuit_breakers.high.rq_open"), Some(1));
        assert_eq!(s.get("cluster.c.circuit_breakers.default.rq_open"), Some(0));
    }
}
