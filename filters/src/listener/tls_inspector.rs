//! `envoy.filters.listener.tls_inspector`: does the connection start with a
//! TLS ClientHello, and if so, which SNI and ALPN does it offer?
//!
//! Envoy runs BoringSSL's handshake on the peeked bytes and stops it in the
//! SNI callback. This module parses the same bytes directly and reproduces
//! the decisions that matter for filter-chain selection:
//!
//! - **Record layer.** The first record must be a handshake record (type 22)
//!   with major version 3, else [`TlsDetect::NotTls`] right away (plain text,
//!   an SSLv2-style hello, HTTP). The ClientHello is reassembled from
//!   consecutive handshake records: it may span several TCP segments and
//!   several records, and [`Inspect::NeedMore`] is returned until all of it
//!   has arrived. As BoringSSL: a record payload over 2^14 bytes, more than
//!   32 consecutive empty records, or a non-handshake record in the middle
//!   of the message is an error.
//! - **ClientHello.** As BoringSSL's `ssl_client_hello_init`: session id of
//!   at most 32 bytes, an even, non-empty cipher-suite list, at least one
//!   compression method, well-formed extensions without duplicates and no
//!   trailing bytes; a message body over 16 KiB (BoringSSL's
//!   `kMaxMessageLen` for a server that does not ask for certificates) is an
//!   error. As its `extract_sni`: the `server_name` extension must hold
//!   exactly one non-empty `host_name` of at most 255 bytes without NUL. As
//!   its version negotiation: the hello must offer one of TLS 1.0-1.3 (Envoy
//!   sets that range) and the null compression method (only that one for
//!   TLS 1.3). BoringSSL's parsers for other extensions (key_share,
//!   supported_groups, ...) are not reproduced: such a hello is reported as
//!   TLS here and its handshake fails later in the real TLS stack.
//! - **ALPN.** Parsed as Envoy's `onALPN`: a malformed ALPN extension is
//!   ignored (no protocols), not an error.
//! - **SNI** is returned as sent, without lowercasing: BoringSSL does not
//!   normalise it either, and Envoy's filter-chain matcher compares server
//!   names case-insensitively (envoyproxy/envoy#14793), so the matcher, not
//!   this parser, folds case. A name that is not UTF-8 is converted lossily.
//!
//! Outcomes and how a caller maps them to Envoy's behaviour:
//!
//! | outcome | Envoy |
//! |---|---|
//! | [`TlsDetect::Tls`] | `tls_found`; transport protocol `tls`, SNI and ALPN set |
//! | [`TlsDetect::NotTls`] | `tls_not_found`; continue as plain text |
//! | [`TlsDetect::Malformed`] | `tls_not_found` too (BoringSSL fails before the SNI callback); with `close_connection_on_client_hello_parsing_errors` the connection is closed instead |
//! | [`TlsDetect::TooLarge`] | `client_hello_too_large`; close the connection |
//!
//! `Malformed` is kept apart from `NotTls` (rather than folded into a TLS
//! result with no SNI, which would route a broken hello to a TLS chain that
//! Envoy would not pick) so callers can log or count it.
//!
//! Only the first [`MAX_CLIENT_HELLO`] bytes are looked at; a hello whose
//! records do not fit is [`TlsDetect::TooLarge`]. Nothing here allocates
//! more than the returned names and, for a hello split over several records,
//! one copy of the (at most 16 KiB) message.
use std::borrow::Cow;
use std::fmt;

use super::Inspect;

/// Envoy's `TLS_MAX_CLIENT_HELLO` (the default and maximum of
/// `max_client_hello_size`): peeked bytes after which a still incomplete
/// ClientHello is given up on.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// The largest ClientHello message body BoringSSL accepts on a server that
/// does not request client certificates (`kMaxMessageLen`).
pub const MAX_CLIENT_HELLO_MESSAGE: usize = 16 * 1024;

/// TLS record payloads are at most 2^14 bytes (RFC 8446, 5.1).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// BoringSSL's `kMaxEmptyRecords`.
const MAX_EMPTY_RECORDS: usize = 32;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_STATUS_REQUEST: u16 = 5;
const TLS1_0: u16 = 0x0301;
const TLS1_3: u16 = 0x0304;

/// What a ClientHello offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `server_name` extension's host name, as sent (not lowercased).
    pub sni: Option<String>,
    /// The ALPN protocol names in the client's order; empty when the
    /// extension is absent or malformed.
    pub alpn: Vec<Vec<u8>>,
    /// Bytes from the start of the buffer to the end of the ClientHello
    /// (Envoy's `tls_inspector.bytes_processed`).
    pub bytes_processed: usize,
    /// The client asks for the certificate status (`status_request`, OCSP
    /// stapling).
    pub status_request: bool,
}

/// The verdict on a peeked buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsDetect {
    /// The first record is not a TLS handshake record.
    NotTls,
    /// A ClientHello.
    Tls(ClientHelloInfo),
    /// TLS records, but the ClientHello is not acceptable.
    Malformed(Malformed),
    /// The ClientHello did not fit in [`MAX_CLIENT_HELLO`] bytes.
    TooLarge,
}

/// Why a TLS-looking buffer is not an acceptable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A record payload over 2^14 bytes.
    RecordOverflow,
    /// More than 32 consecutive empty records.
    TooManyEmptyRecords,
    /// A record that is not a TLS handshake record before the ClientHello
    /// was complete.
    UnexpectedRecord,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// The ClientHello message is over [`MAX_CLIENT_HELLO_MESSAGE`] bytes.
    MessageTooLarge,
    /// A length, the session id, cipher suites, compression methods or the
    /// extension block does not parse.
    Syntax,
    /// The same extension type appears twice.
    DuplicateExtension,
    /// The `server_name` extension is not a single valid host name.
    ServerName,
    /// No version in TLS 1.0-1.3 offered, or `supported_versions` malformed.
    UnsupportedVersion,
    /// No null compression method (or other methods with TLS 1.3).
    Compression,
}

// === impl Malformed ===

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::RecordOverflow => "tls record longer than 16384 bytes",
            Malformed::TooManyEmptyRecords => "too many empty tls records",
            Malformed::UnexpectedRecord => "unexpected record in the middle of a client hello",
            Malformed::NotClientHello => "first handshake message is not a client hello",
            Malformed::MessageTooLarge => "client hello longer than 16384 bytes",
            Malformed::Syntax => "client hello does not parse",
            Malformed::DuplicateExtension => "duplicate client hello extension",
            Malformed::ServerName => "invalid server_name extension",
            Malformed::UnsupportedVersion => "client hello offers no tls version 1.0-1.3",
            Malformed::Compression => "client hello offers no usable compression method",
        })
    }
}

impl std::error::Error for Malformed {}

/// Inspects the bytes peeked so far (all of them, from the first byte).
pub fn inspect(buf: &[u8]) -> Inspect<TlsDetect> {
    let window = buf.get(..MAX_CLIENT_HELLO).unwrap_or(buf);
    match reassemble(window) {
        Reassembly::NeedMore if buf.len() >= MAX_CLIENT_HELLO => Inspect::Done(TlsDetect::TooLarge),
        Reassembly::NeedMore => Inspect::NeedMore,
        Reassembly::NotTls => Inspect::Done(TlsDetect::NotTls),
        Reassembly::Malformed(m) => Inspect::Done(TlsDetect::Malformed(m)),
        Reassembly::Complete {
            message,
            bytes_processed,
        } => Inspect::Done(match parse_client_hello(&message) {
            Ok((sni, alpn, status_request)) => TlsDetect::Tls(ClientHelloInfo {
                sni,
                alpn,
                bytes_processed,
                status_request,
            }),
            Err(m) => TlsDetect::Malformed(m),
        }),
    }
}

// === record layer ===

enum Reassembly<'a> {
    NeedMore,
    NotTls,
    Malformed(Malformed),
    /// The ClientHello body (without its 4-byte handshake header).
    Complete {
        message: Cow<'a, [u8]>,
        bytes_processed: usize,
    },
}

/// A record header at `pos`: (type, major version, payload length).
fn record_header(buf: &[u8], pos: usize) -> Option<(u8, u8, usize)> {
    let h = buf.get(pos..pos.checked_add(5)?)?;
    Some((h[0], h[1], usize::from(u16::from_be_bytes([h[3], h[4]]))))
}

/// Walks the handshake records until the first handshake message is
/// complete. Uses the bytes of a partly arrived record too, so a verdict
/// depends only on bytes present and never changes as more arrive.
fn reassemble(buf: &[u8]) -> Reassembly<'_> {
    // A single byte or two can already rule TLS out.
    match buf {
        [] => return Reassembly::NeedMore,
        [t, ..] if *t != RECORD_HANDSHAKE => return Reassembly::NotTls,
        [_, major, ..] if *major != 3 => return Reassembly::NotTls,
        _ => {}
    }

    let mut pos = 0;
    let mut header = [0u8; 4];
    let mut header_len = 0;
    // Handshake bytes needed (4 + body length), once the header is known.
    let mut need: Option<usize> = None;
    let mut got = 0;
    let mut empty = 0;
    loop {
        let Some((typ, major, len)) = record_header(buf, pos) else {
            return Reassembly::NeedMore;
        };
        if typ != RECORD_HANDSHAKE || major != 3 {
            // Only reachable for records after the first (checked above).
            return Reassembly::Malformed(Malformed::UnexpectedRecord);
        }
        if len > MAX_RECORD_PAYLOAD {
            return Reassembly::Malformed(Malformed::RecordOverflow);
        }
        let start = pos + 5;
        let end = start + len;
        if len == 0 {
            empty += 1;
            if empty > MAX_EMPTY_RECORDS {
                return Reassembly::Malformed(Malformed::TooManyEmptyRecords);
            }
            pos = end;
            continue;
        }
        empty = 0;

        let avail = buf.get(start..end.min(buf.len())).unwrap_or_default();
        for &b in avail.iter().take(4 - header_len) {
            header[header_len] = b;
            header_len += 1;
        }
        if header_len == 4 && need.is_none() {
            if header[0] != HANDSHAKE_CLIENT_HELLO {
                return Reassembly::Malformed(Malformed::NotClientHello);
            }
            let body =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if body > MAX_CLIENT_HELLO_MESSAGE {
                return Reassembly::Malformed(Malformed::MessageTooLarge);
            }
            need = Some(4 + body);
        }
        got += avail.len();
        if let Some(need) = need {
            if got >= need {
                // The message ends in this record, `got - need` bytes before
                // the end of what is available of it.
                let bytes_processed = start + avail.len() - (got - need);
                return Reassembly::Complete {
                    message: gather(buf, need),
                    bytes_processed,
                };
            }
        }
        if end > buf.len() {
            return Reassembly::NeedMore;
        }
        pos = end;
    }
}

/// Collects the first `need` handshake bytes from the records `reassemble`
/// walked and returns them without the 4-byte header. Borrows when the
/// message sits in one record.
fn gather(buf: &[u8], need: usize) -> Cow<'_, [u8]> {
    if let Some((_, _, len)) = record_header(buf, 0) {
        if len >= need {
            return Cow::Borrowed(buf.get(5 + 4..5 + need).unwrap_or_default());
        }
    }
    // `need` is at most 4 + 16 KiB, checked before this is called.
    let mut message = Vec::with_capacity(need);
    let mut pos = 0;
    while message.len() < need {
        let Some((_, _, len)) = record_header(buf, pos) else {
            break;
        };
        let start = pos + 5;
        let take = len.min(need - message.len());
        message.extend_from_slice(buf.get(start..start + take).unwrap_or_default());
        pos = start + len;
    }
    message.drain(..message.len().min(4));
    Cow::Owned(message)
}

// === ClientHello ===

/// A cursor over TLS's length-prefixed encodings.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.buf.split_at_checked(n)?;
        self.buf = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u8_prefixed(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn u16_prefixed(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

type Hello = (Option<String>, Vec<Vec<u8>>, bool);

/// Parses a ClientHello body; see the module docs for what is checked.
fn parse_client_hello(body: &[u8]) -> Result<Hello, Malformed> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16().ok_or(Malformed::Syntax)?;
    r.take(32).ok_or(Malformed::Syntax)?; // random
    let session_id = r.u8_prefixed().ok_or(Malformed::Syntax)?;
    let ciphers = r.u16_prefixed().ok_or(Malformed::Syntax)?;
    let compression = r.u8_prefixed().ok_or(Malformed::Syntax)?;
    if session_id.len() > 32
        || ciphers.len() < 2
        || ciphers.len() % 2 != 0
        || compression.is_empty()
    {
        return Err(Malformed::Syntax);
    }
    // No extension block at all is allowed (pre-TLS 1.2 clients).
    let extensions = if r.is_empty() {
        &[][..]
    } else {
        let e = r.u16_prefixed().ok_or(Malformed::Syntax)?;
        if !r.is_empty() {
            return Err(Malformed::Syntax);
        }
        e
    };

    // One pass: check the block, reject duplicates, pick what we need.
    let mut seen = ExtensionSet::default();
    let mut server_name = None;
    let mut alpn = None;
    let mut supported_versions = None;
    let mut status_request = false;
    let mut r = Reader::new(extensions);
    while !r.is_empty() {
        let typ = r.u16().ok_or(Malformed::Syntax)?;
        let data = r.u16_prefixed().ok_or(Malformed::Syntax)?;
        if !seen.insert(typ) {
            return Err(Malformed::DuplicateExtension);
        }
        match typ {
            EXT_SERVER_NAME => server_name = Some(data),
            EXT_ALPN => alpn = Some(data),
            EXT_SUPPORTED_VERSIONS => supported_versions = Some(data),
            EXT_STATUS_REQUEST => status_request = true,
            _ => {}
        }
    }

    let sni = match server_name {
        Some(data) => Some(parse_server_name(data).ok_or(Malformed::ServerName)?),
        None => None,
    };
    let version = negotiate_version(legacy_version, supported_versions)?;
    if !compression.contains(&0) || (version == TLS1_3 && compression.len() != 1) {
        return Err(Malformed::Compression);
    }
    let alpn = alpn.and_then(parse_alpn).unwrap_or_default();
    Ok((sni, alpn, status_request))
}

/// As BoringSSL's `extract_sni`: exactly one entry, of type host_name,
/// 1..=255 bytes, no NUL.
fn parse_server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let mut list = Reader::new(r.u16_prefixed()?);
    let name_type = list.u8()?;
    let name = list.u16_prefixed()?;
    if !list.is_empty() || !r.is_empty() {
        return None;
    }
    if name_type != 0 || name.is_empty() || name.len() > 255 || name.contains(&0) {
        return None;
    }
    Some(String::from_utf8_lossy(name).into_owned())
}

/// As Envoy's `onALPN`: `None` (ignore the extension) unless the list is
/// well formed and every name is non-empty.
fn parse_alpn(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut r = Reader::new(data);
    let list = r.u16_prefixed()?;
    if !r.is_empty() || list.len() < 2 {
        return None;
    }
    let mut names = Vec::new();
    let mut list = Reader::new(list);
    while !list.is_empty() {
        let name = list.u8_prefixed()?;
        if name.is_empty() {
            return None;
        }
        names.push(name.to_vec());
    }
    Some(names)
}

/// As BoringSSL's `negotiate_version` with versions TLS 1.0-1.3 enabled:
/// the first version the client lists (in `supported_versions`, or implied
/// by the legacy version field) that is in range.
fn negotiate_version(legacy: u16, supported_versions: Option<&[u8]>) -> Result<u16, Malformed> {
    let supported = |v: u16| (TLS1_0..=TLS1_3).contains(&v);
    match supported_versions {
        Some(data) => {
            let mut r = Reader::new(data);
            let list = r.u8_prefixed().ok_or(Malformed::UnsupportedVersion)?;
            if !r.is_empty() || list.is_empty() {
                return Err(Malformed::UnsupportedVersion);
            }
            let mut list = Reader::new(list);
            while !list.is_empty() {
                // An odd trailing byte before any match is a decode error.
                let v = list.u16().ok_or(Malformed::UnsupportedVersion)?;
                if supported(v) {
                    return Ok(v);
                }
            }
            Err(Malformed::UnsupportedVersion)
        }
        // Without the extension the legacy field is the maximum version,
        // and TLS 1.3 cannot be negotiated.
        None if legacy >= TLS1_0 => Ok(legacy.min(0x0303)),
        None => Err(Malformed::UnsupportedVersion),
    }
}

/// A set of extension types, on the stack (8 KiB): duplicate detection
/// without allocating.
struct ExtensionSet([u64; 1024]);

impl Default for ExtensionSet {
    fn default() -> Self {
        ExtensionSet([0; 1024])
    }
}

impl ExtensionSet {
    /// Adds `t`; false when it was already there.
    fn insert(&mut self, t: u16) -> bool {
        let (word, bit) = (usize::from(t >> 6), 1u64 << (t & 63));
        let w = &mut self.0[word];
        let new = *w & bit == 0;
        *w |= bit;
        new
    }
}

#[cfg(test)]
mod tests;
