//! `envoy.filters.http.fault`: delays and aborts, as Envoy 1.40's
//! `FaultFilter::decodeHeaders`.
//!
//! Per request: the most specific per-route config (route, virtual host,
//! route configuration) replaces the filter's own; `upstream_cluster`,
//! `downstream_nodes` and `headers` must select the request; then a delay
//! (if its percentage hits, its duration is > 0 ms and an active-fault slot
//! is free) is injected, and the abort is evaluated after it (or at once
//! without a delay). An instance exists only for requests whose effective
//! config has a delay or an abort: istiod's empty `HTTPFault` costs nothing.
//!
//! No runtime layer: the `*_runtime` keys are accepted without effect, which
//! is what Envoy does when the runtime does not override them.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{request::Parts, HeaderMap};
use xds_client::config::{AbortKind, DelayKind, FaultConfig, FilterOverride, Fraction, Name};

use crate::http::{
    Action, Counter, FilterContext, Gauge, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};

const DELAY_REQUEST: &str = "x-envoy-fault-delay-request";
const DELAY_PERCENTAGE: &str = "x-envoy-fault-delay-request-percentage";
const ABORT_REQUEST: &str = "x-envoy-fault-abort-request";
const ABORT_GRPC_REQUEST: &str = "x-envoy-fault-abort-grpc-request";
const ABORT_PERCENTAGE: &str = "x-envoy-fault-abort-request-percentage";
const DOWNSTREAM_NODE: &str = "x-envoy-downstream-service-node";
const DOWNSTREAM_CLUSTER: &str = "x-envoy-downstream-service-cluster";

/// `%RESPONSE_CODE_DETAILS%` of an abort.
pub const FAULT_ABORT: &str = "fault_filter_abort";
const ABORT_BODY: &[u8] = b"fault filter abort";

/// The fault filter's factory: its config and the HCM-wide stats.
#[derive(Debug)]
pub struct FaultFactory {
    name: Name,
    config: Arc<FaultConfig>,
    shared: Arc<Shared>,
}

/// `http.<stat_prefix>.fault.*`, shared by every instance.
struct Shared {
    scope: Arc<dyn StatsScope>,
    delays_injected: Arc<dyn Counter>,
    aborts_injected: Arc<dyn Counter>,
    faults_overflow: Arc<dyn Counter>,
    active_faults: Arc<dyn Gauge>,
    /// Never incremented (`response_rate_limit` is rejected); Envoy
    /// creates it with the others.
    _response_rl_injected: Arc<dyn Counter>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// `fault.<downstream_cluster>.<stat>`: created on use (a fault was
    /// injected), as Envoy's dynamic stat names.
    fn count(&self, global: &Arc<dyn Counter>, cluster: Option<&str>, stat: &str) {
        if let Some(c) = cluster {
            self.scope.counter(&format!("fault.{c}.{stat}")).inc();
        }
        global.inc();
    }
}

// === impl FaultFactory ===

impl FaultFactory {
    pub fn new(name: Name, config: Arc<FaultConfig>, scope: &Arc<dyn StatsScope>) -> Self {
        FaultFactory {
            name,
            config,
            shared: Arc::new(Shared {
                scope: scope.clone(),
                delays_injected: scope.counter("fault.delays_injected"),
                aborts_injected: scope.counter("fault.aborts_injected"),
                faults_overflow: scope.counter("fault.faults_overflow"),
                active_faults: scope.gauge("fault.active_faults"),
                _response_rl_injected: scope.counter("fault.response_rl_injected"),
            }),
        }
    }
}

impl HttpFilterFactory for FaultFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn needs_route_config(&self) -> bool {
        // istiod's empty fault filter: only a route's override can act.
        !self.config.is_active()
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        let config = match route.override_for(&self.name) {
            Some(FilterOverride::Fault(f)) => f,
            // Another filter's config under this name: ignored, as Envoy.
            _ => &self.config,
        };
        if !config.is_active() {
            return None;
        }
        // As Envoy's `matchesTargetUpstreamCluster`.
        if let Some(want) = &config.upstream_cluster {
            if route.cluster != Some(want.as_str()) {
                return None;
            }
        }
        Some(Box::new(FaultFilter {
            config: config.clone(),
            shared: self.shared.clone(),
            slot: None,
        }))
    }
}

/// One request's fault state.
struct FaultFilter {
    config: Arc<FaultConfig>,
    shared: Arc<Shared>,
    /// The request's active-fault slot (at most one), once a fault started.
    slot: Option<Slot>,
}

/// One unit of `fault.active_faults`, given back when dropped: at stream
/// end (Envoy's `onDestroy`), or when a delay ends without an abort
/// (Envoy's `postDelayInjection`).
struct Slot(Arc<dyn Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// === impl FaultFilter ===

impl FaultFilter {
    /// As Envoy's `tryIncActiveFaults`: a request takes at most one slot;
    /// when `max_active_faults` are active the fault is skipped.
    fn try_activate(&mut self) -> bool {
        if self.slot.is_some() {
            return true;
        }
        if let Some(max) = self.config.max_active_faults {
            if self.shared.active_faults.value() >= i64::from(max) {
                self.shared.faults_overflow.inc();
                return false;
            }
        }
        self.shared.active_faults.inc();
        self.slot = Some(Slot(self.shared.active_faults.clone()));
        true
    }
}

impl HttpFilter for FaultFilter {
    fn on_request_headers(&mut self, cx: &mut FilterContext, head: &mut Parts) -> Action {
        let cfg = self.config.clone();
        if !selects(&cfg, head) {
            return Action::Continue;
        }
        let h = &head.headers;
        let cluster = h
            .get(DOWNSTREAM_CLUSTER)
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.is_empty());
        let has_cluster = cluster.is_some();
        let stat_cluster = cluster
            .filter(|_| !cfg.disable_downstream_cluster_stats)
            .map(str::to_owned);
        let mut random = rand::random::<u64>;
        if let Some(d) = delay_for(&cfg, h, has_cluster, &mut random) {
            if self.try_activate() {
                self.shared.count(
                    &self.shared.delays_injected,
                    stat_cluster.as_deref(),
                    "delays_injected",
                );
                cx.flags.push("DI");
                tracing::debug!(delay_ms = d.as_millis() as u64, "fault: delaying request");
                let inputs = AbortInputs::from_headers(h);
                let shared = self.shared.clone();
                // The future owns the slot: dropping it (the delay ends, or
                // the client goes away during it) gives the slot back.
                let slot = self.slot.take();
                return Action::Wait(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    // Delays can be followed by aborts (no new slot needed);
                    // without one, the slot is given back at once, as Envoy.
                    let _slot = slot;
                    let mut random = rand::random::<u64>;
                    match abort_for(&cfg, &inputs, has_cluster, &mut random) {
                        Some(a) => {
                            shared.count(
                                &shared.aborts_injected,
                                stat_cluster.as_deref(),
                                "aborts_injected",
                            );
                            Action::Respond(local_reply(&cfg, a))
                        }
                        None => Action::Continue,
                    }
                }));
            }
        }
        let inputs = AbortInputs::from_headers(h);
        match abort_for(&cfg, &inputs, has_cluster, &mut random) {
            Some(a) if self.try_activate() => {
                self.shared.count(
                    &self.shared.aborts_injected,
                    stat_cluster.as_deref(),
                    "aborts_injected",
                );
                Action::Respond(local_reply(&cfg, a))
            }
            _ => Action::Continue,
        }
    }
}

/// `downstream_nodes` and `headers` (`upstream_cluster` is checked when the
/// instance is created).
fn selects(cfg: &FaultConfig, head: &Parts) -> bool {
    if !cfg.downstream_nodes.is_empty() {
        let node = head
            .headers
            .get(DOWNSTREAM_NODE)
            .and_then(|v| v.to_str().ok());
        if !node.is_some_and(|n| cfg.downstream_nodes.iter().any(|d| d == n)) {
            return false;
        }
    }
    cfg.headers.iter().all(|m| m.matches_head(head))
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    // As absl::SimpleAtoi: surrounding whitespace is allowed.
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// As Envoy's `HeaderPercentageProvider`: the header lowers the configured
/// numerator (never raises it); the denominator stays.
fn header_fraction(configured: Fraction, header: Option<u64>) -> Fraction {
    match header {
        Some(n) => Fraction {
            numerator: u32::try_from(n)
                .unwrap_or(u32::MAX)
                .min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

/// As Envoy's `isDelayEnabled`/`isAbortEnabled`: the percentage is rolled,
/// and rolled again (for the downstream cluster's runtime key) when the
/// request names its downstream cluster.
fn enabled(p: Fraction, has_cluster: bool, random: &mut impl FnMut() -> u64) -> bool {
    p.hit(random()) || (has_cluster && p.hit(random()))
}

/// The delay to inject, as Envoy's `delayDuration`: whole milliseconds,
/// none when 0.
pub fn delay_for(
    cfg: &FaultConfig,
    h: &HeaderMap,
    has_cluster: bool,
    random: &mut impl FnMut() -> u64,
) -> Option<Duration> {
    let d = cfg.delay.as_ref()?;
    let (pct, ms) = match d.kind {
        DelayKind::Fixed(t) => (d.percentage, Some(t.as_millis() as u64)),
        DelayKind::Header => (
            header_fraction(d.percentage, header_u64(h, DELAY_PERCENTAGE)),
            header_u64(h, DELAY_REQUEST),
        ),
    };
    if !enabled(pct, has_cluster, random) {
        return None;
    }
    ms.filter(|ms| *ms > 0).map(Duration::from_millis)
}

/// The abort headers of a request, read before a delay.
#[derive(Debug, Clone, Copy, Default)]
pub struct AbortInputs {
    pub http: Option<u64>,
    pub grpc: Option<u64>,
    pub percentage: Option<u64>,
}

impl AbortInputs {
    pub fn from_headers(h: &HeaderMap) -> Self {
        AbortInputs {
            http: header_u64(h, ABORT_REQUEST),
            grpc: header_u64(h, ABORT_GRPC_REQUEST),
            percentage: header_u64(h, ABORT_PERCENTAGE),
        }
    }
}

/// An abort: HTTP status and, for gRPC aborts, the gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    pub status: u16,
    pub grpc_status: Option<u32>,
}

/// As Envoy's `abortStatus`: an HTTP status wins; else a gRPC status gives
/// HTTP 200 with that grpc-status.
pub fn abort_for(
    cfg: &FaultConfig,
    inputs: &AbortInputs,
    has_cluster: bool,
    random: &mut impl FnMut() -> u64,
) -> Option<Abort> {
    let a = cfg.abort.as_ref()?;
    let pct = match a.kind {
        AbortKind::Header => header_fraction(a.percentage, inputs.percentage),
        _ => a.percentage,
    };
    if !enabled(pct, has_cluster, random) {
        return None;
    }
    let (http, grpc) = match a.kind {
        AbortKind::Http(s) => (Some(s), None),
        AbortKind::Grpc(g) => (None, Some(g)),
        AbortKind::Header => (
            inputs
                .http
                .filter(|c| (200..600).contains(c))
                .map(|c| c as u16),
            inputs.grpc.map(|g| g as u32),
        ),
    };
    match (http, grpc) {
        (Some(status), _) => Some(Abort {
            status,
            grpc_status: None,
        }),
        (None, Some(g)) => Some(Abort {
            status: 200,
            grpc_status: Some(g),
        }),
        (None, None) => None,
    }
}

fn local_reply(cfg: &FaultConfig, a: Abort) -> LocalReply {
    let body = cfg
        .abort
        .as_ref()
        .and_then(|a| a.body.clone())
        .unwrap_or_else(|| Bytes::from_static(ABORT_BODY));
    LocalReply {
        status: http::StatusCode::from_u16(a.status).unwrap_or(http::StatusCode::OK),
        body,
        flag: Some("FI"),
        details: FAULT_ABORT,
        grpc_status: a.grpc_status,
    }
}

#[cfg(test)]
mod tests;
