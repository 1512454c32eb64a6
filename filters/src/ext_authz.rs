//! `envoy.filters.http.ext_authz` as Envoy 1.40's `ExtAuthz::Filter`: before
//! the request goes upstream, ask an authorization service (gRPC
//! `envoy.service.auth.v3.Authorization/Check`, or the raw HTTP protocol)
//! and let the request through with the header mutations it returns, or
//! answer with its denial.
//!
//! The call goes through the proxy's [`Callouts`] (the service's cluster,
//! its protocol and transport). The filter waits on it (`Action::Wait`);
//! the outcome lands in a slot the instance shares with the future, and
//! [`HttpFilter::on_request_headers_resumed`] applies it to the request
//! (`decodeHeaders` then `onComplete` in Envoy). Denials are local replies;
//! their headers, and an allowed request's `response_headers_to_add`, are
//! applied in the response header phase, which local replies pass too.
//!
//! The gRPC check messages are the `envoy.service.auth.v3` protos: they are
//! the wire format of the call, not configuration.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};
use xds_client::api::envoy::config::core::v3 as core;
use xds_client::api::envoy::service::auth::v3 as auth;
use xds_client::api::google::protobuf as pb;
use xds_client::config::{
    ExtAuthz, ExtAuthzService, FilterOverride, HttpAuthzService, StringMatcher,
};

use crate::callout::{grpc_unary, CalloutRequest, Callouts};
use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};

/// The dynamic metadata namespace of the service's `dynamic_metadata`.
pub const NAMESPACE: &str = "envoy.filters.http.ext_authz";
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
/// The largest HTTP authorization response body kept (a denial's body).
const MAX_HTTP_BODY: usize = 1024 * 1024;
const FAILURE_MODE_ALLOWED: HeaderName =
    HeaderName::from_static("x-envoy-auth-failure-mode-allowed");
const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

struct Stats {
    ok: Arc<dyn Counter>,
    denied: Arc<dyn Counter>,
    error: Arc<dyn Counter>,
    disabled: Arc<dyn Counter>,
    failure_mode_allowed: Arc<dyn Counter>,
}

/// What the factory shares with its instances and their calls.
struct Shared {
    cfg: Arc<ExtAuthz>,
    callouts: Arc<dyn Callouts>,
    stats: Stats,
}

#[derive(Debug)]
pub struct ExtAuthzFactory {
    name: Arc<str>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtAuthz").field("cfg", &self.cfg).finish()
    }
}

impl ExtAuthzFactory {
    pub fn new(
        name: Arc<str>,
        cfg: Arc<ExtAuthz>,
        stats: &Arc<dyn StatsScope>,
        callouts: &Arc<dyn Callouts>,
    ) -> Self {
        // Envoy: `<hcm prefix>ext_authz.<stat_prefix>.<name>`.
        let prefix = if cfg.stat_prefix.is_empty() {
            "ext_authz.".to_owned()
        } else {
            format!("ext_authz.{}.", cfg.stat_prefix)
        };
        let c = |n: &str| stats.counter(&format!("{prefix}{n}"));
        let stats = Stats {
            ok: c("ok"),
            denied: c("denied"),
            error: c("error"),
            disabled: c("disabled"),
            failure_mode_allowed: c("failure_mode_allowed"),
        };
        ExtAuthzFactory {
            name,
            shared: Arc::new(Shared {
                cfg,
                callouts: callouts.clone(),
                stats,
            }),
        }
    }
}

impl HttpFilterFactory for ExtAuthzFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // Envoy checks nothing without a route entry (no route: the 404
        // answers; weir cannot tell direct responses apart, see
        // ARCHITECTURE.md).
        route.cluster?;
        // The most specific `ExtAuthzPerRoute` decides `disabled`; context
        // extensions merge from the least to the most specific.
        let mut context_extensions = BTreeMap::new();
        let mut disabled = None;
        for level in route.per_filter.iter() {
            if let Some(FilterOverride::ExtAuthz(p)) =
                level.get(&self.name).and_then(|c| c.config.as_ref())
            {
                disabled.get_or_insert(p.disabled);
            }
        }
        if disabled == Some(true) {
            return None;
        }
        for level in route.per_filter.iter().rev() {
            if let Some(FilterOverride::ExtAuthz(p)) =
                level.get(&self.name).and_then(|c| c.config.as_ref())
            {
                for (k, v) in &p.context_extensions {
                    context_extensions.insert(k.clone(), v.clone());
                }
            }
        }
        // The most specific `disable_request_body_buffering` wins.
        let no_body = route.per_filter.iter().find_map(|level| {
            match level.get(&self.name).and_then(|c| c.config.as_ref()) {
                Some(FilterOverride::ExtAuthz(p)) if !p.disabled => {
                    Some(p.disable_request_body_buffering)
                }
                _ => None,
            }
        });
        let body_max = match (no_body, self.shared.cfg.with_request_body) {
            (Some(true), _) | (_, None) => None,
            (_, Some(b)) => Some(u64::from(b.max_request_bytes)),
        };
        Some(Box::new(ExtAuthzFilter {
            shared: self.shared.clone(),
            body_max,
            context_extensions,
            slot: None,
            response: None,
        }))
    }
}

/// A header change the service asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Replace every value (or add).
    Set,
    /// Add another entry.
    Add,
    /// Append to an existing value with `,` (nothing when absent).
    Append,
    AddIfAbsent,
    OverwriteIfExists,
}

type Mutation = (HeaderName, HeaderValue, Op);

/// The service's answer, as the request and response phases apply it.
#[derive(Debug, Default)]
struct Decision {
    upstream: Vec<Mutation>,
    remove: Vec<HeaderName>,
    /// On the response: `response_headers_to_add` (allowed) or the denial's
    /// headers.
    response: Vec<Mutation>,
    metadata: Option<Map<String, Value>>,
    /// Let through by `failure_mode_allow`.
    failure_allowed: bool,
}

type Slot = Arc<Mutex<Option<Decision>>>;

pub struct ExtAuthzFilter {
    shared: Arc<Shared>,
    /// `with_request_body.max_request_bytes`, unless the route disables
    /// body buffering.
    body_max: Option<u64>,
    context_extensions: BTreeMap<String, String>,
    slot: Option<Slot>,
    /// What the response phase applies.
    response: Option<Decision>,
}

enum Outcome {
    Ok(Decision),
    Denied {
        status: u16,
        body: Bytes,
        decision: Decision,
    },
    Error,
}

impl HttpFilter for ExtAuthzFilter {
    fn request_body_wanted(&self) -> Option<u64> {
        self.body_max
    }

    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let sh = &self.shared;
        let cfg = &sh.cfg;
        // As Envoy's `filterEnabled`: the fraction, then the metadata.
        let enabled = cfg
            .filter_enabled
            .is_none_or(|f| f.hit(rand::random::<u64>()))
            && cfg
                .filter_enabled_metadata
                .as_ref()
                .is_none_or(|m| crate::rbac::metadata_matches(m, Some(&cx.metadata)));
        if !enabled {
            sh.stats.disabled.inc();
            if cfg.deny_at_disable {
                return Action::Respond(error_reply(cfg.status_on_error));
            }
            return Action::Continue;
        }
        let slot: Slot = Arc::new(Mutex::new(None));
        self.slot = Some(slot.clone());
        let headers = request_headers(cx, head);
        let call: crate::http::BoxFuture = match &cfg.service {
            ExtAuthzService::Grpc(g) => {
                let req = check_request(
                    cfg,
                    cx,
                    head,
                    &headers,
                    std::mem::take(&mut self.context_extensions),
                );
                let fut = grpc_unary::<_, auth::CheckResponse>(
                    &*sh.callouts,
                    &g.cluster,
                    &g.authority,
                    CHECK,
                    &req,
                    cfg.timeout,
                    &g.initial_metadata,
                );
                let sh = sh.clone();
                Box::pin(async move {
                    let outcome = match fut.await {
                        Ok(r) => grpc_outcome(r),
                        Err(e) => {
                            tracing::debug!(error = %e, "check failed");
                            Outcome::Error
                        }
                    };
                    finish(&sh, outcome, &slot)
                })
            }
            ExtAuthzService::Http(h) => {
                let body = cfg.with_request_body.and(cx.request_body.as_ref());
                let req = http_request(h, &headers, body);
                let fut = sh
                    .callouts
                    .send(&h.cluster, req, cfg.timeout, MAX_HTTP_BODY);
                let sh = sh.clone();
                Box::pin(async move {
                    let outcome = match fut.await {
                        Ok(r) => match &sh.cfg.service {
                            ExtAuthzService::Http(h) => http_outcome(h, r),
                            ExtAuthzService::Grpc(_) => Outcome::Error,
                        },
                        Err(e) => {
                            tracing::debug!(error = %e, "check failed");
                            Outcome::Error
                        }
                    };
                    finish(&sh, outcome, &slot)
                })
            }
        };
        Action::Wait(call)
    }

    fn on_request_headers_resumed(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let Some(d) = self.slot.take().and_then(|s| take(&s)) else {
            return Action::Continue;
        };
        if d.failure_allowed {
            if self.shared.cfg.failure_mode_allow_header_add {
                head.headers
                    .append(FAILURE_MODE_ALLOWED, HeaderValue::from_static("true"));
            }
            return Action::Continue;
        }
        for (k, v, op) in &d.upstream {
            apply(&mut head.headers, k, v, *op);
        }
        for k in &d.remove {
            head.headers.remove(k);
        }
        self.response = Some(d);
        if let Some(m) = self.response.as_mut().and_then(|d| d.metadata.take()) {
            cx.metadata.merge(NAMESPACE, m);
        }
        Action::Continue
    }

    fn on_response_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        // A denial: its decision is still in the slot (the request phase
        // did not resume).
        if let Some(mut d) = self.slot.take().and_then(|s| take(&s)) {
            if let Some(m) = d.metadata.take() {
                cx.metadata.merge(NAMESPACE, m);
            }
            // As Envoy's local reply: remove, then add every value.
            for (k, _, _) in &d.response {
                head.headers.remove(k);
            }
            for (k, v, _) in &d.response {
                head.headers.append(k.clone(), v.clone());
            }
            return Action::Continue;
        }
        if let Some(d) = &self.response {
            for (k, v, op) in &d.response {
                apply(&mut head.headers, k, v, *op);
            }
        }
        Action::Continue
    }
}

fn take(s: &Slot) -> Option<Decision> {
    s.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Counts the outcome and turns it into the filter's action.
fn finish(sh: &Shared, outcome: Outcome, slot: &Slot) -> Action {
    let put = |d: Decision| {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    };
    match outcome {
        Outcome::Ok(d) => {
            sh.stats.ok.inc();
            put(d);
            Action::Continue
        }
        Outcome::Denied {
            status,
            body,
            decision,
        } => {
            sh.stats.denied.inc();
            put(decision);
            Action::Respond(LocalReply {
                status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::FORBIDDEN),
                body,
                flag: Some("UAEX"),
                details: "ext_authz_denied",
                grpc_status: None,
            })
        }
        Outcome::Error => {
            sh.stats.error.inc();
            if sh.cfg.failure_mode_allow {
                sh.stats.failure_mode_allowed.inc();
                put(Decision {
                    failure_allowed: true,
                    ..Default::default()
                });
                return Action::Continue;
            }
            Action::Respond(error_reply(sh.cfg.status_on_error))
        }
    }
}

fn error_reply(status: u16) -> LocalReply {
    LocalReply {
        status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::FORBIDDEN),
        body: Bytes::new(),
        flag: Some("UAEX"),
        details: "ext_authz_error",
        grpc_status: None,
    }
}

fn apply(h: &mut HeaderMap, k: &HeaderName, v: &HeaderValue, op: Op) {
    match op {
        Op::Set => {
            h.insert(k.clone(), v.clone());
        }
        Op::Add => {
            h.append(k.clone(), v.clone());
        }
        Op::Append => {
            let joined = {
                let mut all = h.get_all(k).iter().peekable();
                if all.peek().is_none() {
                    return;
                }
                let mut out = Vec::new();
                for (i, x) in all.enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(x.as_bytes());
                }
                out.push(b',');
                out.extend_from_slice(v.as_bytes());
                HeaderValue::from_bytes(&out).ok()
            };
            if let Some(j) = joined {
                h.insert(k.clone(), j);
            }
        }
        Op::AddIfAbsent => {
            if !h.contains_key(k) {
                h.append(k.clone(), v.clone());
            }
        }
        Op::OverwriteIfExists => {
            if h.contains_key(k) {
                h.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The request's headers as Envoy's header map holds them at this point:
/// the pseudo-headers, then the others (lower-case names).
fn request_headers(cx: &FilterContext, head: &http::request::Parts) -> Vec<(String, String)> {
    let authority = head
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            head.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let scheme = head.uri.scheme_str().map(str::to_owned).unwrap_or_else(|| {
        let tls = cx.downstream.as_deref().is_some_and(|d| d.tls);
        if tls { "https" } else { "http" }.to_owned()
    });
    let path = head
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut out = Vec::with_capacity(head.headers.len() + 4);
    out.push((":authority".to_owned(), authority));
    out.push((":path".to_owned(), path));
    out.push((":method".to_owned(), head.method.as_str().to_owned()));
    out.push((":scheme".to_owned(), scheme));
    for (k, v) in &head.headers {
        if k == http::header::HOST {
            continue;
        }
        out.push((
            k.as_str().to_owned(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ));
    }
    out
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn any_match(m: &[StringMatcher], key: &str) -> bool {
    m.iter().any(|m| m.matches(key))
}

fn socket_address(a: std::net::SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// The `CheckRequest`, with the attributes Envoy's
/// `CheckRequestUtils::createHttpCheck` fills.
fn check_request(
    cfg: &ExtAuthz,
    cx: &FilterContext,
    head: &http::request::Parts,
    headers: &[(String, String)],
    context_extensions: BTreeMap<String, String>,
) -> auth::CheckRequest {
    use auth::attribute_context as ac;
    let d = cx.downstream.as_deref();
    let source = d.map(|d| {
        // The URI SAN, else the DNS SAN, else the subject of the peer's
        // certificate.
        let principal = if d.tls {
            d.peer_uri_sans
                .first()
                .or(d.peer_dns_sans.first())
                .cloned()
                .or_else(|| d.peer_subject.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        ac::Peer {
            address: Some(socket_address(d.remote)),
            // As Envoy's `urlEncodedPemEncodedPeerCertificate`.
            certificate: if cfg.include_peer_certificate {
                d.peer_pem.as_deref().map(url_encode).unwrap_or_default()
            } else {
                String::new()
            },
            principal,
            service: header(headers, "x-envoy-downstream-service-cluster").to_owned(),
            ..Default::default()
        }
    });
    let destination = d.map(|d| ac::Peer {
        address: Some(socket_address(d.local)),
        ..Default::default()
    });
    let mut hmap: HashMap<String, String> = HashMap::with_capacity(headers.len());
    for (k, v) in headers {
        if k == "x-envoy-auth-partial-body" {
            continue;
        }
        if let Some(allowed) = &cfg.allowed_headers {
            if !any_match(allowed, k) {
                continue;
            }
        }
        hmap.entry(k.clone())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.clone());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let protocol = match head.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    // `with_request_body`: the whole body (a larger one was refused with a
    // 413 before the check), with Envoy's `x-envoy-auth-partial-body`.
    let (mut body, mut raw_body) = (String::new(), Vec::new());
    if let (Some(b), Some(s)) = (&cx.request_body, cfg.with_request_body) {
        if s.pack_as_bytes {
            raw_body = b.to_vec();
        } else {
            body = String::from_utf8_lossy(b).into_owned();
        }
        hmap.insert("x-envoy-auth-partial-body".to_owned(), "false".to_owned());
    }
    let http = ac::HttpRequest {
        id: rand::random::<u64>().to_string(),
        body,
        raw_body,
        method: head.method.as_str().to_owned(),
        path: header(headers, ":path").to_owned(),
        host: header(headers, ":authority").to_owned(),
        scheme: header(headers, ":scheme").to_owned(),
        protocol: protocol.to_owned(),
        headers: hmap,
        ..Default::default()
    };
    let mut metadata_context = None;
    for ns in &cfg.metadata_context_namespaces {
        if let Some(m) = cx.metadata.namespace(ns) {
            metadata_context
                .get_or_insert_with(core::Metadata::default)
                .filter_metadata
                .insert(ns.clone(), json_struct(m));
        }
    }
    auth::CheckRequest {
        attributes: Some(auth::AttributeContext {
            source,
            destination,
            request: Some(ac::Request {
                time: Some(pb::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(http),
            }),
            context_extensions: context_extensions.into_iter().collect(),
            metadata_context,
            ..Default::default()
        }),
    }
}

fn grpc_outcome(r: auth::CheckResponse) -> Outcome {
    use auth::check_response::HttpResponse as R;
    let status = r.status.as_ref().map(|s| s.code).unwrap_or(0);
    let mut metadata = r.dynamic_metadata.as_ref().map(struct_json);
    if status == 0 {
        let mut d = Decision::default();
        if let Some(R::OkResponse(ok)) = &r.http_response {
            #[allow(deprecated)]
            if let Some(m) = &ok.dynamic_metadata {
                metadata = Some(struct_json(m));
            }
            d.upstream = mutations(&ok.headers, Kind::Request);
            d.remove = ok
                .headers_to_remove
                .iter()
                .filter(|k| removable(k))
                .filter_map(|k| HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok())
                .collect();
            d.response = mutations(&ok.response_headers_to_add, Kind::Response);
        }
        d.metadata = metadata.filter(|m| !m.is_empty());
        return Outcome::Ok(d);
    }
    let mut d = Decision {
        metadata: metadata.filter(|m| !m.is_empty()),
        ..Default::default()
    };
    let mut code = 403;
    let mut body = Bytes::new();
    if let Some(R::DeniedResponse(den)) = r.http_response {
        if let Some(s) = den.status.as_ref().filter(|s| s.code > 0) {
            code = u16::try_from(s.code).unwrap_or(403);
        }
        d.response = mutations(&den.headers, Kind::Denied);
        body = Bytes::from(den.body);
    }
    Outcome::Denied {
        status: code,
        body,
        decision: d,
    }
}

/// As Envoy: pseudo-headers and `host` are not removed.
fn removable(k: &str) -> bool {
    !k.starts_with(':') && !k.eq_ignore_ascii_case("host")
}

/// How a list of `HeaderValueOption`s is read (Envoy 1.40's
/// `ext_authz_grpc_impl.cc`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `OkHttpResponse.headers`: `append: true` appends to an existing
    /// value, anything else (`append_action` included) sets.
    Request,
    /// `DeniedHttpResponse.headers`: as `Request`, and only the set ones
    /// reach the local reply.
    Denied,
    /// `response_headers_to_add`: `append` true adds an entry, false sets;
    /// without `append`, the `append_action`.
    Response,
}

#[allow(deprecated)] // `append`: what services still send.
fn mutations(opts: &[core::HeaderValueOption], kind: Kind) -> Vec<Mutation> {
    use core::header_value_option::HeaderAppendAction as A;
    opts.iter()
        .filter_map(|o| {
            let h = o.header.as_ref()?;
            let append = o.append.as_ref().is_some_and(|b| b.value);
            let op = match kind {
                Kind::Request if append => Op::Append,
                Kind::Denied if append => return None,
                Kind::Request | Kind::Denied => Op::Set,
                Kind::Response => match o.append {
                    Some(pb::BoolValue { value: true }) => Op::Add,
                    Some(pb::BoolValue { value: false }) => Op::Set,
                    None => match A::try_from(o.append_action) {
                        Ok(A::AppendIfExistsOrAdd) => Op::Add,
                        Ok(A::AddIfAbsent) => Op::AddIfAbsent,
                        Ok(A::OverwriteIfExists) => Op::OverwriteIfExists,
                        Ok(A::OverwriteIfExistsOrAdd) | Err(_) => Op::Set,
                    },
                },
            };
            let raw: &[u8] = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            let k = HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).ok()?;
            let v = HeaderValue::from_bytes(raw).ok()?;
            Some((k, v, op))
        })
        .collect()
}

/// The HTTP service's request: `content-length: 0`, the allowed request
/// headers (`:path` behind `path_prefix`), then `headers_to_add`.
/// Percent-encoding of everything but unreserved characters (RFC 3986),
/// as Envoy encodes the peer certificate's PEM.
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

fn http_request(
    h: &HttpAuthzService,
    headers: &[(String, String)],
    body: Option<&Bytes>,
) -> CalloutRequest {
    let mut out = HeaderMap::new();
    let mut method = http::Method::GET;
    let mut path = "/".to_owned();
    let mut authority = String::new();
    for (k, v) in headers {
        let default = matches!(
            k.as_str(),
            "authorization" | ":method" | ":path" | ":authority"
        );
        if k == "content-length" || !(default || any_match(&h.allowed_headers, k)) {
            continue;
        }
        match k.as_str() {
            ":method" => method = http::Method::from_bytes(v.as_bytes()).unwrap_or(method),
            ":path" => path = format!("{}{v}", h.path_prefix),
            ":authority" => authority = v.clone(),
            k if k.starts_with(':') => {}
            _ => {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    out.append(k, v);
                }
            }
        }
    }
    for (k, v) in &h.headers_to_add {
        out.insert(k.clone(), v.clone());
    }
    // `with_request_body`: the request body is the authorization request's.
    let body = body.cloned().unwrap_or_default();
    out.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    CalloutRequest {
        method,
        path_and_query: path,
        authority,
        headers: out,
        body,
    }
}

/// Headers a proxy does not copy from one message to another.
fn hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "content-length"
    )
}

/// Envoy's `RawHttpClientImpl::toResponse`: 5xx is an error, 200 allows,
/// anything else denies with that status and body.
fn http_outcome(h: &HttpAuthzService, r: crate::callout::CalloutResponse) -> Outcome {
    let status = r.status.as_u16();
    if (500..600).contains(&status) {
        return Outcome::Error;
    }
    let mut d = Decision::default();
    if status == 200 {
        for v in r.headers.get_all(HEADERS_TO_REMOVE) {
            if let Ok(s) = v.to_str() {
                for n in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    if removable(n) {
                        if let Ok(n) = HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()) {
                            d.remove.push(n);
                        }
                    }
                }
            }
        }
        let mut metadata = Map::new();
        for (k, v) in &r.headers {
            if k.as_str() == HEADERS_TO_REMOVE {
                continue;
            }
            let key = k.as_str();
            if any_match(&h.allowed_upstream_headers, key) {
                d.upstream.push((k.clone(), v.clone(), Op::Set));
            }
            if any_match(&h.allowed_upstream_headers_to_append, key) {
                d.upstream.push((k.clone(), v.clone(), Op::Add));
            }
            if any_match(&h.allowed_client_headers_on_success, key) {
                d.response.push((k.clone(), v.clone(), Op::Add));
            }
            if any_match(&h.dynamic_metadata_from_headers, key) {
                metadata.insert(
                    key.to_owned(),
                    Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                );
            }
        }
        if !metadata.is_empty() {
            d.metadata = Some(metadata);
        }
        return Outcome::Ok(d);
    }
    for (k, v) in &r.headers {
        if k.as_str() == HEADERS_TO_REMOVE || hop_by_hop(k) {
            continue;
        }
        let key = k.as_str();
        // Without `allowed_client_headers` every header goes to the client
        // (Envoy: all but `:authority`); with it, those and Envoy's
        // `www-authenticate` and `location`.
        let allowed = if h.allowed_client_headers.is_empty() {
            true
        } else {
            matches!(key, "www-authenticate" | "location")
                || any_match(&h.allowed_client_headers, key)
        };
        if allowed {
            d.response.push((k.clone(), v.clone(), Op::Add));
        }
    }
    let mut metadata = Map::new();
    for (k, v) in &r.headers {
        if any_match(&h.dynamic_metadata_from_headers, k.as_str()) {
            metadata.insert(
                k.as_str().to_owned(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            );
        }
    }
    if !metadata.is_empty() {
        d.metadata = Some(metadata);
    }
    Outcome::Denied {
        status,
        body: r.body,
        decision: d,
    }
}

/// `google.protobuf.Struct` to a JSON object.
fn struct_json(s: &pb::Struct) -> Map<String, Value> {
    match xds_client::translate::struct_to_json(s) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A JSON object to a `google.protobuf.Struct`.
fn json_struct(m: &Map<String, Value>) -> pb::Struct {
    pb::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
    }
}

fn json_value(v: &Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(pb::ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_struct(o)),
    };
    pb::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(deprecated)]
    fn hv(k: &str, v: &str, append: Option<bool>) -> core::HeaderValueOption {
        core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append: append.map(|value| pb::BoolValue { value }),
            ..Default::default()
        }
    }

    #[test]
    fn request_mutations_set_append_and_add() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        let m = mutations(
            &[
                hv("X-A", "2", Some(false)),
                hv("x-b", "2", Some(true)),
                hv("x-c", "3", Some(true)),
                hv("x-d", "4", None),
            ],
            Kind::Request,
        );
        for (k, v, op) in &m {
            apply(&mut h, k, v, *op);
        }
        assert_eq!(h["x-a"], "2");
        assert_eq!(h["x-b"], "1,2");
        assert!(h.get("x-c").is_none(), "append needs an existing header");
        assert_eq!(h["x-d"], "4");
    }

    #[test]
    fn denied_grpc_defaults_to_403() {
        let r = auth::CheckResponse {
            status: Some(xds_client::api::google::rpc::Status {
                code: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        match grpc_outcome(r) {
            Outcome::Denied { status, body, .. } => {
                assert_eq!(status, 403);
                assert!(body.is_empty());
            }
            _ => panic!("denied expected"),
        }
    }

    #[test]
    fn json_struct_round_trip() {
        let v = serde_json::json!({"a": "x", "b": true, "c": {"d": [1.0, "e"]}});
        let Value::Object(m) = v else { unreachable!() };
        assert_eq!(struct_json(&json_struct(&m)), m);
    }
}
