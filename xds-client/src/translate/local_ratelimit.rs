//! `envoy.filters.http.local_ratelimit` translation.
use std::collections::HashSet;

use crate::api::envoy::config::core::v3 as core;
use crate::api::envoy::extensions::common::ratelimit::v3 as common;
use crate::api::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use crate::config::*;
use crate::error::{join, ConfigErrors};

/// `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`.
pub const LOCAL_RATE_LIMIT: &str =
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// `LocalRateLimit` -> [`HttpLocalRateLimit`]; `path` names the
/// `typed_config`. `per_route`: a `typed_per_filter_config` entry, which
/// needs a `token_bucket` (as Envoy).
pub fn local_rate_limit(
    p: &LocalRateLimit,
    path: &str,
    per_route: bool,
) -> Result<HttpLocalRateLimit, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.stat_prefix.is_empty() {
        errs.push(
            join(path, "stat_prefix"),
            "value length must be at least 1 characters",
        );
    }
    // Fields the support table lets through only to reject them here with
    // a reason.
    if p.local_cluster_rate_limit.is_some() {
        errs.push(
            join(path, "local_cluster_rate_limit"),
            "local_cluster_rate_limit (sharing tokens across the local cluster) is not implemented",
        );
    }
    if !p.rate_limits.is_empty() {
        errs.push(
            join(path, "rate_limits"),
            "rate_limits in the filter config is not implemented (route and virtual host \
             rate_limits are)",
        );
    }
    let token_bucket = match &p.token_bucket {
        Some(b) => super::network::token_bucket(b, &join(path, "token_bucket"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None if per_route => {
            errs.push(
                join(path, "token_bucket"),
                "local rate limit token bucket must be set for per filter configs",
            );
            None
        }
        None => None,
    };
    // As Envoy's `toErrorCode`: codes under 400 become 429.
    let status = match &p.status {
        Some(s) if s.code >= 400 => match u16::try_from(s.code) {
            Ok(c) if c < 600 => c,
            _ => {
                errs.push(join(path, "status.code"), "value must be less than 600");
                429
            }
        },
        _ => 429,
    };
    if p.stage > super::ratelimit::MAX_STAGE {
        errs.push(
            join(path, "stage"),
            "value must be less than or equal to 10",
        );
    }
    let request_headers_when_not_enforced = literal_headers(
        &p.request_headers_to_add_when_not_enforced,
        &join(path, "request_headers_to_add_when_not_enforced"),
        true,
    )
    .map_err(|e| errs.extend(e))
    .unwrap_or_default();
    let response_headers = literal_headers(
        &p.response_headers_to_add,
        &join(path, "response_headers_to_add"),
        false,
    )
    .map_err(|e| errs.extend(e))
    .unwrap_or_default();
    if p.response_headers_to_add.len() > 10 {
        errs.push(
            join(path, "response_headers_to_add"),
            "value must contain no more than 10 item(s)",
        );
    }
    if p.request_headers_to_add_when_not_enforced.len() > 10 {
        errs.push(
            join(path, "request_headers_to_add_when_not_enforced"),
            "value must contain no more than 10 item(s)",
        );
    }
    let descriptors = descriptors(&p.descriptors, &join(path, "descriptors"))
        .map_err(|e| errs.extend(e))
        .unwrap_or_default();
    let x_ratelimit_headers =
        match common::XRateLimitHeadersRfcVersion::try_from(p.enable_x_ratelimit_headers) {
            Ok(common::XRateLimitHeadersRfcVersion::Off) => false,
            Ok(common::XRateLimitHeadersRfcVersion::DraftVersion03) => true,
            Err(_) => {
                errs.push(
                    join(path, "enable_x_ratelimit_headers"),
                    "value must be one of the defined enum values",
                );
                false
            }
        };
    let vh_rate_limits = match common::VhRateLimitsOptions::try_from(p.vh_rate_limits) {
        Ok(common::VhRateLimitsOptions::Override) => VhRateLimits::Override,
        Ok(common::VhRateLimitsOptions::Include) => VhRateLimits::Include,
        Ok(common::VhRateLimitsOptions::Ignore) => VhRateLimits::Ignore,
        Err(_) => {
            errs.push(
                join(path, "vh_rate_limits"),
                "value must be one of the defined enum values",
            );
            VhRateLimits::Override
        }
    };
    errs.into_result(HttpLocalRateLimit {
        stat_prefix: p.stat_prefix.clone(),
        status,
        token_bucket,
        filter_enabled: p.filter_enabled.as_ref().map(runtime_fraction),
        filter_enforced: p.filter_enforced.as_ref().map(runtime_fraction),
        request_headers_when_not_enforced,
        response_headers,
        descriptors,
        stage: p.stage,
        per_connection: p.local_rate_limit_per_downstream_connection,
        x_ratelimit_headers,
        vh_rate_limits,
        always_consume_default: p
            .always_consume_default_token_bucket
            .is_none_or(|b| b.value),
        resource_exhausted: p.rate_limited_as_resource_exhausted,
        max_dynamic_descriptors: p.max_dynamic_descriptors.map_or(20, |v| v.value),
        runtime: Default::default(),
    })
}

/// `RuntimeFractionalPercent.default_value` (no runtime layer: what Envoy
/// does when the runtime does not override the key). Unset is 0 %.
pub(crate) fn runtime_fraction(r: &core::RuntimeFractionalPercent) -> Fraction {
    match &r.default_value {
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

/// Header additions with literal values only: the filter adds them
/// without a formatter (`%...%` operators are rejected).
fn literal_headers(
    p: &[core::HeaderValueOption],
    path: &str,
    request: bool,
) -> Result<Vec<HeaderAdd>, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = Vec::with_capacity(p.len());
    for (i, h) in p.iter().enumerate() {
        let hpath = format!("{path}[{i}]");
        match super::header_add(h, &hpath, request) {
            Ok(a) if a.value.is_literal() => out.push(a),
            Ok(_) => errs.push(
                join(&hpath, "header.value"),
                "command operators (%...%) are not implemented in this filter's headers",
            ),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(out)
}

fn descriptors(
    p: &[common::LocalRateLimitDescriptor],
    path: &str,
) -> Result<Vec<LocalDescriptor>, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out: Vec<LocalDescriptor> = Vec::with_capacity(p.len());
    let mut seen = HashSet::new();
    for (i, d) in p.iter().enumerate() {
        let dpath = format!("{path}[{i}]");
        if d.entries.is_empty() {
            errs.push(
                join(&dpath, "entries"),
                "value must contain at least 1 item(s)",
            );
            continue;
        }
        let mut entries = Vec::with_capacity(d.entries.len());
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() {
                errs.push(
                    format!("{dpath}.entries[{j}].key"),
                    "value length must be at least 1 characters",
                );
            }
            entries.push((e.key.clone(), e.value.clone()));
        }
        let Some(b) = &d.token_bucket else {
            errs.push(join(&dpath, "token_bucket"), "value is required");
            continue;
        };
        let bpath = join(&dpath, "token_bucket");
        let token_bucket = match super::network::token_bucket(b, &bpath) {
            Ok(b) => b,
            Err(e) => {
                errs.extend(e);
                continue;
            }
        };
        if !seen.insert(entries.clone()) {
            let shown: Vec<String> = entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
            errs.push(
                &dpath,
                format!(
                    "duplicate descriptor in the local rate descriptor: {}",
                    shown.join(", ")
                ),
            );
            continue;
        }
        out.push(LocalDescriptor {
            entries,
            token_bucket,
        });
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::envoy::r#type::v3::{HttpStatus, TokenBucket};
    use crate::api::google::protobuf as pb;

    fn bucket(max: u32, ms: i32) -> TokenBucket {
        TokenBucket {
            max_tokens: max,
            tokens_per_fill: Some(pb::UInt32Value { value: 1 }),
            fill_interval: Some(pb::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            }),
        }
    }

    #[test]
    fn defaults_and_validation() {
        let p = LocalRateLimit {
            stat_prefix: "p".into(),
            token_bucket: Some(bucket(2, 500)),
            status: Some(HttpStatus { code: 200 }),
            ..Default::default()
        };
        let c = local_rate_limit(&p, "f", false).expect("valid");
        assert_eq!(c.status, 429, "codes under 400 are 429");
        assert!(c.filter_enabled.is_none() && c.filter_enforced.is_none());
        assert!(c.always_consume_default);
        assert_eq!(c.max_dynamic_descriptors, 20);
        // Per route, a token bucket is required.
        let p = LocalRateLimit {
            stat_prefix: "p".into(),
            ..Default::default()
        };
        let e = local_rate_limit(&p, "f", true).expect_err("needs a bucket");
        assert!(e.to_string().contains("f.token_bucket"), "{e}");
        assert!(local_rate_limit(&p, "f", false).is_ok());
        // Duplicate descriptors and short fill intervals are rejected.
        let d = common::LocalRateLimitDescriptor {
            entries: vec![common::rate_limit_descriptor::Entry {
                key: "k".into(),
                value: "v".into(),
            }],
            token_bucket: Some(bucket(1, 100)),
            ..Default::default()
        };
        let mut short = d.clone();
        short.token_bucket = Some(bucket(1, 10));
        let p = LocalRateLimit {
            stat_prefix: "p".into(),
            descriptors: vec![d.clone(), d, short],
            ..Default::default()
        };
        let e = local_rate_limit(&p, "f", false).expect_err("invalid descriptors");
        let s = e.to_string();
        assert!(
            s.contains("f.descriptors[1]") && s.contains("duplicate"),
            "{s}"
        );
        assert!(
            s.contains("f.descriptors[2].token_bucket.fill_interval"),
            "{s}"
        );
    }
}
