//! How an HTTP/2 downstream response's header block is represented in
//! HPACK, read from the raw frames of a real h2c connection (a hand-written
//! client: a library client decodes the block and hides the representation).
//! Runs against weir in-process and, with `WEIR_SCENARIO_TARGET=envoy`,
//! against Envoy: the decoded headers are the same on both; the
//! representation of `date` and `x-request-id` differs (weir: never-indexed
//! literals; Envoy: added to the dynamic table and indexed), see ARCHITECTURE.md "HTTP/2 downstream: HPACK of volatile
//! response headers".
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::config::{yaml_cluster, HttpYaml};
use weir_tests::scenario::{Ports, Proxy};
use weir_tests::upstream;

/// Listener `l` (request ids on responses) to cluster `a` on `upstream`.
fn config(p: &Ports, upstream: u16) -> String {
    HttpYaml {
        hcm: "          codec_type: AUTO\n          always_set_request_id_in_response: true\n",
        routes: "              - {match: {prefix: \"/\"}, route: {cluster: a}}\n",
        clusters: &yaml_cluster("a", &[upstream], ""),
        ..HttpYaml::default()
    }
    .render(p)
}

/// The representation of one header field (RFC 7541 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rep {
    /// Section 6.1: a table entry.
    Indexed,
    /// Section 6.2.1: literal, added to the dynamic table.
    Incremental,
    /// Section 6.2.2: literal, not added.
    WithoutIndexing,
    /// Section 6.2.3: literal, never to be indexed by any hop.
    NeverIndexed,
}

/// An HPACK integer with an `n`-bit prefix (section 5.1).
fn int(block: &[u8], pos: &mut usize, n: u32) -> usize {
    let max = (1usize << n) - 1;
    let mut v = (block[*pos] as usize) & max;
    *pos += 1;
    if v < max {
        return v;
    }
    let mut shift = 0;
    loop {
        let b = block[*pos];
        *pos += 1;
        v += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return v;
        }
    }
}

/// Skips a string literal (section 5.2; Huffman or not, only its length).
fn skip_str(block: &[u8], pos: &mut usize) {
    let len = int(block, pos, 7);
    *pos += len;
}

/// Each field's representation and its name's table index (0: a literal
/// name). Dynamic table size updates are skipped.
fn representations(block: &[u8]) -> Vec<(Rep, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < block.len() {
        let b = block[pos];
        let (rep, prefix) = if b & 0x80 != 0 {
            (Rep::Indexed, 7)
        } else if b & 0x40 != 0 {
            (Rep::Incremental, 6)
        } else if b & 0x20 != 0 {
            int(block, &mut pos, 5);
            continue;
        } else if b & 0x10 != 0 {
            (Rep::NeverIndexed, 4)
        } else {
            (Rep::WithoutIndexing, 4)
        };
        let idx = int(block, &mut pos, prefix);
        if rep != Rep::Indexed {
            if idx == 0 {
                skip_str(block, &mut pos);
            }
            skip_str(block, &mut pos);
        }
        out.push((rep, idx));
    }
    out
}

async fn read_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.expect("frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("frame payload");
    (head[3], head[4], stream, payload)
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends `GET /` on `stream` and returns the response's header block once
/// its body has ended.
async fn get(s: &mut TcpStream, stream: u32) -> Vec<u8> {
    // :method GET, :scheme http, :path / (static), :authority example.com
    // (literal without indexing, static name 1).
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 11];
    block.extend_from_slice(b"example.com");
    s.write_all(&frame(1, 0x5, stream, &block))
        .await
        .expect("send HEADERS");
    let mut headers = None;
    loop {
        let (kind, flags, id, payload) = read_frame(s).await;
        match kind {
            // SETTINGS: acknowledge the peer's.
            4 if flags & 1 == 0 => s.write_all(&frame(4, 1, 0, &[])).await.expect("ack"),
            // PING: answer.
            6 if flags & 1 == 0 => s.write_all(&frame(6, 1, 0, &payload)).await.expect("pong"),
            1 if id == stream => {
                assert_eq!(flags & 0x4, 0x4, "one HEADERS frame (END_HEADERS)");
                assert_eq!(flags & 0x28, 0, "no padding or priority");
                headers = Some(payload);
                if flags & 1 == 1 {
                    break;
                }
            }
            0 if id == stream && flags & 1 == 1 => break,
            3 if id == stream => panic!("stream {stream} reset: {payload:?}"),
            7 => panic!("GOAWAY: {payload:?}"),
            _ => {}
        }
    }
    headers.expect("response HEADERS")
}

/// `date` (static name 33) and the echoed `x-request-id` go out as
/// never-indexed literals on every weir response, so they never enter the
/// connection's dynamic table; Envoy adds them to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_response_headers_are_not_indexed() {
    let up = upstream::http1("a").await.expect("upstream");
    let port = up.port();
    let proxy = Proxy::start(move |p| config(p, port));
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    s.write_all(&frame(4, 0, 0, &[])).await.expect("settings");
    let envoy = proxy.target().is_envoy();
    for stream in [1u32, 3, 5] {
        let block = tokio::time::timeout(Duration::from_secs(10), get(&mut s, stream))
            .await
            .expect("response in time");
        let reps = representations(&block);
        // :status 200 is static entry 8.
        assert_eq!(reps[0], (Rep::Indexed, 8), "{reps:?}");
        let date: Vec<_> = reps.iter().filter(|(_, i)| *i == 33).collect();
        let never = reps.iter().filter(|(r, _)| *r == Rep::NeverIndexed).count();
        if envoy {
            // Envoy adds `date` to the dynamic table with the first
            // response; later ones in the same second index the whole field.
            if stream == 1 {
                assert_eq!(date, [&(Rep::Incremental, 33)], "{reps:?}");
            } else {
                assert!(date.iter().all(|(r, _)| *r == Rep::Incremental), "{reps:?}");
            }
            assert_eq!(never, 0, "{reps:?}");
        } else {
            assert_eq!(date, [&(Rep::NeverIndexed, 33)], "{reps:?}");
            // date and x-request-id (a literal name); everything else,
            // x-envoy-upstream-service-time included, is indexed as before.
            assert_eq!(never, 2, "{reps:?}");
            assert!(
                reps.contains(&(Rep::NeverIndexed, 0)),
                "x-request-id: {reps:?}"
            );
        }
    }
}
