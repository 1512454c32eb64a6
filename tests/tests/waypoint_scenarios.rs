//! The ambient waypoint pipeline end to end, shaped after istiod's
//! waypoint (`../shared/fixtures/istio/waypoint/*.json`), static bootstrap:
//!
//! ```text
//! HBONE client (mTLS, SPIFFE, h2 CONNECT VIP:PORT)
//!  -> connect_terminate (TLS 1.3, h2, connect_authority set_filter_state ONCE)
//!  -> cluster main_internal (STATIC, envoy_internal_address main_internal)
//!  -> internal listener main_internal (original_dst + http_inspector,
//!     filter_chain_matcher: IPMatcher on the VIP -> DestinationPortInput)
//!     chain inbound-vip|PORT|http|svc (HCM: fault, cors, router)
//!     chain inbound-vip|PORT|tcp|svc  (tcp_proxy)
//!  -> cluster inbound-vip|PORT|…|svc (STATIC internal endpoint
//!     connect_originate, host metadata original_dst local POD_IP:TARGET_PORT,
//!     internal_upstream passing that metadata)
//!  -> internal listener connect_originate (original_dst, tcp_proxy
//!     tunneling_config hostname %DOWNSTREAM_LOCAL_ADDRESS%)
//!  -> cluster connect_originate (ORIGINAL_DST, upstream_port_override,
//!     mTLS 1.3 with the waypoint's identity, SAN prefix, h2 allow_connect)
//!  -> test HBONE server (forward mode) on POD_IP
//!  -> the app (HTTP echo / TCP echo) on POD_IP:TARGET_PORT.
//! ```
//!
//! POD_IP is 127.0.0.1 (the test HBONE server listens there); the VIPs are
//! other loopback addresses, never connected to: they only travel as the
//! CONNECT authority and the restored local address. istio/proxy's own
//! filters (`peer_metadata`, `istio.stats`) are not in the chains: Envoy
//! 1.40 (the oracle) does not have them; their behaviour is checked in
//! their own suites.
//!
//! Every test runs against weir in-process by default and against Envoy
//! 1.40 with `WEIR_SCENARIO_TARGET=envoy`, same config and assertions:
//!
//! ```sh
//! cargo test -p weir-tests --test waypoint_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test waypoint_scenarios
//! ```
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::config::{
    chain, file_log, filter, log_path, merge, sock, tcp_proxy, DOWNSTREAM_TLS, HCM,
    HTTP_PROTOCOL_OPTIONS, ROUTER, UPSTREAM_TLS,
};
use weir_tests::hbone::{read_n, H2Tunnel, HboneClient};
use weir_tests::hbone_server::{Behavior, HboneOptions, HboneProto, HboneServer};
use weir_tests::scenario::{Proxy, StartOptions, Target};
use weir_tests::tcp;
use weir_tests::tls::{Leaf, LeafSpec, TempDir, TestCa, TlsServerOptions, TlsVersions};

const WAIT: Duration = Duration::from_secs(10);
const SET_FILTER_STATE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config";
const ORIGINAL_DST_NS: &str = "envoy.filters.listener.original_dst";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/app/sa/client";
const ZTUNNEL_ID: &str = "spiffe://cluster.local/ns/default/sa/ztunnel";

/// The HTTP service's VIP and port, the TCP service's.
const HTTP_VIP: &str = "127.0.0.10:9080";
const TCP_VIP: &str = "127.0.0.11:9090";
const HTTP_CHAIN: &str = "inbound-vip|9080|http|details.default.svc.cluster.local";
const TCP_CHAIN: &str = "inbound-vip|9090|tcp|echo.default.svc.cluster.local";
/// The pods' address (where the HBONE server and the apps listen).
const POD_IP: &str = "127.0.0.1";

/// main_internal's HTTP chain access log: the connection as the
/// inbound chain sees it.
const MAIN_LOG: &str =
    "%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %UPSTREAM_CLUSTER% %RESPONSE_CODE%\n";
/// connect_terminate's access log: the client's address.
/// connect_originate's access log: the restored destination, the HBONE
/// host, the outcome.
const ORIGINATE_LOG: &str = "%DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% %RESPONSE_FLAGS% %UPSTREAM_TRANSPORT_FAILURE_REASON%\n";
const TERMINATE_LOG: &str = "%DOWNSTREAM_REMOTE_ADDRESS% %REQ(:AUTHORITY)% %RESPONSE_CODE%\n";

/// The mesh: one root; the waypoint's certificate (server on
/// connect_terminate, client on connect_originate), a client workload's,
/// the destination ztunnel's.
struct Mesh {
    ca: TestCa,
    client: Leaf,
    ztunnel: Leaf,
    _dir: TempDir,
    chain: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

fn mesh() -> Mesh {
    let ca = TestCa::new("cluster.local root");
    let dir = TempDir::new("waypoint").expect("temp dir");
    let files = ca
        .issue(LeafSpec::spiffe(WAYPOINT_ID))
        .write_files(&dir, "waypoint");
    let root = dir.write("root-cert.pem", ca.pem());
    let client = ca.issue(LeafSpec::spiffe(CLIENT_ID));
    let ztunnel = ca.issue(LeafSpec::spiffe(ZTUNNEL_ID));
    Mesh {
        ca,
        client,
        ztunnel,
        chain: files.chain,
        key: files.key,
        root,
        _dir: dir,
    }
}

impl Mesh {
    fn client(&self) -> HboneClient {
        HboneClient::expect_server(&self.ca, &self.client, WAYPOINT_ID)
    }

    /// The destination's HBONE server (ztunnel's inbound): TLS 1.3 only,
    /// ALPN h2, client certificate required; forwards to the authority.
    async fn hbone_server(&self) -> HboneServer {
        HboneServer::start(HboneOptions {
            tls: TlsServerOptions::new("ztunnel", &self.ztunnel)
                .alpn(&["h2"])
                .require_client_cert(&self.ca)
                .versions(TlsVersions::Tls13Only),
            proto: HboneProto::Http2,
            behavior: Behavior::Forward,
            max_concurrent_streams: None,
        })
        .await
        .expect("hbone server")
    }
}

/// What the pipeline connects to.
struct Apps {
    http_port: u16,
    tcp_port: u16,
    hbone_port: u16,
    main_log: PathBuf,
    terminate_log: PathBuf,
    originate_log: PathBuf,
}

fn original_dst() -> Value {
    json!({"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    }})
}

fn http_inspector() -> Value {
    json!({"name": "envoy.filters.listener.http_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    }})
}

/// The `internal_upstream` transport passing host metadata namespace
/// `envoy.filters.listener.original_dst` (istiod's).
fn internal_upstream() -> Value {
    json!({"name": "internal_upstream", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        "passthrough_metadata": [{"kind": {"host": {}}, "name": ORIGINAL_DST_NS}],
        "transport_socket": {"name": "raw_buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
        }},
    }})
}

/// A network matching input.
fn input(name: &str, ty: &str) -> Value {
    json!({"name": name, "typed_config": {
        "@type": format!("type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.{ty}"),
    }})
}

/// `on_match` selecting chain `name` (istiod names the action as the chain).
fn to_chain(name: &str) -> Value {
    json!({"action": {"name": name, "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": name,
    }}})
}

/// One IPMatcher range: `vip` (ip:port) -> its port -> chain.
fn vip_range(vip: &str, chain_name: &str) -> Value {
    let (ip, port) = vip.rsplit_once(':').expect("ip:port");
    json!({
        "ranges": [{"address_prefix": ip, "prefix_len": 32}],
        "on_match": {"matcher": {"matcher_tree": {
            "input": input("port", "DestinationPortInput"),
            "exact_match_map": {"map": {port: to_chain(chain_name)}},
        }}},
    })
}

/// istiod's `main_internal` listener.
fn main_internal(a: &Apps) -> Value {
    let http = filter(
        "envoy.filters.network.http_connection_manager",
        HCM,
        json!({
            "stat_prefix": "inbound_0.0.0.0_9080",
            "route_config": {
                "name": HTTP_CHAIN,
                "virtual_hosts": [{
                    "name": "inbound|http|9080", "domains": ["*"],
                    "routes": [{
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": HTTP_CHAIN, "timeout": "0s",
                            "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"},
                        },
                        "decorator": {"operation": ":9080/*"},
                        "name": "default",
                    }],
                }],
                "validate_clusters": false,
            },
            "http_filters": [
                {"name": "envoy.filters.http.fault", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                {"name": "envoy.filters.http.cors", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
            "access_log": [file_log(&a.main_log, MAIN_LOG)],
        }),
    );
    let tcp = tcp_proxy(TCP_CHAIN, TCP_CHAIN, json!({}));
    json!({
        "name": "main_internal",
        "internal_listener": {},
        "traffic_direction": "INBOUND",
        "listener_filters": [original_dst(), http_inspector()],
        "filter_chain_matcher": {"matcher_tree": {
            "input": input("ip", "DestinationIPInput"),
            "custom_match": {"name": "ip", "typed_config": {
                "@type": "type.googleapis.com/xds.type.matcher.v3.IPMatcher",
                "range_matchers": [vip_range(HTTP_VIP, HTTP_CHAIN), vip_range(TCP_VIP, TCP_CHAIN)],
            }},
        }},
        "filter_chains": [
            merge(chain(vec![http]), json!({"name": HTTP_CHAIN})),
            merge(chain(vec![tcp]), json!({"name": TCP_CHAIN})),
        ],
    })
}

/// istiod's `connect_originate` listener.
fn connect_originate_listener(log: &std::path::Path) -> Value {
    json!({
        "name": "connect_originate",
        "internal_listener": {},
        "use_original_dst": false,
        "listener_filters": [original_dst()],
        "filter_chains": [chain(vec![tcp_proxy(
            "connect_originate",
            "connect_originate",
            json!({
                "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                "access_log": [file_log(log, ORIGINATE_LOG)],
            }),
        )])],
    })
}

/// istiod's `connect_terminate` (named `l` for the harness), as in
/// `hbone_terminate_scenarios` without istio/proxy's peer metadata filter.
fn connect_terminate(port: u16, log: &std::path::Path) -> Value {
    let state = |key: &str, format: &str, string: bool| {
        let mut v = json!({
            "object_key": key,
            "format_string": {"text_format_source": {"inline_string": format}},
            "shared_with_upstream": "ONCE",
        });
        if string {
            v["factory_key"] = json!("envoy.string");
        }
        v
    };
    let hcm = json!({
        "@type": HCM,
        "stat_prefix": "connect_terminate",
        "route_config": {"name": "default", "virtual_hosts": [{
            "name": "default", "domains": ["*"],
            "routes": [{"match": {"connect_matcher": {}}, "route": {
                "cluster": "main_internal",
                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
            }}],
        }]},
        "http_filters": [
            filter(
                "connect_authority",
                SET_FILTER_STATE,
                json!({"on_request_headers": [
                    state("envoy.filters.listener.original_dst.local_ip", "%REQ(:AUTHORITY)%", false),
                    state("envoy.filters.listener.original_dst.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%", false),
                    state("io.istio.peer_principal", "%DOWNSTREAM_PEER_URI_SAN%", true),
                    state("io.istio.local_principal", "%DOWNSTREAM_LOCAL_URI_SAN%", true),
                ]}),
            ),
            filter("envoy.filters.http.router", ROUTER, json!({})),
        ],
        "http2_protocol_options": {"max_concurrent_streams": 100, "allow_connect": true},
        "server_name": "istio-envoy",
        "use_remote_address": false,
        "forward_client_cert_details": "APPEND_FORWARD",
        "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "stream_idle_timeout": "0s",
        "access_log": [file_log(log, TERMINATE_LOG)],
    });
    let tls = json!({"name": "tls", "typed_config": {
        "@type": DOWNSTREAM_TLS,
        "common_tls_context": {
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_3",
                "tls_maximum_protocol_version": "TLSv1_3",
            },
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [{"name": "default"}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}},
                ]},
                "validation_context_sds_secret_config": {"name": "ROOTCA"},
            },
        },
        "require_client_certificate": true,
    }});
    json!({
        "name": "l",
        "address": sock(port),
        "filter_chains": [{
            "name": "default",
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
            "transport_socket": tls,
        }],
    })
}

/// A STATIC cluster with one internal endpoint at `listener`, host
/// metadata `metadata` (null: none) and `transport`.
fn internal_cluster(name: &str, listener: &str, metadata: Value, transport: Value) -> Value {
    let mut e = json!({"endpoint": {"address": {"envoy_internal_address": {
        "server_listener_name": listener,
    }}}});
    if !metadata.is_null() {
        e["metadata"] = json!({"filter_metadata": metadata});
    }
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [e]}]},
        "transport_socket": transport,
    })
}

/// `inbound-vip|…` to `connect_originate` with the pod's address
/// `POD_IP:port` in the host metadata.
fn inbound_vip_cluster(name: &str, port: u16) -> Value {
    internal_cluster(
        name,
        "connect_originate",
        json!({ORIGINAL_DST_NS: {"local": format!("{POD_IP}:{port}")}}),
        internal_upstream(),
    )
}

/// istiod's `connect_originate` cluster (ORIGINAL_DST to the pods' HBONE
/// port), with the waypoint's certificate from the SDS secret `default`.
fn connect_originate_cluster(hbone_port: u16) -> Value {
    json!({
        "name": "connect_originate",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"upstream_port_override": hbone_port},
        "cleanup_interval": "60s",
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_3",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [{"name": "default"}],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}},
                    ]},
                    "validation_context_sds_secret_config": {"name": "ROOTCA"},
                },
            },
        }},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {"allow_connect": true}},
            },
        },
    })
}

/// The whole waypoint; one worker (pools are per worker, and so are the
/// connection counts the tests check).
fn waypoint(m: &Mesh, a: Apps) -> Proxy {
    let (chain, key, root) = (
        m.chain.display().to_string(),
        m.key.display().to_string(),
        m.root.display().to_string(),
    );
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    Proxy::start_with(Target::from_env(), opts, move |ports| {
        json!({
            "admin": {"address": sock(ports.admin)},
            "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            }}],
            "static_resources": {
                "listeners": [
                    connect_terminate(ports.listen, &a.terminate_log),
                    main_internal(&a),
                    connect_originate_listener(&a.originate_log),
                ],
                "clusters": [
                    internal_cluster("main_internal", "main_internal", Value::Null, internal_upstream()),
                    inbound_vip_cluster(HTTP_CHAIN, a.http_port),
                    inbound_vip_cluster(TCP_CHAIN, a.tcp_port),
                    connect_originate_cluster(a.hbone_port),
                ],
                "secrets": [
                    {"name": "default", "tls_certificate": {
                        "certificate_chain": {"filename": chain},
                        "private_key": {"filename": key},
                    }},
                    {"name": "ROOTCA", "validation_context": {"trusted_ca": {"filename": root}}},
                ],
            },
        })
        .to_string()
    })
}

/// Everything one test needs running.
struct Setup {
    m: Mesh,
    p: Proxy,
    hbone: HboneServer,
    app: weir_tests::upstream::EchoServer,
    tcp_app: tcp::TcpServer,
    main_log: PathBuf,
    terminate_log: PathBuf,
    originate_log: PathBuf,
}

async fn setup(name: &str) -> Setup {
    let m = mesh();
    let app = weir_tests::upstream::http1("details").await.expect("app");
    let tcp_app = tcp::tcp_echo_server().await.expect("tcp app");
    let hbone = m.hbone_server().await;
    let main_log = log_path("waypoint", &format!("{name}-main"));
    let terminate_log = log_path("waypoint", &format!("{name}-terminate"));
    let originate_log = log_path("waypoint", &format!("{name}-originate"));
    let p = waypoint(
        &m,
        Apps {
            http_port: app.port(),
            tcp_port: tcp_app.port(),
            hbone_port: hbone.port(),
            main_log: main_log.clone(),
            terminate_log: terminate_log.clone(),
            originate_log: originate_log.clone(),
        },
    );
    Setup {
        m,
        p,
        hbone,
        app,
        tcp_app,
        main_log,
        terminate_log,
        originate_log,
    }
}

/// One HTTP/1.1 request on the tunnel (keep-alive); status and body.
async fn get(t: &mut H2Tunnel, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: details.default.svc.cluster.local\r\n\r\n");
    t.write_all(req.as_bytes()).await.expect("write request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, t.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read head");
        assert_eq!(
            n,
            1,
            "EOF in the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let body = read_n(t, len, WAIT).await.expect("body");
    (status, String::from_utf8(body).expect("utf-8 body"))
}

// === HTTP ===

/// HTTP requests through the whole pipeline reach the app and answer;
/// the HBONE server saw `CONNECT POD_IP:TARGET_PORT` from the waypoint's
/// certificate; many requests on two client tunnels share one HBONE
/// connection to the destination; `main_internal`'s access log shows the
/// VIP as the local address and the client's address as the remote one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_the_waypoint() {
    let s = setup("http").await;
    let (c, tls) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
    assert_eq!(tls.version, Some(rustls::ProtocolVersion::TLSv1_3));
    let mut a = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(a.status, 200);
    for i in 0..3 {
        let (status, body) = get(&mut a.stream, &format!("/a/{i}")).await;
        assert_eq!(status, 200, "{body}");
        let v: weir_tests::upstream::EchoView = serde_json::from_str(&body).expect("echo view");
        assert_eq!(v.upstream, "details");
        assert_eq!(v.path, format!("/a/{i}"));
    }
    let mut b = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(b.status, 200);
    for i in 0..3 {
        let (status, body) = get(&mut b.stream, &format!("/b/{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("\"/b/{i}\"")), "{body}");
    }
    assert_eq!(s.app.requests().len(), 6);
    // The HBONE server: CONNECT to the pod's app address, on one TLS
    // connection that presented the waypoint's certificate.
    let seen = s.hbone.wait_seen(1, WAIT).await;
    let want = format!("{POD_IP}:{}", s.app.port());
    assert!(!seen.is_empty());
    for r in &seen {
        assert_eq!(r.method, "CONNECT");
        assert_eq!(r.authority, want);
        assert_eq!(r.path, None);
        assert_eq!(r.conn, 0);
    }
    assert_eq!(s.hbone.tls_connections(), 1);
    let hs = s.hbone.handshakes();
    assert_eq!(hs.len(), 1, "{hs:?}");
    let cert = hs[0].client_cert().expect("client certificate");
    assert_eq!(cert.uri_sans, vec![WAYPOINT_ID.to_owned()]);
    // The access logs: the client's address as connect_terminate saw it is
    // main_internal's remote address; the VIP is its local address.
    a.stream.shutdown().await.expect("END_STREAM");
    b.stream.shutdown().await.expect("END_STREAM");
    let term = s.p.log_lines(&s.terminate_log, 2).await;
    assert_eq!(term.len(), 2, "{term:?}");
    let client_addr = term[0].split(' ').next().expect("remote").to_owned();
    assert!(client_addr.starts_with("127.0.0.1:"), "{term:?}");
    assert_eq!(term[0], format!("{client_addr} {HTTP_VIP} 200"));
    let main = s.p.log_lines(&s.main_log, 6).await;
    assert_eq!(main.len(), 6, "{main:?}");
    for l in &main {
        assert_eq!(l, &format!("{HTTP_VIP} {client_addr} {HTTP_CHAIN} 200"));
    }
}

// === TCP ===

/// The TCP chain passes bytes both ways; the client's half-close reaches
/// the app, whose echo and close come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_the_waypoint_with_half_close() {
    let s = setup("tcp").await;
    let (c, _) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
    let mut t = c.connect(TCP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(t.status, 200);
    // Not HTTP at the first byte: http_inspector decides at once (text
    // without a line end keeps it waiting for more, on both targets).
    let first = b"\x00\x01\x02 binary through the waypoint";
    t.stream.write_all(first).await.expect("write");
    let got = read_n(&mut t.stream, first.len(), WAIT)
        .await
        .expect("echo");
    assert_eq!(got, first);
    t.stream.write_all(b"last words").await.expect("write");
    t.stream.shutdown().await.expect("END_STREAM");
    let rest = tokio::time::timeout(WAIT, t.stream.read_all(1024))
        .await
        .expect("end in time")
        .expect("clean end");
    assert_eq!(rest, b"last words");
    let results = s.tcp_app.wait_results(1, WAIT).await;
    assert_eq!(results, vec![Ok(first.len() as u64 + 10)]);
    let seen = s.hbone.wait_seen(1, WAIT).await;
    assert_eq!(seen[0].authority, format!("{POD_IP}:{}", s.tcp_app.port()));
    // connect_originate restored the pod's address and tunnelled to the
    // HBONE port.
    let lines = s.p.log_lines(&s.originate_log, 1).await;
    assert_eq!(
        lines,
        vec![format!(
            "{POD_IP}:{} {} - -",
            s.tcp_app.port(),
            s.hbone.addr()
        )]
    );
}

// === no such service ===

/// A VIP (or a port of a known VIP) no chain matches. `main_internal`
/// runs `http_inspector`, so the internal connection is taken (and the
/// CONNECT answered 200, on both targets) before the chain is looked up;
/// at the client's first bytes no chain matches and `main_internal` closes
/// the connection: Envoy resets the CONNECT stream (`CONNECT_ERROR`),
/// weir ends it (END_STREAM, no bytes: its in-process pipe has no reset;
/// a documented difference). Nothing reaches the HBONE server and the
/// client's HBONE connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vip_is_refused() {
    let s = setup("unknown").await;
    let (c, _) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
    for authority in ["127.0.0.99:9080", "127.0.0.10:7777"] {
        let mut t = c.connect(authority, &[]).await.expect("answer");
        assert_eq!(t.status, 200, "{authority}");
        t.stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let end = tokio::time::timeout(WAIT, t.stream.read_all(1024))
            .await
            .expect("end in time");
        if Target::from_env().is_envoy() {
            let e = end.expect_err("reset");
            assert!(e.to_string().contains("CONNECT_ERROR"), "{authority}: {e}");
        } else {
            assert_eq!(end.expect("end"), b"", "{authority}");
        }
    }
    assert!(s.hbone.seen().is_empty());
    assert_eq!(s.app.requests().len(), 0);
    let mut ok = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
    assert_eq!(ok.status, 200);
    let (status, _) = get(&mut ok.stream, "/after").await;
    assert_eq!(status, 200);
    assert_eq!(s.app.requests().len(), 1);
}

// === sharing ===

/// Two client HBONE connections, eight concurrent CONNECT tunnels, five
/// requests each: every request answers, and every tunnel the waypoint
/// opens to the destination rides one HBONE (TLS, HTTP/2) connection;
/// each is a `CONNECT POD_IP:TARGET_PORT` stream on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tunnels_share_one_hbone_connection() {
    let s = setup("share").await;
    let mut conns = Vec::new();
    for _ in 0..2 {
        let (c, _) = s.m.client().connect(s.p.addr()).await.expect("HBONE");
        conns.push(c);
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut t = conns[i % 2].connect(HTTP_VIP, &[]).await.expect("CONNECT");
        assert_eq!(t.status, 200);
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                let (status, body) = get(&mut t.stream, &format!("/t{i}/{j}")).await;
                assert_eq!(status, 200, "{body}");
                assert!(body.contains(&format!("\"/t{i}/{j}\"")), "{body}");
            }
            t.stream.shutdown().await.expect("END_STREAM");
        }));
    }
    for t in tasks {
        t.await.expect("tunnel task");
    }
    assert_eq!(s.app.requests().len(), 40);
    let seen = s.hbone.wait_seen(1, WAIT).await;
    let want = format!("{POD_IP}:{}", s.app.port());
    assert!(!seen.is_empty() && seen.len() <= 8, "{}", seen.len());
    for r in &seen {
        assert_eq!(
            (r.method.as_str(), r.authority.as_str(), r.conn),
            ("CONNECT", want.as_str(), 0)
        );
    }
    assert_eq!(s.hbone.tls_connections(), 1);
    let main = s.p.log_lines(&s.main_log, 40).await;
    assert_eq!(main.len(), 40);
    assert!(
        main.iter()
            .all(|l| l.starts_with(&format!("{HTTP_VIP} 127.0.0.1:"))),
        "{main:?}"
    );
}

// === over delta ADS ===

/// The same resources delivered over delta ADS as istiod does (LDS: the
/// three listeners; CDS: `main_internal`, `connect_originate` and the
/// `inbound-vip` cluster as EDS; EDS: its internal endpoint with the
/// pod's address in the host metadata), certificates as static secrets:
/// requests go through to the app on one HBONE connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_over_delta_ads() {
    use weir_tests::xds::{type_url as t, ControlPlane};
    let m = mesh();
    let app = weir_tests::upstream::http1("details").await.expect("app");
    let hbone = m.hbone_server().await;
    let cp = ControlPlane::start().await.expect("control plane");
    let port = weir_tests::free_port();
    let a = Apps {
        http_port: app.port(),
        tcp_port: 9,
        hbone_port: hbone.port(),
        main_log: log_path("waypoint", "ads-main"),
        terminate_log: log_path("waypoint", "ads-terminate"),
        originate_log: log_path("waypoint", "ads-originate"),
    };
    let listeners = [
        connect_terminate(port, &a.terminate_log),
        main_internal(&a),
        connect_originate_listener(&a.originate_log),
    ]
    .map(|l| l.to_string());
    let vip = json!({
        "name": HTTP_CHAIN, "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {
            "eds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "service_name": HTTP_CHAIN,
        },
        "transport_socket": internal_upstream(),
    })
    .to_string();
    let clusters = [
        internal_cluster(
            "main_internal",
            "main_internal",
            Value::Null,
            internal_upstream(),
        )
        .to_string(),
        vip,
        inbound_vip_cluster(TCP_CHAIN, 9).to_string(),
        connect_originate_cluster(hbone.port()).to_string(),
    ];
    let cla = json!({"cluster_name": HTTP_CHAIN, "endpoints": [{"lb_endpoints": [{
        "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "connect_originate"}}},
        "metadata": {"filter_metadata": {ORIGINAL_DST_NS: {"local": format!("{POD_IP}:{}", app.port())}}},
    }]}]})
    .to_string();
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    cp.set_yaml(t::CLUSTER, &refs(&clusters)).expect("cds");
    cp.set_yaml(t::ENDPOINT, &[&cla]).expect("eds");
    let v = cp.set_yaml(t::LISTENER, &refs(&listeners)).expect("lds");
    let (chain, key, root) = (
        m.chain.display().to_string(),
        m.key.display().to_string(),
        m.root.display().to_string(),
    );
    let _p = Proxy::start(|ports| {
        let mut b: Value = serde_yaml::from_str(&cp.ads_bootstrap(
            "{id: waypoint~127.0.0.1~waypoint.default~default.svc.cluster.local, cluster: waypoint}",
            true,
            ports.admin,
        ))
        .expect("bootstrap yaml");
        b["bootstrap_extensions"] = json!([{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        }}]);
        b["static_resources"]["secrets"] = json!([
            {"name": "default", "tls_certificate": {
                "certificate_chain": {"filename": chain},
                "private_key": {"filename": key},
            }},
            {"name": "ROOTCA", "validation_context": {"trusted_ca": {"filename": root}}},
        ]);
        b.to_string()
    });
    for ty in [t::CLUSTER, t::ENDPOINT, t::LISTENER] {
        cp.wait_for_ack(ty, &v, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{ty}: {e:#}"));
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // The listener may take a moment to bind after the ACK.
    let deadline = tokio::time::Instant::now() + WAIT;
    let c = loop {
        match m.client().connect(addr).await {
            Ok((c, _)) => break c,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("HBONE: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    for i in 0..2 {
        let mut t = c.connect(HTTP_VIP, &[]).await.expect("CONNECT");
        assert_eq!(t.status, 200);
        for j in 0..3 {
            let (status, body) = get(&mut t.stream, &format!("/ads/{i}/{j}")).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"upstream\":\"details\""), "{body}");
        }
    }
    assert_eq!(app.requests().len(), 6);
    let seen = hbone.wait_seen(1, WAIT).await;
    assert_eq!(seen[0].authority, format!("{POD_IP}:{}", app.port()));
    assert_eq!(hbone.tls_connections(), 1);
}
