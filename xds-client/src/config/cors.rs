//! `envoy.filters.http.cors`: the filter has no config of its own; its
//! policies (`CorsPolicy`) live on routes, virtual hosts and route
//! configurations (`typed_per_filter_config`), or in the deprecated `cors`
//! field of virtual hosts and route actions.
use http::HeaderValue;

use super::{Fraction, StringMatcher};

/// `envoy.extensions.filters.http.cors.v3.CorsPolicy` (or the legacy
/// `envoy.config.route.v3.CorsPolicy`), validated. Empty strings and unset
/// wrappers are `None`: the filter then takes the field from the next, less
/// specific policy, as Envoy's `CorsFilter` does field by field.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CorsPolicy {
    /// `allow_origin_string_match`: an origin is allowed when any matches it
    /// (or matches `*`).
    pub allow_origins: Vec<StringMatcher>,
    /// `allow_methods` (`*`: the preflight's requested method is echoed).
    pub allow_methods: Option<HeaderValue>,
    /// `allow_headers` (`*`: the preflight's requested headers are echoed).
    pub allow_headers: Option<HeaderValue>,
    pub expose_headers: Option<HeaderValue>,
    /// `max_age`, sent as is.
    pub max_age: Option<HeaderValue>,
    pub allow_credentials: Option<bool>,
    pub allow_private_network_access: Option<bool>,
    /// `forward_not_matching_preflights` (Envoy's default when no policy
    /// says: true).
    pub forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled.default_value` (`None`: enabled). The runtime key is
    /// accepted without effect (no runtime layer).
    pub filter_enabled: Option<Fraction>,
    /// `shadow_enabled.default_value` (`None`: off).
    pub shadow_enabled: Option<Fraction>,
}

/// Where the deprecated `cors` field of a virtual host or route action is
/// kept: an entry of that level's `typed_per_filter_config` under this key,
/// which names no filter (filter names are never empty, and an empty key in
/// `typed_per_filter_config` is rejected). The CORS filter reads it only when
/// no level has a `typed_per_filter_config` policy for it, as Envoy.
pub const LEGACY_CORS_KEY: &str = "";
