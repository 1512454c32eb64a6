//! Request header processing at the edge, as Envoy's connection manager:
//! x-forwarded-*, request ids, x-envoy-* sanitising, path normalisation,
//! and configured header mutations.
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::RngCore;
use xds_client::config::{HeaderAdd, HeaderMutations, HttpConnectionManager};

use super::info::{render, StreamInfo};

pub static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
pub static X_ENVOY_EXTERNAL_ADDRESS: HeaderName =
    HeaderName::from_static("x-envoy-external-address");
pub static X_ENVOY_EXPECTED_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
pub static X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
pub static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
pub static X_ENVOY_RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
pub static X_ENVOY_MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
pub static X_ENVOY_RQ_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
pub static X_ENVOY_PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
pub static X_ENVOY_RETRIABLE_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");
pub static X_ENVOY_RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");
pub static X_ENVOY_HEDGE_ON_PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-hedge-on-per-try-timeout");
pub static X_ENVOY_ORIGINAL_HOST: HeaderName = HeaderName::from_static("x-envoy-original-host");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub static VIA: HeaderName = HeaderName::from_static("via");

/// x-envoy-* request headers Envoy removes from every request that is not
/// internal (`cleanInternalHeaders`).
const EXTERNAL_STRIPPED: &[&str] = &[
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
];

/// Additionally removed from edge requests.
const EDGE_STRIPPED: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-external-address",
    "x-envoy-original-path",
];

/// Whether `ip` is internal per `internal_address_config`.
pub fn is_internal(h: &HttpConnectionManager, ip: IpAddr) -> bool {
    h.internal_address.cidrs.iter().any(|c| c.contains(ip))
}

/// The outcome of edge processing.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    /// The address the request is attributed to (`%DOWNSTREAM_REMOTE_ADDRESS%`).
    pub remote: SocketAddr,
    pub internal: bool,
    /// x-envoy-* control headers are honoured only from internal requests
    /// (they are stripped from the others before routing).
    pub trusted: bool,
}

/// This host's first non-loopback address of the configured family: what
/// Envoy appends to x-forwarded-for for loopback peers
/// (`--local-address-ip-version`).
pub fn local_address(v6: bool) -> Option<IpAddr> {
    static V4: std::sync::OnceLock<Option<IpAddr>> = std::sync::OnceLock::new();
    static V6: std::sync::OnceLock<Option<IpAddr>> = std::sync::OnceLock::new();
    let cell = if v6 { &V6 } else { &V4 };
    *cell.get_or_init(|| crate::netif::first_non_loopback(v6))
}

/// Applies Envoy's `mutateRequestHeaders`: x-forwarded-for/-proto, the
/// internal/edge decision, x-envoy-* sanitising, internal-only headers,
/// request id, x-forwarded-client-cert and via.
pub fn edge(
    h: &HttpConnectionManager,
    internal_only: &[HeaderName],
    headers: &mut HeaderMap,
    peer: SocketAddr,
    scheme: &'static str,
    local_v6: bool,
    tls: Option<&crate::tls::DownstreamTlsInfo>,
) -> Edge {
    // x-forwarded-for is one of Envoy's inline headers: repeated lines are
    // coalesced into one comma-separated value. One lookup serves the
    // checks below (each lookup hashes the name).
    let mut values = headers.get_all(&XFF).iter();
    let first = values.next();
    let joined = match values.next() {
        Some(_) => {
            let all: Vec<&[u8]> = headers.get_all(&XFF).iter().map(|v| v.as_bytes()).collect();
            HeaderValue::from_bytes(&all.join(&b","[..])).ok()
        }
        None => None,
    };
    let had_xff = first.is_some();
    // Envoy: with use_remote_address the request is "single address" when
    // the client sent no XFF; otherwise when XFF held exactly one address.
    let (mut single_xff, xff_remote) = {
        let text = joined
            .as_ref()
            .or(first)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        (
            xff_count(text) == 1,
            (!h.use_remote_address)
                .then(|| xff_address(text, h.xff_num_trusted_hops))
                .flatten(),
        )
    };
    if let Some(v) = joined {
        headers.insert(XFF.clone(), v);
    }
    let mut remote = None;
    if h.use_remote_address {
        single_xff = !had_xff;
        remote = Some(peer);
        if !h.skip_xff_append {
            // A loopback peer is recorded as this host's address (Envoy).
            let ip = if peer.ip().is_loopback() {
                local_address(local_v6).unwrap_or(peer.ip())
            } else {
                peer.ip()
            };
            append_xff(headers, ip);
        }
        headers.insert(XFP.clone(), HeaderValue::from_static(scheme));
    } else {
        if let Some(ip) = xff_remote {
            remote = Some(SocketAddr::new(ip, 0));
        }
        if !headers.contains_key(&XFP) {
            headers.insert(XFP.clone(), HeaderValue::from_static(scheme));
        }
    }
    // Internal: after appending, XFF holds exactly one address, and the final
    // remote address is internal.
    let internal = single_xff && remote.is_some_and(|r| is_internal(h, r.ip()));
    let edge_request = !internal && h.use_remote_address;
    if internal {
        headers.insert(X_ENVOY_INTERNAL.clone(), HeaderValue::from_static("true"));
    } else {
        if edge_request && has_envoy_header(headers) {
            for n in EDGE_STRIPPED {
                headers.remove(*n);
            }
        }
        // Removing by name parses and hashes each name: scan once first,
        // most requests carry no x-envoy-* header.
        if has_envoy_header(headers) {
            for n in EXTERNAL_STRIPPED {
                headers.remove(*n);
            }
        }
        for n in internal_only {
            headers.remove(n);
        }
    }
    if edge_request {
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            headers.insert(X_ENVOY_EXTERNAL_ADDRESS.clone(), v);
        }
    }
    // Request id.
    if h.generate_request_id {
        let keep = headers.contains_key(&X_REQUEST_ID)
            && (!edge_request || h.preserve_external_request_id);
        if !keep {
            headers.insert(X_REQUEST_ID.clone(), new_request_id());
        } else if edge_request {
            // As Envoy's UUID extension: an external id kept at the edge
            // carries no trusted trace reason.
            super::tracing::set_reason(
                &h.request_id,
                headers,
                super::tracing::Reason::NotTraceable,
            );
        }
    }
    xfcc(h, headers, tls);
    if let Some(via) = &h.via {
        append_joined(headers, &VIA, via, ", ");
    }
    Edge {
        remote: remote.unwrap_or(peer),
        internal,
        trusted: internal,
    }
}

/// `x-forwarded-client-cert` as Envoy's `forward_client_cert_details`:
/// without a client certificate only ALWAYS_FORWARD_ONLY keeps the header;
/// with one, FORWARD_ONLY keeps it, APPEND_FORWARD appends this hop's
/// element and SANITIZE_SET replaces the header with it.
fn xfcc(
    h: &HttpConnectionManager,
    headers: &mut HeaderMap,
    tls: Option<&crate::tls::DownstreamTlsInfo>,
) {
    use xds_client::config::{ClientCertDetail as D, ForwardClientCert as F};
    if h.forward_client_cert == F::AlwaysForwardOnly {
        return;
    }
    let peer = tls.and_then(|t| t.peer.as_ref().map(|p| (t, p)));
    let Some((tls, peer)) = peer.filter(|_| h.forward_client_cert != F::Sanitize) else {
        // Most requests carry none: one scan of the names, no hashing.
        remove_present(headers, &[&XFCC]);
        return;
    };
    if h.forward_client_cert == F::ForwardOnly {
        return;
    }
    let mut parts: Vec<String> = Vec::new();
    if let Some(local) = &tls.local {
        for u in &local.uri_sans {
            parts.push(format!("By={u}"));
        }
    }
    parts.push(format!("Hash={}", peer.sha256_hex()));
    for d in &h.client_cert_details {
        match d {
            D::Subject => parts.push(format!("Subject=\"{}\"", peer.subject)),
            // As Envoy: always one URI= with the first URI SAN (or empty).
            D::Uri => parts.push(format!(
                "URI={}",
                peer.uri_sans.first().map(String::as_str).unwrap_or("")
            )),
            D::Cert | D::Chain => {
                if let Some(pem) = &tls.peer_pem {
                    let key = if *d == D::Cert { "Cert" } else { "Chain" };
                    parts.push(format!("{key}=\"{}\"", url_encode(pem)));
                }
            }
            D::Dns => {
                for n in &peer.dns_sans {
                    parts.push(format!("DNS={n}"));
                }
            }
        }
    }
    let element = parts.join(";");
    let value = match (h.forward_client_cert, headers.get(&XFCC)) {
        (F::AppendForward, Some(old)) if !old.is_empty() => {
            format!("{},{element}", String::from_utf8_lossy(old.as_bytes()))
        }
        _ => element,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFCC.clone(), v);
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether any `x-envoy-*` header is present (one pass over the names).
pub fn has_envoy_header(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| k.as_str().starts_with("x-envoy-"))
}

/// Removes those of `names` the map holds, in one scan of its names: a
/// remove by name hashes and probes even when the header is absent, and
/// `has_envoy_header` is true for every request carrying any x-envoy-*
/// header (Istio's peer metadata, for one).
pub fn remove_present(headers: &mut HeaderMap, names: &[&HeaderName]) {
    // The names' lengths as a bit set: most keys are ruled out by their
    // length alone, without comparing them with every name.
    let lengths = names
        .iter()
        .fold(0u64, |m, n| m | (1 << (n.as_str().len() % 64)));
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| lengths & (1 << (k.as_str().len() % 64)) != 0 && names.contains(k))
        .cloned()
        .collect();
    for n in found {
        headers.remove(n);
    }
}

/// Hop-by-hop headers never forwarded (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(n: &HeaderName) -> bool {
    use http::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    // By length first: it rules out most names with one comparison (every
    // request and response header is checked, twice per proxied request).
    match n.as_str().len() {
        2 => n == TE,
        7 => n == UPGRADE || n == TRAILER,
        10 => n == CONNECTION || n.as_str() == "keep-alive",
        16 => n.as_str() == "proxy-connection",
        17 => n == TRANSFER_ENCODING,
        _ => false,
    }
}

/// Removes the hop-by-hop headers (except `keep` ones) in one scan.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            is_hop_by_hop(k)
                && !(keep_upgrade
                    && (*k == http::header::UPGRADE || *k == http::header::CONNECTION))
        })
        .cloned()
        .collect();
    for n in found {
        headers.remove(n);
    }
}

/// Appends `v` to a header as Envoy does: into the existing value, joined by `sep`.
pub fn append_joined(headers: &mut HeaderMap, name: &HeaderName, v: &HeaderValue, sep: &str) {
    let joined: Vec<&[u8]> = headers.get_all(name).iter().map(|x| x.as_bytes()).collect();
    if joined.is_empty() {
        headers.insert(name.clone(), v.clone());
        return;
    }
    let mut out = joined.join(sep.as_bytes());
    out.extend_from_slice(sep.as_bytes());
    out.extend_from_slice(v.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&out) {
        headers.insert(name.clone(), v);
    }
}

/// The addresses in the (coalesced) x-forwarded-for value.
fn xff_count(xff: &str) -> usize {
    xff.split(',').filter(|s| !s.trim().is_empty()).count()
}

fn append_xff(headers: &mut HeaderMap, ip: IpAddr) {
    let ip = ip.to_string();
    let v = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev},{ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        headers.insert(XFF.clone(), v);
    }
}

/// The address `trusted_hops` from the right of the (coalesced)
/// x-forwarded-for value (Envoy's `xff_num_trusted_hops`), without copies.
fn xff_address(xff: &str, trusted_hops: u32) -> Option<IpAddr> {
    xff.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .nth_back(trusted_hops as usize)?
        .parse()
        .ok()
}

/// A decimal header value (a count of milliseconds, an attempt count)
/// without the two allocations of `HeaderValue::from(u64)` in the common
/// cases: values below 1000 come from a table of static strings built once,
/// larger ones from a per-thread cache of the last value (a route's timeout
/// is the same for every request).
pub fn number_value(n: u64) -> HeaderValue {
    const SMALL: usize = 1000;
    static TABLE: std::sync::OnceLock<Box<[HeaderValue]>> = std::sync::OnceLock::new();
    if (n as usize) < SMALL {
        let table = TABLE.get_or_init(|| {
            let mut digits = String::new();
            let mut ends = Vec::with_capacity(SMALL);
            for i in 0..SMALL {
                digits.push_str(&i.to_string());
                ends.push(digits.len());
            }
            // Built once per process (~3 KiB); the values borrow it forever.
            let digits: &'static str = Box::leak(digits.into_boxed_str());
            let mut start = 0;
            ends.iter()
                .map(|&end| {
                    let v = HeaderValue::from_static(&digits[start..end]);
                    start = end;
                    v
                })
                .collect()
        });
        return table[n as usize].clone();
    }
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((m, v)) if *m == n => v.clone(),
            _ => {
                let v = HeaderValue::from(n);
                *last = Some((n, v.clone()));
                v
            }
        }
    })
}

/// Sets `Host` to `authority`, unless the request already carries exactly
/// that one value (most requests: the header is then left as parsed, with
/// no copy of the authority).
pub fn set_host(headers: &mut HeaderMap, authority: &str) {
    let mut values = headers.get_all(http::header::HOST).iter();
    if let (Some(v), None) = (values.next(), values.next()) {
        if v.as_bytes() == authority.as_bytes() {
            return;
        }
    }
    if let Ok(v) = HeaderValue::from_str(authority) {
        headers.insert(http::header::HOST, v);
    }
}

/// A random UUIDv4 as a header value.
pub fn new_request_id() -> HeaderValue {
    // A per-thread fast PRNG seeded from the OS: request ids need to be
    // unique, not secret (Envoy uses a plain random UUID too).
    thread_local! {
        static RNG: std::cell::RefCell<rand::rngs::SmallRng> =
            std::cell::RefCell::new(rand::SeedableRng::from_rng(&mut rand::rng()));
    }
    let mut b = [0u8; 16];
    RNG.with(|r| r.borrow_mut().fill_bytes(&mut b));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // Formatted on the stack: the header value is the only allocation.
    let mut s = [0u8; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s[at] = b'-';
            at += 1;
        }
        s[at] = b"0123456789abcdef"[(byte >> 4) as usize];
        s[at + 1] = b"0123456789abcdef"[(byte & 0xf) as usize];
        at += 2;
    }
    HeaderValue::from_bytes(&s).expect("hex and dashes are valid")
}

/// Applies one level's `*_headers_to_add` / `*_headers_to_remove`.
pub fn apply(
    headers: &mut HeaderMap,
    adds: &[HeaderAdd],
    removes: &[HeaderName],
    info: &StreamInfo,
    request: bool,
) {
    for n in removes {
        headers.remove(n);
    }
    for a in adds {
        let value = if a.value.is_literal() {
            match a.value.parts.first() {
                Some(xds_client::config::FormatPart::Literal(s)) => s.clone(),
                _ => String::new(),
            }
        } else {
            if request {
                render(&a.value, info, Some(headers), None, "")
            } else {
                render(&a.value, info, None, Some(headers), "")
            }
        };
        if value.is_empty() && !a.keep_empty_value {
            continue;
        }
        let Ok(v) = HeaderValue::from_str(&value) else {
            continue;
        };
        a.apply_to(headers, v);
    }
}

/// Applies request (or response) mutations from every level in Envoy's
/// order: the most specific level (weighted cluster, route) first and the
/// route-config level last, so by default the least specific level wins an
/// overwrite; `most_specific_header_mutations_wins` reverses the order.
pub fn apply_levels(
    headers: &mut HeaderMap,
    levels: &[&HeaderMutations],
    request: bool,
    most_specific_wins: bool,
    info: &StreamInfo,
) {
    // `levels` is ordered most specific first (weighted cluster, route, vhost, route config).
    let mut apply_one = |m: &HeaderMutations| {
        if request {
            apply(headers, &m.request_add, &m.request_remove, info, true);
        } else {
            apply(headers, &m.response_add, &m.response_remove, info, false);
        }
    };
    if most_specific_wins {
        for m in levels.iter().rev() {
            apply_one(m);
        }
    } else {
        for m in levels {
            apply_one(m);
        }
    }
}

/// The outcome of path normalisation.
pub enum PathCheck {
    Ok(Option<String>),
    Reject,
    Redirect(String),
}

/// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`.
pub fn normalize(h: &HttpConnectionManager, path: &str) -> PathCheck {
    use xds_client::config::EscapedSlashesAction as E;
    let (p, query) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    // Borrowed until a step rewrites it: with no normalisation configured
    // (Envoy's defaults) a request's path is not copied.
    let mut out = std::borrow::Cow::Borrowed(p);
    let has_escaped = contains_escaped_slash(p);
    if has_escaped {
        match h.escaped_slashes {
            E::KeepUnchanged => {}
            E::RejectRequest => return PathCheck::Reject,
            E::UnescapeAndForward | E::UnescapeAndRedirect => {
                out = unescape_slashes(&out).into();
            }
        }
    }
    if h.normalize_path {
        match normalize_rfc3986(&out) {
            Some(n) => out = n.into(),
            None => return PathCheck::Reject,
        }
    }
    if h.merge_slashes {
        out = merge_slashes(&out).into();
    }
    if has_escaped && h.escaped_slashes == E::UnescapeAndRedirect {
        return PathCheck::Redirect(format!("{out}{query}"));
    }
    if *out == *p {
        PathCheck::Ok(None)
    } else {
        PathCheck::Ok(Some(format!("{out}{query}")))
    }
}

fn contains_escaped_slash(p: &str) -> bool {
    let b = p.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && (w[2] | 0x20) == b'f') || (w[1] == b'5' && (w[2] | 0x20) == b'c'))
    })
}

fn unescape_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let (h, l) = (b[i + 1], b[i + 2] | 0x20);
            if h == b'2' && l == b'f' {
                out.push('/');
                i += 3;
                continue;
            }
            if h == b'5' && l == b'c' {
                out.push('\\');
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut prev = false;
    for c in p.chars() {
        if c == '/' {
            if !prev {
                out.push(c);
            }
            prev = true;
        } else {
            out.push(c);
            prev = false;
        }
    }
    out
}

/// RFC 3986 normalisation as Envoy: decode percent-encoded unreserved
/// characters, turn `\` into `/`, remove dot segments. `None` rejects.
pub fn normalize_rfc3986(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    // Decode unreserved %XX.
    let b = p.as_bytes();
    let mut dec = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let v = (hi * 16 + lo) as u8;
                if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                    dec.push(v as char);
                } else {
                    dec.push('%');
                    dec.push((b[i + 1] as char).to_ascii_uppercase());
                    dec.push((b[i + 2] as char).to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        dec.push(if b[i] == b'\\' { '/' } else { b[i] as char });
        i += 1;
    }
    // Remove dot segments.
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = dec[1..].split('/').collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing = false;
    for (k, s) in parts.iter().enumerate() {
        match *s {
            "." => trailing = k == last,
            ".." => {
                segs.pop();
                trailing = k == last;
            }
            other => {
                segs.push(other);
                trailing = false;
            }
        }
    }
    let mut out = String::from("/");
    out.push_str(&segs.join("/"));
    if trailing && !out.ends_with('/') {
        out.push('/');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_present_removes_exactly_the_names() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-max-retries", "1"),
            ("x-envoy-peer-metadata", "m"),
            ("x-envoy-retry-ox", "same length, other name"),
            ("host", "h"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h.append(
            HeaderName::from_static("x-envoy-max-retries"),
            HeaderValue::from_static("2"),
        );
        remove_present(
            &mut h,
            &[&X_ENVOY_RETRY_ON, &X_ENVOY_MAX_RETRIES, &X_ENVOY_RQ_TIMEOUT],
        );
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-envoy-peer-metadata", "x-envoy-retry-ox"]);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn dot_segments() {
        assert_eq!(
            normalize_rfc3986("/a/b/../c/./d").as_deref(),
            Some("/a/c/d")
        );
        assert_eq!(normalize_rfc3986("/../a").as_deref(), Some("/a"));
        assert_eq!(normalize_rfc3986("/a/%62c").as_deref(), Some("/a/bc"));
        assert_eq!(normalize_rfc3986("/a/..").as_deref(), Some("/"));
        assert_eq!(normalize_rfc3986("/a/b/.").as_deref(), Some("/a/b/"));
        assert_eq!(normalize_rfc3986("/a%2fb").as_deref(), Some("/a%2Fb"));
        assert_eq!(merge_slashes("//a///b/"), "/a/b/");
        assert!(contains_escaped_slash("/a%2Fb"));
        assert_eq!(unescape_slashes("/a%2fb%5C"), "/a/b\\");
    }

    #[test]
    fn request_ids_are_uuid4() {
        let v = new_request_id();
        let s = v.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
    }

    #[test]
    fn hop_by_hop_names() {
        for n in [
            "connection",
            "transfer-encoding",
            "upgrade",
            "te",
            "trailer",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
        // Same lengths as hop-by-hop names, and others.
        for n in [
            "user-agent",
            "x-envoy-ab",
            "referer",
            "trailers",
            "host",
            "content-type",
            "x-forwarded-proto",
            "proxy-authorization",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
    }

    #[test]
    fn xff_trusted_hops() {
        let mut h = HeaderMap::new();
        h.insert(
            XFF.clone(),
            HeaderValue::from_static("1.1.1.1, 2.2.2.2,3.3.3.3"),
        );
        let v = h.get(&XFF).and_then(|v| v.to_str().ok()).expect("xff");
        assert_eq!(xff_address(v, 0), Some("3.3.3.3".parse().expect("ip")));
        assert_eq!(xff_address(v, 1), Some("2.2.2.2".parse().expect("ip")));
        assert_eq!(xff_address(v, 2), Some("1.1.1.1".parse().expect("ip")));
        assert_eq!(xff_address(v, 5), None);
        assert_eq!(
            xff_address(" , 4.4.4.4 ,", 0),
            Some("4.4.4.4".parse().expect("ip"))
        );
        assert_eq!(xff_count("1.1.1.1, 2.2.2.2,3.3.3.3"), 3);
        assert_eq!(xff_count(" , 4.4.4.4 ,"), 1);
        assert_eq!(xff_count(""), 0);
    }

    #[test]
    fn number_values_match_decimal() {
        for n in [
            0u64,
            1,
            9,
            10,
            99,
            100,
            999,
            1000,
            15000,
            15000,
            15001,
            u64::MAX,
        ] {
            assert_eq!(number_value(n).to_str().expect("ascii"), n.to_string());
        }
    }

    #[test]
    fn set_host_keeps_an_equal_single_value() {
        let mut h = HeaderMap::new();
        set_host(&mut h, "a.example");
        assert_eq!(h.get_all(http::header::HOST).iter().count(), 1);
        assert_eq!(h[http::header::HOST], "a.example");
        set_host(&mut h, "a.example");
        assert_eq!(h[http::header::HOST], "a.example");
        set_host(&mut h, "b.example:8080");
        assert_eq!(h[http::header::HOST], "b.example:8080");
        h.append(
            http::header::HOST,
            HeaderValue::from_static("b.example:8080"),
        );
        set_host(&mut h, "b.example:8080");
        assert_eq!(h.get_all(http::header::HOST).iter().count(), 1);
    }
}
