//! `HttpConnectionManager`, HTTP filters and access logs.
use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::api::envoy::config::accesslog::v3 as al;
use crate::api::envoy::config::core::v3 as core;
use crate::api::envoy::extensions::access_loggers::{
    file::v3 as file_log, stream::v3 as stream_log,
};
use crate::api::envoy::extensions::filters::http::{
    cors::v3::Cors, fault::v3::HttpFault, grpc_stats::v3::FilterConfig as GrpcStats,
    router::v3::Router,
};
use crate::api::envoy::extensions::filters::network::http_connection_manager::v3 as h;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::{err, header_value, parse_format, route, timeout, DEFAULT_ACCESS_LOG_FORMAT};

pub fn hcm(
    p: &h::HttpConnectionManager,
    path: &str,
) -> Result<HttpConnectionManager, ConfigErrors> {
    use h::http_connection_manager as hm;
    let mut errs = ConfigErrors::default();
    let codec = match hm::CodecType::try_from(p.codec_type) {
        Ok(hm::CodecType::Auto) => Codec::Auto,
        Ok(hm::CodecType::Http1) => Codec::Http1,
        Ok(hm::CodecType::Http2) => Codec::Http2,
        _ => {
            errs.push(join(path, "codec_type"), "HTTP/3 is not implemented");
            Codec::Auto
        }
    };
    let route_config = match &p.route_specifier {
        Some(hm::RouteSpecifier::RouteConfig(rc)) => {
            match route::route_config(rc, &join(path, "route_config")) {
                Ok(rc) => Some(RouteSource::Static(Arc::new(rc))),
                Err(e) => {
                    errs.extend(e);
                    None
                }
            }
        }
        Some(hm::RouteSpecifier::Rds(r)) => {
            let rpath = join(path, "rds");
            if r.route_config_name.is_empty() {
                errs.push(
                    join(&rpath, "route_config_name"),
                    "a route_config_name is required",
                );
            }
            match r.config_source.as_ref() {
                None => {
                    errs.push(join(&rpath, "config_source"), "a config_source is required");
                    None
                }
                Some(cs) => match super::xds::config_source(cs, &join(&rpath, "config_source")) {
                    Ok(source) => Some(RouteSource::Rds(Rds {
                        name: r.route_config_name.as_str().into(),
                        source,
                    })),
                    Err(e) => {
                        errs.extend(e);
                        None
                    }
                },
            }
        }
        Some(hm::RouteSpecifier::ScopedRoutes(_)) => {
            errs.push(
                join(path, "scoped_routes"),
                "scoped routes are not implemented",
            );
            None
        }
        None => {
            errs.push(path, "route_config is required");
            None
        }
    };
    let mut http_filters = Vec::new();
    for (i, f) in p.http_filters.iter().enumerate() {
        let fpath = format!("{path}.http_filters[{i}]");
        match http_filter(f, &fpath) {
            Ok(f) => http_filters.push(f),
            Err(e) => errs.extend(e),
        }
    }
    let request_id = match &p.request_id_extension {
        Some(r) => request_id_extension(r, &join(path, "request_id_extension"))
            .map_err(|e| errs.extend(e))
            .unwrap_or_default(),
        None => RequestIdConfig::default(),
    };
    let tracing = match &p.tracing {
        Some(t) => tracing(t, &join(path, "tracing"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None => None,
    };
    match http_filters.last() {
        Some(HttpFilterConfig {
            kind: HttpFilterKind::Router(_),
            ..
        }) => {}
        _ => errs.push(
            join(path, "http_filters"),
            "the last HTTP filter must be envoy.filters.http.router",
        ),
    }
    if http_filters
        .iter()
        .rev()
        .skip(1)
        .any(|f| matches!(f.kind, HttpFilterKind::Router(_)))
    {
        errs.push(
            join(path, "http_filters"),
            "the router must be the last HTTP filter",
        );
    }
    let mut access_logs = Vec::new();
    for (i, a) in p.access_log.iter().enumerate() {
        match access_log(a, &format!("{path}.access_log[{i}]")) {
            Ok(a) => access_logs.push(Arc::new(a)),
            Err(e) => errs.extend(e),
        }
    }
    let common = p.common_http_protocol_options.unwrap_or_default();
    let cpath = join(path, "common_http_protocol_options");
    let mut collect = |r: Result<Option<Duration>, ConfigErrors>| match r {
        Ok(v) => v,
        Err(e) => {
            errs.extend(e);
            None
        }
    };
    let idle_timeout = collect(timeout(
        common.idle_timeout.as_ref(),
        Some(Duration::from_secs(3600)),
        &join(&cpath, "idle_timeout"),
    ));
    let max_connection_duration = collect(timeout(
        common.max_connection_duration.as_ref(),
        None,
        &join(&cpath, "max_connection_duration"),
    ));
    let max_stream_duration = collect(timeout(
        common.max_stream_duration.as_ref(),
        None,
        &join(&cpath, "max_stream_duration"),
    ));
    let stream_idle_timeout = collect(timeout(
        p.stream_idle_timeout.as_ref(),
        Some(Duration::from_secs(300)),
        &join(path, "stream_idle_timeout"),
    ));
    let request_timeout = collect(timeout(
        p.request_timeout.as_ref(),
        None,
        &join(path, "request_timeout"),
    ));
    let request_headers_timeout = collect(timeout(
        p.request_headers_timeout.as_ref(),
        None,
        &join(path, "request_headers_timeout"),
    ));
    let drain_timeout = collect(timeout(
        p.drain_timeout.as_ref(),
        Some(Duration::from_secs(5)),
        &join(path, "drain_timeout"),
    ))
    .unwrap_or(Duration::ZERO);
    let headers_with_underscores = match common.headers_with_underscores_action {
        0 => UnderscoreAction::Allow,
        1 => UnderscoreAction::RejectRequest,
        _ => UnderscoreAction::DropHeader,
    };
    let max_request_headers_kb = p
        .max_request_headers_kb
        .as_ref()
        .map(|v| v.value)
        .unwrap_or(60);
    if !(1..=8192).contains(&max_request_headers_kb) {
        errs.push(
            join(path, "max_request_headers_kb"),
            "must be between 1 and 8192",
        );
    }
    let via = if p.via.is_empty() {
        None
    } else {
        match header_value(&p.via, &join(path, "via")) {
            Ok(v) => Some(v),
            Err(e) => {
                errs.extend(e);
                None
            }
        }
    };
    let server_name = match header_value(
        if p.server_name.is_empty() {
            "envoy"
        } else {
            &p.server_name
        },
        &join(path, "server_name"),
    ) {
        Ok(v) => v,
        Err(e) => {
            errs.extend(e);
            http::HeaderValue::from_static("envoy")
        }
    };
    let server_header_transformation = match p.server_header_transformation {
        0 => ServerHeaderTransformation::Overwrite,
        1 => ServerHeaderTransformation::AppendIfAbsent,
        _ => ServerHeaderTransformation::PassThrough,
    };
    let escaped_slashes =
        match hm::PathWithEscapedSlashesAction::try_from(p.path_with_escaped_slashes_action) {
            Ok(hm::PathWithEscapedSlashesAction::RejectRequest) => {
                EscapedSlashesAction::RejectRequest
            }
            Ok(hm::PathWithEscapedSlashesAction::UnescapeAndRedirect) => {
                EscapedSlashesAction::UnescapeAndRedirect
            }
            Ok(hm::PathWithEscapedSlashesAction::UnescapeAndForward) => {
                EscapedSlashesAction::UnescapeAndForward
            }
            _ => EscapedSlashesAction::KeepUnchanged,
        };
    let strip_port = match (&p.strip_port_mode, p.strip_matching_host_port) {
        (Some(hm::StripPortMode::StripAnyHostPort(true)), true) => {
            errs.push(
                join(path, "strip_any_host_port"),
                "strip_any_host_port and strip_matching_host_port are mutually exclusive",
            );
            StripPort::None
        }
        (Some(hm::StripPortMode::StripAnyHostPort(true)), false) => StripPort::Any,
        (_, true) => StripPort::Matching,
        _ => StripPort::None,
    };
    let mut upgrades = Vec::new();
    for (i, u) in p.upgrade_configs.iter().enumerate() {
        let upath = format!("{path}.upgrade_configs[{i}]");
        if !u.filters.is_empty() {
            errs.push(
                join(&upath, "filters"),
                "per-upgrade filter chains are not implemented",
            );
        }
        if u.enabled.as_ref().map(|b| b.value).unwrap_or(true) {
            let t = u.upgrade_type.to_ascii_lowercase();
            if t != "websocket" && t != "connect" {
                errs.push(
                    join(&upath, "upgrade_type"),
                    format!(
                        "upgrade type {:?} is not implemented (websocket and CONNECT are)",
                        u.upgrade_type
                    ),
                );
            }
            upgrades.push(t);
        }
    }
    let forward_client_cert =
        match hm::ForwardClientCertDetails::try_from(p.forward_client_cert_details) {
            Ok(hm::ForwardClientCertDetails::ForwardOnly) => ForwardClientCert::ForwardOnly,
            Ok(hm::ForwardClientCertDetails::AppendForward) => ForwardClientCert::AppendForward,
            Ok(hm::ForwardClientCertDetails::SanitizeSet) => ForwardClientCert::SanitizeSet,
            Ok(hm::ForwardClientCertDetails::AlwaysForwardOnly) => {
                ForwardClientCert::AlwaysForwardOnly
            }
            _ => ForwardClientCert::Sanitize,
        };
    let mut client_cert_details = Vec::new();
    if let Some(d) = &p.set_current_client_cert_details {
        // Envoy's element order: Cert, Chain, Subject, URI, DNS.
        if d.cert {
            client_cert_details.push(ClientCertDetail::Cert);
        }
        if d.chain {
            client_cert_details.push(ClientCertDetail::Chain);
        }
        if d.subject.as_ref().is_some_and(|b| b.value) {
            client_cert_details.push(ClientCertDetail::Subject);
        }
        if d.uri {
            client_cert_details.push(ClientCertDetail::Uri);
        }
        if d.dns {
            client_cert_details.push(ClientCertDetail::Dns);
        }
    }
    let internal_address = match &p.internal_address_config {
        Some(c) => {
            let mut cidrs = Vec::new();
            for (i, r) in c.cidr_ranges.iter().enumerate() {
                match cidr(
                    r,
                    &format!("{path}.internal_address_config.cidr_ranges[{i}]"),
                ) {
                    Ok(c) => cidrs.push(c),
                    Err(e) => errs.extend(e),
                }
            }
            InternalAddressConfig {
                unix_sockets: c.unix_sockets,
                cidrs,
            }
        }
        None => InternalAddressConfig::default(),
    };
    let http1 = p
        .http_protocol_options
        .as_ref()
        .map(|o| Http1Settings {
            accept_http_10: o.accept_http_10,
            default_host_for_http_10: (!o.default_host_for_http_10.is_empty())
                .then(|| o.default_host_for_http_10.clone()),
        })
        .unwrap_or_default();
    let http2 = match http2_settings(
        p.http2_protocol_options.as_ref(),
        &join(path, "http2_protocol_options"),
    ) {
        Ok(s) => s,
        Err(e) => {
            errs.extend(e);
            Http2Settings::default()
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let stat_prefix = if p.stat_prefix.is_empty() {
        return Err(err(join(path, "stat_prefix"), "stat_prefix is required"));
    } else {
        p.stat_prefix.clone()
    };
    Ok(HttpConnectionManager {
        tracing,
        request_id,
        stat_prefix,
        codec,
        routes: route_config.expect("checked above"),
        http_filters,
        access_logs,
        idle_timeout,
        max_connection_duration,
        max_headers_count: common
            .max_headers_count
            .as_ref()
            .map(|v| v.value)
            .unwrap_or(100),
        max_stream_duration,
        headers_with_underscores,
        max_requests_per_connection: common
            .max_requests_per_connection
            .as_ref()
            .map(|v| v.value)
            .filter(|v| *v > 0),
        stream_idle_timeout,
        request_timeout,
        request_headers_timeout,
        max_request_headers_kb,
        use_remote_address: p
            .use_remote_address
            .as_ref()
            .map(|b| b.value)
            .unwrap_or(false),
        xff_num_trusted_hops: p.xff_num_trusted_hops,
        skip_xff_append: p.skip_xff_append,
        via,
        server_name,
        server_header_transformation,
        generate_request_id: p
            .generate_request_id
            .as_ref()
            .map(|b| b.value)
            .unwrap_or(true),
        preserve_external_request_id: p.preserve_external_request_id,
        always_set_request_id_in_response: p.always_set_request_id_in_response,
        normalize_path: p.normalize_path.as_ref().map(|b| b.value).unwrap_or(false),
        merge_slashes: p.merge_slashes,
        escaped_slashes,
        strip_port,
        upgrades,
        forward_client_cert,
        client_cert_details,
        internal_address,
        http1,
        http2,
        append_x_forwarded_port: p.append_x_forwarded_port,
        add_user_agent: p.add_user_agent.as_ref().map(|b| b.value).unwrap_or(false),
        drain_timeout,
        proxy_100_continue: p.proxy_100_continue,
    })
}

pub fn cidr(r: &core::CidrRange, path: &str) -> Result<Cidr, ConfigErrors> {
    let addr: std::net::IpAddr = r.address_prefix.parse().map_err(|_| {
        err(
            join(path, "address_prefix"),
            format!("{:?} is not an IP address", r.address_prefix),
        )
    })?;
    let len = r
        .prefix_len
        .as_ref()
        .map(|v| v.value)
        .unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(err(
            join(path, "prefix_len"),
            format!("prefix length {len} exceeds {max}"),
        ));
    }
    Ok(Cidr {
        addr,
        len: len as u8,
    })
}

pub fn http2_settings(
    o: Option<&core::Http2ProtocolOptions>,
    path: &str,
) -> Result<Http2Settings, ConfigErrors> {
    let mut s = Http2Settings::default();
    let Some(o) = o else { return Ok(s) };
    if let Some(v) = &o.max_concurrent_streams {
        s.max_concurrent_streams = v.value;
    }
    if let Some(v) = &o.initial_stream_window_size {
        if !(65_535..=2_147_483_647).contains(&v.value) {
            return Err(err(
                join(path, "initial_stream_window_size"),
                "must be between 65535 and 2147483647",
            ));
        }
        s.initial_stream_window_size = v.value;
    }
    if let Some(v) = &o.initial_connection_window_size {
        if !(65_535..=2_147_483_647).contains(&v.value) {
            return Err(err(
                join(path, "initial_connection_window_size"),
                "must be between 65535 and 2147483647",
            ));
        }
        s.initial_connection_window_size = v.value;
    }
    s.allow_connect = o.allow_connect;
    if let Some(k) = &o.connection_keepalive {
        s.keepalive_interval = timeout(
            k.interval.as_ref(),
            None,
            &join(path, "connection_keepalive.interval"),
        )?;
        s.keepalive_timeout = timeout(
            k.timeout.as_ref(),
            None,
            &join(path, "connection_keepalive.timeout"),
        )?;
    }
    Ok(s)
}

const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
use super::fault::FAULT;
const CORS: &str = "envoy.extensions.filters.http.cors.v3.Cors";
const BUFFER: &str = "envoy.extensions.filters.http.buffer.v3.Buffer";
pub(super) const BUFFER_PER_ROUTE: &str = "envoy.extensions.filters.http.buffer.v3.BufferPerRoute";

/// `Buffer.max_request_bytes` (required, above 0).
pub(super) fn buffer_max(
    v: Option<crate::api::google::protobuf::UInt32Value>,
    path: &str,
) -> Result<u32, ConfigErrors> {
    match v {
        Some(v) if v.value > 0 => Ok(v.value),
        _ => Err(err(
            join(path, "max_request_bytes"),
            "max_request_bytes is required and above 0",
        )),
    }
}
use super::grpc_stats::GRPC_STATS;
const UUID_REQUEST_ID: &str = "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig";

fn http_filter(f: &h::HttpFilter, path: &str) -> Result<HttpFilterConfig, ConfigErrors> {
    use crate::descriptors::{ISTIO_ALPN, ISTIO_PEER_METADATA, ISTIO_STATS};
    let any = match &f.config_type {
        Some(h::http_filter::ConfigType::TypedConfig(a)) => a,
        Some(h::http_filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(err(
                join(path, "config_discovery"),
                "ECDS is not implemented",
            ));
        }
        None => {
            return Err(err(
                join(path, "typed_config"),
                format!("HTTP filter {:?} needs a typed_config", f.name),
            ))
        }
    };
    if f.disabled {
        return Err(err(
            join(path, "disabled"),
            "disabled filters (enabled per route) are not implemented",
        ));
    }
    let tpath = join(path, "typed_config");
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    let kind = match any.type_url.rsplit('/').next().unwrap_or_default() {
        ROUTER => {
            let r: Router = super::decode(&any, &tpath)?;
            HttpFilterKind::Router(RouterConfig {
                suppress_envoy_headers: r.suppress_envoy_headers,
                respect_expected_rq_timeout: r.respect_expected_rq_timeout,
            })
        }
        FAULT => {
            let fault: HttpFault = super::decode(&any, &tpath)?;
            HttpFilterKind::Fault(Arc::new(super::fault::fault(&fault, &tpath)?))
        }
        super::local_ratelimit::LOCAL_RATE_LIMIT => {
            let p: crate::api::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit =
                super::decode(&any, &tpath)?;
            HttpFilterKind::LocalRateLimit(Arc::new(super::local_ratelimit::local_rate_limit(
                &p, &tpath, false,
            )?))
        }
        super::rbac::HTTP_RBAC => {
            let p = super::decode(&any, &tpath)?;
            HttpFilterKind::Rbac(Arc::new(super::rbac::http_rbac(&p, &tpath)?))
        }
        super::rate_limit_service::RATE_LIMIT => {
            let p = super::decode(&any, &tpath)?;
            HttpFilterKind::RateLimit(Arc::new(super::rate_limit_service::rate_limit(&p, &tpath)?))
        }
        super::ext_authz::EXT_AUTHZ => {
            let p = super::decode(&any, &tpath)?;
            HttpFilterKind::ExtAuthz(Arc::new(super::ext_authz::ext_authz(&p, &tpath)?))
        }
        super::jwt_authn::JWT_AUTHN => {
            let p = super::decode(&any, &tpath)?;
            HttpFilterKind::JwtAuthn(Arc::new(super::jwt_authn::jwt_authn(&p, &tpath)?))
        }
        CORS => {
            let _: Cors = super::decode(&any, &tpath)?;
            HttpFilterKind::Cors
        }
        super::compressor::COMPRESSOR => {
            let c: crate::api::envoy::extensions::filters::http::compressor::v3::Compressor =
                super::decode(&any, &tpath)?;
            HttpFilterKind::Compressor(Arc::new(super::compressor::compressor(&c, &tpath)?))
        }
        BUFFER => {
            let b: crate::api::envoy::extensions::filters::http::buffer::v3::Buffer =
                super::decode(&any, &tpath)?;
            HttpFilterKind::Buffer(buffer_max(b.max_request_bytes, &tpath)?)
        }
        super::health_check::HEALTH_CHECK => {
            let c = super::decode(&any, &tpath)?;
            HttpFilterKind::HealthCheck(Arc::new(super::health_check::health_check(&c, &tpath)?))
        }
        super::header_mutation::HEADER_MUTATION => {
            let c = super::decode(&any, &tpath)?;
            HttpFilterKind::HeaderMutation(Arc::new(super::header_mutation::header_mutation(
                &c, &tpath,
            )?))
        }
        super::set_filter_state::HTTP_SET_FILTER_STATE => {
            let c = super::decode(&any, &tpath)?;
            HttpFilterKind::SetFilterState(Arc::new(super::set_filter_state::set_filter_state(
                &c, &tpath,
            )?))
        }
        GRPC_STATS => {
            let g: GrpcStats = super::decode(&any, &tpath)?;
            HttpFilterKind::GrpcStats(Arc::new(super::grpc_stats::grpc_stats(&g)))
        }
        ISTIO_STATS => {
            let m = crate::descriptors::decode_any(&any.type_url, &any.value)
                .map_err(|e| err(&tpath, e))?;
            HttpFilterKind::IstioStats(Arc::new(super::istio::istio_stats(&m, &tpath)?))
        }
        ISTIO_PEER_METADATA => {
            let m = crate::descriptors::decode_any(&any.type_url, &any.value)
                .map_err(|e| err(&tpath, e))?;
            HttpFilterKind::PeerMetadata(Arc::new(super::istio::peer_metadata(&m, &tpath)?))
        }
        ISTIO_ALPN => {
            let m = crate::descriptors::decode_any(&any.type_url, &any.value)
                .map_err(|e| err(&tpath, e))?;
            HttpFilterKind::IstioAlpn(Arc::new(super::istio::istio_alpn(&m, &tpath)?))
        }
        other => {
            return Err(err(
                tpath,
                format!("HTTP filter {other} is not implemented yet"),
            ))
        }
    };
    Ok(HttpFilterConfig {
        name: f.name.as_str().into(),
        kind,
    })
}

/// HCM `tracing`: the sampling decision Envoy makes (and writes into the
/// request ID) without a tracer; a `provider` (spans) is not implemented.
fn tracing(
    t: &h::http_connection_manager::Tracing,
    path: &str,
) -> Result<TracingConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let provider = match &t.provider {
        Some(p) => tracing_provider(p, &join(path, "provider"))
            .map_err(|e| errs.extend(e))
            .ok()
            .map(Arc::new),
        None => None,
    };
    if provider.is_some() {
        // Without a provider these only shape spans nobody makes.
        if t.verbose {
            errs.push(
                join(path, "verbose"),
                "verbose span logs (timing events) are not implemented",
            );
        }
        if t.spawn_upstream_span.is_some_and(|v| v.value) {
            errs.push(
                join(path, "spawn_upstream_span"),
                "upstream (child) spans are not implemented",
            );
        }
    }
    let mut custom_tags = Vec::with_capacity(t.custom_tags.len());
    for (i, c) in t.custom_tags.iter().enumerate() {
        match custom_tag(c, &format!("{path}.custom_tags[{i}]")) {
            Ok(c) => custom_tags.push(c),
            // Without a provider there are no spans to tag.
            Err(e) if provider.is_some() || t.provider.is_some() => errs.extend(e),
            Err(_) => {}
        }
    }
    // As Envoy's PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT(.., 10000, 10000).
    let rate = |p: &Option<crate::api::envoy::r#type::v3::Percent>| {
        p.as_ref().map_or(10_000, |p| {
            (p.value.clamp(0.0, 100.0) * 100.0).round() as u32
        })
    };
    errs.into_result(TracingConfig {
        client_sampling: rate(&t.client_sampling),
        random_sampling: rate(&t.random_sampling),
        overall_sampling: rate(&t.overall_sampling),
        provider,
        max_path_tag_length: t.max_path_tag_length.map_or(256, |v| v.value as usize),
        custom_tags,
        egress: false,
    })
}

const OPENTELEMETRY_CONFIG: &str = "envoy.config.trace.v3.OpenTelemetryConfig";
const ZIPKIN_CONFIG: &str = "envoy.config.trace.v3.ZipkinConfig";

/// `tracing.provider` (HCM) or the bootstrap's `tracing.http`.
pub(crate) fn tracing_provider(
    p: &crate::api::envoy::config::trace::v3::tracing::Http,
    path: &str,
) -> Result<TraceProvider, ConfigErrors> {
    use crate::api::envoy::config::trace::v3::tracing::http::ConfigType;
    let tpath = join(path, "typed_config");
    let Some(ConfigType::TypedConfig(any)) = &p.config_type else {
        return Err(err(tpath, "a tracer needs a typed_config"));
    };
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    match any.type_url.rsplit('/').next().unwrap_or_default() {
        OPENTELEMETRY_CONFIG => {
            let c: crate::api::envoy::config::trace::v3::OpenTelemetryConfig =
                super::decode(&any, &tpath)?;
            let mut errs = ConfigErrors::default();
            let grpc = match &c.grpc_service {
                Some(g) => super::ext_authz::grpc_service(g, &join(&tpath, "grpc_service"))
                    .map_err(|e| errs.extend(e))
                    .ok(),
                None => {
                    errs.push(
                        join(&tpath, "grpc_service"),
                        "grpc_service is required (the HTTP exporter is not implemented)",
                    );
                    None
                }
            };
            let service_name = if c.service_name.is_empty() {
                "unknown_service:envoy".to_owned()
            } else {
                c.service_name.clone()
            };
            match grpc {
                Some(grpc) if errs.is_empty() => {
                    Ok(TraceProvider::OpenTelemetry(OpenTelemetryProvider {
                        grpc,
                        service_name,
                    }))
                }
                _ => Err(errs),
            }
        }
        ZIPKIN_CONFIG => {
            let c: crate::api::envoy::config::trace::v3::ZipkinConfig =
                super::decode(&any, &tpath)?;
            let mut errs = ConfigErrors::default();
            if c.collector_cluster.is_empty() {
                errs.push(join(&tpath, "collector_cluster"), "a cluster is required");
            }
            if !c.collector_endpoint.starts_with('/') {
                errs.push(
                    join(&tpath, "collector_endpoint"),
                    "a path (starting with /) is required",
                );
            }
            if c.collector_endpoint_version != 1 {
                errs.push(
                    join(&tpath, "collector_endpoint_version"),
                    "only HTTP_JSON is implemented",
                );
            }
            if c.split_spans_for_request {
                errs.push(
                    join(&tpath, "split_spans_for_request"),
                    "split spans are not implemented",
                );
            }
            if c.trace_context_option != 0 {
                errs.push(
                    join(&tpath, "trace_context_option"),
                    "only B3 propagation (USE_B3) is implemented",
                );
            }
            let hostname = if c.collector_hostname.is_empty() {
                c.collector_cluster.clone()
            } else {
                c.collector_hostname.clone()
            };
            errs.into_result(TraceProvider::Zipkin(ZipkinProvider {
                cluster: c.collector_cluster.as_str().into(),
                endpoint: c.collector_endpoint.clone(),
                hostname,
                trace_id_128bit: c.trace_id_128bit,
                shared_span_context: c.shared_span_context.is_none_or(|v| v.value),
            }))
        }
        other => Err(err(
            tpath,
            format!("tracer {other} is not implemented (OpenTelemetryConfig and ZipkinConfig are)"),
        )),
    }
}

/// One `custom_tags` entry (`literal`, `environment`, `request_header`).
pub(crate) fn custom_tag(
    c: &crate::api::envoy::r#type::tracing::v3::CustomTag,
    path: &str,
) -> Result<CustomTag, ConfigErrors> {
    use crate::api::envoy::r#type::tracing::v3::custom_tag::Type;
    let value = match &c.r#type {
        Some(Type::Literal(l)) => CustomTagValue::Literal(l.value.clone()),
        Some(Type::Environment(e)) => CustomTagValue::Environment(
            std::env::var(&e.name).unwrap_or_else(|_| e.default_value.clone()),
        ),
        Some(Type::RequestHeader(r)) => CustomTagValue::RequestHeader(
            super::header_name(
                &r.name.to_ascii_lowercase(),
                &join(path, "request_header.name"),
            )?,
            r.default_value.clone(),
        ),
        Some(Type::Metadata(_)) => {
            return Err(err(
                join(path, "metadata"),
                "metadata custom tags are not implemented",
            ))
        }
        Some(Type::Value(_)) => {
            return Err(err(
                join(path, "value"),
                "formatted custom tags are not implemented",
            ))
        }
        None => return Err(err(path, "a custom tag needs a type")),
    };
    Ok(CustomTag {
        tag: c.tag.clone(),
        value,
    })
}

/// `request_id_extension`: only Envoy's default (UUID) one, which is what
/// weir generates.
fn request_id_extension(
    r: &h::RequestIdExtension,
    path: &str,
) -> Result<RequestIdConfig, ConfigErrors> {
    let tpath = join(path, "typed_config");
    let Some(any) = &r.typed_config else {
        return Err(err(tpath, "typed_config is required"));
    };
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    match any.type_url.rsplit('/').next().unwrap_or_default() {
        UUID_REQUEST_ID => {
            let c: crate::api::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig =
                super::decode(&any, &tpath)?;
            Ok(RequestIdConfig {
                pack_trace_reason: c.pack_trace_reason.is_none_or(|v| v.value),
                use_request_id_for_trace_sampling: c
                    .use_request_id_for_trace_sampling
                    .is_none_or(|v| v.value),
            })
        }
        other => Err(err(
            tpath,
            format!("request ID extension {other} is not implemented (UuidRequestIdConfig is)"),
        )),
    }
}

/// One `AccessLog`.
pub fn access_log(a: &al::AccessLog, path: &str) -> Result<AccessLog, ConfigErrors> {
    let any = match &a.config_type {
        Some(al::access_log::ConfigType::TypedConfig(t)) => t,
        None => {
            return Err(err(
                join(path, "typed_config"),
                "access log needs a typed_config",
            ))
        }
    };
    let tpath = join(path, "typed_config");
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let (sink, format) = match name {
        "envoy.extensions.access_loggers.file.v3.FileAccessLog" => {
            let f: file_log::FileAccessLog = super::decode(any, &tpath)?;
            use file_log::file_access_log::AccessLogFormat as F;
            let format = match &f.access_log_format {
                None => default_format()?,
                Some(F::Format(s)) => {
                    LogFormat::Text(parse_format(s).map_err(|e| err(join(&tpath, "format"), e))?)
                }
                Some(F::JsonFormat(s)) => {
                    LogFormat::Json(json_format(s, &join(&tpath, "json_format"))?)
                }
                Some(F::LogFormat(s)) => substitution_format(s, &join(&tpath, "log_format"))?,
                Some(_) => return Err(err(&tpath, "typed_json_format is not implemented")),
            };
            let sink = match f.path.as_str() {
                "/dev/stdout" => AccessLogSink::Stdout,
                "/dev/stderr" => AccessLogSink::Stderr,
                "" => return Err(err(join(&tpath, "path"), "path is required")),
                p => AccessLogSink::File(PathBuf::from(p)),
            };
            (sink, format)
        }
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" => {
            let f: stream_log::StdoutAccessLog = super::decode(any, &tpath)?;
            let format = match &f.access_log_format {
                Some(stream_log::stdout_access_log::AccessLogFormat::LogFormat(s)) => {
                    substitution_format(s, &join(&tpath, "log_format"))?
                }
                None => default_format()?,
            };
            (AccessLogSink::Stdout, format)
        }
        "envoy.extensions.access_loggers.stream.v3.StderrAccessLog" => {
            let f: stream_log::StderrAccessLog = super::decode(any, &tpath)?;
            let format = match &f.access_log_format {
                Some(stream_log::stderr_access_log::AccessLogFormat::LogFormat(s)) => {
                    substitution_format(s, &join(&tpath, "log_format"))?
                }
                None => default_format()?,
            };
            (AccessLogSink::Stderr, format)
        }
        other => {
            return Err(err(
                &tpath,
                format!("access logger {other} is not implemented"),
            ))
        }
    };
    let filter = match &a.filter {
        Some(f) => Some(access_log_filter(f, &join(path, "filter"))?),
        None => None,
    };
    Ok(AccessLog {
        sink,
        format,
        filter,
    })
}

fn default_format() -> Result<LogFormat, ConfigErrors> {
    Ok(LogFormat::Text(
        parse_format(DEFAULT_ACCESS_LOG_FORMAT).map_err(|e| err("", e))?,
    ))
}

pub(super) fn substitution_format(
    s: &core::SubstitutionFormatString,
    path: &str,
) -> Result<LogFormat, ConfigErrors> {
    use core::substitution_format_string::Format as F;
    if s.omit_empty_values {
        return Err(err(join(path, "omit_empty_values"), "not implemented"));
    }
    if !s.formatters.is_empty() {
        return Err(err(
            join(path, "formatters"),
            "formatter extensions are not implemented",
        ));
    }
    match &s.format {
        Some(F::TextFormat(t)) => Ok(LogFormat::Text(
            parse_format(t).map_err(|e| err(join(path, "text_format"), e))?,
        )),
        Some(F::TextFormatSource(d)) => {
            let bytes = super::data_source(d, &join(path, "text_format_source"))?;
            let t = String::from_utf8(bytes)
                .map_err(|_| err(join(path, "text_format_source"), "must be UTF-8"))?;
            Ok(LogFormat::Text(
                parse_format(&t).map_err(|e| err(join(path, "text_format_source"), e))?,
            ))
        }
        Some(F::JsonFormat(j)) => Ok(LogFormat::Json(json_format(j, &join(path, "json_format"))?)),
        None => default_format(),
    }
}

fn json_format(
    s: &crate::api::google::protobuf::Struct,
    path: &str,
) -> Result<Vec<(String, JsonFormatValue)>, ConfigErrors> {
    use crate::api::google::protobuf::value::Kind as K;
    let mut out = Vec::new();
    // Struct fields are a map: order keys for deterministic output.
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    for k in keys {
        let v = &s.fields[k];
        let p = join(path, k);
        let jv = match &v.kind {
            Some(K::StringValue(t)) => {
                JsonFormatValue::Format(parse_format(t).map_err(|e| err(&p, e))?)
            }
            Some(K::StructValue(inner)) => JsonFormatValue::Nested(json_format(inner, &p)?),
            Some(K::NumberValue(n)) => JsonFormatValue::Number(*n),
            Some(K::BoolValue(b)) => JsonFormatValue::Bool(*b),
            _ => {
                return Err(err(
                    p,
                    "json_format values must be strings, numbers, booleans or objects",
                ))
            }
        };
        out.push((k.clone(), jv));
    }
    Ok(out)
}

fn access_log_filter(f: &al::AccessLogFilter, path: &str) -> Result<AccessLogFilter, ConfigErrors> {
    use al::access_log_filter::FilterSpecifier as F;
    let cmp = |c: &Option<al::ComparisonFilter>, p: &str| -> Result<Comparison, ConfigErrors> {
        let c = c.as_ref().ok_or_else(|| err(p, "comparison is required"))?;
        let op = match al::comparison_filter::Op::try_from(c.op) {
            Ok(al::comparison_filter::Op::Eq) => CmpOp::Eq,
            Ok(al::comparison_filter::Op::Ge) => CmpOp::Ge,
            Ok(al::comparison_filter::Op::Le) => CmpOp::Le,
            Ok(al::comparison_filter::Op::Ne) => CmpOp::Ne,
            Err(_) => return Err(err(join(p, "op"), "unknown comparison")),
        };
        Ok(Comparison {
            op,
            value: c
                .value
                .as_ref()
                .map(|v| u64::from(v.default_value))
                .unwrap_or(0),
        })
    };
    Ok(match &f.filter_specifier {
        Some(F::StatusCodeFilter(s)) => AccessLogFilter::Status(cmp(
            &s.comparison,
            &join(path, "status_code_filter.comparison"),
        )?),
        Some(F::DurationFilter(s)) => AccessLogFilter::Duration(cmp(
            &s.comparison,
            &join(path, "duration_filter.comparison"),
        )?),
        Some(F::NotHealthCheckFilter(_)) => AccessLogFilter::NotHealthCheck,
        Some(F::ResponseFlagFilter(r)) => {
            for fl in &r.flags {
                if !RESPONSE_FLAGS.contains(&fl.as_str()) {
                    return Err(err(
                        join(path, "response_flag_filter.flags"),
                        format!("unknown response flag {fl:?}"),
                    ));
                }
            }
            AccessLogFilter::ResponseFlag(r.flags.clone())
        }
        Some(F::AndFilter(a)) => AccessLogFilter::And(
            a.filters
                .iter()
                .enumerate()
                .map(|(i, f)| access_log_filter(f, &format!("{path}.and_filter.filters[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(F::OrFilter(a)) => AccessLogFilter::Or(
            a.filters
                .iter()
                .enumerate()
                .map(|(i, f)| access_log_filter(f, &format!("{path}.or_filter.filters[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(F::HeaderFilter(hf)) => {
            let m = hf
                .header
                .as_ref()
                .ok_or_else(|| err(join(path, "header_filter.header"), "header is required"))?;
            AccessLogFilter::Header(route::header_matcher(
                m,
                &join(path, "header_filter.header"),
            )?)
        }
        Some(_) => return Err(err(path, "this access log filter is not implemented")),
        None => return Err(err(path, "access log filter is empty")),
    })
}

/// Envoy's short response flags.
pub const RESPONSE_FLAGS: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

#[cfg(test)]
mod tests {
    //! Istio's HTTP and network filters, on both configuration paths: YAML
    //! (a bootstrap; TypedStructs unwrapped while parsing) and binary xDS
    //! (a decoded `Listener` resource whose TypedStructs reach the support
    //! check and the translator as they are).
    use prost::Message;

    use crate::api::envoy::config::listener::v3 as l;
    use crate::api::envoy::extensions::filters::network::http_connection_manager::v3 as h;
    use crate::api::google::protobuf::Any;
    use std::{sync::Arc, time::Duration};

    use crate::config::{
        AbortKind, DelayKind, FaultAbort, FaultConfig, FaultDelay, FilterOverride, Fraction,
        HttpFilterKind, Listener, NetworkFilter, PassThrough, PerFilterConfig, PerFilterConfigs,
        RouteConfig, RouteSource, Snapshot,
    };
    use crate::xds::resources::{decode, Resource, ResourceType};

    const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    const TS: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";

    /// Filters istiod sends as TypedStructs: (filter name, inner type, value).
    const PEER_METADATA: (&str, &str, &str) = (
        "istio.metadata_exchange",
        "io.istio.http.peer_metadata.Config",
        "{upstream_discovery: [{istio_headers: {}}, {workload_discovery: {}}], \
          upstream_propagation: [{istio_headers: {skip_external_clusters: true}}]}",
    );
    const WAYPOINT_PEER_METADATA: (&str, &str, &str) = (
        "waypoint_downstream_peer_metadata",
        "io.istio.http.peer_metadata.Config",
        "{downstream_discovery: [{workload_discovery: {}}], shared_with_upstream: true}",
    );
    const HTTP_STATS: (&str, &str, &str) = (
        "istio.stats",
        "stats.PluginConfig",
        "{disable_host_header_fallback: true, reporter: SERVER_GATEWAY, \
          metrics: [{name: requests_total, dimensions: {a: \"'b'\"}, tags_to_remove: [c]}], \
          rotation_interval: 60s}",
    );
    const MX: (&str, &str, &str) = (
        "istio.metadata_exchange.tcp",
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        "{protocol: istio-peer-exchange, enable_discovery: true}",
    );
    const TCP_STATS: (&str, &str, &str) = ("istio.stats.tcp", "stats.PluginConfig", "{}");

    fn ts_yaml((name, inner, value): (&str, &str, &str)) -> String {
        format!(
            "{{name: {name}, typed_config: {{\"@type\": {TS}, \
             type_url: \"type.googleapis.com/{inner}\", value: {value}}}}}"
        )
    }

    fn ts_any((_, inner, value): (&str, &str, &str)) -> Any {
        crate::bootstrap::any_from_text(
            TS,
            &format!("{{type_url: \"type.googleapis.com/{inner}\", value: {value}}}"),
        )
        .expect("TypedStruct parses")
    }

    /// An Istio-gateway-shaped HTTP listener: `fault` is the fault filter's
    /// typed_config (YAML flow mapping).
    fn http_listener(fault: &str) -> String {
        format!(
            r#"
name: gw
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
listener_filters:
- name: envoy.filters.listener.tls_inspector
  typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector, initial_read_buffer_size: 512}}
filter_chains:
- transport_socket:
    name: envoy.transport_sockets.raw_buffer
    typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}
  filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: outbound_0.0.0.0_8080
      request_id_extension:
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig, use_request_id_for_trace_sampling: true}}
      route_config:
        name: http.8080
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {{prefix: /}}
            route:
              cluster: echo
              retry_policy:
                retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
                num_retries: 2
                retry_host_predicate:
                - name: envoy.retry_host_predicates.previous_hosts
                  typed_config: {{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}
                host_selection_retry_max_attempts: "5"
      http_filters:
      - {peer_metadata}
      - {waypoint_peer_metadata}
      - name: envoy.filters.http.grpc_stats
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig, emit_filter_state: true, stats_for_all_methods: false}}
      - name: istio.alpn
        typed_config:
          "@type": type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig
          alpn_override:
          - {{alpn_override: [istio-http/1.0, istio, http/1.0]}}
          - {{upstream_protocol: HTTP11, alpn_override: [istio-http/1.1, istio, http/1.1]}}
          - {{upstream_protocol: HTTP2, alpn_override: [istio-h2, istio, h2]}}
      - name: envoy.filters.http.fault
        typed_config: {fault}
      - name: envoy.filters.http.cors
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}
      - {http_stats}
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
            peer_metadata = ts_yaml(PEER_METADATA),
            waypoint_peer_metadata = ts_yaml(WAYPOINT_PEER_METADATA),
            http_stats = ts_yaml(HTTP_STATS),
        )
    }

    const EMPTY_FAULT: &str =
        r#"{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}"#;

    /// A TCP listener with Istio's network filters before tcp_proxy;
    /// `transport_socket` is YAML for the chain's field (or empty).
    fn tcp_listener(transport_socket: &str) -> String {
        format!(
            r#"
name: tcp
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- {transport_socket}
  filters:
  - {mx}
  - {stats}
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: echo, cluster: echo}}
"#,
            mx = ts_yaml(MX),
            stats = ts_yaml(TCP_STATS),
        )
    }

    /// The YAML path: a bootstrap with `listener` and the cluster `echo`
    /// (with Istio's upstream options: HttpProtocolOptions, RawBuffer).
    fn bootstrap(listener: &str) -> Result<Snapshot, crate::ConfigErrors> {
        let listener: serde_json::Value =
            serde_yaml::from_str(listener).expect("listener YAML is valid");
        let cluster: serde_json::Value = serde_yaml::from_str(
            r#"
name: echo
type: STATIC
connect_timeout: 10s
transport_socket:
  name: envoy.transport_sockets.raw_buffer
  typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    use_downstream_protocol_config: {http_protocol_options: {}, http2_protocol_options: {}}
load_assignment:
  cluster_name: echo
  endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
"#,
        )
        .expect("cluster YAML is valid");
        let b = serde_json::json!({
            "static_resources": {"listeners": [listener], "clusters": [cluster]}
        });
        crate::load_bootstrap(Some(&b.to_string()), None, Default::default()).map(|(_, s)| s)
    }

    /// The binary xDS path: `listener` as an LDS resource whose filters
    /// named in `typed_structs` carry that TypedStruct as it is.
    fn lds(
        listener: &str,
        typed_structs: &[(&str, &str, &str)],
    ) -> Result<std::sync::Arc<Listener>, String> {
        let any = crate::bootstrap::any_from_text(LISTENER, listener).expect("listener parses");
        let mut p = l::Listener::decode(any.value.as_slice()).expect("decodes");
        let wrapped = |name: &str| {
            typed_structs
                .iter()
                .find(|t| t.0 == name)
                .map(|t| ts_any(*t))
        };
        for fc in &mut p.filter_chains {
            for f in &mut fc.filters {
                if let Some(a) = wrapped(&f.name) {
                    f.config_type = Some(l::filter::ConfigType::TypedConfig(a));
                } else if let Some(l::filter::ConfigType::TypedConfig(a)) = &mut f.config_type {
                    if a.type_url == HCM {
                        let mut hcm = h::HttpConnectionManager::decode(a.value.as_slice())
                            .expect("HCM decodes");
                        for hf in &mut hcm.http_filters {
                            if let Some(t) = wrapped(&hf.name) {
                                hf.config_type = Some(h::http_filter::ConfigType::TypedConfig(t));
                            }
                        }
                        a.value = hcm.encode_to_vec();
                    }
                }
            }
        }
        let any = Any {
            type_url: LISTENER.into(),
            value: p.encode_to_vec(),
        };
        match decode(ResourceType::Listener, &any) {
            Ok((_, Resource::Listener(l))) => Ok(l),
            Ok(_) => Err("not a listener".into()),
            Err(r) => Err(r.reason),
        }
    }

    fn http_kinds(l: &Listener) -> Vec<HttpFilterKind> {
        match &l.filter_chains[0].filter {
            NetworkFilter::Http(h) => h.http_filters.iter().map(|f| f.kind.clone()).collect(),
            NetworkFilter::Tcp(_) => panic!("HTTP chain expected"),
        }
    }

    fn alpn(list: &[&str]) -> Arc<[Vec<u8>]> {
        list.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    fn assert_istio_http_filters(l: &Listener) {
        let kinds = http_kinds(l);
        assert_eq!(
            kinds[..kinds.len() - 1],
            [
                HttpFilterKind::PeerMetadata(Arc::new(crate::config::PeerMetadataConfig {
                    upstream_discovery: vec![
                        crate::config::PeerDiscovery::IstioHeaders,
                        crate::config::PeerDiscovery::WorkloadDiscovery,
                    ],
                    upstream_propagation: vec![crate::config::PeerPropagation::IstioHeaders {
                        skip_external_clusters: true,
                    }],
                    ..Default::default()
                })),
                HttpFilterKind::PeerMetadata(Arc::new(crate::config::PeerMetadataConfig {
                    downstream_discovery: vec![crate::config::PeerDiscovery::WorkloadDiscovery],
                    shared_with_upstream: crate::config::Sharing::Once,
                    ..Default::default()
                })),
                HttpFilterKind::GrpcStats(Arc::new(crate::config::GrpcStatsConfig {
                    emit_filter_state: true,
                    ..Default::default()
                })),
                HttpFilterKind::IstioAlpn(Arc::new(crate::config::IstioAlpnConfig {
                    by_protocol: [
                        Some(alpn(&["istio-http/1.0", "istio", "http/1.0"])),
                        Some(alpn(&["istio-http/1.1", "istio", "http/1.1"])),
                        Some(alpn(&["istio-h2", "istio", "h2"])),
                    ],
                })),
                HttpFilterKind::Fault(Arc::new(FaultConfig::default())),
                HttpFilterKind::Cors,
                HttpFilterKind::IstioStats(Arc::new(crate::config::IstioStatsConfig {
                    disable_host_header_fallback: true,
                    server_gateway: true,
                    inbound: false,
                    metrics: vec![crate::config::IstioMetricConfig {
                        name: "requests_total".into(),
                        dimensions: vec![("a".into(), 0)],
                        tags_to_remove: vec!["c".into()],
                        drop: false,
                    }],
                    expressions: vec![crate::config::DimensionExpr::Literal("b".into())],
                })),
            ]
        );
        assert!(matches!(kinds.last(), Some(HttpFilterKind::Router(_))));
        assert!(l.filter_chains[0].pass_through.is_empty());
    }

    /// `http_listener` with HCM `tracing` set to `tracing` (flow YAML).
    fn traced_listener(tracing: &str) -> String {
        http_listener(EMPTY_FAULT).replacen(
            "      stat_prefix: outbound_0.0.0.0_8080\n",
            &format!("      stat_prefix: outbound_0.0.0.0_8080\n      tracing: {tracing}\n"),
            1,
        )
    }

    const OTEL: &str = r#"{name: envoy.tracers.opentelemetry, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: echo}}}}"#;

    #[test]
    fn tracing_providers_translate_and_reject_naming_the_field() {
        let s = bootstrap(&traced_listener(&format!("{{provider: {OTEL}}}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let NetworkFilter::Http(h) = &s.listeners[0].filter_chains[0].filter else {
            panic!("an HCM");
        };
        let t = h.tracing.as_ref().expect("tracing");
        let Some(crate::config::TraceProvider::OpenTelemetry(o)) = t.provider.as_deref() else {
            panic!("an OpenTelemetry provider");
        };
        assert_eq!(&*o.grpc.cluster, "echo");
        assert_eq!(o.service_name, "unknown_service:envoy");
        assert_eq!(t.max_path_tag_length, 256);
        assert!(!t.egress);
        for (tracing, want) in [
            (format!("{{provider: {OTEL}, verbose: true}}"), "tracing.verbose: verbose span logs"),
            (
                format!("{{provider: {OTEL}, spawn_upstream_span: true}}"),
                "tracing.spawn_upstream_span: upstream (child) spans",
            ),
            (
                format!("{{provider: {OTEL}, custom_tags: [{{tag: a, metadata: {{kind: {{request: {{}}}}, metadata_key: {{key: k, path: [{{key: x}}]}}}}}}]}}"),
                "tracing.custom_tags[0].metadata: metadata custom tags",
            ),
            (
                r#"{provider: {name: envoy.tracers.zipkin, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: echo, collector_endpoint: /api/v2/spans}}}"#.to_owned(),
                "tracing.provider.typed_config.collector_endpoint_version: only HTTP_JSON",
            ),
            (
                r#"{provider: {name: envoy.tracers.opentelemetry, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: echo}}, resource_detectors: [{name: x, typed_config: {"@type": type.googleapis.com/google.protobuf.Empty}}]}}}"#.to_owned(),
                "resource_detectors",
            ),
        ] {
            let e = bootstrap(&traced_listener(&tracing))
                .err()
                .unwrap_or_else(|| panic!("{tracing} must be rejected"))
                .to_string();
            assert!(e.contains(want), "{tracing}: {e}");
        }
        // Without a provider, custom tags of any kind are accepted (no spans).
        bootstrap(&traced_listener(
            "{custom_tags: [{tag: a, metadata: {kind: {request: {}}, metadata_key: {key: k, path: [{key: x}]}}}]}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        // An OUTBOUND listener traces as egress.
        let out = traced_listener(&format!("{{provider: {OTEL}}}")).replacen(
            "name: gw\n",
            "name: gw\ntraffic_direction: OUTBOUND\n",
            1,
        );
        let s = bootstrap(&out).unwrap_or_else(|e| panic!("{e}"));
        let NetworkFilter::Http(h) = &s.listeners[0].filter_chains[0].filter else {
            panic!("an HCM");
        };
        assert!(h.tracing.as_ref().is_some_and(|t| t.egress));
    }

    #[test]
    fn istio_http_filters_are_accepted_from_yaml() {
        let s = bootstrap(&http_listener(EMPTY_FAULT)).unwrap_or_else(|e| panic!("{e}"));
        assert_istio_http_filters(&s.listeners[0]);
    }

    #[test]
    fn istio_http_filters_are_accepted_from_binary_xds() {
        let l = lds(
            &http_listener(EMPTY_FAULT),
            &[PEER_METADATA, WAYPOINT_PEER_METADATA, HTTP_STATS],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_istio_http_filters(&l);
    }

    #[test]
    fn istio_stats_reports_by_the_listener_direction() {
        let inbound = http_listener(EMPTY_FAULT).replacen(
            "name: gw\n",
            "name: gw\ntraffic_direction: INBOUND\n",
            1,
        );
        for (yaml, want) in [(http_listener(EMPTY_FAULT), false), (inbound, true)] {
            let l = lds(&yaml, &[PEER_METADATA, WAYPOINT_PEER_METADATA, HTTP_STATS])
                .unwrap_or_else(|e| panic!("{e}"));
            let stats = http_kinds(&l).into_iter().find_map(|k| match k {
                HttpFilterKind::IstioStats(s) => Some(s),
                _ => None,
            });
            assert_eq!(stats.map(|s| s.inbound), Some(want));
        }
    }

    #[test]
    fn istio_baggage_discovery_and_propagation_are_accepted() {
        use crate::config::{PeerDiscovery, PeerPropagation};
        let value = "{downstream_discovery: [{baggage: {}}, {istio_headers: {}}], \
                     upstream_discovery: [{baggage: {}}, {istio_headers: {}}], \
                     downstream_propagation: [{baggage: {}}], \
                     upstream_propagation: [{istio_headers: {}}, {baggage: {}}]}";
        let listener = http_listener(EMPTY_FAULT).replacen(
            &ts_yaml(HTTP_STATS),
            &ts_yaml(("istio.stats", "io.istio.http.peer_metadata.Config", value)),
            1,
        );
        let l = lds(&listener, &[]).unwrap_or_else(|e| panic!("{e}"));
        // Ours replaced istio.stats, after the listener's own.
        let pm = http_kinds(&l)
            .into_iter()
            .filter_map(|k| match k {
                HttpFilterKind::PeerMetadata(c) => Some(c),
                _ => None,
            })
            .last()
            .expect("peer metadata filter");
        assert_eq!(
            pm.downstream_discovery,
            [PeerDiscovery::Baggage, PeerDiscovery::IstioHeaders]
        );
        // As Istio: baggage is no upstream discovery method (ignored).
        assert_eq!(pm.upstream_discovery, [PeerDiscovery::IstioHeaders]);
        assert_eq!(pm.downstream_propagation, [PeerPropagation::Baggage]);
        assert_eq!(
            pm.upstream_propagation,
            [
                PeerPropagation::IstioHeaders {
                    skip_external_clusters: false
                },
                PeerPropagation::Baggage
            ]
        );
    }

    #[test]
    fn istio_telemetry_fields_weir_cannot_honour_are_rejected() {
        for (filter, value, want) in [
            (
                "io.istio.http.peer_metadata.Config",
                "{upstream_discovery: [{upstream_filter_state: {peer_metadata_key: k}}]}",
                "typed_config.upstream_discovery[0].upstream_filter_state: peer discovery",
            ),
            (
                "stats.PluginConfig",
                "{metrics: [{dimensions: {x: \"request.size + 1\"}}]}",
                "typed_config.metrics[0].dimensions[x]: expression",
            ),
            (
                "stats.PluginConfig",
                "{metrics: [{name: requests_total, match: \"request.method == 'GET'\"}]}",
                "typed_config.metrics[0].match",
            ),
        ] {
            let listener = http_listener(EMPTY_FAULT).replacen(
                &ts_yaml(HTTP_STATS),
                &ts_yaml(("istio.stats", filter, value)),
                1,
            );
            let e = lds(&listener, &[]).expect_err(value);
            assert!(e.contains(want), "{value}: {e}");
        }
    }

    #[test]
    fn istio_network_filters_are_accepted_before_tcp_proxy() {
        let check = |l: &Listener| {
            assert!(matches!(l.filter_chains[0].filter, NetworkFilter::Tcp(_)));
            assert!(l.filter_chains[0].pass_through.is_empty());
            // The metadata exchange and the network istio.stats run in
            // front of tcp_proxy.
            assert!(matches!(
                l.filter_chains[0].read_filters[..],
                [
                    crate::config::ReadFilterConfig {
                        kind: crate::config::ReadFilterKind::MetadataExchange(_),
                        ..
                    },
                    crate::config::ReadFilterConfig {
                        kind: crate::config::ReadFilterKind::IstioStats(_),
                        ..
                    }
                ]
            ));
            let crate::config::ReadFilterKind::MetadataExchange(m) =
                &l.filter_chains[0].read_filters[0].kind
            else {
                unreachable!()
            };
            assert!(m.enable_discovery);
        };
        let s = bootstrap(&tcp_listener("")).unwrap_or_else(|e| panic!("{e}"));
        check(&s.listeners[0]);
        check(&lds(&tcp_listener(""), &[MX, TCP_STATS]).unwrap_or_else(|e| panic!("{e}")));
    }

    #[test]
    fn pass_through_network_filters_may_precede_the_hcm() {
        let listener = http_listener(EMPTY_FAULT).replace(
            "  filters:\n  - name: envoy.filters.network.http_connection_manager",
            &format!(
                "  filters:\n  - {}\n  - name: envoy.filters.network.http_connection_manager",
                ts_yaml(TCP_STATS)
            ),
        );
        let l = lds(&listener, &[TCP_STATS, HTTP_STATS]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.filter_chains[0].pass_through, [PassThrough::IstioStats]);
        assert!(matches!(
            l.filter_chains[0].filter,
            // Peer metadata, istio.alpn and istio.stats run.
            NetworkFilter::Http(ref h) if h.pass_through().count() == 0
        ));
    }

    /// In front of tcp_proxy the exchange runs whatever the chain's ALPN;
    /// an empty protocol is rejected (Istio asserts one).
    #[test]
    fn metadata_exchange_config_is_checked() {
        let tls = |alpn: &str| {
            format!(
                "transport_socket:\n    name: envoy.transport_sockets.tls\n    typed_config:\n      \
                 \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n      \
                 common_tls_context:\n        alpn_protocols: [{alpn}]\n        \
                 tls_certificate_sds_secret_configs: [{{name: default, sds_config: {{ads: {{}}}}}}]"
            )
        };
        let ok = lds(&tcp_listener(&tls("h2, http/1.1")), &[MX, TCP_STATS]);
        assert!(ok.is_ok(), "{ok:?}");
        let ok = lds(
            &tcp_listener(&tls("istio-peer-exchange, istio")),
            &[MX, TCP_STATS],
        );
        assert!(ok.is_ok(), "{ok:?}");
        // In front of the HCM it is passed through, so a chain where it
        // would start is refused.
        let http = |alpn: &str| {
            http_listener(EMPTY_FAULT)
                .replace(
                    "  filters:\n  - name: envoy.filters.network.http_connection_manager",
                    &format!(
                        "  filters:\n  - {}\n  - name: envoy.filters.network.http_connection_manager",
                        ts_yaml(MX)
                    ),
                )
                .replace(
                    "- transport_socket:\n    name: envoy.transport_sockets.raw_buffer\n    typed_config: {\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}",
                    &format!("- {}", tls(alpn)),
                )
        };
        let l = lds(&http("h2, http/1.1"), &[MX, HTTP_STATS]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            l.filter_chains[0].pass_through,
            [PassThrough::MetadataExchange]
        );
        let e = lds(&http("istio-peer-exchange, h2"), &[MX, HTTP_STATS])
            .expect_err("the exchange would start in front of the HCM");
        assert!(
            e.contains("filters[0].typed_config.protocol: the chain's TLS context offers ALPN"),
            "{e}"
        );
        let e = lds(
            &tcp_listener("").replace("protocol: istio-peer-exchange, ", ""),
            &[],
        )
        .expect_err("an empty protocol matches connections without ALPN");
        assert!(
            e.contains("filters[0].typed_config.protocol: the metadata exchange needs"),
            "{e}"
        );
    }

    fn fault_of(l: &Listener) -> Arc<FaultConfig> {
        match &http_kinds(l)[4] {
            HttpFilterKind::Fault(f) => f.clone(),
            k => panic!("not the fault filter: {k:?}"),
        }
    }

    #[test]
    fn fault_config_is_translated() {
        let full = r#"{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: {http_status: 503, percentage: {numerator: 100}}, delay: {fixed_delay: 1.5s, percentage: {numerator: 25, denominator: TEN_THOUSAND}}, upstream_cluster: echo, downstream_nodes: [a, b], headers: [{name: x-f, exact_match: "1"}], max_active_faults: 3, disable_downstream_cluster_stats: true, abort_percent_runtime: k}"#;
        let s = bootstrap(&http_listener(full)).unwrap_or_else(|e| panic!("{e}"));
        let f = fault_of(&s.listeners[0]);
        assert_eq!(
            f.abort,
            Some(FaultAbort {
                kind: AbortKind::Http(503),
                percentage: Fraction {
                    numerator: 100,
                    denominator: 100
                },
                body: None,
            })
        );
        assert_eq!(
            f.delay,
            Some(FaultDelay {
                kind: DelayKind::Fixed(Duration::from_millis(1500)),
                percentage: Fraction {
                    numerator: 25,
                    denominator: 10_000
                },
            })
        );
        assert_eq!(f.upstream_cluster.as_deref(), Some("echo"));
        assert_eq!(f.downstream_nodes, ["a", "b"]);
        assert_eq!(f.headers.len(), 1);
        assert_eq!(f.max_active_faults, Some(3));
        assert!(f.disable_downstream_cluster_stats);
        // Header-controlled and gRPC variants; an empty config.
        let hdr = r#"{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: {header_abort: {}, percentage: {numerator: 100}}, delay: {header_delay: {}}}"#;
        let f = fault_of(&lds(&http_listener(hdr), &[]).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(f.abort.as_ref().map(|a| &a.kind), Some(&AbortKind::Header));
        assert_eq!(f.delay.as_ref().map(|d| &d.kind), Some(&DelayKind::Header));
        assert_eq!(
            f.delay.as_ref().map(|d| d.percentage),
            Some(Fraction::default())
        );
        let grpc = r#"{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: {grpc_status: 14}}"#;
        let f = fault_of(&lds(&http_listener(grpc), &[]).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            f.abort.as_ref().map(|a| &a.kind),
            Some(&AbortKind::Grpc(14))
        );
        let s = bootstrap(&http_listener(EMPTY_FAULT)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!fault_of(&s.listeners[0]).is_active());
        // In a TypedStruct too.
        let ts = (
            "envoy.filters.http.fault",
            "envoy.extensions.filters.http.fault.v3.HTTPFault",
            "{abort: {http_status: 418}}",
        );
        let l = lds(&http_listener(EMPTY_FAULT), &[ts]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fault_of(&l).abort.as_ref().map(|a| &a.kind),
            Some(&AbortKind::Http(418))
        );
    }

    #[test]
    fn fault_limits_are_rejected_naming_the_field() {
        let path = "filter_chains[0].filters[0].typed_config.http_filters[4].typed_config";
        let f = |body: &str| {
            format!(
                r#"{{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, {body}}}"#
            )
        };
        for (body, want) in [
            (
                "response_rate_limit: {fixed_limit: {limit_kbps: 1}}",
                "response_rate_limit: response_rate_limit (response body throttling) is not implemented",
            ),
            (
                "filter_metadata: {a: 1}",
                "filter_metadata: filter_metadata (dynamic metadata on injected faults) is not implemented",
            ),
            ("abort: {http_status: 600}", "abort.http_status: http_status 600 is not in [200, 600)"),
            ("abort: {http_status: 199}", "abort.http_status"),
            ("abort: {percentage: {numerator: 1}}", "abort: one of http_status"),
            ("delay: {fixed_delay: 0s}", "delay.fixed_delay: must be greater than 0s"),
            ("delay: {percentage: {numerator: 1}}", "delay: one of fixed_delay or header_delay"),
        ] {
            let e = lds(&http_listener(&f(body)), &[]).expect_err(body);
            assert!(e.contains(&format!("{path}.{want}")), "{body}: {e}");
            let e = bootstrap(&http_listener(&f(body)))
                .expect_err(body)
                .to_string();
            assert!(
                e.contains(&format!("static_resources.listeners[0].{path}.")),
                "{body}: {e}"
            );
        }
    }

    #[test]
    fn unknown_key_in_a_typed_struct_is_rejected_naming_it() {
        let bad = (
            "istio.stats",
            "stats.PluginConfig",
            "{reporter: SERVER_GATEWAY, no_such_key: 1}",
        );
        let path =
            "filter_chains[0].filters[0].typed_config.http_filters[6].typed_config.no_such_key";
        let e = lds(&http_listener(EMPTY_FAULT), &[bad]).expect_err("unknown key");
        assert!(e.contains(path), "{e}");
        assert!(e.contains("no_such_key"), "{e}");
        let listener = http_listener(EMPTY_FAULT).replace(&ts_yaml(HTTP_STATS), &ts_yaml(bad));
        let e = bootstrap(&listener).expect_err("unknown key").to_string();
        assert!(e.contains(path), "{e}");
        // A bad value and an unknown inner type too.
        let bad = (
            "istio.stats",
            "stats.PluginConfig",
            "{reporter: NOT_A_REPORTER}",
        );
        let e = lds(&http_listener(EMPTY_FAULT), &[bad]).expect_err("bad enum");
        assert!(e.contains("http_filters[6].typed_config"), "{e}");
        let bad = ("istio.stats", "stats.NoSuchConfig", "{}");
        let e = lds(&http_listener(EMPTY_FAULT), &[bad]).expect_err("unknown type");
        assert!(
            e.contains("http_filters[6].typed_config.type_url: unknown type URL"),
            "{e}"
        );
    }

    fn per_filter_of(l: &Listener) -> (RouteConfig, Vec<PerFilterConfigs>) {
        let NetworkFilter::Http(h) = &l.filter_chains[0].filter else {
            panic!("HCM")
        };
        let RouteSource::Static(rc) = &h.routes else {
            panic!("static routes")
        };
        let vh = &rc.vhosts[0];
        (
            (**rc).clone(),
            vec![
                vh.routes[0].per_filter.clone(),
                vh.per_filter.clone(),
                rc.per_filter.clone(),
            ],
        )
    }

    /// `typed_per_filter_config` at route, virtual host and route
    /// configuration level: fault configs (bare or in a `FilterConfig`) are
    /// accepted; other filters' stay rejected (CORS: `translate::cors`).
    #[test]
    fn per_filter_fault_config_is_accepted_other_filters_rejected() {
        let base = http_listener(EMPTY_FAULT);
        let route_level = base.replace(
            "          - match: {prefix: /}\n",
            "          - match: {prefix: /}\n            typed_per_filter_config:\n              envoy.filters.http.fault: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: {http_status: 503}}\n",
        );
        let vhost_level = route_level.replace(
            "          domains: [\"*\"]\n",
            "          domains: [\"*\"]\n          typed_per_filter_config:\n            envoy.filters.http.fault: {\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true, is_optional: true}\n",
        );
        let all = vhost_level.replace(
            "        name: http.8080\n",
            "        name: http.8080\n        typed_per_filter_config:\n          envoy.filters.http.fault: {\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, delay: {fixed_delay: 1s}}}\n",
        );
        assert_ne!(all, vhost_level);
        for l in [
            bootstrap(&all).unwrap_or_else(|e| panic!("{e}")).listeners[0].clone(),
            lds(&all, &[]).unwrap_or_else(|e| panic!("{e}")),
        ] {
            let (_, levels) = per_filter_of(&l);
            let get = |i: usize| {
                levels[i]
                    .get("envoy.filters.http.fault")
                    .cloned()
                    .expect("entry")
            };
            let r = get(0);
            assert_eq!(r.disabled, None);
            let Some(FilterOverride::Fault(f)) = &r.config else {
                panic!("route fault")
            };
            assert_eq!(
                f.abort.as_ref().map(|a| &a.kind),
                Some(&AbortKind::Http(503))
            );
            assert_eq!(
                get(1),
                PerFilterConfig {
                    disabled: Some(true),
                    config: None
                }
            );
            let rc = get(2);
            assert_eq!(rc.disabled, Some(false));
            assert!(matches!(rc.config, Some(FilterOverride::Fault(_))));
        }
        // A bad fault config names its path.
        let bad = base.replace(
            "          - match: {prefix: /}\n",
            "          - match: {prefix: /}\n            typed_per_filter_config:\n              envoy.filters.http.fault: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: {http_status: 700}}\n",
        );
        let e = lds(&bad, &[]).expect_err("bad status");
        assert!(
            e.contains(
                "routes[0].typed_per_filter_config[\"envoy.filters.http.fault\"].abort.http_status"
            ),
            "{e}"
        );
        // Another filter's config under the fault filter's FilterConfig.
        let wrapped = base.replace(
            "          - match: {prefix: /}\n",
            "          - match: {prefix: /}\n            typed_per_filter_config:\n              x: {\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig}}\n",
        );
        let e = lds(&wrapped, &[]).expect_err("wrapped grpc_stats");
        assert!(
            e.contains("routes[0].typed_per_filter_config[\"x\"].config"),
            "{e}"
        );
        // A FilterConfig that neither disables nor configures (as Envoy).
        let empty = base.replace(
            "          - match: {prefix: /}\n",
            "          - match: {prefix: /}\n            typed_per_filter_config:\n              envoy.filters.http.fault: {\"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig, is_optional: true}\n",
        );
        let e = lds(&empty, &[]).expect_err("empty FilterConfig");
        assert!(
            e.contains("routes[0].typed_per_filter_config[\"envoy.filters.http.fault\"]: Empty route/virtual host per filter configuration for envoy.filters.http.fault filter"),
            "{e}"
        );
    }

    #[test]
    fn other_request_id_extensions_are_rejected() {
        let l = http_listener(EMPTY_FAULT).replace(
            "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig, use_request_id_for_trace_sampling: true",
            "envoy.extensions.filters.http.cors.v3.Cors",
        );
        let e = lds(&l, &[]).expect_err("not UUID");
        assert!(e.contains("request_id_extension.typed_config"), "{e}");
    }
}
