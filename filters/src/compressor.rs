//! `envoy.filters.http.compressor`, as Envoy 1.40's `CompressorFilter`:
//! response compression with gzip, brotli or zstd, negotiated from the
//! request's `accept-encoding` across every compressor filter of the chain.
//!
//! Envoy shares the encoding decision between the compressor filters of a
//! stream through filter state; here every factory knows its chain's
//! compressor filters (their encodings, content types and `choose_first`),
//! and each instance takes the same decision from the same inputs.
use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use xds_client::config::{
    CompressorConfig, CompressorPerRoute, FilterOverride, HttpFilterConfig, HttpFilterKind,
};

use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, RouteView, StatsScope,
};

mod encoder;
#[cfg(test)]
mod tests;

pub use encoder::Encoder;

/// `compressor.<library>.<lib prefix>[response.]*` and friends.
struct Stats {
    compressed: Arc<dyn Counter>,
    not_compressed: Arc<dyn Counter>,
    total_uncompressed_bytes: Arc<dyn Counter>,
    total_compressed_bytes: Arc<dyn Counter>,
    content_length_too_small: Arc<dyn Counter>,
    no_accept_header: Arc<dyn Counter>,
    header_identity: Arc<dyn Counter>,
    header_compressor_used: Arc<dyn Counter>,
    header_compressor_overshadowed: Arc<dyn Counter>,
    header_wildcard: Arc<dyn Counter>,
    header_not_valid: Arc<dyn Counter>,
    not_compressed_etag: Arc<dyn Counter>,
    /// `request.not_compressed` (request compression is rejected, so
    /// every request counts here, as in Envoy without it).
    request_not_compressed: Arc<dyn Counter>,
}

impl Stats {
    fn new(c: &CompressorConfig, scope: &Arc<dyn StatsScope>) -> Stats {
        let common = format!("compressor.{}.{}", c.library_name, c.library.stats_prefix());
        let dir = if c.response.explicit {
            format!("{common}response.")
        } else {
            common.clone()
        };
        let n = |p: &str, s: &str| scope.counter(&format!("{p}{s}"));
        // Envoy creates the request direction's stats too.
        let req = format!("{common}request.");
        for s in [
            "compressed",
            "total_uncompressed_bytes",
            "total_compressed_bytes",
            "content_length_too_small",
        ] {
            n(&req, s);
        }
        Stats {
            compressed: n(&dir, "compressed"),
            not_compressed: n(&dir, "not_compressed"),
            total_uncompressed_bytes: n(&dir, "total_uncompressed_bytes"),
            total_compressed_bytes: n(&dir, "total_compressed_bytes"),
            content_length_too_small: n(&dir, "content_length_too_small"),
            no_accept_header: n(&common, "no_accept_header"),
            header_identity: n(&common, "header_identity"),
            header_compressor_used: n(&common, "header_compressor_used"),
            header_compressor_overshadowed: n(&common, "header_compressor_overshadowed"),
            header_wildcard: n(&common, "header_wildcard"),
            header_not_valid: n(&common, "header_not_valid"),
            not_compressed_etag: n(&common, "not_compressed_etag"),
            request_not_compressed: n(&req, "not_compressed"),
        }
    }
}

/// A compressor filter of the chain, as the encoding decision sees it.
#[derive(Debug, Clone)]
struct Sibling {
    name: String,
    encoding: &'static str,
    content_types: Vec<String>,
    choose_first: bool,
}

struct Inner {
    name: String,
    config: Arc<CompressorConfig>,
    stats: Stats,
    /// The chain's compressor filters in order (this one included).
    siblings: Vec<Sibling>,
}

pub struct CompressorFactory(Arc<Inner>);

impl std::fmt::Debug for CompressorFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressorFactory")
            .field("name", &self.0.name)
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl CompressorFactory {
    /// `chain`: every filter of the HCM (the compressors among them form
    /// Envoy's per-stream registry).
    pub fn new(
        name: &str,
        config: &Arc<CompressorConfig>,
        chain: &[HttpFilterConfig],
        stats: &Arc<dyn StatsScope>,
    ) -> Self {
        let siblings = chain
            .iter()
            .filter_map(|f| match &f.kind {
                HttpFilterKind::Compressor(c) => Some(Sibling {
                    name: f.name.to_string(),
                    encoding: c.library.encoding(),
                    content_types: c.response.content_types.clone(),
                    choose_first: c.choose_first,
                }),
                _ => None,
            })
            .collect();
        CompressorFactory(Arc::new(Inner {
            name: name.to_owned(),
            stats: Stats::new(config, stats),
            config: config.clone(),
            siblings,
        }))
    }
}

impl HttpFilterFactory for CompressorFactory {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        let per_route = match route.override_for(&self.0.name) {
            Some(FilterOverride::Compressor(p)) => p.clone(),
            _ => CompressorPerRoute::default(),
        };
        // Compressor filters disabled on the route are not in the stream's
        // registry (Envoy does not create them).
        let mut registered = 0u64;
        for (i, s) in self.0.siblings.iter().enumerate().take(64) {
            if !route.disabled(&s.name) {
                registered |= 1 << i;
            }
        }
        Some(Box::new(CompressorFilter {
            f: self.0.clone(),
            per_route,
            registered,
            accept_encoding: None,
            encoder: None,
        }))
    }
}

struct CompressorFilter {
    f: Arc<Inner>,
    per_route: CompressorPerRoute,
    registered: u64,
    /// The request's `accept-encoding` (several headers joined by `,`).
    accept_encoding: Option<HeaderValue>,
    encoder: Option<Box<Encoder>>,
}

/// Why the encoding was chosen (Envoy's `EncodingDecision::HeaderStat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderStat {
    NotValid,
    Identity,
    Wildcard,
    ValidCompressor,
}

const IDENTITY: &str = "identity";
const WILDCARD: &str = "*";

impl CompressorFilter {
    fn enabled(&self) -> bool {
        self.per_route
            .response_enabled
            .unwrap_or(self.f.config.response.enabled)
    }

    fn remove_accept_encoding(&self) -> bool {
        self.per_route
            .remove_accept_encoding_header
            .unwrap_or(self.f.config.response.remove_accept_encoding_header)
    }

    fn is_minimum_content_length(&self, h: &HeaderMap) -> bool {
        let Some(v) = h.get(header::CONTENT_LENGTH) else {
            return true;
        };
        let ok = std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= self.f.config.response.min_content_length);
        if !ok {
            self.f.stats.content_length_too_small.inc();
        }
        ok
    }

    fn is_etag_allowed(&self, h: &HeaderMap) -> bool {
        let allowed =
            !(self.f.config.response.disable_on_etag_header && h.contains_key(header::ETAG));
        if !allowed {
            self.f.stats.not_compressed_etag.inc();
        }
        allowed
    }

    fn is_transfer_encoding_allowed(&self, h: &HeaderMap) -> bool {
        let own = self.f.config.library.encoding();
        !joined(h, header::TRANSFER_ENCODING).is_some_and(|v| {
            v.split(|b| *b == b',').any(|t| {
                let t = t.trim_ascii();
                ["gzip", "br", "deflate", "compress", "zstd", own]
                    .iter()
                    .any(|e| t.eq_ignore_ascii_case(e.as_bytes()))
            })
        })
    }

    /// Envoy's `isAcceptEncodingAllowed`.
    fn is_accept_encoding_allowed(&self, maybe_compress: bool, h: &HeaderMap) -> bool {
        if !maybe_compress {
            return false;
        }
        let Some(accept) = &self.accept_encoding else {
            self.f.stats.no_accept_header.inc();
            return false;
        };
        let (encoding, stat) =
            choose_encoding(accept.as_bytes(), h, &self.f.siblings, self.registered);
        let should = encoding.eq_ignore_ascii_case(self.f.config.library.encoding());
        let s = &self.f.stats;
        match stat {
            HeaderStat::ValidCompressor if should => s.header_compressor_used.inc(),
            HeaderStat::ValidCompressor => s.header_compressor_overshadowed.inc(),
            HeaderStat::Identity => s.header_identity.inc(),
            HeaderStat::Wildcard => s.header_wildcard.inc(),
            HeaderStat::NotValid => s.header_not_valid.inc(),
        }
        should
    }

    fn compress(&mut self, data: &mut Bytes, finish: bool) {
        let Some(enc) = &mut self.encoder else { return };
        let s = &self.f.stats;
        s.total_uncompressed_bytes.add(data.len() as u64);
        *data = enc.compress(data, finish);
        s.total_compressed_bytes.add(data.len() as u64);
    }
}

/// All values of `name` joined by `,` (as Envoy's inline headers).
fn joined(h: &HeaderMap, name: header::HeaderName) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut it = h.get_all(name).iter();
    let first = it.next()?;
    match it.next() {
        None => Some(std::borrow::Cow::Borrowed(first.as_bytes())),
        Some(second) => {
            let mut v = first.as_bytes().to_vec();
            for x in std::iter::once(second).chain(it) {
                v.push(b',');
                v.extend_from_slice(x.as_bytes());
            }
            Some(std::borrow::Cow::Owned(v))
        }
    }
}

/// `type/subtype` of a content type: before any `;`, trimmed.
fn media_type(v: &[u8]) -> &[u8] {
    v.split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

fn content_type_allowed(types: &[String], h: &HeaderMap) -> bool {
    match h.get(header::CONTENT_TYPE) {
        Some(ct) if !types.is_empty() => {
            let m = media_type(ct.as_bytes());
            types.iter().any(|t| t.as_bytes().eq_ignore_ascii_case(m))
        }
        _ => true,
    }
}

/// `cache-control` has the `no-transform` token.
fn no_transform(h: &HeaderMap) -> bool {
    joined(h, header::CACHE_CONTROL).is_some_and(|v| {
        v.split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
    })
}

/// Envoy's `Utility::isUpgrade`: `connection: upgrade` and an `upgrade`.
fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && joined(h, header::CONNECTION).is_some_and(|v| {
            v.split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

/// Envoy's `chooseEncoding`: the request's `accept-encoding` against the
/// registered compressors allowed for the response's content type.
fn choose_encoding(
    accept: &[u8],
    h: &HeaderMap,
    siblings: &[Sibling],
    registered: u64,
) -> (String, HeaderStat) {
    let ct = h
        .get(header::CONTENT_TYPE)
        .map(|v| media_type(v.as_bytes()))
        .unwrap_or_default();
    // encoding -> (registration order, choose_first); duplicates keep the
    // first registered.
    let mut allowed: BTreeMap<String, (u32, bool)> = BTreeMap::new();
    let mut count = 0u32;
    for (i, s) in siblings.iter().enumerate() {
        if i < 64 && registered & (1 << i) == 0 {
            continue;
        }
        if !ct.is_empty()
            && !s.content_types.is_empty()
            && !s
                .content_types
                .iter()
                .any(|t| t.as_bytes().eq_ignore_ascii_case(ct))
        {
            continue;
        }
        if !allowed.contains_key(s.encoding) {
            allowed.insert(s.encoding.to_owned(), (count, s.choose_first));
            count += 1;
        }
    }
    let accept = String::from_utf8_lossy(accept);
    let mut pairs: Vec<(&str, f32)> = Vec::new();
    for token in accept.split(',').filter(|t| !t.is_empty()) {
        let (name, params) = match token.split_once(';') {
            Some((n, p)) => (n.trim(), Some(p)),
            None => (token.trim(), None),
        };
        let mut q = 1f32;
        if let Some(params) = params {
            if let Some((k, v)) = params.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    match v.trim().parse::<f32>() {
                        Ok(v) => q = v,
                        // An unparseable q-value drops the token.
                        Err(_) => continue,
                    }
                }
            }
        }
        pairs.push((name, q));
        if q == 0.0 {
            allowed.remove(name);
        }
    }
    if pairs.is_empty() || allowed.is_empty() {
        return (IDENTITY.into(), HeaderStat::NotValid);
    }
    let mut choice: (&str, f32) = (IDENTITY, 0.0);
    for &(name, q) in &pairs {
        if allowed.contains_key(name) || name == IDENTITY || name == WILDCARD {
            // As Envoy, an equal q-value looks the encoding up with an
            // inserting lookup: identity and `*` become "registered" with
            // order 0, which the wildcard choice below then sees.
            if q > choice.1 || (q == choice.1 && allowed.entry(name.to_owned()).or_default().1) {
                choice = (name, q);
            }
        }
    }
    if choice.1 == 0.0 {
        return (IDENTITY.into(), HeaderStat::NotValid);
    }
    if choice.0 == IDENTITY {
        return (IDENTITY.into(), HeaderStat::Identity);
    }
    if choice.0 == WILDCARD {
        // The first registered (ties: the first in encoding order).
        let first = allowed
            .iter()
            .min_by_key(|(_, (order, _))| *order)
            .map(|(e, _)| e.clone())
            .unwrap_or_else(|| IDENTITY.into());
        return (first, HeaderStat::Wildcard);
    }
    (choice.0.to_owned(), HeaderStat::ValidCompressor)
}

/// Envoy keeps weak etags and drops strong ones when it compresses.
fn sanitize_etag(h: &mut HeaderMap) {
    if let Some(v) = h.get(header::ETAG) {
        let b = v.as_bytes();
        if b.len() > 2 && !((b[0] == b'w' || b[0] == b'W') && b[1] == b'/') {
            h.remove(header::ETAG);
        }
    }
}

fn insert_vary(h: &mut HeaderMap) {
    const ACCEPT_ENCODING: &str = "Accept-Encoding";
    match joined(h, header::VARY) {
        Some(v) => {
            let has = v
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii() == ACCEPT_ENCODING.as_bytes());
            if !has {
                let mut nv = v.into_owned();
                nv.extend_from_slice(b", ");
                nv.extend_from_slice(ACCEPT_ENCODING.as_bytes());
                if let Ok(nv) = HeaderValue::from_bytes(&nv) {
                    h.insert(header::VARY, nv);
                }
            }
        }
        None => {
            h.insert(header::VARY, HeaderValue::from_static(ACCEPT_ENCODING));
        }
    }
}

impl HttpFilter for CompressorFilter {
    fn on_request_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let mut all = head.headers.get_all(header::ACCEPT_ENCODING).iter();
        self.accept_encoding = match (all.next(), all.next()) {
            // One header: shared, not copied.
            (Some(v), None) => Some(v.clone()),
            (None, _) => None,
            _ => joined(&head.headers, header::ACCEPT_ENCODING)
                .and_then(|v| HeaderValue::from_bytes(&v).ok()),
        };
        if self.enabled() && self.remove_accept_encoding() {
            head.headers.remove(header::ACCEPT_ENCODING);
        }
        self.f.stats.request_not_compressed.inc();
        Action::Continue
    }

    fn on_response_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        let h = &mut head.headers;
        let big_enough = self.enabled() && self.is_minimum_content_length(h);
        let compressible = big_enough
            && !is_upgrade(h)
            && content_type_allowed(&self.f.config.response.content_types, h)
            && !no_transform(h)
            && self.is_etag_allowed(h)
            && !h.contains_key(header::CONTENT_ENCODING);
        if !cx.end_stream
            && self.is_accept_encoding_allowed(big_enough, h)
            && compressible
            && self.is_transfer_encoding_allowed(h)
        {
            sanitize_etag(h);
            h.remove(header::CONTENT_LENGTH);
            h.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(self.f.config.library.encoding()),
            );
            self.f.stats.compressed.inc();
            self.encoder = Some(Box::new(Encoder::new(&self.f.config.library)));
        } else {
            self.f.stats.not_compressed.inc();
        }
        // Even uncompressed, a compressible resource varies by encoding.
        if compressible {
            insert_vary(h);
        }
        Action::Continue
    }

    fn wants_response_body(&self) -> bool {
        self.encoder.is_some()
    }

    fn on_response_data(&mut self, data: &mut Bytes, end_of_stream: bool) {
        self.compress(data, end_of_stream);
    }

    fn on_response_trailers(&mut self, _trailers: &mut HeaderMap, data: &mut Bytes) {
        // Trailers end the stream: the compressed stream ends before them.
        self.compress(data, true);
    }
}
