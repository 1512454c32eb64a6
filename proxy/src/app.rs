//! Wiring: the shared state, worker runtimes, the control runtime (admin,
//! DNS), and the lifecycle (drain, exit).
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::{watch, Notify};
use xds_client::{api::envoy::config::bootstrap::v3::Bootstrap, config::Snapshot};

use crate::{
    access_log::{Logger, Writer},
    cli::Options,
    listener::{self, ListenerHandle},
    metrics::ServerStats,
    stats::Store,
    upstream::ClusterManager,
};

/// State shared by every worker and the control runtime.
pub struct Shared {
    /// The configuration being served (swapped by xDS).
    pub snapshot: arc_swap::ArcSwap<Snapshot>,
    pub bootstrap: Bootstrap,
    pub clusters: ClusterManager,
    /// Live TLS contexts (for `/certs` and certificate rotation).
    pub tls: Arc<crate::tls::Registry>,
    pub stats: Arc<Store>,
    pub server_stats: ServerStats,
    pub options: Options,
    pub started: std::time::SystemTime,
    pub listeners: arc_swap::ArcSwap<Vec<Arc<ListenerHandle>>>,
    /// RDS route tables.
    pub rds: crate::manager::RdsSlots,
    /// Commands to each worker (new listener sockets).
    pub worker_tx: Vec<tokio::sync::mpsc::UnboundedSender<crate::manager::WorkerCmd>>,
    /// Serialises configuration applies.
    pub apply_lock: Mutex<()>,
    /// The xDS client, when the bootstrap has `dynamic_resources`.
    pub xds: std::sync::OnceLock<Arc<xds_client::xds::XdsClient>>,
    pub writer: Writer,
    /// Drain signal: true = stop accepting, drain connections.
    pub drain: watch::Sender<bool>,
    /// Set when the process should exit (after draining).
    pub exit: Notify,
    pub exit_requested: AtomicBool,
    pub active_connections: AtomicU64,
    pub max_connections: Option<u64>,
    pub next_conn_id: AtomicU64,
    pub healthcheck_failed: AtomicBool,
    /// The initial configuration is complete (xDS initial fetch done).
    pub initialized: AtomicBool,
    pub admin_addr: Mutex<Option<SocketAddr>>,
    pub workers: usize,
    /// `admin.access_log` loggers.
    pub admin_logs: Vec<Arc<Logger>>,
    /// Workload discovery's index (address -> peer), swapped on each WDS
    /// change; read by peer metadata's `workload_discovery`.
    pub workloads: filters::istio::workloads::Workloads,
}

impl Shared {
    /// What building TLS contexts needs, with the snapshot's secrets.
    pub fn tls_env(&self, snap: &Snapshot) -> crate::upstream::TlsEnv {
        crate::upstream::TlsEnv {
            secrets: Arc::new(snap.secrets.clone()),
            registry: self.tls.clone(),
        }
    }
}

/// A running server.
pub struct Server {
    pub shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Builds everything, binds listeners and starts workers and admin.
    pub fn start(
        options: Options,
        bootstrap: Bootstrap,
        snapshot: Snapshot,
    ) -> anyhow::Result<Server> {
        let workers = options
            .concurrency
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1);
        let multi_thread = std::env::var("WEIR_RUNTIME").as_deref() == Ok("multi-thread");
        // The node Istio's filters report (Envoy's `LocalInfo`).
        filters::istio::set_local_node(&snapshot.node);
        let stats = Store::new(workers, snapshot.stats.clone());
        crate::logging::remember_level(&options.log_level);
        let server_stats = ServerStats::new(&stats);
        let writer = Writer::start(
            Duration::from_millis(options.file_flush_interval_msec.max(1)),
            (options.file_flush_min_size_kb as usize) * 1024,
            &stats,
        );
        let tls = Arc::new(crate::tls::Registry::default());
        let tls_env = crate::upstream::TlsEnv {
            secrets: Arc::new(snapshot.secrets.clone()),
            registry: tls.clone(),
        };
        let clusters = ClusterManager::new(&snapshot, &stats, workers, &tls_env)
            .map_err(anyhow::Error::msg)?;
        // The multi-thread measurement model accepts on one socket per
        // listener, shared by its threads.
        let (worker_tx, worker_rx) =
            crate::manager::worker_channels(if multi_thread { 1 } else { workers });
        let (drain, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            snapshot: arc_swap::ArcSwap::from_pointee(snapshot.clone()),
            bootstrap,
            clusters,
            tls,
            stats: stats.clone(),
            server_stats,
            max_connections: snapshot.max_downstream_connections,
            options,
            started: std::time::SystemTime::now(),
            listeners: arc_swap::ArcSwap::from_pointee(Vec::new()),
            rds: Default::default(),
            worker_tx,
            apply_lock: Mutex::new(()),
            xds: std::sync::OnceLock::new(),
            writer: writer.clone(),
            drain,
            exit: Notify::new(),
            exit_requested: AtomicBool::new(false),
            active_connections: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
            healthcheck_failed: AtomicBool::new(false),
            initialized: AtomicBool::new(false),
            admin_addr: Mutex::new(None),
            workers,
            admin_logs: snapshot
                .admin
                .iter()
                .flat_map(|a| a.access_logs.iter())
                .map(|a| Arc::new(Logger::new(a.clone(), writer.clone())))
                .collect(),
            workloads: filters::istio::workloads::new_workloads(),
        });
        crate::manager::apply_initial(&shared, &snapshot)?;
        shared.server_stats.concurrency.set(workers as i64);
        // With xDS the server is INITIALIZING until the initial fetch
        // completes (Envoy's init manager); otherwise LIVE at once.
        let dynamic = !snapshot.dynamic.is_empty() || has_dynamic_refs(&snapshot);
        shared.server_stats.state.set(if dynamic { 3 } else { 0 });
        shared.server_stats.live.set(i64::from(!dynamic));
        shared.initialized.store(!dynamic, Ordering::SeqCst);

        // Control runtime: admin, DNS refresh, uptime, xDS.
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let s2 = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("weir-control".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    rt.block_on(control(s2, ready_tx));
                })?,
        );
        ready_rx
            .recv()
            .context("control runtime stopped during start")??;

        let mut worker_rx = worker_rx.into_iter();
        // WEIR_RUNTIME=multi-thread: one work-stealing runtime with `workers`
        // threads sharing one socket per listener. Kept only to measure the
        // worker model against (ARCHITECTURE.md); the default is below.
        if multi_thread {
            let rx = worker_rx.next().expect("one channel");
            threads.push(spawn_multi_thread(shared.clone(), workers, rx)?);
        } else {
            // Workers: one current-thread runtime each, with its own
            // listener sockets (sent as commands, also for later listeners).
            for (i, mut rx) in worker_rx.enumerate() {
                let s = shared.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("weir-worker-{i}"))
                        .spawn(move || {
                            crate::stats::set_worker_shard(i);
                            // A worker lives as long as the process.
                            crate::alloc::enable_thread_cache();
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("worker runtime");
                            rt.block_on(async move {
                                s.server_stats.workers_started.inc();
                                run_worker(&s, &mut rx).await;
                            });
                        })?,
                );
            }
        }
        // The data path never needs protobuf descriptors: free the ones the
        // bootstrap loaded. With xDS too: the pool loads lazily, so checking
        // resources brings back only the files their types need.
        xds_client::descriptors::release();
        crate::netif::trim_heap();
        // Start-up code and tables need not stay resident (the serving path
        // faults back in what it uses).
        if crate::netif::drop_binary_pages() == 0 {
            crate::netif::drop_static_pages(xds_client::descriptors::embedded_bytes());
        }
        Ok(Server { shared, threads })
    }

    /// The admin address, once bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *self.shared.admin_addr.lock().expect("admin addr lock")
    }

    /// The bound address of listener `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .listeners
            .load()
            .iter()
            .find(|l| &*l.name == name)
            .map(|l| l.bound)
    }

    /// Starts a drain; the process exits once connections finish or
    /// `drain_time` passes.
    pub fn begin_shutdown(&self) {
        begin_drain(&self.shared, true);
    }

    /// Blocks until the server has exited.
    pub fn wait(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A worker's life: accept loops for every listener socket it is sent,
/// until exit.
async fn run_worker(
    s: &Arc<Shared>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<crate::manager::WorkerCmd>,
) {
    crate::internal::set_worker(s);
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(crate::manager::WorkerCmd::Listen(h, sock)) => {
                    tokio::spawn(listener::accept_loop(h, sock, s.clone()));
                }
                None => break,
            },
            // Connections keep going after accept loops stop; the runtime
            // ends at exit.
            _ = s.exit.notified() => break,
        }
    }
}

/// The alternative worker model (measurement only): one multi-thread runtime.
fn spawn_multi_thread(
    shared: Arc<Shared>,
    workers: usize,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::manager::WorkerCmd>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-mt".into())
        .spawn(move || {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .on_thread_start({
                    let s = shared.clone();
                    move || {
                        crate::stats::set_worker_shard(next.fetch_add(1, Ordering::Relaxed));
                        crate::internal::set_worker(&s);
                    }
                })
                .build()
                .expect("multi-thread runtime");
            rt.block_on(async move {
                shared.server_stats.workers_started.add(workers as i64);
                run_worker(&shared, &mut rx).await;
            });
        })
}

/// Whether a static config still needs xDS (an SDS secret, an RDS table or
/// EDS endpoints named from static resources).
fn has_dynamic_refs(s: &Snapshot) -> bool {
    use xds_client::config::{NetworkFilter, RouteSource};
    s.clusters.values().any(|c| {
        c.eds.is_some()
            || std::iter::once(&c.transport)
                .chain(c.transport_matches.iter().map(|m| &m.transport))
                .filter_map(|t| t.tls())
                .any(|t| !t.sds.is_empty())
    }) || s.listeners.iter().any(|l| {
        l.filter_chains.iter().chain(&l.default_filter_chain).any(|fc| {
            matches!(&fc.filter, NetworkFilter::Http(h) if matches!(h.routes, RouteSource::Rds(_)))
                || fc.tls.as_ref().is_some_and(|t| !t.sds.is_empty())
        })
    })
}

/// Starts draining; with `exit`, the process stops when drained.
pub fn begin_drain(shared: &Arc<Shared>, exit: bool) {
    shared.drain.send_replace(true);
    for l in shared.listeners.load().iter() {
        l.drain(false, Duration::ZERO);
    }
    shared.server_stats.state.set(1); // DRAINING (Envoy's ServerInfo.State)
    if exit && !shared.exit_requested.swap(true, Ordering::SeqCst) {
        let s = shared.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(s.options.drain_time_s);
            while s.active_connections.load(Ordering::Relaxed) > 0
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            s.writer.flush();
            s.server_stats.live.set(0);
            // Wake every worker and the control runtime.
            for _ in 0..(s.workers + 4) {
                s.exit.notify_waiters();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
}

async fn control(shared: Arc<Shared>, ready: std::sync::mpsc::Sender<anyhow::Result<()>>) {
    // Active health checks of internal hosts (and callouts to them) reach
    // internal listeners from here: their connections are served on this
    // runtime, as Envoy's main thread has its own internal listener
    // registry slot.
    crate::internal::set_worker(&shared);
    shared.clusters.warm(Duration::from_secs(5)).await;
    shared.clusters.spawn_dns_refresh();
    let admin = match &shared.snapshot.load().admin {
        Some(a) => match crate::admin::bind(&a.address).await {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = ready.send(Err(anyhow::anyhow!(
                    "cannot bind admin on {}: {e}",
                    a.address
                )));
                return;
            }
        },
        None => None,
    };
    if let Some(l) = &admin {
        *shared.admin_addr.lock().expect("admin addr lock") = l.local_addr();
    }
    let _ = ready.send(Ok(()));
    if let Some(l) = admin {
        tokio::spawn(crate::admin::serve(l, shared.clone()));
    }
    if !shared.initialized.load(Ordering::SeqCst) {
        crate::xds::start(&shared);
    }
    let s = shared.clone();
    tokio::spawn(async move {
        let mut trimmed_at = s.next_conn_id.load(Ordering::Relaxed);
        loop {
            let up = s.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            s.server_stats.uptime.set(up as i64);
            // What finished connections freed stays in glibc's per-thread
            // arenas (25-30 MiB after 128 connections of load); once no
            // downstream connection is open, give it back to the OS. Once
            // per busy period, so a steady load never trims.
            let seen = s.next_conn_id.load(Ordering::Relaxed);
            if seen != trimmed_at && s.active_connections.load(Ordering::Relaxed) == 0 {
                crate::netif::trim_heap();
                trimmed_at = seen;
            }
            // Certificate rotation: contexts whose files changed rebuild;
            // established connections keep their old context. A few stat
            // calls on local files: done inline (no blocking-pool thread,
            // which would cost idle memory).
            s.tls.reload_changed();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    shared.exit.notified().await;
}
