//! `envoy.filters.http.local_ratelimit` with real sockets: a real echo
//! upstream, real HTTP/1 and HTTP/2 clients.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test http_ratelimit_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test http_ratelimit_scenarios
//! ```
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use weir_tests::scenario::{echo_header, Http, Ports, Proxy, Resp};
use weir_tests::tmp::TempFile;
use weir_tests::upstream::{self, EchoServer};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const LRL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const FILE_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n";
const FILTER: &str = "envoy.filters.http.local_ratelimit";

fn sock(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> TempFile {
    weir_tests::config::log_path("http-rl", name)
}

/// A token bucket of `max` tokens, one more every `interval`.
fn bucket(max: u32, interval: &str) -> Value {
    json!({"max_tokens": max, "tokens_per_fill": 1, "fill_interval": interval})
}

/// A LocalRateLimit, enabled and enforced at 100 %, with `extra` fields.
fn lrl(prefix: &str, extra: Value) -> Value {
    let mut cfg = json!({
        "@type": LRL, "stat_prefix": prefix,
        "filter_enabled": {"default_value": {"numerator": 100}},
        "filter_enforced": {"default_value": {"numerator": 100}},
    });
    if let (Some(c), Value::Object(e)) = (cfg.as_object_mut(), extra) {
        c.extend(e);
    }
    cfg
}

/// A route forwarding `prefix` to cluster `up`, with `extra` route fields
/// and `action` RouteAction fields.
fn route(prefix: &str, extra: Value, action: Value) -> Value {
    let mut ra = json!({"cluster": "up"});
    if let (Some(c), Value::Object(e)) = (ra.as_object_mut(), action) {
        c.extend(e);
    }
    let mut r = json!({"match": {"prefix": prefix}, "route": ra});
    if let (Some(c), Value::Object(e)) = (r.as_object_mut(), extra) {
        c.extend(e);
    }
    r
}

/// Listener `l` with the filter (`filter`: its typed_config), one virtual
/// host (`vhost_extra` fields) with `routes`, an access log at `log`, and
/// cluster `up` (the echo upstream, HTTP/2 capable when `h2`).
struct Cfg {
    filter: Value,
    routes: Vec<Value>,
    vhost_extra: Value,
    /// Shared by the clone the bootstrap closure renders.
    log: Arc<TempFile>,
    up: u16,
    h2_upstream: bool,
}

impl Cfg {
    fn new(filter: Value, routes: Vec<Value>, up: &EchoServer, log: &str) -> Cfg {
        Cfg {
            filter,
            routes,
            vhost_extra: json!({}),
            log: Arc::new(log_path(log)),
            up: up.port(),
            h2_upstream: false,
        }
    }

    fn render(&self, p: &Ports) -> String {
        let mut vh = json!({"name": "vh", "domains": ["*"], "routes": self.routes});
        if let (Some(c), Value::Object(e)) = (vh.as_object_mut(), self.vhost_extra.clone()) {
            c.extend(e);
        }
        let mut up = json!({
            "name": "up", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": sock(self.up)}}
            ]}]},
        });
        if self.h2_upstream {
            up["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            });
        }
        json!({
            "admin": {"address": sock(p.admin)},
            "static_resources": {
                "listeners": [{
                    "name": "l", "address": sock(p.listen),
                    "filter_chains": [{"filters": [{
                        "name": "hcm",
                        "typed_config": {
                            "@type": HCM, "stat_prefix": "ingress",
                            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                                "@type": FILE_LOG, "path": self.log.display().to_string(),
                                "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}},
                            }}],
                            "route_config": {"name": "rc", "virtual_hosts": [vh]},
                            "http_filters": [
                                {"name": FILTER, "typed_config": self.filter},
                                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
                            ],
                        },
                    }]}],
                }],
                "clusters": [up],
            },
        })
        .to_string()
    }

    fn start(&self) -> Proxy {
        Proxy::start(|p| self.render(p))
    }
}

async fn echo() -> EchoServer {
    upstream::http1("up").await.expect("echo upstream")
}

/// `(limit, remaining, reset)` from the `x-ratelimit-*` headers.
fn x_ratelimit(r: &Resp) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        r.header("x-ratelimit-limit"),
        r.header("x-ratelimit-remaining"),
        r.header("x-ratelimit-reset"),
    )
}

async fn stats(p: &Proxy, prefix: &str) -> [Option<i64>; 4] {
    let mut out = [None; 4];
    for (i, s) in ["enabled", "ok", "rate_limited", "enforced"]
        .iter()
        .enumerate()
    {
        out[i] = p.stat(&format!("{prefix}.http_local_rate_limit.{s}")).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_with_the_filter_bucket() {
    let up = echo().await;
    let filter = lrl(
        "myrl",
        json!({
            "token_bucket": bucket(2, "60s"),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "response_headers_to_add": [{"header": {"key": "x-limited", "value": "yes"}}],
        }),
    );
    let c = Cfg::new(filter, vec![route("/", json!({}), json!({}))], &up, "basic");
    let p = c.start();
    let h = Http::h1();
    let url = format!("{}/x", p.base());
    let r1 = h.get(&url, &[]).await;
    assert_eq!(r1.status, 200);
    assert_eq!(r1.echo().path, "/x");
    assert_eq!(x_ratelimit(&r1), (Some("2"), Some("1"), Some("0")));
    assert_eq!(r1.header("x-limited"), None);
    let r2 = h.get(&url, &[]).await;
    assert_eq!(r2.status, 200);
    // Empty: the next token is a minute away.
    assert_eq!(x_ratelimit(&r2), (Some("2"), Some("0"), Some("60")));
    let r3 = h.get(&url, &[]).await;
    assert_eq!(r3.status, 429);
    assert_eq!(r3.text(), "local_rate_limited");
    assert_eq!(r3.header("content-type"), Some("text/plain"));
    assert_eq!(r3.header("x-limited"), Some("yes"));
    assert_eq!(x_ratelimit(&r3), (Some("2"), Some("0"), Some("60")));
    // Not the global rate limit filter's header.
    assert_eq!(r3.header("x-envoy-ratelimited"), None);
    assert_eq!(
        p.log_lines(&c.log, 3).await,
        [
            "200 /x - via_upstream",
            "200 /x - via_upstream",
            "429 /x RL local_rate_limited"
        ]
    );
    assert_eq!(
        stats(&p, "myrl").await,
        [Some(3), Some(2), Some(1), Some(1)]
    );
    // Stats live at the root, tagged with the stat prefix.
    let prom = p.admin("GET", "/stats/prometheus").await.text();
    for line in [
        "envoy_http_local_rate_limit_enabled{envoy_local_http_ratelimit_prefix=\"myrl\"} 3",
        "envoy_http_local_rate_limit_ok{envoy_local_http_ratelimit_prefix=\"myrl\"} 2",
        "envoy_http_local_rate_limit_rate_limited{envoy_local_http_ratelimit_prefix=\"myrl\"} 1",
        "envoy_http_local_rate_limit_enforced{envoy_local_http_ratelimit_prefix=\"myrl\"} 1",
    ] {
        assert!(prom.lines().any(|l| l == line), "{line} in\n{prom}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enabled_and_not_enforced() {
    let up = echo().await;
    // Without filter_enabled the filter does nothing, not even count.
    let off = json!({"@type": LRL, "stat_prefix": "off", "token_bucket": bucket(1, "60s")});
    let routes = vec![
        route(
            "/shadow",
            json!({"typed_per_filter_config": {FILTER: {
                "@type": LRL, "stat_prefix": "shadow",
                "token_bucket": bucket(1, "60s"),
                "filter_enabled": {"default_value": {"numerator": 100}},
                "request_headers_to_add_when_not_enforced": [
                    {"header": {"key": "x-would-limit", "value": "1"}}
                ],
            }}}),
            json!({}),
        ),
        route("/", json!({}), json!({})),
    ];
    let c = Cfg::new(off, routes, &up, "shadow");
    let p = c.start();
    let h = Http::h1();
    for _ in 0..3 {
        assert_eq!(h.get(&format!("{}/x", p.base()), &[]).await.status, 200);
    }
    assert_eq!(stats(&p, "off").await, [Some(0); 4]);
    // Enabled, not enforced: counted, forwarded with the headers.
    let r = h.get(&format!("{}/shadow", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(echo_header(&r.echo(), "x-would-limit"), None);
    let r = h.get(&format!("{}/shadow", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(echo_header(&r.echo(), "x-would-limit"), Some("1"));
    assert_eq!(
        stats(&p, "shadow").await,
        [Some(2), Some(1), Some(1), Some(0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_config_replaces_the_filters() {
    let up = echo().await;
    // The filter's own config has no bucket: nothing is limited there.
    let filter = lrl("top", json!({}));
    let per_route = json!({"typed_per_filter_config": {FILTER: lrl(
        "route", json!({"token_bucket": bucket(1, "60s"), "status": {"code": 503}}),
    )}});
    let routes = vec![
        route("/limited", per_route, json!({})),
        route(
            "/off",
            json!({"typed_per_filter_config": {FILTER: {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "disabled": true,
            }}}),
            json!({}),
        ),
        route("/", json!({}), json!({})),
    ];
    let mut c = Cfg::new(filter, routes, &up, "per-route");
    // The virtual host's config applies to routes without their own.
    c.vhost_extra = json!({"typed_per_filter_config": {FILTER: lrl(
        "vhost", json!({"token_bucket": bucket(2, "60s")}),
    )}});
    let p = c.start();
    let h = Http::h1();
    let get = |path: &str| {
        let (h, url) = (h.clone(), format!("{}{path}", p.base()));
        async move { h.get(&url, &[]).await.status }
    };
    assert_eq!(get("/limited").await, 200);
    assert_eq!(get("/limited").await, 503);
    assert_eq!(get("/x").await, 200);
    assert_eq!(get("/x").await, 200);
    assert_eq!(get("/x").await, 429);
    for _ in 0..3 {
        assert_eq!(get("/off").await, 200);
    }
    assert_eq!(
        stats(&p, "route").await,
        [Some(2), Some(1), Some(1), Some(1)]
    );
    assert_eq!(
        stats(&p, "vhost").await,
        [Some(3), Some(2), Some(1), Some(1)]
    );
    assert_eq!(stats(&p, "top").await, [Some(0); 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_from_headers_and_remote_address() {
    let up = echo().await;
    let filter = lrl(
        "desc",
        json!({
            "token_bucket": bucket(100, "60s"),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "descriptors": [
                {"entries": [{"key": "client", "value": "a"}], "token_bucket": bucket(1, "60s")},
                {"entries": [{"key": "remote_address", "value": "127.0.0.1"}],
                 "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "60s"}},
                // A wildcard: one bucket per distinct value.
                {"entries": [{"key": "user", "value": ""}], "token_bucket": bucket(1, "60s")},
            ],
        }),
    );
    let routes = vec![
        route(
            "/users",
            json!({}),
            json!({"rate_limits": [
                {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]},
            ]}),
        ),
        route(
            "/",
            json!({}),
            json!({"rate_limits": [
                {"actions": [{"request_headers": {"header_name": "x-client", "descriptor_key": "client"}}]},
                {"actions": [{"remote_address": {}}]},
                // Another stage: not this filter's.
                {"stage": 1, "actions": [{"generic_key": {"descriptor_value": "x"}}]},
            ]}),
        ),
    ];
    let c = Cfg::new(filter, routes, &up, "descriptors");
    let p = c.start();
    let h = Http::h1();
    let url = format!("{}/x", p.base());
    // client=a (1 token) and remote_address (3): the slower bucket first.
    let r = h.get(&url, &[("x-client", "a")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(x_ratelimit(&r), (Some("1"), Some("0"), Some("60")));
    let r = h.get(&url, &[("x-client", "a")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(x_ratelimit(&r), (Some("1"), Some("0"), Some("60")));
    // The limited request took no token from the address's bucket.
    let r = h.get(&url, &[("x-client", "b")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(x_ratelimit(&r), (Some("3"), Some("1"), Some("0")));
    let r = h.get(&url, &[]).await;
    assert_eq!(r.status, 200);
    let r = h.get(&url, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(x_ratelimit(&r), (Some("3"), Some("0"), Some("20")));
    // Wildcard descriptor: each user has a bucket of one.
    let users = format!("{}/users", p.base());
    assert_eq!(h.get(&users, &[("x-user", "u1")]).await.status, 200);
    assert_eq!(h.get(&users, &[("x-user", "u1")]).await.status, 429);
    assert_eq!(h.get(&users, &[("x-user", "u2")]).await.status, 200);
    // Without the header: no descriptor, the default bucket.
    let r = h.get(&users, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(
        stats(&p, "desc").await,
        [Some(9), Some(6), Some(3), Some(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_host_rate_limits() {
    let up = echo().await;
    let filter = |vh: &str| {
        lrl(
            "vh",
            json!({
                "vh_rate_limits": vh,
                "descriptors": [
                    {"entries": [{"key": "generic_key", "value": "vhost"}], "token_bucket": bucket(1, "60s")},
                ],
            }),
        )
    };
    let routes = vec![
        // Own rate_limits (matching no descriptor) and the virtual host's.
        route(
            "/include",
            json!({}),
            json!({
                "include_vh_rate_limits": true,
                "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "route"}}]}],
            }),
        ),
        // Own rate_limits: the virtual host's are overridden.
        route(
            "/own",
            json!({}),
            json!({"rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "route"}}]}]}),
        ),
        route("/", json!({}), json!({})),
    ];
    let vhost_extra =
        json!({"rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "vhost"}}]}]});
    // OVERRIDE (default): routes without rate_limits use the virtual host's.
    let mut c = Cfg::new(filter("OVERRIDE"), routes.clone(), &up, "vh-override");
    c.vhost_extra = vhost_extra.clone();
    let p = c.start();
    let h = Http::h1();
    let status = |p: &Proxy, path: &str| {
        let (h, url) = (h.clone(), format!("{}{path}", p.base()));
        async move { h.get(&url, &[]).await.status }
    };
    for _ in 0..3 {
        assert_eq!(status(&p, "/own").await, 200);
    }
    assert_eq!(status(&p, "/x").await, 200);
    assert_eq!(status(&p, "/x").await, 429);
    assert_eq!(status(&p, "/include").await, 429);
    drop(p);
    // IGNORE: only include_vh_rate_limits brings them in.
    let mut c = Cfg::new(filter("IGNORE"), routes, &up, "vh-ignore");
    c.vhost_extra = vhost_extra;
    let p = c.start();
    for _ in 0..3 {
        assert_eq!(status(&p, "/x").await, 200);
    }
    assert_eq!(status(&p, "/include").await, 200);
    assert_eq!(status(&p, "/include").await, 429);
}

/// One HTTP/1.1 connection, kept alive across requests.
struct Conn(tokio::io::BufReader<tokio::net::TcpStream>);

impl Conn {
    async fn open(p: &Proxy) -> Conn {
        let s = tokio::net::TcpStream::connect(p.addr())
            .await
            .expect("connect");
        Conn(tokio::io::BufReader::new(s))
    }

    /// `GET /x`; the response's status (its body is read).
    async fn get(&mut self) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let fut = async {
            self.0
                .get_mut()
                .write_all(b"GET /x HTTP/1.1\r\nhost: test\r\n\r\n")
                .await
                .expect("write");
            let mut status = 0;
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                self.0.read_line(&mut line).await.expect("read");
                assert!(!line.is_empty(), "connection closed");
                let l = line.trim_end().to_ascii_lowercase();
                if l.is_empty() {
                    break;
                }
                if let Some(s) = l.strip_prefix("http/1.1 ") {
                    status = s[..3].parse().expect("status");
                } else if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().expect("content-length");
                }
                assert!(!l.starts_with("transfer-encoding"), "{l}");
            }
            let mut body = vec![0; len];
            self.0.read_exact(&mut body).await.expect("body");
            status
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), fut)
            .await
            .expect("response in time")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_buckets() {
    let up = echo().await;
    let filter = lrl(
        "conn",
        json!({
            "token_bucket": bucket(2, "60s"),
            "local_rate_limit_per_downstream_connection": true,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        }),
    );
    // A direct response (a known content-length) has no route entry; the
    // filter's bucket still applies.
    let direct = json!({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}});
    let c = Cfg::new(filter, vec![direct], &up, "per-conn");
    let p = c.start();
    // Two HTTP/1.1 connections kept alive: a bucket each.
    let (mut a, mut b) = (Conn::open(&p).await, Conn::open(&p).await);
    assert_eq!(a.get().await, 200);
    assert_eq!(a.get().await, 200);
    assert_eq!(a.get().await, 429);
    assert_eq!(b.get().await, 200);
    assert_eq!(b.get().await, 200);
    assert_eq!(b.get().await, 429);
    // The 429 keeps the connection open, and limited.
    assert_eq!(a.get().await, 429);
    // A new connection starts full. Direct responses carry the headers.
    let r = Http::h1().get(&format!("{}/x", p.base()), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    assert_eq!(x_ratelimit(&r), (Some("2"), Some("1"), Some("0")));
    assert_eq!(
        stats(&p, "conn").await,
        [Some(8), Some(5), Some(3), Some(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_get_grpc_status() {
    let up = upstream::http2("up").await.expect("h2 upstream");
    let filter = lrl("grpc", json!({"token_bucket": bucket(1, "60s")}));
    let routes = vec![
        route(
            "/exhausted",
            json!({"typed_per_filter_config": {FILTER: lrl(
                "exhausted",
                json!({"token_bucket": bucket(1, "60s"), "rate_limited_as_resource_exhausted": true}),
            )}}),
            json!({}),
        ),
        route("/", json!({}), json!({})),
    ];
    let mut c = Cfg::new(filter, routes, &up, "grpc");
    c.h2_upstream = true;
    let p = c.start();
    let h2 = Http::h2c();
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let send = |path: &str| {
        let (h2, url) = (h2.clone(), format!("{}{path}", p.base()));
        async move { h2.send("POST", &url, &grpc, Bytes::new()).await }
    };
    assert_eq!(send("/svc/M").await.status, 200);
    let r = send("/svc/M").await;
    assert_eq!(r.status, 200);
    // 429 maps to UNAVAILABLE.
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert_eq!(r.header("grpc-message"), Some("local_rate_limited"));
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    send("/exhausted").await;
    let r = send("/exhausted").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("8"));
    assert_eq!(
        p.log_lines(&c.log, 4).await[3],
        "200 /exhausted RL local_rate_limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_values_of_other_actions() {
    let up = echo().await;
    let one = |k: &str, v: &str| json!({"entries": [{"key": k, "value": v}], "token_bucket": bucket(1, "60s")});
    let filter = lrl(
        "acts",
        json!({
            "token_bucket": bucket(100, "60s"),
            "descriptors": [
                one("masked_remote_address", "127.0.0.0/24"),
                one("header_match", "no-debug"),
                one("query_match", "beta"),
                one("destination_cluster", "up"),
                one("tenant", "t1"),
            ],
        }),
    );
    let rate_limit = |action: Value| json!({"rate_limits": [{"actions": [action]}]});
    let routes = vec![
        route(
            "/masked",
            json!({}),
            rate_limit(json!({"masked_remote_address": {"v4_prefix_mask_len": 24}})),
        ),
        route(
            "/header",
            json!({}),
            rate_limit(json!({"header_value_match": {
                "descriptor_value": "no-debug", "expect_match": false,
                "headers": [{"name": "x-debug", "present_match": true}],
            }})),
        ),
        route(
            "/query",
            json!({}),
            rate_limit(json!({"query_parameter_value_match": {
                "descriptor_value": "beta",
                "query_parameters": [{"name": "beta", "string_match": {"exact": "1"}}],
            }})),
        ),
        route(
            "/cluster",
            json!({}),
            rate_limit(json!({"destination_cluster": {}})),
        ),
        route(
            "/tenant",
            json!({}),
            rate_limit(json!({"query_parameters": {
                "query_parameter_name": "tenant", "descriptor_key": "tenant",
            }})),
        ),
    ];
    let c = Cfg::new(filter, routes, &up, "actions");
    let p = c.start();
    let h = Http::h1();
    let status = |path: &str, headers: &'static [(&'static str, &'static str)]| {
        let (h, url) = (h.clone(), format!("{}{path}", p.base()));
        async move { h.get(&url, headers).await.status }
    };
    for path in ["/masked", "/cluster"] {
        assert_eq!(status(path, &[]).await, 200, "{path}");
        assert_eq!(status(path, &[]).await, 429, "{path}");
    }
    // With x-debug the descriptor is not produced: not limited.
    assert_eq!(status("/header", &[]).await, 200);
    assert_eq!(status("/header", &[("x-debug", "1")]).await, 200);
    assert_eq!(status("/header", &[]).await, 429);
    assert_eq!(status("/query?beta=2", &[]).await, 200);
    assert_eq!(status("/query?beta=1", &[]).await, 200);
    assert_eq!(status("/query?beta=2", &[]).await, 200);
    assert_eq!(status("/query?beta=1", &[]).await, 429);
    assert_eq!(status("/tenant?tenant=t2", &[]).await, 200);
    assert_eq!(status("/tenant?tenant=t1", &[]).await, 200);
    assert_eq!(status("/tenant?tenant=t1", &[]).await, 429);
    // Without the parameter (no skip_if_absent): no descriptor.
    assert_eq!(status("/tenant", &[]).await, 200);
}
