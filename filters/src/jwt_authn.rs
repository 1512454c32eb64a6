//! `envoy.filters.http.jwt_authn`, as Envoy 1.40's `JwtAuthn::Filter` with
//! local JWKS: the requirement of the route (per-route `requirement_name`
//! or `disabled`, else the first matching rule) is evaluated as Envoy's
//! verifiers (`provider_name`, `provider_and_audiences`, `requires_any`,
//! `requires_all`, `allow_missing`, `allow_missing_or_failed`), each
//! provider's tokens extracted and checked as Envoy's `Extractor` and
//! `Authenticator` do. A failure answers 401 (403 for audiences) with
//! Envoy's status text, `www-authenticate` and details.
//!
//! Verification is synchronous (the keys are in the config), so the filter
//! never waits. Everything is compiled in the factory: keys decoded,
//! extractors and requirement trees built; a request allocates only for
//! the tokens it carries.
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::{BoxFuture as SharedInner, FutureExt, Shared as SharedFuture};
use http::{HeaderName, HeaderValue};
use serde_json::{Map, Value};
use xds_client::config::{
    FilterOverride, Jwks, JwksSource, JwtAuthn, JwtPerRoute, JwtProvider, JwtRequirement, Name,
    RemoteJwks, RequestInfo, RouteMatch,
};

use crate::callout::{CalloutRequest, Callouts};

use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};

pub mod token;

use token::{Jwt, Status, VerifyKey};

/// The dynamic metadata namespace of verified payloads.
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.jwt_authn";
/// Envoy's default `clock_skew_seconds`.
const DEFAULT_CLOCK_SKEW: u64 = 60;
/// Envoy's `MaximumUriLength` for the realm.
const MAX_URI_PATH: usize = 256;

/// The largest JWKS body read from a remote server.
const MAX_JWKS_BODY: usize = 1 << 20;

/// `http.<prefix>.jwt_authn.*`.
struct Stats {
    allowed: Arc<dyn Counter>,
    denied: Arc<dyn Counter>,
    cors_preflight_bypassed: Arc<dyn Counter>,
    jwks_fetch_success: Arc<dyn Counter>,
    jwks_fetch_failed: Arc<dyn Counter>,
}

/// Which issuers put their tokens in a location (Envoy's `JwtIssuerChecker`).
#[derive(Debug, Default, Clone)]
struct Issuers {
    all: bool,
    some: Vec<String>,
}

impl Issuers {
    fn add(&mut self, issuer: &str) {
        if issuer.is_empty() {
            self.all = true;
        } else if !self.some.iter().any(|i| i == issuer) {
            self.some.push(issuer.to_owned());
        }
    }

    fn allows(&self, iss: &str) -> bool {
        self.all || self.some.iter().any(|i| i == iss)
    }
}

/// Envoy's `ExtractorImpl` for one provider or for all of them: locations
/// in Envoy's (ordered map) order.
#[derive(Debug, Default)]
struct Extractor {
    /// (header + prefix) key, header, value prefix.
    headers: Vec<(String, HeaderName, String, Issuers)>,
    params: Vec<(String, Issuers)>,
    cookies: Vec<(String, Issuers)>,
    /// `forward_payload_header`s and `claim_to_headers` headers, removed
    /// from the request before verification.
    sanitize: Vec<HeaderName>,
}

fn add_sorted<T>(v: &mut Vec<(String, T)>, key: &str, make: impl FnOnce() -> T) -> usize {
    match v.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
        Ok(i) => i,
        Err(i) => {
            v.insert(i, (key.to_owned(), make()));
            i
        }
    }
}

impl Extractor {
    fn new<'a>(providers: impl IntoIterator<Item = &'a JwtProvider>) -> Extractor {
        let mut e = Extractor::default();
        for p in providers {
            e.add(p);
        }
        e
    }

    fn add(&mut self, p: &JwtProvider) {
        let mut header = |name: &HeaderName, prefix: &str, issuer: &str| {
            let key = format!("{}{prefix}", name.as_str());
            let i = match self
                .headers
                .binary_search_by(|(k, ..)| k.as_str().cmp(&key))
            {
                Ok(i) => i,
                Err(i) => {
                    self.headers.insert(
                        i,
                        (key, name.clone(), prefix.to_owned(), Issuers::default()),
                    );
                    i
                }
            };
            self.headers[i].3.add(issuer);
        };
        for (name, prefix) in &p.from_headers {
            header(name, prefix, &p.issuer);
        }
        let defaults =
            p.from_headers.is_empty() && p.from_params.is_empty() && p.from_cookies.is_empty();
        if defaults {
            // As Envoy: `Authorization: Bearer <token>`, then `access_token`.
            header(&http::header::AUTHORIZATION, "Bearer ", &p.issuer);
        }
        let params: Vec<&str> = if defaults {
            vec!["access_token"]
        } else {
            p.from_params.iter().map(String::as_str).collect()
        };
        for name in params {
            let i = add_sorted(&mut self.params, name, Issuers::default);
            self.params[i].1.add(&p.issuer);
        }
        for name in &p.from_cookies {
            let i = add_sorted(&mut self.cookies, name, Issuers::default);
            self.cookies[i].1.add(&p.issuer);
        }
        self.sanitize
            .extend(p.forward_payload_header.iter().cloned());
        self.sanitize
            .extend(p.claim_to_headers.iter().map(|(h, _)| h.clone()));
    }

    fn sanitize(&self, headers: &mut http::HeaderMap) {
        for h in &self.sanitize {
            headers.remove(h);
        }
    }

    /// As Envoy's `ExtractorImpl::extract`: headers, then query parameters,
    /// then cookies.
    fn extract<'e>(&'e self, head: &http::request::Parts) -> Vec<Token<'e>> {
        let mut out = Vec::new();
        for (_, name, prefix, issuers) in &self.headers {
            for v in head.headers.get_all(name) {
                let Ok(v) = std::str::from_utf8(v.as_bytes()) else {
                    continue;
                };
                let value = if prefix.is_empty() {
                    v
                } else {
                    let Some(pos) = v.find(prefix.as_str()) else {
                        continue;
                    };
                    extract_jwt(v, pos + prefix.len())
                };
                out.push(Token {
                    value: value.to_owned(),
                    issuers,
                    location: Location::Header(name),
                });
            }
        }
        if !self.params.is_empty() {
            let query = head.uri.query().unwrap_or("");
            for (name, issuers) in &self.params {
                if let Some(v) = query_first(query, name) {
                    out.push(Token {
                        value: v,
                        issuers,
                        location: Location::Param(name),
                    });
                }
            }
        }
        if !self.cookies.is_empty() {
            for (name, issuers) in &self.cookies {
                if let Some(v) = cookie(&head.headers, name) {
                    out.push(Token {
                        value: v,
                        issuers,
                        location: Location::Cookie,
                    });
                }
            }
        }
        out
    }
}

/// As Envoy's `extractJWT`: from the first base64url character (or dot)
/// after the prefix to the end; the value as is when there is none.
fn extract_jwt(v: &str, after: usize) -> &str {
    let rest = v.get(after..).unwrap_or("");
    match rest.find(|c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        Some(i) => &rest[i..],
        None => v,
    }
}

/// Percent-decodes a query component (`+` stays, as Envoy's
/// `parseAndDecodeQueryString`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of query parameter `name`.
fn query_first(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// The first cookie `name` of the `cookie` headers (quotes stripped).
fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    for h in headers.get_all(http::header::COOKIE) {
        let Ok(h) = h.to_str() else { continue };
        for c in h.split(';') {
            let c = c.trim_start_matches(' ');
            if let Some((k, v)) = c.split_once('=') {
                if k == name {
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(v);
                    return Some(v.to_owned());
                }
            }
        }
    }
    None
}

/// Where a token was found (for `forward: false`).
#[derive(Debug, Clone, Copy)]
enum Location<'e> {
    Header(&'e HeaderName),
    Param(&'e str),
    /// Envoy leaves cookies in place.
    Cookie,
}

#[derive(Debug)]
struct Token<'e> {
    value: String,
    issuers: &'e Issuers,
    location: Location<'e>,
}

/// A compiled requirement (Envoy's verifier tree).
#[derive(Debug)]
enum Verifier {
    Provider {
        provider: usize,
        audiences: Option<Vec<String>>,
        extractor: Extractor,
    },
    Any {
        children: Vec<Verifier>,
        allow_missing: bool,
        allow_missing_or_failed: bool,
    },
    All(Vec<Verifier>),
    /// `allow_missing_or_failed` (`failed: true`) or `allow_missing`, over
    /// every provider's locations.
    Allow {
        failed: bool,
        extractor: Extractor,
    },
    AllowAll,
}

impl Verifier {
    fn new(r: &JwtRequirement, providers: &[Provider]) -> Verifier {
        let all = || Extractor::new(providers.iter().map(|p| &*p.config));
        match r {
            JwtRequirement::Provider {
                provider,
                audiences,
            } => Verifier::Provider {
                provider: *provider,
                audiences: audiences.clone(),
                extractor: Extractor::new(providers.get(*provider).map(|p| &*p.config)),
            },
            JwtRequirement::Any {
                requirements,
                allow_missing,
                allow_missing_or_failed,
            } => Verifier::Any {
                children: requirements
                    .iter()
                    .map(|r| Verifier::new(r, providers))
                    .collect(),
                allow_missing: *allow_missing,
                allow_missing_or_failed: *allow_missing_or_failed,
            },
            JwtRequirement::All(rs) => {
                Verifier::All(rs.iter().map(|r| Verifier::new(r, providers)).collect())
            }
            JwtRequirement::AllowMissingOrFailed => Verifier::Allow {
                failed: true,
                extractor: all(),
            },
            JwtRequirement::AllowMissing => Verifier::Allow {
                failed: false,
                extractor: all(),
            },
            JwtRequirement::AllowAll => Verifier::AllowAll,
        }
    }
}

/// A provider with its keys decoded (or their cache) and its own locations.
#[derive(Debug)]
struct Provider {
    config: Arc<JwtProvider>,
    keys: Keys,
    /// This provider's locations (does a request carry a token for it?).
    extractor: Extractor,
}

#[derive(Debug)]
enum Keys {
    Local(Arc<Vec<VerifyKey>>),
    Remote(Arc<RemoteCache>),
}

impl Keys {
    /// The keys to verify with; `None`: a remote JWKS not (freshly)
    /// fetched, i.e. its fetch failed.
    fn get(&self) -> Option<Arc<Vec<VerifyKey>>> {
        match self {
            Keys::Local(k) => Some(k.clone()),
            Keys::Remote(c) => c.fresh(),
        }
    }
}

type FetchFuture = SharedFuture<SharedInner<'static, ()>>;

/// A remote JWKS shared by the factory's requests (Envoy's per-provider
/// `JwksData` with its `JwksFetcher`): fetched on first use and again once
/// `cache_duration` passed; requests that need it meanwhile share one fetch.
struct RemoteCache {
    config: Arc<RemoteJwks>,
    callouts: Arc<dyn Callouts>,
    success: Arc<dyn Counter>,
    failed: Arc<dyn Counter>,
    state: std::sync::Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    keys: Option<(Arc<Vec<VerifyKey>>, tokio::time::Instant)>,
    inflight: Option<FetchFuture>,
}

impl std::fmt::Debug for RemoteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCache")
            .field("uri", &self.config.uri)
            .finish_non_exhaustive()
    }
}

impl RemoteCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self) -> Option<Arc<Vec<VerifyKey>>> {
        let s = self.lock();
        s.keys
            .as_ref()
            .filter(|(_, until)| tokio::time::Instant::now() < *until)
            .map(|(k, _)| k.clone())
    }

    /// The fetch under way, or a new one.
    fn fetch(self: &Arc<Self>) -> FetchFuture {
        let mut s = self.lock();
        if let Some(f) = &s.inflight {
            return f.clone();
        }
        let me = self.clone();
        let fut = async move {
            let c = &me.config;
            let req = CalloutRequest {
                method: http::Method::GET,
                path_and_query: c.path.clone(),
                authority: c.authority.clone(),
                headers: http::HeaderMap::new(),
                body: Bytes::new(),
            };
            let res = me
                .callouts
                .send(&c.cluster, req, c.timeout, MAX_JWKS_BODY)
                .await;
            let keys = match res {
                Ok(r) if r.status == http::StatusCode::OK => std::str::from_utf8(&r.body)
                    .map_err(|_| "Jwks is an invalid JSON".to_owned())
                    .and_then(|b| Jwks::parse(b).map_err(str::to_owned)),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e.to_string()),
            };
            let mut s = me.lock();
            s.inflight = None;
            match keys {
                Ok(j) => {
                    me.success.inc();
                    let keys = j.keys.iter().map(VerifyKey::new).collect();
                    s.keys = Some((
                        Arc::new(keys),
                        tokio::time::Instant::now() + c.cache_duration,
                    ));
                }
                Err(e) => {
                    me.failed.inc();
                    tracing::debug!(uri = %c.uri, error = %e, "jwt_authn: JWKS fetch failed");
                }
            }
        }
        .boxed()
        .shared();
        s.inflight = Some(fut.clone());
        fut
    }
}

/// What one request's verification works on.
struct Verify<'a> {
    shared: &'a Shared,
    head: &'a mut http::request::Parts,
    /// `payload_in_metadata` / `header_in_metadata` values.
    extracted: Map<String, Value>,
    now: u64,
}

impl Verify<'_> {
    fn run(&mut self, v: &Verifier) -> Status {
        match v {
            Verifier::AllowAll => Status::Ok,
            Verifier::Provider {
                provider,
                audiences,
                extractor,
            } => {
                extractor.sanitize(&mut self.head.headers);
                let tokens = extractor.extract(self.head);
                self.authenticate(tokens, Some(*provider), audiences.as_deref(), false, false)
            }
            Verifier::Allow { failed, extractor } => {
                extractor.sanitize(&mut self.head.headers);
                let tokens = extractor.extract(self.head);
                self.authenticate(tokens, None, None, *failed, true)
            }
            Verifier::All(children) => {
                for c in children {
                    let s = self.run(c);
                    if s != Status::Ok {
                        return s;
                    }
                }
                Status::Ok
            }
            Verifier::Any {
                children,
                allow_missing,
                allow_missing_or_failed,
            } => {
                // As Envoy's AnyVerifierImpl: OK as soon as one is; else
                // the statuses are aggregated, preferring real errors over
                // an unknown issuer over a missing token.
                let mut status = Status::JwtMissed;
                for c in children {
                    let s = self.run(c);
                    if s == Status::Ok {
                        return s;
                    }
                    if (s != Status::JwtMissed && s != Status::JwtUnknownIssuer)
                        || status == Status::JwtMissed
                    {
                        status = s;
                    }
                }
                if *allow_missing_or_failed || (*allow_missing && status == Status::JwtMissed) {
                    Status::Ok
                } else {
                    status
                }
            }
        }
    }

    /// As Envoy's `AuthenticatorImpl`: every token must pass (last found
    /// first), unless failures or missing tokens are allowed.
    fn authenticate(
        &mut self,
        mut tokens: Vec<Token<'_>>,
        provider: Option<usize>,
        audiences: Option<&[String]>,
        allow_failed: bool,
        allow_missing: bool,
    ) -> Status {
        let mut status = Status::JwtMissed;
        while let Some(t) = tokens.pop() {
            status = self.check(&t, provider, audiences);
            if status != Status::Ok && !allow_failed && !allow_missing {
                break;
            }
        }
        if allow_failed || (allow_missing && status == Status::JwtMissed) {
            Status::Ok
        } else {
            status
        }
    }

    fn check(
        &mut self,
        t: &Token<'_>,
        provider: Option<usize>,
        audiences: Option<&[String]>,
    ) -> Status {
        let jwt = match Jwt::parse(&t.value) {
            Ok(j) => j,
            Err(s) => return s,
        };
        if !t.issuers.allows(&jwt.iss) {
            return Status::JwtUnknownIssuer;
        }
        let providers = &self.shared.providers;
        // Without a provider (allow_missing*): the first provider of the
        // token's issuer, else the first without an issuer.
        let p = match provider {
            Some(i) => providers.get(i),
            None => providers
                .iter()
                .find(|p| p.config.issuer == jwt.iss)
                .or_else(|| providers.iter().find(|p| p.config.issuer.is_empty())),
        };
        let Some(p) = p else {
            return Status::JwtUnknownIssuer;
        };
        let cfg = &*p.config;
        let skew = if cfg.clock_skew_seconds > 0 {
            cfg.clock_skew_seconds
        } else {
            DEFAULT_CLOCK_SKEW
        };
        let s = jwt.check_time(self.now, skew);
        if s != Status::Ok {
            return s;
        }
        if !audiences_allowed(audiences.unwrap_or(&cfg.audiences), &jwt.audiences) {
            return Status::JwtAudienceNotAllowed;
        }
        let Some(keys) = p.keys.get() else {
            return Status::JwksFetchFail;
        };
        let s = jwt.verify(&keys);
        if s != Status::Ok {
            return s;
        }
        // Good JWT: as Envoy's `handleGoodJwt`.
        let headers = &mut self.head.headers;
        if let Some(h) = &cfg.forward_payload_header {
            let mut v = jwt.payload_b64.to_owned();
            if cfg.pad_forward_payload_header {
                while v.len() % 4 != 0 {
                    v.push('=');
                }
            }
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.append(h.clone(), v);
            }
        }
        for (h, claim) in &cfg.claim_to_headers {
            if let Some(v) = claim_value(&jwt.payload, claim) {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    headers.append(h.clone(), v);
                }
            }
        }
        if !cfg.forward {
            match t.location {
                Location::Header(h) => {
                    headers.remove(h);
                }
                Location::Param(name) => remove_param(self.head, name),
                Location::Cookie => {}
            }
        }
        if !cfg.header_in_metadata.is_empty() {
            self.extracted
                .insert(cfg.header_in_metadata.clone(), Value::Object(jwt.header));
        }
        if !cfg.payload_in_metadata.is_empty() {
            self.extracted
                .insert(cfg.payload_in_metadata.clone(), Value::Object(jwt.payload));
        }
        Status::Ok
    }
}

/// As jwt_verify_lib's `CheckAudience`: no configured audience allows any;
/// else one of the token's, compared without `http(s)://` and a trailing `/`.
fn audiences_allowed(config: &[String], jwt: &[String]) -> bool {
    fn clean(a: &str) -> &str {
        let a = a
            .strip_prefix("http://")
            .or_else(|| a.strip_prefix("https://"))
            .unwrap_or(a);
        a.strip_suffix('/').unwrap_or(a)
    }
    config.is_empty()
        || jwt
            .iter()
            .any(|a| config.iter().any(|c| clean(c) == clean(a)))
}

/// A claim (`a.b` nests) as Envoy's `addJWTClaimToHeader` renders it:
/// strings as is, integral numbers as integers, others as `%f`, booleans;
/// nothing for other types.
fn claim_value(payload: &Map<String, Value>, claim: &str) -> Option<String> {
    let mut keys = claim.split('.');
    let mut v = payload.get(keys.next()?)?;
    for k in keys {
        v = v.as_object()?.get(k)?;
    }
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            let d = n.as_f64()?;
            if d >= 0.0 && d < u64::MAX as f64 && d.fract() == 0.0 {
                (d as u64).to_string()
            } else {
                format!("{d:.6}")
            }
        }
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// Removes query parameter `name` from the request path (Envoy's
/// `JwtParamLocation::removeJwt`).
fn remove_param(head: &mut http::request::Parts, name: &str) {
    let Some(q) = head.uri.query() else { return };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| percent_decode(kv.split_once('=').map_or(*kv, |(k, _)| k)) != name)
        .collect();
    let path = head.uri.path();
    let pq = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = head.uri.clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(u) = http::Uri::from_parts(parts) {
            head.uri = u;
        }
    }
}

/// Envoy's `buildOriginalUri`: `x-forwarded-proto://host<path>`, the path
/// cut at 256 bytes.
fn original_uri(head: &http::request::Parts) -> String {
    let proto = head
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let host = xds_client::config::request_pseudo(head, &xds_client::config::HeaderKey::Authority)
        .unwrap_or("");
    let path = head.uri.path_and_query().map_or("", |p| p.as_str());
    let mut end = path.len().min(MAX_URI_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{proto}://{host}{}", &path[..end])
}

fn is_cors_preflight(head: &http::request::Parts) -> bool {
    let non_empty = |h: &str| head.headers.get(h).is_some_and(|v| !v.is_empty());
    head.method == http::Method::OPTIONS
        && non_empty("origin")
        && non_empty("access-control-request-method")
}

/// What the factory compiled, shared by its instances.
struct Shared {
    config: Arc<JwtAuthn>,
    providers: Vec<Provider>,
    rules: Vec<(RouteMatch, Option<Verifier>)>,
    named: Vec<(String, Arc<Verifier>)>,
    /// Whether a rule's match has a `runtime_fraction`.
    random_rules: bool,
    stats: Stats,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("providers", &self.providers.len())
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// The jwt_authn filter's factory.
#[derive(Debug)]
pub struct JwtAuthnFactory {
    name: Name,
    shared: Arc<Shared>,
}

impl JwtAuthnFactory {
    /// `scope` is the HCM's (`http.<stat_prefix>.`).
    pub fn new(
        name: Name,
        config: Arc<JwtAuthn>,
        scope: &Arc<dyn StatsScope>,
        callouts: &Arc<dyn Callouts>,
    ) -> JwtAuthnFactory {
        let stats = Stats {
            allowed: scope.counter("jwt_authn.allowed"),
            denied: scope.counter("jwt_authn.denied"),
            cors_preflight_bypassed: scope.counter("jwt_authn.cors_preflight_bypassed"),
            jwks_fetch_success: scope.counter("jwt_authn.jwks_fetch_success"),
            jwks_fetch_failed: scope.counter("jwt_authn.jwks_fetch_failed"),
        };
        let providers: Vec<Provider> = config
            .providers
            .iter()
            .map(|p| Provider {
                keys: match &p.jwks {
                    JwksSource::Local(j) => {
                        Keys::Local(Arc::new(j.keys.iter().map(VerifyKey::new).collect()))
                    }
                    JwksSource::Remote(r) => Keys::Remote(Arc::new(RemoteCache {
                        config: r.clone(),
                        callouts: callouts.clone(),
                        success: stats.jwks_fetch_success.clone(),
                        failed: stats.jwks_fetch_failed.clone(),
                        state: Default::default(),
                    })),
                },
                extractor: Extractor::new(Some(&**p)),
                config: p.clone(),
            })
            .collect();
        let rules = config
            .rules
            .iter()
            .map(|r| {
                (
                    r.matcher.clone(),
                    r.requires.as_ref().map(|q| Verifier::new(q, &providers)),
                )
            })
            .collect();
        let named = config
            .requirement_map
            .iter()
            .map(|(n, q)| (n.clone(), Arc::new(Verifier::new(q, &providers))))
            .collect();
        JwtAuthnFactory {
            name,
            shared: Arc::new(Shared {
                random_rules: config
                    .rules
                    .iter()
                    .any(|r| r.matcher.runtime_fraction_ppm.is_some()),
                config,
                providers,
                rules,
                named,
                stats,
            }),
        }
    }
}

/// What a route's per-route config picked.
enum Pick {
    /// The filter's `rules`.
    Rules,
    /// `disabled`.
    Nothing,
    Named(Arc<Verifier>),
    /// An unknown `requirement_name`: Envoy's message.
    Wrong(String),
}

impl HttpFilterFactory for JwtAuthnFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        let pick = match route.override_for(&self.name) {
            Some(FilterOverride::JwtAuthn(JwtPerRoute::Disabled)) => Pick::Nothing,
            Some(FilterOverride::JwtAuthn(JwtPerRoute::RequirementName(n))) => {
                match self.shared.named.iter().find(|(name, _)| name == n) {
                    Some((_, v)) => Pick::Named(v.clone()),
                    None => Pick::Wrong(format!(
                        "Wrong requirement_name: {n}. It should be one of [{}]",
                        self.shared.config.requirement_names()
                    )),
                }
            }
            _ => Pick::Rules,
        };
        Some(Box::new(JwtAuthnFilter {
            shared: self.shared.clone(),
            pick,
            www_authenticate: None,
            fetched: false,
        }))
    }
}

struct JwtAuthnFilter {
    shared: Arc<Shared>,
    pick: Pick,
    /// Set on a denial, added to the local reply's headers.
    www_authenticate: Option<HeaderValue>,
    /// The remote JWKS this request needed were fetched (or failed): the
    /// resumed header phase verifies with what is there.
    fetched: bool,
}

/// Whether verifier `v` may verify tokens of provider `i`.
fn reaches(v: &Verifier, i: usize) -> bool {
    match v {
        Verifier::Provider { provider, .. } => *provider == i,
        Verifier::Allow { .. } => true,
        Verifier::Any { children, .. } | Verifier::All(children) => {
            children.iter().any(|c| reaches(c, i))
        }
        Verifier::AllowAll => false,
    }
}

impl JwtAuthnFilter {
    fn rule_verifier(&self, head: &http::request::Parts) -> Option<&Verifier> {
        if self.shared.rules.is_empty() {
            return None;
        }
        let full_path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let info = RequestInfo {
            method: &head.method,
            path: head.uri.path(),
            query: head.uri.query(),
            full_path,
            authority: xds_client::config::request_pseudo(
                head,
                &xds_client::config::HeaderKey::Authority,
            )
            .unwrap_or(""),
            scheme: head.uri.scheme_str().unwrap_or("http"),
            headers: &head.headers,
            is_connect: head.method == http::Method::CONNECT,
            peer_cert: false,
            // Drawn only when a rule has a `runtime_fraction`.
            random_ppm: if self.shared.random_rules {
                rand::random_range(0..1_000_000)
            } else {
                0
            },
        };
        self.shared
            .rules
            .iter()
            .find(|(m, _)| m.matches(&info))
            .and_then(|(_, v)| v.as_ref())
    }
}

impl HttpFilter for JwtAuthnFilter {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        if shared.config.bypass_cors_preflight && is_cors_preflight(head) {
            stats.cors_preflight_bypassed.inc();
            stats.allowed.inc();
            return Action::Continue;
        }
        let verifier = match &self.pick {
            Pick::Nothing => None,
            Pick::Named(v) => Some(&**v),
            Pick::Wrong(msg) => {
                stats.denied.inc();
                let body = if shared.config.strip_failure_response {
                    Bytes::new()
                } else {
                    Bytes::from(format!("Failed JWT authentication: {msg}"))
                };
                return Action::Respond(LocalReply {
                    status: http::StatusCode::FORBIDDEN,
                    body,
                    flag: None,
                    details: wrong_name_details(msg),
                    grpc_status: None,
                });
            }
            Pick::Rules => self.rule_verifier(head),
        };
        let Some(verifier) = verifier else {
            stats.allowed.inc();
            return Action::Continue;
        };
        // Remote JWKS that a token of this request needs and that are not
        // cached: fetched (one fetch shared by the requests waiting for
        // it), then this phase runs again (`on_request_headers_resumed`).
        if !self.fetched {
            let fetches: Vec<FetchFuture> = shared
                .providers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match &p.keys {
                    Keys::Remote(c)
                        if reaches(verifier, i)
                            && c.fresh().is_none()
                            && !p.extractor.extract(head).is_empty() =>
                    {
                        Some(c.fetch())
                    }
                    _ => None,
                })
                .collect();
            if !fetches.is_empty() {
                self.fetched = true;
                return Action::Wait(Box::pin(async move {
                    futures_util::future::join_all(fetches).await;
                    Action::Continue
                }));
            }
        }
        let uri = original_uri(head);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut v = Verify {
            shared: &shared,
            head,
            extracted: Map::new(),
            now,
        };
        let status = v.run(verifier);
        let extracted = v.extracted;
        if !extracted.is_empty() {
            cx.metadata.merge(METADATA_NAMESPACE, extracted);
        }
        tracing::debug!(status = status.text(), "jwt_authn: verification completed");
        if status == Status::Ok {
            stats.allowed.inc();
            return Action::Continue;
        }
        stats.denied.inc();
        let code = if status == Status::JwtAudienceNotAllowed {
            http::StatusCode::FORBIDDEN
        } else {
            http::StatusCode::UNAUTHORIZED
        };
        let body = if shared.config.strip_failure_response {
            Bytes::new()
        } else {
            let error = if status == Status::JwtMissed {
                ""
            } else {
                ", error=\"invalid_token\""
            };
            self.www_authenticate =
                HeaderValue::from_str(&format!("Bearer realm=\"{uri}\"{error}")).ok();
            Bytes::from_static(status.text().as_bytes())
        };
        Action::Respond(LocalReply {
            status: code,
            body,
            flag: None,
            details: status.details(),
            grpc_status: None,
        })
    }

    fn on_request_headers_resumed(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        self.on_request_headers(cx, head)
    }

    fn on_response_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        if let Some(v) = self.www_authenticate.take() {
            head.headers.insert(http::header::WWW_AUTHENTICATE, v);
        }
        Action::Continue
    }
}

/// `jwt_authn_access_denied{<message, whitespace as _>}` for a wrong
/// `requirement_name`, interned (details are `&'static str`; bounded by the
/// names a control plane sends).
fn wrong_name_details(msg: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SET: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let s: String = format!("jwt_authn_access_denied{{{msg}}}")
        .chars()
        .map(|c| if c.is_ascii_whitespace() { '_' } else { c })
        .collect();
    let mut set = SET
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(v) = set.get(s.as_str()) {
        return v;
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    set.insert(leaked);
    leaked
}

#[cfg(test)]
mod tests;
