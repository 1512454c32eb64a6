//! Arbitrary bytes as a sequence of delta WDS responses
//! (`istio.workload.Workload`) through the client's dynamic state and into
//! the peer index, as the proxy does after each change:
//! `DynamicState::apply` (decode, NACK of a bad resource) ->
//! `workloads` -> `WorkloadIndex::build` (reusing the previous index).
//!
//! Checks: nothing panics; every address of every held workload resolves
//! to the peer of a workload that claims it (the one on the local network
//! when there is one); the index holds exactly the distinct addresses of
//! the held workloads; lookups of addresses from the input do not panic.
//!
//! Input: frames `len_hi, len_lo, len bytes` of `DeltaDiscoveryResponse`
//! (at most 8 frames, 64 resources and 64 removed names each, 64 KiB in
//! all); finally every held workload is removed and the index must be
//! empty.
#![no_main]

#[path = "common/xds_frames.rs"]
mod xds_frames;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use filters::istio::workloads::{peer_of, WorkloadIndex};
use libfuzzer_sys::fuzz_target;
use xds_client::config::Snapshot;
use xds_client::xds::{DynamicState, ResourceType};
use xds_frames::{delta_changes, next_frame, MAX_FRAMES};

const MAX_INPUT: usize = 64 * 1024;
const LOCAL_NETWORK: &str = "net1";

const BOOTSTRAP: &str = r#"
node: {id: fuzz, cluster: fuzz, metadata: {NETWORK: net1}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
bootstrap_extensions:
- name: metadata_discovery
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/istio.workload.BootstrapExtension
    value: {config_source: {ads: {}}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18000}}}
"#;

fn base() -> Arc<Snapshot> {
    static BASE: OnceLock<Arc<Snapshot>> = OnceLock::new();
    BASE.get_or_init(|| {
        let (_, snap) = xds_client::load_bootstrap(Some(BOOTSTRAP), None, Default::default())
            .expect("the fuzz bootstrap is valid");
        Arc::new(snap)
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let mut st = DynamicState::new(base());
    let mut index = WorkloadIndex::default();
    let mut rest = data;
    for _ in 0..MAX_FRAMES {
        let Some(body) = next_frame(&mut rest) else {
            break;
        };
        let Some((resources, removed)) = delta_changes(body) else {
            continue;
        };
        let applied = st.apply(ResourceType::Workload, &resources, &removed, false);
        let _ = applied.error_detail();
        index = rebuild(&st, &index);
        // Lookups of whatever 4- and 16-byte windows the body holds.
        for w in body.windows(4).take(64) {
            let _ = index.get(IpAddr::from([w[0], w[1], w[2], w[3]]));
        }
    }
    let held: Vec<String> = st.versions(ResourceType::Workload).into_keys().collect();
    st.apply(ResourceType::Workload, &[], &held, false);
    let index = rebuild(&st, &index);
    assert!(index.is_empty() && index.workloads() == 0, "all removed");
});

/// The next index, checked against the workloads held.
fn rebuild(st: &DynamicState, prev: &WorkloadIndex) -> WorkloadIndex {
    let workloads = st.workloads();
    let index = WorkloadIndex::build(prev, &workloads, LOCAL_NETWORK);
    let mut distinct = HashSet::new();
    for w in &workloads {
        for ip in &w.addresses {
            let ip = ip.to_canonical();
            distinct.insert(ip);
            let got = index.get(ip).expect("every held address resolves");
            let claimants: Vec<_> = workloads
                .iter()
                .filter(|c| c.addresses.iter().any(|a| a.to_canonical() == ip))
                .collect();
            let local = claimants.iter().any(|c| c.network == LOCAL_NETWORK);
            assert!(
                claimants
                    .iter()
                    .filter(|c| !local || c.network == LOCAL_NETWORK)
                    .any(|c| peer_of(c) == **got),
                "the peer at {ip} is a claimant's (a local one when there is one)"
            );
        }
    }
    assert_eq!(index.len(), distinct.len());
    assert_eq!(index.workloads(), workloads.len());
    index
}
