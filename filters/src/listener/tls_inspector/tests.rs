use super::*;

mod captured;

// === a small ClientHello builder ===

#[derive(Clone)]
struct Hello {
    version: u16,
    session_id: Vec<u8>,
    ciphers: Vec<u8>,
    compression: Vec<u8>,
    /// `None` leaves out the extension block entirely.
    extensions: Option<Vec<(u16, Vec<u8>)>>,
}

impl Hello {
    fn new() -> Self {
        Hello {
            version: 0x0303,
            session_id: vec![7; 32],
            ciphers: vec![0x13, 0x01, 0xc0, 0x2f],
            compression: vec![0],
            extensions: Some(Vec::new()),
        }
    }

    fn ext(mut self, typ: u16, data: Vec<u8>) -> Self {
        self.extensions
            .get_or_insert_with(Vec::new)
            .push((typ, data));
        self
    }

    fn sni(self, name: &str) -> Self {
        self.ext(EXT_SERVER_NAME, sni_ext(0, name.as_bytes()))
    }

    fn alpn(self, names: &[&str]) -> Self {
        let mut list = Vec::new();
        for n in names {
            list.push(n.len() as u8);
            list.extend_from_slice(n.as_bytes());
        }
        self.ext(EXT_ALPN, u16_prefixed(&list))
    }

    fn versions(self, versions: &[u16]) -> Self {
        let list: Vec<u8> = versions.iter().flat_map(|v| v.to_be_bytes()).collect();
        let mut data = vec![list.len() as u8];
        data.extend_from_slice(&list);
        self.ext(EXT_SUPPORTED_VERSIONS, data)
    }

    fn body(&self) -> Vec<u8> {
        let mut b = self.version.to_be_bytes().to_vec();
        b.extend_from_slice(&[0x42; 32]);
        b.push(self.session_id.len() as u8);
        b.extend_from_slice(&self.session_id);
        b.extend_from_slice(&u16_prefixed(&self.ciphers));
        b.push(self.compression.len() as u8);
        b.extend_from_slice(&self.compression);
        if let Some(exts) = &self.extensions {
            let mut block = Vec::new();
            for (t, d) in exts {
                block.extend_from_slice(&t.to_be_bytes());
                block.extend_from_slice(&u16_prefixed(d));
            }
            b.extend_from_slice(&u16_prefixed(&block));
        }
        b
    }

    /// The handshake message: type, 24-bit length, body.
    fn message(&self) -> Vec<u8> {
        message(HANDSHAKE_CLIENT_HELLO, &self.body())
    }

    /// The message in one record.
    fn record(&self) -> Vec<u8> {
        records(&self.message(), MAX_RECORD_PAYLOAD)
    }
}

fn message(typ: u8, body: &[u8]) -> Vec<u8> {
    let len = body.len() as u32;
    let mut m = vec![typ, (len >> 16) as u8, (len >> 8) as u8, len as u8];
    m.extend_from_slice(body);
    m
}

fn u16_prefixed(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn sni_ext(name_type: u8, name: &[u8]) -> Vec<u8> {
    let mut entry = vec![name_type];
    entry.extend_from_slice(&u16_prefixed(name));
    u16_prefixed(&entry)
}

fn record(typ: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![typ, 3, 1];
    r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

/// Handshake records of at most `frag` payload bytes each.
fn records(msg: &[u8], frag: usize) -> Vec<u8> {
    msg.chunks(frag)
        .flat_map(|c| record(RECORD_HANDSHAKE, c))
        .collect()
}

fn done(buf: &[u8]) -> TlsDetect {
    match inspect(buf) {
        Inspect::Done(d) => d,
        Inspect::NeedMore => panic!("need more after {} bytes", buf.len()),
    }
}

fn tls(buf: &[u8]) -> ClientHelloInfo {
    match done(buf) {
        TlsDetect::Tls(info) => info,
        other => panic!("not tls: {other:?}"),
    }
}

fn malformed(buf: &[u8]) -> Malformed {
    match done(buf) {
        TlsDetect::Malformed(m) => m,
        other => panic!("not malformed: {other:?}"),
    }
}

/// Every prefix needs more or already gives the final verdict, and once
/// decided the verdict never changes. Returns the length at which it was
/// decided.
fn prefixes_agree(input: &[u8]) -> usize {
    let want = done(input);
    let mut decided_at = None;
    for end in 0..=input.len() {
        match inspect(&input[..end]) {
            Inspect::NeedMore => assert!(decided_at.is_none(), "undecided again at {end}"),
            Inspect::Done(d) => {
                assert_eq!(d, want, "prefix of {end} bytes");
                decided_at.get_or_insert(end);
            }
        }
    }
    decided_at.expect("decided")
}

// === tests ===

#[test]
fn captured_openssl_hello() {
    let hello = &captured::OPENSSL_CLIENT_HELLO[..];
    let info = tls(hello);
    assert_eq!(info.sni.as_deref(), Some("x.example.com"));
    assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(info.bytes_processed, hello.len());
    // Needs every byte, one TCP segment at a time.
    assert_eq!(prefixes_agree(hello), hello.len());
    // Bytes after the hello (early data, the next record) do not matter.
    let mut more = hello.to_vec();
    more.extend_from_slice(&record(20, &[1]));
    assert_eq!(tls(&more), info);
}

#[test]
fn captured_hello_refragmented() {
    // The same message cut into records of every size from 1 to 64 bytes.
    let msg = &captured::OPENSSL_CLIENT_HELLO[5..];
    let want = tls(&captured::OPENSSL_CLIENT_HELLO);
    for frag in 1..=64 {
        let buf = records(msg, frag);
        let info = tls(&buf);
        assert_eq!(info.sni, want.sni, "frag {frag}");
        assert_eq!(info.alpn, want.alpn, "frag {frag}");
        assert_eq!(info.bytes_processed, buf.len(), "frag {frag}");
    }
}

#[test]
fn built_hello() {
    let buf = Hello::new()
        .sni("api.example.org")
        .alpn(&["h2", "http/1.1"])
        .record();
    let info = tls(&buf);
    assert_eq!(info.sni.as_deref(), Some("api.example.org"));
    assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(info.bytes_processed, buf.len());
    prefixes_agree(&buf);
}

#[test]
fn handshake_split_across_records_and_segments() {
    let msg = Hello::new().sni("a.b").alpn(&["h2"]).message();
    // Two bytes per record splits even the 4-byte handshake header.
    for frag in [1, 2, 3, 5, 17, 100] {
        let buf = records(&msg, frag);
        assert_eq!(prefixes_agree(&buf), buf.len(), "frag {frag}");
        let info = tls(&buf);
        assert_eq!(info.sni.as_deref(), Some("a.b"));
        assert_eq!(info.alpn, vec![b"h2".to_vec()]);
    }
}

#[test]
fn hello_ends_inside_a_record() {
    // A record carrying the hello plus more handshake bytes: decided as soon
    // as the hello is complete, before the record is.
    let msg = Hello::new().sni("a.b").message();
    let mut payload = msg.clone();
    payload.extend_from_slice(&[0xaa; 50]);
    let buf = record(RECORD_HANDSHAKE, &payload);
    let decided = prefixes_agree(&buf);
    assert_eq!(decided, 5 + msg.len());
    assert_eq!(tls(&buf).bytes_processed, 5 + msg.len());
}

#[test]
fn not_tls() {
    assert_eq!(done(b"GET / HTTP/1.1\r\n"), TlsDetect::NotTls);
    assert_eq!(done(b"G"), TlsDetect::NotTls);
    assert_eq!(done(b"PRI * HTTP/2.0"), TlsDetect::NotTls);
    assert_eq!(done(b"SSH-2.0-x\r\n"), TlsDetect::NotTls);
    // Handshake type byte but an implausible record version.
    assert_eq!(done(&[0x16, 0x02]), TlsDetect::NotTls);
    assert_eq!(done(&[0x16, 0x00, 0x01]), TlsDetect::NotTls);
    // An alert or application data record first.
    assert_eq!(
        done(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
        TlsDetect::NotTls
    );
    assert_eq!(done(&[0x17, 0x03, 0x03]), TlsDetect::NotTls);
}

#[test]
fn sslv2_hello_is_not_tls() {
    // An SSLv2-compatible ClientHello (2-byte header with the high bit set,
    // msg type 1, version 3.1), as old clients sent.
    let v2 = [
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x39, 0x00,
        0x00, 0x38, 0x00, 0x00, 0x35, 0x00, 0x00, 0x16, 0x00, 0x00, 0x13, 0x00, 0x00, 0x0a, 0x07,
    ];
    assert_eq!(done(&v2), TlsDetect::NotTls);
    assert_eq!(done(&v2[..1]), TlsDetect::NotTls);
}

#[test]
fn need_more_on_short_prefixes() {
    assert_eq!(inspect(b""), Inspect::NeedMore);
    assert_eq!(inspect(&[0x16]), Inspect::NeedMore);
    assert_eq!(inspect(&[0x16, 0x03]), Inspect::NeedMore);
    assert_eq!(inspect(&[0x16, 0x03, 0x01, 0x00]), Inspect::NeedMore);
    assert_eq!(
        inspect(&[0x16, 0x03, 0x01, 0x00, 0x10, 0x01]),
        Inspect::NeedMore
    );
}

#[test]
fn record_overflow_decided_from_the_header() {
    assert_eq!(
        malformed(&[0x16, 0x03, 0x01, 0x40, 0x01]),
        Malformed::RecordOverflow
    );
    // 2^14 itself is fine.
    assert_eq!(inspect(&[0x16, 0x03, 0x01, 0x40, 0x00]), Inspect::NeedMore);
}

#[test]
fn not_a_client_hello() {
    // A ServerHello (type 2), decided from the handshake header alone.
    let buf = record(RECORD_HANDSHAKE, &message(2, &[0; 40]));
    assert_eq!(malformed(&buf[..9]), Malformed::NotClientHello);
    assert_eq!(prefixes_agree(&buf), 9);
    // The header may be split across records.
    let buf = records(&message(11, &[0; 40]), 3);
    assert_eq!(malformed(&buf), Malformed::NotClientHello);
}

#[test]
fn message_size_limit() {
    // Largest acceptable body: exactly 16 KiB, padded with a padding
    // extension (type 21); the message then needs two records.
    let base = Hello::new().sni("big.example.com").ext(21, Vec::new());
    let pad = MAX_CLIENT_HELLO_MESSAGE - base.body().len();
    let mut big = Hello::new().sni("big.example.com").ext(21, vec![0; pad]);
    assert_eq!(big.body().len(), MAX_CLIENT_HELLO_MESSAGE);
    let buf = records(&big.message(), MAX_RECORD_PAYLOAD);
    assert_eq!(tls(&buf).sni.as_deref(), Some("big.example.com"));

    // One byte more is refused as soon as the length is known.
    big.extensions.as_mut().expect("extensions")[1].1.push(0);
    let buf = records(&big.message(), MAX_RECORD_PAYLOAD);
    assert_eq!(malformed(&buf[..9]), Malformed::MessageTooLarge);
    assert_eq!(prefixes_agree(&buf), 9);
}

#[test]
fn too_large_after_max_client_hello_bytes() {
    // A 12 KiB hello in one-byte records takes 6 bytes per hello byte on the
    // wire, past the 64 KiB peek limit.
    let hello = Hello::new().ext(21, vec![0; 12 * 1024]).message();
    let buf = records(&hello, 1);
    assert!(buf.len() > MAX_CLIENT_HELLO);
    assert_eq!(inspect(&buf[..MAX_CLIENT_HELLO - 1]), Inspect::NeedMore);
    assert_eq!(done(&buf[..MAX_CLIENT_HELLO]), TlsDetect::TooLarge);
    assert_eq!(done(&buf), TlsDetect::TooLarge);
    // The same hello in records of 8 bytes fits.
    assert!(matches!(done(&records(&hello, 8)), TlsDetect::Tls(_)));
}

#[test]
fn unexpected_record_mid_hello() {
    let msg = Hello::new().sni("a.b").message();
    let (first, rest) = msg.split_at(20);
    let mut buf = record(RECORD_HANDSHAKE, first);
    buf.extend_from_slice(&record(21, &[2, 40])); // alert
    buf.extend_from_slice(&record(RECORD_HANDSHAKE, rest));
    assert_eq!(malformed(&buf), Malformed::UnexpectedRecord);

    // A second record with another record version major.
    let mut buf = record(RECORD_HANDSHAKE, first);
    let mut second = record(RECORD_HANDSHAKE, rest);
    second[1] = 2;
    buf.extend_from_slice(&second);
    assert_eq!(malformed(&buf), Malformed::UnexpectedRecord);
}

#[test]
fn empty_records() {
    let msg = Hello::new().sni("a.b").message();
    let mut buf = Vec::new();
    for _ in 0..MAX_EMPTY_RECORDS {
        buf.extend_from_slice(&record(RECORD_HANDSHAKE, &[]));
    }
    buf.extend_from_slice(&records(&msg, 10));
    assert_eq!(tls(&buf).sni.as_deref(), Some("a.b"));

    let mut buf = record(RECORD_HANDSHAKE, &[]);
    for _ in 0..MAX_EMPTY_RECORDS {
        buf.extend_from_slice(&record(RECORD_HANDSHAKE, &[]));
    }
    assert_eq!(malformed(&buf), Malformed::TooManyEmptyRecords);
}

#[test]
fn syntax_errors() {
    let ok = Hello::new().sni("a.b");
    assert!(matches!(done(&ok.record()), TlsDetect::Tls(_)));

    let mut h = ok.clone();
    h.session_id = vec![0; 33];
    assert_eq!(malformed(&h.record()), Malformed::Syntax);

    let mut h = ok.clone();
    h.ciphers = vec![0x13];
    assert_eq!(malformed(&h.record()), Malformed::Syntax);

    let mut h = ok.clone();
    h.ciphers = Vec::new();
    assert_eq!(malformed(&h.record()), Malformed::Syntax);

    let mut h = ok.clone();
    h.compression = Vec::new();
    assert_eq!(malformed(&h.record()), Malformed::Syntax);

    // Trailing bytes after the extension block.
    let mut body = ok.body();
    body.push(0);
    assert_eq!(
        malformed(&records(&message(1, &body), MAX_RECORD_PAYLOAD)),
        Malformed::Syntax
    );

    // Truncated: the handshake length ends inside the cipher suites.
    let body = ok.body();
    assert_eq!(
        malformed(&records(&message(1, &body[..40]), MAX_RECORD_PAYLOAD)),
        Malformed::Syntax
    );

    // An extension whose length runs past the block.
    let mut h = ok.clone();
    h.extensions = Some(vec![(EXT_ALPN, vec![0, 3, 2, b'h', b'2'])]);
    let mut body = h.body();
    let ext_len_at = body.len() - 5 - 2; // the ALPN extension's own length
    body[ext_len_at] = 0;
    body[ext_len_at + 1] = 9;
    assert_eq!(
        malformed(&records(&message(1, &body), MAX_RECORD_PAYLOAD)),
        Malformed::Syntax
    );
}

#[test]
fn duplicate_extensions() {
    let h = Hello::new().sni("a.b").alpn(&["h2"]).alpn(&["h2"]);
    assert_eq!(malformed(&h.record()), Malformed::DuplicateExtension);
    let h = Hello::new().ext(0xfafa, vec![]).ext(0xfafa, vec![1]);
    assert_eq!(malformed(&h.record()), Malformed::DuplicateExtension);
}

#[test]
fn server_name_rules() {
    // As sent: no lowercasing.
    let info = tls(&Hello::new().sni("Foo.Example.COM").record());
    assert_eq!(info.sni.as_deref(), Some("Foo.Example.COM"));

    // 255 bytes is the limit.
    let long = "a".repeat(255);
    assert_eq!(
        tls(&Hello::new().sni(&long).record()).sni.as_deref(),
        Some(long.as_str())
    );
    let too_long = "a".repeat(256);
    assert_eq!(
        malformed(&Hello::new().sni(&too_long).record()),
        Malformed::ServerName
    );

    for bad in [
        sni_ext(0, b""),
        sni_ext(1, b"a.b"),
        sni_ext(0, b"a\0b"),
        // Two names.
        {
            let mut list = vec![0];
            list.extend_from_slice(&u16_prefixed(b"a.b"));
            list.push(0);
            list.extend_from_slice(&u16_prefixed(b"c.d"));
            u16_prefixed(&list)
        },
        // Trailing byte after the list.
        {
            let mut e = sni_ext(0, b"a.b");
            e.push(0);
            e
        },
        // Empty extension.
        Vec::new(),
    ] {
        let h = Hello::new().ext(EXT_SERVER_NAME, bad.clone());
        assert_eq!(malformed(&h.record()), Malformed::ServerName, "{bad:?}");
    }

    // Not UTF-8: lossy.
    let h = Hello::new().ext(EXT_SERVER_NAME, sni_ext(0, b"caf\xe9.example"));
    assert_eq!(tls(&h.record()).sni.as_deref(), Some("caf\u{fffd}.example"));
}

#[test]
fn no_extensions_or_no_sni() {
    let mut h = Hello::new();
    h.extensions = None;
    let info = tls(&h.record());
    assert_eq!(info.sni, None);
    assert!(info.alpn.is_empty());

    let info = tls(&Hello::new().alpn(&["http/1.1"]).record());
    assert_eq!(info.sni, None);
    assert_eq!(info.alpn, vec![b"http/1.1".to_vec()]);
}

#[test]
fn malformed_alpn_is_ignored() {
    for bad in [
        vec![],
        vec![0, 0],
        vec![0, 1, 0],                // list of one empty name
        vec![0, 3, 2, b'h'],          // name runs past the list
        vec![0, 3, 2, b'h', b'2', 0], // trailing byte
        vec![0, 4, 2, b'h', b'2', 0], // empty second name
    ] {
        let h = Hello::new().sni("a.b").ext(EXT_ALPN, bad.clone());
        let info = tls(&h.record());
        assert!(info.alpn.is_empty(), "{bad:?}");
        assert_eq!(info.sni.as_deref(), Some("a.b"));
    }
}

#[test]
fn versions() {
    let tls12 = Hello::new();
    assert!(matches!(done(&tls12.record()), TlsDetect::Tls(_)));

    let mut tls10 = Hello::new();
    tls10.version = 0x0301;
    assert!(matches!(done(&tls10.record()), TlsDetect::Tls(_)));

    // SSLv3 only.
    let mut ssl3 = Hello::new();
    ssl3.version = 0x0300;
    assert_eq!(malformed(&ssl3.record()), Malformed::UnsupportedVersion);

    // supported_versions overrides the legacy field; GREASE and unknown
    // values are skipped.
    let mut h = Hello::new().versions(&[0x0a0a, 0x7f1c, 0x0304]);
    h.version = 0x0300;
    assert!(matches!(done(&h.record()), TlsDetect::Tls(_)));
    assert_eq!(
        malformed(&Hello::new().versions(&[0x0300]).record()),
        Malformed::UnsupportedVersion
    );
    assert_eq!(
        malformed(&Hello::new().versions(&[]).record()),
        Malformed::UnsupportedVersion
    );
    // Odd length.
    let h = Hello::new().ext(EXT_SUPPORTED_VERSIONS, vec![3, 0x03, 0x04, 0x03]);
    assert!(matches!(done(&h.record()), TlsDetect::Tls(_)));
    let h = Hello::new().ext(EXT_SUPPORTED_VERSIONS, vec![3, 0x0a, 0x0a, 0x03]);
    assert_eq!(malformed(&h.record()), Malformed::UnsupportedVersion);
}

#[test]
fn compression_methods() {
    let mut h = Hello::new();
    h.compression = vec![1];
    assert_eq!(malformed(&h.record()), Malformed::Compression);

    // TLS 1.2 accepts null among others...
    let mut h = Hello::new();
    h.compression = vec![1, 0];
    assert!(matches!(done(&h.record()), TlsDetect::Tls(_)));
    // ...TLS 1.3 only null alone.
    let mut h = Hello::new().versions(&[0x0304, 0x0303]);
    h.compression = vec![0, 1];
    assert_eq!(malformed(&h.record()), Malformed::Compression);
}

#[test]
fn malformed_display() {
    assert_eq!(
        Malformed::ServerName.to_string(),
        "invalid server_name extension"
    );
    assert_eq!(
        Malformed::RecordOverflow.to_string(),
        "tls record longer than 16384 bytes"
    );
}
