//! The HTTP connection manager: connections, the request pipeline, headers,
//! routing actions and local replies.
mod connect;
pub mod headers;
pub mod info;
pub mod local_reply;
pub mod redirect;
pub mod router;
pub mod server;
pub mod service;
pub mod tracing;
pub mod wire;
