//! Envoy v3 bootstrap builders shared by the scenario suites (JSON, which
//! both weir and Envoy accept; [`HttpYaml`] and [`yaml_bootstrap`] for the
//! suites that write YAML text), and the waits scenario tests repeat.
//!
//! A suite composes these and adds only what its feature needs, e.g.:
//!
//! ```ignore
//! let p = Proxy::start(move |ports| {
//!     bootstrap(ports, vec![listener("l", ports.listen, vec![chain(vec![
//!         hcm("ingress", vec![filter("envoy.filters.http.rbac", RBAC, rbac.clone())],
//!             vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))], json!({})),
//!     ])])], vec![cluster("echo", &[port], json!({}))])
//! });
//! ```
use std::time::Duration;

use serde_json::{json, Value};

use crate::scenario::{Ports, Proxy};
use crate::tmp::TempFile;

pub const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
pub const FILE_LOG: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
pub const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const HTTP_PROTOCOL_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// `base` with the fields of `extra` (an object; anything else adds
/// nothing) set over it.
pub fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(o), Value::Object(e)) = (base.as_object_mut(), extra) {
        o.extend(e);
    }
    base
}

/// A `socket_address` on 127.0.0.1.
pub fn sock(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// A STATIC cluster with one locality of endpoints on 127.0.0.1 `ports`
/// (`extra`: more cluster fields).
pub fn cluster(name: &str, ports: &[u16], extra: Value) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": sock(*p)}}))
        .collect();
    merge(
        json!({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        }),
        extra,
    )
}

/// `extra` with HTTP/2 upstream protocol options for a cluster.
pub fn h2_upstream(extra: Value) -> Value {
    merge(
        json!({"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        }}),
        extra,
    )
}

/// A filter (HTTP or network) `name` with `typed_config` of type `ty` and
/// `fields`.
pub fn filter(name: &str, ty: &str, fields: Value) -> Value {
    json!({"name": name, "typed_config": merge(json!({"@type": ty}), fields)})
}

/// A route on `prefix` to `cluster` (`extra`: more route fields).
pub fn route(prefix: &str, cluster: &str, extra: Value) -> Value {
    merge(
        json!({"match": {"prefix": prefix}, "route": {"cluster": cluster}}),
        extra,
    )
}

/// A virtual host for every domain (`extra`: more fields).
pub fn vhost(name: &str, routes: Vec<Value>, extra: Value) -> Value {
    merge(
        json!({"name": name, "domains": ["*"], "routes": routes}),
        extra,
    )
}

/// A file access log to `path` with text `format`.
pub fn file_log(path: &std::path::Path, format: &str) -> Value {
    json!({"name": "envoy.access_loggers.file", "typed_config": {
        "@type": FILE_LOG, "path": path.display().to_string(),
        "log_format": {"text_format_source": {"inline_string": format}},
    }})
}

/// The HTTP connection manager network filter: `http_filters` then the
/// router, an inline route configuration `rc` with `vhosts` (`extra`: more
/// HCM fields, e.g. `access_log`).
pub fn hcm(stat_prefix: &str, http_filters: Vec<Value>, vhosts: Vec<Value>, extra: Value) -> Value {
    let mut filters = http_filters;
    filters.push(filter("envoy.filters.http.router", ROUTER, json!({})));
    filter(
        "envoy.filters.network.http_connection_manager",
        HCM,
        merge(
            json!({
                "stat_prefix": stat_prefix,
                "route_config": {"name": "rc", "virtual_hosts": vhosts},
                "http_filters": filters,
            }),
            extra,
        ),
    )
}

/// The `tcp_proxy` network filter to `cluster` (`extra`: more fields).
pub fn tcp_proxy(stat_prefix: &str, cluster: &str, extra: Value) -> Value {
    filter(
        "envoy.filters.network.tcp_proxy",
        TCP_PROXY,
        merge(
            json!({"stat_prefix": stat_prefix, "cluster": cluster}),
            extra,
        ),
    )
}

/// A filter chain of network `filters`.
pub fn chain(filters: Vec<Value>) -> Value {
    json!({"filters": filters})
}

/// A listener on 127.0.0.1 `port`.
pub fn listener(name: &str, port: u16, chains: Vec<Value>) -> Value {
    json!({"name": name, "address": sock(port), "filter_chains": chains})
}

/// A static bootstrap with the admin on `p.admin`.
pub fn bootstrap(p: &Ports, listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

/// A log file path `name.log` (not created) in a fresh temporary directory
/// `weir-<suite>-...` of its own, removed when the guard is dropped (see
/// [`crate::tmp`]).
pub fn log_path(suite: &str, name: &str) -> TempFile {
    TempFile::new(suite, &format!("{name}.log"))
}

/// Waits (about 2 s at most) until stat `name` satisfies `ok`; returns its
/// last value either way.
pub async fn wait_stat(p: &Proxy, name: &str, ok: impl Fn(Option<i64>) -> bool) -> Option<i64> {
    let mut last = None;
    for _ in 0..100 {
        last = p.stat(name).await;
        if ok(last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// Waits until stat `name` is `want`; panics with its value otherwise.
pub async fn stat_is(p: &Proxy, name: &str, want: i64) {
    let last = wait_stat(p, name, |v| v == Some(want)).await;
    assert_eq!(last, Some(want), "{name}");
}

/// [`bootstrap`] with more top-level fields (`node`, ...).
pub fn bootstrap_with(
    p: &Ports,
    listeners: Vec<Value>,
    clusters: Vec<Value>,
    extra: Value,
) -> String {
    merge(
        json!({
            "admin": {"address": sock(p.admin)},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        }),
        extra,
    )
    .to_string()
}

/// `bootstrap` (a [`bootstrap`] JSON text) with `node` set (Istio's
/// filters read the node's id and metadata).
pub fn with_node(bootstrap: String, node: Value) -> String {
    let v: Value = serde_json::from_str(&bootstrap).expect("bootstrap JSON");
    merge(v, json!({ "node": node })).to_string()
}

// === internal listeners (`envoy.bootstrap.internal_listener`) ===

/// The endpoint metadata namespace the `original_dst` listener filter reads
/// on an internal connection (the waypoint's `POD_IP:PORT`).
pub const ORIGINAL_DST_NS: &str = "envoy.filters.listener.original_dst";

/// The bootstrap extension internal listeners need.
pub fn internal_extension() -> Value {
    json!([{"name": "envoy.bootstrap.internal_listener", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
    }}])
}

/// An internal listener `name` with `fields` (chains, listener filters...).
pub fn internal_listener(name: &str, fields: Value) -> Value {
    merge(json!({"name": name, "internal_listener": {}}), fields)
}

/// An `LbEndpoint` at internal listener `listener` (`endpoint_id`), with
/// host `metadata` unless null.
pub fn internal_endpoint(listener: &str, endpoint_id: &str, metadata: Value) -> Value {
    let mut e = json!({"endpoint": {"address": {"envoy_internal_address": {
        "server_listener_name": listener, "endpoint_id": endpoint_id,
    }}}});
    if !metadata.is_null() {
        e["metadata"] = json!({ "filter_metadata": metadata });
    }
    e
}

/// A STATIC cluster of `endpoints` (`extra`: more cluster fields).
pub fn internal_cluster(name: &str, endpoints: Vec<Value>, extra: Value) -> Value {
    merge(
        json!({
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        }),
        extra,
    )
}

/// The `internal_upstream` transport passing host metadata namespace
/// `envoy.filters.listener.original_dst` (the waypoint's).
pub fn internal_upstream() -> Value {
    json!({"transport_socket": {"name": "envoy.transport_sockets.internal_upstream", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        "passthrough_metadata": [{"kind": {"host": {}}, "name": ORIGINAL_DST_NS}],
        "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
        }},
    }}})
}

// === CONNECT termination (HBONE's `connect_terminate`) ===

/// The route that terminates CONNECT to `cluster` (`upgrade`: the route's
/// `upgrade_configs`, e.g. [`connect_terminate_upgrade`]).
pub fn connect_route(cluster: &str, upgrade: Value) -> Value {
    json!({"match": {"connect_matcher": {}}, "route": {"cluster": cluster, "upgrade_configs": upgrade}})
}

/// A route's `upgrade_configs` terminating CONNECT (`connect_config`).
pub fn connect_terminate_upgrade() -> Value {
    json!([{"upgrade_type": "CONNECT", "connect_config": {}}])
}

/// Istio's `connect_terminate` HCM fields: CONNECT enabled, `allow_connect`
/// (and `extra`).
pub fn hcm_connect(extra: Value) -> Value {
    merge(
        json!({
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "http2_protocol_options": {"allow_connect": true},
        }),
        extra,
    )
}

/// HBONE's downstream transport: TLS offering ALPN `h2` with `server`'s
/// certificate, requiring a client certificate that `ca_file` trusts.
pub fn downstream_mtls_h2(server: &crate::tls::LeafFiles, ca_file: &std::path::Path) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWNSTREAM_TLS,
        "require_client_certificate": true,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{
                "certificate_chain": {"filename": server.chain.display().to_string()},
                "private_key": {"filename": server.key.display().to_string()},
            }],
            "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
        },
    }})
}

// === YAML bootstraps ===
//
// Some suites write their bootstraps as YAML text, the way an operator
// writes one. These are the parts they all repeat; what a test configures
// stays in the test, as YAML lines at the indentation each field names
// (a part ending without a newline gets one).

/// A YAML bootstrap: the admin on `p.admin`, `top` (more top-level fields,
/// indent 0), listener `l` on `p.listen` with one filter chain of network
/// filter list items `filters` (indent 6), cluster list items `clusters`
/// (indent 2; none: `clusters: []`).
pub fn yaml_bootstrap(p: &Ports, top: &str, filters: &str, clusters: &str) -> String {
    yaml_bootstrap_with(p, top, "", filters, clusters)
}

/// [`yaml_bootstrap`] with more fields of listener `l` (`listener`, indent 4).
fn yaml_bootstrap_with(
    p: &Ports,
    top: &str,
    listener: &str,
    filters: &str,
    clusters: &str,
) -> String {
    let mut y = format!("admin: {{address: {}}}\n", yaml_sock(p.admin));
    push_lines(&mut y, top);
    y.push_str("static_resources:\n  listeners:\n  - name: l\n");
    y.push_str(&format!("    address: {}\n", yaml_sock(p.listen)));
    push_lines(&mut y, listener);
    y.push_str("    filter_chains:\n    - filters:\n");
    push_lines(&mut y, filters);
    if clusters.trim().is_empty() {
        y.push_str("  clusters: []\n");
    } else {
        y.push_str("  clusters:\n");
        push_lines(&mut y, clusters);
    }
    y
}

/// An HTTP bootstrap in YAML ([`yaml_bootstrap`]): one HTTP connection
/// manager (`stat_prefix: ingress`) whose inline route configuration `rc`
/// has one virtual host `main` for every domain, the router the last HTTP
/// filter. Empty parts add nothing:
///
/// ```ignore
/// HttpYaml { hcm: &access_log, routes: &routes, clusters: &clusters, ..HttpYaml::default() }
///     .render(ports)
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct HttpYaml<'a> {
    /// More top-level bootstrap fields (indent 0).
    pub top: &'a str,
    /// More fields of listener `l` (indent 4).
    pub listener: &'a str,
    /// More HCM fields (indent 10): `access_log`, codec options...
    pub hcm: &'a str,
    /// More `route_config` fields (indent 12).
    pub rc: &'a str,
    /// More fields of virtual host `main` (indent 14).
    pub vhost: &'a str,
    /// The route list items of `main` (indent 14).
    pub routes: &'a str,
    /// Virtual host list items (indent 12) instead of `main` (then `vhost`
    /// and `routes` are not used).
    pub vhosts: &'a str,
    /// HTTP filter list items before the router (indent 10).
    pub filters: &'a str,
    /// Cluster list items (indent 2), e.g. [`yaml_cluster`]s.
    pub clusters: &'a str,
}

impl HttpYaml<'_> {
    /// The bootstrap with the admin and listener on `p`'s ports.
    pub fn render(&self, p: &Ports) -> String {
        let mut f = format!(
            "      - name: hcm\n        typed_config:\n          \"@type\": {HCM}\n          stat_prefix: ingress\n"
        );
        push_lines(&mut f, self.hcm);
        f.push_str("          route_config:\n            name: rc\n");
        push_lines(&mut f, self.rc);
        f.push_str("            virtual_hosts:\n");
        if self.vhosts.is_empty() {
            f.push_str("            - name: main\n              domains: [\"*\"]\n");
            push_lines(&mut f, self.vhost);
            f.push_str("              routes:\n");
            push_lines(&mut f, self.routes);
        } else {
            push_lines(&mut f, self.vhosts);
        }
        f.push_str("          http_filters:\n");
        push_lines(&mut f, self.filters);
        f.push_str(&format!(
            "          - name: envoy.filters.http.router\n            typed_config: {{\"@type\": {ROUTER}}}\n"
        ));
        yaml_bootstrap_with(p, self.top, self.listener, &f, self.clusters)
    }
}

/// A STATIC cluster list item (indent 2) `name` over 127.0.0.1 `ports`
/// (`extra`: more cluster fields, indent 4).
pub fn yaml_cluster(name: &str, ports: &[u16], extra: &str) -> String {
    let mut y = format!("  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n");
    push_lines(&mut y, extra);
    y.push_str(&format!(
        "    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n"
    ));
    for port in ports {
        y.push_str(&format!(
            "        - endpoint: {{address: {}}}\n",
            yaml_sock(*port)
        ));
    }
    y
}

/// An `access_log` field at `indent` (10 in an HCM or a `tcp_proxy`)
/// writing one line of text `format` (YAML double-quoted string content,
/// without the newline) per request or connection to `path`.
pub fn yaml_file_log(path: &std::path::Path, format: &str, indent: usize) -> String {
    let i = " ".repeat(indent);
    format!(
        "{i}access_log:\n{i}- name: envoy.access_loggers.file\n{i}  typed_config:\n{i}    \"@type\": {FILE_LOG}\n{i}    path: {}\n{i}    log_format: {{text_format_source: {{inline_string: \"{format}\\n\"}}}}\n",
        path.display()
    )
}

/// A `socket_address` on 127.0.0.1 as a YAML flow mapping.
fn yaml_sock(port: u16) -> String {
    format!("{{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}")
}

/// Appends `lines`, ending them with a newline when they do not.
fn push_lines(y: &mut String, lines: &str) {
    if !lines.is_empty() {
        y.push_str(lines);
        if !lines.ends_with('\n') {
            y.push('\n');
        }
    }
}
