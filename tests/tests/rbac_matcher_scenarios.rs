//! The matcher API form of `envoy.filters.http.rbac` and
//! `envoy.filters.network.rbac` (`matcher`, `shadow_matcher`:
//! `xds.type.matcher.v3.Matcher` with `envoy.config.rbac.v3.Action`
//! actions) with real sockets: a real echo upstream, real HTTP clients,
//! real mTLS clients with SPIFFE certificates.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test rbac_matcher_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test rbac_matcher_scenarios
//! ```
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{
    bootstrap, chain, cluster, file_log, filter, hcm, listener, log_path, merge, route, stat_is,
    tcp_proxy, vhost, DOWNSTREAM_TLS,
};
use weir_tests::scenario::{Http, Proxy, StartOptions, Target};
use weir_tests::tls::{LeafSpec, TempDir, TestCa, TlsClient};
use weir_tests::{tcp, upstream};

const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const RBAC_PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
const NET_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const ACTION: &str = "type.googleapis.com/envoy.config.rbac.v3.Action";
const NET_INPUT: &str = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.";
const HEADER_INPUT: &str = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput";
const IP_MATCHER: &str = "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip";
const TLS_INSPECTOR: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const LOG_FORMAT: &str = "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_CODE_DETAILS%\n";

const BAR: &str = "spiffe://cluster.local/ns/foo/sa/bar";
const OTHER: &str = "spiffe://cluster.local/ns/foo/sa/other";

const WAIT: Duration = Duration::from_secs(5);

/// A request (path, headers) and the status it must get.
type Case = (&'static str, &'static [(&'static str, &'static str)], u16);

/// An `on_match` with an RBAC action.
fn action(name: &str, action: &str) -> Value {
    json!({"action": {"name": "rbac-action", "typed_config": {
        "@type": ACTION, "name": name, "action": action,
    }}})
}

/// A request header input.
fn header(name: &str) -> Value {
    json!({"name": "h", "typed_config": {"@type": HEADER_INPUT, "header_name": name}})
}

/// A network input (`DestinationPortInput`, ...).
fn net_input(ty: &str) -> Value {
    json!({"name": "n", "typed_config": {"@type": format!("{NET_INPUT}{ty}")}})
}

/// A `single_predicate` with a `value_match`.
fn value(input: Value, matcher: Value) -> Value {
    json!({"single_predicate": {"input": input, "value_match": matcher}})
}

/// A `single_predicate` with the IP matcher on `cidrs` (`address/len`).
fn ip_in(input: Value, cidrs: &[(&str, u32)]) -> Value {
    let ranges: Vec<Value> = cidrs
        .iter()
        .map(|(a, l)| json!({"address_prefix": a, "prefix_len": l}))
        .collect();
    json!({"single_predicate": {"input": input, "custom_match": {"name": "ip", "typed_config": {
        "@type": IP_MATCHER, "cidr_ranges": ranges, "stat_prefix": "ipm",
    }}}})
}

fn field(predicate: Value, on_match: Value) -> Value {
    json!({"predicate": predicate, "on_match": on_match})
}

/// A `matcher_list` matcher (`on_no_match`: null for none).
fn list(matchers: Vec<Value>, on_no_match: Value) -> Value {
    let mut m = json!({"matcher_list": {"matchers": matchers}});
    if !on_no_match.is_null() {
        m["on_no_match"] = on_no_match;
    }
    m
}

/// A proxy with the HTTP RBAC filter (`rbac`: its fields) to an echo
/// upstream, `routes` (null: `/` to the echo cluster), an access log.
async fn http_proxy(
    name: &str,
    rbac: Value,
    routes: Value,
) -> (Proxy, upstream::EchoServer, weir_tests::tmp::TempFile) {
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let port = echo.port();
    let log = log_path("rbac-matcher", name);
    let l = log.to_path_buf();
    let routes = if routes.is_null() {
        vec![route("/", "echo", json!({}))]
    } else {
        serde_json::from_value(routes).expect("routes")
    };
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![filter("envoy.filters.http.rbac", RBAC, rbac.clone())],
            vec![vhost("vh", routes.clone(), json!({}))],
            json!({"access_log": [file_log(&l, LOG_FORMAT)]}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    (p, echo, log)
}

/// A `matcher_list` on headers and the source address: the first matching
/// field matcher decides (ALLOW and LOG allow, DENY denies), its action's
/// `name` is the effective policy (in the details of a denial), and no
/// match denies with `[none]`. Several values of a header are joined with
/// `,`, as Envoy's `HttpRequestHeaderMatchInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matcher_list_first_match_decides() {
    let matcher = list(
        vec![
            field(
                value(header("x-role"), json!({"exact": "admin"})),
                action("admins", "ALLOW"),
            ),
            field(
                json!({"and_matcher": {"predicate": [
                    value(header("x-role"), json!({"prefix": "dev"})),
                    {"not_matcher": value(header(":path"), json!({"prefix": "/secret"}))},
                ]}}),
                action("devs", "ALLOW"),
            ),
            field(
                json!({"or_matcher": {"predicate": [
                    value(header("x-block"), json!({"exact": "1"})),
                    ip_in(net_input("SourceIPInput"), &[("10.0.0.0", 8)]),
                ]}}),
                action("blocked", "DENY"),
            ),
            field(
                value(header("x-multi"), json!({"exact": "a,b"})),
                action("multi", "ALLOW"),
            ),
            field(
                ip_in(net_input("DirectSourceIPInput"), &[("127.0.0.0", 8)]),
                action("audit", "LOG"),
            ),
        ],
        Value::Null,
    );
    let (p, _echo, log) = http_proxy("list", json!({"matcher": matcher}), Value::Null).await;
    let c = Http::h1();
    let base = p.base();
    let cases: [Case; 7] = [
        ("/a", &[("x-role", "admin")], 200),
        ("/a", &[("x-role", "developer")], 200),
        // `devs` fails on the path; nothing else but `audit` (LOG) matches.
        ("/secret", &[("x-role", "developer")], 200),
        ("/b", &[("x-block", "1")], 403),
        // The first match wins: `devs` before `blocked`.
        ("/c", &[("x-role", "dev"), ("x-block", "1")], 200),
        ("/d", &[("x-multi", "a"), ("x-multi", "b")], 200),
        ("/e", &[("x-role", "ADMIN")], 200),
    ];
    for (path, headers, want) in cases {
        let r = c.get(&format!("{base}{path}"), headers).await;
        assert_eq!(r.status, want, "{path} {headers:?}: {}", r.text());
        if want == 403 {
            assert_eq!(r.text(), "RBAC: access denied");
        }
    }
    let lines = p.log_lines(&log, 7).await;
    assert_eq!(
        lines,
        [
            "200 /a via_upstream",
            "200 /a via_upstream",
            "200 /secret via_upstream",
            "403 /b rbac_access_denied_matched_policy[blocked]",
            "200 /c via_upstream",
            "200 /d via_upstream",
            "200 /e via_upstream",
        ]
    );
    stat_is(&p, "http.ingress.rbac.allowed", 6).await;
    stat_is(&p, "http.ingress.rbac.denied", 1).await;
}

/// Without a match and without `on_no_match` the matcher engine denies
/// (as Envoy's `RoleBasedAccessControlMatcherEngineImpl`); `on_no_match`
/// selects its action; a matcher replaces `rules` (which Envoy ignores
/// with a warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_match_denies_and_on_no_match_decides() {
    let strict = list(
        vec![field(
            value(header("x-ok"), json!({"exact": "1"})),
            action("ok", "ALLOW"),
        )],
        Value::Null,
    );
    let lenient = list(
        vec![field(
            value(header("x-bad"), json!({"exact": "1"})),
            action("bad", "DENY"),
        )],
        action("lenient", "ALLOW"),
    );
    let per_route = |m: Value| {
        json!({"typed_per_filter_config": {"envoy.filters.http.rbac": {
            "@type": RBAC_PER_ROUTE, "rbac": {"matcher": m},
        }}})
    };
    let routes = json!([
        route("/lenient", "echo", per_route(lenient)),
        route("/", "echo", json!({})),
    ]);
    // `rules` alone would allow everything.
    let rbac = json!({
        "matcher": strict,
        "rules": {"action": "DENY", "policies": {}},
    });
    let (p, _echo, log) = http_proxy("no-match", rbac, routes).await;
    let c = Http::h1();
    let base = p.base();
    assert_eq!(c.get(&format!("{base}/a"), &[]).await.status, 403);
    assert_eq!(
        c.get(&format!("{base}/a"), &[("x-ok", "1")]).await.status,
        200
    );
    assert_eq!(c.get(&format!("{base}/lenient"), &[]).await.status, 200);
    let r = c.get(&format!("{base}/lenient"), &[("x-bad", "1")]).await;
    assert_eq!(r.status, 403);
    let lines = p.log_lines(&log, 4).await;
    assert_eq!(
        lines,
        [
            "403 /a rbac_access_denied_matched_policy[none]",
            "200 /a via_upstream",
            "200 /lenient via_upstream",
            "403 /lenient rbac_access_denied_matched_policy[bad]",
        ]
    );
}

/// `matcher_tree` maps: exact on a header, with a nested matcher whose
/// miss falls through to the tree's `on_no_match`; prefix on `:path`,
/// longest prefix first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matcher_tree_exact_and_prefix_maps() {
    let nested = list(
        vec![field(
            value(header("x-level"), json!({"exact": "gold"})),
            action("t2-gold", "ALLOW"),
        )],
        Value::Null,
    );
    let exact = json!({
        "matcher_tree": {"input": header("x-tenant"), "exact_match_map": {"map": {
            "t1": action("t1", "ALLOW"),
            "t2": {"matcher": nested},
            "t3": action("t3", "DENY"),
        }}},
        "on_no_match": action("fallback", "DENY"),
    });
    let prefix = json!({
        "matcher_tree": {"input": header(":path"), "prefix_match_map": {"map": {
            "/p": action("p", "ALLOW"),
            "/p/admin": action("p-admin", "DENY"),
        }}},
    });
    let routes = json!([
        route(
            "/p",
            "echo",
            json!({"typed_per_filter_config": {"envoy.filters.http.rbac": {
                "@type": RBAC_PER_ROUTE, "rbac": {"matcher": prefix},
            }}})
        ),
        route("/", "echo", json!({})),
    ]);
    let (p, _echo, log) = http_proxy("tree", json!({"matcher": exact}), routes).await;
    let c = Http::h1();
    let base = p.base();
    let cases: [Case; 8] = [
        ("/a", &[("x-tenant", "t1")], 200),
        ("/a", &[("x-tenant", "t2"), ("x-level", "gold")], 200),
        ("/a", &[("x-tenant", "t2")], 403),
        ("/a", &[("x-tenant", "t3")], 403),
        ("/a", &[("x-tenant", "t4")], 403),
        ("/a", &[], 403),
        ("/p/x", &[], 200),
        ("/p/admin/x", &[], 403),
    ];
    for (path, headers, want) in cases {
        let r = c.get(&format!("{base}{path}"), headers).await;
        assert_eq!(r.status, want, "{path} {headers:?}: {}", r.text());
    }
    let lines = p.log_lines(&log, 8).await;
    assert_eq!(
        lines,
        [
            "200 /a via_upstream",
            "200 /a via_upstream",
            "403 /a rbac_access_denied_matched_policy[fallback]",
            "403 /a rbac_access_denied_matched_policy[t3]",
            "403 /a rbac_access_denied_matched_policy[fallback]",
            "403 /a rbac_access_denied_matched_policy[fallback]",
            "200 /p/x via_upstream",
            "403 /p/admin/x rbac_access_denied_matched_policy[p-admin]",
        ]
    );
}

/// A `shadow_matcher` is evaluated and counted, never enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_matcher_counts_only() {
    let shadow = list(
        vec![field(
            value(header("x-deny"), json!({"exact": "1"})),
            action("dry-deny", "DENY"),
        )],
        action("dry-allow", "ALLOW"),
    );
    let rbac = json!({"shadow_matcher": shadow, "shadow_rules_stat_prefix": "dry_"});
    let (p, _echo, _log) = http_proxy("shadow", rbac, Value::Null).await;
    let c = Http::h1();
    let base = p.base();
    assert_eq!(
        c.get(&format!("{base}/a"), &[("x-deny", "1")]).await.status,
        200
    );
    assert_eq!(c.get(&format!("{base}/a"), &[]).await.status, 200);
    assert_eq!(c.get(&format!("{base}/a"), &[]).await.status, 200);
    stat_is(&p, "http.ingress.rbac.dry_.shadow_denied", 1).await;
    stat_is(&p, "http.ingress.rbac.dry_.shadow_allowed", 2).await;
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

/// A CA, a server certificate for `example.com`, a transport socket
/// requiring client certificates, and SPIFFE clients.
struct Pki {
    ca: TestCa,
    _dir: TempDir,
    tls: Value,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new("weir rbac matcher root");
        let dir = TempDir::new("rbac-matcher-scenarios").expect("temp dir");
        let files = ca
            .issue(LeafSpec::server("example.com"))
            .write_files(&dir, "server");
        let ca_file = dir.write("ca.pem", ca.pem());
        let tls = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": files.chain.display().to_string()},
                    "private_key": {"filename": files.key.display().to_string()},
                }],
                "validation_context": {"trusted_ca": {"filename": ca_file.display().to_string()}},
            },
        }});
        Pki { ca, _dir: dir, tls }
    }

    fn client(&self, uri: &str) -> TlsClient {
        TlsClient::builder()
            .trust(&self.ca)
            .client_cert(&self.ca.issue(LeafSpec::spiffe(uri)))
            .build()
    }
}

async fn tls_echoes(c: &TlsClient, addr: SocketAddr) -> bool {
    match c.connect(addr, "example.com").await {
        Ok((s, _)) => echoes(s).await,
        Err(e) => panic!("handshake: {e:?}"),
    }
}

/// The network filter's matcher: the peer certificate's URI SAN and the
/// SNI on an mTLS listener; the destination port and the direct source
/// IP (IP matcher) on a plain one. A denial closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_matcher_on_tls_names_and_addresses() {
    let pki = Pki::new();
    let echo = tcp::tcp_echo_server().await.expect("echo");
    let port = echo.port();
    let net = |prefix: &str, m: Value| {
        filter(
            "envoy.filters.network.rbac",
            NET_RBAC,
            json!({"stat_prefix": prefix, "matcher": m}),
        )
    };
    let ssl = |ty: &str| {
        json!({"name": "s", "typed_config": {
            "@type": format!("type.googleapis.com/envoy.extensions.matching.common_inputs.ssl.v3.{ty}"),
        }})
    };
    let mtls = list(
        vec![field(
            json!({"and_matcher": {"predicate": [
                value(ssl("UriSanInput"), json!({"exact": BAR})),
                value(net_input("ServerNameInput"), json!({"suffix": ".com"})),
            ]}}),
            action("bar", "ALLOW"),
        )],
        Value::Null,
    );
    let tls = pki.tls.clone();
    let p = Proxy::start(move |ports| {
        // In-process weir is given port 0 (bound later): pick a free port
        // for `l2` so the destination port predicate can name it.
        let port2 = if ports.listen2 == 0 {
            weir_tests::free_port()
        } else {
            ports.listen2
        };
        let plain = list(
            vec![field(
                json!({"and_matcher": {"predicate": [
                    value(net_input("DestinationPortInput"), json!({"exact": port2.to_string()})),
                    ip_in(net_input("DirectSourceIPInput"), &[("127.0.0.0", 8)]),
                ]}}),
                action("local", "ALLOW"),
            )],
            Value::Null,
        );
        let outsiders = list(
            vec![field(
                ip_in(
                    net_input("SourceIPInput"),
                    &[("10.0.0.0", 8), ("192.168.0.0", 16)],
                ),
                action("outside", "ALLOW"),
            )],
            Value::Null,
        );
        bootstrap(
            ports,
            vec![
                // As Envoy: the SNI is the connection's requested server
                // name only with the TLS inspector (the TLS transport
                // socket alone does not set it).
                merge(
                    listener(
                        "l",
                        ports.listen,
                        vec![merge(
                            chain(vec![
                                net("mtls", mtls.clone()),
                                tcp_proxy("tcp", "echo", json!({})),
                            ]),
                            json!({"transport_socket": tls.clone()}),
                        )],
                    ),
                    json!({"listener_filters": [{
                        "name": "envoy.filters.listener.tls_inspector",
                        "typed_config": {"@type": TLS_INSPECTOR},
                    }]}),
                ),
                listener(
                    "l2",
                    port2,
                    vec![chain(vec![
                        net("plain", plain),
                        net("outsiders", outsiders),
                        tcp_proxy("tcp2", "echo", json!({})),
                    ])],
                ),
            ],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    assert!(tls_echoes(&pki.client(BAR), p.addr()).await);
    assert!(!tls_echoes(&pki.client(OTHER), p.addr()).await);
    stat_is(&p, "mtls.rbac.allowed", 1).await;
    stat_is(&p, "mtls.rbac.denied", 1).await;
    // `plain` allows, `outsiders` denies (127.0.0.1 is in neither range).
    let s = tokio::net::TcpStream::connect(p.addr2())
        .await
        .expect("connect");
    assert!(!echoes(s).await);
    stat_is(&p, "plain.rbac.allowed", 1).await;
    stat_is(&p, "outsiders.rbac.denied", 1).await;
}

/// What each RBAC filter refuses: request headers in the network filter,
/// inputs Envoy's RBAC does not register (`TransportProtocolInput`), and
/// actions of another type. Envoy refuses the same configs at startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_inputs_and_actions_are_rejected() {
    let header_in_net = list(
        vec![field(
            value(header("x-a"), json!({"exact": "1"})),
            action("a", "ALLOW"),
        )],
        Value::Null,
    );
    let transport = list(
        vec![field(
            value(net_input("TransportProtocolInput"), json!({"exact": "tls"})),
            action("a", "ALLOW"),
        )],
        Value::Null,
    );
    let bad_action = list(
        vec![field(
            value(header("x-a"), json!({"exact": "1"})),
            json!({"action": {"name": "x", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.rbac.v3.RBAC",
            }}}),
        )],
        Value::Null,
    );
    let cases = [
        (
            "network",
            header_in_net,
            "matcher.matcher_list.matchers[0].predicate.single_predicate.input.typed_config",
        ),
        (
            "http",
            transport,
            "matcher.matcher_list.matchers[0].predicate.single_predicate.input",
        ),
        (
            "http",
            bad_action,
            "matcher.matcher_list.matchers[0].on_match.action.typed_config",
        ),
    ];
    for (kind, m, field_path) in cases {
        let r = Proxy::try_start(Target::from_env(), StartOptions::default(), |ports| {
            let f = if kind == "network" {
                vec![
                    filter(
                        "envoy.filters.network.rbac",
                        NET_RBAC,
                        json!({"stat_prefix": "n", "matcher": m.clone()}),
                    ),
                    tcp_proxy("tcp", "echo", json!({})),
                ]
            } else {
                vec![hcm(
                    "ingress",
                    vec![filter(
                        "envoy.filters.http.rbac",
                        RBAC,
                        json!({"matcher": m.clone()}),
                    )],
                    vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
                    json!({}),
                )]
            };
            bootstrap(
                ports,
                vec![listener("l", ports.listen, vec![chain(f)])],
                vec![cluster("echo", &[1], json!({}))],
            )
        });
        let Err(e) = r else {
            panic!("{kind} matcher {m} was accepted");
        };
        if !Target::from_env().is_envoy() {
            let e = format!("{e:#}");
            assert!(e.contains(field_path), "{field_path} not in {e}");
        }
    }
}
