//! An HTTP/1.1 upstream exchange driven from the request's own future.
//!
//! hyper's client runs each HTTP/1 connection in a task of its own and
//! hands it requests through a channel: every request crossed two tasks
//! and a channel both ways. Here the request owns its pooled connection
//! while it is in flight (as pingora's): the head (and a body already
//! whole) goes out in one vectored write, the response head is parsed with
//! `httparse` from the connection's read buffer, and the response body
//! reads the same buffer; at the body's clean end the connection goes back
//! to the pool's idle list. Requests this path does not take (streamed
//! bodies, upgrades, CONNECT, absolute URIs, ...) use hyper's client on the
//! same pool; see [`can_send`].
//!
//! The wire behaviour is hyper's client's, which this replaces for these
//! requests: the same request head bytes (lowercase names, no Host added,
//! `content-length` appended for a known body without one, no
//! `transfer-encoding` for an empty body), the same response framing rules
//! (RFC 9112 section 6.3 as hyper's `Client::decoder`), 1xx but 101
//! skipped, the same head limits (400 KiB buffered, 100 headers) and the
//! same keep-alive rules.
use std::{
    io::IoSlice,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version,
};
use http_body::{Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

use super::pool::{Client, ConnInfo, CountedIo, Key, PoolError, UpstreamIo};
use crate::body::{Body, BoxError, UpstreamBody};

/// hyper's default read buffer limit for a message head (8 KiB + 100 x
/// 4 KiB): a head still incomplete at this size fails the exchange.
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// hyper's default header count limit.
const MAX_HEADERS: usize = 100;
/// hyper's limits on a chunked body's extensions and trailers.
const CHUNK_EXT_LIMIT: usize = 16 * 1024;
const TRAILER_LIMIT: usize = 16 * 1024;
/// A body already whole is written with the head up to this size; a
/// larger one goes through hyper, which reads the response while it writes
/// (an upstream may answer and close before it has read a large body).
const MAX_INLINE_BODY: usize = 64 * 1024;
/// The read buffer's first size and growth step (hyper's too).
const READ_CHUNK: usize = 8192;

/// A pooled connection driven inline: the transport, its read buffer and
/// the state of the response body being read.
pub(crate) struct Conn {
    pub(super) io: CountedIo,
    buf: BytesMut,
    /// The request head being written (kept: no allocation per request).
    wbuf: Vec<u8>,
    pub(super) key: Key,
    pub(super) info: ConnInfo,
    /// Requests sent on it.
    pub(super) used: u32,
    /// Since when it is idle.
    pub(super) since: Instant,
    framing: Framing,
    /// Both sides allow another exchange after this one.
    keep_alive: bool,
    /// A body error held back for one poll (see [`InlineBody`]).
    failed: Option<BoxError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Data bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes.
    Close,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    /// Data bytes of the current chunk left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// Whether `req` can go out inline: an HTTP/1.1 request in origin form
/// whose body is already whole (and small), not an upgrade nor CONNECT.
pub(crate) fn can_send(req: &Request<Body>) -> bool {
    if req.method() == Method::CONNECT
        || req.uri().scheme().is_some()
        || req.uri().path_and_query().is_none()
        || req.headers().contains_key(header::UPGRADE)
        || req.extensions().get::<super::pool::Upgrade>().is_some()
    {
        return false;
    }
    match req.body() {
        Body::Empty | Body::None | Body::Full(None) => true,
        Body::Incoming(i) => http_body::Body::is_end_stream(i),
        Body::Full(Some(b)) => {
            let h = req.headers();
            b.len() <= MAX_INLINE_BODY
                && !h.contains_key(header::TRANSFER_ENCODING)
                && match h.get(header::CONTENT_LENGTH) {
                    None => true,
                    // hyper takes a valid one as given; anything else
                    // (lists, several values, a mismatch) stays hyper's.
                    Some(v) => {
                        h.get_all(header::CONTENT_LENGTH).iter().count() == 1
                            && std::str::from_utf8(v.as_bytes())
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok())
                                == Some(b.len() as u64)
                    }
                }
        }
        _ => false,
    }
}

/// A parsed response head and what it says about the body.
struct Head {
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
}

impl Conn {
    pub(super) fn new(io: CountedIo, key: Key, info: ConnInfo) -> Box<Conn> {
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            wbuf: Vec::new(),
            key,
            info,
            used: 0,
            since: Instant::now(),
            framing: Framing::Done,
            keep_alive: true,
            failed: None,
        })
    }

    /// The transport, for hyper's client to take over (the read buffer is
    /// empty between exchanges).
    pub(super) fn into_io(self: Box<Self>) -> CountedIo {
        self.io
    }

    /// Whether an idle connection is still usable: the peer has not
    /// closed it nor sent anything. Plain sockets answer from the
    /// reactor's readiness without a system call when nothing arrived.
    pub(super) async fn alive(&mut self) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(self.poll_alive(cx))).await
    }

    pub(super) fn poll_alive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let io = self.io.stream();
        if let UpstreamIo::Plain(s) = io {
            if s.poll_read_ready(cx).is_pending() {
                return true;
            }
            let mut b = [0u8; 1];
            return matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        }
        let mut b = [0u8; 1];
        let mut rb = tokio::io::ReadBuf::new(&mut b);
        matches!(Pin::new(io).poll_read(cx, &mut rb), Poll::Pending)
    }

    /// Sends `req` and reads the response head. The caller holds the
    /// request's place under the circuit breakers.
    pub(super) async fn exchange(
        mut self: Box<Self>,
        pool: &Arc<Client>,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, ConnInfo), PoolError> {
        let (parts, body) = req.into_parts();
        let body = match body {
            Body::Full(Some(b)) => b,
            _ => Bytes::new(),
        };
        self.used += 1;
        let request_close = encode_head(&mut self.wbuf, &parts, body.len());
        let is_head = parts.method == Method::HEAD;
        self.write(&body)
            .await
            .map_err(|e| PoolError::Reset(e.to_string()))?;
        let head = self.read_head(is_head).await?;
        let info = self.info.clone();
        self.framing = head.framing;
        self.keep_alive = head.keep_alive && !request_close;
        let body = if self.framing == Framing::Done {
            pool.put_inline(self);
            InlineBody(None)
        } else {
            InlineBody(Some((self, pool.clone())))
        };
        Ok((
            Response::from_parts(head.parts, UpstreamBody::Inline(body)),
            info,
        ))
    }

    async fn write(&mut self, body: &[u8]) -> std::io::Result<()> {
        let Conn { io, wbuf, .. } = self;
        let io = io.stream();
        let (mut h, mut b) = (&wbuf[..], body);
        while !h.is_empty() || !b.is_empty() {
            let n = if b.is_empty() {
                io.write(h).await?
            } else {
                io.write_vectored(&[IoSlice::new(h), IoSlice::new(b)])
                    .await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let from_head = n.min(h.len());
            h = &h[from_head..];
            b = &b[n - from_head..];
        }
        io.flush().await
    }

    /// Reads until a final (non-1xx, or 101) response head parses.
    async fn read_head(&mut self, is_head: bool) -> Result<Head, PoolError> {
        loop {
            while !self.buf.is_empty() {
                match parse_head(&mut self.buf, is_head)? {
                    Parsed::Head(h) => return Ok(h),
                    Parsed::Informational => continue,
                    Parsed::Partial => break,
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(PoolError::Reset("message head is too large".into()));
            }
            self.reserve();
            // Never past the limit: a head that fits in it parses, a
            // longer one fails (as hyper's bounded read buffer).
            let room = (MAX_HEAD - self.buf.len()) as u64;
            let n = AsyncReadExt::take(self.io.stream(), room)
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| PoolError::Reset(e.to_string()))?;
            if n == 0 {
                return Err(PoolError::Reset(
                    "connection closed before message completed".into(),
                ));
            }
        }
    }

    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// Reads more into the buffer: the number of bytes read (0: EOF).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.reserve();
        let Conn { io, buf, .. } = self;
        let fut = std::pin::pin!(io.stream().read_buf(buf));
        std::future::Future::poll(fut, cx)
    }

    /// The next frame of the response body (`None`: its end).
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, BoxError>> {
        loop {
            match self.framing {
                Framing::Done => return Poll::Ready(Ok(None)),
                Framing::Length(n) => {
                    if self.buf.is_empty() && ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(incomplete()));
                    }
                    let take = (self.buf.len() as u64).min(n);
                    let left = n - take;
                    self.framing = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    let d = self.buf.split_to(take as usize).freeze();
                    return Poll::Ready(Ok(Some(Frame::data(d))));
                }
                Framing::Close => {
                    if self.buf.is_empty() && ready!(self.poll_fill(cx))? == 0 {
                        self.framing = Framing::Done;
                        return Poll::Ready(Ok(None));
                    }
                    let d = self.buf.split().freeze();
                    return Poll::Ready(Ok(Some(Frame::data(d))));
                }
                Framing::Chunked(Chunk::Data(n)) => {
                    if self.buf.is_empty() && ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(incomplete()));
                    }
                    let take = (self.buf.len() as u64).min(n);
                    let left = n - take;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    let d = self.buf.split_to(take as usize).freeze();
                    return Poll::Ready(Ok(Some(Frame::data(d))));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if self.buf.len() < 2 {
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(incomplete()));
                        }
                        continue;
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Poll::Ready(Err(invalid("invalid chunk end")));
                    }
                    let _ = self.buf.split_to(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(end) = find(&self.buf, b"\r\n") else {
                        if self.buf.len() > CHUNK_EXT_LIMIT {
                            return Poll::Ready(Err(invalid("chunk extensions over limit")));
                        }
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(incomplete()));
                        }
                        continue;
                    };
                    let size = chunk_size(&self.buf[..end])?;
                    let _ = self.buf.split_to(end + 2);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Framing::Chunked(Chunk::Trailers) => {
                    if self.buf.starts_with(b"\r\n") {
                        let _ = self.buf.split_to(2);
                        self.framing = Framing::Done;
                        return Poll::Ready(Ok(None));
                    }
                    let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                        if self.buf.len() > TRAILER_LIMIT {
                            return Poll::Ready(Err(invalid("chunk trailers over limit")));
                        }
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(incomplete()));
                        }
                        continue;
                    };
                    if end + 4 > TRAILER_LIMIT {
                        return Poll::Ready(Err(invalid("chunk trailers over limit")));
                    }
                    let t = self.buf.split_to(end + 4);
                    self.framing = Framing::Done;
                    return Poll::Ready(Ok(Some(Frame::trailers(parse_trailers(&t)?))));
                }
            }
        }
    }

    /// Whether the connection can carry another request now that its
    /// response ended.
    fn reusable(&self) -> bool {
        self.keep_alive && self.framing == Framing::Done && self.buf.is_empty()
    }
}

fn incomplete() -> BoxError {
    "end of file before message length reached".into()
}

fn invalid(what: &'static str) -> BoxError {
    what.into()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A chunk-size line (RFC 9112 section 7.1, as hyper reads it: hex digits,
/// optional whitespace, optional extensions).
fn chunk_size(line: &[u8]) -> Result<u64, BoxError> {
    let mut size: u64 = 0;
    let mut digits = 0;
    let mut rest = line;
    while let Some((&c, r)) = rest.split_first() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => break,
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or_else(|| invalid("invalid chunk size: overflow"))?;
        digits += 1;
        rest = r;
    }
    if digits == 0 {
        return Err(invalid("invalid chunk size line"));
    }
    let rest = match rest.iter().position(|&c| c != b' ' && c != b'\t') {
        Some(i) => &rest[i..],
        None => &[][..],
    };
    if !rest.is_empty() && rest[0] != b';' {
        return Err(invalid("invalid chunk size line"));
    }
    if rest.iter().any(|&c| c == b'\r' || c == b'\n') {
        return Err(invalid("invalid chunk extension"));
    }
    Ok(size)
}

fn parse_trailers(t: &[u8]) -> Result<HeaderMap, BoxError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut map = HeaderMap::new();
    match httparse::parse_headers(t, &mut headers) {
        Ok(httparse::Status::Complete((_, hs))) => {
            for h in hs {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| invalid("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| invalid("invalid trailer value"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        Ok(httparse::Status::Partial) => Err(invalid("partial trailers")),
        Err(e) => Err(e.to_string().into()),
    }
}

/// Writes the request head as hyper's client does: `true` when the request
/// asks to close the connection.
fn encode_head(dst: &mut Vec<u8>, parts: &http::request::Parts, body_len: usize) -> bool {
    dst.clear();
    dst.extend_from_slice(parts.method.as_str().as_bytes());
    dst.push(b' ');
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    dst.extend_from_slice(pq.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    let mut close = false;
    for (name, value) in &parts.headers {
        // hyper drops transfer-encoding from a request without a body.
        if body_len == 0 && name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONNECTION && has_token(value, "close") {
            close = true;
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    if body_len > 0 && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        use std::io::Write;
        let _ = write!(dst, "content-length: {body_len}\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    close
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.as_bytes()
        .split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

enum Parsed {
    Head(Head),
    /// A 1xx (not 101) head, consumed: skipped as hyper does.
    Informational,
    Partial,
}

/// Parses a response head at the start of `buf`, taking it off the buffer.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Parsed, PoolError> {
    let bad = |e: &dyn std::fmt::Display| PoolError::Reset(e.to_string());
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    // Header name and value positions in the head.
    let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let (len, code, version, reason, count) = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut headers)
    {
        Ok(httparse::Status::Complete(len)) => {
            let base = buf.as_ptr() as usize;
            for (i, h) in res.headers.iter().enumerate() {
                let n = h.name.as_ptr() as usize - base;
                let v = h.value.as_ptr() as usize - base;
                at[i] = (
                    n as u32,
                    (n + h.name.len()) as u32,
                    v as u32,
                    (v + h.value.len()) as u32,
                );
            }
            let reason = res.reason.map(|r| {
                let s = r.as_ptr() as usize - base;
                (s, s + r.len())
            });
            (
                len,
                res.code.unwrap_or(0),
                res.version.unwrap_or(1),
                reason,
                res.headers.len(),
            )
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(bad(&e)),
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|e| bad(&e))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Parsed::Informational);
    }
    let version = if version == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut map = HeaderMap::with_capacity(count);
    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    for &(ns, ne, vs, ve) in &at[..count] {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize]).map_err(|e| bad(&e))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|e| bad(&e))?;
        if name == header::CONNECTION {
            if saw_close || has_token(&value, "close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(&value, "keep-alive");
            }
        }
        map.append(name, value);
    }
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = map;
    if let Some((s, e)) = reason {
        let r = &head[s..e];
        if Some(r) != status.canonical_reason().map(str::as_bytes) {
            if let Ok(p) = hyper::ext::ReasonPhrase::try_from(head.slice(s..e)) {
                parts.extensions.insert(p);
            }
        }
    }
    let framing = framing(&parts, is_head).map_err(|e| bad(&e))?;
    // A 101 to a request that asked no upgrade: the connection is the
    // peer's now, never reused; nor is one whose body ends at its close.
    let keep_alive =
        keep_alive && status != StatusCode::SWITCHING_PROTOCOLS && framing != Framing::Close;
    Ok(Parsed::Head(Head {
        parts,
        framing,
        keep_alive,
    }))
}

/// How the response body is delimited (RFC 9112 section 6.3, as hyper's
/// `Client::decoder`).
fn framing(parts: &http::response::Parts, is_head: bool) -> Result<Framing, &'static str> {
    match parts.status.as_u16() {
        101 | 204 | 304 => return Ok(Framing::Done),
        _ if is_head => return Ok(Framing::Done),
        _ => {}
    }
    let h = &parts.headers;
    if h.contains_key(header::TRANSFER_ENCODING) {
        if parts.version == Version::HTTP_10 {
            return Err("HTTP/1.0 cannot have Transfer-Encoding header");
        }
        // chunked must be the final coding.
        let last = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.as_bytes().rsplit(|&c| c == b',').next())
            .map(<[u8]>::trim_ascii);
        return Ok(match last {
            Some(l) if l.eq_ignore_ascii_case(b"chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Close,
        });
    }
    if h.contains_key(header::CONTENT_LENGTH) {
        // Every value (comma lists included) must be the same number.
        let mut len: Option<u64> = None;
        for v in h.get_all(header::CONTENT_LENGTH) {
            let s = std::str::from_utf8(v.as_bytes()).map_err(|_| "invalid content-length")?;
            for part in s.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
                    return Err("invalid content-length");
                }
                let n: u64 = part.parse().map_err(|_| "invalid content-length")?;
                if len.is_some_and(|l| l != n) {
                    return Err("invalid content-length");
                }
                len = Some(n);
            }
        }
        return Ok(match len {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => return Err("invalid content-length"),
        });
    }
    Ok(Framing::Close)
}

/// The body of a response read inline: the connection while the body is
/// being read, and the pool it goes back to.
pub struct InlineBody(Option<(Box<Conn>, Arc<Client>)>);

impl InlineBody {
    /// The body ended: the connection goes back to the pool when both
    /// sides allow it, else it closes.
    fn finish(&mut self) {
        if let Some((c, pool)) = self.0.take() {
            if c.reusable() {
                pool.put_inline(c);
            }
        }
    }
}

impl http_body::Body for InlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = self.get_mut();
        let Some((c, _)) = &mut me.0 else {
            return Poll::Ready(None);
        };
        if let Some(e) = c.failed.take() {
            // Closes the connection.
            me.0 = None;
            return Poll::Ready(Some(Err(e)));
        }
        match ready!(c.poll_body(cx)) {
            Ok(Some(f)) => {
                if c.framing == Framing::Done {
                    me.finish();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Ok(None) => {
                me.finish();
                Poll::Ready(None)
            }
            Err(e) => {
                // Held back for one poll: the downstream codec writes out
                // what it has (the head, data) when the body is pending,
                // so the client sees the response start before the reset,
                // as when hyper's client task delivered the error later.
                c.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            None => SizeHint::with_exact(0),
            Some((c, _)) => match c.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                Framing::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8], is_head: bool) -> Result<Parsed, PoolError> {
        let mut b = BytesMut::from(bytes);
        parse_head(&mut b, is_head)
    }

    #[test]
    fn framing_follows_rfc9112() {
        let f = |b: &[u8], is_head| match head(b, is_head) {
            Ok(Parsed::Head(h)) => Ok((h.framing, h.keep_alive)),
            Ok(_) => Err("not a head".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Ok((Framing::Length(5), true))
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Ok((Framing::Done, true))
        );
        assert_eq!(
            f(b"HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok((Framing::Done, true))
        );
        assert_eq!(
            f(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                false
            ),
            Ok((Framing::Chunked(Chunk::Size), true))
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false),
            Ok((Framing::Close, false))
        );
        assert_eq!(
            f(
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                false
            ),
            Ok((Framing::Length(1), false))
        );
        assert_eq!(
            f(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            Ok((Framing::Length(1), false))
        );
        assert_eq!(
            f(
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                false
            ),
            Ok((Framing::Length(1), true))
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n", false),
            Ok((Framing::Length(2), true))
        );
        assert!(f(b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n", false).is_err());
        assert!(f(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).is_err());
        assert!(f(
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            false
        )
        .is_err());
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\n\r\n", false),
            Ok((Framing::Close, false))
        );
    }

    #[test]
    fn informational_heads_are_skipped_and_partial_waits() {
        let mut b = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncont"[..]);
        assert!(matches!(
            parse_head(&mut b, false),
            Ok(Parsed::Informational)
        ));
        assert!(matches!(parse_head(&mut b, false), Ok(Parsed::Partial)));
        b.extend_from_slice(b"ent-length: 0\r\n\r\n");
        let Ok(Parsed::Head(h)) = parse_head(&mut b, false) else {
            panic!("no head");
        };
        assert_eq!(h.parts.status, 200);
        assert!(b.is_empty());
    }

    #[test]
    fn header_names_are_lowercased_and_values_kept() {
        let Ok(Parsed::Head(h)) = head(
            b"HTTP/1.1 200 Fine\r\nX-Thing: A b\r\nx-thing: c\r\n\r\n",
            false,
        ) else {
            panic!("no head");
        };
        let v: Vec<_> = h.parts.headers.get_all("x-thing").iter().collect();
        assert_eq!(v, ["A b", "c"]);
        assert_eq!(
            h.parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes().to_vec()),
            Some(b"Fine".to_vec())
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes as a response head, chunk-size line or trailer
        /// block: a result or an error, never a panic; a head that parses
        /// is taken off the buffer whole.
        #[test]
        fn arbitrary_input_never_panics(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            prefix in 0usize..3,
        ) {
            let heads: [&[u8]; 3] = [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"];
            let mut input = heads[prefix].to_vec();
            input.extend_from_slice(&raw);
            let mut b = BytesMut::from(&input[..]);
            let before = b.len();
            match parse_head(&mut b, false) {
                Ok(Parsed::Partial) => proptest::prop_assert_eq!(b.len(), before),
                Ok(_) => proptest::prop_assert!(b.len() < before),
                Err(_) => {}
            }
            let _ = chunk_size(&raw);
            let _ = parse_trailers(&raw);
        }
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1f").ok(), Some(31));
        assert_eq!(chunk_size(b"A ; ext=1").ok(), Some(10));
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"zz").is_err());
        assert!(chunk_size(b"1 2").is_err());
        assert!(chunk_size(b"ffffffffffffffffff").is_err());
    }

    #[test]
    fn request_heads_are_hyper_s() {
        let req = Request::builder()
            .method("POST")
            .uri("/a?b=c")
            .header("host", "h")
            .header("transfer-encoding", "chunked")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let mut dst = Vec::new();
        assert!(!encode_head(&mut dst, &parts, 0));
        assert_eq!(dst, b"POST /a?b=c HTTP/1.1\r\nhost: h\r\n\r\n");
        let req = Request::builder()
            .uri("/")
            .header("connection", "keep-alive, Close")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        assert!(encode_head(&mut dst, &parts, 3));
        assert_eq!(
            dst,
            b"GET / HTTP/1.1\r\nconnection: keep-alive, Close\r\ncontent-length: 3\r\n\r\n"
        );
    }
}
