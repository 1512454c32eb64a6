//! `envoy.filters.network.local_ratelimit` with real sockets: a token
//! bucket of connections in front of `tcp_proxy` and the HCM.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`):
//!
//! ```sh
//! cargo test -p weir-tests --test net_ratelimit_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test net_ratelimit_scenarios
//! ```
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::scenario::{Http, Ports, Proxy, StartOptions, Target};
use weir_tests::tcp;

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const LOCAL_RATE_LIMIT: &str =
    "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

const WAIT: Duration = Duration::from_secs(5);

fn sock(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": sock(port)}}
        ]}]},
    })
}

/// The rate limit filter (`extra`: more LocalRateLimit fields).
fn local_rate_limit(prefix: &str, max: u32, per_fill: u32, interval: &str, extra: Value) -> Value {
    let mut cfg = json!({
        "@type": LOCAL_RATE_LIMIT, "stat_prefix": prefix,
        "token_bucket": {"max_tokens": max, "tokens_per_fill": per_fill, "fill_interval": interval},
    });
    if let (Some(c), Value::Object(e)) = (cfg.as_object_mut(), extra) {
        c.extend(e);
    }
    json!({"name": "envoy.filters.network.local_ratelimit", "typed_config": cfg})
}

fn tcp_proxy(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY, "stat_prefix": "tcp", "cluster": cluster},
    })
}

fn hcm() -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM, "stat_prefix": "ingress",
            "route_config": {"name": "rc", "virtual_hosts": [{
                "name": "vh", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
            }]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
        },
    })
}

/// A bootstrap with listener `l` running `filters` (and `l2` running
/// `filters2` unless empty).
fn bootstrap(p: &Ports, filters: &[Value], filters2: &[Value], clusters: &[Value]) -> String {
    let mut listeners = vec![json!({
        "name": "l", "address": sock(p.listen), "filter_chains": [{"filters": filters}],
    })];
    if !filters2.is_empty() {
        listeners.push(json!({
            "name": "l2", "address": sock(p.listen2), "filter_chains": [{"filters": filters2}],
        }));
    }
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

/// Whether a connection to `addr` gets `hello` echoed back (true) or is
/// closed without a byte (false).
async fn echoed(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The write may fail when the proxy closed the connection already.
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await {
        Err(_) => panic!("neither echoed nor closed within {WAIT:?}"),
        Ok(Ok(_)) => {
            assert_eq!(&buf, b"hello");
            true
        }
        Ok(Err(_)) => false,
    }
}

/// Waits until stat `name` is `want`.
async fn stat_is(p: &Proxy, name: &str, want: i64) {
    let mut last = None;
    for _ in 0..100 {
        last = p.stat(name).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} = {last:?}, want {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_bucket_are_closed_and_counted() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            &[
                local_rate_limit("lrl", 2, 1, "60s", json!({})),
                tcp_proxy("echo"),
            ],
            &[],
            &[cluster("echo", port)],
        )
    });
    assert!(echoed(p.addr()).await);
    assert!(echoed(p.addr()).await);
    assert!(
        !echoed(p.addr()).await,
        "the third connection is over the limit"
    );
    assert!(!echoed(p.addr()).await);
    stat_is(&p, "local_rate_limit.lrl.rate_limited", 2).await;
    assert_eq!(
        echo.connections(),
        2,
        "limited connections never reach the upstream"
    );
    // Prometheus: the prefix is a tag, as Envoy's tag extractor makes it.
    let prom = p.admin("GET", "/stats/prometheus").await.text();
    assert!(
        prom.lines().any(|l| {
            l
            == "envoy_local_rate_limit_rate_limited{envoy_local_network_ratelimit_prefix=\"lrl\"} 2"
        }),
        "{}",
        prom.lines()
            .filter(|l| l.contains("rate_limit"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Envoy 1.40's bucket refills continuously: 2 tokens per second give a
/// token back after half a second, not at the next whole interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_refills_continuously() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            &[
                local_rate_limit("refill", 2, 2, "1s", json!({})),
                tcp_proxy("echo"),
            ],
            &[],
            &[cluster("echo", port)],
        )
    });
    assert!(echoed(p.addr()).await);
    assert!(echoed(p.addr()).await);
    assert!(!echoed(p.addr()).await);
    // 0.65 s later: 1.3 tokens.
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert!(
        echoed(p.addr()).await,
        "a token came back before the interval ended"
    );
    assert!(!echoed(p.addr()).await, "and only one");
    stat_is(&p, "local_rate_limit.refill.rate_limited", 2).await;
}

/// `max_tokens: 0` is a bucket that is always empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_bucket_limits_every_connection() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            &[
                local_rate_limit("zero", 0, 1, "1s", json!({})),
                tcp_proxy("echo"),
            ],
            &[],
            &[cluster("echo", port)],
        )
    });
    assert!(!echoed(p.addr()).await);
    stat_is(&p, "local_rate_limit.zero.rate_limited", 1).await;
    assert_eq!(echo.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_disabled_filter_never_limits() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        let off =
            json!({"runtime_enabled": {"default_value": false, "runtime_key": "lrl_enabled"}});
        bootstrap(
            ports,
            &[local_rate_limit("off", 1, 1, "60s", off), tcp_proxy("echo")],
            &[],
            &[cluster("echo", port)],
        )
    });
    for _ in 0..3 {
        assert!(echoed(p.addr()).await);
    }
    assert_eq!(p.stat("local_rate_limit.off.rate_limited").await, Some(0));
}

/// Two listeners whose filters have the same `share_key` and bucket take
/// from one bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_key_shares_one_bucket_across_listeners() {
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        let shared = json!({"share_key": "shared"});
        bootstrap(
            ports,
            &[
                local_rate_limit("a", 2, 1, "60s", shared.clone()),
                tcp_proxy("echo"),
            ],
            &[
                local_rate_limit("b", 2, 1, "60s", shared),
                tcp_proxy("echo"),
            ],
            &[cluster("echo", port)],
        )
    });
    assert!(echoed(p.addr()).await);
    assert!(echoed(p.addr2()).await);
    assert!(!echoed(p.addr()).await);
    assert!(!echoed(p.addr2()).await);
    stat_is(&p, "local_rate_limit.a.rate_limited", 1).await;
    stat_is(&p, "local_rate_limit.b.rate_limited", 1).await;
}

/// In front of the HCM: a limited connection is closed before any HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_http_connections_before_the_hcm() {
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            &[local_rate_limit("http", 1, 1, "60s", json!({})), hcm()],
            &[],
            &[],
        )
    });
    let url = format!("{}/", p.base());
    let ok = Http::h1().get(&url, &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.text(), "ok");
    let limited = Http::h1()
        .try_send("GET", &url, &[], bytes::Bytes::new())
        .await;
    assert!(
        limited.is_err(),
        "a limited connection gets no response: {limited:?}"
    );
    stat_is(&p, "local_rate_limit.http.rate_limited", 1).await;
}

/// Bad buckets are rejected at start-up with the field path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_buckets_are_rejected() {
    for (bucket, field) in [
        (
            json!({"max_tokens": 1, "fill_interval": "0.01s"}),
            "fill_interval",
        ),
        (
            json!({"max_tokens": 1, "tokens_per_fill": 0, "fill_interval": "1s"}),
            "tokens_per_fill",
        ),
        (json!({"max_tokens": 1}), "fill_interval"),
    ] {
        let f = json!({"name": "lrl", "typed_config": {
            "@type": LOCAL_RATE_LIMIT, "stat_prefix": "x", "token_bucket": bucket,
        }});
        let r = Proxy::try_start(Target::from_env(), StartOptions::default(), move |ports| {
            bootstrap(ports, &[f.clone(), tcp_proxy("c")], &[], &[cluster("c", 1)])
        });
        let Err(e) = r else {
            panic!("{field}: started")
        };
        if !Target::from_env().is_envoy() {
            let e = format!("{e:#}");
            assert!(
                e.contains(&format!("filters[0].typed_config.token_bucket.{field}")),
                "{e}"
            );
        }
    }
}
