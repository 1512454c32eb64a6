//! W3C `baggage` values through Istio's peer metadata parser
//! (`filters::istio::PeerInfo::from_baggage`, the waypoint's
//! `waypoint_downstream_peer_metadata` on ztunnel's CONNECT). Besides
//! "never panics" (any bytes, not only UTF-8):
//! - what a peer propagates parses back to the same namespace, cluster,
//!   workload, instance, region and zone;
//! - `baggage()` reaches its fixed point by the second round. Not the
//!   first: Istio's parser copies `app.name` into an empty service name
//!   (and `app.version` into an empty revision), so `app.name=a,
//!   service.name=` propagates `app.name=a`, which parses back to service
//!   `a` (found by this target; weir keeps Istio's behaviour);
//! - the filter-state string form renders, and the output stays bounded
//!   by the input (no amplification from defaults copied between fields).
#![no_main]

use filters::istio::PeerInfo;
use filters::state::StateObject;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let peer = PeerInfo::from_baggage(data);
    let once = peer.baggage();
    let back = PeerInfo::from_baggage(once.as_bytes());
    let plain = |p: &PeerInfo| {
        (
            p.namespace.clone(),
            p.cluster.clone(),
            p.workload.clone(),
            p.name.clone(),
            p.region.clone(),
            p.zone.clone(),
        )
    };
    assert_eq!(plain(&peer), plain(&back), "{data:?} -> {once:?}");
    let twice = back.baggage();
    let thrice = PeerInfo::from_baggage(twice.as_bytes()).baggage();
    assert_eq!(twice, thrice, "baggage() is not stable for {data:?}");
    let text = peer.serialize_as_string().unwrap_or_default();
    // Each byte of input lands in at most a few fields (service/app and
    // their versions default to each other), each rendered with its key;
    // lossy UTF-8 turns a byte into at most three.
    let bound = 4 * 3 * data.len() + 512;
    assert!(once.len() <= bound && text.len() <= bound, "{data:?}");
});
