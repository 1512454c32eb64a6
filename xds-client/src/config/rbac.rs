//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac`: validated
//! policies (`envoy.config.rbac.v3.RBAC`), compiled once at config time
//! (regexes built, CIDRs parsed, policies sorted by name).
use std::sync::Arc;

use super::{Cidr, HeaderMatcher, MatchTree, StringMatcher};

/// `envoy.config.rbac.v3.RBAC.Action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacAction {
    /// Allowed when a policy matches.
    Allow,
    /// Denied when a policy matches.
    Deny,
    /// Always allowed; a match only marks the request for logging.
    Log,
}

/// `envoy.config.rbac.v3.RBAC`: an action and its policies, sorted by name
/// (Envoy keeps them in a `std::map`: the first matching name is the
/// effective policy).
#[derive(Debug, Clone, PartialEq)]
pub struct RbacRules {
    pub action: RbacAction,
    pub policies: Vec<(String, RbacPolicy)>,
    /// `%RESPONSE_CODE_DETAILS%` of a denial by each policy (same order),
    /// then of a denial without one: `rbac_access_denied_matched_policy[..]`.
    pub denied_details: Vec<&'static str>,
}

impl RbacRules {
    /// The details of a denial by policy `i` (`None`: no policy matched).
    pub fn details(&self, i: Option<usize>) -> &'static str {
        let i = i.unwrap_or(self.policies.len());
        self.denied_details
            .get(i)
            .copied()
            .unwrap_or("rbac_access_denied")
    }

    /// A policy's name, `none` without one (for logs).
    pub fn policy_name(&self, i: Option<usize>) -> &str {
        i.and_then(|i| self.policies.get(i))
            .map_or("none", |(n, _)| n.as_str())
    }
}

/// `envoy.config.rbac.v3.Policy`: any permission and any principal.
#[derive(Debug, Clone, PartialEq)]
pub struct RbacPolicy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// `envoy.config.rbac.v3.Permission`: what the request does.
#[derive(Debug, Clone, PartialEq)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatcher),
    /// `url_path`: the path without query and fragment.
    UrlPath(StringMatcher),
    DestinationIp(Cidr),
    DestinationPort(u16),
    /// `[start, end)`.
    DestinationPortRange(u32, u32),
    RequestedServerName(StringMatcher),
    /// `metadata`: the request's dynamic metadata.
    Metadata(MetadataMatcher),
}

/// `envoy.config.rbac.v3.Principal`: who the downstream is.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// `authenticated`: a TLS connection, whose peer certificate's URI SANs,
    /// else DNS SANs, else subject match (`None`: any TLS connection).
    Authenticated(Option<StringMatcher>),
    /// `source_ip`: the connection's remote address (after PROXY protocol).
    SourceIp(Cidr),
    DirectRemoteIp(Cidr),
    /// `remote_ip`: the downstream remote address (after XFF, for HTTP).
    RemoteIp(Cidr),
    Header(HeaderMatcher),
    UrlPath(StringMatcher),
    /// `filter_state` (`FilterStateMatcher.string_match`): the object under
    /// `key` (the request's, else the connection's) in its string form.
    FilterState(String, StringMatcher),
    /// `metadata`: the request's dynamic metadata (jwt_authn's payload for
    /// Istio's `request.auth.claims[..]`).
    Metadata(MetadataMatcher),
}

/// `envoy.type.matcher.v3.MetadataMatcher`: the value at `path` in
/// namespace `filter` of the dynamic metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataMatcher {
    pub filter: String,
    /// `path[].key`, at least one.
    pub path: Vec<String>,
    pub value: ValueMatcher,
    pub invert: bool,
}

/// `envoy.type.matcher.v3.ValueMatcher`, as Envoy's `Matchers::ValueMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueMatcher {
    /// `null_match`: a JSON null.
    Null,
    /// `double_match.range`: a number in `[start, end)`.
    DoubleRange(f64, f64),
    /// `double_match.exact`.
    DoubleExact(f64),
    /// `string_match`: a string.
    String(StringMatcher),
    /// `bool_match`.
    Bool(bool),
    /// `present_match`: `true` matches any value present; `false` nothing.
    Present(bool),
    /// `list_match.one_of`: a list with an element that matches.
    ListOneOf(Box<ValueMatcher>),
    /// `or_match`: any of them.
    Or(Vec<ValueMatcher>),
}

/// `envoy.config.rbac.v3.Action`: what a `matcher` selects.
#[derive(Debug, Clone, PartialEq)]
pub struct RbacMatchAction {
    /// `name`: the effective policy (stats, metadata, details).
    pub name: String,
    pub action: RbacAction,
    /// `rbac_access_denied_matched_policy[<name>]`, interned.
    pub denied_details: &'static str,
}

/// The `matcher` form of an RBAC engine. As Envoy's
/// `RoleBasedAccessControlMatcherEngineImpl`: ALLOW and LOG allow, DENY
/// denies, and no match denies.
pub type RbacMatcher = MatchTree<RbacMatchAction>;

/// `envoy.extensions.filters.http.rbac.v3.RBAC` (and the `rbac` of an
/// `RBACPerRoute`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpRbac {
    /// `rules` (`None`: no enforced engine, everything allowed).
    pub rules: Option<Arc<RbacRules>>,
    pub rules_stat_prefix: String,
    /// `shadow_rules`: evaluated and counted, never enforced.
    pub shadow_rules: Option<Arc<RbacRules>>,
    pub shadow_rules_stat_prefix: String,
    /// `matcher`: replaces `rules` when set (as Envoy, which ignores
    /// `rules` then).
    pub matcher: Option<Arc<RbacMatcher>>,
    /// `shadow_matcher`: replaces `shadow_rules` when set.
    pub shadow_matcher: Option<Arc<RbacMatcher>>,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRbac {
    pub rules: Option<Arc<RbacRules>>,
    pub shadow_rules: Option<Arc<RbacRules>>,
    pub shadow_rules_stat_prefix: String,
    pub stat_prefix: String,
    /// `matcher` (replaces `rules`) and `shadow_matcher`, as the HTTP
    /// filter's.
    pub matcher: Option<Arc<RbacMatcher>>,
    pub shadow_matcher: Option<Arc<RbacMatcher>>,
}
