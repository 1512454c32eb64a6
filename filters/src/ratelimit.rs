//! `envoy.filters.http.ratelimit` as Envoy 1.40's `RateLimitFilter::Filter`:
//! the route's (and virtual host's) `rate_limits` of the filter's `stage`
//! become descriptors (the local rate limit's code), sent to the rate limit
//! service (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`)
//! through the proxy's [`Callouts`]; `OVER_LIMIT` answers 429, errors let the
//! request through unless `failure_mode_deny`.
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use xds_client::api::envoy::config::core::v3 as core;
use xds_client::api::envoy::extensions::common::ratelimit::v3 as common;
use xds_client::api::envoy::service::ratelimit::v3 as rls;
use xds_client::config::{FilterOverride, HttpRateLimit, RequestType, VhRateLimits};

use crate::callout::{grpc_unary, Callouts};
use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};
use crate::local_ratelimit::{Policies, Request};

const METHOD: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// `cluster.<route cluster>.ratelimit.*`.
struct ClusterStats {
    ok: Arc<dyn Counter>,
    over_limit: Arc<dyn Counter>,
    error: Arc<dyn Counter>,
    failure_mode_allowed: Arc<dyn Counter>,
}

struct Shared {
    cfg: Arc<HttpRateLimit>,
    callouts: Arc<dyn Callouts>,
    scope: Arc<dyn StatsScope>,
    /// Per route cluster, made on first use (clusters are bounded by the
    /// configuration).
    clusters: RwLock<Vec<(Box<str>, Arc<ClusterStats>)>>,
}

impl Shared {
    fn stats(&self, cluster: &str) -> Arc<ClusterStats> {
        let found = self
            .clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(c, _)| &**c == cluster)
            .map(|(_, s)| s.clone());
        if let Some(s) = found {
            return s;
        }
        let mut w = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = w.iter().find(|(c, _)| &**c == cluster) {
            return s.clone();
        }
        let c = |n: &str| self.scope.cluster_counter(cluster, n);
        let s = Arc::new(ClusterStats {
            ok: c("ratelimit.ok"),
            over_limit: c("ratelimit.over_limit"),
            error: c("ratelimit.error"),
            failure_mode_allowed: c("ratelimit.failure_mode_allowed"),
        });
        w.push((cluster.into(), s.clone()));
        s
    }
}

pub struct RateLimitFactory {
    name: Arc<str>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RateLimitFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitFactory")
            .field("name", &self.name)
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl RateLimitFactory {
    pub fn new(
        name: Arc<str>,
        cfg: Arc<HttpRateLimit>,
        stats: &Arc<dyn StatsScope>,
        callouts: &Arc<dyn Callouts>,
    ) -> Self {
        RateLimitFactory {
            name,
            shared: Arc::new(Shared {
                cfg,
                callouts: callouts.clone(),
                scope: stats.clone(),
                clusters: RwLock::new(Vec::new()),
            }),
        }
    }
}

impl HttpFilterFactory for RateLimitFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // No route entry or cluster: nothing to do (as Envoy).
        let cluster = route.cluster?;
        // The most specific `RateLimitPerRoute`: which virtual host rate
        // limits apply, and the domain (as Envoy's `getDomain`).
        let per_route = match route.override_for(&self.name) {
            Some(FilterOverride::RateLimit(p)) => Some(p.clone()),
            _ => None,
        };
        let vh = per_route
            .as_ref()
            .map_or(VhRateLimits::Override, |p| p.vh_rate_limits);
        let policies = Policies::select(route, vh);
        if policies.is_empty() {
            return None;
        }
        let domain = per_route
            .filter(|p| !p.domain.is_empty())
            .map(|p| p.domain.clone());
        Some(Box::new(RateLimitFilter {
            shared: self.shared.clone(),
            domain,
            policies,
            cluster: cluster.into(),
            slot: None,
            response: None,
        }))
    }
}

/// What the service asked to add.
#[derive(Debug, Default)]
struct Decision {
    request: Vec<(HeaderName, HeaderValue)>,
    response: Vec<(HeaderName, HeaderValue)>,
}

type Slot = Arc<Mutex<Option<Decision>>>;

struct RateLimitFilter {
    shared: Arc<Shared>,
    /// `RateLimitPerRoute.domain`, when set.
    domain: Option<String>,
    policies: Policies,
    cluster: Box<str>,
    slot: Option<Slot>,
    response: Option<Vec<(HeaderName, HeaderValue)>>,
}

impl HttpFilter for RateLimitFilter {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let cfg = &self.shared.cfg;
        // As Envoy: a request the filter is not enabled for is not checked
        // (nothing counted).
        if cfg
            .filter_enabled
            .is_some_and(|f| !f.hit(rand::random::<u64>()))
        {
            return Action::Continue;
        }
        // Envoy's `isEnvoyInternalRequest`: `x-envoy-internal: true`, which
        // the HCM sets for internal peers.
        let internal = head
            .headers
            .get("x-envoy-internal")
            .is_some_and(|v| v == "true");
        match cfg.request_type {
            RequestType::Both => {}
            RequestType::Internal if internal => {}
            RequestType::External if !internal => {}
            _ => return Action::Continue,
        }
        let req = Request {
            head: &*head,
            remote: cx.downstream.as_ref().map(|d| d.remote.ip()),
            cluster: Some(&self.cluster),
        };
        let descriptors = self.policies.descriptors_with(cfg.stage, &req, true);
        if descriptors.is_empty() {
            return Action::Continue;
        }
        let msg = rls::RateLimitRequest {
            domain: self.domain.clone().unwrap_or_else(|| cfg.domain.clone()),
            descriptors: descriptors
                .into_iter()
                .map(|d| common::RateLimitDescriptor {
                    entries: d
                        .into_iter()
                        .map(|(key, value)| common::rate_limit_descriptor::Entry { key, value })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            hits_addend: 1,
        };
        let call = grpc_unary::<_, rls::RateLimitResponse>(
            &*self.shared.callouts,
            &cfg.service.cluster,
            &cfg.service.authority,
            METHOD,
            &msg,
            cfg.timeout,
            &cfg.service.initial_metadata,
        );
        let slot: Slot = Arc::new(Mutex::new(None));
        self.slot = Some(slot.clone());
        let shared = self.shared.clone();
        let stats = shared.stats(&self.cluster);
        Action::Wait(Box::pin(async move {
            let cfg = &shared.cfg;
            let resp = match call.await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "rate limit call failed");
                    return error(cfg, &stats);
                }
            };
            use rls::rate_limit_response::Code;
            let code = Code::try_from(resp.overall_code).unwrap_or(Code::Unknown);
            let mut d = Decision {
                request: headers(&resp.request_headers_to_add),
                response: headers(&resp.response_headers_to_add),
            };
            match code {
                Code::Ok => stats.ok.inc(),
                Code::OverLimit => {
                    stats.over_limit.inc();
                    if !cfg.disable_x_envoy_ratelimited_header {
                        d.response
                            .push((RATELIMITED, HeaderValue::from_static("true")));
                    }
                }
                Code::Unknown => return error(cfg, &stats),
            }
            if cfg.x_ratelimit_headers {
                d.response.extend(x_ratelimit(&resp.statuses));
            }
            let body = Bytes::from(resp.raw_body);
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
            // As Envoy: an over-limit answer that is not enforced
            // (`filter_enforced`) lets the request go upstream with the
            // service's headers (`x-envoy-ratelimited` included).
            let enforced = cfg
                .filter_enforced
                .is_none_or(|f| f.hit(rand::random::<u64>()));
            if code == Code::OverLimit && enforced {
                return Action::Respond(LocalReply {
                    status: http::StatusCode::from_u16(cfg.rate_limited_status)
                        .unwrap_or(http::StatusCode::TOO_MANY_REQUESTS),
                    body,
                    flag: Some("RL"),
                    details: "request_rate_limited",
                    grpc_status: cfg
                        .rate_limited_as_resource_exhausted
                        .then_some(crate::callout::grpc_status::RESOURCE_EXHAUSTED),
                });
            }
            Action::Continue
        }))
    }

    fn on_request_headers_resumed(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        if let Some(d) = self.slot.take().and_then(|s| take(&s)) {
            for (k, v) in d.request {
                head.headers.append(k, v);
            }
            self.response = Some(d.response);
        }
        Action::Continue
    }

    fn on_response_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        // A limited request's decision is still in the slot.
        let from_reply = self.slot.take().and_then(|s| take(&s));
        let local = from_reply.is_some();
        let add = from_reply
            .map(|d| d.response)
            .or_else(|| self.response.take());
        if let Some(add) = add {
            // The service's content-type wins over a local reply's
            // text/plain (as Envoy).
            if local && add.iter().any(|(k, _)| k == http::header::CONTENT_TYPE) {
                head.headers.remove(http::header::CONTENT_TYPE);
            }
            for (k, v) in add {
                head.headers.append(k, v);
            }
        }
        Action::Continue
    }
}

fn take(s: &Slot) -> Option<Decision> {
    s.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// An error (the call failed, or the service answered UNKNOWN).
fn error(cfg: &HttpRateLimit, stats: &ClusterStats) -> Action {
    stats.error.inc();
    if cfg.failure_mode_deny {
        return Action::Respond(LocalReply {
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            body: Bytes::new(),
            flag: Some("RLSE"),
            details: "rate_limiter_error",
            grpc_status: None,
        });
    }
    stats.failure_mode_allowed.inc();
    Action::Continue
}

fn headers(h: &[core::HeaderValue]) -> Vec<(HeaderName, HeaderValue)> {
    h.iter()
        .filter_map(|h| {
            let raw: &[u8] = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            Some((
                HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).ok()?,
                HeaderValue::from_bytes(raw).ok()?,
            ))
        })
        .collect()
}

/// The seconds of a `RateLimit.Unit`.
fn unit_seconds(unit: i32) -> Option<u64> {
    match unit {
        1 => Some(1),
        2 => Some(60),
        3 => Some(3600),
        4 => Some(86_400),
        5 => Some(30 * 86_400),
        6 => Some(365 * 86_400),
        _ => None,
    }
}

/// `X-RateLimit-*` (draft 03) as Envoy's `XRateLimitHeaderUtils::create`:
/// the status with the least remaining sets `-Limit` (its limit, then every
/// limit's quota policy), `-Remaining` and `-Reset`.
fn x_ratelimit(
    statuses: &[rls::rate_limit_response::DescriptorStatus],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut min: Option<&rls::rate_limit_response::DescriptorStatus> = None;
    let mut policies = Vec::new();
    for s in statuses {
        let Some(limit) = &s.current_limit else {
            continue;
        };
        if min.is_none_or(|m| s.limit_remaining < m.limit_remaining) {
            min = Some(s);
        }
        if let Some(w) = unit_seconds(limit.unit) {
            let mut p = format!("{};w={w}", limit.requests_per_unit);
            if !limit.name.is_empty() {
                p.push_str(&format!(";name=\"{}\"", limit.name));
            }
            policies.push(p);
        }
    }
    let Some(min) = min else {
        return Vec::new();
    };
    let limit = min
        .current_limit
        .as_ref()
        .map_or(0, |l| l.requests_per_unit);
    let mut text = limit.to_string();
    for p in &policies {
        text.push_str(", ");
        text.push_str(p);
    }
    let mut out = Vec::with_capacity(3);
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            out.push((HeaderName::from_static(k), v));
        }
    };
    put("x-ratelimit-limit", text);
    put("x-ratelimit-remaining", min.limit_remaining.to_string());
    if let Some(d) = &min.duration_until_reset {
        put("x-ratelimit-reset", d.seconds.max(0).to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_ratelimit_headers_from_the_least_remaining() {
        use rls::rate_limit_response::{DescriptorStatus, RateLimit};
        let s = |rpu: u32, unit: i32, remaining: u32, name: &str| DescriptorStatus {
            current_limit: Some(RateLimit {
                requests_per_unit: rpu,
                unit,
                name: name.into(),
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(xds_client::api::google::protobuf::Duration {
                seconds: 30,
                nanos: 0,
            }),
            ..Default::default()
        };
        let h = x_ratelimit(&[s(10, 2, 5, ""), s(3, 1, 1, "per-sec")]);
        let get = |k: &str| {
            h.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().expect("ascii").to_owned())
        };
        assert_eq!(
            get("x-ratelimit-limit").as_deref(),
            Some("3, 10;w=60, 3;w=1;name=\"per-sec\"")
        );
        assert_eq!(get("x-ratelimit-remaining").as_deref(), Some("1"));
        assert_eq!(get("x-ratelimit-reset").as_deref(), Some("30"));
    }
}
