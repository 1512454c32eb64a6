//! Active health checking (cluster `health_checks`), as Envoy's
//! `HealthCheckerImplBase` with its HTTP (HTTP/1.1 and HTTP/2), gRPC and
//! TCP checkers: one session
//! task per host on the control runtime, a host state kept per address
//! across host-set updates.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xds_client::config::{ActiveHealthCheck, HealthCheckKind};

use crate::stats::{Counter, Gauge, StatName, Store};

use super::{ClusterRuntime, Host};

/// One host's active health state (Envoy's `FAILED_ACTIVE_HC` flag).
#[derive(Debug)]
pub struct HostState {
    failed: AtomicBool,
    /// Envoy's `lastHcPassTime`: the last passing check while the host
    /// was failing (`super::clock_ms`, 0 = none), for slow start.
    last_pass: AtomicU64,
}

impl HostState {
    #[inline]
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn last_pass(&self) -> u64 {
        self.last_pass.load(Ordering::Relaxed)
    }
}

/// `cluster.<c>.health_check.*`, as Envoy names them.
struct Stats {
    attempt: Arc<Counter>,
    success: Arc<Counter>,
    failure: Arc<Counter>,
    network_failure: Arc<Counter>,
    /// Never written: weir has no passive (outlier) feedback into the
    /// checker, `verify_cluster` needs `service_name_matcher` (rejected),
    /// `degraded` needs `x-envoy-degraded` handling (not implemented).
    _passive_failure: Arc<Counter>,
    _verify_cluster: Arc<Counter>,
    _degraded: Arc<Gauge>,
    healthy: Arc<Gauge>,
}

/// A cluster's health checker: the config, the host states and the
/// running sessions (aborted when a host leaves or the checker drops).
pub struct Checker {
    pub config: Arc<ActiveHealthCheck>,
    stats: Stats,
    inner: std::sync::Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    states: HashMap<SocketAddr, Arc<HostState>>,
    sessions: HashMap<SocketAddr, tokio::task::AbortHandle>,
    /// The runtime, once its control tasks started (sessions need it).
    owner: Option<Weak<ClusterRuntime>>,
}

/// How a check failed (Envoy's `HealthCheckFailureType`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    /// An unexpected answer: the host is unhealthy at once.
    Active,
    /// Connect failure, reset, timeout: counts toward `unhealthy_threshold`.
    Network,
}

/// Envoy's `HealthTransition`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transition {
    Unchanged,
    Changed,
    ChangePending,
}

impl Checker {
    pub fn new(config: Arc<ActiveHealthCheck>, store: &Store, cluster: &str) -> Self {
        let name = |s: &str| {
            StatName::tagged(
                "cluster",
                cluster,
                &format!("health_check.{s}"),
                "envoy_cluster_name",
            )
        };
        let c = |s: &str| store.counter(name(s));
        let g = |s: &str| store.gauge(name(s));
        Checker {
            config,
            stats: Stats {
                attempt: c("attempt"),
                success: c("success"),
                failure: c("failure"),
                network_failure: c("network_failure"),
                _passive_failure: c("passive_failure"),
                _verify_cluster: c("verify_cluster"),
                _degraded: g("degraded"),
                healthy: g("healthy"),
            },
            inner: Default::default(),
        }
    }

    /// Gives each host its state: kept per address, a new address starts
    /// failed (Envoy sets `FAILED_ACTIVE_HC` on hosts added to a checked
    /// cluster). Stops the sessions of hosts that left and, once running,
    /// starts sessions for new ones.
    pub fn attach(&self, hosts: &[Arc<Host>]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let keep: std::collections::HashSet<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
        inner.states.retain(|a, _| keep.contains(a));
        inner.sessions.retain(|a, s| {
            let k = keep.contains(a);
            if !k {
                s.abort();
            }
            k
        });
        for h in hosts {
            let st = inner
                .states
                .entry(h.addr)
                .or_insert_with(|| {
                    Arc::new(HostState {
                        failed: AtomicBool::new(true),
                        last_pass: AtomicU64::new(0),
                    })
                })
                .clone();
            let _ = h.active_hc.set(st);
        }
        self.publish_healthy(&inner);
        if let Some(owner) = inner.owner.clone() {
            Self::start_sessions(&mut inner, &owner, hosts);
        }
    }

    /// Starts checking (control runtime): a session per host.
    pub fn start(&self, owner: Weak<ClusterRuntime>, hosts: &[Arc<Host>]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.owner = Some(owner.clone());
        Self::start_sessions(&mut inner, &owner, hosts);
    }

    fn start_sessions(inner: &mut Inner, owner: &Weak<ClusterRuntime>, hosts: &[Arc<Host>]) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for h in hosts {
            if inner.sessions.contains_key(&h.addr) {
                continue;
            }
            let Some(st) = inner.states.get(&h.addr).cloned() else {
                continue;
            };
            let task = tokio::spawn(session(owner.clone(), h.clone(), st));
            inner.sessions.insert(h.addr, task.abort_handle());
        }
    }

    fn publish_healthy(&self, inner: &Inner) {
        let n = inner.states.values().filter(|s| !s.failed()).count();
        self.stats.healthy.set(n as i64);
    }

    /// The wait before the next check (Envoy's
    /// `HealthCheckerImplBase::interval`): `no_traffic_*` until the
    /// cluster made an upstream connection, then by the host's state and
    /// whether it just changed, plus jitter.
    fn interval(&self, healthy: bool, t: Transition, traffic: bool) -> Duration {
        let c = &self.config;
        let base = match (traffic, healthy, t) {
            (false, true, _) => c.no_traffic_healthy_interval,
            (false, false, _) => c.no_traffic_interval,
            (true, false, Transition::Changed) => c.unhealthy_edge_interval,
            (true, false, _) => c.unhealthy_interval,
            (true, true, Transition::Changed) => c.healthy_edge_interval,
            (true, true, _) => c.interval,
        };
        let mut ms = base.as_millis() as u64;
        let pct = c.interval_jitter_percent as u64 * ms / 100;
        let mut rng = rand::rng();
        if pct > 0 {
            ms += rng.random_range(0..pct);
        }
        let j = c.interval_jitter.as_millis() as u64;
        if j > 0 {
            ms += rng.random_range(0..j);
        }
        Duration::from_millis(ms)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        for s in inner.sessions.values() {
            s.abort();
        }
    }
}

/// Per-host counters of one session (Envoy's `ActiveHealthCheckSession`).
struct Session {
    num_healthy: u32,
    num_unhealthy: u32,
    first_check: bool,
}

impl Session {
    /// Envoy's `handleSuccess`: the first check ever passing, or
    /// `healthy_threshold` in a row, clears `FAILED_ACTIVE_HC`.
    fn success(&mut self, ck: &Checker, st: &HostState) -> Transition {
        self.num_unhealthy = 0;
        let mut t = Transition::Unchanged;
        if st.failed() {
            st.last_pass.store(super::clock_ms(), Ordering::Relaxed);
            self.num_healthy += 1;
            if self.first_check || self.num_healthy >= ck.config.healthy_threshold {
                st.failed.store(false, Ordering::Relaxed);
                t = Transition::Changed;
            } else {
                t = Transition::ChangePending;
            }
        }
        ck.stats.success.inc();
        self.first_check = false;
        t
    }

    /// Envoy's `handleFailure`: an unexpected answer fails the host at
    /// once, network failures after `unhealthy_threshold` in a row.
    fn failure(&mut self, ck: &Checker, st: &HostState, f: Failure) -> Transition {
        self.num_healthy = 0;
        let mut t = Transition::Unchanged;
        if !st.failed() {
            self.num_unhealthy += 1;
            if f == Failure::Active || self.num_unhealthy >= ck.config.unhealthy_threshold {
                st.failed.store(true, Ordering::Relaxed);
                t = Transition::Changed;
            } else {
                t = Transition::ChangePending;
            }
        }
        ck.stats.failure.inc();
        if f == Failure::Network {
            ck.stats.network_failure.inc();
        }
        self.first_check = false;
        t
    }
}

/// A reusable connection between checks.
enum Conn {
    Http(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2 (prior knowledge): HTTP/2 and gRPC checks.
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// An HTTP/2 connection for a check: the kept one if it is still ready,
/// else a new one.
async fn h2_sender(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: &CheckTransport,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, Failure> {
    if let Some(Conn::Http2(mut s)) = conn.take() {
        if s.ready().await.is_ok() {
            return Ok(s);
        }
    }
    let s = connect(addr, connect_timeout, tls).await?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .map_err(|_| Failure::Network)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// `grpc.health.v1.HealthCheckRequest { service }` in a gRPC frame.
fn grpc_health_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        prost::encoding::encode_varint(service.len() as u64, &mut msg);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0); // not compressed
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

/// `grpc.health.v1.HealthCheckResponse.status` of one gRPC frame (0,
/// UNKNOWN, when absent or malformed).
fn grpc_health_status(body: &[u8]) -> u64 {
    let Some(msg) = body.get(5..) else { return 0 };
    let len = body
        .get(1..5)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if body[0] != 0 || msg.len() < len {
        return 0;
    }
    let mut buf = &msg[..len];
    let mut status = 0;
    while !buf.is_empty() {
        let Ok(key) = prost::encoding::decode_varint(&mut buf) else {
            return 0;
        };
        match (key >> 3, key & 7) {
            (1, 0) => match prost::encoding::decode_varint(&mut buf) {
                Ok(v) => status = v,
                Err(_) => return 0,
            },
            (_, 0) => {
                if prost::encoding::decode_varint(&mut buf).is_err() {
                    return 0;
                }
            }
            (_, 2) => {
                let Ok(n) = prost::encoding::decode_varint(&mut buf) else {
                    return 0;
                };
                let Some(rest) = buf.get(n as usize..) else {
                    return 0;
                };
                buf = rest;
            }
            (_, 5) if buf.len() >= 4 => buf = &buf[4..],
            (_, 1) if buf.len() >= 8 => buf = &buf[8..],
            _ => return 0,
        }
    }
    status
}

/// `SERVING` in `grpc.health.v1.HealthCheckResponse.ServingStatus`.
const SERVING: u64 = 1;

/// Checks one host until its session is aborted or the cluster runtime
/// is gone.
async fn session(owner: Weak<ClusterRuntime>, host: Arc<Host>, st: Arc<HostState>) {
    let addr = host.addr;
    let jitter = match owner.upgrade() {
        Some(c) => match &c.health_check {
            Some(ck) => ck.config.initial_jitter,
            None => return,
        },
        None => return,
    };
    if !jitter.is_zero() {
        let ms = rand::rng().random_range(0..jitter.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut s = Session {
        num_healthy: 0,
        num_unhealthy: 0,
        first_check: true,
    };
    let mut conn: Option<Conn> = None;
    loop {
        let Some(c) = owner.upgrade() else { return };
        let Some(ck) = c.health_check.as_ref() else {
            return;
        };
        let cfg = ck.config.clone();
        let connect_timeout = c.config.connect_timeout;
        // Checks go over the host's transport socket, as Envoy's.
        let (tls, proxy_protocol) = c.check_transport(&host, cfg.transport_match.as_ref());
        let tls = CheckTransport {
            tls: tls.cloned(),
            proxy_protocol: proxy_protocol.cloned(),
            alpn: (!cfg.alpn.is_empty()).then(|| cfg.alpn.clone()),
            internal: host.internal.clone(),
        };
        drop(c);
        ck_stats(&owner, |ck| ck.stats.attempt.inc());
        let result = match tokio::time::timeout(
            cfg.timeout,
            check_once(&cfg, addr, connect_timeout, &tls, &mut conn),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                conn = None;
                Err(Failure::Network)
            }
        };
        if result.is_err() || !cfg.reuse_connection {
            conn = None;
        }
        let Some(c) = owner.upgrade() else { return };
        let Some(ck) = c.health_check.as_ref() else {
            return;
        };
        let was_failed = st.failed();
        let t = match result {
            Ok(()) => s.success(ck, &st),
            Err(f) => s.failure(ck, &st, f),
        };
        if st.failed() != was_failed {
            {
                let inner = ck.inner.lock().unwrap_or_else(|p| p.into_inner());
                ck.publish_healthy(&inner);
            }
            tracing::debug!(target: "upstream", cluster = %c.config.name, host = %addr,
                healthy = !st.failed(), "active health check transition");
            c.refresh_health();
        }
        let traffic = c.stats.upstream_cx_total.value() > 0;
        let wait = ck.interval(!st.failed(), t, traffic);
        drop(c);
        tokio::time::sleep(wait).await;
    }
}

fn ck_stats(owner: &Weak<ClusterRuntime>, f: impl FnOnce(&Checker)) {
    if let Some(c) = owner.upgrade() {
        if let Some(ck) = &c.health_check {
            f(ck);
        }
    }
}

/// One check; the caller bounds it by `timeout`.
async fn check_once(
    cfg: &ActiveHealthCheck,
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: &CheckTransport,
    conn: &mut Option<Conn>,
) -> Result<(), Failure> {
    let connect = |addr, t| connect(addr, t, tls);
    match &cfg.kind {
        HealthCheckKind::Tcp { send, receive } => {
            let mut s = connect(addr, connect_timeout).await?;
            if !send.is_empty() {
                s.write_all(send).await.map_err(|_| Failure::Network)?;
            }
            // Connect-only: success once connected (Envoy closes it).
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !receive.is_empty() && !matches_in_order(&buf, receive) {
                let n = s.read(&mut chunk).await.map_err(|_| Failure::Network)?;
                if n == 0 {
                    return Err(Failure::Network);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Ok(())
        }
        HealthCheckKind::Http {
            path,
            host,
            expected,
            http2: true,
            remove,
            add,
        } => {
            let mut sender = h2_sender(conn, addr, connect_timeout, tls).await?;
            let uri = format!("http://{host}{path}");
            let mut req = http::Request::get(uri.as_str())
                .header(http::header::USER_AGENT, "Envoy/HC")
                .body(Full::new(Bytes::new()))
                .map_err(|_| Failure::Network)?;
            mutate(req.headers_mut(), remove, add);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| Failure::Network)?;
            let status = resp.status().as_u16();
            resp.into_body()
                .collect()
                .await
                .map_err(|_| Failure::Network)?;
            *conn = Some(Conn::Http2(sender));
            if expected.iter().any(|(a, b)| (*a..*b).contains(&status)) {
                Ok(())
            } else {
                Err(Failure::Active)
            }
        }
        HealthCheckKind::Grpc {
            service_name,
            authority,
            metadata,
        } => {
            let mut sender = h2_sender(conn, addr, connect_timeout, tls).await?;
            let uri = format!("http://{authority}/grpc.health.v1.Health/Check");
            let mut req = http::Request::post(uri.as_str())
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .header(http::header::USER_AGENT, "Envoy/HC")
                .body(Full::new(grpc_health_request(service_name)))
                .map_err(|_| Failure::Network)?;
            for (k, v) in metadata {
                req.headers_mut().append(k.clone(), v.clone());
            }
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| Failure::Network)?;
            // As Envoy's gRPC checker: a non-200 answer, a non-OK
            // grpc-status (trailers, or headers of a trailers-only answer)
            // or any status but SERVING fails the host.
            let ok_status = resp.status() == http::StatusCode::OK;
            let head_grpc = resp.headers().get("grpc-status").cloned();
            let collected = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| Failure::Network)?;
            *conn = Some(Conn::Http2(sender));
            let grpc_status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status").cloned())
                .or(head_grpc);
            let body = collected.to_bytes();
            let grpc_ok = grpc_status.is_some_and(|v| v.as_bytes() == b"0");
            if ok_status && grpc_ok && grpc_health_status(&body) == SERVING {
                Ok(())
            } else {
                Err(Failure::Active)
            }
        }
        HealthCheckKind::Http {
            path,
            host,
            expected,
            http2: false,
            remove,
            add,
        } => {
            let reused = match conn.take() {
                Some(Conn::Http(mut s)) => s.ready().await.is_ok().then_some(s),
                _ => None,
            };
            let mut sender = match reused {
                Some(s) => s,
                None => {
                    let s = connect(addr, connect_timeout).await?;
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                            .await
                            .map_err(|_| Failure::Network)?;
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    sender
                }
            };
            let mut req = http::Request::get(path.as_str())
                .header(http::header::HOST, host.as_str())
                .header(http::header::USER_AGENT, "Envoy/HC")
                .body(Empty::<Bytes>::new())
                .map_err(|_| Failure::Network)?;
            mutate(req.headers_mut(), remove, add);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| Failure::Network)?;
            let status = resp.status().as_u16();
            let close = resp
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            // Read the body so the connection can carry the next check.
            resp.into_body()
                .collect()
                .await
                .map_err(|_| Failure::Network)?;
            if !close {
                *conn = Some(Conn::Http(sender));
            }
            if expected.iter().any(|(a, b)| (*a..*b).contains(&status)) {
                Ok(())
            } else {
                Err(Failure::Active)
            }
        }
    }
}

/// `request_headers_to_remove`, then `request_headers_to_add`.
fn mutate(
    h: &mut http::HeaderMap,
    remove: &[http::HeaderName],
    add: &[(xds_client::config::HeaderAdd, http::HeaderValue)],
) {
    for n in remove {
        h.remove(n);
    }
    for (a, v) in add {
        a.apply_to(h, v.clone());
    }
}

/// A check connection: plain TCP or TLS.
trait CheckIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> CheckIo for T {}

/// The transport socket of a host's check connections.
#[derive(Clone, Default)]
struct CheckTransport {
    tls: Option<Arc<crate::tls::ClientTls>>,
    /// Checks are made for no downstream: a v1 header carries the check
    /// connection's own addresses, v2 is `LOCAL` (as Envoy's).
    proxy_protocol: Option<Arc<xds_client::config::ProxyProtocolUpstream>>,
    /// `tls_options.alpn_protocols`, offered instead of the context's.
    alpn: Option<Vec<Vec<u8>>>,
    /// An internal host: checks go through its internal listener, served
    /// on the control runtime (as Envoy's main thread reaches internal
    /// listeners through its own registry slot).
    internal: Option<Arc<crate::internal::InternalHost>>,
}

/// Connects within `t`, then the PROXY protocol header and the TLS
/// handshake of the host's transport socket if it has them (its
/// configured ALPN; none added, as Envoy's checkers add none).
async fn connect(
    addr: SocketAddr,
    t: Duration,
    tr: &CheckTransport,
) -> Result<Box<dyn CheckIo>, Failure> {
    if let Some(h) = &tr.internal {
        // TLS and PROXY protocol inside internal_upstream are rejected at
        // load; the host's passthrough metadata goes along, no filter
        // state (a check has no downstream).
        let passed = super::pool::InternalDest {
            host: h.clone(),
            shared: None,
        }
        .passed();
        return match tokio::time::timeout(t, crate::internal::connect(&h.target, passed)).await {
            Ok(Ok(s)) => Ok(Box::new(s)),
            Ok(Err(e)) => {
                tracing::debug!(target: "upstream", host = %h.target, error = %e, "health check internal connect failed");
                Err(Failure::Network)
            }
            Err(_) => Err(Failure::Network),
        };
    }
    let mut s = match tokio::time::timeout(t, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            s
        }
        _ => return Err(Failure::Network),
    };
    if let Some(pp) = &tr.proxy_protocol {
        super::proxy_protocol::write_header(&mut s, pp, None)
            .await
            .map_err(|_| Failure::Network)?;
    }
    match tr.tls.as_deref() {
        None => Ok(Box::new(s)),
        Some(tls) => match tls
            .connect_with(
                s,
                addr,
                crate::tls::client::AlpnFallback::None,
                None,
                tr.alpn.as_deref(),
            )
            .await
        {
            Ok((s, _)) => Ok(Box::new(s)),
            Err(e) => {
                tracing::debug!(target: "upstream", host = %addr, error = %e, "health check TLS handshake failed");
                Err(Failure::Network)
            }
        },
    }
}

/// Envoy's `TcpHealthCheckMatcher::match`: each block found in order.
fn matches_in_order(buf: &[u8], blocks: &[Vec<u8>]) -> bool {
    let mut at = 0;
    for b in blocks {
        match buf[at..].windows(b.len().max(1)).position(|w| w == &b[..]) {
            Some(i) => at += i + b.len(),
            None => return b.is_empty(),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::matches_in_order;

    #[test]
    fn receive_blocks_match_in_order() {
        let blocks = vec![b"ab".to_vec(), b"cd".to_vec()];
        assert!(matches_in_order(b"xxabyycd", &blocks));
        assert!(!matches_in_order(b"cdab", &blocks));
        assert!(!matches_in_order(b"ab", &blocks));
    }
}

#[cfg(test)]
mod grpc_tests {
    use super::*;

    #[test]
    fn grpc_health_frames() {
        assert_eq!(&grpc_health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &grpc_health_request("a")[..],
            &[0, 0, 0, 0, 3, 0x0a, 1, b'a']
        );
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 1]), SERVING);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 2]), 2);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 0]), 0);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 9, 0x08]), 0);
        assert_eq!(grpc_health_status(&[]), 0);
    }
}
