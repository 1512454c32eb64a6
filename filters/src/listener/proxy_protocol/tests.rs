use std::net::SocketAddrV6;

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn done(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    match parse(buf) {
        Inspect::Done(r) => r,
        Inspect::NeedMore => panic!("need more after {:?}", String::from_utf8_lossy(buf)),
    }
}

fn ok(buf: &[u8]) -> ProxyHeader {
    done(buf).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(buf)))
}

/// Every prefix needs more or gives the final verdict; once decided it
/// stays decided. Returns the length at which it was decided.
fn prefixes_agree(input: &[u8]) -> usize {
    let want = done(input);
    let mut decided_at = None;
    for end in 0..=input.len() {
        match parse(&input[..end]) {
            Inspect::NeedMore => assert!(decided_at.is_none(), "undecided again at {end}"),
            Inspect::Done(r) => {
                assert_eq!(r, want, "prefix of {end} bytes");
                decided_at.get_or_insert(end);
            }
        }
    }
    decided_at.expect("decided")
}

fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(ver_cmd);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn inet_body(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut b = src.to_vec();
    b.extend_from_slice(&dst);
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b
}

// === v1 ===

#[test]
fn v1_tcp4() {
    let mut input = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n".to_vec();
    let hdr_len = input.len();
    input.extend_from_slice(b"GET / HTTP/1.1\r\n");
    let h = ok(&input);
    assert_eq!(h.len, hdr_len);
    assert_eq!(h.version, 1);
    assert_eq!(
        h.addresses,
        Some((sa("192.0.2.1:56324"), sa("198.51.100.7:443")))
    );
    assert!(h.tlvs.is_empty());
    assert_eq!(prefixes_agree(&input), hdr_len);
}

#[test]
fn v1_tcp6() {
    let input = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 65535 0\r\n";
    let h = ok(input);
    assert_eq!(h.len, input.len());
    assert_eq!(
        h.addresses,
        Some((sa("[2001:db8::1]:65535"), sa("[::ffff:10.0.0.1]:0")))
    );
    prefixes_agree(input);
}

#[test]
fn v1_unknown() {
    for input in [
        &b"PROXY UNKNOWN\r\n"[..],
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        V1_UNKNOWN,
    ] {
        let h = ok(input);
        assert_eq!(h.len, input.len());
        assert_eq!(h.addresses, None);
        prefixes_agree(input);
    }
}

#[test]
fn v1_trailing_whitespace_is_trimmed() {
    let h = ok(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \t\r\n");
    assert_eq!(h.addresses, Some((sa("1.2.3.4:1"), sa("5.6.7.8:2"))));
}

#[test]
fn v1_malformed() {
    for line in [
        &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 [::1] ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY \r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n",
    ] {
        assert_eq!(
            done(line),
            Err(ProxyError::V1Malformed),
            "{:?}",
            String::from_utf8_lossy(line)
        );
        prefixes_agree(line);
    }
}

#[test]
fn v1_not_unicast() {
    for line in [
        &b"PROXY TCP4 0.0.0.0 5.6.7.8 1 2\r\n"[..],
        b"PROXY TCP4 1.2.3.4 255.255.255.255 1 2\r\n",
        b"PROXY TCP4 224.0.0.1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 :: ::1 1 2\r\n",
        b"PROXY TCP6 ::1 ff02::1 1 2\r\n",
    ] {
        assert_eq!(
            done(line),
            Err(ProxyError::NotUnicast),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn v1_length_limit() {
    // The spec's worst case, 107 bytes with CRLF.
    let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(longest.len(), V1_MAX_LEN);
    assert_eq!(ok(longest).len, V1_MAX_LEN);
    // The longest TCP6 line.
    let tcp6 = b"PROXY TCP6 fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(ok(tcp6).len, tcp6.len());

    // No CRLF within 107 bytes: an error once 107 bytes are here.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LEN - 1, b'x');
    assert_eq!(parse(&line), Inspect::NeedMore);
    line.push(b'\r');
    assert_eq!(done(&line), Err(ProxyError::V1TooLong));
    line.push(b'\n'); // 108 bytes with CRLF
    assert_eq!(done(&line), Err(ProxyError::V1TooLong));

    // UNKNOWN with garbage still has to fit.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LEN - 2, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(ok(&line).len, V1_MAX_LEN);
}

// === no header ===

#[test]
fn not_proxy_decided_at_first_differing_byte() {
    assert_eq!(done(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
    assert_eq!(done(b"G"), Err(ProxyError::NotProxy));
    assert_eq!(done(&[0x16, 0x03, 0x01]), Err(ProxyError::NotProxy));
    assert_eq!(done(b"PROXX"), Err(ProxyError::NotProxy));
    assert_eq!(done(b"PROXY\r\n"), Err(ProxyError::NotProxy));
    assert_eq!(done(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyError::NotProxy));
    assert_eq!(done(b"\r\nX"), Err(ProxyError::NotProxy));
    // Prefixes of either signature need more.
    for p in [&b""[..], b"P", b"PROXY", b"\r", b"\r\n\r\n\0\r\nQUIT"] {
        assert_eq!(parse(p), Inspect::NeedMore, "{p:?}");
    }
    assert_eq!(
        ProxyError::NotProxy.to_string(),
        "no proxy protocol signature"
    );
}

// === v2 ===

#[test]
fn v2_inet_with_tlvs() {
    let mut body = inet_body([10, 1, 2, 3], [10, 9, 8, 7], 40000, 8443);
    body.extend_from_slice(&[0x02, 0x00, 0x07]); // PP2_TYPE_AUTHORITY
    body.extend_from_slice(b"a.local");
    body.extend_from_slice(&[0xea, 0x00, 0x00]); // empty value
    let mut input = v2(0x21, 0x11, &body);
    let hdr_len = input.len();
    input.extend_from_slice(b"payload");
    let h = ok(&input);
    assert_eq!(h.len, hdr_len);
    assert_eq!(h.version, 2);
    assert_eq!(
        h.addresses,
        Some((sa("10.1.2.3:40000"), sa("10.9.8.7:8443")))
    );
    assert_eq!(
        h.tlvs,
        vec![(0x02, b"a.local".to_vec()), (0xea, Vec::new())]
    );
    assert_eq!(prefixes_agree(&input), hdr_len);
}

#[test]
fn v2_inet6_dgram() {
    let mut body = [0u8; 36];
    body[..16].copy_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().expect("ipv6").octets());
    body[16..32].copy_from_slice(&"2001:db8::6".parse::<Ipv6Addr>().expect("ipv6").octets());
    body[32..34].copy_from_slice(&53u16.to_be_bytes());
    body[34..].copy_from_slice(&5353u16.to_be_bytes());
    let input = v2(0x21, 0x22, &body);
    let h = ok(&input);
    assert_eq!(h.len, 16 + 36);
    assert_eq!(
        h.addresses,
        Some((sa("[2001:db8::5]:53"), sa("[2001:db8::6]:5353")))
    );
    prefixes_agree(&input);
}

#[test]
fn v2_local() {
    // LOCAL keeps the real addresses and skips whatever the length covers,
    // even for families PROXY would reject, without looking at TLVs.
    let input = encode_v2_local();
    assert_eq!(
        ok(&input),
        ProxyHeader {
            len: 16,
            version: 2,
            addresses: None,
            tlvs: vec![]
        }
    );
    prefixes_agree(&input);
    for fam in [0x00, 0x11, 0x31, 0xff] {
        let input = v2(0x20, fam, &[0xff; 20]);
        let h = ok(&input);
        assert_eq!(
            (h.len, h.addresses, h.tlvs.len()),
            (36, None, 0),
            "fam {fam:#x}"
        );
    }
}

#[test]
fn v2_decided_from_fixed_bytes() {
    let sig = V2_SIGNATURE.to_vec();
    let with = |extra: &[u8]| [sig.as_slice(), extra].concat();
    assert_eq!(done(&with(&[0x11])), Err(ProxyError::V2Version(1)));
    assert_eq!(done(&with(&[0x31])), Err(ProxyError::V2Version(3)));
    assert_eq!(done(&with(&[0x22])), Err(ProxyError::V2Command(2)));
    assert_eq!(done(&with(&[0x2f])), Err(ProxyError::V2Command(15)));
    // PROXY over AF_UNSPEC / AF_UNIX: rejected as Envoy does.
    assert_eq!(
        done(&with(&[0x21, 0x01])),
        Err(ProxyError::V2AddressFamily(0))
    );
    assert_eq!(
        done(&with(&[0x21, 0x31])),
        Err(ProxyError::V2AddressFamily(3))
    );
    assert_eq!(
        done(&with(&[0x21, 0x41])),
        Err(ProxyError::V2AddressFamily(4))
    );
    assert_eq!(done(&with(&[0x21, 0x10])), Err(ProxyError::V2Transport(0)));
    assert_eq!(done(&with(&[0x21, 0x13])), Err(ProxyError::V2Transport(3)));
    assert_eq!(
        done(&with(&[0x21, 0x11, 0x00, 0x0b])),
        Err(ProxyError::V2AddressLength { len: 11, need: 12 })
    );
    assert_eq!(
        done(&with(&[0x21, 0x21, 0x00, 0x0c])),
        Err(ProxyError::V2AddressLength { len: 12, need: 36 })
    );
    // A valid fixed part then waits for the rest.
    assert_eq!(
        parse(&with(&[0x21, 0x11, 0x00, 0x0c, 1, 2])),
        Inspect::NeedMore
    );
}

#[test]
fn v2_bad_tlvs() {
    let base = inet_body([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
    for tlvs in [
        &[0x01][..],               // type only
        &[0x01, 0x00],             // half a length
        &[0x01, 0x00, 0x02, b'x'], // value runs past the end
        &[0x01, 0x00, 0x00, 0x05], // a second TLV cut short
    ] {
        let input = v2(0x21, 0x11, &[base.as_slice(), tlvs].concat());
        assert_eq!(done(&input), Err(ProxyError::V2Tlv), "{tlvs:?}");
        prefixes_agree(&input);
    }
}

#[test]
fn v2_not_unicast() {
    let input = v2(0x21, 0x11, &inet_body([0, 0, 0, 0], [10, 0, 0, 2], 1, 2));
    assert_eq!(done(&input), Err(ProxyError::NotUnicast));
    let input = v2(0x21, 0x11, &inet_body([10, 0, 0, 1], [239, 1, 1, 1], 1, 2));
    assert_eq!(done(&input), Err(ProxyError::NotUnicast));
}

#[test]
fn v2_largest_header() {
    // A length of 65535: 12 address bytes and one TLV filling the rest.
    let mut body = inet_body([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
    let value_len = u16::MAX as usize - body.len() - 3;
    body.push(0xe0);
    body.extend_from_slice(&(value_len as u16).to_be_bytes());
    body.resize(u16::MAX as usize, 0x5a);
    let mut input = v2(0x21, 0x11, &body);
    assert_eq!(input.len(), V2_MAX_LEN);
    assert_eq!(parse(&input[..V2_MAX_LEN - 1]), Inspect::NeedMore);
    let h = ok(&input);
    assert_eq!(h.len, V2_MAX_LEN);
    assert_eq!(h.tlvs.len(), 1);
    assert_eq!(h.tlvs[0].1.len(), value_len);
    input.extend_from_slice(b"more");
    assert_eq!(ok(&input).len, V2_MAX_LEN);
}

#[test]
fn v2_byte_by_byte() {
    let input = encode_v2(
        sa("192.0.2.10:1234"),
        sa("192.0.2.20:80"),
        &[(0x05, b"id-1".to_vec())],
    )
    .expect("encodes");
    assert_eq!(prefixes_agree(&input), input.len());
}

// === encoding ===

#[test]
fn encode_v1_round_trips() {
    let cases = [
        (
            sa("192.0.2.1:1"),
            sa("192.0.2.2:65535"),
            "PROXY TCP4 192.0.2.1 192.0.2.2 1 65535\r\n",
        ),
        (
            sa("[2001:db8::1]:80"),
            sa("[2001:db8::2]:443"),
            "PROXY TCP6 2001:db8::1 2001:db8::2 80 443\r\n",
        ),
        // Mixed families: the IPv4 side becomes IPv4-mapped.
        (
            sa("192.0.2.1:5"),
            sa("[2001:db8::2]:6"),
            "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5 6\r\n",
        ),
    ];
    for (src, dst, text) in cases {
        let enc = encode_v1(src, dst);
        assert_eq!(String::from_utf8_lossy(&enc), text);
        let h = ok(&enc);
        assert_eq!(h.len, enc.len());
        let (s, d) = h.addresses.expect("addresses");
        assert_eq!((s.port(), d.port()), (src.port(), dst.port()));
        assert_eq!(same_family(src, dst), (s, d));
    }
    // Scope ids are dropped.
    let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().expect("ipv6"), 9, 0, 3));
    let h = ok(&encode_v1(scoped, sa("[fe80::2]:10")));
    assert_eq!(h.addresses.map(|(s, _)| s), Some(sa("[fe80::1]:9")));
}

#[test]
fn encode_v2_round_trips() {
    let tlvs = vec![
        (0x01, b"h2".to_vec()),
        (0x02, b"example.com".to_vec()),
        (0xee, vec![]),
    ];
    for (src, dst) in [
        (sa("192.0.2.1:1"), sa("192.0.2.2:2")),
        (sa("[2001:db8::1]:3"), sa("[2001:db8::2]:4")),
        (sa("[2001:db8::1]:3"), sa("192.0.2.2:2")),
    ] {
        let enc = encode_v2(src, dst, &tlvs).expect("encodes");
        let h = ok(&enc);
        assert_eq!(h.len, enc.len());
        assert_eq!(h.addresses, Some(same_family(src, dst)));
        assert_eq!(h.tlvs, tlvs);
    }
}

#[test]
fn encode_v2_limits() {
    let (src, dst) = (sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    // 12 + 3 + 65520 = 65535 fits exactly.
    let enc = encode_v2(src, dst, &[(1, vec![0; 65520])]).expect("encodes");
    assert_eq!(enc.len(), V2_MAX_LEN);
    assert_eq!(ok(&enc).tlvs[0].1.len(), 65520);
    let err = encode_v2(src, dst, &[(1, vec![0; 65521])]).expect_err("too long");
    assert_eq!(err, EncodeError { len: 65536 });
    assert!(err.to_string().contains("65536"));
    let err =
        encode_v2(src, dst, &[(1, vec![0; 40000]), (2, vec![0; 40000])]).expect_err("too long");
    assert_eq!(err.len, 12 + 6 + 80000);
}

#[test]
fn encode_v2_local_parses() {
    let enc = encode_v2_local();
    assert_eq!(enc.len(), V2_HEADER_LEN);
    assert_eq!(ok(&enc).addresses, None);
}

// === disallowed_versions, rules ===

fn versions(v1: bool, v2: bool, optional: bool) -> Versions {
    Versions { v1, v2, optional }
}

#[test]
fn disallowed_versions_decide_when_the_version_is_known() {
    let line = b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2\r\nrest";
    let header = encode_v2(sa("192.0.2.1:1"), sa("198.51.100.1:2"), &[]).expect("v2");
    let strict_v2 = versions(true, false, false);
    let strict_v1 = versions(false, true, false);
    // Allowed versions parse as usual.
    assert!(matches!(parse_versions(line, strict_v2), Inspect::Done(Ok(h)) if h.version == 1));
    assert!(matches!(parse_versions(&header, strict_v1), Inspect::Done(Ok(h)) if h.version == 2));
    // A disallowed v1 line is decided at its CRLF, parsed or not.
    assert_eq!(
        parse_versions(b"PROXY TCP4 1", strict_v1),
        Inspect::NeedMore
    );
    assert_eq!(
        parse_versions(line, strict_v1),
        Inspect::Done(Err(ProxyError::Disallowed(1)))
    );
    assert_eq!(
        parse_versions(b"PROXY garbage\r\n", strict_v1),
        Inspect::Done(Err(ProxyError::Disallowed(1)))
    );
    assert_eq!(
        parse_versions(&[b'P'; V1_MAX_LEN], strict_v1),
        Inspect::Done(Err(ProxyError::NotProxy))
    );
    let mut long = b"PROXY ".to_vec();
    long.resize(V1_MAX_LEN, b'x');
    assert_eq!(
        parse_versions(&long, strict_v1),
        Inspect::Done(Err(ProxyError::V1TooLong))
    );
    // A disallowed v2 header is decided at 16 bytes.
    assert_eq!(parse_versions(&header[..15], strict_v2), Inspect::NeedMore);
    assert_eq!(
        parse_versions(&header[..16], strict_v2),
        Inspect::Done(Err(ProxyError::Disallowed(2)))
    );
    // Optional headers: a disallowed signature is not looked for.
    for (buf, v) in [
        (&line[..3], versions(false, true, true)),
        (&header[..3], versions(true, false, true)),
    ] {
        assert_eq!(
            parse_versions(buf, v),
            Inspect::Done(Err(ProxyError::NotProxy))
        );
    }
    assert_eq!(
        parse_versions(b"", versions(false, true, true)),
        Inspect::NeedMore
    );
}

#[test]
fn sanitize_utf8_replaces_each_bad_byte() {
    assert_eq!(sanitize_utf8(b"plain"), "plain");
    assert_eq!(sanitize_utf8("é€😀".as_bytes()), "é€😀");
    assert_eq!(sanitize_utf8(b"a\xffb\xc3\x28c\xe2\x82"), "a!b!(c!!");
    // Overlong, surrogate and beyond U+10FFFF encodings are invalid.
    assert_eq!(sanitize_utf8(b"\xc0\x80"), "!!");
    assert_eq!(sanitize_utf8(b"\xed\xa0\x80x"), "!!!x");
    assert_eq!(sanitize_utf8(b"\xf4\x90\x80\x80"), "!!!!");
    assert_eq!(sanitize_utf8(b""), "");
}

#[test]
fn rules_set_metadata_first_tlv_wins() {
    use xds_client::config::TlvRule;
    let rule = |t: u8, ns: &str, key: &str, base64: bool| TlvRule {
        tlv_type: t,
        namespace: ns.into(),
        key: key.into(),
        base64,
    };
    let rules = [
        rule(0x02, "pp", "authority", false),
        rule(0xE0, "custom", "k", false),
        rule(0xE1, "custom", "k", false),
        rule(0xE2, "pp", "b64", true),
    ];
    let tlvs = [
        (0x01, b"h2".to_vec()),
        (0xE1, b"from-e1".to_vec()),
        (0x02, b"a\xff".to_vec()),
        (0xE0, b"from-e0".to_vec()),
        (0x02, b"second".to_vec()),
        (0xE2, vec![0, 1, 0xfe]),
    ];
    let mut md = crate::state::DynamicMetadata::default();
    apply_rules(&rules, &tlvs, &mut md);
    assert_eq!(
        md.namespace("pp")
            .map(|m| serde_json::Value::Object(m.clone())),
        Some(serde_json::json!({"authority": "a!", "b64": "AAH+"}))
    );
    assert_eq!(
        md.value("custom", &["k"]),
        Some(&serde_json::json!("from-e1"))
    );
    let mut empty = crate::state::DynamicMetadata::default();
    apply_rules(&[], &tlvs, &mut empty);
    apply_rules(&rules, &[], &mut empty);
    assert!(empty.is_empty());
}
