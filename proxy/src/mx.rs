//! Istio's TCP metadata exchange on a connection's byte stream
//! (`filters::istio::mx` has the wire format): [`MxIo`] removes the peer's
//! header from the head of what is read and records the peer; our header
//! is written by [`start`] before any application byte.
use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use filters::istio::mx::{HeaderReader, MetadataExchange, Read};
use filters::istio::PeerInfo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Where the peer found by the exchange is left for `istio.stats`.
pub type PeerSlot = Arc<OnceLock<Arc<PeerInfo>>>;

enum State {
    /// No exchange (or done): reads go straight through.
    Off,
    /// Reading the peer's header: what arrived so far.
    Reading(HeaderReader, Vec<u8>),
    /// Application bytes that arrived with the header, handed out first.
    Draining(Vec<u8>, usize),
}

/// A stream whose reads start with the peer's exchange header, stripped.
pub struct MxIo<T> {
    inner: T,
    state: State,
    peer: PeerSlot,
    /// The exchange ran and found no peer header (Istio's "metadata not
    /// found": no ALPN match, no magic, or an unreadable body), the case
    /// `enable_discovery` falls back to workload discovery.
    missed: bool,
}

impl<T> MxIo<T> {
    /// A stream without an exchange.
    pub fn off(inner: T) -> MxIo<T> {
        MxIo {
            inner,
            state: State::Off,
            peer: Default::default(),
            missed: false,
        }
    }

    /// Whether the exchange ran and found no peer header.
    pub fn missed(&self) -> bool {
        self.missed
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The peer, once its header was read.
    pub fn peer(&self) -> PeerSlot {
        self.peer.clone()
    }
}

/// Starts the exchange on `io` when `mx` applies to the negotiated `alpn`:
/// writes our header, then reads strip the peer's. Otherwise `io` passes
/// unchanged.
pub async fn start<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    mx: Option<&Arc<MetadataExchange>>,
    alpn: Option<&[u8]>,
) -> std::io::Result<MxIo<T>> {
    let mut io = MxIo::off(io);
    if let Some(mx) = mx {
        if mx.applies(alpn) {
            io.inner.write_all(&mx.our_header()).await?;
            io.state = State::Reading(mx.reader(), Vec::new());
        } else {
            io.missed = true;
        }
    }
    Ok(io)
}

impl<T: AsyncRead + Unpin> AsyncRead for MxIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        loop {
            match &mut me.state {
                State::Off => return Pin::new(&mut me.inner).poll_read(cx, out),
                State::Draining(buf, pos) => {
                    let n = (buf.len() - *pos).min(out.remaining());
                    out.put_slice(&buf[*pos..*pos + n]);
                    *pos += n;
                    if *pos == buf.len() {
                        me.state = State::Off;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Reading(reader, buf) => {
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    let end = rb.filled().is_empty();
                    buf.extend_from_slice(rb.filled());
                    let next = match reader.feed(buf, end) {
                        // A peer that closed inside the metadata: nothing
                        // of it is the application's.
                        Read::More if end => State::Off,
                        Read::More => continue,
                        Read::Peer { peer, consumed } => {
                            if let Some(p) = peer {
                                let _ = me.peer.set(Arc::new(*p));
                            }
                            State::Draining(std::mem::take(buf), consumed)
                        }
                        Read::NotExchange => {
                            me.missed = true;
                            State::Draining(std::mem::take(buf), 0)
                        }
                        Read::Unreadable { consumed } => {
                            me.missed = true;
                            State::Draining(std::mem::take(buf), consumed)
                        }
                        Read::TooLong => {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "metadata exchange header too long",
                            )))
                        }
                    };
                    me.state = match next {
                        State::Draining(b, p) if p >= b.len() => {
                            if end {
                                return Poll::Ready(Ok(()));
                            }
                            State::Off
                        }
                        s => s,
                    };
                }
            }
        }
    }
}

crate::io::delegate_async_write!(MxIo);
