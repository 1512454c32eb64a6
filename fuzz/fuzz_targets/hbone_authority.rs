//! The HBONE CONNECT authority as weir turns it into an address (Envoy's
//! address object factory, `filters::state::AddressObject::parse`, what
//! istiod's `connect_authority` filter runs on `%REQ(:AUTHORITY)%`).
//! Besides "never panics":
//! - an address parses back from its own string form to itself;
//! - on text made only of digits, hex letters, `.`, `:`, `[` and `]` (no
//!   sign, space or scope, where the factory's grammar and the standard
//!   library's `SocketAddr` grammar are the same language), both agree.
#![no_main]

use std::net::SocketAddr;

use filters::state::AddressObject;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let parsed = AddressObject::parse(s);
    if let Some(a) = parsed {
        let text = a.0.to_string();
        assert_eq!(
            AddressObject::parse(&text),
            Some(a),
            "{s:?} -> {text:?} does not parse back"
        );
    }
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'[' | b']'));
    if plain {
        let std = s.parse::<SocketAddr>().ok();
        assert_eq!(parsed.map(|a| a.0), std, "{s:?}");
    }
});
