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

// === HTTP/2 stream resets ===
//
// hyper answers an HTTP/2 CONNECT with a 200 and hands the stream over as
// an upgrade whose send half runs in a task hyper spawns; dropping the
// upgraded stream ends it cleanly (END_STREAM), and hyper offers no way to
// reset it. As Envoy, a tunnel whose upstream failed must end with a
// reset, so weir spawns hyper's HTTP/2 tasks itself ([`StreamExec`]):
// each stream task is polled inside [`UPGRADE_SLOT`]'s scope; the service
// answering a CONNECT with a tunnel leaves a [`StreamAbort`] there, and the
// task hyper spawns in that same poll (the upgrade's send half, the only
// task a stream spawns) is tied to it. Aborting that task, then dropping
// the upgraded stream, leaves h2 a stream nobody holds that was never
// ended: it resets it (RST_STREAM CANCEL; the code is h2's, Envoy sends
// CONNECT_ERROR). The connection and its other streams go on.

tokio::task_local! {
    /// Within an HTTP/2 stream task: the reset slot of the CONNECT the
    /// stream's service just answered, for the send task hyper spawns next.
    static UPGRADE_SLOT: std::cell::RefCell<Option<Arc<StreamAbort>>>;
}

/// hyper's executor for a downstream connection (see above).
#[derive(Clone, Copy)]
pub struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        match UPGRADE_SLOT.try_with(|s| s.borrow_mut().take()) {
            // Spawned by a stream task that answered a CONNECT: the
            // tunnel's send half.
            Ok(Some(slot)) => slot.set(tokio::spawn(fut).abort_handle()),
            Ok(None) => drop(tokio::spawn(fut)),
            // Spawned by the connection: a stream.
            Err(_) => drop(tokio::spawn(
                UPGRADE_SLOT.scope(std::cell::RefCell::new(None), fut),
            )),
        }
    }
}

/// Resets an HTTP/2 CONNECT stream whose 200 went out (see above): the
/// abort handle of the stream's send task, or a reset asked before hyper
/// spawned it.
#[derive(Default)]
pub(super) struct StreamAbort(Mutex<(Option<tokio::task::AbortHandle>, bool)>);

impl StreamAbort {
    /// Leaves a slot for the stream task's next spawn; `None` outside an
    /// HTTP/2 stream task (HTTP/1: nothing to reset this way).
    pub(super) fn offer() -> Option<Arc<StreamAbort>> {
        let slot = Arc::new(StreamAbort::default());
        UPGRADE_SLOT
            .try_with(|s| *s.borrow_mut() = Some(slot.clone()))
            .ok()
            .map(|()| slot)
    }

    fn set(&self, h: tokio::task::AbortHandle) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 {
            h.abort();
        }
        g.0 = Some(h);
    }

    /// Whether the stream's send half ended on its own: the client reset
    /// the stream (or the connection failed), since it ends cleanly only
    /// after the tunnel shut its write side. (hyper reads a client's
    /// RST_STREAM CANCEL or NO_ERROR as a clean end of stream.)
    fn send_finished(&self) -> bool {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.0.as_ref().is_some_and(|h| h.is_finished())
    }

    /// Stops the send half; the stream is reset once the upgraded stream
    /// is dropped too.
    fn abort(&self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        if let Some(h) = &g.0 {
            h.abort();
        }
    }
}

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
    /// then releases the upstream's accounting. As Envoy: a failed
    /// upstream resets the downstream stream (`reset_down`, HTTP/2; Envoy's
    /// `UC` on a CONNECT is CONNECT_ERROR), a failed downstream or a
    /// timeout resets an internal upstream (Envoy closes it at once).
    pub(super) async fn run(self, reset_down: Option<Arc<StreamAbort>>) -> TunnelEnd {
        let received = AtomicU64::new(0);
        let sent = AtomicU64::new(0);
        let activity = Activity::new();
        let reset_up = self.upstream.reset_handle();
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
                    match pump(
                        &mut dr,
                        &mut uw,
                        buffer,
                        &received,
                        act,
                        reset_down.as_deref(),
                    )
                    .await
                    {
                        Ok(()) => std::future::pending::<End>().await,
                        Err(Side::Read) => End::DownstreamFailed,
                        Err(Side::Write) => End::UpstreamFailed,
                    }
                };
                // Upstream to downstream: its end ends the tunnel.
                let up_to_down = async {
                    match pump(&mut ur, &mut dw, buffer, &sent, act, None).await {
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
                let end = tokio::select! {
                    e = up_to_down => e,
                    e = down_to_up => e,
                    _ = activity.idle(self.idle) => End::Timeout,
                    _ = max => End::Timeout,
                };
                // Before the halves drop (see `StreamAbort`).
                if let (End::UpstreamFailed, Some(r)) = (end, &reset_down) {
                    r.abort();
                }
                end
            }
        };
        if let (End::DownstreamFailed | End::Timeout, Some(r)) = (end, &reset_up) {
            r.reset();
        }
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
/// `w` down (the half-close). Counts the bytes and the activity. `r`'s end
/// is a reset rather than a half-close when `reset` (the HTTP/2 stream `r`
/// reads) says the client reset the stream.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    buffer: usize,
    count: &AtomicU64,
    activity: &Activity,
    reset: Option<&StreamAbort>,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer];
    loop {
        let n = r.read(&mut buf).await.map_err(|_| Side::Read)?;
        if n == 0 {
            if let Some(a) = reset {
                // The RST_STREAM that ended the read woke the send half
                // too: let it run and see the reset first.
                tokio::task::yield_now().await;
                if a.send_finished() {
                    return Err(Side::Read);
                }
            }
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
