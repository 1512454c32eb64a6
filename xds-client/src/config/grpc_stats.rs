//! `envoy.filters.http.grpc_stats`: per-method gRPC stats.

/// `envoy.extensions.filters.http.grpc_stats.v3.FilterConfig`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrpcStatsConfig {
    /// Which methods get stats of their own.
    pub methods: GrpcStatsMethods,
    /// `enable_upstream_stats`: `upstream_rq_time` per method.
    pub enable_upstream_stats: bool,
    /// `replace_dots_in_grpc_service_name` (with `stats_for_all_methods`).
    pub replace_dots_in_grpc_service_name: bool,
    /// `emit_filter_state`: the request and response message counts as the
    /// `envoy.filters.http.grpc_stats` filter state object (Envoy's
    /// `GrpcStatsObject`, `filters::grpc_stats::GrpcStatsObject`).
    pub emit_filter_state: bool,
}

/// `per_method_stat_specifier`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum GrpcStatsMethods {
    /// Neither set, or `stats_for_all_methods: false` (Envoy's default):
    /// every gRPC request counts in the cluster's `grpc.*` bucket.
    #[default]
    None,
    /// `stats_for_all_methods: true`: every method has its stats.
    All,
    /// `individual_method_stats_allowlist`: (service, method) pairs with
    /// their own stats; others count in the `grpc.*` bucket.
    Allowlist(Vec<(String, String)>),
}
