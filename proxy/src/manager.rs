//! Applying a configuration snapshot to the running server: the listener
//! manager (add, update in place, remove), the cluster manager swap, and
//! the RDS route tables. Runs on the control thread, once at start and on
//! every accepted xDS change.
use std::{
    collections::{BTreeMap, HashMap},
    net::TcpListener as StdListener,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use xds_client::config::{Listener, Name, RouteConfig, Snapshot};
use xds_client::xds::state::Change;

use crate::{
    access_log::Logger,
    listener::{self, ChainRuntime, ListenerHandle, ListenerRuntime},
    metrics::ListenerStats,
    Shared,
};

/// A command to one worker.
pub enum WorkerCmd {
    /// Start accepting on this socket for this listener.
    Listen(Arc<ListenerHandle>, StdListener),
}

/// The RDS route tables by name. HCMs hold the slot; an update stores the
/// new table, which the next request loads.
#[derive(Default)]
pub struct RdsSlots(Mutex<HashMap<Name, Arc<ArcSwap<RouteConfig>>>>);

impl RdsSlots {
    /// The slot of `name`, created with `initial` (or an empty table).
    pub fn slot(
        &self,
        name: &Name,
        initial: Option<&Arc<RouteConfig>>,
    ) -> Arc<ArcSwap<RouteConfig>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.clone())
            .or_insert_with(|| {
                Arc::new(ArcSwap::new(
                    initial
                        .cloned()
                        .unwrap_or_else(|| Arc::new(empty_routes(name))),
                ))
            })
            .clone()
    }

    /// Stores every table of the snapshot whose content changed; drops
    /// slots no HCM uses any more.
    fn update(&self, routes: &BTreeMap<Name, Arc<RouteConfig>>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, s| Arc::strong_count(s) > 1);
        for (name, slot) in m.iter() {
            if let Some(rc) = routes.get(name) {
                let cur = slot.load();
                if !Arc::ptr_eq(&cur, rc) && **cur != **rc {
                    slot.store(rc.clone());
                }
            }
        }
    }
}

/// An RDS table that has not arrived (or timed out): every request is
/// answered 404 (no route), as Envoy.
fn empty_routes(name: &str) -> RouteConfig {
    let p = xds_client::api::envoy::config::route::v3::RouteConfiguration {
        name: name.to_owned(),
        ..Default::default()
    };
    xds_client::translate::route::route_config(&p, "").expect("an empty route table is valid")
}

/// Binds and builds a listener, and hands its sockets to the workers.
fn add_listener(
    shared: &Arc<Shared>,
    l: &Arc<Listener>,
    snap: &Snapshot,
) -> anyhow::Result<Arc<ListenerHandle>> {
    use anyhow::Context as _;
    // An internal listener binds nothing: connections reach it by name.
    let (bound, sockets) = if l.internal {
        (l.address, Vec::new())
    } else {
        listener::bind(l, shared.workers)
            .with_context(|| format!("cannot bind listener {:?} on {}", l.name, l.address))?
    };
    let version = build_version(shared, l, bound, None, snap)?;
    let handle = Arc::new(ListenerHandle {
        name: l.name.clone(),
        bound,
        current: ArcSwap::from_pointee(version),
        internal: l.internal,
        stop_accept: watch::channel(false).0,
    });
    if l.internal {
        tracing::info!(listener = %l.name, "internal listener added");
        return Ok(handle);
    }
    let mut sockets = sockets.into_iter();
    for tx in &shared.worker_tx {
        if let Some(s) = sockets.next() {
            let _ = tx.send(WorkerCmd::Listen(handle.clone(), s));
        }
    }
    tracing::info!(listener = %l.name, address = %bound, "listener bound");
    Ok(handle)
}

/// Builds one version of a listener; chains whose configuration equals one
/// of `prev`'s keep their runtime.
fn build_version(
    shared: &Arc<Shared>,
    l: &Arc<Listener>,
    bound: std::net::SocketAddr,
    prev: Option<&ListenerRuntime>,
    snap: &Snapshot,
) -> anyhow::Result<ListenerRuntime> {
    // Stats carry the bound address when the config's port is 0.
    let prefix =
        if l.stat_prefix == format!("listener.{}.", l.address.to_string().replace(':', "_")) {
            format!("listener.{}.", bound.to_string().replace(':', "_"))
        } else {
            l.stat_prefix.clone()
        };
    let stats = ListenerStats::new(&shared.stats, &prefix);
    let tls_env = shared.tls_env(snap);
    let env = listener::ChainEnv {
        store: &shared.stats,
        writer: &shared.writer,
        tls: &tls_env,
        ssl_stats: stats.ssl.clone(),
        rds: &shared.rds,
        routes: &snap.routes,
        callouts: crate::upstream::callout::ClusterCallouts::shared(shared),
        node: &snap.node,
        default_tracer: snap.default_tracer.as_ref(),
    };
    let reuse = |fc: &Arc<xds_client::config::FilterChain>| -> Option<Arc<ChainRuntime>> {
        prev?
            .all_chains()
            .find(|c| Arc::ptr_eq(&c.config, fc) || *c.config == **fc)
            .cloned()
    };
    let mut chains = Vec::new();
    for fc in &l.filter_chains {
        chains.push(match reuse(fc) {
            Some(c) => c,
            None => listener::build_chain(fc, bound.port(), l.buffer_limit, &env)?,
        });
    }
    let default_chain = match &l.default_filter_chain {
        Some(fc) => Some(match reuse(fc) {
            Some(c) => c,
            None => listener::build_chain(fc, bound.port(), l.buffer_limit, &env)?,
        }),
        None => None,
    };
    Ok(ListenerRuntime {
        config: l.clone(),
        chains,
        default_chain,
        stats,
        proxy_proto: l
            .listener_filters
            .iter()
            .filter_map(|f| match f {
                xds_client::config::ListenerFilter::ProxyProtocol(p) => Some(
                    crate::metrics::ProxyProtoStats::new(&shared.stats, &p.stat_prefix),
                ),
                _ => None,
            })
            .collect(),
        bound,
        logs: l
            .access_logs
            .iter()
            .map(|a| Arc::new(Logger::new(a.clone(), shared.writer.clone())))
            .collect(),
        draining: std::sync::atomic::AtomicBool::new(false),
    })
}

/// Applies the start-up snapshot: binding errors fail the start.
pub fn apply_initial(shared: &Arc<Shared>, snap: &Snapshot) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for l in &snap.listeners {
        handles.push(add_listener(shared, l, snap)?);
    }
    shared.listeners.store(Arc::new(handles));
    update_gauges(shared);
    Ok(())
}

/// Applies a new snapshot to the running server (xDS). Problems building
/// one listener (a port in use, say) are logged and counted; the rest
/// applies. `change` says what differs from the running snapshot: when
/// only some clusters changed (EDS), only those are looked at.
pub fn apply(shared: &Arc<Shared>, snap: Arc<Snapshot>, change: &Change) {
    let _serial = shared.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
    let tls_env = shared.tls_env(&snap);
    let only = match change {
        Change::Full => None,
        Change::Clusters(names) => Some(names),
    };
    for c in shared
        .clusters
        .apply(&snap, only, &shared.stats, shared.workers, &tls_env)
    {
        // Runs on the control runtime (the caller's): DNS refresh, outlier
        // detection timer.
        if tokio::runtime::Handle::try_current().is_ok() {
            crate::upstream::spawn_control_tasks(&c);
        }
    }
    if only.is_some() {
        // Listeners, routes and secrets are the same `Arc`s as before.
        shared.snapshot.store(snap);
        update_gauges(shared);
        return;
    }
    apply_rest(shared, snap, &tls_env);
}

/// The listeners, RDS tables and secrets of a full update.
fn apply_rest(shared: &Arc<Shared>, snap: Arc<Snapshot>, tls_env: &crate::upstream::TlsEnv) {
    shared.rds.update(&snap.routes);
    // SDS: contexts built with a secret that changed rebuild (rotation for
    // new handshakes; established connections keep theirs).
    let old_secrets = &shared.snapshot.load().secrets;
    let changed: Vec<Name> = snap
        .secrets
        .iter()
        .filter(|(n, s)| {
            old_secrets
                .get(*n)
                .is_some_and(|o| !Arc::ptr_eq(o, s) && **o != ***s)
        })
        .map(|(n, _)| n.clone())
        .collect();
    if !changed.is_empty() {
        shared.tls.secrets_changed(&tls_env.secrets, &changed);
    }

    let old = shared.listeners.load_full();
    let mut next: Vec<Arc<ListenerHandle>> = Vec::new();
    for l in &snap.listeners {
        let existing = old.iter().find(|h| h.name == l.name);
        match existing {
            Some(h) => {
                let cur = h.current.load_full();
                if Arc::ptr_eq(&cur.config, l) || *cur.config == **l {
                    next.push(h.clone());
                    continue;
                }
                if cur.config.address == l.address
                    && cur.config.socket == l.socket
                    && cur.config.internal == l.internal
                {
                    // In place: same sockets, chains that did not change
                    // keep their connections; the others drain.
                    match build_version(shared, l, h.bound, Some(&cur), &snap) {
                        Ok(v) => {
                            let kept: Vec<*const ChainRuntime> =
                                v.all_chains().map(Arc::as_ptr).collect();
                            for c in cur.all_chains() {
                                if !kept.contains(&Arc::as_ptr(c)) {
                                    c.drain_for_update();
                                }
                            }
                            h.current.store(Arc::new(v));
                            shared.server_stats.listener_modified.inc();
                            tracing::info!(listener = %l.name, "listener updated in place");
                        }
                        Err(e) => {
                            shared.server_stats.listener_create_failure.inc();
                            tracing::error!(listener = %l.name, "cannot update listener: {e:#}");
                        }
                    }
                    next.push(h.clone());
                    continue;
                }
                // A new address: the old listener drains, a new one binds.
                h.remove();
                shared.server_stats.listener_removed.inc();
                match add_listener(shared, l, &snap) {
                    Ok(n) => {
                        shared.server_stats.listener_added.inc();
                        next.push(n);
                    }
                    Err(e) => {
                        shared.server_stats.listener_create_failure.inc();
                        tracing::error!(listener = %l.name, "{e:#}");
                    }
                }
            }
            None => match add_listener(shared, l, &snap) {
                Ok(n) => {
                    shared.server_stats.listener_added.inc();
                    next.push(n);
                }
                Err(e) => {
                    shared.server_stats.listener_create_failure.inc();
                    tracing::error!(listener = %l.name, "{e:#}");
                }
            },
        }
    }
    for h in old.iter() {
        if !snap.listeners.iter().any(|l| l.name == h.name) {
            tracing::info!(listener = %h.name, "listener removed; draining");
            h.remove();
            shared.server_stats.listener_removed.inc();
        }
    }
    shared.listeners.store(Arc::new(next));
    shared.snapshot.store(snap);
    update_gauges(shared);
}

fn update_gauges(shared: &Shared) {
    shared
        .server_stats
        .active_clusters
        .set(shared.clusters.clusters.load().len() as i64);
    shared
        .server_stats
        .total_listeners_active
        .set(shared.listeners.load().len() as i64);
}

/// Creates the per-worker command channels.
pub fn worker_channels(
    n: usize,
) -> (
    Vec<mpsc::UnboundedSender<WorkerCmd>>,
    Vec<mpsc::UnboundedReceiver<WorkerCmd>>,
) {
    (0..n).map(|_| mpsc::unbounded_channel()).unzip()
}
