//! A harness for scenario tests that run against weir in-process (the
//! default), the weir binary, or real Envoy, so the assertions of a scenario
//! can be checked against Envoy itself:
//!
//! ```sh
//! cargo test -p weir-tests --test scenarios_more                          # weir in-process
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test scenarios_more # Envoy 1.40
//! WEIR_SCENARIO_TARGET=weir-bin cargo test -p weir-tests --test scenarios_more
//! ```
//!
//! A scenario builds its bootstrap from [`Ports`]: in-process every port is
//! `0` (the kernel picks; the harness asks the server for the bound address),
//! for a process the ports are free ports chosen up front. Listeners must be
//! named `l` (and `l2` for a second one). Stats are read through the admin
//! `/stats` endpoint for every target, so the stat names asserted are the
//! ones an operator sees.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::proc::{envoy_binary, weir_binary, ProxyProc};
use crate::upstream::EchoView;

/// How long any single request of a scenario may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which proxy a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `weir::Server` in this process (fast; the default).
    InProcess,
    /// The `weir` binary next to the test binary (`cargo build -p weir`).
    WeirBin,
    /// Real Envoy (`scripts/install-test-deps.sh`).
    Envoy,
}

impl Target {
    /// `WEIR_SCENARIO_TARGET`: `envoy`, `weir-bin`, else in-process.
    pub fn from_env() -> Target {
        match std::env::var("WEIR_SCENARIO_TARGET").as_deref() {
            Ok("envoy") => Target::Envoy,
            Ok("weir-bin") | Ok("weir_bin") => Target::WeirBin,
            _ => Target::InProcess,
        }
    }

    pub fn is_envoy(self) -> bool {
        self == Target::Envoy
    }
}

/// The ports a bootstrap uses; all `0` in-process.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Listener `l`.
    pub listen: u16,
    /// Listener `l2` (when the scenario has one).
    pub listen2: u16,
    pub admin: u16,
}

/// Start-up knobs.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Extra command-line arguments for process targets.
    pub args: Vec<String>,
    /// The same for the in-process server: edits its `weir::cli::Options`.
    pub in_process: Option<fn(&mut weir::cli::Options)>,
    /// Worker threads in-process (default 2).
    pub concurrency: Option<usize>,
}

enum Inner {
    InProcess(Option<weir::Server>),
    Proc(ProxyProc),
}

/// A running proxy; stopped when dropped.
pub struct Proxy {
    target: Target,
    inner: Inner,
    listen: Option<SocketAddr>,
    listen2: Option<SocketAddr>,
    admin: SocketAddr,
}

impl Proxy {
    /// Starts the target named by `WEIR_SCENARIO_TARGET` on `config(ports)`.
    /// Panics (the test fails) when the proxy does not start.
    pub fn start(config: impl Fn(&Ports) -> String) -> Proxy {
        Proxy::start_with(Target::from_env(), StartOptions::default(), config)
    }

    /// [`Proxy::start`] with an explicit target and options.
    pub fn start_with(
        target: Target,
        opts: StartOptions,
        config: impl Fn(&Ports) -> String,
    ) -> Proxy {
        match Proxy::try_start(target, opts, config) {
            Ok(p) => p,
            Err(e) => panic!("{target:?} did not start: {e:#}"),
        }
    }

    pub fn try_start(
        target: Target,
        opts: StartOptions,
        config: impl Fn(&Ports) -> String,
    ) -> anyhow::Result<Proxy> {
        match target {
            Target::InProcess => {
                let yaml = config(&Ports {
                    listen: 0,
                    listen2: 0,
                    admin: 0,
                });
                let (b, s) = xds_client::load_bootstrap(Some(&yaml), None, Default::default())
                    .map_err(|e| anyhow!("invalid config: {e}\n{yaml}"))?;
                let mut o = weir::cli::Options::for_test(opts.concurrency.unwrap_or(2));
                if let Some(f) = opts.in_process {
                    f(&mut o);
                }
                let server = weir::Server::start(o, b, s)?;
                let listen = server.listener_addr("l");
                let listen2 = server.listener_addr("l2");
                let admin = server.admin_addr().context("the bootstrap has no admin")?;
                Ok(Proxy {
                    target,
                    inner: Inner::InProcess(Some(server)),
                    listen,
                    listen2,
                    admin,
                })
            }
            Target::WeirBin | Target::Envoy => {
                let ports = Ports {
                    listen: crate::free_port(),
                    listen2: crate::free_port(),
                    admin: crate::free_port(),
                };
                let yaml = config(&ports);
                let (kind, bin) = if target == Target::Envoy {
                    ("envoy", envoy_binary()?)
                } else {
                    ("weir", weir_binary()?)
                };
                let mut args = vec!["--file-flush-interval-msec".to_owned(), "50".to_owned()];
                args.extend(opts.args.iter().cloned());
                let p = ProxyProc::start_with_args(kind, &bin, &yaml, &args)?;
                let ip = std::net::Ipv4Addr::LOCALHOST;
                Ok(Proxy {
                    target,
                    inner: Inner::Proc(p),
                    listen: Some(SocketAddr::from((ip, ports.listen))),
                    listen2: Some(SocketAddr::from((ip, ports.listen2))),
                    admin: SocketAddr::from((ip, ports.admin)),
                })
            }
        }
    }

    pub fn target(&self) -> Target {
        self.target
    }

    /// Listener `l`.
    pub fn addr(&self) -> SocketAddr {
        self.listen.expect("the bootstrap has a listener named l")
    }

    /// Listener `l2`.
    pub fn addr2(&self) -> SocketAddr {
        self.listen2.expect("the bootstrap has a listener named l2")
    }

    /// `http://<listener l>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The in-process server, if that is the target.
    pub fn server(&self) -> Option<&weir::Server> {
        match &self.inner {
            Inner::InProcess(s) => s.as_ref(),
            Inner::Proc(_) => None,
        }
    }

    /// The process, if the target is one.
    pub fn process(&self) -> Option<&ProxyProc> {
        match &self.inner {
            Inner::Proc(p) => Some(p),
            Inner::InProcess(_) => None,
        }
    }

    /// A request on the admin interface.
    pub async fn admin(&self, method: &str, path_and_query: &str) -> Resp {
        Http::h1()
            .send(
                method,
                &format!("http://{}{}", self.admin, path_and_query),
                &[],
                Bytes::new(),
            )
            .await
    }

    /// The value of stat `name` from admin `/stats` (`None`: not present).
    pub async fn stat(&self, name: &str) -> Option<i64> {
        let filter = format!("^{}$", regex_escape(name));
        let r = self
            .admin("GET", &format!("/stats?filter={}", percent_encode(&filter)))
            .await;
        assert_eq!(r.status, 200, "/stats: {}", r.text());
        r.text().lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// Waits until queued access-log lines are on disk.
    pub async fn flush_logs(&self) {
        match self.server() {
            Some(s) => {
                let w = s.shared.writer.clone();
                let _ = tokio::task::spawn_blocking(move || w.flush()).await;
            }
            // Processes run with --file-flush-interval-msec 50.
            None => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }

    /// The lines of access-log file `path` once it has at least `n`
    /// (flushing first; bounded wait of about 2 s).
    pub async fn log_lines(&self, path: &std::path::Path, n: usize) -> Vec<String> {
        let mut lines = Vec::new();
        for _ in 0..40 {
            self.flush_logs().await;
            lines = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            if lines.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lines
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Inner::InProcess(s) = &mut self.inner {
            if let Some(s) = s.take() {
                s.begin_shutdown();
            }
        }
    }
}

/// Escapes regex metacharacters.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Percent-encodes everything but unreserved characters (query values).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// `resp` read whole.
    pub async fn read(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Resp> {
        let status = resp.status().as_u16();
        let version = resp.version();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("response body")?
            .to_bytes();
        Ok(Resp {
            status,
            version,
            headers,
            body,
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of a response header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a response header, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The echo upstream's JSON report (panics with the body otherwise).
    pub fn echo(&self) -> EchoView {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not an echo body ({e}); status {}: {}",
                self.status,
                self.text()
            )
        })
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// First value of header `name` as an echo upstream received it.
pub fn echo_header<'a>(v: &'a EchoView, name: &str) -> Option<&'a str> {
    v.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Every value of header `name` as an echo upstream received it.
pub fn echo_headers<'a>(v: &'a EchoView, name: &str) -> Vec<&'a str> {
    v.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A pooling HTTP client (HTTP/1.1, or HTTP/2 prior knowledge).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn h1() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2c() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("GET", url, headers, Bytes::new()).await
    }

    /// Sends a request; panics on a transport error or after
    /// [`REQUEST_TIMEOUT`].
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Resp {
        match self.try_send(method, url, headers, body).await {
            Ok(r) => r,
            Err(e) => panic!("{method} {url}: {e:#}"),
        }
    }

    /// Sends a request; transport errors and timeouts are `Err`.
    pub async fn try_send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Resp> {
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).context("build request")?;
        let fut = async {
            let resp = self.client.request(req).await.context("request")?;
            Resp::read(resp).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("no response within {REQUEST_TIMEOUT:?}"))?
    }
}
