//! `rate_limits` of routes and virtual hosts (`envoy.config.route.v3.RateLimit`):
//! the descriptors the rate limit filters ask about.
use http::HeaderName;

use super::{HeaderMatcher, QueryMatcher};

/// One `RateLimit`: its actions produce one descriptor (or none when an
/// action cannot produce its entry).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitPolicy {
    /// `stage` (0..=10).
    pub stage: u32,
    /// `disable_key`: the local rate limit filter skips entries with one.
    pub disable_key: String,
    pub actions: Vec<RateLimitAction>,
}

/// `RateLimit.Action`, the kinds weir implements.
#[derive(Debug, Clone, PartialEq)]
pub enum RateLimitAction {
    /// `("destination_cluster", <the route's cluster>)`.
    DestinationCluster,
    /// `(descriptor_key, <the header's first value>)`; without the header
    /// the descriptor is dropped, or with `skip_if_absent` the entry.
    RequestHeaders {
        header: HeaderName,
        key: String,
        skip_if_absent: bool,
    },
    /// `(descriptor_key, <the query parameter's value>)`, as `RequestHeaders`.
    QueryParameters {
        name: String,
        key: String,
        skip_if_absent: bool,
    },
    /// `("remote_address", <the downstream IP>)`.
    RemoteAddress,
    /// `("masked_remote_address", "<masked IP>/<len>")`.
    MaskedRemoteAddress { v4_len: u8, v6_len: u8 },
    /// `(descriptor_key or "generic_key", descriptor_value)`.
    GenericKey { key: String, value: String },
    /// `(descriptor_key or "header_match", descriptor_value)` when all
    /// `headers` match (or, `expect_match: false`, when they do not).
    HeaderValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        headers: Vec<HeaderMatcher>,
    },
    /// `(descriptor_key or "query_match", descriptor_value)` when all
    /// `query_parameters` match (or not, `expect_match: false`).
    QueryParameterValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        params: Vec<QueryMatcher>,
    },
}
