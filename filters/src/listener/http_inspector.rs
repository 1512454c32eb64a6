//! `envoy.filters.listener.http_inspector`: is a plaintext connection HTTP,
//! and which version?
//!
//! As Envoy (`http_inspector.cc`):
//! - A buffer that starts with the HTTP/2 prior-knowledge preface
//!   `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` is HTTP/2 (ALPN `h2c`); a buffer that
//!   is still a prefix of the preface needs more bytes.
//! - Otherwise only the request line counts: once its `\n` has arrived, a
//!   valid `METHOD SP request-target [SP HTTP/d.d]` line is HTTP/1.1 when the
//!   version is `HTTP/1.1`, and HTTP/1.0 for any other valid version or none
//!   (HTTP/0.9), as Envoy ("set other HTTP protocols to HTTP/1.0"). A line
//!   that starts with CR or LF, or that the parser rejects, is not HTTP.
//! - Validity follows Envoy's Balsa parser with custom methods allowed:
//!   the method is any RFC 9110 token, the target passes Envoy's
//!   http-parser-compatible URL check (origin form, `*`, absolute form with
//!   a scheme, or authority form for CONNECT) and the version, when present,
//!   is `HTTP/` digit `.` digit. Tokens are separated by runs of SP or HTAB;
//!   SP, HTAB and CR may trail the version before the LF.
//! - Envoy peeks at most [`MAX_INSPECT_SIZE`] bytes; when no request line
//!   ended by then it closes the connection (`http_inspector.read_error`).
//!   That case is [`HttpDetect::RequestLineTooLong`] here.
//!
//! As in Envoy, the caller runs this only on plaintext connections: Envoy's
//! filter passes when an earlier listener filter (the TLS inspector) set a
//! transport protocol other than `raw_buffer`.
//!
//! One deliberate difference: the request line is checked byte by byte, so
//! a prefix that no valid request line can start with is reported
//! [`HttpDetect::NotHttp`] at once instead of after its `\n` (Envoy feeds
//! whole lines to the parser). The verdict is the same, only earlier, which
//! keeps server-first protocols and binary data from waiting for a newline.
use super::Inspect;

/// Envoy's `Config::MAX_INSPECT_SIZE`: the request line must end (with
/// `\n`) within this many bytes.
pub const MAX_INSPECT_SIZE: usize = 64 * 1024;

/// The HTTP/2 connection preface a prior-knowledge (h2c) client sends first.
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the connection looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpDetect {
    /// A valid request line with a version other than `HTTP/1.1`, or none.
    /// Envoy counts `http_inspector.http10_found`.
    Http10,
    /// A valid `HTTP/1.1` request line (`http_inspector.http11_found`).
    Http11,
    /// The HTTP/2 prior-knowledge preface (`http_inspector.http2_found`).
    Http2,
    /// Not HTTP (`http_inspector.http_not_found`); the listener goes on
    /// without setting application protocols.
    NotHttp,
    /// [`MAX_INSPECT_SIZE`] bytes arrived without the request line ending.
    /// Envoy closes the connection and counts `http_inspector.read_error`.
    RequestLineTooLong,
}

// === impl HttpDetect ===

impl HttpDetect {
    /// The application protocol Envoy sets for filter-chain matching
    /// (`FilterChainMatch.application_protocols`), if any.
    pub fn alpn(&self) -> Option<&'static str> {
        match self {
            HttpDetect::Http10 => Some("http/1.0"),
            HttpDetect::Http11 => Some("http/1.1"),
            HttpDetect::Http2 => Some("h2c"),
            HttpDetect::NotHttp | HttpDetect::RequestLineTooLong => None,
        }
    }
}

/// Inspects the bytes peeked so far from a plaintext connection.
pub fn inspect(buf: &[u8]) -> Inspect<HttpDetect> {
    let n = buf.len().min(HTTP2_PREFACE.len());
    if buf.get(..n) == HTTP2_PREFACE.get(..n) {
        return if buf.len() >= HTTP2_PREFACE.len() {
            Inspect::Done(HttpDetect::Http2)
        } else {
            Inspect::NeedMore
        };
    }

    let window = buf.get(..MAX_INSPECT_SIZE).unwrap_or(buf);
    let mut line = RequestLine::default();
    for (i, &b) in window.iter().enumerate() {
        match line.step(window, i, b) {
            Step::Continue => {}
            Step::Reject => return Inspect::Done(HttpDetect::NotHttp),
            Step::Complete(d) => return Inspect::Done(d),
        }
    }
    if buf.len() >= MAX_INSPECT_SIZE {
        Inspect::Done(HttpDetect::RequestLineTooLong)
    } else {
        Inspect::NeedMore
    }
}

/// A request-line recognizer, one byte at a time. Every state it can be in
/// after a `Continue` still has a valid completion, so a `Reject` is final
/// and a `NeedMore` is honest.
#[derive(Debug, Default)]
struct RequestLine {
    state: State,
    /// The method is `CONNECT`: its target is in authority form.
    connect: bool,
    /// The version token is exactly `HTTP/1.1`.
    http11: bool,
}

#[derive(Debug, Default, Clone, Copy)]
enum State {
    #[default]
    Start,
    Method,
    /// Whitespace after the method.
    AfterMethod,
    Target(Url),
    /// Whitespace after the target.
    AfterTarget,
    /// This many bytes of `HTTP/d.d` seen (1..=8).
    Version(u8),
    /// SP, HTAB or CR after a complete line, before the LF.
    Trailing,
}

/// Where in the request target we are; see Envoy's `isUrlValid`.
#[derive(Debug, Clone, Copy)]
enum Url {
    /// In the path/query (origin form, `*`, or after an absolute URL's host).
    Path,
    /// In the scheme of an absolute URL.
    Scheme,
    /// After `scheme:`.
    Colon,
    /// After `scheme:/`.
    Slash,
    /// In the host; the flag is set right after an `@` (`@@` is invalid).
    Host { after_at: bool },
}

enum Step {
    Continue,
    Reject,
    Complete(HttpDetect),
}

// === impl RequestLine ===

impl RequestLine {
    /// Feeds `b`, the byte at `pos` of `buf`.
    fn step(&mut self, buf: &[u8], pos: usize, b: u8) -> Step {
        let ws = b == b' ' || b == b'\t';
        let next = match self.state {
            State::Start if is_tchar(b) => State::Method,
            State::Method if is_tchar(b) => State::Method,
            State::Method if ws => {
                self.connect = buf.get(..pos) == Some(b"CONNECT".as_slice());
                State::AfterMethod
            }
            State::AfterMethod if ws => State::AfterMethod,
            State::AfterMethod => match url_start(b, self.connect) {
                Some(u) => State::Target(u),
                None => return Step::Reject,
            },
            State::Target(u) => {
                if ws || b == b'\r' || b == b'\n' {
                    if !url_complete(u) {
                        return Step::Reject;
                    }
                    match b {
                        // HTTP/0.9: no version.
                        b'\n' => return Step::Complete(HttpDetect::Http10),
                        b'\r' => State::Trailing,
                        _ => State::AfterTarget,
                    }
                } else {
                    match url_step(u, b) {
                        Some(u) => State::Target(u),
                        None => return Step::Reject,
                    }
                }
            }
            State::AfterTarget if ws => State::AfterTarget,
            State::AfterTarget if b == b'\r' => State::Trailing,
            State::AfterTarget if b == b'\n' => return Step::Complete(HttpDetect::Http10),
            State::AfterTarget if b == b'H' => State::Version(1),
            State::Version(8) if ws || b == b'\r' => State::Trailing,
            State::Version(8) if b == b'\n' => return Step::Complete(self.version()),
            State::Version(n) if n < 8 && version_byte_ok(n, b) => {
                if n == 7 {
                    self.http11 = pos.checked_sub(7).and_then(|start| buf.get(start..=pos))
                        == Some(b"HTTP/1.1".as_slice());
                }
                State::Version(n + 1)
            }
            State::Trailing if ws || b == b'\r' => State::Trailing,
            State::Trailing if b == b'\n' => return Step::Complete(self.version()),
            _ => return Step::Reject,
        };
        self.state = next;
        Step::Continue
    }

    fn version(&self) -> HttpDetect {
        if self.http11 {
            HttpDetect::Http11
        } else {
            HttpDetect::Http10
        }
    }
}

/// Whether `b` may be byte `n` (0-based) of `HTTP/d.d`.
fn version_byte_ok(n: u8, b: u8) -> bool {
    match n {
        0..=4 => b"HTTP/".get(usize::from(n)) == Some(&b),
        5 | 7 => b.is_ascii_digit(),
        6 => b == b'.',
        _ => false,
    }
}

/// RFC 9110 `tchar`, the characters of a method (Balsa `kValidCharacters`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Characters http-parser allows in a path and query.
fn is_path_char(b: u8) -> bool {
    (b'!'..=b'~').contains(&b)
}

fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!$%&'()*+,-.:;=@[]_~".contains(&b)
}

fn url_start(b: u8, connect: bool) -> Option<Url> {
    match b {
        b'/' | b'*' => Some(Url::Path),
        // Authority form: host[:port], then optionally a path or query.
        b'?' if connect => Some(Url::Path),
        _ if connect && is_host_char(b) => Some(Url::Host {
            after_at: b == b'@',
        }),
        _ if !connect && b.is_ascii_alphabetic() => Some(Url::Scheme),
        _ => None,
    }
}

fn url_step(u: Url, b: u8) -> Option<Url> {
    match u {
        Url::Path if is_path_char(b) => Some(Url::Path),
        Url::Scheme if b.is_ascii_alphanumeric() || b"+-.".contains(&b) => Some(Url::Scheme),
        Url::Scheme if b == b':' => Some(Url::Colon),
        Url::Colon if b == b'/' => Some(Url::Slash),
        Url::Slash if b == b'/' => Some(Url::Host { after_at: false }),
        Url::Host { .. } if b == b'/' || b == b'?' => Some(Url::Path),
        Url::Host { after_at } if b == b'@' => (!after_at).then_some(Url::Host { after_at: true }),
        Url::Host { .. } if is_host_char(b) => Some(Url::Host { after_at: false }),
        _ => None,
    }
}

/// Whether a target may end in this state (`http://` with an empty host is
/// valid for http-parser; `http:/` is not).
fn url_complete(u: Url) -> bool {
    matches!(u, Url::Path | Url::Host { .. })
}

#[cfg(test)]
mod tests;
