//! The RBAC engine shared by `envoy.filters.http.rbac` and
//! `envoy.filters.network.rbac`, as Envoy 1.40's
//! `Filters::Common::RBAC::RoleBasedAccessControlEngineImpl`.
//!
//! Policies are evaluated in name order (Envoy keeps them in a `std::map`);
//! the first that matches is the effective policy. A policy matches when
//! any of its permissions and any of its principals match. Matchers are the
//! validated config types (regexes compiled, CIDRs parsed at config time):
//! evaluation allocates nothing, except for a header with several values.
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use xds_client::config::{
    request_pseudo, DataInput, HeaderKey, InputData, MatchingData, MetadataMatcher, Permission,
    Principal, RbacAction, RbacMatcher, RbacRules, StringMatcher, ValueMatcher,
};

pub mod http;

/// What the engine evaluates: the request (HTTP only) and its connection.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The request head; `None` for the network filter, which sees an empty
    /// header map as Envoy's (no `:path`, no `:method`).
    pub head: Option<&'a ::http::request::Parts>,
    /// The connection's remote address, after PROXY protocol (`source_ip`).
    pub source: SocketAddr,
    /// The socket's own peer (`direct_remote_ip`).
    pub direct_remote: SocketAddr,
    /// The downstream remote address: after XFF for HTTP (`remote_ip`).
    pub remote: SocketAddr,
    /// The local (destination) address.
    pub local: SocketAddr,
    /// SNI (empty without one).
    pub sni: &'a str,
    /// `Some` on a TLS connection, with the peer certificate's names (empty
    /// without a certificate).
    pub tls: Option<Peer<'a>>,
    /// Filter state: the request's, then the connection's (`filter_state`
    /// principals).
    pub filter_state: [Option<&'a crate::FilterState>; 2],
    /// The request's dynamic metadata (`metadata` matchers); for the
    /// network filter, the connection's.
    pub metadata: Option<&'a crate::state::DynamicMetadata>,
}

/// The peer certificate's names.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
    /// RFC 2253 subject (empty without a certificate).
    pub subject: &'a str,
}

/// An engine's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The first matching policy (index in name order), if any.
    pub policy: Option<usize>,
}

/// An RBAC engine: `rules` policies or a `matcher`.
#[derive(Debug, Clone, Copy)]
pub enum Engine<'a> {
    Rules(&'a RbacRules),
    Matcher(&'a RbacMatcher),
}

/// An engine's verdict on a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    /// The effective policy: the first matching policy's name, or the
    /// matched action's `name` (`None`: none, or an empty name, as Envoy).
    pub policy: Option<&'a str>,
    /// `%RESPONSE_CODE_DETAILS%` of a denial.
    pub details: &'static str,
}

impl<'a> Engine<'a> {
    /// The engine of a config: its matcher, else its rules (as Envoy, a
    /// matcher replaces the rules of its kind; the translator keeps one).
    pub fn of(
        rules: Option<&'a Arc<RbacRules>>,
        matcher: Option<&'a Arc<RbacMatcher>>,
    ) -> Option<Engine<'a>> {
        matcher
            .map(|m| Engine::Matcher(m))
            .or(rules.map(|r| Engine::Rules(r)))
    }

    pub fn evaluate(&self, input: &Input<'_>) -> Verdict<'a> {
        match *self {
            Engine::Rules(rules) => {
                let d = evaluate(rules, input);
                Verdict {
                    allowed: d.allowed,
                    policy: d
                        .policy
                        .and_then(|i| rules.policies.get(i))
                        .map(|(n, _)| n.as_str()),
                    details: rules.details(d.policy),
                }
            }
            // As Envoy's `RoleBasedAccessControlMatcherEngineImpl`: ALLOW
            // and LOG allow, DENY denies, no match denies.
            Engine::Matcher(m) => match m.evaluate(input) {
                Some(a) => Verdict {
                    allowed: a.action != RbacAction::Deny,
                    policy: (!a.name.is_empty()).then_some(a.name.as_str()),
                    details: a.denied_details,
                },
                None => Verdict {
                    allowed: false,
                    policy: None,
                    details: "rbac_access_denied_matched_policy[none]",
                },
            },
        }
    }
}

/// What the matcher inputs read, as Envoy's `HttpMatchingDataImpl` over the
/// connection: addresses of the connection (not the XFF-derived remote),
/// no data for a missing header, SNI, certificate name or filter state.
impl MatchingData for Input<'_> {
    fn get(&self, input: &DataInput) -> InputData<'_> {
        fn joined(v: &[String]) -> InputData<'_> {
            match v {
                [] => InputData::None,
                [one] => InputData::Str(Cow::Borrowed(one)),
                many => InputData::Str(Cow::Owned(many.join(","))),
            }
        }
        fn non_empty(s: &str) -> InputData<'_> {
            if s.is_empty() {
                InputData::None
            } else {
                InputData::Str(Cow::Borrowed(s))
            }
        }
        match input {
            DataInput::RequestHeader(key) => {
                let Some(head) = self.head else {
                    return InputData::None;
                };
                let HeaderKey::Name(name) = key else {
                    return request_pseudo(head, key)
                        .map_or(InputData::None, |v| InputData::Str(Cow::Borrowed(v)));
                };
                let mut all = head.headers.get_all(name).iter();
                match (all.next(), all.next()) {
                    (None, _) => InputData::None,
                    (Some(v), None) => InputData::Str(String::from_utf8_lossy(v.as_bytes())),
                    _ => InputData::Str(Cow::Owned(
                        head.headers
                            .get_all(name)
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()))
                            .collect::<Vec<_>>()
                            .join(","),
                    )),
                }
            }
            DataInput::DestinationIp => InputData::Ip(self.local.ip()),
            DataInput::DestinationPort => InputData::Port(self.local.port()),
            DataInput::SourceIp => InputData::Ip(self.source.ip()),
            DataInput::SourcePort => InputData::Port(self.source.port()),
            DataInput::DirectSourceIp => InputData::Ip(self.direct_remote.ip()),
            DataInput::ServerName => non_empty(self.sni),
            DataInput::FilterState(key) => self
                .filter_state
                .iter()
                .flatten()
                .find_map(|s| s.get(key))
                .and_then(|v| v.serialize_as_string())
                .map_or(InputData::None, |v| InputData::Str(Cow::Owned(v))),
            DataInput::UriSan => self.tls.map_or(InputData::None, |p| joined(p.uri_sans)),
            DataInput::DnsSan => self.tls.map_or(InputData::None, |p| joined(p.dns_sans)),
            DataInput::Subject => self.tls.map_or(InputData::None, |p| non_empty(p.subject)),
            // Listener inputs RBAC does not accept (rejected at translation).
            DataInput::SourceType
            | DataInput::TransportProtocol
            | DataInput::ApplicationProtocol => InputData::None,
        }
    }
}

/// As Envoy's `handleAction`: ALLOW allows when a policy matches, DENY
/// denies when one does, LOG always allows.
pub fn evaluate(rules: &RbacRules, input: &Input<'_>) -> Decision {
    let policy = rules.policies.iter().position(|(_, p)| {
        p.permissions.iter().any(|x| permission(x, input))
            && p.principals.iter().any(|x| principal(x, input))
    });
    let allowed = match rules.action {
        RbacAction::Allow => policy.is_some(),
        RbacAction::Deny => policy.is_none(),
        RbacAction::Log => true,
    };
    Decision { allowed, policy }
}

fn permission(p: &Permission, i: &Input<'_>) -> bool {
    match p {
        Permission::Any => true,
        Permission::And(v) => v.iter().all(|x| permission(x, i)),
        Permission::Or(v) => v.iter().any(|x| permission(x, i)),
        Permission::Not(x) => !permission(x, i),
        Permission::Header(h) => header(h, i),
        Permission::UrlPath(m) => url_path(m, i),
        Permission::DestinationIp(c) => c.contains(i.local.ip()),
        Permission::DestinationPort(port) => i.local.port() == *port,
        Permission::DestinationPortRange(start, end) => {
            (*start..*end).contains(&u32::from(i.local.port()))
        }
        Permission::RequestedServerName(m) => m.matches(i.sni),
        Permission::Metadata(m) => metadata(m, i),
    }
}

fn principal(p: &Principal, i: &Input<'_>) -> bool {
    match p {
        Principal::Any => true,
        Principal::And(v) => v.iter().all(|x| principal(x, i)),
        Principal::Or(v) => v.iter().any(|x| principal(x, i)),
        Principal::Not(x) => !principal(x, i),
        Principal::Authenticated(m) => authenticated(m.as_ref(), i),
        Principal::SourceIp(c) => c.contains(i.source.ip()),
        Principal::DirectRemoteIp(c) => c.contains(i.direct_remote.ip()),
        Principal::RemoteIp(c) => c.contains(i.remote.ip()),
        Principal::Header(h) => header(h, i),
        Principal::UrlPath(m) => url_path(m, i),
        Principal::FilterState(key, m) => i
            .filter_state
            .iter()
            .flatten()
            .find_map(|s| s.get(key))
            .and_then(|v| v.serialize_as_string())
            .is_some_and(|v| m.matches(&v)),
        Principal::Metadata(m) => metadata(m, i),
    }
}

/// As Envoy's `MetadataMatcher::match`: the value at the path (absent when
/// a key is missing or a step is not an object), matched, then inverted.
fn metadata(m: &MetadataMatcher, i: &Input<'_>) -> bool {
    metadata_matches(m, i.metadata)
}

/// A `MetadataMatcher` on a request's dynamic metadata (RBAC, and
/// ext_authz's `filter_enabled_metadata`).
pub(crate) fn metadata_matches(
    m: &MetadataMatcher,
    metadata: Option<&crate::state::DynamicMetadata>,
) -> bool {
    // The translator guarantees a non-empty path.
    let Some((first, rest)) = m.path.split_first() else {
        return m.invert;
    };
    let mut v = metadata
        .and_then(|md| md.namespace(&m.filter))
        .and_then(|ns| ns.get(first.as_str()));
    for k in rest {
        v = v
            .and_then(|x| x.as_object())
            .and_then(|o| o.get(k.as_str()));
    }
    value_matches(&m.value, v) ^ m.invert
}

/// As Envoy's `Matchers::ValueMatcher` (`None`: no value, Envoy's unset
/// `Value` kind).
fn value_matches(m: &ValueMatcher, v: Option<&serde_json::Value>) -> bool {
    use serde_json::Value as J;
    match (m, v) {
        (ValueMatcher::Null, Some(J::Null)) => true,
        (ValueMatcher::DoubleRange(start, end), Some(J::Number(n))) => {
            n.as_f64().is_some_and(|x| *start <= x && x < *end)
        }
        (ValueMatcher::DoubleExact(e), Some(J::Number(n))) => n.as_f64() == Some(*e),
        (ValueMatcher::String(s), Some(J::String(x))) => s.matches(x),
        (ValueMatcher::Bool(b), Some(J::Bool(x))) => b == x,
        (ValueMatcher::Present(p), v) => *p && v.is_some(),
        (ValueMatcher::ListOneOf(one), Some(J::Array(items))) => {
            items.iter().any(|x| value_matches(one, Some(x)))
        }
        (ValueMatcher::Or(all), v) => all.iter().any(|x| value_matches(x, v)),
        _ => false,
    }
}

fn header(h: &xds_client::config::HeaderMatcher, i: &Input<'_>) -> bool {
    match i.head {
        Some(head) => h.matches_head(head),
        // Envoy matches the network filter's empty header map (creating
        // an empty map does not allocate).
        None => h.matches_request(&::http::HeaderMap::new(), |_| None),
    }
}

/// As Envoy's `PathMatcher`: `:path` without query and fragment; no
/// `:path` (the network filter) never matches.
fn url_path(m: &StringMatcher, i: &Input<'_>) -> bool {
    let Some(head) = i.head else { return false };
    let path = head.uri.path_and_query().map_or("", |p| p.as_str());
    let path = path.split(['?', '#']).next().unwrap_or_default();
    m.matches(path)
}

/// As Envoy's `AuthenticatedMatcher`: TLS required; without a name any TLS
/// connection; else any URI SAN, any DNS SAN, or the subject.
fn authenticated(m: Option<&StringMatcher>, i: &Input<'_>) -> bool {
    let Some(peer) = &i.tls else { return false };
    let Some(m) = m else { return true };
    peer.uri_sans.iter().any(|s| m.matches(s))
        || peer.dns_sans.iter().any(|s| m.matches(s))
        || m.matches(peer.subject)
}

#[cfg(test)]
mod tests;
