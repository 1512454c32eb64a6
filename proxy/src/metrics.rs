//! Envoy-compatible stat groups for the HTTP connection manager, listeners
//! and the server.
use std::sync::Arc;

use crate::stats::{Counter, Gauge, Histogram, StatName, Store};

/// `http.<stat_prefix>.*`.
pub struct HttpStats {
    pub rq_total: Arc<Counter>,
    pub rq_active: Arc<Gauge>,
    pub rq_xx: [Arc<Counter>; 5],
    pub rq_time: Arc<Histogram>,
    pub cx_total: Arc<Counter>,
    pub cx_active: Arc<Gauge>,
    pub cx_http1_total: Arc<Counter>,
    pub cx_http2_total: Arc<Counter>,
    pub no_route: Arc<Counter>,
    pub no_cluster: Arc<Counter>,
    pub rq_redirect: Arc<Counter>,
    pub rq_direct_response: Arc<Counter>,
    pub rq_reset: Arc<Counter>,
    pub rq_idle_timeout: Arc<Counter>,
    pub rq_timeout: Arc<Counter>,
    pub rq_max_duration_reached: Arc<Counter>,
    pub cx_idle_timeout: Arc<Counter>,
    pub cx_max_duration_reached: Arc<Counter>,
    pub cx_max_requests_reached: Arc<Counter>,
    /// The router's `passthrough_internal_redirect_*`: why an internal
    /// redirect was not followed.
    pub passthrough_internal_redirect: [Arc<Counter>; 5],
}

impl HttpStats {
    pub fn new(store: &Store, prefix: &str) -> Self {
        let t = |s: &str| StatName::tagged("http", prefix, s, "envoy_http_conn_manager_prefix");
        HttpStats {
            rq_total: store.counter(t("downstream_rq_total")),
            rq_active: store.gauge(t("downstream_rq_active")),
            rq_xx: [
                store.counter(t("downstream_rq_1xx")),
                store.counter(t("downstream_rq_2xx")),
                store.counter(t("downstream_rq_3xx")),
                store.counter(t("downstream_rq_4xx")),
                store.counter(t("downstream_rq_5xx")),
            ],
            rq_time: store.histogram(t("downstream_rq_time")),
            cx_total: store.counter(t("downstream_cx_total")),
            cx_active: store.gauge(t("downstream_cx_active")),
            cx_http1_total: store.counter(t("downstream_cx_http1_total")),
            cx_http2_total: store.counter(t("downstream_cx_http2_total")),
            no_route: store.counter(t("no_route")),
            no_cluster: store.counter(t("no_cluster")),
            rq_redirect: store.counter(t("rq_redirect")),
            rq_direct_response: store.counter(t("rq_direct_response")),
            rq_reset: store.counter(t("downstream_rq_rx_reset")),
            rq_idle_timeout: store.counter(t("downstream_rq_idle_timeout")),
            rq_timeout: store.counter(t("downstream_rq_timeout")),
            rq_max_duration_reached: store.counter(t("downstream_rq_max_duration_reached")),
            cx_idle_timeout: store.counter(t("downstream_cx_idle_timeout")),
            cx_max_duration_reached: store.counter(t("downstream_cx_max_duration_reached")),
            cx_max_requests_reached: store.counter(t("downstream_cx_max_requests_reached")),
            passthrough_internal_redirect: [
                store.counter(t("passthrough_internal_redirect_bad_location")),
                store.counter(t("passthrough_internal_redirect_unsafe_scheme")),
                store.counter(t("passthrough_internal_redirect_too_many_redirects")),
                store.counter(t("passthrough_internal_redirect_no_route")),
                store.counter(t("passthrough_internal_redirect_predicate")),
            ],
        }
    }

    pub fn record_status(&self, status: u16) {
        let i = (status / 100) as usize;
        if (1..=5).contains(&i) {
            self.rq_xx[i - 1].inc();
        }
    }
}

/// The HCM's stats scope as the filters see it: names relative to
/// `http.<stat_prefix>.`, tagged like the HCM's own stats.
pub struct HttpFilterStats {
    store: Arc<Store>,
    prefix: String,
}

impl std::fmt::Debug for HttpFilterStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFilterStats")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl HttpFilterStats {
    pub fn scope(store: &Arc<Store>, prefix: &str) -> Arc<dyn filters::StatsScope> {
        Arc::new(HttpFilterStats {
            store: store.clone(),
            prefix: prefix.to_owned(),
        })
    }

    fn name(&self, rest: &str) -> StatName {
        let n = StatName::tagged("http", &self.prefix, rest, "envoy_http_conn_manager_prefix");
        // As Envoy's `envoy.fault_downstream_cluster` tag extractor:
        // `http.<prefix>.fault.<downstream_cluster>.<stat>`.
        match rest.strip_prefix("fault.").and_then(|r| r.rsplit_once('.')) {
            Some((cluster, _)) => {
                let start = "http.".len() + self.prefix.len() + ".fault.".len();
                n.with_second_tag(start, cluster.len(), "envoy_fault_downstream_cluster")
            }
            None => n,
        }
    }
}

impl filters::Counter for Counter {
    fn inc(&self) {
        Counter::inc(self)
    }
    fn add(&self, n: u64) {
        Counter::add(self, n)
    }
}

impl filters::Histogram for Histogram {
    fn record(&self, ms: u64) {
        self.record_us(ms.saturating_mul(1000))
    }
}

/// `cluster.<cluster>.<rest>`, tagged as Envoy's default extractors:
/// the cluster name, and for `grpc.<service>.<...>` the gRPC service
/// (`envoy.grpc_bridge_service`). Envoy also extracts the method
/// (`envoy.grpc_bridge_method`); weir's stats keep two tags at most.
fn cluster_stat_name(cluster: &str, rest: &str) -> StatName {
    let n = StatName::tagged("cluster", cluster, rest, "envoy_cluster_name");
    match rest.strip_prefix("grpc.").and_then(|r| r.split_once('.')) {
        Some((service, _)) => {
            let start = "cluster.".len() + cluster.len() + ".grpc.".len();
            n.with_second_tag(start, service.len(), "envoy_grpc_bridge_service")
        }
        None => n,
    }
}

impl filters::Gauge for Gauge {
    fn inc(&self) {
        Gauge::inc(self)
    }
    fn dec(&self) {
        Gauge::dec(self)
    }
    fn value(&self) -> i64 {
        Gauge::value(self)
    }
}

impl filters::StatsScope for HttpFilterStats {
    fn counter(&self, name: &str) -> Arc<dyn filters::Counter> {
        self.store.counter(self.name(name))
    }
    fn gauge(&self, name: &str) -> Arc<dyn filters::Gauge> {
        self.store.gauge(self.name(name))
    }
    fn cluster_counter(&self, cluster: &str, name: &str) -> Arc<dyn filters::Counter> {
        self.store.counter(cluster_stat_name(cluster, name))
    }
    fn cluster_histogram(&self, cluster: &str, name: &str) -> Arc<dyn filters::Histogram> {
        self.store.histogram(cluster_stat_name(cluster, name))
    }
    fn root(&self) -> Option<Arc<dyn filters::StatsScope>> {
        Some(RootFilterStats::scope(&self.store))
    }
    fn labeled_counter(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<dyn filters::Counter> {
        self.store.labeled_counter(namespace, name, labels)
    }
    fn labeled_histogram(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<dyn filters::Histogram> {
        self.store.labeled_histogram(namespace, name, labels)
    }
}

/// The store's root as a filter stats scope (network filters: names are
/// absolute).
pub struct RootFilterStats {
    store: Arc<Store>,
}

impl std::fmt::Debug for RootFilterStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootFilterStats")
    }
}

impl RootFilterStats {
    pub fn scope(store: &Arc<Store>) -> Arc<dyn filters::StatsScope> {
        Arc::new(RootFilterStats {
            store: store.clone(),
        })
    }
}

impl filters::StatsScope for RootFilterStats {
    fn counter(&self, name: &str) -> Arc<dyn filters::Counter> {
        self.store.counter(StatName::plain(name))
    }
    fn gauge(&self, name: &str) -> Arc<dyn filters::Gauge> {
        self.store.gauge(StatName::plain(name))
    }
    fn labeled_counter(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<dyn filters::Counter> {
        self.store.labeled_counter(namespace, name, labels)
    }
    fn labeled_histogram(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<dyn filters::Histogram> {
        self.store.labeled_histogram(namespace, name, labels)
    }
    fn tagged_counter(
        &self,
        head: &str,
        value: &str,
        rest: &str,
        tag: &'static str,
    ) -> Arc<dyn filters::Counter> {
        self.store.counter(StatName::tagged(head, value, rest, tag))
    }
}

/// `listener.<address>.*`.
pub struct ListenerStats {
    pub cx_total: Arc<Counter>,
    pub cx_active: Arc<Gauge>,
    pub cx_overflow: Arc<Counter>,
    /// Refused by the global (overload manager) connection limit.
    pub global_cx_overflow: Arc<Counter>,
    pub no_filter_chain_match: Arc<Counter>,
    /// `listener.<addr>.ssl.*`.
    pub ssl: Arc<SslStats>,
    /// `listener.<addr>.downstream_pre_cx_timeout` (listener filters).
    pub pre_cx_timeout: Arc<Counter>,
    /// `tls_inspector.*` and `http_inspector.*` (`proxy_proto.*`: [`ProxyProtoStats`]).
    pub tls_inspector_found: Arc<Counter>,
    pub tls_inspector_not_found: Arc<Counter>,
    pub tls_inspector_sni_found: Arc<Counter>,
    pub tls_inspector_too_large: Arc<Counter>,
    pub http_inspector_http10: Arc<Counter>,
    pub http_inspector_http11: Arc<Counter>,
    pub http_inspector_http2: Arc<Counter>,
    pub http_inspector_not_found: Arc<Counter>,
}

/// One `proxy_protocol` listener filter's stats, as Envoy 1.40's:
/// `proxy_proto.[<stat_prefix>.]versions.v1|v2.found|disallowed|error`,
/// `proxy_proto.[<stat_prefix>.]not_found_allowed|not_found_disallowed`,
/// and the legacy unprefixed `downstream_cx_proxy_proto_error`. Created
/// with the filter (so they read 0 before any connection), shared by
/// filters with the same prefix.
pub struct ProxyProtoStats {
    /// Indexed by `version == 2`.
    pub found: [Arc<Counter>; 2],
    pub disallowed: [Arc<Counter>; 2],
    pub error: [Arc<Counter>; 2],
    pub not_found_allowed: Arc<Counter>,
    pub not_found_disallowed: Arc<Counter>,
    pub cx_error: Arc<Counter>,
}

impl ProxyProtoStats {
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let root = if stat_prefix.is_empty() {
            "proxy_proto.".to_owned()
        } else {
            format!("proxy_proto.{stat_prefix}.")
        };
        let c = |s: &str| store.counter(StatName::plain(format!("{root}{s}")));
        ProxyProtoStats {
            found: [c("versions.v1.found"), c("versions.v2.found")],
            disallowed: [c("versions.v1.disallowed"), c("versions.v2.disallowed")],
            error: [c("versions.v1.error"), c("versions.v2.error")],
            not_found_allowed: c("not_found_allowed"),
            not_found_disallowed: c("not_found_disallowed"),
            cx_error: store.counter(StatName::plain("downstream_cx_proxy_proto_error")),
        }
    }
}

impl ListenerStats {
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        // stat_prefix is "listener.<addr>." : extract the address as a tag.
        let addr = stat_prefix
            .trim_start_matches("listener.")
            .trim_end_matches('.');
        let t = |s: &str| StatName::tagged("listener", addr, s, "envoy_listener_address");
        ListenerStats {
            cx_total: store.counter(t("downstream_cx_total")),
            cx_active: store.gauge(t("downstream_cx_active")),
            cx_overflow: store.counter(t("downstream_cx_overflow")),
            global_cx_overflow: store.counter(t("downstream_global_cx_overflow")),
            no_filter_chain_match: store.counter(t("no_filter_chain_match")),
            ssl: Arc::new(SslStats::new(store, |s| t(&format!("ssl.{s}")))),
            pre_cx_timeout: store.counter(t("downstream_pre_cx_timeout")),
            tls_inspector_found: store.counter(StatName::plain("tls_inspector.tls_found")),
            tls_inspector_not_found: store.counter(StatName::plain("tls_inspector.tls_not_found")),
            tls_inspector_sni_found: store.counter(StatName::plain("tls_inspector.sni_found")),
            tls_inspector_too_large: store
                .counter(StatName::plain("tls_inspector.client_hello_too_large")),
            http_inspector_http10: store.counter(StatName::plain("http_inspector.http10_found")),
            http_inspector_http11: store.counter(StatName::plain("http_inspector.http11_found")),
            http_inspector_http2: store.counter(StatName::plain("http_inspector.http2_found")),
            http_inspector_not_found: store
                .counter(StatName::plain("http_inspector.http_not_found")),
        }
    }
}

/// `<scope>.ssl.*` for a listener or a cluster.
pub struct SslStats {
    pub handshake: Arc<Counter>,
    pub connection_error: Arc<Counter>,
    pub no_certificate: Arc<Counter>,
    pub fail_verify_error: Arc<Counter>,
    pub fail_verify_san: Arc<Counter>,
    pub fail_verify_cert_hash: Arc<Counter>,
    pub fail_verify_no_cert: Arc<Counter>,
    pub session_reused: Arc<Counter>,
    pub ocsp_staple_requests: Arc<Counter>,
    pub ocsp_staple_responses: Arc<Counter>,
    pub ocsp_staple_omitted: Arc<Counter>,
    pub ocsp_staple_failed: Arc<Counter>,
}

impl std::fmt::Debug for SslStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SslStats")
    }
}

impl SslStats {
    pub fn new(store: &Store, name: impl Fn(&str) -> StatName) -> Self {
        SslStats {
            handshake: store.counter(name("handshake")),
            connection_error: store.counter(name("connection_error")),
            no_certificate: store.counter(name("no_certificate")),
            fail_verify_error: store.counter(name("fail_verify_error")),
            fail_verify_san: store.counter(name("fail_verify_san")),
            fail_verify_cert_hash: store.counter(name("fail_verify_cert_hash")),
            fail_verify_no_cert: store.counter(name("fail_verify_no_cert")),
            session_reused: store.counter(name("session_reused")),
            ocsp_staple_requests: store.counter(name("ocsp_staple_requests")),
            ocsp_staple_responses: store.counter(name("ocsp_staple_responses")),
            ocsp_staple_omitted: store.counter(name("ocsp_staple_omitted")),
            ocsp_staple_failed: store.counter(name("ocsp_staple_failed")),
        }
    }

    pub fn count_failure(&self, why: crate::tls::verify::VerifyFailure) {
        use crate::tls::verify::VerifyFailure as F;
        match why {
            F::Chain => self.fail_verify_error.inc(),
            F::San => self.fail_verify_san.inc(),
            F::Pin => self.fail_verify_cert_hash.inc(),
        }
    }
}

/// `weir.pass_through_filter.<name>` (weir's own; Envoy has no such stat):
/// gauges of the filter chains alive whose configuration has a filter weir
/// accepts without running it (ARCHITECTURE.md "Pass-through filters"),
/// one per occurrence. A chain's runtime holds this; dropping the runtime
/// (the chain was replaced or removed and has drained) takes it back.
pub struct PassThroughStats(Vec<Arc<Gauge>>);

impl PassThroughStats {
    pub fn new(
        store: &Store,
        filters: impl IntoIterator<Item = xds_client::config::PassThrough>,
    ) -> Self {
        let gauges: Vec<Arc<Gauge>> = filters
            .into_iter()
            .map(|f| {
                let g = store.gauge(StatName::plain(format!(
                    "weir.pass_through_filter.{}",
                    f.stat_name()
                )));
                g.inc();
                g
            })
            .collect();
        PassThroughStats(gauges)
    }
}

impl Drop for PassThroughStats {
    fn drop(&mut self) {
        for g in &self.0 {
            g.dec();
        }
    }
}

/// `tcp.<stat_prefix>.*`.
pub struct TcpStats {
    pub cx_total: Arc<Counter>,
    pub cx_no_route: Arc<Counter>,
    pub cx_tx_bytes_total: Arc<Counter>,
    pub cx_rx_bytes_total: Arc<Counter>,
    pub idle_timeout: Arc<Counter>,
    pub max_duration_reached: Arc<Counter>,
    pub upstream_flush_active: Arc<Gauge>,
}

impl TcpStats {
    pub fn new(store: &Store, stat_prefix: &str) -> Self {
        let prefix = stat_prefix.trim_start_matches("tcp.").trim_end_matches('.');
        let t = |s: &str| StatName::tagged("tcp", prefix, s, "envoy_tcp_prefix");
        TcpStats {
            cx_total: store.counter(t("downstream_cx_total")),
            cx_no_route: store.counter(t("downstream_cx_no_route")),
            cx_tx_bytes_total: store.counter(t("downstream_cx_tx_bytes_total")),
            cx_rx_bytes_total: store.counter(t("downstream_cx_rx_bytes_total")),
            idle_timeout: store.counter(t("idle_timeout")),
            max_duration_reached: store.counter(t("max_downstream_connection_duration")),
            upstream_flush_active: store.gauge(t("upstream_flush_active")),
        }
    }
}

/// `server.*`, `listener_manager.*`, `cluster_manager.*`.
pub struct ServerStats {
    pub state: Arc<Gauge>,
    pub live: Arc<Gauge>,
    pub uptime: Arc<Gauge>,
    pub concurrency: Arc<Gauge>,
    pub workers_started: Arc<Gauge>,
    pub total_listeners_active: Arc<Gauge>,
    pub active_clusters: Arc<Gauge>,
    pub total_connections: Arc<Gauge>,
    pub overflow: Arc<Counter>,
    pub listener_stopped: Arc<Counter>,
    pub listener_added: Arc<Counter>,
    pub listener_modified: Arc<Counter>,
    pub listener_removed: Arc<Counter>,
    pub listener_create_failure: Arc<Counter>,
    pub total_listeners_warming: Arc<Gauge>,
    pub warming_clusters: Arc<Gauge>,
    pub connected_state: Arc<Gauge>,
    /// `cluster_manager.cds.*` and `listener_manager.lds.*`.
    pub cds: XdsStats,
    pub lds: XdsStats,
}

/// One xDS subscription's stats (`update_attempt`, ...).
pub struct XdsStats {
    pub update_attempt: Arc<Counter>,
    pub update_success: Arc<Counter>,
    pub update_rejected: Arc<Counter>,
    /// A hash of the last accepted `version_info` (Envoy's `version`).
    pub version: Arc<Gauge>,
    /// The last accepted `version_info` (Envoy's `version_text`).
    pub version_text: Arc<crate::stats::TextReadout>,
}

impl XdsStats {
    pub fn new(store: &Store, prefix: &str) -> Self {
        let c = |s: &str| store.counter(StatName::plain(format!("{prefix}.{s}")));
        XdsStats {
            update_attempt: c("update_attempt"),
            update_success: c("update_success"),
            update_rejected: c("update_rejected"),
            version: store.gauge(StatName::plain(format!("{prefix}.version"))),
            version_text: store.text(StatName::plain(format!("{prefix}.version_text"))),
        }
    }
}

impl ServerStats {
    pub fn new(store: &Store) -> Self {
        let g = |s: &str| store.gauge(StatName::plain(s));
        ServerStats {
            state: g("server.state"),
            live: g("server.live"),
            uptime: g("server.uptime"),
            concurrency: g("server.concurrency"),
            workers_started: g("listener_manager.workers_started"),
            total_listeners_active: g("listener_manager.total_listeners_active"),
            active_clusters: g("cluster_manager.active_clusters"),
            total_connections: g("server.total_connections"),
            listener_stopped: store.counter(StatName::plain("listener_manager.listener_stopped")),
            listener_added: store.counter(StatName::plain("listener_manager.listener_added")),
            listener_modified: store.counter(StatName::plain("listener_manager.listener_modified")),
            listener_removed: store.counter(StatName::plain("listener_manager.listener_removed")),
            listener_create_failure: store
                .counter(StatName::plain("listener_manager.listener_create_failure")),
            total_listeners_warming: g("listener_manager.total_listeners_warming"),
            warming_clusters: g("cluster_manager.warming_clusters"),
            connected_state: g("control_plane.connected_state"),
            cds: XdsStats::new(store, "cluster_manager.cds"),
            lds: XdsStats::new(store, "listener_manager.lds"),
            overflow: store.counter(StatName::plain(
                "overload.global_downstream_max_connections_overflow",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::config::{PassThrough, StatsConfig};

    #[test]
    fn pass_through_gauges_follow_the_chains_alive() {
        let store = Store::new(1, StatsConfig::default());
        let a = PassThroughStats::new(
            &store,
            [PassThrough::IstioStats, PassThrough::MetadataExchange],
        );
        let b = PassThroughStats::new(&store, [PassThrough::IstioStats]);
        assert_eq!(store.get("weir.pass_through_filter.istio_stats"), Some(2));
        assert_eq!(
            store.get("weir.pass_through_filter.metadata_exchange"),
            Some(1)
        );
        drop(a);
        assert_eq!(store.get("weir.pass_through_filter.istio_stats"), Some(1));
        assert_eq!(
            store.get("weir.pass_through_filter.metadata_exchange"),
            Some(0)
        );
        drop(b);
        assert_eq!(store.get("weir.pass_through_filter.istio_stats"), Some(0));
    }
}
