//! `envoy.filters.http.cors`, as Envoy 1.40's `CorsFilter`.
//!
//! Policies come from `typed_per_filter_config` (`CorsPolicy`) of the route,
//! its virtual host and its route configuration, most specific first; when
//! none has one, from the deprecated `cors` of the route action, then of the
//! virtual host. Each field is taken from the first policy that sets it;
//! `filter_enabled` and `shadow_enabled` only from the most specific policy.
//!
//! Request: with an `Origin`, the origin is checked (`cors.origin_valid` /
//! `cors.origin_invalid`); a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered with 200 and the policy's
//! headers, unless its origin is not allowed and
//! `forward_not_matching_preflights` (default true) lets it through.
//! Response (any response of a CORS request, the preflight answer included,
//! as Envoy's `encodeHeaders` sees every response): an allowed origin is
//! echoed in `access-control-allow-origin`, with
//! `access-control-allow-credentials` and `access-control-expose-headers`.
//!
//! An instance exists only for requests whose route has a policy: without
//! any, Envoy's filter does nothing, and weir creates nothing.
use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use xds_client::config::{CorsPolicy, FilterOverride, Name, LEGACY_CORS_KEY};

use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};

/// `%RESPONSE_CODE_DETAILS%` of a preflight answered by the filter.
pub const CORS_RESPONSE: &str = "cors_response";

const ACCESS_CONTROL_REQUEST_METHOD: &str = "access-control-request-method";
const ACCESS_CONTROL_REQUEST_HEADERS: &str = "access-control-request-headers";
const ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK: &str = "access-control-request-private-network";
const ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK: &str = "access-control-allow-private-network";

fn true_value() -> HeaderValue {
    HeaderValue::from_static("true")
}

/// The CORS filter's factory: its name (the key of per-route policies) and
/// the HCM-wide stats.
#[derive(Debug)]
pub struct CorsFactory {
    name: Name,
    stats: Arc<Stats>,
}

/// `http.<stat_prefix>.cors.*`.
struct Stats {
    origin_valid: Arc<dyn Counter>,
    origin_invalid: Arc<dyn Counter>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

// === impl CorsFactory ===

impl CorsFactory {
    pub fn new(name: Name, scope: &Arc<dyn StatsScope>) -> Self {
        CorsFactory {
            name,
            stats: Arc::new(Stats {
                origin_valid: scope.counter("cors.origin_valid"),
                origin_invalid: scope.counter("cors.origin_invalid"),
            }),
        }
    }
}

/// The policy stored under `key` at one level, if it is a CORS policy (as
/// Envoy's `getAllPerFilterConfig<CorsPolicy>`, another type is skipped).
fn policy_at<'a>(
    level: &'a xds_client::config::PerFilterConfigs,
    key: &str,
) -> Option<&'a Arc<CorsPolicy>> {
    match level.get(key)?.config.as_ref()? {
        FilterOverride::Cors(p) => Some(p),
        _ => None,
    }
}

impl HttpFilterFactory for CorsFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn needs_route_config(&self) -> bool {
        // Policies come only from the route, virtual host or route
        // configuration (per-filter config or the legacy `cors` fields).
        true
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // Direct responses and redirects have no route entry: Envoy's
        // filter does nothing for them.
        route.cluster?;
        let mut policies: [Option<Arc<CorsPolicy>>; 3] = Default::default();
        let mut n = 0;
        for level in route.per_filter {
            if let Some(p) = policy_at(level, &self.name) {
                policies[n] = Some(p.clone());
                n += 1;
            }
        }
        if n == 0 {
            // Route action, then virtual host (route configurations have
            // no legacy field).
            for level in &route.per_filter[..2] {
                if let Some(p) = policy_at(level, LEGACY_CORS_KEY) {
                    policies[n] = Some(p.clone());
                    n += 1;
                }
            }
        }
        if n == 0 {
            return None;
        }
        Some(Box::new(CorsFilter {
            policies,
            stats: self.stats.clone(),
            is_cors_request: false,
            latched_origin: None,
            preflight: None,
        }))
    }
}

/// One request's CORS state.
struct CorsFilter {
    /// Most specific first; at least the first is set.
    policies: [Option<Arc<CorsPolicy>>; 3],
    stats: Arc<Stats>,
    /// The filter is enabled and the request has an `Origin`.
    is_cors_request: bool,
    /// The request's `Origin`, when allowed.
    latched_origin: Option<HeaderValue>,
    /// The headers of the preflight answer, set when the answer passes
    /// the response phase.
    preflight: Option<HeaderMap>,
}

// === impl CorsFilter ===

impl CorsFilter {
    fn policies(&self) -> impl Iterator<Item = &CorsPolicy> {
        self.policies.iter().flatten().map(|p| &**p)
    }

    /// The first policy's value of a field, as Envoy's accessors.
    fn first<T>(&self, f: impl Fn(&CorsPolicy) -> Option<T>) -> Option<T> {
        self.policies().find_map(f)
    }

    /// `filter_enabled` of the most specific policy, rolled per call as
    /// Envoy's `featureEnabled` (unset: enabled).
    fn enabled(&self) -> bool {
        self.policies()
            .next()
            .and_then(|p| p.filter_enabled)
            .is_none_or(|f| f.hit(rand::random()))
    }

    /// `shadow_enabled` of the most specific policy (unset: off).
    fn shadow_enabled(&self) -> bool {
        self.policies()
            .next()
            .and_then(|p| p.shadow_enabled)
            .is_some_and(|f| f.hit(rand::random()))
    }

    /// As Envoy's `isOriginAllowed`: a matcher of the first policy with
    /// any matches `*` or the origin.
    fn origin_allowed(&self, origin: &str) -> bool {
        let Some(p) = self.policies().find(|p| !p.allow_origins.is_empty()) else {
            return false;
        };
        p.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    fn allow_credentials(&self) -> bool {
        self.first(|p| p.allow_credentials).unwrap_or(false)
    }

    /// The preflight answer's headers (Envoy's `decodeHeaders`).
    fn preflight_headers(&self, req: &HeaderMap) -> HeaderMap {
        let mut h = HeaderMap::new();
        // Latched only when allowed.
        if let Some(o) = &self.latched_origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
        }
        if self.allow_credentials() {
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, true_value());
        }
        if let Some(m) = self.first(|p| p.allow_methods.clone()) {
            let v = if m == "*" {
                inline_value(req, ACCESS_CONTROL_REQUEST_METHOD)
            } else {
                m
            };
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if let Some(a) = self.first(|p| p.allow_headers.clone()) {
            let v = if a == "*" {
                inline_value(req, ACCESS_CONTROL_REQUEST_HEADERS)
            } else {
                a
            };
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(m) = self.first(|p| p.max_age.clone()) {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, m);
        }
        if self
            .first(|p| p.allow_private_network_access)
            .unwrap_or(false)
            && inline_value(req, ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK) == "true"
        {
            h.insert(
                HeaderName::from_static(ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK),
                true_value(),
            );
        }
        h
    }
}

impl HttpFilter for CorsFilter {
    fn on_request_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        if !self.enabled() && !self.shadow_enabled() {
            return Action::Continue;
        }
        let origin = inline_value(&head.headers, header::ORIGIN.as_str());
        if origin.is_empty() {
            return Action::Continue;
        }
        let allowed = self.origin_allowed(&String::from_utf8_lossy(origin.as_bytes()));
        if allowed {
            self.stats.origin_valid.inc();
            self.latched_origin = Some(origin);
        } else {
            self.stats.origin_invalid.inc();
        }
        if self.shadow_enabled() && !self.enabled() {
            return Action::Continue;
        }
        self.is_cors_request = true;
        if head.method != Method::OPTIONS
            || inline_value(&head.headers, ACCESS_CONTROL_REQUEST_METHOD).is_empty()
        {
            return Action::Continue;
        }
        if !allowed && self.first(|p| p.forward_not_matching_preflights) != Some(false) {
            return Action::Continue;
        }
        self.preflight = Some(self.preflight_headers(&head.headers));
        Action::Respond(LocalReply {
            status: http::StatusCode::OK,
            body: bytes::Bytes::new(),
            flag: None,
            details: CORS_RESPONSE,
            grpc_status: None,
        })
    }

    fn on_response_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        if let Some(p) = self.preflight.take() {
            for (k, v) in p {
                if let Some(k) = k {
                    head.headers.insert(k, v);
                }
            }
        }
        if !self.is_cors_request {
            return Action::Continue;
        }
        let Some(origin) = self.latched_origin.clone() else {
            // The origin did not match: the response is left alone.
            return Action::Continue;
        };
        head.headers
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials() {
            head.headers
                .insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, true_value());
        }
        if let Some(e) = self.first(|p| p.expose_headers.clone()) {
            head.headers
                .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e);
        }
        Action::Continue
    }
}

/// A request header as Envoy's inline headers hold it: several values
/// joined with `,`; absent is empty.
fn inline_value(h: &HeaderMap, name: &str) -> HeaderValue {
    let mut all = h.get_all(name).iter();
    let Some(first) = all.next() else {
        return HeaderValue::from_static("");
    };
    let Some(second) = all.next() else {
        return first.clone();
    };
    let mut joined: Vec<u8> = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(all) {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
    }
    // Valid header values joined with a comma are a valid header value.
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| first.clone())
}

#[cfg(test)]
mod tests;
