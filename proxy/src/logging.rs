//! `tracing` setup with levels changeable at run time (`-l`,
//! `--component-log-level`, admin `/logging`).
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{filter::EnvFilter, prelude::*, reload, Registry};

type Handle = reload::Handle<EnvFilter, Registry>;

static HANDLE: OnceLock<Handle> = OnceLock::new();
/// The global level and per-logger overrides (Envoy logger names).
static CURRENT: Mutex<(String, Vec<(&'static str, String)>)> =
    Mutex::new((String::new(), Vec::new()));

/// Envoy's logger names weir has, and the `tracing` targets behind each.
/// `/logging` and `--component-log-level` take these names.
pub const LOGGERS: &[(&str, &[&str])] = &[
    ("admin", &["weir::admin"]),
    ("config", &["xds_client"]),
    ("connection", &["weir::listener", "weir::http::server"]),
    (
        "dns",
        &["weir::upstream::dns", "hickory_resolver", "hickory_proto"],
    ),
    ("filter", &["filters"]),
    ("http", &["weir::http", "hyper", "hyper_util"]),
    ("http2", &["h2"]),
    ("main", &["weir::app", "weir::logging"]),
    ("misc", &["weir"]),
    ("pool", &["weir::upstream::pool"]),
    ("router", &["weir::http::router"]),
    ("stats", &["weir::stats"]),
    ("upstream", &["weir::upstream"]),
    // Envoy's other loggers: accepted so Envoy command lines keep working;
    // nothing in weir logs under them yet.
    ("alternate_protocols_cache", &[]),
    ("aws", &[]),
    ("assert", &[]),
    ("backtrace", &[]),
    ("client", &[]),
    ("conn_handler", &[]),
    ("decompression", &[]),
    ("envoy_bug", &[]),
    ("ext_authz", &[]),
    ("ext_proc", &[]),
    ("file", &[]),
    ("forward_proxy", &[]),
    ("grpc", &[]),
    ("happy_eyeballs", &[]),
    ("hc", &[]),
    ("health_checker", &[]),
    ("http3", &[]),
    ("init", &[]),
    ("io", &[]),
    ("jwt", &[]),
    ("key_value_store", &[]),
    ("lua", &[]),
    ("matcher", &[]),
    ("multi_connection", &[]),
    ("oauth2", &[]),
    ("quic", &[]),
    ("quic_stream", &[]),
    ("rbac", &[]),
    ("rds", &[]),
    ("runtime", &[]),
    ("secret", &[]),
    ("tap", &[]),
    ("testing", &[]),
    ("tracing", &[]),
    ("udp", &[]),
    ("wasm", &[]),
    ("websocket", &[]),
];

/// Envoy level names to tracing's.
fn level(l: &str) -> Result<&'static str, ()> {
    Ok(match l.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" => "error",
        "critical" => "error",
        "off" => "off",
        _ => return Err(()),
    })
}

/// tracing's level names back to Envoy's.
fn envoy_level(l: &str) -> &str {
    match l {
        "warn" => "warning",
        other => other,
    }
}

fn build() -> EnvFilter {
    let cur = CURRENT.lock().expect("log level lock");
    let mut s = cur.0.clone();
    for (c, l) in &cur.1 {
        if let Some((_, targets)) = LOGGERS.iter().find(|(n, _)| n == c) {
            for t in targets.iter() {
                s.push_str(&format!(",{t}={l}"));
            }
        }
    }
    EnvFilter::try_new(&s).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Formats events with an Envoy (spdlog) `--log-format` pattern. Supported
/// flags: `%Y %m %d %H %M %S %T %e %f %F %z %l %L %n %v %j %t %P %g %s %# %@
/// %! %%`; other characters are written as they are.
struct EnvoyFormat {
    pattern: String,
}

#[derive(Default)]
struct Collect {
    message: String,
    fields: String,
}

impl tracing::field::Visit for Collect {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for EnvoyFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        w.write_str(&render_pattern(&self.pattern, event))?;
        writeln!(w)
    }
}

/// Renders one event with an Envoy log pattern.
fn render_pattern(pattern: &str, event: &tracing::Event<'_>) -> String {
    use std::fmt::Write as _;
    let meta = event.metadata();
    let mut c = Collect::default();
    event.record(&mut c);
    let msg = format!("{}{}", c.message, c.fields);
    let ts = crate::http::info::format_time(
        std::time::SystemTime::now(),
        Some("%Y-%m-%d %H:%M:%S %6f %9f"),
    );
    let mut parts = ts.split(' ');
    let date = parts.next().unwrap_or("");
    let time = parts.next().unwrap_or("");
    let us = parts.next().unwrap_or("");
    let ns = parts.next().unwrap_or("");
    let level = match *meta.level() {
        tracing::Level::TRACE => "trace",
        tracing::Level::DEBUG => "debug",
        tracing::Level::INFO => "info",
        tracing::Level::WARN => "warning",
        tracing::Level::ERROR => "error",
    };
    let name = meta.target().rsplit("::").next().unwrap_or("weir");
    let file = meta.file().unwrap_or("");
    let line = meta.line().unwrap_or(0);
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(date.get(0..4).unwrap_or("")),
            Some('m') => out.push_str(date.get(5..7).unwrap_or("")),
            Some('d') => out.push_str(date.get(8..10).unwrap_or("")),
            Some('H') => out.push_str(time.get(0..2).unwrap_or("")),
            Some('M') => out.push_str(time.get(3..5).unwrap_or("")),
            Some('S') => out.push_str(time.get(6..8).unwrap_or("")),
            Some('T') => out.push_str(time),
            Some('e') => out.push_str(us.get(0..3).unwrap_or("")),
            Some('f') => out.push_str(us),
            Some('F') => out.push_str(ns),
            Some('z') => out.push_str("+00:00"),
            Some('l') => out.push_str(level),
            Some('L') => out.push_str(&level[..1].to_ascii_uppercase()),
            Some('n') => out.push_str(name),
            Some('v') => out.push_str(&msg),
            Some('j') => {
                let j = serde_json::to_string(&msg).unwrap_or_default();
                out.push_str(j.get(1..j.len().saturating_sub(1)).unwrap_or(""));
            }
            Some('t') => {
                let _ = write!(out, "{}", thread_id());
            }
            Some('P') => {
                let _ = write!(out, "{}", std::process::id());
            }
            Some('g') => out.push_str(file),
            Some('s') => out.push_str(file.rsplit('/').next().unwrap_or(file)),
            Some('#') => {
                let _ = write!(out, "{line}");
            }
            Some('@') => {
                let _ = write!(out, "{file}:{line}");
            }
            Some('!') => out.push_str(meta.target()),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn thread_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! { static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed); }
    ID.with(|i| *i)
}

/// Installs the global subscriber (once). `log_format` is Envoy's
/// `--log-format` pattern; without it weir uses tracing's default layout.
pub fn init(
    log_level: &str,
    components: Option<&str>,
    log_path: Option<&str>,
    log_format: Option<&str>,
) -> Result<(), String> {
    let lvl = level(log_level).map_err(|_| format!("unknown log level {log_level:?}"))?;
    CURRENT.lock().expect("log level lock").0 = lvl.to_owned();
    if let Some(c) = components {
        set_components_inner(c)?;
    }
    let (filter, handle) = reload::Layer::new(build());
    let writer: Box<dyn Fn() -> Box<dyn std::io::Write> + Send + Sync> = match log_path {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("cannot open --log-path {p}: {e}"))?;
            let f = std::sync::Arc::new(Mutex::new(f));
            Box::new(move || Box::new(LockedFile(f.clone())))
        }
        None => Box::new(|| Box::new(std::io::stderr())),
    };
    let ansi = log_path.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let ok = match log_format {
        Some(p) => {
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .event_format(EnvoyFormat {
                    pattern: p.to_owned(),
                });
            tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .try_init()
                .is_ok()
        }
        None => {
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_target(true)
                .with_ansi(ansi);
            tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .try_init()
                .is_ok()
        }
    };
    if ok {
        let _ = HANDLE.set(handle);
    }
    Ok(())
}

struct LockedFile(std::sync::Arc<Mutex<std::fs::File>>);

impl std::io::Write for LockedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .flush()
    }
}

fn reload() {
    if let Some(h) = HANDLE.get() {
        let _ = h.reload(build());
    }
}

/// Records the `-l` level for `/logging` when no subscriber was installed
/// (an in-process server in tests).
pub fn remember_level(l: &str) {
    let mut cur = CURRENT.lock().expect("log level lock");
    if cur.0.is_empty() {
        cur.0 = level(l).unwrap_or("info").to_owned();
    }
}

/// Sets the global level (`/logging?level=debug`).
pub fn set_level(l: &str) -> Result<(), String> {
    let lvl = level(l).map_err(|_| format!("unknown log level {l:?}"))?;
    {
        let mut cur = CURRENT.lock().expect("log level lock");
        cur.0 = lvl.to_owned();
        cur.1.clear();
    }
    reload();
    Ok(())
}

fn set_components_inner(spec: &str) -> Result<(), String> {
    let mut parsed = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (c, l) = part
            .split_once(':')
            .ok_or_else(|| format!("invalid component level {part:?}"))?;
        let l = level(l).map_err(|_| format!("unknown log level {l:?}"))?;
        let name = LOGGERS
            .iter()
            .map(|(n, _)| *n)
            .find(|n| *n == c)
            .ok_or_else(|| format!("unknown logger {c:?}"))?;
        parsed.push((name, l.to_owned()));
    }
    // All or nothing: a bad entry changes no level.
    let mut cur = CURRENT.lock().expect("log level lock");
    for (name, l) in parsed {
        cur.1.retain(|(x, _)| *x != name);
        cur.1.push((name, l));
    }
    Ok(())
}

/// Sets per-logger levels (`logger:level,...`, Envoy's logger names).
pub fn set_components(spec: &str) -> Result<(), String> {
    set_components_inner(spec)?;
    reload();
    Ok(())
}

/// Every logger with its level, one per line as Envoy's `/logging` prints.
pub fn current() -> String {
    let cur = CURRENT.lock().expect("log level lock");
    let mut out = String::new();
    let mut names: Vec<&str> = LOGGERS.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    for name in names {
        let l = cur
            .1
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l.as_str())
            .unwrap_or(cur.0.as_str());
        out.push_str(&format!("  {name}: {}\n", envoy_level(l)));
    }
    out
}
