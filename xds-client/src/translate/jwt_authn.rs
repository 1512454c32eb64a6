//! `envoy.filters.http.jwt_authn` translation: providers with their JWKS
//! parsed, rules with compiled route matches, requirements resolved to
//! provider indices. As Envoy, a requirement naming an unknown provider and
//! a rule naming an unknown `requirement_name` are config errors.
//!
//! Rejected naming the field: `remote_jwks.async_fetch` and `retry_policy`,
//! `failed_status_in_metadata`,
//! `filter_state_rules`, `extract_only_without_validation` (support table),
//! and, by value, a local JWKS without a usable key (Envoy accepts it and
//! fails every token of that provider with `Jwks doesn't have any valid
//! public key`).
use std::sync::Arc;

use crate::api::envoy::extensions::filters::http::jwt_authn::v3 as j;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

/// `envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication`.
pub const JWT_AUTHN: &str = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
/// `envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig`.
pub const JWT_PER_ROUTE: &str = "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";

/// The filter's config; `path` names the `typed_config`.
pub fn jwt_authn(p: &j::JwtAuthentication, path: &str) -> Result<JwtAuthn, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.filter_state_rules.is_some() {
        errs.push(
            join(path, "filter_state_rules"),
            "filter_state_rules (requirements chosen by filter state) are not implemented",
        );
    }
    if !p.stat_prefix.is_empty() {
        errs.push(
            join(path, "stat_prefix"),
            "a jwt_authn stat_prefix is not implemented",
        );
    }
    let mut names: Vec<&String> = p.providers.keys().collect();
    names.sort();
    let mut providers = Vec::with_capacity(names.len());
    for name in &names {
        let ppath = format!("{}[{name:?}]", join(path, "providers"));
        match provider(name, &p.providers[*name], &ppath) {
            Ok(pr) => providers.push(Arc::new(pr)),
            Err(e) => errs.extend(e),
        }
    }
    let index = |n: &str| names.binary_search_by(|x| x.as_str().cmp(n)).ok();
    let mut req_names: Vec<&String> = p.requirement_map.keys().collect();
    req_names.sort();
    let mut requirement_map = Vec::with_capacity(req_names.len());
    for name in &req_names {
        let rpath = format!("{}[{name:?}]", join(path, "requirement_map"));
        match requirement(&p.requirement_map[*name], &rpath, &index) {
            Ok(r) => requirement_map.push(((*name).clone(), Arc::new(r))),
            Err(e) => errs.extend(e),
        }
    }
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let rpath = format!("{}[{i}]", join(path, "rules"));
        let matcher = match &r.r#match {
            Some(m) => match super::route::route_match(m, &join(&rpath, "match")) {
                Ok(m) => m,
                Err(e) => {
                    errs.extend(e);
                    continue;
                }
            },
            None => {
                errs.push(join(&rpath, "match"), "value is required");
                continue;
            }
        };
        use j::requirement_rule::RequirementType as T;
        let requires = match &r.requirement_type {
            Some(T::Requires(req)) => match requirement(req, &join(&rpath, "requires"), &index) {
                Ok(req) => Some(Arc::new(req)),
                Err(e) => {
                    errs.extend(e);
                    continue;
                }
            },
            Some(T::RequirementName(n)) => {
                match requirement_map.iter().find(|(name, _)| name == n) {
                    Some((_, req)) => Some(req.clone()),
                    None => {
                        // As Envoy's FilterConfigImpl.
                        errs.push(
                            join(&rpath, "requirement_name"),
                            format!(
                                "Wrong requirement_name: {n}. It should be one of [{}]",
                                req_names
                                    .iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            ),
                        );
                        continue;
                    }
                }
            }
            None => None,
        };
        rules.push(JwtRule { matcher, requires });
    }
    errs.into_result(JwtAuthn {
        providers,
        rules,
        requirement_map,
        bypass_cors_preflight: p.bypass_cors_preflight,
        strip_failure_response: p.strip_failure_response,
    })
}

/// `PerRouteConfig`.
pub fn per_route(p: &j::PerRouteConfig, path: &str) -> Result<JwtPerRoute, ConfigErrors> {
    use j::per_route_config::RequirementSpecifier as S;
    match &p.requirement_specifier {
        Some(S::Disabled(true)) => Ok(JwtPerRoute::Disabled),
        Some(S::Disabled(false)) => Err(err(join(path, "disabled"), "value must equal true")),
        Some(S::RequirementName(n)) if !n.is_empty() => Ok(JwtPerRoute::RequirementName(n.clone())),
        Some(S::RequirementName(_)) => Err(err(
            join(path, "requirement_name"),
            "value length must be at least 1 characters",
        )),
        None => Err(err(path, "requirement_specifier is required")),
    }
}

fn provider(name: &str, p: &j::JwtProvider, path: &str) -> Result<JwtProvider, ConfigErrors> {
    use j::jwt_provider::JwksSourceSpecifier as S;
    let mut errs = ConfigErrors::default();
    for (field, set) in [
        ("subjects", p.subjects.is_some()),
        ("require_expiration", p.require_expiration),
        ("max_lifetime", p.max_lifetime.is_some()),
        (
            "normalize_payload_in_metadata",
            p.normalize_payload_in_metadata.is_some(),
        ),
        ("jwt_cache_config", p.jwt_cache_config.is_some()),
        ("clear_route_cache", p.clear_route_cache),
        (
            "failed_status_in_metadata",
            !p.failed_status_in_metadata.is_empty(),
        ),
    ] {
        if set {
            errs.push(
                join(path, field),
                format!("jwt_authn provider {field} is not implemented"),
            );
        }
    }
    let jwks = match &p.jwks_source_specifier {
        Some(S::LocalJwks(d)) => {
            let jpath = join(path, "local_jwks");
            match super::data_source(d, &jpath) {
                Ok(bytes) => match std::str::from_utf8(&bytes)
                    .map_err(|_| "Jwks is an invalid JSON")
                    .and_then(Jwks::parse)
                {
                    Ok(j) => Some(JwksSource::Local(Arc::new(j))),
                    Err(e) => {
                        errs.push(jpath, e);
                        None
                    }
                },
                Err(e) => {
                    errs.extend(e);
                    None
                }
            }
        }
        Some(S::RemoteJwks(r)) => match remote_jwks(r, &join(path, "remote_jwks")) {
            Ok(r) => Some(JwksSource::Remote(Arc::new(r))),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => {
            errs.push(
                path,
                "jwks_source_specifier (local_jwks or remote_jwks) is required",
            );
            None
        }
    };
    let mut from_headers = Vec::with_capacity(p.from_headers.len());
    for (i, h) in p.from_headers.iter().enumerate() {
        match super::header_name(&h.name, &format!("{path}.from_headers[{i}].name")) {
            Ok(n) => from_headers.push((n, h.value_prefix.clone())),
            Err(e) => errs.extend(e),
        }
    }
    let forward_payload_header = if p.forward_payload_header.is_empty() {
        None
    } else {
        match super::header_name(
            &p.forward_payload_header,
            &join(path, "forward_payload_header"),
        ) {
            Ok(n) => Some(n),
            Err(e) => {
                errs.extend(e);
                None
            }
        }
    };
    let mut claim_to_headers = Vec::with_capacity(p.claim_to_headers.len());
    for (i, c) in p.claim_to_headers.iter().enumerate() {
        let cpath = format!("{path}.claim_to_headers[{i}]");
        if !c.claim_path.is_empty() {
            errs.push(
                join(&cpath, "claim_path"),
                "claim_path is not implemented (use claim_name)",
            );
            continue;
        }
        if c.claim_name.is_empty() {
            errs.push(
                join(&cpath, "claim_name"),
                "value length must be at least 1 characters",
            );
            continue;
        }
        match super::header_name(&c.header_name, &join(&cpath, "header_name")) {
            Ok(n) => claim_to_headers.push((n, c.claim_name.clone())),
            Err(e) => errs.extend(e),
        }
    }
    match jwks {
        Some(jwks) if errs.is_empty() => Ok(JwtProvider {
            name: name.to_owned(),
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            forward: p.forward,
            from_headers,
            from_params: p.from_params.clone(),
            from_cookies: p.from_cookies.clone(),
            forward_payload_header,
            pad_forward_payload_header: p.pad_forward_payload_header,
            payload_in_metadata: p.payload_in_metadata.clone(),
            header_in_metadata: p.header_in_metadata.clone(),
            clock_skew_seconds: u64::from(p.clock_skew_seconds),
            claim_to_headers,
            jwks,
        }),
        _ => Err(errs),
    }
}

/// Envoy's default `cache_duration`.
const DEFAULT_CACHE_DURATION: std::time::Duration = std::time::Duration::from_secs(600);

fn remote_jwks(r: &j::RemoteJwks, path: &str) -> Result<RemoteJwks, ConfigErrors> {
    if r.async_fetch.is_some() {
        return Err(err(
            join(path, "async_fetch"),
            "async_fetch (fetching at start) is not implemented: JWKS are fetched on first use",
        ));
    }
    if r.retry_policy.is_some() {
        return Err(err(
            join(path, "retry_policy"),
            "JWKS fetch retries are not implemented",
        ));
    }
    let upath = join(path, "http_uri");
    let Some(h) = &r.http_uri else {
        return Err(err(upath, "value is required"));
    };
    use crate::api::envoy::config::core::v3::http_uri::HttpUpstreamType;
    let cluster = match &h.http_upstream_type {
        Some(HttpUpstreamType::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => {
            return Err(err(
                join(&upath, "cluster"),
                "value length must be at least 1 characters",
            ))
        }
    };
    let Some(t) = &h.timeout else {
        return Err(err(join(&upath, "timeout"), "value is required"));
    };
    let timeout = super::duration(t, &join(&upath, "timeout"))?;
    let uri: http::Uri = h
        .uri
        .parse()
        .map_err(|_| err(join(&upath, "uri"), format!("invalid URI {:?}", h.uri)))?;
    let (Some(authority), Some(_)) = (uri.authority(), uri.scheme()) else {
        return Err(err(
            join(&upath, "uri"),
            format!("invalid URI {:?}: scheme and host are required", h.uri),
        ));
    };
    let cache_duration = match &r.cache_duration {
        Some(d) => super::duration(d, &join(path, "cache_duration"))?,
        None => DEFAULT_CACHE_DURATION,
    };
    Ok(RemoteJwks {
        uri: h.uri.clone(),
        authority: authority.as_str().to_owned(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        cluster,
        timeout,
        cache_duration,
    })
}

fn requirement(
    r: &j::JwtRequirement,
    path: &str,
    index: &dyn Fn(&str) -> Option<usize>,
) -> Result<JwtRequirement, ConfigErrors> {
    use j::jwt_requirement::RequiresType as T;
    let provider = |name: &str, field: &str| {
        index(name).ok_or_else(|| {
            err(
                join(path, field),
                format!("Required provider ['{name}'] is not configured."),
            )
        })
    };
    Ok(match &r.requires_type {
        Some(T::ProviderName(n)) => JwtRequirement::Provider {
            provider: provider(n, "provider_name")?,
            audiences: None,
        },
        Some(T::ProviderAndAudiences(pa)) => JwtRequirement::Provider {
            provider: provider(&pa.provider_name, "provider_and_audiences.provider_name")?,
            // As Envoy: no audiences is the provider's own check.
            audiences: (!pa.audiences.is_empty()).then(|| pa.audiences.clone()),
        },
        Some(T::RequiresAny(l)) => {
            let lpath = join(path, "requires_any.requirements");
            if l.requirements.len() < 2 {
                return Err(err(lpath, "value must contain at least 2 item(s)"));
            }
            let mut requirements = Vec::new();
            let (mut allow_missing, mut allow_missing_or_failed) = (false, false);
            for (i, x) in l.requirements.iter().enumerate() {
                match &x.requires_type {
                    Some(T::AllowMissing(_)) => allow_missing = true,
                    Some(T::AllowMissingOrFailed(_)) => allow_missing_or_failed = true,
                    _ => requirements.push(requirement(x, &format!("{lpath}[{i}]"), index)?),
                }
            }
            // As Envoy's AnyVerifierImpl: a list of only "allow" entries is
            // that requirement.
            if requirements.is_empty() {
                if allow_missing_or_failed {
                    JwtRequirement::AllowMissingOrFailed
                } else {
                    JwtRequirement::AllowMissing
                }
            } else {
                JwtRequirement::Any {
                    requirements,
                    allow_missing,
                    allow_missing_or_failed,
                }
            }
        }
        Some(T::RequiresAll(l)) => {
            let lpath = join(path, "requires_all.requirements");
            if l.requirements.len() < 2 {
                return Err(err(lpath, "value must contain at least 2 item(s)"));
            }
            let mut all = Vec::with_capacity(l.requirements.len());
            for (i, x) in l.requirements.iter().enumerate() {
                all.push(requirement(x, &format!("{lpath}[{i}]"), index)?);
            }
            JwtRequirement::All(all)
        }
        Some(T::AllowMissingOrFailed(_)) => JwtRequirement::AllowMissingOrFailed,
        Some(T::AllowMissing(_)) => JwtRequirement::AllowMissing,
        Some(T::ExtractOnlyWithoutValidation(_)) => {
            return Err(err(
                join(path, "extract_only_without_validation"),
                "extract_only_without_validation is not implemented",
            ))
        }
        None => JwtRequirement::AllowAll,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn translate(yaml: &str) -> Result<JwtAuthn, String> {
        let any = crate::bootstrap::any_from_text(JWT_AUTHN, yaml).map_err(|e| e.to_string())?;
        let p = j::JwtAuthentication::decode(any.value.as_slice()).expect("decodes");
        jwt_authn(&p, "f").map_err(|e| e.to_string())
    }

    const KEY: &str = r#"{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}"#;

    #[test]
    fn providers_requirements_and_rules() {
        let c = translate(&format!(
            "providers: {{b: {{issuer: ib, local_jwks: {{inline_string: \"{KEY}\"}}}}, \
             a: {{issuer: ia, local_jwks: {{inline_string: \"{KEY}\"}}, from_headers: [{{name: x-t, value_prefix: \"T \"}}]}}}}\n\
             requirement_map: {{r: {{requires_any: {{requirements: [{{provider_name: b}}, {{allow_missing: {{}}}}]}}}}}}\n\
             rules: [{{match: {{prefix: /a}}, requires: {{provider_and_audiences: {{provider_name: a, audiences: [x]}}}}}}, \
             {{match: {{prefix: /r}}, requirement_name: r}}, {{match: {{prefix: /}}}}]"
        ))
        .expect("valid");
        assert_eq!(c.providers[0].name, "a");
        assert_eq!(c.providers[0].from_headers[0].1, "T ");
        assert_eq!(
            c.rules[0].requires.as_deref(),
            Some(&JwtRequirement::Provider {
                provider: 0,
                audiences: Some(vec!["x".into()])
            })
        );
        assert_eq!(
            c.rules[1].requires.as_deref(),
            Some(&JwtRequirement::Any {
                requirements: vec![JwtRequirement::Provider {
                    provider: 1,
                    audiences: None
                }],
                allow_missing: true,
                allow_missing_or_failed: false,
            })
        );
        assert!(c.rules[2].requires.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let e = translate("providers: {a: {local_jwks: {inline_string: \"{}\"}}}")
            .expect_err("no keys");
        assert!(
            e.contains("f.providers[\"a\"].local_jwks")
                && e.contains("Jwks does not have [keys] field"),
            "{e}"
        );
        let e = translate(&format!(
            "providers: {{a: {{local_jwks: {{inline_string: \"{KEY}\"}}}}}}\n\
             rules: [{{match: {{prefix: /}}, requires: {{provider_name: nope}}}}, {{match: {{prefix: /}}, requirement_name: zz}}]"
        ))
        .expect_err("unknown names");
        assert!(
            e.contains("f.rules[0].requires.provider_name")
                && e.contains("Required provider ['nope'] is not configured.")
                && e.contains("f.rules[1].requirement_name")
                && e.contains("Wrong requirement_name: zz"),
            "{e}"
        );
        let e = translate(
            "providers: {a: {remote_jwks: {http_uri: {uri: \"http://h/jwks\", cluster: c, timeout: 1s}, async_fetch: {}}}}",
        )
        .expect_err("async_fetch");
        assert!(
            e.contains("f.providers[\"a\"].remote_jwks.async_fetch"),
            "{e}"
        );
        let c = translate(
            "providers: {a: {remote_jwks: {http_uri: {uri: \"http://h:8080/jwks?x=1\", cluster: c, timeout: 1s}}}}",
        )
        .expect("remote");
        let JwksSource::Remote(r) = &c.providers[0].jwks else {
            panic!("remote");
        };
        assert_eq!(
            (
                r.authority.as_str(),
                r.path.as_str(),
                r.cache_duration.as_secs()
            ),
            ("h:8080", "/jwks?x=1", 600)
        );
    }
}
