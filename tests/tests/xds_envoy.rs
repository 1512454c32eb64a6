//! Real Envoy against the in-process test control plane (`weir_tests::xds`):
//! proves the control plane speaks the ADS protocol Envoy expects, in both
//! state-of-the-world and delta, over TCP and a Unix socket, so tests of
//! weir's own xDS client can rely on it.
//!
//! Run: `scripts/install-test-deps.sh` once, then
//! `cargo test -p weir-tests --test xds_envoy`. A missing Envoy fails the
//! tests (never skips them).
use std::time::Duration;

use bytes::Bytes;
use weir_tests::proc::ProxyProc;
use weir_tests::scenario::{Http, Resp};
use weir_tests::xds::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use weir_tests::xds::yaml::{eds_cluster, endpoints, rds_listener, route};
use weir_tests::xds::{ControlPlane, Recorded};
use weir_tests::{free_port, upstream, EnvoyProc};

/// Bound of every wait on Envoy.
const WAIT: Duration = Duration::from_secs(20);
const NODE_ID: &str = "weir-xds-test";

// === bootstrap and resources ===

/// An Envoy bootstrap whose LDS and CDS come over ADS from `cp`
/// (`api_type`: `GRPC` or `DELTA_GRPC`).
fn bootstrap(api_type: &str, cp: &ControlPlane, admin: u16) -> String {
    let delta = api_type == "DELTA_GRPC";
    let b = cp.ads_bootstrap(
        &format!("{{id: {NODE_ID}, cluster: weir-tests}}"),
        delta,
        admin,
    );
    // State of the world here sends the node on every request.
    if delta {
        b
    } else {
        b.replace(
            "set_node_on_first_message_only: true",
            "set_node_on_first_message_only: false",
        )
    }
}

/// A listener on `127.0.0.1:port` whose HCM `filter` is given whole.
fn listener_with(name: &str, port: u16, filter: &str) -> String {
    format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
{filter}
"#
    )
}

const DIRECT_ROUTE: &str = r#"
  - match: {prefix: /direct}
    direct_response: {status: 200, body: {inline_string: direct}}
"#;

// === helpers ===

async fn start_envoy(config: String) -> ProxyProc {
    // Fail, never skip, when Envoy is missing (as differential.rs).
    if let Err(e) = weir_tests::proc::envoy_binary() {
        panic!("{e:#}");
    }
    tokio::task::spawn_blocking(move || EnvoyProc::start(&config))
        .await
        .expect("Envoy launcher thread")
        .unwrap_or_else(|e| panic!("Envoy did not start: {e:#}"))
}

/// Sends `GET url` until `ok` holds for the response (config reaches
/// Envoy's worker shortly after the ACK) or [`WAIT`] passes.
async fn get_until(url: &str, what: &str, ok: impl Fn(&Resp) -> bool) -> Resp {
    let http = Http::h1();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = http.try_send("GET", url, &[], Bytes::new()).await;
        match &last {
            Ok(r) if ok(r) => return r.clone(),
            _ if tokio::time::Instant::now() >= deadline => {
                let last = match last {
                    Ok(r) => format!("{} {}", r.status, r.text()),
                    Err(e) => format!("{e:#}"),
                };
                panic!("GET {url}: not {what} after {WAIT:?}; last: {last}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The value, or a panic with the whole error chain.
fn must<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// A control plane holding cluster `c1` (EDS, endpoint `upstream_port`),
/// listener `l` on `listen` with RDS `local_route`, and `local_route`
/// sending `/` to `c1`. Returns the version after the last change.
fn seed(cp: &ControlPlane, upstream_port: u16, listen: u16) -> String {
    let r = (|| {
        cp.upsert_yaml(CLUSTER, &eds_cluster("c1"))?;
        cp.upsert_yaml(ENDPOINT, &endpoints("c1", &[upstream_port]))?;
        cp.upsert_yaml(LISTENER, &rds_listener("l", listen, "local_route"))?;
        cp.upsert_yaml(ROUTE, &route("local_route", "c1", ""))
    })();
    r.unwrap_or_else(|e| panic!("seed resources: {e:#}"))
}

/// A counter from Envoy's admin `/stats`.
fn stat(envoy: &ProxyProc, name: &str) -> Option<u64> {
    let path = format!("/stats?filter=^{}$", name.replace('.', "\\."));
    let (code, body) = tokio::task::block_in_place(|| envoy.admin(&path)).ok()?;
    assert_eq!(code, 200, "GET {path}: {body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

fn stream_requests(cp: &ControlPlane, stream: u64) -> Vec<Recorded> {
    cp.requests()
        .into_iter()
        .filter(|(id, _)| *id == stream)
        .map(|(_, r)| r)
        .collect()
}

// === tests ===

/// SotW: Envoy subscribes wildcard to LDS/CDS and by name to RDS/EDS, ACKs
/// every type echoing our version and nonce, is not sent anything again
/// after its ACKs, and proxies to the EDS endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_envoy_acks_every_type_and_proxies() {
    let up = upstream::http1("up1").await.expect("upstream");
    let cp = ControlPlane::start().await.expect("control plane");
    let listen = free_port();
    let v = seed(&cp, up.port(), listen);
    let _envoy = start_envoy(bootstrap("GRPC", &cp, free_port())).await;

    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let ack = must(cp.wait_for_ack(t, &v, WAIT).await);
        assert_eq!(ack.version, v, "{t}: Envoy got everything in one response");
    }
    assert_eq!(must(cp.wait_for_subscription(LISTENER, "*", WAIT).await), 1);
    assert_eq!(must(cp.wait_for_subscription(CLUSTER, "*", WAIT).await), 1);
    assert_eq!(
        must(cp.wait_for_subscription(ROUTE, "local_route", WAIT).await),
        1
    );
    assert_eq!(
        must(cp.wait_for_subscription(ENDPOINT, "c1", WAIT).await),
        1
    );

    let reqs = stream_requests(&cp, 1);
    let node = reqs[0].node().expect("the first request carries the node");
    assert_eq!(node.id, NODE_ID);
    assert_eq!(node.cluster, "weir-tests");
    // Without set_node_on_first_message_only, every SotW request has it.
    assert!(reqs.iter().all(|r| r.node().is_some()));
    // An ACK echoes the response's version and nonce.
    for ack in cp.acks() {
        let echoed = reqs
            .iter()
            .filter_map(Recorded::as_sotw)
            .find(|r| r.response_nonce == ack.nonce)
            .expect("the ACK request is recorded");
        assert_eq!(echoed.version_info, ack.version);
        assert!(echoed.error_detail.is_none());
    }

    let r = get_until(&format!("http://127.0.0.1:{listen}/hello"), "200", |r| {
        r.status == 200
    })
    .await;
    let echo = r.echo();
    assert_eq!(echo.upstream, "up1");
    assert_eq!(echo.path, "/hello");

    // ACKs are not answered: one response per type.
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let n = cp.sent().iter().filter(|s| s.type_url == t).count();
        assert_eq!(n, 1, "{t} responses: {:#?}", cp.sent());
    }
    assert!(cp.nacks().is_empty(), "{:#?}", cp.nacks());
}

/// SotW: a route update reaches traffic; a listener Envoy cannot build is
/// NACKed with a reason naming the problem while the last good listener
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_route_update_applies_and_bad_listener_is_nacked() {
    let up = upstream::http1("up1").await.expect("upstream");
    let cp = ControlPlane::start().await.expect("control plane");
    let listen = free_port();
    let v0 = seed(&cp, up.port(), listen);
    let _envoy = start_envoy(bootstrap("GRPC", &cp, free_port())).await;
    must(cp.wait_for_ack(LISTENER, &v0, WAIT).await);
    must(cp.wait_for_ack(ROUTE, &v0, WAIT).await);
    let base = format!("http://127.0.0.1:{listen}");

    // Route update.
    let v1 = must(cp.upsert_yaml(ROUTE, &route("local_route", "c1", DIRECT_ROUTE)));
    must(cp.wait_for_ack(ROUTE, &v1, WAIT).await);
    let r = get_until(&format!("{base}/direct"), "the direct response", |r| {
        r.status == 200 && r.text() == "direct"
    })
    .await;
    assert_eq!(r.text(), "direct");
    assert_eq!(
        Http::h1()
            .get(&format!("{base}/x"), &[])
            .await
            .echo()
            .upstream,
        "up1"
    );

    // A listener whose filter config has a type no factory is registered for.
    let bad = listener_with(
        "l",
        listen,
        r#"
  - name: hcm
    typed_config: {"@type": type.googleapis.com/google.protobuf.Empty, value: {}}
"#,
    );
    let v2 = must(cp.upsert_yaml(LISTENER, &bad));
    let nack = must(cp.wait_for_nack(LISTENER, &v2, WAIT).await);
    let msg = &nack.error.message;
    assert!(
        msg.contains("google.protobuf.Empty"),
        "NACK names the unknown type: {msg:?}"
    );
    assert_eq!(nack.version, v2);
    assert_eq!(
        nack.client_version, v0,
        "Envoy keeps running the last good listener version"
    );
    // The old listener keeps serving both routes.
    assert_eq!(
        Http::h1().get(&format!("{base}/direct"), &[]).await.text(),
        "direct"
    );
    assert_eq!(
        Http::h1()
            .get(&format!("{base}/y"), &[])
            .await
            .echo()
            .upstream,
        "up1"
    );
    assert!(
        !cp.acks()
            .iter()
            .any(|a| a.type_url == LISTENER && a.version == v2),
        "{:#?}",
        cp.acks()
    );
    // A NACK is not answered either.
    assert_eq!(
        cp.sent().iter().filter(|s| s.type_url == LISTENER).count(),
        2
    );
}

/// Delta: node only on the first message; reconnection after the server
/// drops the stream (refused while paused) carries `initial_resource_versions`
/// with exactly the versions Envoy had, and nothing is resent; a removed
/// cluster goes out in `removed_resources`, Envoy ACKs it, drops its EDS
/// subscription and answers 503. Removing the endpoints first does not
/// empty the cluster (Envoy keeps the last ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reconnect_sends_initial_versions_and_removals_apply() {
    let up = upstream::http1("up1").await.expect("upstream");
    let cp = ControlPlane::start().await.expect("control plane");
    let listen = free_port();
    let v = seed(&cp, up.port(), listen);
    let envoy = start_envoy(bootstrap("DELTA_GRPC", &cp, free_port())).await;
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        must(cp.wait_for_ack(t, &v, WAIT).await);
    }
    must(cp.wait_for_subscription(ENDPOINT, "c1", WAIT).await);
    must(cp.wait_for_subscription(ROUTE, "local_route", WAIT).await);
    let url = format!("http://127.0.0.1:{listen}/a");
    assert_eq!(
        get_until(&url, "200", |r| r.status == 200)
            .await
            .echo()
            .upstream,
        "up1"
    );

    // set_node_on_first_message_only: the node goes out once per stream.
    let reqs = stream_requests(&cp, 1);
    assert!(reqs.iter().all(|r| r.as_delta().is_some()));
    assert_eq!(reqs[0].node().map(|n| n.id.as_str()), Some(NODE_ID));
    assert!(reqs[1..].iter().all(|r| r.node().is_none()), "{reqs:#?}");
    // A fresh session sends no initial versions.
    assert!(reqs
        .iter()
        .filter_map(Recorded::as_delta)
        .all(|r| r.initial_resource_versions.is_empty()));

    // Drop the stream; refuse reconnects for a while; then let Envoy in.
    cp.pause(true);
    cp.disconnect_all();
    must(cp.wait_for_streams(0, WAIT).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    while cp.streams_refused() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Envoy never retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cp.streams_opened(), 1, "no stream accepted while paused");
    cp.pause(false);
    must(cp.wait_for_streams(1, WAIT).await);
    assert_eq!(
        must(cp.wait_for_subscription(ROUTE, "local_route", WAIT).await),
        2
    );
    assert_eq!(
        must(cp.wait_for_subscription(ENDPOINT, "c1", WAIT).await),
        2
    );

    let reqs = stream_requests(&cp, 2);
    assert_eq!(reqs[0].node().map(|n| n.id.as_str()), Some(NODE_ID));
    let names = [
        (CLUSTER, "c1"),
        (ENDPOINT, "c1"),
        (LISTENER, "l"),
        (ROUTE, "local_route"),
    ];
    for (t, name) in names {
        let first = reqs
            .iter()
            .filter_map(Recorded::as_delta)
            .find(|r| r.type_url == t)
            .unwrap_or_else(|| panic!("no {t} request on the new stream: {reqs:#?}"));
        let want = cp.resource_version(t, name).expect("stored");
        assert_eq!(
            first.initial_resource_versions.get(name),
            Some(&want),
            "{t}: {first:#?}"
        );
        assert_eq!(first.initial_resource_versions.len(), 1, "{t}: {first:#?}");
    }
    // Everything was current: nothing resent on the new stream.
    for s in cp.sent().iter().filter(|s| s.stream == 2) {
        assert!(s.resources.is_empty() && s.removed.is_empty(), "{s:#?}");
    }
    assert_eq!(
        get_until(&url, "200", |r| r.status == 200)
            .await
            .echo()
            .upstream,
        "up1"
    );

    // Removal of the endpoints: Envoy ACKs, counts an empty update and
    // keeps the last endpoints (EDS removal does not empty a cluster).
    let ve = cp.remove(ENDPOINT, "c1");
    let ack = must(cp.wait_for_ack(ENDPOINT, &ve, WAIT).await);
    let removal = cp
        .sent()
        .into_iter()
        .find(|s| s.nonce == ack.nonce)
        .expect("sent");
    assert_eq!(removal.removed, ["c1"]);
    assert_eq!(stat(&envoy, "cluster.c1.update_empty"), Some(1));
    assert_eq!(Http::h1().get(&url, &[]).await.echo().upstream, "up1");

    // Removal of the cluster.
    let vr = cp.remove(CLUSTER, "c1");
    let ack = must(cp.wait_for_ack(CLUSTER, &vr, WAIT).await);
    let removal = cp
        .sent()
        .into_iter()
        .find(|s| s.nonce == ack.nonce)
        .expect("the ACKed response");
    assert_eq!(removal.removed, ["c1"]);
    assert!(removal.resources.is_empty());
    must(
        cp.wait_for_request("EDS unsubscribe c1", WAIT, |id, r| {
            id == 2
                && r.as_delta().is_some_and(|d| {
                    d.type_url == ENDPOINT && d.resource_names_unsubscribe.iter().any(|n| n == "c1")
                })
        })
        .await,
    );
    let r = get_until(&url, "503 (cluster gone)", |r| r.status == 503).await;
    assert_eq!(r.status, 503);
    assert!(cp.nacks().is_empty(), "{:#?}", cp.nacks());
}

/// SotW over a Unix socket (as Istio's pilot-agent serves Envoy), with an
/// empty CDS: the empty wildcard response lets Envoy go LIVE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_control_plane_serves_envoy() {
    let dir = weir_tests::tmp::TempDir::new("xds-uds").expect("temp dir");
    let path = dir.join("xds.sock");
    let cp = ControlPlane::start_unix(&path)
        .await
        .expect("control plane");
    let listen = free_port();
    let hcm = r#"
  - name: hcm
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: ingress
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {prefix: /}
            direct_response: {status: 200, body: {inline_string: via-unix}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;
    let v = must(cp.upsert_yaml(LISTENER, &listener_with("l", listen, hcm)));
    let _envoy = start_envoy(bootstrap("GRPC", &cp, free_port())).await;
    must(cp.wait_for_ack(LISTENER, &v, WAIT).await);
    let cds = must(cp.wait_for_ack(CLUSTER, "0", WAIT).await);
    let empty = cp
        .sent()
        .into_iter()
        .find(|s| s.nonce == cds.nonce)
        .expect("sent");
    assert!(empty.resources.is_empty());
    let r = get_until(&format!("http://127.0.0.1:{listen}/"), "200", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(r.text(), "via-unix");
    drop(cp);
    assert!(!path.exists(), "socket file removed on drop");
}
