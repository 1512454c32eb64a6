//! The router: cluster selection, rewrites, timeouts, retries, and the
//! upstream exchange.
use std::{sync::Arc, time::Duration};

use http::{header, HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::Rng;
use tokio::time::Instant;
use xds_client::config::{
    ClusterSpecifier, HostRewrite, PathMatch, RetryOn, RetryPolicy, RouteAction,
};

use super::headers::*;
use super::info::{Flags, StreamInfo};
use super::local_reply::{reply, NO_HEALTHY_UPSTREAM, UPSTREAM_TIMEOUT};
use crate::body::{Body, StreamState};
use crate::upstream::{ClusterManager, ClusterRuntime, PoolKind};

/// What the request pipeline hands the router.
pub struct Forward<'a> {
    pub action: &'a RouteAction,
    pub route_path: &'a PathMatch,
    pub vhost_retry: Option<&'a Arc<RetryPolicy>>,
    /// `hedge_policy.hedge_on_per_try_timeout` (the route's, else the
    /// virtual host's).
    pub hedge_on_per_try_timeout: bool,
    pub trusted: bool,
    pub include_attempt_count: bool,
    pub suppress_envoy_headers: bool,
    pub downstream_h2: bool,
    /// An accepted upgrade (e.g. websocket): the `upgrade` header value and
    /// the downstream connection's upgrade future.
    pub upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
    /// The listener's `per_connection_buffer_limit_bytes`: request bodies up
    /// to this size are buffered so they can be replayed on retry (Envoy
    /// disables retries for larger bodies).
    pub buffer_limit: u32,
    /// The stream's shared state and timers.
    pub state: Arc<StreamState>,
    pub timers: StreamTimers,
    /// HTTP filters watching the request body (once, whatever the retries).
    pub request_observer: Option<Box<dyn filters::RequestBodyObserver>>,
    /// The route's mirror policies that fire for this request, with their
    /// clusters ([`mirrors_for`]).
    pub mirrors: Vec<(Arc<ClusterRuntime>, &'a xds_client::config::MirrorPolicy)>,
    /// The whole request body, read already (the buffer filter, or the
    /// replay of an internal redirect); the `Incoming` body is then spent.
    pub buffered: Option<bytes::Bytes>,
    /// With an `internal_redirect_policy`: where to keep the request as
    /// forwarded (its body buffered like a retry's), for the redirect.
    pub keep_request: Option<&'a mut Option<super::redirect::Source>>,
    /// The downstream an upstream PROXY protocol header describes.
    pub proxy_source: Arc<crate::upstream::proxy_protocol::ProxySource>,
    /// The connection's filter state (network filters), for an
    /// ORIGINAL_DST cluster.
    pub conn_state: Option<&'a filters::FilterState>,
    /// The connection's local address when a listener filter restored it.
    pub restored_local: Option<std::net::SocketAddr>,
    /// The connection's dynamic metadata, for an ORIGINAL_DST cluster's
    /// `metadata_key`.
    pub conn_metadata: Option<&'a filters::DynamicMetadata>,
}

/// The route's `request_mirror_policies` that fire for this request: the
/// cluster exists (else skipped, as Envoy) and the runtime fraction hits.
pub fn mirrors_for<'a>(
    action: &'a RouteAction,
    clusters: &crate::upstream::ClusterManager,
    headers: &http::HeaderMap,
) -> Vec<(Arc<ClusterRuntime>, &'a xds_client::config::MirrorPolicy)> {
    use xds_client::config::MirrorCluster;
    if action.mirrors.is_empty() {
        return Vec::new();
    }
    action
        .mirrors
        .iter()
        .filter(|m| m.fraction.is_none_or(|f| f.hit(rand::random::<u64>())))
        .filter_map(|m| {
            let name = match &m.cluster {
                MirrorCluster::Name(n) => &**n,
                MirrorCluster::Header(h) => headers.get(h)?.to_str().ok()?,
            };
            Some((clusters.get(name)?, m))
        })
        .collect()
}

/// Envoy's shadow host: `-shadow` after the host name (before a port,
/// unless the host is an IP address).
fn shadow_host(authority: &str) -> String {
    if let Some((host, port)) = authority.rsplit_once(':') {
        let ip = host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok();
        if !ip && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            return format!("{host}-shadow:{port}");
        }
    }
    format!("{authority}-shadow")
}

/// Sends the shadow copies (fire and forget): the request as forwarded,
/// with the shadow host and the policy's header mutations, its whole body.
fn send_mirrors(
    mirrors: &[(Arc<ClusterRuntime>, &xds_client::config::MirrorPolicy)],
    parts: &http::request::Parts,
    body: &bytes::Bytes,
    timeout: Option<Duration>,
    info: &StreamInfo,
) {
    // Bounded even when the route has no timeout.
    let timeout = timeout.unwrap_or(Duration::from_secs(300));
    for (rt, m) in mirrors {
        let mut headers = parts.headers.clone();
        let authority = match &m.host_rewrite {
            Some(h) => h.clone(),
            None if m.host_suffix => shadow_host(&info.authority),
            None => info.authority.to_string(),
        };
        filters::header_mutation::apply(
            &m.headers,
            &mut headers,
            |h| h,
            |f, h| super::info::render(f, info, Some(h), None, ""),
        );
        let req = filters::callout::CalloutRequest {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            authority,
            headers,
            body: body.clone(),
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            // The shadow's answer is dropped; its body is read (bounded) so
            // the connection can be reused.
            let _ =
                tokio::time::timeout(timeout, crate::upstream::callout::call(&rt, req, 1 << 20))
                    .await;
        });
    }
}

/// Envoy's per-stream timers (`None` = disabled).
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamTimers {
    /// `stream_idle_timeout` or the route's `idle_timeout`.
    pub idle: Option<Duration>,
    /// HCM `request_timeout`.
    pub request: Option<Duration>,
    /// `max_stream_duration` (HCM or route, or a capped `grpc-timeout`).
    pub max_duration: Option<Duration>,
}

/// Which stream timer fired.
enum StreamTimeout {
    Idle,
    Request,
    Duration,
}

/// The next instant a stream timer could fire, or the timer that already
/// fired.
fn stream_next(
    state: &StreamState,
    t: StreamTimers,
    now: Instant,
) -> Result<Option<Instant>, StreamTimeout> {
    let mut next: Option<Instant> = None;
    let mut consider = |at: Instant, which: StreamTimeout| -> Result<(), StreamTimeout> {
        if now >= at {
            return Err(which);
        }
        next = Some(next.map_or(at, |n| n.min(at)));
        Ok(())
    };
    if let Some(m) = t.max_duration {
        consider(state.start + m, StreamTimeout::Duration)?;
    }
    if let Some(r) = t.request {
        if !state
            .request_complete
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            consider(state.start + r, StreamTimeout::Request)?;
        }
    }
    if let Some(i) = t.idle {
        consider(state.last_activity() + i, StreamTimeout::Idle)?;
    }
    Ok(next)
}

/// The local reply for a fired stream timer, as Envoy.
///
/// As Envoy: 408 while the request is still arriving, 504 once it was
/// complete (the upstream is the slow side).
fn stream_timeout_reply(
    which: StreamTimeout,
    info: &mut StreamInfo,
    request_complete: bool,
) -> Response<Body> {
    let status = if request_complete { 504 } else { 408 };
    match which {
        StreamTimeout::Idle => {
            info.flags.set(Flags::SI);
            info.response_code_details = STREAM_IDLE_TIMEOUT;
            reply(status, "stream timeout")
        }
        StreamTimeout::Request => {
            info.response_code_details = REQUEST_TIMEOUT;
            reply(408, "request timeout")
        }
        StreamTimeout::Duration => {
            info.flags.set(Flags::DT);
            info.response_code_details = MAX_DURATION_TIMEOUT;
            reply(status, "downstream duration timeout")
        }
    }
}

/// `%RESPONSE_CODE_DETAILS%` of the stream timers (also used to count them).
pub const STREAM_IDLE_TIMEOUT: &str = "stream_idle_timeout";
pub const REQUEST_TIMEOUT: &str = "request_overall_timeout";
pub const MAX_DURATION_TIMEOUT: &str = "max_duration_timeout";

/// The cluster a request goes to, resolved before header mutations run.
pub struct Target {
    pub cluster: Arc<ClusterRuntime>,
    /// Index into the weighted clusters, for per-cluster header mutations.
    pub weighted_index: Option<usize>,
}

/// Picks the cluster; `Err(status)` when it does not exist (flag NC).
/// `picked`: the weighted cluster already chosen (see [`pick_weighted`]).
pub fn select_cluster(
    cm: &ClusterManager,
    action: &RouteAction,
    headers: &HeaderMap,
    picked: Option<usize>,
) -> Result<Target, u16> {
    let (name, weighted_index): (std::borrow::Cow<'_, str>, Option<usize>) = match &action.cluster {
        ClusterSpecifier::Name(n) => (n.as_ref().into(), None),
        ClusterSpecifier::Header(h) => match headers.get(h).and_then(|v| v.to_str().ok()) {
            Some(v) => (v.to_owned().into(), None),
            None => return Err(action.cluster_not_found_status),
        },
        ClusterSpecifier::Weighted(w) => {
            let idx = picked.unwrap_or_else(|| pick_weighted(w));
            (w.clusters[idx].name.as_ref().into(), Some(idx))
        }
    };
    cm.get(&name)
        .map(|c| Target {
            cluster: c,
            weighted_index,
        })
        .ok_or(action.cluster_not_found_status)
}

/// Picks one of the weighted clusters (its index), by weight.
pub fn pick_weighted(w: &xds_client::config::WeightedClusters) -> usize {
    let r: u64 = rand::rng().random();
    let picked = w.pick(r);
    w.clusters
        .iter()
        .position(|c| std::ptr::eq(c, picked))
        .expect("pick returns one of the clusters")
}

/// Applies prefix/regex path rewrites; returns the new path when changed.
pub fn rewrite_path(
    action: &RouteAction,
    route_path: &PathMatch,
    path_and_query: &str,
) -> Option<String> {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => (&path_and_query[..i], &path_and_query[i..]),
        None => (path_and_query, ""),
    };
    if let Some(new_prefix) = &action.prefix_rewrite {
        let matched = match route_path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len().min(path.len()),
            PathMatch::Path(_) => path.len(),
            _ => 0,
        };
        return Some(format!("{new_prefix}{}{query}", &path[matched..]));
    }
    if let Some((re, sub)) = &action.regex_rewrite {
        let out = re.0.replace_all(path, sub.as_str());
        return Some(format!("{out}{query}"));
    }
    None
}

/// Timeouts from the route, overridable by trusted x-envoy-* headers.
fn timeouts(
    f: &Forward<'_>,
    headers: &HeaderMap,
    retry: Option<&RetryPolicy>,
) -> (Option<Duration>, Option<Duration>) {
    let ms = |n: &http::HeaderName| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    // The deprecated `max_grpc_timeout` (Istio renders `0s`): a gRPC
    // request's timeout is its `grpc-timeout` (none = infinite), capped by
    // the value unless it is 0, instead of the route `timeout`.
    let mut global = match f.action.max_grpc_timeout {
        Some(max) if super::service::is_grpc(headers) => {
            let mut g = super::service::parse_grpc_timeout(headers).unwrap_or(Duration::ZERO);
            if !max.is_zero() && (g.is_zero() || g > max) {
                g = max;
            }
            (!g.is_zero()).then_some(g)
        }
        _ => f.action.timeout,
    };
    let mut per_try = retry.and_then(|r| r.per_try_timeout);
    if f.trusted {
        if let Some(d) = ms(&X_ENVOY_RQ_TIMEOUT) {
            global = (!d.is_zero()).then_some(d);
        }
        if let Some(d) = ms(&X_ENVOY_PER_TRY_TIMEOUT) {
            per_try = (!d.is_zero()).then_some(d);
        }
    }
    (global, per_try)
}

/// The effective retry policy: the route's, else the vhost's, merged with
/// trusted `x-envoy-retry-on` / `x-envoy-max-retries` headers.
fn retry_policy(f: &Forward<'_>, head: &http::request::Parts) -> Option<RetryPolicy> {
    let mut p = retry_policy_of(f, &head.headers)?;
    // `retriable_request_headers`: other requests are not retried (their
    // per-try timeout still applies, as Envoy's).
    if !p.retriable_request_headers.is_empty()
        && !p
            .retriable_request_headers
            .iter()
            .any(|m| m.matches_head(head))
    {
        p.retry_on = RetryOn::default();
        p.num_retries = 0;
    }
    Some(p)
}

fn retry_policy_of(f: &Forward<'_>, headers: &HeaderMap) -> Option<RetryPolicy> {
    let base = f
        .action
        .retry_policy
        .as_ref()
        .or(f.vhost_retry)
        .map(|r| (**r).clone());
    if !f.trusted {
        return base;
    }
    let on = headers
        .get(&X_ENVOY_RETRY_ON)
        .and_then(|v| v.to_str().ok())
        .map(RetryOn::parse_lenient);
    let max = headers
        .get(&X_ENVOY_MAX_RETRIES)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u32>().ok());
    let codes: Vec<u16> = headers
        .get(&X_ENVOY_RETRIABLE_CODES)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_default();
    if on.is_none() && max.is_none() && base.is_none() {
        return None;
    }
    let mut p = base.unwrap_or(RetryPolicy {
        retry_on: RetryOn::default(),
        num_retries: 1,
        per_try_timeout: None,
        per_try_idle_timeout: None,
        retriable_status_codes: vec![],
        base_interval: Duration::from_millis(25),
        max_interval: Duration::from_millis(250),
        previous_hosts: false,
        host_selection_retry_max_attempts: 0,
        retriable_headers: Arc::from([]),
        retriable_request_headers: Arc::from([]),
        rate_limited_back_off: None,
        omit_canary: false,
        omit_host_metadata: None,
    });
    if let Some(on) = on {
        p.retry_on = RetryOn(p.retry_on.0 | on.0);
    }
    if let Some(m) = max {
        p.num_retries = m;
    }
    p.retriable_status_codes.extend(codes);
    // `x-envoy-retriable-header-names`: each name, when present on the
    // response, makes it retriable under `retriable-headers` (Envoy adds a
    // present matcher per name).
    let names: Vec<xds_client::config::HeaderMatcher> = headers
        .get(&X_ENVOY_RETRIABLE_HEADER_NAMES)
        .and_then(|v| v.to_str().ok())
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
        .map(|n| xds_client::config::HeaderMatcher {
            name: xds_client::config::HeaderKey::Name(n),
            kind: xds_client::config::HeaderMatch::Present(true),
            invert: false,
            treat_missing_as_empty: false,
        })
        .collect();
    if !names.is_empty() {
        p.retriable_headers = p.retriable_headers.iter().cloned().chain(names).collect();
    }
    Some(p)
}

/// Whether an upstream response is retriable under `p`: its status,
/// `retriable_headers` (`retriable-headers`), `x-envoy-ratelimited`
/// (`envoy-ratelimited`) or a trailers-only `grpc-status` (the gRPC
/// conditions), as Envoy's `RetryStateImpl::shouldRetryHeaders`.
fn retriable_response(p: &RetryPolicy, status: u16, headers: &HeaderMap) -> bool {
    let on = p.retry_on;
    if retriable_status(p, status) {
        return true;
    }
    if on.has(RetryOn::ENVOY_RATELIMITED) && headers.contains_key("x-envoy-ratelimited") {
        return true;
    }
    if on.has(RetryOn::RETRIABLE_HEADERS) && !p.retriable_headers.is_empty() {
        let code = status.to_string();
        let pseudo = |k: &xds_client::config::HeaderKey| {
            matches!(k, xds_client::config::HeaderKey::Status).then_some(code.as_str())
        };
        if p.retriable_headers
            .iter()
            .any(|m| m.matches_request(headers, pseudo))
        {
            return true;
        }
    }
    let grpc = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    match grpc {
        Some(1) => on.has(RetryOn::CANCELLED),
        Some(4) => on.has(RetryOn::DEADLINE_EXCEEDED),
        Some(8) => on.has(RetryOn::RESOURCE_EXHAUSTED),
        Some(13) => on.has(RetryOn::INTERNAL),
        Some(14) => on.has(RetryOn::UNAVAILABLE),
        _ => false,
    }
}

/// `rate_limited_retry_back_off`: the interval a retriable response asks
/// for in a reset header (seconds, or a Unix timestamp), when over 1 ms and
/// within `max_interval` (Envoy's `parseRateLimitedResetInterval`).
fn rate_limited_interval(p: &RetryPolicy, headers: &HeaderMap) -> Option<Duration> {
    let b = p.rate_limited_back_off.as_ref()?;
    b.reset_headers.iter().find_map(|(name, unix)| {
        let v: u64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        let d = if *unix {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            Duration::from_secs(v.checked_sub(now)?)
        } else {
            Duration::from_secs(v)
        };
        (d > Duration::from_millis(1) && d <= b.max_interval).then_some(d)
    })
}

/// Outlier detection, as Envoy's router reports: the status code of a
/// response, a local-origin failure for a connect failure, reset or
/// timeout; never a circuit-breaker overflow.
fn report_outlier(cluster: &ClusterRuntime, host: &crate::upstream::Host, outcome: &Outcome) {
    if cluster.outlier.is_none() {
        return;
    }
    use crate::upstream::outlier::LocalResult;
    match outcome {
        Outcome::Response(r, _) => {
            cluster.outlier_local(host, LocalResult::ConnectSuccess);
            cluster.outlier_http(host, r.status().as_u16());
        }
        Outcome::ConnectFailure(_) => cluster.outlier_local(host, LocalResult::ConnectFailed),
        Outcome::Reset(_) => {
            cluster.outlier_local(host, LocalResult::ConnectSuccess);
            cluster.outlier_local(host, LocalResult::ConnectFailed);
        }
        Outcome::Timeout => cluster.outlier_local(host, LocalResult::Timeout),
        Outcome::Overflow => {}
    }
}

/// What one try's pool exchange gives: the response with its connection's
/// certificates and local address, or why there is none.
type TryResult = Result<
    (
        Response<crate::body::UpstreamBody>,
        crate::upstream::pool::ConnInfo,
    ),
    crate::upstream::PoolError,
>;

fn outcome_of(res: TryResult) -> Outcome {
    match res {
        Ok((r, tls)) => Outcome::Response(r, tls),
        Err(e) if e.is_overflow() => Outcome::Overflow,
        Err(e) if e.is_connect() => Outcome::ConnectFailure(e.to_string()),
        Err(e) => Outcome::Reset(e.to_string()),
    }
}

/// The back-off before retry number `n` (1-based): fully jittered
/// exponential, capped; a rate-limited response's reset header instead
/// sets a jittered lower bound (interval to 1.5x, Envoy's
/// `JitteredLowerBoundBackOffStrategy`).
fn back_off(p: &RetryPolicy, n: u32, response: Option<&HeaderMap>) -> Duration {
    if let Some(d) = response.and_then(|h| rate_limited_interval(p, h)) {
        let ms = d.as_millis() as u64;
        return Duration::from_millis(rand::rng().random_range(ms..=ms + ms / 2));
    }
    let exp = p
        .base_interval
        .saturating_mul(1u32 << n.saturating_sub(1).min(16));
    let cap = exp.min(p.max_interval);
    Duration::from_micros(rand::rng().random_range(0..=cap.as_micros().max(1) as u64))
}

/// The hosts the retry host predicates reject (Envoy's
/// `shouldSelectAnotherHost`, re-picked up to
/// `host_selection_retry_max_attempts` times): the hosts tried already
/// (`previous_hosts`), canaries (`omit_canary_hosts`: `envoy.lb` metadata
/// `canary: true`) and hosts whose `envoy.lb` metadata has every label of
/// `omit_host_metadata`.
fn avoid_hosts(
    cluster: &ClusterRuntime,
    p: &RetryPolicy,
    tried: &[std::net::SocketAddr],
) -> Vec<std::net::SocketAddr> {
    let mut out = if p.previous_hosts {
        tried.to_vec()
    } else {
        Vec::new()
    };
    let set = cluster.hosts.load();
    for h in &set.hosts {
        let lb = h.metadata.get("envoy.lb");
        let canary = p.omit_canary
            && lb
                .and_then(|m| m.get("canary"))
                .is_some_and(|c| c.as_bool() == Some(true));
        let labelled = p.omit_host_metadata.as_deref().is_some_and(|want| {
            want.as_object().is_some_and(|labels| {
                labels.iter().all(|(k, v)| {
                    lb.and_then(|m| m.get(k)).is_some_and(|have| {
                        have == v || have.as_array().is_some_and(|a| a.contains(v))
                    })
                })
            })
        });
        if canary || labelled {
            out.push(h.addr);
        }
    }
    out
}

/// One upstream attempt of a hedged request.
struct Try<'c> {
    fut: std::pin::Pin<Box<dyn std::future::Future<Output = TryResult> + Send + 'c>>,
    host: Arc<crate::upstream::Host>,
    attempt: u32,
    started: Instant,
    /// When its per-try timeout fires (`None`: fired already, or none).
    per_try_at: Option<Instant>,
    /// A hedge was sent for it (Envoy's `UpstreamRequest::retried`): its
    /// own failure is never retried.
    retried: bool,
}

/// The retries of a hedged request (Envoy's `RetryState`).
struct HedgeRetries<'p> {
    /// The policy when Envoy would keep a retry state.
    policy: Option<&'p RetryPolicy>,
    left: u32,
    done: u32,
    deadline: Option<Instant>,
    /// The route's priority: whose retry limit applies.
    priority: xds_client::config::RoutingPriority,
}

impl HedgeRetries<'_> {
    /// Envoy's `shouldRetry` for a retriable outcome: whether a retry is
    /// scheduled (`upstream_rq_retry`), else the limit or overflow that
    /// prevented it is counted and flagged.
    fn schedule<'c>(
        &mut self,
        cluster: &'c ClusterRuntime,
        info: &mut StreamInfo,
        response: Option<&HeaderMap>,
        slot: &mut Option<crate::upstream::circuit_breaker::LimitGuard<'c>>,
        next_start: &mut Option<Instant>,
    ) -> bool {
        let Some(p) = self.policy else {
            return false;
        };
        if self.left == 0 {
            cluster.stats.upstream_rq_retry_limit_exceeded.inc();
            info.flags.set(Flags::URX);
            return false;
        }
        self.left -= 1;
        // The previous retry's place is released first (Envoy's `resetRetry`).
        *slot = None;
        let rm = cluster.breakers.at(self.priority);
        if !rm.can_retry() {
            cluster.stats.upstream_rq_retry_overflow.inc();
            info.flags.set(Flags::UO);
            return false;
        }
        *slot = Some(rm.retry_guard());
        cluster.stats.upstream_rq_retry.inc();
        self.done += 1;
        let mut wait = back_off(p, self.done, response);
        if let Some(d) = self.deadline {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        *next_start = Some(Instant::now() + wait);
        true
    }
}

/// Ends attempts still in flight (their streams are reset on drop).
fn drop_tries(cluster: &ClusterRuntime, tries: &mut Vec<Try<'_>>) {
    for t in tries.drain(..) {
        t.host
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        cluster.stats.upstream_rq_active.dec();
    }
}

enum Outcome {
    /// With the certificates and local address of the upstream connection
    /// that carried it.
    Response(
        Response<crate::body::UpstreamBody>,
        crate::upstream::pool::ConnInfo,
    ),
    ConnectFailure(String),
    Reset(String),
    Timeout,
    /// A circuit breaker refused the attempt (never retried, as Envoy).
    Overflow,
}

fn retriable_status(p: &RetryPolicy, status: u16) -> bool {
    let on = p.retry_on;
    (on.has(RetryOn::FIVE_XX) && status >= 500)
        || (on.has(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
        || (on.has(RetryOn::RETRIABLE_4XX) && status == 409)
        || (on.has(RetryOn::RETRIABLE_STATUS_CODES) && p.retriable_status_codes.contains(&status))
}

fn retriable_connect(p: &RetryPolicy) -> bool {
    let on = p.retry_on;
    on.has(RetryOn::CONNECT_FAILURE)
        || on.has(RetryOn::FIVE_XX)
        || on.has(RetryOn::GATEWAY_ERROR)
        || on.has(RetryOn::RESET)
        || on.has(RetryOn::RESET_BEFORE_REQUEST)
}

fn retriable_reset(p: &RetryPolicy) -> bool {
    let on = p.retry_on;
    on.has(RetryOn::RESET) || on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR)
}

/// Forwards the request upstream with retries and timeouts.
pub async fn forward(
    mut f: Forward<'_>,
    target: Target,
    mut parts: http::request::Parts,
    body: Option<Incoming>,
    info: &mut StreamInfo,
) -> Response<Body> {
    let cluster = target.cluster;
    info.upstream_cluster = Some(cluster.config.name.clone());
    let mut lb_hash = request_hash(&cluster, f.action, &parts, info);
    // `override_host`: the hosts the request names, one per try.
    let mut overrides = cluster.override_hosts(&parts.headers, Some(&info.dynamic_metadata));
    // ORIGINAL_DST: the destination the request names (every try goes
    // there).
    if let Some(od) = &cluster.original_dst {
        overrides.original_dst = od.destination(&crate::upstream::original_dst::DstInputs {
            filter_state: [Some(&info.filter_state), f.conn_state],
            metadata: [Some(&info.dynamic_metadata), f.conn_metadata],
            headers: Some(&parts.headers),
            restored_local: f.restored_local,
        });
    }
    let retry = retry_policy(&f, &parts);
    let (global, per_try) = timeouts(&f, &parts.headers, retry.as_ref());
    // A trusted `x-envoy-hedge-on-per-try-timeout: true|false` overrides
    // the policy (Envoy's `finalHedgingParams`); hedging needs a per-try
    // timeout.
    let mut hedge = f.hedge_on_per_try_timeout;
    if f.trusted {
        match parts
            .headers
            .get(&X_ENVOY_HEDGE_ON_PER_TRY_TIMEOUT)
            .map(|v| v.as_bytes())
        {
            Some(b"true") => hedge = true,
            Some(b"false") => hedge = false,
            _ => {}
        }
    }
    let hedge = hedge && per_try.is_some() && f.upgrade.is_none();
    // Headers named in `connection` are hop-by-hop too; `te: trailers`
    // survives (Envoy keeps only the trailers token).
    let named: Vec<String> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let te_trailers = parts
        .headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for n in named {
        if !matches!(n.as_str(), "upgrade" | "close" | "keep-alive") {
            parts.headers.remove(n.as_str());
        }
    }
    strip_hop_by_hop(&mut parts.headers, false);
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // x-envoy control headers are consumed here, not forwarded. One scan:
    // `remove_present` rules most keys out by length (a separate "any
    // x-envoy-*?" pass first would always pass when Istio's peer metadata
    // headers are there).
    remove_present(
        &mut parts.headers,
        &[
            &X_ENVOY_RETRY_ON,
            &X_ENVOY_MAX_RETRIES,
            &X_ENVOY_RQ_TIMEOUT,
            &X_ENVOY_PER_TRY_TIMEOUT,
            &X_ENVOY_RETRIABLE_CODES,
            &X_ENVOY_HEDGE_ON_PER_TRY_TIMEOUT,
            &X_ENVOY_RETRIABLE_HEADER_NAMES,
        ],
    );
    if !f.suppress_envoy_headers {
        let expected = match (global, per_try) {
            // Hedged tries are not cancelled: the upstream has the whole
            // global timeout (Envoy's `finalTimeout`).
            (g, Some(_)) if hedge => g,
            (Some(g), Some(p)) => Some(g.min(p)),
            (g, p) => g.or(p),
        };
        if let Some(e) = expected {
            parts.headers.insert(
                X_ENVOY_EXPECTED_TIMEOUT.clone(),
                super::headers::number_value(e.as_millis() as u64),
            );
        }
    }
    let upgrade = f.upgrade.take();
    if let Some((kind, _)) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, kind.clone());
    }
    // Upgrades are not retried (their body is a byte stream).
    let max_attempts = if upgrade.is_some() {
        1
    } else {
        1 + retry.as_ref().map(|r| r.num_retries).unwrap_or(0)
    };
    // Buffer small bodies so the request can be replayed on retry (and
    // copied to mirrors).
    let mut replay: Option<bytes::Bytes> = f.buffered.take();
    let mut stream_body = if replay.is_some() {
        info.bytes_received = replay.as_ref().map_or(0, |b| b.len() as u64);
        if let (Some(b), Some(mut o)) = (&replay, f.request_observer.take()) {
            o.on_data(b);
            o.on_end();
        }
        None
    } else {
        body
    };
    let keep = f.keep_request.is_some() && upgrade.is_none();
    let want_buffer = max_attempts > 1 || keep || (!f.mirrors.is_empty() && upgrade.is_none());
    if let (true, None, Some(b)) = (want_buffer, &replay, &stream_body) {
        let small = hyper::body::Body::is_end_stream(b)
            || hyper::body::Body::size_hint(b)
                .upper()
                .is_some_and(|u| u <= u64::from(f.buffer_limit));
        if small {
            let b = stream_body.take().expect("set above");
            match b.collect().await {
                Ok(c) => {
                    let bytes = c.to_bytes();
                    info.bytes_received = bytes.len() as u64;
                    if let Some(mut o) = f.request_observer.take() {
                        o.on_data(&bytes);
                        o.on_end();
                    }
                    replay = Some(bytes);
                }
                Err(_) => {
                    info.flags.set(Flags::DC);
                    return reply(400, "");
                }
            }
        }
    }
    if !f.mirrors.is_empty() && upgrade.is_none() {
        match &replay {
            Some(b) => send_mirrors(&f.mirrors, &parts, b, global, info),
            // A body larger than the buffer limit is not shadowed.
            None => tracing::debug!("request body too large to mirror"),
        }
    }
    if let Some(k) = f.keep_request.take().filter(|_| keep) {
        let mut head = http::Request::new(()).into_parts().0;
        head.method = parts.method.clone();
        head.uri = parts.uri.clone();
        head.version = parts.version;
        head.headers = parts.headers.clone();
        *k = Some(super::redirect::Source {
            head,
            body: replay.clone(),
        });
    }
    // One clock read for the route deadline and the upstream start.
    let upstream_start = Instant::now();
    let deadline = global.map(|g| upstream_start + g);
    let state = f.state.clone();
    let timers = f.timers;
    // An upgrade goes out in the cluster's protocol too: an HTTP/1.1
    // upgrade, or an extended CONNECT on HTTP/2 (`pool::to_h2`).
    let kind = cluster.pool_kind(f.downstream_h2);
    let alpn_override = upstream_alpn(&info.filter_state, &cluster.config, f.downstream_h2);
    let proxy_source = f.proxy_source.clone();
    // Filter state shared with upstream: only an internal connection
    // carries it, so only clusters with an internal transport look.
    let shared_objects = cluster
        .internal_transport
        .then(|| crate::internal::shared_objects(&info.filter_state))
        .flatten();
    // A refcounted clone, not a copy of the text.
    let path_and_query = &parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // A refcounted clone (`ReqStr`), not a copy of the text.
    let authority = info.authority.clone();
    let mut tried: Vec<std::net::SocketAddr> = Vec::new();
    let mut attempt = 0u32;
    // The retry in flight holds a place under max_retries / the retry
    // budget until its outcome is known (Envoy's RetryState).
    let mut _retry_slot: Option<crate::upstream::circuit_breaker::LimitGuard<'_>> = None;
    if hedge {
        // `hedge_on_per_try_timeout` (Envoy's `onSoftPerTryTimeout`): a
        // per-try timeout does not end the try; another is sent (a retry:
        // `num_retries`, `max_retries` / the budget, back-off) and the
        // first usable response wins, the other tries are reset.
        //
        // Envoy keeps a retry state only for a policy with retry conditions
        // and a body it can replay; without one a per-try timeout does
        // nothing (the global timeout still applies).
        let state_policy = retry
            .as_ref()
            .filter(|p| p.retry_on.0 != 0 && (replay.is_some() || p.num_retries == 0));
        let mut budget = HedgeRetries {
            policy: state_policy,
            left: state_policy.map_or(0, |p| p.num_retries),
            done: 0,
            deadline,
            priority: f.action.priority,
        };
        let per_try = per_try.expect("hedging needs a per-try timeout");
        let mut tries: Vec<Try<'_>> = Vec::new();
        let mut next_start = Some(Instant::now());
        let mut last: Option<(Outcome, u32)> = None;
        loop {
            if next_start.is_some_and(|t| Instant::now() >= t) {
                next_start = None;
                attempt += 1;
                info.attempt_count = attempt;
                let prev = retry.as_ref().is_some_and(|r| r.previous_hosts);
                let avoid_buf;
                let avoid: &[std::net::SocketAddr] = match retry.as_ref().filter(|_| attempt > 1) {
                    Some(r) if r.omit_canary || r.omit_host_metadata.is_some() => {
                        avoid_buf = avoid_hosts(&cluster, r, &tried);
                        &avoid_buf
                    }
                    _ if prev => &tried,
                    _ => &[],
                };
                let host_attempts = retry
                    .as_ref()
                    .filter(|_| attempt > 1)
                    .map_or(0, |r| r.host_selection_retry_max_attempts);
                let Some(host) =
                    cluster.choose_request(lb_hash.hash, &mut overrides, avoid, host_attempts)
                else {
                    // As Envoy's `doRetry`: no host ends the request.
                    drop_tries(&cluster, &mut tries);
                    info.flags.set(Flags::UH);
                    info.response_code_details = "no_healthy_upstream";
                    return reply(503, NO_HEALTHY_UPSTREAM);
                };
                cluster.record_selected_host(&mut info.dynamic_metadata, host.addr);
                if prev {
                    tried.push(host.addr);
                }
                info.set_upstream_host(&host);
                if !host.metadata.is_null() {
                    info.upstream_metadata = Some(host.clone());
                }
                let body = match (&replay, stream_body.take()) {
                    (Some(b), _) => Body::full(b.clone()),
                    (None, Some(s)) => {
                        Body::request(s, &state, timers.request, f.request_observer.take())
                    }
                    (None, None) => Body::Empty,
                };
                let auth = upstream_authority(&f, &host.hostname, &authority, &mut parts.headers);
                let req = build_request(
                    &parts,
                    kind,
                    path_and_query,
                    auth,
                    body,
                    f.include_attempt_count.then_some(attempt),
                    None,
                );
                cluster.stats.upstream_rq_total.inc();
                cluster.stats.upstream_rq_active.inc();
                host.active
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let fut = send_try(
                    &cluster,
                    kind,
                    f.action.priority,
                    &host,
                    alpn_override.clone(),
                    &proxy_source,
                    shared_objects.as_ref(),
                    req,
                );
                tries.push(Try {
                    fut: Box::pin(fut),
                    host,
                    attempt,
                    started: Instant::now(),
                    per_try_at: Some(Instant::now() + per_try),
                    retried: false,
                });
            }
            if tries.is_empty() && next_start.is_none() {
                // Every try failed: the latest failure answers.
                let (outcome, n) = last.take().unwrap_or((Outcome::Timeout, attempt));
                return respond(
                    outcome,
                    n,
                    false,
                    &f,
                    None,
                    lb_hash.set_cookie.take(),
                    &cluster,
                    upstream_start.elapsed(),
                    &state,
                    timers,
                    info,
                );
            }
            let stream_at = match stream_next(&state, timers, Instant::now()) {
                Ok(at) => at,
                Err(which) => {
                    drop_tries(&cluster, &mut tries);
                    let complete = state
                        .request_complete
                        .load(std::sync::atomic::Ordering::Relaxed);
                    return stream_timeout_reply(which, info, complete);
                }
            };
            let wake = [next_start, deadline, stream_at]
                .into_iter()
                .chain(tries.iter().map(|t| t.per_try_at))
                .flatten()
                .min();
            let any = std::future::poll_fn(|cx| {
                for (i, t) in tries.iter_mut().enumerate() {
                    if let std::task::Poll::Ready(r) = t.fut.as_mut().poll(cx) {
                        return std::task::Poll::Ready((i, r));
                    }
                }
                std::task::Poll::Pending
            });
            let done = match wake {
                Some(at) => tokio::time::timeout_at(at, any).await.ok(),
                None => Some(any.await),
            };
            let Some((i, res)) = done else {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    // The global timeout resets every try, each counted
                    // as an upstream timeout (Envoy's `onResponseTimeout`).
                    for t in &tries {
                        if t.per_try_at.is_some() {
                            report_outlier(&cluster, &t.host, &Outcome::Timeout);
                        }
                        cluster.stats.upstream_rq_timeout.inc();
                    }
                    drop_tries(&cluster, &mut tries);
                    // Counted above: `respond` must not count it again.
                    return respond(
                        Outcome::Timeout,
                        attempt,
                        true,
                        &f,
                        None,
                        lb_hash.set_cookie.take(),
                        &cluster,
                        upstream_start.elapsed(),
                        &state,
                        timers,
                        info,
                    );
                }
                // Soft per-try timeouts: the try goes on, a hedge is sent.
                // As Envoy, not counted as `upstream_rq_per_try_timeout`.
                for t in tries.iter_mut() {
                    if t.per_try_at.is_some_and(|at| now >= at) {
                        t.per_try_at = None;
                        report_outlier(&cluster, &t.host, &Outcome::Timeout);
                        if budget.schedule(&cluster, info, None, &mut _retry_slot, &mut next_start)
                        {
                            t.retried = true;
                        }
                    }
                }
                continue;
            };
            let t = tries.swap_remove(i);
            t.host
                .active
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            cluster.stats.upstream_rq_active.dec();
            let outcome = outcome_of(res);
            report_outlier(&cluster, &t.host, &outcome);
            let would_retry = state_policy.is_some_and(|p| match &outcome {
                Outcome::Response(r, _) => retriable_response(p, r.status().as_u16(), r.headers()),
                Outcome::ConnectFailure(_) => retriable_connect(p),
                Outcome::Reset(_) => retriable_reset(p),
                Outcome::Timeout | Outcome::Overflow => false,
            });
            let pending = !tries.is_empty() || next_start.is_some();
            if let Outcome::Response(r, _) = &outcome {
                cluster.stats.record_status(r.status().as_u16());
                cluster
                    .stats
                    .upstream_rq_time
                    .record_us(t.started.elapsed().as_micros() as u64);
                let mut could_not_retry = t.retried && would_retry;
                if !t.retried && would_retry {
                    if budget.schedule(
                        &cluster,
                        info,
                        Some(r.headers()),
                        &mut _retry_slot,
                        &mut next_start,
                    ) {
                        continue;
                    }
                    could_not_retry = true;
                }
                if !t.retried && !would_retry && budget.done > 0 {
                    cluster.stats.upstream_rq_retry_success.inc();
                }
                if could_not_retry && pending {
                    // Others may still answer better (Envoy waits for them).
                    continue;
                }
                drop_tries(&cluster, &mut tries);
                info.set_upstream_host(&t.host);
                return respond(
                    outcome,
                    t.attempt.max(attempt),
                    false,
                    &f,
                    None,
                    lb_hash.set_cookie.take(),
                    &cluster,
                    upstream_start.elapsed(),
                    &state,
                    timers,
                    info,
                );
            }
            if !t.retried
                && would_retry
                && budget.schedule(&cluster, info, None, &mut _retry_slot, &mut next_start)
            {
                continue;
            }
            last = Some((outcome, attempt));
        }
    }
    loop {
        attempt += 1;
        info.attempt_count = attempt;
        // Retry host predicates apply to retries only (Envoy's
        // `shouldSelectAnotherHost` checks `is_retry_`).
        let avoid_buf;
        let avoid: &[std::net::SocketAddr] = match retry.as_ref().filter(|_| attempt > 1) {
            Some(r) if r.omit_canary || r.omit_host_metadata.is_some() => {
                avoid_buf = avoid_hosts(&cluster, r, &tried);
                &avoid_buf
            }
            Some(r) if r.previous_hosts => &tried,
            _ => &[],
        };
        let host_attempts = retry
            .as_ref()
            .filter(|_| attempt > 1)
            .map(|r| r.host_selection_retry_max_attempts)
            .unwrap_or(0);
        let Some(host) = cluster.choose_request(lb_hash.hash, &mut overrides, avoid, host_attempts)
        else {
            info.flags.set(Flags::UH);
            info.response_code_details = "no_healthy_upstream";
            return reply(503, NO_HEALTHY_UPSTREAM);
        };
        cluster.record_selected_host(&mut info.dynamic_metadata, host.addr);
        if retry.as_ref().is_some_and(|r| r.previous_hosts) {
            tried.push(host.addr);
        }
        info.set_upstream_host(&host);
        if !host.metadata.is_null() {
            info.upstream_metadata = Some(host.clone());
        }
        let body = match (&replay, stream_body.take()) {
            (Some(b), _) => Body::full(b.clone()),
            (None, Some(s)) => Body::request(s, &state, timers.request, f.request_observer.take()),
            (None, None) => Body::Empty,
        };
        let auth = upstream_authority(&f, &host.hostname, &authority, &mut parts.headers);
        // A request that cannot be retried moves its headers.
        let moved = (max_attempts == 1).then(|| std::mem::take(&mut parts.headers));
        let mut req = build_request(
            &parts,
            kind,
            path_and_query,
            auth,
            body,
            f.include_attempt_count.then_some(attempt),
            moved,
        );
        // The pool sends it as an extended CONNECT on an HTTP/2
        // connection (the cluster's protocol or ALPN's choice).
        if let Some((proto, _)) = &upgrade {
            req.extensions_mut()
                .insert(crate::upstream::pool::Upgrade(proto.clone()));
        }
        // One clock read for the try's timeout, its start and the first
        // check of the stream timers.
        let started = Instant::now();
        let try_timeout = match (per_try, deadline) {
            (Some(p), Some(d)) => Some(p.min(d.saturating_duration_since(started))),
            (Some(p), None) => Some(p),
            (None, Some(d)) => Some(d.saturating_duration_since(started)),
            (None, None) => None,
        };
        cluster.stats.upstream_rq_total.inc();
        cluster.stats.upstream_rq_active.inc();
        host.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fut = send_try(
            &cluster,
            kind,
            f.action.priority,
            &host,
            alpn_override.clone(),
            &proxy_source,
            shared_objects.as_ref(),
            req,
        );
        tokio::pin!(fut);
        // One timer for the attempt: the earliest of the per-try/route
        // deadline and the stream timers, re-armed only when request-body
        // activity moved the idle deadline.
        let try_deadline = try_timeout.map(|t| started + t);
        let mut checked_at = started;
        let res = loop {
            let stream_at = match stream_next(&state, timers, checked_at) {
                Ok(at) => at,
                Err(which) => {
                    host.active
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    cluster.stats.upstream_rq_active.dec();
                    let complete = state
                        .request_complete
                        .load(std::sync::atomic::Ordering::Relaxed);
                    return stream_timeout_reply(which, info, complete);
                }
            };
            let at = match (try_deadline, stream_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match at {
                None => break Some(fut.as_mut().await),
                Some(at) => match tokio::time::timeout_at(at, fut.as_mut()).await {
                    Ok(r) => break Some(r),
                    Err(_) => {
                        checked_at = Instant::now();
                        if try_deadline.is_some_and(|d| checked_at >= d) {
                            break None;
                        }
                        continue;
                    }
                },
            }
        };
        host.active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        cluster.stats.upstream_rq_active.dec();
        let outcome = match res {
            None => Outcome::Timeout,
            Some(r) => outcome_of(r),
        };
        // Outlier detection, as Envoy's router reports: the status code of a
        // response, a local-origin failure for a connect failure, reset or
        // timeout; never a circuit-breaker overflow.
        report_outlier(&cluster, &host, &outcome);
        let can_retry = attempt < max_attempts;
        // One clock read for the try's outcome: the global deadline, the
        // upstream time histogram and the service time.
        let done_at = Instant::now();
        let global_left = deadline.map(|d| d.saturating_duration_since(done_at));
        let global_expired = global_left.is_some_and(|d| d.is_zero());
        let p = retry.as_ref();
        let retry_this = match &outcome {
            Outcome::Response(r, _) => {
                p.is_some_and(|p| retriable_response(p, r.status().as_u16(), r.headers()))
            }
            Outcome::ConnectFailure(_) => p.is_some_and(retriable_connect),
            Outcome::Reset(_) => p.is_some_and(retriable_reset),
            // A per-try timeout is retried under 5xx/gateway-error (Envoy).
            Outcome::Timeout => {
                !global_expired && per_try.is_some() && p.is_some_and(retriable_reset)
            }
            Outcome::Overflow => false,
        };
        _retry_slot = None;
        let per_try_expired =
            matches!(outcome, Outcome::Timeout) && !global_expired && per_try.is_some();
        if per_try_expired {
            cluster.stats.upstream_rq_per_try_timeout.inc();
        }
        let elapsed_us = done_at.saturating_duration_since(started).as_micros() as u64;
        if let Outcome::Response(r, _) = &outcome {
            cluster.stats.record_status(r.status().as_u16());
            cluster.stats.upstream_rq_time.record_us(elapsed_us);
        }
        let mut retry_overflow = false;
        if retry_this && can_retry && !global_expired && replay.is_some() {
            // max_retries / retry_budget: over the limit the response (or
            // failure) stands, flagged UO (Envoy's RetryStatus::NoOverflow).
            let rm = cluster.breakers.at(f.action.priority);
            retry_overflow = !rm.can_retry();
        }
        if retry_overflow {
            cluster.stats.upstream_rq_retry_overflow.inc();
            info.flags.set(Flags::UO);
        } else if retry_this && can_retry && !global_expired && replay.is_some() {
            _retry_slot = Some(cluster.breakers.at(f.action.priority).retry_guard());
            cluster.stats.upstream_rq_retry.inc();
            let p = p.expect("retry_this implies a policy");
            let headers = match &outcome {
                Outcome::Response(r, _) => Some(r.headers()),
                _ => None,
            };
            let wait = back_off(p, attempt, headers);
            let wait = match deadline {
                Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
                None => wait,
            };
            tokio::time::sleep(wait).await;
            continue;
        }
        if retry_this && attempt > 1 && !retry_overflow {
            cluster.stats.upstream_rq_retry_limit_exceeded.inc();
            info.flags.set(Flags::URX);
        } else if attempt > 1 && !retry_overflow && matches!(outcome, Outcome::Response(..)) {
            cluster.stats.upstream_rq_retry_success.inc();
        }
        return respond(
            outcome,
            attempt,
            per_try_expired,
            &f,
            upgrade,
            lb_hash.set_cookie.take(),
            &cluster,
            done_at.saturating_duration_since(upstream_start),
            &state,
            timers,
            info,
        );
    }
}

/// The downstream response for the attempt that settled the request: the
/// upstream response, or the local reply for its failure.
#[allow(clippy::too_many_arguments)]
fn respond(
    outcome: Outcome,
    attempt: u32,
    per_try_expired: bool,
    f: &Forward<'_>,
    upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
    set_cookie: Option<HeaderValue>,
    cluster: &ClusterRuntime,
    service_time: Duration,
    state: &Arc<StreamState>,
    timers: StreamTimers,
    info: &mut StreamInfo,
) -> Response<Body> {
    info.upstream_service_time = Some(service_time);
    if state
        .request_timed_out
        .load(std::sync::atomic::Ordering::Relaxed)
        && !matches!(outcome, Outcome::Response(..))
    {
        return stream_timeout_reply(StreamTimeout::Request, info, false);
    }
    if state.body_error.load(std::sync::atomic::Ordering::Relaxed)
        && !matches!(outcome, Outcome::Response(..))
    {
        // The downstream body was malformed (bad chunking): a protocol
        // error of the client, not an upstream failure (Envoy: 400).
        info.flags.set(Flags::DPE);
        info.response_code_details = "http1.codec_error";
        return reply(400, "Bad Request");
    }
    match outcome {
        Outcome::Response(mut r, conn) => {
            info.response_code_details = "via_upstream";
            info.upstream_tls = conn.tls;
            info.upstream_local = conn.local;
            // An upgrade the upstream accepted: `101` from HTTP/1.1, a 2xx
            // to an extended CONNECT from HTTP/2 (hyper then offers the
            // stream as an upgrade).
            let switching = match &upgrade {
                Some(_) if r.version() == Version::HTTP_2 => {
                    r.status().is_success()
                        && r.extensions().get::<hyper::upgrade::OnUpgrade>().is_some()
                }
                _ => r.status() == http::StatusCode::SWITCHING_PROTOCOLS,
            };
            let upgrade_kind = upgrade.as_ref().map(|(k, _)| k.clone());
            if let (true, Some((_, downstream))) = (switching, upgrade) {
                // Splice the two upgraded connections together.
                let upstream = hyper::upgrade::on(&mut r);
                tokio::spawn(async move {
                    if let (Ok(d), Ok(u)) = (downstream.await, upstream.await) {
                        splice_upgrade(d, u).await;
                    }
                });
            }
            let (mut rp, rb) = r.into_parts();
            strip_hop_by_hop(&mut rp.headers, switching);
            // As Envoy's codecs: an accepted upgrade is a `101` with
            // `upgrade` and `connection: upgrade` to filters and logs
            // whatever the upstream protocol (`finish` makes it the `200`
            // an HTTP/2 client's extended CONNECT gets).
            if switching && rp.version == Version::HTTP_2 {
                rp.status = http::StatusCode::SWITCHING_PROTOCOLS;
                rp.headers.remove(header::CONTENT_LENGTH);
                if let Some(k) = upgrade_kind {
                    rp.headers.insert(header::UPGRADE, k);
                }
                rp.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            // A cookie the hash policy generated (Envoy's headers
            // modifier on the upstream response).
            if let Some(c) = set_cookie {
                rp.headers.append(header::SET_COOKIE, c);
            }
            if !f.suppress_envoy_headers {
                rp.headers.insert(
                    X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
                    super::headers::number_value(service_time.as_millis() as u64),
                );
            }
            rp.version = Version::HTTP_11;
            Response::from_parts(
                rp,
                Body::timed(rb, state.clone(), timers.idle, timers.max_duration),
            )
        }
        Outcome::ConnectFailure(reason) => {
            info.flags.set(Flags::UF);
            info.response_code_details =
                "upstream_reset_before_response_started{remote_connection_failure}";
            // Envoy's text; after retries it names the latest reset reason.
            let body = if attempt > 1 {
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure".to_owned()
            } else {
                "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure".to_owned()
            };
            // An internal connection the listener refused has none (Envoy's
            // user-space sockets report no transport failure).
            info.upstream_failure_reason = (!reason.is_empty()).then_some(reason);
            super::local_reply::reply_owned(503, body.into(), Some("text/plain"))
        }
        Outcome::Reset(reason) => {
            info.flags.set(Flags::UC);
            info.response_code_details =
                "upstream_reset_before_response_started{connection_termination}";
            let _ = reason;
            let text: &'static [u8] = if attempt > 1 {
                b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: connection termination"
            } else {
                b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            };
            super::local_reply::reply_owned(
                503,
                bytes::Bytes::from_static(text),
                Some("text/plain"),
            )
        }
        Outcome::Overflow => {
            info.flags.set(Flags::UO);
            info.response_code_details = "upstream_reset_before_response_started{overflow}";
            let text: &'static [u8] = if attempt > 1 {
                b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: overflow"
            } else {
                b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
            };
            let mut r = super::local_reply::reply_owned(
                503,
                bytes::Bytes::from_static(text),
                Some("text/plain"),
            );
            // As Envoy's router for a dropped (overflowed) request.
            if !f.suppress_envoy_headers {
                r.headers_mut().insert(
                    http::HeaderName::from_static("x-envoy-overloaded"),
                    HeaderValue::from_static("true"),
                );
            }
            r
        }
        Outcome::Timeout => {
            info.flags.set(Flags::UT);
            info.response_code_details = "upstream_response_timeout";
            if !per_try_expired {
                cluster.stats.upstream_rq_timeout.inc();
            }
            reply(504, UPSTREAM_TIMEOUT)
        }
    }
}

/// `auto_host_rewrite`: the chosen host's hostname becomes the authority
/// (the original goes in x-envoy-original-host unless Envoy headers are
/// suppressed); otherwise the request's own.
fn upstream_authority<'a>(
    f: &Forward<'_>,
    hostname: &'a str,
    authority: &'a str,
    headers: &mut HeaderMap,
) -> &'a str {
    match &f.action.host_rewrite {
        HostRewrite::Auto if !hostname.is_empty() => {
            if !f.suppress_envoy_headers {
                if let Ok(v) = HeaderValue::from_str(authority) {
                    headers.insert(X_ENVOY_ORIGINAL_HOST.clone(), v);
                }
            }
            hostname
        }
        _ => authority,
    }
}

fn build_request(
    parts: &http::request::Parts,
    kind: PoolKind,
    path_and_query: &http::uri::PathAndQuery,
    authority: &str,
    body: Body,
    attempt: Option<u32>,
    headers: Option<HeaderMap>,
) -> Request<Body> {
    // HTTP/1.1 sends origin-form with a Host header; HTTP/2 carries the
    // authority as `:authority` (Envoy turns Host into :authority).
    let uri = match kind {
        // An origin-form request URI is reused as is (a cheap clone).
        PoolKind::Http1 if parts.uri.scheme().is_none() && parts.uri.authority().is_none() => {
            Some(parts.uri.clone())
        }
        // From the parsed path: a refcounted clone, not a parse and copy.
        PoolKind::Http1 => Some(Uri::from(path_and_query.clone())),
        PoolKind::Http2 => Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path_and_query.clone())
            .build()
            .ok(),
    }
    .unwrap_or_default();
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = match headers {
        Some(h) => h,
        None => parts.headers.clone(),
    };
    // As Envoy's HTTP/1 codec: a bodyless request with a method that may
    // carry a body says so with content-length: 0.
    if hyper::body::Body::is_end_stream(req.body())
        && !req.headers().contains_key(header::CONTENT_LENGTH)
        && !matches!(
            *req.method(),
            http::Method::GET
                | http::Method::HEAD
                | http::Method::DELETE
                | http::Method::CONNECT
                | http::Method::TRACE
        )
    {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    match kind {
        PoolKind::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            super::headers::set_host(req.headers_mut(), authority);
        }
        PoolKind::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        }
    }
    if let Some(a) = attempt {
        req.headers_mut().insert(
            X_ENVOY_ATTEMPT_COUNT.clone(),
            super::headers::number_value(a.into()),
        );
    }
    req
}

/// Copies an accepted upgrade's bytes both ways. The client's end (FIN,
/// END_STREAM) half-closes the upstream and the upstream may still answer;
/// the upstream's end ends the downstream side (FIN, END_STREAM) and the
/// splice, so a client that never closes does not hold it (Envoy ends the
/// stream there too). A broken side (a reset) ends both.
async fn splice_upgrade(d: hyper::upgrade::Upgraded, u: hyper::upgrade::Upgraded) {
    use tokio::io::AsyncWriteExt;
    let (mut dr, mut dw) = tokio::io::split(hyper_util::rt::TokioIo::new(d));
    let (mut ur, mut uw) = tokio::io::split(hyper_util::rt::TokioIo::new(u));
    let client_to_upstream = async {
        if tokio::io::copy(&mut dr, &mut uw).await.is_ok() {
            let _ = uw.shutdown().await;
            std::future::pending::<()>().await;
        }
    };
    let upstream_to_client = async {
        if tokio::io::copy(&mut ur, &mut dw).await.is_ok() {
            let _ = dw.shutdown().await;
        }
    };
    tokio::select! {
        _ = client_to_upstream => {}
        _ = upstream_to_client => {}
    }
}

/// Host rewrite; returns the new authority when it changes.
pub fn host_rewrite(
    action: &RouteAction,
    headers: &HeaderMap,
    path: &str,
    upstream_hostname: Option<&str>,
) -> Option<String> {
    match &action.host_rewrite {
        HostRewrite::None => None,
        HostRewrite::Literal(s) => Some(s.clone()),
        HostRewrite::Auto => upstream_hostname
            .filter(|h| !h.is_empty())
            .map(str::to_owned),
        HostRewrite::Header(h) => headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        HostRewrite::PathRegex(re, sub) => {
            let p = path.split('?').next().unwrap_or(path);
            Some(re.0.replace_all(p, sub.as_str()).into_owned())
        }
    }
}

/// The upstream ALPN override in the stream's filter state
/// (`envoy.network.application_protocols`, the connection's objects
/// included), resolved for the upstream protocol as Envoy's
/// `ClusterInfo::upstreamHttpProtocol` picks it first: HTTP/2 for HTTP/2 and
/// `auto_config` clusters, the downstream's for
/// `use_downstream_protocol_config` (HTTP/1.0 as HTTP/1.1), else HTTP/1.1.
fn upstream_alpn(
    state: &filters::FilterState,
    c: &xds_client::config::Cluster,
    downstream_h2: bool,
) -> Option<Arc<[Vec<u8>]>> {
    use xds_client::config::UpstreamProtocol as P;
    let o =
        state.get_typed::<filters::ApplicationProtocols>(filters::state::APPLICATION_PROTOCOLS)?;
    // As Istio's istio.alpn: clusters istiod marks `alpn_override: "false"`
    // (user TLS settings) keep their own ALPN.
    if c.istio_alpn_override_disabled && matches!(o, filters::ApplicationProtocols::ByProtocol(_)) {
        return None;
    }
    let proto = match c.protocol {
        P::Http2 | P::Auto => 2,
        P::UseDownstream if downstream_h2 => 2,
        P::UseDownstream | P::Http1 => 1,
    };
    o.resolve(Some(proto))
}

/// Sends one try (first, retry or hedged) to `host` on this worker's pool
/// for the request's protocol and route priority: the one place a try
/// picks its pool and pool key.
// Every part of the pool key is an argument: this is the one place a try
// picks its pool and key.
#[allow(clippy::too_many_arguments)]
fn send_try<'a>(
    cluster: &'a ClusterRuntime,
    kind: PoolKind,
    priority: xds_client::config::RoutingPriority,
    host: &crate::upstream::Host,
    alpn: Option<Arc<[Vec<u8>]>>,
    source: &'a crate::upstream::proxy_protocol::ProxySource,
    shared: Option<&Arc<crate::internal::SharedObjects>>,
    req: Request<Body>,
) -> impl std::future::Future<
    Output = Result<
        (
            Response<crate::body::UpstreamBody>,
            crate::upstream::pool::ConnInfo,
        ),
        crate::upstream::PoolError,
    >,
> + 'a {
    let dest = cluster.dest(host);
    let dest = crate::upstream::pool::Dest {
        sni: auto_sni(&cluster.config, &req).or(dest.sni),
        alpn,
        source: Some(source),
        internal: dest.internal.map(|i| crate::upstream::pool::InternalDest {
            shared: shared.cloned(),
            ..i
        }),
        ..dest
    };
    cluster.pool_at(kind, priority).request(dest, req)
}

/// `auto_sni`: the SNI for an upstream TLS connection, from
/// `override_auto_sni_header` or the request's host (without port).
fn auto_sni(c: &xds_client::config::Cluster, req: &Request<Body>) -> Option<Arc<str>> {
    if !c.auto_sni {
        return None;
    }
    let from_header = c
        .auto_sni_header
        .as_ref()
        .and_then(|h| req.headers().get(h))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let host = from_header.or_else(|| req.uri().host()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })?;
    let host = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    // An IP literal is never sent as SNI.
    if host.is_empty()
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
    {
        return None;
    }
    Some(host.into())
}

/// The request hash, once, only for a consistent-hash cluster with a hash
/// policy: the cluster's own, else the route's (Envoy evaluates it for
/// those LBs only). Used by the router and by CONNECT termination.
pub(crate) fn request_hash(
    cluster: &crate::upstream::ClusterRuntime,
    action: &xds_client::config::RouteAction,
    parts: &http::request::Parts,
    info: &StreamInfo,
) -> crate::upstream::hash_lb::RequestHash {
    let policies = if cluster.config.lb_hash_policy.is_empty() {
        &action.hash_policy
    } else {
        &cluster.config.lb_hash_policy
    };
    if !cluster.config.lb.is_hash() || policies.is_empty() {
        return crate::upstream::hash_lb::RequestHash::default();
    }
    crate::upstream::hash_lb::request_hash(
        policies,
        &parts.headers,
        &parts.uri,
        info.downstream_remote,
        info.downstream_direct_remote,
        info.downstream_local,
        Some(&info.filter_state),
    )
}
