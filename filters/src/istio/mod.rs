//! Istio's telemetry filters: peer metadata
//! (`io.istio.http.peer_metadata.Config`, [`peer_metadata`]) and
//! `istio.stats` ([`stats`]), as istio/proxy's native filters.
use std::sync::{Arc, PoisonError, RwLock};

pub mod alpn;
pub mod mx;
pub mod peer;
pub mod peer_metadata;
pub mod stats;
pub mod workloads;

pub use peer::PeerInfo;

/// Filter state key of the downstream peer (Istio's `downstream_peer`).
pub const DOWNSTREAM_PEER: &str = "downstream_peer";
/// Filter state key of the upstream peer (Istio's `upstream_peer`).
pub const UPSTREAM_PEER: &str = "upstream_peer";

/// This proxy's node, as Istio's filters read it from Envoy's `LocalInfo`.
#[derive(Debug, Default)]
pub struct LocalNode {
    /// `node.id`.
    pub id: String,
    /// `node.metadata`.
    pub metadata: serde_json::Value,
    /// `node.locality.region` (propagated when the metadata has no `REGION`).
    pub region: String,
    /// `node.locality.zone` (likewise for `AVAILABILITY_ZONE`).
    pub zone: String,
    /// The metadata as Istio's peer object (for `istio.stats` labels).
    pub peer: PeerInfo,
}

impl LocalNode {
    pub fn new(node: &xds_client::config::Node) -> LocalNode {
        LocalNode {
            id: node.id.clone(),
            metadata: node.metadata.clone(),
            region: node.region.clone(),
            zone: node.zone.clone(),
            peer: PeerInfo::from_json(&node.metadata, &[]),
        }
    }
}

/// The node (process-wide, as Envoy's `LocalInfo`: the bootstrap's node
/// never changes while the proxy runs).
static LOCAL_NODE: RwLock<Option<Arc<LocalNode>>> = RwLock::new(None);

/// Sets the node the Istio filters report (the proxy does, at startup).
pub fn set_local_node(node: &xds_client::config::Node) {
    *LOCAL_NODE.write().unwrap_or_else(PoisonError::into_inner) =
        Some(Arc::new(LocalNode::new(node)));
}

/// The node set by [`set_local_node`] (empty before).
pub fn local_node() -> Arc<LocalNode> {
    LOCAL_NODE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .unwrap_or_default()
}
