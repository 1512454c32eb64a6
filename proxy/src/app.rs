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
    listener::{self, ListenerRuntime},
    metrics::{ListenerStats, ServerStats},
    stats::Store,
    upstream::ClusterManager,
};

/// State shared by every worker and the control runtime.
pub struct Shared {
    pub snapshot: Arc<Snapshot>,
    pub bootstrap: Bootstrap,
    pub clusters: ClusterManager,
    /// Live TLS contexts (for `/certs` and certificate rotation).
    pub tls: Arc<crate::tls::Registry>,
    pub stats: Arc<Store>,
    pub server_stats: ServerStats,
    pub options: Options,
    pub started: std::time::SystemTime,
    pub listeners: Vec<Arc<ListenerRuntime>>,
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
    pub admin_addr: Mutex<Option<SocketAddr>>,
    pub workers: usize,
    /// `admin.access_log` loggers.
    pub admin_logs: Vec<Arc<Logger>>,
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
        let mut listeners = Vec::new();
        for l in &snapshot.listeners {
            let (bound, sockets) = listener::bind(l, workers)
                .with_context(|| format!("cannot bind listener {:?} on {}", l.name, l.address))?;
            // A listener's own access log is written once per connection.
            let conn_logs = l
                .access_logs
                .iter()
                .map(|a| Arc::new(Logger::new(a.clone(), writer.clone())))
                .collect();
            // Stats carry the bound address when the config's port is 0.
            let lstats = ListenerStats::new(
                &stats,
                &if l.stat_prefix
                    == format!("listener.{}.", l.address.to_string().replace(':', "_"))
                {
                    format!("listener.{}.", bound.to_string().replace(':', "_"))
                } else {
                    l.stat_prefix.clone()
                },
            );
            let env = listener::ChainEnv {
                store: &stats,
                writer: &writer,
                tls: &tls_env,
                ssl_stats: lstats.ssl.clone(),
            };
            let mut chains = Vec::new();
            for fc in &l.filter_chains {
                chains.push(listener::build_chain(
                    fc,
                    bound.port(),
                    l.buffer_limit,
                    &env,
                )?);
            }
            let default_chain = match &l.default_filter_chain {
                Some(fc) => Some(listener::build_chain(
                    fc,
                    bound.port(),
                    l.buffer_limit,
                    &env,
                )?),
                None => None,
            };
            tracing::info!(listener = %l.name, address = %bound, "listener bound");
            listeners.push(Arc::new(ListenerRuntime {
                config: l.clone(),
                chains,
                default_chain,
                stats: lstats,
                bound,
                sockets: std::sync::Mutex::new(sockets.into_iter().map(Some).collect()),
                stop_accept: watch::channel(false).0,
                logs: conn_logs,
                drain_conns: watch::channel(false).0,
            }));
        }
        let (drain, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            snapshot: Arc::new(snapshot.clone()),
            bootstrap,
            clusters,
            tls,
            stats: stats.clone(),
            server_stats,
            max_connections: snapshot.max_downstream_connections,
            options,
            started: std::time::SystemTime::now(),
            listeners,
            writer: writer.clone(),
            drain,
            exit: Notify::new(),
            exit_requested: AtomicBool::new(false),
            active_connections: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
            healthcheck_failed: AtomicBool::new(false),
            admin_addr: Mutex::new(None),
            workers,
            admin_logs: snapshot
                .admin
                .iter()
                .flat_map(|a| a.access_logs.iter())
                .map(|a| Arc::new(Logger::new(a.clone(), writer.clone())))
                .collect(),
        });
        shared.server_stats.concurrency.set(workers as i64);
        shared
            .server_stats
            .active_clusters
            .set(shared.clusters.clusters.len() as i64);
        shared
            .server_stats
            .total_listeners_active
            .set(shared.listeners.len() as i64);

        // Control runtime: admin, DNS refresh, uptime.
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

        // WEIR_RUNTIME=multi-thread: one work-stealing runtime with `workers`
        // threads sharing one socket per listener. Kept only to measure the
        // worker model against (ARCHITECTURE.md); the default is below.
        if std::env::var("WEIR_RUNTIME").as_deref() == Ok("multi-thread") {
            threads.push(spawn_multi_thread(shared.clone(), workers)?);
            shared.server_stats.state.set(0);
            shared.server_stats.live.set(1);
            xds_client::descriptors::release();
            crate::netif::trim_heap();
            return Ok(Server { shared, threads });
        }
        // Workers: one current-thread runtime each, with its own listener sockets.
        for i in 0..workers {
            let s = shared.clone();
            let sockets: Vec<_> = shared
                .listeners
                .iter()
                .map(|l| {
                    let sock = l
                        .sockets
                        .lock()
                        .expect("sockets lock")
                        .get_mut(i)
                        .and_then(Option::take);
                    (
                        l.clone(),
                        sock.ok_or_else(|| std::io::Error::other("socket already taken")),
                    )
                })
                .collect();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("weir-worker-{i}"))
                    .spawn(move || {
                        crate::stats::set_worker_shard(i);
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("worker runtime");
                        rt.block_on(async move {
                            let mut tasks = Vec::new();
                            for (l, sock) in sockets {
                                match sock {
                                    Ok(sock) => tasks.push(tokio::spawn(listener::accept_loop(
                                        l,
                                        sock,
                                        s.clone(),
                                    ))),
                                    Err(e) => {
                                        tracing::error!(error = %e, "cannot clone listener socket")
                                    }
                                }
                            }
                            s.server_stats.workers_started.inc();
                            // Run until exit: connections keep going after accept loops stop.
                            s.exit.notified().await;
                            for t in tasks {
                                t.abort();
                            }
                        });
                    })?,
            );
        }
        shared.server_stats.state.set(0);
        shared.server_stats.live.set(1);
        // The data path never needs protobuf descriptors: free them.
        xds_client::descriptors::release();
        crate::netif::trim_heap();
        crate::netif::drop_static_pages(xds_client::descriptors::embedded_bytes());
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
            .iter()
            .find(|l| &*l.config.name == name)
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

/// The alternative worker model (measurement only): one multi-thread runtime.
fn spawn_multi_thread(
    shared: Arc<Shared>,
    workers: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let sockets: Vec<_> = shared
        .listeners
        .iter()
        .filter_map(|l| {
            let mut all = l.sockets.lock().expect("sockets lock");
            let first = all.get_mut(0).and_then(Option::take);
            all.clear(); // the other workers' sockets close
            first.map(|s| (l.clone(), s))
        })
        .collect();
    std::thread::Builder::new()
        .name("weir-mt".into())
        .spawn(move || {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .on_thread_start(move || {
                    crate::stats::set_worker_shard(next.fetch_add(1, Ordering::Relaxed))
                })
                .build()
                .expect("multi-thread runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, sock) in sockets {
                    tasks.push(tokio::spawn(listener::accept_loop(l, sock, shared.clone())));
                }
                shared.server_stats.workers_started.add(workers as i64);
                shared.exit.notified().await;
                for t in tasks {
                    t.abort();
                }
            });
        })
}

/// Starts draining; with `exit`, the process stops when drained.
pub fn begin_drain(shared: &Arc<Shared>, exit: bool) {
    shared.drain.send_replace(true);
    for l in &shared.listeners {
        l.drain(false, Duration::ZERO);
    }
    shared.server_stats.state.set(2); // DRAINING
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
    shared.clusters.warm(Duration::from_secs(5)).await;
    shared.clusters.spawn_dns_refresh();
    let admin = match &shared.snapshot.admin {
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
    let s = shared.clone();
    tokio::spawn(async move {
        loop {
            let up = s.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            s.server_stats.uptime.set(up as i64);
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
