//! Network read filters (before a chain's terminal filter).
use std::sync::Arc;

use crate::api::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit;
use crate::api::envoy::r#type::v3::TokenBucket;
use crate::api::google::protobuf as pb;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

const LOCAL_RATE_LIMIT: &str = "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit";

/// The read filter `any` configures, `None` when weir has none of its type.
pub fn read_filter(
    name: &str,
    any: &pb::Any,
    path: &str,
) -> Result<Option<ReadFilterConfig>, ConfigErrors> {
    let kind = match any.type_url.rsplit('/').next().unwrap_or_default() {
        LOCAL_RATE_LIMIT => {
            let p: LocalRateLimit = super::decode(any, path)?;
            ReadFilterKind::LocalRateLimit(Arc::new(local_rate_limit(&p, path)?))
        }
        super::rbac::NETWORK_RBAC => {
            let p = super::decode(any, path)?;
            ReadFilterKind::Rbac(Arc::new(super::rbac::network_rbac(&p, path)?))
        }
        super::set_filter_state::NETWORK_SET_FILTER_STATE => {
            let p = super::decode(any, path)?;
            ReadFilterKind::SetFilterState(Arc::new(
                super::set_filter_state::network_set_filter_state(&p, path)?,
            ))
        }
        _ => return Ok(None),
    };
    Ok(Some(ReadFilterConfig {
        name: name.into(),
        kind,
    }))
}

fn local_rate_limit(p: &LocalRateLimit, path: &str) -> Result<NetworkLocalRateLimit, ConfigErrors> {
    if p.stat_prefix.is_empty() {
        return Err(err(
            join(path, "stat_prefix"),
            "value length must be at least 1 characters",
        ));
    }
    let Some(b) = &p.token_bucket else {
        return Err(err(join(path, "token_bucket"), "value is required"));
    };
    Ok(NetworkLocalRateLimit {
        stat_prefix: p.stat_prefix.clone(),
        token_bucket: token_bucket(b, &join(path, "token_bucket"))?,
        enabled: p
            .runtime_enabled
            .as_ref()
            .is_none_or(|r| r.default_value.is_some_and(|v| v.value)),
        share_key: p.share_key.clone(),
    })
}

/// `envoy.type.v3.TokenBucket` for Envoy's local rate limiters: positive
/// `tokens_per_fill`, `fill_interval` of at least 50 ms (`max_tokens` 0:
/// always empty).
pub fn token_bucket(b: &TokenBucket, path: &str) -> Result<TokenBucketConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let tokens_per_fill = b.tokens_per_fill.map_or(1, |v| v.value);
    if tokens_per_fill == 0 {
        errs.push(
            join(path, "tokens_per_fill"),
            "value must be greater than 0",
        );
    }
    let fill_interval = match &b.fill_interval {
        None => {
            errs.push(join(path, "fill_interval"), "value is required");
            None
        }
        Some(d) => match super::duration(d, &join(path, "fill_interval")) {
            Ok(d) if d.as_millis() < 50 => {
                errs.push(
                    join(path, "fill_interval"),
                    "local rate limit token bucket fill timer must be >= 50ms",
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
    };
    match fill_interval {
        Some(fill_interval) if errs.is_empty() => Ok(TokenBucketConfig {
            max_tokens: b.max_tokens,
            tokens_per_fill,
            fill_interval,
        }),
        _ => Err(errs),
    }
}
