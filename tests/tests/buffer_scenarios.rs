//! `envoy.filters.http.buffer` with a real echo upstream and real HTTP/1.1
//! clients (framed and chunked bodies).
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test buffer_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test buffer_scenarios
//! ```
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use weir_tests::client::{http1_raw, Outcome};
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, filter, hcm, listener, log_path, route, vhost,
};
use weir_tests::scenario::{echo_header, Http, Proxy};
use weir_tests::upstream;

const BUFFER: &str = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";
const PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute";

/// A proxy with the buffer filter (`max_request_bytes: 16`) in front of an
/// echo upstream: `/` uses it, `/off` disables it, `/big` raises the limit.
async fn proxy(name: &str) -> (Proxy, upstream::EchoServer, weir_tests::tmp::TempFile) {
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let port = echo.port();
    let log = log_path("buffer", name);
    let l = log.to_path_buf();
    let p = Proxy::start(move |ports| {
        let per = |v: serde_json::Value| {
            json!({"typed_per_filter_config": {"envoy.filters.http.buffer":
                weir_tests::config::merge(json!({"@type": PER_ROUTE}), v)}})
        };
        let h = hcm(
            "ingress",
            vec![filter(
                "envoy.filters.http.buffer",
                BUFFER,
                json!({"max_request_bytes": 16}),
            )],
            vec![vhost(
                "vh",
                vec![
                    route("/off", "echo", per(json!({"disabled": true}))),
                    route(
                        "/big",
                        "echo",
                        per(json!({"buffer": {"max_request_bytes": 1024}})),
                    ),
                    route("/", "echo", json!({})),
                ],
                json!({}),
            )],
            json!({"access_log": [file_log(
                &l,
                "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED%\n",
            )]}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    (p, echo, log)
}

fn chunked(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .into_bytes()
}

fn reply(o: Outcome) -> weir_tests::client::Reply {
    match o {
        Outcome::Response(r) => r,
        other => panic!("no response: {other:?}"),
    }
}

/// Bodies within the limit reach the upstream whole; a chunked one gets a
/// `content-length`; a larger one is refused 413 before the upstream is
/// asked; a route may disable the filter or raise its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_buffered_within_the_limit() {
    let (p, echo, log) = proxy("limits").await;
    let c = Http::h1();
    let base = p.base();
    let r = c
        .send(
            "POST",
            &format!("{base}/a"),
            &[],
            Bytes::from_static(b"0123456789"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().body_len, 10);
    let r = reply(
        http1_raw(
            p.addr(),
            &chunked("/chunked", "hello"),
            Duration::from_secs(5),
        )
        .await,
    );
    assert_eq!(r.status, 200);
    let v: upstream::EchoView = serde_json::from_slice(&r.body).expect("echo");
    assert_eq!(v.body_len, 5);
    assert_eq!(echo_header(&v, "content-length"), Some("5"));
    assert_eq!(echo_header(&v, "transfer-encoding"), None);
    let r = c
        .send(
            "POST",
            &format!("{base}/a"),
            &[],
            Bytes::from(vec![b'x'; 100]),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.text(), "Payload Too Large");
    let r = reply(
        http1_raw(
            p.addr(),
            &chunked("/chunked", &"y".repeat(40)),
            Duration::from_secs(5),
        )
        .await,
    );
    assert_eq!(r.status, 413);
    // Disabled on /off: streamed through whatever its size.
    let r = c
        .send(
            "POST",
            &format!("{base}/off"),
            &[],
            Bytes::from(vec![b'x'; 100]),
        )
        .await;
    assert_eq!((r.status, r.echo().body_len), (200, 100));
    // A larger limit on /big.
    let r = c
        .send(
            "POST",
            &format!("{base}/big"),
            &[],
            Bytes::from(vec![b'x'; 100]),
        )
        .await;
    assert_eq!((r.status, r.echo().body_len), (200, 100));
    let paths: Vec<String> = echo.requests().into_iter().map(|v| v.path).collect();
    assert_eq!(paths, ["/a", "/chunked", "/off", "/big"]);
    let lines = p.log_lines(&log, 6).await;
    assert_eq!(lines[0], "200 via_upstream 10");
    assert_eq!(
        lines[2].split(' ').take(2).collect::<Vec<_>>(),
        ["413", "request_payload_too_large"]
    );
    assert_eq!(
        lines[3].split(' ').take(2).collect::<Vec<_>>(),
        ["413", "request_payload_too_large"]
    );
}
