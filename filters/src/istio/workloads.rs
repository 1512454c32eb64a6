//! The workloads of workload discovery (WDS, `istio.workload.Workload`),
//! indexed by address for the `workload_discovery` peer discovery method,
//! as istio/proxy's `workload_discovery` extension (`api.cc`): each
//! workload becomes Istio's peer object once, and every one of its
//! addresses maps to it.
//!
//! The index is immutable and shared: each WDS change builds a new one
//! (peer objects of unchanged workloads are reused) and swaps it in
//! atomically, so a lookup on the data path is a hash probe with no lock
//! and no allocation.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use xds_client::config::{Workload, WorkloadKind};

use super::PeerInfo;

/// The running index, shared by the proxy (which swaps it) and the peer
/// metadata filters (which read it).
pub type Workloads = Arc<ArcSwap<WorkloadIndex>>;

/// A new, empty shared index.
pub fn new_workloads() -> Workloads {
    Arc::new(ArcSwap::from_pointee(WorkloadIndex::default()))
}

/// Address -> peer, and what built it.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Arc<PeerInfo>>,
    /// `uid` -> the workload and its peer object, so a rebuild converts
    /// only workloads that changed.
    by_uid: HashMap<String, (Arc<Workload>, Arc<PeerInfo>)>,
}

impl WorkloadIndex {
    /// The index of `workloads` (in `uid` order, as the xDS client holds
    /// them), reusing `prev`'s peer objects for unchanged workloads.
    ///
    /// An address two workloads claim (the same IP in two networks) goes
    /// to the one on `local_network` (this proxy's `NETWORK`), else to the
    /// first in `uid` order. Istio's index is keyed by IP alone and keeps
    /// whichever arrived first.
    pub fn build(prev: &WorkloadIndex, workloads: &[Arc<Workload>], local_network: &str) -> Self {
        let mut by_uid = HashMap::with_capacity(workloads.len());
        let mut by_ip: HashMap<IpAddr, (Arc<PeerInfo>, bool)> = HashMap::new();
        for w in workloads {
            let peer = match prev.by_uid.get(&w.uid) {
                Some((old, p)) if Arc::ptr_eq(old, w) || **old == **w => p.clone(),
                _ => Arc::new(peer_of(w)),
            };
            let local = w.network == local_network;
            for ip in &w.addresses {
                let ip = ip.to_canonical();
                match by_ip.get(&ip) {
                    Some((_, true)) => {}
                    Some((_, false)) if !local => {}
                    _ => {
                        by_ip.insert(ip, (peer.clone(), local));
                    }
                }
            }
            by_uid.insert(w.uid.clone(), (w.clone(), peer));
        }
        WorkloadIndex {
            by_ip: by_ip.into_iter().map(|(ip, (p, _))| (ip, p)).collect(),
            by_uid,
        }
    }

    /// The peer at `ip` (an IPv4-mapped IPv6 address is looked up as its
    /// IPv4 address, as Envoy reports such peers).
    pub fn get(&self, ip: IpAddr) -> Option<&Arc<PeerInfo>> {
        if self.by_ip.is_empty() {
            return None;
        }
        self.by_ip.get(&ip.to_canonical())
    }

    /// Addresses indexed (Istio's `workload_discovery.total` gauge).
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Workloads held.
    pub fn workloads(&self) -> usize {
        self.by_uid.len()
    }
}

/// Istio's peer object for a workload (`api.cc` `convert`): the namespace,
/// trust domain and service account default to `default`,
/// `cluster.local` and `default` when elided; app and version are the
/// canonical name and revision; the identity is
/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn peer_of(w: &Workload) -> PeerInfo {
    let or = |v: &str, d: &str| if v.is_empty() { d } else { v }.to_owned();
    let namespace = or(&w.namespace, "default");
    let identity = format!(
        "spiffe://{}/ns/{namespace}/sa/{}",
        or(&w.trust_domain, "cluster.local"),
        or(&w.service_account, "default"),
    );
    PeerInfo {
        name: w.name.clone(),
        namespace,
        cluster: w.cluster_id.clone(),
        workload: w.workload_name.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        app: w.canonical_name.clone(),
        version: w.canonical_revision.clone(),
        workload_type: Some(match w.workload_type {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::CronJob => "cronjob",
            WorkloadKind::Pod => "pod",
            WorkloadKind::Job => "job",
        }),
        identity,
        region: w.region.clone(),
        zone: w.zone.clone(),
        labels: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(uid: &str, ip: &str, network: &str, name: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: uid.into(),
            name: name.into(),
            addresses: vec![ip.parse().expect("ip")],
            network: network.into(),
            workload_name: name.into(),
            ..Default::default()
        })
    }

    fn at<'a>(i: &'a WorkloadIndex, ip: &str) -> Option<&'a str> {
        i.get(ip.parse().expect("ip")).map(|p| p.name.as_str())
    }

    #[test]
    fn istio_defaults_and_identity() {
        let p = peer_of(&Workload {
            canonical_name: "ratings".into(),
            canonical_revision: "v1".into(),
            workload_type: WorkloadKind::CronJob,
            ..Default::default()
        });
        assert_eq!(p.namespace, "default");
        assert_eq!(p.identity, "spiffe://cluster.local/ns/default/sa/default");
        assert_eq!((p.app.as_str(), p.version.as_str()), ("ratings", "v1"));
        assert_eq!(p.workload_type, Some("cronjob"));
        let p = peer_of(&Workload {
            namespace: "bookinfo".into(),
            trust_domain: "td".into(),
            service_account: "sa".into(),
            ..Default::default()
        });
        assert_eq!(p.identity, "spiffe://td/ns/bookinfo/sa/sa");
    }

    #[test]
    fn conflicts_prefer_local_network_and_reuse_unchanged_peers() {
        let a = w("a", "10.0.0.1", "remote", "a");
        let b = w("b", "10.0.0.1", "net1", "b");
        let c = w("c", "10.0.0.2", "", "c");
        let i = WorkloadIndex::build(
            &WorkloadIndex::default(),
            &[a.clone(), b, c.clone()],
            "net1",
        );
        assert_eq!(at(&i, "10.0.0.1"), Some("b"));
        assert_eq!(at(&i, "::ffff:10.0.0.2"), Some("c"));
        assert_eq!(at(&i, "10.0.0.3"), None);
        assert_eq!((i.len(), i.workloads()), (2, 3));
        // Without a local claimant, the first uid wins.
        let i2 = WorkloadIndex::build(&i, &[a, c], "net1");
        assert_eq!(at(&i2, "10.0.0.1"), Some("a"));
        assert!(Arc::ptr_eq(
            i.get("10.0.0.2".parse().expect("ip")).expect("c"),
            i2.get("10.0.0.2".parse().expect("ip")).expect("c")
        ));
    }
}
