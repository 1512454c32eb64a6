//! `ConfigSource`, `ApiConfigSource` and the bootstrap's `dynamic_resources`.
use crate::api::envoy::config::bootstrap::v3::bootstrap::DynamicResources;
use crate::api::envoy::config::core::v3 as core;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::duration;

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// A `ConfigSource`.
pub fn config_source(cs: &core::ConfigSource, path: &str) -> Result<ConfigSource, ConfigErrors> {
    use core::config_source::ConfigSourceSpecifier as S;
    let mut errs = ConfigErrors::default();
    if !cs.authorities.is_empty() {
        errs.push(
            join(path, "authorities"),
            "xDS-TP authorities are not implemented",
        );
    }
    let initial_fetch_timeout = match &cs.initial_fetch_timeout {
        None => Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
        Some(d) => match duration(d, &join(path, "initial_fetch_timeout")) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
    };
    let kind = match &cs.config_source_specifier {
        Some(S::Ads(_)) => Some(SourceKind::Ads),
        Some(S::ApiConfigSource(a)) => match api_source(a, &join(path, "api_config_source")) {
            Ok(a) => Some(SourceKind::Grpc(a)),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        Some(S::Path(p)) => Some(SourceKind::Path(p.into())),
        Some(S::PathConfigSource(p)) => {
            if p.watched_directory.is_some() {
                errs.push(
                    join(path, "path_config_source.watched_directory"),
                    "watched_directory is not implemented (the file itself is watched)",
                );
            }
            Some(SourceKind::Path(p.path.as_str().into()))
        }
        Some(S::Self_(_)) => {
            errs.push(
                join(path, "self"),
                "the `self` config source is not implemented; use ads or api_config_source",
            );
            None
        }
        None => {
            errs.push(
                path,
                "a config source needs ads, api_config_source or path_config_source",
            );
            None
        }
    };
    match kind {
        Some(kind) if errs.is_empty() => Ok(ConfigSource {
            kind,
            initial_fetch_timeout,
        }),
        _ => Err(errs),
    }
}

/// An `ApiConfigSource` (`ads_config` or `config_source.api_config_source`).
pub fn api_source(a: &core::ApiConfigSource, path: &str) -> Result<ApiSource, ConfigErrors> {
    use core::api_config_source::ApiType;
    use core::grpc_service::TargetSpecifier as T;
    let mut errs = ConfigErrors::default();
    let delta = match ApiType::try_from(a.api_type) {
        Ok(ApiType::Grpc) | Ok(ApiType::AggregatedGrpc) => false,
        Ok(ApiType::DeltaGrpc) | Ok(ApiType::AggregatedDeltaGrpc) => true,
        Ok(ApiType::Rest) => {
            errs.push(
                join(path, "api_type"),
                "REST xDS is not implemented; use GRPC or DELTA_GRPC",
            );
            false
        }
        _ => {
            errs.push(
                join(path, "api_type"),
                "api_type must be GRPC or DELTA_GRPC",
            );
            false
        }
    };
    if !a.cluster_names.is_empty() {
        errs.push(
            join(path, "cluster_names"),
            "cluster_names is for REST xDS; use grpc_services",
        );
    }
    if !a.config_validators.is_empty() {
        errs.push(
            join(path, "config_validators"),
            "config validators are not implemented",
        );
    }
    let mut target = None;
    match a.grpc_services.as_slice() {
        [] => errs.push(
            join(path, "grpc_services"),
            "one grpc_services entry is required",
        ),
        [g] => {
            let gpath = join(path, "grpc_services[0]");
            if !g.initial_metadata.is_empty() {
                errs.push(
                    join(&gpath, "initial_metadata"),
                    "initial_metadata is not implemented",
                );
            }
            match &g.target_specifier {
                Some(T::EnvoyGrpc(e)) => {
                    if e.cluster_name.is_empty() {
                        errs.push(
                            join(&gpath, "envoy_grpc.cluster_name"),
                            "a cluster name is required",
                        );
                    }
                    let authority = if e.authority.is_empty() {
                        e.cluster_name.clone()
                    } else {
                        e.authority.clone()
                    };
                    target = Some((
                        GrpcTarget::Cluster(e.cluster_name.as_str().into()),
                        authority,
                    ));
                }
                Some(T::GoogleGrpc(g)) => {
                    // Plaintext targets map onto the same connection an
                    // envoy_grpc cluster would make (credentials are
                    // rejected by the field table).
                    let uri = g.target_uri.trim();
                    let ok = uri
                        .strip_prefix("unix:")
                        .is_some_and(|p| !p.trim_start_matches('/').is_empty())
                        || uri
                            .trim_start_matches("ipv4:")
                            .trim_start_matches("ipv6:")
                            .parse::<std::net::SocketAddr>()
                            .is_ok();
                    if ok {
                        target = Some((GrpcTarget::Uri(uri.to_owned()), uri.to_owned()));
                    } else {
                        errs.push(
                            join(&gpath, "google_grpc.target_uri"),
                            format!("{uri:?} is not an IP:port or unix: target weir can reach; use envoy_grpc with a static cluster"),
                        );
                    }
                }
                None => errs.push(&gpath, "envoy_grpc is required"),
            }
        }
        _ => errs.push(
            join(path, "grpc_services"),
            "exactly one grpc_services entry is supported",
        ),
    }
    match target {
        Some((target, authority)) if errs.is_empty() => Ok(ApiSource {
            target,
            authority,
            delta,
            set_node_on_first_message_only: a.set_node_on_first_message_only,
        }),
        _ => Err(errs),
    }
}

/// The bootstrap's `dynamic_resources`.
pub fn dynamic_config(d: &DynamicResources, path: &str) -> Result<DynamicConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = DynamicConfig::default();
    if let Some(a) = &d.ads_config {
        match api_source(a, &join(path, "ads_config")) {
            Ok(a) => out.ads = Some(a),
            Err(e) => errs.extend(e),
        }
    }
    for (field, cs, slot) in [
        ("lds_config", &d.lds_config, &mut out.lds),
        ("cds_config", &d.cds_config, &mut out.cds),
    ] {
        if let Some(cs) = cs {
            match config_source(cs, &join(path, field)) {
                Ok(c) => *slot = Some(c),
                Err(e) => errs.extend(e),
            }
        }
    }
    for (field, v) in [
        ("lds_resources_locator", &d.lds_resources_locator),
        ("cds_resources_locator", &d.cds_resources_locator),
    ] {
        if !v.is_empty() {
            errs.push(
                join(path, field),
                "xDS-TP resource locators are not implemented",
            );
        }
    }
    for (field, cs) in [("lds_config", &out.lds), ("cds_config", &out.cds)] {
        if matches!(
            cs,
            Some(ConfigSource {
                kind: SourceKind::Ads,
                ..
            })
        ) && out.ads.is_none()
        {
            errs.push(
                join(path, field),
                "`ads` needs dynamic_resources.ads_config",
            );
        }
    }
    errs.into_result(out)
}

/// Checks that a source's gRPC cluster is a static cluster of the bootstrap
/// and that `ads` has an `ads_config`.
pub fn check_source(
    source: &ConfigSource,
    path: &str,
    ads: bool,
    static_clusters: &crate::config::ClusterMap,
    errs: &mut ConfigErrors,
) {
    match &source.kind {
        SourceKind::Ads if !ads => errs.push(path, "`ads` needs dynamic_resources.ads_config"),
        SourceKind::Grpc(ApiSource {
            target: GrpcTarget::Cluster(c),
            ..
        }) if !static_clusters.contains_key(c) => errs.push(
            join(
                path,
                "api_config_source.grpc_services[0].envoy_grpc.cluster_name",
            ),
            format!("unknown static cluster {c:?}"),
        ),
        _ => {}
    }
}
