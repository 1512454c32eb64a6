//! Test clients that record exactly what came back.
//!
//! HTTP/1.1 goes over a raw socket so tests control every byte (header
//! order and case, missing `Host`, malformed framing) and see the response
//! as sent. HTTP/2 uses the `h2` crate with prior knowledge (h2c).
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a request produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete response.
    Response(Reply),
    /// The connection closed (or the stream was reset) before a complete
    /// response arrived. `partial` holds what was received, if anything.
    Closed { partial: String },
    /// Nothing conclusive within the read timeout.
    Timeout { partial: String },
    /// The peer answered with HTTP/2 frames (it took the bytes for an
    /// HTTP/2 connection preface).
    Http2Frames,
    /// The client itself failed (connect error, unparseable answer, ...).
    Error(String),
}

/// A complete response. Header names are lower-cased; order is as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    /// All values of header `name`, in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` (raw HTTP/1.x bytes) on a fresh connection and reads one
/// response. The connection is closed afterwards.
pub async fn http1_raw(addr: SocketAddr, request: &[u8], read_timeout: Duration) -> Outcome {
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Error(format!("connect {addr}: {e}")),
    };
    let _ = stream.set_nodelay(true);
    // A proxy may answer and close before reading everything (e.g. on an
    // oversized header); a write error is then not the interesting part.
    let write_err = stream.write_all(request).await.err();
    let head = request.starts_with(b"HEAD ");
    let mut buf: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + read_timeout;
    loop {
        if let Some(done) = parse_http1_response(&buf, head, false) {
            return done;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => {
                return Outcome::Timeout {
                    partial: lossy(&buf),
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return parse_http1_response(&buf, head, true).unwrap_or_else(|| {
                    let mut partial = lossy(&buf);
                    if partial.is_empty() {
                        if let Some(e) = &write_err {
                            partial = format!("(write failed: {})", e.kind());
                        }
                    }
                    Outcome::Closed { partial }
                })
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn lossy(b: &[u8]) -> String {
    const MAX: usize = 400;
    let s = String::from_utf8_lossy(&b[..b.len().min(MAX)]).into_owned();
    if b.len() > MAX {
        format!("{s}...")
    } else {
        s
    }
}

/// Parses one HTTP/1.x response from `buf`. `None` while incomplete (unless
/// `eof`, in which case a close-delimited body ends at `eof`). `head`: the
/// request was `HEAD`, so the response has no body whatever its headers say.
fn parse_http1_response(buf: &[u8], head: bool, eof: bool) -> Option<Outcome> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return eof.then(|| Outcome::Closed {
                partial: lossy(buf),
            });
        }
        Err(_) if looks_like_http2(buf) => return Some(Outcome::Http2Frames),
        Err(e) => {
            return Some(Outcome::Error(format!(
                "unparseable response ({e}): {}",
                lossy(buf)
            )))
        }
    };
    let status = resp.code.unwrap_or(0);
    let hdrs: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &buf[head_len..];
    let find = |n: &str| {
        hdrs.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.trim().to_ascii_lowercase())
    };
    let reply = |body: &[u8]| {
        Some(Outcome::Response(Reply {
            status,
            headers: hdrs.clone(),
            body: Bytes::copy_from_slice(body),
        }))
    };
    if head || (100..200).contains(&status) || status == 204 || status == 304 {
        return reply(b"");
    }
    if find("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        return match dechunk(rest) {
            Some(body) => reply(&body),
            None if eof => Some(Outcome::Closed {
                partial: lossy(buf),
            }),
            None => None,
        };
    }
    if let Some(cl) = find("content-length") {
        let Ok(len) = cl.parse::<usize>() else {
            return Some(Outcome::Error(format!("bad content-length {cl:?}")));
        };
        if rest.len() >= len {
            return reply(&rest[..len]);
        }
        return eof.then(|| Outcome::Closed {
            partial: lossy(buf),
        });
    }
    // Close-delimited body.
    if eof {
        reply(rest)
    } else {
        None
    }
}

/// An HTTP/2 frame header for a SETTINGS frame on stream 0: what a server
/// sends first after an HTTP/2 connection preface.
fn looks_like_http2(buf: &[u8]) -> bool {
    buf.len() >= 9 && buf[3] == 0x4 && buf[5..9] == [0, 0, 0, 0]
}

/// Decodes a complete chunked body; `None` if incomplete or malformed.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..line_end]).ok()?;
        let size_str = size_str.split(';').next()?.trim();
        let size = usize::from_str_radix(size_str, 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            let mut rest = b;
            loop {
                let end = rest.windows(2).position(|w| w == b"\r\n")?;
                if end == 0 {
                    return Some(out);
                }
                rest = &rest[end + 2..];
            }
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// One HTTP/2 request for [`h2c`].
#[derive(Debug, Clone)]
pub struct H2Request {
    pub method: String,
    /// `:scheme`
    pub scheme: String,
    /// `:authority`
    pub authority: String,
    /// `:path`
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Sends one request over a fresh h2c (prior knowledge) connection.
pub async fn h2c(addr: SocketAddr, req: &H2Request, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, h2c_inner(addr, req)).await {
        Err(_) => Outcome::Timeout {
            partial: String::new(),
        },
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome::Error(format!("{e:#}")),
    }
}

async fn h2c_inner(addr: SocketAddr, req: &H2Request) -> anyhow::Result<Outcome> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = h2::client::handshake(stream)
        .await
        .context("h2 handshake")?;
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let mut send = send.ready().await.context("h2 ready")?;
        let uri = format!("{}://{}{}", req.scheme, req.authority, req.path);
        let mut builder = http::Request::builder()
            .method(req.method.as_str())
            .uri(uri.as_str());
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = builder
            .body(())
            .map_err(|e| anyhow!("build request {uri}: {e}"))?;
        let end = req.body.is_empty();
        let (resp, mut body_tx) = match send.send_request(request, end) {
            Ok(x) => x,
            Err(e) => return Ok(stream_closed(e)),
        };
        if !end {
            if let Err(e) = body_tx.send_data(req.body.clone(), true) {
                return Ok(stream_closed(e));
            }
        }
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) => return Ok(stream_closed(e)),
        };
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(c) => {
                    let _ = body.flow_control().release_capacity(c.len());
                    data.extend_from_slice(&c);
                }
                Err(e) => return Ok(stream_closed(e)),
            }
        }
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok(Outcome::Response(Reply {
            status: parts.status.as_u16(),
            headers,
            body: Bytes::from(data),
        }))
    }
    .await;
    conn_task.abort();
    result
}

fn stream_closed(e: h2::Error) -> Outcome {
    let partial = match e.reason() {
        Some(r) => format!("h2 reset: {r:?}"),
        None if e.is_io() => "h2 connection closed".to_owned(),
        None => format!("h2 error: {e}"),
    };
    Outcome::Closed { partial }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r = parse_http1_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
            false,
            false,
        );
        assert!(
            matches!(r, Some(Outcome::Response(Reply { status: 200, ref body, .. })) if &body[..] == b"hi")
        );
        let r = parse_http1_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            false,
            false,
        );
        assert!(matches!(r, Some(Outcome::Response(Reply { ref body, .. })) if &body[..] == b"hi"));
        assert_eq!(
            parse_http1_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi",
                false,
                false
            ),
            None
        );
        assert!(matches!(
            parse_http1_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi",
                false,
                true
            ),
            Some(Outcome::Closed { .. })
        ));
    }
}
