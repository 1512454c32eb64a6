//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac` with real
//! sockets: a real echo upstream, real HTTP clients, real mTLS clients with
//! SPIFFE certificates.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test rbac_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test rbac_scenarios
//! ```
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::scenario::{Http, Ports, Proxy};
use weir_tests::tls::{LeafSpec, TempDir, TestCa, TlsClient, TlsRequest};
use weir_tests::{tcp, upstream};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const RBAC_PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
const NET_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const TLS_CONTEXT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const FILE_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_CODE_DETAILS%\n";

const BAR: &str = "spiffe://cluster.local/ns/foo/sa/bar";
const OTHER: &str = "spiffe://cluster.local/ns/foo/sa/other";

const WAIT: Duration = Duration::from_secs(5);

fn sock(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": sock(port)}}
        ]}]},
    })
}

/// An `envoy.config.rbac.v3.RBAC`: `action` and `(name, permissions,
/// principals)` policies.
fn rules(action: &str, policies: &[(&str, Value, Value)]) -> Value {
    let mut map = serde_json::Map::new();
    for (name, perms, ids) in policies {
        map.insert(
            (*name).to_owned(),
            json!({"permissions": perms, "principals": ids}),
        );
    }
    json!({"action": action, "policies": map})
}

fn any() -> Value {
    json!([{"any": true}])
}

/// A route to the echo cluster (`extra`: more route fields).
fn route(prefix: &str, extra: Value) -> Value {
    let mut r = json!({"match": {"prefix": prefix}, "route": {"cluster": "echo"}});
    if let (Some(o), Value::Object(e)) = (r.as_object_mut(), extra) {
        o.extend(e);
    }
    r
}

fn per_route(rbac: Value) -> Value {
    json!({"typed_per_filter_config": {"envoy.filters.http.rbac": rbac}})
}

/// The HCM with the RBAC filter (`rbac`: its fields besides `@type`) and
/// an access log to `log`.
fn hcm(rbac: Value, routes: Value, vhost_extra: Value, log: &Path) -> Value {
    let mut filter = json!({"@type": RBAC});
    if let (Some(o), Value::Object(e)) = (filter.as_object_mut(), rbac) {
        o.extend(e);
    }
    let mut vh = json!({"name": "vh", "domains": ["*"], "routes": routes});
    if let (Some(o), Value::Object(e)) = (vh.as_object_mut(), vhost_extra) {
        o.extend(e);
    }
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM, "stat_prefix": "ingress",
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": FILE_LOG, "path": log.display().to_string(),
                "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}},
            }}],
            "route_config": {"name": "rc", "virtual_hosts": [vh]},
            "http_filters": [
                {"name": "envoy.filters.http.rbac", "typed_config": filter},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
        },
    })
}

/// A bootstrap: listener `l` with `chain` (a filter chain object), and `l2`
/// with `chain2` unless null.
fn bootstrap(p: &Ports, chain: Value, chain2: Value, clusters: &[Value]) -> String {
    let mut listeners =
        vec![json!({"name": "l", "address": sock(p.listen), "filter_chains": [chain]})];
    if !chain2.is_null() {
        listeners
            .push(json!({"name": "l2", "address": sock(p.listen2), "filter_chains": [chain2]}));
    }
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> weir_tests::tmp::TempFile {
    weir_tests::config::log_path("rbac", name)
}

/// Waits until stat `name` is `want`.
async fn stat_is(p: &Proxy, name: &str, want: i64) {
    let mut last = None;
    for _ in 0..100 {
        last = p.stat(name).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} = {last:?}, want {want}");
}

/// An HTTP RBAC proxy in front of an echo upstream; returns it, the echo
/// server (kept alive) and the log path.
async fn http_proxy(
    name: &str,
    rbac: Value,
    routes: Value,
    vhost_extra: Value,
) -> (Proxy, upstream::EchoServer, weir_tests::tmp::TempFile) {
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let port = echo.port();
    let log = log_path(name);
    let l = log.to_path_buf();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            json!({"filters": [hcm(rbac.clone(), routes.clone(), vhost_extra.clone(), &l)]}),
            Value::Null,
            &[cluster("echo", port)],
        )
    });
    (p, echo, log)
}

fn header_exact(name: &str, value: &str) -> Value {
    json!({"header": {"name": name, "string_match": {"exact": value}}})
}

/// ALLOW: a request needs a matching policy (method and path prefix, or a
/// header); everything else gets 403 `RBAC: access denied` with details
/// naming no policy. The query is not part of `url_path`. Denials happen
/// before routing: a path without a route is denied, not 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policies_method_path_and_header() {
    let rbac = json!({"rules": rules("ALLOW", &[
        ("get-public", json!([{"and_rules": {"rules": [
            header_exact(":method", "GET"),
            {"url_path": {"path": {"prefix": "/public"}}},
        ]}}]), any()),
        ("admin-header", json!([header_exact("x-role", "admin")]), any()),
    ])});
    let routes = json!([
        route("/public", json!({})),
        route("/private", json!({})),
        {"match": {"prefix": "/direct"}, "direct_response": {"status": 200, "body": {"inline_string": "direct"}}},
    ]);
    let (p, _echo, log) = http_proxy("allow", rbac, routes, json!({})).await;
    let c = Http::h1();
    let base = p.base();
    let r = c.get(&format!("{base}/public/x?y=1"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().path, "/public/x?y=1");
    let r = c
        .send("POST", &format!("{base}/public/x"), &[], Default::default())
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "RBAC: access denied");
    let r = c.get(&format!("{base}/private"), &[]).await;
    assert_eq!(r.status, 403);
    let r = c
        .get(&format!("{base}/private"), &[("x-role", "admin")])
        .await;
    assert_eq!(r.status, 200);
    // A direct response is a route too: the filter runs first.
    let r = c.get(&format!("{base}/direct"), &[]).await;
    assert_eq!(r.status, 403);
    // No route: denied before the router answers 404.
    let r = c.get(&format!("{base}/nowhere"), &[]).await;
    assert_eq!(r.status, 403);
    let r = c
        .get(&format!("{base}/nowhere"), &[("x-role", "admin")])
        .await;
    assert_eq!(r.status, 404);
    let lines = p.log_lines(&log, 7).await;
    assert_eq!(
        lines,
        [
            "200 /public/x?y=1 via_upstream",
            "403 /public/x rbac_access_denied_matched_policy[none]",
            "403 /private rbac_access_denied_matched_policy[none]",
            "200 /private via_upstream",
            "403 /direct rbac_access_denied_matched_policy[none]",
            "403 /nowhere rbac_access_denied_matched_policy[none]",
            "404 /nowhere route_not_found",
        ]
    );
    stat_is(&p, "http.ingress.rbac.allowed", 3).await;
    stat_is(&p, "http.ingress.rbac.denied", 4).await;
}

/// DENY: the first matching policy in name order is named in the details
/// (whitespace replaced by `_`); `not_rule`, `or_rules` and `not_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policies_name_the_first_match() {
    let rbac = json!({"rules": rules("DENY", &[
        ("b deny admin", json!([{"or_rules": {"rules": [
            {"url_path": {"path": {"prefix": "/admin"}}},
            {"url_path": {"path": {"exact": "/root"}}},
        ]}}]), any()),
        ("a-deny-blocked", json!([{"header": {"name": "x-block", "present_match": true}}]), any()),
        ("c-only-get", json!([{"not_rule": header_exact(":method", "GET")}]),
            json!([{"not_id": {"header": {"name": "x-trusted", "present_match": true}}}])),
    ])});
    let (p, _echo, log) = http_proxy("deny", rbac, json!([route("/", json!({}))]), json!({})).await;
    let c = Http::h1();
    let base = p.base();
    assert_eq!(c.get(&format!("{base}/ok"), &[]).await.status, 200);
    assert_eq!(c.get(&format!("{base}/admin/x"), &[]).await.status, 403);
    assert_eq!(c.get(&format!("{base}/root?x"), &[]).await.status, 403);
    assert_eq!(
        c.get(&format!("{base}/admin"), &[("x-block", "1")])
            .await
            .status,
        403
    );
    assert_eq!(
        c.send("PUT", &format!("{base}/ok"), &[], Default::default())
            .await
            .status,
        403
    );
    assert_eq!(
        c.send(
            "PUT",
            &format!("{base}/ok"),
            &[("x-trusted", "yes")],
            Default::default()
        )
        .await
        .status,
        200
    );
    let lines = p.log_lines(&log, 6).await;
    assert_eq!(
        lines,
        [
            "200 /ok via_upstream",
            "403 /admin/x rbac_access_denied_matched_policy[b_deny_admin]",
            "403 /root?x rbac_access_denied_matched_policy[b_deny_admin]",
            "403 /admin rbac_access_denied_matched_policy[a-deny-blocked]",
            "403 /ok rbac_access_denied_matched_policy[c-only-get]",
            "200 /ok via_upstream",
        ]
    );
    stat_is(&p, "http.ingress.rbac.allowed", 2).await;
    stat_is(&p, "http.ingress.rbac.denied", 4).await;
}

/// LOG never denies; shadow rules are evaluated and counted (under their
/// prefixes) without effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_action_and_shadow_rules_never_deny() {
    let rbac = json!({
        "rules": rules("LOG", &[("log-admin", json!([{"url_path": {"path": {"prefix": "/admin"}}}]), any())]),
        "rules_stat_prefix": "enf_",
        "shadow_rules": rules("ALLOW", &[("only-get", json!([header_exact(":method", "GET")]), any())]),
        "shadow_rules_stat_prefix": "dry_",
    });
    let (p, _echo, _log) =
        http_proxy("shadow", rbac, json!([route("/", json!({}))]), json!({})).await;
    let c = Http::h1();
    let base = p.base();
    assert_eq!(c.get(&format!("{base}/admin"), &[]).await.status, 200);
    assert_eq!(c.get(&format!("{base}/x"), &[]).await.status, 200);
    assert_eq!(
        c.send("POST", &format!("{base}/x"), &[], Default::default())
            .await
            .status,
        200
    );
    stat_is(&p, "http.ingress.rbac.enf_.allowed", 3).await;
    stat_is(&p, "http.ingress.rbac.enf_.denied", 0).await;
    stat_is(&p, "http.ingress.rbac.dry_.shadow_allowed", 2).await;
    stat_is(&p, "http.ingress.rbac.dry_.shadow_denied", 1).await;
}

/// `RBACPerRoute` replaces the filter's policies on a route (from the
/// route, else its virtual host); without `rbac` the route has no engine;
/// `FilterConfig.disabled` turns the filter off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_overrides_and_disable() {
    let deny_all = json!({"rules": rules("DENY", &[("deny-all", json!([{"any": true}]), any())])});
    let rbac = json!({"rules": rules("ALLOW", &[("needs-ok", json!([header_exact("x-ok", "1")]), any())])});
    let routes = json!([
        route("/open", per_route(json!({"@type": RBAC_PER_ROUTE}))),
        route(
            "/off",
            per_route(
                json!({"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true})
            )
        ),
        route(
            "/closed",
            per_route(json!({"@type": RBAC_PER_ROUTE, "rbac": deny_all}))
        ),
        route("/", json!({})),
    ]);
    // The virtual host's override applies to routes without their own.
    let vh = per_route(
        json!({"@type": RBAC_PER_ROUTE, "rbac": {"rules": rules("ALLOW", &[
            ("needs-vh", json!([header_exact("x-vh", "1")]), any()),
        ])}}),
    );
    let (p, _echo, log) = http_proxy("per-route", rbac, routes, vh).await;
    let c = Http::h1();
    let base = p.base();
    assert_eq!(c.get(&format!("{base}/open"), &[]).await.status, 200);
    assert_eq!(c.get(&format!("{base}/off"), &[]).await.status, 200);
    assert_eq!(
        c.get(&format!("{base}/closed"), &[("x-vh", "1")])
            .await
            .status,
        403
    );
    assert_eq!(
        c.get(&format!("{base}/x"), &[("x-ok", "1")]).await.status,
        403
    );
    assert_eq!(
        c.get(&format!("{base}/x"), &[("x-vh", "1")]).await.status,
        200
    );
    // No route: no per-route config, the filter's own policies.
    let lines = p.log_lines(&log, 5).await;
    assert_eq!(
        lines[2], "403 /closed rbac_access_denied_matched_policy[deny-all]",
        "{lines:?}"
    );
    assert_eq!(
        lines[3], "403 /x rbac_access_denied_matched_policy[none]",
        "{lines:?}"
    );
    // Only requests with an engine are counted.
    stat_is(&p, "http.ingress.rbac.allowed", 1).await;
    stat_is(&p, "http.ingress.rbac.denied", 2).await;
}

/// `source_ip`, `direct_remote_ip` and `remote_ip` (the client is
/// 127.0.0.1; with `use_remote_address` unset, `remote_ip` follows XFF),
/// and `destination_port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_addresses_and_destination_port() {
    let lo = |field: &str, prefix: &str, len: u32| {
        let mut id = serde_json::Map::new();
        id.insert(
            field.to_owned(),
            json!({"address_prefix": prefix, "prefix_len": len}),
        );
        Value::Array(vec![Value::Object(id)])
    };
    let rbac = json!({"rules": rules("ALLOW", &[
        ("src", json!([{"url_path": {"path": {"prefix": "/src"}}}]), lo("source_ip", "127.0.0.0", 8)),
        ("direct", json!([{"url_path": {"path": {"prefix": "/direct"}}}]), lo("direct_remote_ip", "127.0.0.1", 32)),
        ("remote", json!([{"url_path": {"path": {"prefix": "/remote"}}}]), lo("remote_ip", "10.1.0.0", 16)),
        ("other", json!([{"url_path": {"path": {"prefix": "/other"}}}]), lo("source_ip", "10.0.0.0", 8)),
        ("port", json!([{"and_rules": {"rules": [
            {"url_path": {"path": {"prefix": "/port"}}},
            {"destination_port_range": {"start": 1, "end": 65536}},
            {"not_rule": {"destination_port": 1}},
        ]}}]), any()),
    ])});
    let (p, _echo, _log) =
        http_proxy("addr", rbac, json!([route("/", json!({}))]), json!({})).await;
    let c = Http::h1();
    let base = p.base();
    assert_eq!(c.get(&format!("{base}/src"), &[]).await.status, 200);
    assert_eq!(c.get(&format!("{base}/direct"), &[]).await.status, 200);
    assert_eq!(c.get(&format!("{base}/other"), &[]).await.status, 403);
    assert_eq!(c.get(&format!("{base}/remote"), &[]).await.status, 403);
    assert_eq!(
        c.get(
            &format!("{base}/remote"),
            &[("x-forwarded-for", "10.1.2.3")]
        )
        .await
        .status,
        200
    );
    assert_eq!(c.get(&format!("{base}/port"), &[]).await.status, 200);
}

/// A CA, a server certificate for `example.com`, and client certificates.
struct Pki {
    ca: TestCa,
    dir: TempDir,
    chain: PathBuf,
    key: PathBuf,
    ca_file: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new("weir rbac root");
        let dir = TempDir::new("rbac-scenarios").expect("temp dir");
        let files = ca
            .issue(LeafSpec::server("example.com"))
            .write_files(&dir, "server");
        let ca_file = dir.write("ca.pem", ca.pem());
        Pki {
            ca,
            chain: files.chain,
            key: files.key,
            ca_file,
            dir,
        }
    }

    /// A transport socket requiring a client certificate from this CA.
    fn mtls(&self) -> Value {
        json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TLS_CONTEXT,
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": self.chain.display().to_string()},
                    "private_key": {"filename": self.key.display().to_string()},
                }],
                "validation_context": {"trusted_ca": {"filename": self.ca_file.display().to_string()}},
            },
        }})
    }

    fn client(&self, uri: &str) -> TlsClient {
        let _ = self.dir.path();
        TlsClient::builder()
            .trust(&self.ca)
            .client_cert(&self.ca.issue(LeafSpec::spiffe(uri)))
            .build()
    }
}

fn principal(uri: &str) -> Value {
    json!([{"authenticated": {"principal_name": {"exact": uri}}}])
}

/// Istio's mTLS principal rule: the client certificate's SPIFFE URI SAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_principal_allowed_others_denied() {
    let pki = Pki::new();
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let port = echo.port();
    let log = log_path("mtls");
    let rbac = json!({"rules": rules("ALLOW", &[
        ("ns[foo]-policy[bar]-rule[0]", any(), principal(BAR)),
        ("any-authenticated-get-health", json!([{"url_path": {"path": {"exact": "/health"}}}]),
            json!([{"authenticated": {}}])),
    ])});
    let (l, tls) = (log.to_path_buf(), pki.mtls());
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            json!({"transport_socket": tls.clone(), "filters": [
                hcm(rbac.clone(), json!([route("/", json!({}))]), json!({}), &l)
            ]}),
            Value::Null,
            &[cluster("echo", port)],
        )
    });
    let bar = pki.client(BAR);
    let other = pki.client(OTHER);
    let r = bar.get(p.addr(), "example.com", "/x").await.expect("bar");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = other
        .get(p.addr(), "example.com", "/x")
        .await
        .expect("other");
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "RBAC: access denied");
    let r = other
        .request(p.addr(), "example.com", TlsRequest::get("/health"))
        .await
        .expect("other");
    assert_eq!(r.status, 200);
    let lines = p.log_lines(&log, 3).await;
    assert_eq!(
        lines,
        [
            "200 /x via_upstream",
            "403 /x rbac_access_denied_matched_policy[none]",
            "200 /health via_upstream",
        ]
    );
    stat_is(&p, "http.ingress.rbac.allowed", 2).await;
    stat_is(&p, "http.ingress.rbac.denied", 1).await;
}

/// Whether `hello` written on `s` comes back (true) or the connection is
/// closed without a byte (false).
async fn echoes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> bool {
    // The write may fail when the proxy closed the connection already.
    let _ = s.write_all(b"hello").await;
    let _ = s.flush().await;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await {
        Err(_) => panic!("neither echoed nor closed within {WAIT:?}"),
        Ok(Ok(_)) => {
            assert_eq!(&buf, b"hello");
            true
        }
        Ok(Err(_)) => false,
    }
}

async fn tls_echoes(c: &TlsClient, addr: SocketAddr) -> bool {
    match c.connect(addr, "example.com").await {
        Ok((s, _)) => echoes(s).await,
        // TLS 1.2 clients learn of a refusal at the handshake; RBAC never
        // refuses handshakes (require_client_certificate is satisfied).
        Err(e) => panic!("handshake: {e:?}"),
    }
}

/// Network RBAC over `tcp_proxy`: the connection of an allowed principal
/// is proxied, any other is closed; `url_path` rules never match (no
/// request at L4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rbac_over_tcp_proxy_with_mtls_principals() {
    let pki = Pki::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let tcp_proxy = json!({"name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY, "stat_prefix": "tcp", "cluster": "echo"}});
    let net = |stat_prefix: &str, rules: Value, shadow: Value| {
        let mut c = json!({"@type": NET_RBAC, "stat_prefix": stat_prefix, "rules": rules});
        if !shadow.is_null() {
            c["shadow_rules"] = shadow;
            c["shadow_rules_stat_prefix"] = json!("dry_");
        }
        json!({"name": "envoy.filters.network.rbac", "typed_config": c})
    };
    let mtls_rules = rules("ALLOW", &[("bar", any(), principal(BAR))]);
    let shadow = rules("DENY", &[("deny-bar", any(), principal(BAR))]);
    // On l2 (plain TCP): url_path never matches (header rules are refused
    // at config time, as Envoy); a plain connection is not authenticated.
    let plain_rules = rules(
        "ALLOW",
        &[
            (
                "path",
                json!([{"url_path": {"path": {"prefix": "/"}}}]),
                any(),
            ),
            (
                "plain",
                json!([{"destination_port_range": {"start": 1, "end": 65536}}]),
                json!([{"not_id": {"authenticated": {}}}]),
            ),
        ],
    );
    let deny_path = rules(
        "DENY",
        &[(
            "path",
            json!([{"url_path": {"path": {"prefix": "/"}}}]),
            any(),
        )],
    );
    let tls = pki.mtls();
    let p = Proxy::start(move |ports| {
        bootstrap(
            ports,
            json!({"transport_socket": tls.clone(), "filters": [
                net("mtls.", mtls_rules.clone(), shadow.clone()), tcp_proxy.clone()
            ]}),
            json!({"filters": [
                net("plain.", plain_rules.clone(), Value::Null),
                net("plain2.", deny_path.clone(), Value::Null),
                tcp_proxy.clone()
            ]}),
            &[cluster("echo", port)],
        )
    });
    assert!(tls_echoes(&pki.client(BAR), p.addr()).await);
    assert!(!tls_echoes(&pki.client(OTHER), p.addr()).await);
    assert!(!tls_echoes(&pki.client(OTHER), p.addr()).await);
    stat_is(&p, "mtls.rbac.allowed", 1).await;
    stat_is(&p, "mtls.rbac.denied", 2).await;
    stat_is(&p, "mtls.rbac.dry_.shadow_denied", 1).await;
    stat_is(&p, "mtls.rbac.dry_.shadow_allowed", 2).await;
    let plain = tokio::net::TcpStream::connect(p.addr2())
        .await
        .expect("connect");
    assert!(echoes(plain).await);
    stat_is(&p, "plain.rbac.allowed", 1).await;
    stat_is(&p, "plain2.rbac.allowed", 1).await;
    // A documented difference: Envoy's tcp_proxy connects upstream when
    // the connection opens, before RBAC decides on the first byte, so
    // denied connections reach the upstream too; weir decides first.
    if p.target().is_envoy() {
        assert_eq!(echo.connections(), 4);
    } else {
        assert_eq!(
            echo.connections(),
            2,
            "denied connections never reach the upstream"
        );
    }
}

/// A virtual host requiring TLS answers plain requests with a redirect, as
/// Envoy's router does on its `SslRedirectRoute`: after the filters, which
/// see no per-route config there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_runs_before_the_require_tls_redirect() {
    let rbac = json!({"rules": rules("ALLOW", &[("needs-ok", json!([header_exact("x-ok", "1")]), any())])});
    let routes = json!([route("/", per_route(json!({"@type": RBAC_PER_ROUTE})))]);
    let (p, _echo, log) =
        http_proxy("tls-redirect", rbac, routes, json!({"require_tls": "ALL"})).await;
    let c = Http::h1();
    let base = p.base();
    let r = c.get(&format!("{base}/a"), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = c.get(&format!("{base}/a"), &[("x-ok", "1")]).await;
    assert_eq!(r.status, 301);
    let lines = p.log_lines(&log, 2).await;
    assert_eq!(
        lines,
        [
            "403 /a rbac_access_denied_matched_policy[none]",
            "301 /a direct_response",
        ]
    );
}
