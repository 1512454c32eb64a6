//! Raw TCP peers for integration tests: an echo server with correct
//! half-close, pattern sources/sinks that verify long streams without
//! holding them in memory, and a server that captures the first TLS
//! ClientHello it receives byte for byte (SNI passthrough).
//!
//! # Pattern streams
//!
//! Byte `i` of every stream is `pattern_byte(i)`: a pseudo-random table with
//! a prime period (65 521), so dropped, duplicated or reordered chunks of
//! any power-of-two size are detected, and a 1 GiB transfer is checked
//! chunk by chunk with `memcmp`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use weir_tests::tcp;
//! let echo = tcp::tcp_echo_server().await?;
//! // Through a TCP proxy in front of `echo`, or directly:
//! let t = tcp::stream_through(echo.addr(), 64 << 20).await?;
//! assert_eq!(t.received, 64 << 20);
//! # Ok(()) }
//! ```
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Period of the pattern (a prime).
pub const PATTERN_PERIOD: usize = 65_521;

const CHUNK: usize = 64 * 1024;

fn table() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        // The table repeated twice, so any window of up to PERIOD bytes is
        // one contiguous slice.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let one: Vec<u8> = (0..PATTERN_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut t = one.clone();
        t.extend_from_slice(&one);
        t
    })
}

/// Byte `offset` of the pattern.
pub fn pattern_byte(offset: u64) -> u8 {
    table()[(offset % PATTERN_PERIOD as u64) as usize]
}

/// Fills `buf` with the pattern starting at stream offset `offset`.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    let t = table();
    let mut pos = (offset % PATTERN_PERIOD as u64) as usize;
    for chunk in buf.chunks_mut(PATTERN_PERIOD) {
        chunk.copy_from_slice(&t[pos..pos + chunk.len()]);
        pos = (pos + chunk.len()) % PATTERN_PERIOD;
    }
}

/// `Err(first bad offset)` unless `buf` is the pattern at `offset`.
pub fn check_pattern(offset: u64, buf: &[u8]) -> Result<(), u64> {
    let t = table();
    let mut pos = (offset % PATTERN_PERIOD as u64) as usize;
    let mut at = offset;
    for chunk in buf.chunks(PATTERN_PERIOD) {
        let want = &t[pos..pos + chunk.len()];
        if chunk != want {
            let i = chunk
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(at + i as u64);
        }
        pos = (pos + chunk.len()) % PATTERN_PERIOD;
        at += chunk.len() as u64;
    }
    Ok(())
}

/// Writes `len` pattern bytes (from offset 0) to `w` and flushes. Does not
/// shut `w` down.
pub async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        fill_pattern(off, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    w.flush().await
}

/// Reads `r` to EOF checking every byte against the pattern; returns the
/// byte count. A mismatch is an `InvalidData` error naming the offset.
pub async fn read_verify_pattern<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(off);
        }
        check_pattern(off, &buf[..n]).map_err(|at| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("pattern mismatch at byte {at}"),
            )
        })?;
        off += n as u64;
    }
}

/// The result of [`stream_through`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub sent: u64,
    /// Bytes read back, all verified.
    pub received: u64,
    pub elapsed: Duration,
}

/// Writes `msg` into `t` and reads the same back (an echo behind it),
/// within 10 s.
pub async fn echo_once<T: AsyncRead + AsyncWrite + Unpin>(t: &mut T, msg: &[u8]) {
    t.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("read echo");
    assert_eq!(got, msg);
}

/// Connects to `addr` (an echo server, or a proxy in front of one), sends
/// `len` pattern bytes, half-closes, and concurrently reads and verifies the
/// echo until EOF. Errors on a mismatch or an I/O error; `received` may be
/// short if the peer closed early (the caller asserts on it).
pub async fn stream_through(addr: SocketAddr, len: u64) -> std::io::Result<Transfer> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let writer = async move {
        write_pattern(&mut w, len).await?;
        w.shutdown().await?;
        std::io::Result::Ok(w)
    };
    let (w, received) = tokio::try_join!(writer, read_verify_pattern(&mut r))?;
    drop(w);
    Ok(Transfer {
        sent: len,
        received,
        elapsed: start.elapsed(),
    })
}

/// Counters shared by the servers here.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    bytes: AtomicU64,
    peers: Mutex<Vec<SocketAddr>>,
}

/// Decrements `active` when a connection task ends, however it ends.
struct ActiveGuard(Arc<Counters>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn track(c: &Arc<Counters>, peer: SocketAddr) -> ActiveGuard {
    c.accepted.fetch_add(1, Ordering::Relaxed);
    c.active.fetch_add(1, Ordering::Relaxed);
    c.peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
    ActiveGuard(c.clone())
}

/// A running TCP server (echo, sink or source). Stops accepting when
/// dropped; connections in progress continue.
pub struct TcpServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    results: Arc<Mutex<Vec<std::io::Result<u64>>>>,
    task: JoinHandle<()>,
}

impl TcpServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections still open.
    pub fn active(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
    }

    /// Bytes echoed (echo), verified (sink) or sent (source) over all
    /// connections.
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }

    /// Remote addresses of accepted connections, in order (what the server
    /// saw as the peer: the proxy's upstream-side address when proxied).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.counters
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Per finished connection (sink: verified byte count or the error;
    /// source: bytes sent or the error; echo: bytes echoed or the error).
    pub fn results(&self) -> Vec<Result<u64, String>> {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| r.as_ref().map(|n| *n).map_err(|e| e.to_string()))
            .collect()
    }

    /// Waits until `n` connections have finished; panics after `timeout`.
    pub async fn wait_results(&self, n: usize, timeout: Duration) -> Vec<Result<u64, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.results();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{} finished connection(s) after {timeout:?}, wanted {n}",
                r.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<F, Fut>(handler: F) -> std::io::Result<TcpServer>
where
    F: Fn(TcpStream, Arc<Counters>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<u64>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counters: Arc<Counters> = Arc::default();
    let results: Arc<Mutex<Vec<std::io::Result<u64>>>> = Arc::default();
    let task = {
        let (counters, results) = (counters.clone(), results.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let guard = track(&counters, peer);
                let fut = handler(stream, counters.clone());
                let results = results.clone();
                tokio::spawn(async move {
                    let r = fut.await;
                    results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                    drop(guard);
                });
            }
        })
    };
    Ok(TcpServer {
        addr,
        counters,
        results,
        task,
    })
}

/// A TCP echo server on `127.0.0.1:0`. Echoes every byte; when the client
/// half-closes (FIN), it finishes writing what it has echoed and then shuts
/// down its own write side (FIN), so the client reads everything then EOF.
pub async fn tcp_echo_server() -> std::io::Result<TcpServer> {
    serve(|mut stream, counters| async move {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n]).await?;
            total += n as u64;
            counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        stream.shutdown().await?;
        Ok(total)
    })
    .await
}

/// A server that reads each connection to EOF verifying the pattern (see
/// [`write_pattern`]); [`TcpServer::results`] has the verified counts.
pub async fn tcp_sink_server() -> std::io::Result<TcpServer> {
    serve(|mut stream, counters| async move {
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            check_pattern(off, &buf[..n]).map_err(|at| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("pattern mismatch at byte {at}"),
                )
            })?;
            off += n as u64;
            counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(off)
    })
    .await
}

/// A server that writes `len` pattern bytes to each connection, then shuts
/// down its write side and waits for the client to close.
pub async fn tcp_source_server(len: u64) -> std::io::Result<TcpServer> {
    serve(move |mut stream, counters| async move {
        write_pattern(&mut stream, len).await?;
        counters.bytes.fetch_add(len, Ordering::Relaxed);
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok(len)
    })
    .await
}

/// A server that records the first TLS ClientHello (the complete handshake
/// message, in its original TLS records) of every connection, then closes
/// the connection.
pub struct HelloCapture {
    server: TcpServer,
    captures: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl HelloCapture {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// The raw bytes captured per connection (the records carrying the
    /// ClientHello; anything else read is dropped).
    pub fn captures(&self) -> Vec<Vec<u8>> {
        self.captures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for the `n`th capture (1-based) and returns it; panics after
    /// `timeout`.
    pub async fn wait_capture(&self, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.captures().get(n - 1) {
                return c.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no ClientHello #{n} within {timeout:?} ({} connection(s))",
                self.server.connections()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Length of the TLS records in `buf` that carry the complete first
/// handshake message, or `None` if more bytes are needed. `Err` if `buf`
/// is not TLS handshake records.
fn client_hello_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut pos = 0;
    let mut hs: Vec<u8> = Vec::new();
    loop {
        if buf.len() < pos + 5 {
            return Ok(None);
        }
        if buf[pos] != 0x16 {
            return Err(format!(
                "not a TLS handshake record: type {:#04x}",
                buf[pos]
            ));
        }
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        if buf.len() < pos + 5 + len {
            return Ok(None);
        }
        hs.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if hs.len() >= 4 {
            let msg_len =
                (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if hs.len() >= 4 + msg_len {
                return Ok(Some(pos));
            }
        }
    }
}

/// A [`HelloCapture`] server on `127.0.0.1:0`.
pub async fn hello_capture_server() -> std::io::Result<HelloCapture> {
    let captures: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let c = captures.clone();
    let server = serve(move |mut stream, counters| {
        let captures = c.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let end = loop {
                let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("EOF after {} bytes, before a full ClientHello", buf.len()),
                    ));
                }
                buf.extend_from_slice(&chunk[..n]);
                counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                match client_hello_len(&buf) {
                    Ok(Some(end)) => break end,
                    Ok(None) => {}
                    Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
                }
            };
            buf.truncate(end);
            captures.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
            Ok(end as u64)
        }
    })
    .await?;
    Ok(HelloCapture { server, captures })
}

/// The SNI host name in a ClientHello as captured by [`HelloCapture`] (or
/// produced by `TlsClient::client_hello`), if any.
pub fn client_hello_sni(records: &[u8]) -> Option<String> {
    ext_data(records, 0x0000).and_then(|d| {
        // server_name_list: u16 len, then (type u8, u16 len, name)
        let list = d.get(2..)?;
        let (&ty, rest) = list.split_first()?;
        if ty != 0 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let name = rest.get(2..2 + len)?;
        Some(String::from_utf8_lossy(name).into_owned())
    })
}

/// The ALPN protocols offered in a captured ClientHello, in order.
pub fn client_hello_alpn(records: &[u8]) -> Vec<String> {
    let Some(d) = ext_data(records, 0x0010) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut p = d.get(2..).unwrap_or_default();
    while let Some((&len, rest)) = p.split_first() {
        let len = usize::from(len);
        let Some(proto) = rest.get(..len) else { break };
        out.push(String::from_utf8_lossy(proto).into_owned());
        p = &rest[len..];
    }
    out
}

/// The data of extension `ty` in the ClientHello carried by `records`.
fn ext_data(records: &[u8], ty: u16) -> Option<Vec<u8>> {
    // Reassemble the handshake message from the records.
    let mut hs = Vec::new();
    let mut pos = 0;
    while pos + 5 <= records.len() {
        let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
        hs.extend_from_slice(records.get(pos + 5..pos + 5 + len)?);
        pos += 5 + len;
    }
    if hs.first() != Some(&1) {
        return None;
    }
    // type(1) len(3) version(2) random(32)
    let mut p = 4 + 2 + 32;
    let sid = usize::from(*hs.get(p)?);
    p += 1 + sid;
    let suites = usize::from(u16::from_be_bytes([*hs.get(p)?, *hs.get(p + 1)?]));
    p += 2 + suites;
    let comp = usize::from(*hs.get(p)?);
    p += 1 + comp;
    let ext_len = usize::from(u16::from_be_bytes([*hs.get(p)?, *hs.get(p + 1)?]));
    p += 2;
    let end = (p + ext_len).min(hs.len());
    while p + 4 <= end {
        let t = u16::from_be_bytes([hs[p], hs[p + 1]]);
        let l = usize::from(u16::from_be_bytes([hs[p + 2], hs[p + 3]]));
        let data = hs.get(p + 4..p + 4 + l)?;
        if t == ty {
            return Some(data.to_vec());
        }
        p += 4 + l;
    }
    None
}
