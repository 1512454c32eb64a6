//! Launchers for proxy processes: real Envoy and the weir binary.
//!
//! Both are started the same way: the bootstrap is written to a temporary
//! file, the binary is spawned with
//! `-c <file> --concurrency 1 -l warning --disable-hot-restart --base-id <n>`
//! and the launcher waits for the admin `/ready` endpoint to answer `200`.
//! The process is killed when the handle is dropped.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::tmp::TempDir;

/// How long a proxy may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The workspace root (the directory holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// Where the Envoy binary is: `$ENVOY_BIN`, else the path recorded in
/// `.tools/envoy-path` by `scripts/install-test-deps.sh`, else `envoy` on
/// `PATH`. The error tells the reader how to install it.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!(
            "ENVOY_BIN={} is not an executable file; unset it or run scripts/install-test-deps.sh",
            p.display()
        );
    }
    let recorded = workspace_root().join(".tools/envoy-path");
    if let Ok(text) = std::fs::read_to_string(&recorded) {
        let p = PathBuf::from(text.trim());
        if is_executable(&p) {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if is_executable(&p) {
                return Ok(p);
            }
        }
    }
    bail!(
        "Envoy not found (checked $ENVOY_BIN, {}, and PATH). \
         Run scripts/install-test-deps.sh to install Envoy 1.40 into .tools/",
        recorded.display()
    )
}

/// The weir binary built next to the running test binary
/// (`target/<profile>/weir`; test binaries live in `target/<profile>/deps/`).
/// `$WEIR_BIN` overrides.
pub fn weir_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEIR_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        candidates.push(dir.join("weir"));
    }
    for c in &candidates {
        if is_executable(c) {
            return Ok(c.clone());
        }
    }
    bail!(
        "weir binary not found next to {} (looked at {:?}). Build it first: cargo build -p weir",
        exe.display(),
        candidates
    )
}

/// A warning when the weir binary is older than the newest source file of
/// the `weir` crate (`proxy/src`): `cargo test -p weir-tests` does not
/// rebuild it.
pub fn weir_binary_staleness() -> Option<String> {
    let bin = weir_binary().ok()?;
    let built = std::fs::metadata(&bin).ok()?.modified().ok()?;
    let src = workspace_root().join("proxy/src");
    let newest = newest_mtime(&src)?;
    (newest > built).then(|| {
        format!(
            "{} is older than the sources in {}; run `cargo build -p weir` to test the current code",
            bin.display(),
            src.display()
        )
    })
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Reads `admin.address.socket_address.port_value` from a bootstrap.
pub fn admin_port(config: &str) -> anyhow::Result<u16> {
    let doc: serde_yaml::Value = serde_yaml::from_str(config).context("bootstrap is not YAML")?;
    let port = doc["admin"]["address"]["socket_address"]["port_value"]
        .as_u64()
        .ok_or_else(|| anyhow!("bootstrap has no admin.address.socket_address.port_value"))?;
    u16::try_from(port).context("admin port out of range")
}

/// Appends the command line every proxy process of the tests and benches
/// gets (weir's is Envoy's): bootstrap file `config`, one worker, warnings
/// only, no hot restart, `base_id` (distinct per concurrent process: Envoy
/// names its shared memory and domain sockets after it).
pub fn proxy_args<'a>(cmd: &'a mut Command, config: &Path, base_id: u32) -> &'a mut Command {
    cmd.arg("-c")
        .arg(config)
        .args([
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--disable-hot-restart",
        ])
        .arg("--base-id")
        .arg(base_id.to_string())
}

/// A running proxy process, killed on drop.
pub struct ProxyProc {
    kind: &'static str,
    child: Child,
    /// Rendered bootstrap, stdout, stderr; removed after the child is
    /// killed (fields drop after [`Drop::drop`]).
    dir: TempDir,
    admin_port: u16,
}

/// Real Envoy.
pub struct EnvoyProc;

/// The weir binary.
pub struct WeirProc;

impl EnvoyProc {
    /// Starts Envoy on `config` (YAML bootstrap) and waits until it is ready.
    pub fn start(config: &str) -> anyhow::Result<ProxyProc> {
        ProxyProc::start("envoy", &envoy_binary()?, config)
    }
}

impl WeirProc {
    /// Starts weir on `config` (YAML bootstrap) and waits until it is ready.
    pub fn start(config: &str) -> anyhow::Result<ProxyProc> {
        ProxyProc::start("weir", &weir_binary()?, config)
    }
}

impl ProxyProc {
    /// Starts `binary` (Envoy-compatible command line) on `config`.
    pub fn start(kind: &'static str, binary: &Path, config: &str) -> anyhow::Result<ProxyProc> {
        ProxyProc::start_with_args(kind, binary, config, &[])
    }

    /// [`ProxyProc::start`] with extra command-line arguments appended.
    pub fn start_with_args(
        kind: &'static str,
        binary: &Path,
        config: &str,
        extra_args: &[String],
    ) -> anyhow::Result<ProxyProc> {
        let admin_port = admin_port(config)?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = TempDir::new(&format!("tests-{kind}")).context("create temp dir")?;
        let cfg = dir.path().join("bootstrap.yaml");
        std::fs::write(&cfg, config).with_context(|| format!("write {}", cfg.display()))?;
        let stderr = std::fs::File::create(dir.path().join("stderr"))?;
        let stdout = std::fs::File::create(dir.path().join("stdout"))?;
        // Unique per process and launch so parallel Envoys never share a
        // base id (shared-memory / domain-socket names).
        let base_id = (std::process::id() % 10_000) * 100 + seq % 100;
        let child = proxy_args(&mut Command::new(binary), &cfg, base_id)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let mut proc = ProxyProc {
            kind,
            child,
            dir,
            admin_port,
        };
        proc.wait_ready(READY_TIMEOUT)?;
        Ok(proc)
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before becoming ready.\n--- stderr ---\n{}",
                    self.kind,
                    tail(&self.stderr(), 8000)
                );
            }
            match admin_get(self.admin_port, "/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("/ready answered {code}: {}", body.trim()),
                Err(e) => last = format!("/ready: {e}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {timeout:?} (last: {last}).\n--- stderr ---\n{}",
                    self.kind,
                    tail(&self.stderr(), 8000)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET` on the admin interface: (status, body).
    pub fn admin(&self, path: &str) -> anyhow::Result<(u16, String)> {
        admin_get(self.admin_port, path)
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Minimal blocking HTTP/1.1 GET against `127.0.0.1:port` (admin interface).
fn admin_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad admin response: {:?}", tail(&text, 200)))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
