//! xDS at scale: how long weir and Envoy take to apply a large snapshot from
//! the same in-process control plane, how much memory they hold afterwards,
//! and how fast a one-cluster EDS update applies. See benches/README.md
//! ("xDS scale") and `benches/xds_scale.sh`.
//!
//! ```text
//! xds_scale --weir PATH [--envoy PATH] [--runs 3] [--eds-updates 20]
//!           [--apis delta,sotw] [--clusters 5000] [--vhosts 500]
//!           [--endpoints 10] [--proxy-cpu 1] [--late-rss 35]
//!           [--transport tcp|unix] [--quiet 0.3] [--quiet-timeout 600]
//! ```
//!
//! Runs alternate between the proxies (weir, Envoy, weir, ...) so drifts in
//! machine load hit both. `--quiet C` first waits (at most
//! `--quiet-timeout` s) until the rest of the machine has used under C CPUs
//! for 3 s; every run also reports how many CPUs other processes used while
//! it applied the snapshot and during its EDS updates (`/proc/stat` minus
//! the harness and the proxy).
//!
//! One run = one fresh control plane and one fresh proxy process
//! (`--concurrency 1`) started on a bootstrap with ADS only, idle with an
//! empty configuration (the control plane answers the wildcard LDS/CDS
//! subscriptions with empty sets, so the proxy goes LIVE). Then:
//!
//! 1. The snapshot is stored: `--clusters` EDS clusters `c{i}`, one
//!    ClusterLoadAssignment each with `--endpoints` endpoints, one listener
//!    with an HTTP connection manager over RDS `big`, and RouteConfiguration
//!    `big` with `--vhosts` virtual hosts `h{j}.example.com`, each with
//!    R = clusters/vhosts routes `prefix: /p{k}` to `c{j*R+k}`. The EDS and RDS
//!    resources are stored first (nobody subscribes to them yet, so nothing
//!    is sent); t0 is when the CDS response is queued, the listener follows
//!    at once.
//! 2. Measured from t0: the ACK of each type covering the whole snapshot
//!    (polled every 1 ms; a delta ACK counts once every resource has been
//!    sent on that stream, a SotW ACK once its response held them all), the first `200` from the upstream behind the very
//!    last route (`h{V-1}.example.com/p{R-1}` to the last cluster, whose
//!    endpoints are real echo servers; probed every 5 ms), and the admin
//!    `cluster_manager.active_clusters` gauge reaching clusters + 1 (the
//!    static `xds-grpc`) with `warming_clusters` 0 (probed every 5 ms once
//!    the route answers). "Applied" is the latest of the three. The proxy's
//!    CPU time (utime + stime) from t0 to then is reported too.
//! 3. After 2 s of settling, VmRSS and VmHWM of the proxy (`/proc`).
//! 4. `--eds-updates` times, one ClusterLoadAssignment (a different cluster
//!    each time, new ports) is upserted and the time from the response being
//!    queued to its ACK is taken (`wait_for_ack`, event driven), 100 ms apart.
//! 5. Optionally (`--late-rss S`), VmRSS again S seconds after the last
//!    update.
//!
//! Everything is bounded (120 s per wait). A proxy that exits, NACKs or
//! stalls fails its run; the report says what happened with its stderr tail.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use prost::Message;
use weir_tests::client::{http1_raw, Outcome};
use weir_tests::tmp::TempDir;
use weir_tests::upstream::{self, EchoServer};
use weir_tests::xds::{type_url as t, ControlPlane};
use xds_client::api::envoy::config::cluster::v3::{cluster, Cluster};
use xds_client::api::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, SocketAddress,
};
use xds_client::api::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use xds_client::api::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use xds_client::api::google::protobuf::{Any, Duration as PbDuration};

/// Upper bound of every wait.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How long the proxy may take to answer `/ready` after start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Opts {
    weir: Option<PathBuf>,
    envoy: Option<PathBuf>,
    runs: usize,
    eds_updates: usize,
    apis: Vec<Api>,
    clusters: usize,
    vhosts: usize,
    endpoints: usize,
    proxy_cpu: Option<String>,
    late_rss: u64,
    /// Serve ADS on a Unix socket instead of TCP.
    unix: bool,
    /// Before each run, wait until the rest of the machine uses less than
    /// this many CPUs (0: no gate) ...
    quiet: f64,
    /// ... for at most this long.
    quiet_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Delta,
    Sotw,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Delta => "delta",
            Api::Sotw => "sotw",
        }
    }
}

/// The resources of one snapshot, encoded once.
struct Snapshot {
    clusters: Vec<Any>,
    endpoints: Vec<Any>,
    route: Any,
}

/// What one run measured (durations from t0).
#[derive(Debug, Default, Clone)]
struct RunResult {
    idle_rss_kib: u64,
    ack_cds: Duration,
    ack_eds: Duration,
    ack_lds: Duration,
    ack_rds: Duration,
    route_ok: Duration,
    clusters_active: Duration,
    applied: Duration,
    /// Proxy CPU (user + system) from t0 to applied.
    apply_cpu: Duration,
    rss_kib: u64,
    hwm_kib: u64,
    eds: Vec<Duration>,
    /// Proxy CPU over the EDS update phase divided by the number of updates
    /// (includes whatever the idle proxy does in the 100 ms gaps).
    eds_cpu: Duration,
    rss_after_eds_kib: u64,
    late_rss_kib: Option<u64>,
    /// Time `ControlPlane::set` took for the clusters (not in the window).
    cp_set_cds: Duration,
    /// CPUs used by other processes while the snapshot applied, and during
    /// the EDS updates.
    other_apply: f64,
    other_eds: f64,
}

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
        eds_updates: 20,
        apis: vec![Api::Delta, Api::Sotw],
        clusters: 5000,
        vhosts: 500,
        endpoints: 10,
        proxy_cpu: None,
        late_rss: 0,
        unix: false,
        quiet: 0.0,
        quiet_timeout: 600,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--weir" => o.weir = Some(PathBuf::from(val()?)),
            "--envoy" => o.envoy = Some(PathBuf::from(val()?)),
            "--runs" => o.runs = val()?.parse()?,
            "--eds-updates" => o.eds_updates = val()?.parse()?,
            "--clusters" => o.clusters = val()?.parse()?,
            "--vhosts" => o.vhosts = val()?.parse()?,
            "--endpoints" => o.endpoints = val()?.parse()?,
            "--proxy-cpu" => o.proxy_cpu = Some(val()?),
            "--late-rss" => o.late_rss = val()?.parse()?,
            "--quiet" => o.quiet = val()?.parse()?,
            "--quiet-timeout" => o.quiet_timeout = val()?.parse()?,
            "--transport" => {
                o.unix = match val()?.as_str() {
                    "unix" => true,
                    "tcp" => false,
                    v => bail!("unknown transport {v:?} (tcp, unix)"),
                }
            }
            "--apis" => {
                o.apis = val()?
                    .split(',')
                    .map(|s| match s {
                        "delta" => Ok(Api::Delta),
                        "sotw" => Ok(Api::Sotw),
                        _ => Err(anyhow!("unknown api {s:?} (delta, sotw)")),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "xds_scale --weir PATH [--envoy PATH] [--runs 3] [--eds-updates 20] \
                     [--apis delta,sotw] [--clusters 5000] [--vhosts 500] [--endpoints 10] \
                     [--proxy-cpu CPU] [--late-rss SECONDS] [--transport tcp|unix] \
                     [--quiet CPUS] [--quiet-timeout SECONDS]"
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a:?} (see --help)"),
        }
    }
    if o.weir.is_none() && o.envoy.is_none() {
        bail!("give --weir and/or --envoy");
    }
    if o.clusters == 0 || o.vhosts == 0 || !o.clusters.is_multiple_of(o.vhosts) || o.endpoints == 0
    {
        bail!("--clusters must be a non-zero multiple of --vhosts; --endpoints non-zero");
    }
    if o.eds_updates >= o.clusters {
        bail!("--eds-updates must be below --clusters");
    }
    Ok(o)
}

async fn run_all(o: &Opts) -> anyhow::Result<()> {
    let mut probes = Vec::new();
    for i in 0..o.endpoints {
        probes.push(upstream::http1(&format!("probe{i}")).await?);
    }
    let built = Instant::now();
    let snap = build_snapshot(o, &probes);
    let bytes: usize = snap
        .clusters
        .iter()
        .chain(&snap.endpoints)
        .map(|a| a.value.len())
        .sum::<usize>()
        + snap.route.value.len();
    println!(
        "# snapshot: {} clusters, {} endpoints, {} virtual hosts x {} routes, {:.1} MiB encoded (built in {:?})",
        o.clusters,
        o.clusters * o.endpoints,
        o.vhosts,
        o.clusters / o.vhosts,
        bytes as f64 / (1024.0 * 1024.0),
        built.elapsed()
    );
    println!("# loadavg at start: {}", loadavg());

    let mut proxies: Vec<(&str, &PathBuf)> = Vec::new();
    if let Some(p) = &o.weir {
        proxies.push(("weir", p));
    }
    if let Some(p) = &o.envoy {
        proxies.push(("envoy", p));
    }
    let mut table: Vec<(String, Api, Vec<anyhow::Result<RunResult>>)> = Vec::new();
    for &api in &o.apis {
        for &(kind, _) in &proxies {
            table.push((kind.to_owned(), api, Vec::new()));
        }
    }
    // Alternate proxies within each round so slow drifts in machine load
    // hit both alike.
    for round in 0..o.runs {
        for &api in &o.apis {
            for &(kind, bin) in &proxies {
                let mut load = loadavg();
                if o.quiet > 0.0 {
                    let (cpus, ok) =
                        quiet_gate(o.quiet, Duration::from_secs(o.quiet_timeout)).await?;
                    load = format!(
                        "{load}, others {cpus:.2} CPUs{}",
                        if ok { "" } else { " (quiet gate timed out)" }
                    );
                }
                let r = run_one(o, kind, bin, api, &snap, round).await;
                match &r {
                    Ok(r) => println!(
                        "{kind} {} run {}: applied {} (cds ack {}, eds ack {}, lds ack {}, rds ack {}, route {}, active_clusters {}), cpu {}, idle rss {:.1} MiB, rss {:.1} MiB (hwm {:.1}), eds p50 {} p90 {} max {} (cpu {} per update), rss after eds {:.1} MiB{}; control plane set(CDS) {}; other processes used {:.2} CPUs while applying, {:.2} during the EDS updates; loadavg before {load}",
                        api.name(),
                        round + 1,
                        ms(r.applied),
                        ms(r.ack_cds),
                        ms(r.ack_eds),
                        ms(r.ack_lds),
                        ms(r.ack_rds),
                        ms(r.route_ok),
                        ms(r.clusters_active),
                        ms(r.apply_cpu),
                        mib(r.idle_rss_kib),
                        mib(r.rss_kib),
                        mib(r.hwm_kib),
                        ms(pct(&r.eds, 50)),
                        ms(pct(&r.eds, 90)),
                        ms(pct(&r.eds, 100)),
                        ms(r.eds_cpu),
                        mib(r.rss_after_eds_kib),
                        r.late_rss_kib
                            .map(|k| format!(", rss {}s later {:.1} MiB", o.late_rss, mib(k)))
                            .unwrap_or_default(),
                        ms(r.cp_set_cds),
                        r.other_apply,
                        r.other_eds,
                    ),
                    Err(e) => println!(
                        "{kind} {} run {}: FAILED: {e:#}; loadavg before {load}",
                        api.name(),
                        round + 1
                    ),
                }
                if let Some(row) = table.iter_mut().find(|(k, a, _)| k == kind && *a == api) {
                    row.2.push(r);
                }
            }
        }
    }
    println!("# loadavg at end: {}", loadavg());
    println!();
    println!("{}", summary(o, &table));
    drop(probes);
    Ok(())
}

fn summary(o: &Opts, table: &[(String, Api, Vec<anyhow::Result<RunResult>>)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| proxy | ADS | runs ok | applied (s) | all ACKs (s) | last route 200 (s) | active_clusters (s) | CPU to apply (s) | idle RSS (MiB) | RSS applied (MiB) | VmHWM (MiB) | EDS update p50 (ms) | EDS p90 (ms) | CPU per EDS update (ms) | RSS after EDS (MiB) | others' CPUs apply/EDS |{}",
        if o.late_rss > 0 { format!(" RSS +{}s (MiB) |", o.late_rss) } else { String::new() }
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|{}",
        if o.late_rss > 0 { "---|" } else { "" }
    );
    for (kind, api, runs) in table {
        let ok: Vec<&RunResult> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        let med_d = |f: &dyn Fn(&RunResult) -> Duration| {
            let mut v: Vec<Duration> = ok.iter().map(|r| f(r)).collect();
            v.sort();
            let all: Vec<String> = ok.iter().map(|r| secs(f(r))).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{} ({})", secs(v[v.len() / 2]), all.join("/"))
            }
        };
        let med_k = |f: &dyn Fn(&RunResult) -> u64| {
            let mut v: Vec<u64> = ok.iter().map(|r| f(r)).collect();
            v.sort();
            let all: Vec<String> = ok.iter().map(|r| format!("{:.1}", mib(f(r)))).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1} ({})", mib(v[v.len() / 2]), all.join("/"))
            }
        };
        let med_ms = |f: &dyn Fn(&RunResult) -> Duration| {
            let mut v: Vec<Duration> = ok.iter().map(|r| f(r)).collect();
            v.sort();
            let all: Vec<String> = ok.iter().map(|r| ms_num(f(r))).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{} ({})", ms_num(v[v.len() / 2]), all.join("/"))
            }
        };
        let med_eds = |p: usize| {
            let mut v: Vec<Duration> = ok.iter().map(|r| pct(&r.eds, p)).collect();
            v.sort();
            let all: Vec<String> = ok.iter().map(|r| ms_num(pct(&r.eds, p))).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{} ({})", ms_num(v[v.len() / 2]), all.join("/"))
            }
        };
        let acks = |r: &RunResult| r.ack_cds.max(r.ack_eds).max(r.ack_lds).max(r.ack_rds);
        let late = if o.late_rss > 0 {
            format!(" {} |", med_k(&|r| r.late_rss_kib.unwrap_or(0)))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| {kind} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{late}",
            api.name(),
            ok.len(),
            runs.len(),
            med_d(&|r| r.applied),
            med_d(&acks),
            med_d(&|r| r.route_ok),
            med_d(&|r| r.clusters_active),
            med_d(&|r| r.apply_cpu),
            med_k(&|r| r.idle_rss_kib),
            med_k(&|r| r.rss_kib),
            med_k(&|r| r.hwm_kib),
            med_eds(50),
            med_eds(90),
            med_ms(&|r| r.eds_cpu),
            med_k(&|r| r.rss_after_eds_kib),
            ok.iter()
                .map(|r| format!("{:.1}/{:.1}", r.other_apply, r.other_eds))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    for (kind, api, runs) in table {
        for (i, r) in runs.iter().enumerate() {
            if let Err(e) = r {
                let _ = writeln!(s, "\n{kind} {} run {} failed: {e:#}", api.name(), i + 1);
            }
        }
    }
    s
}

// === snapshot ===

fn build_snapshot(o: &Opts, probes: &[EchoServer]) -> Snapshot {
    let ads = || ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    };
    let clusters = (0..o.clusters)
        .map(|i| {
            let c = Cluster {
                name: format!("c{i}"),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Eds as i32,
                )),
                connect_timeout: Some(PbDuration {
                    seconds: 1,
                    nanos: 0,
                }),
                eds_cluster_config: Some(cluster::EdsClusterConfig {
                    eds_config: Some(ads()),
                    service_name: String::new(),
                }),
                ..Default::default()
            };
            any(t::CLUSTER, &c)
        })
        .collect();
    let probe_ports: Vec<u16> = probes.iter().map(EchoServer::port).collect();
    let endpoints = (0..o.clusters)
        .map(|i| {
            let ports: Vec<u16> = if i == o.clusters - 1 {
                probe_ports.clone()
            } else {
                endpoint_ports(o, i, 0)
            };
            any(t::ENDPOINT, &cla(&format!("c{i}"), &ports))
        })
        .collect();
    let per = o.clusters / o.vhosts;
    let rc = RouteConfiguration {
        name: "big".to_owned(),
        virtual_hosts: (0..o.vhosts)
            .map(|j| VirtualHost {
                name: format!("h{j}"),
                domains: vec![format!("h{j}.example.com")],
                routes: (0..per)
                    .map(|k| Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix(format!(
                                "/p{k}"
                            ))),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                format!("c{}", j * per + k),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Snapshot {
        clusters,
        endpoints,
        route: any(t::ROUTE, &rc),
    }
}

/// Distinct ports for cluster `i` (no traffic goes there); `gen` shifts
/// them for updates.
fn endpoint_ports(o: &Opts, i: usize, gen: usize) -> Vec<u16> {
    (0..o.endpoints)
        .map(|e| {
            let n = (i * o.endpoints + e + gen * 7919) % 50_000;
            u16::try_from(10_000 + n).unwrap_or(10_000)
        })
        .collect()
}

fn cla(name: &str, ports: &[u16]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: ports
                .iter()
                .map(|&p| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "127.0.0.1".to_owned(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    u32::from(p),
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn any(type_url: &str, m: &impl Message) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

fn bootstrap(cp: &ControlPlane, api: Api, admin: u16) -> anyhow::Result<String> {
    Ok(cp.ads_bootstrap(
        "{id: xds-scale, cluster: xds-scale}",
        matches!(api, Api::Delta),
        admin,
    ))
}

// === one run ===

/// `cluster_manager.active_clusters` and `warming_clusters` of `p`.
async fn cluster_gauges(p: &ProxyProcess) -> anyhow::Result<(i64, i64)> {
    let (code, body) = p
        .admin_get("/stats?filter=%5Ecluster_manager%5C.%28active%7Cwarming%29_clusters%24")
        .await?;
    if code != 200 {
        bail!("/stats answered {code}");
    }
    let get = |name: &str| {
        body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    };
    Ok((
        get("cluster_manager.active_clusters").unwrap_or(-1),
        get("cluster_manager.warming_clusters").unwrap_or(-1),
    ))
}

async fn run_one(
    o: &Opts,
    kind: &str,
    bin: &Path,
    api: Api,
    snap: &Snapshot,
    round: usize,
) -> anyhow::Result<RunResult> {
    let admin = weir_tests::free_port();
    let sock_dir = TempDir::new("xds-scale-uds")?;
    let cp = if o.unix {
        ControlPlane::start_unix(&sock_dir.join("xds.sock")).await?
    } else {
        ControlPlane::start().await?
    };
    let listen = weir_tests::free_port();
    let mut p = ProxyProcess::spawn(
        kind,
        bin,
        &bootstrap(&cp, api, admin)?,
        admin,
        o.proxy_cpu.as_deref(),
    )?;
    let r = measure(o, &cp, &mut p, snap, listen, round).await;
    match r {
        Ok(r) => {
            let nacks = cp.nacks();
            if !nacks.is_empty() {
                bail!(
                    "{} NACKs, first: {} {:?}",
                    nacks.len(),
                    nacks[0].type_url,
                    nacks[0].error.message
                );
            }
            p.alive()?;
            Ok(r)
        }
        Err(e) => {
            let nacks = cp.nacks();
            let alive = p.alive().err();
            Err(e.context(format!(
                "{} NACKs{}; proxy {}; stderr tail:\n{}",
                nacks.len(),
                nacks
                    .first()
                    .map(|n| format!(" (first: {:?})", n.error.message))
                    .unwrap_or_default(),
                alive
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_else(|| "still running".to_owned()),
                p.stderr_tail()
            )))
        }
    }
}

async fn measure(
    o: &Opts,
    cp: &ControlPlane,
    p: &mut ProxyProcess,
    snap: &Snapshot,
    listen: u16,
    round: usize,
) -> anyhow::Result<RunResult> {
    let mut r = RunResult::default();
    p.wait_ready(READY_TIMEOUT).await?;
    // The empty wildcard answers are acknowledged: the proxy is idle.
    cp.wait_for_ack(t::CLUSTER, "0", TIMEOUT).await?;
    cp.wait_for_ack(t::LISTENER, "0", TIMEOUT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.idle_rss_kib = proc_status(p.pid(), "VmRSS")?;

    // Nobody subscribes to these yet: stored, not sent.
    let v_eds = cp.set(t::ENDPOINT, snap.endpoints.clone())?;
    let v_rds = cp.set(t::ROUTE, vec![snap.route.clone()])?;
    let listener = xds_client::bootstrap::any_from_text(
        t::LISTENER,
        &weir_tests::xds::yaml::rds_listener("big", listen, "big"),
    )
    .map_err(|e| anyhow!("listener: {e}"))?;
    let cpu0 = proc_cpu(p.pid())?;
    let other = OtherLoad::start(Some(p.pid()))?;
    let set_start = Instant::now();
    let v_cds = cp.set(t::CLUSTER, snap.clusters.clone())?;
    let t0 = Instant::now();
    r.cp_set_cds = t0 - set_start;
    let v_lds = cp.set(t::LISTENER, vec![listener])?;

    let n = o.clusters;
    let probe_req = format!(
        "GET /p{} HTTP/1.1\r\nhost: h{}.example.com\r\nconnection: close\r\n\r\n",
        o.clusters / o.vhosts - 1,
        o.vhosts - 1
    );
    let probe_addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let deadline = t0 + TIMEOUT;
    let wants = [
        (t::CLUSTER, v_cds.parse::<u64>()?, n),
        (t::ENDPOINT, v_eds.parse()?, n),
        (t::LISTENER, v_lds.parse()?, 1),
        (t::ROUTE, v_rds.parse()?, 1),
    ];
    // Three concurrent watchers on this (single-threaded) runtime, so a slow
    // probe never delays noticing an ACK.
    let acks_fut = async {
        let mut acks: [Option<Duration>; 4] = [None; 4];
        let mut seen = 0;
        loop {
            let now = Instant::now();
            // Cheap: the ACK list is short; `coverage` only runs on new ones.
            let all = cp.acks();
            if all.len() != seen {
                seen = all.len();
                for (i, (ty, min, want)) in wants.iter().enumerate() {
                    if acks[i].is_some() {
                        continue;
                    }
                    if all.iter().any(|a| {
                        a.type_url == *ty
                            && a.version.parse::<u64>().unwrap_or(0) >= *min
                            && coverage(cp, ty, a.stream, &a.nonce) >= *want
                    }) {
                        acks[i] = Some(now - t0);
                    }
                }
            }
            if acks.iter().all(Option::is_some) {
                return Ok(acks.map(Option::unwrap_or_default));
            }
            if now > deadline {
                bail!("not all ACKs after {TIMEOUT:?}: cds/eds/lds/rds {acks:?}");
            }
            p.alive()?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let route_fut = async {
        loop {
            let last =
                match http1_raw(probe_addr, probe_req.as_bytes(), Duration::from_secs(5)).await {
                    Outcome::Response(resp) if resp.status == 200 => return Ok(t0.elapsed()),
                    Outcome::Response(resp) => format!("status {}", resp.status),
                    other => format!("{other:?}"),
                };
            if Instant::now() > deadline {
                bail!("the last route did not answer 200 after {TIMEOUT:?}; last probe: {last}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let ([cds, eds, lds, rds], route_ok) = tokio::try_join!(acks_fut, route_fut)?;
    // Then the gauges (Envoy's /stats walks every stat, so not polled while
    // the snapshot is being applied).
    let active = loop {
        let g = cluster_gauges(p).await?;
        if usize::try_from(g.0).ok() == Some(n + 1) && g.1 == 0 {
            break t0.elapsed();
        }
        if Instant::now() > deadline {
            bail!("active/warming clusters still {g:?} after {TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    r.apply_cpu = proc_cpu(p.pid())? - cpu0;
    r.other_apply = other.cpus(Some(p.pid()))?;
    r.ack_cds = cds;
    r.ack_eds = eds;
    r.ack_lds = lds;
    r.ack_rds = rds;
    r.route_ok = route_ok;
    r.clusters_active = active;
    r.applied = [cds, eds, lds, rds, route_ok, active]
        .into_iter()
        .max()
        .unwrap_or_default();

    tokio::time::sleep(Duration::from_secs(2)).await;
    r.rss_kib = proc_status(p.pid(), "VmRSS")?;
    r.hwm_kib = proc_status(p.pid(), "VmHWM")?;

    // EDS updates of one cluster each (never the probe cluster).
    let eds_cpu0 = proc_cpu(p.pid())?;
    let other = OtherLoad::start(Some(p.pid()))?;
    for u in 0..o.eds_updates {
        let i = (u * 37 + round * 11) % (o.clusters - 1);
        let res = any(
            t::ENDPOINT,
            &cla(&format!("c{i}"), &endpoint_ports(o, i, u + 1 + round * 100)),
        );
        let v = cp.upsert(t::ENDPOINT, res)?;
        let queued = Instant::now();
        cp.wait_for_ack(t::ENDPOINT, &v, TIMEOUT)
            .await
            .with_context(|| format!("EDS update {u} (c{i}, version {v})"))?;
        r.eds.push(queued.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.eds_cpu = (proc_cpu(p.pid())? - eds_cpu0) / u32::try_from(o.eds_updates.max(1))?;
    r.other_eds = other.cpus(Some(p.pid()))?;
    r.rss_after_eds_kib = proc_status(p.pid(), "VmRSS")?;
    if o.late_rss > 0 {
        tokio::time::sleep(Duration::from_secs(o.late_rss)).await;
        r.late_rss_kib = Some(proc_status(p.pid(), "VmRSS")?);
    }
    // The route still answers after all that.
    let probe_req = format!(
        "GET /p{} HTTP/1.1\r\nhost: h{}.example.com\r\nconnection: close\r\n\r\n",
        o.clusters / o.vhosts - 1,
        o.vhosts - 1
    );
    match http1_raw(probe_addr, probe_req.as_bytes(), Duration::from_secs(5)).await {
        Outcome::Response(resp) if resp.status == 200 => {}
        other => bail!("the last route stopped answering after the EDS updates: {other:?}"),
    }
    Ok(r)
}

/// How many distinct resources of `ty` stream `stream` had been sent up to
/// and including the response `nonce` (SotW: that response's own content).
fn coverage(cp: &ControlPlane, ty: &str, stream: u64, nonce: &str) -> usize {
    let sent = cp.sent();
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for s in sent
        .iter()
        .filter(|s| s.stream == stream && s.type_url == ty)
    {
        if !s.delta {
            names.clear();
        }
        for n in &s.removed {
            names.remove(n.as_str());
        }
        names.extend(s.resources.iter().map(|(n, _)| n.as_str()));
        if s.nonce == nonce {
            return names.len();
        }
    }
    0
}

// === /proc ===

use weir_benches::procfs::{machine_cpu, proc_cpu, proc_status};
use weir_benches::proxy::ProxyProcess;

/// CPU use of everything but this harness and the proxy, between two
/// samples; in CPUs (2.0 = both cores of this machine busy).
struct OtherLoad {
    machine: (u64, u64),
    own: Duration,
    at: Instant,
}

impl OtherLoad {
    fn start(proxy: Option<u32>) -> anyhow::Result<OtherLoad> {
        Ok(OtherLoad {
            machine: machine_cpu()?,
            own: own_cpu(proxy)?,
            at: Instant::now(),
        })
    }

    fn cpus(&self, proxy: Option<u32>) -> anyhow::Result<f64> {
        let (busy, _) = machine_cpu()?;
        let busy = Duration::from_millis(busy.saturating_sub(self.machine.0) * 10);
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

/// Waits (at most `timeout`) until the rest of the machine has used less
/// than `max_cpus` for 3 consecutive seconds; returns the last sample.
async fn quiet_gate(max_cpus: f64, timeout: Duration) -> anyhow::Result<(f64, bool)> {
    let deadline = Instant::now() + timeout;
    let mut quiet = 0;
    loop {
        let l = OtherLoad::start(None)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpus = l.cpus(None)?;
        quiet = if cpus < max_cpus { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return Ok((cpus, true));
        }
        if Instant::now() > deadline {
            return Ok((cpus, false));
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// === formatting ===

fn pct(v: &[Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let idx = ((s.len() * p).div_ceil(100)).clamp(1, s.len()) - 1;
    s[idx]
}

fn ms(d: Duration) -> String {
    format!("{} ms", ms_num(d))
}

fn ms_num(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
