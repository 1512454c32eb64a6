use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Mutex;

use futures_util::FutureExt;
use xds_client::config::{
    FaultAbort, FaultDelay, HeaderKey, HeaderMatcher, PerFilterConfig, PerFilterConfigs,
    StringMatch, StringMatcher,
};

use super::*;

fn pct(numerator: u32, denominator: u32) -> Fraction {
    Fraction {
        numerator,
        denominator,
    }
}

fn headers(kv: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in kv {
        h.append(*k, v.parse().expect("value"));
    }
    h
}

fn fixed_delay(ms: u64, p: Fraction) -> FaultConfig {
    FaultConfig {
        delay: Some(FaultDelay {
            kind: DelayKind::Fixed(Duration::from_millis(ms)),
            percentage: p,
        }),
        ..Default::default()
    }
}

fn abort(kind: AbortKind, p: Fraction) -> FaultConfig {
    FaultConfig {
        abort: Some(FaultAbort {
            kind,
            percentage: p,
            body: None,
        }),
        ..Default::default()
    }
}

/// A random source returning `v` every time.
fn always(v: u64) -> impl FnMut() -> u64 {
    move || v
}

#[test]
fn percentages_roll_against_the_denominator() {
    let c = fixed_delay(5, pct(25, 100));
    let h = HeaderMap::new();
    assert!(delay_for(&c, &h, false, &mut always(24)).is_some());
    assert!(delay_for(&c, &h, false, &mut always(25)).is_none());
    assert!(delay_for(&c, &h, false, &mut always(124)).is_some()); // 124 % 100
    let c = fixed_delay(5, pct(1, 10_000));
    assert!(delay_for(&c, &h, false, &mut always(10_000)).is_some());
    assert!(delay_for(&c, &h, false, &mut always(1)).is_none());
    let c = fixed_delay(5, pct(500_000, 1_000_000));
    assert!(delay_for(&c, &h, false, &mut always(499_999)).is_some());
    assert!(delay_for(&c, &h, false, &mut always(500_000)).is_none());
    // Numerator above the denominator: always.
    let c = fixed_delay(5, pct(200, 100));
    assert!(delay_for(&c, &h, false, &mut always(99)).is_some());
    // Unset percentage: never.
    let c = fixed_delay(5, Fraction::default());
    assert!(delay_for(&c, &h, false, &mut always(0)).is_none());
}

#[test]
fn a_downstream_cluster_rolls_twice() {
    let c = fixed_delay(5, pct(50, 100));
    let h = HeaderMap::new();
    let mut seq = [70u64, 10].into_iter();
    assert!(delay_for(&c, &h, true, &mut || seq.next().expect("roll")).is_some());
    let mut seq = [70u64, 10].into_iter();
    assert!(delay_for(&c, &h, false, &mut || seq.next().expect("roll")).is_none());
}

#[test]
fn delays_are_whole_milliseconds_and_zero_is_none() {
    let h = HeaderMap::new();
    let mut c = fixed_delay(5, pct(100, 100));
    c.delay.as_mut().expect("delay").kind = DelayKind::Fixed(Duration::from_micros(900));
    assert_eq!(delay_for(&c, &h, false, &mut always(0)), None);
    c.delay.as_mut().expect("delay").kind = DelayKind::Fixed(Duration::from_micros(2900));
    assert_eq!(
        delay_for(&c, &h, false, &mut always(0)),
        Some(Duration::from_millis(2))
    );
}

#[test]
fn header_delay_and_its_percentage() {
    let mut c = fixed_delay(0, pct(100, 100));
    c.delay.as_mut().expect("delay").kind = DelayKind::Header;
    let r = &mut always(0);
    assert_eq!(delay_for(&c, &HeaderMap::new(), false, r), None);
    let h = headers(&[(DELAY_REQUEST, "30")]);
    assert_eq!(delay_for(&c, &h, false, r), Some(Duration::from_millis(30)));
    for bad in ["x", "-3", "0", ""] {
        let h = headers(&[(DELAY_REQUEST, bad)]);
        assert_eq!(delay_for(&c, &h, false, r), None, "{bad:?}");
    }
    // The percentage header lowers the numerator...
    let h = headers(&[(DELAY_REQUEST, "30"), (DELAY_PERCENTAGE, "0")]);
    assert_eq!(delay_for(&c, &h, false, r), None);
    let h = headers(&[(DELAY_REQUEST, "30"), (DELAY_PERCENTAGE, "40")]);
    assert!(delay_for(&c, &h, false, &mut always(39)).is_some());
    assert!(delay_for(&c, &h, false, &mut always(40)).is_none());
    // ... never raises it, and an invalid one is ignored.
    c.delay.as_mut().expect("delay").percentage = pct(10, 100);
    let h = headers(&[(DELAY_REQUEST, "30"), (DELAY_PERCENTAGE, "90")]);
    assert!(delay_for(&c, &h, false, &mut always(10)).is_none());
    let h = headers(&[(DELAY_REQUEST, "30"), (DELAY_PERCENTAGE, "zz")]);
    assert!(delay_for(&c, &h, false, &mut always(9)).is_some());
}

#[test]
fn abort_statuses() {
    let r = &mut always(0);
    let none = AbortInputs::default();
    let c = abort(AbortKind::Http(503), pct(100, 100));
    assert_eq!(
        abort_for(&c, &none, false, r),
        Some(Abort {
            status: 503,
            grpc_status: None
        })
    );
    let c = abort(AbortKind::Grpc(14), pct(100, 100));
    assert_eq!(
        abort_for(&c, &none, false, r),
        Some(Abort {
            status: 200,
            grpc_status: Some(14)
        })
    );
    let c = abort(AbortKind::Http(503), pct(0, 100));
    assert_eq!(abort_for(&c, &none, false, r), None);

    let c = abort(AbortKind::Header, pct(100, 100));
    assert_eq!(abort_for(&c, &none, false, r), None);
    let i = |kv: &[(&'static str, &str)]| AbortInputs::from_headers(&headers(kv));
    assert_eq!(
        abort_for(&c, &i(&[(ABORT_REQUEST, "429")]), false, r).map(|a| a.status),
        Some(429)
    );
    // Out of [200, 600): no HTTP status; the gRPC one then applies.
    assert_eq!(abort_for(&c, &i(&[(ABORT_REQUEST, "600")]), false, r), None);
    assert_eq!(
        abort_for(
            &c,
            &i(&[(ABORT_REQUEST, "199"), (ABORT_GRPC_REQUEST, "5")]),
            false,
            r
        ),
        Some(Abort {
            status: 200,
            grpc_status: Some(5)
        })
    );
    // Both: HTTP wins.
    assert_eq!(
        abort_for(
            &c,
            &i(&[(ABORT_REQUEST, "503"), (ABORT_GRPC_REQUEST, "5")]),
            false,
            r
        ),
        Some(Abort {
            status: 503,
            grpc_status: None
        })
    );
    let hp = i(&[(ABORT_REQUEST, "503"), (ABORT_PERCENTAGE, "0")]);
    assert_eq!(abort_for(&c, &hp, false, r), None);
}

// --- the filter itself, with counting stats

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(String, Arc<Cell>)>>);

#[derive(Default)]
struct Cell(AtomicI64);
impl Counter for Cell {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
}
impl Gauge for Cell {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    fn value(&self) -> i64 {
        self.0.load(Relaxed)
    }
}
impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.value())
    }
}

impl Recorder {
    fn cell(&self, name: &str) -> Arc<Cell> {
        let mut v = self.0.lock().expect("lock");
        if let Some((_, c)) = v.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = Arc::new(Cell::default());
        v.push((name.to_owned(), c.clone()));
        c
    }
    fn get(&self, name: &str) -> i64 {
        self.cell(name).value()
    }
}

#[derive(Debug)]
struct Scope(Arc<Recorder>);
impl StatsScope for Scope {
    fn counter(&self, name: &str) -> Arc<dyn Counter> {
        self.0.cell(name)
    }
    fn gauge(&self, name: &str) -> Arc<dyn Gauge> {
        self.0.cell(name)
    }
}

fn factory(c: FaultConfig) -> (FaultFactory, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = Arc::new(Scope(rec.clone()));
    (
        FaultFactory::new("envoy.filters.http.fault".into(), Arc::new(c), &scope),
        rec,
    )
}

fn request(kv: &[(&'static str, &str)]) -> Parts {
    let mut b = http::Request::get("/x");
    for (k, v) in kv {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn run(f: &mut Box<dyn HttpFilter>, head: &mut Parts) -> (Action, FilterContext) {
    let mut cx = FilterContext::default();
    let a = f.on_request_headers(&mut cx, head);
    (a, cx)
}

#[test]
fn empty_config_creates_no_instance() {
    let (f, _) = factory(FaultConfig::default());
    assert!(f.create(&RouteView::empty()).is_none());
}

#[test]
fn abort_counts_and_flags() {
    let (f, rec) = factory(abort(AbortKind::Http(503), pct(100, 100)));
    let mut i = f.create(&RouteView::empty()).expect("instance");
    let mut head = request(&[(DOWNSTREAM_CLUSTER, "web")]);
    let Action::Respond(r) = run(&mut i, &mut head).0 else {
        panic!("abort")
    };
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "fault filter abort");
    assert_eq!(r.flag, Some("FI"));
    assert_eq!(r.details, "fault_filter_abort");
    assert_eq!(rec.get("fault.aborts_injected"), 1);
    assert_eq!(rec.get("fault.web.aborts_injected"), 1);
    assert_eq!(rec.get("fault.active_faults"), 1);
    drop(i);
    assert_eq!(rec.get("fault.active_faults"), 0);
}

#[test]
fn selection_by_nodes_headers_and_cluster() {
    let mut c = abort(AbortKind::Http(503), pct(100, 100));
    c.downstream_nodes = vec!["a".into()];
    c.headers = vec![HeaderMatcher {
        name: HeaderKey::parse("x-f").expect("name"),
        kind: xds_client::config::HeaderMatch::String(StringMatcher {
            kind: StringMatch::Exact("1".into()),
            ignore_case: false,
        }),
        invert: false,
        treat_missing_as_empty: false,
    }];
    c.upstream_cluster = Some("up".into());
    let (f, _) = factory(c);
    let other = RouteView {
        cluster: Some("other"),
        ..RouteView::empty()
    };
    assert!(f.create(&other).is_none());
    let up = RouteView {
        cluster: Some("up"),
        ..RouteView::empty()
    };
    let mut i = f.create(&up).expect("instance");
    for (kv, aborts) in [
        (&[(DOWNSTREAM_NODE, "a"), ("x-f", "1")][..], true),
        (&[(DOWNSTREAM_NODE, "b"), ("x-f", "1")][..], false),
        (&[("x-f", "1")][..], false),
        (&[(DOWNSTREAM_NODE, "a"), ("x-f", "2")][..], false),
    ] {
        let got = matches!(run(&mut i, &mut request(kv)).0, Action::Respond(_));
        assert_eq!(got, aborts, "{kv:?}");
    }
}

#[test]
fn per_route_override_and_disable() {
    let (f, _) = factory(FaultConfig::default());
    let route = PerFilterConfigs(vec![(
        "envoy.filters.http.fault".into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Fault(Arc::new(abort(
                AbortKind::Http(418),
                pct(100, 100),
            )))),
        },
    )]);
    let empty = PerFilterConfigs::default();
    let view = RouteView {
        per_filter: [&empty, &route, &empty],
        cluster: None,
        request: None,
        rate_limits: None,
    };
    let mut i = f.create(&view).expect("vhost override");
    let Action::Respond(r) = run(&mut i, &mut request(&[])).0 else {
        panic!("abort")
    };
    assert_eq!(r.status, 418);
    let off = PerFilterConfigs(vec![(
        "envoy.filters.http.fault".into(),
        PerFilterConfig {
            disabled: Some(true),
            config: None,
        },
    )]);
    let view = RouteView {
        per_filter: [&off, &route, &empty],
        cluster: None,
        request: None,
        rate_limits: None,
    };
    assert!(view.disabled("envoy.filters.http.fault"));
    assert!(!view.disabled("other"));
}

#[tokio::test(start_paused = true)]
async fn delay_then_abort_and_overflow() {
    let mut c = fixed_delay(1000, pct(100, 100));
    c.abort = abort(AbortKind::Http(502), pct(100, 100)).abort;
    c.max_active_faults = Some(1);
    let (f, rec) = factory(c);
    let mut a = f.create(&RouteView::empty()).expect("instance");
    let (act, cx) = run(&mut a, &mut request(&[]));
    assert_eq!(cx.flags, vec!["DI"]);
    let Action::Wait(fut) = act else {
        panic!("delay")
    };
    assert_eq!(rec.get("fault.delays_injected"), 1);
    assert_eq!(rec.get("fault.active_faults"), 1);
    // A second request finds the slot taken: no fault at all.
    let mut b = f.create(&RouteView::empty()).expect("instance");
    let (act, cx) = run(&mut b, &mut request(&[]));
    assert!(matches!(act, Action::Continue) && cx.flags.is_empty());
    assert_eq!(rec.get("fault.faults_overflow"), 2); // delay, then abort
    let mut fut = fut;
    assert!((&mut fut).now_or_never().is_none());
    let start = tokio::time::Instant::now();
    let Action::Respond(r) = fut.await else {
        panic!("abort after delay")
    };
    assert!(start.elapsed() >= Duration::from_millis(1000));
    assert_eq!(r.status, 502);
    assert_eq!(rec.get("fault.aborts_injected"), 1);
    assert_eq!(rec.get("fault.active_faults"), 0);
    drop(a);
    assert_eq!(rec.get("fault.active_faults"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_delay_without_abort_gives_its_slot_back_when_it_ends() {
    let mut c = fixed_delay(500, pct(100, 100));
    c.max_active_faults = Some(1);
    let (f, rec) = factory(c);
    let mut a = f.create(&RouteView::empty()).expect("instance");
    let Action::Wait(fut) = run(&mut a, &mut request(&[])).0 else {
        panic!("delay")
    };
    assert_eq!(rec.get("fault.active_faults"), 1);
    assert!(matches!(fut.await, Action::Continue));
    // Released after the delay, while the request goes on upstream.
    assert_eq!(rec.get("fault.active_faults"), 0);
    let mut b = f.create(&RouteView::empty()).expect("instance");
    assert!(matches!(run(&mut b, &mut request(&[])).0, Action::Wait(_)));
    assert_eq!(rec.get("fault.faults_overflow"), 0);
    // A client gone during the delay: the dropped future gives it back.
    assert_eq!(rec.get("fault.active_faults"), 0);
    drop((a, b));
    assert_eq!(rec.get("fault.active_faults"), 0);
}
