//! The admin server (Envoy's admin API subset), on the control runtime.
use std::{
    convert::Infallible, fmt::Write as _, net::SocketAddr, sync::atomic::Ordering, sync::Arc,
};

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use xds_client::config::ListenAddress;

use crate::{stats::StatValue, Shared};

/// A bound admin listener.
pub enum AdminListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl AdminListener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            AdminListener::Tcp(l) => l.local_addr().ok(),
            AdminListener::Unix(_) => None,
        }
    }
}

pub async fn bind(addr: &ListenAddress) -> std::io::Result<AdminListener> {
    match addr {
        ListenAddress::Socket(a) => Ok(AdminListener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        ListenAddress::Pipe(p) => {
            let _ = std::fs::remove_file(p);
            Ok(AdminListener::Unix(tokio::net::UnixListener::bind(p)?))
        }
    }
}

pub async fn serve(l: AdminListener, shared: Arc<Shared>) {
    loop {
        let s = shared.clone();
        match &l {
            AdminListener::Tcp(t) => {
                let Ok((stream, peer)) = t.accept().await else {
                    continue;
                };
                let local = stream.local_addr().unwrap_or(peer);
                let svc = service_fn(move |req| logged(req, s.clone(), peer, local));
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            AdminListener::Unix(u) => {
                let Ok((stream, _)) = u.accept().await else {
                    continue;
                };
                let none = SocketAddr::from(([0, 0, 0, 0], 0));
                let svc = service_fn(move |req| logged(req, s.clone(), none, none));
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

type Resp = Response<Full<bytes::Bytes>>;

/// `server.state`, with a failed health check reported as DRAINING.
fn effective_state(shared: &Shared) -> i64 {
    if shared.healthcheck_failed.load(Ordering::SeqCst) {
        1
    } else {
        shared.server_stats.state.value()
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(bytes::Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

fn json(v: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(bytes::Bytes::from(
        serde_json::to_string_pretty(&v).unwrap_or_default(),
    )));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

const ENDPOINTS: &[(&str, &str, bool)] = &[
    ("/", "admin home page", false),
    ("/certs", "print certs on machine", false),
    ("/clusters", "upstream cluster status", false),
    ("/config_dump", "dump current Envoy configs", false),
    ("/drain_listeners", "drain listeners", true),
    (
        "/healthcheck/fail",
        "cause the server to fail health checks",
        true,
    ),
    (
        "/healthcheck/ok",
        "cause the server to pass health checks",
        true,
    ),
    ("/help", "print out list of admin commands", false),
    ("/listeners", "print listener info", false),
    ("/logging", "query/change logging levels", true),
    ("/memory", "print current allocation/heap usage", false),
    ("/quitquitquit", "exit the server", true),
    (
        "/ready",
        "print server state, return 200 if LIVE, otherwise return 503",
        false,
    ),
    ("/reset_counters", "reset all counters to zero", true),
    ("/runtime", "print runtime values", false),
    (
        "/server_info",
        "print server version/status information",
        false,
    ),
    ("/stats", "print server stats", false),
    (
        "/stats/prometheus",
        "print server stats in prometheus format",
        false,
    ),
];

fn query_params(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), percent_decode(v)),
            None => (kv.to_owned(), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves one admin request and writes `admin.access_log` lines.
async fn logged(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Resp, Infallible> {
    if shared.admin_logs.is_empty() {
        return handle(req, shared).await;
    }
    let start = tokio::time::Instant::now();
    let mut info = crate::http::info::StreamInfo::new(
        start,
        "HTTP/1.1",
        req.method().clone(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str().into())
            .unwrap_or_default(),
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .into(),
        "http",
        peer,
        local,
        0,
    );
    info.request_headers = Some(Box::new(req.headers().clone()));
    let resp = handle(req, shared.clone()).await?;
    info.response_code = resp.status().as_u16();
    info.response_headers = Some(Box::new(resp.headers().clone()));
    info.bytes_sent = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    info.duration = Some(start.elapsed());
    for l in &shared.admin_logs {
        l.log(&info);
    }
    Ok(resp)
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_owned();
    let params = query_params(req.uri().query());
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let has = |k: &str| params.iter().any(|(n, _)| n == k);
    if let Some((_, _, mutating)) = ENDPOINTS.iter().find(|(p, _, _)| *p == path) {
        if *mutating && req.method() != Method::POST {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "This operation requires a POST request.\n",
            ));
        }
    }
    let r = match path.as_str() {
        "/" | "/help" => {
            let mut s = String::from("admin commands are:\n");
            for (p, d, _) in ENDPOINTS {
                let _ = writeln!(s, "  {p}: {d}");
            }
            text(StatusCode::OK, s)
        }
        "/ready" => {
            let state = effective_state(&shared);
            let (code, name) = match state {
                0 => (StatusCode::OK, "LIVE"),
                1 => (StatusCode::SERVICE_UNAVAILABLE, "DRAINING"),
                2 => (StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING"),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING"),
            };
            text(code, format!("{name}\n"))
        }
        "/server_info" => {
            let state = match effective_state(&shared) {
                0 => "LIVE",
                1 => "DRAINING",
                2 => "PRE_INITIALIZING",
                _ => "INITIALIZING",
            };
            let snap = shared.snapshot.load();
            let n = &snap.node;
            json(serde_json::json!({
                "version": format!("weir/{}", env!("CARGO_PKG_VERSION")),
                "state": state,
                "hot_restart_version": "disabled",
                "command_line_options": {
                    "concurrency": shared.workers,
                    "drain_time": format!("{}s", shared.options.drain_time_s),
                    "config_path": shared.options.config_path.clone().unwrap_or_default(),
                    "log_level": shared.options.log_level,
                },
                "node": {"id": n.id, "cluster": n.cluster, "metadata": n.metadata,
                         "locality": {"region": n.region, "zone": n.zone, "sub_zone": n.sub_zone}},
                "uptime_current_epoch": format!("{}s", shared.server_stats.uptime.value()),
                "uptime_all_epochs": format!("{}s", shared.server_stats.uptime.value()),
            }))
        }
        "/stats" | "/stats/prometheus" => stats(
            &shared.stats,
            &path,
            param("format"),
            param("filter"),
            has("usedonly"),
        ),
        "/config_dump" => {
            let r = config_dump(&shared, &params);
            xds_client::descriptors::release();
            crate::netif::trim_heap();
            r
        }
        "/clusters" => clusters(&shared, param("format").as_deref() == Some("json")),
        "/listeners" => {
            if param("format").as_deref() == Some("json") {
                json(
                    serde_json::json!({"listener_statuses": shared.listeners.load().iter().map(|l| serde_json::json!({
                    "name": &*l.name,
                    "local_address": {"socket_address": {"address": l.bound.ip().to_string(), "port_value": l.bound.port()}},
                })).collect::<Vec<_>>()}),
                )
            } else {
                let mut s = String::new();
                for l in shared.listeners.load().iter() {
                    let _ = writeln!(s, "{}::{}", l.name, l.bound);
                }
                text(StatusCode::OK, s)
            }
        }
        "/certs" => json(certs(&shared)),
        "/runtime" => json(serde_json::json!({"layers": [], "entries": {}})),
        "/memory" => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let kb = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            json(serde_json::json!({
                "allocated": kb("RssAnon:").to_string(),
                "heap_size": kb("VmData:").to_string(),
                // Envoy's tcmalloc page-heap figures have no equivalent in
                // weir's allocator; reported as 0.
                "pageheap_unmapped": "0",
                "pageheap_free": "0",
                "total_thread_cache": "0",
                "resident": kb("VmRSS:").to_string(),
                "total_physical_bytes": kb("VmRSS:").to_string(),
            }))
        }
        "/quitquitquit" => {
            let s = shared.clone();
            s.drain.send_replace(true);
            s.exit_requested.store(true, Ordering::SeqCst);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                s.writer.flush();
                for _ in 0..(s.workers + 4) {
                    s.exit.notify_waiters();
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            });
            text(StatusCode::OK, "OK\n")
        }
        // As Envoy: failing health checks makes the server report
        // DRAINING and close HTTP/1 connections after each response.
        "/healthcheck/fail" => {
            shared.healthcheck_failed.store(true, Ordering::SeqCst);
            shared.server_stats.live.set(0);
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/ok" => {
            shared.healthcheck_failed.store(false, Ordering::SeqCst);
            shared.server_stats.live.set(1);
            text(StatusCode::OK, "OK\n")
        }
        "/drain_listeners" => {
            // As Envoy: `inboundonly` drains only INBOUND listeners, `graceful`
            // keeps accepting (and draining) for --drain-time-s before the
            // sockets close; the process does not exit.
            let inbound_only = has("inboundonly");
            let graceful = has("graceful");
            let drain_time = std::time::Duration::from_secs(shared.options.drain_time_s);
            // The server stays LIVE (Envoy); each stopped listener is counted.
            for l in shared.listeners.load().iter() {
                if (!inbound_only || l.config().inbound) && !*l.stop_accept.borrow() {
                    l.drain(graceful, drain_time);
                    shared.server_stats.listener_stopped.inc();
                }
            }
            text(StatusCode::OK, "OK\n")
        }
        "/reset_counters" => {
            shared.stats.reset_counters();
            text(StatusCode::OK, "OK\n")
        }
        "/logging" => logging(&params),
        _ => text(
            StatusCode::NOT_FOUND,
            "invalid path. admin commands are listed at /help\n",
        ),
    };
    Ok(r)
}

fn logging(params: &[(String, String)]) -> Resp {
    for (k, v) in params {
        let r = match k.as_str() {
            "level" => crate::logging::set_level(v),
            "paths" => crate::logging::set_components(v),
            // `/logging?router=debug` sets one logger.
            name => crate::logging::set_components(&format!("{name}:{v}")),
        };
        if let Err(e) = r {
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    }
    text(
        StatusCode::OK,
        format!("active loggers:\n{}", crate::logging::current()),
    )
}

fn stats(
    store: &crate::stats::Store,
    path: &str,
    format: Option<String>,
    filter: Option<String>,
    used_only: bool,
) -> Resp {
    let re = match filter.as_deref().map(regex::Regex::new) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("invalid regex: {e}\n")),
        None => None,
    };
    let keep = |name: &str, used: bool| {
        re.as_ref().is_none_or(|r| r.is_match(name)) && (!used_only || used)
    };
    let prom = path == "/stats/prometheus" || format.as_deref() == Some("prometheus");
    if prom {
        let mut out = String::new();
        let mut last_type = String::new();
        store.visit(|n, v| {
            let used = match &v {
                StatValue::Counter(c) => *c > 0,
                StatValue::Gauge(_) => true,
                StatValue::Histogram(h) => h.count > 0,
                // As Envoy, Prometheus output has no text readouts.
                StatValue::Text(_) => return,
            };
            if !keep(n.name(), used) {
                return;
            }
            let pname = format!("envoy_{}", sanitize(&n.tag_extracted()));
            let labels = n
                .tags()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(",");
            let lb = |extra: &str| {
                let mut all = labels.clone();
                if !extra.is_empty() {
                    if !all.is_empty() {
                        all.push(',');
                    }
                    all.push_str(extra);
                }
                if all.is_empty() {
                    String::new()
                } else {
                    format!("{{{all}}}")
                }
            };
            let ty = match &v {
                StatValue::Counter(_) => "counter",
                StatValue::Gauge(_) => "gauge",
                StatValue::Histogram(_) => "histogram",
                StatValue::Text(_) => return,
            };
            if last_type != pname {
                let _ = writeln!(out, "# TYPE {pname} {ty}");
                last_type = pname.clone();
            }
            match v {
                StatValue::Counter(c) => {
                    let _ = writeln!(out, "{pname}{} {c}", lb(""));
                }
                StatValue::Gauge(g) => {
                    let _ = writeln!(out, "{pname}{} {g}", lb(""));
                }
                StatValue::Histogram(h) => {
                    for (i, b) in crate::stats::BUCKETS.iter().enumerate() {
                        let _ = writeln!(
                            out,
                            "{pname}_bucket{} {}",
                            lb(&format!("le=\"{b}\"")),
                            h.cumulative[i]
                        );
                    }
                    let _ = writeln!(out, "{pname}_bucket{} {}", lb("le=\"+Inf\""), h.count);
                    let _ = writeln!(out, "{pname}_sum{} {}", lb(""), h.sum_ms);
                    let _ = writeln!(out, "{pname}_count{} {}", lb(""), h.count);
                }
                StatValue::Text(_) => {}
            }
        });
        // Custom namespaces (Istio's `istiocustom`): no `envoy_` prefix, the
        // namespace left out, the labels as given (as Envoy's
        // `CustomStatNamespaces`).
        store.visit_labeled(|full, l, v| {
            let used = match &v {
                StatValue::Counter(c) => *c > 0,
                StatValue::Histogram(h) => h.count > 0,
                _ => return,
            };
            if !keep(full, used) {
                return;
            }
            let pname = sanitize(&l.name);
            let labels = l
                .labels
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{}=\"{v}\"", sanitize(k))
                })
                .collect::<Vec<_>>()
                .join(",");
            let lb = |extra: &str| match (labels.is_empty(), extra.is_empty()) {
                (true, true) => String::new(),
                (true, false) => format!("{{{extra}}}"),
                (false, true) => format!("{{{labels}}}"),
                (false, false) => format!("{{{labels},{extra}}}"),
            };
            let ty = if matches!(v, StatValue::Counter(_)) {
                "counter"
            } else {
                "histogram"
            };
            if last_type != pname {
                let _ = writeln!(out, "# TYPE {pname} {ty}");
                last_type = pname.clone();
            }
            match v {
                StatValue::Counter(c) => {
                    let _ = writeln!(out, "{pname}{} {c}", lb(""));
                }
                StatValue::Histogram(h) => {
                    for (i, b) in crate::stats::BUCKETS.iter().enumerate() {
                        let _ = writeln!(
                            out,
                            "{pname}_bucket{} {}",
                            lb(&format!("le=\"{b}\"")),
                            h.cumulative[i]
                        );
                    }
                    let _ = writeln!(out, "{pname}_bucket{} {}", lb("le=\"+Inf\""), h.count);
                    let _ = writeln!(out, "{pname}_sum{} {}", lb(""), h.sum_ms);
                    let _ = writeln!(out, "{pname}_count{} {}", lb(""), h.count);
                }
                _ => {}
            }
        });
        return text(StatusCode::OK, out);
    }
    if format.as_deref() == Some("json") {
        let mut arr = Vec::new();
        store.visit(|n, v| match v {
            StatValue::Counter(c) if keep(n.name(), c > 0) => arr.push(serde_json::json!({"name": n.name(), "value": c})),
            StatValue::Gauge(g) if keep(n.name(), true) => arr.push(serde_json::json!({"name": n.name(), "value": g})),
            StatValue::Histogram(h) if keep(n.name(), h.count > 0) => arr.push(serde_json::json!({"name": n.name(), "histograms": {"count": h.count, "sum": h.sum_ms}})),
            StatValue::Text(t) if keep(n.name(), !t.is_empty()) => arr.push(serde_json::json!({"name": n.name(), "value": t})),
            _ => {}
        });
        store.visit_labeled(|full, _, v| match v {
            StatValue::Counter(c) if keep(full, c > 0) => arr.push(serde_json::json!({"name": full, "value": c})),
            StatValue::Histogram(h) if keep(full, h.count > 0) => arr.push(serde_json::json!({"name": full, "histograms": {"count": h.count, "sum": h.sum_ms}})),
            _ => {}
        });
        return json(serde_json::json!({"stats": arr}));
    }
    let mut out = String::new();
    store.visit(|n, v| match v {
        StatValue::Counter(c) if keep(n.name(), c > 0) => {
            let _ = writeln!(out, "{}: {c}", n.name());
        }
        StatValue::Gauge(g) if keep(n.name(), true) => {
            let _ = writeln!(out, "{}: {g}", n.name());
        }
        StatValue::Text(t) if keep(n.name(), !t.is_empty()) => {
            let _ = writeln!(out, "{}: \"{t}\"", n.name());
        }
        StatValue::Histogram(h) if keep(n.name(), h.count > 0) => {
            if h.count == 0 {
                let _ = writeln!(out, "{}: No recorded values", n.name());
            } else {
                let _ = writeln!(out, "{}: count={} sum={}", n.name(), h.count, h.sum_ms);
            }
        }
        _ => {}
    });
    store.visit_labeled(|full, _, v| match v {
        StatValue::Counter(c) if keep(full, c > 0) => {
            let _ = writeln!(out, "{full}: {c}");
        }
        StatValue::Histogram(h) if keep(full, h.count > 0) => {
            let _ = writeln!(out, "{full}: count={} sum={}", h.count, h.sum_ms);
        }
        _ => {}
    });
    text(StatusCode::OK, out)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A proto message as Envoy's admin prints it: JSON with proto field names.
fn proto_json<M: prost::Message + prost::Name>(m: &M) -> serde_json::Value {
    // With the types of its Any values loaded, so they serialise expanded.
    let Some(dm) = xds_client::descriptors::dynamic_message(m) else {
        return serde_json::Value::Null;
    };
    let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    let mut ser = serde_json::Serializer::new(Vec::new());
    if dm.serialize_with_options(&mut ser, &opts).is_err() {
        return serde_json::Value::Null;
    }
    let mut v = serde_json::from_slice(&ser.into_inner()).unwrap_or(serde_json::Value::Null);
    redact(&mut v, false);
    v
}

/// Keeps `@type` and the masked (dotted) field paths of a JSON object.
fn apply_mask(v: &serde_json::Value, paths: &[&str]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(t) = v.get("@type") {
        out.insert("@type".into(), t.clone());
    }
    // Group the paths by their first segment so `a.b,a.c` keeps both.
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for p in paths {
        let (first, rest) = match p.split_once('.') {
            Some((f, r)) => (f, Some(r)),
            None => (*p, None),
        };
        let idx = match groups.iter().position(|(f, _)| *f == first) {
            Some(i) => i,
            None => {
                groups.push((first, Vec::new()));
                groups.len() - 1
            }
        };
        match rest {
            Some(r) => groups[idx].1.push(r),
            // The whole field: an empty sub-mask list means "everything".
            None => groups[idx].1.push(""),
        }
    }
    for (first, rests) in groups {
        let Some(val) = v.get(first) else { continue };
        let val = if rests.iter().any(|r| r.is_empty()) {
            val.clone()
        } else {
            match val {
                serde_json::Value::Array(items) => {
                    serde_json::Value::Array(items.iter().map(|i| apply_mask(i, &rests)).collect())
                }
                other => apply_mask(other, &rests),
            }
        };
        out.insert(first.to_owned(), val);
    }
    serde_json::Value::Object(out)
}

fn config_dump(shared: &Shared, params: &[(String, String)]) -> Resp {
    use xds_client::api::envoy::config::bootstrap::v3::Bootstrap;
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let re = match param("name_regex").map(|r| regex::Regex::new(&r)) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid name_regex: {e}\n"),
            )
        }
        None => None,
    };
    let keep = |name: &str| re.as_ref().is_none_or(|r| r.is_match(name));
    let b: &Bootstrap = &shared.bootstrap;
    let last_updated = crate::http::info::format_time(shared.started, None);
    let sr = b.static_resources.clone().unwrap_or_default();
    let listeners: Vec<_> = sr
        .listeners
        .iter()
        .filter(|l| keep(&l.name))
        .map(|l| serde_json::json!({"listener": typed(l), "last_updated": last_updated}))
        .collect();
    let clusters: Vec<_> = sr
        .clusters
        .iter()
        .filter(|c| keep(&c.name))
        .map(|c| serde_json::json!({"cluster": typed(c), "last_updated": last_updated}))
        .collect();
    let endpoints: Vec<_> = sr
        .clusters
        .iter()
        .filter(|c| keep(&c.name))
        .filter_map(|c| c.load_assignment.as_ref())
        .map(|la| serde_json::json!({"endpoint_config": typed(la), "last_updated": last_updated}))
        .collect();
    let dynamic = dynamic_dump(shared, &keep);
    let mut cds = serde_json::json!({"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "static_clusters": clusters});
    let mut lds = serde_json::json!({"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "static_listeners": listeners});
    let mut configs = vec![
        serde_json::json!({"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": proto_json(b), "last_updated": last_updated}),
    ];
    if let Some(d) = &dynamic {
        cds["version_info"] = d.cds_version.clone().into();
        cds["dynamic_active_clusters"] = d.active_clusters.clone().into();
        cds["dynamic_warming_clusters"] = d.warming_clusters.clone().into();
        lds["version_info"] = d.lds_version.clone().into();
        lds["dynamic_listeners"] = d.listeners.clone().into();
    }
    configs.push(cds);
    configs.push(lds);
    if let Some(d) = &dynamic {
        configs.push(serde_json::json!({"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": d.routes}));
    }
    let secrets: Vec<_> = sr
        .secrets
        .iter()
        .filter(|s| keep(&s.name))
        .map(|s| serde_json::json!({"name": s.name, "last_updated": last_updated, "secret": typed(s)}))
        .collect();
    let dyn_secrets = dynamic
        .as_ref()
        .map(|d| d.secrets.clone())
        .unwrap_or_default();
    if !secrets.is_empty() || !dyn_secrets.is_empty() {
        configs.push(serde_json::json!({"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump", "static_secrets": secrets, "dynamic_active_secrets": dyn_secrets}));
    }
    if params.iter().any(|(k, _)| k == "include_eds") {
        let dyn_eps = dynamic
            .as_ref()
            .map(|d| d.endpoints.clone())
            .unwrap_or_default();
        configs.push(serde_json::json!({"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "static_endpoint_configs": endpoints, "dynamic_endpoint_configs": dyn_eps}));
    }
    let mask = param("mask");
    let mask_paths: Vec<&str> = mask
        .as_deref()
        .map(|m| m.split(',').filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    let masked = |v: serde_json::Value| {
        if mask_paths.is_empty() {
            v
        } else {
            apply_mask(&v, &mask_paths)
        }
    };
    // Envoy prints `{}` when nothing is left to dump.
    let dump = |items: Vec<serde_json::Value>| {
        if items.is_empty() {
            json(serde_json::json!({}))
        } else {
            json(serde_json::json!({ "configs": items }))
        }
    };
    match param("resource").as_deref() {
        // As Envoy: resource= returns the entries of that repeated field,
        // each packed as an Any of the entry's type.
        Some(r) => {
            let element = match r {
                "static_listeners" => Some("envoy.admin.v3.ListenersConfigDump.StaticListener"),
                "static_clusters" => Some("envoy.admin.v3.ClustersConfigDump.StaticCluster"),
                "static_endpoint_configs" => {
                    Some("envoy.admin.v3.EndpointsConfigDump.StaticEndpointConfig")
                }
                "dynamic_listeners" if dynamic.is_some() => {
                    Some("envoy.admin.v3.ListenersConfigDump.DynamicListener")
                }
                "dynamic_active_clusters" | "dynamic_warming_clusters" if dynamic.is_some() => {
                    Some("envoy.admin.v3.ClustersConfigDump.DynamicCluster")
                }
                "dynamic_route_configs" if dynamic.is_some() => {
                    Some("envoy.admin.v3.RoutesConfigDump.DynamicRouteConfig")
                }
                "dynamic_active_secrets" if dynamic.is_some() => {
                    Some("envoy.admin.v3.SecretsConfigDump.DynamicSecret")
                }
                _ => None,
            };
            const KNOWN_EMPTY: &[&str] = &[
                "dynamic_listeners",
                "dynamic_active_clusters",
                "dynamic_warming_clusters",
                "static_route_configs",
                "dynamic_route_configs",
                "static_scoped_route_configs",
                "dynamic_scoped_route_configs",
                "dynamic_endpoint_configs",
                "static_secrets",
                "dynamic_active_secrets",
                "dynamic_warming_secrets",
            ];
            match element {
                Some(t) => {
                    let items = configs
                        .iter()
                        .find_map(|c| c.get(r).and_then(|v| v.as_array()).cloned())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|mut v| {
                            if let serde_json::Value::Object(m) = &mut v {
                                m.insert("@type".into(), format!("type.googleapis.com/{t}").into());
                            }
                            masked(v)
                        })
                        .collect();
                    dump(items)
                }
                None if KNOWN_EMPTY.contains(&r) => dump(Vec::new()),
                None => text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown or unsupported resource {r:?}\n"),
                ),
            }
        }
        None => dump(configs.into_iter().map(masked).collect()),
    }
}

/// A proto message as an `Any` in JSON: `@type` plus its fields.
/// The xDS resources for `/config_dump`, in Envoy's ConfigDump shapes.
struct DynamicDump {
    cds_version: String,
    lds_version: String,
    active_clusters: Vec<serde_json::Value>,
    warming_clusters: Vec<serde_json::Value>,
    listeners: Vec<serde_json::Value>,
    routes: Vec<serde_json::Value>,
    endpoints: Vec<serde_json::Value>,
    secrets: Vec<serde_json::Value>,
}

fn dynamic_dump(shared: &Shared, keep: &dyn Fn(&str) -> bool) -> Option<DynamicDump> {
    use prost::Message;
    use xds_client::api::envoy::config::{
        cluster::v3 as c, endpoint::v3 as e, listener::v3 as l, route::v3 as r,
    };
    use xds_client::api::envoy::extensions::transport_sockets::tls::v3 as t;
    use xds_client::xds::ResourceType as R;
    let client = shared.xds.get()?;
    Some(client.with_state(|st| {
        let ts = |e: &xds_client::xds::state::Entry| crate::http::info::format_time(e.updated, None);
        let ver = |rt| st.type_versions.get(&rt).cloned().unwrap_or_default();
        let mut d = DynamicDump {
            cds_version: ver(R::Cluster),
            lds_version: ver(R::Listener),
            active_clusters: vec![],
            warming_clusters: vec![],
            listeners: vec![],
            routes: vec![],
            endpoints: vec![],
            secrets: vec![],
        };
        for (n, en) in st.entries(R::Cluster).filter(|(n, _)| keep(n)) {
            let Ok(p) = c::Cluster::decode(en.raw.value.as_slice()) else { continue };
            let v = serde_json::json!({"version_info": en.version, "cluster": typed(&p), "last_updated": ts(en)});
            if st.warming_clusters.contains(n) {
                d.warming_clusters.push(v);
            } else {
                d.active_clusters.push(v);
            }
        }
        for (n, en) in st.entries(R::Listener).filter(|(n, _)| keep(n)) {
            let Ok(p) = l::Listener::decode(en.raw.value.as_slice()) else { continue };
            let state = serde_json::json!({"version_info": en.version, "listener": typed(&p), "last_updated": ts(en)});
            let key = if st.warming_listeners.contains(n) { "warming_state" } else { "active_state" };
            d.listeners.push(serde_json::json!({"name": &**n, key: state}));
        }
        for (_, en) in st.entries(R::Route) {
            let Ok(p) = r::RouteConfiguration::decode(en.raw.value.as_slice()) else { continue };
            d.routes.push(serde_json::json!({"version_info": en.version, "route_config": typed(&p), "last_updated": ts(en)}));
        }
        for (_, en) in st.entries(R::Endpoint) {
            let Ok(p) = e::ClusterLoadAssignment::decode(en.raw.value.as_slice()) else { continue };
            d.endpoints.push(serde_json::json!({"version_info": en.version, "endpoint_config": typed(&p), "last_updated": ts(en)}));
        }
        for (n, en) in st.entries(R::Secret).filter(|(n, _)| keep(n)) {
            let Ok(p) = t::Secret::decode(en.raw.value.as_slice()) else { continue };
            d.secrets.push(serde_json::json!({"name": &**n, "version_info": en.version, "last_updated": ts(en), "secret": typed(&p)}));
        }
        d
    }))
}

/// Envoy's config_dump redaction of sensitive fields (`private_key`,
/// `password`, `session_ticket_keys`): every string below them becomes `[redacted]` (bytes: its
/// base64).
fn redact(v: &mut serde_json::Value, sensitive: bool) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                // `session_ticket_keys` are secret too (Envoy's
                // `TlsSessionTicketKeys.keys` is a sensitive field).
                let s = sensitive
                    || k == "private_key"
                    || k == "password"
                    || k == "session_ticket_keys";
                if s && k == "inline_bytes" {
                    *child = "W3JlZGFjdGVkXQ==".into();
                } else {
                    redact(child, s);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|c| redact(c, sensitive)),
        serde_json::Value::String(s) if sensitive => *s = "[redacted]".into(),
        _ => {}
    }
}

fn typed<M: prost::Message + prost::Name>(m: &M) -> serde_json::Value {
    let mut v = proto_json(m);
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("@type".into(), M::type_url().into());
    }
    v
}

/// A host's `health_status` in `/clusters?format=json`.
fn health_status_json(h: &crate::upstream::Host) -> serde_json::Value {
    let mut st =
        serde_json::json!({"eds_health_status": if h.healthy { "HEALTHY" } else { "UNHEALTHY" }});
    if h.is_ejected() {
        st["failed_outlier_check"] = true.into();
    }
    if h.failed_active_hc() {
        st["failed_active_health_check"] = true.into();
    }
    st
}

fn clusters(shared: &Shared, as_json: bool) -> Resp {
    let all = shared.clusters.clusters.load_full();
    let mut names: Vec<_> = all.keys().cloned().collect();
    names.sort();
    if as_json {
        let arr: Vec<_> = names.iter().map(|n| {
            let c = &all[n];
            let hosts = c.hosts.load();
            serde_json::json!({
                "name": &**n,
                "host_statuses": hosts.hosts.iter().map(|h| serde_json::json!({
                    "address": {"socket_address": {"address": h.addr.ip().to_string(), "port_value": h.addr.port()}},
                    "hostname": h.hostname,
                    "weight": h.weight,
                    "priority": h.priority,
                    "health_status": health_status_json(h),
                    "stats": [{"name": "rq_active", "value": h.active.load(Ordering::Relaxed).to_string(), "type": "GAUGE"}],
                })).collect::<Vec<_>>(),
            })
        }).collect();
        return json(serde_json::json!({"cluster_statuses": arr}));
    }
    let mut s = String::new();
    for n in names {
        let c = &all[&n];
        let _ = writeln!(s, "{n}::observability_name::{}", c.config.stat_name);
        if let Some(d) = &c.outlier {
            let (avg, thr, lavg, lthr) = d.success_rate_nums();
            let _ = writeln!(s, "{n}::outlier::success_rate_average::{avg}");
            let _ = writeln!(s, "{n}::outlier::success_rate_ejection_threshold::{thr}");
            let _ = writeln!(s, "{n}::outlier::local_origin_success_rate_average::{lavg}");
            let _ = writeln!(
                s,
                "{n}::outlier::local_origin_success_rate_ejection_threshold::{lthr}"
            );
        }
        for (prio, rm) in [("default", &c.breakers.default), ("high", &c.breakers.high)] {
            let [cx, pending, rq, retries] = rm.maxes();
            let _ = writeln!(s, "{n}::{prio}_priority::max_connections::{cx}");
            let _ = writeln!(s, "{n}::{prio}_priority::max_pending_requests::{pending}");
            let _ = writeln!(s, "{n}::{prio}_priority::max_requests::{rq}");
            let _ = writeln!(s, "{n}::{prio}_priority::max_retries::{retries}");
        }
        for h in c.hosts.load().hosts.iter() {
            let a = h.addr;
            let _ = writeln!(
                s,
                "{n}::{a}::rq_active::{}",
                h.active.load(Ordering::Relaxed)
            );
            let _ = writeln!(s, "{n}::{a}::hostname::{}", h.hostname);
            // As Envoy's HostUtility::healthFlagsToString, in flag order.
            let mut flags = String::new();
            if h.failed_active_hc() {
                flags.push_str("/failed_active_hc");
            }
            if h.is_ejected() {
                flags.push_str("/failed_outlier_check");
            }
            if !h.healthy {
                flags.push_str("/failed_eds_health");
            }
            if flags.is_empty() {
                flags.push_str("healthy");
            }
            let _ = writeln!(s, "{n}::{a}::health_flags::{flags}");
            let _ = writeln!(s, "{n}::{a}::weight::{}", h.weight);
            let _ = writeln!(s, "{n}::{a}::priority::{}", h.priority);
            let (sr, lsr) = h.outlier.get().map_or((-1.0, -1.0), |m| m.success_rates());
            let _ = writeln!(s, "{n}::{a}::success_rate::{sr}");
            let _ = writeln!(s, "{n}::{a}::local_origin_success_rate::{lsr}");
        }
    }
    text(StatusCode::OK, s)
}

/// `/certs`: every TLS context's certificates and CAs, as Envoy.
fn certs(shared: &Shared) -> serde_json::Value {
    let mut out = Vec::new();
    for s in shared.tls.servers() {
        let (certs, ca) = s.cert_infos();
        let path = |i: usize| match s.config.certs.get(i) {
            Some(xds_client::config::SecretRef::Inline(t)) => match &t.chain {
                xds_client::config::CertData::File(p) => p.display().to_string(),
                xds_client::config::CertData::Inline(_) => "<inline>".to_owned(),
            },
            Some(xds_client::config::SecretRef::Sds(n)) => format!("<sds:{n}>"),
            None => String::new(),
        };
        out.push(serde_json::json!({
            "ca_cert": ca.iter().map(|c| crate::tls::cert_json(c, "")).collect::<Vec<_>>(),
            "cert_chain": certs.iter().enumerate().map(|(i, c)| crate::tls::cert_json(c, &path(i))).collect::<Vec<_>>(),
        }));
    }
    for c in shared.tls.clients() {
        out.push(serde_json::json!({
            "ca_cert": [],
            "cert_chain": c.cert_info().iter().map(|c| crate::tls::cert_json(c, "")).collect::<Vec<_>>(),
        }));
    }
    serde_json::json!({ "certificates": out })
}

#[cfg(test)]
mod tests;
