//! Binding listener sockets with socket2 and the per-worker accept loops.
use std::{
    net::{SocketAddr, TcpListener as StdListener},
    sync::{atomic::Ordering, Arc},
};

use bytes::BytesMut;
use filters::network::NetAction;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{io::AsyncReadExt, sync::watch};
use xds_client::config::{
    FilterChain, FilterChainMatch, Listener, ListenerFilter, RawSocketValue, RouteSource,
    SourceType,
};

use crate::http::service::{ConnCtx, HcmRuntime, RouteSlot};
use crate::io::{Conn, DownstreamIo, Rewind};
use crate::metrics::ListenerStats;
use crate::tls::ServerTls;
use crate::Shared;

/// A filter chain at run time. A listener update keeps the runtimes of
/// chains whose configuration did not change (their connections go on) and
/// drains the connections of the others.
pub struct ChainRuntime {
    pub config: Arc<FilterChain>,
    pub tls: Option<Arc<ServerTls>>,
    pub network: NetworkRuntime,
    /// Network filters before `network` (Envoy's read filters).
    pub read_filters: filters::network::NetworkChain,
    /// true: drain this chain's connections (HTTP/1 `connection: close`,
    /// HTTP/2 GOAWAY, TCP closed after the drain time).
    pub drain: watch::Sender<bool>,
    /// The drain comes from a configuration update (see `ConnCtx`).
    pub update_drain: Arc<std::sync::atomic::AtomicBool>,
    /// Counts this chain's pass-through filters while it lives.
    pub pass_through: crate::metrics::PassThroughStats,
}

impl ChainRuntime {
    /// Drains this chain's connections because an update replaced it.
    pub fn drain_for_update(&self) {
        self.update_drain.store(true, Ordering::Relaxed);
        self.drain.send_replace(true);
    }
}

/// The terminal network filter at run time.
pub enum NetworkRuntime {
    Http(Arc<HcmRuntime>),
    Tcp(Arc<crate::tcp::TcpRuntime>),
}

/// One version of a listener's configuration at run time: what a new
/// connection is served with.
pub struct ListenerRuntime {
    pub config: Arc<Listener>,
    pub chains: Vec<Arc<ChainRuntime>>,
    pub default_chain: Option<Arc<ChainRuntime>>,
    pub stats: ListenerStats,
    /// One per `proxy_protocol` listener filter, in order.
    pub proxy_proto: Vec<crate::metrics::ProxyProtoStats>,
    /// The bound address (the real port when the config says 0).
    pub bound: SocketAddr,
    /// The listener's `access_log`: one line per connection, at its close.
    pub logs: Vec<Arc<crate::access_log::Logger>>,
    /// Set once this listener drains: connections accepted after that
    /// (graceful drain) are drained at once.
    pub draining: std::sync::atomic::AtomicBool,
}

impl ListenerRuntime {
    /// Every chain of this version.
    pub fn all_chains(&self) -> impl Iterator<Item = &Arc<ChainRuntime>> {
        self.chains.iter().chain(&self.default_chain)
    }
}

/// A bound listener: its sockets (one accept loop per worker) and the
/// current configuration version, swapped in place by LDS updates that keep
/// the address.
pub struct ListenerHandle {
    pub name: xds_client::config::Name,
    pub bound: SocketAddr,
    pub current: arc_swap::ArcSwap<ListenerRuntime>,
    /// An internal listener: no sockets; reached by name
    /// ([`crate::internal::connect`]) until `stop_accept`.
    pub internal: bool,
    /// true: stop accepting and close the sockets.
    pub stop_accept: watch::Sender<bool>,
}

impl ListenerHandle {
    /// The current configuration.
    pub fn config(&self) -> Arc<Listener> {
        self.current.load().config.clone()
    }

    /// Removed (or moved to another address) by a configuration update:
    /// stops accepting; its connections drain as after a chain update.
    pub fn remove(&self) {
        let cur = self.current.load();
        cur.draining.store(true, Ordering::Relaxed);
        for c in cur.all_chains() {
            c.drain_for_update();
        }
        self.stop_accept.send_replace(true);
    }

    /// Starts draining this listener. `graceful` keeps accepting (and
    /// draining the new connections too) for `drain_time`, as Envoy's
    /// `/drain_listeners?graceful`; otherwise the sockets close now.
    pub fn drain(self: &Arc<Self>, graceful: bool, drain_time: std::time::Duration) {
        let cur = self.current.load();
        cur.draining.store(true, Ordering::Relaxed);
        for c in cur.all_chains() {
            c.drain.send_replace(true);
        }
        if graceful && !drain_time.is_zero() {
            let me = self.clone();
            std::thread::spawn(move || {
                std::thread::sleep(drain_time);
                me.stop_accept.send_replace(true);
            });
        } else {
            self.stop_accept.send_replace(true);
        }
    }
}

fn socket(addr: SocketAddr, l: &Listener) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if l.socket.reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Envoy binds IPv6 listeners v6-only unless ipv4_compat.
        s.set_only_v6(true)?;
    }
    if l.socket.freebind {
        s.set_freebind_v4(true)?;
    }
    for o in &l.socket.raw {
        if o.state == 0 {
            apply_raw(&s, o)?;
        }
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(l.socket.backlog as i32)?;
    for o in &l.socket.raw {
        if o.state != 0 {
            apply_raw(&s, o)?;
        }
    }
    Ok(s)
}

fn apply_raw(s: &Socket, o: &xds_client::config::RawSocketOption) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let (level, name) = (o.level, o.name);
    let rc = match &o.value {
        RawSocketValue::Int(v) => {
            let v = *v as libc::c_int;
            setsockopt(fd, level, name, &v.to_ne_bytes())
        }
        RawSocketValue::Bytes(b) => setsockopt(fd, level, name, b),
    };
    rc.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("socket option level {level} name {name}: {e}"),
        )
    })
}

#[allow(unsafe_code)]
fn setsockopt(fd: i32, level: i32, name: i32, val: &[u8]) -> std::io::Result<()> {
    // SAFETY: `val` is a valid buffer of the given length for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds `workers` sockets for a listener (all on the same port).
pub fn bind(l: &Listener, workers: usize) -> std::io::Result<(SocketAddr, Vec<StdListener>)> {
    let first = socket(l.address, l)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet socket"))?;
    let mut out: Vec<StdListener> = vec![first.into()];
    for _ in 1..workers {
        if l.socket.reuse_port {
            out.push(socket(bound, l)?.into());
        } else {
            out.push(out[0].try_clone()?);
        }
    }
    Ok((bound, out))
}

/// What listener filters and the socket tell about a new connection, for
/// filter-chain matching.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    /// Source and destination (PROXY protocol may replace the socket's).
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// A listener filter restored `dst` (Envoy's `localAddressRestored()`,
    /// what an ORIGINAL_DST cluster connects to).
    pub local_restored: bool,
    /// The socket's own peer address.
    pub direct_src: SocketAddr,
    /// Lower-cased SNI from tls_inspector.
    pub sni: Option<String>,
    /// `tls` or `raw_buffer`.
    pub transport: &'static str,
    /// ALPN from tls_inspector, or the protocol http_inspector found.
    pub alpn: Vec<String>,
    /// PROXY protocol v2 TLVs the listener filter keeps for pass-through.
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// The connection's dynamic metadata (the PROXY protocol filter's
    /// `rules`): seen by network filters and tcp_proxy's access log, not by
    /// HTTP streams (as Envoy: a stream's metadata starts empty).
    pub metadata: filters::DynamicMetadata,
    /// An internal connection's addresses as Envoy names them (those
    /// `original_dst` did not restore).
    pub internal: Option<crate::internal::InternalAddrs>,
}

/// Picks the filter chain as Envoy's `FilterChainMatch` order: at each
/// criterion the most specific matching value narrows the candidates
/// (falling back to chains that leave the criterion empty); there is no
/// backtracking. `None` when nothing matches.
pub fn select_chain<'a>(
    chains: &'a [Arc<ChainRuntime>],
    m: &ConnMeta,
) -> Option<&'a Arc<ChainRuntime>> {
    let mut cand: Vec<&'a Arc<ChainRuntime>> = chains.iter().collect();
    // 1. destination port
    narrow(&mut cand, |c| match mt(c).destination_port {
        Some(p) if p == m.dst.port() => Level::Specific(1),
        Some(_) => Level::No,
        None => Level::Any,
    });
    // 2. destination IP (longest prefix)
    narrow(&mut cand, |c| cidr_level(&mt(c).prefix_ranges, m.dst.ip()));
    // 3. server name: exact, then longest wildcard suffix
    narrow(&mut cand, |c| {
        let names = &mt(c).server_names;
        if names.is_empty() {
            return Level::Any;
        }
        let Some(sni) = &m.sni else {
            return Level::No;
        };
        let mut best = Level::No;
        for n in names {
            if n == sni {
                return Level::Specific(u32::MAX);
            }
            if let Some(suffix) = n.strip_prefix("*.") {
                // `*.example.com` matches `a.example.com` and `a.b.example.com`.
                if sni.len() > suffix.len() + 1
                    && sni.ends_with(suffix)
                    && sni.as_bytes()[sni.len() - suffix.len() - 1] == b'.'
                {
                    best = best.max(Level::Specific(suffix.len() as u32 + 1));
                }
            }
        }
        best
    });
    // 4. transport protocol
    narrow(&mut cand, |c| match mt(c).transport_protocol.as_str() {
        "" => Level::Any,
        t if t == m.transport => Level::Specific(1),
        _ => Level::No,
    });
    // 5. application protocols: the first of the connection's protocols
    // that some chain names.
    let hit = m.alpn.iter().position(|p| {
        cand.iter()
            .any(|c| mt(c).application_protocols.iter().any(|a| a == p))
    });
    narrow(&mut cand, |c| {
        let aps = &mt(c).application_protocols;
        if aps.is_empty() {
            Level::Any
        } else if hit.is_some_and(|i| aps.contains(&m.alpn[i])) {
            Level::Specific(1)
        } else {
            Level::No
        }
    });
    // 6. directly connected source IP
    narrow(&mut cand, |c| {
        cidr_level(&mt(c).direct_source_prefix_ranges, m.direct_src.ip())
    });
    // 7. source type: Envoy's isSameIpOrLoopback, where loopback is the
    // canonical address only (127.0.0.1 or ::1, not all of 127.0.0.0/8).
    let local = is_same_ip_or_loopback(m);
    narrow(&mut cand, |c| match mt(c).source_type {
        SourceType::Any => Level::Any,
        SourceType::SameIpOrLoopback if local => Level::Specific(1),
        SourceType::External if !local => Level::Specific(1),
        _ => Level::No,
    });
    // 8. source IP
    narrow(&mut cand, |c| {
        cidr_level(&mt(c).source_prefix_ranges, m.src.ip())
    });
    // 9. source port
    narrow(&mut cand, |c| {
        let ports = &mt(c).source_ports;
        if ports.is_empty() {
            Level::Any
        } else if ports.contains(&m.src.port()) {
            Level::Specific(1)
        } else {
            Level::No
        }
    });
    cand.into_iter().next()
}

/// Envoy's `isSameIpOrLoopback` (source type `SAME_IP_OR_LOOPBACK`).
pub(crate) fn is_same_ip_or_loopback(m: &ConnMeta) -> bool {
    is_canonical_loopback(m.src.ip()) || m.src.ip() == m.dst.ip()
}

fn is_canonical_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v) => v == std::net::Ipv4Addr::LOCALHOST,
        std::net::IpAddr::V6(v) => v == std::net::Ipv6Addr::LOCALHOST,
    }
}

fn mt(c: &Arc<ChainRuntime>) -> &FilterChainMatch {
    &c.config.matcher
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    No,
    Any,
    Specific(u32),
}

fn narrow<T>(cand: &mut Vec<T>, level: impl Fn(&T) -> Level) {
    let best = cand.iter().map(&level).max().unwrap_or(Level::No);
    match best {
        Level::No => cand.clear(),
        b => cand.retain(|c| level(c) == b),
    }
}

fn cidr_level(ranges: &[xds_client::config::Cidr], ip: std::net::IpAddr) -> Level {
    if ranges.is_empty() {
        return Level::Any;
    }
    ranges
        .iter()
        .filter(|r| r.contains(ip))
        .map(|r| Level::Specific(u32::from(r.len) + 1))
        .max()
        .unwrap_or(Level::No)
}

/// Largest amount listener filters read before deciding.
const MAX_INSPECT: usize = 64 * 1024 + 5;

/// Reads more bytes for the listener filters; `Err` at EOF or error.
async fn read_more(
    stream: &mut Conn,
    buf: &mut BytesMut,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), ()> {
    if buf.len() >= MAX_INSPECT {
        return Err(());
    }
    // An internal connection's client waits for the listener to take it:
    // a filter waiting for bytes has.
    if let Some(r) = ready.take() {
        let _ = r.send(());
    }
    buf.reserve(4096);
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(()),
        Ok(_) => Ok(()),
    }
}

/// Runs the listener filters in order. Bytes they read stay in `buf` (to
/// be replayed), except a PROXY protocol header, which is consumed.
async fn run_listener_filters(
    lr: &ListenerRuntime,
    stream: &mut Conn,
    buf: &mut BytesMut,
    meta: &mut ConnMeta,
    state: &filters::FilterState,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), ()> {
    use bytes::Buf;
    use filters::listener::Inspect;
    use filters::listener::{http_inspector as hi, proxy_protocol as pp, tls_inspector as ti};
    // One stats set per PROXY protocol filter, in order (a disabled
    // filter's set is skipped with it).
    let mut pp_stats = lr.proxy_proto.iter();
    for (i, f) in lr.config.listener_filters.iter().enumerate() {
        // `filter_disabled`, on the (restored) destination port.
        if let Some(Some(p)) = lr.config.listener_filters_disabled.get(i) {
            if p.matches(meta.dst.port()) {
                if matches!(f, ListenerFilter::ProxyProtocol(_)) {
                    pp_stats.next();
                }
                continue;
            }
        }
        match f {
            ListenerFilter::ProxyProtocol(cfg) => {
                let Some(stats) = pp_stats.next() else {
                    return Err(());
                };
                let versions = pp::Versions {
                    v1: cfg.allow_v1,
                    v2: cfg.allow_v2,
                    optional: cfg.allow_requests_without_proxy_protocol,
                };
                loop {
                    match pp::parse_versions(buf, versions) {
                        Inspect::NeedMore => read_more(stream, buf, ready).await?,
                        Inspect::Done(Ok(h)) => {
                            stats.found[usize::from(h.version == 2)].inc();
                            if let Some((src, dst)) = h.addresses {
                                meta.src = src;
                                meta.dst = dst;
                                // As Envoy's filter: `restoreLocalAddress`.
                                meta.local_restored = true;
                            }
                            pp::apply_rules(&cfg.rules, &h.tlvs, &mut meta.metadata);
                            // Kept for an upstream PROXY protocol header as
                            // the filter's `pass_through_tlvs` says (Envoy's
                            // `envoy.network.proxy_protocol_options`).
                            meta.tlvs = h
                                .tlvs
                                .into_iter()
                                .filter(|(t, _)| cfg.pass_through.includes(*t))
                                .collect();
                            buf.advance(h.len);
                            break;
                        }
                        Inspect::Done(Err(pp::ProxyError::NotProxy))
                            if cfg.allow_requests_without_proxy_protocol =>
                        {
                            stats.not_found_allowed.inc();
                            break;
                        }
                        Inspect::Done(Err(pp::ProxyError::NotProxy)) => {
                            stats.not_found_disallowed.inc();
                            stats.cx_error.inc();
                            tracing::debug!("no PROXY protocol header; closing");
                            return Err(());
                        }
                        Inspect::Done(Err(pp::ProxyError::Disallowed(v))) => {
                            // As Envoy: found and disallowed, not an error.
                            let i = usize::from(v == 2);
                            stats.found[i].inc();
                            stats.disallowed[i].inc();
                            tracing::debug!(
                                version = v,
                                "PROXY protocol version disallowed; closing"
                            );
                            return Err(());
                        }
                        Inspect::Done(Err(e)) => {
                            let v2 = !buf.starts_with(b"PROXY");
                            stats.error[usize::from(v2)].inc();
                            stats.cx_error.inc();
                            tracing::debug!(error = %e, "PROXY protocol error; closing");
                            return Err(());
                        }
                    }
                }
            }
            ListenerFilter::OriginalDst => original_dst(stream, meta, state),
            ListenerFilter::TlsInspector => loop {
                match ti::inspect(buf) {
                    Inspect::NeedMore => read_more(stream, buf, ready).await?,
                    Inspect::Done(ti::TlsDetect::Tls(h)) => {
                        lr.stats.tls_inspector_found.inc();
                        meta.transport = "tls";
                        if let Some(s) = h.sni {
                            lr.stats.tls_inspector_sni_found.inc();
                            meta.sni = Some(s.to_ascii_lowercase());
                        }
                        meta.alpn = h
                            .alpn
                            .iter()
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect();
                        break;
                    }
                    Inspect::Done(ti::TlsDetect::TooLarge) => {
                        lr.stats.tls_inspector_too_large.inc();
                        return Err(());
                    }
                    Inspect::Done(_) => {
                        lr.stats.tls_inspector_not_found.inc();
                        break;
                    }
                }
            },
            ListenerFilter::HttpInspector => {
                if meta.transport == "tls" {
                    continue;
                }
                loop {
                    match hi::inspect(buf) {
                        Inspect::NeedMore => read_more(stream, buf, ready).await?,
                        Inspect::Done(d) => {
                            match d {
                                hi::HttpDetect::Http10 => lr.stats.http_inspector_http10.inc(),
                                hi::HttpDetect::Http11 => lr.stats.http_inspector_http11.inc(),
                                hi::HttpDetect::Http2 => lr.stats.http_inspector_http2.inc(),
                                hi::HttpDetect::NotHttp => lr.stats.http_inspector_not_found.inc(),
                                hi::HttpDetect::RequestLineTooLong => return Err(()),
                            }
                            if let Some(p) = d.alpn() {
                                meta.alpn = vec![p.to_owned()];
                            }
                            break;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// `envoy.filters.listener.original_dst`, as Envoy's: on a socket, the
/// destination before NAT (`SO_ORIGINAL_DST`; unchanged when the kernel
/// has none); on an internal connection, the passed-through metadata
/// `envoy.filters.listener.original_dst` `local` (`ip:port`), then the
/// filter state `…original_dst.local_ip` (which wins) for the local
/// address and `…original_dst.remote_ip` for the remote one.
fn original_dst(stream: &Conn, meta: &mut ConnMeta, state: &filters::FilterState) {
    match stream {
        Conn::Tcp(s) => {
            if let Some(a) = crate::netif::original_dst(s) {
                meta.dst = a;
                // As Envoy: `restoreLocalAddress` (an ORIGINAL_DST cluster
                // routes to it).
                meta.local_restored = true;
            }
        }
        Conn::Internal(_) => {
            let before = (meta.src, meta.dst);
            if let Some(a) = meta
                .metadata
                .value("envoy.filters.listener.original_dst", &["local"])
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse::<SocketAddr>().ok())
            {
                meta.dst = a;
                meta.local_restored = true;
            }
            if let Some(a) =
                state.get_typed::<filters::AddressObject>(filters::state::ORIGINAL_DST_LOCAL_IP)
            {
                meta.dst = a.0;
                meta.local_restored = true;
            }
            if let Some(a) =
                state.get_typed::<filters::AddressObject>(filters::state::ORIGINAL_DST_REMOTE_IP)
            {
                meta.src = a.0;
            }
            if let Some(i) = &mut meta.internal {
                if meta.dst != before.1
                    || state.get(filters::state::ORIGINAL_DST_LOCAL_IP).is_some()
                {
                    i.local = None;
                }
                if meta.src != before.0
                    || state.get(filters::state::ORIGINAL_DST_REMOTE_IP).is_some()
                {
                    i.remote = false;
                }
            }
        }
    }
}

/// Serves the listener's end of an internal connection on this worker
/// (see [`crate::internal`]): counted and logged like an accepted one.
pub async fn serve_internal(
    lr: Arc<ListenerRuntime>,
    stream: crate::internal::Pipe,
    target: crate::internal::InternalTarget,
    passed: crate::internal::Passed,
    shared: Arc<Shared>,
) {
    shared.active_connections.fetch_add(1, Ordering::Relaxed);
    let addrs = crate::internal::InternalAddrs {
        local: Some(target.to_string().into()),
        remote: true,
    };
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    run_connection(
        lr,
        Conn::Internal(stream),
        unspecified,
        unspecified,
        Some((passed, addrs)),
        shared,
    )
    .await;
}

/// One accepted connection's life: [`connection`], then the listener's
/// access log. The caller counted it in `active_connections`.
async fn run_connection(
    lr2: Arc<ListenerRuntime>,
    stream: Conn,
    peer: SocketAddr,
    local: SocketAddr,
    passed: Option<(crate::internal::Passed, crate::internal::InternalAddrs)>,
    shared2: Arc<Shared>,
) {
    let opened = tokio::time::Instant::now();
    let id = shared2.next_conn_id.fetch_add(1, Ordering::Relaxed);
    connection(&lr2, stream, peer, local, id, passed, &shared2).await;
    if !lr2.logs.is_empty() {
        let mut info = crate::http::info::StreamInfo::new(
            opened,
            "",
            http::Method::GET,
            Default::default(),
            Default::default(),
            "",
            peer,
            local,
            id,
        );
        info.has_request = false;
        info.duration = Some(opened.elapsed());
        for l in &lr2.logs {
            l.log(&info);
        }
    }
    shared2.active_connections.fetch_sub(1, Ordering::Relaxed);
}

/// Accepts on one worker's socket until drained.
pub async fn accept_loop(handle: Arc<ListenerHandle>, socket: StdListener, shared: Arc<Shared>) {
    let mut stop = handle.stop_accept.subscribe();
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %handle.name, error = %e, "cannot register listener");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|d| *d) => return,
        };
        // The configuration version a connection keeps for its life.
        let lr = handle.current.load_full();
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        if let Some(max) = shared.max_connections.filter(|_| !lr.config.unlimited) {
            if shared.active_connections.load(Ordering::Relaxed) >= max {
                shared.server_stats.overflow.inc();
                lr.stats.global_cx_overflow.inc();
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(lr.bound);
        shared.active_connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run_connection(
            lr,
            Conn::Tcp(stream),
            peer,
            local,
            None,
            shared.clone(),
        ));
    }
}

/// One downstream connection: listener filters, filter-chain selection,
/// the transport socket, then the chain's network filter.
async fn connection(
    lr: &Arc<ListenerRuntime>,
    mut stream: Conn,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    passed: Option<(crate::internal::Passed, crate::internal::InternalAddrs)>,
    shared: &Arc<Shared>,
) {
    // An internal connection arrives with metadata and filter state.
    let (metadata, mut conn_state, mut ready, internal) = match passed {
        Some((p, a)) => (p.metadata, p.state, p.ready, Some(a)),
        None => Default::default(),
    };
    let mut meta = ConnMeta {
        src: peer,
        dst: local,
        local_restored: false,
        direct_src: peer,
        sni: None,
        transport: "raw_buffer",
        alpn: Vec::new(),
        tlvs: Vec::new(),
        metadata,
        internal,
    };
    let mut buf = BytesMut::new();
    if !lr.config.listener_filters.is_empty() {
        let filters = run_listener_filters(
            lr,
            &mut stream,
            &mut buf,
            &mut meta,
            &conn_state,
            &mut ready,
        );
        let res = match lr.config.listener_filters_timeout {
            Some(t) => match tokio::time::timeout(t, filters).await {
                Ok(r) => r,
                Err(_) => {
                    lr.stats.pre_cx_timeout.inc();
                    if lr.config.continue_on_listener_filters_timeout {
                        Ok(())
                    } else {
                        Err(())
                    }
                }
            },
            None => filters.await,
        };
        if res.is_err() {
            return;
        }
    }
    // As Envoy: the listener counts a connection once its listener filters
    // accepted it.
    lr.stats.cx_total.inc();
    lr.stats.cx_active.inc();
    let _active = ActiveGuard(&lr.stats.cx_active);
    let chain = match crate::chain_match::select(
        lr,
        &meta,
        (!conn_state.is_empty()).then_some(&conn_state),
    ) {
        Some(c) if lr.draining.load(Ordering::Relaxed) => {
            // Accepted during a graceful drain: drained at once.
            c.drain.send_replace(true);
            c.clone()
        }
        Some(c) => c.clone(),
        None => {
            lr.stats.no_filter_chain_match.inc();
            drop(ready);
            tracing::debug!(listener = %lr.config.name, peer = %peer, "no filter chain matches; closing");
            // As Envoy's close of an internal connection its client still
            // writes to: the client sees a reset (Envoy's CONNECT
            // termination then resets the stream, CONNECT_ERROR), not a
            // clean end.
            if let Some(r) = stream.reset_handle() {
                r.reset();
            }
            return;
        }
    };
    if !chain.read_filters.is_empty() {
        let conn = conn_info(&meta, None, false, None);
        if chain.read_filters.on_new_connection(&conn, &mut conn_state) == NetAction::Close {
            return;
        }
    }
    // Taken: an internal connection's client goes on.
    if let Some(r) = ready.take() {
        let _ = r.send(());
    }
    let rewound = Rewind::new(buf, stream);
    let (io, tls) = match &chain.tls {
        Some(t) => match t
            .accept(rewound, chain.config.transport_connect_timeout)
            .await
        {
            Ok((s, info)) => (DownstreamIo::Tls(Box::new(s)), Some(Arc::new(info))),
            Err(e) => {
                tracing::debug!(listener = %lr.config.name, peer = %peer, error = %e, "TLS handshake failed");
                return;
            }
        },
        None => (DownstreamIo::Plain(rewound), None),
    };
    if !chain.read_filters.is_empty() {
        let peer = tls.as_ref().and_then(|t| t.peer.as_ref());
        let conn = conn_info(&meta, peer, tls.is_some(), Some(&conn_state));
        if chain.read_filters.on_established(&conn) == NetAction::Close {
            return;
        }
        // Filters that wait on a call (ext_authz); none: no future.
        if chain.read_filters.checks && chain.read_filters.check(&conn).await == NetAction::Close {
            return;
        }
    }
    match &chain.network {
        NetworkRuntime::Http(hcm) => {
            // Built for chains with HTTP filters, and for connections
            // with filter state (an internal connection's shared objects).
            // Also for a router-only chain when network filters left filter
            // state (an ORIGINAL_DST cluster reads it).
            let downstream = (!hcm.chain.is_router_only() || !conn_state.is_empty()).then(|| {
                let peer = tls.as_ref().and_then(|t| t.peer.as_ref());
                Arc::new(filters::Downstream {
                    remote: meta.src,
                    direct_remote: meta.direct_src,
                    local: meta.dst,
                    sni: meta.sni.clone(),
                    connection_id: id,
                    peer_uri_sans: peer.map(|p| p.uri_sans.clone()).unwrap_or_default(),
                    peer_dns_sans: peer.map(|p| p.dns_sans.clone()).unwrap_or_default(),
                    peer_subject: peer.map(|p| p.subject.clone()),
                    local_uri_sans: tls
                        .as_ref()
                        .and_then(|t| t.local.as_ref())
                        .map(|c| c.uri_sans.clone())
                        .unwrap_or_default(),
                    peer_pem: tls.as_ref().and_then(|t| t.peer_pem.clone()),
                    tls: tls.is_some(),
                    state: Default::default(),
                    filter_state: conn_state,
                })
            });
            let ctx = Arc::new(ConnCtx {
                downstream,
                hcm: hcm.clone(),
                shared: shared.clone(),
                peer: meta.src,
                direct_peer: meta.direct_src,
                sni: meta.sni.clone(),
                local: meta.dst,
                local_restored: meta.local_restored,
                metadata: std::mem::take(&mut meta.metadata),
                id,
                scheme: if tls.is_some() { "https" } else { "http" },
                tls,
                active_streams: std::sync::atomic::AtomicU32::new(0),
                idle_since_ms: std::sync::atomic::AtomicU64::new(0),
                opened: tokio::time::Instant::now(),
                proto_counted: std::sync::atomic::AtomicBool::new(false),
                requests: std::sync::atomic::AtomicU32::new(0),
                max_requests_reached: tokio::sync::Notify::new(),
                drain: chain.drain.subscribe(),
                update_drain: chain.update_drain.clone(),
                is_h2: std::sync::atomic::AtomicBool::new(false),
                internal_addrs: meta.internal.take().map(Arc::new),
                proxy_source: Arc::new(crate::upstream::proxy_protocol::ProxySource {
                    src: meta.src,
                    dst: meta.dst,
                    tlvs: std::mem::take(&mut meta.tlvs),
                }),
            });
            hcm.stats.cx_total.inc();
            hcm.stats.cx_active.inc();
            crate::http::server::serve(io, ctx, chain.drain.subscribe()).await;
            hcm.stats.cx_active.dec();
        }
        NetworkRuntime::Tcp(t) => {
            let tls2 = tls.clone();
            let end = t
                .serve(
                    io,
                    &meta,
                    tls,
                    id,
                    shared,
                    crate::tcp::ConnFilters {
                        drain: chain.drain.subscribe(),
                        state: &conn_state,
                        mx: chain.read_filters.mx.as_ref(),
                    },
                )
                .await;
            if !chain.read_filters.is_empty() {
                // The exchanged peers, as Istio's connection filter state,
                // for istio.stats.
                let shared = filters::StateFlags::default();
                for (key, peer) in [
                    (filters::istio::DOWNSTREAM_PEER, end.downstream_peer.clone()),
                    (filters::istio::UPSTREAM_PEER, end.upstream_peer.clone()),
                ] {
                    if let Some(p) = peer {
                        let _ = conn_state.set(key, p, shared);
                    }
                }
                let peer = tls2.as_ref().and_then(|t| t.peer.as_ref());
                let mut conn = conn_info(&meta, peer, tls2.is_some(), Some(&conn_state));
                if let Some(l) = tls2.as_ref().and_then(|t| t.local.as_ref()) {
                    conn.local_uri_sans = &l.uri_sans;
                }
                conn.upstream_sans = (
                    end.upstream_local_san.as_deref(),
                    end.upstream_peer_san.as_deref(),
                );
                chain.read_filters.on_close(
                    &conn,
                    &filters::network::ConnEnd {
                        bytes_received: end.bytes_received,
                        bytes_sent: end.bytes_sent,
                        cluster: end.cluster.as_deref(),
                        flags: end.flags,
                        flags_short: crate::http::info::Flags::short_of,
                    },
                );
            }
        }
    }
}

/// What network filters see of a connection.
fn conn_info<'a>(
    meta: &'a ConnMeta,
    peer: Option<&'a crate::tls::CertInfo>,
    tls: bool,
    filter_state: Option<&'a filters::FilterState>,
) -> filters::network::ConnectionInfo<'a> {
    filters::network::ConnectionInfo {
        local_uri_sans: &[],
        upstream_sans: (None, None),
        remote: meta.src,
        direct_remote: meta.direct_src,
        local: meta.dst,
        sni: meta.sni.as_deref(),
        peer: peer.map(|p| filters::network::PeerIdentity {
            uri_sans: &p.uri_sans,
            dns_sans: &p.dns_sans,
            subject: &p.subject,
        }),
        tls,
        filter_state,
        metadata: Some(&meta.metadata),
    }
}

/// Decrements a gauge when dropped.
struct ActiveGuard<'a>(&'a crate::stats::Gauge);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Builds a listener's chains (TLS contexts, HCM and TCP runtimes).
pub fn build_chain(
    fc: &Arc<FilterChain>,
    listener_port: u16,
    buffer_limit: u32,
    env: &ChainEnv<'_>,
) -> anyhow::Result<Arc<ChainRuntime>> {
    use xds_client::config::NetworkFilter;
    let tls = match &fc.tls {
        Some(t) => {
            let s = ServerTls::new(t.clone(), env.tls.secrets.clone(), env.ssl_stats.clone())
                .map_err(anyhow::Error::msg)?;
            env.tls.registry.add_server(&s);
            Some(s)
        }
        None => None,
    };
    let network = match &fc.filter {
        NetworkFilter::Http(h) => {
            let logs = h
                .access_logs
                .iter()
                .map(|a| {
                    Arc::new(crate::access_log::Logger::new(
                        a.clone(),
                        env.writer.clone(),
                    ))
                })
                .collect();
            let routes = match &h.routes {
                RouteSource::Static(r) => RouteSlot::Static(r.clone()),
                RouteSource::Rds(r) => RouteSlot::Rds(env.rds_slot(&r.name)),
            };
            NetworkRuntime::Http(Arc::new(HcmRuntime {
                routes,
                config: h.clone(),
                chain: filters::FilterChain::build_with(
                    &h.http_filters,
                    &crate::metrics::HttpFilterStats::scope(env.store, &h.stat_prefix),
                    &env.callouts,
                ),
                stats: crate::metrics::HttpStats::new(env.store, &h.stat_prefix),
                tracing: crate::http::tracing::TracingStats::new(env.store, &h.stat_prefix),
                tracer: h
                    .tracing
                    .as_ref()
                    .and_then(|t| t.provider.as_ref().or(env.default_tracer))
                    .map(|p| {
                        crate::trace::Tracer::new(p, env.callouts.clone(), env.store, env.node)
                    }),
                logs,
                listener_port,
                buffer_limit,
            }))
        }
        NetworkFilter::Tcp(t) => NetworkRuntime::Tcp(Arc::new(crate::tcp::TcpRuntime::new(
            t.clone(),
            env.store,
            env.writer,
            buffer_limit,
        ))),
    };
    // Network pass-through filters, then the HTTP ones.
    let http_pass_through = match &fc.filter {
        NetworkFilter::Http(h) => h.pass_through().collect(),
        NetworkFilter::Tcp(_) => Vec::new(),
    };
    let pass_through = crate::metrics::PassThroughStats::new(
        env.store,
        fc.pass_through.iter().copied().chain(http_pass_through),
    );
    let read_filters = filters::network::NetworkChain::build_with(
        &fc.read_filters,
        &crate::metrics::RootFilterStats::scope(env.store),
        &env.callouts,
    );
    Ok(Arc::new(ChainRuntime {
        config: fc.clone(),
        tls,
        network,
        read_filters,
        drain: watch::channel(false).0,
        update_drain: Default::default(),
        pass_through,
    }))
}

/// What building chains needs.
pub struct ChainEnv<'a> {
    pub store: &'a Arc<crate::stats::Store>,
    pub writer: &'a crate::access_log::Writer,
    pub tls: &'a crate::upstream::TlsEnv,
    pub ssl_stats: Arc<crate::metrics::SslStats>,
    /// RDS route tables, by name, with their current contents.
    pub rds: &'a crate::manager::RdsSlots,
    pub routes: &'a std::collections::BTreeMap<
        xds_client::config::Name,
        Arc<xds_client::config::RouteConfig>,
    >,
    /// Filters' calls to clusters (ext_authz, rate-limit service, JWKS).
    pub callouts: Arc<dyn filters::callout::Callouts>,
    /// The local node (span tags `node_id`, `zone`).
    pub node: &'a xds_client::config::Node,
    /// The bootstrap's `tracing.http`, for HCMs without a provider.
    pub default_tracer: Option<&'a Arc<xds_client::config::TraceProvider>>,
}

impl ChainEnv<'_> {
    /// The shared slot of RDS table `name` (an empty table until it arrives).
    fn rds_slot(
        &self,
        name: &xds_client::config::Name,
    ) -> Arc<arc_swap::ArcSwap<xds_client::config::RouteConfig>> {
        self.rds.slot(name, self.routes.get(name))
    }
}
