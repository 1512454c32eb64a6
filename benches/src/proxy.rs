//! The proxy under test as a child process, for the macro benchmark
//! binaries (`hbone_bench`, `xds_scale`): weir or Envoy started with the
//! same Envoy command line on a bootstrap file, optionally pinned to a CPU.
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use weir_tests::client::{http1_raw, Outcome};
use weir_tests::proc::proxy_args;
use weir_tests::tmp::TempDir;

/// A running proxy (weir or Envoy). Its bootstrap, stdout and stderr live in
/// a temporary directory removed on drop. Dropping it stops the process:
/// `POST /quitquitquit` and SIGTERM first (a proxy under a profiler writes
/// its profile at exit), SIGKILL after 60 s.
pub struct ProxyProcess {
    child: Child,
    /// Dropped after the child is reaped (fields drop after `Drop::drop`).
    dir: TempDir,
    admin: u16,
}

impl ProxyProcess {
    /// Starts `bin` on the bootstrap `config` (whose admin listens on
    /// `admin`) with one worker, pinned to `cpu` (`taskset -c`) when given.
    /// Does not wait: see [`ProxyProcess::wait_ready`]. `kind` names the
    /// temporary directory (`weir`, `envoy`).
    pub fn spawn(
        kind: &str,
        bin: &Path,
        config: &str,
        admin: u16,
        cpu: Option<&str>,
    ) -> anyhow::Result<ProxyProcess> {
        // Removed on drop, also when the start fails half-way.
        let dir = TempDir::new(&format!("bench-{kind}")).context("temp dir")?;
        let cfg = dir.join("bootstrap.yaml");
        std::fs::write(&cfg, config).with_context(|| format!("write {}", cfg.display()))?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpu]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // Distinct per harness process and admin port, so an Envoy of a
        // previous run that is still exiting never shares a base id.
        let base_id = (std::process::id() % 10_000) * 10 + u32::from(admin) % 10;
        let child = proxy_args(&mut cmd, &cfg, base_id)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout"))?)
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(ProxyProcess { child, dir, admin })
    }

    /// The process id (of `taskset`'s exec: the proxy itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin port.
    pub fn admin_port(&self) -> u16 {
        self.admin
    }

    /// An error with the end of stderr when the process has exited.
    pub fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "proxy exited with {status}; stderr tail:\n{}",
                self.stderr_tail()
            );
        }
        Ok(())
    }

    /// The last 20 lines of stderr.
    pub fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `GET path` on the admin interface: (status, body).
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.admin));
        match http1_raw(addr, req.as_bytes(), Duration::from_secs(10)).await {
            Outcome::Response(r) => Ok((r.status, String::from_utf8_lossy(&r.body).into_owned())),
            other => bail!("admin {path}: {other:?}"),
        }
    }

    /// Waits until `/ready` answers 200; an error (with the end of stderr)
    /// when the process exits or `timeout` passes first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.alive()?;
            if let Ok((200, _)) = self.admin_get("/ready").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not ready after {timeout:?}; stderr tail:\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        use std::io::Write;
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.admin)),
            Duration::from_secs(1),
        ) {
            let _ = s.write_all(
                b"POST /quitquitquit HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
