//! `envoy.filters.http.fault` (`HTTPFault`).
use std::time::Duration;

use super::HeaderMatcher;

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`, validated.
///
/// The `*_runtime` keys are accepted and have no effect: weir has no runtime
/// layer, so what Envoy does without runtime overrides is what weir does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultConfig {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// `upstream_cluster`: faults apply only to requests routed there.
    pub upstream_cluster: Option<String>,
    /// `headers`: all must match for a fault to apply.
    pub headers: Vec<HeaderMatcher>,
    /// `downstream_nodes`: `x-envoy-downstream-service-node` must be one of
    /// these (when non-empty).
    pub downstream_nodes: Vec<String>,
    /// `max_active_faults` (`None`: unlimited).
    pub max_active_faults: Option<u32>,
    pub disable_downstream_cluster_stats: bool,
}

impl FaultConfig {
    /// Whether this config can inject anything: without `delay` and `abort`
    /// Envoy's filter does nothing (istiod installs it so everywhere).
    pub fn is_active(&self) -> bool {
        self.delay.is_some() || self.abort.is_some()
    }
}

/// `FractionalPercent`: `numerator` out of `denominator` (100, 10 000 or
/// 1 000 000). Unset is 0 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

impl Default for Fraction {
    fn default() -> Self {
        Fraction {
            numerator: 0,
            denominator: 100,
        }
    }
}

impl Fraction {
    /// As Envoy's `ProtobufPercentHelper::evaluateFractionalPercent`: true
    /// when `random % denominator < numerator`.
    pub fn hit(self, random: u64) -> bool {
        (random % u64::from(self.denominator)) < u64::from(self.numerator)
    }
}

/// `HTTPFault.delay` (`FaultDelay`).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    pub kind: DelayKind,
    pub percentage: Fraction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DelayKind {
    /// `fixed_delay`.
    Fixed(Duration),
    /// `header_delay`: `x-envoy-fault-delay-request` in milliseconds.
    Header,
}

/// `HTTPFault.abort` (`FaultAbort`).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    pub kind: AbortKind,
    pub percentage: Fraction,
    /// `response_body` (default `fault filter abort`).
    pub body: Option<bytes::Bytes>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AbortKind {
    /// `http_status` in [200, 600).
    Http(u16),
    /// `grpc_status`.
    Grpc(u32),
    /// `header_abort`: `x-envoy-fault-abort-request` /
    /// `x-envoy-fault-abort-grpc-request`.
    Header,
}
