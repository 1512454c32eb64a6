//! xDS scenarios: weir (or, with `WEIR_SCENARIO_TARGET=envoy`, real Envoy)
//! takes listeners, routes, clusters and endpoints from the in-process
//! control plane over ADS, state of the world and delta, and serves real
//! traffic to real upstreams through them.
use std::time::Duration;

use weir_tests::scenario::{Http, Proxy, Resp};
use weir_tests::upstream;
use weir_tests::xds::yaml::{eds_cluster, endpoints, rds_listener, route};
use weir_tests::xds::{type_url as t, ControlPlane, Recorded};

const WAIT: Duration = Duration::from_secs(15);

fn bootstrap(cp: &ControlPlane, delta: bool, admin: u16) -> String {
    cp.ads_bootstrap(
        r#"{id: test-node, cluster: test-cluster, metadata: {ISTIO_VERSION: "1.24"}}"#,
        delta,
        admin,
    )
}

/// GETs until `ok` accepts the response (config applies asynchronously).
async fn get_until(url: &str, ok: impl Fn(&Resp) -> bool) -> Resp {
    let http = Http::h1();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = http.try_send("GET", url, &[], Default::default()).await;
        match r {
            Ok(r) if ok(&r) => return r,
            Ok(r) if tokio::time::Instant::now() > deadline => {
                panic!("{url}: last response {} {}", r.status, r.text())
            }
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{url}: {e:#}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

struct World {
    cp: ControlPlane,
    proxy: Proxy,
    port: u16,
    a: upstream::EchoServer,
    b: upstream::EchoServer,
}

/// Pushes EDS cluster `c1` with one endpoint at `upstream`, `listener`,
/// and (with `routes`) RDS `r1` sending everything to `c1`; returns the
/// control plane's version after the last push.
fn push_c1(cp: &ControlPlane, upstream: u16, listener: &str, routes: bool) -> String {
    cp.set_yaml(t::CLUSTER, &[&eds_cluster("c1")]).expect("cds");
    cp.set_yaml(t::ENDPOINT, &[&endpoints("c1", &[upstream])])
        .expect("eds");
    let v = cp.set_yaml(t::LISTENER, &[listener]).expect("lds");
    if routes {
        cp.set_yaml(t::ROUTE, &[&route("r1", "c1", "")])
            .expect("rds")
    } else {
        v
    }
}

/// A proxy on ADS with one listener (RDS `r1`), EDS cluster `c1` at
/// upstream `a`, all acknowledged.
async fn world(delta: bool) -> World {
    let cp = ControlPlane::start().await.expect("control plane");
    let a = upstream::http1("a").await.expect("upstream a");
    let b = upstream::http1("b").await.expect("upstream b");
    let port = weir_tests::free_port();
    let v = push_c1(&cp, a.port(), &rds_listener("dyn", port, "r1"), true);
    let proxy = Proxy::start(|p| bootstrap(&cp, delta, p.admin));
    for ty in [t::CLUSTER, t::ENDPOINT, t::LISTENER, t::ROUTE] {
        cp.wait_for_ack(ty, &v, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{ty}: {e:#}"));
    }
    World {
        cp,
        proxy,
        port,
        a,
        b,
    }
}

async fn brings_up_and_serves(delta: bool) {
    let w = world(delta).await;
    let url = format!("http://127.0.0.1:{}/hello", w.port);
    let r = get_until(&url, |r| r.status == 200).await;
    assert_eq!(r.echo().upstream, "a");
    assert_eq!(r.echo().path, "/hello");
    // Subscriptions as Envoy: RDS and EDS by the names referenced.
    w.cp.wait_for_subscription(t::ROUTE, "r1", WAIT)
        .await
        .expect("rds name");
    w.cp.wait_for_subscription(t::ENDPOINT, "c1", WAIT)
        .await
        .expect("eds name");
    // The node identity goes on the first request only.
    let reqs = w.cp.requests();
    let (stream, first) = reqs.first().expect("a request").clone();
    let node = first.node().expect("node on the first request");
    assert_eq!(node.id, "test-node");
    assert_eq!(node.cluster, "test-cluster");
    assert!(!node.user_agent_name.is_empty());
    for (s, r) in reqs.iter().skip(1) {
        if *s == stream {
            assert!(r.node().is_none(), "set_node_on_first_message_only: {r:?}");
        }
    }
    let ready = w.proxy.admin("GET", "/ready").await;
    assert_eq!((ready.status, ready.text().trim()), (200, "LIVE"));
    assert_eq!(w.proxy.stat("control_plane.connected_state").await, Some(1));
    assert!(w.proxy.stat("listener_manager.lds.update_success").await >= Some(1));
    assert!(w.proxy.stat("cluster_manager.cds.update_success").await >= Some(1));
    // version_text: the last accepted version, as a text readout.
    let stats = w
        .proxy
        .admin("GET", "/stats?filter=version_text")
        .await
        .text();
    assert!(
        stats.contains("cluster_manager.cds.version_text: \"")
            && stats.contains("listener_manager.lds.version_text: \""),
        "{stats}"
    );
    // /config_dump shows the dynamic resources with their versions.
    let dump = w.proxy.admin("GET", "/config_dump").await.json();
    let of = |ty: &str| {
        dump["configs"]
            .as_array()
            .expect("configs")
            .iter()
            .find(|c| c["@type"] == format!("type.googleapis.com/envoy.admin.v3.{ty}"))
            .cloned()
            .unwrap_or_else(|| panic!("no {ty} in {dump}"))
    };
    let lds = of("ListenersConfigDump");
    let dl = &lds["dynamic_listeners"][0];
    assert_eq!(dl["name"], "dyn", "{lds}");
    assert_eq!(dl["active_state"]["listener"]["name"], "dyn", "{lds}");
    assert!(!dl["active_state"]["version_info"]
        .as_str()
        .unwrap_or("")
        .is_empty());
    assert!(dl["active_state"]["last_updated"].is_string());
    let cds = of("ClustersConfigDump");
    let c1 = cds["dynamic_active_clusters"]
        .as_array()
        .expect("dynamic clusters")
        .iter()
        .find(|c| c["cluster"]["name"] == "c1")
        .unwrap_or_else(|| panic!("c1 in {cds}"))
        .clone();
    assert!(!c1["version_info"].as_str().unwrap_or("").is_empty());
    let rds = of("RoutesConfigDump");
    assert_eq!(
        rds["dynamic_route_configs"][0]["route_config"]["name"], "r1",
        "{rds}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_ads_brings_up_listener_routes_clusters_endpoints() {
    brings_up_and_serves(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_brings_up_listener_routes_clusters_endpoints() {
    brings_up_and_serves(true).await;
}

async fn updates_apply(delta: bool) {
    let w = world(delta).await;
    let base = format!("http://127.0.0.1:{}", w.port);
    get_until(&format!("{base}/x"), |r| r.status == 200).await;
    // RDS: a new route applies to the next request.
    let extra = "\n  - match: {path: /direct}\n    direct_response: {status: 203, body: {inline_string: routed}}";
    let v =
        w.cp.set_yaml(t::ROUTE, &[&route("r1", "c1", extra)])
            .expect("rds");
    w.cp.wait_for_ack(t::ROUTE, &v, WAIT)
        .await
        .expect("rds ack");
    let r = get_until(&format!("{base}/direct"), |r| r.status == 203).await;
    assert_eq!(r.text(), "routed");
    // EDS: the endpoints move to upstream b; the cluster is not rebuilt.
    let v =
        w.cp.set_yaml(t::ENDPOINT, &[&endpoints("c1", &[w.b.port()])])
            .expect("eds");
    w.cp.wait_for_ack(t::ENDPOINT, &v, WAIT)
        .await
        .expect("eds ack");
    get_until(&format!("{base}/y"), |r| {
        r.status == 200 && r.echo().upstream == "b"
    })
    .await;
    // CDS: a second cluster and a route to it.
    w.cp.upsert_yaml(t::CLUSTER, &eds_cluster("c2"))
        .expect("cds");
    w.cp.upsert_yaml(t::ENDPOINT, &endpoints("c2", &[w.a.port()]))
        .expect("eds");
    let extra = "\n  - match: {prefix: /two}\n    route: {cluster: c2}";
    let v =
        w.cp.set_yaml(t::ROUTE, &[&route("r1", "c1", extra)])
            .expect("rds");
    w.cp.wait_for_ack(t::ROUTE, &v, WAIT)
        .await
        .expect("rds ack");
    get_until(&format!("{base}/two"), |r| {
        r.status == 200 && r.echo().upstream == "a"
    })
    .await;
    // LDS: a removed listener stops accepting.
    let v = w.cp.set(t::LISTENER, vec![]).expect("lds");
    w.cp.wait_for_ack(t::LISTENER, &v, WAIT)
        .await
        .expect("lds ack");
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", w.port))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_updates_of_every_type_apply() {
    updates_apply(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_updates_of_every_type_apply() {
    updates_apply(true).await;
}

async fn bad_resource_is_nacked_alone(delta: bool) {
    let w = world(delta).await;
    let base = format!("http://127.0.0.1:{}", w.port);
    get_until(&format!("{base}/x"), |r| r.status == 200).await;
    // One good new listener and one with a malformed address: both
    // Envoy and weir reject the latter alone.
    let port2 = weir_tests::free_port();
    let good = rds_listener("good", port2, "r1");
    let bad = rds_listener("bad", 1, "r1").replace("address: 127.0.0.1", "address: not-an-ip");
    let bad_any = weir_tests::xds::any_from_yaml(t::LISTENER, &bad).expect("bad listener");
    let good_any = weir_tests::xds::any_from_yaml(t::LISTENER, &good).expect("good");
    let keep = weir_tests::xds::any_from_yaml(t::LISTENER, &rds_listener("dyn", w.port, "r1"))
        .expect("dyn");
    let v =
        w.cp.set(t::LISTENER, vec![keep, good_any, bad_any])
            .expect("lds");
    let nack =
        w.cp.wait_for_nack(t::LISTENER, &v, WAIT)
            .await
            .expect("nack");
    assert!(
        nack.error.message.contains("bad"),
        "the NACK names the listener: {}",
        nack.error.message
    );
    // The good listener of the same response serves; the old one too.
    get_until(&format!("http://127.0.0.1:{port2}/g"), |r| r.status == 200).await;
    get_until(&format!("{base}/x"), |r| r.status == 200).await;
    assert!(w.proxy.stat("listener_manager.lds.update_rejected").await >= Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_bad_listener_is_nacked_without_poisoning_the_others() {
    bad_resource_is_nacked_alone(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bad_listener_is_nacked_without_poisoning_the_others() {
    bad_resource_is_nacked_alone(true).await;
}

async fn survives_control_plane_loss(delta: bool) {
    let w = world(delta).await;
    let base = format!("http://127.0.0.1:{}", w.port);
    get_until(&format!("{base}/x"), |r| r.status == 200).await;
    let opened = w.cp.streams_opened();
    w.cp.pause(true);
    w.cp.disconnect_all();
    // The last good configuration keeps serving while the server is away.
    for _ in 0..20 {
        let r = Http::h1().get(&format!("{base}/during"), &[]).await;
        assert_eq!(r.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    w.cp.pause(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while w.cp.streams_opened() == opened {
        assert!(tokio::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Resubscribed with the versions held.
    let reqs = w.cp.requests();
    let last_stream = reqs.last().map(|(s, _)| *s).expect("requests");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reqs = w.cp.requests();
        let on_new: Vec<&Recorded> = reqs
            .iter()
            .filter(|(s, _)| *s >= last_stream)
            .map(|(_, r)| r)
            .collect();
        let ok = on_new.iter().any(|r| match r {
            Recorded::Delta(d) => {
                d.type_url == t::LISTENER && d.initial_resource_versions.contains_key("dyn")
            }
            Recorded::Sotw(s) => s.type_url == t::LISTENER && !s.version_info.is_empty(),
        });
        if ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no resubscription with known versions: {on_new:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And updates flow again.
    let extra = "\n  - match: {path: /back}\n    direct_response: {status: 202}";
    let v =
        w.cp.set_yaml(t::ROUTE, &[&route("r1", "c1", extra)])
            .expect("rds");
    w.cp.wait_for_ack(t::ROUTE, &v, WAIT)
        .await
        .expect("rds ack");
    get_until(&format!("{base}/back"), |r| r.status == 202).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_keeps_serving_without_the_control_plane_and_resubscribes() {
    survives_control_plane_loss(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_keeps_serving_without_the_control_plane_and_resubscribes() {
    survives_control_plane_loss(true).await;
}

/// Envoy's init manager: a listener warms until its RDS table arrives or
/// the table's `initial_fetch_timeout` passes, and the server reports
/// INITIALIZING (`/ready` 503) until then; after the timeout the listener
/// serves with an empty table (404) until the routes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_warms_until_its_routes_arrive_or_time_out() {
    let cp = ControlPlane::start().await.expect("control plane");
    let a = upstream::http1("a").await.expect("upstream a");
    let port = weir_tests::free_port();
    let l = rds_listener("dyn", port, "r1").replace(
        "config_source: {ads: {}, resource_api_version: V3}",
        "config_source: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 3s}",
    );
    let v = push_c1(&cp, a.port(), &l, false);
    let t0 = tokio::time::Instant::now();
    // A process target's harness waits for LIVE: it returns after the 3 s.
    let proxy = Proxy::start(|p| bootstrap(&cp, true, p.admin));
    cp.wait_for_ack(t::LISTENER, &v, WAIT)
        .await
        .expect("lds ack");
    cp.wait_for_subscription(t::ROUTE, "r1", WAIT)
        .await
        .expect("rds subscription");
    if t0.elapsed() < Duration::from_secs(2) {
        let ready = proxy.admin("GET", "/ready").await;
        assert_eq!((ready.status, ready.text().trim()), (503, "INITIALIZING"));
        assert_eq!(
            proxy.stat("listener_manager.total_listeners_warming").await,
            Some(1)
        );
    } else {
        assert!(proxy.target().is_envoy() || proxy.process().is_some());
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = proxy.admin("GET", "/ready").await;
        if ready.status == 200 {
            assert_eq!(ready.text().trim(), "LIVE");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never LIVE");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(2900),
        "LIVE before the timeout"
    );
    // Warm without routes: no route for anything.
    let r = get_until(&format!("http://127.0.0.1:{port}/w"), |_| true).await;
    assert_eq!(r.status, 404);
    let v = cp
        .set_yaml(t::ROUTE, &[&route("r1", "c1", "")])
        .expect("rds");
    cp.wait_for_ack(t::ROUTE, &v, WAIT).await.expect("rds ack");
    let r = get_until(&format!("http://127.0.0.1:{port}/w"), |r| r.status == 200).await;
    assert_eq!(r.echo().upstream, "a");
    assert_eq!(
        proxy.stat("listener_manager.total_listeners_warming").await,
        Some(0)
    );
}

fn two_chain_listener(port: u16, b_prefix: &str) -> String {
    let chain = |src: &str, prefix: &str| {
        format!(
            r#"
- filter_chain_match: {{source_prefix_ranges: [{{address_prefix: {src}, prefix_len: 32}}]}}
  filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {prefix}
      rds:
        route_config_name: r1
        config_source: {{ads: {{}}, resource_api_version: V3}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
        )
    };
    format!(
        "name: dyn\naddress: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\nfilter_chains:{}{}\n",
        chain("127.0.0.1", "chain_a"),
        chain("127.0.0.2", b_prefix),
    )
}

/// One keep-alive HTTP/1.1 connection from a chosen source address.
struct Conn(tokio::net::TcpStream);

impl Conn {
    async fn open(src: &str, port: u16) -> Conn {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(format!("{src}:0").parse().expect("addr"))
            .expect("bind source");
        Conn(
            s.connect(([127, 0, 0, 1], port).into())
                .await
                .expect("connect"),
        )
    }

    /// Sends a GET and returns the response head (the echo body is read
    /// by its content-length).
    async fn get(&mut self, path: &str) -> String {
        self.try_get(path).await.expect("connection closed")
    }

    /// [`Conn::get`]; `None` when the proxy closed the connection instead.
    async fn try_get(&mut self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        self.0.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(WAIT, self.0.read(&mut chunk))
                .await
                .expect("response in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().expect("length"))
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return Some(head);
                }
            }
        }
    }
}

/// A listener update that changes one filter chain drains only that
/// chain's connections; connections on the unchanged chain go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_update_drains_only_the_changed_chain() {
    let cp = ControlPlane::start().await.expect("control plane");
    let a = upstream::http1("a").await.expect("upstream a");
    let port = weir_tests::free_port();
    let v = push_c1(&cp, a.port(), &two_chain_listener(port, "chain_b"), true);
    // Drained connections close at once (Envoy's default gradual strategy
    // would spread closes over ten minutes).
    let opts = weir_tests::scenario::StartOptions {
        args: ["--drain-strategy", "immediate", "--drain-time-s", "5"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let _proxy = Proxy::start_with(weir_tests::scenario::Target::from_env(), opts, |p| {
        bootstrap(&cp, false, p.admin)
    });
    cp.wait_for_ack(t::LISTENER, &v, WAIT)
        .await
        .expect("lds ack");
    get_until(&format!("http://127.0.0.1:{port}/"), |r| r.status == 200).await;
    let mut on_a = Conn::open("127.0.0.1", port).await;
    let mut on_b = Conn::open("127.0.0.2", port).await;
    assert!(on_a.get("/1").await.starts_with("http/1.1 200"));
    assert!(on_b.get("/1").await.starts_with("http/1.1 200"));
    // Change chain b only.
    let v = cp
        .set_yaml(t::LISTENER, &[&two_chain_listener(port, "chain_b2")])
        .expect("lds");
    cp.wait_for_ack(t::LISTENER, &v, WAIT)
        .await
        .expect("lds ack");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Chain b's connection is drained: closed idle, or closed by its
    // next response.
    if let Some(head) = on_b.try_get("/2").await {
        assert!(head.contains("connection: close"), "{head}");
    }
    // A new connection from b's source is served by the new chain b.
    let mut on_b2 = Conn::open("127.0.0.2", port).await;
    assert!(on_b2.get("/3").await.starts_with("http/1.1 200"));
    // Chain a's connection goes on, many requests later.
    for i in 0..5 {
        let head = on_a.get(&format!("/a{i}")).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
}

/// Hitless updates: keep-alive clients stream requests while the control
/// plane pushes 100 updates of every type (routes, endpoints, clusters,
/// listeners); not one request fails.
async fn hitless(delta: bool) {
    let w = world(delta).await;
    let url = format!("http://127.0.0.1:{}/load", w.port);
    get_until(&url, |r| r.status == 200).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, stop) = (url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let http = Http::h1();
            let (mut ok, mut failed) = (0u64, Vec::new());
            // Bounded: stops when told, or after 200 000 requests.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 200_000 {
                match http.try_send("GET", &url, &[], Default::default()).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            (ok, failed)
        }));
    }
    let mut v = String::new();
    for i in 0..100u32 {
        let (up, other) = if i % 2 == 0 {
            (&w.b, &w.a)
        } else {
            (&w.a, &w.b)
        };
        // Route: a changing extra route; the catch-all stays.
        let extra = format!("\n  - match: {{path: /v{i}}}\n    direct_response: {{status: 200}}");
        w.cp.set_yaml(t::ROUTE, &[&route("r1", "c1", &extra)])
            .expect("rds");
        // Endpoints: both upstreams, in changing order and weights.
        w.cp.set_yaml(t::ENDPOINT, &[&endpoints("c1", &[up.port(), other.port()])])
            .expect("eds");
        // Cluster: a changed connect timeout rebuilds the cluster.
        let c = eds_cluster("c1").replace(
            "connect_timeout: 1s",
            &format!("connect_timeout: {}s", 1 + i % 3),
        );
        w.cp.set_yaml(t::CLUSTER, &[&c]).expect("cds");
        // Listener: a changed stat prefix replaces the filter chain.
        let l = rds_listener("dyn", w.port, "r1")
            .replace("stat_prefix: dyn", &format!("stat_prefix: dyn{}", i % 2));
        v = w.cp.set_yaml(t::LISTENER, &[&l]).expect("lds");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Err(e) = w.cp.wait_for_ack(t::LISTENER, &v, WAIT).await {
        let sent = w.cp.sent();
        panic!(
            "{e:#}\nlast sent: {:?}\nlds attempts {:?}",
            &sent[sent.len().saturating_sub(6)..],
            w.proxy.stat("listener_manager.lds.update_attempt").await
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.expect("client");
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    eprintln!("hitless: {ok} requests, none failed");
    assert!(ok >= 1000, "only {ok} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_hundred_updates_of_every_type_lose_no_request() {
    hitless(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_hundred_updates_of_every_type_lose_no_request() {
    hitless(true).await;
}

/// Filesystem xDS (`path_config_source`), as Envoy's examples use: LDS and
/// CDS from files holding a DiscoveryResponse; replacing a file (atomic
/// rename) applies the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_xds_applies_file_changes() {
    let a = upstream::http1("a").await.expect("upstream a");
    let b = upstream::http1("b").await.expect("upstream b");
    let dir = weir_tests::tmp::TempDir::new("fs-xds").expect("dir");
    let port = weir_tests::free_port();
    let lds = dir.join("lds.yaml");
    let cds = dir.join("cds.yaml");
    let write = |path: &std::path::Path, text: &str| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    };
    let cluster = |up: u16| {
        format!(
            r#"version_info: "{up}"
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: c1
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: c1
    endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
"#
        )
    };
    let listener = format!(
        r#"version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: fs
  address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: fs
        route_config:
          virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: c1}}}}]}}]
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    );
    write(&cds, &cluster(a.port()));
    write(&lds, &listener);
    let _proxy = Proxy::start(|p| {
        format!(
            r#"
node: {{id: fs-node, cluster: fs-cluster}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  lds_config: {{path_config_source: {{path: {lds}}}, resource_api_version: V3}}
  cds_config: {{path_config_source: {{path: {cds}}}, resource_api_version: V3}}
"#,
            admin = p.admin,
            lds = lds.display(),
            cds = cds.display(),
        )
    });
    let url = format!("http://127.0.0.1:{port}/f");
    get_until(&url, |r| r.status == 200 && r.echo().upstream == "a").await;
    write(&cds, &cluster(b.port()));
    get_until(&url, |r| r.status == 200 && r.echo().upstream == "b").await;
}

/// A TLS front for the control plane: terminates TLS (ALPN h2) and relays
/// bytes to the plaintext gRPC port.
async fn tls_front(cp: std::net::SocketAddr, leaf: &weir_tests::tls::Leaf) -> std::net::SocketAddr {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain_der.clone(), leaf.private_key())
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(cp).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

/// The xDS cluster's TLS transport socket is used to reach the control
/// plane (server certificate validated against the configured CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_over_tls_to_the_control_plane() {
    let cp = ControlPlane::start().await.expect("control plane");
    let ca = weir_tests::tls::TestCa::new("xds-ca");
    let leaf = ca.issue(weir_tests::tls::LeafSpec::server("istiod.istio-system.svc"));
    let front = tls_front(cp.addr().expect("tcp"), &leaf).await;
    let a = upstream::http1("a").await.expect("upstream a");
    let port = weir_tests::free_port();
    let v = push_c1(&cp, a.port(), &rds_listener("dyn", port, "r1"), true);
    let ca_pem = ca.pem().replace('\n', "\\n");
    let _proxy = Proxy::start(|p| {
        let b = bootstrap(&cp, true, p.admin).replace(
            &format!("port_value: {}}}", cp.addr().expect("tcp").port()),
            &format!("port_value: {}}}", front.port()),
        );
        format!(
            "{b}    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: istiod.istio-system.svc\n        common_tls_context:\n          alpn_protocols: [h2]\n          validation_context:\n            trusted_ca: {{inline_string: \"{ca_pem}\"}}\n            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: istiod.istio-system.svc}}}}]\n"
        )
    });
    cp.wait_for_ack(t::ROUTE, &v, WAIT)
        .await
        .expect("rds ack over TLS");
    let r = get_until(&format!("http://127.0.0.1:{port}/t"), |r| r.status == 200).await;
    assert_eq!(r.echo().upstream, "a");
}

/// A cluster update that leaves the connection settings alone keeps the
/// pooled upstream connections (weir; Envoy rebuilds its pools), and an EDS
/// update closes the idle connections of endpoints that left (both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_updates_keep_pools_and_close_removed_endpoints() {
    let opts = weir_tests::scenario::StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    let cp = ControlPlane::start().await.expect("control plane");
    let a = upstream::http1("a").await.expect("upstream a");
    let b = upstream::http1("b").await.expect("upstream b");
    let port = weir_tests::free_port();
    let v = push_c1(&cp, a.port(), &rds_listener("dyn", port, "r1"), true);
    let proxy = Proxy::start_with(weir_tests::scenario::Target::from_env(), opts, |p| {
        bootstrap(&cp, false, p.admin)
    });
    cp.wait_for_ack(t::ROUTE, &v, WAIT).await.expect("acks");
    let url = format!("http://127.0.0.1:{port}/p");
    get_until(&url, |r| r.status == 200).await;
    let http = Http::h1();
    for _ in 0..3 {
        assert_eq!(http.get(&url, &[]).await.status, 200);
    }
    // A CDS change that is not about connections (the LB policy). Envoy
    // rebuilds the cluster and re-warms it on EDS, which this control plane
    // does not resend unchanged (go-control-plane would): weir only.
    if !proxy.target().is_envoy() {
        let before = proxy
            .stat("cluster.c1.upstream_cx_total")
            .await
            .expect("stat");
        let c = eds_cluster("c1") + "lb_policy: RANDOM\n";
        let v = cp.set_yaml(t::CLUSTER, &[&c]).expect("cds");
        cp.wait_for_ack(t::CLUSTER, &v, WAIT)
            .await
            .expect("cds ack");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            assert_eq!(http.get(&url, &[]).await.status, 200);
        }
        assert_eq!(
            proxy.stat("cluster.c1.upstream_cx_total").await,
            Some(before),
            "the pooled connection was reused"
        );
    }
    // The endpoint moves to b: a's pooled connection closes.
    let v = cp
        .set_yaml(t::ENDPOINT, &[&endpoints("c1", &[b.port()])])
        .expect("eds");
    cp.wait_for_ack(t::ENDPOINT, &v, WAIT)
        .await
        .expect("eds ack");
    get_until(&url, |r| r.status == 200 && r.echo().upstream == "b").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy.stat("cluster.c1.upstream_cx_active").await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections to the removed endpoint stay open: {:?}",
            proxy.stat("cluster.c1.upstream_cx_active").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
