//! `xds.type.matcher.v3.Matcher` translation into [`MatchTree`], for any
//! user: the user names the inputs it accepts (as Envoy's per-filter
//! `performDataInputValidation`) and translates its own actions.
//!
//! Rejected naming the field: inputs the user does not accept or weir does
//! not implement, `custom_match` other than the IP matcher
//! (`envoy.extensions.matching.input_matchers.ip.v3.Ip`), tree
//! `custom_match` other than `xds.type.matcher.v3.IPMatcher` (Envoy's
//! `envoy.matching.custom_matchers.trie_matcher`), `keep_matching`, and what
//! Envoy's proto validation
//! rejects (empty lists and maps, a predicate list with fewer than two
//! predicates, a missing input or matcher).
use std::collections::HashMap;

use crate::api::envoy::extensions::matching::common_inputs::network::v3 as net_in;
use crate::api::envoy::extensions::matching::input_matchers::ip::v3 as ip_matcher;
use crate::api::envoy::r#type::matcher::v3 as envoy_mt;
use crate::api::xds::core::v3::TypedExtensionConfig;
use crate::api::xds::r#type::matcher::v3 as xm;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

/// The type names of the inputs weir implements.
pub mod inputs {
    pub const REQUEST_HEADER: &str = "envoy.type.matcher.v3.HttpRequestHeaderMatchInput";
    pub const DESTINATION_IP: &str =
        "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput";
    pub const DESTINATION_PORT: &str =
        "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput";
    pub const SOURCE_IP: &str = "envoy.extensions.matching.common_inputs.network.v3.SourceIPInput";
    pub const SOURCE_PORT: &str =
        "envoy.extensions.matching.common_inputs.network.v3.SourcePortInput";
    pub const DIRECT_SOURCE_IP: &str =
        "envoy.extensions.matching.common_inputs.network.v3.DirectSourceIPInput";
    pub const SERVER_NAME: &str =
        "envoy.extensions.matching.common_inputs.network.v3.ServerNameInput";
    pub const FILTER_STATE: &str =
        "envoy.extensions.matching.common_inputs.network.v3.FilterStateInput";
    pub const SOURCE_TYPE: &str =
        "envoy.extensions.matching.common_inputs.network.v3.SourceTypeInput";
    pub const TRANSPORT_PROTOCOL: &str =
        "envoy.extensions.matching.common_inputs.network.v3.TransportProtocolInput";
    pub const APPLICATION_PROTOCOL: &str =
        "envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput";
    pub const URI_SAN: &str = "envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput";
    pub const DNS_SAN: &str = "envoy.extensions.matching.common_inputs.ssl.v3.DnsSanInput";
    pub const SUBJECT: &str = "envoy.extensions.matching.common_inputs.ssl.v3.SubjectInput";
}

/// `envoy.extensions.matching.input_matchers.ip.v3.Ip`.
pub const IP_MATCHER: &str = "envoy.extensions.matching.input_matchers.ip.v3.Ip";

/// `xds.type.matcher.v3.IPMatcher`: the custom matcher tree of Envoy's
/// `envoy.matching.custom_matchers.trie_matcher`.
pub const IP_TREE: &str = "xds.type.matcher.v3.IPMatcher";

/// `xds/type/matcher/v3/ip.proto`, which envoy-types does not generate (its
/// descriptor is hand-built in `descriptors.rs` for YAML/JSON).
mod ip_tree {
    use crate::api::xds::core::v3::CidrRange;
    use crate::api::xds::r#type::matcher::v3::matcher::OnMatch;

    /// `xds.type.matcher.v3.IPMatcher`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IpMatcher {
        #[prost(message, repeated, tag = "1")]
        pub range_matchers: Vec<IpRangeMatcher>,
    }

    /// `xds.type.matcher.v3.IPMatcher.IPRangeMatcher`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IpRangeMatcher {
        #[prost(message, repeated, tag = "1")]
        pub ranges: Vec<CidrRange>,
        #[prost(message, optional, tag = "2")]
        pub on_match: Option<OnMatch>,
        #[prost(bool, tag = "3")]
        pub exclusive: bool,
    }

    impl prost::Name for IpMatcher {
        const NAME: &'static str = "IPMatcher";
        const PACKAGE: &'static str = "xds.type.matcher.v3";
    }
}

/// What a user of the matcher accepts.
pub struct Rules<'a, A> {
    /// The input type names the user accepts (see [`inputs`]).
    pub inputs: &'a [&'a str],
    /// Who refuses an input, for the error ("RBAC HTTP filter").
    pub who: &'a str,
    /// Translates an `on_match.action`; `path` names the action.
    pub action: &'a dyn Fn(&TypedExtensionConfig, &str) -> Result<A, ConfigErrors>,
}

/// Nesting deeper than this is refused (the proto is recursive).
const MAX_DEPTH: usize = 32;

/// `xds.type.matcher.v3.Matcher`; `path` names it.
pub fn match_tree<A>(
    m: &xm::Matcher,
    path: &str,
    rules: &Rules<'_, A>,
) -> Result<MatchTree<A>, ConfigErrors> {
    tree(m, path, rules, 0)
}

fn tree<A>(
    m: &xm::Matcher,
    path: &str,
    rules: &Rules<'_, A>,
    depth: usize,
) -> Result<MatchTree<A>, ConfigErrors> {
    if depth > MAX_DEPTH {
        return Err(err(path, format!("matchers nest deeper than {MAX_DEPTH}")));
    }
    let mut errs = ConfigErrors::default();
    let on_no_match = match &m.on_no_match {
        Some(o) => on_match(o, &join(path, "on_no_match"), rules, depth)
            .map_err(|e| errs.extend(e))
            .ok()
            .map(Box::new),
        None => None,
    };
    use xm::matcher::MatcherType as T;
    let kind = match &m.matcher_type {
        None => Some(MatchKind::List(Vec::new())),
        Some(T::MatcherList(l)) => {
            let lpath = join(path, "matcher_list");
            if l.matchers.is_empty() {
                errs.push(
                    join(&lpath, "matchers"),
                    "value must contain at least 1 item(s)",
                );
            }
            let mut out = Vec::with_capacity(l.matchers.len());
            for (i, fm) in l.matchers.iter().enumerate() {
                let fpath = format!("{lpath}.matchers[{i}]");
                let p = match &fm.predicate {
                    Some(p) => predicate(p, &join(&fpath, "predicate"), rules, depth)
                        .map_err(|e| errs.extend(e))
                        .ok(),
                    None => {
                        errs.push(join(&fpath, "predicate"), "value is required");
                        None
                    }
                };
                let o = match &fm.on_match {
                    Some(o) => on_match(o, &join(&fpath, "on_match"), rules, depth)
                        .map_err(|e| errs.extend(e))
                        .ok(),
                    None => {
                        errs.push(join(&fpath, "on_match"), "value is required");
                        None
                    }
                };
                if let (Some(predicate), Some(on_match)) = (p, o) {
                    out.push(FieldMatcher {
                        predicate,
                        on_match,
                    });
                }
            }
            Some(MatchKind::List(out))
        }
        Some(T::MatcherTree(t)) => {
            let tpath = join(path, "matcher_tree");
            let input = match &t.input {
                Some(i) => data_input(i, &join(&tpath, "input"), rules)
                    .map_err(|e| errs.extend(e))
                    .ok(),
                None => {
                    errs.push(join(&tpath, "input"), "value is required");
                    None
                }
            };
            use xm::matcher::matcher_tree::TreeType as TT;
            let map = |mm: &xm::matcher::matcher_tree::MatchMap,
                       field: &str,
                       errs: &mut ConfigErrors|
             -> Vec<(String, OnMatch<A>)> {
                let mpath = join(&join(&tpath, field), "map");
                if mm.map.is_empty() {
                    errs.push(mpath.clone(), "value must contain at least 1 pair(s)");
                }
                let mut keys: Vec<&String> = mm.map.keys().collect();
                keys.sort();
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    match on_match(&mm.map[k], &format!("{mpath}[{k:?}]"), rules, depth) {
                        Ok(o) => out.push((k.clone(), o)),
                        Err(e) => errs.extend(e),
                    }
                }
                out
            };
            match &t.tree_type {
                Some(TT::ExactMatchMap(mm)) => {
                    let entries = map(mm, "exact_match_map", &mut errs);
                    input.map(|i| {
                        MatchKind::Exact(i, entries.into_iter().collect::<HashMap<_, _>>())
                    })
                }
                Some(TT::PrefixMatchMap(mm)) => {
                    let mut entries = map(mm, "prefix_match_map", &mut errs);
                    // Longest first: the most specific prefix is tried first.
                    entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
                    input.map(|i| MatchKind::Prefix(i, entries))
                }
                Some(TT::CustomMatch(c)) => {
                    match ip_tree_match(c, &join(&tpath, "custom_match"), rules, depth) {
                        Ok(tree) => input.map(|i| MatchKind::Ip(i, tree)),
                        Err(e) => {
                            errs.extend(e);
                            None
                        }
                    }
                }
                None => {
                    errs.push(tpath.clone(), "a matcher tree needs a tree_type");
                    None
                }
            }
        }
    };
    match kind {
        Some(kind) if errs.is_empty() => Ok(MatchTree { kind, on_no_match }),
        _ => Err(errs),
    }
}

fn on_match<A>(
    o: &xm::matcher::OnMatch,
    path: &str,
    rules: &Rules<'_, A>,
    depth: usize,
) -> Result<OnMatch<A>, ConfigErrors> {
    if o.keep_matching {
        return Err(err(
            join(path, "keep_matching"),
            "keep_matching is not implemented",
        ));
    }
    use xm::matcher::on_match::OnMatch as O;
    match &o.on_match {
        Some(O::Action(a)) => (rules.action)(a, &join(path, "action")).map(OnMatch::Action),
        Some(O::Matcher(m)) => {
            tree(m, &join(path, "matcher"), rules, depth + 1).map(|m| OnMatch::Matcher(Box::new(m)))
        }
        None => Err(err(path, "on_match needs a matcher or an action")),
    }
}

fn predicate<A>(
    p: &xm::matcher::matcher_list::Predicate,
    path: &str,
    rules: &Rules<'_, A>,
    depth: usize,
) -> Result<Predicate, ConfigErrors> {
    if depth > MAX_DEPTH {
        return Err(err(
            path,
            format!("predicates nest deeper than {MAX_DEPTH}"),
        ));
    }
    use xm::matcher::matcher_list::predicate::{single_predicate::Matcher as SM, MatchType as M};
    match &p.match_type {
        Some(M::SinglePredicate(s)) => {
            let spath = join(path, "single_predicate");
            let mut errs = ConfigErrors::default();
            let input = match &s.input {
                Some(i) => data_input(i, &join(&spath, "input"), rules)
                    .map_err(|e| errs.extend(e))
                    .ok(),
                None => {
                    errs.push(join(&spath, "input"), "value is required");
                    None
                }
            };
            let m = match &s.matcher {
                Some(SM::ValueMatch(v)) => xds_string_matcher(v, &join(&spath, "value_match"))
                    .map(InputMatcher::Value)
                    .map_err(|e| errs.extend(e))
                    .ok(),
                Some(SM::CustomMatch(c)) => custom_match(c, &join(&spath, "custom_match"))
                    .map_err(|e| errs.extend(e))
                    .ok(),
                None => {
                    errs.push(
                        spath.clone(),
                        "a single_predicate needs a value_match or custom_match",
                    );
                    None
                }
            };
            match (input, m) {
                (Some(i), Some(m)) if errs.is_empty() => Ok(Predicate::Single(i, m)),
                _ => Err(errs),
            }
        }
        Some(M::OrMatcher(l)) => {
            predicate_list(&l.predicate, &join(path, "or_matcher"), rules, depth).map(Predicate::Or)
        }
        Some(M::AndMatcher(l)) => {
            predicate_list(&l.predicate, &join(path, "and_matcher"), rules, depth)
                .map(Predicate::And)
        }
        Some(M::NotMatcher(n)) => predicate(n, &join(path, "not_matcher"), rules, depth + 1)
            .map(|p| Predicate::Not(Box::new(p))),
        None => Err(err(path, "a predicate needs a match_type")),
    }
}

fn predicate_list<A>(
    ps: &[xm::matcher::matcher_list::Predicate],
    path: &str,
    rules: &Rules<'_, A>,
    depth: usize,
) -> Result<Vec<Predicate>, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if ps.len() < 2 {
        errs.push(
            join(path, "predicate"),
            "value must contain at least 2 item(s)",
        );
    }
    let mut out = Vec::with_capacity(ps.len());
    for (i, p) in ps.iter().enumerate() {
        match predicate(p, &format!("{path}.predicate[{i}]"), rules, depth + 1) {
            Ok(p) => out.push(p),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(out)
}

/// The input a `TypedExtensionConfig` names, if the user accepts it.
fn data_input<A>(
    c: &TypedExtensionConfig,
    path: &str,
    rules: &Rules<'_, A>,
) -> Result<DataInput, ConfigErrors> {
    let Some(any) = &c.typed_config else {
        return Err(err(join(path, "typed_config"), "value is required"));
    };
    let tpath = join(path, "typed_config");
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if !rules.inputs.contains(&name) {
        return Err(err(
            tpath,
            format!("{} cannot match on '{}'", rules.who, any.type_url),
        ));
    }
    use inputs::*;
    Ok(match name {
        REQUEST_HEADER => {
            let h: envoy_mt::HttpRequestHeaderMatchInput = super::decode(&any, &tpath)?;
            let key = HeaderKey::parse(&h.header_name.to_ascii_lowercase()).ok_or_else(|| {
                err(
                    join(&tpath, "header_name"),
                    format!("invalid header name {:?}", h.header_name),
                )
            })?;
            DataInput::RequestHeader(key)
        }
        DESTINATION_IP => DataInput::DestinationIp,
        DESTINATION_PORT => DataInput::DestinationPort,
        SOURCE_IP => DataInput::SourceIp,
        SOURCE_PORT => DataInput::SourcePort,
        DIRECT_SOURCE_IP => DataInput::DirectSourceIp,
        SERVER_NAME => DataInput::ServerName,
        SOURCE_TYPE => DataInput::SourceType,
        TRANSPORT_PROTOCOL => DataInput::TransportProtocol,
        APPLICATION_PROTOCOL => DataInput::ApplicationProtocol,
        FILTER_STATE => {
            let f: net_in::FilterStateInput = super::decode(&any, &tpath)?;
            if f.key.is_empty() {
                return Err(err(
                    join(&tpath, "key"),
                    "value length must be at least 1 characters",
                ));
            }
            DataInput::FilterState(f.key)
        }
        URI_SAN => DataInput::UriSan,
        DNS_SAN => DataInput::DnsSan,
        SUBJECT => DataInput::Subject,
        other => {
            return Err(err(
                tpath,
                format!("weir does not implement the matching input {other}"),
            ))
        }
    })
}

/// A tree's `custom_match`: `xds.type.matcher.v3.IPMatcher` only.
fn ip_tree_match<A>(
    c: &TypedExtensionConfig,
    path: &str,
    rules: &Rules<'_, A>,
    depth: usize,
) -> Result<IpTree<A>, ConfigErrors> {
    let Some(any) = &c.typed_config else {
        return Err(err(join(path, "typed_config"), "value is required"));
    };
    let tpath = join(path, "typed_config");
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != IP_TREE {
        return Err(err(
            tpath,
            format!("weir does not implement the custom matcher tree {name}"),
        ));
    }
    let m: ip_tree::IpMatcher = super::decode(&any, &tpath)?;
    let mut errs = ConfigErrors::default();
    let mut out = Vec::with_capacity(m.range_matchers.len());
    for (i, rm) in m.range_matchers.iter().enumerate() {
        let rpath = format!("{tpath}.range_matchers[{i}]");
        // As Envoy's proto validation.
        if rm.ranges.is_empty() {
            errs.push(
                join(&rpath, "ranges"),
                "value must contain at least 1 item(s)",
            );
        }
        let mut cidrs = Vec::with_capacity(rm.ranges.len());
        for (j, r) in rm.ranges.iter().enumerate() {
            let cpath = format!("{rpath}.ranges[{j}]");
            if r.address_prefix.is_empty() {
                errs.push(
                    join(&cpath, "address_prefix"),
                    "value length must be at least 1 characters",
                );
                continue;
            }
            // Envoy reads an unset `prefix_len` as 0.
            let core = crate::api::envoy::config::core::v3::CidrRange {
                address_prefix: r.address_prefix.clone(),
                prefix_len: Some(r.prefix_len.unwrap_or_default()),
            };
            match super::hcm::cidr(&core, &cpath) {
                Ok(c) => cidrs.push(c),
                Err(e) => errs.extend(e),
            }
        }
        let o = match &rm.on_match {
            Some(o) => on_match(o, &join(&rpath, "on_match"), rules, depth)
                .map_err(|e| errs.extend(e))
                .ok(),
            None => {
                errs.push(join(&rpath, "on_match"), "value is required");
                None
            }
        };
        if let Some(o) = o {
            out.push((cidrs, rm.exclusive, o));
        }
    }
    errs.into_result(IpTree::new(out))
}

fn custom_match(c: &TypedExtensionConfig, path: &str) -> Result<InputMatcher, ConfigErrors> {
    let Some(any) = &c.typed_config else {
        return Err(err(join(path, "typed_config"), "value is required"));
    };
    let tpath = join(path, "typed_config");
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != IP_MATCHER {
        return Err(err(
            tpath,
            format!("weir does not implement the input matcher {name}"),
        ));
    }
    let ip: ip_matcher::Ip = super::decode(&any, &tpath)?;
    let mut errs = ConfigErrors::default();
    // As Envoy's proto validation.
    if ip.cidr_ranges.is_empty() {
        errs.push(
            join(&tpath, "cidr_ranges"),
            "value must contain at least 1 item(s)",
        );
    }
    if ip.stat_prefix.is_empty() {
        errs.push(
            join(&tpath, "stat_prefix"),
            "value length must be at least 1 characters",
        );
    }
    let mut ranges = Vec::with_capacity(ip.cidr_ranges.len());
    for (i, r) in ip.cidr_ranges.iter().enumerate() {
        match super::hcm::cidr(r, &format!("{tpath}.cidr_ranges[{i}]")) {
            Ok(c) => ranges.push(c),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(InputMatcher::Ip(ranges))
}

/// `xds.type.matcher.v3.StringMatcher` (the same patterns as Envoy's).
pub fn xds_string_matcher(
    m: &xm::StringMatcher,
    path: &str,
) -> Result<StringMatcher, ConfigErrors> {
    use xm::string_matcher::MatchPattern as P;
    let kind = match &m.match_pattern {
        Some(P::Exact(s)) => StringMatch::Exact(s.clone()),
        Some(P::Prefix(s)) if !s.is_empty() => StringMatch::Prefix(s.clone()),
        Some(P::Suffix(s)) if !s.is_empty() => StringMatch::Suffix(s.clone()),
        Some(P::Contains(s)) if !s.is_empty() => StringMatch::Contains(s.clone()),
        Some(P::Prefix(_)) => {
            return Err(err(
                join(path, "prefix"),
                "value length must be at least 1 characters",
            ))
        }
        Some(P::Suffix(_)) => {
            return Err(err(
                join(path, "suffix"),
                "value length must be at least 1 characters",
            ))
        }
        Some(P::Contains(_)) => {
            return Err(err(
                join(path, "contains"),
                "value length must be at least 1 characters",
            ))
        }
        Some(P::SafeRegex(r)) => StringMatch::Regex(Pattern::full(&r.regex).map_err(|e| {
            err(
                join(&join(path, "safe_regex"), "regex"),
                format!("invalid regex: {e}"),
            )
        })?),
        Some(P::Custom(_)) => {
            return Err(err(
                join(path, "custom"),
                "custom string matchers are not implemented",
            ))
        }
        None => return Err(err(path, "string matcher has no pattern")),
    };
    if m.ignore_case && matches!(kind, StringMatch::Regex(_)) {
        return Err(err(
            join(path, "ignore_case"),
            "ignore_case has no effect on safe_regex (Envoy rejects it)",
        ));
    }
    Ok(StringMatcher {
        kind,
        ignore_case: m.ignore_case,
    })
}
