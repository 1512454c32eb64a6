//! A test HBONE server (the far end of `tcp_proxy` `tunneling_config`, as
//! ztunnel's inbound on 15008): TLS (certificates from [`crate::tls`],
//! typically TLS 1.3 only, ALPN `h2`, client certificate required) then
//! HTTP/2 whose CONNECT (or POST) streams are tunnels; or, with
//! [`HboneProto::Http1`], one HTTP/1.1 `CONNECT` per connection.
//!
//! Every request is recorded ([`Seen`]: method, authority, path, scheme,
//! headers, the TLS connection it came on, and how the stream ended). A
//! stream is answered `200` and then, by [`Behavior`], echoes, sends a
//! banner then reads to the end, or connects to its authority and splices;
//! authorities registered with [`HboneServer::refuse`] get that status
//! instead (and the stream ends).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::tls::{TlsConnRecord, TlsServerOptions};
use crate::tunnel::H2Tunnel;

/// What an accepted tunnel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Echoes every byte; the client's end of stream ends the echo.
    Echo,
    /// Sends `n` bytes of [`crate::tcp::write_pattern`] and ends its side,
    /// then reads (counting) until the client ends.
    Banner(u64),
    /// Connects to the request's authority over TCP and splices.
    Forward,
}

/// The protocol the server speaks after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HboneProto {
    Http2,
    Http1,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The TLS connection it came on (0-based, in accept order).
    pub conn: usize,
    pub method: String,
    pub authority: String,
    /// `:path` (HTTP/2) or the request target (HTTP/1.1); `None` for an
    /// HTTP/2 CONNECT.
    pub path: Option<String>,
    pub scheme: Option<String>,
    pub headers: http::HeaderMap,
    /// The status answered.
    pub status: u16,
    /// How the tunnel ended: bytes received from the client, or why it
    /// failed (a reset). `None` while open.
    pub end: Option<Result<u64, String>>,
}

/// Settings of [`HboneServer::start`].
pub struct HboneOptions {
    pub tls: TlsServerOptions,
    pub proto: HboneProto,
    pub behavior: Behavior,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (HTTP/2).
    pub max_concurrent_streams: Option<u32>,
}

struct State {
    seen: Mutex<Vec<Seen>>,
    refuse: Mutex<HashMap<String, u16>>,
    conns: AtomicUsize,
    /// TLS connections open now.
    open: AtomicUsize,
    log: Arc<Mutex<Vec<TlsConnRecord>>>,
    behavior: Behavior,
    /// Bumped by [`HboneServer::close_connections`].
    kill: tokio::sync::watch::Sender<u64>,
    /// Bumped by [`HboneServer::freeze_connections`].
    freeze: tokio::sync::watch::Sender<u64>,
}

/// A running HBONE server on `127.0.0.1:0`; stops accepting when dropped.
pub struct HboneServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl HboneServer {
    pub async fn start(opts: HboneOptions) -> std::io::Result<HboneServer> {
        let (listener, addr, configs) = crate::tls::bind_tls(&opts.tls).await?;
        let state = Arc::new(State {
            seen: Mutex::default(),
            refuse: Mutex::default(),
            conns: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            log: Arc::default(),
            behavior: opts.behavior,
            kill: tokio::sync::watch::Sender::new(0),
            freeze: tokio::sync::watch::Sender::new(0),
        });
        let st = state.clone();
        let (proto, max_streams) = (opts.proto, opts.max_concurrent_streams);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (configs, st) = (configs.clone(), st.clone());
                tokio::spawn(async move {
                    let Some((tls, _)) =
                        crate::tls::accept_tls(stream, peer, &configs, &st.log).await
                    else {
                        return;
                    };
                    let conn = st.conns.fetch_add(1, Ordering::SeqCst);
                    st.open.fetch_add(1, Ordering::SeqCst);
                    match proto {
                        HboneProto::Http2 => serve_h2(tls, conn, &st, max_streams).await,
                        HboneProto::Http1 => serve_h1(tls, conn, &st).await,
                    }
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(HboneServer { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every open connection at once (no GOAWAY: as a peer that
    /// went away), failing their streams.
    pub fn close_connections(&self) {
        self.state.kill.send_modify(|n| *n += 1);
    }

    /// Stops serving every open connection without closing it: nothing is
    /// read or answered any more (PINGs included), as a peer that hangs.
    pub fn freeze_connections(&self) {
        self.state.freeze.send_modify(|n| *n += 1);
    }

    /// Answers requests for `authority` with `status` (no tunnel).
    pub fn refuse(&self, authority: &str, status: u16) {
        self.state
            .refuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(authority.to_owned(), status);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// TLS connections whose handshake completed.
    pub fn tls_connections(&self) -> usize {
        self.state.conns.load(Ordering::SeqCst)
    }

    /// TLS connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Every TCP connection's handshake record (failed ones included).
    pub fn handshakes(&self) -> Vec<TlsConnRecord> {
        self.state
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` requests were seen; panics after `timeout`.
    pub async fn wait_seen(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.seen();
            if s.len() >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} request(s) after {timeout:?}, wanted {n}: {s:?}",
                s.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until request `i` (0-based) ended; panics after `timeout`.
    pub async fn wait_end(&self, i: usize, timeout: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.seen().get(i).and_then(|s| s.end.clone()) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "request {i} did not end in {timeout:?}: {:?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until `f(self)` holds; panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&HboneServer) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "not in {timeout:?}: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for HboneServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    /// Records a request; its index and the status to answer.
    fn record(&self, mut s: Seen) -> (usize, u16) {
        let status = self
            .refuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&s.authority)
            .copied()
            .unwrap_or(200);
        s.status = status;
        if status != 200 {
            s.end = Some(Err(format!("refused with {status}")));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push(s);
        (seen.len() - 1, status)
    }

    fn end(&self, i: usize, r: Result<u64, String>) {
        if let Some(s) = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(i)
        {
            s.end = Some(r);
        }
    }
}

async fn serve_h2<T>(io: T, conn: usize, st: &Arc<State>, max_streams: Option<u32>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut b = h2::server::Builder::new();
    b.initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20);
    if let Some(m) = max_streams {
        b.max_concurrent_streams(m);
    }
    let Ok(mut h2c) = b.handshake::<_, Bytes>(io).await else {
        return;
    };
    let mut kill = st.kill.subscribe();
    kill.borrow_and_update();
    let mut freeze = st.freeze.subscribe();
    freeze.borrow_and_update();
    loop {
        let r = tokio::select! {
            r = h2c.accept() => r,
            _ = kill.changed() => return,
            _ = freeze.changed() => {
                // Hold the connection, never poll it again, until killed.
                let _ = kill.changed().await;
                return;
            }
        };
        let Some(Ok((req, mut respond))) = r else {
            break;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let (parts, body) = req.into_parts();
            let (i, status) = st.record(Seen {
                conn,
                method: parts.method.to_string(),
                authority: parts
                    .uri
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                path: parts.uri.path_and_query().map(|p| p.to_string()),
                scheme: parts.uri.scheme_str().map(str::to_owned),
                headers: parts.headers,
                status: 0,
                end: None,
            });
            let resp = http::Response::builder()
                .status(status)
                .body(())
                .expect("response");
            if status != 200 {
                let _ = respond.send_response(resp, true);
                return;
            }
            let Ok(tx) = respond.send_response(resp, false) else {
                st.end(i, Err("response not sent".into()));
                return;
            };
            let t = H2Tunnel::from_parts(tx, body);
            let authority = st.seen.lock().unwrap_or_else(|e| e.into_inner())[i]
                .authority
                .clone();
            let r = run(t, st.behavior, &authority).await;
            st.end(i, r);
        });
    }
}

/// Runs a tunnel's behaviour; bytes received from the client.
async fn run<T>(t: T, behavior: Behavior, authority: &str) -> Result<u64, String>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(t);
    match behavior {
        Behavior::Echo => {
            let n = tokio::io::copy(&mut r, &mut w)
                .await
                .map_err(|e| e.to_string())?;
            w.shutdown().await.map_err(|e| e.to_string())?;
            Ok(n)
        }
        Behavior::Banner(len) => {
            crate::tcp::write_pattern(&mut w, len)
                .await
                .map_err(|e| e.to_string())?;
            w.shutdown().await.map_err(|e| e.to_string())?;
            let mut n = 0u64;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => return Ok(n),
                    Ok(k) => n += k as u64,
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        Behavior::Forward => {
            let mut up = TcpStream::connect(authority)
                .await
                .map_err(|e| format!("connect {authority}: {e}"))?;
            let mut t = r.unsplit(w);
            let (n, _) = tokio::io::copy_bidirectional(&mut t, &mut up)
                .await
                .map_err(|e| e.to_string())?;
            Ok(n)
        }
    }
}

async fn serve_h1<T>(mut io: T, conn: usize, st: &Arc<State>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default().to_owned();
    let mut headers = http::HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    let authority = if method == "CONNECT" {
        target.clone()
    } else {
        headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (i, status) = st.record(Seen {
        conn,
        method: method.clone(),
        authority: authority.clone(),
        path: (method != "CONNECT").then_some(target),
        scheme: None,
        headers,
        status: 0,
        end: None,
    });
    if status != 200 {
        let _ = io
            .write_all(format!("HTTP/1.1 {status} Refused\r\ncontent-length: 0\r\n\r\n").as_bytes())
            .await;
        let _ = io.shutdown().await;
        return;
    }
    if io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
        st.end(i, Err("response not sent".into()));
        return;
    }
    let rest = buf[end..].to_vec();
    let r = run(Prefixed { rest, io }, st.behavior, &authority).await;
    st.end(i, r);
}

/// A stream after bytes already read from it.
struct Prefixed<T> {
    rest: Vec<u8>,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.rest.is_empty() {
            let n = me.rest.len().min(buf.remaining());
            buf.put_slice(&me.rest[..n]);
            me.rest.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
