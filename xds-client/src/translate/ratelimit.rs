//! `rate_limits` of routes and virtual hosts (`envoy.config.route.v3.RateLimit`).
//!
//! The action kinds weir implements are translated; the support table
//! rejects the others (`source_cluster`, `metadata`, `dynamic_metadata`,
//! `extension`, `remote_address_match`) and `limit` / `hits_addend` /
//! `apply_on_stream_done`, naming the field.
use std::sync::Arc;

use crate::api::envoy::config::route::v3 as r;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

/// Envoy's `RateLimitPolicyImpl::MAX_STAGE_NUMBER`.
pub const MAX_STAGE: u32 = 10;

/// A route's or virtual host's `rate_limits` (`path` names the list).
pub fn rate_limits(p: &[r::RateLimit], path: &str) -> Result<Arc<[RateLimitPolicy]>, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = Vec::with_capacity(p.len());
    for (i, rl) in p.iter().enumerate() {
        match rate_limit(rl, &format!("{path}[{i}]")) {
            Ok(rl) => out.push(rl),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(out.into())
}

fn rate_limit(p: &r::RateLimit, path: &str) -> Result<RateLimitPolicy, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let stage = p.stage.map_or(0, |s| s.value);
    if stage > MAX_STAGE {
        errs.push(
            join(path, "stage"),
            "value must be less than or equal to 10",
        );
    }
    if p.actions.is_empty() {
        errs.push(
            join(path, "actions"),
            "value must contain at least 1 item(s)",
        );
    }
    let mut actions = Vec::with_capacity(p.actions.len());
    for (i, a) in p.actions.iter().enumerate() {
        match action(a, &format!("{path}.actions[{i}]")) {
            Ok(a) => actions.push(a),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(RateLimitPolicy {
        stage,
        disable_key: p.disable_key.clone(),
        actions,
    })
}

fn or_default(key: &str, default: &str) -> String {
    if key.is_empty() {
        default.to_owned()
    } else {
        key.to_owned()
    }
}

fn action(p: &r::rate_limit::Action, path: &str) -> Result<RateLimitAction, ConfigErrors> {
    use r::rate_limit::action::ActionSpecifier as A;
    Ok(match &p.action_specifier {
        Some(A::DestinationCluster(_)) => RateLimitAction::DestinationCluster,
        Some(A::RequestHeaders(h)) => {
            let hpath = join(path, "request_headers");
            if h.header_name.is_empty() {
                return Err(err(join(&hpath, "header_name"), "value is required"));
            }
            if h.descriptor_key.is_empty() {
                return Err(err(join(&hpath, "descriptor_key"), "value is required"));
            }
            RateLimitAction::RequestHeaders {
                header: super::header_name(
                    &h.header_name.to_ascii_lowercase(),
                    &join(&hpath, "header_name"),
                )?,
                key: h.descriptor_key.clone(),
                skip_if_absent: h.skip_if_absent,
            }
        }
        Some(A::QueryParameters(q)) => {
            let qpath = join(path, "query_parameters");
            if q.query_parameter_name.is_empty() {
                return Err(err(
                    join(&qpath, "query_parameter_name"),
                    "value is required",
                ));
            }
            if q.descriptor_key.is_empty() {
                return Err(err(join(&qpath, "descriptor_key"), "value is required"));
            }
            RateLimitAction::QueryParameters {
                name: q.query_parameter_name.clone(),
                key: q.descriptor_key.clone(),
                skip_if_absent: q.skip_if_absent,
            }
        }
        Some(A::RemoteAddress(_)) => RateLimitAction::RemoteAddress,
        Some(A::MaskedRemoteAddress(m)) => {
            let mpath = join(path, "masked_remote_address");
            let v4 = m.v4_prefix_mask_len.map_or(32, |v| v.value);
            let v6 = m.v6_prefix_mask_len.map_or(128, |v| v.value);
            if v4 > 32 {
                return Err(err(
                    join(&mpath, "v4_prefix_mask_len"),
                    "value must be less than or equal to 32",
                ));
            }
            if v6 > 128 {
                return Err(err(
                    join(&mpath, "v6_prefix_mask_len"),
                    "value must be less than or equal to 128",
                ));
            }
            RateLimitAction::MaskedRemoteAddress {
                v4_len: v4 as u8,
                v6_len: v6 as u8,
            }
        }
        Some(A::GenericKey(g)) => {
            if g.descriptor_value.is_empty() {
                return Err(err(
                    join(path, "generic_key.descriptor_value"),
                    "value length must be at least 1 characters",
                ));
            }
            RateLimitAction::GenericKey {
                key: or_default(&g.descriptor_key, "generic_key"),
                value: g.descriptor_value.clone(),
            }
        }
        Some(A::HeaderValueMatch(h)) => {
            let hpath = join(path, "header_value_match");
            if h.descriptor_value.is_empty() {
                return Err(err(
                    join(&hpath, "descriptor_value"),
                    "value length must be at least 1 characters",
                ));
            }
            if h.headers.is_empty() {
                return Err(err(
                    join(&hpath, "headers"),
                    "value must contain at least 1 item(s)",
                ));
            }
            let mut errs = ConfigErrors::default();
            let mut headers = Vec::with_capacity(h.headers.len());
            for (i, m) in h.headers.iter().enumerate() {
                match super::route::header_matcher(m, &format!("{hpath}.headers[{i}]")) {
                    Ok(m) => headers.push(m),
                    Err(e) => errs.extend(e),
                }
            }
            errs.into_result(RateLimitAction::HeaderValueMatch {
                key: or_default(&h.descriptor_key, "header_match"),
                value: h.descriptor_value.clone(),
                expect_match: h.expect_match.is_none_or(|b| b.value),
                headers,
            })?
        }
        Some(A::QueryParameterValueMatch(q)) => {
            let qpath = join(path, "query_parameter_value_match");
            if q.descriptor_value.is_empty() {
                return Err(err(
                    join(&qpath, "descriptor_value"),
                    "value length must be at least 1 characters",
                ));
            }
            if q.query_parameters.is_empty() {
                return Err(err(
                    join(&qpath, "query_parameters"),
                    "value must contain at least 1 item(s)",
                ));
            }
            let mut params = Vec::with_capacity(q.query_parameters.len());
            for (i, m) in q.query_parameters.iter().enumerate() {
                params.push(query_matcher(m, &format!("{qpath}.query_parameters[{i}]"))?);
            }
            RateLimitAction::QueryParameterValueMatch {
                key: or_default(&q.descriptor_key, "query_match"),
                value: q.descriptor_value.clone(),
                expect_match: q.expect_match.is_none_or(|b| b.value),
                params,
            }
        }
        Some(_) => {
            return Err(err(
                path,
                "this rate limit action is not implemented (destination_cluster, \
                 request_headers, query_parameters, remote_address, masked_remote_address, \
                 generic_key, header_value_match and query_parameter_value_match are)",
            ))
        }
        None => return Err(err(path, "an action is required")),
    })
}

fn query_matcher(q: &r::QueryParameterMatcher, path: &str) -> Result<QueryMatcher, ConfigErrors> {
    use r::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
    let matcher = match &q.query_parameter_match_specifier {
        Some(Q::StringMatch(s)) => Some(super::string_matcher(s, &join(path, "string_match"))?),
        Some(Q::PresentMatch(true)) => None,
        _ => {
            return Err(err(
                path,
                "query parameter matcher needs string_match or present_match: true",
            ))
        }
    };
    Ok(QueryMatcher {
        name: q.name.clone(),
        matcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::envoy::config::route::v3::rate_limit::action::{self, ActionSpecifier as A};
    use crate::api::google::protobuf as pb;

    fn rl(actions: Vec<A>, stage: u32) -> r::RateLimit {
        r::RateLimit {
            stage: Some(pb::UInt32Value { value: stage }),
            actions: actions
                .into_iter()
                .map(|a| r::rate_limit::Action {
                    action_specifier: Some(a),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_rejections() {
        let ok = rate_limits(
            &[rl(
                vec![
                    A::GenericKey(action::GenericKey {
                        descriptor_value: "v".into(),
                        ..Default::default()
                    }),
                    A::MaskedRemoteAddress(action::MaskedRemoteAddress::default()),
                ],
                3,
            )],
            "rl",
        )
        .expect("valid");
        assert_eq!(ok[0].stage, 3);
        assert_eq!(
            ok[0].actions,
            [
                RateLimitAction::GenericKey {
                    key: "generic_key".into(),
                    value: "v".into()
                },
                RateLimitAction::MaskedRemoteAddress {
                    v4_len: 32,
                    v6_len: 128
                }
            ]
        );
        let bad = [
            rl(vec![A::SourceCluster(action::SourceCluster {})], 0),
            rl(vec![A::RemoteAddress(action::RemoteAddress {})], 11),
            rl(
                vec![A::MaskedRemoteAddress(action::MaskedRemoteAddress {
                    v4_prefix_mask_len: Some(pb::UInt32Value { value: 33 }),
                    v6_prefix_mask_len: None,
                })],
                0,
            ),
            rl(vec![], 0),
        ];
        let e = rate_limits(&bad, "rl").expect_err("invalid").to_string();
        for path in [
            "rl[0].actions[0]",
            "rl[1].stage",
            "rl[2].actions[0].masked_remote_address.v4_prefix_mask_len",
            "rl[3].actions",
        ] {
            assert!(e.contains(path), "{path} in {e}");
        }
    }
}
