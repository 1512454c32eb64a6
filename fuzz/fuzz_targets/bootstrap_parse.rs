//! Arbitrary bytes as a bootstrap: UTF-8 -> `parse_bootstrap` ->
//! `bootstrap_to_snapshot`. Any input may be rejected; none may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xds_client::bootstrap::{parse_bootstrap, ParseOptions};
use xds_client::translate::bootstrap_to_snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Strict first (as weir runs by default); when that rejects, the lenient
    // mode drops unknown fields, which lets more inputs reach translation.
    for allow_unknown_fields in [false, true] {
        let opts = ParseOptions {
            allow_unknown_fields,
        };
        if let Ok(b) = parse_bootstrap(text, opts) {
            let _ = bootstrap_to_snapshot(&b);
            return;
        }
    }
});
