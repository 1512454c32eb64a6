//! `envoy.filters.http.fault` and `typed_per_filter_config` translation.
use std::{collections::HashMap, sync::Arc};

use crate::api::envoy::config::route::v3 as r;
use crate::api::envoy::extensions::filters::common::fault::v3 as common;
use crate::api::envoy::extensions::filters::http::fault::v3 as f;
use crate::api::envoy::r#type::v3::FractionalPercent;
use crate::api::google::protobuf as pb;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
pub const FAULT: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
const FILTER_CONFIG: &str = "envoy.config.route.v3.FilterConfig";

/// `HTTPFault` -> [`FaultConfig`]; `path` names the `typed_config`.
pub fn fault(p: &f::HttpFault, path: &str) -> Result<FaultConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.response_rate_limit.is_some() {
        errs.push(
            join(path, "response_rate_limit"),
            "response_rate_limit (response body throttling) is not implemented",
        );
    }
    if p.filter_metadata.is_some() {
        errs.push(
            join(path, "filter_metadata"),
            "filter_metadata (dynamic metadata on injected faults) is not implemented",
        );
    }
    let delay = p.delay.as_ref().and_then(|d| {
        delay(d, &join(path, "delay"))
            .map_err(|e| errs.extend(e))
            .ok()
    });
    let abort = p.abort.as_ref().and_then(|a| {
        abort(a, &join(path, "abort"))
            .map_err(|e| errs.extend(e))
            .ok()
    });
    let mut headers = Vec::new();
    for (i, h) in p.headers.iter().enumerate() {
        match super::route::header_matcher(h, &format!("{path}.headers[{i}]")) {
            Ok(h) => headers.push(h),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(FaultConfig {
        delay,
        abort,
        upstream_cluster: (!p.upstream_cluster.is_empty()).then(|| p.upstream_cluster.clone()),
        headers,
        downstream_nodes: p.downstream_nodes.clone(),
        max_active_faults: p.max_active_faults.as_ref().map(|v| v.value),
        disable_downstream_cluster_stats: p.disable_downstream_cluster_stats,
    })
}

fn fraction(p: Option<&FractionalPercent>) -> Fraction {
    match p {
        None => Fraction::default(),
        Some(p) => Fraction {
            numerator: p.numerator,
            denominator: match p.denominator {
                0 => 100,
                1 => 10_000,
                _ => 1_000_000,
            },
        },
    }
}

fn delay(p: &common::FaultDelay, path: &str) -> Result<FaultDelay, ConfigErrors> {
    use common::fault_delay::FaultDelaySecifier as S;
    let kind = match &p.fault_delay_secifier {
        Some(S::FixedDelay(d)) => {
            let d = super::duration(d, &join(path, "fixed_delay"))?;
            // As Envoy's validation: `fixed_delay` must be > 0.
            if d.is_zero() {
                return Err(err(join(path, "fixed_delay"), "must be greater than 0s"));
            }
            DelayKind::Fixed(d)
        }
        Some(S::HeaderDelay(_)) => DelayKind::Header,
        None => {
            return Err(err(path, "one of fixed_delay or header_delay is required"));
        }
    };
    Ok(FaultDelay {
        kind,
        percentage: fraction(p.percentage.as_ref()),
    })
}

fn abort(p: &f::FaultAbort, path: &str) -> Result<FaultAbort, ConfigErrors> {
    use f::fault_abort::ErrorType as E;
    let kind = match &p.error_type {
        Some(E::HttpStatus(s)) => {
            if !(200..600).contains(s) {
                return Err(err(
                    join(path, "http_status"),
                    format!("http_status {s} is not in [200, 600)"),
                ));
            }
            AbortKind::Http(*s as u16)
        }
        Some(E::GrpcStatus(s)) => AbortKind::Grpc(*s),
        Some(E::HeaderAbort(_)) => AbortKind::Header,
        None => {
            return Err(err(
                path,
                "one of http_status, grpc_status or header_abort is required",
            ));
        }
    };
    Ok(FaultAbort {
        kind,
        percentage: fraction(p.percentage.as_ref()),
        body: (!p.response_body.is_empty())
            .then(|| bytes::Bytes::from(p.response_body.clone().into_bytes())),
    })
}

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

fn filter_override(any: &pb::Any, path: &str) -> Result<FilterOverride, ConfigErrors> {
    let any = crate::support::unwrap_typed_struct(any, path)?;
    match type_name(&any) {
        FAULT => {
            let p: f::HttpFault = super::decode(&any, path)?;
            Ok(FilterOverride::Fault(Arc::new(fault(&p, path)?)))
        }
        other => Err(err(
            path,
            format!("per-route configuration of {other} is not implemented (only {FAULT} is)"),
        )),
    }
}

fn type_name(any: &pb::Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or_default()
}
