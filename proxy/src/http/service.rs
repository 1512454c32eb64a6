//! The per-request pipeline: checks, edge headers, routing, filters, the
//! router, response headers, stats and access logs.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::SystemTime};

use http::{header, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use rand::Rng;
use tokio::time::Instant;
use xds_client::config::{
    HttpConnectionManager, RequestInfo, RouteKind, ServerHeaderTransformation, StripPort,
    TlsRequirement, UnderscoreAction,
};

use super::headers::{self, PathCheck};
use super::info::{Flags, StreamInfo};
use super::local_reply::{reply, reply_owned};
use super::router::{self, Forward};
use crate::body::Body;
use crate::Shared;

/// The HTTP connection manager of one listener at run time.
pub struct HcmRuntime {
    pub config: Arc<HttpConnectionManager>,
    pub chain: filters::FilterChain,
    pub stats: crate::metrics::HttpStats,
    pub logs: Vec<Arc<crate::access_log::Logger>>,
    pub listener_port: u16,
}

/// Per-connection facts.
pub struct ConnCtx {
    pub hcm: Arc<HcmRuntime>,
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub id: u64,
    pub scheme: &'static str,
}

/// The hyper service entry point; never fails (errors become responses).
pub async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let hcm = &ctx.hcm;
    hcm.stats.rq_total.inc();
    hcm.stats.rq_active.inc();
    let (mut parts, body) = req.into_parts();
    let protocol = match parts.version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    };
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let mut info = StreamInfo {
        start: SystemTime::now(),
        start_instant: start,
        protocol,
        method: parts.method.clone(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        authority,
        scheme: ctx.scheme,
        request_headers: None,
        response_headers: None,
        response_code: 0,
        response_code_details: "",
        flags: Flags::default(),
        bytes_received: 0,
        bytes_sent: 0,
        duration: None,
        upstream_service_time: None,
        upstream_host: None,
        upstream_cluster: None,
        upstream_failure_reason: None,
        upstream_metadata: None,
        route_name: None,
        downstream_remote: ctx.peer,
        downstream_direct_remote: ctx.peer,
        downstream_local: ctx.local,
        connection_id: ctx.id,
        attempt_count: 0,
    };
    let resp = pipeline(&ctx, &mut parts, body, &mut info).await;
    Ok(finish(&ctx, resp, info, parts.headers))
}

async fn pipeline(
    ctx: &Arc<ConnCtx>,
    parts: &mut http::request::Parts,
    body: Incoming,
    info: &mut StreamInfo,
) -> Response<Body> {
    let h = &ctx.hcm.config;
    // --- protocol checks (Envoy's codec-level rejections)
    if parts.version == Version::HTTP_10 && !h.http1.accept_http_10 {
        info.flags.set(Flags::DPE);
        info.response_code_details = "low_version";
        let mut r = reply(426, "");
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    if info.authority.is_empty() {
        if let Some(d) = &h.http1.default_host_for_http_10 {
            if parts.version == Version::HTTP_10 {
                info.authority = d.clone();
            }
        }
    }
    if info.authority.is_empty() {
        info.flags.set(Flags::DPE);
        info.response_code_details = "missing_host_header";
        return reply(400, "");
    }
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if parts.headers.len() > h.max_headers_count as usize
        || header_bytes > h.max_request_headers_kb as usize * 1024
    {
        info.flags.set(Flags::DPE);
        info.response_code_details = "header_overflow";
        return reply(431, "");
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
    // --- path normalisation
    if parts.method != http::Method::CONNECT {
        match headers::normalize(h, &info.path) {
            PathCheck::Ok(None) => {}
            PathCheck::Ok(Some(p)) => {
                if let Ok(pq) = p.parse::<http::uri::PathAndQuery>() {
                    let mut up = std::mem::take(&mut parts.uri).into_parts();
                    up.path_and_query = Some(pq);
                    parts.uri = http::Uri::from_parts(up).unwrap_or_default();
                    info.path = p;
                }
            }
            PathCheck::Reject => {
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
                    info.authority = stripped.to_owned();
                }
            }
        }
    }
    // --- edge headers
    let edge = headers::edge(h, &mut parts.headers, ctx.peer, ctx.scheme);
    info.downstream_remote = edge.remote;
    // --- routing
    let rc = &h.route_config;
    let Some(vh) = rc.select_vhost(&info.authority).cloned() else {
        info.flags.set(Flags::NR);
        info.response_code_details = "route_not_found";
        ctx.hcm.stats.no_route.inc();
        return reply(404, "");
    };
    if ctx.scheme == "http"
        && (vh.require_tls == TlsRequirement::All
            || (vh.require_tls == TlsRequirement::ExternalOnly && !edge.internal))
    {
        let mut r = reply(301, "");
        if let Ok(v) = HeaderValue::from_str(&format!("https://{}{}", info.authority, info.path)) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        info.response_code_details = "direct_response";
        return r;
    }
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
        random_ppm,
    };
    let Some(route) = vh.select_route(&rinfo) else {
        info.flags.set(Flags::NR);
        info.response_code_details = "route_not_found";
        ctx.hcm.stats.no_route.inc();
        return reply(404, "");
    };
    info.route_name = (!route.name.is_empty()).then(|| route.name.clone());
    // --- filters (decode)
    let mut instances = if ctx.hcm.chain.is_router_only() {
        Vec::new()
    } else {
        ctx.hcm.chain.instantiate()
    };
    if !instances.is_empty() {
        let mut fcx = filters::FilterContext {
            route_name: info.route_name.clone(),
            internal: edge.internal,
        };
        if let Some(lr) = filters::run_request_headers(&mut instances, &mut fcx, parts) {
            info.response_code_details = lr.details;
            return reply_owned(lr.status.as_u16(), lr.body, Some("text/plain"));
        }
    }
    fn levels<'a>(
        weighted: Option<&'a xds_client::config::HeaderMutations>,
        route: &'a xds_client::config::Route,
        vh: &'a xds_client::config::VirtualHost,
        rc: &'a xds_client::config::RouteConfig,
    ) -> Vec<&'a xds_client::config::HeaderMutations> {
        let mut v = Vec::with_capacity(4);
        if let Some(w) = weighted {
            v.push(w);
        }
        v.push(&route.headers);
        v.push(&vh.headers);
        v.push(&rc.headers);
        v
    }
    let mut resp = match &route.action {
        RouteKind::Direct(d) => {
            info.response_code_details = "direct_response";
            ctx.hcm.stats.rq_direct_response.inc();
            let ct = d.body.as_ref().map(|_| "text/plain");
            reply_owned(d.status, d.body.clone().unwrap_or_default(), ct)
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
        RouteKind::Forward(action) => {
            // Upgrades (websocket) must be enabled in upgrade_configs, and not
            // disabled on the route; others are refused as Envoy (403).
            let upgrade_type = upgrade_request(parts);
            if let Some(t) = &upgrade_type {
                let name = t.to_str().unwrap_or("").to_ascii_lowercase();
                let on_route = action
                    .upgrades
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, e)| *e);
                let enabled = on_route.unwrap_or_else(|| h.upgrades.iter().any(|u| *u == name));
                if !enabled {
                    info.response_code_details = "upgrade_failed";
                    return reply(403, "");
                }
            }
            let target = match router::select_cluster(&ctx.shared.clusters, action, &parts.headers)
            {
                Ok(t) => t,
                Err(status) => {
                    info.response_code_details = "cluster_not_found";
                    ctx.hcm.stats.no_cluster.inc();
                    info.flags.set(0);
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
            let new_host = weighted
                .and_then(|w| w.host_rewrite.clone())
                .or_else(|| router::host_rewrite(action, &parts.headers, &info.path, None));
            if let Some(nh) = new_host {
                if action.append_x_forwarded_host {
                    if let Ok(v) = HeaderValue::from_str(&info.authority) {
                        parts.headers.append(headers::X_FORWARDED_HOST.clone(), v);
                    }
                }
                info.authority = nh;
            }
            if let Ok(v) = HeaderValue::from_str(&info.authority) {
                parts.headers.insert(header::HOST, v);
            }
            let lv = levels(weighted.map(|w| &w.headers), route, &vh, rc);
            headers::apply_levels(
                &mut parts.headers,
                &lv,
                true,
                rc.most_specific_header_mutations_wins,
                info,
            );
            if !ctx.hcm.logs.is_empty() {
                info.request_headers = Some(parts.headers.clone());
            }
            let f = Forward {
                action,
                route_path: &route.matcher.path,
                vhost_retry: vh.retry_policy.as_ref(),
                trusted: edge.trusted,
                include_attempt_count: vh.include_request_attempt_count,
                suppress_envoy_headers: ctx.hcm.chain.router.suppress_envoy_headers(),
                downstream_h2: parts.version == Version::HTTP_2,
                upgrade: None,
            };
            let mut head = std::mem::replace(parts, http::Request::new(()).into_parts().0);
            let upgrade = match upgrade_type {
                Some(t) => head
                    .extensions
                    .remove::<hyper::upgrade::OnUpgrade>()
                    .map(|u| (t, u)),
                None => None,
            };
            let f = Forward { upgrade, ..f };
            let mut resp = router::forward(f, target, head, body, info).await;
            // Keep the request headers for logging / response formatting.
            if let Some(h) = &info.request_headers {
                parts.headers = h.clone();
            }
            if vh.include_attempt_count_in_response {
                resp.headers_mut().insert(
                    headers::X_ENVOY_ATTEMPT_COUNT.clone(),
                    HeaderValue::from(info.attempt_count),
                );
            }
            let lv = levels(weighted.map(|w| &w.headers), route, &vh, rc);
            headers::apply_levels(
                resp.headers_mut(),
                &lv,
                false,
                rc.most_specific_header_mutations_wins,
                info,
            );
            if !instances.is_empty() {
                let mut fcx = filters::FilterContext {
                    route_name: info.route_name.clone(),
                    internal: edge.internal,
                };
                let (mut rp, rb) = resp.into_parts();
                if let Some(lr) = filters::run_response_headers(&mut instances, &mut fcx, &mut rp) {
                    return reply_owned(lr.status.as_u16(), lr.body, Some("text/plain"));
                }
                resp = Response::from_parts(rp, rb);
            }
            return resp;
        }
    };
    // Local (direct/redirect) responses still get response header mutations.
    let lv = levels(None, route, &vh, rc);
    headers::apply_levels(
        resp.headers_mut(),
        &lv,
        false,
        rc.most_specific_header_mutations_wins,
        info,
    );
    resp
}

/// The `upgrade` header of an HTTP/1.1 upgrade request (`connection: upgrade`).
fn upgrade_request(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
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
        let (h2, p2) = split_host_port(hr);
        host = h2.to_owned();
        if p2.is_some() {
            port = p2.map(str::to_owned);
        }
    }
    if let Some(p) = r.port {
        port = Some(p.to_string());
    }
    if r.scheme.is_some() && r.port.is_none() {
        // A scheme change drops a port that was the old scheme's default (Envoy).
        if let Some(p) = &port {
            if (p == "80" && new_scheme == "https") || (p == "443" && new_scheme == "http") {
                port = None;
            }
        }
    }
    if port.as_deref() == Some(if new_scheme == "https" { "443" } else { "80" }) {
        port = None;
    }
    let (p, q) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let (new_path, mut query) = match &r.path {
        RedirectPath::Keep => (p.to_owned(), q.to_owned()),
        RedirectPath::Path(np) => match np.find('?') {
            Some(i) => (np[..i].to_owned(), np[i..].to_owned()),
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
    match port {
        Some(port) => format!("{new_scheme}://{host}:{port}{new_path}{query}"),
        None => format!("{new_scheme}://{host}{new_path}{query}"),
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
    if h.always_set_request_id_in_response {
        if let Some(id) = req_headers.get(&headers::X_REQUEST_ID) {
            hs.insert(headers::X_REQUEST_ID.clone(), id.clone());
        }
    }
    if let Some(via) = &h.via {
        hs.append(headers::VIA.clone(), via.clone());
    }
    let status = resp.status();
    info.response_code = status.as_u16();
    let logs_on = !ctx.hcm.logs.is_empty();
    if logs_on {
        if info.request_headers.is_none() {
            info.request_headers = Some(req_headers);
        }
        info.response_headers = Some(resp.headers().clone());
    }
    let ctx2 = ctx.clone();
    let (parts, body) = resp.into_parts();
    let body = body.tracked(Box::new(move |bytes, _complete| {
        let stats = &ctx2.hcm.stats;
        stats.rq_active.dec();
        stats.record_status(info.response_code);
        let elapsed = info.start_instant.elapsed();
        stats.rq_time.record_us(elapsed.as_micros() as u64);
        if logs_on {
            info.bytes_sent = bytes;
            info.duration = Some(elapsed);
            for l in &ctx2.hcm.logs {
                l.log(&info);
            }
        }
    }));
    Response::from_parts(parts, body)
}
