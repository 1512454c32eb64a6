//! Connection-level behaviours Envoy documents that weir once did not
//! honour: HTTP/2 `max_requests_per_connection` (GOAWAY), websocket over
//! HTTP/2 (RFC 8441 extended CONNECT) in both directions, and
//! `%UPSTREAM_LOCAL_ADDRESS%` (HTTP and tcp_proxy). Real sockets, real
//! HTTP/2 clients and servers (the `h2` crate); every test runs against
//! weir in-process and, with `WEIR_SCENARIO_TARGET=envoy`, against Envoy.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_tests::config::{yaml_bootstrap, yaml_cluster, yaml_file_log, HttpYaml, TCP_PROXY};
use weir_tests::scenario::{Ports, Proxy, Target};
use weir_tests::upstream;

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

const H2_CLUSTER: &str = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {allow_connect: true}}\n";

/// Reads an HTTP/1.1 response head byte by byte (nothing past it), lower-cased.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("head in time")
            .expect("read head");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// A bootstrap with HTTP listener `l`: `hcm` extra HCM fields (indent
/// 10), `routes` route list items (indent 14), `clusters` list items
/// (indent 2).
fn bootstrap(p: &Ports, hcm: &str, routes: &str, clusters: &str) -> String {
    HttpYaml {
        hcm,
        routes,
        clusters,
        ..HttpYaml::default()
    }
    .render(p)
}

/// `name.log` in a directory of its own, removed with the guard.
fn log_path(name: &str) -> weir_tests::tmp::TempFile {
    weir_tests::config::log_path("conn-gaps", name)
}

/// An HTTP/2 prior-knowledge connection to `addr` (the `h2` crate client);
/// the returned task ends when the connection does.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(s).await.expect("h2 handshake");
    (send, tokio::spawn(conn))
}

/// Sends a bodyless request on `send`; the response status and body, or
/// the stream's error.
async fn h2_get(
    send: &h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Bytes), h2::Error> {
    let mut send = send.clone().ready().await?;
    let mut b = http::Request::builder().uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (resp, _) = send.send_request(b.body(()).expect("request"), true)?;
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("response in time")?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(c) = body.data().await {
        let c = c?;
        let _ = body.flow_control().release_capacity(c.len());
        out.extend_from_slice(&c);
    }
    Ok((status, out.into()))
}

// ---------------------------------------------------------------- HTTP/2 max_requests_per_connection

/// Envoy's `newStream`: the stream that reaches the limit starts the drain
/// (GOAWAY); it and the streams already open complete, no new stream is
/// accepted on the connection, and the connection closes. A new
/// connection serves the next requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_requests_per_connection_sends_goaway() {
    let up = upstream::http1("a").await.expect("upstream");
    let hcm = "          common_http_protocol_options: {max_requests_per_connection: 2}\n          drain_timeout: 0.2s\n";
    let routes = "              - match: {prefix: /}\n                route: {cluster: a}\n";
    let clusters = yaml_cluster("a", &[up.port()], "");
    let p = Proxy::start(|ports| bootstrap(ports, hcm, routes, &clusters));
    let addr = p.addr();
    let (send, conn) = h2_connect(addr).await;
    // Stream 1 is slow: still open when stream 2 reaches the limit.
    let slow = {
        let send = send.clone();
        tokio::spawn(
            async move { h2_get(&send, addr, "/slow", &[("x-echo-delay-ms", "600")]).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (st, _) = h2_get(&send, addr, "/second", &[]).await.expect("stream 2");
    assert_eq!(st, 200, "the stream that reaches the limit is served");
    let (st, body) = slow.await.expect("join").expect("stream 1");
    assert_eq!(st, 200, "an open stream finishes: {body:?}");
    // After the GOAWAY no stream opens on this connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = h2_get(&send, addr, "/third", &[]).await;
    assert!(
        third.is_err(),
        "a third stream on the drained connection: {third:?}"
    );
    // And the connection closes.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(closed.is_ok(), "the connection closes after its GOAWAY");
    // A new connection serves the next requests.
    let (send2, _conn2) = h2_connect(addr).await;
    let (st, _) = h2_get(&send2, addr, "/fresh", &[])
        .await
        .expect("new connection");
    assert_eq!(st, 200);
    assert_eq!(
        up.requests().len(),
        3,
        "three requests reached the upstream"
    );
    assert_eq!(
        p.stat("http.ingress.downstream_cx_max_requests_reached")
            .await,
        Some(1)
    );
    assert_eq!(
        p.stat("http.ingress.downstream_cx_http2_total").await,
        Some(2)
    );
}

/// Below the limit the connection carries every stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_under_max_requests_keeps_the_connection() {
    let hcm = "          common_http_protocol_options: {max_requests_per_connection: 5}\n";
    let routes = "              - match: {prefix: /}\n                direct_response: {status: 200, body: {inline_string: ok}}\n";
    let p = Proxy::start(|ports| bootstrap(ports, hcm, routes, ""));
    let addr = p.addr();
    let (send, _conn) = h2_connect(addr).await;
    for i in 0..4 {
        let (st, body) = h2_get(&send, addr, &format!("/{i}"), &[])
            .await
            .expect("stream");
        assert_eq!((st, &body[..]), (200, &b"ok"[..]));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (st, _) = h2_get(&send, addr, "/5th", &[]).await.expect("5th stream");
    assert_eq!(st, 200, "the 5th stream reaches the limit and is served");
    assert_eq!(
        p.stat("http.ingress.downstream_cx_max_requests_reached")
            .await,
        Some(1)
    );
    assert_eq!(p.stat("http.ingress.downstream_cx_total").await, Some(1));
}

// ---------------------------------------------------------------- websocket over HTTP/2

/// A raw HTTP/1.1 websocket upstream: answers an upgrade with `101`, then
/// echoes bytes until the client half-closes or sends `bye` (echoed), then
/// closes. Records each request head (lowercase).
async fn ws_h1_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                h.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&head).to_ascii_lowercase());
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() || buf[..n].ends_with(b"bye")
                    {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, heads)
}

/// An HTTP/2 upstream accepting extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL):
/// `200`, then echoes DATA until the client's END_STREAM or `bye`
/// (echoed), then ends its side. Records `METHOD :protocol path` of each
/// request.
/// With `tls`, over TLS offering ALPN `h2` only.
async fn ws_h2_upstream(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = s2.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut b = h2::server::Builder::new();
                b.enable_connect_protocol();
                let handshake = match tls {
                    None => b.handshake::<_, Bytes>(Box::new(s) as Box<dyn Io>).await,
                    Some(a) => match a.accept(s).await {
                        Ok(t) => b.handshake::<_, Bytes>(Box::new(t) as Box<dyn Io>).await,
                        Err(_) => return,
                    },
                };
                let mut conn = match handshake {
                    Ok(c) => c,
                    Err(_) => return,
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let proto = req
                            .extensions()
                            .get::<h2::ext::Protocol>()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default();
                        seen.lock().expect("lock").push(format!(
                            "{} {proto} {}",
                            req.method(),
                            req.uri().path()
                        ));
                        let Ok(mut tx) = respond.send_response(http::Response::new(()), false)
                        else {
                            return;
                        };
                        let mut body = req.into_body();
                        while let Some(Ok(c)) = body.data().await {
                            let _ = body.flow_control().release_capacity(c.len());
                            let bye = c.ends_with(b"bye");
                            if tx.send_data(c, false).is_err() {
                                return;
                            }
                            if bye {
                                break;
                            }
                        }
                        let _ = tx.send_data(Bytes::new(), true);
                    });
                }
            });
        }
    });
    (addr, seen)
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TLS acceptor for `up.test` offering ALPN `h2` only.
fn h2_tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let ca = weir_tests::tls::TestCa::new("ws-ca");
    let leaf = ca.issue(weir_tests::tls::LeafSpec::server("up.test"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.cert_der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.clone().into()),
        )
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

const WS_HCM: &str = "          upgrade_configs: [{upgrade_type: websocket}]\n          http2_protocol_options: {allow_connect: true}\n";

/// An HTTP/2 client's websocket (extended CONNECT `:protocol websocket`)
/// through the proxy: the `200`, the bytes echoed, and the ends of
/// both sides. Returns the response status.
async fn h2_websocket(addr: SocketAddr, path: &str, upstream_h1: bool) -> u16 {
    let (send, _conn) = h2_connect(addr).await;
    let mut send = send.ready().await.expect("ready");
    // The proxy's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive first.
    for _ in 0..50 {
        if send.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        send.is_extended_connect_protocol_enabled(),
        "allow_connect offers SETTINGS_ENABLE_CONNECT_PROTOCOL"
    );
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("http://{addr}{path}"))
        .header("sec-websocket-version", "13")
        .body(())
        .expect("request");
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, mut tx) = send.send_request(req, false).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    if status != 200 {
        return status;
    }
    assert!(
        resp.headers().get("upgrade").is_none(),
        "{:?}",
        resp.headers()
    );
    let mut rx = resp.into_body();
    tx.send_data(Bytes::from_static(b"hello-ws"), false)
        .expect("data");
    let mut got = Vec::new();
    while got.len() < 8 {
        let c = tokio::time::timeout(Duration::from_secs(5), rx.data())
            .await
            .expect("echo in time")
            .expect("data")
            .expect("data ok");
        let _ = rx.flow_control().release_capacity(c.len());
        got.extend_from_slice(&c);
    }
    assert_eq!(&got, b"hello-ws");
    // The upstream closes (after echoing `bye`): the stream ends though
    // the client did not end its side.
    tx.send_data(Bytes::from_static(b"bye"), false)
        .expect("data");
    let (rest, reset) = tokio::time::timeout(Duration::from_secs(5), async {
        let mut rest = Vec::new();
        while let Some(c) = rx.data().await {
            match c {
                Ok(c) => {
                    let _ = rx.flow_control().release_capacity(c.len());
                    rest.extend_from_slice(&c);
                }
                Err(e) => return (rest, e.reason()),
            }
        }
        (rest, None)
    })
    .await
    .expect("the stream ends in time");
    assert_eq!(&rest, b"bye");
    // An HTTP/2 upstream's END_STREAM is passed on as END_STREAM. An
    // HTTP/1.1 upstream's close: Envoy resets the stream (CONNECT_ERROR,
    // its reset of a tunnel); weir ends it with END_STREAM, RFC 8441's
    // mapping of an orderly close (hyper's upgraded stream cannot send a
    // reset). Documented in ARCHITECTURE.md ("Websocket over HTTP/2").
    let expected = if upstream_h1 && Target::from_env().is_envoy() {
        Some(h2::Reason::CONNECT_ERROR)
    } else {
        None
    };
    assert_eq!(reset, expected);
    status
}

/// HTTP/2 downstream, HTTP/1.1 upstream: the extended CONNECT goes out as
/// the `GET` + `upgrade: websocket` it stands for, the `101` comes back as
/// `200`. A route that disables the upgrade refuses it (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_h2_to_h1_upstream() {
    let (up, heads) = ws_h1_upstream().await;
    let routes = "              - match: {prefix: /off}\n                route: {cluster: ws, upgrade_configs: [{upgrade_type: websocket, enabled: false}]}\n              - match: {prefix: /}\n                route: {cluster: ws}\n";
    let clusters = yaml_cluster("ws", &[up.port()], "");
    let log = log_path("ws-h2-h1");
    let hcm = format!(
        "{WS_HCM}{}",
        yaml_file_log(
            &log,
            "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %REQ(UPGRADE)% %UPSTREAM_HOST%",
            10
        )
    );
    let p = Proxy::start(|ports| bootstrap(ports, &hcm, routes, &clusters));
    assert_eq!(h2_websocket(p.addr(), "/chat", true).await, 200);
    let heads = heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let h = &heads[0];
    assert!(h.starts_with("get /chat http/1.1\r\n"), "{h}");
    assert!(h.contains("\r\nupgrade: websocket\r\n"), "{h}");
    assert!(h.contains("\r\nconnection: upgrade\r\n"), "{h}");
    assert!(h.contains("\r\nsec-websocket-version: 13\r\n"), "{h}");
    assert_eq!(h2_websocket(p.addr(), "/off", true).await, 403);
    let lines = p.log_lines(&log, 2).await;
    assert_eq!(
        lines,
        vec![
            // As Envoy, logs see the `101` the client got as `200`.
            format!("GET /chat HTTP/2 101 websocket {up}"),
            "GET /off HTTP/2 403 websocket -".to_owned(),
        ]
    );
}

/// HTTP/1.1 downstream, HTTP/2 upstream: the upgrade goes out as an
/// extended CONNECT (`:protocol websocket`), its `200` comes back as
/// `101`. An HTTP/2 client to the same upstream: extended CONNECT on both
/// sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_h2_upstream() {
    let (up, seen) = ws_h2_upstream(None).await;
    let routes = "              - match: {prefix: /}\n                route: {cluster: ws}\n";
    let clusters = yaml_cluster("ws", &[up.port()], H2_CLUSTER);
    let p = Proxy::start(|ports| bootstrap(ports, WS_HCM, routes, &clusters));
    let mut s = TcpStream::connect(p.addr()).await.expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    s.write_all(b"ping-bytes").await.expect("write");
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&got, b"ping-bytes");
    // The client half-closes; the upstream ends its stream; the proxy
    // closes the client's connection.
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read to end");
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(h2_websocket(p.addr(), "/h2", false).await, 200);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            "CONNECT websocket /chat".to_owned(),
            "CONNECT websocket /h2".to_owned()
        ]
    );
}

// ---------------------------------------------------------------- %UPSTREAM_LOCAL_ADDRESS%

/// A raw upstream that records the peer address of each connection; as
/// HTTP/1.1 it answers every request on a connection (keep-alive) with
/// that address as the body; with `raw` it writes the address and
/// closes (for tcp_proxy).
async fn addr_upstream(raw: bool) -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let peers = Arc::new(Mutex::new(Vec::new()));
    let p2 = peers.clone();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            p2.lock().expect("lock").push(peer);
            tokio::spawn(async move {
                let text = peer.to_string();
                if raw {
                    let _ = s.write_all(text.as_bytes()).await;
                    let _ = s.shutdown().await;
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                    return;
                }
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                loop {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                    if head.ends_with(b"\r\n\r\n") {
                        head.clear();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, peers)
}

/// `%UPSTREAM_LOCAL_ADDRESS%` (and `_WITHOUT_PORT`, `%UPSTREAM_LOCAL_PORT%`)
/// is the local address of the upstream connection that carried the
/// request: in the access log and in response headers; a pooled
/// connection keeps it; a direct response has none (`-`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_local_address_in_log_and_headers() {
    let (up, peers) = addr_upstream(false).await;
    let log = log_path("http");
    let hcm = yaml_file_log(
        &log,
        "%REQ(:PATH)% %UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %UPSTREAM_LOCAL_PORT% %UPSTREAM_HOST%",
        10,
    );
    let routes = "              - match: {prefix: /direct}\n                direct_response: {status: 200}\n              - match: {prefix: /}\n                route: {cluster: a}\n                response_headers_to_add:\n                - header: {key: x-up-local, value: \"%UPSTREAM_LOCAL_ADDRESS%\"}\n";
    let clusters = yaml_cluster("a", &[up.port()], "");
    let p = Proxy::start(|ports| bootstrap(ports, &hcm, routes, &clusters));
    let http = weir_tests::scenario::Http::h1();
    let base = p.base();
    let r1 = http.get(&format!("{base}/one"), &[]).await;
    let r2 = http.get(&format!("{base}/two"), &[]).await;
    let r3 = http.get(&format!("{base}/direct"), &[]).await;
    assert_eq!((r1.status, r2.status, r3.status), (200, 200, 200));
    // Each body is the upstream's view of the connection that carried it.
    let seen = peers.lock().expect("lock").clone();
    let (l1, l2) = (r1.text(), r2.text());
    for l in [&l1, &l2] {
        assert!(seen.iter().any(|p| p.to_string() == **l), "{l} in {seen:?}");
    }
    assert_eq!(r1.header("x-up-local"), Some(l1.as_str()));
    assert_eq!(r2.header("x-up-local"), Some(l2.as_str()));
    let line = |path: &str, l: &str| {
        let a: SocketAddr = l.parse().expect("address");
        format!("{path} {a} {} {} {up}", a.ip(), a.port())
    };
    let lines = p.log_lines(&log, 3).await;
    assert_eq!(
        lines,
        vec![
            line("/one", &l1),
            line("/two", &l2),
            "/direct - - - -".to_owned(),
        ]
    );
}

/// tcp_proxy's access log renders its upstream connection's local address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_upstream_local_address() {
    let (up, peers) = addr_upstream(true).await;
    let log = log_path("tcp");
    let access = yaml_file_log(
        &log,
        "%UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_PORT% %UPSTREAM_HOST%",
        10,
    );
    let clusters = yaml_cluster("a", &[up.port()], "");
    let tcp = format!(
        r#"      - name: tcp
        typed_config:
          "@type": {TCP_PROXY}
          stat_prefix: tcp
          cluster: a
{access}"#
    );
    let p = Proxy::start(|ports| yaml_bootstrap(ports, "", &tcp, &clusters));
    let mut s = TcpStream::connect(p.addr()).await.expect("connect");
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut got))
        .await
        .expect("in time")
        .expect("read");
    drop(s);
    let peers = peers.lock().expect("lock").clone();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(got, peers[0].to_string());
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(
        lines,
        vec![format!("{} {} {up}", peers[0], peers[0].port())]
    );
}

/// An upstream connection to an internal listener has Envoy's pivotal
/// local address `envoy://internal_client_address/` and an empty port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_upstream_local_address() {
    let log = log_path("internal");
    let access = yaml_file_log(
        &log,
        "%UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %UPSTREAM_LOCAL_PORT%",
        10,
    );
    let p = Proxy::start(|ports| {
        format!(
            r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config: {{"@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: ingress
{access}          route_config:
            name: rc
            virtual_hosts:
            - name: main
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: int}}
                response_headers_to_add:
                - header: {{key: x-up-local, value: "%UPSTREAM_LOCAL_ADDRESS%"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - name: inner
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: inner
          route_config:
            name: rc2
            virtual_hosts:
            - name: main
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: inner}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: int
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: int
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{envoy_internal_address: {{server_listener_name: inner}}}}}}
"#,
            admin = ports.admin,
            listen = ports.listen,
        )
    });
    let r = weir_tests::scenario::Http::h1()
        .get(&format!("{}/x", p.base()), &[])
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "inner"));
    assert_eq!(
        r.header("x-up-local"),
        Some("envoy://internal_client_address/")
    );
    let lines = p.log_lines(&log, 1).await;
    assert_eq!(
        lines,
        vec!["envoy://internal_client_address/ envoy://internal_client_address/ ".to_owned()]
    );
}

/// A cluster with `auto_config` over TLS: ALPN picks h2, so the upgrade
/// goes out as an extended CONNECT on that connection (not as an HTTP/1.1
/// upgrade the connection cannot carry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_alpn_h2_upstream() {
    let (up, seen) = ws_h2_upstream(Some(h2_tls_acceptor())).await;
    let routes = "              - match: {prefix: /}\n                route: {cluster: ws}\n";
    let extra = "    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: up.test\n        common_tls_context: {alpn_protocols: [h2, http/1.1]}\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        auto_config: {http2_protocol_options: {}}\n";
    let clusters = yaml_cluster("ws", &[up.port()], extra);
    let p = Proxy::start(|ports| bootstrap(ports, WS_HCM, routes, &clusters));
    // Twice: on the connection ALPN makes, and on the pooled one.
    for i in 0..2 {
        let mut s = TcpStream::connect(p.addr()).await.expect("connect");
        s.write_all(
            b"GET /alpn HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        )
        .await
        .expect("write");
        let head = read_head(&mut s).await;
        assert!(head.starts_with("http/1.1 101"), "{i}: {head}");
        s.write_all(b"alpn-bytes").await.expect("write");
        let mut got = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(&got, b"alpn-bytes");
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec!["CONNECT websocket /alpn".to_owned(); 2]);
}
