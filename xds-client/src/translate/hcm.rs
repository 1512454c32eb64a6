//! `HttpConnectionManager`, HTTP filters and access logs.
use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::api::envoy::config::accesslog::v3 as al;
use crate::api::envoy::config::core::v3 as core;
use crate::api::envoy::extensions::access_loggers::{
    file::v3 as file_log, stream::v3 as stream_log,
};
use crate::api::envoy::extensions::filters::http::router::v3::Router;
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
            Ok(Some(f)) => http_filters.push(f),
            Ok(None) => {}
            Err(e) => errs.extend(e),
        }
    }
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

fn http_filter(f: &h::HttpFilter, path: &str) -> Result<Option<HttpFilterConfig>, ConfigErrors> {
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
    let name: Name = f.name.as_str().into();
    if any
        .type_url
        .ends_with("envoy.extensions.filters.http.router.v3.Router")
    {
        let r: Router = super::decode(any, &join(path, "typed_config"))?;
        return Ok(Some(HttpFilterConfig {
            name,
            kind: HttpFilterKind::Router(RouterConfig {
                suppress_envoy_headers: r.suppress_envoy_headers,
                respect_expected_rq_timeout: r.respect_expected_rq_timeout,
            }),
        }));
    }
    Err(err(
        join(path, "typed_config"),
        format!("HTTP filter {} is not implemented yet", any.type_url),
    ))
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

fn substitution_format(
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
