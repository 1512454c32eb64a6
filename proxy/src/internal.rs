//! Internal listeners (`internal_listener: {}`, Envoy's
//! `envoy.bootstrap.internal_listener`): a connection to an
//! `envoy_internal_address` host is an in-process pipe (no socket) whose
//! other end the named listener accepts on the same worker and serves like
//! an accepted TCP connection (listener filters, chain selection, HCM or
//! tcp_proxy).
//!
//! Each worker knows its server through a thread-local (Envoy keeps its
//! internal listener registry in a thread-local slot too), so pools and
//! tcp_proxy reach the listeners without carrying the server around.
use std::{
    cell::RefCell,
    hash::{Hash, Hasher},
    net::{Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Weak,
    },
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use xds_client::config::{InternalUpstream, Name, PassthroughMetadata, Sharing};

use crate::Shared;

thread_local! {
    static WORKER: RefCell<Option<Weak<Shared>>> = const { RefCell::new(None) };
}

/// Makes this thread a worker of `shared`: internal connections made here
/// are accepted by `shared`'s internal listeners.
pub fn set_worker(shared: &Arc<Shared>) {
    WORKER.with(|w| *w.borrow_mut() = Some(Arc::downgrade(shared)));
}

fn worker() -> Option<Arc<Shared>> {
    WORKER.with(|w| w.borrow().as_ref().and_then(Weak::upgrade))
}

/// An internal host's address (Envoy's `EnvoyInternalInstance`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InternalTarget {
    pub listener: Name,
    pub endpoint_id: Name,
}

impl InternalTarget {
    /// The stand-in socket address weir keys an internal host by (pools,
    /// host-set updates, outlier state): `[100::HASH]:0`, in the IPv6
    /// discard prefix (RFC 6666) that no real endpoint uses.
    pub fn stand_in(&self) -> SocketAddr {
        // A fixed-key SipHash: the same target maps to the same address in
        // every host-set update.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        let x = h.finish();
        let seg = |i: u32| (x >> (48 - 16 * i)) as u16;
        SocketAddr::new(
            Ipv6Addr::new(0x100, 0, 0, 0, seg(0), seg(1), seg(2), seg(3)).into(),
            0,
        )
    }
}

impl std::fmt::Display for InternalTarget {
    /// Envoy's form, `envoy://LISTENER/ENDPOINT_ID`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "envoy://{}/{}", self.listener, self.endpoint_id)
    }
}

/// An internal host as its connections need it: where they go and, with
/// an `internal_upstream` transport (`upstream`), the host's
/// passed-through metadata, resolved once when the host is built.
#[derive(Debug)]
pub struct InternalHost {
    pub target: InternalTarget,
    pub upstream: bool,
    pub metadata: filters::DynamicMetadata,
}

impl InternalHost {
    /// The host `target` of cluster `c` with endpoint `metadata`.
    pub fn new(
        target: InternalTarget,
        c: &xds_client::config::Cluster,
        metadata: &serde_json::Value,
    ) -> InternalHost {
        let up = c.transport_for(metadata).internal();
        InternalHost {
            target,
            upstream: up.is_some(),
            metadata: passthrough_metadata(up.map(|u| &**u), metadata),
        }
    }
}

/// The addresses of an internal connection as Envoy names them, for the
/// ones `original_dst` did not restore: the listener's end is
/// `envoy://LISTENER/ENDPOINT_ID`, the client's
/// `envoy://internal_client_address/`. (weir keeps `0.0.0.0:0` in the
/// socket-address fields meanwhile.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalAddrs {
    /// `None` once restored.
    pub local: Option<Arc<str>>,
    /// Still the internal client address (not restored).
    pub remote: bool,
}

/// Envoy's address of the client end of every internal connection.
pub const CLIENT_ADDRESS: &str = "envoy://internal_client_address/";

/// What an internal connection carries into the internal listener's
/// connection besides its bytes.
#[derive(Default)]
pub struct Passed {
    /// `passthrough_metadata`: the connection's dynamic metadata.
    pub metadata: filters::DynamicMetadata,
    /// Filter state objects the downstream shared with upstream.
    pub state: filters::FilterState,
    /// Told once the listener has taken the connection (a filter chain
    /// matched, or a listener filter waits for bytes); dropped untold when
    /// it closes it first (see [`connect`]).
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The filter state objects a request shares with upstream
/// (`shared_with_upstream`), as the internal connection receives them:
/// `Once` arrives unshared, `Transitive` stays transitive (Envoy's
/// `StreamSharingMayImpactPooling`). Requests with different hashable
/// objects never share a pooled connection (`hash` goes into the pool key,
/// as Envoy hashes its shared `Hashable` objects into its).
#[derive(Debug)]
pub struct SharedObjects {
    pub state: filters::FilterState,
    pub hash: u64,
}

/// The objects of `state` shared with upstream; `None` when there are none.
pub fn shared_objects(state: &filters::FilterState) -> Option<Arc<SharedObjects>> {
    let mut out = filters::FilterState::default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (key, value, flags) in state.iter() {
        let sharing = match flags.shared_with_upstream {
            Sharing::None => continue,
            Sharing::Once => Sharing::None,
            Sharing::Transitive => Sharing::Transitive,
        };
        // As Envoy's pool key, only hashable objects count: requests whose
        // other shared objects differ may share a connection (it carries
        // the objects of the request that opened it).
        if value.hashable() {
            key.hash(&mut h);
            value.serialize_as_string().hash(&mut h);
        }
        let _ = out.set(
            key,
            value.clone(),
            filters::StateFlags {
                read_only: flags.read_only,
                shared_with_upstream: sharing,
            },
        );
    }
    (!out.is_empty()).then(|| {
        Arc::new(SharedObjects {
            state: out,
            hash: h.finish() | 1,
        })
    })
}

/// The dynamic metadata `passthrough_metadata` gives an internal
/// connection: each named namespace of the host's (or the cluster's)
/// `filter_metadata`, a later entry replacing an earlier one.
pub fn passthrough_metadata(
    up: Option<&InternalUpstream>,
    host_metadata: &serde_json::Value,
) -> filters::DynamicMetadata {
    let mut md = filters::DynamicMetadata::default();
    for src in up.map(|u| u.passthrough.as_slice()).unwrap_or_default() {
        let (name, value) = match src {
            PassthroughMetadata::Host(n) => (n, host_metadata.get(n.as_str())),
            PassthroughMetadata::Cluster(n, v) => (n, v.as_ref()),
        };
        if let Some(serde_json::Value::Object(o)) = value {
            *md.namespace_mut(name) = o.clone();
        }
    }
    md
}

/// Opens an internal connection to `target`'s listener on this worker.
/// As Envoy, where the internal listener runs its listener filters and
/// chain selection within the connect call: the connection fails like a
/// refused one when no internal listener has that name (or this thread is
/// no worker) or when the listener closes it before taking it (no filter
/// chain matches, a listener filter rejects it).
pub async fn connect(target: &InternalTarget, passed: Passed) -> Result<Pipe, String> {
    // The spawn is in a plain function: the connection it serves may make
    // internal connections itself, and an async fn spawning it would make
    // its future type contain itself.
    let (client, taken) = open(target, passed)?;
    match taken.await {
        Ok(()) => Ok(client),
        Err(_) => Err(REFUSED.to_owned()),
    }
}

/// Envoy reports no transport failure reason for an internal connection
/// its listener closed at once (`%RESPONSE_CODE_DETAILS%` ends without one).
const REFUSED: &str = "";

/// Starts serving the listener's end; the receiver tells whether the
/// listener took the connection.
fn open(
    target: &InternalTarget,
    mut passed: Passed,
) -> Result<(Pipe, tokio::sync::oneshot::Receiver<()>), String> {
    // Envoy's text when no internal listener has the name.
    let refused = || format!("immediate connect error: Invalid argument|remote address:{target}");
    let Some(shared) = worker() else {
        return Err(refused());
    };
    let Some(handle) = shared
        .listeners
        .load()
        .iter()
        .find(|h| h.name == target.listener && h.internal && !*h.stop_accept.borrow())
        .cloned()
    else {
        tracing::debug!(listener = %target.listener, "no internal listener of that name");
        return Err(refused());
    };
    let buffer = shared
        .snapshot
        .load()
        .internal_listener_buffer
        .unwrap_or(1024 * 1024)
        .max(1);
    let (client, server) = pipe(buffer);
    let (tx, rx) = tokio::sync::oneshot::channel();
    passed.ready = Some(tx);
    let lr = handle.current.load_full();
    tokio::spawn(crate::listener::serve_internal(
        lr,
        server,
        target.clone(),
        passed,
        shared,
    ));
    Ok((client, rx))
}

/// One end of an internal connection: a `tokio::io::duplex` pipe (bounded
/// per direction, real half-close) with an abortive close besides, as a
/// TCP RST is to a FIN: once either end is [`reset`](PipeReset::reset),
/// every read, write and shutdown on both ends fails with
/// `ConnectionReset` and bytes not yet read are dropped (as Linux does on
/// a RST). A plain drop stays a clean close (the peer reads EOF).
pub struct Pipe {
    inner: DuplexStream,
    state: Arc<PipeState>,
    /// 0 or 1: which end (indexes its wakers).
    end: usize,
}

/// What both ends of a pipe share: the reset flag and the tasks to wake
/// when it is set (a reader or writer of each end waiting on the pipe).
#[derive(Default)]
struct PipeState {
    reset: AtomicBool,
    /// `[end 0 read, end 0 write, end 1 read, end 1 write]`.
    wakers: [AtomicWaker; 4],
}

/// Resets the internal connection it was taken from (see [`Pipe`]); held
/// apart from the stream so that whoever moved the stream into a codec or
/// a wrapper can still reset it.
#[derive(Clone)]
pub struct PipeReset(Arc<PipeState>);

impl PipeReset {
    /// The abortive close: both ends fail from now on.
    pub fn reset(&self) {
        if !self.0.reset.swap(true, Ordering::AcqRel) {
            for w in &self.0.wakers {
                w.wake();
            }
        }
    }
}

/// A pipe of `buffer` bytes per direction: the two ends.
pub fn pipe(buffer: usize) -> (Pipe, Pipe) {
    let (a, b) = tokio::io::duplex(buffer);
    let state = Arc::new(PipeState::default());
    (
        Pipe {
            inner: a,
            state: state.clone(),
            end: 0,
        },
        Pipe {
            inner: b,
            state,
            end: 1,
        },
    )
}

fn reset_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "internal connection reset",
    )
}

impl Pipe {
    /// A handle that resets this connection.
    pub fn reset_handle(&self) -> PipeReset {
        PipeReset(self.state.clone())
    }

    /// Resets the connection (see [`Pipe`]) and closes this end.
    pub fn reset(self) {
        self.reset_handle().reset();
    }

    fn is_reset(&self) -> bool {
        self.state.reset.load(Ordering::Acquire)
    }

    /// Registers the task for a reset while `op` (0 read, 1 write) waits,
    /// then checks the flag again (a reset in between is not missed).
    fn wait(&self, op: usize, cx: &Context<'_>) -> bool {
        self.state.wakers[self.end * 2 + op].register(cx.waker());
        self.is_reset()
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Pending if me.wait(0, cx) => Poll::Ready(Err(reset_error())),
            r => r,
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        match Pin::new(&mut me.inner).poll_write(cx, buf) {
            Poll::Pending if me.wait(1, cx) => Poll::Ready(Err(reset_error())),
            r => r,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        match Pin::new(&mut me.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending if me.wait(1, cx) => Poll::Ready(Err(reset_error())),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_reset_fails_both_ends_a_drop_is_a_clean_end() {
        let kind = |r: std::io::Result<usize>| r.expect_err("reset").kind();
        let reset = std::io::ErrorKind::ConnectionReset;
        // Clean: the peer reads what was written, then EOF.
        let (mut a, mut b) = pipe(64);
        a.write_all(b"bye").await.expect("write");
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("clean end");
        assert_eq!(got, b"bye");
        // Reset: unread bytes are dropped, reads and writes fail.
        let (mut a, mut b) = pipe(64);
        a.write_all(b"unread").await.expect("write");
        a.reset();
        let mut buf = [0u8; 8];
        assert_eq!(kind(b.read(&mut buf).await), reset);
        assert_eq!(kind(b.write(b"y").await), reset);
        // A reader waiting on an empty pipe wakes with the reset.
        let (a, mut b) = pipe(64);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            b.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        a.reset();
        assert_eq!(kind(reader.await.expect("task")), reset);
        // A writer blocked on a full pipe too, reset by a handle of its own
        // end.
        let (mut c, _d) = pipe(4);
        let handle = c.reset_handle();
        c.write_all(b"full").await.expect("fill");
        let writer = tokio::spawn(async move { c.write(b"more").await });
        tokio::task::yield_now().await;
        handle.reset();
        assert_eq!(kind(writer.await.expect("task")), reset);
    }

    #[test]
    fn stand_in_addresses_are_stable_and_distinct() {
        let t = |l: &str, e: &str| InternalTarget {
            listener: l.into(),
            endpoint_id: e.into(),
        };
        assert_eq!(t("a", "1").stand_in(), t("a", "1").stand_in());
        assert_ne!(t("a", "1").stand_in(), t("a", "2").stand_in());
        assert_ne!(t("a", "").stand_in(), t("b", "").stand_in());
        assert_eq!(t("a", "1").to_string(), "envoy://a/1");
    }

    #[test]
    fn shared_objects_once_arrives_unshared_transitive_stays() {
        let mut s = filters::FilterState::default();
        let set = |s: &mut filters::FilterState, k: &str, v: &str, sh: Sharing| {
            s.set(
                k,
                Arc::new(filters::state::StringValue(v.into())),
                filters::StateFlags {
                    read_only: false,
                    shared_with_upstream: sh,
                },
            )
            .expect("set");
        };
        assert!(shared_objects(&s).is_none());
        set(&mut s, "private", "x", Sharing::None);
        assert!(shared_objects(&s).is_none());
        set(&mut s, "once", "a", Sharing::Once);
        set(&mut s, "far", "b", Sharing::Transitive);
        let o = shared_objects(&s).expect("shared");
        assert!(o.state.get("private").is_none());
        assert_eq!(
            o.state.flags("once").map(|f| f.shared_with_upstream),
            Some(Sharing::None)
        );
        assert_eq!(
            o.state.flags("far").map(|f| f.shared_with_upstream),
            Some(Sharing::Transitive)
        );
        // Strings do not go into the pool key; hashable strings do.
        set(&mut s, "once", "c", Sharing::Once);
        assert_eq!(shared_objects(&s).expect("shared").hash, o.hash);
        let mut hashed = |v: &str| {
            s.set(
                "h",
                Arc::new(filters::HashableStringValue(v.into())),
                filters::StateFlags {
                    read_only: false,
                    shared_with_upstream: Sharing::Once,
                },
            )
            .expect("set");
            shared_objects(&s).expect("shared").hash
        };
        let (a, b) = (hashed("a"), hashed("b"));
        assert_ne!(a, b);
        assert_ne!(a, o.hash);
    }

    #[test]
    fn passthrough_takes_named_namespaces_later_wins() {
        let host = serde_json::json!({
            "envoy.filters.listener.original_dst": {"local": "10.0.0.1:80"},
            "other": {"x": 1},
        });
        let up = InternalUpstream {
            passthrough: vec![
                PassthroughMetadata::Host("envoy.filters.listener.original_dst".into()),
                PassthroughMetadata::Host("absent".into()),
                PassthroughMetadata::Cluster("other".into(), Some(serde_json::json!({"y": 2}))),
            ],
        };
        let md = passthrough_metadata(Some(&up), &host);
        assert_eq!(
            md.value("envoy.filters.listener.original_dst", &["local"]),
            Some(&serde_json::json!("10.0.0.1:80"))
        );
        assert!(md.namespace("absent").is_none());
        assert_eq!(md.value("other", &["y"]), Some(&serde_json::json!(2)));
        assert!(md.value("other", &["x"]).is_none());
        assert!(passthrough_metadata(None, &host).is_empty());
    }
}
