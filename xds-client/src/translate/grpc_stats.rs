//! `envoy.filters.http.grpc_stats` translation.
use crate::api::envoy::extensions::filters::http::grpc_stats::v3 as g;
use crate::config::{GrpcStatsConfig, GrpcStatsMethods};

/// `envoy.extensions.filters.http.grpc_stats.v3.FilterConfig`.
pub const GRPC_STATS: &str = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";

/// `FilterConfig` -> [`GrpcStatsConfig`]. Every field is honoured,
/// `emit_filter_state` included (the `envoy.filters.http.grpc_stats` filter
/// state object; istiod always sets it).
pub fn grpc_stats(p: &g::FilterConfig) -> GrpcStatsConfig {
    use g::filter_config::PerMethodStatSpecifier as S;
    let methods = match &p.per_method_stat_specifier {
        Some(S::StatsForAllMethods(b)) if b.value => GrpcStatsMethods::All,
        Some(S::StatsForAllMethods(_)) | None => GrpcStatsMethods::None,
        Some(S::IndividualMethodStatsAllowlist(l)) => GrpcStatsMethods::Allowlist(
            l.services
                .iter()
                .flat_map(|s| s.method_names.iter().map(|m| (s.name.clone(), m.clone())))
                .collect(),
        ),
    };
    GrpcStatsConfig {
        methods,
        enable_upstream_stats: p.enable_upstream_stats,
        replace_dots_in_grpc_service_name: p.replace_dots_in_grpc_service_name,
        emit_filter_state: p.emit_filter_state,
    }
}
