//! `Cluster` translation.
use std::time::Duration;

use crate::api::envoy::config::cluster::v3 as c;
use crate::api::envoy::config::endpoint::v3 as e;
use crate::api::envoy::extensions::upstreams::http::v3::{
    http_protocol_options as hpo, HttpProtocolOptions,
};
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::{hcm::http2_settings, timeout};

const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

pub fn cluster(p: &c::Cluster, path: &str) -> Result<Cluster, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.name.is_empty() {
        errs.push(join(path, "name"), "cluster name is required");
    }
    let discovery = match &p.cluster_discovery_type {
        None => Discovery::Static,
        Some(c::cluster::ClusterDiscoveryType::Type(t)) => {
            match c::cluster::DiscoveryType::try_from(*t) {
                Ok(c::cluster::DiscoveryType::Static) => Discovery::Static,
                Ok(c::cluster::DiscoveryType::StrictDns) => Discovery::StrictDns,
                Ok(c::cluster::DiscoveryType::LogicalDns) => Discovery::LogicalDns,
                Ok(c::cluster::DiscoveryType::Eds) => Discovery::Eds,
                Ok(c::cluster::DiscoveryType::OriginalDst) => Discovery::OriginalDst,
                Err(_) => {
                    errs.push(join(path, "type"), "unknown cluster type");
                    Discovery::Static
                }
            }
        }
        Some(c::cluster::ClusterDiscoveryType::ClusterType(_)) => {
            errs.push(
                join(path, "cluster_type"),
                "custom cluster types are not implemented",
            );
            Discovery::Static
        }
    };
    let lb = match c::cluster::LbPolicy::try_from(p.lb_policy) {
        Ok(c::cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(c::cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest {
            choice_count: p
                .lb_config
                .as_ref()
                .and_then(|l| match l {
                    c::cluster::LbConfig::LeastRequestLbConfig(l) => {
                        l.choice_count.as_ref().map(|v| v.value)
                    }
                    _ => None,
                })
                .unwrap_or(2)
                .max(2),
        },
        Ok(c::cluster::LbPolicy::Random) => LbPolicy::Random,
        Ok(c::cluster::LbPolicy::RingHash) => {
            let mut r = RingHash {
                use_hostname: use_hostname(p),
                ..RingHash::default()
            };
            if let Some(c::cluster::LbConfig::RingHashLbConfig(l)) = &p.lb_config {
                let lpath = join(path, "ring_hash_lb_config");
                if let Some(v) = &l.minimum_ring_size {
                    r.minimum_ring_size = v.value;
                }
                if let Some(v) = &l.maximum_ring_size {
                    r.maximum_ring_size = v.value;
                }
                if l.hash_function == 1 {
                    r.hash_function = RingHashFunction::MurmurHash2;
                }
                check_ring(&r, &lpath, &mut errs);
            }
            LbPolicy::RingHash(r)
        }
        Ok(c::cluster::LbPolicy::Maglev) => {
            let mut m = Maglev {
                use_hostname: use_hostname(p),
                ..Maglev::default()
            };
            if let Some(c::cluster::LbConfig::MaglevLbConfig(l)) = &p.lb_config {
                if let Some(v) = &l.table_size {
                    m.table_size = v.value;
                }
                check_maglev(&m, &join(path, "maglev_lb_config.table_size"), &mut errs);
            }
            LbPolicy::Maglev(m)
        }
        // `load_balancing_policy` decides (below).
        Ok(c::cluster::LbPolicy::LoadBalancingPolicyConfig) => LbPolicy::RoundRobin,
        // The cluster balances itself: only ORIGINAL_DST provides a load
        // balancer (checked below); the value is never used.
        Ok(c::cluster::LbPolicy::ClusterProvided) => LbPolicy::RoundRobin,
        Err(_) => {
            errs.push(join(path, "lb_policy"), "unknown lb_policy");
            LbPolicy::RoundRobin
        }
    };
    let original_dst = original_dst(p, discovery, path, &mut errs);
    // As Envoy's cluster factory: hostnames as hash keys only where hosts
    // have one (STRICT_DNS).
    if use_hostname(p) && discovery != Discovery::StrictDns {
        errs.push(
            join(
                path,
                "common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing",
            ),
            "Cannot use hostname for consistent hashing loadbalancing for a cluster that is not STRICT_DNS",
        );
    }
    // The legacy `slow_start_config`, for the policy it belongs to (Envoy
    // reads `round_robin_lb_config` for ROUND_ROBIN and
    // `least_request_lb_config` for LEAST_REQUEST only).
    let mut slow_start = match (&lb, &p.lb_config) {
        (LbPolicy::RoundRobin, Some(c::cluster::LbConfig::RoundRobinLbConfig(r))) => {
            r.slow_start_config.as_ref().and_then(|s| {
                slow_start_config(
                    s.slow_start_window.as_ref(),
                    s.aggression.as_ref(),
                    s.min_weight_percent.as_ref(),
                    &join(path, "round_robin_lb_config.slow_start_config"),
                    &mut errs,
                )
            })
        }
        (LbPolicy::LeastRequest { .. }, Some(c::cluster::LbConfig::LeastRequestLbConfig(r))) => {
            r.slow_start_config.as_ref().and_then(|s| {
                slow_start_config(
                    s.slow_start_window.as_ref(),
                    s.aggression.as_ref(),
                    s.min_weight_percent.as_ref(),
                    &join(path, "least_request_lb_config.slow_start_config"),
                    &mut errs,
                )
            })
        }
        _ => None,
    };
    // `load_balancing_policy` takes precedence over `lb_policy`, as Envoy.
    let mut lb_hash_policy = Vec::new();
    let mut typed_locality_weighted = false;
    // `zone_aware_lb_config.fail_traffic_on_panic` (legacy; the typed
    // policy's replaces it).
    use c::cluster::common_lb_config::LocalityConfigSpecifier as Lcs;
    let mut override_host = None;
    // Legacy bounded loads (ring hash and Maglev only, as Envoy).
    let mut hash_balance_factor = match p
        .common_lb_config
        .as_ref()
        .and_then(|c| c.consistent_hashing_lb_config.as_ref())
        .and_then(|h| h.hash_balance_factor.as_ref())
    {
        Some(f) if lb.is_hash() => balance_factor(
            f.value,
            &join(
                path,
                "common_lb_config.consistent_hashing_lb_config.hash_balance_factor",
            ),
            &mut errs,
        ),
        _ => None,
    };
    let legacy_zone = match p
        .common_lb_config
        .as_ref()
        .and_then(|c| c.locality_config_specifier.as_ref())
    {
        Some(Lcs::ZoneAwareLbConfig(z)) => Some(z),
        _ => None,
    };
    let mut fail_traffic_on_panic = legacy_zone.is_some_and(|z| z.fail_traffic_on_panic);
    let mut zone_aware = legacy_zone.map_or_else(ZoneAware::default, |z| {
        zone_aware_config(
            z.routing_enabled.as_ref(),
            z.min_cluster_size.as_ref().map(|v| &v.value),
            &join(path, "common_lb_config.zone_aware_lb_config"),
            &mut errs,
        )
    });
    let lb = match &p.load_balancing_policy {
        Some(lbp) => {
            slow_start = None;
            fail_traffic_on_panic = false;
            zone_aware = ZoneAware::default();
            hash_balance_factor = None;
            typed_lb_policy(
                lbp,
                &join(path, "load_balancing_policy"),
                &mut TypedLb {
                    lb_hash: &mut lb_hash_policy,
                    locality_weighted: &mut typed_locality_weighted,
                    slow_start: &mut slow_start,
                    fail_traffic_on_panic: &mut fail_traffic_on_panic,
                    zone_aware: &mut zone_aware,
                    hash_balance_factor: &mut hash_balance_factor,
                    override_host: &mut override_host,
                },
                &mut errs,
            )
        }
        None => lb,
    };
    let connect_timeout = match timeout(
        p.connect_timeout.as_ref(),
        Some(DEFAULT_CONNECT_TIMEOUT),
        &join(path, "connect_timeout"),
    ) {
        Ok(Some(d)) => d,
        Ok(None) => {
            errs.push(join(path, "connect_timeout"), "must be greater than 0");
            DEFAULT_CONNECT_TIMEOUT
        }
        Err(e) => {
            errs.extend(e);
            DEFAULT_CONNECT_TIMEOUT
        }
    };
    let (localities, overprovisioning_factor) = match &p.load_assignment {
        Some(_) if discovery == Discovery::Eds => {
            errs.push(
                join(path, "load_assignment"),
                "an EDS cluster takes its endpoints from EDS, not load_assignment",
            );
            (Vec::new(), DEFAULT_OVERPROVISIONING)
        }
        Some(la) => {
            load_assignment(la, &join(path, "load_assignment"), discovery).unwrap_or_else(|e| {
                errs.extend(e);
                (Vec::new(), DEFAULT_OVERPROVISIONING)
            })
        }
        None => (Vec::new(), DEFAULT_OVERPROVISIONING),
    };
    let weighted_priority_health = p
        .load_assignment
        .as_ref()
        .is_some_and(weighted_priority_health);
    let eds = match (&p.eds_cluster_config, discovery) {
        (Some(e), Discovery::Eds) => {
            let epath = join(path, "eds_cluster_config");
            match &e.eds_config {
                Some(cs) => match super::xds::config_source(cs, &join(&epath, "eds_config")) {
                    Ok(source) => Some(Eds {
                        service_name: if e.service_name.is_empty() {
                            p.name.as_str().into()
                        } else {
                            e.service_name.as_str().into()
                        },
                        source,
                    }),
                    Err(er) => {
                        errs.extend(er);
                        None
                    }
                },
                None => {
                    errs.push(join(&epath, "eds_config"), "an eds_config is required");
                    None
                }
            }
        }
        (None, Discovery::Eds) => {
            errs.push(
                join(path, "eds_cluster_config"),
                "an EDS cluster needs eds_cluster_config",
            );
            None
        }
        (Some(_), _) => {
            errs.push(
                join(path, "eds_cluster_config"),
                "only EDS clusters take eds_cluster_config",
            );
            None
        }
        (None, _) => None,
    };
    if discovery == Discovery::LogicalDns {
        let n: usize = localities.iter().map(|l| l.endpoints.len()).sum();
        if n != 1 {
            errs.push(
                join(path, "load_assignment"),
                "LOGICAL_DNS clusters must have exactly one endpoint",
            );
        }
    }
    let dns_refresh_rate = match &p.dns_refresh_rate {
        Some(d) => match super::duration(d, &join(path, "dns_refresh_rate")) {
            Ok(d) if d >= Duration::from_millis(1) => d,
            Ok(_) => {
                errs.push(join(path, "dns_refresh_rate"), "must be at least 1ms");
                Duration::from_secs(5)
            }
            Err(e) => {
                errs.extend(e);
                Duration::from_secs(5)
            }
        },
        None => Duration::from_secs(5),
    };
    let family = match c::cluster::DnsLookupFamily::try_from(p.dns_lookup_family) {
        Ok(c::cluster::DnsLookupFamily::V4Only) => DnsFamily::V4Only,
        Ok(c::cluster::DnsLookupFamily::V6Only) => DnsFamily::V6Only,
        Ok(c::cluster::DnsLookupFamily::V4Preferred) => DnsFamily::V4Preferred,
        Ok(c::cluster::DnsLookupFamily::All) => DnsFamily::All,
        _ => DnsFamily::Auto,
    };

    // Protocol options: typed_extension_protocol_options wins over the
    // deprecated cluster-level fields, as Envoy.
    let mut protocol = UpstreamProtocol::Http1;
    let mut http2 = Http2Settings::default();
    let mut idle_timeout = Some(Duration::from_secs(3600));
    let mut max_requests_per_connection = None;
    if p.http2_protocol_options.is_some() {
        protocol = UpstreamProtocol::Http2;
        match http2_settings(
            p.http2_protocol_options.as_ref(),
            &join(path, "http2_protocol_options"),
        ) {
            Ok(s) => http2 = s,
            Err(e) => errs.extend(e),
        }
    }
    if let Some(common) = &p.common_http_protocol_options {
        common_options(
            common,
            &join(path, "common_http_protocol_options"),
            &mut idle_timeout,
            &mut max_requests_per_connection,
            &mut errs,
        );
    }
    let mut auto_sni = false;
    let mut auto_san_validation = false;
    let mut auto_sni_header = None;
    for (k, any) in &p.typed_extension_protocol_options {
        let kpath = format!("{path}.typed_extension_protocol_options[{k:?}]");
        if !any.type_url.ends_with(HTTP_OPTIONS) {
            errs.push(
                kpath,
                format!("protocol options {} are not implemented", any.type_url),
            );
            continue;
        }
        let o: HttpProtocolOptions = match super::decode(any, &kpath) {
            Ok(o) => o,
            Err(e) => {
                errs.extend(e);
                continue;
            }
        };
        if let Some(u) = &o.upstream_http_protocol_options {
            auto_sni = u.auto_sni;
            auto_san_validation = u.auto_san_validation;
            if !u.override_auto_sni_header.is_empty() {
                match http::HeaderName::from_bytes(u.override_auto_sni_header.as_bytes()) {
                    Ok(h) => auto_sni_header = Some(h),
                    Err(_) => errs.push(
                        join(
                            &kpath,
                            "upstream_http_protocol_options.override_auto_sni_header",
                        ),
                        "invalid header name",
                    ),
                }
            }
        }
        if let Some(common) = &o.common_http_protocol_options {
            common_options(
                common,
                &join(&kpath, "common_http_protocol_options"),
                &mut idle_timeout,
                &mut max_requests_per_connection,
                &mut errs,
            );
        }
        let h2 = match &o.upstream_protocol_options {
            Some(hpo::UpstreamProtocolOptions::ExplicitHttpConfig(x)) => match &x.protocol_config {
                Some(hpo::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(h2)) => {
                    protocol = UpstreamProtocol::Http2;
                    Some(h2)
                }
                Some(hpo::explicit_http_config::ProtocolConfig::HttpProtocolOptions(_)) => {
                    protocol = UpstreamProtocol::Http1;
                    None
                }
                Some(_) => {
                    errs.push(
                        join(&kpath, "explicit_http_config"),
                        "HTTP/3 upstreams are not implemented",
                    );
                    None
                }
                None => None,
            },
            Some(hpo::UpstreamProtocolOptions::UseDownstreamProtocolConfig(u)) => {
                protocol = UpstreamProtocol::UseDownstream;
                if u.http3_protocol_options.is_some() {
                    errs.push(
                        join(
                            &kpath,
                            "use_downstream_protocol_config.http3_protocol_options",
                        ),
                        "HTTP/3 is not implemented",
                    );
                }
                u.http2_protocol_options.as_ref()
            }
            Some(hpo::UpstreamProtocolOptions::AutoConfig(a)) => {
                protocol = UpstreamProtocol::Auto;
                if a.http3_protocol_options.is_some() {
                    errs.push(
                        join(&kpath, "auto_config.http3_protocol_options"),
                        "HTTP/3 is not implemented",
                    );
                }
                a.http2_protocol_options.as_ref()
            }
            None => None,
        };
        if let Some(h2) = h2 {
            match http2_settings(Some(h2), &kpath) {
                Ok(s) => http2 = s,
                Err(e) => errs.extend(e),
            }
        }
    }
    let mut transport = match &p.transport_socket {
        Some(ts) => super::tls::upstream_transport(ts, &join(path, "transport_socket"))
            .unwrap_or_else(|e| {
                errs.extend(e);
                UpstreamTransport::Plain
            }),
        None => UpstreamTransport::Plain,
    };
    let mut transport_matches = Vec::new();
    for (i, m) in p.transport_socket_matches.iter().enumerate() {
        let mpath = format!("{path}.transport_socket_matches[{i}]");
        let transport = match &m.transport_socket {
            Some(ts) => super::tls::upstream_transport(ts, &join(&mpath, "transport_socket"))
                .unwrap_or_else(|e| {
                    errs.extend(e);
                    UpstreamTransport::Plain
                }),
            None => {
                errs.push(
                    join(&mpath, "transport_socket"),
                    "transport_socket is required",
                );
                UpstreamTransport::Plain
            }
        };
        let criteria = match m.r#match.as_ref().map(super::struct_to_json) {
            Some(serde_json::Value::Object(o)) => o,
            _ => serde_json::Map::new(),
        };
        transport_matches.push(TransportSocketMatch {
            name: m.name.as_str().into(),
            criteria,
            transport,
        });
    }
    // `internal_upstream` `passthrough_metadata` of kind `cluster`: the
    // cluster's own metadata, known now.
    let cluster_metadata = p.metadata.as_ref();
    for t in std::iter::once(&mut transport)
        .chain(transport_matches.iter_mut().map(|m| &mut m.transport))
    {
        if let UpstreamTransport::Internal(i, _) = t {
            let i = std::sync::Arc::make_mut(i);
            for src in &mut i.passthrough {
                if let PassthroughMetadata::Cluster(name, value) = src {
                    *value = cluster_metadata
                        .and_then(|m| m.filter_metadata.get(name.as_str()))
                        .map(super::struct_to_json);
                }
            }
        }
    }
    // Upstream network filters: Istio's `istio.metadata_exchange` only.
    let pass_through = Vec::new();
    let mut metadata_exchange = None;
    for (i, f) in p.filters.iter().enumerate() {
        let fpath = format!("{path}.filters[{i}]");
        match upstream_metadata_exchange(f, &fpath) {
            Ok(_) if metadata_exchange.is_some() => errs.push(
                fpath,
                "weir runs one metadata exchange per cluster (a second would read the first's header)",
            ),
            Ok(c) => metadata_exchange = Some(std::sync::Arc::new(c)),
            Err(e) => errs.extend(e),
        }
    }
    // The deprecated cluster-level field, when the protocol options do not
    // set one.
    if max_requests_per_connection.is_none() {
        if let Some(v) = &p.max_requests_per_connection {
            max_requests_per_connection = Some(v.value);
        }
    }
    let tcp_keepalive = p
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
        .map(|k| TcpKeepalive {
            time: k
                .keepalive_time
                .as_ref()
                .map(|v| Duration::from_secs(v.value.into())),
            interval: k
                .keepalive_interval
                .as_ref()
                .map(|v| Duration::from_secs(v.value.into())),
            probes: k.keepalive_probes.as_ref().map(|v| v.value),
        });
    let circuit_breakers = match &p.circuit_breakers {
        Some(cb) => circuit_breakers(cb, &join(path, "circuit_breakers"), &mut errs),
        None => CircuitBreakers::default(),
    };
    let outlier_detection = p
        .outlier_detection
        .as_ref()
        .map(|o| outlier_detection(o, &join(path, "outlier_detection"), &mut errs));
    // Envoy: "Multiple health checks not supported".
    if p.health_checks.len() > 1 {
        errs.push(
            join(path, "health_checks"),
            "multiple health checks not supported",
        );
    }
    let health_check = p.health_checks.first().map(|h| {
        std::sync::Arc::new(active_health_check(
            h,
            &p.name,
            &join(path, "health_checks[0]"),
            &mut errs,
        ))
    });
    // Consistent-hash balancers have no zone-aware routing in Envoy.
    let fail_traffic_on_panic = fail_traffic_on_panic && !lb.is_hash();
    // As Envoy: gRPC health checks need an HTTP/2 cluster.
    if health_check
        .as_ref()
        .is_some_and(|h| matches!(h.kind, HealthCheckKind::Grpc { .. }))
        && protocol == UpstreamProtocol::Http1
    {
        errs.push(
            join(path, "health_checks[0].grpc_health_check"),
            format!(
                "{} cluster must support HTTP/2 for gRPC healthchecking",
                p.name
            ),
        );
    }
    let panic_threshold = p
        .common_lb_config
        .as_ref()
        .and_then(|c| c.healthy_panic_threshold.as_ref())
        .map(|v| v.value)
        .unwrap_or(50.0);
    let locality_weighted = matches!(
        p.common_lb_config
            .as_ref()
            .and_then(|c| c.locality_config_specifier.as_ref()),
        Some(Lcs::LocalityWeightedLbConfig(_))
    );
    let locality_weighted = locality_weighted || typed_locality_weighted;
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Cluster {
        locality_weighted,
        lb_hash_policy: lb_hash_policy.into(),
        name: p.name.as_str().into(),
        stat_name: if p.alt_stat_name.is_empty() {
            p.name.clone()
        } else {
            p.alt_stat_name.clone()
        },
        discovery,
        eds,
        lb,
        connect_timeout,
        localities: localities.into(),
        dns: DnsSettings {
            refresh_rate: dns_refresh_rate,
            respect_ttl: p.respect_dns_ttl,
            family,
        },
        protocol,
        http2,
        max_requests_per_connection,
        tcp_keepalive,
        idle_timeout,
        buffer_limit: p
            .per_connection_buffer_limit_bytes
            .as_ref()
            .map(|v| v.value)
            .unwrap_or(1024 * 1024),
        panic_threshold,
        overprovisioning_factor,
        weighted_priority_health,
        slow_start,
        fail_traffic_on_panic,
        zone_aware,
        hash_balance_factor,
        override_host,
        transport,
        transport_matches,
        pass_through,
        metadata_exchange,
        istio_alpn_override_disabled: istio_alpn_override_disabled(p),
        auto_sni,
        auto_san_validation,
        auto_sni_header,
        circuit_breakers,
        outlier_detection,
        health_check,
        original_dst,
    })
}

/// `type: ORIGINAL_DST` with Envoy's checks (`OriginalDstClusterFactory`
/// and the cluster manager's, same messages): `lb_policy` must be
/// `CLUSTER_PROVIDED` (and only this type provides one), no
/// `load_assignment`, `http_header_name` only with `use_http_header`.
/// Other cluster types ignore `original_dst_lb_config` and
/// `cleanup_interval`, as Envoy.
fn original_dst(
    p: &c::Cluster,
    discovery: Discovery,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<std::sync::Arc<OriginalDst>> {
    let provided = p.lb_policy == c::cluster::LbPolicy::ClusterProvided as i32;
    if discovery != Discovery::OriginalDst {
        if provided {
            errs.push(
                join(path, "lb_policy"),
                format!(
                    "cluster manager: cluster provided LB specified but cluster '{}' did not provide one. Check cluster documentation.",
                    p.name
                ),
            );
        }
        return None;
    }
    if !provided {
        let name = c::cluster::LbPolicy::try_from(p.lb_policy)
            .map(|l| l.as_str_name())
            .unwrap_or("UNKNOWN");
        errs.push(
            join(path, "lb_policy"),
            format!(
                "cluster: LB policy {name} is not valid for Cluster type ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'"
            ),
        );
    }
    if p.load_assignment.is_some() {
        errs.push(
            join(path, "load_assignment"),
            "ORIGINAL_DST clusters must have no load assignment configured",
        );
    }
    if p.load_balancing_policy.is_some() {
        // Envoy's ORIGINAL_DST cluster always balances itself.
        errs.push(
            join(path, "load_balancing_policy"),
            "an ORIGINAL_DST cluster provides its own load balancer (lb_policy CLUSTER_PROVIDED); weir does not take a load_balancing_policy with it",
        );
    }
    let cleanup_interval = match &p.cleanup_interval {
        Some(d) => match super::duration(d, &join(path, "cleanup_interval")) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                errs.push(
                    join(path, "cleanup_interval"),
                    "value must be greater than 0s",
                );
                Duration::from_secs(5)
            }
            Err(e) => {
                errs.extend(e);
                Duration::from_secs(5)
            }
        },
        None => Duration::from_secs(5),
    };
    let mut out = OriginalDst {
        cleanup_interval,
        header: None,
        port_override: None,
        metadata_key: None,
    };
    if let Some(c::cluster::LbConfig::OriginalDstLbConfig(o)) = &p.lb_config {
        let opath = join(path, "original_dst_lb_config");
        if o.use_http_header {
            let name = if o.http_header_name.is_empty() {
                "x-envoy-original-dst-host".to_owned()
            } else {
                o.http_header_name.to_ascii_lowercase()
            };
            match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => out.header = Some(h),
                Err(_) => errs.push(join(&opath, "http_header_name"), "invalid header name"),
            }
        } else if !o.http_header_name.is_empty() {
            errs.push(
                join(&opath, "http_header_name"),
                format!(
                    "ORIGINAL_DST cluster: invalid config http_header_name={} and use_http_header is false. Set use_http_header to true if http_header_name is desired.",
                    o.http_header_name
                ),
            );
        }
        if let Some(v) = &o.upstream_port_override {
            match u16::try_from(v.value) {
                Ok(port) => out.port_override = Some(port),
                Err(_) => errs.push(
                    join(&opath, "upstream_port_override"),
                    "value must be less than or equal to 65535",
                ),
            }
        }
        if let Some(k) = &o.metadata_key {
            out.metadata_key = Some(metadata_key(k, &join(&opath, "metadata_key"), errs));
        }
    }
    Some(std::sync::Arc::new(out))
}

/// `health_checks[0]` with Envoy's defaults and proto constraints.
fn active_health_check(
    h: &crate::api::envoy::config::core::v3::HealthCheck,
    cluster: &str,
    path: &str,
    errs: &mut ConfigErrors,
) -> ActiveHealthCheck {
    use crate::api::envoy::config::core::v3::health_check::{self as hc, HealthChecker};
    let mut dur = |v: &Option<crate::api::google::protobuf::Duration>,
                   name: &str,
                   zero_ok: bool|
     -> Option<Duration> {
        let v = v.as_ref()?;
        match super::duration(v, &join(path, name)) {
            Ok(x) if x.is_zero() && !zero_ok => {
                errs.push(join(path, name), "must be greater than 0s");
                None
            }
            Ok(x) => Some(x),
            Err(e) => {
                errs.extend(e);
                None
            }
        }
    };
    let timeout = dur(&h.timeout, "timeout", false);
    let interval = dur(&h.interval, "interval", false);
    let initial_jitter = dur(&h.initial_jitter, "initial_jitter", true).unwrap_or_default();
    let interval_jitter = dur(&h.interval_jitter, "interval_jitter", true).unwrap_or_default();
    let no_traffic_interval = dur(&h.no_traffic_interval, "no_traffic_interval", false)
        .unwrap_or(Duration::from_secs(60));
    let no_traffic_healthy_interval = dur(
        &h.no_traffic_healthy_interval,
        "no_traffic_healthy_interval",
        false,
    )
    .unwrap_or(no_traffic_interval);
    let unhealthy_interval = dur(&h.unhealthy_interval, "unhealthy_interval", false);
    let unhealthy_edge_interval = dur(&h.unhealthy_edge_interval, "unhealthy_edge_interval", false);
    let healthy_edge_interval = dur(&h.healthy_edge_interval, "healthy_edge_interval", false);
    for (v, name) in [(&h.timeout, "timeout"), (&h.interval, "interval")] {
        if v.is_none() {
            errs.push(join(path, name), "value is required");
        }
    }
    let interval = interval.unwrap_or(Duration::from_secs(1));
    let unhealthy_interval = unhealthy_interval.unwrap_or(interval);
    let mut threshold = |v: &Option<crate::api::google::protobuf::UInt32Value>, name: &str| {
        v.as_ref().map(|v| v.value).unwrap_or_else(|| {
            errs.push(join(path, name), "value is required");
            1
        })
    };
    let unhealthy_threshold = threshold(&h.unhealthy_threshold, "unhealthy_threshold");
    let healthy_threshold = threshold(&h.healthy_threshold, "healthy_threshold");
    let kind = match &h.health_checker {
        Some(HealthChecker::HttpHealthCheck(x)) => {
            let p = join(path, "http_health_check");
            if x.path.is_empty() {
                errs.push(join(&p, "path"), "path is required");
            }
            use crate::api::envoy::r#type::v3::CodecClientType as Codec;
            let http2 = match Codec::try_from(x.codec_client_type) {
                Ok(Codec::Http1) => false,
                Ok(Codec::Http2) => true,
                _ => {
                    errs.push(
                        join(&p, "codec_client_type"),
                        "only HTTP1 and HTTP2 health checks are implemented",
                    );
                    false
                }
            };
            let mut expected = Vec::new();
            for (i, r) in x.expected_statuses.iter().enumerate() {
                if r.start < 100 || r.end > 600 || r.start >= r.end {
                    errs.push(
                        format!("{p}.expected_statuses[{i}]"),
                        format!(
                            "invalid http expected status range: expecting start < end, \
                             start >= 100 and end <= 600, got [{}, {})",
                            r.start, r.end
                        ),
                    );
                } else {
                    expected.push((r.start as u16, r.end as u16));
                }
            }
            if x.expected_statuses.is_empty() {
                expected.push((200, 201));
            }
            let mutations = super::header_mutations(
                &x.request_headers_to_add,
                &x.request_headers_to_remove,
                &[],
                &[],
                &format!("{p}."),
            );
            let (mut remove, mut add) = (Vec::new(), Vec::new());
            match mutations {
                Ok(m) => {
                    remove = m.request_remove;
                    for (i, h) in m.request_add.into_iter().enumerate() {
                        let value: String = h
                            .value
                            .parts
                            .iter()
                            .map(|part| match part {
                                FormatPart::Literal(s) => s.as_str(),
                                FormatPart::Op(_) => "",
                            })
                            .collect();
                        match (h.value.is_literal(), http::HeaderValue::from_str(&value)) {
                            (true, Ok(v)) => add.push((h, v)),
                            (false, _) => errs.push(
                                format!("{p}.request_headers_to_add[{i}].header.value"),
                                "substitution formatters in health check headers are not implemented",
                            ),
                            (true, Err(_)) => errs.push(
                                format!("{p}.request_headers_to_add[{i}].header.value"),
                                "invalid header value",
                            ),
                        }
                    }
                }
                Err(e) => errs.extend(e),
            }
            HealthCheckKind::Http {
                remove,
                add,
                path: x.path.clone(),
                host: if x.host.is_empty() {
                    cluster.to_owned()
                } else {
                    x.host.clone()
                },
                expected,
                http2,
            }
        }
        Some(HealthChecker::GrpcHealthCheck(x)) => {
            let p = join(path, "grpc_health_check");
            let mut metadata = Vec::with_capacity(x.initial_metadata.len());
            for (i, m) in x.initial_metadata.iter().enumerate() {
                let mpath = format!("{p}.initial_metadata[{i}]");
                let Some(h) = &m.header else {
                    errs.push(join(&mpath, "header"), "value is required");
                    continue;
                };
                let value = if h.raw_value.is_empty() {
                    h.value.as_bytes()
                } else {
                    h.raw_value.as_slice()
                };
                match (
                    http::HeaderName::from_bytes(h.key.as_bytes()),
                    http::HeaderValue::from_bytes(value),
                ) {
                    (Ok(k), Ok(v)) => metadata.push((k, v)),
                    _ => errs.push(join(&mpath, "header"), "invalid header"),
                }
            }
            HealthCheckKind::Grpc {
                service_name: x.service_name.clone(),
                authority: if x.authority.is_empty() {
                    cluster.to_owned()
                } else {
                    x.authority.clone()
                },
                metadata,
            }
        }
        Some(HealthChecker::TcpHealthCheck(x)) => {
            let p = join(path, "tcp_health_check");
            let mut payload = |v: &hc::Payload, at: String| -> Vec<u8> {
                match &v.payload {
                    Some(hc::payload::Payload::Binary(b)) => b.clone(),
                    Some(hc::payload::Payload::Text(t)) => hex_decode(t).unwrap_or_else(|| {
                        errs.push(join(&at, "text"), format!("invalid hex string {t:?}"));
                        Vec::new()
                    }),
                    None => {
                        errs.push(at, "payload is required");
                        Vec::new()
                    }
                }
            };
            let send = x
                .send
                .as_ref()
                .map(|s| payload(s, join(&p, "send")))
                .unwrap_or_default();
            let receive = x
                .receive
                .iter()
                .enumerate()
                .map(|(i, r)| payload(r, format!("{p}.receive[{i}]")))
                .collect();
            HealthCheckKind::Tcp { send, receive }
        }
        Some(HealthChecker::CustomHealthCheck(_)) => {
            errs.push(
                join(path, "custom_health_check"),
                "custom health checks are not implemented",
            );
            HealthCheckKind::Tcp {
                send: Vec::new(),
                receive: Vec::new(),
            }
        }
        None => {
            errs.push(path, "a health checker is required");
            HealthCheckKind::Tcp {
                send: Vec::new(),
                receive: Vec::new(),
            }
        }
    };
    ActiveHealthCheck {
        timeout: timeout.unwrap_or(Duration::from_secs(1)),
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent: h.interval_jitter_percent,
        unhealthy_threshold,
        healthy_threshold,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval: unhealthy_edge_interval.unwrap_or(unhealthy_interval),
        healthy_edge_interval: healthy_edge_interval.unwrap_or(interval),
        reuse_connection: h.reuse_connection.as_ref().is_none_or(|v| v.value),
        kind,
        alpn: h
            .tls_options
            .iter()
            .flat_map(|t| &t.alpn_protocols)
            .map(|a| a.as_bytes().to_vec())
            .collect(),
        transport_match: h
            .transport_socket_match_criteria
            .as_ref()
            .map(|c| serde_json::json!({"envoy.transport_socket_match": super::struct_to_json(c)})),
    }
}

/// Decodes Envoy's hex `Payload.text` (case-insensitive, even length).
fn hex_decode(t: &str) -> Option<Vec<u8>> {
    let b = t.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|c| {
            let s = std::str::from_utf8(c).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// Cluster metadata `filter_metadata.istio.alpn_override` is `"false"`.
fn istio_alpn_override_disabled(p: &crate::api::envoy::config::cluster::v3::Cluster) -> bool {
    use crate::api::google::protobuf::value::Kind;
    p.metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("istio"))
        .and_then(|s| s.fields.get("alpn_override"))
        .is_some_and(|v| matches!(&v.kind, Some(Kind::StringValue(s)) if s == "false"))
}

/// A cluster `filters` entry: Istio's upstream `istio.metadata_exchange`.
fn upstream_metadata_exchange(
    f: &crate::api::envoy::config::cluster::v3::Filter,
    path: &str,
) -> Result<crate::config::MetadataExchangeConfig, ConfigErrors> {
    let tpath = join(path, "typed_config");
    let Some(any) = &f.typed_config else {
        return Err(super::err(tpath, "an upstream filter needs a typed_config"));
    };
    let any = crate::support::unwrap_typed_struct(any, &tpath)?;
    if !any
        .type_url
        .ends_with(crate::descriptors::ISTIO_METADATA_EXCHANGE)
    {
        return Err(super::err(
            tpath,
            format!(
                "upstream network filter {} is not implemented (only Istio's metadata exchange, as a pass-through)",
                any.type_url
            ),
        ));
    }
    let m = crate::descriptors::decode_any(&any.type_url, &any.value)
        .map_err(|e| super::err(&tpath, e))?;
    super::istio::metadata_exchange(&m, &tpath)
}

/// Envoy's default `overprovisioning_factor`.
const DEFAULT_OVERPROVISIONING: u32 = 140;

/// `policy.weighted_priority_health` of a `ClusterLoadAssignment`.
pub fn weighted_priority_health(
    la: &crate::api::envoy::config::endpoint::v3::ClusterLoadAssignment,
) -> bool {
    la.policy
        .as_ref()
        .is_some_and(|p| p.weighted_priority_health)
}

/// A `SlowStartConfig` (legacy or typed, same fields): `None` when the
/// window is unset or zero (Envoy's slow start is then off).
fn slow_start_config(
    window: Option<&crate::api::google::protobuf::Duration>,
    aggression: Option<&crate::api::envoy::config::core::v3::RuntimeDouble>,
    min_weight_percent: Option<&crate::api::envoy::r#type::v3::Percent>,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<SlowStart> {
    let window = match window.map(|w| super::duration(w, &join(path, "slow_start_window"))) {
        None => return None,
        Some(Ok(w)) => w,
        Some(Err(e)) => {
            errs.extend(e);
            return None;
        }
    };
    let min_weight = match min_weight_percent.map(|p| p.value) {
        None => 0.1,
        Some(v) if (0.0..=100.0).contains(&v) => v / 100.0,
        Some(_) => {
            errs.push(
                join(path, "min_weight_percent.value"),
                "must be between 0 and 100",
            );
            0.1
        }
    };
    // Envoy takes whole milliseconds of the window.
    (window.as_millis() > 0).then_some(SlowStart {
        window: Duration::from_millis(window.as_millis() as u64),
        aggression: aggression.map_or(1.0, |a| a.default_value),
        min_weight,
    })
}

/// A `ClusterLoadAssignment` (a cluster's `load_assignment` or an EDS
/// resource): the localities and the overprovisioning factor.
pub fn load_assignment(
    la: &crate::api::envoy::config::endpoint::v3::ClusterLoadAssignment,
    path: &str,
    discovery: Discovery,
) -> Result<(Vec<LocalityEndpoints>, u32), ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut factor = DEFAULT_OVERPROVISIONING;
    if let Some(f) = la
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
    {
        factor = f.value.max(1);
    }
    let mut localities = Vec::new();
    for (i, le) in la.endpoints.iter().enumerate() {
        match locality(le, &format!("{path}.endpoints[{i}]"), discovery) {
            Ok(l) => localities.push(l),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result((localities, factor))
}

fn common_options(
    c: &crate::api::envoy::config::core::v3::HttpProtocolOptions,
    path: &str,
    idle: &mut Option<Duration>,
    max_req: &mut Option<u32>,
    errs: &mut ConfigErrors,
) {
    match timeout(c.idle_timeout.as_ref(), *idle, &join(path, "idle_timeout")) {
        Ok(v) => *idle = v,
        Err(e) => errs.extend(e),
    }
    if let Some(m) = &c.max_requests_per_connection {
        *max_req = (m.value > 0).then_some(m.value);
    }
    for (set, name) in [
        (
            c.max_connection_duration.is_some(),
            "max_connection_duration",
        ),
        (c.max_headers_count.is_some(), "max_headers_count"),
        (c.max_stream_duration.is_some(), "max_stream_duration"),
        (
            c.headers_with_underscores_action != 0,
            "headers_with_underscores_action",
        ),
    ] {
        if set {
            errs.push(
                join(path, name),
                "not implemented for upstream connections yet",
            );
        }
    }
}

fn locality(
    le: &e::LocalityLbEndpoints,
    path: &str,
    discovery: Discovery,
) -> Result<LocalityEndpoints, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut endpoints = Vec::new();
    for (i, lbe) in le.lb_endpoints.iter().enumerate() {
        let p = format!("{path}.lb_endpoints[{i}]");
        let ep = match &lbe.host_identifier {
            Some(e::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
            Some(_) => {
                errs.push(
                    join(&p, "endpoint_name"),
                    "named endpoints are not implemented",
                );
                continue;
            }
            None => {
                errs.push(join(&p, "endpoint"), "endpoint is required");
                continue;
            }
        };
        let address = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(crate::api::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
                let port = match &sa.port_specifier {
                    Some(crate::api::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(v)) if *v <= 65535 => *v as u16,
                    _ => {
                        errs.push(join(&p, "endpoint.address.socket_address.port_value"), "a port is required");
                        continue;
                    }
                };
                match sa.address.parse::<std::net::IpAddr>() {
                    Ok(ip) => EndpointAddress::Ip(std::net::SocketAddr::new(ip, port)),
                    Err(_) if matches!(discovery, Discovery::StrictDns | Discovery::LogicalDns) => {
                        EndpointAddress::Dns(sa.address.clone(), port)
                    }
                    Err(_) => {
                        errs.push(
                            join(&p, "endpoint.address.socket_address.address"),
                            format!("{:?} is not an IP address (STATIC and EDS clusters need IPs; use STRICT_DNS)", sa.address),
                        );
                        continue;
                    }
                }
            }
            Some(crate::api::envoy::config::core::v3::address::Address::Pipe(pipe))
                if discovery == Discovery::Static && !pipe.path.is_empty() =>
            {
                EndpointAddress::Pipe(pipe.path.as_str().into())
            }
            Some(crate::api::envoy::config::core::v3::address::Address::EnvoyInternalAddress(
                ia,
            )) if matches!(discovery, Discovery::Static | Discovery::Eds) => {
                use crate::api::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier as N;
                match &ia.address_name_specifier {
                    Some(N::ServerListenerName(n)) if !n.is_empty() => EndpointAddress::Internal {
                        listener: n.as_str().into(),
                        endpoint_id: ia.endpoint_id.as_str().into(),
                    },
                    _ => {
                        errs.push(
                            join(
                                &p,
                                "endpoint.address.envoy_internal_address.server_listener_name",
                            ),
                            "an internal address needs server_listener_name",
                        );
                        continue;
                    }
                }
            }
            Some(crate::api::envoy::config::core::v3::address::Address::EnvoyInternalAddress(
                _,
            )) => {
                errs.push(
                    join(&p, "endpoint.address.envoy_internal_address"),
                    "internal addresses are for STATIC and EDS clusters",
                );
                continue;
            }
            _ => {
                errs.push(join(&p, "endpoint.address"), "a socket address is required");
                continue;
            }
        };
        let health = match lbe.health_status {
            1 => HealthStatus::Healthy,
            2 => HealthStatus::Unhealthy,
            3 => HealthStatus::Draining,
            4 => HealthStatus::Timeout,
            5 => HealthStatus::Degraded,
            _ => HealthStatus::Unknown,
        };
        let weight = lbe
            .load_balancing_weight
            .as_ref()
            .map(|v| v.value)
            .unwrap_or(1);
        if weight == 0 {
            errs.push(join(&p, "load_balancing_weight"), "must be at least 1");
        }
        // Host-level PROXY protocol TLVs (`PerHostConfig`); typed metadata
        // is otherwise without effect.
        const HOST_TLVS: &str = "envoy.transport_sockets.proxy_protocol";
        if lbe
            .metadata
            .as_ref()
            .is_some_and(|m| m.typed_filter_metadata.contains_key(HOST_TLVS))
        {
            errs.push(
                format!("{p}.metadata.typed_filter_metadata[\"{HOST_TLVS}\"]"),
                "host-level PROXY protocol TLVs are not implemented",
            );
        }
        let metadata = lbe
            .metadata
            .as_ref()
            .map(|m| {
                serde_json::Value::Object(
                    m.filter_metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), super::struct_to_json(v)))
                        .collect(),
                )
            })
            .unwrap_or(serde_json::Value::Null);
        endpoints.push(Endpoint {
            address,
            weight,
            health,
            hostname: ep.hostname.clone(),
            metadata,
        });
    }
    let loc = le.locality.clone().unwrap_or_default();
    errs.into_result(LocalityEndpoints {
        region: loc.region,
        zone: loc.zone,
        sub_zone: loc.sub_zone,
        priority: le.priority,
        weight: le.load_balancing_weight.as_ref().map(|v| v.value),
        endpoints,
    })
}

/// `circuit_breakers`: the first `thresholds` entry of each priority, as
/// Envoy; Envoy's defaults for a priority without one.
fn circuit_breakers(
    cb: &c::CircuitBreakers,
    path: &str,
    errs: &mut ConfigErrors,
) -> CircuitBreakers {
    let mut out = CircuitBreakers::default();
    let mut seen = [false; 2];
    for (i, t) in cb.thresholds.iter().enumerate() {
        let tpath = format!("{path}.thresholds[{i}]");
        let slot = match t.priority {
            0 => 0,
            1 => 1,
            _ => {
                errs.push(join(&tpath, "priority"), "unknown routing priority");
                continue;
            }
        };
        let budget = t.retry_budget.as_ref().map(|b| RetryBudget {
            budget_percent: b.budget_percent.as_ref().map_or(20.0, |p| p.value),
            min_retry_concurrency: b.min_retry_concurrency.as_ref().map_or(3, |v| v.value),
        });
        if let Some(b) = &budget {
            if !(0.0..=100.0).contains(&b.budget_percent) {
                errs.push(
                    format!("{tpath}.retry_budget.budget_percent.value"),
                    "must be between 0 and 100",
                );
            }
        }
        if std::mem::replace(&mut seen[slot], true) {
            // Envoy uses the first entry of a priority; later ones are
            // validated and unused.
            continue;
        }
        let d = Thresholds::default();
        let th = Thresholds {
            max_connections: t
                .max_connections
                .as_ref()
                .map_or(d.max_connections, |v| v.value),
            max_pending_requests: t
                .max_pending_requests
                .as_ref()
                .map_or(d.max_pending_requests, |v| v.value),
            max_requests: t.max_requests.as_ref().map_or(d.max_requests, |v| v.value),
            max_retries: t.max_retries.as_ref().map_or(d.max_retries, |v| v.value),
            retry_budget: budget,
            track_remaining: t.track_remaining,
        };
        if slot == 0 {
            out.default = th;
        } else {
            out.high = th;
        }
    }
    out
}

/// `outlier_detection` with Envoy's defaults and its proto constraints.
fn outlier_detection(
    o: &c::OutlierDetection,
    path: &str,
    errs: &mut ConfigErrors,
) -> OutlierDetection {
    let d = OutlierDetection::default();
    let mut dur = |v: &Option<crate::api::google::protobuf::Duration>,
                   name: &str,
                   default: Duration| match v {
        None => default,
        Some(v) => match super::duration(v, &join(path, name)) {
            Ok(x) if x.is_zero() && name != "max_ejection_time_jitter" => {
                errs.push(join(path, name), "must be greater than 0s");
                default
            }
            Ok(x) => x,
            Err(e) => {
                errs.extend(e);
                default
            }
        },
    };
    let interval = dur(&o.interval, "interval", d.interval);
    let base_ejection_time = dur(
        &o.base_ejection_time,
        "base_ejection_time",
        d.base_ejection_time,
    );
    let max_ejection_time = dur(
        &o.max_ejection_time,
        "max_ejection_time",
        d.max_ejection_time.max(base_ejection_time),
    );
    let max_ejection_time_jitter = dur(
        &o.max_ejection_time_jitter,
        "max_ejection_time_jitter",
        d.max_ejection_time_jitter,
    );
    let mut pct = |v: &Option<u32>, name: &str, default: u32| -> u32 {
        match v {
            Some(v) if *v > 100 => {
                errs.push(join(path, name), "must be at most 100");
                default
            }
            Some(v) => *v,
            None => default,
        }
    };
    let w = |v: &Option<crate::api::google::protobuf::UInt32Value>| v.as_ref().map(|v| v.value);
    let out = OutlierDetection {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter,
        max_ejection_percent: pct(
            &w(&o.max_ejection_percent),
            "max_ejection_percent",
            d.max_ejection_percent,
        ),
        consecutive_5xx: w(&o.consecutive_5xx).unwrap_or(d.consecutive_5xx),
        consecutive_gateway_failure: w(&o.consecutive_gateway_failure)
            .unwrap_or(d.consecutive_gateway_failure),
        consecutive_local_origin_failure: w(&o.consecutive_local_origin_failure)
            .unwrap_or(d.consecutive_local_origin_failure),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        enforcing_consecutive_5xx: pct(
            &w(&o.enforcing_consecutive_5xx),
            "enforcing_consecutive_5xx",
            d.enforcing_consecutive_5xx,
        ),
        enforcing_consecutive_gateway_failure: pct(
            &w(&o.enforcing_consecutive_gateway_failure),
            "enforcing_consecutive_gateway_failure",
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: pct(
            &w(&o.enforcing_consecutive_local_origin_failure),
            "enforcing_consecutive_local_origin_failure",
            d.enforcing_consecutive_local_origin_failure,
        ),
        success_rate_minimum_hosts: w(&o.success_rate_minimum_hosts)
            .unwrap_or(d.success_rate_minimum_hosts),
        success_rate_request_volume: w(&o.success_rate_request_volume)
            .unwrap_or(d.success_rate_request_volume),
        success_rate_stdev_factor: w(&o.success_rate_stdev_factor)
            .map_or(d.success_rate_stdev_factor, |v| f64::from(v) / 1000.0),
        enforcing_success_rate: pct(
            &w(&o.enforcing_success_rate),
            "enforcing_success_rate",
            d.enforcing_success_rate,
        ),
        enforcing_local_origin_success_rate: pct(
            &w(&o.enforcing_local_origin_success_rate),
            "enforcing_local_origin_success_rate",
            d.enforcing_local_origin_success_rate,
        ),
        failure_percentage_threshold: pct(
            &w(&o.failure_percentage_threshold),
            "failure_percentage_threshold",
            d.failure_percentage_threshold,
        ),
        failure_percentage_minimum_hosts: w(&o.failure_percentage_minimum_hosts)
            .unwrap_or(d.failure_percentage_minimum_hosts),
        failure_percentage_request_volume: w(&o.failure_percentage_request_volume)
            .unwrap_or(d.failure_percentage_request_volume),
        enforcing_failure_percentage: pct(
            &w(&o.enforcing_failure_percentage),
            "enforcing_failure_percentage",
            d.enforcing_failure_percentage,
        ),
        enforcing_failure_percentage_local_origin: pct(
            &w(&o.enforcing_failure_percentage_local_origin),
            "enforcing_failure_percentage_local_origin",
            d.enforcing_failure_percentage_local_origin,
        ),
        always_eject_one_host: o.always_eject_one_host.as_ref().is_some_and(|v| v.value),
    };
    // As Envoy's detector: a cap below the base time is a configuration error.
    if out.max_ejection_time < out.base_ejection_time {
        errs.push(
            join(path, "max_ejection_time"),
            "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
        );
    }
    out
}

/// `common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing`.
fn use_hostname(p: &c::Cluster) -> bool {
    p.common_lb_config
        .as_ref()
        .and_then(|c| c.consistent_hashing_lb_config.as_ref())
        .is_some_and(|h| h.use_hostname_for_hashing)
}

/// Envoy's ring size limits (`RingHashLbConfig` validation and the load
/// balancer's own check).
fn check_ring(r: &RingHash, path: &str, errs: &mut ConfigErrors) {
    const MAX: u64 = 8 * 1024 * 1024;
    if r.minimum_ring_size > MAX {
        errs.push(join(path, "minimum_ring_size"), "must be at most 8388608");
    }
    if r.maximum_ring_size > MAX {
        errs.push(join(path, "maximum_ring_size"), "must be at most 8388608");
    }
    if r.minimum_ring_size == 0 {
        errs.push(join(path, "minimum_ring_size"), "must be at least 1");
    }
    if r.minimum_ring_size > r.maximum_ring_size {
        errs.push(
            join(path, "minimum_ring_size"),
            format!(
                "ring hash: minimum_ring_size ({}) > maximum_ring_size ({})",
                r.minimum_ring_size, r.maximum_ring_size
            ),
        );
    }
}

/// Envoy's Maglev table constraints: a prime below 5000011.
fn check_maglev(m: &Maglev, path: &str, errs: &mut ConfigErrors) {
    if m.table_size > 5_000_011 {
        errs.push(path, "must be at most 5000011");
    } else if !is_prime(m.table_size) {
        errs.push(path, "The table size of maglev must be prime number");
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// `load_balancing_policy`: the first policy of the list, as Envoy (the
/// supported-field table has already rejected any extension weir lacks,
/// `client_side_weighted_round_robin` among them).
/// The typed policies' `slow_start_config`.
fn typed_slow_start(
    s: &Option<crate::api::envoy::extensions::load_balancing_policies::common::v3::SlowStartConfig>,
    tpath: &str,
    errs: &mut ConfigErrors,
) -> Option<SlowStart> {
    s.as_ref().and_then(|s| {
        slow_start_config(
            s.slow_start_window.as_ref(),
            s.aggression.as_ref(),
            s.min_weight_percent.as_ref(),
            &join(tpath, "slow_start_config"),
            errs,
        )
    })
}

/// `ZoneAwareLbConfig.{routing_enabled, min_cluster_size}` at `zpath`.
fn zone_aware_config(
    routing_enabled: Option<&crate::api::envoy::r#type::v3::Percent>,
    min_cluster_size: Option<&u64>,
    zpath: &str,
    errs: &mut ConfigErrors,
) -> ZoneAware {
    let mut z = ZoneAware::default();
    if let Some(p) = routing_enabled {
        if !(0.0..=100.0).contains(&p.value) {
            errs.push(
                join(zpath, "routing_enabled.value"),
                "must be between 0 and 100",
            );
        } else {
            // As Envoy's PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT.
            z.routing_enabled = p.value.round() as u32;
        }
    }
    if let Some(m) = min_cluster_size {
        z.min_cluster_size = *m;
    }
    z
}

/// `hash_balance_factor` at `fpath`: at least 100 (Envoy's validation).
fn balance_factor(f: u32, fpath: &str, errs: &mut ConfigErrors) -> Option<u32> {
    if f < 100 {
        errs.push(fpath, "value must be greater than or equal to 100");
        return None;
    }
    Some(f)
}

/// What a typed `load_balancing_policy` sets besides the policy.
struct TypedLb<'a> {
    lb_hash: &'a mut Vec<HashPolicy>,
    locality_weighted: &'a mut bool,
    slow_start: &'a mut Option<SlowStart>,
    fail_traffic_on_panic: &'a mut bool,
    zone_aware: &'a mut ZoneAware,
    hash_balance_factor: &'a mut Option<u32>,
    override_host: &'a mut Option<std::sync::Arc<OverrideHost>>,
}

const OVERRIDE_HOST: &str =
    "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost";

/// The `override_host` policy at `tpath` (its `typed_config`): its sources,
/// then its `fallback_policy` as the cluster's policy.
fn override_host_policy(
    any: &crate::api::google::protobuf::Any,
    tpath: &str,
    out: &mut TypedLb<'_>,
    errs: &mut ConfigErrors,
) -> LbPolicy {
    use crate::api::envoy::extensions::load_balancing_policies::override_host::v3 as oh;
    let o = match super::decode::<oh::OverrideHost>(any, tpath) {
        Ok(o) => o,
        Err(e) => {
            errs.extend(e);
            return LbPolicy::RoundRobin;
        }
    };
    if out.override_host.is_some() {
        errs.push(
            tpath,
            "override_host as the fallback_policy of override_host is not implemented",
        );
        return LbPolicy::RoundRobin;
    }
    if o.override_host_sources.is_empty() {
        errs.push(
            join(tpath, "override_host_sources"),
            "at least one override host source is required",
        );
    }
    let mut sources = Vec::new();
    for (i, src) in o.override_host_sources.iter().enumerate() {
        let spath = format!("{tpath}.override_host_sources[{i}]");
        match (src.header.is_empty(), &src.metadata) {
            (true, None) => errs.push(spath, "Empty override source"),
            (false, Some(_)) => errs.push(spath, "Only one override source must be set"),
            (false, None) => {
                if src.header.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
                    errs.push(join(&spath, "header"), "invalid header value characters");
                }
                // Envoy lowercases the name; one no request can carry
                // never matches.
                let name =
                    http::HeaderName::from_bytes(src.header.to_ascii_lowercase().as_bytes()).ok();
                sources.push(OverrideHostSource::Header(name));
            }
            (true, Some(k)) => {
                let (namespace, path) = metadata_key(k, &join(&spath, "metadata"), errs);
                sources.push(OverrideHostSource::Metadata { namespace, path });
            }
        }
    }
    let selected_host_key = o
        .selected_host_key
        .as_ref()
        .map(|k| metadata_key(k, &join(tpath, "selected_host_key"), errs));
    *out.override_host = Some(std::sync::Arc::new(OverrideHost {
        sources,
        selected_host_key,
    }));
    match &o.fallback_policy {
        Some(f) => typed_lb_policy(f, &join(tpath, "fallback_policy"), out, errs),
        None => {
            errs.push(
                join(tpath, "fallback_policy"),
                "a fallback_policy is required",
            );
            LbPolicy::RoundRobin
        }
    }
}

fn typed_lb_policy(
    lbp: &c::LoadBalancingPolicy,
    path: &str,
    out: &mut TypedLb<'_>,
    errs: &mut ConfigErrors,
) -> LbPolicy {
    use crate::api::envoy::extensions::load_balancing_policies as lbx;
    let Some(first) = lbp.policies.first() else {
        errs.push(join(path, "policies"), "at least one policy is required");
        return LbPolicy::RoundRobin;
    };
    let tpath = join(path, "policies[0].typed_extension_config.typed_config");
    let Some(any) = first
        .typed_extension_config
        .as_ref()
        .and_then(|t| t.typed_config.as_ref())
    else {
        errs.push(tpath, "a typed_config is required");
        return LbPolicy::RoundRobin;
    };
    let any = match crate::support::unwrap_typed_struct(any, &tpath) {
        Ok(a) => a.into_owned(),
        Err(e) => {
            errs.extend(e);
            return LbPolicy::RoundRobin;
        }
    };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name == OVERRIDE_HOST {
        return override_host_policy(&any, &tpath, out, errs);
    }
    let lb_hash = &mut *out.lb_hash;
    let locality_weighted = &mut *out.locality_weighted;
    let slow_start = &mut *out.slow_start;
    let fail_on_panic = &mut *out.fail_traffic_on_panic;
    let zone_aware = &mut *out.zone_aware;
    let balance = &mut *out.hash_balance_factor;
    let zpath = join(&tpath, "locality_lb_config.zone_aware_lb_config");
    let hostname = |h: &Option<lbx::common::v3::ConsistentHashingLbConfig>| {
        h.as_ref().is_some_and(|h| h.use_hostname_for_hashing)
    };
    // `consistent_hashing_lb_config.hash_policy`: the cluster's own request
    // hash, used instead of the route's.
    let mut own_hash = |h: &Option<lbx::common::v3::ConsistentHashingLbConfig>,
                        errs: &mut ConfigErrors| {
        if let Some(f) = h.as_ref().and_then(|h| h.hash_balance_factor.as_ref()) {
            *balance = balance_factor(
                f.value,
                &join(&tpath, "consistent_hashing_lb_config.hash_balance_factor"),
                errs,
            );
        }
        if let Some(h) = h.as_ref().filter(|h| !h.hash_policy.is_empty()) {
            match super::route::hash_policies(
                &h.hash_policy,
                &join(&tpath, "consistent_hashing_lb_config"),
            ) {
                Ok(v) => *lb_hash = v,
                Err(e) => errs.extend(e),
            }
        }
    };
    // `locality_lb_config` of the non-hash policies: locality-weighted
    // balancing, or zone-aware routing (`zone_aware_lb_config`; it takes
    // effect with the bootstrap's local cluster).
    let mut weighted_localities = |l: &Option<lbx::common::v3::LocalityLbConfig>,
                                   zerrs: &mut ConfigErrors| {
        use lbx::common::v3::locality_lb_config::LocalityConfigSpecifier as L;
        let spec = l
            .as_ref()
            .and_then(|l| l.locality_config_specifier.as_ref());
        *fail_on_panic = matches!(spec, Some(L::ZoneAwareLbConfig(z)) if z.fail_traffic_on_panic);
        if let Some(L::ZoneAwareLbConfig(z)) = spec {
            *zone_aware = zone_aware_config(
                z.routing_enabled.as_ref(),
                z.min_cluster_size.as_ref().map(|v| &v.value),
                &zpath,
                zerrs,
            );
        }
        matches!(spec, Some(L::LocalityWeightedLbConfig(_)))
    };
    match name {
        "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin" => {
            match super::decode::<lbx::round_robin::v3::RoundRobin>(&any, &tpath) {
                Ok(l) => {
                    *locality_weighted = weighted_localities(&l.locality_lb_config, errs);
                    *slow_start = typed_slow_start(&l.slow_start_config, &tpath, errs);
                }
                Err(e) => errs.extend(e),
            }
            LbPolicy::RoundRobin
        }
        "envoy.extensions.load_balancing_policies.random.v3.Random" => {
            match super::decode::<lbx::random::v3::Random>(&any, &tpath) {
                Ok(l) => *locality_weighted = weighted_localities(&l.locality_lb_config, errs),
                Err(e) => errs.extend(e),
            }
            LbPolicy::Random
        }
        "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest" => {
            match super::decode::<lbx::least_request::v3::LeastRequest>(&any, &tpath) {
                Ok(l) => {
                    *locality_weighted = weighted_localities(&l.locality_lb_config, errs);
                    *slow_start = typed_slow_start(&l.slow_start_config, &tpath, errs);
                    LbPolicy::LeastRequest {
                        choice_count: l.choice_count.map_or(2, |v| v.value).max(2),
                    }
                }
                Err(e) => {
                    errs.extend(e);
                    LbPolicy::RoundRobin
                }
            }
        }
        "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash" => {
            match super::decode::<lbx::ring_hash::v3::RingHash>(&any, &tpath) {
                Ok(l) => {
                    let mut r = RingHash {
                        use_hostname: hostname(&l.consistent_hashing_lb_config),
                        ..RingHash::default()
                    };
                    if let Some(v) = &l.minimum_ring_size {
                        r.minimum_ring_size = v.value;
                    }
                    if let Some(v) = &l.maximum_ring_size {
                        r.maximum_ring_size = v.value;
                    }
                    if l.hash_function == 2 {
                        r.hash_function = RingHashFunction::MurmurHash2;
                    }
                    check_ring(&r, &tpath, errs);
                    own_hash(&l.consistent_hashing_lb_config, errs);
                    *locality_weighted = l.locality_weighted_lb_config.is_some();
                    LbPolicy::RingHash(r)
                }
                Err(e) => {
                    errs.extend(e);
                    LbPolicy::RoundRobin
                }
            }
        }
        "envoy.extensions.load_balancing_policies.maglev.v3.Maglev" => {
            match super::decode::<lbx::maglev::v3::Maglev>(&any, &tpath) {
                Ok(l) => {
                    let mut m = Maglev {
                        use_hostname: hostname(&l.consistent_hashing_lb_config),
                        ..Maglev::default()
                    };
                    if let Some(v) = &l.table_size {
                        m.table_size = v.value;
                    }
                    check_maglev(&m, &join(&tpath, "table_size"), errs);
                    own_hash(&l.consistent_hashing_lb_config, errs);
                    *locality_weighted = l.locality_weighted_lb_config.is_some();
                    LbPolicy::Maglev(m)
                }
                Err(e) => {
                    errs.extend(e);
                    LbPolicy::RoundRobin
                }
            }
        }
        other => {
            errs.push(
                tpath,
                format!("load balancing policy {other} is not implemented"),
            );
            LbPolicy::RoundRobin
        }
    }
}

/// A `MetadataKey` (namespace and key path; both required, as Envoy's
/// validation rules).
fn metadata_key(
    k: &crate::api::envoy::r#type::metadata::v3::MetadataKey,
    kpath: &str,
    errs: &mut ConfigErrors,
) -> (String, Vec<String>) {
    use crate::api::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
    if k.key.is_empty() {
        errs.push(join(kpath, "key"), "must not be empty");
    }
    if k.path.is_empty() {
        errs.push(join(kpath, "path"), "at least one path segment is required");
    }
    let mut path = Vec::new();
    for (j, seg) in k.path.iter().enumerate() {
        match &seg.segment {
            Some(Segment::Key(key)) if !key.is_empty() => path.push(key.clone()),
            _ => errs.push(format!("{kpath}.path[{j}].key"), "must not be empty"),
        }
    }
    (k.key.clone(), path)
}
