//! Workload discovery (WDS): the `istio.workload.BootstrapExtension`
//! bootstrap extension subscribes to `istio.workload.Workload` over delta
//! ADS, and peer metadata's `workload_discovery` finds the downstream peer
//! by the client's address and the upstream peer by the host that
//! answered. Real sockets throughout: the in-process tonic control plane
//! serves the workloads, clients bind chosen loopback source addresses
//! (127.0.0.0/8 is all local), an echo upstream answers; the peers are
//! read back from the access log (`%FILTER_STATE(downstream_peer:PLAIN)%`,
//! `upstream_peer`) and from `istio.stats` (reporter `waypoint`) on admin
//! `/stats/prometheus`.
//!
//! Weir only, whatever `WEIR_SCENARIO_TARGET` says: Envoy 1.40 has neither
//! the workload discovery extension nor the Istio filters (istio/proxy's).
//! Expectations follow istio/proxy's `workload_discovery/api.cc` (the peer
//! object of a workload), `peer_metadata/filter.cc` (`XDSMethod`) and
//! `istio_stats.cc`.
//!
//! ```sh
//! cargo test -p weir-tests --test xds_wds
//! ```
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{
    bootstrap_with, chain, cluster, file_log, filter, h2_upstream, hcm, listener, log_path, route,
    stat_is, vhost,
};
use weir_tests::scenario::{Proxy, StartOptions, Target};
use weir_tests::upstream;
use weir_tests::xds::{type_url as t, ControlPlane};
use xds_client::api::google::protobuf::Any;
use xds_client::translate::workload::proto;

const WAIT: Duration = Duration::from_secs(15);
const TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
const LOG_FORMAT: &str =
    "%RESPONSE_CODE% [%FILTER_STATE(downstream_peer:PLAIN)%] [%FILTER_STATE(upstream_peer:PLAIN)%]\n";
const HOST: &str = "productpage.bookinfo.svc.cluster.local";

const SLEEP_UID: &str = "Kubernetes//Pod/default/sleep-7656cf8794-lxcmx";
const PRODUCTPAGE_UID: &str = "Kubernetes//Pod/bookinfo/productpage-v1-d5789fdfb-5cr6m";
/// The client's address (a workload) and an address no workload has.
const SLEEP_IP: &str = "127.0.0.2";
const STRANGER_IP: &str = "127.0.0.4";

/// A waypoint's node (process-wide for the Istio filters), on network
/// `net1`.
fn node() -> Value {
    json!({
        "id": "waypoint~10.0.0.9~waypoint-abc.bookinfo~bookinfo.svc.cluster.local",
        "cluster": "waypoint.bookinfo",
        "metadata": {
            "NAME": "waypoint-abc",
            "NAMESPACE": "bookinfo",
            "CLUSTER_ID": "Kubernetes",
            "NETWORK": "net1",
            "WORKLOAD_NAME": "waypoint",
        },
    })
}

/// The sleep client, as ztunnel's config dump shows it (namespace elided
/// when `default`, as istiod does).
fn sleep(revision: &str) -> proto::Workload {
    proto::Workload {
        uid: SLEEP_UID.into(),
        name: "sleep-7656cf8794-lxcmx".into(),
        namespace: String::new(),
        addresses: vec![vec![127, 0, 0, 2]],
        network: "net1".into(),
        service_account: "sleep".into(),
        canonical_name: "sleep".into(),
        canonical_revision: revision.into(),
        workload_name: "sleep".into(),
        cluster_id: "Kubernetes".into(),
        ..Default::default()
    }
}

/// The destination: the echo upstream's address (127.0.0.1).
fn productpage() -> proto::Workload {
    proto::Workload {
        uid: PRODUCTPAGE_UID.into(),
        name: "productpage-v1-d5789fdfb-5cr6m".into(),
        namespace: "bookinfo".into(),
        addresses: vec![vec![127, 0, 0, 1]],
        network: "net1".into(),
        trust_domain: "cluster.local".into(),
        service_account: "bookinfo-productpage".into(),
        canonical_name: "productpage".into(),
        canonical_revision: "v1".into(),
        workload_name: "productpage-v1".into(),
        cluster_id: "Kubernetes".into(),
        locality: Some(proto::Locality {
            region: "us-east1".into(),
            zone: "us-east1-b".into(),
            subzone: String::new(),
        }),
        ..Default::default()
    }
}

fn any(w: &proto::Workload) -> Any {
    Any {
        type_url: t::WORKLOAD.into(),
        value: w.encode_to_vec(),
    }
}

/// An Istio filter config as istiod sends it (a TypedStruct).
fn istio_filter(name: &str, ty: &str, value: Value) -> Value {
    filter(
        name,
        TYPED_STRUCT,
        json!({"type_url": format!("type.googleapis.com/{ty}"), "value": value}),
    )
}

/// A waypoint-like listener: peer metadata by workload discovery in both
/// directions, `istio.stats` with reporter `waypoint`, everything routed to
/// the echo upstream; WDS over delta ADS from the control plane at
/// `cp_port`, configured as istio-agent renders it (`metadata_discovery`).
fn start(cp_port: u16, app_port: u16, log: PathBuf) -> Proxy {
    let target = match Target::from_env() {
        Target::Envoy => Target::InProcess,
        t => t,
    };
    Proxy::start_with(target, StartOptions::default(), move |ports| {
        let filters = vec![
            istio_filter(
                "istio.metadata_exchange",
                "io.istio.http.peer_metadata.Config",
                json!({
                    "downstream_discovery": [{"workload_discovery": {}}],
                    "upstream_discovery": [{"workload_discovery": {}}],
                }),
            ),
            istio_filter(
                "istio.stats",
                "stats.PluginConfig",
                json!({"reporter": "SERVER_GATEWAY"}),
            ),
        ];
        let l = listener(
            "l",
            ports.listen,
            vec![chain(vec![hcm(
                "l",
                filters,
                vec![vhost("all", vec![route("/", "app", json!({}))], json!({}))],
                json!({"access_log": [file_log(&log, LOG_FORMAT)]}),
            )])],
        );
        bootstrap_with(
            ports,
            vec![l],
            vec![
                cluster("app", &[app_port], json!({})),
                cluster("xds-grpc", &[cp_port], h2_upstream(json!({}))),
            ],
            json!({
                "node": node(),
                "dynamic_resources": {"ads_config": {
                    "api_type": "DELTA_GRPC",
                    "set_node_on_first_message_only": true,
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                }},
                "bootstrap_extensions": [{
                    "name": "metadata_discovery",
                    "typed_config": {
                        "@type": TYPED_STRUCT,
                        "type_url": "type.googleapis.com/istio.workload.BootstrapExtension",
                        "value": {"config_source": {"ads": {}}},
                    },
                }],
            }),
        )
    })
}

/// An HTTP/1.1 GET to `to` from source address `from` (port chosen by the
/// kernel); returns the status code.
async fn get_from(from: &str, to: SocketAddr, extra_headers: &str) -> u16 {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    let src: IpAddr = from.parse().expect("source ip");
    sock.bind(SocketAddr::new(src, 0)).expect("bind source");
    let mut s = sock.connect(to).await.expect("connect");
    let req = format!(
        "GET /reviews HTTP/1.1\r\nhost: {HOST}\r\n{extra_headers}connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&resp);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// The access log's line `n` (1-based), once written.
async fn log_line(p: &Proxy, log: &Path, n: usize) -> String {
    let lines = p.log_lines(log, n).await;
    assert!(
        lines.len() >= n,
        "only {} log lines: {lines:?}",
        lines.len()
    );
    lines[n - 1].clone()
}

/// `/stats/prometheus` once `want` is one of its lines.
async fn prometheus_has(p: &Proxy, want: &str) {
    let mut text = String::new();
    for _ in 0..100 {
        text = p.admin("GET", "/stats/prometheus").await.text();
        if text.lines().any(|l| l == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let istio: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_")).collect();
    panic!("missing {want}\nin istio lines:\n{}", istio.join("\n"));
}

/// The peer objects Istio's `serializeAsString` renders for the two
/// workloads (the namespace `default` filled in for the elided one; app
/// and version are the canonical name and revision).
fn sleep_state(revision: &str) -> String {
    format!(
        "type=deployment,workload=sleep,name=sleep-7656cf8794-lxcmx,cluster=Kubernetes,\
         namespace=default,service=sleep,revision={revision},app=sleep,version={revision}"
    )
}

const PRODUCTPAGE_STATE: &str = "type=deployment,workload=productpage-v1,\
     name=productpage-v1-d5789fdfb-5cr6m,cluster=Kubernetes,namespace=bookinfo,\
     service=productpage,revision=v1,app=productpage,version=v1,region=us-east1,\
     availability_zone=us-east1-b";

/// `istio_requests_total`'s labels (reporter `waypoint`) for source labels
/// `source` (workload, canonical service, revision, namespace, app,
/// version, cluster).
fn waypoint_line(source: [&str; 7], count: u32) -> String {
    let [w, cs, cr, ns, app, ver, cl] = source;
    format!(
        "istio_requests_total{{reporter=\"waypoint\",source_workload=\"{w}\",\
         source_canonical_service=\"{cs}\",source_canonical_revision=\"{cr}\",\
         source_workload_namespace=\"{ns}\",source_principal=\"unknown\",source_app=\"{app}\",\
         source_version=\"{ver}\",source_cluster=\"{cl}\",destination_workload=\"productpage-v1\",\
         destination_workload_namespace=\"bookinfo\",\
         destination_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage\",\
         destination_app=\"productpage\",destination_version=\"v1\",\
         destination_service=\"{HOST}\",destination_canonical_service=\"productpage\",\
         destination_canonical_revision=\"v1\",destination_service_name=\"{HOST}\",\
         destination_service_namespace=\"unknown\",destination_cluster=\"Kubernetes\",\
         request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",\
         response_flags=\"-\",connection_security_policy=\"none\"}} {count}"
    )
}

const UNKNOWN_SOURCE: [&str; 7] = [
    "unknown", "unknown", "latest", "unknown", "unknown", "unknown", "unknown",
];

/// Adds, an update, a removal and a rejected workload, each seen by the
/// next request: the peers come from WDS (by the client's source address
/// and the upstream host's), an unknown address finds no peer (Istio's
/// `unknown` labels), `x-forwarded-network` naming another network skips
/// the downstream lookup, and a malformed workload is NACKed with its
/// reason while the others keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_discovery_feeds_peer_metadata_and_stats() {
    let cp = ControlPlane::start().await.expect("control plane");
    let cp_port = cp.addr().expect("tcp control plane").port();
    cp.upsert(t::WORKLOAD, any(&sleep("v1"))).expect("sleep");
    let v = cp
        .upsert(t::WORKLOAD, any(&productpage()))
        .expect("productpage");
    let app = upstream::http1("productpage").await.expect("echo upstream");
    let log = log_path("wds", "peers");
    let p = start(cp_port, app.port(), log.clone());
    let addr = p.addr();

    // The extension subscribes to every workload (wildcard) and ACKs.
    cp.wait_for_subscription(t::WORKLOAD, "*", WAIT)
        .await
        .expect("wildcard WDS subscription");
    cp.wait_for_ack(t::WORKLOAD, &v, WAIT)
        .await
        .expect("WDS ACK");
    stat_is(&p, "workload_discovery.total", 2).await;

    // A known client: both peers from WDS.
    assert_eq!(get_from(SLEEP_IP, addr, "").await, 200);
    assert_eq!(
        log_line(&p, &log, 1).await,
        format!("200 [{}] [{PRODUCTPAGE_STATE}]", sleep_state("v1"))
    );
    let sleep_v1 = [
        "sleep",
        "sleep",
        "v1",
        "default",
        "sleep",
        "v1",
        "Kubernetes",
    ];
    prometheus_has(&p, &waypoint_line(sleep_v1, 1)).await;

    // An address no workload has: no downstream peer.
    assert_eq!(get_from(STRANGER_IP, addr, "").await, 200);
    assert_eq!(
        log_line(&p, &log, 2).await,
        format!("200 [-] [{PRODUCTPAGE_STATE}]")
    );
    prometheus_has(&p, &waypoint_line(UNKNOWN_SOURCE, 1)).await;

    // From another network (an east-west gateway's header): not looked
    // up; from ours: looked up.
    let other = "x-forwarded-network: net2\r\n";
    assert_eq!(get_from(SLEEP_IP, addr, other).await, 200);
    assert_eq!(
        log_line(&p, &log, 3).await,
        format!("200 [-] [{PRODUCTPAGE_STATE}]")
    );
    let ours = "x-forwarded-network: net1\r\n";
    assert_eq!(get_from(SLEEP_IP, addr, ours).await, 200);
    assert_eq!(
        log_line(&p, &log, 4).await,
        format!("200 [{}] [{PRODUCTPAGE_STATE}]", sleep_state("v1"))
    );

    // An update replaces the workload's peer.
    let v = cp.upsert(t::WORKLOAD, any(&sleep("v2"))).expect("update");
    cp.wait_for_ack(t::WORKLOAD, &v, WAIT)
        .await
        .expect("update ACK");
    assert_eq!(get_from(SLEEP_IP, addr, "").await, 200);
    assert_eq!(
        log_line(&p, &log, 5).await,
        format!("200 [{}] [{PRODUCTPAGE_STATE}]", sleep_state("v2"))
    );
    let mut sleep_v2 = sleep_v1;
    sleep_v2[2] = "v2";
    sleep_v2[5] = "v2";
    prometheus_has(&p, &waypoint_line(sleep_v2, 1)).await;

    // A removal: the address is unknown again.
    let v = cp.remove(t::WORKLOAD, SLEEP_UID);
    cp.wait_for_ack(t::WORKLOAD, &v, WAIT)
        .await
        .expect("removal ACK");
    stat_is(&p, "workload_discovery.total", 1).await;
    assert_eq!(get_from(SLEEP_IP, addr, "").await, 200);
    assert_eq!(
        log_line(&p, &log, 6).await,
        format!("200 [-] [{PRODUCTPAGE_STATE}]")
    );

    // A malformed workload (a 3-byte address) is NACKed with its reason;
    // what was accepted keeps serving.
    let mut bad = sleep("v3");
    bad.addresses = vec![vec![127, 0, 0]];
    let v = cp.upsert(t::WORKLOAD, any(&bad)).expect("bad workload");
    let nack = cp
        .wait_for_nack(t::WORKLOAD, &v, WAIT)
        .await
        .expect("WDS NACK");
    assert!(
        nack.error
            .message
            .contains(&format!("Workload {SLEEP_UID:?}: addresses[0]: 3 bytes")),
        "{}",
        nack.error.message
    );
    stat_is(&p, "workload_discovery.update_rejected", 1).await;
    assert_eq!(get_from(SLEEP_IP, addr, "").await, 200);
    assert_eq!(
        log_line(&p, &log, 7).await,
        format!("200 [-] [{PRODUCTPAGE_STATE}]")
    );
    stat_is(&p, "workload_discovery.total", 1).await;
}

/// Without the bootstrap extension, `workload_discovery` finds nothing
/// (Istio without a provider) and nothing subscribes to WDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_extension_workload_discovery_finds_nothing() {
    let app = upstream::http1("productpage").await.expect("echo upstream");
    let log = log_path("wds", "no-extension");
    let l2 = log.clone();
    let target = match Target::from_env() {
        Target::Envoy => Target::InProcess,
        t => t,
    };
    let port = app.port();
    let p = Proxy::start_with(target, StartOptions::default(), move |ports| {
        let filters = vec![istio_filter(
            "istio.metadata_exchange",
            "io.istio.http.peer_metadata.Config",
            json!({
                "downstream_discovery": [{"workload_discovery": {}}],
                "upstream_discovery": [{"workload_discovery": {}}],
            }),
        )];
        let l = listener(
            "l",
            ports.listen,
            vec![chain(vec![hcm(
                "l",
                filters,
                vec![vhost("all", vec![route("/", "app", json!({}))], json!({}))],
                json!({"access_log": [file_log(&l2, LOG_FORMAT)]}),
            )])],
        );
        bootstrap_with(
            ports,
            vec![l],
            vec![cluster("app", &[port], json!({}))],
            json!({"node": node()}),
        )
    });
    assert_eq!(get_from(SLEEP_IP, p.addr(), "").await, 200);
    assert_eq!(log_line(&p, &log, 1).await, "200 [-] [-]");
    assert_eq!(p.stat("workload_discovery.total").await, None);
}
