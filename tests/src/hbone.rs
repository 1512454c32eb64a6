//! An HBONE client as ztunnel is one: mutual TLS 1.3 with a SPIFFE
//! workload certificate, ALPN `h2`, no SNI, and one HTTP/2 connection
//! carrying many classic CONNECT streams (RFC 9113 §8.5: `:method CONNECT`,
//! `:authority ip:port`, no `:scheme` or `:path`). Each accepted stream is
//! an [`H2Tunnel`], `AsyncRead + AsyncWrite` over the stream's DATA frames
//! with half-close (shutdown sends END_STREAM), so the byte-pattern helpers
//! of [`crate::tcp`] run through it unchanged.
//!
//! [`H2Conn`] also runs over h2c or any stream ([`crate::tunnel`] uses it
//! for the plain CONNECT scenarios). [`raw`] writes HTTP/2 frames by hand
//! for what a conforming client library refuses to send: authorities that
//! are not `host:port`, more streams than the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, a peer that stops answering PINGs.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::{Buf, Bytes};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::tls::{CertInfo, Leaf, TestCa};

/// How long a CONNECT may wait for its response head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

// === HboneClient ===

/// A workload's HBONE client: its identity (certificate and key), the
/// trust root, and optionally the identity the server must present.
#[derive(Clone)]
pub struct HboneClient {
    config: Arc<ClientConfig>,
    seen: Arc<Mutex<Option<CertInfo>>>,
}

/// What the TLS handshake of an HBONE connection negotiated.
#[derive(Debug, Clone)]
pub struct HboneSession {
    pub version: Option<rustls::ProtocolVersion>,
    pub alpn: Option<Vec<u8>>,
    /// The server's end-entity certificate.
    pub server_cert: Option<CertInfo>,
}

impl HboneClient {
    /// A client with workload certificate `me`, trusting `ca`. Like
    /// ztunnel: TLS 1.3 only, ALPN `h2`, no SNI; the server certificate
    /// is verified against `ca` (any name: HBONE peers are identified by
    /// their SPIFFE URI, checked with [`HboneClient::expect_server`]).
    pub fn new(ca: &TestCa, me: &Leaf) -> HboneClient {
        HboneClient::build(ca, me, None)
    }

    /// [`HboneClient::new`], and the server must present URI SAN `identity`
    /// (ztunnel checks the waypoint's service account identity).
    pub fn expect_server(ca: &TestCa, me: &Leaf, identity: &str) -> HboneClient {
        HboneClient::build(ca, me, Some(identity.to_owned()))
    }

    fn build(ca: &TestCa, me: &Leaf, identity: Option<String>) -> HboneClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der()).expect("trust root");
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("server verifier");
        let seen = Arc::new(Mutex::new(None));
        let verifier = Arc::new(SpiffeVerifier {
            webpki,
            provider: provider.clone(),
            identity,
            seen: seen.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                me.chain_der.clone(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(me.key_der.clone().into()),
            )
            .expect("client certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = false;
        HboneClient {
            config: Arc::new(config),
            seen,
        }
    }

    /// The TLS session to `addr` (ALPN `h2` checked), for [`raw`] probes
    /// or a custom HTTP/2 client.
    pub async fn tls(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<(tokio_rustls::client::TlsStream<TcpStream>, HboneSession)> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let _ = tcp.set_nodelay(true);
        // An IP address as the server name: rustls then sends no SNI.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp),
        )
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
        let c = tls.get_ref().1;
        let session = HboneSession {
            version: c.protocol_version(),
            alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            server_cert: self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        if session.alpn.as_deref() != Some(b"h2") {
            return Err(anyhow!("ALPN: {:?}, not h2", session.alpn));
        }
        Ok((tls, session))
    }

    /// An HBONE connection to `addr`: TLS, then HTTP/2.
    pub async fn connect(&self, addr: SocketAddr) -> anyhow::Result<(H2Conn, HboneSession)> {
        let (tls, session) = self.tls(addr).await?;
        Ok((H2Conn::over(tls).await?, session))
    }
}

/// Chain verification against the trust root without a name check, then
/// the SPIFFE identity if one is expected.
#[derive(Debug)]
struct SpiffeVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    identity: Option<String>,
    seen: Arc<Mutex<Option<CertInfo>>>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let info = CertInfo::parse(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
        // webpki checks the chain before the name: a name mismatch means
        // the chain is good.
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        match &self.identity {
            Some(id) if !info.uri_sans.iter().any(|u| u == id) => Err(
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            ),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    crate::tls::provider_signature_checks!(provider);

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === H2Conn ===

/// One HTTP/2 client connection carrying CONNECT streams. The h2 library
/// answers the server's PINGs and keeps within its
/// `SETTINGS_MAX_CONCURRENT_STREAMS` (a stream past it waits, as ztunnel's
/// pool does).
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
            // At most 100 streams until the server's SETTINGS say how many
            // it allows (h2's default is no limit, so a burst sent before
            // them is refused past the server's limit); ztunnel's pool
            // keeps 100 streams per connection.
            .initial_max_send_streams(100)
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
        let resp = tokio::time::timeout(RESPONSE_TIMEOUT, resp)
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

// === H2Tunnel ===

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

// === raw frames ===

/// HTTP/2 written by hand, for what a conforming client does not send.
/// Requests are HPACK literals without indexing (no Huffman); responses
/// are told apart by frame type, and a response's `:status` is decoded
/// only as it can appear first in a connection's first header block
/// (static table or a literal; digits in Huffman code).
pub mod raw {
    use std::time::Duration;

    use anyhow::{anyhow, Context as _};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const ACK: u8 = 0x1;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// RST_STREAM / GOAWAY error codes.
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const REFUSED_STREAM: u32 = 0x7;

    /// One frame read.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    impl Frame {
        /// The error code of a RST_STREAM or GOAWAY.
        pub fn error_code(&self) -> Option<u32> {
            let p = &self.payload;
            match self.kind {
                RST_STREAM if p.len() >= 4 => Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
                GOAWAY if p.len() >= 8 => Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
                _ => None,
            }
        }

        /// Whether this is an unacknowledged PING (one the peer expects an
        /// answer to).
        pub fn is_ping(&self) -> bool {
            self.kind == PING && self.flags & ACK == 0
        }

        pub fn end_stream(&self) -> bool {
            self.flags & END_STREAM != 0
        }
    }

    /// A raw HTTP/2 client connection.
    pub struct RawConn<T> {
        io: T,
    }

    impl<T: AsyncRead + AsyncWrite + Unpin> RawConn<T> {
        /// Sends the preface and an empty SETTINGS (stream window 16 MiB
        /// would need a SETTINGS value; defaults are enough here).
        pub async fn start(mut io: T) -> anyhow::Result<RawConn<T>> {
            io.write_all(PREFACE).await?;
            io.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
            io.flush().await?;
            Ok(RawConn { io })
        }

        /// HEADERS `CONNECT` with `:authority` = `authority` (any bytes)
        /// on stream `id`, the stream left open.
        pub async fn connect(&mut self, id: u32, authority: &[u8]) -> anyhow::Result<()> {
            let mut block = Vec::new();
            // Literal without indexing, indexed name: 2 = `:method`,
            // 1 = `:authority`.
            literal(&mut block, 2, b"CONNECT");
            literal(&mut block, 1, authority);
            self.send(HEADERS, END_HEADERS, id, &block).await
        }

        /// DATA on stream `id`.
        pub async fn data(&mut self, id: u32, bytes: &[u8], end: bool) -> anyhow::Result<()> {
            let flags = if end { END_STREAM } else { 0 };
            self.send(DATA, flags, id, bytes).await
        }

        pub async fn send(
            &mut self,
            kind: u8,
            flags: u8,
            id: u32,
            payload: &[u8],
        ) -> anyhow::Result<()> {
            self.io.write_all(&frame(kind, flags, id, payload)).await?;
            self.io.flush().await?;
            Ok(())
        }

        /// The next frame; `Ok(None)` at EOF. Acknowledges the server's
        /// SETTINGS (not its PINGs: see [`RawConn::answer_ping`]).
        pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<Frame>> {
            let mut head = [0u8; 9];
            let read = tokio::time::timeout(wait, self.io.read_exact(&mut head))
                .await
                .context("no frame in time")?;
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                // A reset or a TLS close_notify-less end: the connection
                // is gone all the same.
                Err(e) if is_closed(&e) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if len > 1 << 20 {
                return Err(anyhow!("frame of {len} bytes"));
            }
            let mut payload = vec![0u8; len];
            self.io.read_exact(&mut payload).await?;
            let f = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            };
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                self.send(SETTINGS, ACK, 0, &[]).await?;
            }
            Ok(Some(f))
        }

        /// Answers a PING frame.
        pub async fn answer_ping(&mut self, ping: &Frame) -> anyhow::Result<()> {
            self.send(PING, ACK, 0, &ping.payload).await
        }

        /// Frames until one on stream `id` that answers it: HEADERS (with
        /// its `:status` when decodable), RST_STREAM, or a GOAWAY or EOF
        /// for the whole connection.
        pub async fn answer(&mut self, id: u32, wait: Duration) -> anyhow::Result<Answer> {
            loop {
                let Some(f) = self.next(wait).await? else {
                    return Ok(Answer::Closed);
                };
                match f.kind {
                    HEADERS if f.stream == id => return Ok(Answer::Status(status(&f.payload))),
                    RST_STREAM if f.stream == id => {
                        return Ok(Answer::Reset(f.error_code().unwrap_or(0)))
                    }
                    GOAWAY => return Ok(Answer::GoAway(f.error_code().unwrap_or(0))),
                    PING if f.is_ping() => self.answer_ping(&f).await?,
                    _ => {}
                }
            }
        }

        pub fn into_inner(self) -> T {
            self.io
        }
    }

    fn is_closed(e: &std::io::Error) -> bool {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        )
    }

    /// How the server answered a stream.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Answer {
        /// A response head; its `:status` if it could be decoded.
        Status(Option<u16>),
        /// RST_STREAM with this error code.
        Reset(u32),
        /// GOAWAY with this error code (the connection ends).
        GoAway(u32),
        /// The connection closed.
        Closed,
    }

    fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("frame size");
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// HPACK integer with an `n`-bit prefix whose high bits are `mask`.
    fn integer(out: &mut Vec<u8>, mask: u8, n: u32, mut v: usize) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(mask | v as u8);
            return;
        }
        out.push(mask | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn literal(out: &mut Vec<u8>, name_index: usize, value: &[u8]) {
        integer(out, 0x00, 4, name_index);
        integer(out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }

    /// The `:status` of a connection's first header block.
    pub fn status(block: &[u8]) -> Option<u16> {
        let mut i = 0;
        // Dynamic table size updates (001xxxxx) may come first.
        while *block.get(i)? & 0xe0 == 0x20 {
            let full = *block.get(i)? & 0x1f == 0x1f;
            i += 1;
            if full {
                while *block.get(i)? & 0x80 != 0 {
                    i += 1;
                }
                i += 1;
            }
        }
        let b = *block.get(i)?;
        if b & 0x80 != 0 {
            return match b & 0x7f {
                8 => Some(200),
                9 => Some(204),
                10 => Some(206),
                11 => Some(304),
                12 => Some(400),
                13 => Some(404),
                14 => Some(500),
                _ => None,
            };
        }
        // Literal with name index 8 (`:status`): incremental indexing
        // (01), without indexing (0000) or never indexed (0001).
        let index = if b & 0xc0 == 0x40 { b & 0x3f } else { b & 0x0f };
        if index != 8 {
            return None;
        }
        let v = *block.get(i + 1)?;
        let len = usize::from(v & 0x7f);
        let value = block.get(i + 2..i + 2 + len)?;
        let text = if v & 0x80 != 0 {
            huffman_digits(value)?
        } else {
            String::from_utf8(value.to_vec()).ok()?
        };
        text.parse().ok()
    }

    /// Huffman-coded decimal digits (RFC 7541 Appendix B: `0`-`2` are
    /// five bits, `3`-`9` six).
    fn huffman_digits(bytes: &[u8]) -> Option<String> {
        let bits: Vec<u8> = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let mut out = String::new();
        let mut i = 0;
        while i + 5 <= bits.len() {
            let five = bits[i..i + 5].iter().fold(0u8, |a, b| a << 1 | b);
            if five < 3 {
                out.push(char::from(b'0' + five));
                i += 5;
            } else if i + 6 <= bits.len() {
                let six = bits[i..i + 6].iter().fold(0u8, |a, b| a << 1 | b);
                if !(0b011001..=0b011111).contains(&six) {
                    break;
                }
                out.push(char::from(b'3' + (six - 0b011001)));
                i += 6;
            } else {
                break;
            }
        }
        // What is left is EOS padding: all ones, under a byte.
        (bits.len() - i < 8 && bits[i..].iter().all(|b| *b == 1)).then_some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn statuses_decode() {
            assert_eq!(status(&[0x88]), Some(200));
            assert_eq!(status(&[0x3f, 0xe1, 0x1f, 0x88]), Some(200));
            assert_eq!(status(&[0x08, 0x03, b'4', b'0', b'3']), Some(403));
            // "503" in Huffman: 011011 00000 011001 + 111 padding.
            assert_eq!(status(&[0x48, 0x83, 0x6c, 0x0c, 0xff]), Some(503));
            // "403": 011010 00000 011001 + 111.
            assert_eq!(status(&[0x48, 0x83, 0x68, 0x0c, 0xff]), Some(403));
            assert_eq!(status(&[0x82]), None);
        }

        #[test]
        fn literals_encode() {
            let mut b = Vec::new();
            literal(&mut b, 1, b"");
            assert_eq!(b, [0x01, 0x00]);
            let mut b = Vec::new();
            literal(&mut b, 1, &[b'a'; 200]);
            assert_eq!(&b[..3], &[0x01, 0x7f, 73]);
            assert_eq!(b.len(), 203);
        }
    }
}

/// Reads exactly `n` bytes from `r` within `wait`.
pub async fn read_n<R: AsyncRead + Unpin>(
    r: &mut R,
    n: usize,
    wait: Duration,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(wait, r.read_exact(&mut buf))
        .await
        .context("read timed out")??;
    Ok(buf)
}
