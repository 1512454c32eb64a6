//! `envoy.filters.http.local_ratelimit`, as Envoy 1.40's filter.
//!
//! Per request: the most specific per-route `LocalRateLimit` replaces the
//! filter's own (with its own buckets and stats). `filter_enabled` is
//! rolled (unset: the filter does nothing); then the request's descriptors
//! (from the route's and virtual host's `rate_limits`, only when the config
//! has `descriptors`) pick descriptor buckets, slowest fill rate first, and
//! the default bucket is consumed when no descriptor matched or
//! `always_consume_default_token_bucket`. Out of tokens, the request is
//! counted `rate_limited`; if `filter_enforced` hits it is answered with
//! `status` (429), body `local_rate_limited`, flag `RL`, else it goes on with
//! `request_headers_to_add_when_not_enforced`.
//!
//! Buckets are `crate::token_bucket::TokenBucket`s (lock-free, refilled
//! continuously, as Envoy's `AtomicTokenBucketImpl`). Wildcard descriptors
//! (an entry with an empty value) get one bucket per distinct value, at most
//! `max_dynamic_descriptors`, least recently used evicted. With
//! `local_rate_limit_per_downstream_connection` the buckets live in the
//! connection's state (`Downstream::state`), created from the first config
//! that needs them, as Envoy's filter state `per_connection_local_rate_limiter`.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{request::Parts, HeaderValue};
use xds_client::config::{
    query_value, AppendAction, FilterOverride, FormatPart, Fraction, HeaderAdd, HttpLocalRateLimit,
    LocalDescriptor, Name, RateLimitAction, RateLimitPolicy, TokenBucketConfig, VhRateLimits,
};

use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};
use crate::token_bucket::{BucketSpec, TokenBucket};

/// Body and `%RESPONSE_CODE_DETAILS%` of a limited request.
pub const LOCAL_RATE_LIMITED: &str = "local_rate_limited";
/// `grpc-status` RESOURCE_EXHAUSTED (`rate_limited_as_resource_exhausted`).
const RESOURCE_EXHAUSTED: u32 = 8;
/// Envoy's filter state key for per-connection buckets.
const PER_CONNECTION: &str = "per_connection_local_rate_limiter";

/// One descriptor: its (key, value) entries, in order.
pub type Descriptor = Vec<(String, String)>;

/// The filter's factory: the listener-level config's limiter.
#[derive(Debug)]
pub struct LocalRateLimitFactory {
    name: Name,
    limiter: Arc<Limiter>,
    /// The root stats scope, for per-route configs' stats.
    root: Arc<dyn StatsScope>,
}

/// A config with its stats and (shared) buckets: Envoy's `FilterConfig`.
#[derive(Debug)]
struct Limiter {
    cfg: Arc<HttpLocalRateLimit>,
    stats: Stats,
    buckets: Buckets,
}

/// `<stat_prefix>.http_local_rate_limit.*` (root scope).
struct Stats {
    enabled: Arc<dyn Counter>,
    enforced: Arc<dyn Counter>,
    rate_limited: Arc<dyn Counter>,
    ok: Arc<dyn Counter>,
    /// Never incremented (descriptor `shadow_mode` is rejected); Envoy
    /// creates it with the others.
    _shadow_mode: Arc<dyn Counter>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stats")
    }
}

impl Stats {
    fn new(prefix: &str, root: &Arc<dyn StatsScope>) -> Stats {
        let c = |rest: &str| {
            root.tagged_counter(
                "",
                prefix,
                &format!("http_local_rate_limit.{rest}"),
                "envoy_local_http_ratelimit_prefix",
            )
        };
        Stats {
            enabled: c("enabled"),
            enforced: c("enforced"),
            rate_limited: c("rate_limited"),
            ok: c("ok"),
            _shadow_mode: c("shadow_mode"),
        }
    }
}

/// A config's buckets: Envoy's `LocalRateLimiterImpl`.
#[derive(Debug)]
pub struct Buckets {
    default: Option<Arc<TokenBucket>>,
    exact: HashMap<Descriptor, Arc<TokenBucket>>,
    wildcard: Vec<Wildcard>,
    always_consume_default: bool,
}

/// A descriptor with wildcard values and its buckets per distinct value.
#[derive(Debug)]
struct Wildcard {
    entries: Descriptor,
    spec: BucketSpec,
    cap: usize,
    lru: Mutex<Lru>,
}

/// Buckets by descriptor, with a use stamp each (least recent evicted).
#[derive(Debug, Default)]
struct Lru {
    map: HashMap<Descriptor, (Arc<TokenBucket>, u64)>,
    order: BTreeMap<u64, Descriptor>,
    next: u64,
}

/// What `Buckets::request_allowed` decided, and the bucket whose state the
/// `x-ratelimit-*` headers show.
#[derive(Debug)]
pub struct Outcome {
    pub allowed: bool,
    pub bucket: Option<Arc<TokenBucket>>,
}

fn spec(b: TokenBucketConfig) -> BucketSpec {
    BucketSpec {
        max_tokens: b.max_tokens,
        tokens_per_fill: b.tokens_per_fill,
        fill_interval: b.fill_interval,
    }
}

// === impl Buckets ===

impl Buckets {
    pub fn new(cfg: &HttpLocalRateLimit) -> Buckets {
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        for LocalDescriptor {
            entries,
            token_bucket,
        } in &cfg.descriptors
        {
            if entries.iter().any(|(_, v)| v.is_empty()) {
                wildcard.push(Wildcard {
                    entries: entries.clone(),
                    spec: spec(*token_bucket),
                    cap: cfg.max_dynamic_descriptors as usize,
                    lru: Mutex::default(),
                });
            } else {
                exact.insert(
                    entries.clone(),
                    Arc::new(TokenBucket::new(spec(*token_bucket))),
                );
            }
        }
        Buckets {
            default: cfg
                .token_bucket
                .map(|b| Arc::new(TokenBucket::new(spec(b)))),
            exact,
            wildcard,
            always_consume_default: cfg.always_consume_default,
        }
    }

    /// As Envoy's `LocalRateLimiterImpl::requestAllowed`.
    pub fn request_allowed(&self, descriptors: &[Descriptor]) -> Outcome {
        let mut matched: Vec<Arc<TokenBucket>> = Vec::new();
        for d in descriptors {
            if let Some(b) = self.exact.get(d) {
                matched.push(b.clone());
            } else if let Some(w) = self.wildcard.iter().find(|w| w.matches(d)) {
                matched.push(w.bucket(d));
            }
        }
        // The slowest-filling bucket first, so a request limited by it
        // takes no token from the others.
        matched.sort_by(|a, b| a.cmp_rate(b));
        for b in &matched {
            if !b.try_take() {
                return Outcome {
                    allowed: false,
                    bucket: Some(b.clone()),
                };
            }
        }
        let first = matched.into_iter().next();
        if first.is_none() || self.always_consume_default {
            let Some(default) = &self.default else {
                return Outcome {
                    allowed: true,
                    bucket: first,
                };
            };
            if !default.try_take() {
                // As Envoy, `max_tokens: 0` denies without a bucket to show.
                return Outcome {
                    allowed: false,
                    bucket: (default.max_tokens() > 0).then(|| default.clone()),
                };
            }
            return Outcome {
                allowed: true,
                bucket: Some(first.unwrap_or_else(|| default.clone())),
            };
        }
        Outcome {
            allowed: true,
            bucket: first,
        }
    }
}

// === impl Wildcard ===

impl Wildcard {
    /// Same keys in order; values equal or wildcard (empty).
    fn matches(&self, d: &Descriptor) -> bool {
        d.len() == self.entries.len()
            && d.iter()
                .zip(&self.entries)
                .all(|((k, v), (ck, cv))| k == ck && (cv.is_empty() || v == cv))
    }

    fn bucket(&self, d: &Descriptor) -> Arc<TokenBucket> {
        let mut guard = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        let lru = &mut *guard;
        let stamp = lru.next;
        lru.next += 1;
        if let Some((b, old)) = lru.map.get_mut(d) {
            let b = b.clone();
            let old = std::mem::replace(old, stamp);
            if let Some(key) = lru.order.remove(&old) {
                lru.order.insert(stamp, key);
            }
            return b;
        }
        let b = Arc::new(TokenBucket::new(self.spec));
        lru.map.insert(d.clone(), (b.clone(), stamp));
        lru.order.insert(stamp, d.clone());
        while lru.map.len() > self.cap {
            let Some((_, key)) = lru.order.pop_first() else {
                break;
            };
            lru.map.remove(&key);
        }
        b
    }
}

// === impl LocalRateLimitFactory ===

impl LocalRateLimitFactory {
    pub fn new(
        name: Name,
        cfg: &Arc<HttpLocalRateLimit>,
        scope: &Arc<dyn StatsScope>,
    ) -> LocalRateLimitFactory {
        let root = scope.root().unwrap_or_else(|| scope.clone());
        LocalRateLimitFactory {
            name,
            limiter: Arc::new(Limiter::new(cfg.clone(), &root)),
            root,
        }
    }

    /// The limiter of a per-route config: built once per config, held by
    /// the config itself (its buckets live as long as the route
    /// configuration, as Envoy's per-route `FilterConfig`).
    fn route_limiter(&self, cfg: &Arc<HttpLocalRateLimit>) -> Arc<Limiter> {
        // The limiter keeps its own copy of the config (whose slot is
        // empty): a reference to `cfg` would be a cycle through the slot.
        let make = || Limiter::new(Arc::new((**cfg).clone()), &self.root);
        cfg.runtime
            .get_or_init(make)
            .unwrap_or_else(|| Arc::new(make()))
    }
}

impl Limiter {
    fn new(cfg: Arc<HttpLocalRateLimit>, root: &Arc<dyn StatsScope>) -> Limiter {
        Limiter {
            stats: Stats::new(&cfg.stat_prefix, root),
            buckets: Buckets::new(&cfg),
            cfg,
        }
    }
}

fn roll(f: Option<Fraction>) -> bool {
    f.is_some_and(|f| f.numerator > 0 && f.hit(rand::random::<u64>()))
}

impl HttpFilterFactory for LocalRateLimitFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        let limiter = match route.override_for(&self.name) {
            Some(FilterOverride::LocalRateLimit(c)) => {
                // Not enabled: nothing to do, no stats (as Envoy).
                c.filter_enabled?;
                self.route_limiter(c)
            }
            _ => {
                self.limiter.cfg.filter_enabled?;
                self.limiter.clone()
            }
        };
        if !roll(limiter.cfg.filter_enabled) {
            return None;
        }
        limiter.stats.enabled.inc();
        if !limiter.cfg.has_buckets() {
            // No bucket can limit: allowed without an instance.
            limiter.stats.ok.inc();
            return None;
        }
        // Route `rate_limits` are read only when the config has
        // descriptors to match them against (as Envoy).
        let (policies, cluster) = if limiter.cfg.descriptors.is_empty() {
            (Policies::default(), None)
        } else {
            (
                Policies::select(route, limiter.cfg.vh_rate_limits),
                route.cluster.map(Box::from),
            )
        };
        Some(Box::new(LocalRateLimitFilter {
            limiter,
            policies,
            cluster,
            bucket: None,
            limited: false,
        }))
    }
}

/// The `rate_limits` that apply to a request (route's, virtual host's);
/// shared with the global rate limit filter (`crate::ratelimit`).
#[derive(Debug, Default)]
pub(crate) struct Policies {
    route: Option<Arc<[RateLimitPolicy]>>,
    vhost: Option<Arc<[RateLimitPolicy]>>,
}

impl Policies {
    /// As Envoy's `Filter::populateDescriptors`: the route's, then the
    /// virtual host's per `include_vh_rate_limits` / `vh_rate_limits`.
    pub(crate) fn select(route: &RouteView<'_>, vh_rate_limits: VhRateLimits) -> Policies {
        let Some(rl) = route.rate_limits else {
            return Policies::default();
        };
        let vh = if rl.include_vh {
            VhRateLimits::Include
        } else {
            vh_rate_limits
        };
        let vhost = match vh {
            VhRateLimits::Ignore => false,
            VhRateLimits::Include => true,
            VhRateLimits::Override => rl.route.is_empty(),
        };
        Policies {
            route: (!rl.route.is_empty()).then(|| rl.route.clone()),
            vhost: (vhost && !rl.vhost.is_empty()).then(|| rl.vhost.clone()),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.route.is_none() && self.vhost.is_none()
    }

    /// The descriptors of the entries of `stage`; `with_disable_key`:
    /// entries with a `disable_key` too (the global filter's runtime keys
    /// default to enabled; the local filter skips them).
    pub(crate) fn descriptors_with(
        &self,
        stage: u32,
        req: &Request<'_>,
        with_disable_key: bool,
    ) -> Vec<Descriptor> {
        let mut out = Vec::new();
        for p in self.route.iter().chain(&self.vhost).flat_map(|l| l.iter()) {
            if p.stage != stage || (!with_disable_key && !p.disable_key.is_empty()) {
                continue;
            }
            if let Some(d) = descriptor(p, req) {
                out.push(d);
            }
        }
        out
    }

    fn descriptors(&self, stage: u32, req: &Request<'_>) -> Vec<Descriptor> {
        self.descriptors_with(stage, req, false)
    }
}

/// What the actions read.
pub(crate) struct Request<'a> {
    pub(crate) head: &'a Parts,
    pub(crate) remote: Option<IpAddr>,
    pub(crate) cluster: Option<&'a str>,
}

/// One policy's descriptor, as Envoy's `RateLimitPolicyEntryImpl::populateDescriptors`:
/// `None` when an action cannot produce its entry.
fn descriptor(p: &RateLimitPolicy, req: &Request<'_>) -> Option<Descriptor> {
    let mut d = Vec::with_capacity(p.actions.len());
    for a in &p.actions {
        match a {
            RateLimitAction::DestinationCluster => {
                d.push(("destination_cluster".into(), req.cluster?.to_owned()));
            }
            RateLimitAction::RequestHeaders {
                header,
                key,
                skip_if_absent,
            } => match req.head.headers.get(header) {
                Some(v) => d.push((key.clone(), String::from_utf8_lossy(v.as_bytes()).into())),
                None if *skip_if_absent => {}
                None => return None,
            },
            RateLimitAction::QueryParameters {
                name,
                key,
                skip_if_absent,
            } => match query_value(req.head.uri.query(), name) {
                Some(v) => d.push((key.clone(), v)),
                None if *skip_if_absent => {}
                None => return None,
            },
            RateLimitAction::RemoteAddress => {
                d.push(("remote_address".into(), req.remote?.to_string()));
            }
            RateLimitAction::MaskedRemoteAddress { v4_len, v6_len } => {
                d.push((
                    "masked_remote_address".into(),
                    masked(req.remote?, *v4_len, *v6_len),
                ));
            }
            RateLimitAction::GenericKey { key, value } => d.push((key.clone(), value.clone())),
            RateLimitAction::HeaderValueMatch {
                key,
                value,
                expect_match,
                headers,
            } => {
                let all = headers.iter().all(|m| m.matches_head(req.head));
                if all != *expect_match {
                    return None;
                }
                d.push((key.clone(), value.clone()));
            }
            RateLimitAction::QueryParameterValueMatch {
                key,
                value,
                expect_match,
                params,
            } => {
                let q = req.head.uri.query();
                let all = params
                    .iter()
                    .all(|m| match (&m.matcher, query_value(q, &m.name)) {
                        (None, v) => v.is_some(),
                        (Some(_), None) => false,
                        (Some(s), Some(v)) => s.matches(&v),
                    });
                if all != *expect_match {
                    return None;
                }
                d.push((key.clone(), value.clone()));
            }
        }
    }
    Some(d)
}

/// `<address masked to len>/<len>`, as Envoy's `CidrRange::asString`.
fn masked(ip: IpAddr, v4_len: u8, v6_len: u8) -> String {
    match ip {
        IpAddr::V4(a) => {
            let len = u32::from(v4_len.min(32));
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            let net = std::net::Ipv4Addr::from(u32::from(a) & mask);
            format!("{net}/{len}")
        }
        IpAddr::V6(a) => {
            let len = u32::from(v6_len.min(128));
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            let net = std::net::Ipv6Addr::from(u128::from(a) & mask);
            format!("{net}/{len}")
        }
    }
}

/// One request's state.
struct LocalRateLimitFilter {
    limiter: Arc<Limiter>,
    policies: Policies,
    cluster: Option<Box<str>>,
    /// The bucket the `x-ratelimit-*` headers describe.
    bucket: Option<Arc<TokenBucket>>,
    /// Answered with a local reply (adds `response_headers_to_add`).
    limited: bool,
}

/// Adds literal header values (validated at translation).
fn add_headers(headers: &mut http::HeaderMap, adds: &[HeaderAdd]) {
    for a in adds {
        let value = match a.value.parts.first() {
            Some(FormatPart::Literal(s)) => s.as_str(),
            _ => "",
        };
        if value.is_empty() && !a.keep_empty_value {
            continue;
        }
        let Ok(v) = HeaderValue::from_str(value) else {
            continue;
        };
        match a.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(a.name.clone(), v);
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(&a.name) {
                    headers.insert(a.name.clone(), v);
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(a.name.clone(), v);
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(&a.name) {
                    headers.insert(a.name.clone(), v);
                }
            }
        }
    }
}

impl HttpFilter for LocalRateLimitFilter {
    fn on_request_headers(&mut self, cx: &mut FilterContext, head: &mut Parts) -> Action {
        let cfg = &self.limiter.cfg;
        let descriptors = if cfg.descriptors.is_empty() {
            Vec::new()
        } else {
            let req = Request {
                head: &*head,
                remote: cx.downstream.as_ref().map(|d| d.remote.ip()),
                cluster: self.cluster.as_deref(),
            };
            self.policies.descriptors(cfg.stage, &req)
        };
        let outcome = match (&cx.downstream, cfg.per_connection) {
            (Some(d), true) => d
                .state
                .get_or_insert_with(PER_CONNECTION, || Buckets::new(cfg))
                .request_allowed(&descriptors),
            _ => self.limiter.buckets.request_allowed(&descriptors),
        };
        self.bucket = outcome.bucket;
        let stats = &self.limiter.stats;
        if outcome.allowed {
            stats.ok.inc();
            return Action::Continue;
        }
        stats.rate_limited.inc();
        if !roll(cfg.filter_enforced) {
            add_headers(&mut head.headers, &cfg.request_headers_when_not_enforced);
            return Action::Continue;
        }
        stats.enforced.inc();
        self.limited = true;
        Action::Respond(LocalReply {
            status: http::StatusCode::from_u16(cfg.status)
                .unwrap_or(http::StatusCode::TOO_MANY_REQUESTS),
            body: Bytes::from_static(LOCAL_RATE_LIMITED.as_bytes()),
            flag: Some("RL"),
            details: LOCAL_RATE_LIMITED,
            grpc_status: cfg.resource_exhausted.then_some(RESOURCE_EXHAUSTED),
        })
    }

    fn on_response_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        let cfg = &self.limiter.cfg;
        if self.limited {
            add_headers(&mut head.headers, &cfg.response_headers);
        }
        if let (true, Some(b)) = (cfg.x_ratelimit_headers, &self.bucket) {
            let h = &mut head.headers;
            h.append("x-ratelimit-limit", HeaderValue::from(b.max_tokens()));
            h.append("x-ratelimit-remaining", HeaderValue::from(b.remaining()));
            h.append("x-ratelimit-reset", HeaderValue::from(b.reset_seconds()));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tb(max: u32, per_fill: u32, secs: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_secs(secs),
        }
    }

    fn cfg(
        default: Option<TokenBucketConfig>,
        descriptors: Vec<LocalDescriptor>,
    ) -> HttpLocalRateLimit {
        HttpLocalRateLimit {
            stat_prefix: "p".into(),
            status: 429,
            token_bucket: default,
            filter_enabled: Some(Fraction {
                numerator: 100,
                denominator: 100,
            }),
            filter_enforced: Some(Fraction {
                numerator: 100,
                denominator: 100,
            }),
            request_headers_when_not_enforced: vec![],
            response_headers: vec![],
            descriptors,
            stage: 0,
            per_connection: false,
            x_ratelimit_headers: false,
            vh_rate_limits: VhRateLimits::Override,
            always_consume_default: true,
            resource_exhausted: false,
            max_dynamic_descriptors: 20,
            runtime: Default::default(),
        }
    }

    fn d(entries: &[(&str, &str)]) -> Descriptor {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn descriptors_before_default_bucket() {
        let c = cfg(
            Some(tb(3, 1, 60)),
            vec![LocalDescriptor {
                entries: d(&[("k", "a")]),
                token_bucket: tb(1, 1, 60),
            }],
        );
        let b = Buckets::new(&c);
        let a = [d(&[("k", "a")])];
        assert!(b.request_allowed(&a).allowed);
        // The descriptor's bucket is empty: limited, the default untouched.
        let o = b.request_allowed(&a);
        assert!(!o.allowed);
        assert_eq!(o.bucket.map(|b| b.max_tokens()), Some(1));
        // No match: the default bucket (2 left of 3).
        assert!(b.request_allowed(&[d(&[("k", "b")])]).allowed);
        assert!(b.request_allowed(&[]).allowed);
        assert!(!b.request_allowed(&[]).allowed);
    }

    #[test]
    fn not_consuming_the_default_bucket() {
        let mut c = cfg(
            Some(tb(1, 1, 60)),
            vec![LocalDescriptor {
                entries: d(&[("k", "a")]),
                token_bucket: tb(5, 1, 60),
            }],
        );
        c.always_consume_default = false;
        let b = Buckets::new(&c);
        for _ in 0..5 {
            assert!(b.request_allowed(&[d(&[("k", "a")])]).allowed);
        }
        assert!(b.request_allowed(&[]).allowed);
        assert!(!b.request_allowed(&[]).allowed);
    }

    #[test]
    fn wildcard_buckets_per_value_with_lru() {
        let mut c = cfg(
            None,
            vec![LocalDescriptor {
                entries: d(&[("user", "")]),
                token_bucket: tb(1, 1, 60),
            }],
        );
        c.max_dynamic_descriptors = 2;
        let b = Buckets::new(&c);
        let u = |v: &str| [d(&[("user", v)])];
        assert!(b.request_allowed(&u("a")).allowed);
        assert!(!b.request_allowed(&u("a")).allowed);
        assert!(b.request_allowed(&u("b")).allowed);
        assert!(!b.request_allowed(&u("a")).allowed, "a was used last");
        // c evicts b (least recently used); b comes back with a full bucket.
        assert!(b.request_allowed(&u("c")).allowed);
        assert!(b.request_allowed(&u("b")).allowed);
        // Other keys do not match; no default bucket: allowed.
        assert!(b.request_allowed(&[d(&[("other", "a")])]).allowed);
    }

    #[test]
    fn masks_addresses_as_cidr() {
        let v4: IpAddr = "10.1.2.3".parse().expect("ip");
        assert_eq!(masked(v4, 16, 128), "10.1.0.0/16");
        assert_eq!(masked(v4, 32, 128), "10.1.2.3/32");
        assert_eq!(masked(v4, 0, 128), "0.0.0.0/0");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(masked(v6, 32, 64), "2001:db8::/64");
    }

    #[test]
    fn actions_build_descriptors() {
        use xds_client::config::{HeaderKey, HeaderMatch, HeaderMatcher, StringMatcher};
        let (head, _) = http::Request::get("/p?user=bob")
            .header("x-id", "7")
            .body(())
            .expect("request")
            .into_parts();
        let req = Request {
            head: &head,
            remote: Some("127.0.0.1".parse().expect("ip")),
            cluster: Some("c1"),
        };
        let policy = |actions| RateLimitPolicy {
            stage: 0,
            disable_key: String::new(),
            actions,
        };
        let p = policy(vec![
            RateLimitAction::GenericKey {
                key: "generic_key".into(),
                value: "g".into(),
            },
            RateLimitAction::RequestHeaders {
                header: http::HeaderName::from_static("x-id"),
                key: "id".into(),
                skip_if_absent: false,
            },
            RateLimitAction::RemoteAddress,
            RateLimitAction::DestinationCluster,
            RateLimitAction::QueryParameters {
                name: "user".into(),
                key: "u".into(),
                skip_if_absent: false,
            },
        ]);
        assert_eq!(
            descriptor(&p, &req),
            Some(d(&[
                ("generic_key", "g"),
                ("id", "7"),
                ("remote_address", "127.0.0.1"),
                ("destination_cluster", "c1"),
                ("u", "bob"),
            ]))
        );
        // A missing header drops the descriptor, or only its entry.
        let missing = |skip| {
            policy(vec![
                RateLimitAction::RequestHeaders {
                    header: http::HeaderName::from_static("x-none"),
                    key: "n".into(),
                    skip_if_absent: skip,
                },
                RateLimitAction::GenericKey {
                    key: "k".into(),
                    value: "v".into(),
                },
            ])
        };
        assert_eq!(descriptor(&missing(false), &req), None);
        assert_eq!(descriptor(&missing(true), &req), Some(d(&[("k", "v")])));
        let hm = |expect_match| {
            policy(vec![RateLimitAction::HeaderValueMatch {
                key: "header_match".into(),
                value: "seven".into(),
                expect_match,
                headers: vec![HeaderMatcher {
                    name: HeaderKey::Name(http::HeaderName::from_static("x-id")),
                    kind: HeaderMatch::String(StringMatcher::exact("7")),
                    invert: false,
                    treat_missing_as_empty: false,
                }],
            }])
        };
        assert_eq!(
            descriptor(&hm(true), &req),
            Some(d(&[("header_match", "seven")]))
        );
        assert_eq!(descriptor(&hm(false), &req), None);
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;

    #[test]
    fn per_connection_buckets_die_with_the_connection() {
        let state = crate::http::ConnectionState::default();
        let c = HttpLocalRateLimit {
            token_bucket: Some(TokenBucketConfig {
                max_tokens: 1,
                tokens_per_fill: 1,
                fill_interval: std::time::Duration::from_secs(60),
            }),
            ..tests_cfg()
        };
        let b = state.get_or_insert_with(PER_CONNECTION, || Buckets::new(&c));
        assert!(b.request_allowed(&[]).allowed);
        // The same connection: the same buckets.
        let again = state.get_or_insert_with(PER_CONNECTION, || Buckets::new(&c));
        assert!(!again.request_allowed(&[]).allowed);
        let weak = Arc::downgrade(&b);
        drop((b, again, state));
        assert!(weak.upgrade().is_none(), "freed with the connection");
    }

    fn tests_cfg() -> HttpLocalRateLimit {
        HttpLocalRateLimit {
            stat_prefix: "p".into(),
            status: 429,
            token_bucket: None,
            filter_enabled: None,
            filter_enforced: None,
            request_headers_when_not_enforced: vec![],
            response_headers: vec![],
            descriptors: vec![],
            stage: 0,
            per_connection: true,
            x_ratelimit_headers: false,
            vh_rate_limits: VhRateLimits::Override,
            always_consume_default: true,
            resource_exhausted: false,
            max_dynamic_descriptors: 20,
            runtime: Default::default(),
        }
    }
}
