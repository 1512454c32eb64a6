//! Route tables: virtual hosts, routes, actions, and Envoy's matching rules.
use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};

use super::{Format, HeaderKey, HeaderMatcher, Name, Pattern, PerFilterConfigs, QueryMatcher};

/// `RouteConfiguration`, with domain indexes built once.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: Name,
    pub vhosts: Vec<Arc<VirtualHost>>,
    pub headers: HeaderMutations,
    pub internal_only_headers: Vec<HeaderName>,
    pub most_specific_header_mutations_wins: bool,
    pub ignore_port_in_host_matching: bool,
    /// `typed_per_filter_config`.
    pub per_filter: PerFilterConfigs,
    index: DomainIndex,
}

/// Domain lookup tables, in Envoy's order: exact, longest `*.suffix`,
/// longest `prefix.*`, then `*`.
#[derive(Debug, Clone, PartialEq, Default)]
struct DomainIndex {
    exact: HashMap<String, usize>,
    /// (suffix including the leading char after `*`, vhost); longest first.
    suffix: Vec<(String, usize)>,
    /// (prefix, vhost); longest first.
    prefix: Vec<(String, usize)>,
    default: Option<usize>,
}

/// Why a domain set is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateDomain(pub String);

impl RouteConfig {
    /// Builds the domain index; a domain listed twice is an error (as Envoy).
    pub fn new(
        name: Name,
        vhosts: Vec<Arc<VirtualHost>>,
        headers: HeaderMutations,
        internal_only_headers: Vec<HeaderName>,
        most_specific_header_mutations_wins: bool,
        ignore_port_in_host_matching: bool,
    ) -> Result<Self, DuplicateDomain> {
        let mut index = DomainIndex::default();
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                let dup = if d == "*" {
                    index.default.replace(i).is_some()
                } else if let Some(s) = d.strip_prefix('*') {
                    if index.suffix.iter().any(|(x, _)| x == s) {
                        true
                    } else {
                        index.suffix.push((s.to_owned(), i));
                        false
                    }
                } else if let Some(p) = d.strip_suffix('*') {
                    if index.prefix.iter().any(|(x, _)| x == p) {
                        true
                    } else {
                        index.prefix.push((p.to_owned(), i));
                        false
                    }
                } else {
                    index.exact.insert(d.clone(), i).is_some()
                };
                if dup {
                    return Err(DuplicateDomain(d));
                }
            }
        }
        // Longest wildcard wins; ties keep config order (stable sort).
        index.suffix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        index.prefix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Ok(RouteConfig {
            name,
            vhosts,
            headers,
            internal_only_headers,
            most_specific_header_mutations_wins,
            ignore_port_in_host_matching,
            per_filter: PerFilterConfigs::default(),
            index,
        })
    }

    /// Selects the virtual host for `host` (the `:authority`/`Host`).
    ///
    /// As Envoy: matching is case-insensitive and includes the port, unless
    /// `ignore_port_in_host_matching` is set (the HCM strips ports per
    /// `strip_matching_host_port` / `strip_any_host_port` before this).
    pub fn select_vhost(&self, host: &str) -> Option<&Arc<VirtualHost>> {
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let host = if self.ignore_port_in_host_matching {
            strip_port(host)
        } else {
            host
        };
        self.lookup(host).map(|i| &self.vhosts[i])
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.index.exact.get(host) {
            return Some(*i);
        }
        // A wildcard must match at least one character: `*.foo.com` does not
        // match `.foo.com`.
        for (s, i) in &self.index.suffix {
            if host.len() > s.len() && host.ends_with(s.as_str()) {
                return Some(*i);
            }
        }
        for (p, i) in &self.index.prefix {
            if host.len() > p.len() && host.starts_with(p.as_str()) {
                return Some(*i);
            }
        }
        self.index.default
    }
}

/// Strips a `:port` suffix (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        match host.rfind("]:") {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
            _ => host,
        }
    }
}

/// `VirtualHost`.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    pub name: Name,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub require_tls: TlsRequirement,
    pub headers: HeaderMutations,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    pub include_request_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
    /// `typed_per_filter_config`.
    pub per_filter: PerFilterConfigs,
    /// `rate_limits`.
    pub rate_limits: Arc<[super::RateLimitPolicy]>,
    /// `hedge_policy.hedge_on_per_try_timeout` (`None`: no hedge policy;
    /// a route's own hedge policy replaces it).
    pub hedge_on_per_try_timeout: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsRequirement {
    #[default]
    None,
    ExternalOnly,
    All,
}

/// What a route is matched against.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    /// The path without the query string.
    pub path: &'a str,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
    /// `:path` as received (with the query), for `:path` header matchers.
    pub full_path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// Content-Type for `grpc` matching is read from `headers`.
    pub is_connect: bool,
    /// Whether the downstream presented a (validated) client certificate.
    pub peer_cert: bool,
    /// A per-request random value in `[0, 1_000_000)` for `runtime_fraction`.
    pub random_ppm: u32,
}

impl RequestInfo<'_> {
    /// A pseudo-header's value for matching (`None` for regular headers).
    pub fn pseudo(&self, key: &HeaderKey) -> Option<&str> {
        match key {
            HeaderKey::Method => Some(self.method.as_str()),
            HeaderKey::Path => Some(self.full_path),
            HeaderKey::Authority => Some(self.authority),
            HeaderKey::Scheme => Some(self.scheme),
            HeaderKey::Status | HeaderKey::Name(_) => None,
        }
    }
}

impl VirtualHost {
    /// The first route that matches, in order.
    pub fn select_route(&self, req: &RequestInfo<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

/// `Route`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: Name,
    pub matcher: RouteMatch,
    pub action: RouteKind,
    pub headers: HeaderMutations,
    /// `typed_per_filter_config`.
    pub per_filter: PerFilterConfigs,
    /// `decorator`: the span's operation (HCM `tracing` only).
    pub decorator: Option<Decorator>,
    /// `tracing`: the route's sampling and custom tags over the HCM's.
    pub tracing: Option<RouteTracing>,
}

/// A route's `tracing`. Samplings are `FractionalPercent`s as
/// (numerator, denominator value); unset ones are 100%.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteTracing {
    pub client_sampling: (u32, u32),
    pub random_sampling: (u32, u32),
    pub overall_sampling: (u32, u32),
    /// Added to the HCM's (replacing those of the same tag).
    pub custom_tags: Vec<super::CustomTag>,
}

/// A route's `decorator`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decorator {
    /// `operation`: the span name.
    pub operation: Arc<str>,
    /// `propagate` (default true): `x-envoy-decorator-operation` goes to
    /// the peer (in the response on ingress, the request on egress).
    pub propagate: bool,
}

/// `RouteMatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query: Vec<QueryMatcher>,
    pub grpc: bool,
    /// `runtime_fraction.default_value` in parts per million (`None` = always).
    pub runtime_fraction_ppm: Option<u32>,
    /// `tls_context.presented`: the client presented a certificate.
    pub tls_presented: Option<bool>,
    /// `tls_context.validated`: the client certificate was validated.
    pub tls_validated: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    Prefix(String),
    Path(String),
    Regex(Pattern),
    /// `path_separated_prefix`: the prefix, then end of path, `?` or `/`.
    SeparatedPrefix(String),
    /// `connect_matcher`: only CONNECT requests.
    Connect,
}

impl RouteMatch {
    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        // As Envoy: CONNECT requests match only connect_matcher routes and
        // connect_matcher routes match only CONNECT requests.
        let path_ok = match &self.path {
            PathMatch::Connect => req.is_connect,
            _ if req.is_connect => false,
            PathMatch::Prefix(p) => starts_with(req.path, p, self.case_sensitive),
            PathMatch::Path(p) => {
                if self.case_sensitive {
                    req.path == p
                } else {
                    req.path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(re) => re.is_match(req.path),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(req.path, p, self.case_sensitive)
                    && matches!(req.path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        if !path_ok {
            return false;
        }
        // weir validates every presented certificate at the handshake, so
        // presented and validated coincide.
        if self.tls_presented.is_some_and(|p| p != req.peer_cert)
            || self.tls_validated.is_some_and(|v| v != req.peer_cert)
        {
            return false;
        }
        if let Some(ppm) = self.runtime_fraction_ppm {
            if req.random_ppm >= ppm {
                return false;
            }
        }
        if self.grpc {
            let grpc = req
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v == "application/grpc" || v.starts_with("application/grpc+"))
                .unwrap_or(false);
            if !grpc {
                return false;
            }
        }
        for h in &self.headers {
            if !h.matches_request(req.headers, |k| req.pseudo(k)) {
                return false;
            }
        }
        for q in &self.query {
            let v = query_value(req.query, &q.name);
            let ok = match (&q.matcher, v) {
                (None, v) => v.is_some(),
                (Some(_), None) => false,
                (Some(m), Some(v)) => m.matches(&v),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.len() >= prefix.len()
            && path.is_char_boundary(prefix.len())
            && path[..prefix.len()].eq_ignore_ascii_case(prefix)
    }
}

/// A header's value as Envoy's matchers see it: several values joined by `,`.
pub fn header_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut it = headers.get_all(name).iter();
    let first = it.next()?;
    let mut out = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in it {
        out.push(',');
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(out)
}

/// The first value of query parameter `name` (not percent-decoded, as Envoy).
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let q = query?;
    for pair in q.split('&') {
        let (k, v) = match pair.split_once('=') {
            Some((k, v)) => (k, v),
            None => (pair, ""),
        };
        if k == name {
            return Some(v.to_owned());
        }
    }
    None
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteKind {
    Forward(Arc<RouteAction>),
    Redirect(Arc<Redirect>),
    Direct(Arc<DirectResponse>),
}

/// `RouteAction`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteAction {
    pub cluster: ClusterSpecifier,
    /// `cluster_not_found_response_code`: 503 (default) or 404 or 500.
    pub cluster_not_found_status: u16,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Pattern, String)>,
    pub host_rewrite: HostRewrite,
    pub append_x_forwarded_host: bool,
    /// `timeout`: `None` is disabled (`0s`); default 15 s.
    pub timeout: Option<Duration>,
    /// The deprecated `max_grpc_timeout` (`Some(0)` = no cap): gRPC
    /// requests use their `grpc-timeout` instead of `timeout`.
    pub max_grpc_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `max_stream_duration.max_stream_duration`.
    pub max_stream_duration: Option<Duration>,
    /// `max_stream_duration.grpc_timeout_header_max`: honour `grpc-timeout`.
    pub grpc_timeout_header_max: Option<Duration>,
    /// `upgrade_configs` overrides: (upgrade type, enabled).
    pub upgrades: Vec<(String, bool)>,
    /// The CONNECT upgrade config has a `connect_config`: the router
    /// terminates CONNECT requests (a TCP connection to a host of the
    /// cluster, then raw bytes both ways) instead of forwarding them.
    pub connect_terminate: bool,
    /// `rate_limits`.
    pub rate_limits: Arc<[super::RateLimitPolicy]>,
    /// `include_vh_rate_limits`.
    pub include_vh_rate_limits: bool,
    /// `request_mirror_policies`: shadow copies of the request.
    pub mirrors: Vec<MirrorPolicy>,
    /// `hash_policy`: the request hash for consistent-hash clusters.
    pub hash_policy: Arc<[HashPolicy]>,
    /// `hedge_policy.hedge_on_per_try_timeout` (`None`: the virtual
    /// host's).
    pub hedge_on_per_try_timeout: Option<bool>,
    /// `internal_redirect_policy`: 3xx responses the router follows itself.
    pub internal_redirect: Option<Arc<InternalRedirectPolicy>>,
    /// `priority`: which of the cluster's circuit-breaker thresholds and
    /// connection pools the route's requests use.
    pub priority: RoutingPriority,
}

/// `RoutingPriority` of a route (Envoy's `ResourcePriority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutingPriority {
    #[default]
    Default = 0,
    High = 1,
}

/// `RouteAction.internal_redirect_policy` (Envoy's
/// `InternalRedirectPolicyImpl`).
#[derive(Debug, Clone, PartialEq)]
pub struct InternalRedirectPolicy {
    /// `max_internal_redirects` (default 1).
    pub max_redirects: u32,
    /// `redirect_response_codes` (default 302; only 301, 302, 303, 307
    /// and 308 count).
    pub codes: Vec<u16>,
    /// `allow_cross_scheme_redirect`.
    pub allow_cross_scheme: bool,
    /// `response_headers_to_copy`.
    pub headers_to_copy: Vec<HeaderName>,
    /// `predicates`, in order.
    pub predicates: Vec<RedirectPredicate>,
}

/// An internal redirect predicate: whether a redirect may target a route.
#[derive(Debug, Clone, PartialEq)]
pub enum RedirectPredicate {
    /// `previous_routes`: a route is targeted at most once per request.
    /// The index tells predicates apart (each keeps its own set).
    PreviousRoutes(usize),
    /// `allow_listed_routes`: only these route names.
    AllowListed(Vec<String>),
    /// `safe_cross_scheme`: HTTPS downstreams may go to HTTP or HTTPS, HTTP
    /// downstreams to HTTP only.
    SafeCrossScheme,
}

/// `RouteAction.RequestMirrorPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorPolicy {
    pub cluster: MirrorCluster,
    /// `runtime_fraction.default_value` (`None`: every request).
    pub fraction: Option<super::Fraction>,
    /// Append `-shadow` to the host (unless
    /// `disable_shadow_host_suffix_append` or `host_rewrite_literal`).
    pub host_suffix: bool,
    /// `host_rewrite_literal`.
    pub host_rewrite: Option<String>,
    /// `request_headers_mutations`, in order.
    pub headers: Vec<super::HeaderOp>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MirrorCluster {
    Name(Name),
    /// `cluster_header`: the cluster named by a request header.
    Header(http::HeaderName),
}

/// `RouteAction.HashPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct HashPolicy {
    pub kind: HashPolicyKind,
    /// `terminal`: once this policy yields a hash, later ones are skipped.
    pub terminal: bool,
}

/// What a `HashPolicy` hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum HashPolicyKind {
    /// `header`: every value of the header (sorted), after the optional
    /// `regex_rewrite`; `host` (or `:authority`) is the request's authority.
    Header {
        name: HeaderName,
        rewrite: Option<(Pattern, String)>,
    },
    /// `cookie`: the cookie's value; with a `ttl` a missing cookie is
    /// generated and set on the response.
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: String,
        /// `attributes` (name, value) appended to a generated cookie.
        attributes: Vec<(String, String)>,
    },
    /// `connection_properties.source_ip`.
    SourceIp,
    /// `query_parameter`: the first value of the parameter.
    QueryParameter { name: String },
    /// `filter_state`: the object under `key`, when it is hashable.
    FilterState { key: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClusterSpecifier {
    Name(Name),
    Header(HeaderName),
    Weighted(WeightedClusters),
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightedCluster {
    pub name: Name,
    pub weight: u32,
    pub headers: HeaderMutations,
    pub host_rewrite: Option<String>,
}

impl WeightedClusters {
    /// Picks by a random value in `[0, total)`, as Envoy (in config order).
    pub fn pick(&self, random: u64) -> &WeightedCluster {
        let mut point = if self.total == 0 {
            0
        } else {
            random % self.total
        };
        for c in &self.clusters {
            if point < u64::from(c.weight) {
                return c;
            }
            point -= u64::from(c.weight);
        }
        self.clusters
            .last()
            .expect("validated: at least one cluster")
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum HostRewrite {
    #[default]
    None,
    Literal(String),
    /// `auto_host_rewrite`: the upstream host's hostname.
    Auto,
    Header(HeaderName),
    /// `host_rewrite_path_regex`.
    PathRegex(Pattern, String),
}

/// `RetryPolicy`, with `retry_on` parsed into flags.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub per_try_idle_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// `retry_host_predicate: envoy.retry_host_predicates.previous_hosts`.
    pub previous_hosts: bool,
    pub host_selection_retry_max_attempts: u32,
    /// `retriable_headers`: with `retriable-headers`, a response matching
    /// any of them is retried.
    pub retriable_headers: Arc<[super::HeaderMatcher]>,
    /// `retriable_request_headers`: when set, only requests matching one
    /// of them are retried.
    pub retriable_request_headers: Arc<[super::HeaderMatcher]>,
    /// `rate_limited_retry_back_off`.
    pub rate_limited_back_off: Option<Arc<RateLimitedBackOff>>,
    /// `retry_host_predicate: envoy.retry_host_predicates.omit_canary_hosts`:
    /// hosts whose `envoy.lb` metadata has `canary: true` are re-picked.
    pub omit_canary: bool,
    /// `envoy.retry_host_predicates.omit_host_metadata`: the `envoy.lb`
    /// labels (a JSON object) whose hosts are re-picked.
    pub omit_host_metadata: Option<Arc<serde_json::Value>>,
}

/// `RetryPolicy.RateLimitedRetryBackOff`: the back-off a response asks for
/// in one of `reset_headers`, capped at `max_interval` (default 300 s).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitedBackOff {
    /// Header name and whether its value is a Unix timestamp (else seconds).
    pub reset_headers: Vec<(http::HeaderName, bool)>,
    pub max_interval: Duration,
}

/// `retry_on` conditions (Envoy's `x-envoy-retry-on` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn(pub u32);

impl RetryOn {
    pub const FIVE_XX: u32 = 1;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const CONNECT_FAILURE: u32 = 1 << 3;
    pub const RETRIABLE_4XX: u32 = 1 << 4;
    pub const REFUSED_STREAM: u32 = 1 << 5;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 6;
    pub const RESET_BEFORE_REQUEST: u32 = 1 << 7;
    pub const HTTP3_POST_CONNECT_FAILURE: u32 = 1 << 8;
    pub const ENVOY_RATELIMITED: u32 = 1 << 9;
    pub const RETRIABLE_HEADERS: u32 = 1 << 10;
    // gRPC conditions
    pub const CANCELLED: u32 = 1 << 11;
    pub const DEADLINE_EXCEEDED: u32 = 1 << 12;
    pub const INTERNAL: u32 = 1 << 13;
    pub const RESOURCE_EXHAUSTED: u32 = 1 << 14;
    pub const UNAVAILABLE: u32 = 1 << 15;

    /// Parses a comma-separated `retry_on`; unknown names are returned as errors.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut bits = 0;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            bits |= match part {
                "5xx" => Self::FIVE_XX,
                "gateway-error" => Self::GATEWAY_ERROR,
                "reset" => Self::RESET,
                "reset-before-request" => Self::RESET_BEFORE_REQUEST,
                "connect-failure" => Self::CONNECT_FAILURE,
                "retriable-4xx" => Self::RETRIABLE_4XX,
                "refused-stream" => Self::REFUSED_STREAM,
                "retriable-status-codes" => Self::RETRIABLE_STATUS_CODES,
                "http3-post-connect-failure" => Self::HTTP3_POST_CONNECT_FAILURE,
                "envoy-ratelimited" => Self::ENVOY_RATELIMITED,
                "retriable-headers" => Self::RETRIABLE_HEADERS,
                "cancelled" => Self::CANCELLED,
                "deadline-exceeded" => Self::DEADLINE_EXCEEDED,
                "internal" => Self::INTERNAL,
                "resource-exhausted" => Self::RESOURCE_EXHAUSTED,
                "unavailable" => Self::UNAVAILABLE,
                other => return Err(other.to_owned()),
            };
        }
        Ok(RetryOn(bits))
    }

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// Lenient parse for the `x-envoy-retry-on` header: unknown names are skipped.
    pub fn parse_lenient(s: &str) -> RetryOn {
        RetryOn(
            s.split(',')
                .filter_map(|p| RetryOn::parse(p).ok())
                .fold(0, |a, b| a | b.0),
        )
    }
}

/// `RedirectAction`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: RedirectPath,
    pub status: u16,
    pub strip_query: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RedirectPath {
    Keep,
    Path(String),
    Prefix(String),
    Regex(Pattern, String),
}

/// `DirectResponseAction`.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Option<Bytes>,
}

/// Request and response header mutations at one level.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderMutations {
    pub request_add: Vec<HeaderAdd>,
    pub request_remove: Vec<HeaderName>,
    pub response_add: Vec<HeaderAdd>,
    pub response_remove: Vec<HeaderName>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }
}

/// One `HeaderValueOption`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderAdd {
    pub name: HeaderName,
    pub value: Format,
    pub action: AppendAction,
    pub keep_empty_value: bool,
}

impl HeaderAdd {
    /// Puts `value` (this header's rendered value) into `headers` as the
    /// append action says.
    pub fn apply_to(&self, headers: &mut http::HeaderMap, value: http::HeaderValue) {
        match self.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(self.name.clone(), value);
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(&self.name) {
                    headers.insert(self.name.clone(), value);
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(self.name.clone(), value);
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(&self.name) {
                    headers.insert(self.name.clone(), value);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> Arc<VirtualHost> {
        Arc::new(VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![],
            require_tls: TlsRequirement::None,
            headers: HeaderMutations::default(),
            retry_policy: None,
            include_request_attempt_count: false,
            include_attempt_count_in_response: false,
            per_filter: Default::default(),
            rate_limits: Default::default(),
            hedge_on_per_try_timeout: None,
        })
    }

    #[test]
    fn domain_selection_order() {
        let rc = RouteConfig::new(
            "rc".into(),
            vec![
                vh("exact", &["foo.com"]),
                vh("suffix_short", &["*.com"]),
                vh("suffix_long", &["*.foo.com"]),
                vh("prefix", &["foo.*"]),
                vh("any", &["*"]),
                vh("port", &["bar.com:8080"]),
            ],
            HeaderMutations::default(),
            vec![],
            false,
            false,
        )
        .expect("valid");
        let sel = |h: &str| rc.select_vhost(h).map(|v| v.name.to_string());
        assert_eq!(sel("foo.com").as_deref(), Some("exact"));
        assert_eq!(sel("FOO.com").as_deref(), Some("exact"));
        assert_eq!(sel("a.foo.com").as_deref(), Some("suffix_long"));
        assert_eq!(sel("a.bar.com").as_deref(), Some("suffix_short"));
        assert_eq!(sel("foo.org").as_deref(), Some("prefix"));
        assert_eq!(sel("zzz").as_deref(), Some("any"));
        assert_eq!(sel("bar.com:8080").as_deref(), Some("port"));
    }

    #[test]
    fn duplicate_domain_rejected() {
        let err = RouteConfig::new(
            "rc".into(),
            vec![vh("a", &["x.com"]), vh("b", &["X.com"])],
            HeaderMutations::default(),
            vec![],
            false,
            false,
        );
        assert!(err.is_err());
    }

    #[test]
    fn strip_port_rules() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("a.com"), "a.com");
    }

    #[test]
    fn weighted_pick_is_proportional() {
        let w = WeightedClusters {
            clusters: vec![
                WeightedCluster {
                    name: "a".into(),
                    weight: 1,
                    headers: HeaderMutations::default(),
                    host_rewrite: None,
                },
                WeightedCluster {
                    name: "b".into(),
                    weight: 3,
                    headers: HeaderMutations::default(),
                    host_rewrite: None,
                },
            ],
            total: 4,
        };
        let picks: Vec<_> = (0..4).map(|r| w.pick(r).name.to_string()).collect();
        assert_eq!(picks, ["a", "b", "b", "b"]);
    }
}
