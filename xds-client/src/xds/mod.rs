//! The xDS client: resource types and their translation
//! ([`resources`]), the accepted dynamic state and its assembly into
//! snapshots with warming ([`state`]), and the gRPC / filesystem
//! subscriptions that feed it ([`client`]).
pub mod client;
pub mod resources;
pub mod state;

pub use client::{Connector, Event, XdsClient, XdsIo};
pub use resources::{Endpoints, Resource, ResourceType};
pub use state::DynamicState;
