//! `ORIGINAL_DST` clusters (Envoy's `OriginalDstCluster` and its load
//! balancer): a request or connection names its destination, and the
//! cluster makes a host for each destination it is asked for.
//!
//! - The destination, in Envoy's order: the `envoy.network.transport_socket.
//!   original_dst_address` filter state object (the request's, then the
//!   connection's), the `metadata_key` string in dynamic metadata (the
//!   request's, then the connection's; a list gives its first entry), the
//!   `use_http_header` header (first value), then the downstream
//!   connection's local address when a listener filter restored it
//!   (`original_dst`, `proxy_protocol`). `upstream_port_override` replaces
//!   the port of any of them. A header or metadata value that is not
//!   `ip:port` counts `original_dst_host_invalid` and the next source is
//!   tried. No destination: no host (the router's 503 `UH`, tcp_proxy
//!   closes).
//! - Hosts live in one map shared by every worker: a pick is a read lock
//!   and a flag store; a new destination takes the write lock once and is
//!   usable at once. The control thread then publishes it in the cluster's
//!   host set (membership stats, `/clusters`, outlier detection and health
//!   checks), as Envoy's main thread does after a worker posts the host.
//! - Every `cleanup_interval` the control thread removes the hosts that
//!   were not picked since the previous run and that no connection uses
//!   (pooled, busy, or a tcp_proxy/CONNECT stream), as Envoy 1.40 keeps a
//!   host while its connection pools hold it.
//!
//! Only ORIGINAL_DST clusters have this state: other clusters pick hosts
//! exactly as before (one `Option` test).
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, OnceLock, RwLock, Weak,
    },
};

use xds_client::config::OriginalDst;

use super::{ClusterRuntime, Host};
use crate::stats::Counter;

/// What a request or connection offers to name its destination.
#[derive(Default, Clone, Copy)]
pub struct DstInputs<'a> {
    /// The request's filter state, then the connection's.
    pub filter_state: [Option<&'a filters::FilterState>; 2],
    /// The request's dynamic metadata, then the connection's.
    pub metadata: [Option<&'a filters::DynamicMetadata>; 2],
    /// The request headers (HTTP only).
    pub headers: Option<&'a http::HeaderMap>,
    /// The downstream connection's local address, when a listener filter
    /// restored it (Envoy's `localAddressRestored()`).
    pub restored_local: Option<SocketAddr>,
}

/// One destination's host.
struct Entry {
    host: Arc<Host>,
    /// Picked since the last cleanup (Envoy's `used_`).
    used: AtomicBool,
}

/// The hosts of one ORIGINAL_DST cluster runtime.
pub struct OriginalDstHosts {
    pub config: Arc<OriginalDst>,
    /// Host names are the cluster's name and the address, as Envoy's.
    cluster: Arc<str>,
    map: RwLock<HashMap<SocketAddr, Entry>>,
    /// Wakes the control task to publish new hosts in the host set.
    added: Arc<tokio::sync::Notify>,
    /// `cluster.<c>.original_dst_host_invalid`.
    invalid: Arc<Counter>,
}

impl OriginalDstHosts {
    pub fn new(config: Arc<OriginalDst>, cluster: Arc<str>, invalid: Arc<Counter>) -> Self {
        OriginalDstHosts {
            config,
            cluster,
            map: RwLock::new(HashMap::new()),
            added: Arc::new(tokio::sync::Notify::new()),
            invalid,
        }
    }

    /// Where `inputs` send a request or connection (Envoy's `chooseHost`
    /// before the host lookup), with the port override applied.
    pub fn destination(&self, inputs: &DstInputs<'_>) -> Option<SocketAddr> {
        let mut dst = inputs
            .filter_state
            .iter()
            .flatten()
            .find_map(|fs| {
                fs.get_typed::<filters::AddressObject>(filters::state::ORIGINAL_DST_ADDRESS)
            })
            .map(|a| a.0)
            .or_else(|| self.metadata_host(inputs))
            .or_else(|| self.header_host(inputs))
            .or(inputs.restored_local)?;
        if let Some(p) = self.config.port_override {
            dst.set_port(p);
        }
        Some(dst)
    }

    /// `metadata_key`: the first stream info (request, then connection)
    /// whose value there is a string (a list counts by its first entry).
    fn metadata_host(&self, inputs: &DstInputs<'_>) -> Option<SocketAddr> {
        let (ns, path) = self.config.metadata_key.as_ref()?;
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let value = inputs.metadata.iter().flatten().find_map(|m| {
            let v = m.value(ns, &path)?;
            let v = match v {
                serde_json::Value::Array(a) => a.first()?,
                v => v,
            };
            v.as_str()
        })?;
        self.parse(value)
    }

    /// `use_http_header`: the header's first value.
    fn header_host(&self, inputs: &DstInputs<'_>) -> Option<SocketAddr> {
        let name = self.config.header.as_ref()?;
        let v = inputs.headers?.get(name)?;
        self.parse(&String::from_utf8_lossy(v.as_bytes()))
    }

    /// `ip:port` (IPv6 in brackets), as Envoy's
    /// `parseInternetAddressAndPortNoThrow`; else counted as invalid.
    fn parse(&self, v: &str) -> Option<SocketAddr> {
        match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                tracing::debug!(value = v, "original_dst: invalid override host");
                self.invalid.inc();
                None
            }
        }
    }

    /// The host for `addr`, made (and usable at once) when it is new;
    /// `made` tells the caller to attach per-host state.
    fn host(&self, addr: SocketAddr) -> (Arc<Host>, bool) {
        {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = map.get(&addr) {
                e.used.store(true, Relaxed);
                return (e.host.clone(), false);
            }
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        // Another worker may have made it meanwhile.
        if let Some(e) = map.get(&addr) {
            e.used.store(true, Relaxed);
            return (e.host.clone(), false);
        }
        let host = Arc::new(Host {
            addr,
            internal: None,
            hostname: format!("{}{}", self.cluster, addr),
            weight: 1,
            healthy: true,
            priority: 0,
            locality: Default::default(),
            locality_weight: 0,
            metadata: serde_json::Value::Null,
            active: AtomicU64::new(0),
            outlier: OnceLock::new(),
            active_hc: OnceLock::new(),
            since: AtomicU64::new(0),
        });
        tracing::debug!(cluster = %self.cluster, %addr, "original_dst: created host");
        map.insert(
            addr,
            Entry {
                host: host.clone(),
                used: AtomicBool::new(true),
            },
        );
        drop(map);
        self.added.notify_one();
        (host, true)
    }

    /// Every host, for the host set.
    fn hosts(&self) -> Vec<Arc<Host>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Arc<Host>> = map.values().map(|e| e.host.clone()).collect();
        v.sort_by_key(|h| h.addr);
        v
    }

    /// One cleanup round: hosts picked since the last round stay (and are
    /// unmarked); others stay while `in_use` says a connection uses them.
    /// Returns the removed addresses.
    fn cleanup(&self, in_use: impl Fn(&Host) -> bool) -> HashSet<SocketAddr> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let mut gone = HashSet::new();
        map.retain(|addr, e| {
            if e.used.swap(false, Relaxed) || in_use(&e.host) {
                return true;
            }
            gone.insert(*addr);
            false
        });
        gone
    }
}

impl ClusterRuntime {
    /// The host for a request or connection of an ORIGINAL_DST cluster
    /// (`None`: no destination, or not such a cluster).
    pub fn original_dst_host(&self, inputs: &DstInputs<'_>) -> Option<Arc<Host>> {
        let addr = self.original_dst.as_ref()?.destination(inputs)?;
        self.original_dst_host_at(addr)
    }

    /// The host for destination `addr` (made when new).
    pub fn original_dst_host_at(&self, addr: SocketAddr) -> Option<Arc<Host>> {
        let (host, made) = self.original_dst.as_ref()?.host(addr);
        if made {
            // Outlier detection counts from the first request.
            if let Some(d) = &self.outlier {
                super::attach_monitors(d, std::slice::from_ref(&host));
            }
        }
        Some(host)
    }

    /// Whether a connection uses `host`: a request or tunnel in flight, or
    /// a pooled connection on any worker.
    fn original_dst_in_use(&self, host: &Host) -> bool {
        if host.active.load(Relaxed) > 0 {
            return true;
        }
        self.pools
            .iter()
            .flatten()
            .filter_map(OnceLock::get)
            .any(|p| p.holds(host.addr))
    }

    /// Publishes the map's hosts as the cluster's host set.
    fn publish_original_dst(&self, od: &OriginalDstHosts) {
        self.replace_hosts(od.hosts());
    }

    /// One cleanup round (control runtime).
    fn original_dst_cleanup(&self, od: &OriginalDstHosts) {
        let gone = od.cleanup(|h| self.original_dst_in_use(h));
        if gone.is_empty() {
            return;
        }
        tracing::debug!(cluster = %self.config.name, removed = gone.len(), "original_dst: cleaned up hosts");
        for p in self.pools.iter().flatten().filter_map(OnceLock::get) {
            p.remove_hosts(&gone);
        }
        self.publish_original_dst(od);
    }
}

/// Publishes new hosts and runs the cleanup timer of an ORIGINAL_DST
/// cluster runtime until it is gone (control runtime).
pub async fn original_dst_loop(weak: Weak<ClusterRuntime>) {
    let Some((added, period)) = weak.upgrade().and_then(|c| {
        c.original_dst
            .as_ref()
            .map(|o| (o.added.clone(), o.config.cleanup_interval))
    }) else {
        return;
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cleanup = tokio::select! {
            _ = tick.tick() => true,
            _ = added.notified() => false,
        };
        let Some(c) = weak.upgrade() else { return };
        let Some(od) = c.original_dst.as_ref() else {
            return;
        };
        if cleanup {
            c.original_dst_cleanup(od);
        } else {
            c.publish_original_dst(od);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(cfg: OriginalDst) -> OriginalDstHosts {
        let store = crate::stats::Store::new(1, Default::default());
        OriginalDstHosts::new(
            Arc::new(cfg),
            "od".into(),
            store.counter(crate::stats::StatName::plain("invalid")),
        )
    }

    fn cfg() -> OriginalDst {
        OriginalDst {
            cleanup_interval: std::time::Duration::from_secs(5),
            header: Some(http::HeaderName::from_static("x-envoy-original-dst-host")),
            port_override: None,
            metadata_key: Some(("ns".into(), vec!["k".into()])),
        }
    }

    #[test]
    fn sources_in_envoys_order_with_port_override() {
        let od = hosts(cfg());
        let mut fs = filters::FilterState::default();
        fs.set(
            filters::state::ORIGINAL_DST_ADDRESS,
            Arc::new(filters::AddressObject(
                "127.0.0.9:9".parse().expect("test value"),
            )),
            Default::default(),
        )
        .expect("test value");
        let mut md = filters::DynamicMetadata::default();
        md.namespace_mut("ns").insert(
            "k".into(),
            serde_json::json!(["127.0.0.8:8", "127.0.0.7:7"]),
        );
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-envoy-original-dst-host",
            "127.0.0.6:6".parse().expect("test value"),
        );
        let local = Some("127.0.0.5:5".parse().expect("test value"));
        let all = DstInputs {
            filter_state: [None, Some(&fs)],
            metadata: [None, Some(&md)],
            headers: Some(&h),
            restored_local: local,
        };
        let a = |s: &str| Some(s.parse::<SocketAddr>().expect("test value"));
        assert_eq!(od.destination(&all), a("127.0.0.9:9"));
        let no_fs = DstInputs {
            filter_state: [None, None],
            ..all
        };
        assert_eq!(od.destination(&no_fs), a("127.0.0.8:8"));
        let no_md = DstInputs {
            metadata: [None, None],
            ..no_fs
        };
        assert_eq!(od.destination(&no_md), a("127.0.0.6:6"));
        // An invalid header is counted and skipped.
        let mut bad = http::HeaderMap::new();
        bad.insert(
            "x-envoy-original-dst-host",
            "nope".parse().expect("test value"),
        );
        let bad_h = DstInputs {
            headers: Some(&bad),
            ..no_md
        };
        assert_eq!(od.destination(&bad_h), a("127.0.0.5:5"));
        assert_eq!(od.invalid.value(), 1);
        let none = DstInputs {
            restored_local: None,
            ..bad_h
        };
        assert_eq!(od.destination(&none), None);
        let od = hosts(OriginalDst {
            port_override: Some(15008),
            ..cfg()
        });
        assert_eq!(od.destination(&all), a("127.0.0.9:15008"));
    }

    #[test]
    fn hosts_are_shared_and_cleaned_up_after_an_unused_round() {
        let od = hosts(cfg());
        let a: SocketAddr = "127.0.0.2:80".parse().expect("test value");
        let (h1, made) = od.host(a);
        assert!(made);
        assert_eq!(h1.hostname, "od127.0.0.2:80");
        let (h2, made) = od.host(a);
        assert!(!made && Arc::ptr_eq(&h1, &h2));
        // Picked during the first round: kept, unmarked.
        assert!(od.cleanup(|_| false).is_empty());
        // In use by a connection: kept.
        assert!(od.cleanup(|_| true).is_empty());
        // Neither: removed.
        assert_eq!(od.cleanup(|_| false), HashSet::from([a]));
        assert!(od.hosts().is_empty());
        let (h3, made) = od.host(a);
        assert!(made && !Arc::ptr_eq(&h1, &h3));
    }
}
