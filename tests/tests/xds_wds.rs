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
    bootstrap_with, chain, cluster, file_log, filter, h2_upstream, hcm, internal_cluster,
    internal_endpoint, internal_extension, internal_listener, internal_upstream, listener,
    log_path, merge, route, stat_is, tcp_proxy, vhost, ORIGINAL_DST_NS,
};
use weir_tests::scenario::{Ports, Proxy, StartOptions, Target};
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
    start_with_wds(cp_port, move |ports| {
        let l = waypoint_listener("l", ports.listen, vec![route("/", "app", json!({}))], &log);
        (vec![l], vec![cluster("app", &[app_port], json!({}))])
    })
}

/// An HCM listener with peer metadata by workload discovery in both
/// directions and `istio.stats` (reporter `waypoint`), logging the peers.
fn waypoint_listener(name: &str, port: u16, routes: Vec<Value>, log: &Path) -> Value {
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
    listener(
        name,
        port,
        vec![chain(vec![hcm(
            name,
            filters,
            vec![vhost("all", routes, json!({}))],
            json!({"access_log": [file_log(log, LOG_FORMAT)]}),
        )])],
    )
}

/// weir (whatever the target) with the listeners and clusters `config`
/// makes, WDS over delta ADS from the control plane at `cp_port` as
/// istio-agent renders it (`metadata_discovery`), and internal listeners.
fn start_with_wds(
    cp_port: u16,
    config: impl Fn(&Ports) -> (Vec<Value>, Vec<Value>) + Send + 'static,
) -> Proxy {
    let target = match Target::from_env() {
        Target::Envoy => Target::InProcess,
        t => t,
    };
    Proxy::start_with(target, StartOptions::default(), move |ports| {
        let (listeners, mut clusters) = config(ports);
        clusters.push(cluster("xds-grpc", &[cp_port], h2_upstream(json!({}))));
        let mut extensions = internal_extension();
        extensions.as_array_mut().expect("a list").push(json!({
            "name": "metadata_discovery",
            "typed_config": {
                "@type": TYPED_STRUCT,
                "type_url": "type.googleapis.com/istio.workload.BootstrapExtension",
                "value": {"config_source": {"ads": {}}},
            },
        }));
        bootstrap_with(
            ports,
            listeners,
            clusters,
            json!({
                "node": node(),
                "dynamic_resources": {"ads_config": {
                    "api_type": "DELTA_GRPC",
                    "set_node_on_first_message_only": true,
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                }},
                "bootstrap_extensions": extensions,
            }),
        )
    })
}

/// An HTTP/1.1 GET to `to` from source address `from` (port chosen by the
/// kernel); returns the status code.
async fn get_from(from: &str, to: SocketAddr, extra_headers: &str) -> u16 {
    get_path_from(from, to, "/reviews", extra_headers).await
}

/// A TCP connection to `to` from source address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    let src: IpAddr = from.parse().expect("source ip");
    sock.bind(SocketAddr::new(src, 0)).expect("bind source");
    sock.connect(to).await.expect("connect")
}

/// [`get_from`] of `path`.
async fn get_path_from(from: &str, to: SocketAddr, path: &str, extra_headers: &str) -> u16 {
    let mut s = connect_from(from, to).await;
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n{extra_headers}connection: close\r\n\r\n");
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

/// A control plane serving `workloads`: it, its port and the version of
/// the last upsert (to wait for its ACK).
async fn control_plane(workloads: &[proto::Workload]) -> (ControlPlane, u16, String) {
    let cp = ControlPlane::start().await.expect("control plane");
    let port = cp.addr().expect("tcp control plane").port();
    let mut version = String::new();
    for w in workloads {
        version = cp.upsert(t::WORKLOAD, any(w)).expect("workload");
    }
    (cp, port, version)
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
    let (cp, cp_port, v) = control_plane(&[sleep("v1"), productpage()]).await;
    let app = upstream::http1("productpage").await.expect("echo upstream");
    let log = log_path("wds", "peers");
    let p = start(cp_port, app.port(), log.to_path_buf());
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
    let l2 = log.to_path_buf();
    let target = match Target::from_env() {
        Target::Envoy => Target::InProcess,
        t => t,
    };
    let port = app.port();
    let p = Proxy::start_with(target, StartOptions::default(), move |ports| {
        let l = waypoint_listener("l", ports.listen, vec![route("/", "app", json!({}))], &l2);
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

/// A pod behind an internal host: the waypoint's `inbound-vip|…` hosts are
/// internal addresses whose endpoint metadata
/// `envoy.filters.listener.original_dst` `local` names the pod.
const REVIEWS_UID: &str = "Kubernetes//Pod/bookinfo/reviews-v1-545db77b95-lsqxl";
const REVIEWS_IP: &str = "127.0.0.3";

fn reviews() -> proto::Workload {
    proto::Workload {
        uid: REVIEWS_UID.into(),
        name: "reviews-v1-545db77b95-lsqxl".into(),
        namespace: "bookinfo".into(),
        addresses: vec![vec![127, 0, 0, 3]],
        network: "net1".into(),
        service_account: "bookinfo-reviews".into(),
        canonical_name: "reviews".into(),
        canonical_revision: "v1".into(),
        workload_name: "reviews-v1".into(),
        cluster_id: "Kubernetes".into(),
        ..Default::default()
    }
}

const REVIEWS_STATE: &str = "type=deployment,workload=reviews-v1,\
     name=reviews-v1-545db77b95-lsqxl,cluster=Kubernetes,namespace=bookinfo,\
     service=reviews,revision=v1,app=reviews,version=v1";

/// `/stats/prometheus` once a line of `name` has all `labels` (substrings).
async fn prometheus_line(p: &Proxy, name: &str, labels: &[&str]) -> String {
    let mut text = String::new();
    for _ in 0..250 {
        text = p.admin("GET", "/stats/prometheus").await.text();
        let hit = text.lines().find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') && labels.iter().all(|x| r.contains(x)))
        });
        if let Some(l) = hit {
            return l.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let istio: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_")).collect();
    panic!("no {name} with {labels:?} in:\n{}", istio.join("\n"));
}

/// Upstream `workload_discovery` of internal hosts, as istio/proxy's
/// `XDSMethod`: the host is an internal address (weir keys it by a
/// stand-in, the bytes reach the app at 127.0.0.1 through an internal
/// listener), and the peer is the workload at the address its
/// `original_dst` `local` metadata names (reviews, 127.0.0.3), in the log
/// and as istio.stats' destination; an east-west gateway endpoint
/// (`istio.double_hbone` metadata) is not looked up, nor is a host without
/// the metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_workload_discovery_of_internal_hosts() {
    let (cp, cp_port, v) = control_plane(&[sleep("v1"), productpage(), reviews()]).await;
    let app = upstream::http1("reviews").await.expect("echo upstream");
    let app_port = app.port();
    let log = log_path("wds", "internal-hosts");
    let l2 = log.to_path_buf();
    let p = start_with_wds(cp_port, move |ports| {
        let pod = format!("{REVIEWS_IP}:9080");
        let vip = json!({ ORIGINAL_DST_NS: {"local": pod} });
        let ew = json!({
            ORIGINAL_DST_NS: {"local": pod},
            "istio": {"double_hbone": {"hbone_target_address": "reviews.bookinfo.svc.cluster.local:9080"}},
        });
        let routes = vec![
            route("/vip", "inbound-vip", json!({})),
            route("/ew", "east-west", json!({})),
            route("/bare", "bare", json!({})),
        ];
        let l = waypoint_listener("l", ports.listen, routes, &l2);
        // The internal listener forwards the bytes to the app.
        let fwd = internal_listener(
            "fwd",
            json!({"filter_chains": [chain(vec![tcp_proxy("fwd", "app", json!({}))])]}),
        );
        let clusters = vec![
            internal_cluster(
                "inbound-vip",
                vec![internal_endpoint("fwd", &pod, vip.clone())],
                internal_upstream(),
            ),
            internal_cluster(
                "east-west",
                vec![internal_endpoint("fwd", &pod, ew.clone())],
                internal_upstream(),
            ),
            internal_cluster(
                "bare",
                vec![internal_endpoint("fwd", "bare", Value::Null)],
                json!({}),
            ),
            cluster("app", &[app_port], json!({})),
        ];
        (vec![l, fwd], clusters)
    });
    cp.wait_for_ack(t::WORKLOAD, &v, WAIT)
        .await
        .expect("WDS ACK");
    stat_is(&p, "workload_discovery.total", 3).await;
    let addr = p.addr();

    assert_eq!(get_path_from(SLEEP_IP, addr, "/vip", "").await, 200);
    assert_eq!(
        log_line(&p, &log, 1).await,
        format!("200 [{}] [{REVIEWS_STATE}]", sleep_state("v1"))
    );
    let line = prometheus_line(
        &p,
        "istio_requests_total",
        &[
            "reporter=\"waypoint\"",
            "source_workload=\"sleep\"",
            "destination_workload=\"reviews-v1\"",
            "destination_workload_namespace=\"bookinfo\"",
            "destination_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\"",
            "destination_canonical_service=\"reviews\"",
        ],
    )
    .await;
    assert!(line.ends_with(" 1"), "{line}");

    // Double HBONE (another network's gateway) and no metadata: no
    // upstream peer.
    assert_eq!(get_path_from(SLEEP_IP, addr, "/ew", "").await, 200);
    assert_eq!(
        log_line(&p, &log, 2).await,
        format!("200 [{}] [-]", sleep_state("v1"))
    );
    assert_eq!(get_path_from(SLEEP_IP, addr, "/bare", "").await, 200);
    assert_eq!(
        log_line(&p, &log, 3).await,
        format!("200 [{}] [-]", sleep_state("v1"))
    );
    assert_eq!(app.requests().len(), 3, "every request reached the app");
}

/// The TCP metadata exchange's `enable_discovery` (istio/proxy's
/// `metadata_exchange.cc`): a peer that sends no exchange header (here a
/// plain TCP client, so the ALPN does not match) is looked up in WDS. The
/// listener's filter finds the downstream peer by the client's address
/// and the upstream peer by the host tcp_proxy chose; the cluster filter
/// finds the upstream peer by its host; without `enable_discovery` the
/// labels stay Istio's `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_exchange_falls_back_to_workload_discovery() {
    let (cp, cp_port, v) = control_plane(&[sleep("v1"), productpage()]).await;
    let echo = weir_tests::tcp::tcp_echo_server().await.expect("echo");
    let echo_port = echo.port();
    let mx = |discovery: bool| {
        istio_filter(
            "istio.metadata_exchange",
            "envoy.tcp.metadataexchange.config.MetadataExchange",
            json!({"protocol": "istio-peer-exchange", "enable_discovery": discovery}),
        )
    };
    let stats = |config: Value| istio_filter("istio.stats", "stats.PluginConfig", config);
    let out_port = weir_tests::free_port();
    let p = start_with_wds(cp_port, move |ports| {
        // Downstream filter with discovery; the same without; the cluster
        // filter with discovery behind an outbound (reporter source)
        // listener.
        let waypoint = |name: &str, port: u16, discovery: bool| {
            listener(
                name,
                port,
                vec![chain(vec![
                    mx(discovery),
                    stats(json!({"reporter": "SERVER_GATEWAY"})),
                    tcp_proxy(name, "echo", json!({})),
                ])],
            )
        };
        let down = waypoint("l", ports.listen, true);
        let plain = waypoint("l2", ports.listen2, false);
        let out = merge(
            listener(
                "out",
                out_port,
                vec![chain(vec![
                    stats(json!({})),
                    tcp_proxy("out", "echo-mx", json!({})),
                ])],
            ),
            json!({"traffic_direction": "OUTBOUND"}),
        );
        let clusters = vec![
            cluster("echo", &[echo_port], json!({})),
            cluster("echo-mx", &[echo_port], json!({"filters": [mx(true)]})),
        ];
        (vec![down, plain, out], clusters)
    });
    cp.wait_for_ack(t::WORKLOAD, &v, WAIT)
        .await
        .expect("WDS ACK");
    stat_is(&p, "workload_discovery.total", 2).await;
    for to in [
        p.addr(),
        p.addr2(),
        SocketAddr::from(([127, 0, 0, 1], out_port)),
    ] {
        let mut c = connect_from(SLEEP_IP, to).await;
        weir_tests::tcp::echo_once(&mut c, b"ping").await;
        c.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut rest)).await;
    }
    // The listener filter with discovery: both peers from WDS; without
    // discovery: Istio's unknowns; the cluster filter: the upstream peer
    // from WDS by its host.
    let found: [&[&str]; 3] = [
        &[
            "reporter=\"waypoint\"",
            "source_workload=\"sleep\"",
            "source_canonical_revision=\"v1\"",
            "source_workload_namespace=\"default\"",
            "destination_workload=\"productpage-v1\"",
            "destination_workload_namespace=\"bookinfo\"",
            "request_protocol=\"tcp\"",
        ],
        &[
            "reporter=\"waypoint\"",
            "source_workload=\"unknown\"",
            "destination_workload=\"unknown\"",
        ],
        &[
            "reporter=\"source\"",
            "destination_workload=\"productpage-v1\"",
            "destination_canonical_service=\"productpage\"",
            "destination_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage\"",
        ],
    ];
    for labels in found {
        let line = prometheus_line(&p, "istio_tcp_connections_closed_total", labels).await;
        assert!(line.ends_with(" 1"), "{line}");
    }
    // Each exchange that ran missed the ALPN; the two found by discovery
    // count `metadata_added` (the downstream and the cluster lookups).
    stat_is(&p, "metadata_exchange.alpn_protocol_not_found", 3).await;
    stat_is(&p, "metadata_exchange.metadata_added", 2).await;
    assert_eq!(echo.bytes(), 12);
}
