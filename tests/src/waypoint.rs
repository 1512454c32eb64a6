//! The ambient waypoint's bootstrap, shaped after istiod's waypoint
//! (`../shared/fixtures/istio/waypoint/*.json`), for the scenario tests
//! (`tests/tests/waypoint_scenarios.rs`) and the HBONE benchmark
//! (`benches/src/bin/hbone_bench.rs`):
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
//!  -> HBONE server (the destination's ztunnel, forward mode) on POD_IP
//!  -> the app (HTTP / TCP) on POD_IP:TARGET_PORT.
//! ```
//!
//! POD_IP is 127.0.0.1 (the HBONE server listens there); the VIPs are
//! other loopback addresses, never connected to: they only travel as the
//! CONNECT authority and the restored local address. istio/proxy's own
//! filters (`peer_metadata`, `istio.stats`) are not in the chains: Envoy
//! 1.40 (the oracle) does not have them.
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::config::{
    chain, file_log, filter, merge, sock, tcp_proxy, DOWNSTREAM_TLS, HCM, HTTP_PROTOCOL_OPTIONS,
    ROUTER, UPSTREAM_TLS,
};
use crate::hbone::HboneClient;
use crate::hbone_server::{Behavior, HboneOptions, HboneProto, HboneServer};
use crate::scenario::{Ports, Proxy, StartOptions, Target};
use crate::tls::{Leaf, LeafSpec, TempDir, TestCa, TlsServerOptions, TlsVersions};

const SET_FILTER_STATE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config";
/// The host metadata namespace `internal_upstream` passes (istiod's).
pub const ORIGINAL_DST_NS: &str = "envoy.filters.listener.original_dst";
pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/app/sa/client";
pub const ZTUNNEL_ID: &str = "spiffe://cluster.local/ns/default/sa/ztunnel";

/// The HTTP service's VIP and port, the TCP service's.
pub const HTTP_VIP: &str = "127.0.0.10:9080";
pub const TCP_VIP: &str = "127.0.0.11:9090";
pub const HTTP_CHAIN: &str = "inbound-vip|9080|http|details.default.svc.cluster.local";
pub const TCP_CHAIN: &str = "inbound-vip|9090|tcp|echo.default.svc.cluster.local";
/// The pods' address (where the HBONE server and the apps listen).
pub const POD_IP: &str = "127.0.0.1";

/// main_internal's HTTP chain access log: the connection as the
/// inbound chain sees it.
const MAIN_LOG: &str =
    "%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %UPSTREAM_CLUSTER% %RESPONSE_CODE%\n";
/// connect_originate's access log: the restored destination, the HBONE
/// host, the outcome.
const ORIGINATE_LOG: &str = "%DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% %RESPONSE_FLAGS% %UPSTREAM_TRANSPORT_FAILURE_REASON%\n";
/// connect_terminate's access log: the client's address.
const TERMINATE_LOG: &str = "%DOWNSTREAM_REMOTE_ADDRESS% %REQ(:AUTHORITY)% %RESPONSE_CODE%\n";

/// The mesh: one root; the waypoint's certificate (server on
/// connect_terminate, client on connect_originate), a client workload's,
/// the destination ztunnel's. The waypoint's files live in a temporary
/// directory removed on drop.
pub struct Mesh {
    pub ca: TestCa,
    pub client: Leaf,
    pub ztunnel: Leaf,
    _dir: TempDir,
    /// The waypoint's certificate chain, key, and the root (PEM files).
    pub chain: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

impl Mesh {
    pub fn new() -> Mesh {
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

    /// The client workload's HBONE client, expecting the waypoint's
    /// identity.
    pub fn client(&self) -> HboneClient {
        HboneClient::expect_server(&self.ca, &self.client, WAYPOINT_ID)
    }

    /// The destination's HBONE server (ztunnel's inbound): TLS 1.3 only,
    /// ALPN h2, client certificate required; forwards to the authority.
    pub async fn hbone_server(&self) -> HboneServer {
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

    /// The static secrets `default` (the waypoint's certificate) and
    /// `ROOTCA`, as istiod's SDS would deliver them.
    pub fn secrets(&self) -> Value {
        json!([
            {"name": "default", "tls_certificate": {
                "certificate_chain": {"filename": self.chain.display().to_string()},
                "private_key": {"filename": self.key.display().to_string()},
            }},
            {"name": "ROOTCA", "validation_context": {"trusted_ca": {
                "filename": self.root.display().to_string(),
            }}},
        ])
    }
}

impl Default for Mesh {
    fn default() -> Mesh {
        Mesh::new()
    }
}

/// What the pipeline connects to, and where its access logs go (`None`:
/// no access log on that listener).
#[derive(Debug, Clone)]
pub struct Apps {
    pub http_port: u16,
    pub tcp_port: u16,
    pub hbone_port: u16,
    pub main_log: Option<PathBuf>,
    pub terminate_log: Option<PathBuf>,
    pub originate_log: Option<PathBuf>,
}

fn access_log(path: &Option<PathBuf>, format: &str) -> Value {
    match path {
        Some(p) => json!([file_log(p, format)]),
        None => json!([]),
    }
}

pub fn original_dst() -> Value {
    json!({"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    }})
}

pub fn http_inspector() -> Value {
    json!({"name": "envoy.filters.listener.http_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    }})
}

/// The `internal_upstream` transport passing host metadata namespace
/// `envoy.filters.listener.original_dst` (istiod's).
pub fn internal_upstream() -> Value {
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
pub fn main_internal(a: &Apps) -> Value {
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
            "access_log": access_log(&a.main_log, MAIN_LOG),
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
pub fn connect_originate_listener(log: &Option<PathBuf>) -> Value {
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
                "access_log": access_log(log, ORIGINATE_LOG),
            }),
        )])],
    })
}

/// istiod's `connect_terminate` HTTP connection manager (the
/// `typed_config`), routing every CONNECT to `cluster`, as in
/// `hbone_terminate_scenarios` without istio/proxy's peer metadata filter.
pub fn connect_terminate_hcm(cluster: &str, log: &Option<PathBuf>) -> Value {
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
    json!({
        "@type": HCM,
        "stat_prefix": "connect_terminate",
        "route_config": {"name": "default", "virtual_hosts": [{
            "name": "default", "domains": ["*"],
            "routes": [{"match": {"connect_matcher": {}}, "route": {
                "cluster": cluster,
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
        "access_log": access_log(log, TERMINATE_LOG),
    })
}

/// istiod's `connect_terminate` listener (named `l` for the harness) on
/// `port`, CONNECTs to `main_internal`.
pub fn connect_terminate(port: u16, log: &Option<PathBuf>) -> Value {
    connect_terminate_to(port, "main_internal", log)
}

/// [`connect_terminate`] routing every CONNECT to `cluster`.
pub fn connect_terminate_to(port: u16, cluster: &str, log: &Option<PathBuf>) -> Value {
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
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": connect_terminate_hcm(cluster, log),
            }],
            "transport_socket": tls,
        }],
    })
}

/// A STATIC cluster with one internal endpoint at `listener`, host
/// metadata `metadata` (null: none) and `transport`.
pub fn internal_cluster(name: &str, listener: &str, metadata: Value, transport: Value) -> Value {
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
pub fn inbound_vip_cluster(name: &str, port: u16) -> Value {
    internal_cluster(
        name,
        "connect_originate",
        json!({ORIGINAL_DST_NS: {"local": format!("{POD_IP}:{port}")}}),
        internal_upstream(),
    )
}

/// istiod's `connect_originate` cluster (ORIGINAL_DST to the pods' HBONE
/// port), with the waypoint's certificate from the SDS secret `default`.
pub fn connect_originate_cluster(hbone_port: u16) -> Value {
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

/// The `envoy.bootstrap.internal_listener` bootstrap extension.
pub fn internal_listener_extension() -> Value {
    json!([{"name": "envoy.bootstrap.internal_listener", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
    }}])
}

/// The whole waypoint's static bootstrap: `connect_terminate` on
/// `ports.listen`, admin on `ports.admin`.
pub fn bootstrap(m: &Mesh, a: &Apps, ports: &Ports) -> Value {
    json!({
        "admin": {"address": sock(ports.admin)},
        "bootstrap_extensions": internal_listener_extension(),
        "static_resources": {
            "listeners": [
                connect_terminate(ports.listen, &a.terminate_log),
                main_internal(a),
                connect_originate_listener(&a.originate_log),
            ],
            "clusters": [
                internal_cluster("main_internal", "main_internal", Value::Null, internal_upstream()),
                inbound_vip_cluster(HTTP_CHAIN, a.http_port),
                inbound_vip_cluster(TCP_CHAIN, a.tcp_port),
                connect_originate_cluster(a.hbone_port),
            ],
            "secrets": m.secrets(),
        },
    })
}

/// The whole waypoint on the target of `WEIR_SCENARIO_TARGET`; one worker
/// (pools are per worker, and so are the connection counts the tests
/// check).
pub fn start(m: &Mesh, a: &Apps) -> Proxy {
    let opts = StartOptions {
        concurrency: Some(1),
        ..Default::default()
    };
    Proxy::start_with(Target::from_env(), opts, |ports| {
        bootstrap(m, a, ports).to_string()
    })
}
