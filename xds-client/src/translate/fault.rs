//! `envoy.filters.http.fault` translation.
use crate::api::envoy::extensions::filters::common::fault::v3 as common;
use crate::api::envoy::extensions::filters::http::fault::v3 as f;
use crate::api::envoy::r#type::v3::FractionalPercent;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
pub const FAULT: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

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
