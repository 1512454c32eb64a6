//! Network (L4) filters that run before a chain's terminal filter
//! (`tcp_proxy` or `http_connection_manager`): Envoy's read filters.
use std::{sync::Arc, time::Duration};

use super::Name;

/// One network filter before the terminal one.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadFilterConfig {
    pub name: Name,
    pub kind: ReadFilterKind,
}

/// The network filters weir runs, one variant per filter.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadFilterKind {
    /// `envoy.filters.network.local_ratelimit`.
    LocalRateLimit(Arc<NetworkLocalRateLimit>),
    /// `envoy.filters.network.rbac`.
    Rbac(Arc<super::NetworkRbac>),
    /// `envoy.filters.network.ext_authz`.
    ExtAuthz(Arc<super::NetworkExtAuthz>),
    /// `envoy.filters.network.set_filter_state` (`on_new_connection`).
    SetFilterState(Arc<super::SetFilterState>),
    /// Istio's network `istio.stats` in front of `tcp_proxy` (in front of
    /// the HCM it is passed through).
    IstioStats(Arc<super::IstioStatsConfig>),
    /// Istio's `istio.metadata_exchange` in front of `tcp_proxy` (in front
    /// of the HCM it is passed through).
    MetadataExchange(Arc<super::MetadataExchangeConfig>),
}

/// `envoy.type.v3.TokenBucket`, validated (`fill_interval` >= 50 ms, as
/// Envoy's local rate limiter requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenBucketConfig {
    pub max_tokens: u32,
    /// Default 1.
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

/// `envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkLocalRateLimit {
    /// Stats are `local_rate_limit.<stat_prefix>.rate_limited`.
    pub stat_prefix: String,
    pub token_bucket: TokenBucketConfig,
    /// `runtime_enabled.default_value` (default true; no runtime layer).
    pub enabled: bool,
    /// `share_key`: filters with the same key and token bucket share one
    /// bucket (empty: never shared).
    pub share_key: String,
}
