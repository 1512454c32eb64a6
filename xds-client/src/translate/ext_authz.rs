//! `envoy.filters.http.ext_authz` translation (and `GrpcService`).
use std::time::Duration;

use crate::api::envoy::config::core::v3 as core;
use crate::api::envoy::extensions::filters::http::ext_authz::v3 as ea;
use crate::config::*;
use crate::error::{join, ConfigErrors};

/// `envoy.extensions.filters.http.ext_authz.v3.ExtAuthz`.
pub const EXT_AUTHZ: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
/// `envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute`.
pub const EXT_AUTHZ_PER_ROUTE: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";

/// Envoy's default ext_authz call timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

/// A `GrpcService` weir can call: `envoy_grpc` only.
pub fn grpc_service(g: &core::GrpcService, path: &str) -> Result<GrpcService, ConfigErrors> {
    use core::grpc_service::TargetSpecifier as T;
    let mut errs = ConfigErrors::default();
    if g.retry_policy.is_some() {
        errs.push(
            join(path, "retry_policy"),
            "retries of gRPC calls are not implemented",
        );
    }
    let mut initial_metadata = Vec::with_capacity(g.initial_metadata.len());
    for (i, h) in g.initial_metadata.iter().enumerate() {
        let hpath = format!("{path}.initial_metadata[{i}]");
        let raw = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        };
        match (
            super::header_name(&h.key.to_ascii_lowercase(), &join(&hpath, "key")),
            super::header_value(&raw, &join(&hpath, "value")),
        ) {
            (Ok(k), Ok(v)) => initial_metadata.push((k, v)),
            (a, b) => {
                errs.extend(a.err().unwrap_or_default());
                errs.extend(b.err().unwrap_or_default());
            }
        }
    }
    let timeout = match &g.timeout {
        Some(d) => match super::duration(d, &join(path, "timeout")) {
            Ok(d) => Some(d),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    let (cluster, authority) = match &g.target_specifier {
        Some(T::EnvoyGrpc(e)) => {
            if e.retry_policy.is_some() {
                errs.push(
                    join(path, "envoy_grpc.retry_policy"),
                    "retries of gRPC calls are not implemented",
                );
            }
            if e.cluster_name.is_empty() {
                errs.push(
                    join(path, "envoy_grpc.cluster_name"),
                    "a cluster name is required",
                );
            }
            let authority = if e.authority.is_empty() {
                e.cluster_name.clone()
            } else {
                e.authority.clone()
            };
            (e.cluster_name.as_str().into(), authority.as_str().into())
        }
        Some(T::GoogleGrpc(_)) => {
            errs.push(
                join(path, "google_grpc"),
                "the Google gRPC client is not implemented; use envoy_grpc",
            );
            (Name::from(""), Name::from(""))
        }
        None => {
            errs.push(path, "envoy_grpc is required");
            (Name::from(""), Name::from(""))
        }
    };
    errs.into_result(GrpcService {
        cluster,
        authority,
        timeout,
        initial_metadata,
    })
}

fn matchers(
    l: Option<&crate::api::envoy::r#type::matcher::v3::ListStringMatcher>,
    path: &str,
    errs: &mut ConfigErrors,
) -> Vec<StringMatcher> {
    let Some(l) = l else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(l.patterns.len());
    for (i, m) in l.patterns.iter().enumerate() {
        match super::string_matcher(m, &format!("{path}.patterns[{i}]")) {
            Ok(m) => out.push(m),
            Err(e) => errs.extend(e),
        }
    }
    out
}

/// `ExtAuthz` -> [`ExtAuthz`]; `path` names the `typed_config`.
pub fn ext_authz(p: &ea::ExtAuthz, path: &str) -> Result<ExtAuthz, ConfigErrors> {
    use ea::ext_authz::Services as S;
    let mut errs = ConfigErrors::default();
    // AUTO (0) is V3 now; V2 is gone.
    if !matches!(p.transport_api_version, 0 | 2) {
        errs.push(
            join(path, "transport_api_version"),
            "only the V3 transport API is supported",
        );
    }
    let with_request_body = p.with_request_body.as_ref().and_then(|b| {
        let bpath = join(path, "with_request_body");
        // As Envoy's proto validation.
        if b.max_request_bytes == 0 {
            errs.push(
                join(&bpath, "max_request_bytes"),
                "value must be greater than 0",
            );
            return None;
        }
        // A partial body goes to the service while the whole body streams
        // upstream: weir's request body is either buffered whole or
        // streamed, not a buffered prefix then the stream.
        if b.allow_partial_message {
            errs.push(
                join(&bpath, "allow_partial_message"),
                "partial request bodies are not implemented",
            );
            return None;
        }
        Some(BufferSettings {
            max_request_bytes: b.max_request_bytes,
            allow_partial_message: b.allow_partial_message,
            pack_as_bytes: b.pack_as_bytes,
        })
    });
    let (service, timeout) = match &p.services {
        Some(S::GrpcService(g)) => match grpc_service(g, &join(path, "grpc_service")) {
            Ok(g) => {
                let t = g.timeout.unwrap_or(DEFAULT_TIMEOUT);
                (Some(ExtAuthzService::Grpc(g)), t)
            }
            Err(e) => {
                errs.extend(e);
                (None, DEFAULT_TIMEOUT)
            }
        },
        Some(S::HttpService(h)) => {
            let hpath = join(path, "http_service");
            let mut timeout = DEFAULT_TIMEOUT;
            let mut cluster = Name::from("");
            match &h.server_uri {
                None => errs.push(join(&hpath, "server_uri"), "server_uri is required"),
                Some(u) => {
                    use core::http_uri::HttpUpstreamType as U;
                    match &u.http_upstream_type {
                        Some(U::Cluster(c)) if !c.is_empty() => cluster = c.as_str().into(),
                        _ => errs.push(join(&hpath, "server_uri.cluster"), "a cluster is required"),
                    }
                    match &u.timeout {
                        Some(d) => match super::duration(d, &join(&hpath, "server_uri.timeout")) {
                            Ok(d) => timeout = d,
                            Err(e) => errs.extend(e),
                        },
                        None => errs.push(join(&hpath, "server_uri.timeout"), "value is required"),
                    }
                }
            }
            let req = h.authorization_request.as_ref();
            let resp = h.authorization_response.as_ref();
            let rq = join(&hpath, "authorization_request");
            let rs = join(&hpath, "authorization_response");
            let mut headers_to_add = Vec::new();
            for (i, hv) in req
                .map(|r| &r.headers_to_add[..])
                .unwrap_or(&[])
                .iter()
                .enumerate()
            {
                let p = format!("{rq}.headers_to_add[{i}]");
                let raw = if hv.raw_value.is_empty() {
                    hv.value.clone()
                } else {
                    String::from_utf8_lossy(&hv.raw_value).into_owned()
                };
                if raw.contains('%') {
                    errs.push(
                        join(&p, "value"),
                        "command operators (%...%) are not implemented in this filter's headers",
                    );
                    continue;
                }
                match (
                    super::header_name(&hv.key.to_ascii_lowercase(), &join(&p, "key")),
                    super::header_value(&raw, &join(&p, "value")),
                ) {
                    (Ok(k), Ok(v)) => headers_to_add.push((k, v)),
                    (a, b) => {
                        errs.extend(a.err().unwrap_or_default());
                        errs.extend(b.err().unwrap_or_default());
                    }
                }
            }
            let svc = HttpAuthzService {
                cluster,
                path_prefix: h.path_prefix.clone(),
                allowed_headers: matchers(
                    req.and_then(|r| r.allowed_headers.as_ref()),
                    &join(&rq, "allowed_headers"),
                    &mut errs,
                ),
                headers_to_add,
                allowed_upstream_headers: matchers(
                    resp.and_then(|r| r.allowed_upstream_headers.as_ref()),
                    &join(&rs, "allowed_upstream_headers"),
                    &mut errs,
                ),
                allowed_upstream_headers_to_append: matchers(
                    resp.and_then(|r| r.allowed_upstream_headers_to_append.as_ref()),
                    &join(&rs, "allowed_upstream_headers_to_append"),
                    &mut errs,
                ),
                allowed_client_headers: matchers(
                    resp.and_then(|r| r.allowed_client_headers.as_ref()),
                    &join(&rs, "allowed_client_headers"),
                    &mut errs,
                ),
                allowed_client_headers_on_success: matchers(
                    resp.and_then(|r| r.allowed_client_headers_on_success.as_ref()),
                    &join(&rs, "allowed_client_headers_on_success"),
                    &mut errs,
                ),
                dynamic_metadata_from_headers: matchers(
                    resp.and_then(|r| r.dynamic_metadata_from_headers.as_ref()),
                    &join(&rs, "dynamic_metadata_from_headers"),
                    &mut errs,
                ),
            };
            if !h.path_prefix.is_empty() && !h.path_prefix.starts_with('/') {
                errs.push(
                    join(&hpath, "path_prefix"),
                    "path_prefix must start with \"/\"",
                );
            }
            (Some(ExtAuthzService::Http(svc)), timeout)
        }
        None => {
            errs.push(path, "one of grpc_service or http_service is required");
            (None, DEFAULT_TIMEOUT)
        }
    };
    let allowed_headers = match (&p.allowed_headers, &service) {
        (Some(l), Some(ExtAuthzService::Grpc(_))) => {
            Some(matchers(Some(l), &join(path, "allowed_headers"), &mut errs))
        }
        (Some(_), _) => {
            errs.push(
                join(path, "allowed_headers"),
                "allowed_headers is implemented for the gRPC service (use http_service.authorization_request.allowed_headers)",
            );
            None
        }
        (None, _) => None,
    };
    // As Envoy's `toErrorCode`: an HTTP status, else 403.
    let status_on_error = p
        .status_on_error
        .as_ref()
        .map(|s| s.code as u16)
        .filter(|c| (100..=511).contains(c))
        .unwrap_or(403);
    let out = ExtAuthz {
        service: service.unwrap_or(ExtAuthzService::Grpc(GrpcService {
            cluster: "".into(),
            authority: "".into(),
            timeout: None,
            initial_metadata: Vec::new(),
        })),
        timeout,
        failure_mode_allow: p.failure_mode_allow,
        failure_mode_allow_header_add: p.failure_mode_allow_header_add,
        with_request_body,
        status_on_error,
        include_peer_certificate: p.include_peer_certificate,
        stat_prefix: p.stat_prefix.clone(),
        filter_enabled: p
            .filter_enabled
            .as_ref()
            .map(super::local_ratelimit::runtime_fraction),
        filter_enabled_metadata: match &p.filter_enabled_metadata {
            None => None,
            Some(m) => {
                match super::rbac::metadata_matcher(m, &join(path, "filter_enabled_metadata")) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        errs.extend(e);
                        None
                    }
                }
            }
        },
        deny_at_disable: p
            .deny_at_disable
            .as_ref()
            .and_then(|f| f.default_value.as_ref())
            .is_some_and(|b| b.value),
        metadata_context_namespaces: p.metadata_context_namespaces.clone(),
        allowed_headers,
    };
    errs.into_result(out)
}

/// `ExtAuthzPerRoute` -> [`ExtAuthzPerRoute`].
pub fn per_route(p: &ea::ExtAuthzPerRoute, path: &str) -> Result<ExtAuthzPerRoute, ConfigErrors> {
    use ea::ext_authz_per_route::Override as O;
    match &p.r#override {
        Some(O::Disabled(d)) => {
            if !d {
                return Err(super::err(join(path, "disabled"), "value must equal true"));
            }
            Ok(ExtAuthzPerRoute {
                disabled: true,
                ..Default::default()
            })
        }
        Some(O::CheckSettings(c)) => Ok(ExtAuthzPerRoute {
            disabled: false,
            context_extensions: c
                .context_extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            disable_request_body_buffering: c.disable_request_body_buffering,
        }),
        None => Err(super::err(
            path,
            "one of disabled or check_settings is required",
        )),
    }
}

/// `envoy.extensions.filters.network.ext_authz.v3.ExtAuthz`.
pub const NETWORK_EXT_AUTHZ: &str = "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz";

/// The network `ExtAuthz` -> [`NetworkExtAuthz`].
pub fn network_ext_authz(
    p: &crate::api::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz,
    path: &str,
) -> Result<NetworkExtAuthz, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.stat_prefix.is_empty() {
        errs.push(
            join(path, "stat_prefix"),
            "value length must be at least 1 characters",
        );
    }
    if !matches!(p.transport_api_version, 0 | 2) {
        errs.push(
            join(path, "transport_api_version"),
            "only the V3 transport API is supported",
        );
    }
    let service = match &p.grpc_service {
        None => {
            errs.push(join(path, "grpc_service"), "grpc_service is required");
            None
        }
        Some(g) => match grpc_service(g, &join(path, "grpc_service")) {
            Ok(g) => Some(g),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
    };
    match service {
        Some(service) if errs.is_empty() => Ok(NetworkExtAuthz {
            stat_prefix: p.stat_prefix.clone(),
            timeout: service.timeout.unwrap_or(DEFAULT_TIMEOUT),
            service,
            failure_mode_allow: p.failure_mode_allow,
        }),
        _ => Err(errs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_implemented_naming_the_field() {
        let p = ea::ExtAuthz {
            services: Some(ea::ext_authz::Services::GrpcService(core::GrpcService {
                target_specifier: Some(core::grpc_service::TargetSpecifier::GoogleGrpc(
                    Default::default(),
                )),
                ..Default::default()
            })),
            with_request_body: Some(Default::default()),
            transport_api_version: 1,
            ..Default::default()
        };
        let e = ext_authz(&p, "f").expect_err("rejected").to_string();
        for field in [
            "f.grpc_service.google_grpc",
            "f.with_request_body.max_request_bytes",
            "f.transport_api_version",
        ] {
            assert!(e.contains(field), "{field} in {e}");
        }
    }

    #[test]
    fn defaults_as_envoy() {
        let p = ea::ExtAuthz {
            services: Some(ea::ext_authz::Services::GrpcService(core::GrpcService {
                target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                    core::grpc_service::EnvoyGrpc {
                        cluster_name: "authz".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })),
            ..Default::default()
        };
        let c = ext_authz(&p, "f").expect("valid");
        assert_eq!(c.timeout, Duration::from_millis(200));
        assert_eq!(c.status_on_error, 403);
        match c.service {
            ExtAuthzService::Grpc(g) => assert_eq!(&*g.authority, "authz"),
            ExtAuthzService::Http(_) => panic!("gRPC expected"),
        }
    }
}
