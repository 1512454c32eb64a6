//! The accepted dynamic resources and their assembly into snapshots.
//!
//! Resources are accepted one by one (a bad one is rejected with its reason
//! and never poisons the others). Each accepted change re-assembles a
//! [`Snapshot`]: the static bootstrap resources plus every dynamic resource
//! that is *warm*. A cluster warms until its EDS assignment and SDS secrets
//! are here, a listener until its RDS routes and SDS secrets are here (or
//! their `initial_fetch_timeout` passed); meanwhile the previous version, if
//! any, keeps serving, as Envoy's warming.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::api::google::protobuf::Any;
use crate::config::*;
use crate::error::ConfigErrors;

use super::resources::{decode, Endpoints, Rejected, Resource, ResourceType};

/// One accepted resource.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The SotW `version_info` it arrived with, or its delta version.
    pub version: String,
    pub resource: Resource,
    /// As received, for `/config_dump`.
    pub raw: Any,
    pub updated: SystemTime,
}

/// What a stream should subscribe to for one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    Wildcard,
    Names(BTreeSet<Name>),
}

/// Every subscription weir wants, by source and type.
pub type Wanted = BTreeMap<SourceKind, BTreeMap<ResourceType, Interest>>;

/// The outcome of applying one response.
#[derive(Debug, Default)]
pub struct Applied {
    /// Resources added, changed or removed (a re-assembly is needed).
    pub changed: bool,
    pub rejected: Vec<Rejected>,
}

impl Applied {
    /// The NACK `error_detail` message, if anything was rejected.
    pub fn error_detail(&self) -> Option<String> {
        (!self.rejected.is_empty()).then(|| {
            self.rejected
                .iter()
                .map(|r| r.reason.clone())
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

/// What changed between two assembled snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Anything may have changed.
    Full,
    /// Only these clusters changed (their EDS endpoints, or they finished
    /// warming); every other part of the snapshot is the same `Arc`s.
    Clusters(BTreeSet<Name>),
}

/// The dynamic configuration accepted so far.
#[derive(Debug)]
pub struct DynamicState {
    base: Arc<Snapshot>,
    resources: BTreeMap<ResourceType, BTreeMap<Name, Entry>>,
    /// Last accepted SotW `version_info` per type.
    pub type_versions: BTreeMap<ResourceType, String>,
    /// Types whose first response arrived (or whose wait timed out).
    received: BTreeSet<ResourceType>,
    /// Names (`*` for a wildcard type) still awaited, with the deadline of
    /// their initial fetch.
    pending: BTreeMap<(ResourceType, Name), Option<Instant>>,
    /// Names whose initial fetch timed out: warming goes on without them.
    timed_out: BTreeSet<(ResourceType, Name)>,
    active_listeners: BTreeMap<Name, Arc<Listener>>,
    active_clusters: BTreeMap<Name, Arc<Cluster>>,
    /// CDS cluster + EDS endpoints -> merged cluster, reused while both
    /// inputs are the same `Arc`s (so unchanged clusters compare by pointer).
    merged: BTreeMap<Name, Merged>,
    pub warming_listeners: BTreeSet<Name>,
    pub warming_clusters: BTreeSet<Name>,
    init_done: bool,
    /// The last assembled snapshot; an endpoint-only change starts from it.
    last: Option<Arc<Snapshot>>,
    /// Clusters whose EDS assignment changed since the last assembly;
    /// `None` when anything else changed (the next assembly is full).
    dirty: Option<BTreeSet<Name>>,
    /// EDS service name -> the clusters (static and CDS) that use it.
    eds_users: HashMap<Name, Vec<Name>>,
}

const WILDCARD: &str = "*";

/// (CDS cluster, EDS endpoints, the two merged).
type Merged = (Arc<Cluster>, Option<Arc<Endpoints>>, Arc<Cluster>);

impl DynamicState {
    pub fn new(base: Arc<Snapshot>) -> Self {
        let mut s = DynamicState {
            base,
            resources: BTreeMap::new(),
            type_versions: BTreeMap::new(),
            received: BTreeSet::new(),
            pending: BTreeMap::new(),
            timed_out: BTreeSet::new(),
            active_listeners: BTreeMap::new(),
            active_clusters: BTreeMap::new(),
            merged: BTreeMap::new(),
            warming_listeners: BTreeSet::new(),
            warming_clusters: BTreeSet::new(),
            init_done: false,
            last: None,
            dirty: None,
            eds_users: HashMap::new(),
        };
        let now = Instant::now();
        for (rt, cs) in [
            (ResourceType::Listener, &s.base.dynamic.lds),
            (ResourceType::Cluster, &s.base.dynamic.cds),
        ] {
            if let Some(cs) = cs {
                s.pending.insert(
                    (rt, WILDCARD.into()),
                    cs.initial_fetch_timeout.and_then(|t| now.checked_add(t)),
                );
            }
        }
        s
    }

    /// The static bootstrap snapshot.
    pub fn base(&self) -> &Arc<Snapshot> {
        &self.base
    }

    /// The accepted resources of one type.
    pub fn entries(&self, rt: ResourceType) -> impl Iterator<Item = (&Name, &Entry)> {
        self.resources.get(&rt).into_iter().flatten()
    }

    /// The versions of accepted resources of `rt` (delta
    /// `initial_resource_versions` on reconnect).
    pub fn versions(&self, rt: ResourceType) -> BTreeMap<String, String> {
        self.entries(rt)
            .map(|(n, e)| (n.to_string(), e.version.clone()))
            .collect()
    }

    /// The workloads WDS delivered (by `uid`), for the peer index.
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        self.entries(ResourceType::Workload)
            .filter_map(|(_, e)| match &e.resource {
                Resource::Workload(w) => Some(w.clone()),
                _ => None,
            })
            .collect()
    }

    fn get(&self, rt: ResourceType, name: &str) -> Option<&Resource> {
        self.resources
            .get(&rt)
            .and_then(|m| m.get(name))
            .map(|e| &e.resource)
    }

    /// Applies one response's resources of type `rt`. `resources`: (name
    /// from a delta wrapper, resource, version). `removed`: names to drop.
    /// `sotw_full`: a state-of-the-world response of a wildcard type, where
    /// absence means removal.
    pub fn apply(
        &mut self,
        rt: ResourceType,
        resources: &[(Option<String>, Any, String)],
        removed: &[String],
        sotw_full: bool,
    ) -> Applied {
        let mut out = Applied::default();
        let now = SystemTime::now();
        let mut seen: BTreeSet<Name> = BTreeSet::new();
        let mut accepted: Vec<(Name, Entry)> = Vec::new();
        for (wrapped_name, any, version) in resources {
            match decode(rt, any) {
                Ok((name, resource)) => {
                    if let Some(w) = wrapped_name {
                        if !w.is_empty() && **w != *name {
                            out.rejected.push(Rejected {
                                name: Some(name.clone()),
                                reason: format!(
                                    "resource named {w:?} in its wrapper but {name:?} inside"
                                ),
                            });
                            seen.insert(name);
                            continue;
                        }
                    }
                    if !seen.insert(name.clone()) {
                        out.rejected.push(Rejected {
                            name: Some(name.clone()),
                            reason: format!("duplicate resource {name:?} in one response"),
                        });
                        continue;
                    }
                    if let Err(e) = self.check(&name, &resource, &accepted) {
                        out.rejected.push(Rejected {
                            name: Some(name.clone()),
                            reason: e,
                        });
                        continue;
                    }
                    accepted.push((
                        name,
                        Entry {
                            version: version.clone(),
                            resource,
                            raw: any.clone(),
                            updated: now,
                        },
                    ));
                }
                Err(r) => {
                    if let Some(n) = &r.name {
                        seen.insert(n.clone());
                    }
                    out.rejected.push(r);
                }
            }
        }
        let map = self.resources.entry(rt).or_default();
        // The names whose resource was added, changed or removed.
        let mut touched: Vec<Name> = Vec::new();
        if sotw_full {
            let gone: Vec<Name> = map.keys().filter(|n| !seen.contains(*n)).cloned().collect();
            for n in gone {
                map.remove(&n);
                touched.push(n);
            }
        }
        for n in removed {
            if let Some((k, _)) = map.remove_entry(n.as_str()) {
                touched.push(k);
            }
        }
        for (name, entry) in accepted {
            self.pending.remove(&(rt, name.clone()));
            self.timed_out.remove(&(rt, name.clone()));
            match map.get_mut(&name) {
                Some(old) if old.resource == entry.resource => {
                    old.version = entry.version;
                }
                _ => {
                    map.insert(name.clone(), entry);
                    touched.push(name);
                }
            }
        }
        out.changed = !touched.is_empty();
        if rt == ResourceType::Workload {
            // Workloads are not part of the snapshot (see `workloads`):
            // no re-assembly, and WDS never holds up initialisation (as
            // Istio's subscription, which registers no init target).
            self.received.insert(rt);
            return out;
        }
        if self.received.insert(rt) {
            out.changed = true;
            self.dirty = None;
        }
        if rt == ResourceType::Endpoint {
            self.touch_endpoints(&touched);
        } else if !touched.is_empty() {
            self.dirty = None;
        }
        self.pending.remove(&(rt, WILDCARD.into()));
        out
    }

    /// Marks the clusters using these EDS names for re-assembly.
    fn touch_endpoints(&mut self, names: &[Name]) {
        if let Some(dirty) = &mut self.dirty {
            for n in names {
                if let Some(users) = self.eds_users.get(n) {
                    dirty.extend(users.iter().cloned());
                }
            }
        }
    }

    /// Checks that need the other resources: names and addresses that
    /// collide with static ones or each other, and config sources.
    fn check(&self, name: &Name, r: &Resource, batch: &[(Name, Entry)]) -> Result<(), String> {
        let ads = self.base.dynamic.ads.is_some();
        let mut errs = ConfigErrors::default();
        match r {
            Resource::Listener(l) => {
                if self.base.listeners.iter().any(|s| s.name == *name) {
                    return Err(format!(
                        "Listener {name:?}: a static listener has this name"
                    ));
                }
                let others = self
                    .base
                    .listeners
                    .iter()
                    .chain(self.entries(ResourceType::Listener).filter_map(|(n, e)| {
                        match &e.resource {
                            Resource::Listener(l) if n != name => Some(l),
                            _ => None,
                        }
                    }))
                    .chain(batch.iter().filter_map(|(_, e)| match &e.resource {
                        Resource::Listener(l) => Some(l),
                        _ => None,
                    }));
                if l.internal && self.base.internal_listener_buffer.is_none() {
                    return Err(format!(
                        "Listener {name:?}: internal_listener: {}",
                        crate::translate::INTERNAL_LISTENER_WITHOUT_REGISTRY
                    ));
                }
                for o in others {
                    if o.address == l.address && l.address.port() != 0 && !l.internal {
                        return Err(format!(
                            "Listener {name:?}: address {} is used by listener {:?}",
                            l.address, o.name
                        ));
                    }
                }
                crate::translate::check_listener_refs(
                    l,
                    &self.base.clusters,
                    &self.base.secrets,
                    ads,
                    false,
                    &mut errs,
                );
            }
            Resource::Cluster(c) => {
                if self.base.clusters.contains_key(name) {
                    return Err(format!("Cluster {name:?}: a static cluster has this name"));
                }
                crate::translate::check_cluster_refs(
                    c,
                    &self.base.clusters,
                    &self.base.secrets,
                    ads,
                    &mut errs,
                );
            }
            Resource::Route(rc) => crate::translate::check_route_clusters(
                rc,
                "",
                &self.base.clusters,
                false,
                &mut errs,
            ),
            Resource::Endpoint(_) | Resource::Secret(_) | Resource::Workload(_) => {}
        }
        if errs.is_empty() {
            Ok(())
        } else {
            let kind = match r {
                Resource::Listener(_) => "Listener",
                Resource::Cluster(_) => "Cluster",
                _ => "RouteConfiguration",
            };
            Err(format!(
                "{kind} {name:?}: {}",
                errs.0
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        }
    }

    /// Every dynamic reference of the bootstrap and the resources held:
    /// LDS/CDS wildcards (`None`), then RDS, SDS and EDS names, each with
    /// its config source.
    fn for_each_ref(&self, mut f: impl FnMut(&ConfigSource, ResourceType, Option<&Name>)) {
        if let Some(cs) = &self.base.dynamic.lds {
            f(cs, ResourceType::Listener, None);
        }
        if let Some(cs) = &self.base.dynamic.cds {
            f(cs, ResourceType::Cluster, None);
        }
        if let Some(cs) = &self.base.dynamic.wds {
            f(cs, ResourceType::Workload, None);
        }
        let listeners =
            self.base
                .listeners
                .iter()
                .chain(self.entries(ResourceType::Listener).filter_map(
                    |(_, e)| match &e.resource {
                        Resource::Listener(l) => Some(l),
                        _ => None,
                    },
                ));
        for l in listeners {
            for fc in l.filter_chains.iter().chain(&l.default_filter_chain) {
                if let NetworkFilter::Http(h) = &fc.filter {
                    if let RouteSource::Rds(r) = &h.routes {
                        f(&r.source, ResourceType::Route, Some(&r.name));
                    }
                }
                if let Some(t) = &fc.tls {
                    for s in &t.sds {
                        f(&s.source, ResourceType::Secret, Some(&s.name));
                    }
                }
            }
        }
        let clusters =
            self.base
                .clusters
                .values()
                .chain(self.entries(ResourceType::Cluster).filter_map(
                    |(_, e)| match &e.resource {
                        Resource::Cluster(c) => Some(c),
                        _ => None,
                    },
                ));
        for c in clusters {
            if let Some(e) = &c.eds {
                f(&e.source, ResourceType::Endpoint, Some(&e.service_name));
            }
            for t in std::iter::once(&c.transport)
                .chain(c.transport_matches.iter().map(|m| &m.transport))
            {
                if let Some(t) = t.tls() {
                    for s in &t.sds {
                        f(&s.source, ResourceType::Secret, Some(&s.name));
                    }
                }
            }
        }
    }

    /// What to subscribe to, from the bootstrap and the resources held.
    pub fn wanted(&self) -> Wanted {
        let mut w: Wanted = BTreeMap::new();
        self.for_each_ref(|src, rt, name| {
            let e = w.entry(src.kind.clone()).or_default();
            match name {
                None => {
                    e.insert(rt, Interest::Wildcard);
                }
                Some(n) => {
                    if let Interest::Names(s) = e
                        .entry(rt)
                        .or_insert_with(|| Interest::Names(BTreeSet::new()))
                    {
                        s.insert(n.clone());
                    }
                }
            }
        });
        w
    }

    /// Records the wanted names: new ones start their initial-fetch clock;
    /// resources of by-name types nobody wants any more are dropped.
    /// Returns true when something was dropped.
    pub fn note_wanted(&mut self, wanted: &Wanted) -> bool {
        let now = Instant::now();
        let mut by_type: BTreeMap<ResourceType, BTreeSet<Name>> = BTreeMap::new();
        let timeouts = self.fetch_timeouts();
        for types in wanted.values() {
            for (rt, i) in types {
                if let Interest::Names(ns) = i {
                    by_type.entry(*rt).or_default().extend(ns.iter().cloned());
                }
            }
        }
        for (rt, names) in &by_type {
            for n in names {
                let have = self.get(*rt, n).is_some();
                let key = (*rt, n.clone());
                if !have && !self.pending.contains_key(&key) && !self.timed_out.contains(&key) {
                    let t = timeouts.get(&key).copied().flatten();
                    // A deadline past the clock's range waits forever.
                    self.pending.insert(key, t.and_then(|t| now.checked_add(t)));
                }
            }
        }
        let mut dropped = false;
        for rt in [
            ResourceType::Route,
            ResourceType::Endpoint,
            ResourceType::Secret,
        ] {
            let keep = by_type.get(&rt);
            if let Some(m) = self.resources.get_mut(&rt) {
                let before = m.len();
                m.retain(|n, _| keep.is_some_and(|k| k.contains(n)));
                dropped |= m.len() != before;
            }
            self.pending
                .retain(|(t, n), _| *t != rt || keep.is_some_and(|k| k.contains(n)));
        }
        if dropped {
            self.dirty = None;
        }
        dropped
    }

    /// The initial_fetch_timeout of each referenced name.
    fn fetch_timeouts(&self) -> BTreeMap<(ResourceType, Name), Option<Duration>> {
        let mut out = BTreeMap::new();
        self.for_each_ref(|src, rt, name| {
            if let Some(n) = name {
                out.insert((rt, n.clone()), src.initial_fetch_timeout);
            }
        });
        out
    }

    /// Gives up waiting for names whose initial fetch timed out. True when
    /// something changed (re-assemble).
    pub fn expire(&mut self, now: Instant) -> bool {
        let due: Vec<(ResourceType, Name)> = self
            .pending
            .iter()
            .filter(|(_, d)| d.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.pending.remove(k);
            if &*k.1 == WILDCARD {
                self.received.insert(k.0);
            } else {
                self.timed_out.insert(k.clone());
            }
        }
        if !due.is_empty() {
            self.dirty = None;
        }
        !due.is_empty()
    }

    /// The earliest initial-fetch deadline still pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().flatten().min().copied()
    }

    /// Whether the initial fetch is complete (Envoy's init manager): LDS
    /// and CDS answered (or timed out), and nothing is warming. Latches.
    pub fn init_done(&mut self) -> bool {
        if !self.init_done {
            let lds =
                self.base.dynamic.lds.is_none() || self.received.contains(&ResourceType::Listener);
            let cds =
                self.base.dynamic.cds.is_none() || self.received.contains(&ResourceType::Cluster);
            self.init_done =
                lds && cds && self.warming_clusters.is_empty() && self.warming_listeners.is_empty();
        }
        self.init_done
    }

    fn present(&self, rt: ResourceType, name: &Name) -> bool {
        self.get(rt, name).is_some() || self.timed_out.contains(&(rt, name.clone()))
    }

    fn secrets_ready(&self, sds: &[SdsRef]) -> bool {
        sds.iter()
            .all(|s| self.present(ResourceType::Secret, &s.name))
    }

    fn cluster_ready(&mut self, name: &Name, c: &Arc<Cluster>) -> Option<Arc<Cluster>> {
        let tls_ok = std::iter::once(&c.transport)
            .chain(c.transport_matches.iter().map(|m| &m.transport))
            .filter_map(|t| t.tls())
            .all(|t| self.secrets_ready(&t.sds));
        if !tls_ok {
            return None;
        }
        let Some(e) = &c.eds else {
            return Some(c.clone());
        };
        let eps = match self.get(ResourceType::Endpoint, &e.service_name) {
            Some(Resource::Endpoint(eps)) => Some(eps.clone()),
            _ if self
                .timed_out
                .contains(&(ResourceType::Endpoint, e.service_name.clone())) =>
            {
                None
            }
            _ => return None,
        };
        if let Some((src, ep, merged)) = self.merged.get(name) {
            let same_eps = match (ep, &eps) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if Arc::ptr_eq(src, c) && same_eps {
                return Some(merged.clone());
            }
        }
        let mut m = (**c).clone();
        if let Some(eps) = &eps {
            m.localities = eps.localities.clone();
            m.overprovisioning_factor = eps.overprovisioning_factor;
            m.weighted_priority_health = eps.weighted_priority_health;
        }
        let m = Arc::new(m);
        self.merged
            .insert(name.clone(), (c.clone(), eps, m.clone()));
        Some(m)
    }

    fn listener_ready(&self, l: &Listener) -> bool {
        l.filter_chains
            .iter()
            .chain(&l.default_filter_chain)
            .all(|fc| {
                let routes = match &fc.filter {
                    NetworkFilter::Http(h) => match &h.routes {
                        RouteSource::Rds(r) => self.present(ResourceType::Route, &r.name),
                        RouteSource::Static(_) => true,
                    },
                    NetworkFilter::Tcp(_) => true,
                };
                routes && fc.tls.as_ref().is_none_or(|t| self.secrets_ready(&t.sds))
            })
    }

    /// Builds the snapshot to serve: static resources plus every warm
    /// dynamic one (or its previous warm version while the new one warms),
    /// and what changed since the last one. When only EDS assignments
    /// changed, only the clusters using them are looked at again: the cost
    /// follows the size of the change, not of the configuration.
    pub fn assemble(&mut self) -> (Arc<Snapshot>, Change) {
        let dirty = self.dirty.replace(BTreeSet::new());
        let (snap, change) = match (dirty, self.last.take()) {
            (Some(names), Some(last)) => {
                let (snap, changed) = self.assemble_clusters(&last, names);
                (snap, Change::Clusters(changed))
            }
            _ => (self.assemble_full(), Change::Full),
        };
        let snap = Arc::new(snap);
        self.last = Some(snap.clone());
        (snap, change)
    }

    /// Makes the next assembly a full one.
    pub fn invalidate(&mut self) {
        self.dirty = None;
    }

    /// `last` with the clusters `names` looked at again; returns the names
    /// whose cluster in the snapshot changed.
    fn assemble_clusters(
        &mut self,
        last: &Snapshot,
        names: BTreeSet<Name>,
    ) -> (Snapshot, BTreeSet<Name>) {
        let mut snap = last.clone();
        let mut changed = BTreeSet::new();
        for n in names {
            let (cluster, dynamic) = match self.base.clusters.get(&n) {
                Some(c) => (c.clone(), false),
                None => match self.get(ResourceType::Cluster, &n) {
                    Some(Resource::Cluster(c)) => (c.clone(), true),
                    _ => continue,
                },
            };
            match self.cluster_ready(&n, &cluster) {
                Some(m) => {
                    if dynamic {
                        self.warming_clusters.remove(&n);
                        self.active_clusters.insert(n.clone(), m.clone());
                    }
                    if !snap.clusters.get(&n).is_some_and(|o| Arc::ptr_eq(o, &m)) {
                        snap.clusters.insert(n.clone(), m);
                        changed.insert(n);
                    }
                }
                // Its previous version (if any) keeps serving.
                None if dynamic => {
                    self.warming_clusters.insert(n);
                }
                None => {}
            }
        }
        (snap, changed)
    }

    fn assemble_full(&mut self) -> Snapshot {
        let mut snap = (*self.base).clone();
        for (n, e) in self.entries(ResourceType::Secret) {
            if let Resource::Secret(s) = &e.resource {
                snap.secrets.insert(n.clone(), s.clone());
            }
        }
        for (n, e) in self.entries(ResourceType::Route) {
            if let Resource::Route(r) = &e.resource {
                snap.routes.insert(n.clone(), r.clone());
            }
        }
        // Static EDS clusters take their endpoints as they come.
        let statics: Vec<(Name, Arc<Cluster>)> = snap
            .clusters
            .iter()
            .filter(|(_, c)| c.eds.is_some())
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        for (n, c) in statics {
            if let Some(m) = self.cluster_ready(&n, &c) {
                snap.clusters.insert(n, m);
            }
        }
        let cds: Vec<(Name, Arc<Cluster>)> = self
            .entries(ResourceType::Cluster)
            .filter_map(|(n, e)| match &e.resource {
                Resource::Cluster(c) => Some((n.clone(), c.clone())),
                _ => None,
            })
            .collect();
        let mut warming = BTreeSet::new();
        let mut active = BTreeMap::new();
        for (n, c) in cds {
            match self.cluster_ready(&n, &c) {
                Some(m) => {
                    active.insert(n.clone(), m.clone());
                    snap.clusters.insert(n, m);
                }
                None => {
                    if let Some(prev) = self.active_clusters.get(&n) {
                        active.insert(n.clone(), prev.clone());
                        snap.clusters.insert(n.clone(), prev.clone());
                    }
                    warming.insert(n);
                }
            }
        }
        self.merged.retain(|n, _| {
            active.contains_key(n) || warming.contains(n) || self.base.clusters.contains_key(n)
        });
        self.active_clusters = active;
        self.warming_clusters = warming;

        let lds: Vec<(Name, Arc<Listener>)> = self
            .entries(ResourceType::Listener)
            .filter_map(|(n, e)| match &e.resource {
                Resource::Listener(l) => Some((n.clone(), l.clone())),
                _ => None,
            })
            .collect();
        let mut warming = BTreeSet::new();
        let mut active = BTreeMap::new();
        for (n, l) in lds {
            if self.listener_ready(&l) {
                active.insert(n.clone(), l.clone());
                snap.listeners.push(l);
            } else {
                if let Some(prev) = self.active_listeners.get(&n) {
                    active.insert(n.clone(), prev.clone());
                    snap.listeners.push(prev.clone());
                }
                warming.insert(n);
            }
        }
        self.active_listeners = active;
        self.warming_listeners = warming;

        self.eds_users.clear();
        let clusters =
            self.base
                .clusters
                .iter()
                .chain(self.entries(ResourceType::Cluster).filter_map(
                    |(n, e)| match &e.resource {
                        Resource::Cluster(c) => Some((n, c)),
                        _ => None,
                    },
                ));
        let mut users: HashMap<Name, Vec<Name>> = HashMap::new();
        for (n, c) in clusters {
            if let Some(e) = &c.eds {
                users
                    .entry(e.service_name.clone())
                    .or_default()
                    .push(n.clone());
            }
        }
        self.eds_users = users;
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{any_from_text, parse_bootstrap, ParseOptions};

    const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    fn state() -> DynamicState {
        let b = parse_bootstrap(
            r#"
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
  cds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment:
      cluster_name: xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
  - name: static_eds
    type: EDS
    eds_cluster_config: {eds_config: {ads: {}, resource_api_version: V3}, service_name: shared}
"#,
            ParseOptions::default(),
        )
        .expect("bootstrap parses");
        let snap = crate::translate::bootstrap_to_snapshot(&b).expect("bootstrap translates");
        DynamicState::new(Arc::new(snap))
    }

    fn cluster(name: &str, service: &str) -> (Option<String>, Any, String) {
        let text = format!(
            "name: {name}\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3}}, service_name: {service}}}\n"
        );
        (
            None,
            any_from_text(CLUSTER, &text).expect("cluster parses"),
            "1".into(),
        )
    }

    fn cla(name: &str, port: u16) -> (Option<String>, Any, String) {
        let text = format!(
            "cluster_name: {name}\nendpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]\n"
        );
        (
            None,
            any_from_text(CLA, &text).expect("assignment parses"),
            port.to_string(),
        )
    }

    fn ports(s: &Snapshot, name: &str) -> Vec<u16> {
        s.clusters[name]
            .localities
            .iter()
            .flat_map(|l| &l.endpoints)
            .filter_map(|e| match e.address {
                EndpointAddress::Ip(a) => Some(a.port()),
                _ => None,
            })
            .collect()
    }

    fn names(ns: &[&str]) -> BTreeSet<Name> {
        ns.iter().map(|n| Name::from(*n)).collect()
    }

    /// Checks the incremental result against a full assembly of the same
    /// state.
    fn assert_same_as_full(st: &mut DynamicState, snap: &Snapshot) {
        let warming = st.warming_clusters.clone();
        st.invalidate();
        let (full, change) = st.assemble();
        assert_eq!(change, Change::Full);
        assert_eq!(*full, *snap);
        assert_eq!(st.warming_clusters, warming);
    }

    #[test]
    fn endpoint_changes_reassemble_only_their_clusters() {
        let mut st = state();
        let a = st.apply(
            ResourceType::Cluster,
            &[
                cluster("a", "ea"),
                cluster("b", "eb"),
                cluster("c", "shared"),
            ],
            &[],
            true,
        );
        assert!(a.rejected.is_empty(), "{:?}", a.rejected);
        let w = st.wanted();
        st.note_wanted(&w);
        let (_, change) = st.assemble();
        assert_eq!(change, Change::Full);
        assert_eq!(st.warming_clusters, names(&["a", "b", "c"]));

        // The first EDS response: a full assembly (a type's first answer).
        st.apply(ResourceType::Endpoint, &[cla("ea", 1001)], &[], false);
        let (snap, change) = st.assemble();
        assert_eq!(change, Change::Full);
        assert_eq!(ports(&snap, "a"), [1001]);
        assert_eq!(st.warming_clusters, names(&["b", "c"]));

        // One assignment used by two clusters (one static, one CDS): both
        // warm, nothing else is looked at.
        st.apply(ResourceType::Endpoint, &[cla("shared", 1003)], &[], false);
        let (snap, change) = st.assemble();
        assert_eq!(change, Change::Clusters(names(&["c", "static_eds"])));
        assert_eq!(ports(&snap, "c"), [1003]);
        assert_eq!(ports(&snap, "static_eds"), [1003]);
        assert_eq!(st.warming_clusters, names(&["b"]));
        assert_same_as_full(&mut st, &snap);

        // An update of one: only that cluster changes; the others are the
        // same `Arc`s as before.
        let before = snap.clone();
        st.apply(ResourceType::Endpoint, &[cla("ea", 2001)], &[], false);
        let (snap, change) = st.assemble();
        assert_eq!(change, Change::Clusters(names(&["a"])));
        assert_eq!(ports(&snap, "a"), [2001]);
        assert!(Arc::ptr_eq(&snap.clusters["c"], &before.clusters["c"]));
        assert_same_as_full(&mut st, &snap);

        // The same content again: no change at all.
        st.apply(ResourceType::Endpoint, &[cla("ea", 2001)], &[], false);
        let (_, change) = st.assemble();
        assert_eq!(change, Change::Clusters(BTreeSet::new()));

        // A removed assignment: its cluster warms again, its last version
        // keeps serving.
        st.apply(ResourceType::Endpoint, &[], &["ea".into()], false);
        let (snap, change) = st.assemble();
        assert_eq!(change, Change::Clusters(BTreeSet::new()));
        assert_eq!(ports(&snap, "a"), [2001]);
        assert_eq!(st.warming_clusters, names(&["a", "b"]));
        assert_same_as_full(&mut st, &snap);

        // A CDS change is a full assembly.
        st.apply(ResourceType::Cluster, &[cluster("a", "ea")], &[], true);
        let (snap, change) = st.assemble();
        assert_eq!(change, Change::Full);
        assert!(!snap.clusters.contains_key("b"));
    }

    fn workload(uid: &str, addresses: Vec<Vec<u8>>) -> (Option<String>, Any, String) {
        use prost::Message;
        let w = crate::translate::workload::proto::Workload {
            uid: uid.into(),
            addresses,
            ..Default::default()
        };
        (
            Some(uid.into()),
            Any {
                type_url: crate::translate::workload::WORKLOAD_TYPE_URL.into(),
                value: w.encode_to_vec(),
            },
            "1".into(),
        )
    }

    #[test]
    fn workloads_are_held_apart_from_the_snapshot() {
        let b = parse_bootstrap(
            r#"
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
  cds_config: {ads: {}, resource_api_version: V3}
bootstrap_extensions:
- name: metadata_discovery
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/istio.workload.BootstrapExtension
    value: {config_source: {ads: {}}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment:
      cluster_name: xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
"#,
            ParseOptions::default(),
        )
        .expect("bootstrap parses");
        let snap = crate::translate::bootstrap_to_snapshot(&b).expect("bootstrap translates");
        let mut st = DynamicState::new(Arc::new(snap));
        // Wildcard WDS on ADS, next to CDS.
        let w = st.wanted();
        assert_eq!(
            w[&SourceKind::Ads].get(&ResourceType::Workload),
            Some(&Interest::Wildcard)
        );
        let (first, _) = st.assemble();
        // One good, one bad (a 5-byte address): the bad one is rejected
        // with its reason, the good one held; the snapshot is untouched.
        let a = st.apply(
            ResourceType::Workload,
            &[
                workload("a", vec![vec![10, 0, 0, 1]]),
                workload("b", vec![vec![1; 5]]),
            ],
            &[],
            false,
        );
        assert!(a.changed);
        assert_eq!(a.rejected.len(), 1);
        assert!(
            a.rejected[0].reason.contains("addresses[0]: 5 bytes"),
            "{}",
            a.rejected[0].reason
        );
        assert_eq!(st.workloads().len(), 1);
        let (again, change) = st.assemble();
        assert_eq!(change, Change::Clusters(BTreeSet::new()));
        assert_eq!(*again, *first);
        // WDS does not complete (or hold up) the initial fetch: CDS does.
        assert!(!st.init_done());
        st.apply(ResourceType::Cluster, &[], &[], true);
        assert!(st.init_done());
        // The same content again changes nothing; a removal does.
        let a = st.apply(
            ResourceType::Workload,
            &[workload("a", vec![vec![10, 0, 0, 1]])],
            &[],
            false,
        );
        assert!(!a.changed);
        let a = st.apply(ResourceType::Workload, &[], &["a".into()], false);
        assert!(a.changed);
        assert!(st.workloads().is_empty());
    }
}

#[cfg(test)]
mod internal_listener_tests {
    use super::*;
    use crate::bootstrap::{any_from_text, parse_bootstrap, ParseOptions};

    const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

    fn state(extension: bool) -> DynamicState {
        let ext = if extension {
            "bootstrap_extensions:\n- name: envoy.bootstrap.internal_listener\n  typed_config: {\"@type\": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener, buffer_size_kb: 64}\n"
        } else {
            ""
        };
        let b = parse_bootstrap(
            &format!(
                "{ext}dynamic_resources:\n  lds_config: {{path_config_source: {{path: /nonexistent}}, resource_api_version: V3}}\n"
            ),
            ParseOptions::default(),
        )
        .expect("bootstrap parses");
        let snap = crate::translate::bootstrap_to_snapshot(&b).expect("bootstrap translates");
        DynamicState::new(Arc::new(snap))
    }

    fn internal_listener() -> (Option<String>, Any, String) {
        let text = "name: inner\ninternal_listener: {}\nfilter_chains:\n- filters:\n  - name: tcp\n    typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}\n";
        (
            None,
            any_from_text(LISTENER, text).expect("listener parses"),
            "1".into(),
        )
    }

    #[test]
    fn lds_internal_listener_needs_the_bootstrap_extension() {
        let mut st = state(false);
        let a = st.apply(ResourceType::Listener, &[internal_listener()], &[], true);
        let why = a.error_detail().expect("NACK");
        assert!(
            why.contains("\"inner\"")
                && why.contains("internal listener registry is not initialized"),
            "{why}"
        );
        let mut st = state(true);
        assert_eq!(st.base().internal_listener_buffer, Some(64 * 1024));
        let a = st.apply(ResourceType::Listener, &[internal_listener()], &[], true);
        assert!(a.rejected.is_empty(), "{:?}", a.rejected);
    }
}
