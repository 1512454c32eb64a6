//! `envoy.filters.http.ext_authz` with real sockets: a real tonic
//! `envoy.service.auth.v3.Authorization` server and a real HTTP
//! authorization server (both record what they were asked and answer as
//! each test says), a real echo upstream, real HTTP/1.1 and HTTP/2 clients.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`:
//!
//! ```sh
//! cargo test -p weir-tests --test ext_authz_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test ext_authz_scenarios
//! ```
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio_stream::wrappers::TcpListenerStream;
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, filter, h2_upstream, hcm, listener, log_path, route,
    stat_is, vhost,
};
use weir_tests::scenario::{echo_header, Http, Proxy};
use weir_tests::upstream;
use xds_client::api::envoy::config::core::v3 as core;
use xds_client::api::envoy::service::auth::v3 as auth;
use xds_client::api::google::protobuf as pb;

const EXT_AUTHZ: &str = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n";
const NAME: &str = "envoy.filters.http.ext_authz";

type Decide = dyn Fn(&auth::CheckRequest) -> auth::CheckResponse + Send + Sync;

/// A tonic Authorization server that records every CheckRequest.
struct GrpcAuthz {
    port: u16,
    seen: Arc<Mutex<Vec<auth::CheckRequest>>>,
}

#[derive(Clone)]
struct AuthzSvc {
    seen: Arc<Mutex<Vec<auth::CheckRequest>>>,
    decide: Arc<Decide>,
    delay: Duration,
}

#[tonic::async_trait]
impl auth::authorization_server::Authorization for AuthzSvc {
    async fn check(
        &self,
        request: tonic::Request<auth::CheckRequest>,
    ) -> Result<tonic::Response<auth::CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        let resp = (self.decide)(&req);
        self.seen.lock().expect("lock").push(req);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(tonic::Response::new(resp))
    }
}

impl GrpcAuthz {
    async fn start(
        delay: Duration,
        decide: impl Fn(&auth::CheckRequest) -> auth::CheckResponse + Send + Sync + 'static,
    ) -> GrpcAuthz {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = auth::authorization_server::AuthorizationServer::new(AuthzSvc {
            seen: seen.clone(),
            decide: Arc::new(decide),
            delay,
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(svc, TcpListenerStream::new(l))
                .await;
        });
        GrpcAuthz { port, seen }
    }

    fn seen(&self) -> Vec<auth::CheckRequest> {
        self.seen.lock().expect("lock").clone()
    }
}

#[allow(deprecated)] // `append`: what authorization services still send.
fn hv(key: &str, value: &str, append: Option<bool>) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append: append.map(|value| pb::BoolValue { value }),
        ..Default::default()
    }
}

fn ok(resp: auth::OkHttpResponse) -> auth::CheckResponse {
    auth::CheckResponse {
        status: Some(xds_client::api::google::rpc::Status {
            code: 0,
            ..Default::default()
        }),
        http_response: Some(auth::check_response::HttpResponse::OkResponse(resp)),
        ..Default::default()
    }
}

fn denied(status: u32, body: &str, headers: Vec<core::HeaderValueOption>) -> auth::CheckResponse {
    auth::CheckResponse {
        status: Some(xds_client::api::google::rpc::Status {
            code: 7,
            ..Default::default()
        }),
        http_response: Some(auth::check_response::HttpResponse::DeniedResponse(
            auth::DeniedHttpResponse {
                status: (status > 0).then_some(xds_client::api::envoy::r#type::v3::HttpStatus {
                    code: status as i32,
                }),
                headers,
                body: body.into(),
            },
        )),
        ..Default::default()
    }
}

/// The ext_authz filter config for a gRPC service on cluster `authz`.
fn grpc_filter(extra: Value) -> Value {
    filter(
        NAME,
        EXT_AUTHZ,
        weir_tests::config::merge(
            json!({
                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"},
                "transport_api_version": "V3",
            }),
            extra,
        ),
    )
}

/// A proxy with `ext_authz` (`f`) in front of the echo upstream, routes
/// `routes` (default: `/` to echo), and the authz cluster on `authz_port`
/// (`authz_extra`: more cluster fields).
fn start(
    f: Value,
    routes: Option<Vec<Value>>,
    vhost_extra: Value,
    echo: u16,
    authz_port: u16,
    authz_extra: Value,
    log: &std::path::Path,
) -> Proxy {
    let log = log.to_path_buf();
    let routes = routes.unwrap_or_else(|| vec![route("/", "echo", json!({}))]);
    Proxy::start(move |ports| {
        let authz = cluster("authz", &[authz_port], authz_extra.clone());
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![f.clone()],
                    vec![vhost("vh", routes.clone(), vhost_extra.clone())],
                    json!({"access_log": [file_log(&log, LOG_FORMAT)]}),
                )])],
            )],
            vec![cluster("echo", &[echo], json!({})), authz],
        )
    })
}

/// A port with nothing listening.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_allow_applies_header_mutations_h1_and_h2() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| {
        ok(auth::OkHttpResponse {
            headers: vec![
                hv("x-authz-set", "from-authz", Some(false)),
                hv("x-existing", "appended", Some(true)),
                hv("x-authz-new", "new", Some(false)),
                // Neither append nor append_action: Envoy 1.40 sets it.
                hv("x-added", "a", None),
            ],
            headers_to_remove: vec!["x-remove-me".into()],
            response_headers_to_add: vec![
                hv("x-authz-resp", "r", Some(false)),
                hv("x-authz-resp2", "1", Some(true)),
                hv("x-authz-resp2", "2", Some(true)),
            ],
            ..Default::default()
        })
    })
    .await;
    let log = log_path("ext_authz", "allow");
    let p = start(
        grpc_filter(json!({})),
        None,
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    for (i, c) in [Http::h1(), Http::h2c()].into_iter().enumerate() {
        let r = c
            .get(
                &format!("{}/allow?q=1", p.base()),
                &[
                    ("x-authz-set", "client"),
                    ("x-existing", "orig"),
                    ("x-remove-me", "1"),
                    ("x-custom", "v"),
                    ("x-added", "orig"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            weir_tests::scenario::echo_headers(&r.echo(), "x-added"),
            vec!["a"]
        );
        assert_eq!(r.header("x-authz-resp"), Some("r"));
        assert_eq!(r.header_all("x-authz-resp2"), vec!["1", "2"]);
        let e = r.echo();
        assert_eq!(echo_header(&e, "x-authz-set"), Some("from-authz"));
        assert_eq!(echo_header(&e, "x-existing"), Some("orig,appended"));
        assert_eq!(echo_header(&e, "x-authz-new"), Some("new"));
        assert_eq!(echo_header(&e, "x-remove-me"), None);
        let seen = authz.seen();
        assert_eq!(seen.len(), i + 1);
        let a = seen[i].attributes.clone().expect("attributes");
        let h = a.request.and_then(|r| r.http).expect("http request");
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/allow?q=1");
        assert_eq!(h.host, p.addr().to_string());
        assert_eq!(h.scheme, "http");
        assert_eq!(h.protocol, if i == 0 { "HTTP/1.1" } else { "HTTP/2" });
        assert!(!h.id.is_empty());
        assert_eq!(h.headers.get("x-custom").map(String::as_str), Some("v"));
        assert_eq!(h.headers.get(":method").map(String::as_str), Some("GET"));
        assert_eq!(
            h.headers.get(":path").map(String::as_str),
            Some("/allow?q=1")
        );
        assert_eq!(
            h.headers.get("x-authz-set").map(String::as_str),
            Some("client")
        );
        let addr = |p: Option<auth::attribute_context::Peer>| -> SocketAddr {
            match p.and_then(|p| p.address).and_then(|a| a.address) {
                Some(core::address::Address::SocketAddress(s)) => {
                    let port = match s.port_specifier {
                        Some(core::socket_address::PortSpecifier::PortValue(v)) => v as u16,
                        _ => 0,
                    };
                    SocketAddr::new(s.address.parse().expect("ip"), port)
                }
                other => panic!("no socket address: {other:?}"),
            }
        };
        assert_eq!(addr(a.destination), p.addr());
        assert_eq!(addr(a.source).ip(), p.addr().ip());
    }
    stat_is(&p, "http.ingress.ext_authz.ok", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deny_answers_with_the_services_status_body_and_headers() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |req| {
        let path = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_default();
        if path == "/plain" {
            // No denied_response: 403, empty body.
            return auth::CheckResponse {
                status: Some(xds_client::api::google::rpc::Status {
                    code: 16,
                    ..Default::default()
                }),
                ..Default::default()
            };
        }
        denied(
            401,
            "go away",
            vec![
                hv("x-deny", "yes", Some(false)),
                hv("www-authenticate", "Bearer", Some(false)),
                // Appended headers do not reach Envoy 1.40's denial.
                hv("x-deny-appended", "no", Some(true)),
            ],
        )
    })
    .await;
    let log = log_path("ext_authz", "deny");
    let p = start(
        grpc_filter(json!({"stat_prefix": "waf"})),
        None,
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    for c in [Http::h1(), Http::h2c()] {
        let r = c.get(&format!("{}/secret", p.base()), &[]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.text(), "go away");
        assert_eq!(r.header("x-deny"), Some("yes"));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.header("x-deny-appended"), None);
    }
    let r = Http::h1().get(&format!("{}/plain", p.base()), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "");
    // Denied requests never reach the upstream.
    assert_eq!(p.stat("cluster.echo.upstream_rq_total").await, Some(0));
    stat_is(&p, "http.ingress.ext_authz.waf.denied", 3).await;
    let lines = p.log_lines(&log, 3).await;
    assert_eq!(
        lines,
        vec![
            "401 UAEX ext_authz_denied",
            "401 UAEX ext_authz_denied",
            "403 UAEX ext_authz_denied"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_down_is_403_or_let_through_with_failure_mode_allow() {
    let echo = upstream::http1("echo").await.expect("echo");
    let down = closed_port().await;
    let log = log_path("ext_authz", "down");
    let p = start(
        grpc_filter(json!({})),
        None,
        json!({}),
        echo.port(),
        down,
        h2_upstream(json!({})),
        &log,
    );
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "");
    stat_is(&p, "http.ingress.ext_authz.error", 1).await;
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(lines, vec!["403 UAEX ext_authz_error"]);
    drop(p);

    let log = log_path("ext_authz", "down-status");
    let p = start(
        grpc_filter(json!({"status_on_error": {"code": 503}})),
        None,
        json!({}),
        echo.port(),
        down,
        h2_upstream(json!({})),
        &log,
    );
    let r = Http::h2c().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 503);
    drop(p);

    let log = log_path("ext_authz", "down-allow");
    let p = start(
        grpc_filter(json!({"failure_mode_allow": true, "failure_mode_allow_header_add": true})),
        None,
        json!({}),
        echo.port(),
        down,
        h2_upstream(json!({})),
        &log,
    );
    let r = Http::h1()
        .get(
            &format!("{}/x", p.base()),
            &[("x-envoy-auth-failure-mode-allowed", "spoofed")],
        )
        .await;
    assert_eq!(r.status, 200);
    let e = r.echo();
    assert!(
        weir_tests::scenario::echo_headers(&e, "x-envoy-auth-failure-mode-allowed")
            .contains(&"true"),
        "{:?}",
        e.headers
    );
    stat_is(&p, "http.ingress.ext_authz.error", 1).await;
    stat_is(&p, "http.ingress.ext_authz.failure_mode_allowed", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_times_out_as_an_error() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::from_millis(1500), |_| {
        ok(auth::OkHttpResponse::default())
    })
    .await;
    let log = log_path("ext_authz", "timeout");
    let p = start(
        filter(
            NAME,
            EXT_AUTHZ,
            json!({"grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "0.2s"}}),
        ),
        None,
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    let started = std::time::Instant::now();
    let r = Http::h1().get(&format!("{}/slow", p.base()), &[]).await;
    assert_eq!(r.status, 403);
    assert!(started.elapsed() < Duration::from_millis(1200));
    stat_is(&p, "http.ingress.ext_authz.error", 1).await;
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(lines, vec!["403 UAEX ext_authz_error"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_disable_and_context_extensions() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| ok(auth::OkHttpResponse::default())).await;
    let log = log_path("ext_authz", "per-route");
    let routes = vec![
        route(
            "/open",
            "echo",
            json!({"typed_per_filter_config": {NAME: {"@type": PER_ROUTE, "disabled": true}}}),
        ),
        route(
            "/ctx",
            "echo",
            json!({"typed_per_filter_config": {NAME: {"@type": PER_ROUTE,
                "check_settings": {"context_extensions": {"k": "route", "r": "1"}}}}}),
        ),
        route("/", "echo", json!({})),
    ];
    let vh = json!({"typed_per_filter_config": {NAME: {"@type": PER_ROUTE,
        "check_settings": {"context_extensions": {"k": "vhost", "v": "1"}}}}});
    let p = start(
        grpc_filter(json!({})),
        Some(routes),
        vh,
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    let r = Http::h1().get(&format!("{}/open", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert!(authz.seen().is_empty(), "a disabled route is not checked");
    let r = Http::h2c().get(&format!("{}/ctx", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    let r = Http::h1().get(&format!("{}/other", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    let seen = authz.seen();
    assert_eq!(seen.len(), 2);
    let ext = |i: usize| {
        let mut v: Vec<(String, String)> = seen[i]
            .attributes
            .as_ref()
            .expect("attributes")
            .context_extensions
            .clone()
            .into_iter()
            .collect();
        v.sort();
        v
    };
    let kv = |a: &[(&str, &str)]| -> Vec<(String, String)> {
        a.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(ext(0), kv(&[("k", "route"), ("r", "1"), ("v", "1")]));
    assert_eq!(ext(1), kv(&[("k", "vhost"), ("v", "1")]));
    stat_is(&p, "http.ingress.ext_authz.ok", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_enabled_and_deny_at_disable() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| denied(0, "", vec![])).await;
    let off = json!({"filter_enabled": {"default_value": {"numerator": 0}, "runtime_key": "x"}});
    let log = log_path("ext_authz", "disabled");
    let p = start(
        grpc_filter(off.clone()),
        None,
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    stat_is(&p, "http.ingress.ext_authz.disabled", 1).await;
    drop(p);
    let log = log_path("ext_authz", "deny-at-disable");
    let p = start(
        grpc_filter(weir_tests::config::merge(
            off,
            json!({"deny_at_disable": {"default_value": true, "runtime_key": "y"}}),
        )),
        None,
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 403);
    assert!(authz.seen().is_empty());
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(lines, vec!["403 UAEX ext_authz_error"]);
}

type HttpDecide = dyn Fn(&http::request::Parts) -> http::Response<Full<Bytes>> + Send + Sync;

/// A small HTTP/1.1 authorization server that records request heads.
struct HttpAuthz {
    port: u16,
    seen: Arc<Mutex<Vec<http::request::Parts>>>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl HttpAuthz {
    async fn start(
        decide: impl Fn(&http::request::Parts) -> http::Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> HttpAuthz {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<http::request::Parts>>> = Arc::new(Mutex::new(Vec::new()));
        let decide: Arc<HttpDecide> = Arc::new(decide);
        let seen2 = seen.clone();
        let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::new(Mutex::new(Vec::new()));
        let bodies2 = bodies.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    return;
                };
                let (seen, decide, bodies) = (seen2.clone(), decide.clone(), bodies2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (seen, decide, bodies) =
                                (seen.clone(), decide.clone(), bodies.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let b = body.collect().await.map(|c| c.to_bytes());
                                bodies.lock().expect("lock").push(b.unwrap_or_default());
                                let resp = decide(&parts);
                                seen.lock().expect("lock").push(parts);
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        HttpAuthz { port, seen, bodies }
    }

    fn seen(&self) -> Vec<http::request::Parts> {
        self.seen.lock().expect("lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_service_allows_and_denies() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = HttpAuthz::start(|req| {
        let allowed = req.headers.get("authorization").map(|v| v.as_bytes()) == Some(b"good");
        let b = http::Response::builder()
            .header("x-user", "alice")
            .header("x-client-ok", "c")
            .header("x-other", "o");
        if allowed {
            b.status(200)
                .body(Full::new(Bytes::new()))
                .expect("response")
        } else {
            b.status(403)
                .header("x-deny-reason", "bad token")
                .body(Full::new(Bytes::from_static(b"denied by http")))
                .expect("response")
        }
    })
    .await;
    let log = log_path("ext_authz", "http");
    let f = filter(
        NAME,
        EXT_AUTHZ,
        json!({"http_service": {
            "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "2s"},
            "path_prefix": "/check",
            "authorization_request": {
                "allowed_headers": {"patterns": [{"exact": "x-forward-me"}]},
                "headers_to_add": [{"key": "x-from-proxy", "value": "weir"}],
            },
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": "x-user"}]},
                "allowed_client_headers": {"patterns": [{"exact": "x-deny-reason"}]},
                "allowed_client_headers_on_success": {"patterns": [{"exact": "x-client-ok"}]},
            },
        }}),
    );
    let p = start(f, None, json!({}), echo.port(), authz.port, json!({}), &log);
    for c in [Http::h1(), Http::h2c()] {
        let r = c
            .get(
                &format!("{}/data?x=1", p.base()),
                &[
                    ("authorization", "good"),
                    ("x-forward-me", "1"),
                    ("x-not-forwarded", "1"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-client-ok"), Some("c"));
        assert_eq!(r.header("x-other"), None);
        let e = r.echo();
        assert_eq!(echo_header(&e, "x-user"), Some("alice"));
        assert_eq!(echo_header(&e, "x-other"), None);
    }
    let seen = authz.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.method, http::Method::GET);
        assert_eq!(s.uri.path(), "/check/data");
        assert_eq!(s.uri.query(), Some("x=1"));
        assert_eq!(s.headers["authorization"], "good");
        assert_eq!(s.headers["x-forward-me"], "1");
        assert_eq!(s.headers["x-from-proxy"], "weir");
        assert!(s.headers.get("x-not-forwarded").is_none());
        assert_eq!(s.headers["content-length"], "0");
    }
    let r = Http::h1()
        .get(&format!("{}/data", p.base()), &[("authorization", "bad")])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "denied by http");
    assert_eq!(r.header("x-deny-reason"), Some("bad token"));
    assert_eq!(r.header("x-user"), None);
    stat_is(&p, "http.ingress.ext_authz.ok", 2).await;
    stat_is(&p, "http.ingress.ext_authz.denied", 1).await;
    let lines = p.log_lines(&log, 3).await;
    assert_eq!(lines[2], "403 UAEX ext_authz_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_service_over_a_tls_cluster() {
    use weir_tests::tls::{self, LeafSpec, TestCa, TlsServerOptions};
    let echo = upstream::http1("echo").await.expect("echo");
    let ca = TestCa::new("authz root");
    let authz = tls::tls_upstream(TlsServerOptions::new(
        "authz",
        &ca.issue(LeafSpec::server("authz.test")),
    ))
    .await
    .expect("tls authz");
    let log = log_path("ext_authz", "tls");
    let f = filter(
        NAME,
        EXT_AUTHZ,
        json!({"http_service": {
            "server_uri": {"uri": "https://authz.test", "cluster": "authz", "timeout": "2s"},
            "authorization_request": {"allowed_headers": {"patterns": [{"exact": "x-echo-status"}]}},
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": "x-upstream-sni"}]},
            },
        }}),
    );
    let tls_cluster = json!({"transport_socket": {"name": "envoy.transport_sockets.tls",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "authz.test",
        "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": ca.pem()}}},
    }}});
    let p = start(
        f,
        None,
        json!({}),
        echo.port(),
        authz.addr().port(),
        tls_cluster,
        &log,
    );
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The authorization server saw the cluster's SNI: its echo header went
    // upstream as an allowed header.
    assert_eq!(echo_header(&r.echo(), "x-upstream-sni"), Some("authz.test"));
    let r = Http::h2c()
        .get(&format!("{}/x", p.base()), &[("x-echo-status", "401")])
        .await;
    assert_eq!(r.status, 401);
    stat_is(&p, "http.ingress.ext_authz.ok", 1).await;
    stat_is(&p, "http.ingress.ext_authz.denied", 1).await;
}

/// Writes and expects the echo back (true), or sees the connection closed
/// (false).
async fn tcp_echoes(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The write may fail when the proxy closed the connection already.
    let _ = s.write_all(b"hello").await;
    let _ = s.flush().await;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Err(_) => panic!("neither echoed nor closed"),
        Ok(Ok(_)) => {
            assert_eq!(&buf, b"hello");
            true
        }
        Ok(Err(_)) => false,
    }
}

/// `envoy.filters.network.ext_authz` in front of `tcp_proxy`: allowed
/// connections are proxied, denied ones closed; with the service down,
/// `failure_mode_allow` goes on to the next filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_ext_authz_over_tcp_proxy() {
    const NET: &str = "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz";
    let echo = weir_tests::tcp::tcp_echo_server().await.expect("echo");
    let allow = GrpcAuthz::start(Duration::ZERO, |_| ok(auth::OkHttpResponse::default())).await;
    let deny = GrpcAuthz::start(Duration::ZERO, |_| denied(0, "", vec![])).await;
    let down = closed_port().await;
    let (echo_port, allow_port, deny_port) = (echo.port(), allow.port, deny.port);
    let net = |prefix: &str, cluster: &str, extra: Value| {
        filter(
            "envoy.filters.network.ext_authz",
            NET,
            weir_tests::config::merge(
                json!({"stat_prefix": prefix,
                    "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "2s"}}),
                extra,
            ),
        )
    };
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![
                listener(
                    "l",
                    ports.listen,
                    vec![chain(vec![
                        net("allowed", "allow", json!({})),
                        weir_tests::config::tcp_proxy("tcp", "echo", json!({})),
                    ])],
                ),
                listener(
                    "l2",
                    ports.listen2,
                    vec![chain(vec![
                        net("down", "down", json!({"failure_mode_allow": true})),
                        net("denied", "deny", json!({})),
                        weir_tests::config::tcp_proxy("tcp2", "echo", json!({})),
                    ])],
                ),
            ],
            vec![
                cluster("echo", &[echo_port], json!({})),
                cluster("allow", &[allow_port], h2_upstream(json!({}))),
                cluster("deny", &[deny_port], h2_upstream(json!({}))),
                cluster("down", &[down], h2_upstream(json!({}))),
            ],
        )
    });
    assert!(tcp_echoes(p.addr()).await);
    assert!(tcp_echoes(p.addr()).await);
    stat_is(&p, "ext_authz.allowed.ok", 2).await;
    stat_is(&p, "ext_authz.allowed.total", 2).await;
    let a = allow.seen();
    assert_eq!(a.len(), 2);
    let src = a[0]
        .attributes
        .as_ref()
        .and_then(|a| a.source.as_ref())
        .and_then(|s| s.address.as_ref())
        .and_then(|a| a.address.as_ref());
    match src {
        Some(core::address::Address::SocketAddress(s)) => assert_eq!(s.address, "127.0.0.1"),
        other => panic!("no source address: {other:?}"),
    }
    assert!(!tcp_echoes(p.addr2()).await);
    stat_is(&p, "ext_authz.denied.denied", 1).await;
    stat_is(&p, "ext_authz.denied.cx_closed", 1).await;
    // The service down, let through by failure_mode_allow to the next
    // filter.
    stat_is(&p, "ext_authz.down.error", 1).await;
    stat_is(&p, "ext_authz.down.failure_mode_allowed", 1).await;
    stat_is(&p, "ext_authz.down.cx_closed", 0).await;
}

/// Istio's CUSTOM AuthorizationPolicy: RBAC shadow rules (prefix
/// `istio_ext_authz_`) mark the requests the policy selects in the dynamic
/// metadata, and ext_authz's `filter_enabled_metadata` checks only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_custom_policy_selects_requests_through_rbac_shadow_metadata() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| denied(0, "", vec![])).await;
    let log = log_path("ext_authz", "istio-custom");
    let (echo_port, authz_port) = (echo.port(), authz.port);
    let policy = "istio-ext-authz-ns[foo]-policy[ext]-rule[0]";
    let rbac = filter(
        "envoy.filters.http.rbac",
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        json!({
            "shadow_rules": {"action": "DENY", "policies": {policy: {
                "permissions": [{"url_path": {"path": {"prefix": "/secure"}}}],
                "principals": [{"any": true}],
            }}},
            "shadow_rules_stat_prefix": "istio_ext_authz_",
        }),
    );
    let authz_filter = grpc_filter(json!({"filter_enabled_metadata": {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}},
    }}));
    let l = &*log;
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![chain(vec![hcm(
                    "ingress",
                    vec![rbac.clone(), authz_filter.clone()],
                    vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
                    json!({"access_log": [file_log(l, LOG_FORMAT)]}),
                )])],
            )],
            vec![
                cluster("echo", &[echo_port], json!({})),
                cluster("authz", &[authz_port], h2_upstream(json!({}))),
            ],
        )
    });
    let r = Http::h1().get(&format!("{}/public", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    stat_is(&p, "http.ingress.ext_authz.disabled", 1).await;
    assert!(authz.seen().is_empty());
    let r = Http::h2c()
        .get(&format!("{}/secure/x", p.base()), &[])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(authz.seen().len(), 1);
    stat_is(&p, "http.ingress.ext_authz.denied", 1).await;
    stat_is(&p, "http.ingress.rbac.istio_ext_authz_.shadow_denied", 1).await;
}

/// The `HttpRequest` of the `i`th check request.
fn http_of(seen: &[auth::CheckRequest], i: usize) -> auth::attribute_context::HttpRequest {
    seen[i]
        .attributes
        .clone()
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .expect("http request")
}

/// `with_request_body`: the whole body goes in the check request (`body`,
/// or `raw_body` with `pack_as_bytes`) with `x-envoy-auth-partial-body:
/// false`, and then upstream; a body over `max_request_bytes` is answered
/// 413 without a check; a request without a body (headers end the stream)
/// is checked at once, without body or header, as Envoy;
/// `disable_request_body_buffering` on a route turns it off there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_with_request_body() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| ok(Default::default())).await;
    let log = log_path("ext_authz", "body");
    let routes = vec![
        route(
            "/nobuf",
            "echo",
            json!({"typed_per_filter_config": {NAME: {
                "@type": PER_ROUTE,
                "check_settings": {"disable_request_body_buffering": true},
            }}}),
        ),
        route("/", "echo", json!({})),
    ];
    let p = start(
        grpc_filter(json!({"with_request_body": {"max_request_bytes": 16}})),
        Some(routes),
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    let base = p.base();
    for (i, c) in [Http::h1(), Http::h2c()].into_iter().enumerate() {
        let r = c
            .send(
                "POST",
                &format!("{base}/a"),
                &[],
                Bytes::from_static(b"hello authz"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body_len, 11);
        let h = http_of(&authz.seen(), i);
        assert_eq!(h.body, "hello authz");
        assert!(h.raw_body.is_empty());
        assert_eq!(
            h.headers
                .get("x-envoy-auth-partial-body")
                .map(String::as_str),
            Some("false")
        );
    }
    let c = Http::h1();
    // No body: checked at once, no body attributes.
    let r = c.get(&format!("{base}/a"), &[]).await;
    assert_eq!(r.status, 200);
    let h = http_of(&authz.seen(), 2);
    assert!(h.body.is_empty());
    assert_eq!(h.headers.get("x-envoy-auth-partial-body"), None);
    // Too large: 413 before any check.
    let r = c
        .send(
            "POST",
            &format!("{base}/a"),
            &[],
            Bytes::from(vec![b'x'; 32]),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(authz.seen().len(), 3);
    // Buffering disabled on the route: checked without the body, which
    // still goes upstream.
    let r = c
        .send(
            "POST",
            &format!("{base}/nobuf"),
            &[],
            Bytes::from(vec![b'y'; 32]),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().body_len, 32);
    let h = http_of(&authz.seen(), 3);
    assert!(h.body.is_empty());
    assert_eq!(h.headers.get("x-envoy-auth-partial-body"), None);
    let lines = p.log_lines(&log, 5).await;
    assert_eq!(lines[3], "413 - request_payload_too_large");
}

/// `pack_as_bytes`: the body in `raw_body` (bytes, not UTF-8 checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_with_request_body_packed_as_bytes() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| ok(Default::default())).await;
    let log = log_path("ext_authz", "raw-body");
    let p = start(
        grpc_filter(json!({"with_request_body": {"max_request_bytes": 64, "pack_as_bytes": true}})),
        None,
        json!({}),
        echo.port(),
        authz.port,
        h2_upstream(json!({})),
        &log,
    );
    let body = Bytes::from_static(b"\xff\x00binary");
    let r = Http::h1()
        .send("POST", &format!("{}/a", p.base()), &[], body.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = http_of(&authz.seen(), 0);
    assert_eq!(h.raw_body, body.to_vec());
    assert!(h.body.is_empty());
}

/// The HTTP service: the request body is the authorization request's body
/// (its `content-length` too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_service_with_request_body() {
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = HttpAuthz::start(|_| {
        http::Response::builder()
            .status(200)
            .body(Full::new(Bytes::new()))
            .expect("response")
    })
    .await;
    let log = log_path("ext_authz", "http-body");
    let f = filter(
        NAME,
        EXT_AUTHZ,
        json!({
            "http_service": {"server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "2s"}},
            "with_request_body": {"max_request_bytes": 100},
        }),
    );
    let p = start(f, None, json!({}), echo.port(), authz.port, json!({}), &log);
    let r = Http::h1()
        .send(
            "POST",
            &format!("{}/a", p.base()),
            &[],
            Bytes::from_static(b"payload"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().body_len, 7);
    let seen = authz.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, http::Method::POST);
    assert_eq!(seen[0].headers["content-length"], "7");
    assert_eq!(
        authz.bodies.lock().expect("lock")[0],
        Bytes::from_static(b"payload")
    );
}

/// Percent-encoding of all but unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `include_peer_certificate`: the client certificate of an mTLS
/// connection, URL-encoded PEM, in `source.certificate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_include_peer_certificate() {
    use weir_tests::tls::{LeafSpec, TempDir, TestCa, TlsClient};
    let ca = TestCa::new("ext_authz peer root");
    let dir = TempDir::new("ext-authz-peer").expect("temp dir");
    let files = ca
        .issue(LeafSpec::server("example.com"))
        .write_files(&dir, "server");
    let ca_file = dir.write("ca.pem", ca.pem());
    let client = ca.issue(LeafSpec::spiffe("spiffe://cluster.local/ns/a/sa/b"));
    let echo = upstream::http1("echo").await.expect("echo");
    let authz = GrpcAuthz::start(Duration::ZERO, |_| ok(Default::default())).await;
    let (echo_port, authz_port) = (echo.port(), authz.port);
    let tls = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": weir_tests::config::DOWNSTREAM_TLS,
        "require_client_certificate": true,
        "common_tls_context": {
            "tls_certificates": [{
                "certificate_chain": {"filename": files.chain.display().to_string()},
                "private_key": {"filename": files.key.display().to_string()},
            }],
            "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
        },
    }});
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![grpc_filter(json!({"include_peer_certificate": true}))],
            vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
            json!({}),
        );
        bootstrap(
            ports,
            vec![listener(
                "l",
                ports.listen,
                vec![weir_tests::config::merge(
                    chain(vec![h]),
                    json!({"transport_socket": tls.clone()}),
                )],
            )],
            vec![
                cluster("echo", &[echo_port], json!({})),
                cluster("authz", &[authz_port], h2_upstream(json!({}))),
            ],
        )
    });
    let c = TlsClient::builder().trust(&ca).client_cert(&client).build();
    let r = c.get(p.addr(), "example.com", "/x").await.expect("get");
    assert_eq!(r.status, 200);
    let seen = authz.seen();
    assert_eq!(seen.len(), 1);
    let source = seen[0]
        .attributes
        .clone()
        .and_then(|a| a.source)
        .expect("source");
    assert_eq!(source.certificate, url_encode(&client.cert_pem));
    assert_eq!(source.principal, "spiffe://cluster.local/ns/a/sa/b");
}
