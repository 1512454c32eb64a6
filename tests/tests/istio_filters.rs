//! The filters istiod puts in a gateway's listeners, end to end: weir
//! accepts them, proxies through them, and counts the ones it passes
//! through (`weir.pass_through_filter.*`, ARCHITECTURE.md "Pass-through
//! filters").
//!
//! `istio_filters_pass_through` is weir-only: Envoy 1.40 from PyPI has no
//! Istio extensions (`istio.stats`, peer metadata, `istio.alpn`,
//! `istio.metadata_exchange`), so with `WEIR_SCENARIO_TARGET=envoy` it
//! returns early. `envoy_filters_do_nothing_when_unconfigured` uses only
//! Envoy's own filters (`fault`, `cors`, `grpc_stats`) and runs against
//! every target.
use weir_tests::scenario::{echo_header, Http, Ports, Proxy, Target};
use weir_tests::{tcp, upstream};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TS: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";

/// Envoy's HTTP filters as istiod configures them for a gateway.
const ENVOY_FILTERS: &str = r#"
          - name: envoy.filters.http.grpc_stats
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig, emit_filter_state: true, stats_for_all_methods: false}
          - name: envoy.filters.http.fault
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}
          - name: envoy.filters.http.cors
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}"#;

/// A bootstrap whose listener `l` is an HTTP gateway listener with
/// `network` filters before the HCM and `http` filters before the router,
/// routing to the cluster `echo` on port `echo`; `more_listeners` and
/// `more_clusters` are list items (indent 2).
fn config(
    p: &Ports,
    echo: u16,
    network: &str,
    http: &str,
    more_listeners: &str,
    more_clusters: &str,
) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:{network}
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
          http_filters:{http}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
{more_listeners}
  clusters:
{more_clusters}
  - name: echo
    type: STATIC
    connect_timeout: 1s
    transport_socket:
      name: envoy.transport_sockets.raw_buffer
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {echo}}}}}}}}}]}}]
"#,
        admin = p.admin,
        listen = p.listen,
    )
}

/// A filter whose typed_config is a `udpa.type.v1.TypedStruct` (as istiod
/// sends Istio's filters), as an item of an `http_filters` list (indent 10)
/// or of a chain's `filters` (indent 6).
fn typed_struct(indent: usize, name: &str, inner: &str, value: &str) -> String {
    format!(
        "\n{:indent$}- name: {name}\n{:indent$}  typed_config: {{\"@type\": {TS}, type_url: \"type.googleapis.com/{inner}\", value: {value}}}",
        "", ""
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_filters_pass_through() {
    if Target::from_env().is_envoy() {
        eprintln!("skipped: Envoy from PyPI has no Istio extensions");
        return;
    }
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let tcp_echo = tcp::tcp_echo_server().await.expect("tcp echo");
    // What istiod sends a gateway: peer metadata (outbound form), grpc_stats,
    // istio.alpn, fault, cors, istio.stats; istio.stats also as a network
    // filter.
    let mut http = typed_struct(
        10,
        "istio.metadata_exchange",
        "io.istio.http.peer_metadata.Config",
        "{upstream_discovery: [{istio_headers: {}}, {workload_discovery: {}}], \
         upstream_propagation: [{istio_headers: {}}]}",
    );
    http.push_str(ENVOY_FILTERS);
    http.push_str(
        r#"
          - name: istio.alpn
            typed_config:
              "@type": type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig
              alpn_override:
              - {upstream_protocol: HTTP11, alpn_override: [istio-http/1.1, istio, http/1.1]}
              - {upstream_protocol: HTTP2, alpn_override: [istio-h2, istio, h2]}"#,
    );
    http.push_str(&typed_struct(
        10,
        "istio.stats",
        "stats.PluginConfig",
        "{disable_host_header_fallback: true}",
    ));
    let network = typed_struct(6, "istio.stats", "stats.PluginConfig", "{}");
    // Listener l2: Istio's TCP chain (metadata exchange, stats, tcp_proxy).
    let l2 = |listen2: u16| {
        format!(
            r#"  - name: l2
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen2}}}}}
    filter_chains:
    - filters:{mx}{stats}
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: tcp_echo, cluster: tcp_echo}}"#,
            mx = typed_struct(
                6,
                "istio.metadata_exchange",
                "envoy.tcp.metadataexchange.config.MetadataExchange",
                "{protocol: istio-peer-exchange, enable_discovery: true}",
            ),
            stats = typed_struct(6, "istio.stats", "stats.PluginConfig", "{}"),
        )
    };
    let tcp_cluster = format!(
        r#"  - name: tcp_echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: tcp_echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]"#,
        tcp_echo.port()
    );
    let p = Proxy::start(|p| {
        config(
            p,
            echo.port(),
            &network,
            &http,
            &l2(p.listen2),
            &tcp_cluster,
        )
    });

    let r = Http::h1().get(&format!("{}/hello", p.base()), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.echo();
    assert_eq!(seen.upstream, "echo");
    assert_eq!(seen.path, "/hello");
    // The UUID request ID extension is Envoy's default: an x-request-id.
    assert!(echo_header(&seen, "x-request-id").is_some(), "{seen:?}");
    // The peer metadata filter runs: this node's metadata goes upstream
    // (istio_stats_scenarios checks its content).
    assert!(echo_header(&seen, "x-envoy-peer-metadata").is_some());
    assert!(echo_header(&seen, "x-envoy-peer-metadata-id").is_some());
    let t = tcp::stream_through(p.addr2(), 4096)
        .await
        .expect("tcp_proxy");
    assert_eq!(t.received, 4096);

    // One per occurrence in a live chain: the network istio.stats in front
    // of l's HCM (the HTTP one, the peer metadata filter and the network
    // istio.stats in front of l2's tcp_proxy run). The plaintext TCP
    // connection has no ALPN: the exchange does not start.
    // istio.alpn and the metadata exchange in front of tcp_proxy run too
    // (istio_mx_scenarios checks them).
    assert_eq!(p.stat("weir.pass_through_filter.peer_metadata").await, None);
    assert_eq!(p.stat("weir.pass_through_filter.istio_alpn").await, None);
    assert_eq!(
        p.stat("weir.pass_through_filter.metadata_exchange").await,
        None
    );
    assert_eq!(
        p.stat("metadata_exchange.alpn_protocol_not_found").await,
        Some(1)
    );
    for (name, n) in [("istio_stats", 1)] {
        assert_eq!(
            p.stat(&format!("weir.pass_through_filter.{name}")).await,
            Some(n),
            "{name}"
        );
    }
    assert_eq!(
        p.stat("http.outbound_0.0.0.0_8080.downstream_rq_2xx").await,
        Some(1)
    );
}

/// `fault` without faults, `cors` without policies and `grpc_stats` (on
/// requests that are not gRPC) change nothing about a request, in Envoy and
/// in weir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_filters_do_nothing_when_unconfigured() {
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let p = Proxy::start(|p| config(p, echo.port(), "", ENVOY_FILTERS, "", ""));
    // A CORS preflight gets no CORS answer: there is no policy.
    let r = Http::h1()
        .send(
            "OPTIONS",
            &format!("{}/x", p.base()),
            &[
                ("origin", "https://example.com"),
                ("access-control-request-method", "GET"),
            ],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().method, "OPTIONS");
    assert!(r.header("access-control-allow-origin").is_none());
    // Fault headers do nothing without delay/abort in the filter config.
    let r = Http::h1()
        .get(
            &format!("{}/y", p.base()),
            &[
                ("x-envoy-fault-abort-request", "503"),
                ("x-envoy-fault-delay-request", "2000"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().path, "/y");
    assert_eq!(
        p.stat("http.outbound_0.0.0.0_8080.downstream_rq_2xx").await,
        Some(2)
    );
    // grpc_stats is run, not passed through.
    assert_eq!(p.stat("weir.pass_through_filter.grpc_stats").await, None);
}
