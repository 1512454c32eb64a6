//! `envoy.filters.http.ratelimit` translation.
use std::time::Duration;

use crate::api::envoy::extensions::filters::http::ratelimit::v3 as rl;
use crate::config::*;
use crate::error::{join, ConfigErrors};

/// `envoy.extensions.filters.http.ratelimit.v3.RateLimit`.
pub const RATE_LIMIT: &str = "envoy.extensions.filters.http.ratelimit.v3.RateLimit";

/// `RateLimit` -> [`HttpRateLimit`]; `path` names the `typed_config`.
pub fn rate_limit(p: &rl::RateLimit, path: &str) -> Result<HttpRateLimit, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.domain.is_empty() {
        errs.push(
            join(path, "domain"),
            "value length must be at least 1 characters",
        );
    }
    if p.stage > 10 {
        errs.push(
            join(path, "stage"),
            "value must be less than or equal to 10",
        );
    }
    let request_type = match p.request_type.as_str() {
        "" | "both" => RequestType::Both,
        "internal" => RequestType::Internal,
        "external" => RequestType::External,
        other => {
            errs.push(
                join(path, "request_type"),
                format!("{other:?} must be internal, external or both"),
            );
            RequestType::Both
        }
    };
    let timeout = match &p.timeout {
        Some(d) => match super::duration(d, &join(path, "timeout")) {
            Ok(d) => d,
            Err(e) => {
                errs.extend(e);
                Duration::ZERO
            }
        },
        None => Duration::from_millis(20),
    };
    // 0 is OFF; 1 is DRAFT_VERSION_03.
    if p.enable_x_ratelimit_headers > 1 {
        errs.push(
            join(path, "enable_x_ratelimit_headers"),
            "unknown x-ratelimit headers version",
        );
    }
    let spath = join(path, "rate_limit_service");
    let service = match &p.rate_limit_service {
        None => {
            errs.push(&spath, "rate_limit_service is required");
            None
        }
        Some(s) => {
            if !matches!(s.transport_api_version, 0 | 2) {
                errs.push(
                    join(&spath, "transport_api_version"),
                    "only the V3 transport API is supported",
                );
            }
            match &s.grpc_service {
                None => {
                    errs.push(join(&spath, "grpc_service"), "grpc_service is required");
                    None
                }
                Some(g) => match super::ext_authz::grpc_service(g, &join(&spath, "grpc_service")) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        errs.extend(e);
                        None
                    }
                },
            }
        }
    };
    let rate_limited_status = p
        .rate_limited_status
        .as_ref()
        .map(|s| s.code)
        .filter(|c| (400..=599).contains(c))
        .map(|c| c as u16)
        .unwrap_or(429);
    match service {
        Some(service) if errs.is_empty() => Ok(HttpRateLimit {
            domain: p.domain.clone(),
            stage: p.stage,
            request_type,
            timeout,
            failure_mode_deny: p.failure_mode_deny,
            service,
            x_ratelimit_headers: p.enable_x_ratelimit_headers == 1,
            disable_x_envoy_ratelimited_header: p.disable_x_envoy_ratelimited_header,
            rate_limited_as_resource_exhausted: p.rate_limited_as_resource_exhausted,
            rate_limited_status,
            filter_enabled: p
                .filter_enabled
                .as_ref()
                .map(super::local_ratelimit::runtime_fraction),
            filter_enforced: p
                .filter_enforced
                .as_ref()
                .map(super::local_ratelimit::runtime_fraction),
        }),
        _ => Err(errs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_and_service_are_required() {
        let e = rate_limit(&rl::RateLimit::default(), "f")
            .expect_err("rejected")
            .to_string();
        assert!(e.contains("f.domain"), "{e}");
        assert!(e.contains("f.rate_limit_service"), "{e}");
    }
}
