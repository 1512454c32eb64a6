//! DNS for STRICT_DNS and LOGICAL_DNS clusters (hickory-resolver, honouring
//! `dns_refresh_rate`, `respect_dns_ttl` and `dns_lookup_family`).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::AtomicU64, Arc, OnceLock},
    time::Duration,
};

use hickory_resolver::{name_server::TokioConnectionProvider, TokioResolver};
use xds_client::config::{Discovery, DnsFamily, EndpointAddress};

use super::{ClusterRuntime, Host};

fn resolver() -> Option<&'static TokioResolver> {
    static R: OnceLock<Option<TokioResolver>> = OnceLock::new();
    R.get_or_init(|| {
        TokioResolver::builder(TokioConnectionProvider::default())
            .map(|b| b.build())
            .map_err(|e| tracing::warn!(error = %e, "cannot read the system DNS configuration"))
            .ok()
    })
    .as_ref()
}

/// Resolves `host`; returns the addresses and the shortest TTL.
async fn resolve(host: &str, family: DnsFamily) -> Result<(Vec<IpAddr>, Option<Duration>), String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((vec![ip], None));
    }
    // /etc/hosts first, as the system resolver does; names found there never
    // cause a DNS query.
    let from_hosts = hosts_file_lookup(host);
    if !from_hosts.is_empty() {
        return Ok((filter_family(from_hosts, family), None));
    }
    let r = resolver().ok_or("no DNS resolver")?;
    let lookup = r.lookup_ip(host).await.map_err(|e| e.to_string())?;
    let ttl = lookup
        .valid_until()
        .checked_duration_since(std::time::Instant::now());
    Ok((filter_family(lookup.iter().collect(), family), ttl))
}

/// Applies `dns_lookup_family` to a set of addresses.
fn filter_family(all: Vec<IpAddr>, family: DnsFamily) -> Vec<IpAddr> {
    let v4: Vec<IpAddr> = all.iter().copied().filter(IpAddr::is_ipv4).collect();
    let v6: Vec<IpAddr> = all.iter().copied().filter(IpAddr::is_ipv6).collect();
    match family {
        DnsFamily::V4Only => v4,
        DnsFamily::V6Only => v6,
        // AUTO prefers v6 and falls back to v4; V4_PREFERRED the reverse (Envoy).
        DnsFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsFamily::All => all,
    }
}

/// Addresses for `name` in /etc/hosts.
fn hosts_file_lookup(name: &str) -> Vec<IpAddr> {
    let Ok(text) = std::fs::read_to_string("/etc/hosts") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next().and_then(|f| f.parse::<IpAddr>().ok()) else {
            continue;
        };
        if fields.any(|n| n.eq_ignore_ascii_case(name)) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Resolves every endpoint once and installs the hosts; returns the TTL.
pub async fn refresh_once(c: Arc<ClusterRuntime>) -> Option<Duration> {
    let cfg = c.config.clone();
    let mut hosts = Vec::new();
    let mut min_ttl: Option<Duration> = None;
    let mut failed = false;
    for l in cfg.localities.iter() {
        let locality = Arc::new(super::hash_lb::LocalityKey {
            region: l.region.clone(),
            zone: l.zone.clone(),
            sub_zone: l.sub_zone.clone(),
        });
        for e in &l.endpoints {
            let (name, port) = match &e.address {
                EndpointAddress::Dns(h, p) => (h.clone(), *p),
                EndpointAddress::Ip(a) => (a.ip().to_string(), a.port()),
                EndpointAddress::Pipe(_) | EndpointAddress::Internal { .. } => continue,
            };
            match resolve(&name, cfg.dns.family).await {
                Ok((ips, ttl)) => {
                    if let Some(t) = ttl {
                        min_ttl = Some(min_ttl.map_or(t, |m| m.min(t)));
                    }
                    // LOGICAL_DNS uses the first address only.
                    let take = if cfg.discovery == Discovery::LogicalDns {
                        1
                    } else {
                        ips.len()
                    };
                    for ip in ips.into_iter().take(take) {
                        hosts.push(Arc::new(Host {
                            internal: None,
                            addr: SocketAddr::new(ip, port),
                            hostname: if e.hostname.is_empty() {
                                name.clone()
                            } else {
                                e.hostname.clone()
                            },
                            weight: e.weight,
                            healthy: e.health.is_usable(),
                            priority: l.priority,
                            locality: locality.clone(),
                            locality_weight: l.weight.unwrap_or(0),
                            metadata: e.metadata.clone(),
                            active: AtomicU64::new(0),
                            outlier: std::sync::OnceLock::new(),
                            active_hc: std::sync::OnceLock::new(),
                            since: AtomicU64::new(0),
                        }));
                    }
                }
                Err(err) => {
                    failed = true;
                    tracing::debug!(cluster = %cfg.name, host = %name, error = %err, "dns resolution failed");
                }
            }
        }
    }
    if failed && hosts.is_empty() {
        // Keep the previous hosts on a failed refresh (Envoy).
        c.stats.update_failure.inc();
        return None;
    }
    c.set_hosts(hosts);
    min_ttl
}

/// Refreshes forever: every `dns_refresh_rate`, or the record TTL when
/// `respect_dns_ttl` is set.
pub async fn refresh_loop(weak: std::sync::Weak<ClusterRuntime>) {
    loop {
        // Ends when the cluster is removed from the configuration.
        let Some(c) = weak.upgrade() else { return };
        let ttl = refresh_once(c.clone()).await;
        let wait = match (c.config.dns.respect_ttl, ttl) {
            (true, Some(t)) if !t.is_zero() => t,
            _ => c.config.dns.refresh_rate,
        };
        drop(c);
        tokio::time::sleep(wait).await;
    }
}
