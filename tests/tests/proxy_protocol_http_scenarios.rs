//! The upstream PROXY protocol transport socket
//! (`envoy.transport_sockets.upstream_proxy_protocol`) behind HTTP routes:
//! each upstream connection starts with a header describing the downstream
//! connection it was made for, so the router's pools are keyed by the
//! downstream (source, destination) addresses (Envoy's `hashKey` of the
//! socket), HTTP/2 upstream connections included. With the listener's
//! `proxy_protocol` filter the addresses (and the TLVs both sides'
//! `pass_through_tlvs` let through, after the socket's `added_tlvs`) come
//! from the downstream header; `tcp_proxy` sends the same. Health checks
//! of such a cluster send a v1 header with the check connection's own
//! addresses, or a v2 `LOCAL` header.
//!
//! The upstream here parses the header (v1 or v2) of every connection and
//! records it with the HTTP requests that connection carried.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy`, which is how the
//! expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test proxy_protocol_http_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test proxy_protocol_http_scenarios
//! ```
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use filters::listener::proxy_protocol::{self as pp, ProxyHeader};
use filters::listener::Inspect;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_tests::config::{
    bootstrap, chain, cluster, h2_upstream, hcm, listener, merge, route, tcp_proxy, vhost,
};
use weir_tests::scenario::{Proxy, StartOptions, Target};

const PP_SOCKET: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport";
const RAW_BUFFER: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
const PP_LISTENER: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";
const WAIT: Duration = Duration::from_secs(5);

// === the recording upstream ===

/// One upstream connection as the upstream saw it.
#[derive(Debug, Clone)]
struct UpConn {
    /// The connection's own peer (the proxy's side).
    peer: SocketAddr,
    header: ProxyHeader,
    /// Paths of the requests it carried, in order.
    paths: Vec<String>,
}

/// An HTTP upstream (HTTP/1.1, or HTTP/2 with prior knowledge) whose
/// connections must start with a PROXY protocol header.
struct PpUpstream {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<UpConn>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PpUpstream {
    async fn start(h2: bool) -> PpUpstream {
        PpUpstream::start_with(h2, None).await
    }

    /// With `tls`: a TLS handshake follows the PROXY header.
    async fn start_with(h2: bool, tls: Option<Arc<rustls::ServerConfig>>) -> PpUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<UpConn>>> = Arc::default();
        let kept = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, peer)) = l.accept().await else {
                    continue;
                };
                let conns = conns.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some(header) = read_header(&mut s).await else {
                        return;
                    };
                    let idx = {
                        let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                        c.push(UpConn {
                            peer,
                            header,
                            paths: Vec::new(),
                        });
                        c.len() - 1
                    };
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let conns = conns.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            conns.lock().unwrap_or_else(|e| e.into_inner())[idx]
                                .paths
                                .push(path.clone());
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                format!("conn={idx} path={path}"),
                            ))))
                        }
                    });
                    match tls {
                        None => serve(s, h2, svc).await,
                        Some(cfg) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                            if let Ok(t) = acceptor.accept(s).await {
                                serve(t, h2, svc).await;
                            }
                        }
                    }
                });
            }
        });
        PpUpstream {
            addr,
            conns: kept,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn conns(&self) -> Vec<UpConn> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the connections have carried `n` requests in all.
    async fn wait_requests(&self, n: usize) -> Vec<UpConn> {
        for _ in 0..250 {
            let c = self.conns();
            if c.iter().map(|c| c.paths.len()).sum::<usize>() >= n {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.conns()
    }

    /// The connections whose requests include `path`.
    fn carrying(&self, path: &str) -> Vec<UpConn> {
        self.conns()
            .into_iter()
            .filter(|c| c.paths.iter().any(|p| p == path))
            .collect()
    }
}

/// Serves HTTP/1.1 or HTTP/2 on `io` until the connection ends.
async fn serve<I, S>(io: I, h2: bool, svc: S)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<Full<Bytes>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
    };
}

/// Reads exactly one PROXY protocol header (v1 line or v2 block), so the
/// HTTP bytes after it stay in the socket.
async fn read_header(s: &mut TcpStream) -> Option<ProxyHeader> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    // Enough to tell v1 from v2 and to read v2's length.
    while buf.len() < pp::V2_HEADER_LEN {
        s.read_exact(&mut b).await.ok()?;
        buf.push(b[0]);
        if buf.ends_with(b"\r\n") && buf.starts_with(b"PROXY") {
            break;
        }
    }
    if buf.starts_with(b"PROXY") {
        while !buf.ends_with(b"\r\n") && buf.len() < pp::V1_MAX_LEN {
            s.read_exact(&mut b).await.ok()?;
            buf.push(b[0]);
        }
    } else {
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        let mut rest = vec![0u8; len];
        s.read_exact(&mut rest).await.ok()?;
        buf.extend_from_slice(&rest);
    }
    match pp::parse(&buf) {
        Inspect::Done(Ok(h)) if h.len == buf.len() => Some(h),
        other => panic!("upstream: not a PROXY protocol header {buf:?}: {other:?}"),
    }
}

// === downstream clients with their own connections ===

/// An HTTP/1.1 client on one downstream connection.
struct H1Conn {
    local: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl H1Conn {
    async fn open(addr: SocketAddr, prefix: &[u8]) -> H1Conn {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let local = s.local_addr().expect("local");
        if !prefix.is_empty() {
            s.write_all(prefix).await.expect("prefix");
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        H1Conn { local, sender }
    }

    /// GET `path`: the status and body.
    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = hyper::Request::get(path)
            .header("host", "example.com")
            .body(Empty::new())
            .expect("request");
        // The previous exchange may still be finishing on the connection.
        tokio::time::timeout(WAIT, self.sender.ready())
            .await
            .expect("ready in time")
            .expect("connection open");
        let resp = tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// An HTTP/2 (prior knowledge) client on one downstream connection.
struct H2Conn {
    local: SocketAddr,
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
}

impl H2Conn {
    async fn open(addr: SocketAddr) -> H2Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        let local = s.local_addr().expect("local");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(s),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        H2Conn { local, sender }
    }

    async fn get(&self, addr: SocketAddr, path: &str) -> (u16, String) {
        let req = hyper::Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .expect("request");
        let mut sender = self.sender.clone();
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

// === config ===

/// The upstream PROXY protocol transport socket with `config` around
/// raw_buffer, plus `extra` fields of the socket.
fn pp_socket(config: Value, extra: Value) -> Value {
    json!({"transport_socket": {
        "name": "envoy.transport_sockets.upstream_proxy_protocol",
        "typed_config": merge(json!({
            "@type": PP_SOCKET,
            "config": config,
            "transport_socket": {
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": {"@type": RAW_BUFFER},
            },
        }), extra),
    }})
}

/// A `proxy_protocol` listener filter with `config`.
fn pp_listener_filter(config: Value) -> Value {
    json!({
        "name": "envoy.filters.listener.proxy_protocol",
        "typed_config": merge(json!({"@type": PP_LISTENER}), config),
    })
}

/// One worker (as the Envoy target): every downstream connection shares
/// one set of pools, so only the pool key keeps them apart.
fn one_worker() -> StartOptions {
    StartOptions {
        concurrency: Some(1),
        ..Default::default()
    }
}

/// An HCM routing everything to cluster `up`.
fn http_to_up() -> Value {
    hcm(
        "pp",
        vec![],
        vec![vhost("vh", vec![route("/", "up", json!({}))], json!({}))],
        json!({}),
    )
}

/// Starts a proxy with listener `l` (`listener_extra` merged in) routing
/// HTTP to `up_cluster`.
fn start_http(listener_extra: Value, up_cluster: Value) -> Proxy {
    Proxy::start_with(Target::from_env(), one_worker(), move |ports| {
        let l = merge(
            listener("l", ports.listen, vec![chain(vec![http_to_up()])]),
            listener_extra.clone(),
        );
        bootstrap(ports, vec![l], vec![up_cluster.clone()])
    })
}

fn version_name(v: u8) -> &'static str {
    if v == 1 {
        "V1"
    } else {
        "V2"
    }
}

// === tests ===

/// Two downstream connections get two upstream connections, each with a
/// header naming its own downstream (source: the client, destination: the
/// listener); requests on one keep-alive downstream connection reuse its
/// upstream connection. v1 and v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upstream_connections_are_kept_per_downstream_connection() {
    for v in [1u8, 2] {
        let up = PpUpstream::start(false).await;
        let c = cluster(
            "up",
            &[up.port()],
            pp_socket(json!({"version": version_name(v)}), json!({})),
        );
        let p = start_http(json!({}), c);
        let mut a = H1Conn::open(p.addr(), b"").await;
        let mut b = H1Conn::open(p.addr(), b"").await;
        assert_eq!(a.get("/a1").await.0, 200, "v{v}");
        assert_eq!(b.get("/b1").await.0, 200, "v{v}");
        assert_eq!(a.get("/a2").await.0, 200, "v{v}");
        assert_eq!(b.get("/b2").await.0, 200, "v{v}");
        let conns = up.wait_requests(4).await;
        assert_eq!(
            conns.len(),
            2,
            "v{v}: one upstream connection per client: {conns:?}"
        );
        for (client, paths) in [(&a, ["/a1", "/a2"]), (&b, ["/b1", "/b2"])] {
            let on = up.carrying(paths[0]);
            assert_eq!(on.len(), 1, "v{v}");
            let conn = &on[0];
            assert_eq!(conn.paths, paths, "v{v}: keep-alive reuse");
            assert_eq!(conn.header.version, v);
            assert_eq!(
                conn.header.addresses,
                Some((client.local, p.addr())),
                "v{v}: the downstream connection's addresses"
            );
            assert!(conn.header.tlvs.is_empty(), "v{v}");
        }
    }
}

/// An HTTP/2 cluster multiplexes the streams of one downstream connection
/// over one upstream connection, and never shares it with another
/// downstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream_connections_multiplex_one_downstream_only() {
    let up = PpUpstream::start(true).await;
    let c = cluster(
        "up",
        &[up.port()],
        merge(
            h2_upstream(json!({})),
            pp_socket(json!({"version": "V2"}), json!({})),
        ),
    );
    let p = start_http(json!({}), c);
    let a = H2Conn::open(p.addr()).await;
    let b = H2Conn::open(p.addr()).await;
    let addr = p.addr();
    // Concurrent first streams: the second waits for the connection the
    // first is making.
    let (r1, r2, r3) = tokio::join!(a.get(addr, "/a1"), a.get(addr, "/a2"), b.get(addr, "/b1"));
    for r in [&r1, &r2, &r3] {
        assert_eq!(r.0, 200, "{}", r.1);
    }
    assert_eq!(a.get(addr, "/a3").await.0, 200);
    let conns = up.wait_requests(4).await;
    assert_eq!(conns.len(), 2, "{conns:?}");
    let on_a = up.carrying("/a1");
    assert_eq!(on_a.len(), 1);
    let mut paths = on_a[0].paths.clone();
    paths.sort();
    assert_eq!(
        paths,
        ["/a1", "/a2", "/a3"],
        "one connection for a's streams"
    );
    assert_eq!(on_a[0].header.addresses, Some((a.local, addr)));
    let on_b = up.carrying("/b1");
    assert_eq!(on_b[0].paths, ["/b1"]);
    assert_eq!(on_b[0].header.addresses, Some((b.local, addr)));
}

/// (listener `pass_through_tlvs`, socket `pass_through_tlvs`, socket
/// `added_tlvs`) and the TLVs the upstream header then carries.
type TlvCase = (Value, Value, Value, Vec<(u8, &'static [u8])>);

/// The downstream's own PROXY header (listener `proxy_protocol` filter)
/// gives the addresses the upstream header carries; its TLVs go upstream
/// as far as the listener's and the socket's `pass_through_tlvs` both let
/// them, after the socket's `added_tlvs` (whose types replace passed ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_header_addresses_and_tlvs_reach_the_upstream_header() {
    let src: SocketAddr = "192.0.2.10:5555".parse().expect("addr");
    let dst: SocketAddr = "198.51.100.1:443".parse().expect("addr");
    let down = pp::encode_v2(
        src,
        dst,
        &[
            (0xE1, b"one".to_vec()),
            (0xE2, b"two".to_vec()),
            (0xE3, b"three".to_vec()),
            (0xE4, b"four".to_vec()),
        ],
    )
    .expect("header");
    let cases: Vec<TlvCase> = vec![
        // The listener keeps none unless told.
        (Value::Null, json!({}), json!([]), vec![]),
        (
            json!({"match_type": "INCLUDE_ALL"}),
            json!({"match_type": "INCLUDE_ALL"}),
            json!([]),
            vec![
                (0xE1, b"one"),
                (0xE2, b"two"),
                (0xE3, b"three"),
                (0xE4, b"four"),
            ],
        ),
        (
            json!({"match_type": "INCLUDE", "tlv_type": [0xE1, 0xE2, 0xE3]}),
            json!({"match_type": "INCLUDE", "tlv_type": [0xE2, 0xE3, 0xE4]}),
            json!([{"type": 0xF0, "value": "YWRkZWQ="}, {"type": 0xE3, "value": "bWluZQ=="}]),
            vec![(0xF0, b"added"), (0xE3, b"mine"), (0xE2, b"two")],
        ),
    ];
    for (i, (listener_pass, socket_pass, added, want)) in cases.into_iter().enumerate() {
        let up = PpUpstream::start(false).await;
        let mut cfg = json!({"version": "V2", "added_tlvs": added});
        if !socket_pass.as_object().is_some_and(|o| o.is_empty()) {
            cfg["pass_through_tlvs"] = socket_pass;
        }
        let c = cluster("up", &[up.port()], pp_socket(cfg, json!({})));
        let lf = if listener_pass.is_null() {
            json!({})
        } else {
            json!({"pass_through_tlvs": listener_pass})
        };
        let p = start_http(json!({"listener_filters": [pp_listener_filter(lf)]}), c);
        let mut a = H1Conn::open(p.addr(), &down).await;
        assert_eq!(a.get("/x").await.0, 200, "case {i}");
        let conns = up.wait_requests(1).await;
        assert_eq!(conns.len(), 1, "case {i}");
        let h = &conns[0].header;
        assert_eq!(h.addresses, Some((src, dst)), "case {i}");
        let got: Vec<(u8, &[u8])> = h.tlvs.iter().map(|(t, v)| (*t, &v[..])).collect();
        assert_eq!(got, want, "case {i}");
    }
}

/// `tcp_proxy` sends the same header: the downstream header's addresses
/// and the TLVs passed through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_passes_tlvs_through() {
    let src: SocketAddr = "192.0.2.20:6000".parse().expect("addr");
    let dst: SocketAddr = "198.51.100.2:8443".parse().expect("addr");
    let down = pp::encode_v2(
        src,
        dst,
        &[(0xE1, b"one".to_vec()), (0xE2, b"two".to_vec())],
    )
    .expect("header");
    let up = PpUpstream::start(false).await;
    let c = cluster(
        "up",
        &[up.port()],
        pp_socket(
            json!({"version": "V2", "pass_through_tlvs": {"match_type": "INCLUDE", "tlv_type": [0xE2]},
                   "added_tlvs": [{"type": 0xF1, "value": "dA=="}]}),
            json!({}),
        ),
    );
    let p = Proxy::start_with(Target::from_env(), one_worker(), move |ports| {
        let l = merge(
            listener(
                "l",
                ports.listen,
                vec![chain(vec![tcp_proxy("tcp", "up", json!({}))])],
            ),
            json!({"listener_filters": [pp_listener_filter(
                json!({"pass_through_tlvs": {"match_type": "INCLUDE_ALL"}}))]}),
        );
        bootstrap(ports, vec![l], vec![c.clone()])
    });
    // HTTP through the TCP proxy: the upstream serves it after the header.
    let mut a = H1Conn::open(p.addr(), &down).await;
    assert_eq!(a.get("/t").await.0, 200);
    let conns = up.wait_requests(1).await;
    assert_eq!(conns.len(), 1);
    let h = &conns[0].header;
    assert_eq!(h.addresses, Some((src, dst)));
    assert_eq!(h.tlvs, vec![(0xF1, b"t".to_vec()), (0xE2, b"two".to_vec())]);
}

/// `allow_unspecified_address` and `tlv_as_pool_key` are hidden fields
/// Envoy 1.40 does not implement: accepted, nothing changes (the pool key
/// stays the addresses: one downstream connection, one upstream
/// connection, whatever the TLVs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_socket_fields_are_accepted_without_effect() {
    let up = PpUpstream::start(false).await;
    let c = cluster(
        "up",
        &[up.port()],
        pp_socket(
            json!({"version": "V2"}),
            json!({"allow_unspecified_address": true, "tlv_as_pool_key": true}),
        ),
    );
    let p = start_http(json!({}), c);
    let mut a = H1Conn::open(p.addr(), b"").await;
    assert_eq!(a.get("/h1").await.0, 200);
    assert_eq!(a.get("/h2").await.0, 200);
    let conns = up.wait_requests(2).await;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].header.addresses, Some((a.local, p.addr())));
}

/// Active health checks of a PROXY protocol cluster are made for no
/// downstream: a v1 header carries the check connection's own addresses,
/// v2 sends `LOCAL` (no addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_the_header_of_their_own_connection() {
    for v in [1u8, 2] {
        let up = PpUpstream::start(false).await;
        let c = merge(
            cluster(
                "up",
                &[up.port()],
                pp_socket(json!({"version": version_name(v)}), json!({})),
            ),
            json!({"health_checks": [{
                "timeout": "1s", "interval": "10s",
                "unhealthy_threshold": 1, "healthy_threshold": 1,
                "http_health_check": {"path": "/healthz"},
            }]}),
        );
        let _p = start_http(json!({}), c);
        let conns = up.wait_requests(1).await;
        let hc = conns
            .iter()
            .find(|c| c.paths.iter().any(|p| p == "/healthz"))
            .unwrap_or_else(|| panic!("v{v}: no health check in {conns:?}"));
        assert_eq!(hc.header.version, v);
        let want = (v == 1).then_some((hc.peer, up.addr));
        assert_eq!(hc.header.addresses, want, "v{v}");
        assert!(hc.header.tlvs.is_empty());
    }
}

/// TLVs of one type: repeated downstream TLVs pass through in order, and
/// repeated `added_tlvs` types are all sent (Envoy 1.40 keeps duplicates,
/// its `proxy_protocol_allow_duplicate_tlvs` default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_tlv_types_are_kept() {
    let src: SocketAddr = "192.0.2.30:7000".parse().expect("addr");
    let dst: SocketAddr = "198.51.100.3:80".parse().expect("addr");
    let down = pp::encode_v2(
        src,
        dst,
        &[
            (0xE1, b"a".to_vec()),
            (0xE2, b"z".to_vec()),
            (0xE1, b"b".to_vec()),
        ],
    )
    .expect("header");
    let up = PpUpstream::start(false).await;
    let c = cluster(
        "up",
        &[up.port()],
        pp_socket(
            json!({"version": "V2", "pass_through_tlvs": {"match_type": "INCLUDE_ALL"},
                   "added_tlvs": [{"type": 0xF0, "value": "eA=="}, {"type": 0xF0, "value": "eQ=="}]}),
            json!({}),
        ),
    );
    let lf = json!({"pass_through_tlvs": {"match_type": "INCLUDE_ALL"}});
    let p = start_http(json!({"listener_filters": [pp_listener_filter(lf)]}), c);
    let mut a = H1Conn::open(p.addr(), &down).await;
    assert_eq!(a.get("/d").await.0, 200);
    let conns = up.wait_requests(1).await;
    assert_eq!(conns.len(), 1);
    let got: Vec<(u8, &[u8])> = conns[0]
        .header
        .tlvs
        .iter()
        .map(|(t, v)| (*t, &v[..]))
        .collect();
    let want: Vec<(u8, &[u8])> = vec![
        (0xF0, b"x"),
        (0xF0, b"y"),
        (0xE1, b"a"),
        (0xE2, b"z"),
        (0xE1, b"b"),
    ];
    assert_eq!(got, want);
}

/// The socket's inner transport is TLS: the PROXY header goes first, in
/// clear, then the TLS handshake and the requests over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_precedes_the_inner_tls_handshake() {
    use weir_tests::tls::{LeafSpec, TestCa};
    let ca = TestCa::new("pp root");
    let leaf = ca.issue(LeafSpec::server("up.test"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain_der.clone(), leaf.private_key())
        .expect("server config");
    let up = PpUpstream::start_with(false, Some(Arc::new(cfg))).await;
    let tls = json!({"transport_socket": {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "up.test",
            "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": ca.pem()}}},
        },
    }});
    let c = cluster("up", &[up.port()], pp_socket(json!({"version": "V1"}), tls));
    let p = start_http(json!({}), c);
    let mut a = H1Conn::open(p.addr(), b"").await;
    let (status, body) = a.get("/tls").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.get("/tls2").await.0, 200);
    let conns = up.wait_requests(2).await;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].header.addresses, Some((a.local, p.addr())));
    assert_eq!(conns[0].paths, ["/tls", "/tls2"]);
}

/// The PROXY protocol socket chosen by `transport_socket_matches` (the
/// endpoint's `envoy.transport_socket_match` metadata) works the same: the
/// endpoint that matches gets headers and pools per downstream; the other
/// endpoint keeps the cluster's plain transport and gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matched_transport_socket_entry_sends_the_header() {
    let up = PpUpstream::start(false).await;
    let plain = weir_tests::upstream::http1("plain").await.expect("plain");
    let pp_entry = pp_socket(json!({"version": "V2"}), json!({}));
    let endpoints = json!([
        {"endpoint": {"address": weir_tests::config::sock(up.port())},
         "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"pp": "yes"}}}},
        {"endpoint": {"address": weir_tests::config::sock(plain.port())}},
    ]);
    let c = json!({
        "name": "up", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": endpoints}]},
        "transport_socket_matches": [{
            "name": "pp", "match": {"pp": "yes"},
            "transport_socket": pp_entry["transport_socket"].clone(),
        }],
    });
    let p = start_http(json!({}), c);
    let mut a = H1Conn::open(p.addr(), b"").await;
    let mut b = H1Conn::open(p.addr(), b"").await;
    // Round robin alternates the endpoints; in this order each client's
    // requests take alternate turns, so each reaches both endpoints twice.
    for (i, who) in ["a", "b", "b", "a", "a", "b", "b", "a"]
        .into_iter()
        .enumerate()
    {
        let c = if who == "a" { &mut a } else { &mut b };
        assert_eq!(c.get(&format!("/{who}{i}")).await.0, 200);
    }
    let conns = up.wait_requests(4).await;
    assert_eq!(plain.wait_requests(4).await.len(), 4);
    assert_eq!(conns.len(), 2, "one PROXY connection per client: {conns:?}");
    for (client, prefix) in [(&a, "/a"), (&b, "/b")] {
        let mine: Vec<&UpConn> = conns
            .iter()
            .filter(|c| c.paths.iter().any(|p| p.starts_with(prefix)))
            .collect();
        assert_eq!(mine.len(), 1, "{prefix}: {conns:?}");
        assert_eq!(mine[0].header.addresses, Some((client.local, p.addr())));
        assert!(
            mine[0].paths.iter().all(|p| p.starts_with(prefix)),
            "{conns:?}"
        );
    }
}
