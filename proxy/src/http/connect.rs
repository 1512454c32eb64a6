//! CONNECT termination: Envoy's router on a route whose CONNECT upgrade has
//! a `connect_config` (the HBONE `connect_terminate` listener).
//!
//! The router opens a TCP connection (the cluster's transport: TLS, PROXY
//! protocol) to a host of the route's cluster and answers `200` once it is
//! up; the stream (HTTP/2 DATA frames, or the HTTP/1.1 connection after
//! the response head) is then spliced with that connection. hyper hands the
//! stream over as an upgrade once the `200` is written, so the splice runs
//! in a task of its own ([`Tunnel::run`]), which also writes the stream's
//! access log at its end (`finish` in `service.rs`).
//!
//! As Envoy 1.40 (its default `allow_multiplexed_upstream_half_close`
//! off): the client's half-close (END_STREAM, FIN) half-closes the
//! upstream and the tunnel goes on until the upstream closes; the
//! upstream's close ends the downstream stream (END_STREAM, then the
//! stream is done) even if the client is still sending.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use xds_client::config::RouteAction;

use super::info::{Flags, StreamInfo};
use super::local_reply::{reply, reply_owned, NO_HEALTHY_UPSTREAM};
use super::router::Target;
use super::service::ConnCtx;
use crate::body::Body;
use crate::upstream::{outlier::LocalResult, pool::UpstreamIo, ClusterRuntime, Host};

/// A tunnel waiting for its `200` to be written, carried from the
/// pipeline to `finish` in the request's extensions (hence `Clone`; it is
/// taken once).
#[derive(Clone)]
pub(super) struct PendingTunnel(Arc<Mutex<Option<Tunnel>>>);

impl PendingTunnel {
    pub(super) fn take(&self) -> Option<Tunnel> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// An accepted CONNECT: the downstream's upgrade and the upstream
/// connection, with what the splice needs.
pub(super) struct Tunnel {
    downstream: hyper::upgrade::OnUpgrade,
    upstream: UpstreamIo,
    held: Held,
    /// Copy buffer per direction.
    buffer: usize,
    idle: Option<Duration>,
    max_duration: Option<Duration>,
    /// When the stream started (for `max_duration`).
    start: Instant,
}

/// How a tunnel ended.
pub(super) struct TunnelEnd {
    /// Bytes read from downstream (`%BYTES_RECEIVED%`).
    pub received: u64,
    /// Bytes written to downstream (`%BYTES_SENT%`).
    pub sent: u64,
    pub end: End,
}

/// Terminates a CONNECT on `target` (the route's cluster, already picked):
/// the `200` with the tunnel in `parts.extensions`, or the router's local
/// reply for a failure (no host 503 `UH`, connection overflow 503 `UO`,
/// connect failure 503 `UF`).
pub(super) async fn terminate(
    ctx: &ConnCtx,
    action: &RouteAction,
    target: Target,
    parts: &mut http::request::Parts,
    info: &mut StreamInfo,
    idle: Option<Duration>,
    max_duration: Option<Duration>,
) -> Response<Body> {
    let cluster = target.cluster;
    info.upstream_cluster = Some(cluster.config.name.clone());
    // Host selection as the router: the request hash for a consistent-hash
    // cluster (the cluster's policy, else the route's), `override_host`.
    let hash = super::router::request_hash(&cluster, action, parts, info).hash;
    let mut overrides = cluster.override_hosts(&parts.headers, Some(&info.dynamic_metadata));
    if let Some(od) = &cluster.original_dst {
        overrides.original_dst = od.destination(&crate::upstream::original_dst::DstInputs {
            filter_state: [
                Some(&info.filter_state),
                ctx.downstream.as_deref().map(|d| &d.filter_state),
            ],
            metadata: [Some(&info.dynamic_metadata), Some(&ctx.metadata)],
            headers: Some(&parts.headers),
            restored_local: ctx.local_restored.then_some(ctx.local),
        });
    }
    let Some(host) = cluster.choose_request(hash, &mut overrides, &[], 0) else {
        info.flags.set(Flags::UH);
        info.response_code_details = "no_healthy_upstream";
        return reply(503, NO_HEALTHY_UPSTREAM);
    };
    info.set_upstream_host(&host);
    if !host.metadata.is_null() {
        info.upstream_metadata = Some(host.clone());
    }
    // Each tunnel is an upstream connection of its own: it holds a place
    // under `max_connections` for its life.
    let limits = cluster.breakers.at(action.priority);
    if !limits.connections.can_create() {
        cluster.stats.upstream_cx_overflow.inc();
        info.flags.set(Flags::UO);
        info.response_code_details = "upstream_reset_before_response_started{overflow}";
        return reply_owned(
            503,
            bytes::Bytes::from_static(
                b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            Some("text/plain"),
        );
    }
    let Some(downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        // hyper offers every CONNECT as an upgrade; without one there is
        // no stream to splice.
        info.response_code_details = "upgrade_failed";
        return reply(403, "");
    };
    cluster.stats.upstream_rq_total.inc();
    let started = Instant::now();
    let upstream = match crate::tcp::connect(
        &cluster,
        &host,
        &ctx.proxy_source,
        None,
        Some(&info.filter_state),
    )
    .await
    {
        Ok((io, _alpn)) => io,
        Err(reason) => {
            cluster.outlier_local(&host, LocalResult::ConnectFailed);
            cluster.stats.record_status(503);
            info.flags.set(Flags::UF);
            info.response_code_details =
                "upstream_reset_before_response_started{remote_connection_failure}";
            info.upstream_failure_reason = Some(reason);
            return reply_owned(
                503,
                bytes::Bytes::from_static(
                    b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
                ),
                Some("text/plain"),
            );
        }
    };
    cluster.outlier_local(&host, LocalResult::ConnectSuccessFinal);
    // The synthesized 200 counts as the upstream's response (Envoy's
    // router charges it like any other).
    cluster.stats.record_status(200);
    info.upstream_service_time = Some(started.elapsed());
    info.response_code_details = "via_upstream";
    limits.connections.inc();
    cluster.stats.upstream_rq_active.inc();
    host.active.fetch_add(1, Relaxed);
    let tunnel = Tunnel {
        downstream,
        upstream,
        held: Held {
            cluster: cluster.clone(),
            host,
            priority: action.priority,
        },
        // As tcp_proxy: per_connection_buffer_limit_bytes, 4 to 64 KiB.
        buffer: (ctx.hcm.buffer_limit as usize).clamp(4096, 64 * 1024),
        idle,
        max_duration,
        start: info.start_instant,
    };
    parts
        .extensions
        .insert(PendingTunnel(Arc::new(Mutex::new(Some(tunnel)))));
    let mut resp = Response::new(Body::None);
    *resp.status_mut() = StatusCode::OK;
    resp
}

impl Tunnel {
    /// Splices the two sides until the tunnel ends (see the module doc),
    /// then releases the upstream's accounting.
    pub(super) async fn run(self) -> TunnelEnd {
        let received = AtomicU64::new(0);
        let sent = AtomicU64::new(0);
        let activity = Activity::new();
        let end = match self.downstream.await {
            Err(e) => {
                tracing::debug!(error = %e, "connect: the stream ended before the tunnel");
                End::DownstreamFailed
            }
            Ok(up) => {
                let (mut dr, mut dw) = tokio::io::split(TokioIo::new(up));
                let (mut ur, mut uw) = tokio::io::split(self.upstream);
                let buffer = self.buffer;
                let act = &activity;
                // Downstream to upstream: the client's half-close
                // half-closes the upstream; the tunnel then waits for the
                // other direction.
                let down_to_up = async {
                    match pump(&mut dr, &mut uw, buffer, &received, act).await {
                        Ok(()) => std::future::pending::<End>().await,
                        Err(Side::Read) => End::DownstreamFailed,
                        Err(Side::Write) => End::UpstreamFailed,
                    }
                };
                // Upstream to downstream: its end ends the tunnel.
                let up_to_down = async {
                    match pump(&mut ur, &mut dw, buffer, &sent, act).await {
                        Ok(()) => End::Done,
                        Err(Side::Read) => End::UpstreamFailed,
                        Err(Side::Write) => End::DownstreamFailed,
                    }
                };
                let max = async {
                    match self.max_duration {
                        Some(d) => tokio::time::sleep_until(self.start + d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    e = up_to_down => e,
                    e = down_to_up => e,
                    _ = activity.idle(self.idle) => End::Timeout,
                    _ = max => End::Timeout,
                }
            }
        };
        drop(self.held);
        TunnelEnd {
            received: received.load(Relaxed),
            sent: sent.load(Relaxed),
            end,
        }
    }
}

/// The upstream connection's place under `max_connections` and in the
/// active counts, released when the tunnel ends (or is never spliced).
struct Held {
    cluster: Arc<ClusterRuntime>,
    host: Arc<Host>,
    priority: xds_client::config::RoutingPriority,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.cluster.breakers.at(self.priority).connections.dec();
        self.cluster.stats.upstream_rq_active.dec();
        self.host.active.fetch_sub(1, Relaxed);
    }
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The upstream finished (after the client's half-close, or first).
    Done,
    /// The downstream stream was reset or its connection failed (`DC`).
    DownstreamFailed,
    /// The upstream connection failed (`UC`).
    UpstreamFailed,
    /// The stream idle timeout or max duration ended it.
    Timeout,
}

/// Which side of one copy direction failed.
enum Side {
    Read,
    Write,
}

/// Copies `r` to `w` through one bounded buffer until `r` ends, then shuts
/// `w` down (the half-close). Counts the bytes and the activity.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    buffer: usize,
    count: &AtomicU64,
    activity: &Activity,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer];
    loop {
        let n = r.read(&mut buf).await.map_err(|_| Side::Read)?;
        if n == 0 {
            return w.shutdown().await.map_err(|_| Side::Write);
        }
        activity.touch();
        w.write_all(&buf[..n]).await.map_err(|_| Side::Write)?;
        // TLS buffers records: the bytes go out now, not with the next read.
        w.flush().await.map_err(|_| Side::Write)?;
        count.fetch_add(n as u64, Relaxed);
        activity.touch();
    }
}

/// The last byte moved, for the stream idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// Resolves once nothing moved for `idle` (never without one).
    async fn idle(&self, idle: Option<Duration>) {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Relaxed));
            let at = last + idle;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}
