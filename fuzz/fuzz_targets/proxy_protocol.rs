//! Arbitrary bytes through the PROXY protocol header parser, and fuzz-chosen
//! addresses and TLVs through its encoders.
//!
//! Besides "never panics":
//! - prefix consistency: every prefix gives `NeedMore` or the verdict of the
//!   whole input;
//! - a parsed header fits the input and its version's bounds, its TLVs fit
//!   the header, and cut at `len` it parses the same while one byte less
//!   needs more;
//! - round trips: `encode_v1` / `encode_v2` / `encode_v2_local` output, with
//!   the fuzz input appended as payload, parses back to the same addresses
//!   (IPv4 mapped to IPv6 when the families differ) and TLVs, consuming
//!   exactly the encoded bytes; non-unicast addresses are rejected;
//! - `parse_versions` agrees with `parse` for allowed versions and never
//!   accepts a disallowed one; `sanitize_utf8` keeps the byte length and
//!   valid UTF-8.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use filters::listener::proxy_protocol::{
    encode_v1, encode_v2, encode_v2_local, parse, parse_versions, sanitize_utf8, ProxyError,
    Versions, V1_MAX_LEN, V2_HEADER_LEN, V2_MAX_LEN,
};
use filters::listener::Inspect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    if let Inspect::Done(Ok(h)) = &full {
        assert!(h.len <= data.len());
        match h.version {
            1 => assert!(h.len <= V1_MAX_LEN && h.tlvs.is_empty()),
            2 => {
                assert!(h.len >= V2_HEADER_LEN && h.len <= V2_MAX_LEN);
                assert_eq!(
                    h.len,
                    V2_HEADER_LEN + usize::from(u16::from_be_bytes([data[14], data[15]]))
                );
                let tlv_bytes: usize = h.tlvs.iter().map(|(_, v)| 3 + v.len()).sum();
                assert!(tlv_bytes <= h.len - V2_HEADER_LEN);
            }
            v => panic!("version {v}"),
        }
        assert_eq!(parse(&data[..h.len]), full);
        assert_eq!(parse(&data[..h.len - 1]), Inspect::NeedMore);
    }
    for end in cut_points(data) {
        let p = parse(&data[..end]);
        assert!(
            p == Inspect::NeedMore || p == full,
            "prefix of {end} bytes gave {p:?}, the whole input {full:?}"
        );
    }

    // `disallowed_versions`: with both versions allowed it is `parse`; a
    // disallowed version never parses; optional headers only ever turn a
    // disallowed version into "no header".
    for (v1, v2, optional) in [
        (true, true, false),
        (true, false, false),
        (false, true, false),
        (true, false, true),
        (false, true, true),
    ] {
        let p = parse_versions(data, Versions { v1, v2, optional });
        match &p {
            Inspect::Done(Ok(h)) => {
                assert!(if h.version == 1 { v1 } else { v2 });
                assert_eq!(p, full);
            }
            Inspect::Done(Err(ProxyError::Disallowed(v))) => {
                assert!(!optional && if *v == 1 { !v1 } else { !v2 });
            }
            _ if v1 && v2 => assert_eq!(p, full),
            _ => {}
        }
    }

    // TLV values into metadata: valid UTF-8 stays, each other byte becomes
    // one `!`.
    let s = sanitize_utf8(data);
    assert_eq!(s.len(), data.len());
    if let Ok(valid) = std::str::from_utf8(data) {
        assert_eq!(s, valid);
    }

    if let Ok(rt) = RoundTrip::arbitrary(&mut Unstructured::new(data)) {
        rt.check(data);
    }
});

#[derive(Debug, Arbitrary)]
struct RoundTrip {
    src: Addr,
    dst: Addr,
    tlvs: Vec<(u8, Vec<u8>)>,
}

#[derive(Debug, Arbitrary)]
enum Addr {
    V4(u32, u16),
    V6(u128, u16),
}

impl Addr {
    fn socket(&self) -> SocketAddr {
        match *self {
            Addr::V4(ip, port) => SocketAddr::new(Ipv4Addr::from(ip).into(), port),
            Addr::V6(ip, port) => SocketAddr::new(Ipv6Addr::from(ip).into(), port),
        }
    }
}

impl RoundTrip {
    fn check(&self, payload: &[u8]) {
        let (src, dst) = (self.src.socket(), self.dst.socket());
        let want = same_family(src, dst);
        let unicast = is_unicast(want.0.ip()) && is_unicast(want.1.ip());

        let v1 = encode_v1(src, dst);
        assert!(v1.len() <= V1_MAX_LEN, "{}", String::from_utf8_lossy(&v1));
        match parse(&[v1.as_slice(), payload].concat()) {
            Inspect::Done(Ok(h)) => {
                assert!(unicast);
                assert_eq!((h.len, h.version, h.addresses), (v1.len(), 1, Some(want)));
            }
            Inspect::Done(Err(ProxyError::NotUnicast)) => assert!(!unicast),
            other => panic!("v1 {:?} parsed to {other:?}", String::from_utf8_lossy(&v1)),
        }

        let addr_len = if want.0.is_ipv4() { 12 } else { 36 };
        let tlv_len: usize = self.tlvs.iter().map(|(_, v)| 3 + v.len()).sum();
        match encode_v2(src, dst, &self.tlvs) {
            Ok(v2) => {
                assert_eq!(v2.len(), V2_HEADER_LEN + addr_len + tlv_len);
                match parse(&[v2.as_slice(), payload].concat()) {
                    Inspect::Done(Ok(h)) => {
                        assert!(unicast);
                        assert_eq!((h.len, h.version, h.addresses), (v2.len(), 2, Some(want)));
                        assert_eq!(h.tlvs, self.tlvs);
                    }
                    Inspect::Done(Err(ProxyError::NotUnicast)) => assert!(!unicast),
                    other => panic!("v2 parsed to {other:?}"),
                }
            }
            Err(e) => {
                assert!(addr_len + tlv_len > usize::from(u16::MAX));
                assert_eq!(e.len, addr_len + tlv_len);
            }
        }

        let local = encode_v2_local();
        match parse(&[local.as_slice(), payload].concat()) {
            Inspect::Done(Ok(h)) => assert_eq!((h.len, h.addresses), (V2_HEADER_LEN, None)),
            other => panic!("local parsed to {other:?}"),
        }
    }
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (to_v6(src), to_v6(dst))
    }
}

fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
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
