//! `/stats` in every format, against golden files rendered by weir itself.
//! They pin the exact bytes, so a change to the stats store that alters a
//! name, a tag, a value or the order shows up here. After an intended change
//! of the output, `WEIR_BLESS=1 cargo test -p weir --lib admin::tests`
//! rewrites them (review the diff).
use std::{path::PathBuf, sync::Arc};

use http_body_util::BodyExt;
use xds_client::config::StatsConfig;

use crate::{
    metrics::{HttpStats, ListenerStats, ServerStats, SslStats, TcpStats},
    stats::{set_worker_shard, StatName, Store},
};

/// Stats of every shape weir creates: cluster (tagged, some never
/// written, values in several shards), cluster and listener `ssl.*`,
/// listener, HTTP and TCP (tagged), server (plain), a text readout and
/// histograms.
fn populated() -> Arc<Store> {
    let store = Store::new(2, StatsConfig::default());
    for (cluster, n) in [
        ("c1", 1),
        ("outbound|443||svc.ns.svc.cluster.local", 2),
        ("we\"ird", 0),
    ] {
        let c = |s: &str| {
            store.counter(StatName::tagged(
                "cluster",
                cluster,
                s,
                "envoy_cluster_name",
            ))
        };
        let g = |s: &str| {
            store.gauge(StatName::tagged(
                "cluster",
                cluster,
                s,
                "envoy_cluster_name",
            ))
        };
        let total = c("upstream_rq_total");
        let ok = c("upstream_rq_2xx");
        c("upstream_rq_5xx");
        c("upstream_cx_connect_fail");
        let active = g("upstream_cx_active");
        g("membership_total").set(n);
        let time = store.histogram(StatName::tagged(
            "cluster",
            cluster,
            "upstream_rq_time",
            "envoy_cluster_name",
        ));
        let ssl = SslStats::new(&store, |s| {
            StatName::tagged(
                "cluster",
                cluster,
                &format!("ssl.{s}"),
                "envoy_cluster_name",
            )
        });
        for i in 0..n {
            set_worker_shard(i as usize);
            total.add(3);
            ok.inc();
            active.inc();
            time.record_us(1_500 * (i as u64 + 1));
            ssl.handshake.inc();
        }
    }
    let listener = ListenerStats::new(&store, "listener.0.0.0.0_8080.");
    listener.cx_total.add(7);
    listener.cx_active.inc();
    listener.ssl.session_reused.inc();
    listener.tls_inspector_found.inc();
    // A proxy_protocol listener filter without stat_prefix.
    let _pp = crate::metrics::ProxyProtoStats::new(&store, "");
    let http = HttpStats::new(&store, "ingress_http");
    http.rq_total.add(2);
    http.record_status(200);
    http.record_status(503);
    http.rq_time.record_us(0);
    http.rq_time.record_us(4_000_000_000);
    let tcp = TcpStats::new(&store, "tcp.db.");
    tcp.cx_rx_bytes_total.add(1 << 40);
    let server = ServerStats::new(&store);
    server.live.set(1);
    server.concurrency.set(2);
    server.cds.update_attempt.inc();
    server.cds.version_text.set("v\"1");
    server.total_connections.dec();
    set_worker_shard(0);
    store
}

async fn render(
    store: &Store,
    path: &str,
    format: Option<&str>,
    filter: Option<&str>,
    used_only: bool,
) -> String {
    let r = super::stats(
        store,
        path,
        format.map(str::to_owned),
        filter.map(str::to_owned),
        used_only,
    );
    assert_eq!(r.status(), http::StatusCode::OK);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn stats_output_matches_golden_files() {
    let store = populated();
    let cases = [
        ("text", "/stats", None, None, false),
        ("text_usedonly", "/stats", None, None, true),
        (
            "text_filter",
            "/stats",
            None,
            Some(r"^cluster\.c1\."),
            false,
        ),
        ("json", "/stats", Some("json"), None, false),
        (
            "json_usedonly_filter",
            "/stats",
            Some("json"),
            Some("ssl"),
            true,
        ),
        ("prometheus", "/stats/prometheus", None, None, false),
        ("prometheus_usedonly", "/stats/prometheus", None, None, true),
        (
            "prometheus_filter",
            "/stats",
            Some("prometheus"),
            Some("listener"),
            false,
        ),
    ];
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/admin/testdata");
    let bless = std::env::var_os("WEIR_BLESS").is_some();
    for (name, path, format, filter, used_only) in cases {
        let got = render(&store, path, format, filter, used_only).await;
        let file = dir.join(format!("stats_{name}.txt"));
        if bless {
            std::fs::create_dir_all(&dir).expect("testdata dir");
            std::fs::write(&file, &got).expect("write golden file");
            continue;
        }
        let want = std::fs::read_to_string(&file).expect("golden file (WEIR_BLESS=1 writes it)");
        assert!(
            got == want,
            "{name}: output differs from {}:\n{got}",
            file.display()
        );
    }
}
