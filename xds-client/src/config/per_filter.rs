//! `typed_per_filter_config`: per-route overrides of HTTP filters.
use std::sync::Arc;

use super::{CompressorPerRoute, CorsPolicy, FaultConfig, HttpLocalRateLimit, HttpRbac, Name};

/// A route's, virtual host's or route configuration's
/// `typed_per_filter_config`, by filter name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PerFilterConfigs(pub Vec<(Name, PerFilterConfig)>);

impl PerFilterConfigs {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&PerFilterConfig> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, c)| c)
    }
}

/// One `typed_per_filter_config` entry: the filter's config directly, or an
/// `envoy.config.route.v3.FilterConfig` wrapping it.
#[derive(Debug, Clone, PartialEq)]
pub struct PerFilterConfig {
    /// `FilterConfig.disabled`, when the wrapper is used (`None` otherwise).
    /// The most specific level that says wins.
    pub disabled: Option<bool>,
    /// The override (`None`: `FilterConfig` without `config`, or disabled).
    pub config: Option<FilterOverride>,
}

/// The per-route configs weir implements, one variant per filter.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterOverride {
    Fault(Arc<FaultConfig>),
    /// `envoy.extensions.filters.http.cors.v3.CorsPolicy`.
    Cors(Arc<CorsPolicy>),
    Compressor(CompressorPerRoute),
    LocalRateLimit(Arc<HttpLocalRateLimit>),
    /// `RBACPerRoute`: replaces the filter's engines (no `rbac`: none).
    Rbac(Arc<HttpRbac>),
    /// `BufferPerRoute`: `Some(max_request_bytes)`, or `None` (`disabled`).
    Buffer(Option<u32>),
    /// `HeaderMutationPerRoute`: applied with the filter's own mutations.
    HeaderMutation(Arc<super::Mutations>),
    /// `ExtAuthzPerRoute`.
    ExtAuthz(Arc<super::ExtAuthzPerRoute>),
    /// jwt_authn's `PerRouteConfig`.
    JwtAuthn(super::JwtPerRoute),
    /// `envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute`.
    RateLimit(Arc<RateLimitPerRoute>),
}

/// `RateLimitPerRoute` (the global rate limit filter).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateLimitPerRoute {
    /// `vh_rate_limits` (a route's `include_vh_rate_limits` wins).
    pub vh_rate_limits: super::VhRateLimits,
    /// `domain` (empty: the filter's).
    pub domain: String,
}
