//! `envoy.filters.http.set_filter_state` -> [`SetFilterState`].
use std::sync::Arc;

use crate::api::envoy::extensions::filters::common::set_filter_state::v3::{
    filter_state_value, FilterStateValue as Value,
};
use crate::api::envoy::extensions::filters::http::set_filter_state::v3::Config;
use crate::config::{Command, FilterStateValue, FormatPart, LogFormat, SetFilterState, Sharing};
use crate::error::{join, ConfigErrors};

use super::err;

pub const HTTP_SET_FILTER_STATE: &str = "envoy.extensions.filters.http.set_filter_state.v3.Config";

/// Object factories weir has: string objects (Envoy's `envoy.string`,
/// `envoy.hashable_string`, and Istio's principal keys, which Istio's
/// proxy registers as strings).
const STRING_FACTORIES: &[&str] = &[
    "envoy.string",
    "envoy.hashable_string",
    "istio.hashable_string",
    "io.istio.peer_principal",
    "io.istio.local_principal",
];

/// Envoy's `Network::ApplicationProtocols` factory: the upstream ALPN
/// override (the value split at `,`).
const APPLICATION_PROTOCOLS: &str = "envoy.network.application_protocols";

/// Envoy's `Network::AddressObject` factories (`ip:port`).
const ADDRESS_FACTORIES: &[&str] = &[
    "envoy.filters.listener.original_dst.local_ip",
    "envoy.filters.listener.original_dst.remote_ip",
    "envoy.network.transport_socket.original_dst_address",
];

pub const NETWORK_SET_FILTER_STATE: &str =
    "envoy.extensions.filters.network.set_filter_state.v3.Config";

pub fn set_filter_state(c: &Config, path: &str) -> Result<SetFilterState, ConfigErrors> {
    values(
        &c.on_request_headers,
        &join(path, "on_request_headers"),
        request_time,
    )
}

/// The network filter: `on_new_connection` values (connection facts only).
pub fn network_set_filter_state(
    c: &crate::api::envoy::extensions::filters::network::set_filter_state::v3::Config,
    path: &str,
) -> Result<SetFilterState, ConfigErrors> {
    values(
        &c.on_new_connection,
        &join(path, "on_new_connection"),
        connection_time,
    )
}

fn values(
    list: &[Value],
    path: &str,
    allowed: fn(&Command) -> bool,
) -> Result<SetFilterState, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut on_request_headers = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let vpath = format!("{path}[{i}]");
        match value(v, &vpath, allowed) {
            Ok(v) => on_request_headers.push(v),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(SetFilterState { on_request_headers })
}

fn value(
    v: &Value,
    path: &str,
    allowed: fn(&Command) -> bool,
) -> Result<FilterStateValue, ConfigErrors> {
    let key = match &v.key {
        Some(filter_state_value::Key::ObjectKey(k)) if !k.is_empty() => k.clone(),
        _ => return Err(err(join(path, "object_key"), "object_key is required")),
    };
    let factory = if v.factory_key.is_empty() {
        key.as_str()
    } else {
        v.factory_key.as_str()
    };
    let application_protocols = factory == APPLICATION_PROTOCOLS;
    let address = ADDRESS_FACTORIES.contains(&factory);
    if !application_protocols && !address && !STRING_FACTORIES.contains(&factory) {
        let field = if v.factory_key.is_empty() {
            "object_key"
        } else {
            "factory_key"
        };
        return Err(err(
            join(path, field),
            format!(
                "weir has no filter state object factory {factory:?} (string objects: {}; \
                 addresses: {}; {APPLICATION_PROTOCOLS})",
                STRING_FACTORIES.join(", "),
                ADDRESS_FACTORIES.join(", ")
            ),
        ));
    }
    let fpath = join(path, "format_string");
    let format = match &v.value {
        Some(filter_state_value::Value::FormatString(f)) => {
            match super::hcm::substitution_format(f, &fpath)? {
                LogFormat::Text(t) => t,
                LogFormat::Json(_) => {
                    return Err(err(
                        join(&fpath, "json_format"),
                        "filter state values are strings: use a text format",
                    ))
                }
            }
        }
        None => return Err(err(fpath, "format_string is required")),
    };
    for part in &format.parts {
        if let FormatPart::Op(op) = part {
            if !allowed(&op.cmd) {
                return Err(err(
                    fpath,
                    format!(
                        "format operator {:?} has no value when set_filter_state runs \
                         (weir evaluates the operators known at that point only)",
                        op.cmd
                    ),
                ));
            }
        }
    }
    let hashable = factory.ends_with(".hashable_string");
    use filter_state_value::SharedWithUpstream as S;
    Ok(FilterStateValue {
        key: Arc::from(key),
        format,
        read_only: v.read_only,
        shared_with_upstream: match S::try_from(v.shared_with_upstream).unwrap_or(S::None) {
            S::None => Sharing::None,
            S::Once => Sharing::Once,
            S::Transitive => Sharing::Transitive,
        },
        address,
        skip_if_empty: v.skip_if_empty,
        hashable,
        application_protocols,
    })
}

/// Operators whose value is known at the request headers (what
/// `filters::format::eval_request` evaluates).
pub fn request_time(c: &Command) -> bool {
    matches!(
        c,
        Command::Req(..)
            | Command::Protocol
            | Command::DownstreamRemoteAddress
            | Command::DownstreamRemoteAddressWithoutPort
            | Command::DownstreamDirectRemoteAddress
            | Command::DownstreamDirectRemoteAddressWithoutPort
            | Command::DownstreamLocalAddress
            | Command::DownstreamLocalAddressWithoutPort
            | Command::DownstreamLocalPort
            | Command::RequestedServerName
            | Command::DownstreamPeerUriSan
            | Command::DownstreamPeerDnsSan
            | Command::DownstreamPeerSubject
            | Command::DownstreamLocalUriSan
            | Command::RouteName
            | Command::Hostname
            | Command::ConnectionId
            | Command::DynamicMetadata(..)
            | Command::FilterState { .. }
            | Command::Environment(_)
            | Command::Method
            | Command::Path
    )
}

/// Operators known when a connection is accepted (what
/// `filters::format::eval_connection` evaluates).
pub fn connection_time(c: &Command) -> bool {
    matches!(
        c,
        Command::DownstreamRemoteAddress
            | Command::DownstreamRemoteAddressWithoutPort
            | Command::DownstreamDirectRemoteAddress
            | Command::DownstreamDirectRemoteAddressWithoutPort
            | Command::DownstreamLocalAddress
            | Command::DownstreamLocalAddressWithoutPort
            | Command::DownstreamLocalPort
            | Command::RequestedServerName
            | Command::Hostname
            | Command::FilterState { .. }
            | Command::Environment(_)
    )
}
