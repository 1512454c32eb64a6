//! Translation edge cases that need no sockets.
use crate::bootstrap::{parse_bootstrap, ParseOptions};

use super::bootstrap_to_snapshot;

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

#[test]
fn http_route_to_a_proxy_protocol_cluster_is_rejected() {
    // The upstream PROXY-protocol transport is implemented for tcp_proxy;
    // an HTTP route to such a cluster is an error naming the route field.
    let mut yaml = with_route("{match: {prefix: /}, route: {cluster: pp}}");
    yaml.push_str(
        r#"  clusters:
  - name: pp
    load_assignment:
      cluster_name: pp
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
    transport_socket:
      name: envoy.transport_sockets.upstream_proxy_protocol
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport
        config: {version: V2}
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config: {"@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer}
"#,
    );
    let b = parse_bootstrap(&yaml, ParseOptions::default()).expect("parses");
    let err = bootstrap_to_snapshot(&b).expect_err("HTTP + PROXY protocol");
    assert!(
        err.to_string().contains(
            "routes[0].route.cluster: cluster \"pp\" uses the upstream PROXY protocol transport"
        ),
        "{err}"
    );
}
