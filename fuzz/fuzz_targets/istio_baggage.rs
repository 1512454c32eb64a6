//! W3C `baggage` values through Istio's peer metadata parser
//! (`filters::istio::PeerInfo::from_baggage`, the waypoint's
//! `waypoint_downstream_peer_metadata` on ztunnel's CONNECT). Besides
//! "never panics" (any bytes, not only UTF-8):
//! - what a peer propagates parses back to a peer that propagates the
//!   same value (`baggage()` is a fixed point after one round);
//! - the filter-state string form renders, and the output stays bounded
//!   by the input (no amplification from defaults copied between fields).
#![no_main]

use filters::istio::PeerInfo;
use filters::state::StateObject;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let peer = PeerInfo::from_baggage(data);
    let once = peer.baggage();
    let again = PeerInfo::from_baggage(once.as_bytes()).baggage();
    assert_eq!(once, again, "baggage() is not stable for {data:?}");
    let text = peer.serialize_as_string().unwrap_or_default();
    // Each byte of input lands in at most a few fields (service/app and
    // their versions default to each other), each rendered with its key;
    // lossy UTF-8 turns a byte into at most three.
    let bound = 4 * 3 * data.len() + 512;
    assert!(once.len() <= bound && text.len() <= bound, "{data:?}");
});
