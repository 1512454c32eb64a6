//! `envoy.filters.listener.proxy_protocol`: the PROXY protocol header a load
//! balancer puts in front of a connection (HAProxy's `proxy-protocol.txt`,
//! versions 1 and 2), and the encoders for the upstream PROXY-protocol
//! transport socket.
//!
//! Parsing follows Envoy's `proxy_protocol.cc`:
//!
//! - **No header.** Bytes that match neither signature (`PROXY ` for v1,
//!   `\r\n\r\n\0\r\nQUIT\n` for v2) as far as they go are
//!   [`ProxyError::NotProxy`], decided from the first byte that differs.
//!   With `allow_requests_without_proxy_protocol` the caller goes on without
//!   consuming anything; without it, it closes the connection like any other
//!   error (`downstream_cx_proxy_proto_error`).
//! - **v1.** The line must end with CRLF within 107 bytes. Trailing
//!   whitespace is trimmed, then fields are separated by single spaces:
//!   `PROXY UNKNOWN ...` (anything after `UNKNOWN` is ignored) keeps the real
//!   addresses; `PROXY TCP4|TCP6 src dst sport dport` must have exactly six
//!   fields, addresses of the named family and decimal ports up to 65535.
//! - **v2.** Version nibble 2. `LOCAL` skips the whole header, address block
//!   and TLVs unparsed, and keeps the real addresses. `PROXY` needs
//!   `AF_INET` or `AF_INET6` with `STREAM` or `DGRAM`; as Envoy, `AF_UNSPEC`
//!   and `AF_UNIX` are rejected for `PROXY` (the spec lets a receiver reject
//!   them). The length field must cover the address block; what follows it
//!   up to the length is TLVs (`type`, `u16` length, value), which must fit
//!   exactly.
//! - **Addresses** given by `PROXY` (v1 or v2) must be unicast: not
//!   unspecified, not multicast, not the IPv4 broadcast address.
//!
//! Bounds: a v1 header is at most [`V1_MAX_LEN`] bytes and a v2 header at
//! most [`V2_MAX_LEN`] (its length field is 16 bits); nothing is allocated
//! before the whole header is in the buffer, and then only copies of its
//! TLVs.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Inspect;

/// The v1 signature.
pub const V1_SIGNATURE: &[u8; 6] = b"PROXY ";
/// The v2 signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the spec's 107 bytes).
pub const V1_MAX_LEN: usize = 107;
/// The fixed part of a v2 header: signature, version/command, family and
/// transport, length.
pub const V2_HEADER_LEN: usize = 16;
/// The longest v2 header: the fixed part plus a 16-bit length.
pub const V2_MAX_LEN: usize = V2_HEADER_LEN + u16::MAX as usize;
/// The v1 header for a connection whose addresses are not TCP over IP.
pub const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";

const V2_VERSION: u8 = 2;
const V2_CMD_LOCAL: u8 = 0;
const V2_CMD_PROXY: u8 = 1;
const V2_AF_INET: u8 = 1;
const V2_AF_INET6: u8 = 2;
const V2_TRANSPORT_STREAM: u8 = 1;
const V2_TRANSPORT_DGRAM: u8 = 2;
const V2_ADDR_LEN_INET: usize = 12;
const V2_ADDR_LEN_INET6: usize = 36;

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Header bytes to consume from the connection.
    pub len: usize,
    /// 1 or 2.
    pub version: u8,
    /// (source, destination) as the proxy saw them; `None` for v2 `LOCAL`
    /// and v1 `UNKNOWN`, where the socket's own addresses stay.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 TLVs in order (type, value); empty for v1 and v2 `LOCAL`.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// Why the bytes are not an acceptable PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes start with neither signature.
    NotProxy,
    /// No CRLF within the first [`V1_MAX_LEN`] bytes.
    V1TooLong,
    /// The v1 line does not parse.
    V1Malformed,
    /// A v2 version nibble other than 2.
    V2Version(u8),
    /// A v2 command other than `LOCAL` (0) and `PROXY` (1).
    V2Command(u8),
    /// A `PROXY` address family other than `AF_INET` (1) and `AF_INET6` (2).
    V2AddressFamily(u8),
    /// A `PROXY` transport other than `STREAM` (1) and `DGRAM` (2).
    V2Transport(u8),
    /// The v2 length field is shorter than the address block.
    V2AddressLength { len: u16, need: u16 },
    /// A TLV runs past the end of the header.
    V2Tlv,
    /// A source or destination address that is not unicast.
    NotUnicast,
    /// A header of a version in `disallowed_versions` (1 or 2).
    Disallowed(u8),
}

/// [`encode_v2`]: the TLVs do not fit the 16-bit length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeError {
    /// Bytes the address block and TLVs would take.
    pub len: usize,
}

// === impl ProxyError ===

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => f.write_str("no proxy protocol signature"),
            ProxyError::V1TooLong => {
                write!(f, "proxy protocol v1 line longer than {V1_MAX_LEN} bytes")
            }
            ProxyError::V1Malformed => f.write_str("malformed proxy protocol v1 line"),
            ProxyError::V2Version(v) => write!(f, "unsupported proxy protocol version {v}"),
            ProxyError::V2Command(c) => write!(f, "unsupported proxy protocol v2 command {c}"),
            ProxyError::V2AddressFamily(a) => {
                write!(f, "unsupported proxy protocol v2 address family {a}")
            }
            ProxyError::V2Transport(t) => write!(f, "unsupported proxy protocol v2 transport {t}"),
            ProxyError::V2AddressLength { len, need } => write!(
                f,
                "proxy protocol v2 length {len} shorter than its {need}-byte address block"
            ),
            ProxyError::V2Tlv => f.write_str("malformed proxy protocol v2 tlv"),
            ProxyError::NotUnicast => f.write_str("proxy protocol address is not unicast"),
            ProxyError::Disallowed(v) => write!(f, "proxy protocol version {v} is disallowed"),
        }
    }
}

impl std::error::Error for ProxyError {}

// === impl EncodeError ===

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proxy protocol v2 addresses and tlvs take {} bytes, over the limit of {}",
            self.len,
            u16::MAX
        )
    }
}

impl std::error::Error for EncodeError {}

// === parsing ===

/// Parses a PROXY protocol header at the start of the bytes peeked so far.
pub fn parse(buf: &[u8]) -> Inspect<Result<ProxyHeader, ProxyError>> {
    if starts_like(buf, V2_SIGNATURE) {
        // Only the empty buffer matches both.
        if buf.is_empty() {
            return Inspect::NeedMore;
        }
        parse_v2(buf)
    } else if starts_like(buf, V1_SIGNATURE) {
        parse_v1(buf)
    } else {
        Inspect::Done(Err(ProxyError::NotProxy))
    }
}

/// Whether `buf` and `sig` agree on their common length.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf.get(..n) == sig.get(..n)
}

fn parse_v1(buf: &[u8]) -> Inspect<Result<ProxyHeader, ProxyError>> {
    let window = buf.get(..V1_MAX_LEN).unwrap_or(buf);
    let Some(lf) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_LEN {
            Inspect::Done(Err(ProxyError::V1TooLong))
        } else {
            Inspect::NeedMore
        };
    };
    let len = lf + 2;
    // Envoy's StringUtil::rtrim: trailing ASCII whitespace.
    let line = window.get(..lf).unwrap_or_default().trim_ascii_end();
    Inspect::Done(parse_v1_line(line).map(|addresses| ProxyHeader {
        len,
        version: 1,
        addresses,
        tlvs: Vec::new(),
    }))
}

fn parse_v1_line(line: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    // Split on single spaces, keeping empty fields (as Envoy: a double space
    // is an error).
    let mut fields = line.split(|&b| b == b' ');
    if fields.next() != Some(b"PROXY".as_slice()) {
        return Err(ProxyError::V1Malformed);
    }
    let proto = fields.next().ok_or(ProxyError::V1Malformed)?;
    if proto == b"UNKNOWN" {
        return Ok(None);
    }
    let mut next = || fields.next().ok_or(ProxyError::V1Malformed);
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(ProxyError::V1Malformed);
    }
    let (src, dst): (IpAddr, IpAddr) = match proto {
        b"TCP4" => (
            parse_text::<Ipv4Addr>(src)?.into(),
            parse_text::<Ipv4Addr>(dst)?.into(),
        ),
        b"TCP6" => (
            parse_text::<Ipv6Addr>(src)?.into(),
            parse_text::<Ipv6Addr>(dst)?.into(),
        ),
        _ => return Err(ProxyError::V1Malformed),
    };
    let addresses = (
        SocketAddr::new(src, parse_port(sport)?),
        SocketAddr::new(dst, parse_port(dport)?),
    );
    check_unicast(addresses)?;
    Ok(Some(addresses))
}

fn parse_text<T: std::str::FromStr>(field: &[u8]) -> Result<T, ProxyError> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProxyError::V1Malformed)
}

/// Decimal digits only (no sign), at most 65535.
fn parse_port(field: &[u8]) -> Result<u16, ProxyError> {
    if field.is_empty() || field.len() > 5 || !field.iter().all(u8::is_ascii_digit) {
        return Err(ProxyError::V1Malformed);
    }
    parse_text(field)
}

fn parse_v2(buf: &[u8]) -> Inspect<Result<ProxyHeader, ProxyError>> {
    let err = |e| Inspect::Done(Err(e));
    // Decide on each fixed byte as soon as it is here.
    let Some(&ver_cmd) = buf.get(12) else {
        return Inspect::NeedMore;
    };
    let (version, command) = (ver_cmd >> 4, ver_cmd & 0x0f);
    if version != V2_VERSION {
        return err(ProxyError::V2Version(version));
    }
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return err(ProxyError::V2Command(command));
    }
    let Some(&fam) = buf.get(13) else {
        return Inspect::NeedMore;
    };
    let addr_len = if command == V2_CMD_PROXY {
        let (family, transport) = (fam >> 4, fam & 0x0f);
        let addr_len = match family {
            V2_AF_INET => V2_ADDR_LEN_INET,
            V2_AF_INET6 => V2_ADDR_LEN_INET6,
            _ => return err(ProxyError::V2AddressFamily(family)),
        };
        if transport != V2_TRANSPORT_STREAM && transport != V2_TRANSPORT_DGRAM {
            return err(ProxyError::V2Transport(transport));
        }
        addr_len
    } else {
        0
    };
    let Some(&[hi, lo]) = buf.get(14..16) else {
        return Inspect::NeedMore;
    };
    let len = u16::from_be_bytes([hi, lo]);
    if usize::from(len) < addr_len {
        return err(ProxyError::V2AddressLength {
            len,
            need: addr_len as u16,
        });
    }
    let total = V2_HEADER_LEN + usize::from(len);
    let Some(rest) = buf.get(V2_HEADER_LEN..total) else {
        return Inspect::NeedMore;
    };
    if command == V2_CMD_LOCAL {
        return Inspect::Done(Ok(ProxyHeader {
            len: total,
            version: 2,
            addresses: None,
            tlvs: Vec::new(),
        }));
    }

    let (addrs, tlv_bytes) = rest.split_at(addr_len.min(rest.len()));
    let addresses = match v2_addresses(addrs) {
        Some(a) => a,
        None => {
            return err(ProxyError::V2AddressLength {
                len,
                need: addr_len as u16,
            })
        }
    };
    let tlvs = match parse_tlvs(tlv_bytes) {
        Some(t) => t,
        None => return err(ProxyError::V2Tlv),
    };
    if let Err(e) = check_unicast(addresses) {
        return err(e);
    }
    Inspect::Done(Ok(ProxyHeader {
        len: total,
        version: 2,
        addresses: Some(addresses),
        tlvs,
    }))
}

/// Decodes an `AF_INET` (12 bytes) or `AF_INET6` (36 bytes) address block:
/// source address, destination address, source port, destination port.
fn v2_addresses(b: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let port = |at: usize| b.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    let (src, dst, ports_at): (IpAddr, IpAddr, usize) = match b.len() {
        V2_ADDR_LEN_INET => {
            let a: [u8; 4] = b.get(0..4)?.try_into().ok()?;
            let d: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            (Ipv4Addr::from(a).into(), Ipv4Addr::from(d).into(), 8)
        }
        V2_ADDR_LEN_INET6 => {
            let a: [u8; 16] = b.get(0..16)?.try_into().ok()?;
            let d: [u8; 16] = b.get(16..32)?.try_into().ok()?;
            (Ipv6Addr::from(a).into(), Ipv6Addr::from(d).into(), 32)
        }
        _ => return None,
    };
    Some((
        SocketAddr::new(src, port(ports_at)?),
        SocketAddr::new(dst, port(ports_at + 2)?),
    ))
}

/// Splits the bytes after the address block into TLVs; `None` when one runs
/// past the end. Each value is copied out of the (complete, bounded) header.
fn parse_tlvs(mut b: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut tlvs = Vec::new();
    while let Some((&typ, rest)) = b.split_first() {
        let (len, rest) = rest.split_at_checked(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (value, rest) = rest.split_at_checked(len)?;
        tlvs.push((typ, value.to_vec()));
        b = rest;
    }
    Some(tlvs)
}

/// As Envoy's `isUnicastAddress`, for both addresses.
fn check_unicast((src, dst): (SocketAddr, SocketAddr)) -> Result<(), ProxyError> {
    let unicast = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast() && !v4.is_multicast(),
        IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast(),
    };
    if unicast(src.ip()) && unicast(dst.ip()) {
        Ok(())
    } else {
        Err(ProxyError::NotUnicast)
    }
}

/// The versions a filter accepts (`disallowed_versions`) and whether it
/// lets connections without a header through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub v1: bool,
    pub v2: bool,
    /// `allow_requests_without_proxy_protocol`.
    pub optional: bool,
}

/// [`parse`] for a filter that may disallow a version, as Envoy 1.40:
///
/// - when headers are optional, a disallowed version's signature is not
///   looked for: its bytes are [`ProxyError::NotProxy`] (and stay for the
///   next filters);
/// - else a disallowed version is [`ProxyError::Disallowed`] once Envoy
///   knows the version: a v1 line when its CRLF is in (before the line is
///   parsed; no CRLF within [`V1_MAX_LEN`] bytes stays
///   [`ProxyError::V1TooLong`]), a v2 header when its fixed 16 bytes are.
pub fn parse_versions(buf: &[u8], versions: Versions) -> Inspect<Result<ProxyHeader, ProxyError>> {
    // The two signatures differ from the first byte, so a non-empty buffer
    // starts like at most one of them.
    let (looks_v1, looks_v2) = if buf.is_empty() {
        (false, false)
    } else {
        (
            starts_like(buf, V1_SIGNATURE),
            starts_like(buf, V2_SIGNATURE),
        )
    };
    let disallowed = if looks_v1 && !versions.v1 {
        1
    } else if looks_v2 && !versions.v2 {
        2
    } else {
        return parse(buf);
    };
    if versions.optional {
        return Inspect::Done(Err(ProxyError::NotProxy));
    }
    if disallowed == 1 {
        let window = buf.get(..V1_MAX_LEN).unwrap_or(buf);
        if window.windows(2).any(|w| w == b"\r\n") {
            Inspect::Done(Err(ProxyError::Disallowed(1)))
        } else if buf.len() >= V1_MAX_LEN {
            Inspect::Done(Err(ProxyError::V1TooLong))
        } else {
            Inspect::NeedMore
        }
    } else if buf.len() >= V2_HEADER_LEN {
        Inspect::Done(Err(ProxyError::Disallowed(2)))
    } else {
        Inspect::NeedMore
    }
}

// === TLVs to dynamic metadata ===

/// Applies the filter's `rules` to a v2 header's TLVs, as Envoy 1.40: each
/// TLV whose type has a rule sets the rule's key, in its namespace, to the
/// value as a string (`SANITIZED_UTF8`: every byte that does not start a
/// valid UTF-8 sequence becomes `!`; `BASE64`: standard alphabet with
/// padding). A key an earlier TLV of the header set is kept (Envoy inserts
/// into the namespace's struct without replacing), so of repeated TLVs the
/// first wins.
pub fn apply_rules(
    rules: &[xds_client::config::TlvRule],
    tlvs: &[(u8, Vec<u8>)],
    metadata: &mut crate::state::DynamicMetadata,
) {
    use base64::Engine as _;
    if rules.is_empty() {
        return;
    }
    for (typ, value) in tlvs {
        let Some(rule) = rules.iter().find(|r| r.tlv_type == *typ) else {
            continue;
        };
        let ns = metadata.namespace_mut(&rule.namespace);
        if ns.contains_key(&rule.key) {
            continue;
        }
        let s = if rule.base64 {
            base64::engine::general_purpose::STANDARD.encode(value)
        } else {
            sanitize_utf8(value)
        };
        ns.insert(rule.key.clone(), serde_json::Value::String(s));
    }
}

/// Envoy's `MessageUtil::sanitizeUtf8String`: the longest valid UTF-8
/// prefix is kept, the byte after it becomes `!`, and so on from the next
/// byte (so each byte of a truncated or invalid sequence is one `!`).
pub fn sanitize_utf8(mut b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    loop {
        match std::str::from_utf8(b) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (valid, rest) = b.split_at(e.valid_up_to());
                // Valid by construction.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                out.push('!');
                b = rest.get(1..).unwrap_or_default();
            }
        }
    }
}

// === encoding ===

/// Both addresses in one family: when they differ, the IPv4 one becomes
/// IPv4-mapped IPv6 (v1 and v2 carry a single family).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (to_v6(src), to_v6(dst))
    }
}

/// A v1 header, `PROXY TCP4|TCP6 src dst sport dport\r\n`. IPv6 scope ids
/// and flow labels are not carried.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 `PROXY` header over `STREAM` with these TLVs, in order.
pub fn encode_v2(
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: &[(u8, Vec<u8>)],
) -> Result<Vec<u8>, EncodeError> {
    let (src, dst) = same_family(src, dst);
    let addr_len = if src.is_ipv4() {
        V2_ADDR_LEN_INET
    } else {
        V2_ADDR_LEN_INET6
    };
    let len = tlvs.iter().fold(addr_len, |n, (_, v)| {
        n.saturating_add(3).saturating_add(v.len())
    });
    let Ok(len16) = u16::try_from(len) else {
        return Err(EncodeError { len });
    };
    let family = if src.is_ipv4() {
        V2_AF_INET
    } else {
        V2_AF_INET6
    };

    let mut out = Vec::with_capacity(V2_HEADER_LEN + len);
    out.extend_from_slice(V2_SIGNATURE);
    out.push(V2_VERSION << 4 | V2_CMD_PROXY);
    out.push(family << 4 | V2_TRANSPORT_STREAM);
    out.extend_from_slice(&len16.to_be_bytes());
    for ip in [src.ip(), dst.ip()] {
        match ip {
            IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    for (typ, value) in tlvs {
        out.push(*typ);
        // Fits: the total was checked above.
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
    }
    Ok(out)
}

/// A v2 `LOCAL` header (health checks from the proxy itself).
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[V2_VERSION << 4 | V2_CMD_LOCAL, 0, 0, 0]);
    out
}

#[cfg(test)]
mod tests;
