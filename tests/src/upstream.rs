//! Echo upstreams: real HTTP servers on `127.0.0.1:0` that report what they
//! received.
//!
//! Every request is answered with `200` and a JSON body (see [`EchoView`])
//! describing the request as the upstream saw it. Request headers steer the
//! answer so tests can exercise retries, timeouts and status handling
//! deterministically:
//!
//! | header                 | effect                                                        |
//! |------------------------|---------------------------------------------------------------|
//! | `x-echo-status: N`     | answer with status `N`                                        |
//! | `x-echo-fail-times: K` | apply `x-echo-status` only to the first `K` requests of an id |
//! | `x-echo-id: ID`        | count requests per id; the count is reported as `seen`        |
//! | `x-echo-delay-ms: N`   | wait `N` ms (at most 10 s) before answering                   |
//! | `x-echo-delay-times: K`| apply `x-echo-delay-ms` only to the first `K` requests of an id |
//! | `x-echo-body-size: N`  | answer with `N` bytes of `a` (text/plain) instead of JSON     |
//! | `x-echo-header-NAME: V`| add response header `NAME: V`                                 |
//!
//! Every response also carries `x-echo-seen: <count for the id>` so the
//! number of attempts a proxy made is observable even when the final answer
//! is an error status.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Longest delay `x-echo-delay-ms` honours.
const MAX_DELAY_MS: u64 = 10_000;
/// Largest body `x-echo-body-size` produces.
const MAX_BODY: usize = 16 << 20;

/// What an echo upstream reports about a request (the JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoView {
    /// The upstream's own name.
    pub upstream: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub version: String,
    pub method: String,
    /// Path including the query string, as received.
    pub path: String,
    /// The `:authority` (HTTP/2) or absolute-form authority; empty otherwise.
    pub authority: String,
    /// Headers, sorted by name (stable: repeated names keep their order).
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// How many requests this upstream has seen with the same `x-echo-id`
    /// (including this one); 0 without an id.
    pub seen: u64,
}

impl EchoView {
    /// The first value of request header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Which HTTP version an echo upstream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    Http2,
}

#[derive(Default)]
pub(crate) struct State {
    seen: Mutex<HashMap<String, u64>>,
    /// The last requests received (at most [`RECORDED`]).
    recorded: Mutex<std::collections::VecDeque<EchoView>>,
    /// The status of requests without `x-echo-status` (0: 200).
    default_status: std::sync::atomic::AtomicU16,
}

/// How many requests an echo upstream remembers.
const RECORDED: usize = 256;

/// A running echo upstream. Stops accepting when dropped.
pub struct EchoServer {
    addr: SocketAddr,
    name: String,
    task: JoinHandle<()>,
    state: Arc<State>,
}

impl EchoServer {
    /// The requests received so far (the last 256), oldest first.
    pub fn requests(&self) -> Vec<EchoView> {
        let r = self
            .state
            .recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.iter().cloned().collect()
    }

    /// Waits (about 2 s at most) until `n` requests were received; returns
    /// them.
    pub async fn wait_requests(&self, n: usize) -> Vec<EchoView> {
        for _ in 0..100 {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.requests()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers requests without `x-echo-status` with `status` from now on
    /// (e.g. to fail a proxy's active health checks).
    pub fn set_default_status(&self, status: u16) {
        self.state
            .default_status
            .store(status, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 echo upstream named `name` on `127.0.0.1:0`.
pub async fn http1(name: &str) -> std::io::Result<EchoServer> {
    echo(name, Proto::Http1).await
}

/// An HTTP/2 (h2c, prior knowledge) echo upstream named `name` on `127.0.0.1:0`.
pub async fn http2(name: &str) -> std::io::Result<EchoServer> {
    echo(name, Proto::Http2).await
}

/// An echo upstream speaking `proto`.
pub async fn echo(name: &str, proto: Proto) -> std::io::Result<EchoServer> {
    echo_at(name, proto, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// An echo upstream speaking `proto` on `bind` (another loopback address,
/// a chosen port).
pub async fn echo_at(name: &str, proto: Proto, bind: SocketAddr) -> std::io::Result<EchoServer> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State::default());
    let kept = state.clone();
    let upstream: Arc<str> = Arc::from(name);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    handle(req, upstream.clone(), state.clone(), &[])
                });
                let io = TokioIo::new(stream);
                // Connection errors (proxy resets, aborted requests) are part
                // of normal operation here.
                let _ = match proto {
                    Proto::Http1 => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    }
                    Proto::Http2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    }
                };
            });
        }
    });
    Ok(EchoServer {
        addr,
        name: name.to_owned(),
        task,
        state: kept,
    })
}

fn header<'a>(req: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The echo handler (also behind the TLS upstreams of `crate::tls`), with
/// `extra` response headers.
pub(crate) async fn handle(
    req: Request<Incoming>,
    upstream: Arc<str>,
    state: Arc<State>,
    extra: &[(&'static str, String)],
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body_len = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let seen = match header(&parts, "x-echo-id") {
        Some(id) => {
            let mut map = state.seen.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(id.to_owned()).or_insert(0);
            *n += 1;
            *n
        }
        None => 0,
    };
    let delay_applies = header(&parts, "x-echo-delay-times")
        .and_then(|v| v.parse::<u64>().ok())
        .is_none_or(|k| seen <= k);
    if let Some(ms) = header(&parts, "x-echo-delay-ms")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| delay_applies)
    {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
    }
    let mut status = header(&parts, "x-echo-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or_else(|| {
            let d = state
                .default_status
                .load(std::sync::atomic::Ordering::Relaxed);
            http::StatusCode::from_u16(d).unwrap_or(http::StatusCode::OK)
        });
    if let Some(k) = header(&parts, "x-echo-fail-times").and_then(|v| v.parse::<u64>().ok()) {
        if seen > k {
            status = http::StatusCode::OK;
        }
    }

    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let view = EchoView {
        upstream: upstream.to_string(),
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        authority: parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
        headers,
        body_len,
        seen,
    };
    {
        let mut r = state.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == RECORDED {
            r.pop_front();
        }
        r.push_back(view.clone());
    }

    let mut resp = Response::builder()
        .status(status)
        .header("x-echo-seen", seen.to_string());
    for (name, value) in extra {
        resp = resp.header(*name, value.as_str());
    }
    for (name, value) in parts.headers.iter() {
        if let Some(extra) = name.as_str().strip_prefix("x-echo-header-") {
            resp = resp.header(extra, value.clone());
        }
    }
    let body = match header(&parts, "x-echo-body-size").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => {
            resp = resp.header("content-type", "text/plain");
            Bytes::from(vec![b'a'; n.min(MAX_BODY)])
        }
        None => {
            resp = resp.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(&view).unwrap_or_default())
        }
    };
    Ok(resp.body(Full::new(body)).unwrap_or_else(|e| {
        let mut r = Response::new(Full::new(Bytes::from(format!("echo: {e}"))));
        *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    }))
}
