//! `envoy.filters.http.rbac`, as Envoy 1.40's
//! `RoleBasedAccessControlFilter::decodeHeaders`: the shadow engine is
//! evaluated and counted first, then the enforced one; a denial answers 403
//! `RBAC: access denied` with details
//! `rbac_access_denied_matched_policy[<policy>|none]`. The most specific
//! `RBACPerRoute` replaces both engines on a route. Without any engine
//! there is no instance: nothing runs, nothing is counted.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use xds_client::config::{FilterOverride, HttpRbac, Name};

use super::{Engine, Input, Peer};
use crate::http::{
    Action, Counter, FilterContext, HttpFilter, HttpFilterFactory, LocalReply, RouteView,
    StatsScope,
};

const DENIED_BODY: &[u8] = b"RBAC: access denied";

/// `http.<stat_prefix>.rbac.<prefix>.` counters.
struct Stats {
    allowed: Arc<dyn Counter>,
    denied: Arc<dyn Counter>,
    shadow_allowed: Arc<dyn Counter>,
    shadow_denied: Arc<dyn Counter>,
}

/// Envoy's `statPrefixJoin`.
pub fn stat_join(prefix: &str, token: &str) -> String {
    if prefix.is_empty() {
        token.to_owned()
    } else if prefix.ends_with('.') {
        format!("{prefix}{token}")
    } else {
        format!("{prefix}.{token}")
    }
}

impl Stats {
    /// As Envoy 1.40: the enforced counters under `rbac.` joined with the
    /// rules prefix, the shadow ones under `rbac.` joined with the shadow
    /// prefix (`rbac.<rules>.allowed`, `rbac.<shadow>.shadow_allowed`).
    fn new(scope: &dyn StatsScope, rules: &str, shadow: &str) -> Stats {
        let base = stat_join("rbac.", rules);
        let shadow_base = stat_join("rbac.", shadow);
        Stats {
            allowed: scope.counter(&stat_join(&base, "allowed")),
            denied: scope.counter(&stat_join(&base, "denied")),
            shadow_allowed: scope.counter(&stat_join(&shadow_base, "shadow_allowed")),
            shadow_denied: scope.counter(&stat_join(&shadow_base, "shadow_denied")),
        }
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

/// The HTTP RBAC filter's factory.
#[derive(Debug)]
pub struct RbacFactory {
    name: Name,
    config: Arc<HttpRbac>,
    stats: Arc<Stats>,
}

impl RbacFactory {
    /// `scope` is the HCM's (`http.<stat_prefix>.`).
    pub fn new(name: Name, config: Arc<HttpRbac>, scope: &Arc<dyn StatsScope>) -> RbacFactory {
        RbacFactory {
            name,
            stats: Arc::new(Stats::new(
                &**scope,
                &config.rules_stat_prefix,
                &config.shadow_rules_stat_prefix,
            )),
            config,
        }
    }
}

impl HttpFilterFactory for RbacFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        let config = match route.override_for(&self.name) {
            Some(FilterOverride::Rbac(c)) => c,
            _ => &self.config,
        };
        if config.rules.is_none()
            && config.shadow_rules.is_none()
            && config.matcher.is_none()
            && config.shadow_matcher.is_none()
        {
            return None;
        }
        Some(Box::new(RbacFilter {
            config: config.clone(),
            stats: self.stats.clone(),
        }))
    }
}

struct RbacFilter {
    config: Arc<HttpRbac>,
    stats: Arc<Stats>,
}

const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// What the engines read of a request.
fn input<'a>(cx: &'a FilterContext, head: &'a http::request::Parts) -> Input<'a> {
    let d = cx.downstream.as_deref();
    Input {
        head: Some(head),
        source: d.map_or(UNSPECIFIED, |d| d.remote),
        direct_remote: d.map_or(UNSPECIFIED, |d| d.direct_remote),
        remote: cx
            .downstream_remote
            .or(d.map(|d| d.remote))
            .unwrap_or(UNSPECIFIED),
        local: d.map_or(UNSPECIFIED, |d| d.local),
        sni: d.and_then(|d| d.sni.as_deref()).unwrap_or(""),
        tls: d.filter(|d| d.tls).map(|d| Peer {
            uri_sans: &d.peer_uri_sans,
            dns_sans: &d.peer_dns_sans,
            subject: d.peer_subject.as_deref().unwrap_or(""),
        }),
        filter_state: [Some(&cx.filter_state), d.map(|d| &d.filter_state)],
        metadata: Some(&cx.metadata),
    }
}

impl HttpFilter for RbacFilter {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let c = &*self.config;
        if let Some(shadow) = Engine::of(c.shadow_rules.as_ref(), c.shadow_matcher.as_ref()) {
            let r = shadow.evaluate(&input(cx, head));
            if r.allowed {
                self.stats.shadow_allowed.inc();
            } else {
                self.stats.shadow_denied.inc();
            }
            tracing::debug!(
                allowed = r.allowed,
                policy = r.policy.unwrap_or("none"),
                "rbac: shadow decision"
            );
            // As Envoy: the shadow result (and the matched policy) in the
            // dynamic metadata, for later filters (Istio's CUSTOM
            // ext_authz enables itself on `istio_ext_authz_*`).
            let prefix = &c.shadow_rules_stat_prefix;
            let mut m = serde_json::Map::new();
            if let Some(policy) = r.policy {
                m.insert(
                    format!("{prefix}shadow_effective_policy_id"),
                    serde_json::Value::String(policy.to_owned()),
                );
            }
            m.insert(
                format!("{prefix}shadow_engine_result"),
                serde_json::Value::String(if r.allowed { "allowed" } else { "denied" }.into()),
            );
            cx.metadata.merge("envoy.filters.http.rbac", m);
        }
        let Some(engine) = Engine::of(c.rules.as_ref(), c.matcher.as_ref()) else {
            return Action::Continue;
        };
        let r = engine.evaluate(&input(cx, head));
        tracing::debug!(
            allowed = r.allowed,
            policy = r.policy.unwrap_or("none"),
            "rbac: enforced decision"
        );
        if r.allowed {
            self.stats.allowed.inc();
            return Action::Continue;
        }
        self.stats.denied.inc();
        Action::Respond(LocalReply {
            status: http::StatusCode::FORBIDDEN,
            body: Bytes::from_static(DENIED_BODY),
            flag: None,
            details: r.details,
            grpc_status: None,
        })
    }
}
