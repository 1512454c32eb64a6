use std::sync::{atomic::AtomicU64, Mutex};

use super::*;
use crate::http::{Gauge, ResponseBodyChain};

/// A scope that records cluster stats by full name.
#[derive(Debug, Default)]
struct Recorder(Mutex<HashMap<String, Arc<Cnt>>>);

#[derive(Debug, Default)]
struct Cnt(AtomicU64);
impl Counter for Cnt {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
}
impl Histogram for Cnt {
    fn record(&self, _: u64) {
        self.0.fetch_add(1, Relaxed);
    }
}

impl Recorder {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .expect("lock")
            .get(name)
            .map_or(0, |c| c.0.load(Relaxed))
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.lock().expect("lock").keys().cloned().collect();
        v.sort();
        v
    }
    fn entry(&self, name: String) -> Arc<Cnt> {
        self.0
            .lock()
            .expect("lock")
            .entry(name)
            .or_default()
            .clone()
    }
}

impl StatsScope for Recorder {
    fn counter(&self, _: &str) -> Arc<dyn Counter> {
        unreachable!("grpc_stats uses the cluster scope")
    }
    fn gauge(&self, _: &str) -> Arc<dyn Gauge> {
        unreachable!("grpc_stats has no gauges")
    }
    fn cluster_counter(&self, cluster: &str, name: &str) -> Arc<dyn Counter> {
        self.entry(format!("cluster.{cluster}.{name}"))
    }
    fn cluster_histogram(&self, cluster: &str, name: &str) -> Arc<dyn Histogram> {
        self.entry(format!("cluster.{cluster}.{name}"))
    }
}

fn factory(config: GrpcStatsConfig) -> (GrpcStatsFactory, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = rec.clone();
    (
        GrpcStatsFactory::new("envoy.filters.http.grpc_stats", Arc::new(config), &scope),
        rec,
    )
}

fn grpc_request(path: &str, content_type: &str) -> http::request::Parts {
    http::Request::post(path)
        .header("content-type", content_type)
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn view<'a>(req: &'a http::request::Parts, cluster: Option<&'a str>) -> RouteView<'a> {
    RouteView {
        cluster,
        request: Some(req),
        ..RouteView::empty()
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Runs one exchange: request body chunks, response headers (with
/// `end_stream`), response chunks, trailers.
fn exchange(
    f: &GrpcStatsFactory,
    req: &http::request::Parts,
    req_chunks: &[&[u8]],
    headers: &[(&str, &str)],
    end_stream: bool,
    resp_chunks: &[&[u8]],
    trailers: Option<&[(&str, &str)]>,
) {
    let mut inst = f.create(&view(req, Some("c1"))).expect("instance");
    let mut obs = inst.request_body_observer().expect("observer");
    for c in req_chunks {
        obs.on_data(&Bytes::copy_from_slice(c));
    }
    obs.on_end();
    let mut resp = http::Response::builder().status(200);
    for (k, v) in headers {
        resp = resp.header(*k, *v);
    }
    let (mut head, _) = resp.body(()).expect("response").into_parts();
    let mut cx = FilterContext {
        end_stream,
        ..FilterContext::default()
    };
    assert!(matches!(
        inst.on_response_headers(&mut cx, &mut head),
        Action::Continue
    ));
    let Some(mut chain) = ResponseBodyChain::new(vec![inst]) else {
        assert!(end_stream, "a response with a body is watched");
        return;
    };
    let n = resp_chunks.len();
    for (i, c) in resp_chunks.iter().enumerate() {
        let out = chain.data(Bytes::copy_from_slice(c), trailers.is_none() && i + 1 == n);
        assert_eq!(&out[..], *c, "grpc_stats does not change the body");
    }
    if let Some(t) = trailers {
        let mut map = http::HeaderMap::new();
        for (k, v) in t {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        assert!(chain.trailers(&mut map).is_empty());
    }
}

const GRPC: &[(&str, &str)] = &[("content-type", "application/grpc")];

#[test]
fn frame_counter_counts_across_chunks() {
    let mut all = frame(b"hello");
    all.extend(frame(b""));
    all.extend(frame(&[7u8; 300]));
    // Every split point, and byte by byte.
    for split in 0..all.len() {
        let mut c = FrameCounter::default();
        let n = c.inspect(&all[..split]) + c.inspect(&all[split..]);
        assert_eq!(n, 3, "split at {split}");
    }
    let mut c = FrameCounter::default();
    let n: u64 = all.iter().map(|b| c.inspect(std::slice::from_ref(b))).sum();
    assert_eq!(n, 3);
    assert_eq!(c.frames, 3);
}

#[test]
fn default_counts_in_the_cluster_bucket() {
    let (f, rec) = factory(GrpcStatsConfig::default());
    let req = grpc_request("/helloworld.Greeter/SayHello", "application/grpc");
    let body = frame(b"hi");
    exchange(
        &f,
        &req,
        &[&body[..]],
        GRPC,
        false,
        &[&frame(b"a")[..], &frame(b"b")[..]],
        Some(&[("grpc-status", "0")][..]),
    );
    assert_eq!(rec.get("cluster.c1.grpc.success"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.0"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.total"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.failure"), 0);
    assert_eq!(rec.get("cluster.c1.grpc.request_message_count"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.response_message_count"), 2);
    assert!(!rec.names().iter().any(|n| n.contains("Greeter")));
}

#[test]
fn all_methods_and_trailers_only_failure() {
    let (f, rec) = factory(GrpcStatsConfig {
        methods: GrpcStatsMethods::All,
        ..Default::default()
    });
    let req = grpc_request("/helloworld.Greeter/SayHello", "application/grpc+proto");
    exchange(
        &f,
        &req,
        &[],
        &[("content-type", "application/grpc"), ("grpc-status", "14")],
        true,
        &[],
        None,
    );
    let p = "cluster.c1.grpc.helloworld.Greeter.SayHello.";
    assert_eq!(rec.get(&format!("{p}failure")), 1);
    assert_eq!(rec.get(&format!("{p}14")), 1);
    assert_eq!(rec.get(&format!("{p}total")), 1);
    assert_eq!(rec.get(&format!("{p}success")), 0);
    // The same method again reuses the cached stats.
    exchange(
        &f,
        &req,
        &[],
        GRPC,
        false,
        &[],
        Some(&[("grpc-status", "0")][..]),
    );
    assert_eq!(rec.get(&format!("{p}success")), 1);
    assert_eq!(rec.get(&format!("{p}total")), 2);
    assert_eq!(f.cache.read().expect("lock")["c1"].methods.len(), 1);
}

#[test]
fn replace_dots_and_allowlist() {
    let (f, rec) = factory(GrpcStatsConfig {
        methods: GrpcStatsMethods::All,
        replace_dots_in_grpc_service_name: true,
        ..Default::default()
    });
    let req = grpc_request("/a.b.Svc/M", "application/grpc");
    exchange(
        &f,
        &req,
        &[],
        GRPC,
        false,
        &[],
        Some(&[("grpc-status", "0")][..]),
    );
    assert_eq!(rec.get("cluster.c1.grpc.a_b_Svc.M.success"), 1);

    let (f, rec) = factory(GrpcStatsConfig {
        methods: GrpcStatsMethods::Allowlist(vec![("a.Svc".into(), "Listed".into())]),
        replace_dots_in_grpc_service_name: true,
        ..Default::default()
    });
    for path in ["/a.Svc/Listed", "/a.Svc/Other"] {
        let req = grpc_request(path, "application/grpc");
        exchange(
            &f,
            &req,
            &[],
            GRPC,
            false,
            &[],
            Some(&[("grpc-status", "2")][..]),
        );
    }
    assert_eq!(rec.get("cluster.c1.grpc.a.Svc.Listed.failure"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.failure"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.2"), 1);
}

#[test]
fn upstream_rq_time_only_when_enabled() {
    let (f, rec) = factory(GrpcStatsConfig {
        enable_upstream_stats: true,
        ..Default::default()
    });
    let req = grpc_request("/s/m", "application/grpc");
    exchange(
        &f,
        &req,
        &[],
        GRPC,
        false,
        &[],
        Some(&[("grpc-status", "0")][..]),
    );
    assert_eq!(rec.get("cluster.c1.grpc.upstream_rq_time"), 1);
    let (f, rec) = factory(GrpcStatsConfig::default());
    exchange(
        &f,
        &req,
        &[],
        GRPC,
        false,
        &[],
        Some(&[("grpc-status", "0")][..]),
    );
    assert!(!rec.names().iter().any(|n| n.ends_with("upstream_rq_time")));
}

#[test]
fn nothing_for_other_requests() {
    let (f, _) = factory(GrpcStatsConfig::default());
    for (path, ct) in [
        ("/s/m", "application/grpc-web"),
        ("/s/m", "application/grpc;charset=utf-8"),
        ("/s/m", "text/plain"),
        ("/only-one", "application/grpc"),
        ("/a/b/c", "application/grpc"),
    ] {
        let req = grpc_request(path, ct);
        assert!(f.create(&view(&req, Some("c1"))).is_none(), "{path} {ct}");
    }
    let req = grpc_request("/s/m", "application/grpc");
    assert!(f.create(&view(&req, None)).is_none(), "no cluster");
    assert!(f.create(&RouteView::empty()).is_none(), "no request");
    // Empty path pieces are dropped, as Envoy's splitToken.
    assert!(f
        .create(&view(
            &grpc_request("//s//m", "application/grpc"),
            Some("c1")
        ))
        .is_some());
}

#[test]
fn non_grpc_response_counts_no_messages_but_trailers_status() {
    let (f, rec) = factory(GrpcStatsConfig::default());
    let req = grpc_request("/s/m", "application/grpc");
    exchange(
        &f,
        &req,
        &[],
        &[("content-type", "text/html")],
        false,
        &[&frame(b"x")[..]],
        Some(&[("grpc-status", "13")][..]),
    );
    assert_eq!(rec.get("cluster.c1.grpc.response_message_count"), 0);
    assert_eq!(rec.get("cluster.c1.grpc.13"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.failure"), 1);
}

#[test]
fn status_counters_are_bounded() {
    let (f, rec) = factory(GrpcStatsConfig::default());
    let req = grpc_request("/s/m", "application/grpc");
    for i in 0..(MAX_STATUSES + 10) {
        let s = format!("x{i}");
        exchange(
            &f,
            &req,
            &[],
            GRPC,
            false,
            &[],
            Some(&[("grpc-status", s.as_str())][..]),
        );
    }
    let statuses = rec
        .names()
        .into_iter()
        .filter(|n| n.starts_with("cluster.c1.grpc.x"))
        .count();
    assert_eq!(statuses, MAX_STATUSES);
    assert_eq!(
        rec.get("cluster.c1.grpc.failure"),
        (MAX_STATUSES + 10) as u64
    );
}

/// The request's `envoy.filters.http.grpc_stats` object, as the instance
/// left it at its request headers.
fn state_of(inst: &mut Box<dyn HttpFilter>, path: &str) -> Option<Arc<dyn StateObject>> {
    let mut cx = FilterContext::default();
    let mut head = grpc_request(path, "application/grpc");
    assert!(matches!(
        inst.on_request_headers(&mut cx, &mut head),
        Action::Continue
    ));
    cx.filter_state.get(GRPC_STATS_STATE).cloned()
}

#[test]
fn emit_filter_state_counts_messages_both_ways() {
    let (f, rec) = factory(GrpcStatsConfig {
        emit_filter_state: true,
        ..GrpcStatsConfig::default()
    });
    let req = grpc_request("/s/m", "application/grpc");
    let mut inst = f.create(&view(&req, Some("c1"))).expect("instance");
    let state = state_of(&mut inst, "/s/m").expect("object");
    // No message yet: nothing to render (Envoy has no object yet).
    assert_eq!(state.serialize_as_string(), None);
    assert_eq!(state.serialize_as_json(), None);
    let mut obs = inst.request_body_observer().expect("observer");
    let mut body = frame(b"a");
    body.extend(frame(b"bb"));
    let (x, y) = body.split_at(3);
    obs.on_data(&Bytes::copy_from_slice(x));
    obs.on_data(&Bytes::copy_from_slice(y));
    obs.on_end();
    assert_eq!(state.serialize_as_string().as_deref(), Some("2,0"));
    assert_eq!(
        state.serialize_as_json().as_deref(),
        Some(r#"{"requestMessageCount":"2"}"#)
    );
    let (mut head, _) = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("response")
        .into_parts();
    let mut cx = FilterContext::default();
    inst.on_response_headers(&mut cx, &mut head);
    let mut chain = ResponseBodyChain::new(vec![inst]).expect("watched");
    let _ = chain.data(Bytes::from(frame(b"r")), false);
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = chain.trailers(&mut t);
    assert_eq!(state.serialize_as_string().as_deref(), Some("2,1"));
    assert_eq!(
        state.serialize_as_json().as_deref(),
        Some(r#"{"requestMessageCount":"2","responseMessageCount":"1"}"#)
    );
    let o = state
        .as_any()
        .downcast_ref::<GrpcStatsObject>()
        .expect("typed");
    assert!(o.emitted());
    assert_eq!(
        (o.request_message_count(), o.response_message_count()),
        (2, 1)
    );
    // The stats are counted as without the object.
    assert_eq!(rec.get("cluster.c1.grpc.request_message_count"), 2);
    assert_eq!(rec.get("cluster.c1.grpc.response_message_count"), 1);
    assert_eq!(rec.get("cluster.c1.grpc.success"), 1);

    // A response-only count leaves the request field out of the JSON.
    let o = GrpcStatsObject::default();
    o.response.fetch_add(3, Relaxed);
    assert_eq!(o.serialize_as_string().as_deref(), Some("0,3"));
    assert_eq!(
        o.serialize_as_json().as_deref(),
        Some(r#"{"responseMessageCount":"3"}"#)
    );
}

#[test]
fn emit_filter_state_without_stats() {
    let (f, rec) = factory(GrpcStatsConfig {
        emit_filter_state: true,
        ..GrpcStatsConfig::default()
    });
    // No cluster, or no `/service/method` path: an instance for the object
    // only (Envoy counts the messages of any gRPC request).
    for (path, cluster) in [("/s/m", None), ("/only-one", Some("c1"))] {
        let req = grpc_request(path, "application/grpc");
        let mut inst = f.create(&view(&req, cluster)).expect("instance");
        let state = state_of(&mut inst, path).expect("object");
        let mut obs = inst.request_body_observer().expect("observer");
        obs.on_data(&Bytes::from(frame(b"a")));
        obs.on_end();
        let (mut head, _) = http::Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(())
            .expect("response")
            .into_parts();
        let mut cx = FilterContext::default();
        inst.on_response_headers(&mut cx, &mut head);
        // Not a gRPC response and no stats: the body is not watched.
        assert!(ResponseBodyChain::new(vec![inst]).is_none());
        assert_eq!(state.serialize_as_string().as_deref(), Some("1,0"));
    }
    assert!(rec.names().is_empty(), "{:?}", rec.names());
    // Not gRPC: still nothing.
    let req = grpc_request("/s/m", "text/plain");
    assert!(f.create(&view(&req, Some("c1"))).is_none());
}

#[test]
fn no_filter_state_without_emit() {
    let (f, _) = factory(GrpcStatsConfig::default());
    let req = grpc_request("/s/m", "application/grpc");
    let mut inst = f.create(&view(&req, Some("c1"))).expect("instance");
    assert!(state_of(&mut inst, "/s/m").is_none());
}
