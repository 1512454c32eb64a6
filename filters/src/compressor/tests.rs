use std::io::Read;
use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Mutex,
};

use super::*;
use crate::http::{Gauge, ResponseBodyChain};
use xds_client::config::{
    BrotliConfig, BrotliMode, CompressorLibrary, GzipConfig, PerFilterConfig, PerFilterConfigs,
    ResponseDirection, ZstdConfig, DEFAULT_COMPRESSIBLE_TYPES,
};

#[derive(Debug, Default)]
struct Recorder(Mutex<HashMap<String, Arc<Cnt>>>);
use std::collections::HashMap;

#[derive(Debug, Default)]
struct Cnt(AtomicU64);
impl Counter for Cnt {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
}
impl Gauge for Cnt {
    fn inc(&self) {}
    fn dec(&self) {}
    fn value(&self) -> i64 {
        0
    }
}
impl StatsScope for Recorder {
    fn counter(&self, name: &str) -> Arc<dyn Counter> {
        self.0
            .lock()
            .expect("lock")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
    fn gauge(&self, _: &str) -> Arc<dyn Gauge> {
        Arc::new(Cnt::default())
    }
}
impl Recorder {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .expect("lock")
            .get(name)
            .map_or_else(|| panic!("no stat {name}"), |c| c.0.load(Relaxed))
    }
}

fn gzip() -> CompressorLibrary {
    CompressorLibrary::Gzip(GzipConfig {
        level: 6,
        window_bits: 12,
        memory_level: 5,
        chunk_size: 4096,
    })
}
fn brotli_lib() -> CompressorLibrary {
    CompressorLibrary::Brotli(BrotliConfig {
        quality: 3,
        window_bits: 18,
        input_block_bits: 24,
        chunk_size: 4096,
        disable_literal_context_modeling: false,
        mode: BrotliMode::Generic,
    })
}
fn zstd_lib() -> CompressorLibrary {
    CompressorLibrary::Zstd(ZstdConfig {
        level: 3,
        enable_checksum: true,
        strategy: 0,
        chunk_size: 4096,
    })
}

fn config(lib: CompressorLibrary) -> CompressorConfig {
    CompressorConfig {
        library_name: "lib".into(),
        library: lib,
        response: ResponseDirection {
            enabled: true,
            min_content_length: 30,
            content_types: DEFAULT_COMPRESSIBLE_TYPES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            disable_on_etag_header: false,
            remove_accept_encoding_header: false,
            explicit: false,
        },
        choose_first: false,
    }
}

/// A chain of compressor filters, built as `FilterChain::build` does.
fn chain(configs: Vec<(&str, CompressorConfig)>) -> (Vec<CompressorFactory>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = rec.clone();
    let all: Vec<HttpFilterConfig> = configs
        .into_iter()
        .map(|(n, c)| HttpFilterConfig {
            name: n.into(),
            kind: HttpFilterKind::Compressor(Arc::new(c)),
        })
        .collect();
    let factories = all
        .iter()
        .map(|f| match &f.kind {
            HttpFilterKind::Compressor(c) => CompressorFactory::new(&f.name, c, &all, &scope),
            _ => unreachable!(),
        })
        .collect();
    (factories, rec)
}

struct Outcome {
    head: http::response::Parts,
    body: Vec<u8>,
    req: http::request::Parts,
}

/// Request headers through the filters, then the response (headers and
/// body chunks) back through them in reverse order.
fn run(
    factories: &[CompressorFactory],
    route: &RouteView<'_>,
    req_headers: &[(&str, &str)],
    resp_headers: &[(&str, &str)],
    body: &[&[u8]],
) -> Outcome {
    let mut inst: Vec<Box<dyn HttpFilter>> =
        factories.iter().filter_map(|f| f.create(route)).collect();
    let mut rb = http::Request::get("/");
    for (k, v) in req_headers {
        rb = rb.header(*k, *v);
    }
    let (mut req, _) = rb.body(()).expect("request").into_parts();
    let mut cx = FilterContext::default();
    for f in inst.iter_mut() {
        assert!(matches!(
            f.on_request_headers(&mut cx, &mut req),
            Action::Continue
        ));
    }
    let mut resp = http::Response::builder().status(200);
    for (k, v) in resp_headers {
        resp = resp.header(*k, *v);
    }
    let (mut head, _) = resp.body(()).expect("response").into_parts();
    cx.end_stream = body.is_empty();
    for f in inst.iter_mut().rev() {
        assert!(matches!(
            f.on_response_headers(&mut cx, &mut head),
            Action::Continue
        ));
    }
    let mut out = Vec::new();
    if let Some(mut c) = ResponseBodyChain::new(inst) {
        for (i, b) in body.iter().enumerate() {
            out.extend_from_slice(&c.data(Bytes::copy_from_slice(b), i + 1 == body.len()));
        }
    } else {
        for b in body {
            out.extend_from_slice(b);
        }
    }
    Outcome {
        head,
        body: out,
        req,
    }
}

fn decode(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("gzip");
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("brotli");
        }
        Some("zstd") => out = zstd::decode_all(body).expect("zstd"),
        Some(other) => panic!("unexpected encoding {other}"),
    }
    out
}

const TEXT: &[(&str, &str)] = &[("content-type", "text/plain; charset=utf-8")];

fn payload() -> Vec<u8> {
    (0..200)
        .map(|i| format!("line {i} of a compressible body\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn each_library_round_trips_streamed_chunks() {
    let body = payload();
    let (a, b) = body.split_at(1000);
    for (lib, enc) in [(gzip(), "gzip"), (brotli_lib(), "br"), (zstd_lib(), "zstd")] {
        let (f, rec) = chain(vec![("c", config(lib))]);
        let o = run(
            &f,
            &RouteView::empty(),
            &[("accept-encoding", enc)],
            &[
                ("content-type", "text/plain"),
                ("content-length", &body.len().to_string()),
                ("etag", "\"strong\""),
            ],
            &[a, b],
        );
        assert_eq!(o.head.headers["content-encoding"], enc);
        assert!(!o.head.headers.contains_key("content-length"));
        assert!(!o.head.headers.contains_key("etag"), "strong etag dropped");
        assert_eq!(o.head.headers["vary"], "Accept-Encoding");
        assert_eq!(decode(Some(enc), &o.body), body, "{enc}");
        let p = format!("compressor.lib.{}", f[0].0.config.library.stats_prefix());
        assert_eq!(rec.get(&format!("{p}compressed")), 1);
        assert_eq!(rec.get(&format!("{p}header_compressor_used")), 1);
        assert_eq!(rec.get(&format!("{p}request.not_compressed")), 1);
        assert_eq!(
            rec.get(&format!("{p}total_uncompressed_bytes")),
            body.len() as u64
        );
        assert_eq!(
            rec.get(&format!("{p}total_compressed_bytes")),
            o.body.len() as u64
        );
        assert!(o.body.len() < body.len());
    }
}

#[test]
fn trailers_finish_the_stream_before_them() {
    let (f, _) = chain(vec![("c", config(gzip()))]);
    let mut inst = f[0].create(&RouteView::empty()).expect("instance");
    let (mut req, _) = http::Request::get("/")
        .header("accept-encoding", "gzip")
        .body(())
        .expect("req")
        .into_parts();
    let mut cx = FilterContext::default();
    inst.on_request_headers(&mut cx, &mut req);
    let (mut head, _) = http::Response::builder()
        .header("content-type", "application/json")
        .body(())
        .expect("resp")
        .into_parts();
    inst.on_response_headers(&mut cx, &mut head);
    let mut c = ResponseBodyChain::new(vec![inst]).expect("compressing");
    let body = payload();
    let mut out = c.data(Bytes::from(body.clone()), false).to_vec();
    let mut t = HeaderMap::new();
    out.extend_from_slice(&c.trailers(&mut t));
    assert_eq!(decode(Some("gzip"), &out), body);
}

#[test]
fn not_compressed_cases_count_their_stat() {
    let body = payload();
    let len = body.len().to_string();
    let (f, rec) = chain(vec![("c", config(gzip()))]);
    let p = "compressor.lib.gzip.";
    // No accept-encoding.
    let o = run(&f, &RouteView::empty(), &[], TEXT, &[&body[..]]);
    assert!(!o.head.headers.contains_key("content-encoding"));
    assert_eq!(o.head.headers["vary"], "Accept-Encoding");
    assert_eq!(decode(None, &o.body), body);
    assert_eq!(rec.get(&format!("{p}no_accept_header")), 1);
    // Too small: no accept stats at all, no vary.
    let o = run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip")],
        &[("content-type", "text/plain"), ("content-length", "10")],
        &[&b"0123456789"[..]],
    );
    assert!(!o.head.headers.contains_key("vary"));
    assert_eq!(rec.get(&format!("{p}content_length_too_small")), 1);
    // Not an allowed content type.
    let o = run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip")],
        &[("content-type", "image/png"), ("content-length", &len)],
        &[&body[..]],
    );
    assert!(!o.head.headers.contains_key("content-encoding"));
    assert_eq!(o.head.headers["content-length"], len.as_str());
    // Already encoded, no-transform.
    for h in [
        ("content-encoding", "br"),
        ("cache-control", "public, No-Transform"),
    ] {
        let o = run(
            &f,
            &RouteView::empty(),
            &[("accept-encoding", "gzip")],
            &[("content-type", "text/plain"), h],
            &[&body[..]],
        );
        assert_ne!(
            o.head.headers.get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"gzip"[..])
        );
    }
    // Identity preferred; q=0.
    run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip;q=0.5, identity")],
        TEXT,
        &[&body[..]],
    );
    assert_eq!(rec.get(&format!("{p}header_identity")), 1);
    run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip;q=0")],
        TEXT,
        &[&body[..]],
    );
    // The image/png response counted too: no compressor allowed for its
    // type leaves no valid choice (Envoy decides the encoding before it
    // looks at the other conditions).
    assert_eq!(rec.get(&format!("{p}header_not_valid")), 2);
    assert_eq!(rec.get(&format!("{p}header_compressor_used")), 2);
    // Bodyless responses are not compressed.
    run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip")],
        TEXT,
        &[],
    );
    // Every case above is counted as not compressed.
    assert_eq!(rec.get(&format!("{p}compressed")), 0);
    assert_eq!(rec.get(&format!("{p}not_compressed")), 8);
}

#[test]
fn etag_and_vary_handling() {
    let body = payload();
    let mut c = config(gzip());
    c.response.disable_on_etag_header = true;
    let (f, rec) = chain(vec![("c", c)]);
    let o = run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip")],
        &[("content-type", "text/plain"), ("etag", "W/\"weak\"")],
        &[&body[..]],
    );
    assert!(!o.head.headers.contains_key("content-encoding"));
    assert_eq!(rec.get("compressor.lib.gzip.not_compressed_etag"), 1);
    let (f, _) = chain(vec![("c", config(gzip()))]);
    let o = run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip")],
        &[
            ("content-type", "text/plain"),
            ("etag", "W/\"weak\""),
            ("vary", "origin"),
        ],
        &[&body[..]],
    );
    assert_eq!(o.head.headers["etag"], "W/\"weak\"", "weak etags stay");
    assert_eq!(o.head.headers["vary"], "origin, Accept-Encoding");
}

#[test]
fn negotiation_across_compressors() {
    let body = payload();
    let three = || {
        chain(vec![
            ("br", config(brotli_lib())),
            ("zs", config(zstd_lib())),
            ("gz", config(gzip())),
        ])
    };
    let enc = |accept: &str| {
        let (f, rec) = three();
        let o = run(
            &f,
            &RouteView::empty(),
            &[("accept-encoding", accept)],
            TEXT,
            &[&body[..]],
        );
        let e = o
            .head
            .headers
            .get("content-encoding")
            .map(|v| v.to_str().expect("ascii").to_owned());
        assert_eq!(decode(e.as_deref(), &o.body), body);
        (e, rec)
    };
    assert_eq!(enc("gzip, deflate, br, zstd").0.as_deref(), Some("gzip"));
    assert_eq!(enc("gzip;q=0.5, br;q=0.8").0.as_deref(), Some("br"));
    assert_eq!(enc("zstd;q=0.9, gzip;q=0.1").0.as_deref(), Some("zstd"));
    // The wildcard takes the first registered compressor.
    let (e, rec) = enc("*");
    assert_eq!(e.as_deref(), Some("br"));
    assert_eq!(rec.get("compressor.lib.brotli.header_wildcard"), 1);
    assert_eq!(rec.get("compressor.lib.gzip.header_wildcard"), 1);
    let (e, rec) = enc("deflate");
    assert_eq!(e, None);
    assert_eq!(rec.get("compressor.lib.gzip.header_not_valid"), 1);
    let (e, rec) = enc("br");
    assert_eq!(e.as_deref(), Some("br"));
    assert_eq!(
        rec.get("compressor.lib.gzip.header_compressor_overshadowed"),
        1
    );
    assert_eq!(rec.get("compressor.lib.brotli.header_compressor_used"), 1);
    // choose_first breaks q-value ties.
    let mut z = config(zstd_lib());
    z.choose_first = true;
    let (f, _) = chain(vec![("gz", config(gzip())), ("zs", z)]);
    let o = run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip, zstd")],
        TEXT,
        &[&body[..]],
    );
    assert_eq!(o.head.headers["content-encoding"], "zstd");
}

#[test]
fn per_route_disable_and_accept_encoding_removal() {
    let body = payload();
    let mut c = config(gzip());
    c.response.remove_accept_encoding_header = true;
    c.response.explicit = true;
    let (f, rec) = chain(vec![("c", c)]);
    let o = run(
        &f,
        &RouteView::empty(),
        &[("accept-encoding", "gzip")],
        TEXT,
        &[&body[..]],
    );
    assert!(!o.req.headers.contains_key("accept-encoding"));
    assert_eq!(o.head.headers["content-encoding"], "gzip");
    assert_eq!(rec.get("compressor.lib.gzip.response.compressed"), 1);

    let off = PerFilterConfigs(vec![(
        "c".into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Compressor(CompressorPerRoute {
                response_enabled: Some(false),
                remove_accept_encoding_header: None,
            })),
        },
    )]);
    let empty = PerFilterConfigs::default();
    let route = RouteView {
        per_filter: [&off, &empty, &empty],
        ..RouteView::empty()
    };
    let o = run(
        &f,
        &route,
        &[("accept-encoding", "gzip")],
        TEXT,
        &[&body[..]],
    );
    assert!(
        o.req.headers.contains_key("accept-encoding"),
        "kept when disabled"
    );
    assert!(!o.head.headers.contains_key("content-encoding"));
    assert!(!o.head.headers.contains_key("vary"));
    assert_eq!(rec.get("compressor.lib.gzip.response.not_compressed"), 1);
}
