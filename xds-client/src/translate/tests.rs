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
