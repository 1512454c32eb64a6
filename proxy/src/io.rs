//! Stream adapters: replaying bytes the listener filters read, and a
//! downstream stream that is either plaintext or TLS.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::TcpStream,
};

/// A stream whose first bytes were already read (by listener filters) and
/// are replayed before the rest.
pub struct Rewind<T> {
    prefix: BytesMut,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: BytesMut, inner: T) -> Self {
        Rewind { prefix, inner }
    }
    pub fn inner(&self) -> &T {
        &self.inner
    }
    /// The bytes not yet replayed, and the stream.
    pub fn into_parts(self) -> (BytesMut, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.prefix.is_empty() {
            let n = me.prefix.len().min(buf.remaining());
            buf.put_slice(&me.prefix[..n]);
            me.prefix.advance(n);
            if me.prefix.is_empty() {
                // Replayed: free the listener filters' read buffer (a
                // ClientHello needs 4 KiB or more) instead of keeping it
                // for the connection's life.
                me.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a reading wrapper `$ty<T>` whose writes go straight to
/// its `inner` stream.
macro_rules! delegate_async_write {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }
        }
    };
}
pub(crate) use delegate_async_write;

/// `AsyncRead` and `AsyncWrite` for an enum whose every variant holds one
/// stream (`Variant(stream)`, boxed or not): each call goes to the
/// variant's stream, so the enum costs a branch per call, no boxing.
macro_rules! enum_io {
    ($ty:ident { $($v:ident),+ $(,)? }) => {
        impl tokio::io::AsyncRead for $ty {
            #[inline]
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $ty {
            #[inline]
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_shutdown(cx),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $($ty::$v(s) => s.is_write_vectored(),)+
                }
            }
            #[inline]
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }
        }
    };
}
pub(crate) use enum_io;

delegate_async_write!(Rewind);

/// The downstream connection after the transport socket.
pub type Downstream = Rewind<Conn>;

/// An accepted connection: a TCP socket, or the listener's end of an
/// in-process internal connection (`internal_listener`). An enum, so the
/// TCP path pays a branch per call, not a boxed stream.
pub enum Conn {
    Tcp(TcpStream),
    Internal(crate::internal::Pipe),
}

enum_io!(Conn { Tcp, Internal });

impl Conn {
    /// What resets an internal connection (a socket: none; weir closes
    /// sockets as before).
    pub fn reset_handle(&self) -> Option<crate::internal::PipeReset> {
        match self {
            Conn::Tcp(_) => None,
            Conn::Internal(p) => Some(p.reset_handle()),
        }
    }
}

/// A downstream stream: plaintext, or TLS terminated by weir.
pub enum DownstreamIo {
    Plain(Downstream),
    Tls(Box<tokio_rustls::server::TlsStream<Downstream>>),
}

enum_io!(DownstreamIo { Plain, Tls });

impl DownstreamIo {
    /// See [`Conn::reset_handle`].
    pub fn reset_handle(&self) -> Option<crate::internal::PipeReset> {
        match self {
            DownstreamIo::Plain(s) => s.inner().reset_handle(),
            DownstreamIo::Tls(s) => s.get_ref().0.inner().reset_handle(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Rewind replays its prefix, then reads the stream, and frees the
    /// prefix's buffer once replayed (a listener filter's ClientHello
    /// buffer is not kept for the connection's life).
    #[tokio::test]
    async fn rewind_replays_then_frees_its_prefix() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        let mut prefix = BytesMut::with_capacity(16 * 1024);
        prefix.extend_from_slice(b"hello ");
        let mut r = Rewind::new(prefix, server);
        client.write_all(b"world").await.expect("write");
        let mut got = [0u8; 4];
        r.read_exact(&mut got).await.expect("read prefix");
        assert_eq!(&got, b"hell");
        assert_eq!(r.prefix.len(), 2);
        let mut rest = [0u8; 7];
        r.read_exact(&mut rest).await.expect("read rest");
        assert_eq!(&rest, b"o world");
        assert_eq!(
            r.prefix.capacity(),
            0,
            "replayed prefix still holds its buffer"
        );
    }
}
