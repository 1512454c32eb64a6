//! `envoy.filters.http.ratelimit` (the global rate limit service) with real
//! sockets: a real tonic `envoy.service.ratelimit.v3.RateLimitService` that
//! records what it was asked and answers as each test says, a real echo
//! upstream, real HTTP/1.1 and HTTP/2 clients.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`:
//!
//! ```sh
//! cargo test -p weir-tests --test rls_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test rls_scenarios
//! ```
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio_stream::wrappers::TcpListenerStream;
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, filter, h2_upstream, hcm, listener, log_path, merge,
    route, stat_is, vhost,
};
use weir_tests::scenario::{echo_header, Http, Proxy};
use weir_tests::upstream;
use xds_client::api::envoy::config::core::v3 as core;
use xds_client::api::envoy::service::ratelimit::v3 as rls;

const RATE_LIMIT: &str = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n";

type Decide = dyn Fn(&rls::RateLimitRequest) -> rls::RateLimitResponse + Send + Sync;

/// A tonic RateLimitService that records every request.
struct Rls {
    port: u16,
    seen: Arc<Mutex<Vec<rls::RateLimitRequest>>>,
}

#[derive(Clone)]
struct Svc {
    seen: Arc<Mutex<Vec<rls::RateLimitRequest>>>,
    decide: Arc<Decide>,
}

#[tonic::async_trait]
impl rls::rate_limit_service_server::RateLimitService for Svc {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<rls::RateLimitRequest>,
    ) -> Result<tonic::Response<rls::RateLimitResponse>, tonic::Status> {
        let req = request.into_inner();
        let resp = (self.decide)(&req);
        self.seen.lock().expect("lock").push(req);
        Ok(tonic::Response::new(resp))
    }
}

impl Rls {
    async fn start(
        decide: impl Fn(&rls::RateLimitRequest) -> rls::RateLimitResponse + Send + Sync + 'static,
    ) -> Rls {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = rls::rate_limit_service_server::RateLimitServiceServer::new(Svc {
            seen: seen.clone(),
            decide: Arc::new(decide),
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(svc, TcpListenerStream::new(l))
                .await;
        });
        Rls { port, seen }
    }

    fn seen(&self) -> Vec<rls::RateLimitRequest> {
        self.seen.lock().expect("lock").clone()
    }
}

fn hv(k: &str, v: &str) -> core::HeaderValue {
    core::HeaderValue {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

/// The ratelimit filter on cluster `rls`, with `extra` fields.
fn rl_filter(extra: Value) -> Value {
    filter(
        "envoy.filters.http.ratelimit",
        RATE_LIMIT,
        merge(
            json!({
                "domain": "edge",
                "timeout": "2s",
                "rate_limit_service": {
                    "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}},
                    "transport_api_version": "V3",
                },
            }),
            extra,
        ),
    )
}

/// A route to echo whose `rate_limits` send `generic_key: gk` and the
/// `x-user` header as `user`.
fn limited_route() -> Value {
    route(
        "/",
        "echo",
        json!({"route": {"cluster": "echo", "rate_limits": [{"actions": [
            {"generic_key": {"descriptor_value": "gk"}},
            {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}},
        ]}]}}),
    )
}

fn start(f: Value, echo: u16, rls_port: u16, log: &std::path::Path) -> Proxy {
    let log = log.to_path_buf();
    Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![f.clone()],
                    vec![vhost("vh", vec![limited_route()], json!({}))],
                    json!({"access_log": [file_log(&log, LOG_FORMAT)]}),
                )])],
            )],
            vec![
                cluster("echo", &[echo], json!({})),
                cluster("rls", &[rls_port], h2_upstream(json!({}))),
            ],
        )
    })
}

fn decide(req: &rls::RateLimitRequest) -> rls::RateLimitResponse {
    use rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
    let user = req
        .descriptors
        .first()
        .and_then(|d| d.entries.iter().find(|e| e.key == "user"))
        .map(|e| e.value.clone())
        .unwrap_or_default();
    let status = |remaining: u32| DescriptorStatus {
        code: Code::Ok as i32,
        current_limit: Some(RateLimit {
            requests_per_unit: 10,
            unit: 2, // MINUTE
            name: String::new(),
        }),
        limit_remaining: remaining,
        duration_until_reset: Some(xds_client::api::google::protobuf::Duration {
            seconds: 42,
            nanos: 0,
        }),
        ..Default::default()
    };
    if user == "blocked" {
        rls::RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![status(0)],
            response_headers_to_add: vec![hv("x-rl", "over")],
            raw_body: b"slow down".to_vec(),
            ..Default::default()
        }
    } else {
        rls::RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![status(7)],
            request_headers_to_add: vec![hv("x-rl-req", "1")],
            response_headers_to_add: vec![hv("x-rl-resp", "ok")],
            ..Default::default()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_and_over_limit_h1_and_h2() {
    let echo = upstream::http1("echo").await.expect("echo");
    let rls = Rls::start(decide).await;
    let log = log_path("rls", "limits");
    let p = start(
        rl_filter(json!({"enable_x_ratelimit_headers": "DRAFT_VERSION_03"})),
        echo.port(),
        rls.port,
        &log,
    );
    for c in [Http::h1(), Http::h2c()] {
        let r = c
            .get(&format!("{}/a", p.base()), &[("x-user", "alice")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-rl-resp"), Some("ok"));
        assert_eq!(r.header("x-ratelimit-limit"), Some("10, 10;w=60"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("7"));
        assert_eq!(r.header("x-ratelimit-reset"), Some("42"));
        assert_eq!(echo_header(&r.echo(), "x-rl-req"), Some("1"));
        let r = c
            .get(&format!("{}/a", p.base()), &[("x-user", "blocked")])
            .await;
        assert_eq!(r.status, 429);
        assert_eq!(r.text(), "slow down");
        assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
        assert_eq!(r.header("x-rl"), Some("over"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    }
    // Without x-user the request_headers action drops the descriptor: no
    // call.
    let r = Http::h1().get(&format!("{}/a", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    let seen = rls.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].domain, "edge");
    let entries: Vec<(String, String)> = seen[0].descriptors[0]
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    assert_eq!(
        entries,
        vec![
            ("generic_key".to_owned(), "gk".to_owned()),
            ("user".to_owned(), "alice".to_owned())
        ]
    );
    stat_is(&p, "cluster.echo.ratelimit.ok", 2).await;
    stat_is(&p, "cluster.echo.ratelimit.over_limit", 2).await;
    let lines = p.log_lines(&log, 5).await;
    assert_eq!(lines[1], "429 RL request_rate_limited");
    assert_eq!(lines[3], "429 RL request_rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_status_without_the_envoy_header() {
    let echo = upstream::http1("echo").await.expect("echo");
    let rls = Rls::start(decide).await;
    let log = log_path("rls", "status");
    let p = start(
        rl_filter(json!({
            "rate_limited_status": {"code": 503},
            "disable_x_envoy_ratelimited_header": true,
        })),
        echo.port(),
        rls.port,
        &log,
    );
    let r = Http::h1()
        .get(&format!("{}/a", p.base()), &[("x-user", "blocked")])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-envoy-ratelimited"), None);
    assert_eq!(r.header("x-ratelimit-limit"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_down_allows_unless_failure_mode_deny() {
    let echo = upstream::http1("echo").await.expect("echo");
    let down = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr").port()
    };
    let log = log_path("rls", "down");
    let p = start(rl_filter(json!({})), echo.port(), down, &log);
    let r = Http::h1()
        .get(&format!("{}/a", p.base()), &[("x-user", "alice")])
        .await;
    assert_eq!(r.status, 200);
    stat_is(&p, "cluster.echo.ratelimit.error", 1).await;
    stat_is(&p, "cluster.echo.ratelimit.failure_mode_allowed", 1).await;
    drop(p);
    let log = log_path("rls", "down-deny");
    let p = start(
        rl_filter(json!({"failure_mode_deny": true})),
        echo.port(),
        down,
        &log,
    );
    let r = Http::h2c()
        .get(&format!("{}/a", p.base()), &[("x-user", "alice")])
        .await;
    assert_eq!(r.status, 500);
    stat_is(&p, "cluster.echo.ratelimit.error", 1).await;
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(lines, vec!["500 RLSE rate_limiter_error"]);
}

/// `RateLimitPerRoute`: `vh_rate_limits` (INCLUDE adds the virtual host's
/// descriptors after the route's, IGNORE drops them, the default uses them
/// only for a route without rate limits) and `domain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_vh_rate_limits_and_domain() {
    let echo = upstream::http1("echo").await.expect("echo");
    let rls = Rls::start(decide).await;
    let log = log_path("rls", "per-route");
    let (echo_port, rls_port) = (echo.port(), rls.port);
    let per_route = |v: Value| {
        json!({"typed_per_filter_config": {"envoy.filters.http.ratelimit": merge(
            json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"}),
            v,
        )}})
    };
    let key = |v: &str| json!([{"actions": [{"generic_key": {"descriptor_value": v}}]}]);
    let routes = vec![
        route(
            "/inc",
            "echo",
            merge(
                json!({"route": {"cluster": "echo", "rate_limits": key("route")}}),
                per_route(json!({"vh_rate_limits": "INCLUDE", "domain": "inc-domain"})),
            ),
        ),
        route(
            "/ign",
            "echo",
            per_route(json!({"vh_rate_limits": "IGNORE"})),
        ),
        route("/", "echo", json!({})),
    ];
    let l = log.to_path_buf();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![rl_filter(json!({}))],
                    vec![vhost(
                        "vh",
                        routes.clone(),
                        json!({"rate_limits": key("vh")}),
                    )],
                    json!({"access_log": [file_log(&l, LOG_FORMAT)]}),
                )])],
            )],
            vec![
                cluster("echo", &[echo_port], json!({})),
                cluster("rls", &[rls_port], h2_upstream(json!({}))),
            ],
        )
    });
    let c = Http::h1();
    for path in ["/inc", "/ign", "/other"] {
        let r = c.get(&format!("{}{path}", p.base()), &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let seen = rls.seen();
    let calls: Vec<(String, Vec<String>)> = seen
        .iter()
        .map(|r| {
            (
                r.domain.clone(),
                r.descriptors
                    .iter()
                    .flat_map(|d| d.entries.iter().map(|e| e.value.clone()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        vec![
            (
                "inc-domain".to_owned(),
                vec!["route".to_owned(), "vh".to_owned()]
            ),
            ("edge".to_owned(), vec!["vh".to_owned()]),
        ]
    );
}

/// `filter_enforced` 0%: an over-limit answer lets the request go
/// upstream, the response still carrying the service's headers and
/// `x-envoy-ratelimited` (counted as `over_limit`); `filter_enabled` 0%:
/// no call at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_enforced_and_filter_enabled() {
    let echo = upstream::http1("echo").await.expect("echo");
    let rls = Rls::start(decide).await;
    let log = log_path("rls", "enforced");
    let zero = json!({"default_value": {"numerator": 0}, "runtime_key": "rl.off"});
    let p = start(
        rl_filter(json!({"filter_enforced": zero.clone()})),
        echo.port(),
        rls.port,
        &log,
    );
    let r = Http::h1()
        .get(&format!("{}/a", p.base()), &[("x-user", "blocked")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().upstream, "echo");
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(r.header("x-rl"), Some("over"));
    assert_eq!(rls.seen().len(), 1);
    stat_is(&p, "cluster.echo.ratelimit.over_limit", 1).await;
    drop(p);

    let log2 = log_path("rls", "disabled");
    let p = start(
        rl_filter(json!({"filter_enabled": zero})),
        echo.port(),
        rls.port,
        &log2,
    );
    let r = Http::h1()
        .get(&format!("{}/a", p.base()), &[("x-user", "blocked")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(rls.seen().len(), 1, "no call when the filter is disabled");
}
