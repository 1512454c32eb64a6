//! `envoy.filters.http.health_check`, validated.
use std::time::Duration;

use super::HeaderMatcher;

/// `envoy.extensions.filters.http.health_check.v3.HealthCheck`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// `pass_through_mode`: health check requests go upstream (answered
    /// locally only when the server fails health checks or from the cache).
    pub pass_through: bool,
    /// `cache_time` (pass-through mode): how long an upstream answer is
    /// reused.
    pub cache_time: Option<Duration>,
    /// `cluster_min_healthy_percentages`, by cluster name (sorted).
    pub cluster_min_healthy: Vec<(String, f64)>,
    /// `headers`: a request is a health check when all match.
    pub headers: Vec<HeaderMatcher>,
}
