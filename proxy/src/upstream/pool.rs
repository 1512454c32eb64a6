//! Upstream connection pools, one per (worker, cluster, protocol, routing
//! priority), keyed inside by endpoint address (and SNI, ALPN override and
//! the downstream addresses of an upstream PROXY protocol header, see
//! [`Key`]).
//!
//! HTTP/1.1 requests are sent by weir itself ([`super::h1`]) or, when
//! they need it (streamed bodies, upgrades), by hyper's connection-level
//! client; HTTP/2 uses hyper's. weir controls reuse:
//! HTTP/1.1 keeps idle connections per host and hands each request a ready
//! one; HTTP/2 multiplexes every request of a host over one connection
//! (streams arriving while it is being made wait for it).
//! `max_requests_per_connection` retires connections, idle connections close
//! after the cluster's idle timeout, and a request that hits a pooled
//! connection the peer already closed is sent again on a new connection
//! (hyper hands the unsent request back), as Envoy does.
//!
//! Circuit breakers as Envoy's connection pools apply them: a request that
//! finds no ready connection is *pending* (limited by
//! `max_pending_requests`) until a connection is made for it or one frees
//! up; a new connection needs room under `max_connections` unless the host
//! has none in this pool; a request attached to a connection counts against
//! `max_requests` until its response headers arrive. Over a limit the
//! request fails with [`PoolError::Overflow`] (Envoy: reset reason
//! `overflow`, flag UO). A pool applies the thresholds of its routing
//! priority: a route with `priority: HIGH` uses the cluster's HIGH pools
//! and limits (Envoy keys its pools by priority too).
use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Version};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    rt::{Read, ReadBufCursor, Write},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, time::Instant};
use xds_client::config::{Cluster, RoutingPriority, UpstreamProtocol};

use super::circuit_breaker::{CircuitBreakers, LimitGuard, ResourceManager};
use super::ClusterStats;
use crate::body::{Body, UpstreamBody};
use crate::stats::{Counter, Gauge};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Http1 = 0,
    Http2 = 1,
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (Envoy: UF).
    #[error("{0}")]
    Connect(String),
    /// The connection broke before a response (Envoy: UC / reset).
    #[error("{0}")]
    Reset(String),
    /// A circuit breaker refused the request (Envoy: UO).
    #[error("overflow")]
    Overflow,
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }
    pub fn is_overflow(&self) -> bool {
        matches!(self, PoolError::Overflow)
    }
}

/// The certificates of a pooled TLS connection, shared by reference with
/// each response it carries (`None`: plain connection).
pub type ConnTls = Option<Arc<crate::tls::UpstreamTlsInfo>>;

/// What a pooled connection tells each response it carries: its
/// certificates and its local address (read once when it is made, for
/// `%UPSTREAM_LOCAL_ADDRESS%`: no system call per request).
#[derive(Clone, Default)]
pub struct ConnInfo {
    pub tls: ConnTls,
    pub local: Option<LocalAddr>,
}

/// The local address of an upstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalAddr {
    Ip(SocketAddr),
    /// A connection to an internal listener (Envoy's
    /// `envoy://internal_client_address/`; no port).
    Internal,
}

/// An HTTP/1 connection in the pool: hyper's client (idle, or still
/// busy with a response body), or an idle connection weir drives itself
/// ([`super::h1`]; busy ones are owned by their response body).
enum Idle {
    Hyper {
        sender: http1::SendRequest<Body>,
        used: u32,
        since: Instant,
        conn: ConnInfo,
    },
    Inline(Box<super::h1::Conn>),
}

impl Idle {
    fn is_closed(&self) -> bool {
        match self {
            Idle::Hyper { sender, .. } => sender.is_closed(),
            // Checked when taken (see `h1::Conn::alive`).
            Idle::Inline(_) => false,
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Idle::Hyper { sender, .. } => sender.is_ready(),
            Idle::Inline(_) => true,
        }
    }

    fn since(&self) -> Instant {
        match self {
            Idle::Hyper { since, .. } => *since,
            Idle::Inline(c) => c.since,
        }
    }
}

struct H2 {
    sender: http2::SendRequest<Body>,
    used: u32,
    conn: ConnInfo,
}

#[derive(Default)]
struct HostConns {
    idle: Vec<Idle>,
    h2: Option<H2>,
    /// Connections to this host open or opening in this pool (busy ones
    /// included), for the circuit breaker's "a host with no connection
    /// always gets one" rule.
    open: Arc<AtomicUsize>,
    /// Held while this key's HTTP/2 connection is being made: streams that
    /// arrive meanwhile wait for it instead of opening their own (Envoy
    /// attaches them to the connecting connection).
    h2_connecting: Arc<H2Gate>,
}

/// One HTTP/2 connection attempt at a time per key.
#[derive(Default)]
struct H2Gate {
    /// Held by the stream making the connection; inside, the attempt that
    /// failed last and why.
    lock: tokio::sync::Mutex<Option<(usize, String)>>,
    /// Attempts started.
    started: AtomicUsize,
}

struct Settings {
    kind: PoolKind,
    /// ALPN offered on TLS connections when the context lists none.
    alpn: crate::tls::client::AlpnFallback,
    connect_timeout: Duration,
    tcp_keepalive: Option<xds_client::config::TcpKeepalive>,
    idle_timeout: Option<Duration>,
    max_requests: Option<u32>,
    http2: xds_client::config::Http2Settings,
    cx_total: Arc<Counter>,
    cx_proto: Arc<Counter>,
    idle_timeout_c: Arc<Counter>,
    cx_active: Arc<Gauge>,
    connect_fail: Arc<Counter>,
    connect_timeout_c: Arc<Counter>,
    pending_overflow: Arc<Counter>,
    active_overflow: Arc<Counter>,
    pending_total: Arc<Counter>,
    pending_active: Arc<Gauge>,
    cx_overflow: Arc<Counter>,
    /// The cluster's upstream `istio.metadata_exchange`: run on TLS
    /// connections that negotiate its ALPN.
    mx: Option<Arc<filters::istio::mx::MetadataExchange>>,
}

/// Connections are kept per endpoint and, for `auto_sni` clusters, per SNI,
/// per upstream ALPN override (filter state
/// `envoy.network.application_protocols`; Envoy hashes it into the pool
/// key), so connections that offered different ALPN are not shared, and,
/// when the host's transport sends a PROXY protocol header, per downstream
/// (source, destination) the header carries (Envoy's `hashKey` of the
/// upstream PROXY protocol socket).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    addr: SocketAddr,
    sni: Option<Arc<str>>,
    alpn: Option<Arc<[Vec<u8>]>>,
    proxy_source: Option<(SocketAddr, SocketAddr)>,
    /// The hash of the filter state objects an internal connection carries
    /// (0: none), as Envoy hashes shared objects into the pool key.
    shared: u64,
}

/// The hasher of the pool's map: every HTTP/1 request looks its key up
/// twice (take and return an idle connection), and the default SipHash-1-3
/// cost about 600 instructions per request for these few words. This is a
/// folded multiply per written word (as foldhash and wyhash mix), seeded
/// once per pool from the process RNG, so the layout is not predictable
/// from outside (keys with an upstream PROXY protocol header include the
/// downstream addresses). The cluster manager's map by cluster name uses it
/// too (one lookup per request; the names come from the configuration).
#[derive(Clone, Copy)]
pub struct KeyHash(u64);

impl KeyHash {
    pub fn new() -> KeyHash {
        KeyHash(rand::random())
    }
}

impl Default for KeyHash {
    fn default() -> KeyHash {
        KeyHash::new()
    }
}

impl std::hash::BuildHasher for KeyHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

pub struct KeyHasher(u64);

impl KeyHasher {
    #[inline]
    fn mix(&mut self, x: u64) {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let m = u128::from(self.0 ^ x) * u128::from(K);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            // The length tells "a" from "a\0".
            self.mix(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.mix(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.mix(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.mix(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Where a request goes: the host, its transport socket, and what the
/// request adds to the pool key. Built by `ClusterRuntime::dest`.
#[derive(Clone)]
pub struct Dest<'a> {
    pub addr: SocketAddr,
    pub tls: Option<&'a Arc<crate::tls::ClientTls>>,
    /// The host's transport starts with a PROXY protocol header.
    pub proxy_protocol: Option<&'a xds_client::config::ProxyProtocolUpstream>,
    /// `auto_sni`: the SNI for this request.
    pub sni: Option<Arc<str>>,
    /// The ALPN TLS offers instead of the cluster's (ignored without TLS).
    pub alpn: Option<Arc<[Vec<u8>]>>,
    /// The downstream the PROXY protocol header describes (`None`: a
    /// connection for no downstream, e.g. a callout).
    pub source: Option<&'a super::proxy_protocol::ProxySource>,
    /// An internal host: where its connections go and what they carry.
    pub internal: Option<InternalDest>,
}

/// What a connection to an internal host needs.
#[derive(Clone)]
pub struct InternalDest {
    pub host: Arc<crate::internal::InternalHost>,
    /// The request's filter state shared with upstream (only carried by
    /// an `internal_upstream` transport).
    pub shared: Option<Arc<crate::internal::SharedObjects>>,
}

impl InternalDest {
    /// What a new connection passes to the internal listener.
    pub fn passed(&self) -> crate::internal::Passed {
        if !self.host.upstream {
            return Default::default();
        }
        crate::internal::Passed {
            ready: None,
            metadata: self.host.metadata.clone(),
            state: self
                .shared
                .as_ref()
                .map(|s| s.state.clone())
                .unwrap_or_default(),
        }
    }

    /// The pool-key part: connections carrying different objects are
    /// not shared.
    fn key(&self) -> u64 {
        match &self.shared {
            Some(s) if self.host.upstream => s.hash,
            _ => 0,
        }
    }
}

/// What a new connection needs beyond its key.
struct Transport<'a> {
    tls: Option<&'a Arc<crate::tls::ClientTls>>,
    proxy_protocol: Option<&'a xds_client::config::ProxyProtocolUpstream>,
    source: Option<&'a super::proxy_protocol::ProxySource>,
    internal: Option<InternalDest>,
}

/// A pool. The mutex is uncontended: each worker thread has its own pool.
pub struct Client {
    settings: Settings,
    hosts: Mutex<HashMap<Key, HostConns, KeyHash>>,
    breakers: Arc<CircuitBreakers>,
    /// Whose thresholds this pool applies.
    priority: RoutingPriority,
    /// Woken when a connection is returned idle or closes, for requests
    /// pending at the connection limit.
    freed: Arc<tokio::sync::Notify>,
}

/// Builds a pool for one cluster, worker, protocol and routing priority.
pub fn build(
    c: &Cluster,
    kind: PoolKind,
    priority: RoutingPriority,
    stats: &ClusterStats,
    breakers: Arc<CircuitBreakers>,
) -> Client {
    Client {
        settings: Settings {
            kind,
            alpn: match (kind, c.protocol) {
                (PoolKind::Http2, _) => crate::tls::client::AlpnFallback::Http2,
                (PoolKind::Http1, UpstreamProtocol::Auto) => crate::tls::client::AlpnFallback::Auto,
                (PoolKind::Http1, _) => crate::tls::client::AlpnFallback::Http1,
            },
            connect_timeout: c.connect_timeout,
            tcp_keepalive: c.tcp_keepalive,
            idle_timeout: c.idle_timeout,
            max_requests: c.max_requests_per_connection,
            http2: c.http2,
            cx_total: stats.upstream_cx_total.clone(),
            idle_timeout_c: stats.upstream_cx_idle_timeout.clone(),
            cx_proto: match kind {
                PoolKind::Http1 => stats.upstream_cx_http1_total.clone(),
                PoolKind::Http2 => stats.upstream_cx_http2_total.clone(),
            },
            cx_active: stats.upstream_cx_active.clone(),
            connect_fail: stats.upstream_cx_connect_fail.clone(),
            connect_timeout_c: stats.upstream_cx_connect_timeout.clone(),
            pending_overflow: stats.upstream_rq_pending_overflow.clone(),
            active_overflow: stats.upstream_rq_active_overflow.clone(),
            pending_total: stats.upstream_rq_pending_total.clone(),
            pending_active: stats.upstream_rq_pending_active.clone(),
            cx_overflow: stats.upstream_cx_overflow.clone(),
            mx: None,
        },
        hosts: Mutex::new(HashMap::with_hasher(KeyHash::new())),
        breakers,
        priority,
        freed: Arc::new(tokio::sync::Notify::new()),
    }
}

/// A request waiting for a connection (`upstream_rq_pending_active`).
struct Pending<'a> {
    _slot: LimitGuard<'a>,
    active: &'a Gauge,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Client {
    /// Runs Istio's metadata exchange on connections that negotiate its
    /// ALPN (the cluster's `filters`).
    pub fn with_metadata_exchange(
        mut self,
        mx: Option<Arc<filters::istio::mx::MetadataExchange>>,
    ) -> Self {
        self.settings.mx = mx;
        self
    }

    /// Sends `req` to `d.addr` on a pooled connection of its key, or a new
    /// one; with the response, that connection's certificates.
    pub async fn request(
        self: &Arc<Self>,
        d: Dest<'_>,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, ConnInfo), PoolError> {
        let tls = d.tls;
        let key = Key {
            addr: d.addr,
            sni: d.sni,
            alpn: d.alpn.filter(|_| tls.is_some()),
            proxy_source: d
                .proxy_protocol
                .and(d.source)
                .map(super::proxy_protocol::ProxySource::key),
            shared: d.internal.as_ref().map_or(0, InternalDest::key),
        };
        let t = Transport {
            tls,
            proxy_protocol: d.proxy_protocol,
            source: d.source,
            internal: d.internal,
        };
        let addr = &key;
        match self.settings.kind {
            // An HTTP/1 pool whose TLS upstream negotiated h2 by ALPN
            // (`auto_config`) keeps that connection in its h2 slot.
            PoolKind::Http1 if tls.is_some() && self.live_h2(addr) => {
                hyper_response(self.request_h2(addr, &t, req).await)
            }
            PoolKind::Http1 => self.request_h1(addr, &t, req).await,
            PoolKind::Http2 => hyper_response(self.request_h2(addr, &t, req).await),
        }
    }

    fn live_h2(&self, addr: &Key) -> bool {
        let hosts = self.hosts.lock().expect("pool lock");
        hosts
            .get(addr)
            .and_then(|c| c.h2.as_ref())
            .is_some_and(|h| !h.sender.is_closed())
    }

    fn take_idle(&self, addr: &Key) -> Option<Idle> {
        let mut hosts = self.hosts.lock().expect("pool lock");
        let conns = hosts.get_mut(addr)?;
        let idle_timeout = self.settings.idle_timeout;
        let mut now = None;
        // hyper connections that closed leave the list (an atomic load
        // each; a closed sender is never ready, so nothing else would
        // remove it when the sweep does not run).
        conns.idle.retain(|c| !c.is_closed());
        // Most recently used first (warm connections); busy ones stay.
        // Expired ones met on the way are dropped (dropping a sender
        // closes its connection); the others wait for the sweep, so a take
        // reads the clock once, not once per idle connection.
        while let Some(pos) = conns.idle.iter().rposition(Idle::is_ready) {
            let c = conns.idle.swap_remove(pos);
            let expired = idle_timeout.is_some_and(|t| {
                let now = *now.get_or_insert_with(Instant::now);
                now.duration_since(c.since()) >= t
            });
            if !c.is_closed() && !expired {
                return Some(c);
            }
        }
        None
    }

    /// Whether a connection to `addr` is ready in the idle list.
    fn has_idle(&self, addr: &Key) -> bool {
        let hosts = self.hosts.lock().expect("pool lock");
        hosts
            .get(addr)
            .is_some_and(|c| c.idle.iter().any(|i| i.is_ready() && !i.is_closed()))
    }

    /// A pooled connection still busy with a response (its body not yet
    /// read), for a request waiting at the connection limit.
    fn take_busy(&self, addr: &Key) -> Option<Idle> {
        let mut hosts = self.hosts.lock().expect("pool lock");
        let conns = hosts.get_mut(addr)?;
        let pos = conns
            .idle
            .iter()
            .position(|c| !c.is_closed() && !c.is_ready())?;
        Some(conns.idle.swap_remove(pos))
    }

    /// Returns a connection taken by [`Client::take_busy`].
    fn put_back(&self, addr: &Key, c: Idle) {
        let mut hosts = self.hosts.lock().expect("pool lock");
        hosts.entry(addr.clone()).or_default().idle.push(c);
    }

    fn put_idle(&self, addr: &Key, sender: http1::SendRequest<Body>, used: u32, conn: ConnInfo) {
        if self.settings.max_requests.is_some_and(|m| used >= m) {
            return;
        }
        {
            let mut hosts = self.hosts.lock().expect("pool lock");
            hosts
                .entry(addr.clone())
                .or_default()
                .idle
                .push(Idle::Hyper {
                    sender,
                    used,
                    since: Instant::now(),
                    conn,
                });
        }
        // Requests pending at the connection limit may take it.
        self.freed.notify_waiters();
    }

    /// Returns an inline connection whose exchange ended cleanly to the
    /// idle list (unless it reached `max_requests_per_connection`, or its
    /// host left the pool meanwhile: it closes then).
    pub(super) fn put_inline(&self, mut c: Box<super::h1::Conn>) {
        if self.settings.max_requests.is_some_and(|m| c.used >= m) {
            return;
        }
        {
            let mut hosts = self.hosts.lock().expect("pool lock");
            let Some(conns) = hosts.get_mut(&c.key) else {
                return;
            };
            c.since = Instant::now();
            conns.idle.push(Idle::Inline(c));
        }
        self.freed.notify_waiters();
    }

    /// The limits of this pool's routing priority.
    fn limits(&self) -> &ResourceManager {
        self.breakers.at(self.priority)
    }

    /// Enters the pending state, or fails at `max_pending_requests`.
    fn pending(&self) -> Result<Pending<'_>, PoolError> {
        let rm = self.limits();
        if !rm.pending.can_create() {
            self.settings.pending_overflow.inc();
            return Err(PoolError::Overflow);
        }
        self.settings.pending_total.inc();
        self.settings.pending_active.inc();
        Ok(Pending {
            _slot: rm.pending.guard(),
            active: &self.settings.pending_active,
        })
    }

    /// Attaches a request to a connection, or fails at `max_requests`
    /// (`upstream_rq_active_overflow`, as Envoy 1.40).
    fn attach(&self) -> Result<LimitGuard<'_>, PoolError> {
        let rm = self.limits();
        if !rm.requests.can_create() {
            self.settings.active_overflow.inc();
            return Err(PoolError::Overflow);
        }
        Ok(rm.requests.guard())
    }

    /// The open-connection count of `addr` in this pool.
    fn host_open(&self, addr: &Key) -> Arc<AtomicUsize> {
        let mut hosts = self.hosts.lock().expect("pool lock");
        hosts.entry(addr.clone()).or_default().open.clone()
    }

    async fn request_h1(
        self: &Arc<Self>,
        addr: &Key,
        tls: &Transport<'_>,
        mut req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, ConnInfo), PoolError> {
        *req.version_mut() = Version::HTTP_11;
        // Sent by weir itself (see `h1`), or by hyper's client.
        let inline = super::h1::can_send(&req);
        let mut pending: Option<Pending<'_>> = None;
        loop {
            // A reused connection may have been closed by the peer; hyper
            // gives the request back when it was not sent, and we try
            // another.
            while let Some(idle) = self.take_idle(addr) {
                pending = None;
                let _rq = self.attach()?;
                let (mut sender, used, conn) = match idle {
                    Idle::Hyper {
                        sender, used, conn, ..
                    } => (sender, used, conn),
                    Idle::Inline(mut c) => {
                        // Closed by the peer meanwhile: try the next one.
                        if !c.alive().await {
                            continue;
                        }
                        if inline {
                            return c.exchange(self, req).await;
                        }
                        // hyper's client takes the connection over (its
                        // read buffer is empty between exchanges).
                        let (used, info) = (c.used, c.info.clone());
                        match self.hyper_h1(c.into_io()).await {
                            Ok(sender) => (sender, used, info),
                            Err(_) => continue,
                        }
                    }
                };
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let c = conn.clone();
                        self.put_idle(addr, sender, used + 1, conn);
                        return Ok((resp.map(UpstreamBody::Hyper), c));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(r) => req = r,
                        None => return Err(PoolError::Reset(error_text(e.error()))),
                    },
                }
            }
            if pending.is_none() {
                pending = Some(self.pending()?);
            }
            let open = self.host_open(addr);
            if self.limits().connections.can_create() || open.load(Relaxed) == 0 {
                break;
            }
            // At max_connections: wait for one of this pool's connections
            // to the host to finish its exchange, come back or close (the
            // route timeout bounds the wait).
            self.settings.cx_overflow.inc();
            match self.take_busy(addr) {
                Some(mut busy) => {
                    if let Idle::Hyper { sender, .. } = &mut busy {
                        if sender.ready().await.is_ok() {
                            self.put_back(addr, busy);
                        }
                    }
                }
                None => {
                    // Registered, then looked at again: a connection freed
                    // between the look above and the registration is not
                    // missed (registering only here keeps the Notify off
                    // the path of requests that find a connection).
                    let freed = self.freed.notified();
                    tokio::pin!(freed);
                    freed.as_mut().enable();
                    if !self.has_idle(addr)
                        && !self.limits().connections.can_create()
                        && open.load(Relaxed) != 0
                    {
                        freed.await;
                    }
                }
            }
        }
        // A new connection: its futures (TCP and TLS connect, handshakes)
        // are several times the size of a pooled request's, so they are
        // boxed rather than carried by every request's future.
        Box::pin(self.connect_h1(addr, tls, req, pending, inline)).await
    }

    /// The part of [`Client::request_h1`] that opens a new connection.
    async fn connect_h1(
        self: &Arc<Self>,
        addr: &Key,
        tls: &Transport<'_>,
        mut req: Request<Body>,
        pending: Option<Pending<'_>>,
        inline: bool,
    ) -> Result<(Response<UpstreamBody>, ConnInfo), PoolError> {
        let (io, alpn, conn_tls) = self.connect(addr, tls).await?;
        drop(pending);
        let _rq = self.attach()?;
        if alpn.as_deref() == Some(b"h2") {
            let mut sender = self.h2_handshake(addr, io, conn_tls.clone()).await?;
            to_h2(&mut req);
            return sender
                .send_request(req)
                .await
                .map(|r| (r.map(UpstreamBody::Hyper), conn_tls))
                .map_err(|e| PoolError::Reset(error_text(&e)));
        }
        if inline {
            return super::h1::Conn::new(io, addr.clone(), conn_tls)
                .exchange(self, req)
                .await;
        }
        let mut sender = self
            .hyper_h1(io)
            .await
            .map_err(|e| PoolError::Connect(error_text(&e)))?;
        match sender.send_request(req).await {
            Ok(resp) => {
                if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    self.put_idle(addr, sender, 1, conn_tls.clone());
                }
                Ok((resp.map(UpstreamBody::Hyper), conn_tls))
            }
            Err(e) => Err(PoolError::Reset(error_text(&e))),
        }
    }

    /// Starts hyper's HTTP/1 client on `io` (its connection task runs on
    /// its own, upgrades included).
    async fn hyper_h1(&self, io: CountedIo) -> Result<http1::SendRequest<Body>, hyper::Error> {
        let (sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    async fn request_h2(
        &self,
        addr: &Key,
        tls: &Transport<'_>,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, ConnInfo), PoolError> {
        to_h2(&mut req);
        let (mut sender, conn_tls) = match self.take_h2(addr) {
            Ok(s) => s,
            Err(gate) => {
                // Pending while the connection is made. The host has no
                // HTTP/2 connection here, so one is made even at
                // max_connections (counted as an overflow), as Envoy.
                let pending = self.pending()?;
                let seen = gate.started.load(Relaxed);
                let (mut making, waited) = match gate.lock.try_lock() {
                    Ok(g) => (g, false),
                    Err(_) => (gate.lock.lock().await, true),
                };
                // Made by the stream that held the gate meanwhile?
                match self.take_h2(addr) {
                    Ok(s) => {
                        *making = None;
                        s
                    }
                    // The attempt in progress when this stream arrived
                    // failed: so does this stream (Envoy fails the streams
                    // waiting on a connection that fails).
                    Err(_) if waited && making.as_ref().is_some_and(|(n, _)| *n == seen) => {
                        let why = making.as_ref().map(|(_, e)| e.clone()).unwrap_or_default();
                        return Err(PoolError::Connect(why));
                    }
                    Err(_) => {
                        let attempt = gate.started.fetch_add(1, Relaxed) + 1;
                        if !self.limits().connections.can_create() {
                            self.settings.cx_overflow.inc();
                        }
                        // Boxed: only a new connection carries these futures.
                        let made = Box::pin(async {
                            let (io, _, t) = self.connect(addr, tls).await?;
                            self.h2_handshake(addr, io, t.clone()).await.map(|s| (s, t))
                        })
                        .await;
                        *making = made.as_ref().err().map(|e| (attempt, e.to_string()));
                        drop(pending);
                        made?
                    }
                }
            }
        };
        let _rq = self.attach()?;
        sender
            .send_request(req)
            .await
            .map(|r| (r, conn_tls))
            .map_err(|e| PoolError::Reset(error_text(&e)))
    }

    /// A stream on the key's HTTP/2 connection if it is open and under
    /// `max_requests_per_connection`; else the gate to hold while making
    /// a new one.
    fn take_h2(&self, addr: &Key) -> Result<(http2::SendRequest<Body>, ConnInfo), Arc<H2Gate>> {
        let mut hosts = self.hosts.lock().expect("pool lock");
        let conns = hosts.entry(addr.clone()).or_default();
        match &mut conns.h2 {
            Some(h)
                if !h.sender.is_closed()
                    && self.settings.max_requests.is_none_or(|m| h.used < m) =>
            {
                h.used += 1;
                Ok((h.sender.clone(), h.conn.clone()))
            }
            _ => {
                conns.h2 = None;
                Err(conns.h2_connecting.clone())
            }
        }
    }

    /// Starts an HTTP/2 connection on `io` and keeps it as the host's.
    async fn h2_handshake(
        &self,
        addr: &Key,
        io: CountedIo,
        info: ConnInfo,
    ) -> Result<http2::SendRequest<Body>, PoolError> {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(self.settings.http2.initial_stream_window_size)
            .initial_connection_window_size(self.settings.http2.initial_connection_window_size)
            .max_concurrent_reset_streams(1024);
        if let Some(i) = self.settings.http2.keepalive_interval {
            b.keep_alive_interval(i);
            if let Some(t) = self.settings.http2.keepalive_timeout {
                b.keep_alive_timeout(t);
            }
        }
        let (sender, conn) = b
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(error_text(&e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut hosts = self.hosts.lock().expect("pool lock");
        hosts.entry(addr.clone()).or_default().h2 = Some(H2 {
            sender: sender.clone(),
            used: 1,
            conn: info,
        });
        Ok(sender)
    }

    /// Connects (TCP, then TLS when the host's transport says so).
    /// Returns the connection and the ALPN protocol TLS negotiated.
    async fn connect(
        &self,
        key: &Key,
        t: &Transport<'_>,
    ) -> Result<(CountedIo, Option<Vec<u8>>, ConnInfo), PoolError> {
        let (addr, sni, alpn_override) = (key.addr, key.sni.as_deref(), key.alpn.as_deref());
        let tls = t.tls;
        let s = &self.settings;
        // Counted against max_connections from the attempt on (Envoy counts
        // connecting connections too) until the connection closes.
        let slot = ConnSlot::new(
            self.breakers.clone(),
            self.priority,
            self.host_open(key),
            self.freed.clone(),
        );
        if let Some(i) = &t.internal {
            return self
                .connect_internal(i, tls.is_some() || t.proxy_protocol.is_some(), slot)
                .await;
        }
        let mut stream = super::connect_tcp(
            addr,
            s.connect_timeout,
            s.tcp_keepalive.as_ref(),
            &s.connect_fail,
            &s.connect_timeout_c,
        )
        .await
        .map_err(|e| {
            PoolError::Connect(match e {
                super::TcpConnectError::Io(code) => format!("delayed connect error: {code}"),
                super::TcpConnectError::Timeout => e.to_string(),
            })
        })?;
        let local = stream.local_addr().ok().map(LocalAddr::Ip);
        // The upstream PROXY protocol header goes first, before TLS.
        if let Some(pp) = t.proxy_protocol {
            if let Err(e) = super::proxy_protocol::write_header(&mut stream, pp, t.source).await {
                s.connect_fail.inc();
                return Err(PoolError::Connect(format!("PROXY protocol header: {e}")));
            }
        }
        s.cx_total.inc();
        s.cx_proto.inc();
        s.cx_active.inc();
        let (io, alpn, conn_tls) = match tls {
            None => (UpstreamIo::Plain(stream), None, None),
            Some(ctls) => match ctls
                .connect_with(stream, addr, s.alpn, sni, alpn_override)
                .await
            {
                Ok((t, alpn)) if s.mx.is_some() => {
                    let conn_tls = Some(Arc::new(ctls.upstream_info(&t)));
                    // Istio's upstream metadata exchange, when the ALPN
                    // says so; the upstream peer is not kept for HTTP
                    // (istio.stats reads its peer from the headers).
                    match crate::mx::start(
                        UpstreamIo::Tls(Box::new(t)),
                        s.mx.as_ref(),
                        alpn.as_deref(),
                    )
                    .await
                    {
                        Ok(io) => (UpstreamIo::Exchanged(Box::new(io)), alpn, conn_tls),
                        Err(e) => {
                            s.cx_active.dec();
                            s.connect_fail.inc();
                            return Err(PoolError::Connect(format!("metadata exchange: {e}")));
                        }
                    }
                }
                Ok((t, alpn)) => {
                    let conn_tls = Some(Arc::new(ctls.upstream_info(&t)));
                    (UpstreamIo::Tls(Box::new(t)), alpn, conn_tls)
                }
                Err(e) => {
                    s.cx_active.dec();
                    s.connect_fail.inc();
                    return Err(PoolError::Connect(e));
                }
            },
        };
        Ok((
            CountedIo {
                io: TokioIo::new(io),
                active: s.cx_active.clone(),
                _slot: slot,
            },
            alpn,
            ConnInfo {
                tls: conn_tls,
                local,
            },
        ))
    }

    /// A connection to an internal host: an in-process pipe to its
    /// listener (see [`crate::internal`]).
    async fn connect_internal(
        &self,
        i: &InternalDest,
        wrapped: bool,
        slot: ConnSlot,
    ) -> Result<(CountedIo, Option<Vec<u8>>, ConnInfo), PoolError> {
        let s = &self.settings;
        if wrapped {
            s.connect_fail.inc();
            return Err(PoolError::Connect(
                "TLS or PROXY protocol over an internal connection is not implemented".into(),
            ));
        }
        let stream = match crate::internal::connect(&i.host.target, i.passed()).await {
            Ok(c) => c,
            Err(e) => {
                s.connect_fail.inc();
                return Err(PoolError::Connect(e));
            }
        };
        s.cx_total.inc();
        s.cx_proto.inc();
        s.cx_active.inc();
        Ok((
            CountedIo {
                io: TokioIo::new(UpstreamIo::Internal(stream)),
                active: s.cx_active.clone(),
                _slot: slot,
            },
            None,
            ConnInfo {
                tls: None,
                local: Some(LocalAddr::Internal),
            },
        ))
    }

    /// Drops the pooled connections of hosts no longer in the cluster
    /// (EDS or DNS removed them): idle ones close now; a request in flight
    /// on one finishes first (hyper closes a connection whose sender is gone
    /// once its exchange ends).
    pub fn retain_hosts(&self, keep: &std::collections::HashSet<SocketAddr>) {
        let mut hosts = self.hosts.lock().expect("pool lock");
        hosts.retain(|k, _| keep.contains(&k.addr));
    }

    /// Forgets `gone` hosts (an ORIGINAL_DST cleanup): their idle
    /// connections close; requests in flight finish on theirs.
    pub fn remove_hosts(&self, gone: &std::collections::HashSet<SocketAddr>) {
        let mut hosts = self.hosts.lock().expect("pool lock");
        hosts.retain(|k, _| !gone.contains(&k.addr));
    }

    /// Whether this pool holds a connection (idle, HTTP/2 or busy) to
    /// `addr`: an ORIGINAL_DST host stays while one does (Envoy keeps a
    /// host its connection pools use).
    pub fn holds(&self, addr: SocketAddr) -> bool {
        let hosts = self.hosts.lock().expect("pool lock");
        hosts.iter().any(|(k, c)| {
            k.addr == addr
                && (c.idle.iter().any(|i| !i.is_closed())
                    || c.h2.as_ref().is_some_and(|h| !h.sender.is_closed())
                    || c.open.load(Relaxed) > 0)
        })
    }

    /// Closes idle connections past the idle timeout and forgets keys with
    /// no connection left (keys per downstream connection of a PROXY
    /// protocol cluster come and go with their clients).
    pub fn sweep(&self) {
        let t = self.settings.idle_timeout.unwrap_or(Duration::MAX);
        let now = Instant::now();
        let mut hosts = self.hosts.lock().expect("pool lock");
        for conns in hosts.values_mut() {
            let idle_c = &self.settings.idle_timeout_c;
            conns.idle.retain_mut(|c| {
                if c.is_closed() {
                    return false;
                }
                // An inline connection the peer closed (or wrote to) while
                // idle: found here or when next taken.
                if let Idle::Inline(i) = c {
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    if !i.poll_alive(&mut cx) {
                        return false;
                    }
                }
                // Idle past the timeout: closed here (counted, as Envoy's
                // upstream_cx_idle_timeout). Busy connections are not idle.
                let expired = c.is_ready() && now.duration_since(c.since()) >= t;
                if expired {
                    idle_c.inc();
                }
                !expired
            });
            if conns.h2.as_ref().is_some_and(|h| h.sender.is_closed()) {
                conns.h2 = None;
            }
        }
        hosts.retain(|_, c| !c.idle.is_empty() || c.h2.is_some() || c.open.load(Relaxed) > 0);
    }
}

/// Turns a request built for HTTP/1.1 (origin-form URI and Host) into an
/// HTTP/2 one (absolute URI, Host as :authority), for an HTTP/1 pool whose
/// TLS upstream chose h2 by ALPN. Requests built for HTTP/2 are unchanged.
/// Marks a request as an upgrade (the `upgrade` value): on an HTTP/2
/// connection it goes out as an extended CONNECT (see [`to_h2`]).
#[derive(Clone)]
pub struct Upgrade(pub http::HeaderValue);

/// A request as HTTP/2 sends it. An [`Upgrade`] becomes the extended
/// CONNECT (RFC 8441) it stands for, as Envoy's
/// `transformUpgradeRequestFromH1toH2`: `:protocol` from `upgrade`; no
/// `upgrade`, `connection`, nor a zero `content-length`. The upstream must
/// offer SETTINGS_ENABLE_CONNECT_PROTOCOL, else it refuses the stream.
fn to_h2(req: &mut Request<Body>) {
    *req.version_mut() = Version::HTTP_2;
    if let Some(Upgrade(proto)) = req.extensions_mut().remove::<Upgrade>() {
        if let Ok(p) = proto.to_str() {
            *req.method_mut() = http::Method::CONNECT;
            req.extensions_mut().insert(hyper::ext::Protocol::from(p));
            let h = req.headers_mut();
            h.remove(http::header::UPGRADE);
            h.remove(http::header::CONNECTION);
            if h.get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v == "0")
            {
                h.remove(http::header::CONTENT_LENGTH);
            }
        }
    }
    if req.uri().authority().is_some() {
        return;
    }
    let Some(host) = req.headers_mut().remove(http::header::HOST) else {
        return;
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    if let Ok(uri) = http::Uri::builder()
        .scheme("https")
        .authority(host.as_bytes())
        .path_and_query(pq)
        .build()
    {
        *req.uri_mut() = uri;
    }
}

/// A response from hyper's client as the pool returns it.
fn hyper_response(
    r: Result<(Response<Incoming>, ConnInfo), PoolError>,
) -> Result<(Response<UpstreamBody>, ConnInfo), PoolError> {
    r.map(|(r, c)| (r.map(UpstreamBody::Hyper), c))
}

fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = String::new();
    while let Some(c) = cur {
        last = c.to_string();
        cur = c.source();
    }
    last
}

/// A plain or TLS upstream connection.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// After Istio's metadata exchange (its header stripped from reads).
    Exchanged(Box<crate::mx::MxIo<UpstreamIo>>),
    /// An in-process connection to an internal listener.
    Internal(crate::internal::Pipe),
}

crate::io::enum_io!(UpstreamIo {
    Plain,
    Tls,
    Exchanged,
    Internal
});

impl UpstreamIo {
    /// What resets an internal connection (see [`crate::internal::Pipe`]);
    /// sockets: none.
    pub fn reset_handle(&self) -> Option<crate::internal::PipeReset> {
        match self {
            UpstreamIo::Internal(p) => Some(p.reset_handle()),
            UpstreamIo::Exchanged(m) => m.get_ref().reset_handle(),
            UpstreamIo::Plain(_) | UpstreamIo::Tls(_) => None,
        }
    }

    /// The connection's local address (one system call: read once per
    /// connection). `None` after the metadata exchange (made by the pool,
    /// which reads it before).
    pub fn local_addr(&self) -> Option<LocalAddr> {
        match self {
            UpstreamIo::Plain(s) => s.local_addr().ok().map(LocalAddr::Ip),
            UpstreamIo::Tls(t) => t.get_ref().0.local_addr().ok().map(LocalAddr::Ip),
            UpstreamIo::Internal(_) => Some(LocalAddr::Internal),
            UpstreamIo::Exchanged(_) => None,
        }
    }
}

/// A connection's place under the cluster's `max_connections`, held from
/// the connect attempt until the connection closes.
struct ConnSlot {
    breakers: Arc<CircuitBreakers>,
    priority: RoutingPriority,
    host_open: Arc<AtomicUsize>,
    freed: Arc<tokio::sync::Notify>,
}

impl ConnSlot {
    fn new(
        breakers: Arc<CircuitBreakers>,
        priority: RoutingPriority,
        host_open: Arc<AtomicUsize>,
        freed: Arc<tokio::sync::Notify>,
    ) -> Self {
        breakers.at(priority).connections.inc();
        host_open.fetch_add(1, Relaxed);
        ConnSlot {
            breakers,
            priority,
            host_open,
            freed,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.breakers.at(self.priority).connections.dec();
        self.host_open.fetch_sub(1, Relaxed);
        self.freed.notify_waiters();
    }
}

/// A connection that decrements `upstream_cx_active` when closed.
pub struct CountedIo {
    io: TokioIo<UpstreamIo>,
    active: Arc<Gauge>,
    _slot: ConnSlot,
}

impl CountedIo {
    /// The transport (for [`super::h1`], which drives it with tokio's
    /// traits).
    pub(super) fn stream(&mut self) -> &mut UpstreamIo {
        self.io.inner_mut()
    }
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Read for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod key_hash_tests {
    use std::hash::BuildHasher;

    use super::{Key, KeyHash};

    fn key(addr: &str, sni: Option<&str>) -> Key {
        Key {
            addr: addr.parse().expect("address"),
            sni: sni.map(Into::into),
            alpn: None,
            proxy_source: None,
            shared: 0,
        }
    }

    #[test]
    fn keys_differing_in_one_field_hash_apart() {
        let s = KeyHash::new();
        let keys = [
            key("127.0.0.1:80", None),
            key("127.0.0.1:81", None),
            key("127.0.0.2:80", None),
            key("[::1]:80", None),
            key("127.0.0.1:80", Some("a")),
            key("127.0.0.1:80", Some("a\0")),
            key("127.0.0.1:80", Some("")),
        ];
        let hashes: std::collections::HashSet<u64> = keys.iter().map(|k| s.hash_one(k)).collect();
        assert_eq!(hashes.len(), keys.len());
        // The same key hashes the same under one seed.
        assert_eq!(s.hash_one(&keys[0]), s.hash_one(key("127.0.0.1:80", None)));
    }
}
