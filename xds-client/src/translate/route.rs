//! `RouteConfiguration` translation.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use crate::api::envoy::config::route::v3 as r;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::{
    err, header_mutations, header_name, regex_full, regex_unanchored, string_matcher, substitution,
    timeout,
};

pub fn route_config(p: &r::RouteConfiguration, path: &str) -> Result<RouteConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.vhds.is_some() {
        errs.push(join(path, "vhds"), "VHDS is not implemented");
    }
    let mut vhosts = Vec::new();
    for (i, vh) in p.virtual_hosts.iter().enumerate() {
        match virtual_host(vh, &format!("{path}.virtual_hosts[{i}]")) {
            Ok(v) => vhosts.push(Arc::new(v)),
            Err(e) => errs.extend(e),
        }
    }
    let headers = header_mutations(
        &p.request_headers_to_add,
        &p.request_headers_to_remove,
        &p.response_headers_to_add,
        &p.response_headers_to_remove,
        &format!("{path}."),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        HeaderMutations::default()
    });
    let mut internal_only = Vec::new();
    for (i, h) in p.internal_only_headers.iter().enumerate() {
        match header_name(
            &h.to_ascii_lowercase(),
            &format!("{path}.internal_only_headers[{i}]"),
        ) {
            Ok(h) => internal_only.push(h),
            Err(e) => errs.extend(e),
        }
    }
    let per_filter = super::per_filter::per_filter_configs(
        &p.typed_per_filter_config,
        &join(path, "typed_per_filter_config"),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        PerFilterConfigs::default()
    });
    if !errs.is_empty() {
        return Err(errs);
    }
    RouteConfig::new(
        p.name.as_str().into(),
        vhosts,
        headers,
        internal_only,
        p.most_specific_header_mutations_wins,
        p.ignore_port_in_host_matching,
    )
    .map(|mut rc| {
        rc.per_filter = per_filter;
        rc
    })
    .map_err(|d| {
        err(
            join(path, "virtual_hosts"),
            format!("domain {:?} is listed in more than one virtual host", d.0),
        )
    })
}

fn virtual_host(p: &r::VirtualHost, path: &str) -> Result<VirtualHost, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.domains.is_empty() {
        errs.push(
            join(path, "domains"),
            "a virtual host needs at least one domain",
        );
    }
    for (i, d) in p.domains.iter().enumerate() {
        let stars = d.matches('*').count();
        if stars > 1 || (stars == 1 && d != "*" && !d.starts_with('*') && !d.ends_with('*')) {
            errs.push(
                format!("{path}.domains[{i}]"),
                format!("invalid wildcard domain {d:?}"),
            );
        }
    }
    let mut routes = Vec::new();
    for (i, rt) in p.routes.iter().enumerate() {
        match route(rt, &format!("{path}.routes[{i}]")) {
            Ok(rt) => routes.push(rt),
            Err(e) => errs.extend(e),
        }
    }
    let headers = header_mutations(
        &p.request_headers_to_add,
        &p.request_headers_to_remove,
        &p.response_headers_to_add,
        &p.response_headers_to_remove,
        &format!("{path}."),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        HeaderMutations::default()
    });
    let retry_policy = match &p.retry_policy {
        Some(rp) => match retry_policy(rp, &join(path, "retry_policy")) {
            Ok(rp) => Some(Arc::new(rp)),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    let per_filter = super::per_filter::per_filter_configs(
        &p.typed_per_filter_config,
        &join(path, "typed_per_filter_config"),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        PerFilterConfigs::default()
    });
    // The deprecated `cors`, kept with the per-filter configs
    // (`LEGACY_CORS_KEY`).
    let mut per_filter = per_filter;
    #[allow(deprecated)]
    let legacy = p.cors.as_ref();
    if let Some(c) = legacy {
        if let Err(e) = super::cors::add_legacy(&mut per_filter, c, &join(path, "cors")) {
            errs.extend(e);
        }
    }
    let rate_limits = super::ratelimit::rate_limits(&p.rate_limits, &join(path, "rate_limits"))
        .unwrap_or_else(|e| {
            errs.extend(e);
            Default::default()
        });
    let require_tls = match p.require_tls {
        0 => TlsRequirement::None,
        1 => TlsRequirement::ExternalOnly,
        _ => TlsRequirement::All,
    };
    let hedge = p
        .hedge_policy
        .as_ref()
        .and_then(|h| hedge_policy(h, &join(path, "hedge_policy"), &mut errs));
    errs.into_result(VirtualHost {
        name: p.name.as_str().into(),
        domains: p.domains.clone(),
        routes,
        require_tls,
        headers,
        retry_policy,
        include_request_attempt_count: p.include_request_attempt_count,
        include_attempt_count_in_response: p.include_attempt_count_in_response,
        per_filter,
        rate_limits,
        hedge_on_per_try_timeout: hedge,
    })
}

/// `hedge_policy`: Envoy 1.40's router acts on `hedge_on_per_try_timeout`
/// only; `initial_requests` and `additional_request_chance` are
/// `[#not-implemented-hide:]` in Envoy and rejected here.
fn hedge_policy(h: &r::HedgePolicy, path: &str, errs: &mut ConfigErrors) -> Option<bool> {
    if h.initial_requests.is_some() {
        errs.push(
            join(path, "initial_requests"),
            "not implemented (Envoy 1.40's router ignores it: not-implemented-hide)",
        );
    }
    if h.additional_request_chance.is_some() {
        errs.push(
            join(path, "additional_request_chance"),
            "not implemented (Envoy 1.40's router ignores it: not-implemented-hide)",
        );
    }
    Some(h.hedge_on_per_try_timeout)
}

/// `internal_redirect_policy`, or the deprecated `internal_redirect_action:
/// HANDLE_INTERNAL_REDIRECT` with `max_internal_redirects` (as Envoy's
/// `buildInternalRedirectPolicy`).
#[allow(deprecated)]
fn internal_redirect(
    p: &r::RouteAction,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Arc<InternalRedirectPolicy>> {
    use crate::api::envoy::extensions::internal_redirect as ir;
    let legacy;
    let (cfg, cpath) = match &p.internal_redirect_policy {
        Some(c) => (c, join(path, "internal_redirect_policy")),
        None if p.internal_redirect_action == 1 => {
            legacy = r::InternalRedirectPolicy {
                max_internal_redirects: p.max_internal_redirects,
                ..Default::default()
            };
            (&legacy, path.to_owned())
        }
        None => return None,
    };
    let mut codes = Vec::new();
    for c in &cfg.redirect_response_codes {
        // As Envoy: other codes are ignored.
        if matches!(c, 301 | 302 | 303 | 307 | 308) {
            codes.push(*c as u16);
        }
    }
    if cfg.redirect_response_codes.is_empty() {
        codes.push(302);
    }
    let mut headers_to_copy = Vec::new();
    for (i, h) in cfg.response_headers_to_copy.iter().enumerate() {
        let hp = format!("{}[{i}]", join(&cpath, "response_headers_to_copy"));
        let lower = h.to_ascii_lowercase();
        // Envoy refuses pseudo-headers and `host`.
        if lower.starts_with(':') || lower == "host" {
            errs.push(hp, format!("header {h:?} cannot be copied"));
            continue;
        }
        match header_name(&lower, &hp) {
            Ok(n) => headers_to_copy.push(n),
            Err(e) => errs.extend(e),
        }
    }
    let mut predicates = Vec::new();
    for (i, pr) in cfg.predicates.iter().enumerate() {
        let pp = format!("{}[{i}]", join(&cpath, "predicates"));
        let Some(any) = &pr.typed_config else {
            errs.push(join(&pp, "typed_config"), "typed_config is required");
            continue;
        };
        let url = any.type_url.rsplit('/').next().unwrap_or_default();
        let tp = join(&pp, "typed_config");
        match url {
            "envoy.extensions.internal_redirect.previous_routes.v3.PreviousRoutesConfig" => {
                predicates.push(RedirectPredicate::PreviousRoutes(i))
            }
            "envoy.extensions.internal_redirect.safe_cross_scheme.v3.SafeCrossSchemeConfig" => {
                predicates.push(RedirectPredicate::SafeCrossScheme)
            }
            "envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig" => {
                match super::decode::<ir::allow_listed_routes::v3::AllowListedRoutesConfig>(
                    any, &tp,
                ) {
                    Ok(c) if c.allowed_route_names.is_empty() => errs.push(
                        join(&tp, "allowed_route_names"),
                        "at least one route name is required",
                    ),
                    Ok(c) => predicates.push(RedirectPredicate::AllowListed(c.allowed_route_names)),
                    Err(e) => errs.extend(e),
                }
            }
            other => errs.push(
                tp,
                format!("internal redirect predicate {other:?} is not implemented"),
            ),
        }
    }
    Some(Arc::new(InternalRedirectPolicy {
        max_redirects: cfg.max_internal_redirects.map_or(1, |v| v.value),
        codes,
        allow_cross_scheme: cfg.allow_cross_scheme_redirect,
        headers_to_copy,
        predicates,
    }))
}

fn route(p: &r::Route, path: &str) -> Result<Route, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let matcher = match &p.r#match {
        Some(m) => route_match(m, &join(path, "match"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None => {
            errs.push(join(path, "match"), "match is required");
            None
        }
    };
    let action = match &p.action {
        Some(r::route::Action::Route(a)) => route_action(a, &join(path, "route"))
            .map(|a| RouteKind::Forward(Arc::new(a)))
            .map_err(|e| errs.extend(e))
            .ok(),
        Some(r::route::Action::Redirect(a)) => redirect(a, &join(path, "redirect"))
            .map(|a| RouteKind::Redirect(Arc::new(a)))
            .map_err(|e| errs.extend(e))
            .ok(),
        Some(r::route::Action::DirectResponse(d)) => {
            direct_response(d, &join(path, "direct_response"))
                .map(|a| RouteKind::Direct(Arc::new(a)))
                .map_err(|e| errs.extend(e))
                .ok()
        }
        Some(_) => {
            errs.push(
                path,
                "filter_action and non_forwarding_action are not implemented",
            );
            None
        }
        None => {
            errs.push(path, "a route needs route, redirect or direct_response");
            None
        }
    };
    let headers = header_mutations(
        &p.request_headers_to_add,
        &p.request_headers_to_remove,
        &p.response_headers_to_add,
        &p.response_headers_to_remove,
        &format!("{path}."),
    )
    .map_err(|e| errs.extend(e))
    .ok();
    let per_filter = super::per_filter::per_filter_configs(
        &p.typed_per_filter_config,
        &join(path, "typed_per_filter_config"),
    )
    .map_err(|e| errs.extend(e))
    .ok();
    let mut per_filter = per_filter;
    // The deprecated `cors` of the route action, kept with the route's
    // per-filter configs (`LEGACY_CORS_KEY`).
    #[allow(deprecated)]
    let legacy = match &p.action {
        Some(r::route::Action::Route(a)) => a.cors.as_ref(),
        _ => None,
    };
    if let (Some(c), Some(pf)) = (legacy, per_filter.as_mut()) {
        if let Err(e) = super::cors::add_legacy(pf, c, &join(path, "route.cors")) {
            errs.extend(e);
        }
    }
    let decorator = match &p.decorator {
        Some(d) if d.operation.is_empty() => {
            errs.push(
                join(path, "decorator.operation"),
                "an operation is required",
            );
            None
        }
        Some(d) => Some(Decorator {
            operation: d.operation.as_str().into(),
            propagate: d.propagate.is_none_or(|v| v.value),
        }),
        None => None,
    };
    let tracing = p.tracing.as_ref().map(|t| {
        let frac = |f: &Option<crate::api::envoy::r#type::v3::FractionalPercent>| {
            f.as_ref().map_or((100, 100), |f| {
                let den = match f.denominator {
                    1 => 10_000,
                    2 => 1_000_000,
                    _ => 100,
                };
                (f.numerator.min(den), den)
            })
        };
        let mut custom_tags = Vec::new();
        for (i, c) in t.custom_tags.iter().enumerate() {
            match super::hcm::custom_tag(c, &format!("{path}.tracing.custom_tags[{i}]")) {
                Ok(c) => custom_tags.push(c),
                Err(e) => errs.extend(e),
            }
        }
        RouteTracing {
            client_sampling: frac(&t.client_sampling),
            random_sampling: frac(&t.random_sampling),
            overall_sampling: frac(&t.overall_sampling),
            custom_tags,
        }
    });
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Route {
        tracing,
        decorator,
        name: p.name.as_str().into(),
        matcher: matcher.expect("checked"),
        action: action.expect("checked"),
        headers: headers.expect("checked"),
        per_filter: per_filter.expect("checked"),
    })
}

pub(crate) fn route_match(p: &r::RouteMatch, path: &str) -> Result<RouteMatch, ConfigErrors> {
    use r::route_match::PathSpecifier as P;
    let mut errs = ConfigErrors::default();
    let pm = match &p.path_specifier {
        Some(P::Prefix(s)) => PathMatch::Prefix(s.clone()),
        Some(P::Path(s)) => PathMatch::Path(s.clone()),
        Some(P::SafeRegex(re)) => match regex_full(re, &join(path, "safe_regex")) {
            Ok(re) => PathMatch::Regex(re),
            Err(e) => return Err(e),
        },
        Some(P::PathSeparatedPrefix(s)) => {
            if s.contains('?') || s.contains('#') || (s.ends_with('/') && s != "/") {
                return Err(err(
                    join(path, "path_separated_prefix"),
                    "must not contain ? or # or end in /",
                ));
            }
            PathMatch::SeparatedPrefix(s.clone())
        }
        Some(P::ConnectMatcher(_)) => PathMatch::Connect,
        Some(_) => return Err(err(path, "path_match_policy is not implemented")),
        None => {
            return Err(err(
                path,
                "a path specifier (prefix, path, safe_regex, ...) is required",
            ))
        }
    };
    let mut headers = Vec::new();
    for (i, h) in p.headers.iter().enumerate() {
        match header_matcher(h, &format!("{path}.headers[{i}]")) {
            Ok(h) => headers.push(h),
            Err(e) => errs.extend(e),
        }
    }
    let mut query = Vec::new();
    for (i, q) in p.query_parameters.iter().enumerate() {
        use r::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let qp = format!("{path}.query_parameters[{i}]");
        let m = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => match string_matcher(s, &join(&qp, "string_match")) {
                Ok(s) => Some(s),
                Err(e) => {
                    errs.extend(e);
                    continue;
                }
            },
            Some(Q::PresentMatch(true)) => None,
            _ => {
                errs.push(
                    &qp,
                    "query parameter matcher needs string_match or present_match: true",
                );
                continue;
            }
        };
        query.push(QueryMatcher {
            name: q.name.clone(),
            matcher: m,
        });
    }
    let runtime_fraction_ppm = p
        .runtime_fraction
        .as_ref()
        .and_then(|f| f.default_value.as_ref())
        .map(super::fraction_ppm);
    errs.into_result(RouteMatch {
        path: pm,
        case_sensitive: p.case_sensitive.as_ref().map(|b| b.value).unwrap_or(true),
        headers,
        query,
        grpc: p.grpc.is_some(),
        runtime_fraction_ppm,
        tls_presented: p
            .tls_context
            .as_ref()
            .and_then(|t| t.presented.as_ref())
            .map(|b| b.value),
        tls_validated: p
            .tls_context
            .as_ref()
            .and_then(|t| t.validated.as_ref())
            .map(|b| b.value),
    })
}

pub fn header_matcher(h: &r::HeaderMatcher, path: &str) -> Result<HeaderMatcher, ConfigErrors> {
    use r::header_matcher::HeaderMatchSpecifier as H;
    let name = HeaderKey::parse(&h.name).ok_or_else(|| {
        err(
            join(path, "name"),
            format!("invalid header name {:?}", h.name),
        )
    })?;
    let s = |kind: StringMatch| {
        HeaderMatch::String(StringMatcher {
            kind,
            ignore_case: false,
        })
    };
    let kind = match &h.header_match_specifier {
        Some(H::ExactMatch(v)) => s(StringMatch::Exact(v.clone())),
        Some(H::PrefixMatch(v)) => s(StringMatch::Prefix(v.clone())),
        Some(H::SuffixMatch(v)) => s(StringMatch::Suffix(v.clone())),
        Some(H::ContainsMatch(v)) => s(StringMatch::Contains(v.clone())),
        Some(H::SafeRegexMatch(re)) => s(StringMatch::Regex(regex_full(
            re,
            &join(path, "safe_regex_match"),
        )?)),
        Some(H::RangeMatch(rg)) => HeaderMatch::Range(rg.start, rg.end),
        Some(H::PresentMatch(p)) => HeaderMatch::Present(*p),
        Some(H::StringMatch(sm)) => {
            HeaderMatch::String(string_matcher(sm, &join(path, "string_match"))?)
        }
        // No specifier: the header must be present (Envoy's default).
        None => HeaderMatch::Present(true),
    };
    Ok(HeaderMatcher {
        name,
        kind,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn route_action(p: &r::RouteAction, path: &str) -> Result<RouteAction, ConfigErrors> {
    use r::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let mut errs = ConfigErrors::default();
    let cluster = match &p.cluster_specifier {
        Some(C::Cluster(c)) if !c.is_empty() => Some(ClusterSpecifier::Name(c.as_str().into())),
        Some(C::ClusterHeader(h)) => {
            header_name(&h.to_ascii_lowercase(), &join(path, "cluster_header"))
                .map(ClusterSpecifier::Header)
                .map_err(|e| errs.extend(e))
                .ok()
        }
        Some(C::WeightedClusters(w)) => weighted(w, &join(path, "weighted_clusters"))
            .map(ClusterSpecifier::Weighted)
            .map_err(|e| errs.extend(e))
            .ok(),
        _ => {
            errs.push(
                path,
                "a route action needs cluster, cluster_header or weighted_clusters",
            );
            None
        }
    };
    let cluster_not_found_status = match p.cluster_not_found_response_code {
        0 => 503,
        1 => 404,
        _ => 500,
    };
    let regex_rewrite = match &p.regex_rewrite {
        Some(rr) => match rr.pattern.as_ref() {
            Some(pat) => regex_unanchored(pat, &join(path, "regex_rewrite.pattern"))
                .map(|re| Some((re, substitution(&rr.substitution))))
                .unwrap_or_else(|e| {
                    errs.extend(e);
                    None
                }),
            None => {
                errs.push(join(path, "regex_rewrite.pattern"), "pattern is required");
                None
            }
        },
        None => None,
    };
    if !p.prefix_rewrite.is_empty() && regex_rewrite.is_some() {
        errs.push(
            path,
            "prefix_rewrite and regex_rewrite are mutually exclusive",
        );
    }
    let host_rewrite = match &p.host_rewrite_specifier {
        None => HostRewrite::None,
        Some(H::HostRewriteLiteral(s)) => HostRewrite::Literal(s.clone()),
        Some(H::AutoHostRewrite(b)) if b.value => HostRewrite::Auto,
        Some(H::AutoHostRewrite(_)) => HostRewrite::None,
        Some(H::HostRewriteHeader(h)) => {
            match header_name(&h.to_ascii_lowercase(), &join(path, "host_rewrite_header")) {
                Ok(h) => HostRewrite::Header(h),
                Err(e) => {
                    errs.extend(e);
                    HostRewrite::None
                }
            }
        }
        Some(H::HostRewritePathRegex(rr)) => match rr.pattern.as_ref() {
            Some(pat) => {
                match regex_unanchored(pat, &join(path, "host_rewrite_path_regex.pattern")) {
                    Ok(re) => HostRewrite::PathRegex(re, substitution(&rr.substitution)),
                    Err(e) => {
                        errs.extend(e);
                        HostRewrite::None
                    }
                }
            }
            None => {
                errs.push(
                    join(path, "host_rewrite_path_regex.pattern"),
                    "pattern is required",
                );
                HostRewrite::None
            }
        },
        Some(_) => {
            errs.push(path, "this host rewrite is not implemented");
            HostRewrite::None
        }
    };
    fn t(errs: &mut ConfigErrors, r: Result<Option<Duration>, ConfigErrors>) -> Option<Duration> {
        r.map_err(|e| errs.extend(e)).ok().flatten()
    }
    let timeout_v = t(
        &mut errs,
        timeout(
            p.timeout.as_ref(),
            Some(Duration::from_secs(15)),
            &join(path, "timeout"),
        ),
    );
    let idle_timeout = t(
        &mut errs,
        timeout(p.idle_timeout.as_ref(), None, &join(path, "idle_timeout")),
    );
    let (max_stream_duration, grpc_timeout_header_max) = match &p.max_stream_duration {
        Some(m) => {
            if m.grpc_timeout_header_offset.is_some() {
                errs.push(
                    join(path, "max_stream_duration.grpc_timeout_header_offset"),
                    "not implemented",
                );
            }
            let msd = t(
                &mut errs,
                timeout(
                    m.max_stream_duration.as_ref(),
                    None,
                    &join(path, "max_stream_duration.max_stream_duration"),
                ),
            );
            let ghm = m
                .grpc_timeout_header_max
                .as_ref()
                .and_then(|d| super::duration(d, "").ok())
                .map(|d| if d.is_zero() { Duration::MAX } else { d });
            (msd, ghm)
        }
        None => (None, None),
    };
    let retry = match &p.retry_policy {
        Some(rp) => retry_policy(rp, &join(path, "retry_policy"))
            .map(|r| Some(Arc::new(r)))
            .unwrap_or_else(|e| {
                errs.extend(e);
                None
            }),
        None => None,
    };
    let mut upgrades: Vec<(String, bool)> = Vec::with_capacity(p.upgrade_configs.len());
    let mut connect_terminate = false;
    for (i, u) in p.upgrade_configs.iter().enumerate() {
        let upath = format!("{}.upgrade_configs[{i}]", path);
        let t = u.upgrade_type.to_ascii_lowercase();
        // As Envoy's route entry: one entry per upgrade type, and a
        // `connect_config` only on the CONNECT upgrade.
        if upgrades.iter().any(|(n, _)| *n == t) {
            errs.push(
                join(&upath, "upgrade_type"),
                format!("duplicate upgrade {}", u.upgrade_type),
            );
        }
        if u.connect_config.is_some() {
            if t == "connect" {
                connect_terminate = true;
            } else {
                errs.push(
                    join(&upath, "connect_config"),
                    format!(
                        "non-CONNECT upgrade type {} has ConnectConfig",
                        u.upgrade_type
                    ),
                );
            }
        }
        upgrades.push((t, u.enabled.as_ref().map(|b| b.value).unwrap_or(true)));
    }
    let rate_limits = super::ratelimit::rate_limits(&p.rate_limits, &join(path, "rate_limits"))
        .unwrap_or_else(|e| {
            errs.extend(e);
            Default::default()
        });
    let hash_policy = hash_policies(&p.hash_policy, path).unwrap_or_else(|e| {
        errs.extend(e);
        Vec::new()
    });
    let hedge = p
        .hedge_policy
        .as_ref()
        .and_then(|h| hedge_policy(h, &join(path, "hedge_policy"), &mut errs));
    let internal_redirect = internal_redirect(p, path, &mut errs);
    let priority = match p.priority {
        0 => RoutingPriority::Default,
        1 => RoutingPriority::High,
        _ => {
            errs.push(join(path, "priority"), "unknown routing priority");
            RoutingPriority::Default
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let mirrors = mirror_policies(&p.request_mirror_policies, path)?;
    Ok(RouteAction {
        cluster: cluster.expect("checked"),
        cluster_not_found_status,
        prefix_rewrite: (!p.prefix_rewrite.is_empty()).then(|| p.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        append_x_forwarded_host: p.append_x_forwarded_host,
        timeout: timeout_v,
        idle_timeout,
        retry_policy: retry,
        max_stream_duration,
        grpc_timeout_header_max,
        max_grpc_timeout: match &p.max_grpc_timeout {
            Some(d) => match super::duration(d, &join(path, "max_grpc_timeout")) {
                Ok(d) => Some(d),
                Err(e) => {
                    errs.extend(e);
                    None
                }
            },
            None => None,
        },
        upgrades,
        connect_terminate,
        rate_limits,
        include_vh_rate_limits: p.include_vh_rate_limits.is_some_and(|b| b.value),
        mirrors,
        hash_policy: hash_policy.into(),
        hedge_on_per_try_timeout: hedge,
        internal_redirect,
        priority,
    })
}

/// `request_mirror_policies`.
fn mirror_policies(
    list: &[r::route_action::RequestMirrorPolicy],
    path: &str,
) -> Result<Vec<MirrorPolicy>, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let mpath = format!("{}[{i}]", join(path, "request_mirror_policies"));
        let cluster = match (m.cluster.is_empty(), m.cluster_header.is_empty()) {
            (false, true) => MirrorCluster::Name(m.cluster.as_str().into()),
            (true, false) => match header_name(
                &m.cluster_header.to_ascii_lowercase(),
                &join(&mpath, "cluster_header"),
            ) {
                Ok(h) => MirrorCluster::Header(h),
                Err(e) => {
                    errs.extend(e);
                    continue;
                }
            },
            _ => {
                errs.push(
                    &mpath,
                    "exactly one of cluster and cluster_header is required",
                );
                continue;
            }
        };
        let fraction = m.runtime_fraction.as_ref().map(|r| match &r.default_value {
            None => Fraction::default(),
            Some(p) => Fraction {
                numerator: p.numerator,
                denominator: match p.denominator {
                    0 => 100,
                    1 => 10_000,
                    _ => 1_000_000,
                },
            },
        });
        let mut headers = Vec::new();
        for (j, op) in m.request_headers_mutations.iter().enumerate() {
            let opath = format!("{}[{j}]", join(&mpath, "request_headers_mutations"));
            match super::header_mutation::header_op(op, &opath, true) {
                Ok(o) => headers.push(o),
                Err(e) => errs.extend(e),
            }
        }
        let host_rewrite =
            (!m.host_rewrite_literal.is_empty()).then(|| m.host_rewrite_literal.clone());
        out.push(MirrorPolicy {
            cluster,
            fraction,
            host_suffix: !m.disable_shadow_host_suffix_append && host_rewrite.is_none(),
            host_rewrite,
            headers,
        });
    }
    errs.into_result(out)
}

fn weighted(w: &r::WeightedCluster, path: &str) -> Result<WeightedClusters, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut clusters = Vec::new();
    for (i, c) in w.clusters.iter().enumerate() {
        let cp = format!("{path}.clusters[{i}]");
        if c.name.is_empty() {
            errs.push(
                join(&cp, "name"),
                "cluster_header in weighted clusters is not implemented; name is required",
            );
            continue;
        }
        let headers = header_mutations(
            &c.request_headers_to_add,
            &c.request_headers_to_remove,
            &c.response_headers_to_add,
            &c.response_headers_to_remove,
            &format!("{cp}."),
        )
        .unwrap_or_else(|e| {
            errs.extend(e);
            HeaderMutations::default()
        });
        let host_rewrite = c.host_rewrite_specifier.as_ref().map(|h| match h {
            r::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(s) => {
                s.clone()
            }
        });
        clusters.push(WeightedCluster {
            name: c.name.as_str().into(),
            weight: c.weight.as_ref().map(|v| v.value).unwrap_or(0),
            headers,
            host_rewrite,
        });
    }
    if clusters.is_empty() && errs.is_empty() {
        errs.push(join(path, "clusters"), "at least one cluster is required");
    }
    let sum: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    let total = match &w.total_weight {
        Some(t) => {
            if u64::from(t.value) != sum {
                errs.push(
                    join(path, "total_weight"),
                    format!(
                        "total_weight {} does not equal the sum of weights {sum}",
                        t.value
                    ),
                );
            }
            u64::from(t.value)
        }
        None => sum,
    };
    if total == 0 && errs.is_empty() {
        errs.push(
            join(path, "clusters"),
            "the sum of weights must be greater than 0",
        );
    }
    errs.into_result(WeightedClusters { clusters, total })
}

pub fn retry_policy(p: &r::RetryPolicy, path: &str) -> Result<RetryPolicy, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let retry_on = RetryOn::parse(&p.retry_on).unwrap_or_else(|bad| {
        errs.push(
            join(path, "retry_on"),
            format!("unknown retry condition {bad:?}"),
        );
        RetryOn::default()
    });
    let mut previous_hosts = false;
    let mut omit_canary = false;
    let mut omit_host_metadata = None;
    for (i, pr) in p.retry_host_predicate.iter().enumerate() {
        let url = match &pr.config_type {
            Some(r::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a)) => {
                a.type_url.as_str()
            }
            None => "",
        };
        if pr.name == "envoy.retry_host_predicates.previous_hosts"
            || url.ends_with("PreviousHostsPredicate")
        {
            previous_hosts = true;
        } else if url.ends_with("OmitCanaryHostsPredicate")
            || (url.is_empty() && pr.name == "envoy.retry_host_predicates.omit_canary_hosts")
        {
            omit_canary = true;
        } else if url.ends_with("OmitHostMetadataConfig") {
            use crate::api::envoy::extensions::retry::host::omit_host_metadata::v3::OmitHostMetadataConfig;
            let tp = format!("{path}.retry_host_predicate[{i}].typed_config");
            let any = match &pr.config_type {
                Some(r::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a)) => a,
                None => continue,
            };
            match super::decode::<OmitHostMetadataConfig>(any, &tp) {
                Ok(c) => {
                    let labels = c
                        .metadata_match
                        .as_ref()
                        .and_then(|m| m.filter_metadata.get("envoy.lb"))
                        .map(super::struct_to_json)
                        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
                    omit_host_metadata = Some(Arc::new(labels));
                }
                Err(e) => errs.extend(e),
            }
        } else {
            errs.push(
                format!("{path}.retry_host_predicate[{i}]"),
                format!("retry host predicate {:?} is not implemented", pr.name),
            );
        }
    }
    let per_try_timeout = timeout(
        p.per_try_timeout.as_ref(),
        None,
        &join(path, "per_try_timeout"),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        None
    });
    let per_try_idle_timeout = timeout(
        p.per_try_idle_timeout.as_ref(),
        None,
        &join(path, "per_try_idle_timeout"),
    )
    .unwrap_or_else(|e| {
        errs.extend(e);
        None
    });
    let (mut base, mut max) = (Duration::from_millis(25), None);
    if let Some(b) = &p.retry_back_off {
        if let Some(d) = &b.base_interval {
            match super::duration(d, &join(path, "retry_back_off.base_interval")) {
                Ok(d) if d >= Duration::from_millis(1) => base = d,
                Ok(_) => errs.push(
                    join(path, "retry_back_off.base_interval"),
                    "must be at least 1ms",
                ),
                Err(e) => errs.extend(e),
            }
        } else {
            errs.push(
                join(path, "retry_back_off.base_interval"),
                "base_interval is required",
            );
        }
        if let Some(d) = &b.max_interval {
            match super::duration(d, &join(path, "retry_back_off.max_interval")) {
                Ok(d) if d >= base => max = Some(d),
                Ok(_) => errs.push(
                    join(path, "retry_back_off.max_interval"),
                    "must not be less than base_interval",
                ),
                Err(e) => errs.extend(e),
            }
        }
    }
    let mut codes = Vec::new();
    for c in &p.retriable_status_codes {
        match u16::try_from(*c) {
            Ok(c) if (100..600).contains(&c) => codes.push(c),
            _ => errs.push(
                join(path, "retriable_status_codes"),
                format!("{c} is not an HTTP status"),
            ),
        }
    }
    let matchers = |list: &[r::HeaderMatcher], field: &str, errs: &mut ConfigErrors| {
        let mut out = Vec::new();
        for (i, h) in list.iter().enumerate() {
            match header_matcher(h, &format!("{}[{i}]", join(path, field))) {
                Ok(m) => out.push(m),
                Err(e) => errs.extend(e),
            }
        }
        out
    };
    let retriable_headers = matchers(&p.retriable_headers, "retriable_headers", &mut errs);
    let retriable_request_headers = matchers(
        &p.retriable_request_headers,
        "retriable_request_headers",
        &mut errs,
    );
    let rate_limited_back_off = match &p.rate_limited_retry_back_off {
        None => None,
        Some(b) => {
            let bpath = join(path, "rate_limited_retry_back_off");
            let mut reset_headers = Vec::new();
            for (i, h) in b.reset_headers.iter().enumerate() {
                let hpath = format!("{}[{i}].name", join(&bpath, "reset_headers"));
                match header_name(&h.name.to_ascii_lowercase(), &hpath) {
                    Ok(n) => reset_headers.push((n, h.format == 1)),
                    Err(e) => errs.extend(e),
                }
            }
            if reset_headers.is_empty() {
                errs.push(
                    join(&bpath, "reset_headers"),
                    "at least one reset header is required",
                );
            }
            let max_interval = match &b.max_interval {
                Some(d) => match super::duration(d, &join(&bpath, "max_interval")) {
                    Ok(d) if d >= Duration::from_millis(1) => d,
                    Ok(_) => {
                        errs.push(join(&bpath, "max_interval"), "must be at least 1ms");
                        Duration::from_secs(300)
                    }
                    Err(e) => {
                        errs.extend(e);
                        Duration::from_secs(300)
                    }
                },
                None => Duration::from_secs(300),
            };
            Some(RateLimitedBackOff {
                reset_headers,
                max_interval,
            })
        }
    };
    errs.into_result(RetryPolicy {
        // Shared, not copied: the router clones the policy per request.
        retriable_headers: retriable_headers.into(),
        retriable_request_headers: retriable_request_headers.into(),
        rate_limited_back_off: rate_limited_back_off.map(Arc::new),
        omit_canary,
        omit_host_metadata,
        retry_on,
        num_retries: p.num_retries.as_ref().map(|v| v.value).unwrap_or(1),
        per_try_timeout,
        per_try_idle_timeout,
        retriable_status_codes: codes,
        base_interval: base,
        max_interval: max.unwrap_or(base * 10),
        previous_hosts,
        host_selection_retry_max_attempts: p.host_selection_retry_max_attempts.clamp(0, 100) as u32,
    })
}

fn redirect(p: &r::RedirectAction, path: &str) -> Result<Redirect, ConfigErrors> {
    use r::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let scheme = match &p.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_owned()),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let path_r = match &p.path_rewrite_specifier {
        None => RedirectPath::Keep,
        Some(P::PathRedirect(s)) => RedirectPath::Path(s.clone()),
        Some(P::PrefixRewrite(s)) => RedirectPath::Prefix(s.clone()),
        Some(P::RegexRewrite(rr)) => {
            let pat = rr
                .pattern
                .as_ref()
                .ok_or_else(|| err(join(path, "regex_rewrite.pattern"), "pattern is required"))?;
            RedirectPath::Regex(
                regex_unanchored(pat, &join(path, "regex_rewrite.pattern"))?,
                substitution(&rr.substitution),
            )
        }
        Some(_) => return Err(err(path, "path_rewrite extensions are not implemented")),
    };
    let status = match p.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        other => {
            return Err(err(
                join(path, "response_code"),
                format!("unknown response code {other}"),
            ))
        }
    };
    let port = match p.port_redirect {
        0 => None,
        p2 if p2 <= 65535 => Some(p2 as u16),
        _ => return Err(err(join(path, "port_redirect"), "port out of range")),
    };
    Ok(Redirect {
        scheme,
        host: (!p.host_redirect.is_empty()).then(|| p.host_redirect.clone()),
        port,
        path: path_r,
        status,
        strip_query: p.strip_query,
    })
}

fn direct_response(
    p: &r::DirectResponseAction,
    path: &str,
) -> Result<DirectResponse, ConfigErrors> {
    if !(200..600).contains(&p.status) {
        return Err(err(
            join(path, "status"),
            format!("status {} must be in [200, 600)", p.status),
        ));
    }
    let body = match &p.body {
        Some(d) => {
            let b = super::data_source(d, &join(path, "body"))?;
            if b.len() > 4096
                && matches!(
                    d.specifier,
                    Some(crate::api::envoy::config::core::v3::data_source::Specifier::Filename(_))
                )
            {
                return Err(err(
                    join(path, "body"),
                    "a direct response body from a file is limited to 4096 bytes (as Envoy)",
                ));
            }
            Some(Bytes::from(b))
        }
        None => None,
    };
    Ok(DirectResponse {
        status: p.status as u16,
        body,
    })
}

/// `RouteAction.hash_policy`, in order (Envoy's `HashPolicyImpl`); also a
/// consistent-hash policy's own `hash_policy`.
pub(super) fn hash_policies(
    ps: &[r::route_action::HashPolicy],
    path: &str,
) -> Result<Vec<HashPolicy>, ConfigErrors> {
    use r::route_action::hash_policy::PolicySpecifier as P;
    let mut errs = ConfigErrors::default();
    let mut out = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        let ppath = format!("{path}.hash_policy[{i}]");
        let kind = match &p.policy_specifier {
            Some(P::Header(h)) => {
                let hpath = join(&ppath, "header.header_name");
                // `:authority` is Envoy's name for the host header.
                let lower = match h.header_name.to_ascii_lowercase() {
                    a if a == ":authority" => "host".to_owned(),
                    l => l,
                };
                if lower.starts_with(':') {
                    errs.push(
                        hpath,
                        "hashing on a pseudo-header other than :authority is not implemented",
                    );
                    continue;
                }
                let name = match header_name(&lower, &hpath) {
                    Ok(n) => n,
                    Err(e) => {
                        errs.extend(e);
                        continue;
                    }
                };
                let rewrite = match &h.regex_rewrite {
                    Some(rr) => match rr.pattern.as_ref() {
                        Some(pat) => match regex_unanchored(
                            pat,
                            &join(&ppath, "header.regex_rewrite.pattern"),
                        ) {
                            Ok(re) => Some((re, substitution(&rr.substitution))),
                            Err(e) => {
                                errs.extend(e);
                                continue;
                            }
                        },
                        None => {
                            errs.push(
                                join(&ppath, "header.regex_rewrite.pattern"),
                                "pattern is required",
                            );
                            continue;
                        }
                    },
                    None => None,
                };
                HashPolicyKind::Header { name, rewrite }
            }
            Some(P::Cookie(c)) => {
                if c.name.is_empty() {
                    errs.push(join(&ppath, "cookie.name"), "a cookie name is required");
                    continue;
                }
                // As Envoy: the ttl's whole seconds (`Max-Age`).
                let ttl = c
                    .ttl
                    .as_ref()
                    .map(|d| Duration::from_secs(d.seconds.max(0) as u64));
                HashPolicyKind::Cookie {
                    name: c.name.clone(),
                    ttl,
                    path: c.path.clone(),
                    attributes: c
                        .attributes
                        .iter()
                        .map(|a| (a.name.clone(), a.value.clone()))
                        .collect(),
                }
            }
            // `source_ip: false` hashes nothing (Envoy adds no method).
            Some(P::ConnectionProperties(cp)) if !cp.source_ip => continue,
            Some(P::ConnectionProperties(_)) => HashPolicyKind::SourceIp,
            Some(P::QueryParameter(q)) => {
                if q.name.is_empty() {
                    errs.push(
                        join(&ppath, "query_parameter.name"),
                        "a parameter name is required",
                    );
                    continue;
                }
                HashPolicyKind::QueryParameter {
                    name: q.name.clone(),
                }
            }
            Some(P::FilterState(f)) => {
                if f.key.is_empty() {
                    errs.push(join(&ppath, "filter_state.key"), "a key is required");
                    continue;
                }
                HashPolicyKind::FilterState { key: f.key.clone() }
            }
            None => {
                errs.push(
                    ppath,
                    "a hash policy needs header, cookie, connection_properties or query_parameter",
                );
                continue;
            }
        };
        out.push(HashPolicy {
            kind,
            terminal: p.terminal,
        });
    }
    errs.into_result(out)
}

#[cfg(test)]
mod tests {
    /// A bootstrap whose one route carries `action` (route action fields
    /// besides `cluster`) and whose virtual host carries `vhost`.
    fn load(action: serde_json::Value, vhost: serde_json::Value) -> Result<(), String> {
        let mut route_action = serde_json::json!({"cluster": "c"});
        if let (Some(o), serde_json::Value::Object(e)) = (route_action.as_object_mut(), action) {
            o.extend(e);
        }
        let mut vh = serde_json::json!({
            "name": "vh", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": route_action}],
        });
        if let (Some(o), serde_json::Value::Object(e)) = (vh.as_object_mut(), vhost) {
            o.extend(e);
        }
        let b = serde_json::json!({"static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "hcm",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "s",
                        "route_config": {"name": "rc", "virtual_hosts": [vh]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{"name": "c", "type": "STATIC", "connect_timeout": "1s"}],
        }});
        crate::load_bootstrap(Some(&b.to_string()), None, Default::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn routing_priority_translated() {
        use super::{r, route_action, RoutingPriority};
        let action = |priority| r::RouteAction {
            cluster_specifier: Some(r::route_action::ClusterSpecifier::Cluster("c".into())),
            priority,
            ..Default::default()
        };
        assert_eq!(
            route_action(&action(0), "route").expect("DEFAULT").priority,
            RoutingPriority::Default
        );
        assert_eq!(
            route_action(&action(1), "route").expect("HIGH").priority,
            RoutingPriority::High
        );
        let e = route_action(&action(7), "route").expect_err("unknown");
        assert!(e.to_string().contains("route.priority"), "{e}");
        load(
            serde_json::json!({"priority": "HIGH"}),
            serde_json::json!({}),
        )
        .expect("HIGH");
    }

    #[test]
    fn router_extras_accepted() {
        load(
            serde_json::json!({
                "hedge_policy": {"hedge_on_per_try_timeout": true},
                "internal_redirect_policy": {
                    "max_internal_redirects": 3, "redirect_response_codes": [301, 307],
                    "response_headers_to_copy": ["x-a"],
                    "predicates": [{"name": "p", "typed_config": {"@type":
                        "type.googleapis.com/envoy.extensions.internal_redirect.safe_cross_scheme.v3.SafeCrossSchemeConfig"}}],
                },
            }),
            serde_json::json!({"hedge_policy": {"hedge_on_per_try_timeout": false}}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn router_extras_rejected_naming_the_field() {
        let base = "virtual_hosts[0].routes[0].route";
        for (action, vhost, want) in [
            (
                serde_json::json!({"hedge_policy": {"initial_requests": 2}}),
                serde_json::json!({}),
                format!("{base}.hedge_policy.initial_requests"),
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"hedge_policy": {"additional_request_chance": {"numerator": 5}}}),
                "virtual_hosts[0].hedge_policy.additional_request_chance".to_owned(),
            ),
            (
                serde_json::json!({"internal_redirect_policy": {"response_headers_to_copy": [":path"]}}),
                serde_json::json!({}),
                format!("{base}.internal_redirect_policy.response_headers_to_copy[0]"),
            ),
            (
                serde_json::json!({"internal_redirect_policy": {"predicates": [{"name": "p", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig"}}]}}),
                serde_json::json!({}),
                format!("{base}.internal_redirect_policy.predicates[0].typed_config.allowed_route_names"),
            ),
            (
                serde_json::json!({"retry_policy": {"retry_priority": {
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 1,
                    },
                }}}),
                serde_json::json!({}),
                "retry priority plugins".to_owned(),
            ),
            (
                serde_json::json!({"retry_policy": {"retry_options_predicates": [{"name": "x"}]}}),
                serde_json::json!({}),
                "retry options predicates".to_owned(),
            ),
        ] {
            let e = load(action.clone(), vhost).expect_err(&action.to_string());
            assert!(e.contains(&want), "{action}: {e}");
        }
    }

    /// `connect_config` on the CONNECT upgrade terminates CONNECT; Envoy's
    /// route errors (a duplicate type, `connect_config` on another type)
    /// and the two fields not implemented are rejected naming the field.
    #[test]
    fn connect_config() {
        use super::{r, route_action};
        let action = |u: Vec<r::route_action::UpgradeConfig>| r::RouteAction {
            cluster_specifier: Some(r::route_action::ClusterSpecifier::Cluster("c".into())),
            upgrade_configs: u,
            ..Default::default()
        };
        let up = |t: &str, connect: bool| r::route_action::UpgradeConfig {
            upgrade_type: t.into(),
            connect_config: connect.then(Default::default),
            ..Default::default()
        };
        let a = route_action(&action(vec![up("CONNECT", true)]), "route").expect("connect");
        assert!(a.connect_terminate);
        assert_eq!(a.upgrades, vec![("connect".to_owned(), true)]);
        let a = route_action(&action(vec![up("CONNECT", false)]), "route").expect("proxy");
        assert!(!a.connect_terminate);
        let e = route_action(&action(vec![up("websocket", true)]), "route").expect_err("ws");
        assert!(
            e.to_string()
                .contains("route.upgrade_configs[0].connect_config"),
            "{e}"
        );
        let e = route_action(
            &action(vec![up("websocket", false), up("WebSocket", false)]),
            "route",
        )
        .expect_err("duplicate");
        assert!(
            e.to_string()
                .contains("route.upgrade_configs[1].upgrade_type"),
            "{e}"
        );
        load(
            serde_json::json!({"upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}),
            serde_json::json!({}),
        )
        .expect("connect_config");
        for field in [
            serde_json::json!({"allow_post": true}),
            serde_json::json!({"proxy_protocol_config": {"version": "V2"}}),
        ] {
            let name = field.as_object().and_then(|o| o.keys().next().cloned());
            let e = load(
                serde_json::json!({"upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": field}]}),
                serde_json::json!({}),
            )
            .expect_err("pending");
            assert!(e.contains(&name.expect("a field")), "{e}");
        }
    }
}
