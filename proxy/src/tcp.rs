//! `envoy.filters.network.tcp_proxy`: raw TCP (or TLS-terminated, or TLS
//! passthrough) connections to a cluster.
//!
//! Bytes are copied with bounded buffers in both directions; when one side
//! half-closes, its peer's write side is shut down and the other direction
//! keeps flowing until it closes too. Idle and duration limits close both.
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use rand::Rng;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::Instant,
};
use xds_client::config::{TcpCluster, TcpProxy};

use crate::{
    access_log::{Logger, Writer},
    http::info::{Flags, StreamInfo},
    io::DownstreamIo,
    listener::ConnMeta,
    metrics::TcpStats,
    stats::{Counter, Store},
    tls::DownstreamTlsInfo,
    upstream::{outlier::LocalResult, pool::UpstreamIo, ClusterRuntime, Host},
    Shared,
};

/// A tcp_proxy filter at run time.
pub struct TcpRuntime {
    pub config: Arc<TcpProxy>,
    pub stats: TcpStats,
    logs: Vec<Arc<Logger>>,
    buffer: usize,
}

impl TcpRuntime {
    pub fn new(config: Arc<TcpProxy>, store: &Store, writer: &Writer, buffer_limit: u32) -> Self {
        TcpRuntime {
            stats: TcpStats::new(store, &config.stat_prefix),
            logs: config
                .access_logs
                .iter()
                .map(|a| Arc::new(Logger::new(a.clone(), writer.clone())))
                .collect(),
            // Copy buffers: bounded by per_connection_buffer_limit_bytes
            // (at least 4 KiB, at most 64 KiB per direction).
            buffer: (buffer_limit as usize).clamp(4096, 64 * 1024),
            config,
        }
    }

    /// The cluster a connection goes to. With sni_cluster a non-empty SNI
    /// names the cluster as is, as Envoy: a missing cluster closes the
    /// connection (Istio's AUTO_PASSTHROUGH gateways get "SNI-DNAT" clusters
    /// named exactly like the SNI, `outbound_.PORT_.SUBSET_.HOST`).
    fn cluster_name(&self, sni: Option<&str>) -> Arc<str> {
        if self.config.sni_cluster {
            if let Some(sni) = sni.filter(|s| !s.is_empty()) {
                return sni.into();
            }
        }
        match &self.config.cluster {
            TcpCluster::Name(n) => n.clone(),
            TcpCluster::Weighted(w) => {
                let total: u64 = w.iter().map(|(_, x)| u64::from(*x)).sum();
                let mut pick = rand::rng().random_range(0..total.max(1));
                for (n, x) in w {
                    if pick < u64::from(*x) {
                        return n.clone();
                    }
                    pick -= u64::from(*x);
                }
                w[0].0.clone()
            }
        }
    }

    /// Proxies one connection until both directions close.
    pub async fn serve(
        &self,
        down: DownstreamIo,
        meta: &ConnMeta,
        tls: Option<Arc<DownstreamTlsInfo>>,
        id: u64,
        shared: &Arc<Shared>,
        conn: ConnFilters<'_>,
    ) -> TcpEnd {
        let (conn_state, mx) = (conn.state, conn.mx);
        let start = Instant::now();
        self.stats.cx_total.inc();
        // An internal downstream closed before its splice ended cleanly
        // (no cluster or host, connect failure, a failed side) is reset,
        // as Envoy's close of an internal connection its peer still uses:
        // a CONNECT tunnel in front of it ends with a reset, not a clean
        // END_STREAM.
        let mut down_reset = ResetOnDrop(down.reset_handle());
        // Istio's metadata exchange with the downstream peer, when its ALPN
        // was negotiated (else the bytes pass unchanged).
        let alpn = tls.as_ref().and_then(|t| t.alpn.clone());
        let down = match crate::mx::start(down, mx, alpn.as_deref()).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "tcp_proxy: metadata exchange write failed");
                return TcpEnd::default();
            }
        };
        let downstream_peer = down.peer();
        // Envoy's requested server name is what tls_inspector found; a TLS
        // handshake without tls_inspector leaves it empty (for sni_cluster
        // and %REQUESTED_SERVER_NAME% alike).
        let sni = meta.sni.clone();
        let mut info = StreamInfo::new(
            start,
            "",
            http::Method::GET,
            Default::default(),
            Default::default(),
            "",
            meta.src,
            meta.dst,
            id,
        );
        info.has_request = false;
        info.downstream_direct_remote = meta.direct_src;
        info.internal_addrs = meta.internal.clone().map(Arc::new);
        info.requested_server_name = sni.clone();
        info.tls = tls;
        // The connection's metadata (PROXY protocol `rules`): tcp_proxy's
        // log shares the connection's stream info, as Envoy's.
        info.dynamic_metadata = meta.metadata.clone();
        let name = self.cluster_name(sni.as_deref());
        // Envoy logs `%UPSTREAM_CLUSTER%` as `-` when the cluster is missing.
        let Some(cluster) = shared.clusters.get(&name) else {
            self.stats.cx_no_route.inc();
            info.flags.set(Flags::NC);
            tracing::debug!(cluster = %name, "tcp_proxy: unknown cluster; closing");
            return self.finish(info, start);
        };
        info.upstream_cluster = Some(name.clone());
        // As Envoy's tcp_proxy: at max_connections (DEFAULT priority) the
        // connection is closed at once (UO, upstream_cx_overflow); else the
        // upstream connection holds its place until it closes.
        let limits = &cluster.breakers.default;
        if !limits.connections.can_create() {
            cluster.stats.upstream_cx_overflow.inc();
            info.flags.set(Flags::UO);
            return self.finish(info, start);
        }
        // A tunnel's upstream connection is pooled: the pool counts it.
        let tunneling = self.config.tunneling.as_deref();
        let _cx_slot = tunneling.is_none().then(|| limits.connections.guard());
        if tunneling.is_some() {
            // The tunnel's hostname and headers may read it.
            info.filter_state = conn_state.clone();
        }
        // As Envoy's tcp_proxy: the connection's filter state may override
        // the upstream ALPN (`envoy.network.application_protocols`).
        let alpn_override = conn_state
            .get_typed::<filters::ApplicationProtocols>(filters::state::APPLICATION_PROTOCOLS)
            .and_then(|a| a.resolve(None));
        // What an upstream PROXY protocol header says of this connection.
        let source = crate::upstream::proxy_protocol::ProxySource {
            src: meta.src,
            dst: meta.dst,
            tlvs: meta.tlvs.clone(),
        };
        let mut tried = Vec::new();
        let mut attempt = 0;
        let (up, host) = loop {
            attempt += 1;
            // A consistent-hash cluster's own hash policy (no request: only
            // `source_ip` can yield a hash), else `hash_policy` source_ip:
            // the host of the downstream IP (Envoy's tcp_proxy retries it
            // as is).
            let picked = if cluster.original_dst.is_some() {
                // ORIGINAL_DST: the connection names its destination.
                cluster.original_dst_host(&crate::upstream::original_dst::DstInputs {
                    filter_state: [Some(conn_state), None],
                    metadata: [Some(&info.dynamic_metadata), None],
                    headers: None,
                    restored_local: meta.local_restored.then_some(meta.dst),
                })
            } else if !cluster.config.lb_hash_policy.is_empty() && cluster.config.lb.is_hash() {
                let h = crate::upstream::hash_lb::request_hash(
                    &cluster.config.lb_hash_policy,
                    &http::HeaderMap::new(),
                    &http::Uri::from_static("/"),
                    meta.src,
                    meta.direct_src,
                    meta.dst,
                    None,
                );
                cluster.choose_hashed(h.hash, &[], 0)
            } else if let (Some(policy), true) =
                (&self.config.hash_filter_state, cluster.config.lb.is_hash())
            {
                // The hashable object under the key, as the route's
                // `filter_state` policy (none: a random pick, as Envoy).
                let h = crate::upstream::hash_lb::request_hash(
                    policy,
                    &http::HeaderMap::new(),
                    &http::Uri::from_static("/"),
                    meta.src,
                    meta.direct_src,
                    meta.dst,
                    // `.into()`: the connection's filter state whether it is
                    // held as an Option or a reference.
                    #[allow(clippy::useless_conversion)]
                    conn_state.into(),
                );
                cluster.choose_hashed(h.hash, &[], 0)
            } else if self.config.hash_source_ip && cluster.config.lb.is_hash() {
                let ip = meta.src.ip().to_string();
                cluster.choose_hashed(
                    Some(crate::upstream::hash_lb::xxhash64(ip.as_bytes(), 0)),
                    &[],
                    0,
                )
            } else {
                cluster.choose(&tried, 3)
            };
            let Some(host) = picked else {
                info.flags.set(Flags::UH);
                return self.finish(info, start);
            };
            info.set_upstream_host(&host);
            let attempt_result = match tunneling {
                Some(t) => {
                    match crate::tunnel::open(&cluster, &host, t, &info, alpn_override.clone())
                        .await
                    {
                        Ok(o) => Ok(Up::Tunnel(o)),
                        // As Envoy: a pool overflow is a local close
                        // before connecting: no UF, and no outlier event.
                        Err(crate::tunnel::OpenError::Overflow) => {
                            Err(("overflow".to_owned(), false))
                        }
                        Err(crate::tunnel::OpenError::Failed(e)) => Err((e, true)),
                    }
                }
                None => connect(
                    &cluster,
                    &host,
                    &source,
                    alpn_override.as_deref(),
                    conn_state.into(),
                )
                .await
                .map(|(s, a)| Up::Tcp(s, a))
                .map_err(|e| (e, true)),
            };
            match attempt_result {
                Ok(u) => {
                    cluster.outlier_local(&host, LocalResult::ConnectSuccessFinal);
                    break (u, host);
                }
                Err((e, remote)) => {
                    if remote {
                        cluster.outlier_local(&host, LocalResult::ConnectFailed);
                    }
                    info.upstream_failure_reason = Some(e);
                    if attempt >= self.config.max_connect_attempts {
                        cluster.stats.upstream_cx_connect_attempts_exceeded.inc();
                        // As Envoy: a connect failure with the attempts
                        // used up is UF and URX (a local one URX only).
                        if remote {
                            info.flags.set(Flags::UF);
                        }
                        info.flags.set(Flags::URX);
                        return self.finish(info, start);
                    }
                    tried.push(host.addr);
                }
            }
        };
        info.upstream_failure_reason = None;
        let up = match up {
            Up::Tcp(up, up_alpn) => {
                info.upstream_local = up.local_addr();
                // The cluster's upstream metadata exchange (Istio's cluster
                // filter).
                let up = match crate::mx::start(up, cluster.mx.as_ref(), up_alpn.as_deref()).await {
                    Ok(u) => u,
                    Err(e) => {
                        info.upstream_failure_reason = Some(format!("metadata exchange: {e}"));
                        info.flags.set(Flags::UF);
                        return self.finish(info, start);
                    }
                };
                info.upstream_tls = upstream_tls(&cluster, &host, &up);
                UpSplice::Tcp(up)
            }
            Up::Tunnel(o) => {
                info.upstream_tls = o.tls;
                info.upstream_local = o.local;
                UpSplice::Tunnel(o.io)
            }
        };
        let upstream_peer = match &up {
            UpSplice::Tcp(u) => Some(u.peer()),
            UpSplice::Tunnel(_) => None,
        };
        let up_reset = match &up {
            UpSplice::Tcp(u) => u.get_ref().reset_handle(),
            UpSplice::Tunnel(_) => None,
        };
        let upstream_local_san = info
            .upstream_tls
            .as_ref()
            .and_then(|t| t.local_uri_san())
            .map(str::to_owned);
        let upstream_peer_san = info
            .upstream_tls
            .as_ref()
            .and_then(|t| t.peer_uri_san())
            .map(str::to_owned);
        host.active.fetch_add(1, Relaxed);
        let activity = Arc::new(Activity::new());
        let rx = Arc::new(AtomicU64::new(0));
        let tx = Arc::new(AtomicU64::new(0));
        // The byte counters move as bytes flow (operators watch long-lived
        // connections), as Envoy's do.
        let mut down = Tracked {
            inner: down,
            read: rx.clone(),
            counter: self.stats.cx_rx_bytes_total.clone(),
            last: activity.clone(),
            side: 0,
        };
        let mut up = Tracked {
            inner: up,
            read: tx.clone(),
            counter: self.stats.cx_tx_bytes_total.clone(),
            last: activity.clone(),
            side: 1,
        };
        let copy =
            tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, self.buffer, self.buffer);
        let max = async {
            match self.config.max_downstream_connection_duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let idle = activity.idle(
            self.config.idle_timeout,
            self.config.downstream_idle_timeout,
            self.config.upstream_idle_timeout,
        );
        let failed = tokio::select! {
            r = copy => match r {
                Ok(_) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "tcp_proxy: connection error");
                    true
                }
            },
            _ = max => {
                self.stats.max_duration_reached.inc();
                info.flags.set(Flags::DT);
                false
            }
            _ = idle => {
                self.stats.idle_timeout.inc();
                false
            }
        };
        if failed {
            // One side failed (a reset, a write error): an internal peer on
            // the other side is reset too, so the failure travels on (a
            // socket peer is closed as before).
            if let Some(r) = &up_reset {
                r.reset();
            }
        } else {
            down_reset.0 = None;
        }
        host.active.fetch_sub(1, Relaxed);
        info.bytes_received = rx.load(Relaxed);
        info.bytes_sent = tx.load(Relaxed);
        let mut end = self.finish(info, start);
        end.downstream_peer = downstream_peer.get().cloned();
        end.upstream_peer = upstream_peer.and_then(|p| p.get().cloned());
        end.upstream_local_san = upstream_local_san;
        end.upstream_peer_san = upstream_peer_san;
        end
    }

    fn finish(&self, mut info: StreamInfo, start: Instant) -> TcpEnd {
        info.duration = Some(start.elapsed());
        for l in &self.logs {
            l.log(&info);
        }
        TcpEnd {
            bytes_received: info.bytes_received,
            bytes_sent: info.bytes_sent,
            cluster: info.upstream_cluster.take(),
            flags: info.flags.order(),
            ..Default::default()
        }
    }
}

/// What the connection's network filters left for `tcp_proxy`, and its
/// chain's drain signal.
pub struct ConnFilters<'a> {
    /// The chain's drain signal (not used by tcp_proxy yet).
    pub drain: watch::Receiver<bool>,
    /// The connection's filter state (`envoy.network.application_protocols`).
    pub state: &'a filters::FilterState,
    /// Istio's metadata exchange (the listener's filter).
    pub mx: Option<&'a Arc<filters::istio::mx::MetadataExchange>>,
}

/// The upstream of one attempt: a TCP (or TLS) connection with its ALPN,
/// or a tunnel stream.
enum Up {
    Tcp(UpstreamIo, Option<Vec<u8>>),
    Tunnel(crate::tunnel::Opened),
}

/// What the bytes are copied to.
enum UpSplice {
    Tcp(crate::mx::MxIo<UpstreamIo>),
    Tunnel(crate::tunnel::Tunnel),
}

crate::io::enum_io!(UpSplice { Tcp, Tunnel });

/// What a proxied connection ended with (for the network filters'
/// `on_close`).
#[derive(Debug, Default)]
pub struct TcpEnd {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub cluster: Option<Arc<str>>,
    /// Response flags in the order set (`Flags::order`).
    pub flags: u128,
    /// The peers Istio's metadata exchange found (downstream: the
    /// listener's filter; upstream: the cluster's).
    pub downstream_peer: Option<Arc<filters::istio::PeerInfo>>,
    pub upstream_peer: Option<Arc<filters::istio::PeerInfo>>,
    /// The upstream TLS connection's first URI SANs: our certificate's
    /// and the upstream's.
    pub upstream_local_san: Option<String>,
    pub upstream_peer_san: Option<String>,
}

/// Connects to `host` (TLS when the cluster's transport says so; no ALPN
/// unless configured; a PROXY protocol header describing `source` first
/// when the cluster's transport asks). Shared by `tcp_proxy` and CONNECT
/// termination (`http/connect.rs`).
pub(crate) async fn connect(
    cluster: &ClusterRuntime,
    host: &Host,
    source: &crate::upstream::proxy_protocol::ProxySource,
    alpn: Option<&[Vec<u8>]>,
    state: Option<&filters::FilterState>,
) -> Result<(UpstreamIo, Option<Vec<u8>>), String> {
    let s = &cluster.stats;
    // Envoy counts every connection it creates, including failed ones.
    s.upstream_cx_total.inc();
    if let Some(h) = &host.internal {
        // An in-process connection to the internal listener (TLS and
        // PROXY protocol inside internal_upstream are rejected at load).
        if cluster.tls_for(host).is_some() || cluster.proxy_protocol_for(host).is_some() {
            s.upstream_cx_connect_fail.inc();
            return Err(
                "TLS or PROXY protocol over an internal connection is not implemented".into(),
            );
        }
        let passed = crate::upstream::pool::InternalDest {
            host: h.clone(),
            shared: state
                .filter(|_| h.upstream)
                .and_then(crate::internal::shared_objects),
        }
        .passed();
        return match crate::internal::connect(&h.target, passed).await {
            Ok(c) => Ok((UpstreamIo::Internal(c), None)),
            Err(e) => {
                s.upstream_cx_connect_fail.inc();
                Err(e)
            }
        };
    }
    let tcp = match tokio::time::timeout(
        cluster.config.connect_timeout,
        TcpStream::connect(host.addr),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            s.upstream_cx_connect_fail.inc();
            let text = e.to_string();
            return Err(text.split(" (os error").next().unwrap_or(&text).to_owned());
        }
        Err(_) => {
            s.upstream_cx_connect_fail.inc();
            s.upstream_cx_connect_timeout.inc();
            return Err("connect timeout".into());
        }
    };
    let mut tcp = tcp;
    let _ = tcp.set_nodelay(true);
    if let Some(k) = &cluster.config.tcp_keepalive {
        crate::upstream::set_keepalive(&tcp, k);
    }
    // Upstream PROXY protocol: the header (the downstream connection's
    // addresses and the TLVs the listener kept) goes first, before TLS.
    if let Some(pp) = cluster.proxy_protocol_for(host) {
        if let Err(e) =
            crate::upstream::proxy_protocol::write_header(&mut tcp, pp, Some(source)).await
        {
            s.upstream_cx_connect_fail.inc();
            return Err(format!("PROXY protocol header: {e}"));
        }
    }
    match cluster.tls_for(host) {
        None => Ok((UpstreamIo::Plain(tcp), None)),
        Some(t) => t
            .connect_with(
                tcp,
                host.addr,
                crate::tls::client::AlpnFallback::None,
                t.host_sni(&host.hostname).as_deref(),
                alpn,
            )
            .await
            .map(|(s, a)| (UpstreamIo::Tls(Box::new(s)), a))
            .inspect_err(|_| s.upstream_cx_connect_fail.inc()),
    }
}

/// The certificates of a TLS upstream connection (`%UPSTREAM_PEER_*%`,
/// Istio's `source` reporter principals).
fn upstream_tls(
    cluster: &ClusterRuntime,
    host: &Host,
    up: &crate::mx::MxIo<UpstreamIo>,
) -> Option<std::sync::Arc<crate::tls::UpstreamTlsInfo>> {
    let UpstreamIo::Tls(t) = up.get_ref() else {
        return None;
    };
    let ctls = cluster.tls_for(host)?;
    Some(std::sync::Arc::new(ctls.upstream_info(t)))
}

/// Resets an internal connection when dropped, unless emptied first.
struct ResetOnDrop(Option<crate::internal::PipeReset>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(r) = &self.0 {
            r.reset();
        }
    }
}

/// Last read or write per side, in ms since `start`.
struct Activity {
    start: Instant,
    last: [AtomicU64; 2],
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
    fn touch(&self, side: usize) {
        self.last[side].store(self.start.elapsed().as_millis() as u64, Relaxed);
    }
    /// Resolves when a side (or both, for `both`) has been idle too long.
    async fn idle(&self, both: Option<Duration>, down: Option<Duration>, up: Option<Duration>) {
        if both.is_none() && down.is_none() && up.is_none() {
            return std::future::pending().await;
        }
        loop {
            let now = self.start.elapsed().as_millis() as u64;
            let d = self.last[0].load(Relaxed);
            let u = self.last[1].load(Relaxed);
            let mut wait = u64::MAX;
            for (limit, last) in [(both, d.max(u)), (down, d), (up, u)] {
                if let Some(l) = limit {
                    let l = l.as_millis() as u64;
                    let idle = now.saturating_sub(last);
                    if idle >= l {
                        return;
                    }
                    wait = wait.min(l - idle);
                }
            }
            tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
        }
    }
}

/// Counts bytes read (for the access log and in a stat) and records
/// activity on reads and writes.
struct Tracked<T> {
    inner: T,
    read: Arc<AtomicU64>,
    counter: Arc<Counter>,
    last: Arc<Activity>,
    side: usize,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            me.read.fetch_add(n as u64, Relaxed);
            me.counter.add(n as u64);
            me.last.touch(me.side);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.last.touch(me.side);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
