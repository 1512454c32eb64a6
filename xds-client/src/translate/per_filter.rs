//! `typed_per_filter_config` of routes, virtual hosts and route
//! configurations: the generic `FilterConfig` wrapper and the dispatch to
//! each filter's per-route translation.
use std::{collections::HashMap, sync::Arc};

use crate::api::envoy::config::route::v3 as r;
use crate::api::envoy::extensions::filters::http::fault::v3::HttpFault;
use crate::api::google::protobuf as pb;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;
use super::fault::FAULT;

const FILTER_CONFIG: &str = "envoy.config.route.v3.FilterConfig";
/// `envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute`.
pub const RATE_LIMIT_PER_ROUTE: &str =
    "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute";

/// `typed_per_filter_config` of a route, virtual host or route
/// configuration (`path` names the map). Only the fault filter's config is
/// implemented; entries for any other filter are rejected.
pub fn per_filter_configs(
    map: &HashMap<String, pb::Any>,
    path: &str,
) -> Result<PerFilterConfigs, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = Vec::with_capacity(map.len());
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for k in keys {
        let kpath = format!("{path}[{k:?}]");
        // The empty key names no filter; weir keeps legacy CORS policies
        // there (`LEGACY_CORS_KEY`).
        if k.as_str() == LEGACY_CORS_KEY {
            errs.push(kpath, "a typed_per_filter_config key must name a filter");
            continue;
        }
        match per_filter_config(k, &map[k], &kpath) {
            Ok(c) => out.push((k.as_str().into(), c)),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(PerFilterConfigs(out))
}

fn per_filter_config(
    filter: &str,
    any: &pb::Any,
    path: &str,
) -> Result<PerFilterConfig, ConfigErrors> {
    let any = crate::support::unwrap_typed_struct(any, path)?;
    match type_name(&any) {
        FILTER_CONFIG => {
            let fc: r::FilterConfig = super::decode(&any, path)?;
            // `is_optional` only matters for filters Envoy does not know.
            let cpath = join(path, "config");
            let config = match &fc.config {
                Some(c) if !fc.disabled => Some(filter_override(c, &cpath)?),
                // As Envoy: a disabled filter's config is ignored; it is
                // still validated.
                Some(c) => {
                    filter_override(c, &cpath)?;
                    None
                }
                None if fc.disabled => None,
                // As Envoy: a FilterConfig must disable or configure.
                None => {
                    return Err(err(
                        path,
                        format!(
                            "Empty route/virtual host per filter configuration for {filter} filter"
                        ),
                    ))
                }
            };
            Ok(PerFilterConfig {
                disabled: Some(fc.disabled),
                config,
            })
        }
        _ => Ok(PerFilterConfig {
            disabled: None,
            config: Some(filter_override(&any, path)?),
        }),
    }
}

/// The per-route config of one filter, by its type. Each filter with a
/// per-route form adds an arm here and a variant to [`FilterOverride`].
fn filter_override(any: &pb::Any, path: &str) -> Result<FilterOverride, ConfigErrors> {
    let any = crate::support::unwrap_typed_struct(any, path)?;
    match type_name(&any) {
        FAULT => {
            let p: HttpFault = super::decode(&any, path)?;
            Ok(FilterOverride::Fault(Arc::new(super::fault::fault(
                &p, path,
            )?)))
        }
        super::compressor::COMPRESSOR_PER_ROUTE => {
            let p: crate::api::envoy::extensions::filters::http::compressor::v3::CompressorPerRoute =
                super::decode(&any, path)?;
            Ok(FilterOverride::Compressor(super::compressor::per_route(
                &p, path,
            )?))
        }
        super::cors::CORS_POLICY => super::cors::per_route(&any, path),
        super::local_ratelimit::LOCAL_RATE_LIMIT => {
            let p: crate::api::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit =
                super::decode(&any, path)?;
            Ok(FilterOverride::LocalRateLimit(Arc::new(
                super::local_ratelimit::local_rate_limit(&p, path, true)?,
            )))
        }
        RATE_LIMIT_PER_ROUTE => {
            use crate::api::envoy::extensions::filters::http::ratelimit::v3::{
                rate_limit_per_route::VhRateLimitsOptions as O, RateLimitPerRoute as P,
            };
            let p: P = super::decode(&any, path)?;
            let vh_rate_limits = match O::try_from(p.vh_rate_limits) {
                Ok(O::Override) => VhRateLimits::Override,
                Ok(O::Include) => VhRateLimits::Include,
                Ok(O::Ignore) => VhRateLimits::Ignore,
                Err(_) => {
                    return Err(super::err(
                        join(path, "vh_rate_limits"),
                        format!("unknown value {}", p.vh_rate_limits),
                    ))
                }
            };
            Ok(FilterOverride::RateLimit(Arc::new(RateLimitPerRoute {
                vh_rate_limits,
                domain: p.domain,
            })))
        }
        super::rbac::HTTP_RBAC_PER_ROUTE => {
            let p = super::decode(&any, path)?;
            Ok(FilterOverride::Rbac(Arc::new(
                super::rbac::http_rbac_per_route(&p, path)?,
            )))
        }
        super::hcm::BUFFER_PER_ROUTE => {
            use crate::api::envoy::extensions::filters::http::buffer::v3::{
                buffer_per_route::Override, BufferPerRoute,
            };
            let p: BufferPerRoute = super::decode(&any, path)?;
            match p.r#override {
                Some(Override::Disabled(true)) => Ok(FilterOverride::Buffer(None)),
                Some(Override::Buffer(b)) => Ok(FilterOverride::Buffer(Some(
                    super::hcm::buffer_max(b.max_request_bytes, &join(path, "buffer"))?,
                ))),
                _ => Err(err(path, "BufferPerRoute needs disabled: true or buffer")),
            }
        }
        super::header_mutation::HEADER_MUTATION_PER_ROUTE => {
            let p = super::decode(&any, path)?;
            Ok(FilterOverride::HeaderMutation(
                super::header_mutation::per_route(&p, path)?,
            ))
        }
        super::ext_authz::EXT_AUTHZ_PER_ROUTE => {
            let p = super::decode(&any, path)?;
            Ok(FilterOverride::ExtAuthz(Arc::new(
                super::ext_authz::per_route(&p, path)?,
            )))
        }
        super::jwt_authn::JWT_PER_ROUTE => {
            let p = super::decode(&any, path)?;
            Ok(FilterOverride::JwtAuthn(super::jwt_authn::per_route(
                &p, path,
            )?))
        }
        other => Err(err(
            path,
            format!("per-route configuration of {other} is not implemented"),
        )),
    }
}

fn type_name(any: &pb::Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or_default()
}
