//! Wiring the xDS client into the server: connections to control planes
//! (static clusters over TCP or Unix sockets, TLS when the cluster says so),
//! applying snapshots, readiness and stats.
use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;
use xds_client::config::{EndpointAddress, GrpcTarget};
use xds_client::xds::{Connector, Event, ResourceType, XdsClient, XdsIo};

use crate::Shared;

/// Connects to xDS servers through the bootstrap's static clusters.
struct ClusterConnector {
    shared: Weak<Shared>,
}

impl Connector for ClusterConnector {
    fn connect(&self, target: &GrpcTarget) -> BoxFuture<'static, std::io::Result<XdsIo>> {
        let shared = self.shared.upgrade();
        let target = target.clone();
        Box::pin(async move {
            let shared = shared.ok_or_else(|| std::io::Error::other("server stopped"))?;
            match target {
                GrpcTarget::Uri(uri) => {
                    if let Some(p) = uri.strip_prefix("unix:") {
                        let p = if p.starts_with("//") {
                            p.trim_start_matches('/').to_owned()
                        } else {
                            p.to_owned()
                        };
                        let p = if uri.starts_with("unix:///") {
                            format!("/{p}")
                        } else {
                            p
                        };
                        let s = tokio::net::UnixStream::connect(p).await?;
                        return Ok(Box::new(s) as XdsIo);
                    }
                    let addr: std::net::SocketAddr = uri
                        .trim_start_matches("ipv4:")
                        .trim_start_matches("ipv6:")
                        .parse()
                        .map_err(|e| std::io::Error::other(format!("{uri}: {e}")))?;
                    let s = tokio::net::TcpStream::connect(addr).await?;
                    let _ = s.set_nodelay(true);
                    Ok(Box::new(s) as XdsIo)
                }
                GrpcTarget::Cluster(name) => {
                    let cluster = shared.clusters.get(&name).ok_or_else(|| {
                        std::io::Error::other(format!("unknown cluster {name:?}"))
                    })?;
                    // A Unix socket endpoint (Istio's pilot-agent), else a host.
                    let pipe = cluster
                        .config
                        .localities
                        .iter()
                        .flat_map(|l| &l.endpoints)
                        .find_map(|e| match &e.address {
                            EndpointAddress::Pipe(p) => Some(p.clone()),
                            _ => None,
                        });
                    if let Some(p) = pipe {
                        let s = tokio::time::timeout(
                            cluster.config.connect_timeout,
                            tokio::net::UnixStream::connect(&p),
                        )
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                        })??;
                        return Ok(Box::new(s) as XdsIo);
                    }
                    let host = cluster.choose(&[], 0).ok_or_else(|| {
                        std::io::Error::other(format!("cluster {name:?} has no host"))
                    })?;
                    let tcp = tokio::time::timeout(
                        cluster.config.connect_timeout,
                        tokio::net::TcpStream::connect(host.addr),
                    )
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                    })??;
                    let _ = tcp.set_nodelay(true);
                    if let Some(k) = &cluster.config.tcp_keepalive {
                        crate::upstream::set_keepalive(&tcp, k);
                    }
                    match cluster.tls_for(&host) {
                        None => Ok(Box::new(tcp) as XdsIo),
                        Some(tls) => {
                            let (s, _) = tls
                                .connect(
                                    tcp,
                                    host.addr,
                                    crate::tls::client::AlpnFallback::Http2,
                                    None,
                                )
                                .await
                                .map_err(std::io::Error::other)?;
                            Ok(Box::new(s) as XdsIo)
                        }
                    }
                }
            }
        })
    }
}

/// The node sent to control planes: the bootstrap's (with the CLI
/// overrides) plus Envoy's user agent fields.
fn node(shared: &Shared) -> xds_client::api::envoy::config::core::v3::Node {
    use xds_client::api::envoy::config::core::v3::node::UserAgentVersionType;
    let mut n = shared.bootstrap.node.clone().unwrap_or_default();
    // Control planes select features by user agent; weir speaks Envoy's API.
    n.user_agent_name = "envoy".into();
    if n.user_agent_version_type.is_none() {
        n.user_agent_version_type = Some(UserAgentVersionType::UserAgentVersion(format!(
            "weir/{}",
            env!("CARGO_PKG_VERSION")
        )));
    }
    n
}

fn version_hash(v: &str) -> i64 {
    // Envoy's `version` gauge is a hash of version_info (FNV-1a here).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h & 0x7fff_ffff_ffff_ffff) as i64
}

/// Seconds without an xDS response after which the descriptor pool (tens
/// of MiB, needed only to check incoming resources) is freed; the next
/// response rebuilds it.
const POOL_IDLE_SECS: u64 = 30;

/// Quiet time after a full xDS update before the heap is trimmed.
const TRIM_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// Starts the xDS client on the current (control) runtime.
pub fn start(shared: &Arc<Shared>) {
    let base = shared.snapshot.load_full();
    let base_has_wds = base.dynamic.wds.is_some();
    // Istio's `workload_discovery.*` subscription stats (scope
    // `workload_discovery`), when the extension is configured.
    let wds_stats =
        base_has_wds.then(|| crate::metrics::XdsStats::new(&shared.stats, "workload_discovery"));
    let weak = Arc::downgrade(shared);
    let w2 = weak.clone();
    let last_response = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = std::time::Instant::now();
    let lr = last_response.clone();
    let trim = Arc::new(tokio::sync::Notify::new());
    let trim_tx = trim.clone();
    let client = XdsClient::new(
        base,
        node(shared),
        Arc::new(ClusterConnector {
            shared: weak.clone(),
        }),
        Box::new(move |snap, change, init_done| {
            let Some(s) = weak.upgrade() else { return };
            crate::manager::apply(&s, snap, change);
            if *change == xds_client::xds::state::Change::Full {
                trim_tx.notify_one();
            }
            if let Some(c) = s.xds.get() {
                let (wl, wc) =
                    c.with_state(|st| (st.warming_listeners.len(), st.warming_clusters.len()));
                s.server_stats.total_listeners_warming.set(wl as i64);
                s.server_stats.warming_clusters.set(wc as i64);
            }
            if init_done
                && !s
                    .initialized
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                tracing::info!("all dynamic resources initialized; server LIVE");
                if !*s.drain.borrow() {
                    s.server_stats.state.set(0);
                }
                s.server_stats.live.set(1);
            }
        }),
        Box::new(move |e| {
            let Some(s) = w2.upgrade() else { return };
            let st = &s.server_stats;
            let stats = |rt| match rt {
                ResourceType::Cluster => Some(&st.cds),
                ResourceType::Listener => Some(&st.lds),
                ResourceType::Workload => wds_stats.as_ref(),
                _ => None,
            };
            lr.store(
                started.elapsed().as_secs() + 1,
                std::sync::atomic::Ordering::Relaxed,
            );
            match e {
                Event::Attempt(rt) => {
                    if let Some(x) = stats(rt) {
                        x.update_attempt.inc();
                    }
                }
                Event::Accepted { rt, version } => {
                    if let Some(x) = stats(rt) {
                        x.update_success.inc();
                        x.version.set(version_hash(&version));
                        x.version_text.set(&version);
                    }
                }
                Event::Rejected { rt, .. } => {
                    if let Some(x) = stats(rt) {
                        x.update_rejected.inc();
                    }
                }
                Event::Connected(up) => st.connected_state.set(i64::from(up)),
            }
        }),
    );
    if base_has_wds {
        set_workloads_hook(shared, &client);
    }
    let _ = shared.xds.set(client.clone());
    tokio::spawn(client.run());
    // A full update allocates a lot for a moment (decoded resources, the
    // old snapshot); once updates pause for TRIM_DELAY, freed heap goes
    // back to the OS so RSS reflects what the configuration holds.
    tokio::spawn(async move {
        loop {
            trim.notified().await;
            while tokio::time::timeout(TRIM_DELAY, trim.notified())
                .await
                .is_ok()
            {}
            crate::netif::trim_heap();
            crate::netif::drop_binary_pages();
        }
    });
    tokio::spawn(async move {
        let mut released = false;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let last = last_response.load(std::sync::atomic::Ordering::Relaxed);
            let idle = started.elapsed().as_secs().saturating_sub(last) >= POOL_IDLE_SECS;
            if idle && last > 0 && !released {
                xds_client::descriptors::release();
                crate::netif::trim_heap();
                released = true;
            } else if !idle {
                released = false;
            }
        }
    });
}

/// Workload discovery: each WDS change rebuilds the address index (peer
/// objects of unchanged workloads reused) and swaps it in; the gauge
/// `workload_discovery.total` counts the addresses (as Istio's).
fn set_workloads_hook(shared: &Arc<Shared>, client: &XdsClient) {
    let weak = Arc::downgrade(shared);
    let total = shared
        .stats
        .gauge(crate::stats::StatName::plain("workload_discovery.total"));
    let network = shared
        .snapshot
        .load()
        .node
        .metadata
        .get("NETWORK")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    client.on_workloads(Box::new(move |workloads| {
        let Some(s) = weak.upgrade() else { return };
        let index = filters::istio::workloads::WorkloadIndex::build(
            &s.workloads.load(),
            &workloads,
            &network,
        );
        total.set(index.len() as i64);
        tracing::debug!(
            target: "config",
            workloads = index.workloads(),
            addresses = index.len(),
            "workload discovery updated"
        );
        s.workloads.store(Arc::new(index));
    }));
}
