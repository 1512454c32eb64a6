//! Where dynamic configuration comes from: the bootstrap's
//! `dynamic_resources` and every `ConfigSource` a resource names.
use std::{path::PathBuf, time::Duration};

use super::Name;

/// A `ConfigSource`: how one kind of resource is fetched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigSource {
    pub kind: SourceKind,
    /// `initial_fetch_timeout` (default 15 s; `0s` = wait forever).
    pub initial_fetch_timeout: Option<Duration>,
}

/// The transport of a [`ConfigSource`]. Ordered and hashable: resources
/// are grouped into streams by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// `ads: {}`: the bootstrap's `ads_config` stream.
    Ads,
    /// `api_config_source` with `GRPC` / `DELTA_GRPC`: a stream of its own
    /// per resource type to an `envoy_grpc` cluster.
    Grpc(ApiSource),
    /// `path_config_source` / `path`: a file holding a `DiscoveryResponse`,
    /// watched for changes.
    Path(PathBuf),
}

/// A gRPC xDS server: `ads_config` or an `api_config_source`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiSource {
    /// Where the server is.
    pub target: GrpcTarget,
    /// `:authority` for the requests (`envoy_grpc.authority`, default the
    /// cluster name).
    pub authority: String,
    /// `DELTA_GRPC` (incremental) rather than `GRPC` (state of the world).
    pub delta: bool,
    pub set_node_on_first_message_only: bool,
}

/// How a gRPC xDS server is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GrpcTarget {
    /// `envoy_grpc.cluster_name`: a static cluster (TCP or Unix socket
    /// endpoints, TLS when its transport socket says so).
    Cluster(Name),
    /// `google_grpc.target_uri` without credentials: `host:port`,
    /// `ipv4:host:port`, `unix:PATH` or `unix:///PATH`.
    Uri(String),
}

impl std::fmt::Display for GrpcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrpcTarget::Cluster(c) => write!(f, "cluster {c}"),
            GrpcTarget::Uri(u) => write!(f, "{u}"),
        }
    }
}

/// The bootstrap's `dynamic_resources`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DynamicConfig {
    /// `ads_config`.
    pub ads: Option<ApiSource>,
    /// `lds_config`.
    pub lds: Option<ConfigSource>,
    /// `cds_config`.
    pub cds: Option<ConfigSource>,
    /// The config source of the `istio.workload.BootstrapExtension`
    /// bootstrap extension: workload discovery (WDS, always `ads`).
    pub wds: Option<ConfigSource>,
}

impl DynamicConfig {
    /// Whether anything is fetched dynamically.
    pub fn is_empty(&self) -> bool {
        self.ads.is_none() && self.lds.is_none() && self.cds.is_none() && self.wds.is_none()
    }
}

/// A route configuration fetched by RDS.
#[derive(Debug, Clone, PartialEq)]
pub struct Rds {
    pub name: Name,
    pub source: ConfigSource,
}

/// A secret fetched by SDS, referenced by a TLS context.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SdsRef {
    pub name: Name,
    pub source: ConfigSource,
}
