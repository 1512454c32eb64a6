//! Calls from filters to a cluster (Envoy's `AsyncClient` /
//! `Grpc::AsyncClient` over `envoy_grpc.cluster_name` or an `http_service`'s
//! `server_uri.cluster`): ext_authz, the rate-limit service, remote JWKS.
//!
//! Filters see only the [`Callouts`] trait; the proxy implements it over its
//! cluster manager (endpoint selection, the cluster's transport socket and
//! upstream protocol). A chain built without one ([`FilterChain::build`])
//! gets [`NoCallouts`], whose calls fail with
//! [`CalloutError::ClusterNotFound`].
//!
//! [`FilterChain::build`]: crate::FilterChain::build
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

/// A whole request to send (bodies are small: check requests, JWKS GETs).
#[derive(Debug, Clone)]
pub struct CalloutRequest {
    pub method: http::Method,
    /// Path and query, e.g. `/envoy.service.auth.v3.Authorization/Check`.
    pub path_and_query: String,
    /// `:authority` / `host` (Envoy: the cluster name unless configured).
    pub authority: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A whole response (body collected up to the caller's limit).
#[derive(Debug, Clone)]
pub struct CalloutResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// Trailers (gRPC status for gRPC calls); empty when none came.
    pub trailers: http::HeaderMap,
}

/// Why a call produced no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutError {
    /// No such cluster in the current configuration.
    ClusterNotFound,
    /// The cluster has no host to send to.
    NoHealthyUpstream,
    /// Connecting or the exchange failed (reset, TLS, protocol error).
    Failed(String),
    /// The whole call took longer than its timeout.
    Timeout,
    /// The response body was larger than the caller's limit.
    BodyTooLarge,
}

impl std::fmt::Display for CalloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CalloutError::ClusterNotFound => f.write_str("cluster not found"),
            CalloutError::NoHealthyUpstream => f.write_str("no healthy upstream"),
            CalloutError::Failed(e) => write!(f, "upstream call failed: {e}"),
            CalloutError::Timeout => f.write_str("timeout"),
            CalloutError::BodyTooLarge => f.write_str("response body too large"),
        }
    }
}

pub type CalloutFuture =
    Pin<Box<dyn Future<Output = Result<CalloutResponse, CalloutError>> + Send + 'static>>;

/// Sends requests to clusters on behalf of filters.
pub trait Callouts: Send + Sync + std::fmt::Debug {
    /// Sends `req` to a host of `cluster` with the cluster's protocol and
    /// transport; the whole exchange (connect, response head, body of at
    /// most `max_body` bytes, trailers) is bounded by `timeout`.
    fn send(
        &self,
        cluster: &str,
        req: CalloutRequest,
        timeout: Duration,
        max_body: usize,
    ) -> CalloutFuture;
}

/// For chains built without a proxy (tests, benches): every call fails
/// with [`CalloutError::ClusterNotFound`].
#[derive(Debug, Default)]
pub struct NoCallouts;

impl Callouts for NoCallouts {
    fn send(&self, _: &str, _: CalloutRequest, _: Duration, _: usize) -> CalloutFuture {
        Box::pin(async { Err(CalloutError::ClusterNotFound) })
    }
}
