//! `tracing` setup with levels changeable at run time (`-l`,
//! `--component-log-level`, admin `/logging`).
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{filter::EnvFilter, prelude::*, reload, Registry};

type Handle = reload::Handle<EnvFilter, Registry>;

static HANDLE: OnceLock<Handle> = OnceLock::new();
static CURRENT: Mutex<(String, Vec<(String, String)>)> = Mutex::new((String::new(), Vec::new()));

/// Envoy level names to tracing's.
fn level(l: &str) -> Result<&'static str, ()> {
    Ok(match l.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        _ => return Err(()),
    })
}

fn build() -> EnvFilter {
    let cur = CURRENT.lock().expect("log level lock");
    let mut s = cur.0.clone();
    for (c, l) in &cur.1 {
        s.push_str(&format!(",weir::{c}={l}"));
    }
    EnvFilter::try_new(&s).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber (once).
pub fn init(
    log_level: &str,
    components: Option<&str>,
    log_path: Option<&str>,
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
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(true);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
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
    let mut cur = CURRENT.lock().expect("log level lock");
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (c, l) = part
            .split_once(':')
            .ok_or_else(|| format!("invalid component level {part:?}"))?;
        let l = level(l).map_err(|_| format!("unknown log level {l:?}"))?;
        if !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            return Err(format!("invalid component {c:?}"));
        }
        cur.1.retain(|(x, _)| x != c);
        cur.1.push((c.to_owned(), l.to_owned()));
    }
    Ok(())
}

/// Sets per-component levels (`component:level,...`).
pub fn set_components(spec: &str) -> Result<(), String> {
    set_components_inner(spec)?;
    reload();
    Ok(())
}

/// The current filter, for `/logging` output.
pub fn current() -> String {
    build().to_string()
}
