use super::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn detector(cfg: OutlierDetection, hosts: usize) -> (Arc<Store>, Detector, Vec<Arc<HostMonitor>>) {
    let store = Store::new(1, Default::default());
    let d = Detector::new(cfg, &store, "c");
    let addrs: Vec<_> = (0..hosts).map(|i| addr(1000 + i as u16)).collect();
    let m = d.monitors_for(&addrs);
    (store, d, m)
}

fn cfg() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: 3,
        max_ejection_percent: 100,
        interval: Duration::from_millis(100),
        base_ejection_time: Duration::from_millis(300),
        ..Default::default()
    }
}

fn report(d: &Detector, m: &Arc<HostMonitor>, code: u16) -> bool {
    let ev = m.put_http(code, &d.config);
    ev != 0 && d.on_events(m, ev)
}

#[test]
fn consecutive_5xx_ejects_and_time_multiplies() {
    let (store, d, m) = detector(cfg(), 2);
    assert!(!report(&d, &m[0], 500));
    assert!(!report(&d, &m[0], 500));
    // A success resets the streak.
    assert!(!report(&d, &m[0], 200));
    assert!(!report(&d, &m[0], 500));
    assert!(!report(&d, &m[0], 503));
    assert!(report(&d, &m[0], 500));
    assert!(m[0].ejected());
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_active"),
        Some(1)
    );
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_enforced_consecutive_5xx"),
        Some(1)
    );
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_detected_consecutive_5xx"),
        Some(1)
    );
    let t0 = m[0].state().last_ejection.expect("ejected at");
    // Un-ejected at the first interval after base_ejection_time × 1.
    assert!(!d.tick(t0 + Duration::from_millis(200)));
    assert!(d.tick(t0 + Duration::from_millis(300)));
    assert!(!m[0].ejected());
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_active"),
        Some(0)
    );
    // Ejected again at once: now for 2 × base.
    for _ in 0..3 {
        report(&d, &m[0], 500);
    }
    assert!(m[0].ejected());
    let t1 = m[0].state().last_ejection.expect("ejected at");
    assert!(!d.tick(t1 + Duration::from_millis(500)));
    assert!(d.tick(t1 + Duration::from_millis(600)));
}

#[test]
fn gateway_failures_are_detected_but_not_enforced_by_default() {
    let c = OutlierDetection {
        consecutive_5xx: 100,
        consecutive_gateway_failure: 2,
        ..cfg()
    };
    let (store, d, m) = detector(c, 2);
    report(&d, &m[0], 502);
    report(&d, &m[0], 504);
    // enforcing_consecutive_gateway_failure defaults to 0.
    assert!(!m[0].ejected());
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_detected_consecutive_gateway_failure"),
        Some(1)
    );
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_enforced_consecutive_gateway_failure"),
        Some(0)
    );
    let c = OutlierDetection {
        consecutive_5xx: 100,
        consecutive_gateway_failure: 2,
        enforcing_consecutive_gateway_failure: 100,
        ..cfg()
    };
    let (_, d, m) = detector(c, 2);
    report(&d, &m[1], 503);
    // A 500 is not a gateway error: the streak restarts.
    report(&d, &m[1], 500);
    report(&d, &m[1], 503);
    assert!(!m[1].ejected());
    report(&d, &m[1], 503);
    assert!(m[1].ejected());
}

#[test]
fn max_ejection_percent_caps_ejections() {
    let c = OutlierDetection {
        max_ejection_percent: 50,
        ..cfg()
    };
    let (store, d, m) = detector(c, 2);
    for _ in 0..3 {
        report(&d, &m[0], 500);
        report(&d, &m[1], 500);
    }
    assert!(m[0].ejected());
    assert!(!m[1].ejected());
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_overflow"),
        Some(1)
    );
    // always_eject_one_host lets one through even under a tiny cap.
    let c = OutlierDetection {
        max_ejection_percent: 1,
        always_eject_one_host: true,
        ..cfg()
    };
    let (_, d, m) = detector(c, 3);
    for _ in 0..3 {
        report(&d, &m[2], 500);
    }
    assert!(m[2].ejected());
}

#[test]
fn local_origin_errors_split_or_mapped() {
    // Not split: a connect failure is a 503 (gateway error and 5xx).
    let (_, d, m) = detector(cfg(), 2);
    for _ in 0..3 {
        let ev = m[0].put_local(LocalResult::ConnectFailed, &d.config);
        if ev != 0 {
            d.on_events(&m[0], ev);
        }
    }
    assert!(m[0].ejected());
    // Split: only consecutive_local_origin_failure counts them, and a
    // connection success resets the streak.
    let c = OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: 2,
        ..cfg()
    };
    let (store, d, m) = detector(c, 2);
    let put = |r| {
        let ev = m[0].put_local(r, &d.config);
        ev != 0 && d.on_events(&m[0], ev)
    };
    assert!(!put(LocalResult::Timeout));
    assert!(!put(LocalResult::ConnectSuccess));
    assert!(!put(LocalResult::ConnectFailed));
    assert!(put(LocalResult::ConnectFailed));
    assert_eq!(
        store
            .get("cluster.c.outlier_detection.ejections_enforced_consecutive_local_origin_failure"),
        Some(1)
    );
    assert_eq!(m[0].consecutive_5xx.load(Relaxed), 0);
}

#[test]
fn success_rate_and_failure_percentage() {
    let c = OutlierDetection {
        consecutive_5xx: 0,
        success_rate_minimum_hosts: 3,
        success_rate_request_volume: 10,
        success_rate_stdev_factor: 1.0,
        failure_percentage_minimum_hosts: 100,
        ..cfg()
    };
    let (store, d, m) = detector(c, 4);
    // Hosts 0-2 answer 100% (and 90%), host 3 50%.
    for (i, ok) in [(0, 10), (1, 10), (2, 9), (3, 5)] {
        for k in 0..10 {
            m[i].put_http(if k < ok { 200 } else { 500 }, &d.config);
        }
    }
    let now = Instant::now();
    // The first tick makes the bucket readable and evaluates it.
    assert!(d.tick(now));
    assert!(m[3].ejected());
    assert!(!m[2].ejected());
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_enforced_success_rate"),
        Some(1)
    );
    let (avg, thr, _, _) = d.success_rate_nums();
    assert!((avg - 85.0).abs() < 1e-9 && thr < avg, "{avg} {thr}");
    assert_eq!(m[3].success_rates().0, 50.0);
    // Failure percentage: detected, enforced only when enforcing.
    let c = OutlierDetection {
        consecutive_5xx: 0,
        success_rate_minimum_hosts: 100,
        failure_percentage_minimum_hosts: 2,
        failure_percentage_request_volume: 4,
        failure_percentage_threshold: 50,
        enforcing_failure_percentage: 100,
        ..cfg()
    };
    let (store, d, m) = detector(c, 2);
    for k in 0..4 {
        m[0].put_http(200, &d.config);
        m[1].put_http(if k < 2 { 200 } else { 503 }, &d.config);
    }
    assert!(d.tick(Instant::now()));
    assert!(m[1].ejected() && !m[0].ejected());
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_detected_failure_percentage"),
        Some(1)
    );
}

#[test]
fn removed_hosts_release_their_ejection() {
    let (store, d, m) = detector(cfg(), 2);
    for _ in 0..3 {
        report(&d, &m[1], 500);
    }
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_active"),
        Some(1)
    );
    let kept = d.monitors_for(&[addr(1000)]);
    assert!(Arc::ptr_eq(&kept[0], &m[0]));
    assert_eq!(
        store.get("cluster.c.outlier_detection.ejections_active"),
        Some(0)
    );
    // Reports from the removed host are ignored.
    assert!(!d.on_events(&m[1], EV_5XX));
}
