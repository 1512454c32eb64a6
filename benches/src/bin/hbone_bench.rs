//! HBONE through the ambient waypoint, weir against Envoy on the same
//! bootstrap: single-stream throughput, tunnelled requests per second, new
//! tunnels per second, memory per idle tunnel. See benches/README.md ("HBONE
//! and the waypoint (issue 6)") and `benches/hbone.sh`.
//!
//! ```text
//! hbone_bench --weir PATH [--envoy PATH] [--runs 3] [--mib 1024]
//!             [--seconds 10] [--conns 4] [--streams 16] [--requests 40000]
//!             [--new-tunnels 4000] [--tunnels 100,1000] [--tunnel-conns 10]
//!             [--phases throughput,terminate,rps,new,memory] [--proxy-cpu 1]
//!             [--buffer-limit BYTES]
//! ```
//!
//! The bootstrap is `weir_tests::waypoint::bootstrap` (istiod's waypoint:
//! `connect_terminate` -> `main_internal` -> `inbound-vip|…` ->
//! `connect_originate` -> ORIGINAL_DST over mTLS to the destination's HBONE
//! server), without access logs, plus one listener `terminate_only`
//! (the same `connect_terminate` HTTP connection manager and TLS, its
//! CONNECT route to a plain TCP cluster: HBONE termination with no internal
//! hop). `--buffer-limit` sets `per_connection_buffer_limit_bytes` on every
//! listener and cluster (default: unset, 1 MiB). Each proxy process runs
//! with `--concurrency 1`, optionally pinned to `--proxy-cpu`; its CPU time
//! is utime + stime from `/proc/PID/stat`.
//!
//! Everything else runs in this process on one thread: the HBONE client
//! (the test library's: rustls TLS 1.3, h2, workload certificate), the
//! destination's HBONE server (`weir_tests::hbone_server`, forward mode,
//! h2 over TLS 1.3) and the apps. The harness does about as much
//! cryptography as the proxy (it encrypts and decrypts both ends), so
//! throughput can be bounded by the harness's core, not the proxy's; the
//! proxy's CPU per GB is the figure that does not depend on that.
//!
//! Phases, each on the same process per run, runs alternating weir, Envoy,
//! weir, ...:
//!
//! - `throughput`: one CONNECT to the TCP VIP through the whole waypoint;
//!   upload `--mib` MiB (the app verifies the pattern and answers the
//!   count), then on a second CONNECT download `--mib` MiB (verified by the
//!   client). Each direction stops at `--seconds`; GB/s = bytes / time.
//! - `terminate`: the same through `terminate_only`.
//! - `rps`: `--conns` HBONE connections x `--streams` CONNECT tunnels to
//!   the HTTP VIP (the `inbound-vip|…|http|…` chain: HCM, fault, cors,
//!   router), each an HTTP/1.1 keep-alive conversation with the app;
//!   `--requests` requests in all after 10 per tunnel of warm-up.
//! - `new`: `--new-tunnels` tunnels, one request each (CONNECT, GET,
//!   response, END_STREAM, the proxy's end), `--conns` x `--streams` at a
//!   time.
//! - `memory` (a fresh process): VmRSS idle (after one tunnel opened and
//!   closed, 2 s settle), then with each count of `--tunnels` open idle
//!   tunnels to the TCP VIP (one byte echoed through each, so every hop is
//!   established) over `--tunnel-conns` HBONE connections, 2 s settle.
//!
//! Every wait is bounded (30 s per request or transfer step, 120 s per
//! phase). A failure fails that cell of that run, reported with the
//! proxy's stderr tail.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_tests::config::{cluster, sock};
use weir_tests::hbone::{H2Conn, H2Tunnel};
use weir_tests::hbone_server::HboneServer;
use weir_tests::scenario::Ports;
use weir_tests::tcp::{check_pattern, fill_pattern};
use weir_tests::waypoint::{self, Apps, Mesh, HTTP_VIP, TCP_VIP};

/// Upper bound of one step (a request, a read).
const STEP: Duration = Duration::from_secs(30);
/// Upper bound of a phase.
const PHASE: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Settling time before an RSS sample.
const SETTLE: Duration = Duration::from_secs(2);

/// The TCP app's commands (first byte of a tunnel; not text, so
/// `http_inspector` decides "not HTTP" at once).
const CMD_UPLOAD: u8 = 1;
const CMD_DOWNLOAD: u8 = 2;
const CMD_ECHO: u8 = 3;

const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nhost: details.default.svc.cluster.local\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";

#[derive(Debug, Clone)]
struct Opts {
    weir: Option<PathBuf>,
    envoy: Option<PathBuf>,
    runs: usize,
    mib: u64,
    seconds: u64,
    conns: usize,
    streams: usize,
    requests: usize,
    new_tunnels: usize,
    tunnels: Vec<usize>,
    tunnel_conns: usize,
    phases: Vec<String>,
    proxy_cpu: Option<String>,
    /// `per_connection_buffer_limit_bytes` on every listener and cluster
    /// (unset: the default, 1 MiB).
    buffer_limit: Option<u32>,
}

const ALL_PHASES: [&str; 5] = ["throughput", "terminate", "rps", "new", "memory"];

fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_all(&opts))
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        weir: None,
        envoy: None,
        runs: 3,
        mib: 1024,
        seconds: 10,
        conns: 4,
        streams: 16,
        requests: 40_000,
        new_tunnels: 4_000,
        tunnels: vec![100, 1000],
        tunnel_conns: 10,
        phases: ALL_PHASES.iter().map(|s| (*s).to_owned()).collect(),
        proxy_cpu: None,
        buffer_limit: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--weir" => o.weir = Some(PathBuf::from(val()?)),
            "--envoy" => o.envoy = Some(PathBuf::from(val()?)),
            "--runs" => o.runs = val()?.parse()?,
            "--mib" => o.mib = val()?.parse()?,
            "--seconds" => o.seconds = val()?.parse()?,
            "--conns" => o.conns = val()?.parse()?,
            "--streams" => o.streams = val()?.parse()?,
            "--requests" => o.requests = val()?.parse()?,
            "--new-tunnels" => o.new_tunnels = val()?.parse()?,
            "--tunnel-conns" => o.tunnel_conns = val()?.parse()?,
            "--proxy-cpu" => o.proxy_cpu = Some(val()?),
            "--buffer-limit" => o.buffer_limit = Some(val()?.parse()?),
            "--tunnels" => {
                o.tunnels = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| anyhow!("{s:?}: {e}")))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--phases" => {
                o.phases = val()?.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(p) = o.phases.iter().find(|p| !ALL_PHASES.contains(&p.as_str())) {
                    bail!("unknown phase {p:?} ({})", ALL_PHASES.join(", "));
                }
            }
            "-h" | "--help" => {
                println!(
                    "hbone_bench --weir PATH [--envoy PATH] [--runs 3] [--mib 1024] \
                     [--seconds 10] [--conns 4] [--streams 16] [--requests 40000] \
                     [--new-tunnels 4000] [--tunnels 100,1000] [--tunnel-conns 10] \
                     [--phases {}] [--proxy-cpu CPU] [--buffer-limit BYTES]",
                    ALL_PHASES.join(",")
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a:?} (see --help)"),
        }
    }
    if o.weir.is_none() && o.envoy.is_none() {
        bail!("give --weir and/or --envoy");
    }
    if o.runs == 0 || o.mib == 0 || o.seconds == 0 || o.conns == 0 || o.streams == 0 {
        bail!("--runs, --mib, --seconds, --conns and --streams must be non-zero");
    }
    // connect_terminate allows 100 streams per HBONE connection.
    if o.streams > 100 {
        bail!("--streams above 100 (connect_terminate's max_concurrent_streams)");
    }
    if o.tunnel_conns == 0
        || o.tunnels
            .iter()
            .any(|&k| k == 0 || k > o.tunnel_conns * 100)
    {
        bail!("--tunnels must be 1..=100 x --tunnel-conns each");
    }
    if !o.tunnels.windows(2).all(|w| w[0] < w[1]) {
        bail!("--tunnels must be increasing");
    }
    o.requests = o.requests.max(o.conns * o.streams);
    Ok(o)
}

fn has(o: &Opts, phase: &str) -> bool {
    o.phases.iter().any(|p| p == phase)
}

// === results ===

/// One direction of one transfer.
#[derive(Debug, Clone, Copy, Default)]
struct Transfer {
    bytes: u64,
    wall: Duration,
    cpu: Duration,
    other: f64,
}

impl Transfer {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.wall.as_secs_f64().max(1e-9) / 1e9
    }
    fn cpu_per_gb(&self) -> f64 {
        self.cpu.as_secs_f64() / (self.bytes as f64 / 1e9).max(1e-9)
    }
}

#[derive(Debug, Clone, Default)]
struct Requests {
    count: usize,
    wall: Duration,
    cpu: Duration,
    p50: Duration,
    p99: Duration,
    other: f64,
}

impl Requests {
    fn rps(&self) -> f64 {
        self.count as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.count.max(1) as f64)
    }
}

#[derive(Debug, Clone, Default)]
struct Memory {
    idle_kib: u64,
    /// (K, VmRSS KiB with K tunnels open, HBONE connections to the
    /// destination then).
    with: Vec<(usize, u64, usize)>,
}

/// One measurement of one run: not run, done, or failed.
type Cell<T> = Option<anyhow::Result<T>>;
/// Where a run keeps one measurement.
type Get<T> = fn(&Run) -> &Cell<T>;

#[derive(Debug, Default)]
struct Run {
    up: Option<anyhow::Result<Transfer>>,
    down: Option<anyhow::Result<Transfer>>,
    term_up: Option<anyhow::Result<Transfer>>,
    term_down: Option<anyhow::Result<Transfer>>,
    rps: Option<anyhow::Result<Requests>>,
    new: Option<anyhow::Result<Requests>>,
    memory: Option<anyhow::Result<Memory>>,
}

// === the world ===

/// What the proxies talk to, shared by every run.
struct World {
    buffer_limit: Option<u32>,
    mesh: Mesh,
    hbone: HboneServer,
    http_port: u16,
    tcp_port: u16,
}

async fn run_all(o: &Opts) -> anyhow::Result<()> {
    let mesh = Mesh::new();
    let hbone = mesh.hbone_server().await;
    let http_port = http_app().await?;
    let tcp_port = tcp_app().await?;
    let world = World {
        buffer_limit: o.buffer_limit,
        mesh,
        hbone,
        http_port,
        tcp_port,
    };
    let mut proxies: Vec<(&str, &Path)> = Vec::new();
    if let Some(w) = &o.weir {
        proxies.push(("weir", w));
    }
    if let Some(e) = &o.envoy {
        proxies.push(("envoy", e));
    }
    println!("# load average at start: {}", loadavg());
    println!("# {o:?}");
    let mut results: Vec<Vec<Run>> = proxies.iter().map(|_| Vec::new()).collect();
    for round in 0..o.runs {
        for (i, (kind, bin)) in proxies.iter().enumerate() {
            let mut run = Run::default();
            let started = Instant::now();
            if ["throughput", "terminate", "rps", "new"]
                .iter()
                .any(|p| has(o, p))
            {
                match Proc::start(kind, bin, &world, o.proxy_cpu.as_deref()).await {
                    Ok(mut p) => traffic(o, &world, &mut p, &mut run).await,
                    Err(e) => run.rps = Some(Err(e)),
                }
            }
            if has(o, "memory") {
                run.memory = Some(
                    match Proc::start(kind, bin, &world, o.proxy_cpu.as_deref()).await {
                        Ok(mut p) => bounded(memory(o, &world, &mut p)).await,
                        Err(e) => Err(e),
                    },
                );
            }
            println!(
                "## run {} {kind} ({:.1} s, load average {})",
                round + 1,
                started.elapsed().as_secs_f64(),
                loadavg()
            );
            print!("{}", describe_run(&run));
            results[i].push(run);
        }
    }
    println!("# load average at end: {}", loadavg());
    println!();
    print!("{}", summary(o, &proxies, &results));
    Ok(())
}

async fn bounded<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(PHASE, f)
        .await
        .map_err(|_| anyhow!("phase took over {PHASE:?}"))?
}

async fn traffic(o: &Opts, w: &World, p: &mut Proc, run: &mut Run) {
    let limit = Duration::from_secs(o.seconds);
    let bytes = o.mib << 20;
    if has(o, "throughput") {
        run.up = Some(bounded(upload(w, p, p.waypoint, TCP_VIP, bytes, limit)).await);
        run.down = Some(bounded(download(w, p, p.waypoint, TCP_VIP, bytes, limit)).await);
    }
    if has(o, "terminate") {
        // The authority only travels in filter state here: the route goes
        // straight to the TCP app's cluster.
        run.term_up = Some(bounded(upload(w, p, p.terminate, TCP_VIP, bytes, limit)).await);
        run.term_down = Some(bounded(download(w, p, p.terminate, TCP_VIP, bytes, limit)).await);
    }
    if has(o, "rps") {
        run.rps = Some(bounded(keepalive_requests(o, w, p)).await);
    }
    if has(o, "new") {
        run.new = Some(bounded(new_tunnels(o, w, p)).await);
    }
    // A crash shows as failures above; say why.
    if let Err(e) = p.proxy.alive() {
        run.rps = Some(Err(e));
    }
}

// === the apps ===

/// A minimal HTTP/1.1 app: every request (no body) gets `RESPONSE`,
/// keep-alive, pipelining-safe.
async fn http_app() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut answers = 0;
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        answers += 1;
                    }
                    if buf.len() > 64 << 10 {
                        return;
                    }
                    for _ in 0..answers {
                        if s.write_all(RESPONSE).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(port)
}

/// The TCP app: by the first byte, a verifying sink that answers the count
/// (8 bytes, little-endian) at EOF, a pattern source of the length in the
/// next 8 bytes (it ends its side after the client's end), or an echo.
async fn tcp_app() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve_tcp(s).await;
            });
        }
    });
    Ok(port)
}

async fn serve_tcp(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    match s.read_u8().await? {
        CMD_UPLOAD => {
            let mut off = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if let Err(at) = check_pattern(off, &buf[..n]) {
                    return Err(std::io::Error::other(format!("pattern mismatch at {at}")));
                }
                off += n as u64;
            }
            s.write_all(&off.to_le_bytes()).await?;
            s.shutdown().await
        }
        CMD_DOWNLOAD => {
            let len = s.read_u64_le().await?;
            let mut off = 0u64;
            while off < len {
                let n = buf.len().min((len - off) as usize);
                fill_pattern(off, &mut buf[..n]);
                s.write_all(&buf[..n]).await?;
                off += n as u64;
            }
            // The client ends first: a proxy may reset a CONNECT stream
            // whose upstream ended before the client did (Envoy resets
            // it, sometimes before the last bytes went out).
            while s.read(&mut buf).await? > 0 {}
            s.shutdown().await
        }
        CMD_ECHO => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        c => Err(std::io::Error::other(format!("unknown command {c}"))),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// === throughput ===

async fn open(w: &World, addr: SocketAddr) -> anyhow::Result<H2Conn> {
    let (c, _) = w
        .mesh
        .client()
        .connect(addr)
        .await
        .context("HBONE connection")?;
    Ok(c)
}

async fn tunnel(c: &H2Conn, authority: &str) -> anyhow::Result<H2Tunnel> {
    let o = c.connect(authority, &[]).await.context("CONNECT")?;
    if o.status != 200 {
        bail!("CONNECT {authority} answered {}", o.status);
    }
    Ok(o.stream)
}

/// Writes `bytes` of the pattern (stopping at `limit`), half-closes, and
/// waits for the app's count.
async fn upload(
    w: &World,
    p: &Proc,
    addr: SocketAddr,
    authority: &str,
    bytes: u64,
    limit: Duration,
) -> anyhow::Result<Transfer> {
    let c = open(w, addr).await?;
    let mut t = tunnel(&c, authority).await?;
    t.write_all(&[CMD_UPLOAD]).await?;
    let mut buf = vec![0u8; 256 << 10];
    let (cpu0, other) = (
        proc_cpu(p.proxy.pid())?,
        OtherLoad::start(Some(p.proxy.pid()))?,
    );
    let start = Instant::now();
    let mut off = 0u64;
    while off < bytes && start.elapsed() < limit {
        let n = buf.len().min((bytes - off) as usize);
        fill_pattern(off, &mut buf[..n]);
        tokio::time::timeout(STEP, t.write_all(&buf[..n]))
            .await
            .context("write stalled")??;
        off += n as u64;
    }
    t.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(STEP, t.read_exact(&mut count))
        .await
        .context("no count from the app")?
        .context("reading the app's count")?;
    let wall = start.elapsed();
    let cpu = proc_cpu(p.proxy.pid())?.saturating_sub(cpu0);
    let got = u64::from_le_bytes(count);
    if got != off {
        bail!("the app verified {got} of {off} bytes");
    }
    Ok(Transfer {
        bytes: off,
        wall,
        cpu,
        other: other.cpus(Some(p.proxy.pid()))?,
    })
}

/// Asks the app for `bytes` of the pattern and reads (verifying) until EOF
/// or `limit`.
async fn download(
    w: &World,
    p: &Proc,
    addr: SocketAddr,
    authority: &str,
    bytes: u64,
    limit: Duration,
) -> anyhow::Result<Transfer> {
    let c = open(w, addr).await?;
    let mut t = tunnel(&c, authority).await?;
    let mut cmd = vec![CMD_DOWNLOAD];
    cmd.extend_from_slice(&bytes.to_le_bytes());
    let mut buf = vec![0u8; 256 << 10];
    let (cpu0, other) = (
        proc_cpu(p.proxy.pid())?,
        OtherLoad::start(Some(p.proxy.pid()))?,
    );
    let start = Instant::now();
    t.write_all(&cmd).await?;
    let mut off = 0u64;
    while off < bytes && start.elapsed() < limit {
        let n = tokio::time::timeout(STEP, t.read(&mut buf))
            .await
            .context("read stalled")?
            .with_context(|| format!("after {off} of {bytes} bytes"))?;
        if n == 0 {
            bail!("EOF after {off} of {bytes} bytes");
        }
        if let Err(at) = check_pattern(off, &buf[..n]) {
            bail!("pattern mismatch at byte {at}");
        }
        off += n as u64;
    }
    let wall = start.elapsed();
    let cpu = proc_cpu(p.proxy.pid())?.saturating_sub(cpu0);
    let other = other.cpus(Some(p.proxy.pid()))?;
    if off == bytes {
        t.shutdown()
            .await
            .context("END_STREAM after the download")?;
        let rest = tokio::time::timeout(STEP, t.read_all(1 << 20))
            .await
            .context("no end after the download")?
            .context("the end after the download")?;
        if !rest.is_empty() {
            bail!("{} bytes past the end", rest.len());
        }
    } else {
        t.reset();
    }
    Ok(Transfer {
        bytes: off,
        wall,
        cpu,
        other,
    })
}

// === requests ===

/// One request on a keep-alive tunnel; `buf` keeps bytes past the response.
async fn request(t: &mut H2Tunnel, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    t.write_all(REQUEST).await?;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = &buf[..end];
            if !head.starts_with(b"HTTP/1.1 200 ") {
                bail!("response {:?}", String::from_utf8_lossy(head));
            }
            let len = content_length(head).ok_or_else(|| anyhow!("no content-length"))?;
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Ok(());
            }
        }
        if buf.len() > 64 << 10 {
            bail!("response too long");
        }
        let n = tokio::time::timeout(STEP, t.read(&mut chunk))
            .await
            .context("no response in time")??;
        if n == 0 {
            bail!("EOF before a response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

async fn connections(w: &World, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<H2Conn>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(open(w, addr).await?);
    }
    Ok(v)
}

/// `--conns` x `--streams` keep-alive tunnels, `--requests` requests.
async fn keepalive_requests(o: &Opts, w: &World, p: &Proc) -> anyhow::Result<Requests> {
    let conns = connections(w, p.waypoint, o.conns).await?;
    let n = o.conns * o.streams;
    let mut tunnels = Vec::with_capacity(n);
    for i in 0..n {
        let mut t = tunnel(&conns[i % o.conns], HTTP_VIP).await?;
        let mut buf = Vec::new();
        for _ in 0..10 {
            request(&mut t, &mut buf).await.context("warm-up")?;
        }
        tunnels.push((t, buf));
    }
    let per = o.requests / n;
    let (cpu0, other) = (
        proc_cpu(p.proxy.pid())?,
        OtherLoad::start(Some(p.proxy.pid()))?,
    );
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (mut t, mut buf) in tunnels {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t0 = Instant::now();
                request(&mut t, &mut buf).await?;
                lat.push(t0.elapsed());
            }
            t.shutdown().await?;
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::with_capacity(per * n);
    for t in tasks {
        lat.extend(t.await??);
    }
    let wall = start.elapsed();
    let cpu = proc_cpu(p.proxy.pid())?.saturating_sub(cpu0);
    Ok(Requests {
        count: lat.len(),
        wall,
        cpu,
        p50: pct(&mut lat, 50),
        p99: pct(&mut lat, 99),
        other: other.cpus(Some(p.proxy.pid()))?,
    })
}

/// `--new-tunnels` tunnels of one request each, `--conns` x `--streams` at
/// a time; latency from the CONNECT to the response.
async fn new_tunnels(o: &Opts, w: &World, p: &Proc) -> anyhow::Result<Requests> {
    let conns = connections(w, p.waypoint, o.conns).await?;
    let conns: Vec<std::sync::Arc<H2Conn>> = conns.into_iter().map(std::sync::Arc::new).collect();
    let workers = o.conns * o.streams;
    let per = (o.new_tunnels / workers).max(1);
    // Warm-up: one per worker.
    one_shot_round(&conns, workers, 1)
        .await
        .context("warm-up")?;
    let (cpu0, other) = (
        proc_cpu(p.proxy.pid())?,
        OtherLoad::start(Some(p.proxy.pid()))?,
    );
    let start = Instant::now();
    let mut lat = one_shot_round(&conns, workers, per).await?;
    let wall = start.elapsed();
    let cpu = proc_cpu(p.proxy.pid())?.saturating_sub(cpu0);
    Ok(Requests {
        count: lat.len(),
        wall,
        cpu,
        p50: pct(&mut lat, 50),
        p99: pct(&mut lat, 99),
        other: other.cpus(Some(p.proxy.pid()))?,
    })
}

async fn one_shot_round(
    conns: &[std::sync::Arc<H2Conn>],
    workers: usize,
    per: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut tasks = Vec::with_capacity(workers);
    for i in 0..workers {
        let c = conns[i % conns.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t0 = Instant::now();
                let mut t = tunnel(&c, HTTP_VIP).await?;
                let mut buf = Vec::new();
                request(&mut t, &mut buf).await?;
                lat.push(t0.elapsed());
                t.shutdown().await?;
                // The proxy ends the tunnel once the client has.
                tokio::time::timeout(STEP, t.read_all(1 << 16))
                    .await
                    .context("the tunnel did not end")??;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::with_capacity(workers * per);
    for t in tasks {
        lat.extend(t.await??);
    }
    Ok(lat)
}

// === memory ===

async fn memory(o: &Opts, w: &World, p: &mut Proc) -> anyhow::Result<Memory> {
    let hbone0 = w.hbone.tls_connections();
    // One tunnel opened and closed: TLS contexts, pools, the HBONE
    // connection to the destination exist.
    {
        let c = open(w, p.waypoint).await?;
        let mut t = tunnel(&c, TCP_VIP).await?;
        echo_once(&mut t).await?;
        t.shutdown().await?;
        tokio::time::timeout(STEP, t.read_all(1 << 16))
            .await
            .context("warm-up tunnel did not end")??;
    }
    tokio::time::sleep(SETTLE).await;
    let idle_kib = proc_status(p.proxy.pid(), "VmRSS")?;
    let conns = connections(w, p.waypoint, o.tunnel_conns).await?;
    let mut open_tunnels: Vec<H2Tunnel> = Vec::new();
    let mut m = Memory {
        idle_kib,
        with: Vec::new(),
    };
    for &k in &o.tunnels {
        while open_tunnels.len() < k {
            let i = open_tunnels.len();
            let mut t = tunnel(&conns[i % conns.len()], TCP_VIP)
                .await
                .with_context(|| format!("tunnel {i}"))?;
            echo_once(&mut t)
                .await
                .with_context(|| format!("tunnel {i}"))?;
            open_tunnels.push(t);
        }
        tokio::time::sleep(SETTLE).await;
        p.proxy.alive()?;
        let rss = proc_status(p.proxy.pid(), "VmRSS")?;
        m.with
            .push((k, rss, w.hbone.tls_connections().saturating_sub(hbone0)));
    }
    drop(open_tunnels);
    Ok(m)
}

async fn echo_once(t: &mut H2Tunnel) -> anyhow::Result<()> {
    t.write_all(&[CMD_ECHO, b'x']).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(STEP, t.read_exact(&mut b))
        .await
        .context("no echo")??;
    if b[0] != b'x' {
        bail!("echoed {:?}", b[0]);
    }
    Ok(())
}

// === the proxy ===

/// The proxy under test with the waypoint's two listeners.
struct Proc {
    proxy: ProxyProcess,
    waypoint: SocketAddr,
    terminate: SocketAddr,
}

/// The waypoint bootstrap, no access logs, plus `terminate_only`.
fn config(w: &World, ports: &Ports, terminate_port: u16) -> Value {
    let apps = Apps {
        http_port: w.http_port,
        tcp_port: w.tcp_port,
        hbone_port: w.hbone.port(),
        main_log: None,
        terminate_log: None,
        originate_log: None,
    };
    let mut b = waypoint::bootstrap(&w.mesh, &apps, ports);
    let mut term = waypoint::connect_terminate_to(terminate_port, "tcp_app", &None);
    term["name"] = json!("terminate_only");
    term["address"] = sock(terminate_port);
    if let Some(l) = b["static_resources"]["listeners"].as_array_mut() {
        l.push(term);
    }
    if let Some(c) = b["static_resources"]["clusters"].as_array_mut() {
        c.push(cluster("tcp_app", &[w.tcp_port], json!({})));
    }
    if let Some(limit) = w.buffer_limit {
        for kind in ["listeners", "clusters"] {
            for r in b["static_resources"][kind]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                r["per_connection_buffer_limit_bytes"] = json!(limit);
            }
        }
    }
    b
}

impl Proc {
    async fn start(kind: &str, bin: &Path, w: &World, cpu: Option<&str>) -> anyhow::Result<Proc> {
        let ports = Ports {
            listen: weir_tests::free_port(),
            listen2: 0,
            admin: weir_tests::free_port(),
        };
        let terminate_port = weir_tests::free_port();
        let config = config(w, &ports, terminate_port).to_string();
        let mut proxy = ProxyProcess::spawn(kind, bin, &config, ports.admin, cpu)?;
        proxy.wait_ready(READY_TIMEOUT).await?;
        let ip = std::net::Ipv4Addr::LOCALHOST;
        Ok(Proc {
            proxy,
            waypoint: SocketAddr::from((ip, ports.listen)),
            terminate: SocketAddr::from((ip, terminate_port)),
        })
    }
}

// === /proc ===

use weir_benches::procfs::{machine_cpu, proc_cpu, proc_status};
use weir_benches::proxy::ProxyProcess;

/// CPUs used by everything but this harness and the proxy between two
/// samples (2.0 = both cores of a 2-CPU machine).
struct OtherLoad {
    machine: u64,
    own: Duration,
    at: Instant,
}

impl OtherLoad {
    fn start(proxy: Option<u32>) -> anyhow::Result<OtherLoad> {
        Ok(OtherLoad {
            machine: machine_cpu()?.0,
            own: own_cpu(proxy)?,
            at: Instant::now(),
        })
    }

    fn cpus(&self, proxy: Option<u32>) -> anyhow::Result<f64> {
        let busy = Duration::from_millis(machine_cpu()?.0.saturating_sub(self.machine) * 10);
        let own = own_cpu(proxy)?.saturating_sub(self.own);
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        Ok(busy.saturating_sub(own).as_secs_f64() / wall)
    }
}

fn own_cpu(proxy: Option<u32>) -> anyhow::Result<Duration> {
    let mut d = proc_cpu(std::process::id())?;
    if let Some(pid) = proxy {
        d += proc_cpu(pid)?;
    }
    Ok(d)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// === formatting ===

fn pct(v: &mut [Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let idx = ((v.len() * p).div_ceil(100)).clamp(1, v.len()) - 1;
    v[idx]
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn describe_transfer(name: &str, r: &Option<anyhow::Result<Transfer>>) -> String {
    match r {
        None => String::new(),
        Some(Ok(t)) => format!(
            "  {name}: {:.0} MiB in {:.2} s = {:.3} GB/s, proxy CPU {:.2} s = {:.2} s/GB, other CPUs {:.2}\n",
            t.bytes as f64 / 1048576.0,
            t.wall.as_secs_f64(),
            t.gbps(),
            t.cpu.as_secs_f64(),
            t.cpu_per_gb(),
            t.other
        ),
        Some(Err(e)) => format!("  {name}: FAILED: {e:#}\n"),
    }
}

fn describe_requests(name: &str, r: &Option<anyhow::Result<Requests>>) -> String {
    match r {
        None => String::new(),
        Some(Ok(q)) => format!(
            "  {name}: {} requests in {:.2} s = {:.0} rps, proxy CPU {:.2} s = {:.1} µs/req, p50 {:.3} ms, p99 {:.3} ms, other CPUs {:.2}\n",
            q.count,
            q.wall.as_secs_f64(),
            q.rps(),
            q.cpu.as_secs_f64(),
            q.cpu_us(),
            q.p50.as_secs_f64() * 1e3,
            q.p99.as_secs_f64() * 1e3,
            q.other
        ),
        Some(Err(e)) => format!("  {name}: FAILED: {e:#}\n"),
    }
}

fn describe_run(r: &Run) -> String {
    let mut s = String::new();
    s += &describe_transfer("waypoint upload", &r.up);
    s += &describe_transfer("waypoint download", &r.down);
    s += &describe_transfer("terminate-only upload", &r.term_up);
    s += &describe_transfer("terminate-only download", &r.term_down);
    s += &describe_requests("keep-alive requests", &r.rps);
    s += &describe_requests("new tunnels", &r.new);
    match &r.memory {
        None => {}
        Some(Ok(m)) => {
            s += &format!("  memory: idle VmRSS {} KiB", m.idle_kib);
            for (k, rss, hb) in &m.with {
                s += &format!(
                    "; {k} tunnels {rss} KiB ({:.1} KiB/tunnel, {hb} HBONE conns to the destination)",
                    per_tunnel(m.idle_kib, *rss, *k)
                );
            }
            s += "\n";
        }
        Some(Err(e)) => s += &format!("  memory: FAILED: {e:#}\n"),
    }
    s
}

fn per_tunnel(idle: u64, with: u64, k: usize) -> f64 {
    (with as f64 - idle as f64) / k as f64
}

/// One metric of every run of a proxy.
fn column<T>(
    runs: &[Run],
    get: impl Fn(&Run) -> &Option<anyhow::Result<T>>,
    f: impl Fn(&T) -> f64,
) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| match get(r) {
            Some(Ok(v)) => Some(f(v)),
            _ => None,
        })
        .collect()
}

fn summary(o: &Opts, proxies: &[(&str, &Path)], results: &[Vec<Run>]) -> String {
    type Metric = (String, Box<dyn Fn(&[Run]) -> Vec<f64>>);
    let mut metrics: Vec<Metric> = Vec::new();
    let transfers: [(&str, Get<Transfer>); 4] = [
        ("waypoint upload", |r| &r.up),
        ("waypoint download", |r| &r.down),
        ("terminate-only upload", |r| &r.term_up),
        ("terminate-only download", |r| &r.term_down),
    ];
    for (name, get) in transfers {
        metrics.push((
            format!("{name} GB/s"),
            Box::new(move |runs| column(runs, get, Transfer::gbps)),
        ));
        metrics.push((
            format!("{name} proxy CPU s/GB"),
            Box::new(move |runs| column(runs, get, Transfer::cpu_per_gb)),
        ));
    }
    let requests: [(&str, Get<Requests>); 2] =
        [("keep-alive", |r| &r.rps), ("new tunnel", |r| &r.new)];
    for (name, get) in requests {
        metrics.push((
            format!("{name} requests/s"),
            Box::new(move |runs| column(runs, get, Requests::rps)),
        ));
        metrics.push((
            format!("{name} proxy CPU µs/req"),
            Box::new(move |runs| column(runs, get, Requests::cpu_us)),
        ));
        metrics.push((
            format!("{name} p50 ms"),
            Box::new(move |runs| column(runs, get, |q: &Requests| q.p50.as_secs_f64() * 1e3)),
        ));
        metrics.push((
            format!("{name} p99 ms"),
            Box::new(move |runs| column(runs, get, |q: &Requests| q.p99.as_secs_f64() * 1e3)),
        ));
    }
    metrics.push((
        "idle VmRSS MiB".to_owned(),
        Box::new(|runs| column(runs, |r| &r.memory, |m: &Memory| m.idle_kib as f64 / 1024.0)),
    ));
    for (i, &k) in o.tunnels.iter().enumerate() {
        metrics.push((
            format!("KiB per tunnel, {k} open"),
            Box::new(move |runs| {
                column(
                    runs,
                    |r| &r.memory,
                    |m: &Memory| {
                        m.with
                            .get(i)
                            .map(|(k, rss, _)| per_tunnel(m.idle_kib, *rss, *k))
                            .unwrap_or(f64::NAN)
                    },
                )
            }),
        ));
    }
    let mut s = String::new();
    s += &format!(
        "Medians of {} runs (each value's runs in brackets); ratio = weir / Envoy.\n\n",
        o.runs
    );
    s += "| metric |";
    for (kind, _) in proxies {
        s += &format!(" {kind} |");
    }
    let ratio = proxies.len() == 2;
    if ratio {
        s += " weir / Envoy |";
    }
    s += "\n|---|";
    for _ in proxies {
        s += "---|";
    }
    if ratio {
        s += "---|";
    }
    s += "\n";
    for (name, f) in &metrics {
        let cols: Vec<Vec<f64>> = results.iter().map(|runs| f(runs)).collect();
        if cols.iter().all(Vec::is_empty) {
            continue;
        }
        s += &format!("| {name} |");
        let meds: Vec<Option<f64>> = cols.iter().map(|c| median(c.clone())).collect();
        for (c, m) in cols.iter().zip(&meds) {
            match m {
                Some(m) => {
                    let all: Vec<String> = c.iter().map(|v| fmt(*v)).collect();
                    s += &format!(" {} ({}) |", fmt(*m), all.join("/"));
                }
                None => s += " failed |",
            }
        }
        if ratio {
            match (meds[0], meds[1]) {
                (Some(a), Some(b)) if b != 0.0 => s += &format!(" {:.2} |", a / b),
                _ => s += " - |",
            }
        }
        s += "\n";
    }
    s
}

fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
