//! Downstream wire sizes of a request and its response, for Istio's
//! `istio_request_bytes` / `istio_response_bytes` (istio/proxy's
//! `istio_stats.cc` records Envoy's downstream bytes meter,
//! `wireBytesReceived` / `wireBytesSent`: headers, framing and body).
//!
//! weir serves with hyper, which does not meter bytes per stream, so the
//! sizes are computed from what was parsed and what hyper writes, without
//! allocating:
//! - HTTP/1 request: the request line, one `name: value\r\n` line per
//!   header, the blank line, and the body bytes (exact for the usual
//!   `name: value` form; the chunk framing of a chunked request body is not
//!   seen and not counted).
//! - HTTP/1 response: exactly what hyper's server encoder writes (status
//!   line, headers, the `content-length` / `transfer-encoding` / `date` /
//!   `connection` lines it adds, chunk framing and the last chunk).
//! - HTTP/2: header fields (name + value, pseudo-headers included, before
//!   HPACK) and body bytes; Envoy counts the frames (HPACK-compressed
//!   header blocks, 9-byte frame headers), which hyper does not expose.
use http::{header, HeaderMap, Method, StatusCode, Version};

/// What the response's size needs to know of its request (computed when
/// the request arrives, before its headers are changed).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestWire {
    /// Header bytes (see the module doc).
    pub head: u64,
    /// HTTP/1.1 `connection: close`: hyper adds `connection: close` to the
    /// response.
    pub close: bool,
    /// HTTP/1.0 `connection: keep-alive`: hyper adds
    /// `connection: keep-alive` to the response.
    pub keep_alive: bool,
}

/// One pass over a header map: the sum of name and value lengths, the
/// number of fields, and the framing headers hyper's encoder looks at
/// (found by name comparison during the pass: no extra map lookups).
#[derive(Default)]
struct Scan<'a> {
    bytes: u64,
    n: u64,
    connection: bool,
    content_length: bool,
    date: bool,
    /// The last `transfer-encoding` value.
    te_last: Option<&'a http::HeaderValue>,
}

fn scan(h: &HeaderMap) -> Scan<'_> {
    let mut s = Scan {
        n: h.len() as u64,
        ..Scan::default()
    };
    for (name, v) in h {
        s.bytes += (name.as_str().len() + v.len()) as u64;
        if name == header::CONNECTION {
            s.connection = true;
        } else if name == header::CONTENT_LENGTH {
            s.content_length = true;
        } else if name == header::DATE {
            s.date = true;
        } else if name == header::TRANSFER_ENCODING {
            s.te_last = Some(v);
        }
    }
    s
}

fn has_token(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The request as received (call before anything changes its headers).
pub fn request(parts: &http::request::Parts) -> RequestWire {
    let scan = scan(&parts.headers);
    let (field_bytes, n) = (scan.bytes, scan.n);
    let method = parts.method.as_str().len() as u64;
    let pq = parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) as u64;
    let authority = parts.uri.authority().map_or(0, |a| a.as_str().len()) as u64;
    if parts.version == Version::HTTP_2 {
        let scheme = parts.uri.scheme_str().map_or(0, |s| 7 + s.len() as u64);
        let authority = if authority > 0 { 10 + authority } else { 0 };
        let path = if pq > 0 { 5 + pq } else { 0 };
        return RequestWire {
            head: field_bytes + 7 + method + scheme + authority + path,
            ..RequestWire::default()
        };
    }
    let target = match parts.uri.scheme_str() {
        Some(s) => s.len() as u64 + 3 + authority + pq,
        None if pq == 0 => authority,
        None => pq,
    };
    // `METHOD SP target SP HTTP/1.x CRLF`, `name: value CRLF`s, `CRLF`.
    let head = method + 1 + target + 1 + 8 + 2 + field_bytes + 4 * n + 2;
    let http10 = parts.version == Version::HTTP_10;
    RequestWire {
        head,
        close: !http10 && scan.connection && has_token(&parts.headers, "close"),
        keep_alive: http10 && scan.connection && has_token(&parts.headers, "keep-alive"),
    }
}

/// How hyper frames a response it has not yet written.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseWire {
    /// Status line and header block.
    pub head: u64,
    /// The body is sent chunked (each data frame adds its framing, the last
    /// chunk 5 bytes).
    pub chunked: bool,
    /// The body is sent at all (not for HEAD, 204, 304, 1xx, CONNECT 2xx).
    pub body: bool,
}

impl ResponseWire {
    /// Wire bytes of the whole response, given the body's data bytes and
    /// the chunk framing of its data frames ([`chunk_framing`]).
    pub fn total(&self, body_bytes: u64, framing: u64) -> u64 {
        match (self.body, self.chunked) {
            (false, _) => self.head,
            (true, false) => self.head + body_bytes,
            (true, true) => self.head + body_bytes + framing + 5,
        }
    }
}

/// The chunk framing of one data frame of `len` bytes: `hex CRLF` before,
/// `CRLF` after (hyper writes each frame as one chunk).
pub fn chunk_framing(len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    let hex_digits = (usize::BITS - len.leading_zeros()).div_ceil(4) as u64;
    hex_digits + 4
}

/// The framing of a response to a `method` request on a downstream
/// connection speaking `version` (`body_len`: the body's exact size when
/// known, `Some(0)` for an empty body), as hyper 1.x's server encoder
/// writes it (`role.rs` `Server::encode`, `conn.rs` `enforce_version`).
pub fn response(
    version: Version,
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    body_len: Option<u64>,
    request: RequestWire,
) -> ResponseWire {
    let scan = scan(headers);
    let (field_bytes, n) = (scan.bytes, scan.n);
    if version == Version::HTTP_2 {
        return ResponseWire {
            head: 7 + 3 + field_bytes,
            chunked: false,
            body: *method != Method::HEAD,
        };
    }
    let http10 = version == Version::HTTP_10;
    let connect_ok = *method == Method::CONNECT && status.is_success();
    let no_content = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_chunk =
        !(*method == Method::HEAD || connect_ok || status.is_informational() || no_content);
    let can_length = !(status.is_informational() || connect_ok || no_content);
    let mut head = if !http10 && status == StatusCode::OK {
        17 // HTTP/1.1 200 OK\r\n
    } else {
        9 + 3 + 1 + status.canonical_reason().unwrap_or("<none>").len() as u64 + 2
    };
    head += field_bytes + 4 * n;
    // hyper's `enforce_version`.
    let has = |token| scan.connection && has_token(headers, token);
    if http10 && request.keep_alive && !has("keep-alive") {
        head += 24; // connection: keep-alive\r\n
    } else if !http10 && request.close && !has("close") {
        head += 19; // connection: close\r\n
    }
    let mut chunked = false;
    if let Some(te) = scan.te_last {
        chunked = te.as_bytes().eq_ignore_ascii_case(b"chunked") && can_chunk;
    } else if !scan.content_length && !connect_ok {
        match body_len {
            None if http10 || !can_chunk => {}
            None => {
                head += 28; // transfer-encoding: chunked\r\n
                chunked = true;
            }
            Some(0) => {
                if can_length && *method != Method::HEAD {
                    head += 19; // content-length: 0\r\n
                }
            }
            Some(len) => {
                if can_length {
                    head += 16 + decimal_digits(len) + 2;
                }
            }
        }
    }
    // `date: <29 bytes>\r\n` unless present, then the blank line.
    if !scan.date {
        head += 37;
    }
    head += 2;
    ResponseWire {
        head,
        chunked,
        body: can_chunk,
    }
}

fn decimal_digits(mut n: u64) -> u64 {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw_target: &str, version: Version, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method("GET")
            .uri(raw_target)
            .version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn http1_request_line_and_headers() {
        // "GET /ab?x=1 HTTP/1.1\r\nhost: h\r\nx-a: bc\r\n\r\n"
        let p = req("/ab?x=1", Version::HTTP_11, &[("host", "h"), ("x-a", "bc")]);
        let w = request(&p);
        assert_eq!(w.head, 22 + 9 + 9 + 2);
        assert!(!w.close);
        let p = req("/", Version::HTTP_11, &[("connection", "Close")]);
        assert!(request(&p).close);
        let p = req("/", Version::HTTP_10, &[("connection", "keep-alive")]);
        assert!(request(&p).keep_alive);
    }

    #[test]
    fn http1_response_framing() {
        let m = Method::GET;
        let mut h = HeaderMap::new();
        h.insert("content-length", "5".parse().expect("value"));
        let w = response(
            Version::HTTP_11,
            &m,
            StatusCode::OK,
            &h,
            Some(5),
            RequestWire::default(),
        );
        // status line 17, content-length 19, date 37, blank 2.
        assert_eq!(w.total(5, 0), 17 + 19 + 37 + 2 + 5);
        let w = response(
            Version::HTTP_11,
            &m,
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            None,
            RequestWire {
                close: true,
                ..Default::default()
            },
        );
        // "HTTP/1.1 404 Not Found\r\n", connection: close, chunked, date.
        assert!(w.chunked);
        assert_eq!(w.head, 24 + 19 + 28 + 37 + 2);
        assert_eq!(w.total(16, chunk_framing(16)), w.head + 16 + 6 + 5);
        let w = response(
            Version::HTTP_11,
            &Method::HEAD,
            StatusCode::OK,
            &HeaderMap::new(),
            Some(0),
            RequestWire::default(),
        );
        assert_eq!(w.total(0, 0), 17 + 37 + 2);
    }

    #[test]
    fn chunk_framing_is_hex_length_and_two_crlfs() {
        assert_eq!(chunk_framing(0), 0);
        assert_eq!(chunk_framing(15), 5);
        assert_eq!(chunk_framing(16), 6);
        assert_eq!(chunk_framing(700), 7);
    }
}
