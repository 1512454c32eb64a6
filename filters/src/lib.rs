//! weir's HTTP filter chain: a phase trait with a factory/instance split.
//!
//! A [`HttpFilterFactory`] is built once per listener config (validation and
//! precomputation happen there); it creates a cheap [`HttpFilter`] instance
//! per request. The chain runs decode phases in order and encode phases in
//! reverse, as Envoy. The router is the terminal filter: the proxy forwards
//! the request upstream when every decoder has continued.
#![forbid(unsafe_code)]

pub mod buffer;
pub mod callout;
pub mod compressor;
pub mod cors;
pub mod ext_authz;
pub mod fault;
pub mod format;
pub mod grpc_stats;
pub mod header_mutation;
pub mod health_check;
pub mod http;
pub mod istio;
pub mod jwt_authn;
pub mod listener;
pub mod local_ratelimit;
pub mod network;
pub mod ratelimit;
pub mod rbac;
pub mod router;
pub mod set_filter_state;
pub mod state;
pub mod token_bucket;

pub use http::*;
pub use state::{
    AddressObject, ApplicationProtocols, DynamicMetadata, FilterState, HashableStringValue,
    StateFlags, StateObject, StringValue,
};
