//! `envoy.filters.network.local_ratelimit`: a token bucket of new
//! connections, as Envoy 1.40's filter: each connection takes a token at
//! accept; without one it is closed at once (no flush) and
//! `local_rate_limit.<stat_prefix>.rate_limited` counts it. Filters with the
//! same `share_key` and token bucket share one bucket, process-wide.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use xds_client::config::{Name, NetworkLocalRateLimit, TokenBucketConfig};

use super::{ConnectionInfo, NetAction, NetworkFilterFactory};
use crate::token_bucket::{BucketSpec, TokenBucket};
use crate::{Counter, StatsScope};

pub struct LocalRateLimitFactory {
    name: Name,
    enabled: bool,
    bucket: Arc<TokenBucket>,
    rate_limited: Arc<dyn Counter>,
}

impl std::fmt::Debug for LocalRateLimitFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRateLimitFactory")
            .field("name", &self.name)
            .field("enabled", &self.enabled)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl LocalRateLimitFactory {
    pub fn new(
        name: Name,
        config: &NetworkLocalRateLimit,
        stats: &Arc<dyn StatsScope>,
    ) -> LocalRateLimitFactory {
        LocalRateLimitFactory {
            name,
            enabled: config.enabled,
            bucket: bucket(&config.share_key, config.token_bucket),
            rate_limited: stats.tagged_counter(
                "local_rate_limit",
                &config.stat_prefix,
                "rate_limited",
                "envoy_local_network_ratelimit_prefix",
            ),
        }
    }
}

fn spec(b: TokenBucketConfig) -> BucketSpec {
    BucketSpec {
        max_tokens: b.max_tokens,
        tokens_per_fill: b.tokens_per_fill,
        fill_interval: b.fill_interval,
    }
}

type Shared = Mutex<HashMap<(String, TokenBucketConfig), Weak<TokenBucket>>>;

/// The bucket for a filter: its own, or the one shared under `share_key`
/// (kept while a filter holds it, as Envoy's shared-limiter singleton).
fn bucket(share_key: &str, b: TokenBucketConfig) -> Arc<TokenBucket> {
    if share_key.is_empty() {
        return Arc::new(TokenBucket::new(spec(b)));
    }
    static SHARED: OnceLock<Shared> = OnceLock::new();
    let mut map = SHARED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    let key = (share_key.to_owned(), b);
    if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
        return existing;
    }
    let fresh = Arc::new(TokenBucket::new(spec(b)));
    map.insert(key, Arc::downgrade(&fresh));
    fresh
}

impl NetworkFilterFactory for LocalRateLimitFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_new_connection(&self, _conn: &ConnectionInfo<'_>) -> NetAction {
        if !self.enabled || self.bucket.try_take() {
            return NetAction::Continue;
        }
        self.rate_limited.inc();
        NetAction::Close
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(share_key: &str, max: u32) -> NetworkLocalRateLimit {
        NetworkLocalRateLimit {
            stat_prefix: "p".into(),
            token_bucket: TokenBucketConfig {
                max_tokens: max,
                tokens_per_fill: 1,
                fill_interval: Duration::from_secs(60),
            },
            enabled: true,
            share_key: share_key.into(),
        }
    }

    fn conn() -> ConnectionInfo<'static> {
        let a = "127.0.0.1:1".parse().expect("addr");
        ConnectionInfo {
            local_uri_sans: &[],
            upstream_sans: (None, None),
            remote: a,
            direct_remote: a,
            local: a,
            sni: None,
            peer: None,
            tls: false,
            filter_state: None,
            metadata: None,
        }
    }

    #[test]
    fn closes_when_out_of_tokens_and_shares_by_key() {
        let stats: Arc<dyn StatsScope> = Arc::new(crate::NoStats);
        let f = LocalRateLimitFactory::new("a".into(), &cfg("", 2), &stats);
        assert_eq!(f.on_new_connection(&conn()), NetAction::Continue);
        assert_eq!(f.on_new_connection(&conn()), NetAction::Continue);
        assert_eq!(f.on_new_connection(&conn()), NetAction::Close);
        // Same key and bucket: one bucket for both filters.
        let a = LocalRateLimitFactory::new("a".into(), &cfg("k", 1), &stats);
        let b = LocalRateLimitFactory::new("b".into(), &cfg("k", 1), &stats);
        assert_eq!(a.on_new_connection(&conn()), NetAction::Continue);
        assert_eq!(b.on_new_connection(&conn()), NetAction::Close);
        // Another bucket under the same key is not shared.
        let c = LocalRateLimitFactory::new("c".into(), &cfg("k", 2), &stats);
        assert_eq!(c.on_new_connection(&conn()), NetAction::Continue);
        // Disabled: never limits.
        let mut d = cfg("", 1);
        d.enabled = false;
        let d = LocalRateLimitFactory::new("d".into(), &d, &stats);
        for _ in 0..3 {
            assert_eq!(d.on_new_connection(&conn()), NetAction::Continue);
        }
    }
}
