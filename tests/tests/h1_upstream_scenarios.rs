//! The upstream HTTP/1.1 exchange as an upstream sees it and as the client
//! gets it back: connection reuse, a pooled connection the upstream
//! closed, response framing (chunked with trailers, until close, HEAD, 204,
//! 304), 1xx skipped, `connection: close`, a response head over the limit
//! and a body cut short. The upstream is a raw socket server so every byte
//! and every connection is under the test's control; the client is
//! hyper's HTTP/1.1 (or the `h2` crate) over one downstream connection, so
//! every request lands on the same worker and pool. Each test runs
//! against weir in-process and, with `WEIR_SCENARIO_TARGET=envoy`, against
//! Envoy.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_tests::scenario::{Ports, Proxy};

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// One HTTP listener routing everything to cluster `a` at `port`
/// (`extra`: more cluster fields, indent 4).
fn bootstrap(p: &Ports, port: u16, extra: &str) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
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
          route_config:
            name: rc
            virtual_hosts:
            - name: main
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: a, timeout: 5s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: a
    type: STATIC
    connect_timeout: 1s
{extra}    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#,
        admin = p.admin,
        listen = p.listen,
    )
}

/// What the raw upstream does after writing a response.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Reads the next request on the connection.
    Keep,
    /// Closes the connection at once.
    Close,
    /// Keeps the connection idle this long, then closes it.
    CloseAfter(Duration),
    /// Reads nothing more; reports when the proxy closes the connection.
    Hold,
}

/// A raw HTTP/1.1 upstream: every connection and request head recorded.
struct Raw {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    /// Request heads (lower-cased), in arrival order, with the number of
    /// the connection that carried each (1-based).
    heads: Arc<Mutex<Vec<(usize, String)>>>,
    /// Connections held by [`Then::Hold`] that the proxy closed.
    closed_by_proxy: Arc<AtomicUsize>,
}

type Reply = dyn Fn(&str) -> (Vec<u8>, Then) + Send + Sync;

async fn raw_upstream(reply: impl Fn(&str) -> (Vec<u8>, Then) + Send + Sync + 'static) -> Raw {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let closed_by_proxy = Arc::new(AtomicUsize::new(0));
    let reply: Arc<Reply> = Arc::new(reply);
    let (c, h, cl) = (conns.clone(), heads.clone(), closed_by_proxy.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let n = c.fetch_add(1, SeqCst) + 1;
            tokio::spawn(serve(s, n, reply.clone(), h.clone(), cl.clone()));
        }
    });
    Raw {
        addr,
        conns,
        heads,
        closed_by_proxy,
    }
}

async fn serve(
    mut s: TcpStream,
    n: usize,
    reply: Arc<Reply>,
    heads: Arc<Mutex<Vec<(usize, String)>>>,
    closed_by_proxy: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        // One request: its head, then a content-length or chunked body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        buf.drain(..head_end);
        let body_done = |b: &[u8]| -> Option<usize> {
            if let Some(cl) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                return (b.len() >= cl).then_some(cl);
            }
            if head.contains("transfer-encoding: chunked") {
                return b.windows(5).position(|w| w == b"0\r\n\r\n").map(|i| i + 5);
            }
            Some(0)
        };
        let used = loop {
            if let Some(k) = body_done(&buf) {
                break k;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        buf.drain(..used);
        heads.lock().expect("lock").push((n, head.clone()));
        let (bytes, then) = reply(&head);
        if s.write_all(&bytes).await.is_err() {
            return;
        }
        match then {
            Then::Keep => {}
            Then::Close => return,
            Then::CloseAfter(d) => {
                tokio::time::sleep(d).await;
                return;
            }
            Then::Hold => {
                let mut b = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await
                {
                    closed_by_proxy.fetch_add(1, SeqCst);
                }
                return;
            }
        }
    }
}

/// A response with a content-length body.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One downstream HTTP/1.1 connection (hyper's client).
async fn client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

/// What came back for one request.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: http::HeaderMap,
    /// The body, or the error that ended it.
    body: Result<Bytes, String>,
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
) -> Got {
    c.ready().await.expect("downstream connection ready");
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "example.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.send_request(req))
        .await
        .expect("response in time");
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return Got {
                status: 0,
                headers: http::HeaderMap::new(),
                body: Err(format!("no response: {e}")),
            }
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Got {
        status,
        headers,
        body,
    }
}

fn body(g: &Got) -> &[u8] {
    g.body.as_ref().expect("complete body")
}

/// Sequential requests reuse one upstream connection; the upstream gets
/// one `host` (the client's), lower-case names, origin-form targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_upstream_connection() {
    let up = raw_upstream(|_| (ok("hello"), Then::Keep)).await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    for i in 0..5 {
        let g = send(&mut c, "GET", &format!("/r{i}?q=1")).await;
        assert_eq!((g.status, body(&g)), (200, &b"hello"[..]), "request {i}");
    }
    assert_eq!(up.conns.load(SeqCst), 1, "one upstream connection");
    let heads = up.heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 5);
    for (i, (conn, h)) in heads.iter().enumerate() {
        assert_eq!(*conn, 1);
        assert!(
            h.starts_with(&format!("get /r{i}?q=1 http/1.1\r\n")),
            "request line: {h}"
        );
        assert_eq!(h.matches("\r\nhost: ").count(), 1, "one host: {h}");
        assert!(h.contains("\r\nhost: example.test\r\n"), "host: {h}");
        assert!(!h.contains("transfer-encoding"), "{h}");
    }
    assert_eq!(p.stat("cluster.a.upstream_cx_total").await, Some(1));
    assert_eq!(p.stat("cluster.a.upstream_rq_total").await, Some(5));
}

/// A pooled connection the upstream closed while idle is not used: the
/// next request goes out on a new connection and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closed_by_upstream_is_replaced() {
    let up = raw_upstream(|_| (ok("x"), Then::CloseAfter(Duration::from_millis(100)))).await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    for i in 0..3 {
        let g = send(&mut c, "GET", "/").await;
        assert_eq!((g.status, body(&g)), (200, &b"x"[..]), "request {i}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(up.conns.load(SeqCst), 3, "a new connection per request");
    assert_eq!(p.stat("cluster.a.upstream_cx_total").await, Some(3));
}

/// A chunked response with trailers: the body arrives whole, the trailers
/// reach an HTTP/2 client, and the connection is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_with_trailers() {
    let up = raw_upstream(|_| {
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n".to_vec(),
            Then::Keep,
        )
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    // HTTP/1.1: the body.
    let mut c = client(p.addr()).await;
    for _ in 0..2 {
        let g = send(&mut c, "GET", "/chunked").await;
        assert_eq!((g.status, body(&g)), (200, &b"hello world"[..]));
    }
    assert_eq!(up.conns.load(SeqCst), 1, "the connection is reused");
    // HTTP/2: the body and the trailers.
    let s = TcpStream::connect(p.addr()).await.expect("connect");
    let (send2, conn) = h2::client::handshake(s).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut send2 = send2.ready().await.expect("ready");
    let req = http::Request::builder()
        .uri(format!("http://{}/chunked", p.addr()))
        .body(())
        .expect("request");
    let (resp, _) = send2.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut b = resp.into_body();
    let mut data = Vec::new();
    while let Some(d) = b.data().await {
        let d = d.expect("data");
        let _ = b.flow_control().release_capacity(d.len());
        data.extend_from_slice(&d);
    }
    assert_eq!(data, b"hello world");
    let trailers = b.trailers().await.expect("trailers");
    if p.target().is_envoy() {
        // Envoy's HTTP/1 codec drops upstream trailers unless the
        // cluster's `http_protocol_options.enable_trailers` is set.
        assert!(trailers.is_none(), "{trailers:?}");
    } else {
        // weir forwards them (hyper's client did too).
        let t = trailers.expect("trailers present");
        assert_eq!(t.get("x-sum").map(|v| v.as_bytes()), Some(&b"42"[..]));
    }
}

/// A response without length ends when the upstream closes; that
/// connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_close_response() {
    let up = raw_upstream(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(),
            Then::Close,
        )
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    for _ in 0..2 {
        let g = send(&mut c, "GET", "/").await;
        assert_eq!((g.status, body(&g)), (200, &b"until the end"[..]));
    }
    assert_eq!(up.conns.load(SeqCst), 2);
    // Neither connection stays open (nor pooled) after its close.
    assert_eq!(cx_active_settles(&p).await, Some(0));
}

/// `upstream_cx_active` of cluster `a` once it stops changing (Envoy
/// updates it from its event loop).
async fn cx_active_settles(p: &Proxy) -> Option<i64> {
    let mut last = None;
    for _ in 0..40 {
        last = p.stat("cluster.a.upstream_cx_active").await;
        if last == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// HEAD, 204 and 304 responses have no body whatever their headers say;
/// the connection then carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_304_have_no_body() {
    let up = raw_upstream(|h| {
        let r: &[u8] = if h.starts_with("head ") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
        } else if h.starts_with("get /204 ") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else if h.starts_with("get /304 ") {
            b"HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast"
        };
        (r.to_vec(), Then::Keep)
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    let g = send(&mut c, "HEAD", "/").await;
    assert_eq!((g.status, body(&g)), (200, &b""[..]));
    assert_eq!(
        g.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"10"[..])
    );
    let g = send(&mut c, "GET", "/204").await;
    assert_eq!((g.status, body(&g)), (204, &b""[..]));
    let g = send(&mut c, "GET", "/304").await;
    assert_eq!((g.status, body(&g)), (304, &b""[..]));
    let g = send(&mut c, "GET", "/last").await;
    assert_eq!((g.status, body(&g)), (200, &b"last"[..]));
    assert_eq!(up.conns.load(SeqCst), 1, "one connection for all four");
}

/// A response head over the limit fails the request with a 5xx; the
/// connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_head_over_the_limit() {
    let up = raw_upstream(|h| {
        if h.starts_with("get /big ") {
            let big = "a".repeat(450 * 1024);
            (
                format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 0\r\n\r\n")
                    .into_bytes(),
                Then::Keep,
            )
        } else {
            (ok("small"), Then::Keep)
        }
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    let g = send(&mut c, "GET", "/big").await;
    let big = g.headers.get("x-big").map(|v| v.len());
    if p.target().is_envoy() {
        // Envoy: over max_response_headers_kb (60 KiB), a protocol error.
        assert_eq!((g.status, big), (502, None));
    } else {
        // weir: hyper's client limit (400 KiB of head), a reset before
        // the response (as before the inline client).
        assert_eq!((g.status, big), (503, None));
    }
    let mut c = client(p.addr()).await;
    let g = send(&mut c, "GET", "/small").await;
    assert_eq!((g.status, body(&g)), (200, &b"small"[..]));
    assert_eq!(up.conns.load(SeqCst), 2, "the failed connection is gone");
}

/// A body cut short by the upstream closing: the client gets the head,
/// then its connection is reset (no complete body), even when the cut is
/// already known as the first bytes go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premature_eof_mid_body_resets_the_client() {
    let up = raw_upstream(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..".to_vec(),
            Then::Close,
        )
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    let g = send(&mut c, "GET", "/").await;
    assert_eq!(g.status, 200, "the head goes out first: {g:?}");
    assert_eq!(
        g.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"100"[..])
    );
    assert!(g.body.is_err(), "the body must not complete: {g:?}");
}

/// `connection: close` from the upstream: that connection is not reused
/// (the proxy closes it even if the upstream does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_upstream_is_not_reused() {
    let up = raw_upstream(|_| {
        (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            Then::Hold,
        )
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    for _ in 0..2 {
        let g = send(&mut c, "GET", "/").await;
        assert_eq!((g.status, body(&g)), (200, &b"ok"[..]));
    }
    assert_eq!(up.conns.load(SeqCst), 2);
    // Both connections are closed by the proxy.
    for _ in 0..50 {
        if up.closed_by_proxy.load(SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.closed_by_proxy.load(SeqCst), 2);
    assert_eq!(cx_active_settles(&p).await, Some(0));
}

/// An HTTP/1.0 response without keep-alive closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_response_without_keep_alive_is_not_reused() {
    let up = raw_upstream(|_| {
        (
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            Then::Hold,
        )
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    for _ in 0..2 {
        let g = send(&mut c, "GET", "/").await;
        assert_eq!((g.status, body(&g)), (200, &b"ok"[..]));
    }
    assert_eq!(up.conns.load(SeqCst), 2);
}

/// A `100 Continue` before the response is skipped; the connection then
/// carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_100_is_skipped() {
    let up = raw_upstream(|_| {
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            Then::Keep,
        )
    })
    .await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut c = client(p.addr()).await;
    for _ in 0..2 {
        let g = send(&mut c, "GET", "/").await;
        assert_eq!((g.status, body(&g)), (200, &b"ok"[..]));
    }
    assert_eq!(up.conns.load(SeqCst), 1);
}

/// A request whose body streams from the client (no retry policy: not
/// buffered) shares the pooled connection with bodyless ones: the three
/// requests of one downstream connection use one upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_request_body_shares_the_connection() {
    let up = raw_upstream(|_| (ok("ok"), Then::Keep)).await;
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), ""));
    let mut s = TcpStream::connect(p.addr()).await.expect("connect");
    async fn response(s: &mut TcpStream) {
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !got.ends_with(b"ok") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("in time")
                .expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    s.write_all(b"GET /a HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await
        .expect("write");
    response(&mut s).await;
    // A chunked request body, its end written after a pause.
    s.write_all(
        b"POST /b HTTP/1.1\r\nhost: example.test\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    .await
    .expect("write head");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"0\r\n\r\n").await.expect("write body end");
    response(&mut s).await;
    s.write_all(b"GET /c HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await
        .expect("write");
    response(&mut s).await;
    let heads = up.heads.lock().expect("lock").clone();
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(heads[1].1.starts_with("post /b "), "{heads:?}");
    assert_eq!(up.conns.load(SeqCst), 1, "{heads:?}");
}

/// `max_requests_per_connection: 2`: five sequential requests use three
/// upstream connections, two requests each at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_retires_connections() {
    let up = raw_upstream(|_| (ok("ok"), Then::Keep)).await;
    let opts = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {max_requests_per_connection: 2}\n        explicit_http_config: {http_protocol_options: {}}\n";
    let p = Proxy::start(|ports| bootstrap(ports, up.addr.port(), opts));
    let mut c = client(p.addr()).await;
    for i in 0..5 {
        let g = send(&mut c, "GET", &format!("/{i}")).await;
        assert_eq!((g.status, body(&g)), (200, &b"ok"[..]), "request {i}");
    }
    assert_eq!(up.conns.load(SeqCst), 3);
    let heads = up.heads.lock().expect("lock").clone();
    let per_conn: Vec<usize> = heads.iter().map(|(c, _)| *c).collect();
    assert_eq!(per_conn, [1, 1, 2, 2, 3]);
}
