//! The per-request pipeline: checks, edge headers, routing, filters, the
//! router, response headers, stats and access logs.
use std::{net::SocketAddr, sync::Arc};

use http::{header, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use rand::Rng;
use tokio::time::Instant;
use xds_client::config::{
    HttpConnectionManager, RequestInfo, RouteKind, ServerHeaderTransformation, StripPort,
    TlsRequirement, UnderscoreAction,
};

use super::headers::{self, PathCheck};
use super::info::{Flags, ReqStr, StreamInfo};
use super::local_reply::{reply, reply_owned};
use super::router::{self, Forward};
use crate::body::Body;
use crate::Shared;

/// An HCM's route table: inline, or an RDS slot swapped on updates.
pub enum RouteSlot {
    Static(Arc<xds_client::config::RouteConfig>),
    Rds(Arc<arc_swap::ArcSwap<xds_client::config::RouteConfig>>),
}

impl RouteSlot {
    /// The table for one request.
    pub fn load(&self) -> Arc<xds_client::config::RouteConfig> {
        match self {
            RouteSlot::Static(r) => r.clone(),
            RouteSlot::Rds(s) => s.load_full(),
        }
    }
}

/// The HTTP connection manager of one listener at run time.
pub struct HcmRuntime {
    pub config: Arc<HttpConnectionManager>,
    pub routes: RouteSlot,
    pub chain: filters::FilterChain,
    pub stats: crate::metrics::HttpStats,
    /// `http.<prefix>.tracing.*` (every HCM has them, as Envoy).
    pub tracing: super::tracing::TracingStats,
    /// The span exporter of `tracing.provider`.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    pub logs: Vec<Arc<crate::access_log::Logger>>,
    pub listener_port: u16,
    /// The listener's `per_connection_buffer_limit_bytes`.
    pub buffer_limit: u32,
}

static NO_MUTATIONS: xds_client::config::HeaderMutations = xds_client::config::HeaderMutations {
    request_add: Vec::new(),
    request_remove: Vec::new(),
    response_add: Vec::new(),
    response_remove: Vec::new(),
};

/// Marks a request whose stream is reset instead of answered.
const RESET_STREAM: &str = "reset_stream";

/// The service error: hyper resets the HTTP/2 stream (or closes an
/// HTTP/1 connection) without a response.
#[derive(Debug, thiserror::Error)]
#[error("stream reset")]
pub struct StreamReset;

/// Per-connection facts.
pub struct ConnCtx {
    pub hcm: Arc<HcmRuntime>,
    /// An internal connection's unrestored addresses (Envoy's names).
    pub internal_addrs: Option<Arc<crate::internal::InternalAddrs>>,
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// A listener filter restored `local` (an ORIGINAL_DST cluster's last
    /// source of a destination).
    pub local_restored: bool,
    /// The connection's dynamic metadata (PROXY protocol `rules`): not a
    /// stream's (which starts empty, as Envoy's), read by an ORIGINAL_DST
    /// cluster's `metadata_key` after the request's.
    pub metadata: filters::DynamicMetadata,
    pub id: u64,
    pub scheme: &'static str,
    /// The socket's own peer (differs from `peer` after PROXY protocol).
    pub direct_peer: SocketAddr,
    /// SNI found by tls_inspector (Envoy's requested server name).
    pub sni: Option<String>,
    /// TLS facts when weir terminated TLS on this connection.
    pub tls: Option<Arc<crate::tls::DownstreamTlsInfo>>,
    /// Streams in flight on this connection (for the HCM idle timeout).
    pub active_streams: std::sync::atomic::AtomicU32,
    /// When the connection last became idle, in ms since `opened`.
    pub idle_since_ms: std::sync::atomic::AtomicU64,
    pub opened: Instant,
    /// Whether the connection's protocol was counted.
    pub proto_counted: std::sync::atomic::AtomicBool,
    /// The listener's drain signal: while draining, HTTP/1 responses close.
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// Set when the drain comes from a configuration update of this
    /// connection's filter chain (not a shutdown): HTTP/1 connections are
    /// not closed while idle (a client could be sending on them); each
    /// closes with its next response, or when the drain time ends.
    pub update_drain: Arc<std::sync::atomic::AtomicBool>,
    /// The connection speaks HTTP/2 (known at its first request).
    pub is_h2: std::sync::atomic::AtomicBool,
    /// Requests answered (HTTP/1) or streams started (HTTP/2) on this
    /// connection, for `max_requests_per_connection`.
    pub requests: std::sync::atomic::AtomicU32,
    /// Woken when an HTTP/2 connection's stream reaches
    /// `max_requests_per_connection`: the connection then drains (GOAWAY).
    pub max_requests_reached: tokio::sync::Notify,
    /// What HTTP filters see of the connection (`None` when the chain is
    /// router-only).
    pub downstream: Option<Arc<filters::Downstream>>,
    /// What an upstream PROXY protocol header says of this connection.
    pub proxy_source: Arc<crate::upstream::proxy_protocol::ProxySource>,
}

impl ConnCtx {
    fn stream_done(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.idle_since_ms
            .store(self.opened.elapsed().as_millis() as u64, Relaxed);
        self.active_streams.fetch_sub(1, Relaxed);
    }

    /// Resolves once the connection has had no stream for `idle` (Envoy's
    /// HCM `idle_timeout`); pending forever when `idle` is `None`.
    pub async fn idle_timeout(&self, idle: Option<std::time::Duration>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let since =
                self.opened + std::time::Duration::from_millis(self.idle_since_ms.load(Relaxed));
            if self.active_streams.load(Relaxed) == 0 && since.elapsed() >= idle {
                return;
            }
            let wait = if self.active_streams.load(Relaxed) == 0 {
                (since + idle).saturating_duration_since(Instant::now())
            } else {
                idle
            };
            tokio::time::sleep(wait.max(std::time::Duration::from_millis(1))).await;
        }
    }
}

/// The hyper service entry point; never fails (errors become responses).
pub async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<Body>, StreamReset> {
    let start = Instant::now();
    let hcm = &ctx.hcm;
    ctx.active_streams
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if !ctx
        .proto_counted
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        // A connection's protocol is known at its first request.
        if req.version() == Version::HTTP_2 {
            ctx.is_h2.store(true, std::sync::atomic::Ordering::Relaxed);
            hcm.stats.cx_http2_total.inc();
        } else {
            hcm.stats.cx_http1_total.inc();
        }
    }
    // common_http_protocol_options.max_requests_per_connection on HTTP/2
    // (Envoy's `newStream`): the stream that reaches the limit starts the
    // connection's drain (GOAWAY, see `server::serve`) and is served, as
    // are streams already open; each stream at or past the limit counts.
    // HTTP/1 counts its responses in `finish`.
    if let (Some(m), Version::HTTP_2) = (hcm.config.max_requests_per_connection, req.version()) {
        let n = ctx
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n >= m {
            hcm.stats.cx_max_requests_reached.inc();
            if n == m {
                ctx.max_requests_reached.notify_one();
            }
        }
    }
    hcm.stats.rq_total.inc();
    hcm.stats.rq_active.inc();
    let (mut parts, body) = req.into_parts();
    if parts.method == http::Method::CONNECT {
        h2_extended_connect(&mut parts);
    }
    let protocol = match parts.version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    };
    // Refcounted clones of the parsed head, not copies.
    let authority = match parts.uri.authority() {
        Some(a) => ReqStr::Authority(a.clone()),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(ReqStr::header)
            .unwrap_or_default(),
    };
    let path = request_path(&parts.uri);
    let mut info = StreamInfo::new(
        start,
        protocol,
        parts.method.clone(),
        path,
        authority,
        ctx.scheme,
        ctx.peer,
        ctx.local,
        ctx.id,
    );
    info.downstream_direct_remote = ctx.direct_peer;
    info.requested_server_name = ctx.sni.clone();
    info.internal_addrs = ctx.internal_addrs.clone();
    if let Some(t) = &ctx.tls {
        info.tls = Some(t.clone());
    }
    // The connection's objects (network set_filter_state, or what an
    // internal connection brought) under the request's, as Envoy's stream
    // filter state with its connection parent, whether or not a filter
    // runs.
    if let Some(d) = ctx
        .downstream
        .as_deref()
        .filter(|d| !d.filter_state.is_empty())
    {
        info.filter_state = d.filter_state.clone();
    }
    // The request's wire size, before anything changes its headers (chains
    // with HTTP filters only: `istio.stats` records it).
    if ctx.downstream.is_some() {
        info.request_wire = super::wire::request(&parts);
    }
    let mut head_request = parts.method == http::Method::HEAD;
    let body_empty = hyper::body::Body::is_end_stream(&body);
    let h2 = parts.version == Version::HTTP_2;
    let mut redirects = super::redirect::State::default();
    let mut resp = pipeline(
        &ctx,
        &mut parts,
        Some(body),
        None,
        &mut info,
        &mut redirects,
    )
    .await;
    // A followed internal redirect: Envoy recreates the stream, so the new
    // request runs the whole pipeline again (route, filters, cluster); only
    // the final stream is logged.
    while let Some(next) = redirects.next.take() {
        // As Envoy, the recreated stream counts as a request and is logged:
        // the redirect's status, the new request's headers and path, the
        // new route's cluster (its headers were changed in place).
        hcm.stats.rq_total.inc();
        if !ctx.hcm.logs.is_empty() {
            info.response_code = next.status;
            info.path = request_path(&next.head.uri);
            info.request_headers = Some(Box::new(next.head.headers.clone()));
            info.response_headers = Some(Box::new(resp.headers().clone()));
            info.upstream_cluster = next.cluster.clone();
            info.duration = Some(info.start_instant.elapsed());
            for l in &ctx.hcm.logs {
                l.log(&info);
            }
        }
        parts = next.head;
        head_request = parts.method == http::Method::HEAD;
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(ReqStr::header)
            .unwrap_or_default();
        let path = request_path(&parts.uri);
        let mut next_info = StreamInfo::new(
            start,
            protocol,
            parts.method.clone(),
            path,
            authority,
            ctx.scheme,
            ctx.peer,
            ctx.local,
            ctx.id,
        );
        next_info.downstream_direct_remote = ctx.direct_peer;
        next_info.requested_server_name = ctx.sni.clone();
        next_info.tls = info.tls.take();
        next_info.request_wire = info.request_wire;
        info = next_info;
        resp = pipeline(
            &ctx,
            &mut parts,
            None,
            Some(next.body),
            &mut info,
            &mut redirects,
        )
        .await;
    }
    if info.response_code_details == RESET_STREAM {
        ctx.hcm.stats.rq_active.dec();
        ctx.hcm.stats.rq_reset.inc();
        ctx.stream_done();
        return Err(StreamReset);
    }
    info.local_reply = info.response_code_details != "via_upstream";
    match info.response_code_details {
        router::STREAM_IDLE_TIMEOUT => ctx.hcm.stats.rq_idle_timeout.inc(),
        router::REQUEST_TIMEOUT => ctx.hcm.stats.rq_timeout.inc(),
        router::MAX_DURATION_TIMEOUT => ctx.hcm.stats.rq_max_duration_reached.inc(),
        _ => {}
    }
    info.request_body_unread = !body_empty && info.local_reply && info.upstream_cluster.is_none();
    let resp = if info.local_reply {
        shape_local_reply(resp, &info, head_request, h2)
    } else {
        resp
    };
    let tunnel = parts
        .extensions
        .get::<super::connect::PendingTunnel>()
        .and_then(|t| t.take());
    let mut resp = finish(&ctx, resp, info, parts.headers, tunnel);
    if h2 {
        super::server::mark_unindexed(resp.headers_mut());
    }
    Ok(resp)
}

/// RFC 8441 extended CONNECT (HTTP/2 `:protocol`, offered with
/// `http2_protocol_options.allow_connect`): as Envoy's codec, the request
/// becomes the HTTP/1.1 upgrade it stands for (`GET`, `upgrade:
/// <protocol>`, `connection: upgrade`), so routes, `upgrade_configs` and
/// filters see a websocket upgrade whatever the downstream protocol. The
/// router proxies it as any upgrade; `finish` turns the accepted upgrade's
/// `101` into the `200` the client gets, and hyper hands the stream over
/// once that `200` is written.
fn h2_extended_connect(parts: &mut http::request::Parts) {
    let Some(p) = parts.extensions.remove::<hyper::ext::Protocol>() else {
        return;
    };
    let Ok(v) = HeaderValue::from_str(p.as_str()) else {
        return;
    };
    parts.method = http::Method::GET;
    parts.headers.insert(header::UPGRADE, v);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The request's path and query as the stream info keeps it (`/` when the
/// target has none).
fn request_path(uri: &http::Uri) -> ReqStr {
    uri.path_and_query()
        .map_or(ReqStr::Static("/"), |p| ReqStr::Path(p.clone()))
}

async fn pipeline(
    ctx: &Arc<ConnCtx>,
    parts: &mut http::request::Parts,
    mut body: Option<Incoming>,
    replay: Option<bytes::Bytes>,
    info: &mut StreamInfo,
    redirects: &mut super::redirect::State,
) -> Response<Body> {
    let h = &ctx.hcm.config;
    // --- protocol checks (Envoy's codec-level rejections)
    if parts.version == Version::HTTP_10 && !h.http1.accept_http_10 {
        info.flags.set(Flags::DPE);
        info.response_code_details = "low_version";
        return reply(426, "Upgrade Required");
    }
    if info.authority.is_empty() {
        if let Some(d) = &h.http1.default_host_for_http_10 {
            if parts.version == Version::HTTP_10 {
                info.authority = d.clone().into();
            }
        }
    }
    // A missing Host is an error; an empty one is routed as "" (Envoy).
    if info.authority.is_empty() && !parts.headers.contains_key(header::HOST) {
        info.flags.set(Flags::DPE);
        info.response_code_details = "missing_host_header";
        return reply(400, "Bad Request");
    }
    // Envoy counts the request line toward max_request_headers_kb.
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + parts.method.as_str().len()
        + info.path.len()
        + 12;
    if parts.headers.len() > h.max_headers_count as usize
        || header_bytes > h.max_request_headers_kb as usize * 1024
    {
        info.flags.set(Flags::DPE);
        info.response_code_details = "header_overflow";
        if parts.version == Version::HTTP_2 {
            // Envoy's HTTP/2 codec resets the stream instead of answering.
            info.response_code_details = RESET_STREAM;
        }
        return reply(431, "Request Header Fields Too Large");
    }
    if parts.version != Version::HTTP_2 {
        if let Some((status, details)) = http1_checks(parts, &info.authority) {
            info.flags.set(Flags::DPE);
            info.response_code_details = details;
            let text = if status == 501 {
                "Not Implemented"
            } else {
                "Bad Request"
            };
            return reply(status, text);
        }
    }
    if h.headers_with_underscores != UnderscoreAction::Allow {
        let bad: Vec<_> = parts
            .headers
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        if !bad.is_empty() {
            if h.headers_with_underscores == UnderscoreAction::RejectRequest {
                info.flags.set(Flags::DPE);
                info.response_code_details = "unexpected_underscore";
                return reply(400, "");
            }
            for k in bad {
                parts.headers.remove(k);
            }
        }
    }
    // HTTP/2 splits cookies into several headers; Envoy joins them with "; ".
    if parts.version == Version::HTTP_2
        && parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .nth(1)
            .is_some()
    {
        let joined: Vec<&[u8]> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    // --- path normalisation
    if parts.method != http::Method::CONNECT {
        match headers::normalize(h, &info.path) {
            PathCheck::Ok(None) => {}
            PathCheck::Ok(Some(p)) => {
                if let Ok(pq) = p.parse::<http::uri::PathAndQuery>() {
                    let mut up = std::mem::take(&mut parts.uri).into_parts();
                    up.path_and_query = Some(pq);
                    parts.uri = http::Uri::from_parts(up).unwrap_or_default();
                    info.path = p.into();
                }
            }
            PathCheck::Reject => {
                info.flags.set(Flags::DPE);
                info.response_code_details = "path_normalization_failed";
                return reply(400, "");
            }
            PathCheck::Redirect(p) => {
                let mut r = reply(307, "");
                if let Ok(v) = HeaderValue::from_str(&p) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
        }
    }
    // --- host port stripping
    match h.strip_port {
        StripPort::None => {}
        StripPort::Any | StripPort::Matching => {
            let stripped = xds_client::config::strip_port(&info.authority);
            if stripped.len() != info.authority.len() {
                let port = &info.authority[stripped.len() + 1..];
                if h.strip_port == StripPort::Any || port == ctx.hcm.listener_port.to_string() {
                    info.authority = stripped.into();
                }
            }
        }
    }
    // --- edge headers
    // The route table is pinned for the whole request: an RDS update applies
    // to the next request.
    let routes = ctx.hcm.routes.load();
    let rc: &xds_client::config::RouteConfig = &routes;
    let edge = match redirects.edge {
        Some(e) => e,
        None => headers::edge(
            h,
            &rc.internal_only_headers,
            &mut parts.headers,
            ctx.peer,
            ctx.scheme,
            ctx.shared.options.local_address_ip_version == crate::cli::IpVersion::V6,
            ctx.tls.as_deref(),
        ),
    };
    redirects.edge = Some(edge);
    info.grpc = is_grpc(&parts.headers);
    info.downstream_remote = edge.remote;
    // --- routing
    // The route is selected first (filters read its per-route config), but,
    // as Envoy, every decoder filter runs before the router acts on it: no
    // route (404), a TLS redirect, a direct response or a redirect.
    let vh = rc.select_vhost(&info.authority);
    // As Envoy, the (trusted) x-forwarded-proto decides whether TLS was used.
    let xfp_https = parts
        .headers
        .get(&headers::XFP)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    // Envoy's `SslRedirectRoute`: a route without per-filter config.
    let tls_redirect = vh.is_some_and(|vh| {
        !xfp_https
            && (vh.require_tls == TlsRequirement::All
                || (vh.require_tls == TlsRequirement::ExternalOnly && !edge.internal))
    });
    let route = match vh {
        Some(vh) if !tls_redirect => {
            let (path_only, query) = match info.path.find('?') {
                Some(i) => (&info.path[..i], Some(&info.path[i + 1..])),
                None => (info.path.as_str(), None),
            };
            let random_ppm = if vh
                .routes
                .iter()
                .any(|r| r.matcher.runtime_fraction_ppm.is_some())
            {
                rand::rng().random_range(0..1_000_000)
            } else {
                0
            };
            let rinfo = RequestInfo {
                method: &parts.method,
                path: path_only,
                query,
                full_path: &info.path,
                authority: &info.authority,
                scheme: ctx.scheme,
                headers: &parts.headers,
                is_connect: parts.method == http::Method::CONNECT,
                peer_cert: ctx.tls.as_ref().is_some_and(|t| t.peer.is_some()),
                random_ppm,
            };
            vh.select_route(&rinfo)
        }
        _ => None,
    };
    if let Some(route) = route {
        info.route_name = (!route.name.is_empty()).then(|| route.name.clone());
    }
    // As Envoy, the trace decision follows routing (a route's `tracing`
    // samples instead of the HCM's).
    if let Some(t) = &h.tracing {
        let route_tracing = route.and_then(|r| r.tracing.as_ref());
        let reason =
            super::tracing::decide(t, route_tracing, &h.request_id, &mut parts.headers, || {
                rand::rng().random::<u64>()
            });
        ctx.hcm.tracing.charge(reason);
        if let Some(tracer) = &ctx.hcm.tracer {
            info.span.span = tracer.start_span(
                t,
                route_tracing.map_or(&[][..], |r| &r.custom_tags),
                &parts.headers,
                reason != super::tracing::Reason::NotTraceable,
                info.start,
                &info.authority,
            );
            if let Some(s) = &mut info.span.span {
                s.set_request(
                    &parts.headers,
                    parts.method.as_str(),
                    &info.path,
                    info.protocol,
                    &ctx.direct_peer.ip().to_string(),
                );
            }
        }
    }
    // `edge` strips x-envoy-force-trace from every request that is not
    // internal (Envoy honours it only on internal requests): no lookup then.
    info.force_trace = edge.internal && parts.headers.contains_key("x-envoy-force-trace");
    info.request_id = parts.headers.get(&headers::X_REQUEST_ID).cloned();
    if let Some(t) = &h.tracing {
        info.span.decorate(
            t.egress,
            route.and_then(|r| r.decorator.as_ref()),
            &mut parts.headers,
        );
    }
    // --- filters (decode)
    // As Envoy, a weighted cluster is picked with the route, before the
    // filters (the fault filter's `upstream_cluster` compares it); without
    // filters the router picks it.
    let mut weighted_pick = None;
    let mut instances = if ctx.hcm.chain.is_router_only() {
        filters::Instances::new()
    } else {
        match (route, vh) {
            (Some(route), Some(vh)) => {
                let route_cluster = match &route.action {
                    RouteKind::Forward(a) => match &a.cluster {
                        xds_client::config::ClusterSpecifier::Name(n) => Some(&**n),
                        xds_client::config::ClusterSpecifier::Header(h) => {
                            parts.headers.get(h).and_then(|v| v.to_str().ok())
                        }
                        xds_client::config::ClusterSpecifier::Weighted(w) => {
                            let i = router::pick_weighted(w);
                            weighted_pick = Some(i);
                            Some(&*w.clusters[i].name)
                        }
                    },
                    _ => None,
                };
                let rate_limits = match &route.action {
                    RouteKind::Forward(a) => Some(filters::RouteRateLimits {
                        route: &a.rate_limits,
                        vhost: &vh.rate_limits,
                        include_vh: a.include_vh_rate_limits,
                    }),
                    _ => None,
                };
                ctx.hcm.chain.instantiate(&filters::RouteView {
                    per_filter: [&route.per_filter, &vh.per_filter, &rc.per_filter],
                    cluster: route_cluster,
                    request: Some(parts),
                    rate_limits,
                })
            }
            // No route (or the TLS redirect): no per-route config, as
            // Envoy's `mostSpecificPerFilterConfig` without a route entry.
            _ => ctx.hcm.chain.instantiate(&filters::RouteView {
                request: Some(parts),
                ..filters::RouteView::empty()
            }),
        }
    };
    // The request body, when a filter had it buffered (or the replay of an
    // internal redirect).
    let mut buffered: Option<bytes::Bytes> = replay;
    // One context for every phase of the request: what a filter leaves in
    // filter state or dynamic metadata is there for the later phases
    // (empty, allocation-free, when no filter runs).
    let mut fcx = filters::FilterContext::default();
    if !instances.is_empty() {
        fcx = filters::FilterContext {
            route_name: info.route_name.clone(),
            internal: edge.internal,
            downstream: ctx.downstream.clone(),
            downstream_remote: Some(edge.remote),
            ..Default::default()
        };
        let mut source = BodySource(&mut body, buffered.clone());
        let mut lr = filters::run_request_headers_with_body(
            &mut instances,
            &mut fcx,
            parts,
            Some(&mut source),
        )
        .await;
        // A filter read the body in its header phase (ext_authz
        // `with_request_body`): it goes upstream from the buffer.
        if let Some(b) = fcx.request_body.clone() {
            if !parts.headers.contains_key(header::CONTENT_LENGTH) {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            }
            buffered = Some(b);
        }
        keep_filter_state(info, &fcx);
        for f in fcx.flags.drain(..) {
            info.flags.set(Flags::from_short(f));
        }
        // The buffer filter: the whole request body before the router acts
        // (too large: 413, as Envoy's connection manager answers).
        if lr.is_none() {
            let max = instances
                .iter()
                .filter_map(|f| f.buffer_request_body())
                .min();
            if let Some(max) = max {
                // Already read by a filter, or replayed by an internal
                // redirect: only the limit applies.
                let read = match (buffered.take(), body.as_mut()) {
                    (Some(b), _) if b.len() as u64 > max => Err(payload_too_large()),
                    (Some(b), _) => Ok(Some(b)),
                    (None, Some(body)) => Box::pin(buffer_body(body, max)).await.map(Some),
                    (None, None) => Ok(None),
                };
                match read {
                    Ok(Some(b)) => {
                        if !parts.headers.contains_key(header::CONTENT_LENGTH) {
                            parts
                                .headers
                                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                        }
                        buffered = Some(b);
                    }
                    Ok(None) => {}
                    Err(lr2) => lr = Some(lr2),
                }
            }
        }
        if let Some(lr) = lr {
            if let Some(f) = lr.flag {
                info.flags.set(Flags::from_short(f));
            }
            info.response_code_details = lr.details;
            info.local_grpc_status = lr.grpc_status;
            let resp = reply_owned(lr.status.as_u16(), lr.body, Some("text/plain"));
            // As Envoy, a filter's local reply passes every filter's
            // response phases (CORS and the rate limit add headers there,
            // the compressor may compress it).
            let (mut rp, mut rb) = resp.into_parts();
            fcx.end_stream = http_body::Body::is_end_stream(&rb);
            fcx.upstream_host = info.upstream_workload_addr();
            let lr = filters::run_response_headers(&mut instances, &mut fcx, &mut rp);
            keep_filter_state(info, &fcx);
            if let Some(lr) = lr {
                info.filter_log.keep(&mut instances, &mut fcx);
                return reply_owned(lr.status.as_u16(), lr.body, Some("text/plain"));
            }
            info.filter_log.keep(&mut instances, &mut fcx);
            if let Some(chain) = filters::ResponseBodyChain::new(instances) {
                rb = rb.filtered(chain);
            }
            return Response::from_parts(rp, rb);
        }
    }
    // --- the router acts on the route
    // A borrow of the pinned table, not an `Arc` clone.
    let Some(vh) = vh else {
        info.flags.set(Flags::NR);
        info.response_code_details = "route_not_found";
        ctx.hcm.stats.no_route.inc();
        info.filter_log.keep(&mut instances, &mut fcx);
        return reply(404, "");
    };
    if tls_redirect {
        let mut r = reply(301, "");
        if let Ok(v) = HeaderValue::from_str(&format!("https://{}{}", info.authority, info.path)) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        info.response_code_details = "direct_response";
        info.filter_log.keep(&mut instances, &mut fcx);
        return r;
    }
    let Some(route) = route else {
        info.flags.set(Flags::NR);
        info.response_code_details = "route_not_found";
        ctx.hcm.stats.no_route.inc();
        info.filter_log.keep(&mut instances, &mut fcx);
        return reply(404, "");
    };
    // Only filters with a request body hook wrap the body (none: no cost).
    let request_observer = filters::request_body_observer(&mut instances);
    fn levels<'a>(
        weighted: Option<&'a xds_client::config::HeaderMutations>,
        route: &'a xds_client::config::Route,
        vh: &'a xds_client::config::VirtualHost,
        rc: &'a xds_client::config::RouteConfig,
    ) -> [&'a xds_client::config::HeaderMutations; 4] {
        [
            weighted.unwrap_or(&NO_MUTATIONS),
            &route.headers,
            &vh.headers,
            &rc.headers,
        ]
    }
    let mut resp = match &route.action {
        RouteKind::Direct(d) => {
            info.response_code_details = "direct_response";
            ctx.hcm.stats.rq_direct_response.inc();
            let ct = d.body.as_ref().map(|_| "text/plain");
            let mut r = reply_owned(d.status, d.body.clone().unwrap_or_default(), ct);
            // As Envoy: a 201 or 3xx direct response points Location at the request URL.
            if d.status == 201 || (300..400).contains(&d.status) {
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "{}://{}{}",
                    ctx.scheme, info.authority, info.path
                )) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
            }
            r
        }
        RouteKind::Redirect(r) => {
            info.response_code_details = "direct_response";
            ctx.hcm.stats.rq_redirect.inc();
            let mut resp = reply(r.status, "");
            let loc = redirect_location(
                r,
                &route.matcher.path,
                ctx.scheme,
                &info.authority,
                &info.path,
            );
            if let Ok(v) = HeaderValue::from_str(&loc) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        // CONNECT termination (`connect.rs`): the route's CONNECT upgrade
        // has a `connect_config`. Its 200 (or failure) then gets the
        // response header mutations and encode phases below.
        RouteKind::Forward(action)
            if action.connect_terminate && parts.method == http::Method::CONNECT =>
        {
            if !upgrade_enabled(action, h, "connect") {
                info.response_code_details = "upgrade_failed";
                info.filter_log.keep(&mut instances, &mut fcx);
                return reply(403, "");
            }
            match router::select_cluster(
                &ctx.shared.clusters,
                action,
                &parts.headers,
                weighted_pick,
            ) {
                Ok(target) => {
                    if !ctx.hcm.logs.is_empty() {
                        info.request_headers = Some(Box::new(parts.headers.clone()));
                    }
                    // Boxed: a CONNECT's tunnel set-up would otherwise
                    // enlarge every request's future.
                    Box::pin(super::connect::terminate(
                        ctx,
                        action,
                        target,
                        parts,
                        info,
                        action.idle_timeout.or(h.stream_idle_timeout),
                        action.max_stream_duration.or(h.max_stream_duration),
                    ))
                    .await
                }
                Err(status) => {
                    info.response_code_details = "cluster_not_found";
                    ctx.hcm.stats.no_cluster.inc();
                    info.flags.set(Flags::NC);
                    reply(status, "")
                }
            }
        }
        RouteKind::Forward(action) => {
            // Upgrades (websocket) must be enabled in upgrade_configs, and not
            // disabled on the route; others are refused as Envoy (403).
            let mut upgrade_type = upgrade_request(parts);
            // `upgrade: h2c` is ignored (Envoy): the request goes on as HTTP/1.1.
            if upgrade_type
                .as_ref()
                .is_some_and(|t| t.as_bytes().eq_ignore_ascii_case(b"h2c"))
            {
                upgrade_type = None;
                parts.headers.remove(header::UPGRADE);
                parts.headers.remove("http2-settings");
            }
            if let Some(t) = &upgrade_type {
                let name = t.to_str().unwrap_or("").to_ascii_lowercase();
                if !upgrade_enabled(action, h, &name) {
                    info.response_code_details = "upgrade_failed";
                    info.filter_log.keep(&mut instances, &mut fcx);
                    return reply(403, "");
                }
            }
            // CONNECT is an upgrade too (Envoy's upgrade type is the method).
            if upgrade_type.is_none()
                && parts.method == http::Method::CONNECT
                && !upgrade_enabled(action, h, "connect")
            {
                info.response_code_details = "upgrade_failed";
                info.filter_log.keep(&mut instances, &mut fcx);
                return reply(403, "");
            }
            let target = match router::select_cluster(
                &ctx.shared.clusters,
                action,
                &parts.headers,
                weighted_pick,
            ) {
                Ok(t) => t,
                Err(status) => {
                    info.response_code_details = "cluster_not_found";
                    ctx.hcm.stats.no_cluster.inc();
                    info.flags.set(0);
                    info.filter_log.keep(&mut instances, &mut fcx);
                    return reply(status, "");
                }
            };
            let weighted = target.weighted_index.and_then(|i| match &action.cluster {
                xds_client::config::ClusterSpecifier::Weighted(w) => w.clusters.get(i),
                _ => None,
            });
            // Path and host rewrites.
            if let Some(p) = router::rewrite_path(action, &route.matcher.path, &info.path) {
                if let Ok(pq) = p.parse::<http::uri::PathAndQuery>() {
                    if let Ok(v) = HeaderValue::from_str(&info.path) {
                        if !ctx.hcm.chain.router.suppress_envoy_headers() {
                            parts
                                .headers
                                .insert(headers::X_ENVOY_ORIGINAL_PATH.clone(), v);
                        }
                    }
                    let mut up = std::mem::take(&mut parts.uri).into_parts();
                    up.path_and_query = Some(pq);
                    parts.uri = http::Uri::from_parts(up).unwrap_or_default();
                }
            }
            let weighted_host = weighted.and_then(|w| w.host_rewrite.clone());
            let route_host = if weighted_host.is_none() {
                router::host_rewrite(action, &parts.headers, &info.path, None)
            } else {
                None
            };
            if let Some(nh) = weighted_host {
                if action.append_x_forwarded_host {
                    if let Ok(v) = HeaderValue::from_str(&info.authority) {
                        headers::append_joined(
                            &mut parts.headers,
                            &headers::X_FORWARDED_HOST,
                            &v,
                            ",",
                        );
                    }
                }
                info.authority = nh.into();
            }
            if let Some(nh) = route_host {
                if let Ok(v) = HeaderValue::from_str(&info.authority) {
                    if action.append_x_forwarded_host {
                        headers::append_joined(
                            &mut parts.headers,
                            &headers::X_FORWARDED_HOST,
                            &v,
                            ",",
                        );
                    }
                    if !ctx.hcm.chain.router.suppress_envoy_headers() {
                        parts
                            .headers
                            .insert(headers::X_ENVOY_ORIGINAL_HOST.clone(), v);
                    }
                }
                info.authority = nh.into();
            }
            headers::set_host(&mut parts.headers, &info.authority);
            let lv = levels(weighted.map(|w| &w.headers), route, vh, rc);
            headers::apply_levels(
                &mut parts.headers,
                &lv,
                true,
                rc.most_specific_header_mutations_wins,
                info,
            );
            if !ctx.hcm.logs.is_empty() {
                info.request_headers = Some(Box::new(parts.headers.clone()));
            }
            let mut kept = None;
            let redirect_policy = action.internal_redirect.as_ref();
            let mut f = Forward {
                action,
                route_path: &route.matcher.path,
                vhost_retry: vh.retry_policy.as_ref(),
                hedge_on_per_try_timeout: action
                    .hedge_on_per_try_timeout
                    .or(vh.hedge_on_per_try_timeout)
                    .unwrap_or(false),
                trusted: edge.trusted,
                include_attempt_count: vh.include_request_attempt_count,
                suppress_envoy_headers: ctx.hcm.chain.router.suppress_envoy_headers(),
                downstream_h2: parts.version == Version::HTTP_2,
                upgrade: None,
                buffer_limit: ctx.hcm.buffer_limit,
                state: {
                    let st = crate::body::StreamState::new(info.start_instant);
                    if body.as_ref().is_none_or(hyper::body::Body::is_end_stream) {
                        st.request_complete
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    info.stream = Some(st.clone());
                    st
                },
                timers: router::StreamTimers {
                    idle: action.idle_timeout.or(h.stream_idle_timeout),
                    request: h.request_timeout,
                    max_duration: grpc_timeout(action, &parts.headers)
                        .or(action.max_stream_duration)
                        .or(h.max_stream_duration),
                },
                request_observer,
                proxy_source: ctx.proxy_source.clone(),
                conn_state: ctx.downstream.as_deref().map(|d| &d.filter_state),
                restored_local: ctx.local_restored.then_some(ctx.local),
                conn_metadata: Some(&ctx.metadata),
                mirrors: router::mirrors_for(action, &ctx.shared.clusters, &parts.headers),
                buffered: buffered.take(),
                keep_request: None,
            };
            // As Envoy's router: the span's context goes upstream, and its
            // request tags see the request as sent.
            if let Some(s) = &mut info.span.span {
                s.set_request(
                    &parts.headers,
                    parts.method.as_str(),
                    &info.path,
                    info.protocol,
                    &ctx.direct_peer.ip().to_string(),
                );
                s.inject(&mut parts.headers);
            }
            let mut head = std::mem::replace(parts, http::Request::new(()).into_parts().0);
            let upgrade = match upgrade_type {
                Some(t) => head
                    .extensions
                    .remove::<hyper::upgrade::OnUpgrade>()
                    .map(|u| (t, u)),
                None => None,
            };
            // Set in place: rebuilding the (large) `Forward` would copy it.
            f.upgrade = upgrade;
            f.keep_request = redirect_policy.map(|_| &mut kept);
            let cluster = target.cluster.clone();
            let mut resp = router::forward(f, target, head, body, info).await;
            // `override_host` `selected_host_key`: the host the router wrote
            // to the stream's dynamic metadata is there for the response
            // filters too.
            if let Some((ns, _)) = cluster
                .config
                .override_host
                .as_ref()
                .and_then(|o| o.selected_host_key.as_ref())
            {
                if let Some(m) = info.dynamic_metadata.namespace(ns) {
                    fcx.metadata.merge(ns, m.clone());
                }
            }
            if let (Some(policy), Some(src)) = (redirect_policy, kept) {
                let status = resp.status().as_u16();
                if info.response_code_details == "via_upstream" && policy.codes.contains(&status) {
                    let owner = route.name.to_string();
                    let outcome = super::redirect::convert(
                        policy,
                        src,
                        status,
                        resp.headers(),
                        ctx.scheme,
                        &owner,
                        redirects,
                        |head, authority| {
                            route_for(ctx, rc, head, authority).map(|r| {
                                let cluster = match &r.action {
                                    RouteKind::Forward(a) => match &a.cluster {
                                        xds_client::config::ClusterSpecifier::Name(n) => {
                                            Some(std::sync::Arc::<str>::from(&**n))
                                        }
                                        _ => None,
                                    },
                                    _ => None,
                                };
                                (r.name.to_string(), cluster)
                            })
                        },
                    );
                    match outcome {
                        Ok(next) => {
                            cluster
                                .stats
                                .upstream_internal_redirect_succeeded_total
                                .inc();
                            redirects.next = Some(next);
                            // The redirect's own response is not used.
                            return resp;
                        }
                        Err(why) => {
                            use super::redirect::Refused;
                            cluster.stats.upstream_internal_redirect_failed_total.inc();
                            let i = match why {
                                Refused::Unavailable => None,
                                Refused::BadLocation => Some(0),
                                Refused::UnsafeScheme => Some(1),
                                Refused::TooManyRedirects => Some(2),
                                Refused::NoRoute => Some(3),
                                Refused::Predicate => Some(4),
                            };
                            if let Some(i) = i {
                                ctx.hcm.stats.passthrough_internal_redirect[i].inc();
                            }
                        }
                    }
                }
            }
            // Keep the request headers for logging / response formatting.
            if let Some(h) = &info.request_headers {
                parts.headers = (**h).clone();
            }
            if vh.include_attempt_count_in_response {
                resp.headers_mut().insert(
                    headers::X_ENVOY_ATTEMPT_COUNT.clone(),
                    headers::number_value(info.attempt_count.into()),
                );
            }
            let lv = levels(weighted.map(|w| &w.headers), route, vh, rc);
            headers::apply_levels(
                resp.headers_mut(),
                &lv,
                false,
                rc.most_specific_header_mutations_wins,
                info,
            );
            if !instances.is_empty() {
                // As Envoy, filters see a gRPC request's local reply (no
                // upstream, a timeout) as the trailers-only reply it becomes.
                if info.grpc && info.response_code_details != "via_upstream" {
                    info.local_grpc_status = Some(
                        info.local_grpc_status
                            .unwrap_or_else(|| grpc_status(resp.status().as_u16())),
                    );
                    resp = grpc_local_reply(resp, info);
                }
                let (mut rp, mut rb) = resp.into_parts();
                fcx.end_stream = http_body::Body::is_end_stream(&rb);
                fcx.upstream_host = info.upstream_workload_addr();
                let lr = filters::run_response_headers(&mut instances, &mut fcx, &mut rp);
                keep_filter_state(info, &fcx);
                if let Some(lr) = lr {
                    info.filter_log.keep(&mut instances, &mut fcx);
                    return reply_owned(lr.status.as_u16(), lr.body, Some("text/plain"));
                }
                // Only a filter that asked for the body hooks wraps it.
                info.filter_log.keep(&mut instances, &mut fcx);
                if let Some(chain) = filters::ResponseBodyChain::new(instances) {
                    rb = rb.filtered(chain);
                }
                resp = Response::from_parts(rp, rb);
            }
            return resp;
        }
    };
    // Local (direct/redirect) responses still get response header mutations.
    let lv = levels(None, route, vh, rc);
    headers::apply_levels(
        resp.headers_mut(),
        &lv,
        false,
        rc.most_specific_header_mutations_wins,
        info,
    );
    // As Envoy, the router's direct responses pass the encode phases.
    if !instances.is_empty() {
        let (mut rp, mut rb) = resp.into_parts();
        fcx.end_stream = http_body::Body::is_end_stream(&rb);
        fcx.upstream_host = info.upstream_workload_addr();
        let lr = filters::run_response_headers(&mut instances, &mut fcx, &mut rp);
        keep_filter_state(info, &fcx);
        if let Some(lr) = lr {
            info.filter_log.keep(&mut instances, &mut fcx);
            return reply_owned(lr.status.as_u16(), lr.body, Some("text/plain"));
        }
        info.filter_log.keep(&mut instances, &mut fcx);
        if let Some(chain) = filters::ResponseBodyChain::new(instances) {
            rb = rb.filtered(chain);
        }
        resp = Response::from_parts(rp, rb);
    }
    resp
}

/// The route a request would take (an internal redirect's target), as the
/// pipeline selects it.
fn route_for<'r>(
    ctx: &ConnCtx,
    rc: &'r xds_client::config::RouteConfig,
    head: &http::request::Parts,
    authority: &str,
) -> Option<&'r xds_client::config::Route> {
    let vh = rc.select_vhost(authority)?;
    let full = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let (path, query) = match full.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (full, None),
    };
    let random_ppm = if vh
        .routes
        .iter()
        .any(|r| r.matcher.runtime_fraction_ppm.is_some())
    {
        rand::rng().random_range(0..1_000_000)
    } else {
        0
    };
    vh.select_route(&RequestInfo {
        method: &head.method,
        path,
        query,
        full_path: full,
        authority,
        scheme: ctx.scheme,
        headers: &head.headers,
        is_connect: head.method == http::Method::CONNECT,
        peer_cert: ctx.tls.as_ref().is_some_and(|t| t.peer.is_some()),
        random_ppm,
    })
}

/// HTTP/1 request checks Envoy's codec makes that hyper's parser does not.
fn http1_checks(parts: &http::request::Parts, authority: &str) -> Option<(u16, &'static str)> {
    // Methods Envoy's HTTP/1 codec knows (custom methods are off by default).
    const METHODS: &[&str] = &[
        "DELETE",
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "COPY",
        "LOCK",
        "MKCOL",
        "MOVE",
        "PROPFIND",
        "PROPPATCH",
        "SEARCH",
        "UNLOCK",
        "BIND",
        "REBIND",
        "UNBIND",
        "ACL",
        "REPORT",
        "MKACTIVITY",
        "CHECKOUT",
        "MERGE",
        "M-SEARCH",
        "NOTIFY",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "PATCH",
        "PURGE",
        "MKCALENDAR",
        "LINK",
        "UNLINK",
        "SOURCE",
        "QUERY",
    ];
    // The standard methods compare as enum values; only an extension
    // method is looked up by name.
    let standard = matches!(
        parts.method,
        http::Method::GET
            | http::Method::POST
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
            | http::Method::PATCH
            | http::Method::CONNECT
            | http::Method::TRACE
    );
    if !standard && !METHODS.contains(&parts.method.as_str()) {
        return Some((400, "http1.codec_error"));
    }
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    if parts.method != http::Method::CONNECT {
        let origin = parts.uri.scheme().is_none() && pq.starts_with('/');
        let absolute = matches!(parts.uri.scheme_str(), Some("http" | "https"));
        let star = pq == "*" && parts.method == http::Method::OPTIONS;
        if !(origin || absolute || star) {
            return Some((400, "http1.codec_error"));
        }
    }
    if pq.bytes().any(|b| b == b'#' || !b.is_ascii()) {
        return Some((400, "http1.codec_error"));
    }
    let cls: Vec<&http::HeaderValue> = parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    if cls.len() > 1 || cls.first().is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Some((400, "http1.content_length_not_allowed"));
    }
    let te: Vec<&http::HeaderValue> = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if !te.is_empty() {
        if te.len() > 1 || !te[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Some((501, "http1.invalid_transfer_encoding"));
        }
        if !cls.is_empty() {
            return Some((400, "http1.content_length_not_allowed"));
        }
    }
    // Host characters (RFC 3986 reg-name, IP literal, port), as a table.
    const HOST_CHARS: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = (i as u8).is_ascii_alphanumeric();
            i += 1;
        }
        let extra = b"-._~!$&'()*+,;=:[]%@";
        let mut j = 0;
        while j < extra.len() {
            t[extra[j] as usize] = true;
            j += 1;
        }
        t
    };
    if !authority.bytes().all(|b| HOST_CHARS[b as usize]) {
        return Some((400, "http1.invalid_characters"));
    }
    None
}

/// `grpc-timeout` capped by `max_stream_duration.grpc_timeout_header_max`
/// (Envoy uses it as the stream's max duration when configured).
fn grpc_timeout(
    action: &xds_client::config::RouteAction,
    h: &http::HeaderMap,
) -> Option<std::time::Duration> {
    let cap = action.grpc_timeout_header_max?;
    let d = parse_grpc_timeout(h)?;
    Some(if d.is_zero() { cap } else { d.min(cap) })
}

/// The request's `grpc-timeout` header.
pub(crate) fn parse_grpc_timeout(h: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

/// Envoy's HTTP status to gRPC status mapping for local replies.
fn grpc_status(http: u16) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Final shape of a locally generated response, as Envoy's `sendLocalReply`:
/// gRPC requests get a trailers-only gRPC error; a request whose body was not
/// read closes the HTTP/1 connection; empty bodies carry no content-length on
/// HTTP/2, 204 or HEAD.
fn shape_local_reply(
    mut resp: Response<Body>,
    info: &StreamInfo,
    head: bool,
    h2: bool,
) -> Response<Body> {
    use http_body::Body as _;
    if info.grpc {
        resp = grpc_local_reply(resp, info);
    }
    let empty = resp.body().size_hint().exact() == Some(0);
    if empty
        && (h2
            || head
            || resp.status() == http::StatusCode::NO_CONTENT
            || resp.status().is_informational())
    {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        let (p, _) = resp.into_parts();
        resp = Response::from_parts(p, Body::None);
        if head && !h2 && resp.status() != http::StatusCode::NO_CONTENT {
            // Envoy's HTTP/1 codec marks a bodyless HEAD reply as chunked.
            resp.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
    }
    if (info.request_body_unread
        || info.flags.0 & Flags::DPE != 0
        || info.response_code_details == router::REQUEST_TIMEOUT)
        && !h2
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A local reply to a gRPC request as Envoy sends it: a trailers-only
/// `200` with `grpc-status` (and `grpc-message` from the body). Applying it
/// twice changes nothing once `info.local_grpc_status` is set.
fn grpc_local_reply(resp: Response<Body>, info: &StreamInfo) -> Response<Body> {
    let status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    let msg = match body {
        Body::Full(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        _ => String::new(),
    };
    parts.status = http::StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts.headers.insert(
        "grpc-status",
        HeaderValue::from(
            info.local_grpc_status
                .unwrap_or_else(|| grpc_status(status)),
        ),
    );
    if !msg.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&msg)) {
            parts.headers.insert("grpc-message", v);
        }
    }
    Response::from_parts(parts, Body::Empty)
}

fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether upgrade `name` (lowercase) is enabled: the route's
/// `upgrade_configs` decide, else the HCM's (Envoy's upgrade map).
fn upgrade_enabled(
    action: &xds_client::config::RouteAction,
    h: &HttpConnectionManager,
    name: &str,
) -> bool {
    match action.upgrades.iter().find(|(n, _)| n == name) {
        Some((_, enabled)) => *enabled,
        None => h.upgrades.iter().any(|u| u == name),
    }
}

/// The `upgrade` header of an HTTP/1.1 upgrade request (`connection: upgrade`).
fn upgrade_request(parts: &http::request::Parts) -> Option<HeaderValue> {
    // HTTP/2: an extended CONNECT (`h2_extended_connect`), the only HTTP/2
    // request with the upgrade hyper hands over (and HTTP/2 refuses a
    // `connection` header from the client).
    let h2_upgrade = parts.version == Version::HTTP_2
        && parts
            .extensions
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some();
    if parts.version != Version::HTTP_11 && !h2_upgrade {
        return None;
    }
    let conn_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !conn_upgrade {
        return None;
    }
    parts.headers.get(header::UPGRADE).cloned()
}

/// Builds a redirect's Location as Envoy's RedirectAction does.
fn redirect_location(
    r: &xds_client::config::Redirect,
    route_path: &xds_client::config::PathMatch,
    scheme: &str,
    authority: &str,
    path: &str,
) -> String {
    use xds_client::config::{PathMatch, RedirectPath};
    let new_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let (host, port) = split_host_port(authority);
    let mut host = host.to_owned();
    let mut port = port.map(str::to_owned);
    if let Some(hr) = &r.host {
        // host_redirect replaces the whole authority, port included (Envoy).
        let (h2, p2) = split_host_port(hr);
        host = h2.to_owned();
        port = p2.map(str::to_owned);
    }
    if let Some(p) = r.port {
        port = Some(p.to_string());
    } else if r.scheme.as_deref() == Some("https") && port.as_deref() == Some("80") {
        // https_redirect from the plain-HTTP default port drops it (Envoy).
        port = None;
    }
    let (p, q) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let (new_path, mut query) = match &r.path {
        RedirectPath::Keep => (p.to_owned(), q.to_owned()),
        // A path_redirect with its own query keeps it, even with strip_query.
        RedirectPath::Path(np) => match np.find('?') {
            Some(i) => {
                let (a, b) = (np[..i].to_owned(), np[i..].to_owned());
                if r.strip_query {
                    return finish_location(new_scheme, &host, port.as_deref(), &a, &b);
                }
                (a, b)
            }
            None => (np.clone(), q.to_owned()),
        },
        RedirectPath::Prefix(np) => {
            let matched = match route_path {
                PathMatch::Prefix(x) | PathMatch::SeparatedPrefix(x) => x.len().min(p.len()),
                PathMatch::Path(_) => p.len(),
                _ => 0,
            };
            (format!("{np}{}", &p[matched..]), q.to_owned())
        }
        RedirectPath::Regex(re, sub) => {
            (re.0.replace_all(p, sub.as_str()).into_owned(), q.to_owned())
        }
    };
    if r.strip_query {
        query.clear();
    }
    finish_location(new_scheme, &host, port.as_deref(), &new_path, &query)
}

fn finish_location(
    scheme: &str,
    host: &str,
    port: Option<&str>,
    path: &str,
    query: &str,
) -> String {
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    }
}

fn split_host_port(a: &str) -> (&str, Option<&str>) {
    let h = xds_client::config::strip_port(a);
    if h.len() < a.len() {
        (h, Some(&a[h.len() + 1..]))
    } else {
        (a, None)
    }
}

/// Final response headers, stats and the access-log hook.
fn finish(
    ctx: &Arc<ConnCtx>,
    mut resp: Response<Body>,
    mut info: StreamInfo,
    req_headers: http::HeaderMap,
    tunnel: Option<super::connect::Tunnel>,
) -> Response<Body> {
    let h = &ctx.hcm.config;
    let hs = resp.headers_mut();
    match h.server_header_transformation {
        ServerHeaderTransformation::Overwrite => {
            hs.insert(header::SERVER, h.server_name.clone());
        }
        ServerHeaderTransformation::AppendIfAbsent => {
            if !hs.contains_key(header::SERVER) {
                hs.insert(header::SERVER, h.server_name.clone());
            }
        }
        ServerHeaderTransformation::PassThrough => {}
    }
    // common_http_protocol_options.max_requests_per_connection: the last
    // allowed response on an HTTP/1 connection closes it (HTTP/2 counts
    // its streams in `handle`).
    let last_request = info.protocol != "HTTP/2"
        && h.max_requests_per_connection.is_some_and(|m| {
            ctx.requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1
                >= m
        });
    if last_request {
        ctx.hcm.stats.cx_max_requests_reached.inc();
    }
    if info.protocol != "HTTP/2"
        && (last_request
            || *ctx.drain.borrow()
            || ctx
                .shared
                .healthcheck_failed
                .load(std::sync::atomic::Ordering::Relaxed))
    {
        // Failing health checks: close HTTP/1 connections after each response.
        hs.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if h.always_set_request_id_in_response || info.force_trace {
        if let Some(id) = &info.request_id {
            hs.insert(headers::X_REQUEST_ID.clone(), id.clone());
        }
    }
    if let Some(via) = &h.via {
        headers::append_joined(hs, &headers::VIA, via, ", ");
    }
    if h.tracing.is_some() {
        info.span.on_response(hs);
    }
    let status = resp.status();
    info.response_code = status.as_u16();
    let logs_on = !ctx.hcm.logs.is_empty();
    if logs_on {
        if info.request_headers.is_none() {
            info.request_headers = Some(Box::new(req_headers));
        }
        info.response_headers = Some(Box::new(resp.headers().clone()));
    }
    // An accepted upgrade on HTTP/2 (RFC 8441): Envoy's codec turns the
    // `101` filters and logs see into a `200` without the HTTP/1.1
    // upgrade headers.
    if status == http::StatusCode::SWITCHING_PROTOCOLS && info.protocol == "HTTP/2" {
        *resp.status_mut() = http::StatusCode::OK;
        let hs = resp.headers_mut();
        hs.remove(header::UPGRADE);
        hs.remove(header::CONNECTION);
        hs.remove(header::CONTENT_LENGTH);
    }
    // A trailers-only gRPC answer's status, for the span.
    let grpc_head = if info.span.span.is_some() {
        let text = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (text("grpc-status"), text("grpc-message"))
    } else {
        (None, None)
    };
    // How hyper will frame the response (for `istio.stats`' wire bytes).
    let response_wire = info.filter_log.is_kept().then(|| {
        let version = match info.protocol {
            "HTTP/2" => http::Version::HTTP_2,
            "HTTP/1.0" => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        };
        super::wire::response(
            version,
            &info.method,
            status,
            resp.headers(),
            hyper::body::Body::size_hint(resp.body()).exact(),
            info.request_wire,
        )
    });
    let ctx2 = ctx.clone();
    let (parts, body) = resp.into_parts();
    // `tunnel`: a tunnel's bytes from downstream (else the request body's,
    // counted as it streamed) and the flags of its end.
    let mut done = move |end: crate::body::TrackedEnd, tunnel: Option<(u64, u32)>| {
        if let Some((received, flags)) = tunnel {
            info.bytes_received = received;
            info.flags.set(flags);
        }
        let (bytes, complete) = (end.bytes, end.complete);
        if !complete {
            // The response did not reach its end: downstream went away (DC).
            info.flags.set(Flags::DC);
        }
        let stats = &ctx2.hcm.stats;
        ctx2.stream_done();
        stats.rq_active.dec();
        stats.record_status(info.response_code);
        let elapsed = info.start_instant.elapsed();
        stats.rq_time.record_us(elapsed.as_micros() as u64);
        if let Some(l) = info.filter_log.take() {
            let bytes_received = info
                .stream
                .as_ref()
                .map_or(0, |s| s.bytes_received())
                .max(info.bytes_received);
            l.finish(&filters::StreamEnd {
                response_code: info.response_code,
                flags: info.flags.order(),
                flags_short: Flags::short_of,
                request_body_bytes: bytes_received,
                response_body_bytes: bytes,
                request_wire_bytes: info.request_wire.head + bytes_received,
                response_wire_bytes: response_wire.map_or(bytes, |w| w.total(bytes, end.framing)),
                duration: elapsed,
                grpc: info.grpc,
                // As Envoy's `getGrpcStatus`: the trailers first.
                grpc_status: end.grpc_status.or(info.local_grpc_status),
                authority: &info.authority,
                path: &info.path,
                method: &info.method,
                protocol: info.protocol,
                scheme: info.scheme,
                cluster: info.upstream_cluster.as_deref(),
                route_name: info.route_name.as_deref(),
                upstream_peer_uri_san: info.upstream_tls.as_ref().and_then(|t| t.peer_uri_san()),
                upstream_local_uri_san: info.upstream_tls.as_ref().and_then(|t| t.local_uri_san()),
            });
        }
        if let Some(span) = info.span.span.take() {
            span.finish(&crate::trace::StreamEnd {
                grpc_status: grpc_head
                    .0
                    .clone()
                    .or_else(|| end.grpc_status.map(|s| s.to_string())),
                grpc_message: grpc_head.1.clone(),
                request_size: info
                    .stream
                    .as_ref()
                    .map_or(0, |s| s.bytes_received())
                    .max(info.bytes_received),
                response_size: bytes,
                upstream_cluster: info.upstream_cluster.as_deref(),
                status: info.response_code,
                flags: info.flags.short(),
            });
        }
        if logs_on {
            info.bytes_sent = bytes;
            info.duration = Some(elapsed);
            for l in &ctx2.hcm.logs {
                l.log(&info);
            }
        }
    };
    // A terminated CONNECT whose 200 goes out: the stream lives on as the
    // tunnel, and ends (stats, access log) when the tunnel does.
    if let Some(t) = tunnel.filter(|_| parts.status.is_success()) {
        let h2 = ctx.is_h2.load(std::sync::atomic::Ordering::Relaxed);
        // hyper spawns the stream's send half once this returns (in the
        // same poll): the slot ties it to the tunnel, which may reset it.
        let reset_down = if h2 {
            super::connect::StreamAbort::offer()
        } else {
            None
        };
        tokio::spawn(async move {
            let end = t.run(reset_down).await;
            let failed = end.end == super::connect::End::DownstreamFailed;
            // As Envoy: an HTTP/2 client's reset is `DR`; a failed HTTP/1
            // connection is `DC` (an incomplete end).
            let flags = match end.end {
                super::connect::End::UpstreamFailed => Flags::UC,
                _ if failed && h2 => Flags::DR,
                _ => 0,
            };
            let tracked = crate::body::TrackedEnd {
                bytes: end.sent,
                complete: !failed || h2,
                grpc_status: None,
                // Tunnel bytes are raw, never chunked.
                framing: 0,
            };
            done(tracked, Some((end.received, flags)));
        });
        return Response::from_parts(parts, Body::None);
    }
    let body = body.tracked(move |end: crate::body::TrackedEnd| done(end, None));
    Response::from_parts(parts, body)
}

/// Copies what filters left in their context to the stream info (for
/// access logs and header formats); nothing to copy, nothing done.
fn keep_filter_state(info: &mut StreamInfo, fcx: &filters::FilterContext) {
    if !fcx.metadata.is_empty() {
        info.dynamic_metadata = fcx.metadata.clone();
    }
    // The connection's objects (network set_filter_state), then the
    // request's over them, as Envoy's stream filter state with its
    // connection parent.
    let conn = fcx.downstream.as_deref().map(|d| &d.filter_state);
    match conn {
        Some(c) if !c.is_empty() => {
            let mut all = c.clone();
            for (k, v, flags) in fcx.filter_state.iter() {
                let _ = all.set(k, v.clone(), flags);
            }
            info.filter_state = all;
        }
        _ if !fcx.filter_state.is_empty() => info.filter_state = fcx.filter_state.clone(),
        _ => {}
    }
}

/// Reads the whole request body, at most `max` bytes; a larger one is
/// answered 413 (Envoy's `request_payload_too_large`), a broken one 400.
/// The request body for a filter's header phase
/// ([`filters::RequestBodySource`]).
/// The request body for a filter that reads it in its header phase: the
/// stream, or an internal redirect's replayed body.
struct BodySource<'a>(&'a mut Option<Incoming>, Option<bytes::Bytes>);

impl filters::RequestBodySource for BodySource<'_> {
    fn read(
        &mut self,
        max: u64,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<bytes::Bytes>, filters::LocalReply>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let Some(body) = self.0.as_mut() else {
                return match self.1.clone() {
                    Some(b) if b.len() as u64 > max => Err(payload_too_large()),
                    b => Ok(b),
                };
            };
            // As Envoy: headers that end the stream leave no body to buffer.
            if hyper::body::Body::is_end_stream(&*body) {
                return Ok(None);
            }
            buffer_body(body, max).await.map(Some)
        })
    }
}

/// The 413 of a body over a buffer limit (Envoy's connection manager).
fn payload_too_large() -> filters::LocalReply {
    filters::LocalReply {
        status: http::StatusCode::PAYLOAD_TOO_LARGE,
        body: bytes::Bytes::from_static(b"Payload Too Large"),
        flag: None,
        details: "request_payload_too_large",
        grpc_status: None,
    }
}

async fn buffer_body(body: &mut Incoming, max: u64) -> Result<bytes::Bytes, filters::LocalReply> {
    use http_body_util::BodyExt;
    let mut out = bytes::BytesMut::new();
    if hyper::body::Body::is_end_stream(body) {
        return Ok(out.freeze());
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(filters::LocalReply {
                status: http::StatusCode::BAD_REQUEST,
                body: bytes::Bytes::from_static(b"Bad Request"),
                flag: Some("DPE"),
                details: "http1.codec_error",
                grpc_status: None,
            });
        };
        if let Ok(d) = frame.into_data() {
            if (out.len() + d.len()) as u64 > max {
                return Err(payload_too_large());
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out.freeze())
}
