//! `Listener` translation.
use std::sync::Arc;

use crate::api::envoy::config::listener::v3 as l;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::{err, hcm};

const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

pub fn listener(proto: &l::Listener, path: &str) -> Result<Listener, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if proto.name.is_empty() {
        errs.push(join(path, "name"), "listener name is required");
    }
    let address = match &proto.address {
        Some(a) => match super::listen_address(a, &join(path, "address")) {
            Ok(ListenAddress::Socket(s)) => Some(s),
            Ok(ListenAddress::Pipe(_)) => {
                errs.push(
                    join(path, "address.pipe"),
                    "pipe listeners are not implemented yet",
                );
                None
            }
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => {
            errs.push(join(path, "address"), "listener address is required");
            None
        }
    };
    if proto.bind_to_port.as_ref().is_some_and(|b| !b.value) {
        errs.push(
            join(path, "bind_to_port"),
            "bind_to_port: false is not implemented yet",
        );
    }
    let chain = match (proto.filter_chains.len(), &proto.default_filter_chain) {
        (0, Some(fc)) => Some((fc, join(path, "default_filter_chain"))),
        (1, None) => Some((&proto.filter_chains[0], format!("{path}.filter_chains[0]"))),
        (1, Some(_)) => {
            errs.push(
                join(path, "default_filter_chain"),
                "filter-chain selection (several chains) is not implemented yet",
            );
            None
        }
        (0, None) => {
            errs.push(
                join(path, "filter_chains"),
                "a listener needs a filter chain",
            );
            None
        }
        _ => {
            errs.push(
                join(path, "filter_chains"),
                "filter-chain selection (several chains) is not implemented yet",
            );
            None
        }
    };
    let filter_chain = chain.and_then(|(fc, p)| match filter_chain(fc, &p) {
        Ok(fc) => Some(fc),
        Err(e) => {
            errs.extend(e);
            None
        }
    });
    let mut raw = Vec::new();
    for (i, o) in proto.socket_options.iter().enumerate() {
        match socket_option(o, &format!("{path}.socket_options[{i}]")) {
            Ok(o) => raw.push(o),
            Err(e) => errs.extend(e),
        }
    }
    let mut access_logs = Vec::new();
    for (i, a) in proto.access_log.iter().enumerate() {
        match hcm::access_log(a, &format!("{path}.access_log[{i}]")) {
            Ok(a) => access_logs.push(Arc::new(a)),
            Err(e) => errs.extend(e),
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let address = address.expect("checked above");
    let stat_prefix = if proto.stat_prefix.is_empty() {
        format!("listener.{}.", address.to_string().replace(':', "_"))
    } else {
        format!("listener.{}.", proto.stat_prefix)
    };
    Ok(Listener {
        name: proto.name.as_str().into(),
        address,
        stat_prefix,
        socket: SocketOptions {
            reuse_port: proto
                .enable_reuse_port
                .as_ref()
                .map(|b| b.value)
                .unwrap_or(true),
            backlog: proto
                .tcp_backlog_size
                .as_ref()
                .map(|v| v.value)
                .unwrap_or(1024),
            raw,
            freebind: proto.freebind.as_ref().map(|b| b.value).unwrap_or(false),
        },
        buffer_limit: proto
            .per_connection_buffer_limit_bytes
            .as_ref()
            .map(|v| v.value)
            .unwrap_or(1024 * 1024),
        filter_chain: Arc::new(filter_chain.expect("checked above")),
        access_logs,
        inbound: proto.traffic_direction == 1,
    })
}

fn filter_chain(fc: &l::FilterChain, path: &str) -> Result<FilterChain, ConfigErrors> {
    if fc.filters.len() != 1 {
        return Err(err(
            join(path, "filters"),
            "weir needs exactly one network filter, envoy.filters.network.http_connection_manager (tcp_proxy comes with the TLS/TCP work)",
        ));
    }
    let f = &fc.filters[0];
    let fpath = format!("{path}.filters[0]");
    let any = match &f.config_type {
        Some(l::filter::ConfigType::TypedConfig(a)) => a,
        _ => {
            return Err(err(
                join(&fpath, "typed_config"),
                "typed_config is required",
            ))
        }
    };
    if !any.type_url.ends_with(HCM_TYPE) {
        return Err(err(
            join(&fpath, "typed_config"),
            format!("network filter {} is not implemented yet", any.type_url),
        ));
    }
    let proto = super::decode(any, &join(&fpath, "typed_config"))?;
    let h = hcm::hcm(&proto, &join(&fpath, "typed_config"))?;
    Ok(FilterChain {
        name: fc.name.as_str().into(),
        filter: NetworkFilter::Http(Arc::new(h)),
    })
}

fn socket_option(
    o: &crate::api::envoy::config::core::v3::SocketOption,
    path: &str,
) -> Result<RawSocketOption, ConfigErrors> {
    use crate::api::envoy::config::core::v3::socket_option::Value as V;
    let value = match &o.value {
        Some(V::IntValue(i)) => RawSocketValue::Int(*i),
        Some(V::BufValue(b)) => RawSocketValue::Bytes(b.clone()),
        None => return Err(err(path, "socket option needs int_value or buf_value")),
    };
    let level = i32::try_from(o.level).map_err(|_| err(join(path, "level"), "out of range"))?;
    let name = i32::try_from(o.name).map_err(|_| err(join(path, "name"), "out of range"))?;
    Ok(RawSocketOption {
        level,
        name,
        value,
        state: o.state,
    })
}
