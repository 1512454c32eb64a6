//! Criterion benchmarks for weir; see benches/README.md.
//!
//! This library holds the fixtures the benches share: Envoy bootstraps
//! generated as YAML text and turned into route tables by the real parser and
//! translator, so the measured structures are exactly what the proxy serves.
use std::fmt::Write;
use std::sync::Arc;

use xds_client::bootstrap::{parse_bootstrap, ParseOptions};
use xds_client::config::{NetworkFilter, RouteConfig, Snapshot};
use xds_client::translate::bootstrap_to_snapshot;

/// One virtual host of a generated bootstrap.
#[derive(Debug, Clone)]
pub struct VhostSpec {
    pub name: String,
    pub domains: Vec<String>,
    /// Each entry is the YAML flow mapping of a route's `match`, e.g.
    /// `{ prefix: /api }`; every route forwards to cluster `backend`.
    pub matches: Vec<String>,
}

/// A bootstrap with one HTTP listener whose inline route table holds
/// `vhosts`, and the one cluster the routes name.
pub fn bootstrap_yaml(vhosts: &[VhostSpec]) -> String {
    let mut y = String::from(
        r#"static_resources:
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8080 } } }
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: bench
            virtual_hosts:
"#,
    );
    for vh in vhosts {
        let domains: Vec<String> = vh.domains.iter().map(|d| format!("{d:?}")).collect();
        writeln!(y, "            - name: {:?}", vh.name).expect("write to String");
        writeln!(y, "              domains: [{}]", domains.join(", ")).expect("write to String");
        if vh.matches.is_empty() {
            y.push_str("              routes: []\n");
            continue;
        }
        y.push_str("              routes:\n");
        for m in &vh.matches {
            writeln!(
                y,
                "              - {{ match: {m}, route: {{ cluster: backend }} }}"
            )
            .expect("write to String");
        }
    }
    y
}

/// Parses and translates a bootstrap; panics on invalid config (fixtures
/// are generated, so that is a bug in the bench).
pub fn snapshot(yaml: &str) -> Snapshot {
    let b = parse_bootstrap(yaml, ParseOptions::default()).expect("bench bootstrap parses");
    bootstrap_to_snapshot(&b).expect("bench bootstrap translates")
}

/// The route table of the first listener of `yaml`.
pub fn route_table(yaml: &str) -> Arc<RouteConfig> {
    let s = snapshot(yaml);
    match &s.listeners[0].filter_chains[0].filter {
        NetworkFilter::Http(h) => h.routes.inline().expect("inline routes").clone(),
        NetworkFilter::Tcp(_) => panic!("the bench config's first chain is not HTTP"),
    }
}

/// One virtual host (`bench.example.com`) with `n` routes. Most match by
/// prefix (`/svc{i}/`); every 10th by exact path, every 25th by separated
/// prefix, and every 50th by regex, roughly the mix of a gateway config.
pub fn routes_yaml(n: usize) -> String {
    let matches = (0..n)
        .map(|i| match i {
            i if i % 50 == 49 => format!("{{ safe_regex: {{ regex: \"/re{i}/[a-z]+/[0-9]+\" }} }}"),
            i if i % 25 == 24 => format!("{{ path_separated_prefix: /sep{i} }}"),
            i if i % 10 == 9 => format!("{{ path: /exact{i} }}"),
            i => format!("{{ prefix: /svc{i}/ }}"),
        })
        .collect();
    bootstrap_yaml(&[VhostSpec {
        name: "bench".to_owned(),
        domains: vec!["bench.example.com".to_owned()],
        matches,
    }])
}

/// `n` virtual hosts, each with an exact domain `svc{i}.example.com` (and its
/// `:443` form) and a suffix wildcard `*.svc{i}.example.org`, plus a `*`
/// catch-all; one `prefix: /` route each.
pub fn vhosts_yaml(n: usize) -> String {
    let mut vhosts: Vec<VhostSpec> = (0..n)
        .map(|i| VhostSpec {
            name: format!("vh{i}"),
            domains: vec![
                format!("svc{i}.example.com"),
                format!("svc{i}.example.com:443"),
                format!("*.svc{i}.example.org"),
            ],
            matches: vec!["{ prefix: / }".to_owned()],
        })
        .collect();
    vhosts.push(VhostSpec {
        name: "default".to_owned(),
        domains: vec!["*".to_owned()],
        matches: vec!["{ prefix: / }".to_owned()],
    });
    bootstrap_yaml(&vhosts)
}

pub mod proxy;

/// Process and machine CPU and memory from `/proc`, for the macro benchmark
/// binaries (`hbone_bench`, `xds_scale`).
pub mod procfs {
    use std::time::Duration;

    use anyhow::anyhow;

    /// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...).
    pub fn proc_status(pid: u32, field: &str) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        s.lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
    }

    /// utime + stime of the process (all threads).
    pub fn proc_cpu(pid: u32) -> anyhow::Result<Duration> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses.
        let rest = s
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime is field 14, stime 15.
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // USER_HZ is 100 on Linux (sysconf(_SC_CLK_TCK)).
        Ok(Duration::from_millis(ticks * 10))
    }

    /// (busy, total) CPU ticks of the whole machine, all CPUs (`/proc/stat`).
    pub fn machine_cpu() -> anyhow::Result<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat")?;
        let line = s
            .lines()
            .next()
            .ok_or_else(|| anyhow!("empty /proc/stat"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal
        let get = |i: usize| f.get(i).copied().unwrap_or(0);
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        Ok((busy, busy + get(3) + get(4)))
    }
}
