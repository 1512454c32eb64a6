//! `Listener` translation.
use std::sync::Arc;

use crate::api::envoy::config::listener::v3 as l;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::{err, hcm};

const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY_TYPE: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const SNI_CLUSTER_TYPE: &str = "envoy.extensions.filters.network.sni_cluster.v3.SniCluster";

pub fn listener(proto: &l::Listener, path: &str) -> Result<Listener, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let internal = matches!(
        proto.listener_specifier,
        Some(l::listener::ListenerSpecifier::InternalListener(_))
    );
    let address = match &proto.address {
        // Envoy: "address should not be used when an internal listener
        // config is provided".
        Some(_) if internal => {
            errs.push(
                join(path, "address"),
                "address should not be used when an internal listener config is provided",
            );
            None
        }
        None if internal => Some(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
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
    // istiod sets `use_original_dst: false` (the default) on the
    // waypoint's `connect_originate`; only `true` (the deprecated
    // listener-level original destination redirect) is not implemented.
    if proto.use_original_dst.as_ref().is_some_and(|b| b.value) {
        errs.push(
            join(path, "use_original_dst"),
            "use_original_dst: true is not implemented (use the envoy.filters.listener.original_dst listener filter)",
        );
    }
    if proto.filter_chains.is_empty() && proto.default_filter_chain.is_none() {
        errs.push(
            join(path, "filter_chains"),
            "a listener needs a filter chain",
        );
    }
    let mut filter_chains = Vec::new();
    for (i, fc) in proto.filter_chains.iter().enumerate() {
        match filter_chain(fc, &format!("{path}.filter_chains[{i}]")) {
            Ok(fc) => filter_chains.push(Arc::new(fc)),
            Err(e) => errs.extend(e),
        }
    }
    // With `filter_chain_matcher`, chains are picked by name: every chain
    // needs a unique one and its `filter_chain_match` is ignored (Envoy
    // logs it at debug level), duplicates included.
    let filter_chain_matcher = match &proto.filter_chain_matcher {
        Some(m) => {
            let mut names = std::collections::HashMap::new();
            for (i, fc) in proto.filter_chains.iter().enumerate() {
                let fpath = format!("{path}.filter_chains[{i}].name");
                if fc.name.is_empty() {
                    errs.push(
                        fpath,
                        "\"name\" field is required when using a listener matcher",
                    );
                } else if names.insert(fc.name.as_str(), i).is_some() {
                    errs.push(
                        fpath,
                        format!("\"name\" field is duplicated with value '{}'", fc.name),
                    );
                }
            }
            filter_chain_matcher(m, &join(path, "filter_chain_matcher"), &names)
                .map_err(|e| errs.extend(e))
                .ok()
                .map(Arc::new)
        }
        None => None,
    };
    // Envoy rejects two chains with the same match criteria.
    for (i, a) in filter_chains
        .iter()
        .enumerate()
        .filter(|_| filter_chain_matcher.is_none())
    {
        if let Some(b) = filter_chains[..i].iter().find(|b| b.matcher == a.matcher) {
            errs.push(
                join(&a.path, "filter_chain_match"),
                format!(
                    "multiple filter chains with the same matching rules are defined ({} and this one)",
                    b.path
                ),
            );
        }
    }
    let mut default_filter_chain = match &proto.default_filter_chain {
        Some(fc) => match filter_chain(fc, &join(path, "default_filter_chain")) {
            Ok(fc) => Some(Arc::new(fc)),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    // `istio.stats` reports by the listener's direction (Istio reads it
    // from the listener at filter creation).
    if proto.traffic_direction == 1 {
        for fc in filter_chains
            .iter_mut()
            .chain(default_filter_chain.as_mut())
        {
            set_inbound(fc);
        }
    }
    // As Envoy, an OUTBOUND listener's HCMs trace as `egress`.
    if proto.traffic_direction == 2 {
        for fc in filter_chains
            .iter_mut()
            .chain(default_filter_chain.as_mut())
        {
            set_egress(fc);
        }
    }
    let mut listener_filters = Vec::new();
    let mut listener_filters_disabled = Vec::new();
    for (i, lf) in proto.listener_filters.iter().enumerate() {
        let lpath = format!("{path}.listener_filters[{i}]");
        match listener_filter(lf, &lpath) {
            Ok(f) => listener_filters.push(f),
            Err(e) => errs.extend(e),
        }
        match &lf.filter_disabled {
            Some(p) => match listener_predicate(p, &join(&lpath, "filter_disabled"), 0) {
                Ok(p) => listener_filters_disabled.push(Some(p)),
                Err(e) => errs.extend(e),
            },
            None => listener_filters_disabled.push(None),
        }
    }
    let listener_filters_timeout = match &proto.listener_filters_timeout {
        Some(d) => super::duration(d, &join(path, "listener_filters_timeout"))
            .map_err(|e| errs.extend(e))
            .ok()
            .filter(|d| !d.is_zero()),
        None => Some(std::time::Duration::from_secs(15)),
    };
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
    let stat_prefix = if proto.stat_prefix.is_empty() && internal {
        // Envoy names an internal listener's stats `envoy_internal_NAME`.
        format!("listener.envoy_internal_{}.", proto.name)
    } else if proto.stat_prefix.is_empty() {
        format!("listener.{}.", address.to_string().replace(':', "_"))
    } else {
        format!("listener.{}.", proto.stat_prefix)
    };
    Ok(Listener {
        // As Envoy, a static listener without a name gets a generated one.
        name: if proto.name.is_empty() {
            format!("listener_{}", address.to_string().replace(':', "_")).into()
        } else {
            proto.name.as_str().into()
        },
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
        filter_chains,
        default_filter_chain,
        listener_filters,
        listener_filters_disabled,
        filter_chain_matcher,
        listener_filters_timeout,
        continue_on_listener_filters_timeout: proto.continue_on_listener_filters_timeout,
        access_logs,
        inbound: proto.traffic_direction == 1,
        unlimited: proto.ignore_global_conn_limit || proto.bypass_overload_manager,
        internal,
    })
}

/// Marks the chain's `istio.stats` filters as on an INBOUND listener.
/// Marks the chain's HCM tracing as Envoy's `egress` operation.
fn set_egress(fc: &mut Arc<FilterChain>) {
    let NetworkFilter::Http(h) = &fc.filter else {
        return;
    };
    if h.tracing.is_none() {
        return;
    }
    if let NetworkFilter::Http(h) = &mut Arc::make_mut(fc).filter {
        if let Some(t) = &mut Arc::make_mut(h).tracing {
            t.egress = true;
        }
    }
}

fn set_inbound(fc: &mut Arc<FilterChain>) {
    if fc
        .read_filters
        .iter()
        .any(|r| matches!(r.kind, ReadFilterKind::IstioStats(_)))
    {
        for r in &mut Arc::make_mut(fc).read_filters {
            if let ReadFilterKind::IstioStats(s) = &mut r.kind {
                Arc::make_mut(s).inbound = true;
            }
        }
    }
    let NetworkFilter::Http(h) = &fc.filter else {
        return;
    };
    if !h
        .http_filters
        .iter()
        .any(|f| matches!(f.kind, HttpFilterKind::IstioStats(_)))
    {
        return;
    }
    let fc = Arc::make_mut(fc);
    let NetworkFilter::Http(h) = &mut fc.filter else {
        return;
    };
    for f in &mut Arc::make_mut(h).http_filters {
        if let HttpFilterKind::IstioStats(s) = &mut f.kind {
            Arc::make_mut(s).inbound = true;
        }
    }
}

fn filter_chain(fc: &l::FilterChain, path: &str) -> Result<FilterChain, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let matcher = match &fc.filter_chain_match {
        Some(m) => chain_match(m, &join(path, "filter_chain_match")).unwrap_or_else(|e| {
            errs.extend(e);
            FilterChainMatch::default()
        }),
        None => FilterChainMatch::default(),
    };
    let tls = match &fc.transport_socket {
        Some(ts) => match super::tls::downstream_transport(ts, &join(path, "transport_socket")) {
            Ok(t) => t.map(|mut t| {
                // Part of the TLS session context (resumption with shared
                // ticket keys stays within chains for the same names).
                t.chain_server_names = matcher.server_names.clone();
                Arc::new(t)
            }),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    let transport_connect_timeout = match &fc.transport_socket_connect_timeout {
        Some(d) => super::duration(d, &join(path, "transport_socket_connect_timeout"))
            .map_err(|e| errs.extend(e))
            .ok()
            .filter(|d| !d.is_zero()),
        None => None,
    };
    let alpn = tls.as_ref().map(|t| t.alpn.as_slice()).unwrap_or_default();
    let filter = network_filters(&fc.filters, path, alpn)
        .map_err(|e| errs.extend(e))
        .ok();
    match filter {
        Some((filter, read_filters, pass_through)) if errs.is_empty() => Ok(FilterChain {
            name: fc.name.as_str().into(),
            matcher,
            tls,
            transport_connect_timeout,
            filter,
            read_filters,
            pass_through,
            path: path.to_owned(),
        }),
        _ => Err(errs),
    }
}

fn typed<'a>(
    c: &'a Option<l::filter::ConfigType>,
    path: &str,
) -> Result<&'a crate::api::google::protobuf::Any, ConfigErrors> {
    match c {
        Some(l::filter::ConfigType::TypedConfig(a)) => Ok(a),
        _ => Err(err(join(path, "typed_config"), "typed_config is required")),
    }
}

/// The chain's network filters: read filters weir runs and pass-through
/// filters (Istio's `istio.stats` and `istio.metadata_exchange`) in any
/// order, then `tcp_proxy` (after `sni_cluster` if any) or
/// `http_connection_manager`. `alpn` is what the chain's TLS context offers.
fn network_filters(
    filters: &[l::Filter],
    path: &str,
    alpn: &[Vec<u8>],
) -> Result<(NetworkFilter, Vec<ReadFilterConfig>, Vec<PassThrough>), ConfigErrors> {
    use crate::descriptors::{ISTIO_METADATA_EXCHANGE, ISTIO_STATS};
    if filters.is_empty() {
        return Err(err(
            join(path, "filters"),
            "a filter chain needs a network filter",
        ));
    }
    let mut sni_cluster = false;
    let mut pass_through = Vec::new();
    let mut read_filters = Vec::new();
    let last = filters.len() - 1;
    for (i, f) in filters.iter().enumerate() {
        let fpath = format!("{path}.filters[{i}]");
        let any = typed(&f.config_type, &fpath)?;
        let tpath = join(&fpath, "typed_config");
        let any = crate::support::unwrap_typed_struct(any, &tpath)?;
        let url = any.type_url.rsplit('/').next().unwrap_or_default();
        match url {
            HCM_TYPE | TCP_PROXY_TYPE if i != last => {
                return Err(err(
                    tpath,
                    "a terminal network filter must be the last in the chain",
                ))
            }
            HCM_TYPE if sni_cluster => {
                return Err(err(
                    join(path, "filters"),
                    "weir runs http_connection_manager only after pass-through filters \
                     (sni_cluster goes with tcp_proxy)",
                ))
            }
            HCM_TYPE => {
                let proto = super::decode(&any, &tpath)?;
                let hcm = hcm::hcm(&proto, &tpath)?;
                // The network istio.stats reports TCP connections: in front
                // of the HCM it is passed through (istiod does not put it
                // there).
                read_filters.retain(|r: &ReadFilterConfig| {
                    let tcp_stats = matches!(r.kind, ReadFilterKind::IstioStats(_));
                    if tcp_stats {
                        pass_through.push(PassThrough::IstioStats);
                    }
                    !tcp_stats
                });
                return Ok((
                    NetworkFilter::Http(Arc::new(hcm)),
                    read_filters,
                    pass_through,
                ));
            }
            TCP_PROXY_TYPE => {
                let proto = super::decode(&any, &tpath)?;
                let mut t = tcp_proxy(&proto, &tpath)?;
                t.sni_cluster = sni_cluster;
                return Ok((NetworkFilter::Tcp(Arc::new(t)), read_filters, pass_through));
            }
            SNI_CLUSTER_TYPE => sni_cluster = true,
            ISTIO_STATS => {
                let m = crate::descriptors::decode_any(&any.type_url, &any.value)
                    .map_err(|e| err(&tpath, e))?;
                read_filters.push(ReadFilterConfig {
                    name: f.name.as_str().into(),
                    kind: ReadFilterKind::IstioStats(Arc::new(super::istio::istio_stats(
                        &m, &tpath,
                    )?)),
                });
            }
            // In front of tcp_proxy it runs; in front of the HCM it is
            // passed through where it cannot start.
            ISTIO_METADATA_EXCHANGE if !terminal_is_hcm(filters) => {
                let m = crate::descriptors::decode_any(&any.type_url, &any.value)
                    .map_err(|e| err(&tpath, e))?;
                read_filters.push(ReadFilterConfig {
                    name: f.name.as_str().into(),
                    kind: ReadFilterKind::MetadataExchange(Arc::new(
                        super::istio::metadata_exchange(&m, &tpath)?,
                    )),
                });
            }
            ISTIO_METADATA_EXCHANGE => {
                metadata_exchange(&any, &tpath, alpn)?;
                pass_through.push(PassThrough::MetadataExchange);
            }
            other => match super::network::read_filter(&f.name, &any, &tpath)? {
                Some(r) => read_filters.push(r),
                None => {
                    return Err(err(
                        tpath,
                        format!("network filter {other} is not implemented yet"),
                    ))
                }
            },
        }
    }
    Err(err(
        join(path, "filters"),
        "the last network filter must be http_connection_manager or tcp_proxy",
    ))
}

/// Whether the chain ends with the HCM (else `tcp_proxy` or an error).
fn terminal_is_hcm(filters: &[l::Filter]) -> bool {
    use l::filter::ConfigType;
    let Some(ConfigType::TypedConfig(a)) = filters.last().and_then(|f| f.config_type.as_ref())
    else {
        return false;
    };
    crate::support::unwrap_typed_struct(a, "").is_ok_and(|a| a.type_url.ends_with(HCM_TYPE))
}

/// In front of the HCM, Istio's `istio.metadata_exchange` runs its in-band exchange only on
/// connections whose negotiated ALPN equals its `protocol`; anywhere else it
/// does nothing, which is what weir does. A chain where the exchange could
/// start is rejected: passing it through would forward the peer's exchange
/// bytes upstream and never answer them.
fn metadata_exchange(
    any: &crate::api::google::protobuf::Any,
    path: &str,
    alpn: &[Vec<u8>],
) -> Result<(), ConfigErrors> {
    let m = crate::descriptors::decode_any(&any.type_url, &any.value).map_err(|e| err(path, e))?;
    let protocol = m
        .get_field_by_name("protocol")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let ppath = join(path, "protocol");
    if protocol.is_empty() {
        return Err(err(
            ppath,
            "an empty protocol starts Istio's metadata exchange on connections without ALPN; \
             weir runs the exchange in front of tcp_proxy only",
        ));
    }
    if alpn.iter().any(|a| a == protocol.as_bytes()) {
        return Err(err(
            ppath,
            format!(
                "the chain's TLS context offers ALPN {protocol:?}, which starts Istio's in-band \
                 metadata exchange; weir runs the exchange in front of tcp_proxy only, not the \
                 HCM (remove {protocol:?} from alpn_protocols or the filter)"
            ),
        ));
    }
    Ok(())
}

fn tcp_proxy(
    p: &crate::api::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy,
    path: &str,
) -> Result<TcpProxy, ConfigErrors> {
    use crate::api::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as C;
    let mut errs = ConfigErrors::default();
    if p.stat_prefix.is_empty() {
        errs.push(join(path, "stat_prefix"), "stat_prefix is required");
    }
    let cluster = match &p.cluster_specifier {
        Some(C::Cluster(c)) => TcpCluster::Name(c.as_str().into()),
        Some(C::WeightedClusters(w)) => {
            let mut out = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                if c.metadata_match.is_some() {
                    errs.push(
                        format!("{path}.weighted_clusters.clusters[{i}].metadata_match"),
                        "metadata_match is not implemented yet",
                    );
                }
                if c.weight > 0 {
                    out.push((Name::from(c.name.as_str()), c.weight));
                }
            }
            if out.is_empty() {
                errs.push(
                    join(path, "weighted_clusters"),
                    "weighted_clusters needs a cluster with a positive weight",
                );
            }
            TcpCluster::Weighted(out)
        }
        None => {
            errs.push(
                path.to_owned(),
                "tcp_proxy needs cluster or weighted_clusters",
            );
            TcpCluster::Name("".into())
        }
    };
    let opt = |d: &Option<crate::api::google::protobuf::Duration>,
               field: &str,
               dflt: Option<std::time::Duration>,
               errs: &mut ConfigErrors| match d {
        Some(d) => super::duration(d, &join(path, field))
            .map_err(|e| errs.extend(e))
            .ok()
            .filter(|d| !d.is_zero()),
        None => dflt,
    };
    let idle_timeout = opt(
        &p.idle_timeout,
        "idle_timeout",
        Some(std::time::Duration::from_secs(3600)),
        &mut errs,
    );
    let downstream_idle_timeout = opt(
        &p.downstream_idle_timeout,
        "downstream_idle_timeout",
        None,
        &mut errs,
    );
    let upstream_idle_timeout = opt(
        &p.upstream_idle_timeout,
        "upstream_idle_timeout",
        None,
        &mut errs,
    );
    let max_downstream_connection_duration = opt(
        &p.max_downstream_connection_duration,
        "max_downstream_connection_duration",
        None,
        &mut errs,
    );
    let mut access_logs = Vec::new();
    for (i, a) in p.access_log.iter().enumerate() {
        match hcm::access_log(a, &format!("{path}.access_log[{i}]")) {
            Ok(a) => access_logs.push(Arc::new(a)),
            Err(e) => errs.extend(e),
        }
    }
    let max_connect_attempts = p
        .max_connect_attempts
        .as_ref()
        .map(|v| v.value)
        .unwrap_or(1);
    if max_connect_attempts == 0 {
        errs.push(join(path, "max_connect_attempts"), "must be at least 1");
    }
    // `hash_policy`: at most one (proto constraint), `source_ip` or
    // `filter_state` (the connection's, set by network filters).
    let mut hash_source_ip = false;
    let mut hash_filter_state = None;
    if p.hash_policy.len() > 1 {
        errs.push(
            join(path, "hash_policy"),
            "at most one hash policy is allowed",
        );
    }
    if let Some(h) = p.hash_policy.first() {
        use crate::api::envoy::r#type::v3::hash_policy::PolicySpecifier as P;
        match &h.policy_specifier {
            Some(P::SourceIp(_)) => hash_source_ip = true,
            Some(P::FilterState(f)) if f.key.is_empty() => errs.push(
                join(path, "hash_policy[0].filter_state.key"),
                "must not be empty",
            ),
            Some(P::FilterState(f)) => {
                hash_filter_state = Some(std::sync::Arc::from(vec![crate::config::HashPolicy {
                    kind: crate::config::HashPolicyKind::FilterState { key: f.key.clone() },
                    terminal: false,
                }]))
            }
            None => errs.push(
                join(path, "hash_policy[0]"),
                "a hash policy needs source_ip or filter_state",
            ),
        }
    }
    let tunneling = match &p.tunneling_config {
        Some(t) => match tunneling_config(t, &join(path, "tunneling_config")) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    errs.into_result(TcpProxy {
        stat_prefix: format!("tcp.{}.", p.stat_prefix),
        cluster,
        sni_cluster: false,
        idle_timeout,
        downstream_idle_timeout,
        upstream_idle_timeout,
        max_downstream_connection_duration,
        max_connect_attempts,
        access_logs,
        hash_source_ip,
        hash_filter_state,
        tunneling,
    })
}

/// `TcpProxy.TunnelingConfig`. Response header and trailer propagation
/// (into the connection's filter state) is not implemented: set, it is
/// rejected.
fn tunneling_config(
    t: &crate::api::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::TunnelingConfig,
    path: &str,
) -> Result<TunnelingConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    // As Envoy's proto: `hostname` is required (min_len 1).
    let hostname = if t.hostname.is_empty() {
        errs.push(join(path, "hostname"), "hostname is required");
        None
    } else {
        match crate::translate::format::parse_format(&t.hostname) {
            Ok(f) => Some(f),
            Err(e) => {
                errs.push(join(path, "hostname"), e);
                None
            }
        }
    };
    // As Envoy's TunnelingConfigHelper: a post_path without use_post is an
    // error; a POST path must be a path.
    if !t.post_path.is_empty() && !t.use_post {
        errs.push(
            join(path, "post_path"),
            "post_path needs use_post: true (Envoy: can't set a post path when POST method isn't used)",
        );
    }
    if !t.post_path.is_empty() && !t.post_path.starts_with('/') {
        errs.push(join(path, "post_path"), "post_path must start with '/'");
    }
    for (field, set) in [
        ("propagate_response_headers", t.propagate_response_headers),
        ("propagate_response_trailers", t.propagate_response_trailers),
    ] {
        if set {
            errs.push(
                join(path, field),
                "weir does not put tunnel response headers or trailers into filter state",
            );
        }
    }
    let mut headers_to_add = Vec::new();
    for (i, h) in t.headers_to_add.iter().enumerate() {
        match super::header_add(h, &format!("{path}.headers_to_add[{i}]"), true) {
            Ok(h) => headers_to_add.push(h),
            Err(e) => errs.extend(e),
        }
    }
    let post_path = if t.post_path.is_empty() {
        "/".to_owned()
    } else {
        t.post_path.clone()
    };
    errs.into_result(TunnelingConfig {
        hostname: hostname.unwrap_or_default(),
        use_post: t.use_post,
        post_path,
        headers_to_add,
    })
}

fn chain_match(m: &l::FilterChainMatch, path: &str) -> Result<FilterChainMatch, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = FilterChainMatch::default();
    if let Some(p) = &m.destination_port {
        match u16::try_from(p.value) {
            Ok(p) if p > 0 => out.destination_port = Some(p),
            _ => errs.push(join(path, "destination_port"), "must be 1..65535"),
        }
    }
    let cidrs = |v: &[crate::api::envoy::config::core::v3::CidrRange],
                 field: &str,
                 errs: &mut ConfigErrors| {
        let mut out = Vec::new();
        for (i, r) in v.iter().enumerate() {
            match hcm::cidr(r, &format!("{path}.{field}[{i}]")) {
                Ok(c) => out.push(c),
                Err(e) => errs.extend(e),
            }
        }
        out
    };
    out.prefix_ranges = cidrs(&m.prefix_ranges, "prefix_ranges", &mut errs);
    out.direct_source_prefix_ranges = cidrs(
        &m.direct_source_prefix_ranges,
        "direct_source_prefix_ranges",
        &mut errs,
    );
    out.source_prefix_ranges = cidrs(&m.source_prefix_ranges, "source_prefix_ranges", &mut errs);
    if !m.address_suffix.is_empty() || m.suffix_len.is_some() {
        errs.push(
            join(path, "address_suffix"),
            "address_suffix is not implemented (Envoy ignores it too)",
        );
    }
    for (i, p) in m.source_ports.iter().enumerate() {
        match u16::try_from(*p) {
            Ok(p) if p > 0 => out.source_ports.push(p),
            _ => errs.push(format!("{path}.source_ports[{i}]"), "must be 1..65535"),
        }
    }
    for (i, s) in m.server_names.iter().enumerate() {
        let s = s.to_ascii_lowercase();
        // Envoy accepts `*.example.com` (a leading wildcard label) only.
        let bad_wildcard = s.contains('*') && (!s.starts_with("*.") || s[2..].contains('*'));
        if s.is_empty() || bad_wildcard {
            errs.push(
                format!("{path}.server_names[{i}]"),
                format!("{s:?}: only a leading '*.' wildcard is allowed"),
            );
        } else {
            out.server_names.push(s);
        }
    }
    out.transport_protocol = m.transport_protocol.clone();
    out.application_protocols = m.application_protocols.clone();
    use l::filter_chain_match::ConnectionSourceType as S;
    out.source_type = match S::try_from(m.source_type) {
        Ok(S::Any) => SourceType::Any,
        Ok(S::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
        Ok(S::External) => SourceType::External,
        Err(_) => {
            errs.push(join(path, "source_type"), "unknown value");
            SourceType::Any
        }
    };
    errs.into_result(out)
}

/// `Listener.filter_chain_matcher`: network inputs, and actions naming a
/// chain of `names` (name → index in `filter_chains`).
fn filter_chain_matcher(
    m: &crate::api::xds::r#type::matcher::v3::Matcher,
    path: &str,
    names: &std::collections::HashMap<&str, usize>,
) -> Result<MatchTree<ChainAction>, ConfigErrors> {
    use super::match_tree::inputs::*;
    const STRING_VALUE: &str = "google.protobuf.StringValue";
    let action = |a: &crate::api::xds::core::v3::TypedExtensionConfig,
                  apath: &str|
     -> Result<ChainAction, ConfigErrors> {
        let tpath = join(apath, "typed_config");
        let Some(any) = &a.typed_config else {
            return Err(err(tpath, "value is required"));
        };
        let any = crate::support::unwrap_typed_struct(any, &tpath)?;
        let url = any.type_url.rsplit('/').next().unwrap_or_default();
        if url != STRING_VALUE {
            return Err(err(
                tpath,
                format!("a filter chain matcher action must be a {STRING_VALUE} naming a filter chain, not {url}"),
            ));
        }
        let v: crate::api::google::protobuf::StringValue = super::decode(&any, &tpath)?;
        // Envoy resolves the name when a connection matches; a name no
        // chain has selects no chain (the connection is closed).
        Ok(ChainAction {
            index: names.get(v.value.as_str()).copied(),
            name: v.value.as_str().into(),
        })
    };
    let rules = super::match_tree::Rules {
        inputs: &[
            DESTINATION_IP,
            DESTINATION_PORT,
            SOURCE_IP,
            SOURCE_PORT,
            DIRECT_SOURCE_IP,
            SOURCE_TYPE,
            SERVER_NAME,
            TRANSPORT_PROTOCOL,
            APPLICATION_PROTOCOL,
            FILTER_STATE,
        ],
        who: "a listener's filter_chain_matcher",
        action: &action,
    };
    super::match_tree::match_tree(m, path, &rules)
}

/// Nesting deeper than this is refused (the proto is recursive).
const MAX_PREDICATE_DEPTH: usize = 32;

/// `ListenerFilter.filter_disabled`.
fn listener_predicate(
    p: &l::ListenerFilterChainMatchPredicate,
    path: &str,
    depth: usize,
) -> Result<ListenerFilterPredicate, ConfigErrors> {
    use l::listener_filter_chain_match_predicate::Rule;
    if depth > MAX_PREDICATE_DEPTH {
        return Err(err(
            path,
            format!("predicates nest deeper than {MAX_PREDICATE_DEPTH}"),
        ));
    }
    let set = |rules: &[l::ListenerFilterChainMatchPredicate],
               field: &str|
     -> Result<Vec<ListenerFilterPredicate>, ConfigErrors> {
        let spath = join(path, field);
        let mut errs = ConfigErrors::default();
        // As Envoy's proto validation.
        if rules.len() < 2 {
            errs.push(
                join(&spath, "rules"),
                "value must contain at least 2 item(s)",
            );
        }
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            match listener_predicate(r, &format!("{spath}.rules[{i}]"), depth + 1) {
                Ok(p) => out.push(p),
                Err(e) => errs.extend(e),
            }
        }
        errs.into_result(out)
    };
    match &p.rule {
        Some(Rule::OrMatch(s)) => set(&s.rules, "or_match").map(ListenerFilterPredicate::Or),
        Some(Rule::AndMatch(s)) => set(&s.rules, "and_match").map(ListenerFilterPredicate::And),
        Some(Rule::NotMatch(n)) => listener_predicate(n, &join(path, "not_match"), depth + 1)
            .map(|p| ListenerFilterPredicate::Not(Box::new(p))),
        Some(Rule::AnyMatch(true)) => Ok(ListenerFilterPredicate::Any),
        Some(Rule::AnyMatch(false)) => Err(err(join(path, "any_match"), "value must equal true")),
        // Envoy compares the port with the bounds read as unsigned.
        Some(Rule::DestinationPortRange(r)) => Ok(ListenerFilterPredicate::DestinationPorts {
            start: r.start as u32,
            end: r.end as u32,
        }),
        None => Err(err(path, "value is required")),
    }
}

fn listener_filter(lf: &l::ListenerFilter, path: &str) -> Result<ListenerFilter, ConfigErrors> {
    let any = match &lf.config_type {
        Some(l::listener_filter::ConfigType::TypedConfig(a)) => a,
        _ => return Err(err(join(path, "typed_config"), "typed_config is required")),
    };
    let tpath = join(path, "typed_config");
    let url = any.type_url.rsplit('/').next().unwrap_or_default();
    match url {
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
            Ok(ListenerFilter::TlsInspector)
        }
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector" => {
            Ok(ListenerFilter::HttpInspector)
        }
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
            Ok(ListenerFilter::OriginalDst)
        }
        "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol" => {
            let p: crate::api::envoy::extensions::filters::listener::proxy_protocol::v3::ProxyProtocol =
                super::decode(any, &tpath)?;
            let mut errs = ConfigErrors::default();
            let rules = tlv_rules(&p.rules, &tpath, &mut errs);
            let pass_through = super::tls::tlv_pass_through(
                p.pass_through_tlvs.as_ref(),
                &join(&tpath, "pass_through_tlvs"),
                &mut errs,
            );
            let (mut allow_v1, mut allow_v2) = (true, true);
            for (i, v) in p.disallowed_versions.iter().enumerate() {
                match v {
                    0 => allow_v1 = false,
                    1 => allow_v2 = false,
                    _ => errs.push(
                        format!("{tpath}.disallowed_versions[{i}]"),
                        format!("unknown PROXY protocol version {v}"),
                    ),
                }
            }
            if !allow_v1 && !allow_v2 {
                errs.push(
                    join(&tpath, "disallowed_versions"),
                    "all PROXY protocol versions are disallowed",
                );
            }
            if !errs.is_empty() {
                return Err(errs);
            }
            Ok(ListenerFilter::ProxyProtocol(ProxyProtocolConfig {
                allow_requests_without_proxy_protocol: p.allow_requests_without_proxy_protocol,
                rules,
                stat_prefix: p.stat_prefix,
                allow_v1,
                allow_v2,
                pass_through,
            }))
        }
        other => Err(err(
            tpath,
            format!("listener filter {other} is not implemented yet"),
        )),
    }
}

/// `ProxyProtocol.rules`: one rule per TLV type (a later rule for a type
/// replaces an earlier one, as Envoy's map does), in first-seen order.
fn tlv_rules(
    rules: &[crate::api::envoy::extensions::filters::listener::proxy_protocol::v3::proxy_protocol::Rule],
    tpath: &str,
    errs: &mut ConfigErrors,
) -> Vec<TlvRule> {
    let mut out: Vec<TlvRule> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let rpath = format!("{tpath}.rules[{i}]");
        let Ok(tlv_type) = u8::try_from(r.tlv_type) else {
            errs.push(join(&rpath, "tlv_type"), "must be 0..255");
            continue;
        };
        // As Envoy: a rule without `on_tlv_present` keeps the empty pair
        // (the key "" in the filter's namespace); a pair that is set needs
        // a key.
        let unset = Default::default();
        let kv = r.on_tlv_present.as_ref().unwrap_or(&unset);
        if r.on_tlv_present.is_some() && kv.key.is_empty() {
            errs.push(join(&rpath, "on_tlv_present.key"), "must not be empty");
            continue;
        }
        let base64 = match kv.value_string_encoding {
            0 | 1 => false,
            2 => true,
            v => {
                errs.push(
                    join(&rpath, "on_tlv_present.value_string_encoding"),
                    format!("unknown encoding {v}"),
                );
                continue;
            }
        };
        let rule = TlvRule {
            tlv_type,
            namespace: if kv.metadata_namespace.is_empty() {
                "envoy.filters.listener.proxy_protocol".to_owned()
            } else {
                kv.metadata_namespace.clone()
            },
            key: kv.key.clone(),
            base64,
        };
        match out.iter_mut().find(|o| o.tlv_type == tlv_type) {
            Some(o) => *o = rule,
            None => out.push(rule),
        }
    }
    out
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
