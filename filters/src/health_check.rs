//! `envoy.filters.http.health_check` (Envoy's `HealthCheckFilter`).
//!
//! A request whose headers match all of `headers` is a health check. Without
//! `pass_through_mode` it is answered here with an empty body: 503 (flag
//! `LH`) when the server fails health checks (admin `/healthcheck/fail`) or
//! when a cluster of `cluster_min_healthy_percentages` is missing, empty
//! (unless its minimum is 0) or below its minimum healthy share; else 200.
//! With `pass_through_mode` it goes upstream, unless the server fails
//! health checks (503 here) or `cache_time` holds an earlier upstream
//! answer (reused). Responses to health checks carry
//! `x-envoy-upstream-healthchecked-cluster: <local cluster>`; other
//! responses carry `x-envoy-immediate-health-check-fail: true` while the
//! server fails health checks.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tokio::time::Instant;
use xds_client::config::{HealthCheckConfig, Name};

use crate::callout::Callouts;
use crate::{Action, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView};

const HEALTHCHECKED_CLUSTER: &str = "x-envoy-upstream-healthchecked-cluster";
const IMMEDIATE_FAIL: &str = "x-envoy-immediate-health-check-fail";

#[derive(Debug)]
pub struct HealthCheckFactory {
    name: Name,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<HealthCheckConfig>,
    server: Arc<dyn Callouts>,
    /// `cache_time`: the last upstream status, valid until the cache period
    /// it was stored in ends (Envoy clears it on a timer every period).
    cache: Mutex<Option<(StatusCode, Instant)>>,
    created: Instant,
}

impl HealthCheckFactory {
    pub fn new(name: Name, config: Arc<HealthCheckConfig>, server: &Arc<dyn Callouts>) -> Self {
        HealthCheckFactory {
            name,
            inner: Arc::new(Inner {
                config,
                server: server.clone(),
                cache: Mutex::new(None),
                created: Instant::now(),
            }),
        }
    }
}

impl Inner {
    /// The end of the cache period `t` falls in.
    fn period_end(&self, period: Duration, t: Instant) -> Instant {
        let n = t.duration_since(self.created).as_nanos() / period.as_nanos().max(1);
        let next = u32::try_from(n + 1).unwrap_or(u32::MAX);
        self.created + period.saturating_mul(next)
    }

    fn cached(&self) -> Option<StatusCode> {
        let period = self.config.cache_time?;
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (status, at) = (*c)?;
        (Instant::now() < self.period_end(period, at)).then_some(status)
    }

    fn store(&self, status: StatusCode) {
        if self.config.cache_time.is_some() {
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((status, Instant::now()));
        }
    }

    /// The local answer: status, details, whether it is a failure.
    fn answer(&self) -> (StatusCode, &'static str, bool) {
        if self.server.health_check_failed() {
            return (StatusCode::SERVICE_UNAVAILABLE, "health_check_failed", true);
        }
        if let Some(status) = self.cached() {
            let failed = !status.is_success();
            return (status, "health_check_cached", failed);
        }
        for (cluster, min) in &self.config.cluster_min_healthy {
            let fail = match self.server.cluster_membership(cluster) {
                None => Some("health_check_failed_no_cluster_found"),
                Some((0, _)) if *min == 0.0 => None,
                Some((0, _)) => Some("health_check_failed_cluster_empty"),
                Some((total, healthy)) => ((healthy as f64) < (total as f64) * min / 100.0)
                    .then_some("health_check_failed_cluster_unhealthy"),
            };
            if let Some(details) = fail {
                return (StatusCode::SERVICE_UNAVAILABLE, details, true);
            }
        }
        let details = if self.config.cluster_min_healthy.is_empty() {
            "health_check_ok"
        } else {
            "health_check_ok_cluster_healthy"
        };
        (StatusCode::OK, details, false)
    }
}

impl HttpFilterFactory for HealthCheckFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, _: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        Some(Box::new(HealthCheckFilter {
            inner: self.inner.clone(),
            health_check: false,
        }))
    }
}

struct HealthCheckFilter {
    inner: Arc<Inner>,
    health_check: bool,
}

impl HttpFilter for HealthCheckFilter {
    fn on_request_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let c = &self.inner.config;
        if !c.headers.iter().all(|m| m.matches_head(head)) {
            return Action::Continue;
        }
        self.health_check = true;
        let handle = !c.pass_through
            || self.inner.server.health_check_failed()
            || self.inner.cached().is_some();
        if !handle {
            return Action::Continue;
        }
        let (status, details, failed) = self.inner.answer();
        Action::Respond(LocalReply {
            status,
            body: Bytes::new(),
            flag: failed.then_some("LH"),
            details,
            grpc_status: None,
        })
    }

    fn on_response_headers(
        &mut self,
        _cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        if self.health_check {
            self.inner.store(head.status);
            if let Ok(v) = HeaderValue::from_str(&self.inner.server.local_cluster()) {
                head.headers.insert(HEALTHCHECKED_CLUSTER, v);
            }
        } else if self.inner.server.health_check_failed() {
            head.headers
                .insert(IMMEDIATE_FAIL, HeaderValue::from_static("true"));
        }
        Action::Continue
    }
}
