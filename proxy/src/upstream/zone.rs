//! Zone-aware routing (Envoy's `ZoneAwareLoadBalancerBase`): with the
//! bootstrap's `cluster_manager.local_cluster_name`, round robin, least
//! request and random send each zone's share of traffic to the upstream
//! hosts of the same locality as far as their share of the upstream allows,
//! and the rest to the localities with spare capacity.
//!
//! The local cluster's runtime publishes its priority-0 host counts per
//! locality into a [`LocalCluster`] shared by every cluster; a cluster that
//! routes by zone computes its [`ZoneRouting`] with each host set it builds
//! and is rebuilt when the local cluster's hosts change (Envoy's priority
//! update callbacks).
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use rand::Rng;
use xds_client::config::ZoneAware;

use super::hash_lb::LocalityKey;
use super::{ClusterRuntime, ClusterStats, Host, LocalityLevel};

/// The local cluster's hosts as zone-aware routing sees them, and the
/// clusters to rebuild when they change.
#[derive(Default)]
pub struct LocalCluster {
    counts: ArcSwap<LocalCounts>,
    subscribers: Mutex<Vec<Weak<ClusterRuntime>>>,
}

/// Priority-0 hosts of the local cluster per locality.
#[derive(Debug, Default, PartialEq)]
pub struct LocalCounts {
    /// (locality, hosts, healthy hosts), in order of first appearance.
    pub localities: Vec<(LocalityKey, usize, usize)>,
    pub hosts: usize,
    pub healthy: usize,
}

impl LocalCounts {
    pub fn of(hosts: &[Arc<Host>]) -> LocalCounts {
        let mut out = LocalCounts::default();
        for h in hosts.iter().filter(|h| h.priority == 0) {
            let healthy = usize::from(h.is_healthy());
            match out.localities.iter_mut().find(|l| l.0 == *h.locality) {
                Some(l) => {
                    l.1 += 1;
                    l.2 += healthy;
                }
                None => out.localities.push(((*h.locality).clone(), 1, healthy)),
            }
            out.hosts += 1;
            out.healthy += healthy;
        }
        out
    }

    fn get(&self, l: &LocalityKey) -> Option<(usize, usize)> {
        self.localities
            .iter()
            .find(|e| e.0 == *l)
            .map(|e| (e.1, e.2))
    }
}

impl LocalCluster {
    pub fn counts(&self) -> Arc<LocalCounts> {
        self.counts.load_full()
    }

    /// The local cluster's new host set: published, and every subscribed
    /// cluster rebuilds its zone routing (when the counts changed).
    pub fn publish(&self, counts: LocalCounts) {
        if *self.counts.load_full() == counts {
            return;
        }
        self.counts.store(Arc::new(counts));
        let subs: Vec<Arc<ClusterRuntime>> = {
            let mut s = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            s.retain(|w| w.strong_count() > 0);
            s.iter().filter_map(Weak::upgrade).collect()
        };
        for c in subs {
            c.refresh_health();
        }
    }

    /// `c` routes by zone: rebuild it when the local cluster changes.
    pub fn subscribe(&self, c: &Arc<ClusterRuntime>) {
        let mut s = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|w| w.strong_count() > 0);
        s.push(Arc::downgrade(c));
    }
}

/// How one priority-0 pick is routed (Envoy's `LocalityRoutingState`).
#[derive(Debug)]
pub enum Routing {
    /// Every pick goes to the local locality (its upstream share covers
    /// the local share).
    Direct,
    /// `local_percent` / 10000 of picks go to the local locality; the rest
    /// to the others in proportion to their spare capacity (`residual`:
    /// cumulative, per locality).
    Residual {
        local_percent: u64,
        residual: Vec<u64>,
    },
}

/// Zone-aware routing of one host set's priority 0.
#[derive(Debug)]
pub struct ZoneRouting {
    pub routing: Routing,
    /// Priority 0's healthy hosts per locality, the local locality first
    /// when the upstream has it.
    pub localities: Vec<LocalityLevel>,
    /// The local cluster is in panic (healthy share under this cluster's
    /// panic threshold): picks do not route by zone.
    pub local_panic: bool,
    pub cfg: ZoneAware,
}

/// What [`ZoneRouting::build`] needs besides the hosts.
pub struct ZoneInputs<'a> {
    pub local: &'a LocalCounts,
    pub node: &'a LocalityKey,
    pub cfg: ZoneAware,
    pub panic_threshold: f64,
    pub stats: &'a ClusterStats,
}

impl ZoneRouting {
    /// Envoy's `regenerateLocalityRoutingStructures` for priority 0 of
    /// `hosts` (`None`: no zone-aware routing for this host set).
    pub fn build(hosts: &[Arc<Host>], z: &ZoneInputs<'_>) -> Option<ZoneRouting> {
        z.stats.lb_recalculate_zone_structures.inc();
        // Priority 0 per locality: the node's first, then the others in
        // Envoy's `LocalityLess` order (region, zone, sub-zone).
        let mut groups: Vec<(&LocalityKey, Vec<usize>)> = Vec::new();
        for (i, h) in hosts.iter().enumerate().filter(|(_, h)| h.priority == 0) {
            match groups.iter_mut().find(|g| *g.0 == *h.locality) {
                Some(g) => g.1.push(i),
                None => groups.push((&*h.locality, vec![i])),
            }
        }
        groups.sort_by(|a, b| (a.0 != z.node, a.0).cmp(&(b.0 != z.node, b.0)));
        if groups.len() < 2 || z.local.localities.len() < 2 {
            return None;
        }
        if z.local.get(z.node).is_none_or(|(n, _)| n == 0) {
            z.stats.lb_local_cluster_not_ok.inc();
            return None;
        }
        let healthy: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| {
                g.1.iter()
                    .copied()
                    .filter(|i| hosts[*i].is_healthy())
                    .collect()
            })
            .collect();
        let total_up: u64 = healthy.iter().map(|h| h.len() as u64).sum();
        if total_up < z.cfg.min_cluster_size {
            z.stats.lb_zone_cluster_too_small.inc();
            return None;
        }
        // Percentages in 1/10000 (Envoy's `calculateLocalityPercentages`).
        let total_local = z.local.healthy as u64;
        let pct: Vec<(u64, u64)> = groups
            .iter()
            .zip(&healthy)
            .map(|(g, h)| {
                if h.is_empty() {
                    return (0, 0);
                }
                let local = z.local.get(g.0).map_or(0, |(_, healthy)| healthy as u64);
                (
                    (10_000 * local).checked_div(total_local).unwrap_or(0),
                    10_000 * h.len() as u64 / total_up,
                )
            })
            .collect();
        let has_local = *groups[0].0 == *z.node;
        let localities = healthy
            .into_iter()
            .map(|usable| LocalityLevel {
                weighted: super::weighted_sequence(hosts, &usable),
                usable,
                weight: 0.0,
            })
            .collect();
        let local_panic = {
            let pct = if z.local.hosts == 0 {
                0.0
            } else {
                100.0 * z.local.healthy as f64 / z.local.hosts as f64
            };
            pct < z.panic_threshold.min(100.0)
        };
        let (local_pct, up_pct) = pct[0];
        let routing = if has_local && up_pct > 0 && up_pct >= local_pct {
            Routing::Direct
        } else {
            let local_percent = if has_local && local_pct > 0 {
                up_pct * 10_000 / local_pct
            } else {
                0
            };
            let mut residual = Vec::with_capacity(pct.len());
            let mut acc = 0;
            for (i, (local, up)) in pct.iter().enumerate() {
                if !(i == 0 && has_local) && up > local {
                    acc += up - local;
                }
                residual.push(acc);
            }
            Routing::Residual {
                local_percent,
                residual,
            }
        };
        Some(ZoneRouting {
            routing,
            localities,
            local_panic,
            cfg: z.cfg,
        })
    }

    /// The locality one pick goes to (Envoy's `tryChooseLocalLocalityHosts`).
    pub fn choose_locality(&self, stats: &ClusterStats) -> &LocalityLevel {
        let mut rng = rand::rng();
        let i = match &self.routing {
            Routing::Direct => {
                stats.lb_zone_routing_all_directly.inc();
                0
            }
            Routing::Residual {
                local_percent,
                residual,
            } => {
                if rng.random_range(0..10_000u64) < *local_percent {
                    stats.lb_zone_routing_sampled.inc();
                    0
                } else {
                    stats.lb_zone_routing_cross_zone.inc();
                    let total = residual.last().copied().unwrap_or(0);
                    if total == 0 {
                        stats.lb_zone_no_capacity_left.inc();
                        rng.random_range(0..self.localities.len())
                    } else {
                        let t = rng.random_range(0..total);
                        residual.iter().position(|r| t < *r).unwrap_or(0)
                    }
                }
            }
        };
        &self.localities[i]
    }
}

#[cfg(test)]
mod tests {
    //! The routing state for host sets whose outcome Envoy's
    //! `regenerateLocalityRoutingStructures` gives in its own tests'
    //! numbers (percentages in 1/10000).

    use super::*;
    use crate::stats::Store;

    fn hosts(zones: &[(&str, usize, usize)]) -> Vec<Arc<Host>> {
        let mut out = Vec::new();
        let mut port = 1000;
        for (zone, healthy, unhealthy) in zones {
            let locality = Arc::new(LocalityKey {
                zone: (*zone).to_owned(),
                ..LocalityKey::default()
            });
            for i in 0..healthy + unhealthy {
                port += 1;
                out.push(Arc::new(Host {
                    healthy: i < *healthy,
                    locality: locality.clone(),
                    ..Host::test(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                }));
            }
        }
        out
    }

    fn build(up: &[(&str, usize, usize)], local: &[(&str, usize, usize)]) -> Option<ZoneRouting> {
        let store = Store::new(1, xds_client::config::StatsConfig::All);
        let stats = ClusterStats::new(&store, "c");
        let local = LocalCounts::of(&hosts(local));
        let node = LocalityKey {
            zone: "a".into(),
            ..LocalityKey::default()
        };
        ZoneRouting::build(
            &hosts(up),
            &ZoneInputs {
                local: &local,
                node: &node,
                cfg: ZoneAware::default(),
                panic_threshold: 50.0,
                stats: &stats,
            },
        )
    }

    #[test]
    fn direct_residual_and_cross_zone_states() {
        // Local share 50% against 50% upstream: direct.
        let z = build(&[("a", 3, 0), ("b", 3, 0)], &[("a", 1, 0), ("b", 1, 0)]);
        assert!(matches!(z.map(|z| z.routing), Some(Routing::Direct)));
        // 75% local against 50% upstream: 2/3 stay, the rest to b.
        let z = build(&[("b", 3, 0), ("a", 3, 0)], &[("a", 3, 0), ("b", 1, 0)]).expect("zone");
        assert_eq!(z.localities.len(), 2);
        match z.routing {
            Routing::Residual {
                local_percent,
                residual,
            } => {
                assert_eq!(local_percent, 6666);
                assert_eq!(residual, vec![0, 2500]);
            }
            Routing::Direct => panic!("residual expected"),
        }
        // No upstream host in zone a: all cross, by spare capacity.
        let z = build(
            &[("b", 3, 0), ("c", 3, 0)],
            &[("a", 1, 0), ("b", 1, 0), ("c", 2, 0)],
        )
        .expect("zone");
        match z.routing {
            Routing::Residual {
                local_percent,
                residual,
            } => {
                assert_eq!(local_percent, 0);
                assert_eq!(residual, vec![2500, 2500]);
            }
            Routing::Direct => panic!("residual expected"),
        }
    }

    #[test]
    fn early_exits_and_local_panic() {
        // Too few healthy upstream hosts (default minimum 6).
        assert!(build(&[("a", 2, 1), ("b", 3, 0)], &[("a", 1, 0), ("b", 1, 0)]).is_none());
        // One local locality, or none matching the node.
        assert!(build(&[("a", 3, 0), ("b", 3, 0)], &[("a", 2, 0)]).is_none());
        assert!(build(&[("a", 3, 0), ("b", 3, 0)], &[("b", 1, 0), ("c", 1, 0)]).is_none());
        // 1 of 3 local hosts healthy: the local cluster is in panic.
        let z = build(&[("a", 3, 0), ("b", 3, 0)], &[("a", 1, 0), ("b", 0, 2)]).expect("zone");
        assert!(z.local_panic);
    }
}
