//! Arbitrary bytes through the HTTP inspector.
//!
//! Besides "never panics":
//! - prefix consistency: every prefix gives `NeedMore` or the verdict of
//!   the whole input (so rejecting a line before its `\n` is never wrong);
//! - a differential oracle: when the request line is complete, the verdict
//!   of the byte-at-a-time recognizer equals that of a straightforward
//!   reference (split the line into tokens, then check method, target and
//!   version as Envoy's Balsa parser does);
//! - `alpn()` is set exactly for the HTTP verdicts.
#![no_main]

use filters::listener::http_inspector::{inspect, HttpDetect, HTTP2_PREFACE, MAX_INSPECT_SIZE};
use filters::listener::Inspect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = inspect(data);
    if let Inspect::Done(d) = full {
        assert_eq!(
            d.alpn().is_some(),
            matches!(
                d,
                HttpDetect::Http10 | HttpDetect::Http11 | HttpDetect::Http2
            )
        );
        if d == HttpDetect::RequestLineTooLong {
            assert!(data.len() >= MAX_INSPECT_SIZE);
        }
    }
    if let Some(want) = reference(data) {
        assert_eq!(full, Inspect::Done(want), "reference disagrees");
    }
    for end in cut_points(data) {
        let p = inspect(&data[..end]);
        assert!(
            p == Inspect::NeedMore || p == full,
            "prefix of {end} bytes gave {p:?}, the whole input {full:?}"
        );
    }
});

/// The verdict when it can be told from whole tokens: the preface, or a
/// request line whose `\n` is within the inspected window. `None` otherwise.
fn reference(data: &[u8]) -> Option<HttpDetect> {
    let n = data.len().min(HTTP2_PREFACE.len());
    if data[..n] == HTTP2_PREFACE[..n] {
        return (n == HTTP2_PREFACE.len()).then_some(HttpDetect::Http2);
    }
    let window = &data[..data.len().min(MAX_INSPECT_SIZE)];
    let lf = window.iter().position(|&b| b == b'\n')?;
    Some(line_verdict(&window[..lf]))
}

fn line_verdict(line: &[u8]) -> HttpDetect {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    let mut end = line.len();
    while end > 0 && (ws(&line[end - 1]) || line[end - 1] == b'\r') {
        end -= 1;
    }
    let line = &line[..end];
    if line.is_empty() || ws(&line[0]) || line.contains(&b'\r') {
        return HttpDetect::NotHttp;
    }
    let tokens: Vec<&[u8]> = line.split(ws).filter(|t| !t.is_empty()).collect();
    let (method, target, version) = match tokens.as_slice() {
        [m, t] => (*m, *t, None),
        [m, t, v] => (*m, *t, Some(*v)),
        _ => return HttpDetect::NotHttp,
    };
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if !method.iter().all(tchar) || !url_valid(target, method == b"CONNECT") {
        return HttpDetect::NotHttp;
    }
    match version {
        None => HttpDetect::Http10,
        Some(v) => match v {
            [b'H', b'T', b'T', b'P', b'/', a, b'.', b]
                if a.is_ascii_digit() && b.is_ascii_digit() =>
            {
                if v == b"HTTP/1.1" {
                    HttpDetect::Http11
                } else {
                    HttpDetect::Http10
                }
            }
            _ => HttpDetect::NotHttp,
        },
    }
}

/// Envoy's `isUrlValid` (balsa_parser.cc), written out directly.
fn url_valid(url: &[u8], connect: bool) -> bool {
    let path_char = |b: &u8| (b'!'..=b'~').contains(b);
    let Some(first) = url.first() else {
        return false;
    };
    if *first == b'/' || *first == b'*' {
        return url[1..].iter().all(path_char);
    }
    let mut rest = url;
    if !connect {
        if !first.is_ascii_alphabetic() {
            return false;
        }
        let scheme_end = rest[1..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || b"+-.".contains(b)))
            .map_or(rest.len(), |p| p + 1);
        rest = &rest[scheme_end..];
        if !rest.starts_with(b"://") {
            return false;
        }
        rest = &rest[3..];
    }
    let host_end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    let (host, path) = rest.split_at(host_end);
    let host_char = |b: &u8| b.is_ascii_alphanumeric() || b"!$%&'()*+,-.:;=@[]_~".contains(b);
    host.iter().all(host_char) && !host.windows(2).any(|w| w == b"@@") && path.iter().all(path_char)
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
