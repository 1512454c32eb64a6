//! `envoy.filters.network.rbac`, as Envoy 1.40's network RBAC filter with
//! `enforcement_type: ONE_TIME_ON_FIRST_BYTE`: the shadow engine and the
//! enforced one are evaluated once per connection, when the transport is up
//! (weir decides before the first read; see the module above); a denial
//! closes the connection at once. The engines see an empty request header
//! map, as Envoy's: `header` and `url_path` rules see no `:path` or
//! `:method`; `metadata` rules see the connection's dynamic metadata (the
//! PROXY protocol listener filter's `rules`). Stats: `<stat_prefix>.rbac.{allowed,denied}` and
//! `<stat_prefix>.rbac.<shadow_rules_stat_prefix>shadow_{allowed,denied}`.
use std::sync::Arc;

use xds_client::config::{Name, NetworkRbac};

use super::{ConnectionInfo, NetAction, NetworkFilterFactory};
use crate::rbac::{Engine, Input, Peer};
use crate::{Counter, StatsScope};

pub struct RbacFactory {
    name: Name,
    config: Arc<NetworkRbac>,
    allowed: Arc<dyn Counter>,
    denied: Arc<dyn Counter>,
    shadow_allowed: Arc<dyn Counter>,
    shadow_denied: Arc<dyn Counter>,
}

impl std::fmt::Debug for RbacFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbacFactory")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RbacFactory {
    /// `stats` is rooted at the store (names are absolute).
    pub fn new(name: Name, config: Arc<NetworkRbac>, stats: &Arc<dyn StatsScope>) -> RbacFactory {
        use crate::rbac::http::stat_join;
        let base = stat_join(&stat_join(&config.stat_prefix, "rbac."), "");
        let shadow_base = stat_join(&base, &config.shadow_rules_stat_prefix);
        RbacFactory {
            name,
            allowed: stats.counter(&stat_join(&base, "allowed")),
            denied: stats.counter(&stat_join(&base, "denied")),
            shadow_allowed: stats.counter(&stat_join(&shadow_base, "shadow_allowed")),
            shadow_denied: stats.counter(&stat_join(&shadow_base, "shadow_denied")),
            config,
        }
    }
}

impl NetworkFilterFactory for RbacFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_established(&self, conn: &ConnectionInfo<'_>) -> NetAction {
        let input = Input {
            head: None,
            source: conn.remote,
            direct_remote: conn.direct_remote,
            remote: conn.remote,
            local: conn.local,
            sni: conn.sni.unwrap_or(""),
            tls: conn.tls.then(|| match &conn.peer {
                Some(p) => Peer {
                    uri_sans: p.uri_sans,
                    dns_sans: p.dns_sans,
                    subject: p.subject,
                },
                None => Peer::default(),
            }),
            filter_state: [None, conn.filter_state],
            metadata: conn.metadata,
        };
        let c = &*self.config;
        if let Some(shadow) = Engine::of(c.shadow_rules.as_ref(), c.shadow_matcher.as_ref()) {
            let r = shadow.evaluate(&input);
            if r.allowed {
                self.shadow_allowed.inc();
            } else {
                self.shadow_denied.inc();
            }
            tracing::debug!(
                allowed = r.allowed,
                policy = r.policy.unwrap_or("none"),
                "rbac: shadow decision"
            );
        }
        let Some(engine) = Engine::of(c.rules.as_ref(), c.matcher.as_ref()) else {
            return NetAction::Continue;
        };
        let r = engine.evaluate(&input);
        tracing::debug!(
            allowed = r.allowed,
            policy = r.policy.unwrap_or("none"),
            "rbac: enforced decision"
        );
        if r.allowed {
            self.allowed.inc();
            NetAction::Continue
        } else {
            self.denied.inc();
            NetAction::Close
        }
    }
}
