//! `envoy.filters.http.local_ratelimit` (`LocalRateLimit`).
use super::{Fraction, HeaderAdd, TokenBucketConfig};

/// `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLocalRateLimit {
    pub stat_prefix: String,
    /// `status` (default 429; codes under 400 are 429, as Envoy).
    pub status: u16,
    /// `token_bucket`: the default bucket (`None`: no default limit).
    pub token_bucket: Option<TokenBucketConfig>,
    /// `filter_enabled.default_value` (`None`: unset, the filter does nothing).
    pub filter_enabled: Option<Fraction>,
    /// `filter_enforced.default_value` (`None`: unset, never enforced).
    pub filter_enforced: Option<Fraction>,
    /// `request_headers_to_add_when_not_enforced` (literal values).
    pub request_headers_when_not_enforced: Vec<HeaderAdd>,
    /// `response_headers_to_add`: on limited responses (literal values).
    pub response_headers: Vec<HeaderAdd>,
    pub descriptors: Vec<LocalDescriptor>,
    /// `stage` (0..=10): which route `rate_limits` apply.
    pub stage: u32,
    /// `local_rate_limit_per_downstream_connection`.
    pub per_connection: bool,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    pub vh_rate_limits: VhRateLimits,
    /// `always_consume_default_token_bucket` (default true).
    pub always_consume_default: bool,
    /// `rate_limited_as_resource_exhausted`.
    pub resource_exhausted: bool,
    /// `max_dynamic_descriptors` (default 20): buckets kept per wildcard
    /// descriptor.
    pub max_dynamic_descriptors: u32,
    /// The filter's buckets for this config when it is a per-route one
    /// (built on first use, freed with the route configuration).
    pub runtime: super::RuntimeSlot,
}

impl HttpLocalRateLimit {
    /// Whether anything can limit: a default bucket or descriptors.
    pub fn has_buckets(&self) -> bool {
        self.token_bucket.is_some() || !self.descriptors.is_empty()
    }
}

/// `LocalRateLimitDescriptor`: entries (an empty value is a wildcard:
/// one bucket per distinct value) and their bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDescriptor {
    pub entries: Vec<(String, String)>,
    pub token_bucket: TokenBucketConfig,
}

impl LocalDescriptor {
    pub fn is_wildcard(&self) -> bool {
        self.entries.iter().any(|(_, v)| v.is_empty())
    }
}

/// `vh_rate_limits`: how the virtual host's `rate_limits` combine with the
/// route's (a route's `include_vh_rate_limits` means `Include`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhRateLimits {
    /// The virtual host's only when the route has none.
    #[default]
    Override,
    Include,
    Ignore,
}
