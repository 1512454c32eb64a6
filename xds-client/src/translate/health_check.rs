//! `envoy.filters.http.health_check` -> [`HealthCheckConfig`].
use crate::api::envoy::extensions::filters::http::health_check::v3::HealthCheck;
use crate::config::HealthCheckConfig;
use crate::error::{join, ConfigErrors};

pub const HEALTH_CHECK: &str = "envoy.extensions.filters.http.health_check.v3.HealthCheck";

pub fn health_check(p: &HealthCheck, path: &str) -> Result<HealthCheckConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    // As Envoy's proto validation: `pass_through_mode` is required.
    let pass_through = match &p.pass_through_mode {
        Some(b) => b.value,
        None => {
            errs.push(
                join(path, "pass_through_mode"),
                "pass_through_mode is required",
            );
            false
        }
    };
    let cache_time = match &p.cache_time {
        Some(d) => match super::duration(d, &join(path, "cache_time")) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    let mut cluster_min_healthy = Vec::new();
    for (name, pct) in &p.cluster_min_healthy_percentages {
        if !(0.0..=100.0).contains(&pct.value) {
            errs.push(
                format!(
                    "{}[{name:?}].value",
                    join(path, "cluster_min_healthy_percentages")
                ),
                "a percentage is between 0 and 100",
            );
        }
        cluster_min_healthy.push((name.clone(), pct.value));
    }
    cluster_min_healthy.sort_by(|a, b| a.0.cmp(&b.0));
    let mut headers = Vec::new();
    for (i, h) in p.headers.iter().enumerate() {
        match super::route::header_matcher(h, &format!("{}[{i}]", join(path, "headers"))) {
            Ok(m) => headers.push(m),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(HealthCheckConfig {
        pass_through,
        cache_time,
        cluster_min_healthy,
        headers,
    })
}
