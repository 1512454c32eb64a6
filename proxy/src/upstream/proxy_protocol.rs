//! The upstream PROXY protocol transport socket
//! (`envoy.transport_sockets.upstream_proxy_protocol`): the header an
//! upstream connection starts with, before the inner transport (TLS
//! included).
//!
//! As Envoy's `UpstreamProxyProtocolSocket`, the header describes the
//! downstream side a connection is made for ([`ProxySource`], Envoy's
//! `envoy.network.proxy_protocol_options` filter state: the listener's
//! `proxy_protocol` filter sets it from the received header, with the TLVs
//! its `pass_through_tlvs` kept; otherwise the HCM or `tcp_proxy` sets it
//! from the downstream connection's addresses). A connection made for no
//! downstream (health checks, callouts) has no source: v1 then carries the
//! upstream connection's own addresses, v2 is a `LOCAL` header.
//!
//! HTTP connections are pooled per source addresses (Envoy's `hashKey`
//! hashes them into the pool key), so one upstream connection, HTTP/2
//! included, only carries streams of one downstream (source, destination)
//! pair. TLVs are not part of the key, as in Envoy (its
//! `tlv_as_pool_key` is not implemented).
use std::net::SocketAddr;

use filters::listener::proxy_protocol as pp;
use xds_client::config::ProxyProtocolUpstream;

/// Envoy's `ProxyProtocolData`: the downstream addresses and the TLVs kept
/// for pass-through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySource {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TLVs of the downstream PROXY header the listener kept, in order.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxySource {
    /// The part of the pool key (Envoy's `asStringForHash`: the addresses).
    pub fn key(&self) -> (SocketAddr, SocketAddr) {
        (self.src, self.dst)
    }
}

/// The header for a connection from `local` to `peer` made for `source`.
pub fn header(
    cfg: &ProxyProtocolUpstream,
    source: Option<&ProxySource>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Vec<u8> {
    if cfg.version == 1 {
        let (src, dst) = source.map_or((local, peer), ProxySource::key);
        return pp::encode_v1(src, dst);
    }
    let Some(s) = source else {
        return pp::encode_v2_local();
    };
    let tlvs = tlvs(cfg, &s.tlvs, s.src.is_ipv4() && s.dst.is_ipv4());
    match pp::encode_v2(s.src, s.dst, &tlvs) {
        Ok(h) => h,
        // Unreachable: `tlvs` keeps the total under the length limit.
        Err(_) => pp::encode_v2(s.src, s.dst, &[]).unwrap_or_else(|_| pp::encode_v2_local()),
    }
}

/// Writes the header for `source` on a new connection (before its TLS
/// handshake, if any).
pub async fn write_header(
    stream: &mut tokio::net::TcpStream,
    cfg: &ProxyProtocolUpstream,
    source: Option<&ProxySource>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let h = header(cfg, source, stream.local_addr()?, stream.peer_addr()?);
    stream.write_all(&h).await
}

/// The v2 TLVs, as Envoy 1.40's `generateV2Header`: `added_tlvs` first,
/// then the downstream TLVs `pass_through_tlvs` includes whose type
/// `added_tlvs` does not set (duplicates of one type are kept, Envoy's
/// `proxy_protocol_allow_duplicate_tlvs` default); a TLV that would take
/// the header's length past 65535 is left out.
fn tlvs(cfg: &ProxyProtocolUpstream, downstream: &[(u8, Vec<u8>)], v4: bool) -> Vec<(u8, Vec<u8>)> {
    // Address block: 12 bytes for IPv4, 36 for IPv6.
    let max = usize::from(u16::MAX) - if v4 { 12 } else { 36 };
    let passed = downstream.iter().filter(|(t, _)| {
        cfg.pass_through.includes(*t) && !cfg.added_tlvs.iter().any(|(a, _)| a == t)
    });
    let mut len = 0usize;
    let mut out = Vec::new();
    for (t, v) in cfg.added_tlvs.iter().chain(passed) {
        if len + 3 + v.len() > max {
            tracing::debug!(tlv_type = t, "PROXY protocol TLV left out: header too long");
            continue;
        }
        len += 3 + v.len();
        out.push((*t, v.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use filters::listener::Inspect;
    use xds_client::config::TlvPassThrough;

    fn cfg(version: u8, pass: TlvPassThrough, added: Vec<(u8, Vec<u8>)>) -> ProxyProtocolUpstream {
        ProxyProtocolUpstream {
            version,
            pass_through: pass,
            added_tlvs: added,
        }
    }

    fn parse(b: &[u8]) -> pp::ProxyHeader {
        match pp::parse(b) {
            Inspect::Done(Ok(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn without_a_source_v1_has_the_connection_and_v2_is_local() {
        let (l, p) = (addr("127.0.0.1:4000"), addr("127.0.0.2:80"));
        let h = parse(&header(&cfg(1, TlvPassThrough::All, vec![]), None, l, p));
        assert_eq!(h.addresses, Some((l, p)));
        let v2 = header(
            &cfg(2, TlvPassThrough::All, vec![(1, b"x".to_vec())]),
            None,
            l,
            p,
        );
        assert_eq!(v2, pp::encode_v2_local());
    }

    #[test]
    fn added_tlvs_first_then_passed_through_without_their_types() {
        let s = ProxySource {
            src: addr("10.0.0.1:1234"),
            dst: addr("10.0.0.2:443"),
            tlvs: vec![
                (1, b"h2".to_vec()),
                (2, b"a".to_vec()),
                (3, b"b".to_vec()),
                (2, b"c".to_vec()),
            ],
        };
        let c = cfg(
            2,
            TlvPassThrough::Only(vec![1, 2]),
            vec![(1, b"mine".to_vec()), (0xE0, b"z".to_vec())],
        );
        let h = parse(&header(&c, Some(&s), s.src, s.dst));
        assert_eq!(h.addresses, Some((s.src, s.dst)));
        assert_eq!(
            h.tlvs,
            vec![
                (1, b"mine".to_vec()),
                (0xE0, b"z".to_vec()),
                (2, b"a".to_vec()),
                (2, b"c".to_vec()),
            ]
        );
        let none = parse(&header(
            &cfg(2, TlvPassThrough::None, vec![]),
            Some(&s),
            s.src,
            s.dst,
        ));
        assert!(none.tlvs.is_empty());
    }

    #[test]
    fn tlvs_past_the_length_limit_are_left_out() {
        let s = ProxySource {
            src: addr("10.0.0.1:1"),
            dst: addr("10.0.0.2:2"),
            tlvs: vec![(1, vec![7; 40000]), (2, vec![8; 40000]), (3, vec![9; 10])],
        };
        let h = parse(&header(
            &cfg(2, TlvPassThrough::All, vec![]),
            Some(&s),
            s.src,
            s.dst,
        ));
        let types: Vec<u8> = h.tlvs.iter().map(|(t, _)| *t).collect();
        assert_eq!(types, [1, 3]);
    }
}
