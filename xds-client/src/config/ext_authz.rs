//! `envoy.filters.http.ext_authz` (and the `GrpcService` it calls).
use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::{Fraction, Name, StringMatcher};

/// `envoy.config.core.v3.GrpcService` with `envoy_grpc`: a cluster of the
/// configuration, called through the proxy's own client.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcService {
    /// `envoy_grpc.cluster_name`.
    pub cluster: Name,
    /// `envoy_grpc.authority` (default: the cluster name).
    pub authority: Name,
    /// `timeout` (`None`: unset, the caller's default).
    pub timeout: Option<Duration>,
    /// `initial_metadata`: headers sent with every call.
    pub initial_metadata: Vec<(HeaderName, HeaderValue)>,
}

/// `ExtAuthz`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtAuthz {
    pub service: ExtAuthzService,
    /// The whole call's deadline (`grpc_service.timeout` or
    /// `http_service.server_uri.timeout`; Envoy's default 200 ms).
    pub timeout: Duration,
    pub failure_mode_allow: bool,
    /// `failure_mode_allow_header_add`: `x-envoy-auth-failure-mode-allowed:
    /// true` on requests let through by `failure_mode_allow`.
    pub failure_mode_allow_header_add: bool,
    /// `with_request_body`.
    pub with_request_body: Option<BufferSettings>,
    /// `status_on_error.code` (403 when unset or not an HTTP status).
    pub status_on_error: u16,
    pub include_peer_certificate: bool,
    /// `stat_prefix`: stats are `http.<hcm prefix>.ext_authz.[<stat_prefix>.]*`.
    pub stat_prefix: String,
    /// `filter_enabled.default_value` (`None`: always enabled).
    pub filter_enabled: Option<Fraction>,
    /// `filter_enabled_metadata`: the filter runs only when the request's
    /// dynamic metadata matches.
    pub filter_enabled_metadata: Option<super::MetadataMatcher>,
    /// `deny_at_disable.default_value`.
    pub deny_at_disable: bool,
    /// `metadata_context_namespaces`: dynamic metadata namespaces sent in
    /// the check request.
    pub metadata_context_namespaces: Vec<String>,
    /// `allowed_headers` (gRPC service only; `None`: every header).
    pub allowed_headers: Option<Vec<StringMatcher>>,
}

/// `with_request_body` (`BufferSettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSettings {
    pub max_request_bytes: u32,
    pub allow_partial_message: bool,
    pub pack_as_bytes: bool,
}

/// The authorization service.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtAuthzService {
    /// `grpc_service`: `envoy.service.auth.v3.Authorization/Check`.
    Grpc(GrpcService),
    /// `http_service`: the raw HTTP protocol.
    Http(HttpAuthzService),
}

/// `HttpService`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpAuthzService {
    /// `server_uri.cluster`.
    pub cluster: Name,
    /// `path_prefix`, put before the request's path.
    pub path_prefix: String,
    /// `authorization_request.allowed_headers`, besides Envoy's
    /// `authorization`, `:method`, `:path` and `:authority`.
    pub allowed_headers: Vec<StringMatcher>,
    /// `authorization_request.headers_to_add` (literal values; set).
    pub headers_to_add: Vec<(HeaderName, HeaderValue)>,
    /// `authorization_response.allowed_upstream_headers` (set upstream).
    pub allowed_upstream_headers: Vec<StringMatcher>,
    /// `authorization_response.allowed_upstream_headers_to_append` (added).
    pub allowed_upstream_headers_to_append: Vec<StringMatcher>,
    /// `authorization_response.allowed_client_headers` (on denials; empty:
    /// every header but `:authority`... as Envoy, see the filter).
    pub allowed_client_headers: Vec<StringMatcher>,
    /// `authorization_response.allowed_client_headers_on_success`.
    pub allowed_client_headers_on_success: Vec<StringMatcher>,
    /// `authorization_response.dynamic_metadata_from_headers`.
    pub dynamic_metadata_from_headers: Vec<StringMatcher>,
}

/// `ExtAuthzPerRoute`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExtAuthzPerRoute {
    pub disabled: bool,
    /// `check_settings.context_extensions`.
    pub context_extensions: BTreeMap<String, String>,
    /// `check_settings.disable_request_body_buffering`.
    pub disable_request_body_buffering: bool,
}

/// `envoy.filters.http.ratelimit` (`RateLimit`): the global rate limit
/// service (kept here with the other filters that call a gRPC service).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRateLimit {
    /// `domain` (required).
    pub domain: String,
    /// `stage` (0..=10): the route `rate_limits` entries of this stage.
    pub stage: u32,
    /// `request_type`.
    pub request_type: RequestType,
    /// `timeout` (Envoy's default 20 ms).
    pub timeout: Duration,
    pub failure_mode_deny: bool,
    /// `rate_limit_service.grpc_service`.
    pub service: GrpcService,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    pub disable_x_envoy_ratelimited_header: bool,
    pub rate_limited_as_resource_exhausted: bool,
    /// `rate_limited_status` (429 when unset or under 400).
    pub rate_limited_status: u16,
    /// `filter_enabled.default_value` (`None`: always): the share of
    /// requests the filter checks at all.
    pub filter_enabled: Option<Fraction>,
    /// `filter_enforced.default_value` (`None`: always): the share of
    /// over-limit answers that are enforced (the others go upstream).
    pub filter_enforced: Option<Fraction>,
}

/// `RateLimit.request_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    Both,
    Internal,
    External,
}

/// `envoy.filters.network.ext_authz` (`envoy.extensions.filters.network.ext_authz.v3.ExtAuthz`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkExtAuthz {
    /// Stats are `ext_authz.<stat_prefix>.*`.
    pub stat_prefix: String,
    pub service: GrpcService,
    /// `grpc_service.timeout` (Envoy's default 200 ms).
    pub timeout: Duration,
    pub failure_mode_allow: bool,
}
