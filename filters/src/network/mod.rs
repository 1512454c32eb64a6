//! Network (L4) read filters: what runs on a connection before the chain's
//! terminal filter (`tcp_proxy` or the HCM) gets it.
//!
//! Factories are built once per filter chain and hold all state (a filter
//! keeping per-connection state would get an instance type then). Two hooks,
//! as Envoy's read filters see a connection:
//! - [`NetworkFilterFactory::on_new_connection`]: at accept, after the
//!   listener filters and before any TLS handshake (Envoy's
//!   `onNewConnection`): connection rate limits.
//! - [`NetworkFilterFactory::on_established`]: once the transport is up
//!   (TLS handshake done, the peer's certificate known) and before the
//!   terminal filter reads: authorization. Envoy's filters that decide here
//!   do so at the connection's first `onData`; weir decides before reading,
//!   so a server-first protocol is decided before its server speaks.
use std::net::SocketAddr;
use std::sync::Arc;

use xds_client::config::{ReadFilterConfig, ReadFilterKind};

use crate::StatsScope;

pub mod ext_authz;
pub mod local_ratelimit;
pub mod rbac;
pub mod set_filter_state;

/// What a network filter knows about a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The downstream address (after PROXY protocol, if any).
    pub remote: SocketAddr,
    /// The socket's own peer address.
    pub direct_remote: SocketAddr,
    /// The address the connection was accepted on (or the PROXY protocol's
    /// destination).
    pub local: SocketAddr,
    /// The requested server name (SNI), lower-cased.
    pub sni: Option<&'a str>,
    /// The peer certificate's identity, after a TLS handshake that validated
    /// one (`on_established` only).
    pub peer: Option<PeerIdentity<'a>>,
    /// Whether weir terminated TLS on the connection (`on_established`
    /// only; with or without a peer certificate).
    pub tls: bool,
    /// The connection's filter state (`on_established` only: what
    /// `set_filter_state` put there at the new connection).
    pub filter_state: Option<&'a crate::FilterState>,
    /// URI SANs of the certificate weir presented (`on_close` only).
    pub local_uri_sans: &'a [String],
    /// The upstream TLS connection's first URI SANs, ours and the peer's
    /// (`on_close` only: for Istio's `source` reporter).
    pub upstream_sans: (Option<&'a str>, Option<&'a str>),
    /// The connection's dynamic metadata (what the PROXY protocol
    /// listener filter's `rules` set), for RBAC `metadata` matchers.
    pub metadata: Option<&'a crate::state::DynamicMetadata>,
}

/// A validated peer certificate's names.
#[derive(Debug, Clone, Copy)]
pub struct PeerIdentity<'a> {
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
    /// RFC 2253 subject, as Envoy prints it.
    pub subject: &'a str,
}

/// What the proxy knows when a `tcp_proxy` connection ends.
#[derive(Debug, Clone, Copy)]
pub struct ConnEnd<'a> {
    /// Bytes received from downstream.
    pub bytes_received: u64,
    /// Bytes sent to downstream.
    pub bytes_sent: u64,
    /// The upstream cluster, if one was chosen.
    pub cluster: Option<&'a str>,
    /// The response flags in the order set (see `flags_short`).
    pub flags: u128,
    /// Renders `flags` as `%RESPONSE_FLAGS%`.
    pub flags_short: fn(u128) -> String,
}

/// A network filter's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetAction {
    Continue,
    /// Close the connection at once, without flushing.
    Close,
}

pub trait NetworkFilterFactory: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    fn on_new_connection(&self, _conn: &ConnectionInfo<'_>) -> NetAction {
        NetAction::Continue
    }
    fn on_established(&self, _conn: &ConnectionInfo<'_>) -> NetAction {
        NetAction::Continue
    }
    /// After `on_established` continued: a decision that waits on a call
    /// (ext_authz); `None` (the default): nothing to wait for.
    fn check(&self, _conn: &ConnectionInfo<'_>) -> Option<CheckFuture> {
        None
    }
    /// Before [`Self::on_new_connection`]: objects this filter puts into the
    /// connection's filter state (`set_filter_state`).
    fn set_state(&self, _conn: &ConnectionInfo<'_>, _state: &mut crate::FilterState) {}
    /// A `tcp_proxy` connection ended (`conn` as at `on_established`).
    fn on_close(&self, _conn: &ConnectionInfo<'_>, _end: &ConnEnd<'_>) {}
}

/// A network filter's pending decision.
pub type CheckFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = NetAction> + Send + 'static>>;

/// A filter chain's read filters, in order.
#[derive(Debug, Clone, Default)]
pub struct NetworkChain {
    pub filters: Vec<Arc<dyn NetworkFilterFactory>>,
    /// Whether a filter may wait ([`NetworkChain::check`]).
    pub checks: bool,
    /// Istio's metadata exchange, which the proxy runs on the byte stream
    /// (not a hook filter).
    pub mx: Option<Arc<crate::istio::mx::MetadataExchange>>,
}

impl NetworkChain {
    /// Builds the filters; they create their stats in `stats` (a scope at
    /// the root of the store: names are absolute).
    pub fn build(configs: &[ReadFilterConfig], stats: &Arc<dyn StatsScope>) -> NetworkChain {
        let none: Arc<dyn crate::callout::Callouts> = Arc::new(crate::callout::NoCallouts);
        Self::build_with(configs, stats, &none)
    }

    /// [`NetworkChain::build`] with the proxy's callouts (ext_authz).
    pub fn build_with(
        configs: &[ReadFilterConfig],
        stats: &Arc<dyn StatsScope>,
        callouts: &Arc<dyn crate::callout::Callouts>,
    ) -> NetworkChain {
        let checks = configs
            .iter()
            .any(|c| matches!(c.kind, ReadFilterKind::ExtAuthz(_)));
        let mx = configs.iter().find_map(|c| match &c.kind {
            ReadFilterKind::MetadataExchange(m) => {
                Some(Arc::new(crate::istio::mx::MetadataExchange::new(
                    m.clone(),
                    &crate::istio::local_node(),
                    crate::istio::mx::MxStats::new(stats),
                )))
            }
            _ => None,
        });
        let filters = configs
            .iter()
            .filter_map(|c| -> Option<Arc<dyn NetworkFilterFactory>> {
                Some(match &c.kind {
                    ReadFilterKind::MetadataExchange(_) => return None,
                    ReadFilterKind::LocalRateLimit(l) => Arc::new(
                        local_ratelimit::LocalRateLimitFactory::new(c.name.clone(), l, stats),
                    ),
                    ReadFilterKind::Rbac(r) => {
                        Arc::new(rbac::RbacFactory::new(c.name.clone(), r.clone(), stats))
                    }
                    ReadFilterKind::ExtAuthz(e) => Arc::new(ext_authz::ExtAuthzFactory::new(
                        c.name.clone(),
                        e.clone(),
                        stats,
                        callouts,
                    )),
                    ReadFilterKind::SetFilterState(v) => Arc::new(
                        set_filter_state::SetFilterStateFactory::new(c.name.clone(), v.clone()),
                    ),
                    ReadFilterKind::IstioStats(s) => {
                        Arc::new(crate::istio::stats::IstioTcpStatsFactory::new(
                            c.name.clone(),
                            s.clone(),
                            crate::istio::local_node(),
                            stats,
                        ))
                    }
                })
            })
            .collect();
        NetworkChain {
            filters,
            checks,
            mx,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs `on_new_connection` in order (each filter's state first); the
    /// first `Close` wins.
    pub fn on_new_connection(
        &self,
        conn: &ConnectionInfo<'_>,
        state: &mut crate::FilterState,
    ) -> NetAction {
        for f in &self.filters {
            f.set_state(conn, state);
            if f.on_new_connection(conn) == NetAction::Close {
                return NetAction::Close;
            }
        }
        NetAction::Continue
    }

    /// Runs the filters' waiting decisions in order (only when
    /// [`NetworkChain::checks`]); the first `Close` wins.
    pub async fn check(&self, conn: &ConnectionInfo<'_>) -> NetAction {
        for f in &self.filters {
            if let Some(fut) = f.check(conn) {
                if fut.await == NetAction::Close {
                    return NetAction::Close;
                }
            }
        }
        NetAction::Continue
    }

    /// Runs every filter's `on_close`.
    pub fn on_close(&self, conn: &ConnectionInfo<'_>, end: &ConnEnd<'_>) {
        for f in &self.filters {
            f.on_close(conn, end);
        }
    }

    /// Runs `on_established` in order; the first `Close` wins.
    pub fn on_established(&self, conn: &ConnectionInfo<'_>) -> NetAction {
        for f in &self.filters {
            if f.on_established(conn) == NetAction::Close {
                return NetAction::Close;
            }
        }
        NetAction::Continue
    }
}
