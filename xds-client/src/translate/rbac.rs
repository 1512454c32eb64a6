//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac` translation:
//! `envoy.config.rbac.v3.RBAC` policies into [`RbacRules`].
//!
//! The `matcher` / `shadow_matcher` form goes through the generic
//! [`super::match_tree`] with `envoy.config.rbac.v3.Action` actions.
//!
//! What weir cannot evaluate is rejected naming the field: `sourced_metadata` and filter state, CEL conditions, audit logging, `uri_template`, custom
//! matchers and principals, per-rule stats, network `delay_deny` and
//! `CONTINUOUS` enforcement; as Envoy, `header` rules in the network filter.
use std::sync::Arc;

use crate::api::envoy::config::rbac::v3 as rbac;
use crate::api::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use crate::api::envoy::extensions::filters::network::rbac::v3 as net_rbac;
use crate::api::envoy::r#type::matcher::v3 as mt;
use crate::api::envoy::r#type::matcher::v3::PathMatcher;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;
use super::match_tree::inputs;
use crate::api::xds::r#type::matcher::v3 as xm;

/// `envoy.extensions.filters.http.rbac.v3.RBAC`.
pub const HTTP_RBAC: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
/// `envoy.extensions.filters.http.rbac.v3.RBACPerRoute`.
pub const HTTP_RBAC_PER_ROUTE: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
pub const NETWORK_RBAC: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";

/// The HTTP filter's config; `path` names the `typed_config`.
pub fn http_rbac(p: &http_rbac::Rbac, path: &str) -> Result<HttpRbac, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let matcher = optional_matcher(p.matcher.as_ref(), &join(path, "matcher"), true, &mut errs);
    let shadow_matcher = optional_matcher(
        p.shadow_matcher.as_ref(),
        &join(path, "shadow_matcher"),
        true,
        &mut errs,
    );
    if p.track_per_rule_stats {
        errs.push(
            join(path, "track_per_rule_stats"),
            "per-policy RBAC stats are not implemented",
        );
    }
    let rules = optional_rules(p.rules.as_ref(), &join(path, "rules"), &mut errs);
    let shadow_rules = optional_rules(
        p.shadow_rules.as_ref(),
        &join(path, "shadow_rules"),
        &mut errs,
    );
    // As Envoy: a matcher replaces the rules of its kind (they are
    // validated, then ignored).
    errs.into_result(HttpRbac {
        rules: rules.filter(|_| matcher.is_none()),
        rules_stat_prefix: p.rules_stat_prefix.clone(),
        shadow_rules: shadow_rules.filter(|_| shadow_matcher.is_none()),
        shadow_rules_stat_prefix: p.shadow_rules_stat_prefix.clone(),
        matcher,
        shadow_matcher,
    })
}

/// `RBACPerRoute`: its `rbac` replaces the filter's engines on the route
/// (absent: no engine, everything allowed, as Envoy).
pub fn http_rbac_per_route(
    p: &http_rbac::RbacPerRoute,
    path: &str,
) -> Result<HttpRbac, ConfigErrors> {
    match &p.rbac {
        Some(r) => http_rbac(r, &join(path, "rbac")),
        None => Ok(HttpRbac::default()),
    }
}

/// The network filter's config; `path` names the `typed_config`.
pub fn network_rbac(p: &net_rbac::Rbac, path: &str) -> Result<NetworkRbac, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.stat_prefix.is_empty() {
        errs.push(
            join(path, "stat_prefix"),
            "value length must be at least 1 characters",
        );
    }
    let matcher = optional_matcher(p.matcher.as_ref(), &join(path, "matcher"), false, &mut errs);
    let shadow_matcher = optional_matcher(
        p.shadow_matcher.as_ref(),
        &join(path, "shadow_matcher"),
        false,
        &mut errs,
    );
    if p.enforcement_type != net_rbac::rbac::EnforcementType::OneTimeOnFirstByte as i32 {
        errs.push(
            join(path, "enforcement_type"),
            "only ONE_TIME_ON_FIRST_BYTE is implemented (CONTINUOUS needs dynamic metadata)",
        );
    }
    if p.delay_deny.is_some() {
        errs.push(join(path, "delay_deny"), "delay_deny is not implemented");
    }
    // As Envoy: the network filter has no request headers and refuses
    // header rules at config time (`url_path` rules are accepted and never
    // match).
    for (field, r) in [("rules", &p.rules), ("shadow_rules", &p.shadow_rules)] {
        if let Some(r) = r {
            let rpath = join(path, field);
            let mut names: Vec<&String> = r.policies.keys().collect();
            names.sort();
            for name in names {
                let ppath = format!("{}[{name:?}]", join(&rpath, "policies"));
                let pol = &r.policies[name];
                for (i, x) in pol.permissions.iter().enumerate() {
                    no_header_permission(x, &format!("{ppath}.permissions[{i}]"), &mut errs);
                }
                for (i, x) in pol.principals.iter().enumerate() {
                    no_header_principal(x, &format!("{ppath}.principals[{i}]"), &mut errs);
                }
            }
        }
    }
    let rules = optional_rules(p.rules.as_ref(), &join(path, "rules"), &mut errs);
    let shadow_rules = optional_rules(
        p.shadow_rules.as_ref(),
        &join(path, "shadow_rules"),
        &mut errs,
    );
    errs.into_result(NetworkRbac {
        rules: rules.filter(|_| matcher.is_none()),
        shadow_rules: shadow_rules.filter(|_| shadow_matcher.is_none()),
        shadow_rules_stat_prefix: p.shadow_rules_stat_prefix.clone(),
        stat_prefix: p.stat_prefix.clone(),
        matcher,
        shadow_matcher,
    })
}

const NETWORK_HEADER: &str = "header rules are not supported by the RBAC network filter";

fn no_header_permission(p: &rbac::Permission, path: &str, errs: &mut ConfigErrors) {
    use rbac::permission::Rule as R;
    match &p.rule {
        Some(R::Header(_)) => errs.push(join(path, "header"), NETWORK_HEADER),
        Some(R::AndRules(s)) | Some(R::OrRules(s)) => {
            let field = if matches!(p.rule, Some(R::AndRules(_))) {
                "and_rules"
            } else {
                "or_rules"
            };
            for (i, r) in s.rules.iter().enumerate() {
                no_header_permission(r, &format!("{}.rules[{i}]", join(path, field)), errs);
            }
        }
        Some(R::NotRule(r)) => no_header_permission(r, &join(path, "not_rule"), errs),
        _ => {}
    }
}

fn no_header_principal(p: &rbac::Principal, path: &str, errs: &mut ConfigErrors) {
    use rbac::principal::Identifier as I;
    match &p.identifier {
        Some(I::Header(_)) => errs.push(join(path, "header"), NETWORK_HEADER),
        Some(I::AndIds(s)) | Some(I::OrIds(s)) => {
            let field = if matches!(p.identifier, Some(I::AndIds(_))) {
                "and_ids"
            } else {
                "or_ids"
            };
            for (i, r) in s.ids.iter().enumerate() {
                no_header_principal(r, &format!("{}.ids[{i}]", join(path, field)), errs);
            }
        }
        Some(I::NotId(r)) => no_header_principal(r, &join(path, "not_id"), errs),
        _ => {}
    }
}

/// The inputs Envoy 1.40's RBAC filters accept (its
/// `ActionValidationVisitor`s), less those weir does not implement
/// (`DynamicMetadataInput`, CEL, `NetworkNamespaceInput`): the HTTP filter
/// also reads request headers; the network filter does not.
const NETWORK_INPUTS: &[&str] = &[
    inputs::DESTINATION_IP,
    inputs::DESTINATION_PORT,
    inputs::SOURCE_IP,
    inputs::SOURCE_PORT,
    inputs::DIRECT_SOURCE_IP,
    inputs::SERVER_NAME,
    inputs::URI_SAN,
    inputs::DNS_SAN,
    inputs::SUBJECT,
    inputs::FILTER_STATE,
];
const HTTP_INPUTS: &[&str] = &[
    inputs::DESTINATION_IP,
    inputs::DESTINATION_PORT,
    inputs::SOURCE_IP,
    inputs::SOURCE_PORT,
    inputs::DIRECT_SOURCE_IP,
    inputs::SERVER_NAME,
    inputs::URI_SAN,
    inputs::DNS_SAN,
    inputs::SUBJECT,
    inputs::FILTER_STATE,
    inputs::REQUEST_HEADER,
];

/// `envoy.config.rbac.v3.Action`.
pub const RBAC_ACTION: &str = "envoy.config.rbac.v3.Action";

fn optional_matcher(
    m: Option<&xm::Matcher>,
    path: &str,
    http: bool,
    errs: &mut ConfigErrors,
) -> Option<Arc<RbacMatcher>> {
    m.and_then(|m| rbac_matcher(m, path, http).map_err(|e| errs.extend(e)).ok())
        .map(Arc::new)
}

/// An RBAC `matcher` (`http`: the HTTP filter's, which may read headers).
pub fn rbac_matcher(m: &xm::Matcher, path: &str, http: bool) -> Result<RbacMatcher, ConfigErrors> {
    let action = |c: &crate::api::xds::core::v3::TypedExtensionConfig,
                  path: &str|
     -> Result<RbacMatchAction, ConfigErrors> {
        let tpath = join(path, "typed_config");
        let Some(any) = &c.typed_config else {
            return Err(err(tpath, "value is required"));
        };
        let any = crate::support::unwrap_typed_struct(any, &tpath)?;
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name != RBAC_ACTION {
            return Err(err(
                tpath,
                format!("an RBAC matcher's action must be {RBAC_ACTION}, not {name}"),
            ));
        }
        let a: rbac::Action = super::decode(&any, &tpath)?;
        // As Envoy's proto validation.
        if a.name.is_empty() {
            return Err(err(
                join(&tpath, "name"),
                "value length must be at least 1 characters",
            ));
        }
        let action = match rbac::rbac::Action::try_from(a.action) {
            Ok(rbac::rbac::Action::Allow) => RbacAction::Allow,
            Ok(rbac::rbac::Action::Deny) => RbacAction::Deny,
            Ok(rbac::rbac::Action::Log) => RbacAction::Log,
            Err(_) => {
                return Err(err(
                    join(&tpath, "action"),
                    format!("unknown action {}", a.action),
                ))
            }
        };
        Ok(RbacMatchAction {
            denied_details: denied_details(Some(&a.name)),
            name: a.name,
            action,
        })
    };
    let rules = super::match_tree::Rules {
        inputs: if http { HTTP_INPUTS } else { NETWORK_INPUTS },
        who: if http {
            "RBAC HTTP filter"
        } else {
            "RBAC network filter"
        },
        action: &action,
    };
    super::match_tree::match_tree(m, path, &rules)
}

fn optional_rules(
    p: Option<&rbac::Rbac>,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Arc<RbacRules>> {
    p.and_then(|r| rules(r, path).map_err(|e| errs.extend(e)).ok())
        .map(Arc::new)
}

/// `envoy.config.rbac.v3.RBAC`: policies sorted by name.
pub fn rules(p: &rbac::Rbac, path: &str) -> Result<RbacRules, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let action = match rbac::rbac::Action::try_from(p.action) {
        Ok(rbac::rbac::Action::Allow) => Some(RbacAction::Allow),
        Ok(rbac::rbac::Action::Deny) => Some(RbacAction::Deny),
        Ok(rbac::rbac::Action::Log) => Some(RbacAction::Log),
        Err(_) => {
            errs.push(join(path, "action"), format!("unknown action {}", p.action));
            None
        }
    };
    if p.audit_logging_options.is_some() {
        errs.push(
            join(path, "audit_logging_options"),
            "RBAC audit logging is not implemented",
        );
    }
    let mut names: Vec<&String> = p.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let ppath = format!("{}[{name:?}]", join(path, "policies"));
        match policy(&p.policies[name], &ppath) {
            Ok(pol) => policies.push((name.clone(), pol)),
            Err(e) => errs.extend(e),
        }
    }
    match action {
        Some(action) if errs.is_empty() => Ok(compile(action, policies)),
        _ => Err(errs),
    }
}

/// Rules from validated policies: sorted by name, with the details of
/// each denial interned.
pub fn compile(action: RbacAction, mut policies: Vec<(String, RbacPolicy)>) -> RbacRules {
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    let denied_details = policies
        .iter()
        .map(|(n, _)| denied_details(Some(n)))
        .chain(std::iter::once(denied_details(None)))
        .collect();
    RbacRules {
        action,
        policies,
        denied_details,
    }
}

fn policy(p: &rbac::Policy, path: &str) -> Result<RbacPolicy, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.condition.is_some() {
        errs.push(
            join(path, "condition"),
            "CEL conditions are not implemented",
        );
    }
    if p.checked_condition.is_some() {
        errs.push(
            join(path, "checked_condition"),
            "CEL conditions are not implemented",
        );
    }
    if p.cel_config.is_some() {
        errs.push(
            join(path, "cel_config"),
            "CEL conditions are not implemented",
        );
    }
    // As Envoy's proto validation: at least one of each.
    if p.permissions.is_empty() {
        errs.push(
            join(path, "permissions"),
            "value must contain at least 1 item(s)",
        );
    }
    if p.principals.is_empty() {
        errs.push(
            join(path, "principals"),
            "value must contain at least 1 item(s)",
        );
    }
    let mut permissions = Vec::with_capacity(p.permissions.len());
    for (i, perm) in p.permissions.iter().enumerate() {
        match permission(perm, &format!("{path}.permissions[{i}]")) {
            Ok(x) => permissions.push(x),
            Err(e) => errs.extend(e),
        }
    }
    let mut principals = Vec::with_capacity(p.principals.len());
    for (i, id) in p.principals.iter().enumerate() {
        match principal(id, &format!("{path}.principals[{i}]")) {
            Ok(x) => principals.push(x),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(RbacPolicy {
        permissions,
        principals,
    })
}

fn permission_set(rules: &[rbac::Permission], path: &str) -> Result<Vec<Permission>, ConfigErrors> {
    if rules.is_empty() {
        return Err(err(
            join(path, "rules"),
            "value must contain at least 1 item(s)",
        ));
    }
    let mut errs = ConfigErrors::default();
    let mut out = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        match permission(r, &format!("{path}.rules[{i}]")) {
            Ok(p) => out.push(p),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(out)
}

fn principal_set(ids: &[rbac::Principal], path: &str) -> Result<Vec<Principal>, ConfigErrors> {
    if ids.is_empty() {
        return Err(err(
            join(path, "ids"),
            "value must contain at least 1 item(s)",
        ));
    }
    let mut errs = ConfigErrors::default();
    let mut out = Vec::with_capacity(ids.len());
    for (i, r) in ids.iter().enumerate() {
        match principal(r, &format!("{path}.ids[{i}]")) {
            Ok(p) => out.push(p),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(out)
}

/// `envoy.config.rbac.v3.Permission`.
pub fn permission(p: &rbac::Permission, path: &str) -> Result<Permission, ConfigErrors> {
    use rbac::permission::Rule as R;
    Ok(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::Any(false)) => {
            return Err(err(join(path, "any"), "value must equal true"));
        }
        Some(R::AndRules(s)) => {
            Permission::And(permission_set(&s.rules, &join(path, "and_rules"))?)
        }
        Some(R::OrRules(s)) => Permission::Or(permission_set(&s.rules, &join(path, "or_rules"))?),
        Some(R::NotRule(n)) => Permission::Not(Box::new(permission(n, &join(path, "not_rule"))?)),
        Some(R::Header(h)) => {
            Permission::Header(super::route::header_matcher(h, &join(path, "header"))?)
        }
        Some(R::UrlPath(m)) => Permission::UrlPath(path_matcher(m, &join(path, "url_path"))?),
        Some(R::DestinationIp(c)) => {
            Permission::DestinationIp(super::hcm::cidr(c, &join(path, "destination_ip"))?)
        }
        Some(R::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(port) => Permission::DestinationPort(port),
            Err(_) => {
                return Err(err(
                    join(path, "destination_port"),
                    "value must be less than or equal to 65535",
                ))
            }
        },
        Some(R::DestinationPortRange(r)) => {
            let rpath = join(path, "destination_port_range");
            // As Envoy's `PortRangeMatcher`.
            if !(0..=65536).contains(&r.start) {
                return Err(err(
                    join(&rpath, "start"),
                    format!("range start {} is out of bounds", r.start),
                ));
            }
            if !(0..=65536).contains(&r.end) {
                return Err(err(
                    join(&rpath, "end"),
                    format!("range end {} is out of bounds", r.end),
                ));
            }
            if r.start >= r.end {
                return Err(err(
                    rpath,
                    format!(
                        "range start {} cannot be greater or equal than range end {}",
                        r.start, r.end
                    ),
                ));
            }
            Permission::DestinationPortRange(r.start as u32, r.end as u32)
        }
        Some(R::RequestedServerName(m)) => Permission::RequestedServerName(super::string_matcher(
            m,
            &join(path, "requested_server_name"),
        )?),
        Some(R::Metadata(m)) => Permission::Metadata(metadata_matcher(m, &join(path, "metadata"))?),
        Some(R::Matcher(_)) => {
            return Err(err(
                join(path, "matcher"),
                "RBAC matcher extensions are not implemented",
            ))
        }
        Some(R::UriTemplate(_)) => {
            return Err(err(
                join(path, "uri_template"),
                "uri_template is not implemented",
            ))
        }
        Some(R::SourcedMetadata(_)) => {
            return Err(err(
                join(path, "sourced_metadata"),
                "metadata matching is not implemented (weir has no dynamic metadata)",
            ))
        }
        None => return Err(err(path, "a permission needs a rule")),
    })
}

/// `envoy.config.rbac.v3.Principal`.
pub fn principal(p: &rbac::Principal, path: &str) -> Result<Principal, ConfigErrors> {
    use rbac::principal::Identifier as I;
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::Any(false)) => {
            return Err(err(join(path, "any"), "value must equal true"));
        }
        Some(I::AndIds(s)) => Principal::And(principal_set(&s.ids, &join(path, "and_ids"))?),
        Some(I::OrIds(s)) => Principal::Or(principal_set(&s.ids, &join(path, "or_ids"))?),
        Some(I::NotId(n)) => Principal::Not(Box::new(principal(n, &join(path, "not_id"))?)),
        Some(I::Authenticated(a)) => Principal::Authenticated(match &a.principal_name {
            Some(m) => Some(super::string_matcher(
                m,
                &join(&join(path, "authenticated"), "principal_name"),
            )?),
            None => None,
        }),
        Some(I::SourceIp(c)) => Principal::SourceIp(super::hcm::cidr(c, &join(path, "source_ip"))?),
        Some(I::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(super::hcm::cidr(c, &join(path, "direct_remote_ip"))?)
        }
        Some(I::RemoteIp(c)) => Principal::RemoteIp(super::hcm::cidr(c, &join(path, "remote_ip"))?),
        Some(I::Header(h)) => {
            Principal::Header(super::route::header_matcher(h, &join(path, "header"))?)
        }
        Some(I::UrlPath(m)) => Principal::UrlPath(path_matcher(m, &join(path, "url_path"))?),
        Some(I::Metadata(m)) => Principal::Metadata(metadata_matcher(m, &join(path, "metadata"))?),
        Some(I::FilterState(f)) => {
            use crate::api::envoy::r#type::matcher::v3::filter_state_matcher::Matcher as M;
            let fpath = join(path, "filter_state");
            if f.key.is_empty() {
                return Err(err(join(&fpath, "key"), "key must not be empty"));
            }
            match &f.matcher {
                Some(M::StringMatch(m)) => Principal::FilterState(
                    f.key.clone(),
                    super::string_matcher(m, &join(&fpath, "string_match"))?,
                ),
                Some(_) => {
                    return Err(err(
                        fpath,
                        "only string_match filter state matchers are implemented",
                    ))
                }
                None => return Err(err(fpath, "a matcher is required")),
            }
        }
        Some(I::SourcedMetadata(_)) => {
            return Err(err(
                join(path, "sourced_metadata"),
                "metadata matching is not implemented (weir has no dynamic metadata)",
            ))
        }
        Some(I::Custom(_)) => {
            return Err(err(
                join(path, "custom"),
                "custom principal extensions are not implemented",
            ))
        }
        None => return Err(err(path, "a principal needs an identifier")),
    })
}

/// `envoy.type.matcher.v3.MetadataMatcher` (on dynamic metadata).
pub fn metadata_matcher(
    m: &mt::MetadataMatcher,
    path: &str,
) -> Result<MetadataMatcher, ConfigErrors> {
    use mt::metadata_matcher::path_segment::Segment;
    // As Envoy's proto validation.
    if m.filter.is_empty() {
        return Err(err(
            join(path, "filter"),
            "value length must be at least 1 characters",
        ));
    }
    if m.path.is_empty() {
        return Err(err(
            join(path, "path"),
            "value must contain at least 1 item(s)",
        ));
    }
    let mut keys = Vec::with_capacity(m.path.len());
    for (i, seg) in m.path.iter().enumerate() {
        match &seg.segment {
            Some(Segment::Key(k)) if !k.is_empty() => keys.push(k.clone()),
            _ => {
                return Err(err(
                    format!("{}[{i}].key", join(path, "path")),
                    "value length must be at least 1 characters",
                ))
            }
        }
    }
    let Some(v) = &m.value else {
        return Err(err(join(path, "value"), "value is required"));
    };
    Ok(MetadataMatcher {
        filter: m.filter.clone(),
        path: keys,
        value: value_matcher(v, &join(path, "value"))?,
        invert: m.invert,
    })
}

/// `envoy.type.matcher.v3.ValueMatcher`.
fn value_matcher(v: &mt::ValueMatcher, path: &str) -> Result<ValueMatcher, ConfigErrors> {
    use mt::value_matcher::MatchPattern as M;
    Ok(match &v.match_pattern {
        Some(M::NullMatch(_)) => ValueMatcher::Null,
        Some(M::DoubleMatch(d)) => {
            use mt::double_matcher::MatchPattern as D;
            match &d.match_pattern {
                Some(D::Range(r)) => ValueMatcher::DoubleRange(r.start, r.end),
                Some(D::Exact(x)) => ValueMatcher::DoubleExact(*x),
                None => {
                    return Err(err(
                        join(path, "double_match"),
                        "a match pattern is required",
                    ))
                }
            }
        }
        Some(M::StringMatch(s)) => {
            ValueMatcher::String(super::string_matcher(s, &join(path, "string_match"))?)
        }
        Some(M::BoolMatch(b)) => ValueMatcher::Bool(*b),
        Some(M::PresentMatch(b)) => ValueMatcher::Present(*b),
        Some(M::ListMatch(l)) => {
            use mt::list_matcher::MatchPattern as L;
            let lpath = join(path, "list_match");
            match &l.match_pattern {
                Some(L::OneOf(one)) => {
                    ValueMatcher::ListOneOf(Box::new(value_matcher(one, &join(&lpath, "one_of"))?))
                }
                None => return Err(err(lpath, "a match pattern is required")),
            }
        }
        Some(M::OrMatch(o)) => {
            let opath = join(path, "or_match");
            if o.value_matchers.len() < 2 {
                return Err(err(
                    join(&opath, "value_matchers"),
                    "value must contain at least 2 item(s)",
                ));
            }
            let mut out = Vec::with_capacity(o.value_matchers.len());
            for (i, m) in o.value_matchers.iter().enumerate() {
                out.push(value_matcher(m, &format!("{opath}.value_matchers[{i}]"))?);
            }
            ValueMatcher::Or(out)
        }
        None => return Err(err(path, "a match pattern is required")),
    })
}

/// `envoy.type.matcher.v3.PathMatcher`.
fn path_matcher(m: &PathMatcher, path: &str) -> Result<StringMatcher, ConfigErrors> {
    use crate::api::envoy::r#type::matcher::v3::path_matcher::Rule;
    match &m.rule {
        Some(Rule::Path(s)) => super::string_matcher(s, &join(path, "path")),
        None => Err(err(join(path, "path"), "value is required")),
    }
}

/// `rbac_access_denied_matched_policy[<policy>]`, whitespace replaced by
/// `_` as Envoy's `responseDetail` (`none` without a policy). Interned:
/// response code details are `&'static str`, so each distinct policy name
/// is leaked once, process-wide (bounded by the names a control plane ever
/// sends, not by requests).
pub fn denied_details(policy: Option<&str>) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SET: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let sanitized: String = policy
        .unwrap_or("none")
        .chars()
        .map(|c| {
            if " \t\n\r\x0b\x0c".contains(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let s = format!("rbac_access_denied_matched_policy[{sanitized}]");
    let mut set = SET
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(v) = set.get(s.as_str()) {
        return v;
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    set.insert(leaked);
    leaked
}

#[cfg(test)]
mod tests;
