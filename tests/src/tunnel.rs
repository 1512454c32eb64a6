//! CONNECT clients for the tunnel scenarios: HTTP/2 classic CONNECT
//! (RFC 9113 §8.5: `:method CONNECT`, `:authority host:port`, no `:scheme`
//! or `:path`, as ztunnel sends HBONE) over h2c prior knowledge or any
//! stream (TLS), and HTTP/1.1 `CONNECT host:port` on a raw connection.
//!
//! An accepted HTTP/2 tunnel is an [`H2Tunnel`]: `AsyncRead + AsyncWrite`
//! over the stream's DATA frames (shutdown sends END_STREAM), so the
//! pattern helpers of [`crate::tcp`] run through it unchanged.
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// One HTTP/2 client connection carrying CONNECT streams.
pub struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    task: JoinHandle<Result<(), h2::Error>>,
}

/// The answer to one CONNECT: the response head, and the stream (the
/// tunnel after a 2xx; the local reply's body otherwise).
pub struct Opened {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub stream: H2Tunnel,
}

impl H2Conn {
    /// An h2c (prior knowledge) connection to `addr`.
    pub async fn h2c(addr: SocketAddr) -> anyhow::Result<H2Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let _ = s.set_nodelay(true);
        H2Conn::over(s).await
    }

    /// An HTTP/2 connection over `io` (e.g. a TLS stream that negotiated
    /// `h2`).
    pub async fn over<T>(io: T) -> anyhow::Result<H2Conn>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::Builder::new()
            // Big enough that a 16 MiB transfer is not window-bound.
            .initial_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(io)
            .await
            .context("h2 handshake")?;
        let task = tokio::spawn(conn);
        Ok(H2Conn { send, task })
    }

    /// Sends `CONNECT authority` with `headers` and waits for the response
    /// head. `Err` when the stream is reset (or the connection fails)
    /// before a response.
    pub async fn connect(
        &self,
        authority: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Opened> {
        let mut b = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(()).map_err(|e| anyhow!("request: {e}"))?;
        let mut send = self.send.clone().ready().await.context("h2 ready")?;
        let (resp, tx) = send.send_request(req, false).context("send CONNECT")?;
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .context("no CONNECT response in 10 s")?
            .map_err(|e| anyhow!("{}", describe(&e)))?;
        let (parts, rx) = resp.into_parts();
        Ok(Opened {
            status: parts.status.as_u16(),
            headers: parts.headers,
            stream: H2Tunnel {
                tx,
                rx,
                pending: Bytes::new(),
                wrote_eos: false,
            },
        })
    }

    /// Whether the connection (not just a stream) has ended.
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A reset (`h2 reset: CANCEL`), a closed connection, or another error.
pub fn describe(e: &h2::Error) -> String {
    match e.reason() {
        Some(r) => format!("h2 reset: {r:?}"),
        None if e.is_io() => "h2 connection closed".to_owned(),
        None => format!("h2 error: {e}"),
    }
}

/// An HTTP/2 CONNECT stream as a byte stream. Reads end with EOF at the
/// peer's END_STREAM and fail (`h2 reset: ...` in the message) on a reset.
pub struct H2Tunnel {
    tx: h2::SendStream<Bytes>,
    rx: h2::RecvStream,
    pending: Bytes,
    wrote_eos: bool,
}

impl H2Tunnel {
    /// A tunnel over a stream's two halves (a client's request stream and
    /// response body, or a server's response stream and request body).
    pub fn from_parts(tx: h2::SendStream<Bytes>, rx: h2::RecvStream) -> H2Tunnel {
        H2Tunnel {
            tx,
            rx,
            pending: Bytes::new(),
            wrote_eos: false,
        }
    }

    /// Resets the stream (RST_STREAM CANCEL).
    pub fn reset(&mut self) {
        self.tx.send_reset(h2::Reason::CANCEL);
    }

    /// Reads until EOF (or an error), at most `limit` bytes kept.
    pub async fn read_all(&mut self, limit: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = self.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            if out.len() < limit {
                out.extend_from_slice(&buf[..n.min(limit - out.len())]);
            }
        }
    }
}

impl AsyncRead for H2Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        while me.pending.is_empty() {
            match ready!(me.rx.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(describe(&e)))),
                Some(Ok(d)) => {
                    let _ = me.rx.flow_control().release_capacity(d.len());
                    me.pending = d;
                }
            }
        }
        let n = me.pending.len().min(buf.remaining());
        buf.put_slice(&me.pending[..n]);
        me.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        me.tx.reserve_capacity(buf.len().min(1 << 20));
        let cap = loop {
            match ready!(me.tx.poll_capacity(cx)) {
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(describe(&e)))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n,
            }
        };
        let n = cap.min(buf.len());
        me.tx
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(|e| std::io::Error::other(describe(&e)))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.wrote_eos {
            me.wrote_eos = true;
            me.tx
                .send_data(Bytes::new(), true)
                .map_err(|e| std::io::Error::other(describe(&e)))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// An HTTP/1.1 CONNECT answered: the status line's code, the head as
/// text, and the connection (the tunnel after a 2xx).
pub struct H1Opened {
    pub status: u16,
    pub head: String,
    pub stream: TcpStream,
    /// Bytes read past the head (the tunnel's first bytes, or the body).
    pub rest: Vec<u8>,
}

impl H1Opened {
    /// A response header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `CONNECT authority HTTP/1.1` (with `Host: authority` and
/// `headers`) on a new connection to `addr` and reads the response head.
pub async fn h1_connect(
    addr: SocketAddr,
    authority: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<H1Opened> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let _ = s.set_nodelay(true);
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .context("no CONNECT response in 10 s")??;
        if n == 0 {
            return Err(anyhow!(
                "connection closed before a response head ({} bytes)",
                buf.len()
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    Ok(H1Opened {
        status,
        head,
        stream: s,
        rest: buf[end..].to_vec(),
    })
}
