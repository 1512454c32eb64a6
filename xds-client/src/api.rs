//! Envoy's generated protobuf types (`envoy-types`), re-exported.
pub use envoy_types::pb::*;
