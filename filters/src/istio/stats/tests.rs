use super::*;
use std::sync::Mutex;

use xds_client::config::IstioMetricConfig;

type Labels = Vec<(String, String)>;

/// Records the labeled stats created (name, labels) and their values.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(String, Labels, Arc<Rec>)>>);

#[derive(Debug, Default)]
struct Rec(Mutex<Vec<u64>>);

impl Counter for Rec {
    fn inc(&self) {
        self.0.lock().expect("lock").push(1);
    }
}
impl Histogram for Rec {
    fn record(&self, v: u64) {
        self.0.lock().expect("lock").push(v);
    }
}

impl Recorder {
    fn get(&self, ns: &str, name: &str, labels: &[(&str, &str)]) -> Arc<Rec> {
        let full = format!("{ns}.{name}");
        let l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut all = self.0.lock().expect("lock");
        if let Some((_, _, r)) = all.iter().find(|(n, ls, _)| *n == full && *ls == l) {
            return r.clone();
        }
        let r = Arc::new(Rec::default());
        all.push((full, l, r.clone()));
        r
    }
    fn find(&self, name: &str) -> Vec<(Labels, Vec<u64>)> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, r)| (l.clone(), r.0.lock().expect("lock").clone()))
            .collect()
    }
}

impl StatsScope for Recorder {
    fn counter(&self, _: &str) -> Arc<dyn Counter> {
        Arc::new(Rec::default())
    }
    fn gauge(&self, _: &str) -> Arc<dyn crate::http::Gauge> {
        crate::http::NoStats.gauge("")
    }
    fn labeled_counter(&self, ns: &str, name: &str, labels: &[(&str, &str)]) -> Arc<dyn Counter> {
        self.get(ns, name, labels)
    }
    fn labeled_histogram(
        &self,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Arc<dyn Histogram> {
        self.get(ns, name, labels)
    }
}

fn local() -> Arc<LocalNode> {
    Arc::new(LocalNode::new(&xds_client::config::Node {
        id: "router~1~gw~ns".into(),
        metadata: serde_json::json!({
            "NAMESPACE": "istio-system", "CLUSTER_ID": "Kubernetes", "WORKLOAD_NAME": "istio-ingressgateway",
            "LABELS": {"app": "istio-ingressgateway", "service.istio.io/canonical-name": "istio-ingressgateway",
                       "service.istio.io/canonical-revision": "latest"},
        }),
        ..Default::default()
    }))
}

fn end<'a>(code: u16, cluster: Option<&'a str>, method: &'a http::Method) -> StreamEnd<'a> {
    StreamEnd {
        response_code: code,
        flags: 0,
        flags_short: |f| if f == 0 { "-".into() } else { "UF".into() },
        request_body_bytes: 3,
        response_body_bytes: 700,
        request_wire_bytes: 60,
        response_wire_bytes: 800,
        duration: std::time::Duration::from_millis(7),
        grpc: false,
        grpc_status: None,
        authority: "bookinfo.example.com",
        path: "/productpage?u=1",
        method,
        protocol: "HTTP/1.1",
        scheme: "http",
        cluster,
        route_name: Some("r"),
        upstream_peer_uri_san: None,
        upstream_local_uri_san: None,
    }
}

fn labels(l: &[(String, String)]) -> Vec<String> {
    l.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[test]
fn gateway_labels_from_upstream_peer_and_cluster_name() {
    let rec: Arc<Recorder> = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = rec.clone();
    let f = IstioStatsFactory::new(
        "s".into(),
        Arc::new(IstioStatsConfig::default()),
        local(),
        &scope,
    );
    let mut cx = FilterContext::default();
    let up = PeerInfo {
        workload: "productpage-v1".into(),
        namespace: "default".into(),
        cluster: "Kubernetes".into(),
        app: "productpage".into(),
        version: "v1".into(),
        canonical_name: "productpage".into(),
        ..Default::default()
    };
    cx.filter_state
        .set(UPSTREAM_PEER, Arc::new(up), Default::default())
        .expect("set");
    let m = http::Method::GET;
    for _ in 0..2 {
        let mut i = f.create(&RouteView::empty()).expect("instance");
        assert!(i.wants_log());
        i.on_stream_end(
            &cx,
            &end(
                200,
                Some("outbound|9080||productpage.default.svc.cluster.local"),
                &m,
            ),
        );
    }
    let got = rec.find("istiocustom.istio_requests_total");
    assert_eq!(got.len(), 1, "one label set, cached");
    assert_eq!(got[0].1, [1, 1]);
    assert_eq!(
        labels(&got[0].0),
        [
            "reporter=source",
            "source_workload=istio-ingressgateway",
            "source_canonical_service=istio-ingressgateway",
            "source_canonical_revision=latest",
            "source_workload_namespace=istio-system",
            "source_principal=unknown",
            "source_app=istio-ingressgateway",
            "source_version=",
            "source_cluster=Kubernetes",
            "destination_workload=productpage-v1",
            "destination_workload_namespace=default",
            "destination_principal=unknown",
            "destination_app=productpage",
            "destination_version=v1",
            "destination_service=productpage.default.svc.cluster.local",
            "destination_canonical_service=productpage",
            "destination_canonical_revision=latest",
            "destination_service_name=productpage",
            "destination_service_namespace=default",
            "destination_cluster=Kubernetes",
            "request_protocol=http",
            "response_code=200",
            "grpc_response_status=",
            "response_flags=-",
            "connection_security_policy=unknown",
        ]
    );
    let d = rec.find("istiocustom.istio_request_duration_milliseconds");
    assert_eq!(d[0].1, [7, 7]);
    assert_eq!(
        rec.find("istiocustom.istio_response_bytes")[0].1,
        [800, 800]
    );
}

#[test]
fn server_labels_from_san_and_overrides() {
    let rec: Arc<Recorder> = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = rec.clone();
    let config = IstioStatsConfig {
        inbound: true,
        disable_host_header_fallback: true,
        metrics: vec![
            IstioMetricConfig {
                name: "request_bytes".into(),
                drop: true,
                ..Default::default()
            },
            IstioMetricConfig {
                tags_to_remove: vec!["response_flags".into(), "not_a_tag".into()],
                ..Default::default()
            },
            IstioMetricConfig {
                name: "requests_total".into(),
                dimensions: vec![("source_app".into(), 0), ("team".into(), 1)],
                ..Default::default()
            },
        ],
        expressions: vec![
            DimensionExpr::Literal("gw".into()),
            DimensionExpr::RequestHeader("x-team".into()),
        ],
        ..Default::default()
    };
    let f = IstioStatsFactory::new("s".into(), Arc::new(config), local(), &scope);
    let mut cx = FilterContext {
        downstream: Some(Arc::new(crate::http::Downstream {
            local_uri_sans: vec!["spiffe://cluster.local/ns/istio-system/sa/gw".into()],
            remote: "127.0.0.1:1".parse().expect("addr"),
            direct_remote: "127.0.0.1:1".parse().expect("addr"),
            local: "127.0.0.1:2".parse().expect("addr"),
            sni: None,
            connection_id: 1,
            peer_uri_sans: vec!["spiffe://cluster.local/ns/apps/sa/client".into()],
            peer_dns_sans: vec![],
            peer_subject: None,
            peer_pem: None,
            tls: true,
            state: Default::default(),
            filter_state: Default::default(),
        })),
        ..Default::default()
    };
    let mut i = f.create(&RouteView::empty()).expect("instance");
    let (mut req, _) = http::Request::get("/")
        .header("x-team", "blue")
        .body(())
        .expect("request")
        .into_parts();
    i.on_request_headers(&mut cx, &mut req);
    let m = http::Method::GET;
    i.on_stream_end(&cx, &end(503, Some("inbound|8080||"), &m));
    let got = rec.find("istiocustom.istio_requests_total");
    let l = labels(&got[0].0);
    assert!(l.contains(&"reporter=destination".to_owned()));
    assert!(l.contains(&"source_principal=spiffe://cluster.local/ns/apps/sa/client".to_owned()));
    assert!(l.contains(&"source_workload_namespace=apps".to_owned()));
    assert!(l.contains(&"source_app=gw".to_owned()));
    assert!(l.contains(&"destination_service=istio-ingressgateway".to_owned()));
    // As Istio: our principal from our certificate; mutual TLS since both
    // principals are known.
    assert!(l.contains(
        &"destination_principal=spiffe://cluster.local/ns/istio-system/sa/gw".to_owned()
    ));
    assert!(l.contains(&"connection_security_policy=mutual_tls".to_owned()));
    assert!(!l.iter().any(|x| x.starts_with("response_flags=")));
    assert_eq!(l.last().map(String::as_str), Some("team=blue"));
    // Dropped metric; the others lose response_flags but keep source_app.
    assert!(rec.find("istiocustom.istio_request_bytes").is_empty());
    let d = labels(&rec.find("istiocustom.istio_response_bytes")[0].0);
    assert!(d.contains(&"source_app=unknown".to_owned()));
    assert!(!d.iter().any(|x| x.starts_with("response_flags=")));
}

#[test]
fn cluster_names_and_sans() {
    assert_eq!(
        cluster_service("outbound|80|v1|reviews.bookinfo.svc.cluster.local"),
        Some(("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo"))
    );
    assert_eq!(
        cluster_service("outbound|443||httpbin.org"),
        Some(("httpbin.org", "httpbin.org", ""))
    );
    assert_eq!(cluster_service("inbound|8080||"), None);
    assert_eq!(cluster_service("echo"), None);
    // A waypoint's inbound-vip cluster (istiod's `istio.services` names
    // the same service).
    assert_eq!(
        cluster_service("inbound-vip|9080|http|details.default.svc.cluster.local"),
        Some(("details.default.svc.cluster.local", "details", "default"))
    );
    assert_eq!(cluster_service("main_internal"), None);
    assert_eq!(san_namespace("spiffe://td/ns/foo/sa/bar"), Some("foo"));
    assert_eq!(san_namespace("spiffe://td/sa/bar"), None);
    assert_eq!(grpc_from_http(503), 14);
}

/// The per-thread last label set belongs to one config: two configs whose
/// requests have the same inputs, alternating on one thread, each count
/// into their own stats (and a config's repeated label set into the same).
#[test]
fn last_label_set_is_per_config() {
    let rec_a: Arc<Recorder> = Arc::new(Recorder::default());
    let rec_b: Arc<Recorder> = Arc::new(Recorder::default());
    let (sa, sb): (Arc<dyn StatsScope>, Arc<dyn StatsScope>) = (rec_a.clone(), rec_b.clone());
    let cfg = Arc::new(IstioStatsConfig::default());
    let a = IstioStatsFactory::new("a".into(), cfg.clone(), local(), &sa);
    let b = IstioStatsFactory::new("b".into(), cfg, local(), &sb);
    let cx = FilterContext::default();
    let m = http::Method::GET;
    for (f, code) in [
        (&a, 200),
        (&b, 200),
        (&a, 200),
        (&a, 503),
        (&b, 200),
        (&a, 200),
    ] {
        let mut i = f.create(&RouteView::empty()).expect("instance");
        i.on_stream_end(&cx, &end(code, Some("c"), &m));
    }
    let count = |rec: &Recorder, code: &str| {
        rec.find("istiocustom.istio_requests_total")
            .into_iter()
            .filter(|(l, _)| l.iter().any(|(k, v)| k == "response_code" && v == code))
            .map(|(_, v)| v.len())
            .sum::<usize>()
    };
    assert_eq!(count(&rec_a, "200"), 3);
    assert_eq!(count(&rec_a, "503"), 1);
    assert_eq!(count(&rec_b, "200"), 2);
    assert_eq!(count(&rec_b, "503"), 0);
}
