//! Arbitrary strings through Envoy's substitution-format parser. Besides
//! "never panics", checks the literal-only invariant: text without `%` parses
//! to itself as a single literal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xds_client::config::FormatPart;
use xds_client::translate::parse_format;

fuzz_target!(|s: &str| {
    let parsed = parse_format(s);
    if !s.contains('%') {
        let f = parsed.expect("text without '%' always parses");
        match f.parts.as_slice() {
            [] => assert!(s.is_empty()),
            [FormatPart::Literal(l)] => assert_eq!(l, s),
            other => panic!("literal-only {s:?} parsed to {other:?}"),
        }
    }
});
