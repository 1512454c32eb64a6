//! Translation edge cases that need no sockets.
use crate::bootstrap::{parse_bootstrap, ParseOptions};

use super::bootstrap_to_snapshot;
use crate::config::TlvPassThrough;

fn with_route(route: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - {route}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

#[test]
fn direct_response_file_is_read_bounded() {
    // /dev/zero never ends: the loader must stop and report the size limit.
    let b = parse_bootstrap(
        &with_route(
            "{match: {prefix: /}, direct_response: {status: 200, body: {filename: /dev/zero}}}",
        ),
        ParseOptions::default(),
    )
    .expect("parses");
    let err = bootstrap_to_snapshot(&b).expect_err("too large");
    assert!(err.to_string().contains("body.filename"), "{err}");
}

#[test]
fn unknown_cluster_is_named_by_its_field_path() {
    let b = parse_bootstrap(
        &with_route("{match: {prefix: /}, route: {cluster: nope}}"),
        ParseOptions::default(),
    )
    .expect("parses");
    let err = bootstrap_to_snapshot(&b).expect_err("unknown cluster");
    assert!(
        err.to_string().contains(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route.cluster: unknown cluster \"nope\""
        ),
        "{err}"
    );
}

/// A cluster with the upstream PROXY protocol transport (v2).
const PP_CLUSTER: &str = r#"  clusters:
  - name: pp
    load_assignment:
      cluster_name: pp
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
    transport_socket:
      name: envoy.transport_sockets.upstream_proxy_protocol
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport
        config: {version: V2, pass_through_tlvs: {match_type: INCLUDE, tlv_type: [1, 2]}, added_tlvs: [{type: 0xE0, value: eA==}]}
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}
"#;

#[test]
fn http_route_to_a_proxy_protocol_cluster_is_accepted() {
    // HTTP pools are keyed by the downstream addresses for such clusters.
    let mut yaml = with_route("{match: {prefix: /}, route: {cluster: pp}}");
    yaml.push_str(PP_CLUSTER);
    let snap = translate(&yaml).expect("HTTP + PROXY protocol");
    let c = snap.clusters.get("pp").expect("cluster");
    let pp = c.transport.proxy_protocol().expect("PROXY protocol");
    assert_eq!(pp.version, 2);
    assert_eq!(pp.pass_through, TlvPassThrough::Only(vec![1, 2]));
    assert_eq!(pp.added_tlvs, vec![(0xE0, b"x".to_vec())]);
}

#[test]
fn mirror_to_a_proxy_protocol_cluster_is_rejected() {
    let mut yaml = with_route(
        "{match: {prefix: /}, route: {cluster: pp, request_mirror_policies: [{cluster: pp}]}}",
    );
    yaml.push_str(PP_CLUSTER);
    let err = translate(&yaml).expect_err("mirror + PROXY protocol");
    assert!(
        err.to_string().contains(
            "routes[0].route.request_mirror_policies[0].cluster: cluster \"pp\" uses the upstream PROXY protocol transport"
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("route.cluster:"), "{err}");
}

#[test]
fn proxy_protocol_added_tlv_needs_a_value() {
    let mut yaml = with_route("{match: {prefix: /}, route: {cluster: pp}}");
    yaml.push_str(&PP_CLUSTER.replace("value: eA==", "value: \"\""));
    let err = translate(&yaml).expect_err("empty added TLV");
    assert!(
        err.to_string().contains(
            "typed_config.config.added_tlvs[0]: one of 'value' or 'format_string' must be set"
        ),
        "{err}"
    );
}

fn translate(yaml: &str) -> Result<crate::config::Snapshot, crate::ConfigErrors> {
    bootstrap_to_snapshot(&parse_bootstrap(yaml, ParseOptions::default()).expect("parses"))
}

/// Istio's pilot-agent bootstrap shapes: the xds-grpc cluster's options and
/// the listener's overload bypass.
#[test]
fn pilot_agent_cluster_options_are_honoured() {
    let base = |extra: &str| {
        format!(
            r#"
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    max_requests_per_connection: 1
    upstream_connection_options: {{tcp_keepalive: {{keepalive_time: 300}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: ./etc/istio/proxy/XDS}}}}}}}}]}}]
{extra}
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    bypass_overload_manager: true
    filter_chains:
    - filters:
      - name: tcp
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: xds-grpc
"#
        )
    };
    let big = "    circuit_breakers:\n      thresholds:\n      - {priority: DEFAULT, max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}\n";
    let s = translate(&base(big)).expect("accepted");
    let c = &s.clusters["xds-grpc"];
    assert_eq!(c.max_requests_per_connection, Some(1));
    let k = c.tcp_keepalive.expect("keepalive");
    assert_eq!(k.time, Some(std::time::Duration::from_secs(300)));
    assert_eq!((k.interval, k.probes), (None, None));
    assert!(matches!(
        c.localities[0].endpoints[0].address,
        crate::config::EndpointAddress::Pipe(_)
    ));
    assert!(s.listeners[0].unlimited);
    // Limits that bind are kept per priority (the first entry of each).
    let small = "    circuit_breakers:\n      thresholds:\n      - {max_connections: 10, track_remaining: true}\n      - {priority: HIGH, max_retries: 7, retry_budget: {budget_percent: {value: 50}}}\n      - {max_connections: 11}\n";
    let s = translate(&base(small)).expect("accepted");
    let cb = s.clusters["xds-grpc"].circuit_breakers;
    assert_eq!(cb.default.max_connections, 10);
    assert_eq!(cb.default.max_pending_requests, 1024);
    assert!(cb.default.track_remaining);
    assert_eq!(cb.high.max_retries, 7);
    assert_eq!(
        cb.high
            .retry_budget
            .map(|b| (b.budget_percent, b.min_retry_concurrency)),
        Some((50.0, 3))
    );
    let pools = "    circuit_breakers:\n      thresholds:\n      - {max_connection_pools: 10}\n";
    let e = translate(&base(pools)).expect_err("rejected").to_string();
    assert!(
        e.contains("circuit_breakers.thresholds[0].max_connection_pools"),
        "{e}"
    );
    // Outlier detection: Envoy's defaults, Istio's fields, constraints.
    let od = "    outlier_detection: {consecutive_5xx: 7, interval: 0.5s, base_ejection_time: 400s, max_ejection_percent: 100, consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100}\n";
    let s = translate(&base(od)).expect("accepted");
    let o = s.clusters["xds-grpc"]
        .outlier_detection
        .expect("outlier detection");
    assert_eq!(o.consecutive_5xx, 7);
    assert_eq!(o.interval, std::time::Duration::from_millis(500));
    // max_ejection_time defaults to the larger of 300 s and the base time.
    assert_eq!(o.max_ejection_time, std::time::Duration::from_secs(400));
    assert_eq!(
        (
            o.max_ejection_percent,
            o.enforcing_consecutive_gateway_failure
        ),
        (100, 100)
    );
    assert_eq!(
        (o.enforcing_consecutive_5xx, o.success_rate_request_volume),
        (100, 100)
    );
    for (bad, field) in [
        (
            "{max_ejection_percent: 101}",
            "outlier_detection.max_ejection_percent",
        ),
        (
            "{base_ejection_time: 10s, max_ejection_time: 5s}",
            "outlier_detection.max_ejection_time",
        ),
        ("{interval: 0s}", "outlier_detection.interval"),
        (
            "{detect_degraded_hosts: true}",
            "outlier_detection.detect_degraded_hosts",
        ),
    ] {
        let e = translate(&base(&format!("    outlier_detection: {bad}\n")))
            .expect_err("rejected")
            .to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
    // Active health checks: Envoy's defaults; what weir lacks is rejected
    // by field.
    let hc = "    health_checks: [{timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: {path: /healthz}}]\n";
    let s = translate(&base(hc)).expect("accepted");
    let h = s.clusters["xds-grpc"].health_check.clone().expect("hc");
    assert_eq!(h.no_traffic_interval, std::time::Duration::from_secs(60));
    assert_eq!(h.unhealthy_edge_interval, std::time::Duration::from_secs(2));
    assert!(h.reuse_connection);
    assert_eq!(
        h.kind,
        crate::config::HealthCheckKind::Http {
            path: "/healthz".into(),
            host: "xds-grpc".into(),
            expected: vec![(200, 201)],
            http2: false,
            remove: Vec::new(),
            add: Vec::new(),
        }
    );
    for (bad, field) in [
        ("{interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}}", "health_checks[0].timeout"),
        ("{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, grpc_health_check: {}}", "health_checks[0].grpc_health_check"),
        ("{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: {path: /h, codec_client_type: HTTP3}}", "http_health_check.codec_client_type"),
        ("{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: {path: /h, method: POST}}", "http_health_check.method"),
        ("{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {send: {text: zz}}}", "tcp_health_check.send.text"),
    ] {
        let e = translate(&base(&format!("    health_checks: [{bad}]\n")))
            .expect_err("rejected")
            .to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn dynamic_sources_are_checked() {
    let yaml = r#"
dynamic_resources:
  lds_config: {ads: {}}
  cds_config: {api_config_source: {api_type: REST, cluster_names: [x]}}
"#;
    let e = translate(yaml).expect_err("rejected").to_string();
    assert!(
        e.contains("dynamic_resources.lds_config: `ads` needs dynamic_resources.ads_config"),
        "{e}"
    );
    assert!(
        e.contains("dynamic_resources.cds_config.api_config_source.api_type"),
        "{e}"
    );
    let yaml = r#"
dynamic_resources:
  ads_config: {api_type: DELTA_GRPC, grpc_services: [{envoy_grpc: {cluster_name: nope}}]}
"#;
    let e = translate(yaml).expect_err("rejected").to_string();
    assert!(
        e.contains("envoy_grpc.cluster_name: unknown static cluster \"nope\""),
        "{e}"
    );
}

/// Binary xDS can carry durations the JSON mapping would refuse: they are
/// rejected, not turned into clock overflows.
#[test]
fn durations_beyond_the_proto_range_are_rejected() {
    use crate::api::google::protobuf::Duration as PbDuration;
    let ok = super::duration(
        &PbDuration {
            seconds: super::MAX_DURATION_SECS,
            nanos: 0,
        },
        "x",
    );
    assert!(ok.is_ok());
    let e = super::duration(
        &PbDuration {
            seconds: i64::MAX,
            nanos: 0,
        },
        "a.b",
    )
    .expect_err("too big");
    assert_eq!(e.to_string(), "a.b: duration out of range");
}

/// istiod's mesh clusters carry an upstream `istio.metadata_exchange`: it
/// runs on connections that negotiate its ALPN, which stays offered.
#[test]
fn upstream_metadata_exchange_is_translated_and_its_alpn_kept() {
    let yaml = |filter: &str| {
        format!(
            r#"
static_resources:
  clusters:
  - name: "outbound|9080|v1|productpage.default.svc.cluster.local"
    type: STATIC
    connect_timeout: 1s
    filters:
    - name: istio.metadata_exchange
      typed_config: {filter}
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{tlsMode: istio}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: outbound_.9080_.v1_.productpage.default.svc.cluster.local
          common_tls_context: {{alpn_protocols: [istio-peer-exchange, istio]}}
    - name: tlsMode-disabled
      match: {{}}
      transport_socket: {{name: envoy.transport_sockets.raw_buffer, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}}}
"#
        )
    };
    let s = translate(&yaml(
        r#"{"@type": type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange, protocol: istio-peer-exchange}"#,
    ))
    .expect("accepted");
    let c = s.clusters.values().next().expect("cluster");
    assert!(c.pass_through.is_empty());
    assert_eq!(
        c.metadata_exchange.as_deref(),
        Some(&crate::config::MetadataExchangeConfig {
            protocol: "istio-peer-exchange".into(),
            additional_labels: vec![],
            enable_discovery: false,
        })
    );
    let tls = c.transport_matches[0].transport.tls().expect("tls");
    assert_eq!(
        tls.alpn,
        vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()]
    );
    let e = translate(&yaml(
        r#"{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: x, cluster: y}"#,
    ))
    .expect_err("rejected")
    .to_string();
    assert!(
        e.contains("filters[0].typed_config: upstream network filter"),
        "{e}"
    );
}

/// A static cluster `c` with `lb` (cluster fields, YAML lines indented by
/// four spaces) behind a route with `hash` (route action fields).
fn hashed(lb: &str, hash: &str) -> String {
    let route = format!("match: {{prefix: /}}\n                route: {{cluster: c{hash}}}");
    format!(
        "{}  clusters:\n  - name: c\n    connect_timeout: 1s\n{lb}    load_assignment:\n      cluster_name: c\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]\n",
        with_route(&route)
    )
}

fn load(yaml: &str) -> Result<crate::config::Snapshot, String> {
    crate::load_bootstrap(Some(yaml), None, Default::default())
        .map(|(_, s)| s)
        .map_err(|e| e.to_string())
}

/// Consistent-hash LB and route hash policies: what is translated, and
/// what weir cannot honour rejected with its field path.
#[test]
fn hash_lb_configs_and_hash_policies() {
    use crate::config::{LbPolicy, RingHashFunction};
    let s = load(&hashed(
        "    type: STRICT_DNS\n    lb_policy: RING_HASH\n    ring_hash_lb_config: {minimum_ring_size: 16, hash_function: MURMUR_HASH_2}\n    common_lb_config: {consistent_hashing_lb_config: {use_hostname_for_hashing: true}}\n",
        ", hash_policy: [{header: {header_name: X-User}, terminal: true}, {cookie: {name: s, ttl: 60s, path: /}}, {connection_properties: {source_ip: true}}, {query_parameter: {name: q}}]",
    ))
    .expect("accepted");
    let c = &s.clusters["c"];
    let LbPolicy::RingHash(r) = c.lb else {
        panic!("{:?}", c.lb)
    };
    assert_eq!(r.minimum_ring_size, 16);
    assert_eq!(r.maximum_ring_size, 8 * 1024 * 1024);
    assert_eq!(r.hash_function, RingHashFunction::MurmurHash2);
    assert!(r.use_hostname);
    // The four policies, in order, header names lowercased.
    let routes = format!("{:?}", s.listeners);
    let at = |needle: &str| {
        routes
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in {routes}"))
    };
    assert!(
        at("Header { name: \"x-user\"") < at("Cookie { name: \"s\", ttl: Some(60s), path: \"/\"")
    );
    assert!(at("ttl: Some(60s)") < at("SourceIp"));
    assert!(at("SourceIp") < at("QueryParameter { name: \"q\" }"));
    assert!(routes.contains("terminal: true"));

    let reject = |lb: &str, hash: &str, want: &str| {
        let e = load(&hashed(lb, hash)).expect_err("rejected");
        assert!(e.contains(want), "want {want:?} in: {e}");
    };
    reject(
        "    lb_policy: MAGLEV\n    maglev_lb_config: {table_size: 65536}\n",
        "",
        "clusters[0].maglev_lb_config.table_size: The table size of maglev must be prime number",
    );
    reject(
        "    lb_policy: RING_HASH\n    ring_hash_lb_config: {minimum_ring_size: 2048, maximum_ring_size: 1024}\n",
        "",
        "ring_hash_lb_config.minimum_ring_size: ring hash: minimum_ring_size (2048) > maximum_ring_size (1024)",
    );
    reject(
        "    lb_policy: RING_HASH\n    common_lb_config: {consistent_hashing_lb_config: {use_hostname_for_hashing: true}}\n",
        "",
        "common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing: Cannot use hostname",
    );
    reject(
        "    lb_policy: RING_HASH\n",
        ", hash_policy: [{filter_state: {}}]",
        "route.hash_policy[0].filter_state.key",
    );
    load(&hashed(
        "    lb_policy: RING_HASH\n",
        ", hash_policy: [{filter_state: {key: k}}]",
    ))
    .expect("filter_state hash");
    reject(
        "    lb_policy: RING_HASH\n",
        ", hash_policy: [{header: {header_name: \":path\"}}]",
        "route.hash_policy[0].header.header_name",
    );
    reject(
        "    load_balancing_policy: {policies: [{typed_extension_config: {name: w, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin}}}]}\n",
        "",
        "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config",
    );
    reject(
        "    lb_policy: RING_HASH\n    lb_subset_config: {fallback_policy: ANY_ENDPOINT}\n",
        "",
        "clusters[0].lb_subset_config",
    );
    let s = load(&hashed(
        "    lb_policy: MAGLEV\n    common_lb_config: {locality_weighted_lb_config: {}}\n",
        "",
    ))
    .expect("accepted");
    assert!(s.clusters["c"].locality_weighted);
    let s = load(&hashed(
        "    common_lb_config: {locality_weighted_lb_config: {}}\n",
        "",
    ))
    .expect("accepted");
    assert!(s.clusters["c"].locality_weighted);

    // The typed least_request policy maps onto the same internal policy.
    let s = load(&hashed(
        "    load_balancing_policy: {policies: [{typed_extension_config: {name: l, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest, choice_count: 3}}}]}\n",
        "",
    ))
    .expect("accepted");
    assert_eq!(
        s.clusters["c"].lb,
        LbPolicy::LeastRequest { choice_count: 3 }
    );
}

/// Slow start (legacy and typed), weighted priority health and the
/// zone-aware flags: what is translated, and bad values rejected with
/// their field path.
#[test]
fn slow_start_priority_and_zone_aware_configs() {
    use crate::config::LbPolicy;
    use std::time::Duration;
    let s = load(&hashed(
        "    round_robin_lb_config: {slow_start_config: {slow_start_window: 10s, aggression: {default_value: 2, runtime_key: k}, min_weight_percent: {value: 25}}}\n",
        "",
    ))
    .expect("accepted");
    let ss = s.clusters["c"].slow_start.expect("slow start");
    assert_eq!(ss.window, Duration::from_secs(10));
    assert_eq!(ss.aggression, 2.0);
    assert_eq!(ss.min_weight, 0.25);
    // Envoy's factor: max((t / window)^(1 / aggression), min weight).
    assert_eq!(ss.factor(Duration::from_millis(1)), 0.25);
    assert!((ss.factor(Duration::from_secs(9)) - 0.9f64.sqrt()).abs() < 1e-9);
    assert_eq!(ss.factor(Duration::from_secs(10)), 1.0);

    // A window of zero (or none) is no slow start; the config of another
    // policy is not read.
    let s = load(&hashed(
        "    round_robin_lb_config: {slow_start_config: {slow_start_window: 0s}}\n",
        "",
    ))
    .expect("accepted");
    assert!(s.clusters["c"].slow_start.is_none());
    let s = load(&hashed(
        "    lb_policy: RANDOM\n    round_robin_lb_config: {slow_start_config: {slow_start_window: 5s}}\n",
        "",
    ))
    .expect("accepted");
    assert!(s.clusters["c"].slow_start.is_none());

    let s = load(&hashed(
        "    lb_policy: LEAST_REQUEST\n    least_request_lb_config: {slow_start_config: {slow_start_window: 3s}}\n",
        "",
    ))
    .expect("accepted");
    let ss = s.clusters["c"].slow_start.expect("slow start");
    assert_eq!((ss.aggression, ss.min_weight), (1.0, 0.1));

    let s = load(&hashed(
        "    load_balancing_policy: {policies: [{typed_extension_config: {name: l, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest, slow_start_config: {slow_start_window: 1s}, locality_lb_config: {zone_aware_lb_config: {fail_traffic_on_panic: true, min_cluster_size: 3}}}}}]}\n",
        "",
    ))
    .expect("accepted");
    let c = &s.clusters["c"];
    assert!(matches!(c.lb, LbPolicy::LeastRequest { .. }));
    assert_eq!(c.slow_start.map(|s| s.window), Some(Duration::from_secs(1)));
    assert!(c.fail_traffic_on_panic);
    assert_eq!(c.zone_aware.min_cluster_size, 3);
    assert_eq!(c.zone_aware.routing_enabled, 100);

    let s = load(&hashed(
        "    common_lb_config: {zone_aware_lb_config: {fail_traffic_on_panic: true, routing_enabled: {value: 50}}}\n",
        "",
    ))
    .expect("accepted");
    assert!(s.clusters["c"].fail_traffic_on_panic);
    assert_eq!(s.clusters["c"].zone_aware.routing_enabled, 50);
    assert_eq!(s.clusters["c"].zone_aware.min_cluster_size, 6);
    let e = load(&hashed(
        "    common_lb_config: {zone_aware_lb_config: {routing_enabled: {value: 150}}}\n",
        "",
    ))
    .expect_err("rejected");
    assert!(
        e.contains("clusters[0].common_lb_config.zone_aware_lb_config.routing_enabled.value"),
        "{e}"
    );
    // The local cluster must be a static cluster.
    let e = load(&format!(
        "cluster_manager: {{local_cluster_name: nope}}\n{}",
        hashed("", "")
    ))
    .expect_err("rejected");
    assert!(
        e.contains("cluster_manager.local_cluster_name: local cluster 'nope' must be defined"),
        "{e}"
    );
    let s = load(&format!(
        "cluster_manager: {{local_cluster_name: c}}\n{}",
        hashed("", "")
    ))
    .expect("accepted");
    assert_eq!(s.local_cluster.as_deref(), Some("c"));
    // Hash balancers have no zone-aware routing.
    let s = load(&hashed(
        "    lb_policy: MAGLEV\n    common_lb_config: {zone_aware_lb_config: {fail_traffic_on_panic: true}}\n",
        "",
    ))
    .expect("accepted");
    assert!(!s.clusters["c"].fail_traffic_on_panic);

    let s = load(&format!(
        "{}  clusters:\n  - name: c\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: c\n      policy: {{weighted_priority_health: true, overprovisioning_factor: 200}}\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]\n",
        with_route("match: {prefix: /}\n                route: {cluster: c}")
    ))
    .expect("accepted");
    assert!(s.clusters["c"].weighted_priority_health);
    assert_eq!(s.clusters["c"].overprovisioning_factor, 200);

    let reject = |lb: &str, want: &str| {
        let e = load(&hashed(lb, "")).expect_err("rejected");
        assert!(e.contains(want), "want {want:?} in: {e}");
    };
    reject(
        "    round_robin_lb_config: {slow_start_config: {slow_start_window: 1s, min_weight_percent: {value: 150}}}\n",
        "clusters[0].round_robin_lb_config.slow_start_config.min_weight_percent.value",
    );
    reject(
        "    round_robin_lb_config: {slow_start_config: {slow_start_window: -1s}}\n",
        "clusters[0].round_robin_lb_config.slow_start_config.slow_start_window",
    );
    reject(
        "    common_lb_config: {zone_aware_lb_config: {fail_traffic_on_panic: true}}\n    lb_policy: LEAST_REQUEST\n    least_request_lb_config: {active_request_bias: {default_value: 2}}\n",
        "clusters[0].least_request_lb_config.active_request_bias",
    );
    reject(
        "    load_balancing_policy: {policies: [{typed_extension_config: {name: r, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin, locality_lb_config: {zone_aware_lb_config: {force_local_zone: {}}}}}}]}\n",
        "zone_aware_lb_config.force_local_zone",
    );
    reject(
        "    lb_subset_config: {fallback_policy: ANY_ENDPOINT}\n",
        "subset load balancing (lb_subset_config) is not implemented; Istio sends DestinationRule subsets as separate clusters",
    );
    let s = load(&hashed(
        "    lb_policy: MAGLEV\n    common_lb_config: {consistent_hashing_lb_config: {hash_balance_factor: 150}}\n",
        "",
    ))
    .expect("accepted");
    assert_eq!(s.clusters["c"].hash_balance_factor, Some(150));
    // Not a hash policy: no bounded loads (Envoy ignores it).
    let s = load(&hashed(
        "    common_lb_config: {consistent_hashing_lb_config: {hash_balance_factor: 150}}\n",
        "",
    ))
    .expect("accepted");
    assert_eq!(s.clusters["c"].hash_balance_factor, None);
    reject(
        "    lb_policy: RING_HASH\n    common_lb_config: {consistent_hashing_lb_config: {hash_balance_factor: 99}}\n",
        "clusters[0].common_lb_config.consistent_hashing_lb_config.hash_balance_factor: value must be greater than or equal to 100",
    );
    reject(
        "    load_balancing_policy: {policies: [{typed_extension_config: {name: m, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev, consistent_hashing_lb_config: {hash_balance_factor: 50}}}}]}\n",
        "typed_config.consistent_hashing_lb_config.hash_balance_factor",
    );
    // override_host: sources, then the fallback policy as the cluster's.
    let oh = |body: &str| {
        format!("    load_balancing_policy: {{policies: [{{typed_extension_config: {{name: o, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost, {body}}}}}}}]}}\n")
    };
    const LR: &str = "fallback_policy: {policies: [{typed_extension_config: {name: l, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest, choice_count: 4}}}]}";
    let s = load(&hashed(
        &oh(&format!("override_host_sources: [{{header: X-Dest}}, {{metadata: {{key: ns, path: [{{key: a}}, {{key: b}}]}}}}], {LR}")),
        "",
    ))
    .expect("accepted");
    let c = &s.clusters["c"];
    assert_eq!(
        c.lb,
        crate::config::LbPolicy::LeastRequest { choice_count: 4 }
    );
    let o = c.override_host.as_ref().expect("override_host");
    assert_eq!(
        o.sources,
        vec![
            crate::config::OverrideHostSource::Header(Some(http::HeaderName::from_static(
                "x-dest"
            ))),
            crate::config::OverrideHostSource::Metadata {
                namespace: "ns".into(),
                path: vec!["a".into(), "b".into()]
            },
        ]
    );
    let tp = "clusters[0].load_balancing_policy.policies[0].typed_extension_config.typed_config";
    reject(&oh(LR), &format!("{tp}.override_host_sources"));
    reject(
        &oh(&format!("override_host_sources: [{{}}], {LR}")),
        &format!("{tp}.override_host_sources[0]: Empty override source"),
    );
    reject(
        &oh(&format!("override_host_sources: [{{header: x, metadata: {{key: ns, path: [{{key: a}}]}}}}], {LR}")),
        "Only one override source must be set",
    );
    reject(
        &oh(&format!(
            "override_host_sources: [{{metadata: {{key: ns}}}}], {LR}"
        )),
        &format!("{tp}.override_host_sources[0].metadata.path"),
    );
    reject(
        &oh("override_host_sources: [{header: x}]"),
        &format!("{tp}.fallback_policy"),
    );
    reject(
        &oh(&format!(
            "override_host_sources: [{{header: x}}], selected_host_key: {{key: ns}}, {LR}"
        )),
        &format!("{tp}.selected_host_key.path"),
    );
    let s = load(&hashed(
        &oh(&format!(
            "override_host_sources: [{{header: x}}], selected_host_key: {{key: envoy.lb, path: [{{key: a}}, {{key: b}}]}}, {LR}"
        )),
        "",
    ))
    .expect("accepted");
    let c = &s.clusters["c"];
    assert_eq!(
        c.override_host
            .as_ref()
            .expect("override_host")
            .selected_host_key,
        Some(("envoy.lb".into(), vec!["a".into(), "b".into()]))
    );
}

/// `tcp_proxy` `hash_policy`: `filter_state` needs a key.
#[test]
fn tcp_proxy_filter_state_hash_policy() {
    let yaml = |hash: &str| {
        format!(
            r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}
    filter_chains:
    - filters:
      - name: t
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
          hash_policy: [{hash}]
  clusters:
  - name: c
    connect_timeout: 1s
    lb_policy: RING_HASH
    load_assignment:
      cluster_name: c
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 2}}}}}}}}]}}]
"#
        )
    };
    load(&yaml("{filter_state: {key: lb.key}}")).expect("accepted");
    let e = load(&yaml("{filter_state: {}}")).expect_err("rejected");
    assert!(e.contains("hash_policy[0].filter_state.key"), "{e}");
}

#[test]
fn host_level_proxy_protocol_tlvs_are_rejected() {
    let mut yaml = with_route("{match: {prefix: /}, route: {cluster: pp}}");
    yaml.push_str(&PP_CLUSTER.replace(
        "{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}",
        r#"{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}, metadata: {typed_filter_metadata: {envoy.transport_sockets.proxy_protocol: {"@type": type.googleapis.com/envoy.config.core.v3.PerHostConfig, added_tlvs: [{type: 0xE5, value: eA==}]}}}}"#,
    ));
    let err = translate(&yaml).expect_err("host TLVs");
    assert!(
        err.to_string().contains(
            "lb_endpoints[0].metadata.typed_filter_metadata[\"envoy.transport_sockets.proxy_protocol\"]: host-level PROXY protocol TLVs are not implemented"
        ),
        "{err}"
    );
}

/// A listener with the proxy_protocol listener filter of `fields` (YAML
/// flow mapping entries).
fn with_proxy_protocol(fields: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters:
    - name: envoy.filters.listener.proxy_protocol
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol, {fields}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}}
  clusters:
  - name: c
    type: STATIC
    load_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}
"#
    )
}

fn proxy_protocol_result(fields: &str) -> Result<crate::config::ProxyProtocolConfig, String> {
    let b = parse_bootstrap(&with_proxy_protocol(fields), ParseOptions::default())
        .map_err(|e| e.to_string())?;
    let s = bootstrap_to_snapshot(&b).map_err(|e| e.to_string())?;
    match s.listeners[0].listener_filters.first() {
        Some(crate::config::ListenerFilter::ProxyProtocol(p)) => Ok(p.clone()),
        other => panic!("not the proxy_protocol filter: {other:?}"),
    }
}

#[test]
fn proxy_protocol_rules_stat_prefix_and_versions_translate() {
    let p = proxy_protocol_result(
        "stat_prefix: pfx, disallowed_versions: [V1], rules: [\
         {tlv_type: 2, on_tlv_present: {key: authority}}, \
         {tlv_type: 224, on_tlv_present: {key: a, metadata_namespace: ns, value_string_encoding: BASE64}}, \
         {tlv_type: 2, on_tlv_present: {key: replaced}}, \
         {tlv_type: 225}]",
    )
    .expect("valid");
    assert_eq!(p.stat_prefix, "pfx");
    assert!(!p.allow_v1 && p.allow_v2);
    let rules: Vec<(u8, &str, &str, bool)> = p
        .rules
        .iter()
        .map(|r| (r.tlv_type, r.namespace.as_str(), r.key.as_str(), r.base64))
        .collect();
    let ns = "envoy.filters.listener.proxy_protocol";
    assert_eq!(
        rules,
        [
            (2, ns, "replaced", false),
            (224, "ns", "a", true),
            (225, ns, "", false)
        ]
    );
    let p = proxy_protocol_result("allow_requests_without_proxy_protocol: true").expect("valid");
    assert!(p.allow_v1 && p.allow_v2 && p.rules.is_empty() && p.stat_prefix.is_empty());
}

#[test]
fn proxy_protocol_bad_fields_are_named() {
    let at = "static_resources.listeners[0].listener_filters[0].typed_config";
    for (fields, want) in [
        (
            "rules: [{tlv_type: 256, on_tlv_present: {key: k}}]",
            format!("{at}.rules[0].tlv_type: must be 0..255"),
        ),
        (
            "rules: [{tlv_type: 1, on_tlv_present: {key: k}}, {tlv_type: 2, on_tlv_present: {metadata_namespace: n}}]",
            format!("{at}.rules[1].on_tlv_present.key: must not be empty"),
        ),
        (
            "disallowed_versions: [V2, V1]",
            format!("{at}.disallowed_versions: all PROXY protocol versions are disallowed"),
        ),
        ("tlv_location: FILTER_STATE", format!("{at}.tlv_location")),
    ] {
        let err = proxy_protocol_result(fields).expect_err(fields);
        assert!(err.contains(&want), "{fields}: {err}");
    }
}

/// `tcp_proxy` `tunneling_config`: the hostname is a format, `post_path`
/// defaults to `/`, headers are formatted; what weir does not implement
/// (response propagation) and what Envoy refuses (a post_path without
/// use_post) are rejected with their path.
#[test]
fn tcp_proxy_tunneling_config() {
    let with = |t: &str| {
        format!(
            r#"
static_resources:
  clusters:
  - name: c
    connect_timeout: 1s
    load_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: tcp
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
          tunneling_config: {t}
"#
        )
    };
    let s = translate(&with(
        r#"{hostname: "%DOWNSTREAM_LOCAL_ADDRESS%", use_post: true, headers_to_add: [{header: {key: baggage, value: "a=%DOWNSTREAM_LOCAL_PORT%"}}]}"#,
    ))
    .expect("accepted");
    let crate::config::NetworkFilter::Tcp(p) = &s.listeners[0].filter_chains[0].filter else {
        panic!("tcp_proxy");
    };
    let t = p.tunneling.as_ref().expect("tunneling");
    assert!(t.use_post);
    assert_eq!(t.post_path, "/");
    assert!(!t.hostname.is_literal());
    assert_eq!(t.headers_to_add[0].name.as_str(), "baggage");
    for (cfg, field) in [
        (
            r#"{hostname: "h:1", propagate_response_headers: true}"#,
            "tunneling_config.propagate_response_headers",
        ),
        (
            r#"{hostname: "h:1", propagate_response_trailers: true}"#,
            "tunneling_config.propagate_response_trailers",
        ),
        (
            r#"{hostname: "h:1", post_path: /x}"#,
            "tunneling_config.post_path",
        ),
        (
            r#"{hostname: "h:1", use_post: true, post_path: x}"#,
            "tunneling_config.post_path",
        ),
        (r#"{use_post: true}"#, "tunneling_config.hostname"),
        (
            r#"{hostname: "h:1", headers_to_add: [{header: {key: ":authority", value: x}}]}"#,
            "tunneling_config.headers_to_add[0].header.key",
        ),
    ] {
        let e = translate(&with(cfg)).expect_err(cfg).to_string();
        assert!(e.contains(field), "{cfg}: {e}");
    }
    // Fields newer than the protos weir reads are unknown fields.
    let e = load(&with(r#"{hostname: "h:1", request_id_extension: {}}"#)).expect_err("unknown");
    assert!(e.contains("request_id_extension"), "{e}");
}

/// Istio's `connect_originate` cluster shape: ORIGINAL_DST with its
/// settings; Envoy's defaults when `original_dst_lb_config` is absent.
#[test]
fn original_dst_cluster_settings() {
    let snap = translate(
        r#"
static_resources:
  clusters:
  - name: connect_originate
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    cleanup_interval: 60s
    original_dst_lb_config:
      upstream_port_override: 15008
      use_http_header: true
      http_header_name: X-Dst
      metadata_key: {key: ns, path: [{key: a}, {key: b}]}
  - name: plain
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
  - name: static
    connect_timeout: 1s
    original_dst_lb_config: {use_http_header: true}
"#,
    )
    .expect("valid");
    let od = snap.clusters["connect_originate"]
        .original_dst
        .clone()
        .expect("original_dst");
    assert_eq!(od.cleanup_interval, std::time::Duration::from_secs(60));
    assert_eq!(od.port_override, Some(15008));
    assert_eq!(od.header.as_ref().map(|h| h.as_str()), Some("x-dst"));
    assert_eq!(
        od.metadata_key,
        Some(("ns".to_owned(), vec!["a".to_owned(), "b".to_owned()]))
    );
    let plain = snap.clusters["plain"].original_dst.clone().expect("set");
    assert_eq!(plain.cleanup_interval, std::time::Duration::from_secs(5));
    assert_eq!((plain.header.is_none(), plain.port_override), (true, None));
    // Other types ignore the settings, as Envoy.
    assert!(snap.clusters["static"].original_dst.is_none());
    let err = translate(
        r#"
static_resources:
  clusters:
  - name: od
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: {metadata_key: {key: ""}}
    load_balancing_policy: {policies: [{typed_extension_config: {name: rr, typed_config: {"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin}}}]}
"#,
    )
    .expect_err("invalid")
    .to_string();
    for path in [
        "clusters[0].original_dst_lb_config.metadata_key.key",
        "clusters[0].original_dst_lb_config.metadata_key.path",
        "clusters[0].load_balancing_policy",
    ] {
        assert!(err.contains(path), "{path}: {err}");
    }
}

/// istiod's `connect_originate` sets `use_original_dst: false` (the
/// default): accepted; `true` (the listener-level redirect) is rejected
/// naming the field.
#[test]
fn listener_use_original_dst() {
    let yaml = |v: bool| {
        format!(
            r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}
    use_original_dst: {v}
    filter_chains:
    - filters:
      - name: t
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
  clusters:
  - name: c
    connect_timeout: 1s
    load_assignment:
      cluster_name: c
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 2}}}}}}}}]}}]
"#
        )
    };
    load(&yaml(false)).expect("false is the default");
    let e = load(&yaml(true)).expect_err("true");
    assert!(
        e.contains("static_resources.listeners[0].use_original_dst"),
        "{e}"
    );
}
