//! `tcp_proxy` `tunneling_config`: a downstream TCP connection carried in
//! an HTTP CONNECT (or POST) stream to the cluster's host, the HBONE
//! origination shape of Istio's waypoint (`connect_originate`).
//!
//! HTTP/2 clusters (the cluster's `explicit_http_config`
//! `http2_protocol_options`, or `auto_config`) share pooled connections:
//! one [`TunnelPool`] per cluster, shared by every worker (as ztunnel's
//! HBONE pool; Envoy keeps one per worker), keyed by host address, SNI and
//! upstream ALPN override (the TLS identity is the cluster's transport).
//! A connection carries streams up to the lower of the cluster's
//! `max_concurrent_streams` and the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! (and at most `max_requests_per_connection` in its life); a full one
//! makes the next stream open a new connection. Streams that arrive while
//! a key's connection is being made wait for it instead of opening their
//! own. A connection with no stream for the cluster's `idle_timeout`
//! (`common_http_protocol_options`, default 1 h) is closed
//! (`upstream_cx_idle_timeout`); a connection the peer closed (GOAWAY, EOF)
//! leaves the pool and the next stream makes a new one. A stream's reset
//! (or a refusal: any response but `200`) ends that stream only.
//!
//! HTTP/1.1 clusters get a connection per tunnel (`CONNECT host:port
//! HTTP/1.1`, any 2xx accepts, as Envoy), never reused after it.
//!
//! The tunnel is an `AsyncRead + AsyncWrite` ([`Tunnel`]) that `tcp_proxy`
//! splices like a TCP upstream: downstream FIN is END_STREAM (HTTP/1.1: a
//! TCP half-close), the upstream's END_STREAM is a downstream FIN. HTTP/2
//! flow control holds both ways: a stream's receive window is released only
//! as its bytes are written downstream, and writes wait for send window.
use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use xds_client::config::{TunnelingConfig, UpstreamProtocol};

use crate::{
    http::info::StreamInfo,
    upstream::{pool::ConnTls, pool::LocalAddr, pool::UpstreamIo, ClusterRuntime, Host},
};

/// Per-stream receive window cap (bounded memory per tunnel whatever the
/// cluster's `initial_stream_window_size`, Envoy's default being 256 MiB).
const MAX_STREAM_WINDOW: u32 = 16 << 20;
/// Per-connection receive window cap.
const MAX_CONN_WINDOW: u32 = 64 << 20;
/// Largest chunk one write hands HTTP/2 (bounds the send buffer).
const MAX_WRITE: usize = 64 << 10;
/// Largest HTTP/1.1 response head accepted (Envoy's default header limit).
const MAX_H1_HEAD: usize = 60 << 10;

/// Why a tunnel could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// No connection, or the peer refused or reset the stream (Envoy: a
    /// remote connection failure, UF).
    Failed(String),
    /// A circuit breaker refused it (Envoy: overflow, UO).
    Overflow,
}

/// What [`open`] hands `tcp_proxy`.
pub struct Opened {
    pub io: Tunnel,
    /// The certificates of the upstream TLS connection.
    pub tls: ConnTls,
    /// The upstream connection's local address (`%UPSTREAM_LOCAL_ADDRESS%`).
    pub local: Option<LocalAddr>,
}

/// An open tunnel.
pub enum Tunnel {
    H2(H2Stream),
    H1(H1Stream),
}

/// The HTTP/2 pool of one cluster (see the module doc).
#[derive(Default)]
pub struct TunnelPool {
    keys: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    sni: Option<Arc<str>>,
    alpn: Option<Arc<[Vec<u8>]>>,
}

#[derive(Default)]
struct Slot {
    conns: Vec<Arc<Conn>>,
    /// Held while a connection for this key is being made; inside, the
    /// number of the last attempt that failed and why.
    gate: Arc<tokio::sync::Mutex<Option<(u64, String)>>>,
    attempts: Arc<AtomicU64>,
}

/// One pooled HTTP/2 connection.
struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// Streams open on it.
    streams: AtomicUsize,
    /// Streams it carried (for `max_requests_per_connection`).
    used: AtomicU32,
    /// Bumped at every stream start: the idle timer restarts.
    generation: AtomicU64,
    /// Set (under the pool lock) when it leaves the pool.
    closed: AtomicBool,
    /// Woken when its last stream ends.
    idle: tokio::sync::Notify,
    tls: ConnTls,
    local: Option<LocalAddr>,
    /// `max_concurrent_streams` of the cluster.
    local_max: usize,
    max_uses: Option<u32>,
}

impl Conn {
    /// Whether one more stream fits (the peer's SETTINGS value as h2 last
    /// saw it, the cluster's limit and the per-connection budget).
    fn has_room(&self) -> bool {
        let max = self.local_max.min(self.send.current_max_send_streams());
        !self.closed.load(Relaxed)
            && self.streams.load(Relaxed) < max
            && self.max_uses.is_none_or(|m| self.used.load(Relaxed) < m)
    }
}

/// A stream's place on its connection (and the cluster's `max_requests`
/// and `upstream_rq_active`) until dropped.
struct StreamSlot {
    conn: Arc<Conn>,
    cluster: Arc<ClusterRuntime>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.cluster.breakers.default.requests.dec();
        self.cluster.stats.upstream_rq_active.dec();
        if self.conn.streams.fetch_sub(1, Relaxed) == 1 {
            self.conn.idle.notify_one();
        }
    }
}

/// Whether the cluster's upstream is HTTP/2 (else HTTP/1.1), as Envoy's
/// tcp_proxy picks the tunnel's codec from the cluster's HTTP2 feature.
fn is_h2(cluster: &ClusterRuntime) -> bool {
    matches!(
        cluster.config.protocol,
        UpstreamProtocol::Http2 | UpstreamProtocol::Auto
    )
}

/// The request head of a tunnel: `CONNECT hostname` (or `POST post_path`)
/// with `headers_to_add` evaluated against the downstream connection.
pub fn request_head(
    t: &TunnelingConfig,
    info: &StreamInfo,
    tls: bool,
) -> Result<(Method, http::Uri, HeaderMap), String> {
    let host = crate::http::info::render(&t.hostname, info, None, None, "");
    let authority = http::uri::Authority::try_from(host.as_str())
        .map_err(|_| format!("tunneling_config.hostname {host:?} is not a valid authority"))?;
    let (method, uri) = if t.use_post {
        let uri = http::Uri::builder()
            .scheme(if tls { "https" } else { "http" })
            .authority(authority)
            .path_and_query(t.post_path.as_str())
            .build()
            .map_err(|e| format!("tunneling_config.post_path: {e}"))?;
        (Method::POST, uri)
    } else {
        let uri = http::Uri::builder()
            .authority(authority)
            .build()
            .map_err(|e| format!("tunneling_config.hostname: {e}"))?;
        (Method::CONNECT, uri)
    };
    let mut headers = HeaderMap::new();
    crate::http::headers::apply(&mut headers, &t.headers_to_add, &[], info, true);
    Ok((method, uri, headers))
}

/// Opens a tunnel to `host` of `cluster` for the downstream connection
/// `info` describes.
pub async fn open(
    cluster: &Arc<ClusterRuntime>,
    host: &Host,
    t: &TunnelingConfig,
    info: &StreamInfo,
    alpn_override: Option<Arc<[Vec<u8>]>>,
) -> Result<Opened, OpenError> {
    let tls = cluster.tls_for(host);
    let (method, uri, headers) = request_head(t, info, tls.is_some()).map_err(OpenError::Failed)?;
    if cluster.proxy_protocol_for(host).is_some() {
        return Err(OpenError::Failed(
            "weir does not send an upstream PROXY protocol header on tunnel connections".into(),
        ));
    }
    if is_h2(cluster) {
        open_h2(cluster, host, method, uri, headers, alpn_override).await
    } else {
        open_h1(cluster, host, method, uri, headers, alpn_override).await
    }
}

/// TCP (and TLS) to `host`, counting Envoy's connection stats.
async fn dial(
    cluster: &ClusterRuntime,
    host: &Host,
    h2: bool,
    alpn: Option<&[Vec<u8>]>,
) -> Result<(UpstreamIo, ConnTls), String> {
    let s = &cluster.stats;
    s.upstream_cx_total.inc();
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
    let _ = tcp.set_nodelay(true);
    if let Some(k) = &cluster.config.tcp_keepalive {
        crate::upstream::set_keepalive(&tcp, k);
    }
    match cluster.tls_for(host) {
        None => Ok((UpstreamIo::Plain(tcp), None)),
        Some(c) => {
            let fallback = if h2 {
                crate::tls::client::AlpnFallback::Http2
            } else {
                crate::tls::client::AlpnFallback::Http1
            };
            // The handshake counts against connect_timeout, as Envoy's.
            let sni = c.host_sni(&host.hostname);
            let hs = c.connect_with(tcp, host.addr, fallback, sni.as_deref(), alpn);
            match tokio::time::timeout(cluster.config.connect_timeout, hs).await {
                Ok(Ok((stream, _))) => {
                    let info = Arc::new(c.upstream_info(&stream));
                    Ok((UpstreamIo::Tls(Box::new(stream)), Some(info)))
                }
                Ok(Err(e)) => {
                    s.upstream_cx_connect_fail.inc();
                    Err(e)
                }
                Err(_) => {
                    s.upstream_cx_connect_fail.inc();
                    s.upstream_cx_connect_timeout.inc();
                    Err("connect timeout".into())
                }
            }
        }
    }
}

impl TunnelPool {
    /// A connection of `key` with room for a stream (counted on it).
    fn pick(&self, key: &Key) -> Option<Arc<Conn>> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let slot = keys.get(key)?;
        let c = slot.conns.iter().find(|c| c.has_room())?;
        c.streams.fetch_add(1, Relaxed);
        c.used.fetch_add(1, Relaxed);
        c.generation.fetch_add(1, Relaxed);
        Some(c.clone())
    }

    /// The key's gate and attempt counter.
    #[allow(clippy::type_complexity)]
    fn gate(
        &self,
        key: &Key,
    ) -> (
        Arc<tokio::sync::Mutex<Option<(u64, String)>>>,
        Arc<AtomicU64>,
        bool,
    ) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let slot = keys.entry(key.clone()).or_default();
        (
            slot.gate.clone(),
            slot.attempts.clone(),
            !slot.conns.is_empty(),
        )
    }

    /// Removes `conn` from the pool (once).
    fn remove(&self, key: &Key, conn: &Conn) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        conn.closed.store(true, Relaxed);
        if let Some(slot) = keys.get_mut(key) {
            slot.conns.retain(|c| c.id != conn.id);
        }
        Self::prune_locked(&mut keys, key);
    }

    /// Drops `key`'s entry once it has no connection and no stream waits
    /// on its gate: destinations come and go (ORIGINAL_DST), the map does
    /// not keep them.
    fn prune(&self, key: &Key) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        Self::prune_locked(&mut keys, key);
    }

    fn prune_locked(keys: &mut HashMap<Key, Slot>, key: &Key) {
        if keys
            .get(key)
            .is_some_and(|s| s.conns.is_empty() && Arc::strong_count(&s.gate) == 1)
        {
            keys.remove(key);
        }
    }

    /// Marks every connection closed (each closes when its last stream
    /// ends).
    fn close_all(&self) {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for slot in keys.values() {
            for c in &slot.conns {
                c.closed.store(true, Relaxed);
                c.idle.notify_one();
            }
        }
    }

    /// Closes the pool's connections to hosts not in `keep` (hosts that
    /// left the cluster): new streams no longer use them.
    pub fn retain_hosts(&self, keep: &std::collections::HashSet<SocketAddr>) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|k, slot| {
            let stay = keep.contains(&k.addr);
            if !stay {
                for c in &slot.conns {
                    c.closed.store(true, Relaxed);
                    c.idle.notify_one();
                }
            }
            stay
        });
    }
}

impl Drop for TunnelPool {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// A connection of the key with room for one more stream: a pooled one, or
/// a new one (made by one stream at a time per key; the others wait).
async fn h2_conn(
    cluster: &Arc<ClusterRuntime>,
    host: &Host,
    key: &Key,
) -> Result<Arc<Conn>, OpenError> {
    let pool = &cluster.tunnels;
    if let Some(c) = pool.pick(key) {
        return Ok(c);
    }
    // No connection with room: the stream is pending until one is made
    // (Envoy's `upstream_rq_pending_*`).
    cluster.stats.upstream_rq_pending_total.inc();
    cluster.stats.upstream_rq_pending_active.inc();
    let _pending = PendingGuard(&cluster.stats.upstream_rq_pending_active);
    let (gate, attempts, _) = pool.gate(key);
    let seen = attempts.load(Relaxed);
    let mut last = gate.lock().await;
    if let Some(c) = pool.pick(key) {
        return Ok(c);
    }
    // A connection attempt that started after this stream began to wait
    // failed: this stream fails with it (Envoy fails the streams pending on
    // a connection that could not be made).
    if let Some((n, why)) = &*last {
        if *n > seen {
            let why = why.clone();
            drop(last);
            drop(gate);
            pool.prune(key);
            return Err(OpenError::Failed(why));
        }
    }
    // Envoy's connection-pool rule: a new connection needs room under
    // max_connections unless the host has none in this pool.
    let (_, _, has_conns) = pool.gate(key);
    let limit = &cluster.breakers.default.connections;
    if has_conns && !limit.can_create() {
        cluster.stats.upstream_cx_overflow.inc();
        return Err(OpenError::Overflow);
    }
    let n = attempts.fetch_add(1, Relaxed) + 1;
    match connect_h2(cluster, host, key).await {
        Ok(c) => {
            c.streams.fetch_add(1, Relaxed);
            c.used.fetch_add(1, Relaxed);
            let mut keys = pool.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.entry(key.clone()).or_default().conns.push(c.clone());
            Ok(c)
        }
        Err(e) => {
            *last = Some((n, e.clone()));
            drop(last);
            drop(gate);
            pool.prune(key);
            Err(OpenError::Failed(e))
        }
    }
}

/// Decrements `upstream_rq_pending_active` when the wait ends.
struct PendingGuard<'a>(&'a crate::stats::Gauge);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Makes an HTTP/2 connection and starts its driver task.
async fn connect_h2(
    cluster: &Arc<ClusterRuntime>,
    host: &Host,
    key: &Key,
) -> Result<Arc<Conn>, String> {
    let (io, tls) = dial(cluster, host, true, key.alpn.as_deref()).await?;
    let local = io.local_addr();
    let h = &cluster.config.http2;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(h.initial_stream_window_size.min(MAX_STREAM_WINDOW))
        .initial_connection_window_size(h.initial_connection_window_size.min(MAX_CONN_WINDOW))
        // Our own limit on streams the peer opens (none expected).
        .max_concurrent_streams(0);
    let handshake = b.handshake::<_, Bytes>(io);
    let (send, conn) = match tokio::time::timeout(cluster.config.connect_timeout, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            cluster.stats.upstream_cx_connect_fail.inc();
            return Err(format!("http/2 handshake: {e}"));
        }
        Err(_) => {
            cluster.stats.upstream_cx_connect_fail.inc();
            cluster.stats.upstream_cx_connect_timeout.inc();
            return Err("connect timeout".into());
        }
    };
    let stats = &cluster.stats;
    stats.upstream_cx_http2_total.inc();
    stats.upstream_cx_active.inc();
    cluster.breakers.default.connections.inc();
    let c = Arc::new(Conn {
        id: cluster.tunnels.next_id.fetch_add(1, Relaxed),
        send,
        streams: AtomicUsize::new(0),
        used: AtomicU32::new(0),
        generation: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        idle: tokio::sync::Notify::new(),
        tls,
        local,
        local_max: usize::try_from(h.max_concurrent_streams).unwrap_or(usize::MAX),
        max_uses: cluster.config.max_requests_per_connection,
    });
    let idle_timeout = cluster.config.idle_timeout;
    let keepalive = h.keepalive_interval.map(|i| (i, h.keepalive_timeout));
    let mut conn = conn;
    let pings = keepalive.and_then(|_| conn.ping_pong());
    // The task holds the cluster weakly: a replaced cluster's pool goes
    // away with it (its idle connections close, busy ones when their last
    // stream ends), as Envoy drains a cluster's pools on update.
    let (cl, cn, k) = (Arc::downgrade(cluster), c.clone(), key.clone());
    let active = cluster.stats.upstream_cx_active.clone();
    let idle_c = cluster.stats.upstream_cx_idle_timeout.clone();
    let breakers = cluster.breakers.clone();
    tokio::spawn(async move {
        let idle = idle_close(&cl, &cn, idle_timeout, &idle_c);
        let alive = keepalive_pings(pings, keepalive);
        tokio::select! {
            r = conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel: http/2 connection ended");
                }
            }
            () = idle => {}
            () = alive => {
                tracing::debug!("tunnel: http/2 keepalive ping timed out; closing");
            }
        }
        cn.closed.store(true, Relaxed);
        if let Some(cl) = cl.upgrade() {
            cl.tunnels.remove(&k, &cn);
        }
        active.dec();
        breakers.default.connections.dec();
    });
    Ok(c)
}

/// `connection_keepalive`: a PING every interval; resolves when one is not
/// answered within the timeout (Envoy's default 15 s when unset).
async fn keepalive_pings(
    pings: Option<h2::PingPong>,
    keepalive: Option<(Duration, Option<Duration>)>,
) {
    let (Some(mut pp), Some((interval, timeout))) = (pings, keepalive) else {
        return std::future::pending().await;
    };
    let timeout = timeout.unwrap_or(Duration::from_secs(15));
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Resolves when `c` must close: idle (no stream) for `timeout` (counted
/// in `idle_c`), or taken out of the pool (or its pool gone) while idle.
async fn idle_close(
    cluster: &std::sync::Weak<ClusterRuntime>,
    c: &Conn,
    timeout: Option<Duration>,
    idle_c: &crate::stats::Counter,
) {
    loop {
        if c.streams.load(Relaxed) > 0 {
            c.idle.notified().await;
            continue;
        }
        if c.closed.load(Relaxed) {
            return;
        }
        let generation = c.generation.load(Relaxed);
        let Some(t) = timeout else {
            c.idle.notified().await;
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep(t) => {}
            () = c.idle.notified() => continue,
        }
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        // Idle all along (no stream started meanwhile): take it out of the
        // pool under the lock, so no stream picks it while it closes.
        let keys = cluster
            .tunnels
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if c.streams.load(Relaxed) == 0 && c.generation.load(Relaxed) == generation {
            c.closed.store(true, Relaxed);
            drop(keys);
            idle_c.inc();
            return;
        }
    }
}

async fn open_h2(
    cluster: &Arc<ClusterRuntime>,
    host: &Host,
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    alpn: Option<Arc<[Vec<u8>]>>,
) -> Result<Opened, OpenError> {
    let key = Key {
        addr: host.addr,
        sni: cluster
            .tls_for(host)
            .and_then(|t| t.host_sni(&host.hostname)),
        alpn,
    };
    // A connection found dead when the stream starts is replaced once.
    for attempt in 0..2 {
        let conn = h2_conn(cluster, host, &key).await?;
        let requests = &cluster.breakers.default.requests;
        if !requests.can_create() {
            // Envoy's pool: a stream over max_requests fails as overflow
            // (`upstream_rq_active_overflow`).
            cluster.stats.upstream_rq_active_overflow.inc();
            if conn.streams.fetch_sub(1, Relaxed) == 1 {
                conn.idle.notify_one();
            }
            return Err(OpenError::Overflow);
        }
        requests.inc();
        cluster.stats.upstream_rq_total.inc();
        cluster.stats.upstream_rq_active.inc();
        let slot = StreamSlot {
            conn: conn.clone(),
            cluster: cluster.clone(),
        };
        let mut req = Request::new(());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        let sent = match conn.send.clone().ready().await {
            Ok(mut s) => s.send_request(req, false),
            Err(e) => Err(e),
        };
        let (resp, send) = match sent {
            Ok(x) => x,
            Err(e) => {
                // The connection is gone (GOAWAY, closed): out of the pool.
                cluster.tunnels.remove(&key, &conn);
                drop(slot);
                if attempt == 0 && !e.is_reset() {
                    continue;
                }
                return Err(OpenError::Failed(format!("http/2 stream: {e}")));
            }
        };
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) => {
                if e.is_io() || e.is_go_away() {
                    cluster.tunnels.remove(&key, &conn);
                }
                return Err(OpenError::Failed(format!("http/2 stream reset: {e}")));
            }
        };
        // As Envoy: over HTTP/2 only 200 opens the tunnel; Envoy's failure
        // reason names the status so.
        if resp.status() != http::StatusCode::OK {
            return Err(OpenError::Failed(format!(
                "tunnel_response:{}",
                resp.status().as_u16()
            )));
        }
        let tls = conn.tls.clone();
        let local = conn.local;
        return Ok(Opened {
            io: Tunnel::H2(H2Stream {
                send,
                recv: resp.into_body(),
                buf: Bytes::new(),
                shut: false,
                _slot: slot,
            }),
            tls,
            local,
        });
    }
    Err(OpenError::Failed("http/2 connection closed".into()))
}

async fn open_h1(
    cluster: &Arc<ClusterRuntime>,
    host: &Host,
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    alpn: Option<Arc<[Vec<u8>]>>,
) -> Result<Opened, OpenError> {
    let limit = &cluster.breakers.default.connections;
    if !limit.can_create() {
        cluster.stats.upstream_cx_overflow.inc();
        return Err(OpenError::Overflow);
    }
    let (mut io, tls) = dial(cluster, host, false, alpn.as_deref())
        .await
        .map_err(OpenError::Failed)?;
    let local = io.local_addr();
    cluster.stats.upstream_cx_http1_total.inc();
    let guard = H1Guard::new(cluster.clone());
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let target = if method == Method::CONNECT {
        authority
    } else {
        uri.path()
    };
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (k, v) in &headers {
        head.extend_from_slice(k.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let failed = |e: std::io::Error| OpenError::Failed(format!("http/1.1 tunnel: {e}"));
    io.write_all(&head).await.map_err(failed)?;
    io.flush().await.map_err(failed)?;
    // The response head; bytes after it are the tunnel's first.
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_H1_HEAD {
            return Err(OpenError::Failed(
                "http/1.1 tunnel: response head too large".into(),
            ));
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.map_err(failed)?;
        if n == 0 {
            return Err(OpenError::Failed(
                "http/1.1 tunnel: connection closed before a response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let status = std::str::from_utf8(&buf[..end])
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        // As Envoy: over HTTP/1.1 any 2xx opens the tunnel (content-length
        // and transfer-encoding ignored, RFC 7231 §4.3.6).
        Some(s) if (200..300).contains(&s) => {}
        Some(s) => return Err(OpenError::Failed(format!("tunnel refused: {s}"))),
        None => {
            return Err(OpenError::Failed(
                "http/1.1 tunnel: malformed response".into(),
            ))
        }
    }
    let rest = Bytes::copy_from_slice(&buf[end..]);
    Ok(Opened {
        io: Tunnel::H1(H1Stream {
            io,
            rest,
            _guard: guard,
        }),
        tls,
        local,
    })
}

/// The HTTP/1.1 tunnel's connection in the cluster's stats and breaker.
struct H1Guard(Arc<ClusterRuntime>);

impl H1Guard {
    fn new(c: Arc<ClusterRuntime>) -> H1Guard {
        c.stats.upstream_cx_active.inc();
        c.stats.upstream_rq_total.inc();
        c.stats.upstream_rq_active.inc();
        c.breakers.default.connections.inc();
        c.breakers.default.requests.inc();
        H1Guard(c)
    }
}

impl Drop for H1Guard {
    fn drop(&mut self) {
        self.0.stats.upstream_cx_active.dec();
        self.0.stats.upstream_rq_active.dec();
        self.0.breakers.default.connections.dec();
        self.0.breakers.default.requests.dec();
    }
}

/// An HTTP/2 tunnel stream. Dropped before both sides ended, h2 resets it
/// (RST_STREAM CANCEL), as Envoy resets its tunnel stream on close.
pub struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received, not yet read.
    buf: Bytes,
    shut: bool,
    _slot: StreamSlot,
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| std::io::ErrorKind::Other.into());
    }
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        loop {
            if !me.buf.is_empty() {
                let n = me.buf.len().min(out.remaining());
                out.put_slice(&me.buf[..n]);
                me.buf.advance(n);
                // Window back to the peer only for bytes handed on.
                let _ = me.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(b)) => me.buf = b,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        loop {
            if me.send.capacity() == 0 {
                me.send.reserve_capacity(want);
            }
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(want);
                    me.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// END_STREAM (downstream FIN).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.shut {
            me.shut = true;
            me.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// An HTTP/1.1 tunnel: the connection, after the bytes that came with the
/// response head.
pub struct H1Stream {
    io: UpstreamIo,
    rest: Bytes,
    _guard: H1Guard,
}

impl AsyncRead for H1Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.rest.is_empty() {
            let n = me.rest.len().min(out.remaining());
            out.put_slice(&me.rest[..n]);
            me.rest.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, out)
    }
}

impl AsyncWrite for H1Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

crate::io::enum_io!(Tunnel { H2, H1 });
