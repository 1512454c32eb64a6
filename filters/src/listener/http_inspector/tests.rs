use super::*;

fn done(buf: &[u8]) -> HttpDetect {
    match inspect(buf) {
        Inspect::Done(d) => d,
        Inspect::NeedMore => panic!("{:?}: need more", String::from_utf8_lossy(buf)),
    }
}

/// Feeds `input` one byte at a time: every proper prefix before the deciding
/// byte needs more, and every longer prefix gives the final answer.
fn byte_by_byte(input: &[u8]) -> HttpDetect {
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
    want
}

#[test]
fn http11_request_line() {
    assert_eq!(
        byte_by_byte(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        HttpDetect::Http11
    );
    assert_eq!(byte_by_byte(b"GET / HTTP/1.1\n"), HttpDetect::Http11);
    assert_eq!(HttpDetect::Http11.alpn(), Some("http/1.1"));
}

#[test]
fn decided_at_the_newline() {
    let line = b"GET /index.html HTTP/1.1\r\n";
    for end in 0..line.len() {
        assert_eq!(inspect(&line[..end]), Inspect::NeedMore, "{end}");
    }
    assert_eq!(inspect(line), Inspect::Done(HttpDetect::Http11));
}

#[test]
fn http10_and_other_versions() {
    assert_eq!(byte_by_byte(b"GET / HTTP/1.0\r\n"), HttpDetect::Http10);
    // As Envoy: any other valid version, or none (HTTP/0.9), is http/1.0.
    assert_eq!(byte_by_byte(b"GET / HTTP/0.9\r\n"), HttpDetect::Http10);
    assert_eq!(byte_by_byte(b"GET / HTTP/2.0\r\n"), HttpDetect::Http10);
    assert_eq!(byte_by_byte(b"GET / HTTP/1.2\r\n"), HttpDetect::Http10);
    assert_eq!(byte_by_byte(b"GET /\r\n"), HttpDetect::Http10);
    assert_eq!(byte_by_byte(b"GET /\n"), HttpDetect::Http10);
    assert_eq!(byte_by_byte(b"GET / \r\n"), HttpDetect::Http10);
    assert_eq!(HttpDetect::Http10.alpn(), Some("http/1.0"));
}

#[test]
fn h2_preface() {
    let mut input = HTTP2_PREFACE.to_vec();
    input.extend_from_slice(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00");
    for end in 0..HTTP2_PREFACE.len() {
        assert_eq!(inspect(&input[..end]), Inspect::NeedMore, "{end}");
    }
    assert_eq!(byte_by_byte(&input), HttpDetect::Http2);
    assert_eq!(HttpDetect::Http2.alpn(), Some("h2c"));
}

#[test]
fn preface_lookalike_parses_as_http1() {
    // Diverges from the preface after its first line: as Envoy, the line
    // `PRI * HTTP/2.0` is then a valid HTTP/1 request line (custom method,
    // asterisk target, version 2.0), hence http/1.0.
    assert_eq!(
        byte_by_byte(b"PRI * HTTP/2.0\r\n\r\nXY\r\n\r\n"),
        HttpDetect::Http10
    );
    assert_eq!(byte_by_byte(b"PRI * HTTP/1.1\r\n"), HttpDetect::Http11);
}

#[test]
fn methods() {
    for m in [
        "GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND", "X-CUSTOM", "get",
    ] {
        let line = format!("{m} / HTTP/1.1\r\n");
        assert_eq!(done(line.as_bytes()), HttpDetect::Http11, "{m}");
    }
    assert_eq!(done(b"G(T / HTTP/1.1\r\n"), HttpDetect::NotHttp);
}

#[test]
fn targets() {
    let ok: &[&str] = &[
        "/",
        "/a/b?c=d&e=%20#frag",
        "*",
        "http://example.com/x",
        "http://",
        "https://user:pw@example.com:8443/p",
        "svn+ssh://h/",
        "h2c-x.y://h?q",
        "http://[::1]:80/",
    ];
    for t in ok {
        let line = format!("GET {t} HTTP/1.1\r\n");
        assert_eq!(done(line.as_bytes()), HttpDetect::Http11, "{t}");
    }
    let bad: &[&str] = &[
        "example.com",
        "http:/x",
        "http:x",
        "1http://h/",
        "http://a@@b/",
        "http://a b/",
        "http://a\"b/",
        "/caf\u{e9}",
    ];
    for t in bad {
        let line = format!("GET {t} HTTP/1.1\r\n");
        assert_eq!(done(line.as_bytes()), HttpDetect::NotHttp, "{t}");
    }
}

#[test]
fn connect_authority_form() {
    assert_eq!(
        byte_by_byte(b"CONNECT example.com:443 HTTP/1.1\r\n"),
        HttpDetect::Http11
    );
    assert_eq!(done(b"CONNECT [::1]:443 HTTP/1.1\r\n"), HttpDetect::Http11);
    assert_eq!(done(b"CONNECT /path HTTP/1.1\r\n"), HttpDetect::Http11);
    // Authority form is only for CONNECT.
    assert_eq!(
        done(b"GET example.com:443 HTTP/1.1\r\n"),
        HttpDetect::NotHttp
    );
    // As Envoy's isUrlValid, CONNECT parses no scheme: `http:` is read as a
    // host and `//h/` as the path, which is valid.
    assert_eq!(done(b"CONNECT http://h/ HTTP/1.1\r\n"), HttpDetect::Http11);
    assert_eq!(done(b"CONNECT a@@b:1 HTTP/1.1\r\n"), HttpDetect::NotHttp);
    assert_eq!(done(b"CONNECT a\"b:1 HTTP/1.1\r\n"), HttpDetect::NotHttp);
}

#[test]
fn whitespace() {
    assert_eq!(done(b"GET  /   HTTP/1.1\r\n"), HttpDetect::Http11);
    assert_eq!(done(b"GET\t/\tHTTP/1.1\r\n"), HttpDetect::Http11);
    assert_eq!(done(b"GET / HTTP/1.1 \t\r\n"), HttpDetect::Http11);
    // As Envoy: a first line starting with CR or LF is not HTTP.
    assert_eq!(done(b"\r\nGET / HTTP/1.1\r\n"), HttpDetect::NotHttp);
    assert_eq!(done(b"\n"), HttpDetect::NotHttp);
    assert_eq!(done(b" GET / HTTP/1.1\r\n"), HttpDetect::NotHttp);
    // A CR must end the line.
    assert_eq!(done(b"GET / HTTP/1.1\rX\n"), HttpDetect::NotHttp);
}

#[test]
fn malformed_lines() {
    for line in [
        &b"GET\r\n"[..],
        b"GET \r\n",
        b"GET / HTTP/1.1 extra\r\n",
        b"GET / HTTP/1\r\n",
        b"GET / HTTP/1.10\r\n",
        b"GET / HTTPS/1.1\r\n",
        b"GET / http/1.1\r\n",
        b"GET / HTTP/a.1\r\n",
        b"GET / HTTP/1.1\x00\r\n",
    ] {
        assert_eq!(
            done(line),
            HttpDetect::NotHttp,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn not_http_decided_early() {
    // TLS, SSH, SMTP-ish and binary data are rejected without waiting for a
    // newline.
    assert_eq!(
        inspect(b"\x16\x03\x01\x02\x00"),
        Inspect::Done(HttpDetect::NotHttp)
    );
    assert_eq!(inspect(b"SSH-2.0-OpenSSH_9.6"), Inspect::NeedMore); // still a plausible method
    assert_eq!(
        inspect(b"SSH-2.0-OpenSSH_9.6\r\n"),
        Inspect::Done(HttpDetect::NotHttp)
    );
    assert_eq!(inspect(b"GET /\x01"), Inspect::Done(HttpDetect::NotHttp));
    assert_eq!(inspect(b"GET http:x"), Inspect::Done(HttpDetect::NotHttp));
    assert_eq!(
        inspect(b"GET / HTTP/1.1X"),
        Inspect::Done(HttpDetect::NotHttp)
    );
    assert_eq!(inspect(b"GET / X"), Inspect::Done(HttpDetect::NotHttp));
    assert_eq!(HttpDetect::NotHttp.alpn(), None);
}

#[test]
fn empty_needs_more() {
    assert_eq!(inspect(b""), Inspect::NeedMore);
    assert_eq!(inspect(b"G"), Inspect::NeedMore);
    assert_eq!(inspect(b"P"), Inspect::NeedMore); // preface or method
}

#[test]
fn request_line_too_long() {
    let mut line = b"GET /".to_vec();
    line.resize(MAX_INSPECT_SIZE - 1, b'a');
    assert_eq!(inspect(&line), Inspect::NeedMore);
    line.push(b'a');
    assert_eq!(
        inspect(&line),
        Inspect::Done(HttpDetect::RequestLineTooLong)
    );
    line.extend_from_slice(b" HTTP/1.1\r\n");
    // The newline is past the window: still too long.
    assert_eq!(
        inspect(&line),
        Inspect::Done(HttpDetect::RequestLineTooLong)
    );
    assert_eq!(HttpDetect::RequestLineTooLong.alpn(), None);

    // A line ending right at the limit is fine.
    let mut line = b"GET /".to_vec();
    line.resize(MAX_INSPECT_SIZE - b" HTTP/1.1\r\n".len(), b'a');
    line.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(line.len(), MAX_INSPECT_SIZE);
    assert_eq!(inspect(&line), Inspect::Done(HttpDetect::Http11));
}

#[test]
fn every_pending_state_can_still_complete() {
    // For a few prefixes that need more, some completion makes them HTTP:
    // NeedMore never hides a certain rejection.
    let cases: &[(&[u8], &[u8])] = &[
        (b"G", b" / HTTP/1.1\r\n"),
        (b"GET ", b"/ HTTP/1.1\r\n"),
        (b"GET h", b"://x HTTP/1.1\r\n"),
        (b"GET http:", b"// HTTP/1.1\r\n"),
        (b"GET http:/", b"/ HTTP/1.1\r\n"),
        (b"GET / H", b"TTP/1.1\r\n"),
        (b"GET / HTTP/1.", b"1\r\n"),
        (b"GET / HTTP/1.1", b"\r\n"),
        (b"GET / HTTP/1.1\r", b"\n"),
        (b"CONNECT a", b":1 HTTP/1.1\r\n"),
    ];
    for (prefix, rest) in cases {
        assert_eq!(
            inspect(prefix),
            Inspect::NeedMore,
            "{:?}",
            String::from_utf8_lossy(prefix)
        );
        let full = [*prefix, *rest].concat();
        assert!(
            done(&full).alpn().is_some(),
            "{:?}",
            String::from_utf8_lossy(&full)
        );
    }
}
