//! `envoy.filters.network.ext_authz` as Envoy 1.40's network `ExtAuthz`
//! filter: one `Authorization/Check` per connection (source and
//! destination peers, the SNI as the destination service); a denial, or an
//! error without `failure_mode_allow`, closes the connection. Envoy asks at
//! the connection's first data; weir asks once the transport is up, before
//! reading (as the network RBAC filter decides).
use std::sync::Arc;

use xds_client::api::envoy::config::core::v3 as core;
use xds_client::api::envoy::service::auth::v3 as auth;
use xds_client::config::NetworkExtAuthz;

use super::{ConnectionInfo, NetAction, NetworkFilterFactory};
use crate::callout::{grpc_unary, Callouts};
use crate::http::{Counter, Gauge, StatsScope};

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

struct Stats {
    total: Arc<dyn Counter>,
    ok: Arc<dyn Counter>,
    denied: Arc<dyn Counter>,
    error: Arc<dyn Counter>,
    failure_mode_allowed: Arc<dyn Counter>,
    cx_closed: Arc<dyn Counter>,
    active: Arc<dyn Gauge>,
}

pub struct ExtAuthzFactory {
    name: Arc<str>,
    cfg: Arc<NetworkExtAuthz>,
    callouts: Arc<dyn Callouts>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for ExtAuthzFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkExtAuthz")
            .field("name", &self.name)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl ExtAuthzFactory {
    pub fn new(
        name: Arc<str>,
        cfg: Arc<NetworkExtAuthz>,
        stats: &Arc<dyn StatsScope>,
        callouts: &Arc<dyn Callouts>,
    ) -> Self {
        // Envoy: `ext_authz.<stat_prefix>.<name>`.
        let p = format!("ext_authz.{}.", cfg.stat_prefix);
        let c = |n: &str| stats.counter(&format!("{p}{n}"));
        let s = Stats {
            total: c("total"),
            ok: c("ok"),
            denied: c("denied"),
            error: c("error"),
            failure_mode_allowed: c("failure_mode_allowed"),
            cx_closed: c("cx_closed"),
            active: stats.gauge(&format!("{p}active")),
        };
        ExtAuthzFactory {
            name,
            cfg,
            callouts: callouts.clone(),
            stats: Arc::new(s),
        }
    }
}

fn address(a: std::net::SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

impl NetworkFilterFactory for ExtAuthzFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, conn: &ConnectionInfo<'_>) -> Option<super::CheckFuture> {
        use auth::attribute_context as ac;
        let principal = conn
            .peer
            .map(|p| {
                p.uri_sans
                    .first()
                    .or(p.dns_sans.first())
                    .cloned()
                    .unwrap_or_else(|| p.subject.to_owned())
            })
            .unwrap_or_default();
        let req = auth::CheckRequest {
            attributes: Some(auth::AttributeContext {
                source: Some(ac::Peer {
                    address: Some(address(conn.remote)),
                    principal,
                    ..Default::default()
                }),
                destination: Some(ac::Peer {
                    address: Some(address(conn.local)),
                    service: conn.sni.unwrap_or_default().to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let g = &self.cfg.service;
        let call = grpc_unary::<_, auth::CheckResponse>(
            &*self.callouts,
            &g.cluster,
            &g.authority,
            CHECK,
            &req,
            self.cfg.timeout,
            &g.initial_metadata,
        );
        let stats = self.stats.clone();
        let allow_on_error = self.cfg.failure_mode_allow;
        stats.total.inc();
        stats.active.inc();
        Some(Box::pin(async move {
            let r = call.await;
            stats.active.dec();
            match r {
                Ok(r) if r.status.as_ref().map_or(0, |s| s.code) == 0 => {
                    stats.ok.inc();
                    NetAction::Continue
                }
                Ok(_) => {
                    stats.denied.inc();
                    stats.cx_closed.inc();
                    NetAction::Close
                }
                Err(e) => {
                    tracing::debug!(error = %e, "network check failed");
                    stats.error.inc();
                    if allow_on_error {
                        stats.failure_mode_allowed.inc();
                        NetAction::Continue
                    } else {
                        stats.cx_closed.inc();
                        NetAction::Close
                    }
                }
            }
        }))
    }
}
