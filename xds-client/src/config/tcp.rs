//! `envoy.filters.network.tcp_proxy` (with the `sni_cluster` filter that
//! may precede it).
use std::{sync::Arc, time::Duration};

use super::{AccessLog, Format, HeaderAdd, Name};

/// Where a TCP connection goes.
#[derive(Debug, Clone, PartialEq)]
pub enum TcpCluster {
    Name(Name),
    /// `weighted_clusters`: (cluster, weight).
    Weighted(Vec<(Name, u32)>),
}

/// `tcp_proxy` plus the cluster-choosing filters before it.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpProxy {
    /// `tcp.<stat_prefix>.`
    pub stat_prefix: String,
    pub cluster: TcpCluster,
    /// `envoy.filters.network.sni_cluster` precedes the proxy: the SNI, when
    /// present, names the cluster as is (Istio's AUTO_PASSTHROUGH gateways
    /// carry clusters named like the SNI, `outbound_.PORT_.SUBSET_.HOST`).
    pub sni_cluster: bool,
    /// `idle_timeout` (default 1 h; `None` when set to 0).
    pub idle_timeout: Option<Duration>,
    pub downstream_idle_timeout: Option<Duration>,
    pub upstream_idle_timeout: Option<Duration>,
    pub max_downstream_connection_duration: Option<Duration>,
    /// `max_connect_attempts` (default 1).
    pub max_connect_attempts: u32,
    pub access_logs: Vec<Arc<AccessLog>>,
    /// `hash_policy` `source_ip`: consistent-hash clusters pick the host by
    /// the downstream IP.
    pub hash_source_ip: bool,
    /// `hash_policy` `filter_state.key`: consistent-hash clusters pick the
    /// host by the connection's hashable filter state object under the key
    /// (no hash, a random pick, when it is absent or not hashable).
    /// Held as the one-policy list the hash function takes.
    pub hash_filter_state: Option<Arc<[super::HashPolicy]>>,
    /// `tunneling_config`: each downstream connection is carried in an
    /// HTTP CONNECT (or POST) stream to the cluster's host instead of a
    /// TCP connection of its own.
    pub tunneling: Option<Arc<TunnelingConfig>>,
}

/// `TcpProxy.TunnelingConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelingConfig {
    /// `hostname`: the request's `:authority` (a substitution format,
    /// e.g. `%DOWNSTREAM_LOCAL_ADDRESS%`).
    pub hostname: Format,
    /// `use_post`: `POST post_path` instead of `CONNECT`.
    pub use_post: bool,
    /// `post_path` (default `/`).
    pub post_path: String,
    /// `headers_to_add`, evaluated against the downstream connection.
    pub headers_to_add: Vec<HeaderAdd>,
}
