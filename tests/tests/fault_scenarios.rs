//! `envoy.filters.http.fault` scenarios: real sockets, a real echo
//! upstream. Every test runs against weir in-process by default and against
//! real Envoy with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_tests::config::{yaml_cluster, yaml_file_log, HttpYaml};
use weir_tests::scenario::{Http, Ports, Proxy};
use weir_tests::tmp::TempFile;
use weir_tests::upstream::{self, EchoServer};

const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%";

/// A bootstrap: listener `l` with the fault filter (`fault` is the body of
/// its HTTPFault, without `@type`), an access log, clusters `a` and `b`
/// (both the echo upstream).
#[derive(Clone)]
struct Cfg {
    fault: String,
    /// Routes of the one virtual host (list items at indent 14).
    routes: String,
    /// Extra virtual host fields (indent 14).
    vhost_extra: String,
    /// Extra route configuration fields (indent 12).
    rc_extra: String,
    /// Shared by the clone the bootstrap closure renders.
    log: Arc<TempFile>,
    port: u16,
}

impl Cfg {
    fn new(fault: &str, routes: &str, up: &EchoServer, log: &str) -> Cfg {
        Cfg {
            fault: fault.to_owned(),
            routes: routes.to_owned(),
            vhost_extra: String::new(),
            rc_extra: String::new(),
            log: Arc::new(log_path(log)),
            port: up.port(),
        }
    }

    fn render(&self, p: &Ports) -> String {
        let Cfg {
            fault,
            routes,
            vhost_extra,
            rc_extra,
            log,
            port,
        } = self;
        let sep = if fault.is_empty() { "" } else { ", " };
        HttpYaml {
            hcm: &yaml_file_log(log, LOG_FORMAT, 10),
            rc: rc_extra,
            vhost: vhost_extra,
            routes,
            filters: &format!(
                "          - name: envoy.filters.http.fault\n            typed_config: {{\"@type\": {FAULT}{sep}{fault}}}\n"
            ),
            clusters: &(yaml_cluster("a", &[*port], "") + &yaml_cluster("b", &[*port], "")),
            ..HttpYaml::default()
        }
        .render(p)
    }

    fn start(&self) -> Proxy {
        let c = self.clone();
        Proxy::start(move |p| c.render(p))
    }
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> TempFile {
    weir_tests::config::log_path("fault", name)
}

/// One route `prefix -> cluster` with extra route fields (indent 16).
fn route(prefix: &str, cluster: &str, extra: &str) -> String {
    format!("              - match: {{prefix: \"{prefix}\"}}\n                route: {{cluster: {cluster}}}\n{extra}")
}

/// `typed_per_filter_config` for the fault filter at `indent`.
fn per_filter(indent: usize, value: &str) -> String {
    let pad = " ".repeat(indent);
    format!("{pad}typed_per_filter_config:\n{pad}  envoy.filters.http.fault: {value}\n")
}

fn fault_any(body: &str) -> String {
    format!("{{\"@type\": {FAULT}, {body}}}")
}

async fn echo() -> EchoServer {
    upstream::http1("a").await.expect("echo upstream")
}

async fn lines(p: &Proxy, log: &Path, n: usize) -> Vec<String> {
    p.log_lines(log, n).await
}

/// Whether a request took the delay: Envoy's timers run on the event
/// loop's cached clock and may fire a few milliseconds early as the client
/// measures them.
fn delayed(elapsed: Duration, ms: u64) -> bool {
    elapsed + Duration::from_millis(25) >= Duration::from_millis(ms)
}

const ABORT_503: &str = "abort: {http_status: 503, percentage: {numerator: 100}}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_abort() {
    let up = echo().await;
    let c = Cfg::new(ABORT_503, &route("/", "a", ""), &up, "abort");
    let p = c.start();
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "fault filter abort");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(lines(&p, &c.log, 1).await, ["503 /x FI fault_filter_abort"]);
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.delays_injected").await, Some(0));
    assert_eq!(p.stat("http.ingress.fault.active_faults").await, Some(0));
    // Envoy creates the response rate limit counter too.
    assert_eq!(
        p.stat("http.ingress.fault.response_rl_injected").await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_abort() {
    let up = echo().await;
    let routes = format!(
        "{}{}",
        route("/http", "a", &per_filter(16, &fault_any(ABORT_503))),
        route("/", "a", "")
    );
    let c = Cfg::new(
        "abort: {grpc_status: 14, percentage: {numerator: 100}}",
        &routes,
        &up,
        "grpc",
    );
    let p = c.start();
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let h2 = Http::h2c();
    let r = h2
        .send("POST", &format!("{}/svc/M", p.base()), &grpc, Bytes::new())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert_eq!(r.header("grpc-message"), Some("fault filter abort"));
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    // An HTTP status abort on a gRPC request: grpc-status mapped from it.
    let r = h2
        .send("POST", &format!("{}/http", p.base()), &grpc, Bytes::new())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("14"));
    // A gRPC status abort on a plain request: HTTP 200 with the body.
    let r = Http::h1().get(&format!("{}/plain", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "fault filter abort");
    let l = lines(&p, &c.log, 3).await;
    assert_eq!(
        l,
        [
            "200 /svc/M FI fault_filter_abort",
            "200 /http FI fault_filter_abort",
            "200 /plain FI fault_filter_abort"
        ]
    );
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_delay() {
    let up = echo().await;
    let c = Cfg::new(
        "delay: {fixed_delay: 0.3s, percentage: {numerator: 100}}",
        &route("/", "a", ""),
        &up,
        "delay",
    );
    let p = c.start();
    let t = Instant::now();
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert!(delayed(t.elapsed(), 300), "{:?}", t.elapsed());
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().path, "/x");
    assert_eq!(lines(&p, &c.log, 1).await, ["200 /x DI via_upstream"]);
    assert_eq!(p.stat("http.ingress.fault.delays_injected").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(0));
    assert_eq!(p.stat("http.ingress.fault.active_faults").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_then_abort() {
    let up = echo().await;
    let c = Cfg::new(
        &format!("delay: {{fixed_delay: 0.2s, percentage: {{numerator: 100}}}}, {ABORT_503}"),
        &route("/", "a", ""),
        &up,
        "delay-abort",
    );
    let p = c.start();
    let t = Instant::now();
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert!(delayed(t.elapsed(), 200), "{:?}", t.elapsed());
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "fault filter abort");
    assert_eq!(
        lines(&p, &c.log, 1).await,
        ["503 /x DI,FI fault_filter_abort"]
    );
    assert_eq!(p.stat("http.ingress.fault.delays_injected").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.active_faults").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_controlled_faults() {
    let up = echo().await;
    let c = Cfg::new(
        "abort: {header_abort: {}, percentage: {numerator: 100}}, delay: {header_delay: {}, percentage: {numerator: 100}}",
        &route("/", "a", ""),
        &up,
        "headers",
    );
    let p = c.start();
    let h = Http::h1();
    let url = |s: &str| format!("{}/{s}", p.base());
    assert_eq!(h.get(&url("none"), &[]).await.status, 200);
    let r = h
        .get(&url("abort"), &[("x-envoy-fault-abort-request", "429")])
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.text(), "fault filter abort");
    let r = h
        .get(
            &url("abort0"),
            &[
                ("x-envoy-fault-abort-request", "429"),
                ("x-envoy-fault-abort-request-percentage", "0"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    // Out of [200, 600): no abort.
    let r = h
        .get(&url("abort600"), &[("x-envoy-fault-abort-request", "600")])
        .await;
    assert_eq!(r.status, 200);
    let t = Instant::now();
    let r = h
        .get(&url("delay"), &[("x-envoy-fault-delay-request", "250")])
        .await;
    assert!(delayed(t.elapsed(), 250), "{:?}", t.elapsed());
    assert_eq!(r.status, 200);
    let t = Instant::now();
    let r = h
        .get(
            &url("delay0"),
            &[
                ("x-envoy-fault-delay-request", "2000"),
                ("x-envoy-fault-delay-request-percentage", "0"),
            ],
        )
        .await;
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        lines(&p, &c.log, 6).await,
        [
            "200 /none - via_upstream",
            "429 /abort FI fault_filter_abort",
            "200 /abort0 - via_upstream",
            "200 /abort600 - via_upstream",
            "200 /delay DI via_upstream",
            "200 /delay0 - via_upstream",
        ]
    );
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.delays_injected").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_matcher_restricts() {
    let up = echo().await;
    let c = Cfg::new(
        &format!("{ABORT_503}, headers: [{{name: x-fault, exact_match: \"yes\"}}]"),
        &route("/", "a", ""),
        &up,
        "matcher",
    );
    let p = c.start();
    let h = Http::h1();
    let url = format!("{}/x", p.base());
    assert_eq!(h.get(&url, &[("x-fault", "yes")]).await.status, 503);
    assert_eq!(h.get(&url, &[("x-fault", "no")]).await.status, 200);
    assert_eq!(h.get(&url, &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cluster_restricts() {
    let up = echo().await;
    let routes = format!("{}{}", route("/b", "b", ""), route("/", "a", ""));
    let c = Cfg::new(
        &format!("{ABORT_503}, upstream_cluster: b"),
        &routes,
        &up,
        "cluster",
    );
    let p = c.start();
    let h = Http::h1();
    assert_eq!(h.get(&format!("{}/a", p.base()), &[]).await.status, 200);
    assert_eq!(h.get(&format!("{}/b", p.base()), &[]).await.status, 503);
}

/// With `weighted_clusters`, `upstream_cluster` compares the picked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cluster_with_weighted_clusters() {
    let up = echo().await;
    let weighted = |prefix: &str, c: &str| {
        format!("              - match: {{prefix: \"{prefix}\"}}\n                route: {{weighted_clusters: {{clusters: [{{name: {c}, weight: 100}}]}}}}\n")
    };
    let routes = format!("{}{}", weighted("/wb", "b"), weighted("/", "a"));
    let c = Cfg::new(
        &format!("{ABORT_503}, upstream_cluster: b"),
        &routes,
        &up,
        "weighted",
    );
    let p = c.start();
    let h = Http::h1();
    let r = h.get(&format!("{}/wa", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().path, "/wa");
    assert_eq!(h.get(&format!("{}/wb", p.base()), &[]).await.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_nodes_restrict() {
    let up = echo().await;
    let c = Cfg::new(
        &format!("{ABORT_503}, downstream_nodes: [n1, n3]"),
        &route("/", "a", ""),
        &up,
        "nodes",
    );
    let p = c.start();
    let h = Http::h1();
    let url = format!("{}/x", p.base());
    let node = "x-envoy-downstream-service-node";
    assert_eq!(h.get(&url, &[(node, "n1")]).await.status, 503);
    assert_eq!(h.get(&url, &[(node, "n3")]).await.status, 503);
    assert_eq!(h.get(&url, &[(node, "n2")]).await.status, 200);
    assert_eq!(h.get(&url, &[]).await.status, 200);
}

/// The filter's own config is empty (as istiod installs it); routes and the
/// virtual host give it something to do, or disable it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_and_vhost_overrides() {
    let up = echo().await;
    let teapot = fault_any("abort: {http_status: 418, percentage: {numerator: 100}}");
    let routes = format!(
        "{}{}{}",
        route("/route", "a", &per_filter(16, &teapot)),
        route(
            "/disabled",
            "a",
            &per_filter(
                16,
                "{\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true}"
            )
        ),
        route("/", "a", ""),
    );
    let mut c = Cfg::new("", &routes, &up, "overrides");
    c.vhost_extra = per_filter(14, &fault_any(ABORT_503));
    let p = c.start();
    let h = Http::h1();
    let get = |s: &'static str| {
        let h = h.clone();
        let base = p.base();
        async move { h.get(&format!("{base}{s}"), &[]).await.status }
    };
    assert_eq!(get("/route").await, 418);
    assert_eq!(get("/disabled").await, 200);
    assert_eq!(get("/vhost").await, 503);
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(2));
}

/// A route configuration override, wrapped in `FilterConfig`; a route's
/// `FilterConfig` without `disabled` does not disable it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_configuration_override() {
    let up = echo().await;
    let wrapped = format!(
        "{{\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {}}}",
        fault_any("abort: {http_status: 502, percentage: {numerator: 100}}")
    );
    let mut c = Cfg::new("", &route("/", "a", ""), &up, "rc");
    c.rc_extra = per_filter(12, &wrapped);
    let p = c.start();
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_faults_overflow() {
    let up = echo().await;
    let c = Cfg::new(
        "delay: {fixed_delay: 1s, percentage: {numerator: 100}}, max_active_faults: 1",
        &route("/", "a", ""),
        &up,
        "overflow",
    );
    let p = c.start();
    let h = Http::h1();
    let url = format!("{}/x", p.base());
    let one = {
        let (h, url) = (h.clone(), url.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let r = h.get(&url, &[]).await;
            (r.status, t.elapsed())
        })
    };
    // Let the first take the slot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.stat("http.ingress.fault.active_faults").await, Some(1));
    let t = Instant::now();
    let r = h.get(&url, &[]).await;
    let second = t.elapsed();
    let (status, first) = one.await.expect("first request");
    assert_eq!((status, r.status), (200, 200));
    assert!(delayed(first, 1000), "{first:?}");
    assert!(second < Duration::from_millis(700), "{second:?}");
    assert_eq!(p.stat("http.ingress.fault.faults_overflow").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.delays_injected").await, Some(1));
    assert_eq!(p.stat("http.ingress.fault.active_faults").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_cluster_stats() {
    let up = echo().await;
    let quiet = fault_any(&format!(
        "{ABORT_503}, disable_downstream_cluster_stats: true"
    ));
    let routes = format!(
        "{}{}",
        route("/quiet", "a", &per_filter(16, &quiet)),
        route("/", "a", "")
    );
    let c = Cfg::new(ABORT_503, &routes, &up, "dscluster");
    let p = c.start();
    let h = Http::h1();
    let dc = "x-envoy-downstream-service-cluster";
    assert_eq!(
        h.get(&format!("{}/x", p.base()), &[(dc, "web")])
            .await
            .status,
        503
    );
    assert_eq!(
        h.get(&format!("{}/quiet", p.base()), &[(dc, "api")])
            .await
            .status,
        503
    );
    assert_eq!(
        h.get(&format!("{}/x", p.base()), &[(dc, "")]).await.status,
        503
    );
    assert_eq!(
        p.stat("http.ingress.fault.web.aborts_injected").await,
        Some(1)
    );
    assert_eq!(p.stat("http.ingress.fault.api.aborts_injected").await, None);
    assert_eq!(p.stat("http.ingress.fault.aborts_injected").await, Some(3));
    // Prometheus: the downstream cluster is a tag, as Envoy's extractor.
    let prom = p.admin("GET", "/stats/prometheus").await.text();
    let lines: Vec<&str> = prom
        .lines()
        .filter(|l| l.starts_with("envoy_http_fault_aborts_injected{"))
        .collect();
    assert_eq!(
        lines,
        [
            "envoy_http_fault_aborts_injected{envoy_http_conn_manager_prefix=\"ingress\"} 3",
            "envoy_http_fault_aborts_injected{envoy_fault_downstream_cluster=\"web\",envoy_http_conn_manager_prefix=\"ingress\"} 1",
        ],
        "{prom}"
    );
}

/// The most specific `FilterConfig` decides: a route re-enables the filter
/// a virtual host disabled, with its own config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_reenables_a_vhost_disabled_filter() {
    let up = echo().await;
    let on = format!(
        "{{\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: false, config: {}}}",
        fault_any("abort: {http_status: 451, percentage: {numerator: 100}}")
    );
    let routes = format!(
        "{}{}",
        route("/on", "a", &per_filter(16, &on)),
        route("/", "a", "")
    );
    let mut c = Cfg::new(ABORT_503, &routes, &up, "reenable");
    c.vhost_extra = per_filter(
        14,
        "{\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true}",
    );
    let p = c.start();
    let h = Http::h1();
    assert_eq!(h.get(&format!("{}/on", p.base()), &[]).await.status, 451);
    assert_eq!(h.get(&format!("{}/off", p.base()), &[]).await.status, 200);
}

/// `header_abort` on gRPC requests: `x-envoy-fault-abort-grpc-request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_grpc_abort() {
    let up = echo().await;
    let c = Cfg::new(
        "abort: {header_abort: {}, percentage: {numerator: 100}}",
        &route("/", "a", ""),
        &up,
        "hgrpc",
    );
    let p = c.start();
    let h2 = Http::h2c();
    let url = format!("{}/svc/M", p.base());
    let r = h2
        .send(
            "POST",
            &url,
            &[
                ("content-type", "application/grpc"),
                ("x-envoy-fault-abort-grpc-request", "5"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("5"));
    // An HTTP status header wins; on a gRPC request it maps to grpc-status.
    let r = h2
        .send(
            "POST",
            &url,
            &[
                ("content-type", "application/grpc"),
                ("x-envoy-fault-abort-grpc-request", "5"),
                ("x-envoy-fault-abort-request", "429"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert_eq!(
        lines(&p, &c.log, 2).await,
        [
            "200 /svc/M FI fault_filter_abort",
            // The gRPC-shaped reply's status is what is logged.
            "200 /svc/M FI fault_filter_abort"
        ]
    );
}

/// `FaultAbort.response_body` replaces `fault filter abort`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_response_body() {
    let up = echo().await;
    let c = Cfg::new(
        "abort: {http_status: 503, response_body: \"injected\", percentage: {numerator: 100}}",
        &route("/", "a", ""),
        &up,
        "body",
    );
    let p = c.start();
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "injected");
}

/// A `FilterConfig` that neither configures nor disables is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_filter_config_is_rejected() {
    let up = echo().await;
    let c = Cfg::new(
        "",
        &route(
            "/",
            "a",
            &per_filter(
                16,
                "{\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig}",
            ),
        ),
        &up,
        "empty-fc",
    );
    let r = Proxy::try_start(
        weir_tests::scenario::Target::from_env(),
        Default::default(),
        move |p| c.render(p),
    );
    let e = format!("{:#}", r.err().expect("rejected"));
    assert!(
        e.contains(
            "Empty route/virtual host per filter configuration for envoy.filters.http.fault filter"
        ),
        "{e}"
    );
}

/// A delay without an abort gives its active-fault slot back when it ends,
/// while the request is still upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_releases_the_active_fault_when_it_ends() {
    let up = echo().await;
    let c = Cfg::new(
        "delay: {fixed_delay: 0.2s, percentage: {numerator: 100}}, max_active_faults: 1",
        &route("/", "a", ""),
        &up,
        "release",
    );
    let p = c.start();
    let h = Http::h1();
    let url = format!("{}/x", p.base());
    let slow = {
        let (h, url) = (h.clone(), url.clone());
        tokio::spawn(async move { h.get(&url, &[("x-echo-delay-ms", "1200")]).await.status })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(p.stat("http.ingress.fault.active_faults").await, Some(0));
    let t = Instant::now();
    assert_eq!(h.get(&url, &[]).await.status, 200);
    assert!(delayed(t.elapsed(), 200), "{:?}", t.elapsed());
    assert_eq!(slow.await.expect("slow request"), 200);
    assert_eq!(p.stat("http.ingress.fault.delays_injected").await, Some(2));
    assert_eq!(p.stat("http.ingress.fault.faults_overflow").await, Some(0));
}
