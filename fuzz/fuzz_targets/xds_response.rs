//! Arbitrary bytes as a sequence of xDS responses through the client's
//! dynamic state: decode -> `unwrap_any` -> `DynamicState::apply` (per
//! resource decode, supported-field check and translation, cross-resource
//! checks) -> `wanted` / `note_wanted` -> `assemble` (warming, EDS merge).
//! Any resource may be rejected; nothing may panic; an incremental
//! assembly (after an EDS-only change) must equal a full one.
//!
//! Input: `mode, frame*`.
//! - `mode` bit 0: delta (`DeltaDiscoveryResponse`) rather than state of the
//!   world (`DiscoveryResponse`); bit 1: after every response, expire the
//!   initial fetches as if a day had passed.
//! - a frame: `type, len_hi, len_lo, len bytes` (fewer when the input ends
//!   first); `type % 6` picks the resource type (`ResourceType::ALL`: CDS,
//!   EDS, LDS, RDS, SDS, WDS) the response is applied as, whatever its
//!   `type_url` says.
//!
//! So later frames update, replace (SotW of LDS/CDS) or remove (delta)
//! what earlier ones added. Finally everything held is removed again.
//!
//! Bounded: inputs over 64 KiB are skipped, at most 8 frames and 64
//! resources (and 64 removed names) per response are used.
#![no_main]

#[path = "common/xds_frames.rs"]
mod xds_frames;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xds_client::api::envoy::service::discovery::v3::DiscoveryResponse;
use xds_client::config::Snapshot;
use xds_client::xds::resources::unwrap_any;
use xds_client::xds::state::Applied;
use xds_client::xds::{DynamicState, ResourceType};
use xds_frames::{delta_changes, next_frame, MAX_FRAMES, MAX_RESOURCES};

const MAX_INPUT: usize = 64 * 1024;

/// ADS for LDS/CDS, plus static resources the dynamic ones can collide
/// with or refer to: the ADS cluster, an EDS cluster fed over ADS, and a
/// listener on 127.0.0.1:10000 whose routes come over RDS.
const BOOTSTRAP: &str = r#"
node: {id: fuzz, cluster: fuzz}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
  lds_config: {ads: {}, resource_api_version: V3}
  cds_config: {ads: {}, resource_api_version: V3}
static_resources:
  listeners:
  - name: static
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: static
          rds:
            route_config_name: static_routes
            config_source: {ads: {}, resource_api_version: V3}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18000}}}
  - name: static_eds
    type: EDS
    connect_timeout: 1s
    eds_cluster_config:
      eds_config: {ads: {}, resource_api_version: V3}
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
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let delta = mode & 1 != 0;
    let expire = mode & 2 != 0;

    let mut st = DynamicState::new(base());
    for _ in 0..MAX_FRAMES {
        let [sel, tail @ ..] = rest else {
            break;
        };
        let rt = ResourceType::ALL[usize::from(*sel) % ResourceType::ALL.len()];
        rest = tail;
        let Some(body) = next_frame(&mut rest) else {
            break;
        };
        let applied = if delta {
            let Some((resources, removed)) = delta_changes(body) else {
                continue;
            };
            st.apply(rt, &resources, &removed, false)
        } else {
            let Ok(resp) = DiscoveryResponse::decode(body) else {
                continue;
            };
            // As the client: a bad `Resource` wrapper is NACKed, the others
            // are applied.
            let resources: xds_frames::Resources = resp
                .resources
                .iter()
                .take(MAX_RESOURCES)
                .filter_map(|a| unwrap_any(a).ok())
                .map(|(n, a)| (n, a, resp.version_info.clone()))
                .collect();
            st.apply(rt, &resources, &[], rt.wildcard())
        };
        settle(&mut st, rt, &applied, expire);
    }

    // Remove everything again: an empty SotW response of each wildcard
    // type, or a delta response removing every name held.
    for rt in ResourceType::ALL {
        let applied = if delta {
            let held: Vec<String> = st.versions(rt).into_keys().collect();
            st.apply(rt, &[], &held, false)
        } else if rt.wildcard() {
            st.apply(rt, &[], &[], true)
        } else {
            continue;
        };
        settle(&mut st, rt, &applied, expire);
    }
});

/// What the client does after applying a response: re-subscribe (which
/// drops by-name resources nobody wants any more) and re-assemble.
fn settle(st: &mut DynamicState, rt: ResourceType, applied: &Applied, expire: bool) {
    let _ = applied.error_detail();
    if expire {
        st.expire(Instant::now() + Duration::from_secs(86_400));
    }
    let w = st.wanted();
    st.note_wanted(&w);
    let (snap, change) = st.assemble();
    // An incremental assembly (EDS only) equals a full one of the same state.
    if change != xds_client::xds::state::Change::Full {
        let warming_inc = st.warming_clusters.clone();
        st.invalidate();
        let (full, _) = st.assemble();
        assert_eq!(*full, *snap, "incremental assembly differs from a full one");
        assert_eq!(st.warming_clusters, warming_inc);
    }
    let _ = st.versions(rt);
    let _ = st.init_done();
    let _ = st.next_deadline();
}
