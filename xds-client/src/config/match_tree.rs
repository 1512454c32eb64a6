//! The generic matcher of the xDS matcher API (`xds.type.matcher.v3.Matcher`,
//! Envoy's "unified matcher"), validated and compiled once: inputs,
//! predicates, lists and trees, generic over the action type `A` its user
//! defines (RBAC's `envoy.config.rbac.v3.Action` is one; a listener's
//! `filter_chain_matcher` can be another).
//!
//! Evaluation follows Envoy 1.40's `Matcher::evaluateMatch`:
//! - a list tries its field matchers in order; the first whose predicate
//!   matches decides, except that a nested matcher which does not match
//!   falls through to the next field matcher (then to `on_no_match`);
//! - an exact map looks the input up; a prefix map tries every key that is
//!   a prefix of the input, longest first, with the same fall-through;
//! - an IP tree (`xds.type.matcher.v3.IPMatcher`, Envoy's trie matcher)
//!   tries the ranges containing the input address, longest prefix first
//!   (declaration order between equal lengths), with the same
//!   fall-through, except that an `exclusive` range is skipped once a
//!   longer range was tried;
//! - an input without data (a missing header, no SNI, no TLS) matches no
//!   `value_match` (inverted by `not_matcher`), and no tree key.
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

use super::{Cidr, HeaderKey, StringMatcher};

/// `xds.type.matcher.v3.Matcher` with actions of type `A`.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchTree<A> {
    pub kind: MatchKind<A>,
    /// `on_no_match` (`None`: no match).
    pub on_no_match: Option<Box<OnMatch<A>>>,
}

/// `matcher_list` or `matcher_tree`.
#[derive(Debug, Clone, PartialEq)]
pub enum MatchKind<A> {
    /// `matcher_list.matchers`, in order.
    List(Vec<FieldMatcher<A>>),
    /// `matcher_tree.exact_match_map`.
    Exact(DataInput, HashMap<String, OnMatch<A>>),
    /// `matcher_tree.prefix_match_map`, longest key first.
    Prefix(DataInput, Vec<(String, OnMatch<A>)>),
    /// `matcher_tree.custom_match` `xds.type.matcher.v3.IPMatcher`.
    Ip(DataInput, IpTree<A>),
}

/// The ranges of an `IPMatcher`, ready for lookup: a sorted vector (a few
/// hundred ranges in practice; no trie needed).
#[derive(Debug, Clone, PartialEq)]
pub struct IpTree<A> {
    /// One entry per range, longest prefix first, then declaration order.
    pub ranges: Vec<IpRange>,
    /// `range_matchers[i].on_match`, by [`IpRange::matcher`].
    pub on_match: Vec<OnMatch<A>>,
}

/// One `ranges` entry of an `IPRangeMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct IpRange {
    pub cidr: Cidr,
    /// The `range_matchers` index it belongs to.
    pub matcher: usize,
    /// `exclusive`: not tried when a longer range was tried first.
    pub exclusive: bool,
}

impl<A> IpTree<A> {
    /// Builds the tree from `(ranges, exclusive, on_match)` per range
    /// matcher, in declaration order.
    pub fn new(matchers: Vec<(Vec<Cidr>, bool, OnMatch<A>)>) -> Self {
        let mut ranges = Vec::new();
        let mut on_match = Vec::with_capacity(matchers.len());
        for (i, (cidrs, exclusive, o)) in matchers.into_iter().enumerate() {
            ranges.extend(cidrs.into_iter().map(|cidr| IpRange {
                cidr,
                matcher: i,
                exclusive,
            }));
            on_match.push(o);
        }
        // Stable: equal lengths keep declaration order.
        ranges.sort_by_key(|r| std::cmp::Reverse(r.cidr.len));
        IpTree { ranges, on_match }
    }

    fn evaluate<'s>(&'s self, ip: IpAddr, data: &dyn MatchingData) -> Option<&'s A> {
        // A v4-mapped IPv6 address (a dual-stack socket) is its IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut first = true;
        for r in self.ranges.iter().filter(|r| same_family(r.cidr.addr, ip)) {
            if !r.cidr.contains(ip) || (!first && r.exclusive) {
                continue;
            }
            if let Some(a) = self.on_match[r.matcher].evaluate(data) {
                return Some(a);
            }
            first = false;
        }
        None
    }
}

/// Envoy's trie keeps IPv4 and IPv6 ranges apart.
fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// `xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMatcher<A> {
    pub predicate: Predicate,
    pub on_match: OnMatch<A>,
}

/// `xds.type.matcher.v3.Matcher.OnMatch` (`keep_matching` is rejected).
#[derive(Debug, Clone, PartialEq)]
pub enum OnMatch<A> {
    Action(A),
    Matcher(Box<MatchTree<A>>),
}

/// `xds.type.matcher.v3.Matcher.MatcherList.Predicate`.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    Single(DataInput, InputMatcher),
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
    Not(Box<Predicate>),
}

/// What a `single_predicate` does with its input.
#[derive(Debug, Clone, PartialEq)]
pub enum InputMatcher {
    /// `value_match` (`xds.type.matcher.v3.StringMatcher`).
    Value(StringMatcher),
    /// `custom_match` `envoy.extensions.matching.input_matchers.ip.v3.Ip`:
    /// the input parsed as an IP address, in any of the ranges.
    Ip(Vec<Cidr>),
}

/// A `TypedExtensionConfig` input (`envoy.matching.inputs.*`).
#[derive(Debug, Clone, PartialEq)]
pub enum DataInput {
    /// `envoy.type.matcher.v3.HttpRequestHeaderMatchInput`: the values
    /// joined with `,`.
    RequestHeader(HeaderKey),
    /// `...network.v3.DestinationIPInput` (the local address).
    DestinationIp,
    DestinationPort,
    /// `SourceIPInput`: the connection's remote address (after PROXY
    /// protocol; not the XFF-derived one).
    SourceIp,
    SourcePort,
    DirectSourceIp,
    /// `ServerNameInput`: the SNI (no data without one).
    ServerName,
    /// `FilterStateInput`: the object's string form (no data without it).
    FilterState(String),
    /// `SourceTypeInput`: `local` for a connection from the same IP or the
    /// loopback address, else no data.
    SourceType,
    /// `TransportProtocolInput`: `tls` or `raw_buffer`.
    TransportProtocol,
    /// `ApplicationProtocolInput`: the requested protocols (ALPN, or what
    /// http_inspector found) rendered as Envoy does, `'h2','http/1.1'`; no
    /// data without any.
    ApplicationProtocol,
    /// `...ssl.v3.UriSanInput`: the peer certificate's URI SANs joined with
    /// `,` (no data without TLS or SANs).
    UriSan,
    DnsSan,
    /// `SubjectInput`: the peer certificate's subject.
    Subject,
}

/// An input's value.
#[derive(Debug, Clone, PartialEq)]
pub enum InputData<'a> {
    /// No data (Envoy's `monostate`).
    None,
    Str(Cow<'a, str>),
    Ip(IpAddr),
    Port(u16),
}

impl InputData<'_> {
    /// The string form Envoy's inputs produce (IPs without brackets).
    fn as_str(&self) -> Option<Cow<'_, str>> {
        match self {
            InputData::None => None,
            InputData::Str(s) => Some(Cow::Borrowed(s)),
            InputData::Ip(ip) => Some(Cow::Owned(ip.to_string())),
            InputData::Port(p) => Some(Cow::Owned(p.to_string())),
        }
    }
}

/// Where a matcher reads its inputs (a request, a connection).
pub trait MatchingData {
    fn get(&self, input: &DataInput) -> InputData<'_>;
}

// === impl MatchTree ===

impl<A> MatchTree<A> {
    /// The action the data selects, if any.
    pub fn evaluate<'s>(&'s self, data: &dyn MatchingData) -> Option<&'s A> {
        let hit = match &self.kind {
            MatchKind::List(matchers) => matchers
                .iter()
                .filter(|m| m.predicate.matches(data))
                .find_map(|m| m.on_match.evaluate(data)),
            MatchKind::Exact(input, map) => data
                .get(input)
                .as_str()
                .and_then(|k| map.get(k.as_ref()))
                .and_then(|m| m.evaluate(data)),
            MatchKind::Prefix(input, keys) => {
                let value = data.get(input);
                let value = value.as_str();
                value.and_then(|v| {
                    keys.iter()
                        .filter(|(k, _)| v.starts_with(k.as_str()))
                        .find_map(|(_, m)| m.evaluate(data))
                })
            }
            // As Envoy, the input's string form parsed as an address; no
            // data or no address goes to `on_no_match`.
            MatchKind::Ip(input, tree) => match data.get(input) {
                InputData::Ip(ip) => tree.evaluate(ip, data),
                InputData::Str(s) => s.parse().ok().and_then(|ip| tree.evaluate(ip, data)),
                InputData::None | InputData::Port(_) => None,
            },
        };
        hit.or_else(|| self.on_no_match.as_ref().and_then(|m| m.evaluate(data)))
    }

    /// Every action the tree can select (for validation and interning).
    pub fn actions(&self) -> Vec<&A> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'s>(&'s self, out: &mut Vec<&'s A>) {
        match &self.kind {
            MatchKind::List(ms) => ms.iter().for_each(|m| m.on_match.collect(out)),
            MatchKind::Exact(_, map) => map.values().for_each(|m| m.collect(out)),
            MatchKind::Prefix(_, keys) => keys.iter().for_each(|(_, m)| m.collect(out)),
            MatchKind::Ip(_, tree) => tree.on_match.iter().for_each(|m| m.collect(out)),
        }
        if let Some(m) = &self.on_no_match {
            m.collect(out);
        }
    }
}

impl<A> OnMatch<A> {
    fn evaluate<'s>(&'s self, data: &dyn MatchingData) -> Option<&'s A> {
        match self {
            OnMatch::Action(a) => Some(a),
            OnMatch::Matcher(m) => m.evaluate(data),
        }
    }

    fn collect<'s>(&'s self, out: &mut Vec<&'s A>) {
        match self {
            OnMatch::Action(a) => out.push(a),
            OnMatch::Matcher(m) => m.collect(out),
        }
    }
}

// === impl Predicate ===

impl Predicate {
    pub fn matches(&self, data: &dyn MatchingData) -> bool {
        match self {
            Predicate::Single(input, m) => m.matches(&data.get(input)),
            Predicate::Or(v) => v.iter().any(|p| p.matches(data)),
            Predicate::And(v) => v.iter().all(|p| p.matches(data)),
            Predicate::Not(p) => !p.matches(data),
        }
    }
}

impl InputMatcher {
    /// As Envoy: no data matches nothing; the IP matcher needs a value that
    /// parses as an address.
    pub fn matches(&self, v: &InputData<'_>) -> bool {
        match self {
            InputMatcher::Value(m) => v.as_str().is_some_and(|s| m.matches(&s)),
            InputMatcher::Ip(ranges) => {
                let ip = match v {
                    InputData::Ip(ip) => Some(*ip),
                    InputData::Str(s) => s.parse().ok(),
                    InputData::None | InputData::Port(_) => None,
                };
                ip.is_some_and(|ip| ranges.iter().any(|c| c.contains(ip)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Data(Vec<(DataInput, &'static str)>);

    impl MatchingData for Data {
        fn get(&self, input: &DataInput) -> InputData<'_> {
            self.0
                .iter()
                .find(|(i, _)| i == input)
                .map_or(InputData::None, |(_, v)| InputData::Str(Cow::Borrowed(v)))
        }
    }

    fn single(input: DataInput, exact: &str) -> Predicate {
        Predicate::Single(input, InputMatcher::Value(StringMatcher::exact(exact)))
    }

    #[test]
    fn list_falls_through_a_nested_matcher_without_a_match() {
        let nested = MatchTree {
            kind: MatchKind::List(vec![FieldMatcher {
                predicate: single(DataInput::ServerName, "nope"),
                on_match: OnMatch::Action(1),
            }]),
            on_no_match: None,
        };
        let tree = MatchTree {
            kind: MatchKind::List(vec![
                FieldMatcher {
                    predicate: single(DataInput::DestinationPort, "80"),
                    on_match: OnMatch::Matcher(Box::new(nested)),
                },
                FieldMatcher {
                    predicate: single(DataInput::DestinationPort, "80"),
                    on_match: OnMatch::Action(2),
                },
            ]),
            on_no_match: Some(Box::new(OnMatch::Action(3))),
        };
        let d = Data(vec![(DataInput::DestinationPort, "80")]);
        assert_eq!(tree.evaluate(&d), Some(&2));
        assert_eq!(tree.evaluate(&Data(vec![])), Some(&3));
        assert_eq!(tree.actions(), vec![&1, &2, &3]);
    }

    #[test]
    fn prefix_map_prefers_the_longest_key_and_missing_data_misses() {
        let tree = MatchTree {
            kind: MatchKind::Prefix(
                DataInput::ServerName,
                vec![
                    ("ab".to_owned(), OnMatch::Action(2)),
                    ("a".to_owned(), OnMatch::Action(1)),
                ],
            ),
            on_no_match: None,
        };
        assert_eq!(
            tree.evaluate(&Data(vec![(DataInput::ServerName, "abc")])),
            Some(&2)
        );
        assert_eq!(
            tree.evaluate(&Data(vec![(DataInput::ServerName, "ax")])),
            Some(&1)
        );
        assert_eq!(tree.evaluate(&Data(vec![])), None);
        let not = Predicate::Not(Box::new(single(DataInput::ServerName, "x")));
        assert!(not.matches(&Data(vec![])));
    }

    fn cidr(s: &str, len: u8) -> Cidr {
        Cidr {
            addr: s.parse().expect("ip"),
            len,
        }
    }

    #[test]
    fn ip_tree_longest_first_falls_through_and_skips_exclusive() {
        let never = || {
            OnMatch::Matcher(Box::new(MatchTree {
                kind: MatchKind::Exact(
                    DataInput::ServerName,
                    [("x".to_owned(), OnMatch::Action(0))].into(),
                ),
                on_no_match: None,
            }))
        };
        let tree = |exclusive: bool| MatchTree {
            kind: MatchKind::Ip(
                DataInput::DestinationIp,
                IpTree::new(vec![
                    (vec![cidr("10.0.0.0", 8)], false, OnMatch::Action(8)),
                    (vec![cidr("10.1.0.0", 16)], exclusive, OnMatch::Action(16)),
                    (vec![cidr("10.1.2.3", 32)], false, never()),
                    (vec![cidr("10.1.2.4", 32)], false, OnMatch::Action(32)),
                ]),
            ),
            on_no_match: Some(Box::new(OnMatch::Action(99))),
        };
        let at = |ip: &'static str| Data(vec![(DataInput::DestinationIp, ip)]);
        let t = tree(false);
        assert_eq!(t.evaluate(&at("10.1.2.4")), Some(&32));
        assert_eq!(t.evaluate(&at("10.1.2.3")), Some(&16));
        assert_eq!(t.evaluate(&at("10.1.9.9")), Some(&16));
        assert_eq!(t.evaluate(&at("10.2.0.1")), Some(&8));
        assert_eq!(t.evaluate(&at("11.0.0.1")), Some(&99));
        assert_eq!(t.evaluate(&at("::ffff:10.2.0.1")), Some(&8));
        assert_eq!(t.evaluate(&at("not an ip")), Some(&99));
        assert_eq!(t.evaluate(&Data(vec![])), Some(&99));
        let x = tree(true);
        assert_eq!(x.evaluate(&at("10.1.2.3")), Some(&8));
        assert_eq!(x.evaluate(&at("10.1.9.9")), Some(&16));
        assert_eq!(x.actions(), vec![&8, &16, &0, &32, &99]);
    }

    #[test]
    fn ip_matcher_parses_its_input() {
        let m = InputMatcher::Ip(vec![Cidr {
            addr: "10.0.0.0".parse().expect("ip"),
            len: 8,
        }]);
        assert!(m.matches(&InputData::Str("10.1.2.3".into())));
        assert!(m.matches(&InputData::Ip("10.9.9.9".parse().expect("ip"))));
        assert!(!m.matches(&InputData::Str("nope".into())));
        assert!(!m.matches(&InputData::None));
    }
}
