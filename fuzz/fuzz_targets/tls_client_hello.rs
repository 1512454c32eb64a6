//! Arbitrary bytes through the TLS inspector's ClientHello peeker.
//!
//! Besides "never panics":
//! - prefix consistency: every prefix of the input (all of them for short
//!   inputs, a spread of cut points otherwise) gives `NeedMore` or the
//!   verdict of the whole input, as a caller peeking a growing buffer needs;
//! - a found hello ends at `bytes_processed`: cut there it gives the same
//!   verdict, one byte shorter it needs more;
//! - `TooLarge` only once `MAX_CLIENT_HELLO` bytes are here;
//! - reassembly: an input starting with 0xff (never TLS) is `[0xff, n,
//!   body...]`: the body is wrapped as a ClientHello message once in whole
//!   records and once in records of `n` bytes, and both must give the same
//!   verdict.
#![no_main]

use filters::listener::tls_inspector::{
    inspect, TlsDetect, MAX_CLIENT_HELLO, MAX_CLIENT_HELLO_MESSAGE,
};
use filters::listener::Inspect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let [0xff, frag, body @ ..] = data {
        reassembly(*frag, body);
    }
    check(data);
});

fn check(data: &[u8]) -> Inspect<TlsDetect> {
    let full = inspect(data);
    match &full {
        Inspect::Done(TlsDetect::Tls(info)) => {
            let end = info.bytes_processed;
            assert!(end > 9 && end <= data.len().min(MAX_CLIENT_HELLO), "{end}");
            assert_eq!(inspect(&data[..end]), full);
            assert_eq!(inspect(&data[..end - 1]), Inspect::NeedMore);
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty() && !sni.contains('\0'));
            }
            assert!(info.alpn.iter().all(|p| !p.is_empty()));
        }
        Inspect::Done(TlsDetect::TooLarge) => assert!(data.len() >= MAX_CLIENT_HELLO),
        Inspect::Done(TlsDetect::NotTls) => {
            assert!(data.first() != Some(&0x16) || data.get(1) != Some(&3))
        }
        _ => {}
    }
    for end in cut_points(data) {
        let p = inspect(&data[..end]);
        assert!(
            p == Inspect::NeedMore || p == full,
            "prefix of {end} bytes gave {p:?}, the whole input {full:?}"
        );
    }
    full
}

fn reassembly(frag: u8, body: &[u8]) {
    let body = &body[..body.len().min(MAX_CLIENT_HELLO_MESSAGE)];
    let len = body.len();
    let mut msg = vec![1, (len >> 16) as u8, (len >> 8) as u8, len as u8];
    msg.extend_from_slice(body);
    let whole = records(&msg, 1 << 14);
    let split = records(&msg, usize::from(frag).max(1));
    let a = check(&whole);
    let b = check(&split);
    if split.len() < MAX_CLIENT_HELLO {
        assert_eq!(strip(a), strip(b), "records of {frag} bytes");
    }
}

/// Handshake records of at most `frag` payload bytes.
fn records(msg: &[u8], frag: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in msg.chunks(frag) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The verdict without the framing-dependent byte count.
fn strip(r: Inspect<TlsDetect>) -> Inspect<TlsDetect> {
    r.map(|d| match d {
        TlsDetect::Tls(mut info) => {
            info.bytes_processed = 0;
            TlsDetect::Tls(info)
        }
        other => other,
    })
}

/// Every prefix length for short inputs; otherwise the small ones, the
/// last ones and a pseudo-random spread derived from the input.
fn cut_points(data: &[u8]) -> Vec<usize> {
    let n = data.len();
    if n <= 128 {
        return (0..n).collect();
    }
    let mut points: Vec<usize> = (0..16).chain(n - 16..n).collect();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data.iter().take(64) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    for _ in 0..32 {
        h ^= h << 13;
        h ^= h >> 7;
        h ^= h << 17;
        points.push((h % n as u64) as usize);
    }
    points
}
