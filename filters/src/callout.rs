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

/// What filters ask of the proxy: requests to clusters, and the server's
/// own facts (the health_check filter's).
pub trait Callouts: Send + Sync + std::fmt::Debug {
    /// The server was told to fail health checks (admin
    /// `/healthcheck/fail`; Envoy's `healthCheckFailed()`).
    fn health_check_failed(&self) -> bool;

    /// The local node's cluster name (`node.cluster`, `--service-cluster`).
    fn local_cluster(&self) -> String;

    /// The workloads of workload discovery (WDS) for peer metadata's
    /// `workload_discovery`; `None` without a proxy.
    fn workloads(&self) -> Option<crate::istio::workloads::Workloads> {
        None
    }

    /// A cluster's `(membership_total, membership_healthy)`; `None` when
    /// there is no such cluster.
    fn cluster_membership(&self, cluster: &str) -> Option<(u64, u64)>;

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
    fn health_check_failed(&self) -> bool {
        false
    }
    fn local_cluster(&self) -> String {
        String::new()
    }
    fn cluster_membership(&self, _: &str) -> Option<(u64, u64)> {
        None
    }
    fn send(&self, _: &str, _: CalloutRequest, _: Duration, _: usize) -> CalloutFuture {
        Box::pin(async { Err(CalloutError::ClusterNotFound) })
    }
}

/// A failed gRPC call: its `grpc-status` (a transport failure is
/// `UNAVAILABLE`, 14; a timeout `DEADLINE_EXCEEDED`, 4) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcError {
    pub status: u32,
    pub message: String,
}

impl std::fmt::Display for GrpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "grpc-status {}: {}", self.status, self.message)
    }
}

/// gRPC status codes this module produces.
pub mod grpc_status {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// The largest gRPC response accepted (Envoy's async client has no limit
/// by default; this bounds memory per call).
pub const GRPC_MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// One unary gRPC call (Envoy's `Grpc::AsyncClient::send`) of `method`
/// (`/pkg.Service/Method`) on `cluster` with `:authority` `authority`:
/// the message in one uncompressed 5-byte-prefixed frame,
/// `content-type: application/grpc`, `te: trailers`, `grpc-timeout` from
/// `timeout` (which also bounds the call), `metadata` as extra headers.
/// The status comes from the trailers, or from the headers of a
/// trailers-only response; a non-200 HTTP status without one maps as
/// Envoy's `Http::Utility::httpToGrpcStatus`.
pub fn grpc_unary<Req, Resp>(
    callouts: &dyn Callouts,
    cluster: &str,
    authority: &str,
    method: &str,
    msg: &Req,
    timeout: Duration,
    metadata: &[(http::HeaderName, http::HeaderValue)],
) -> impl Future<Output = Result<Resp, GrpcError>> + Send + 'static
where
    Req: prost::Message,
    Resp: prost::Message + Default + 'static,
{
    let len = msg.encoded_len();
    let mut body = Vec::with_capacity(5 + len);
    body.push(0u8);
    body.extend_from_slice(&(len as u32).to_be_bytes());
    // A Vec grows as needed: encoding into it cannot fail.
    let _ = msg.encode(&mut body);
    let mut headers = http::HeaderMap::with_capacity(4 + metadata.len());
    for (k, v) in metadata {
        headers.append(k.clone(), v.clone());
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    if let Ok(v) = http::HeaderValue::from_str(&format!("{}m", timeout.as_millis().max(1))) {
        headers.insert("grpc-timeout", v);
    }
    let req = CalloutRequest {
        method: http::Method::POST,
        path_and_query: method.to_owned(),
        authority: authority.to_owned(),
        headers,
        body: Bytes::from(body),
    };
    let call = callouts.send(cluster, req, timeout, GRPC_MAX_RESPONSE);
    async move {
        let resp = call.await.map_err(|e| GrpcError {
            status: match e {
                CalloutError::Timeout => grpc_status::DEADLINE_EXCEEDED,
                CalloutError::BodyTooLarge => grpc_status::RESOURCE_EXHAUSTED,
                _ => grpc_status::UNAVAILABLE,
            },
            message: e.to_string(),
        })?;
        grpc_decode(&resp)
    }
}

/// The message of a whole gRPC response, or its error status.
pub fn grpc_decode<Resp: prost::Message + Default>(
    resp: &CalloutResponse,
) -> Result<Resp, GrpcError> {
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().parse::<u32>().unwrap_or(grpc_status::UNKNOWN))
    };
    let message_of = |h: &http::HeaderMap| {
        h.get("grpc-message")
            .map(|v| percent_decode(v.as_bytes()))
            .unwrap_or_default()
    };
    if resp.status != http::StatusCode::OK {
        let (status, message) = match status_of(&resp.headers) {
            Some(s) => (s, message_of(&resp.headers)),
            None => (
                http_to_grpc_status(resp.status.as_u16()),
                format!("upstream HTTP status {}", resp.status.as_u16()),
            ),
        };
        return Err(GrpcError { status, message });
    }
    let (status, message) = match status_of(&resp.trailers) {
        Some(s) => (s, message_of(&resp.trailers)),
        None => match status_of(&resp.headers) {
            Some(s) => (s, message_of(&resp.headers)),
            None => (grpc_status::UNKNOWN, "no grpc-status".to_owned()),
        },
    };
    if status != grpc_status::OK {
        return Err(GrpcError { status, message });
    }
    let internal = |m: &str| GrpcError {
        status: grpc_status::INTERNAL,
        message: m.to_owned(),
    };
    let b = &resp.body[..];
    if b.len() < 5 {
        return Err(internal("missing response message"));
    }
    if b[0] != 0 {
        return Err(internal("compressed response message"));
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if b.len() - 5 != len {
        return Err(internal("malformed response frame"));
    }
    Resp::decode(&b[5..]).map_err(|e| internal(&format!("cannot decode response: {e}")))
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
pub fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => grpc_status::INTERNAL,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => grpc_status::UNAVAILABLE,
        _ => grpc_status::UNKNOWN,
    }
}

/// `grpc-message` is percent-encoded.
fn percent_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
    ) -> CalloutResponse {
        let map = |kv: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in kv {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    http::HeaderValue::from_str(v).expect("value"),
                );
            }
            h
        };
        CalloutResponse {
            status: http::StatusCode::from_u16(status).expect("status"),
            headers: map(headers),
            body: Bytes::copy_from_slice(body),
            trailers: map(trailers),
        }
    }

    #[test]
    fn decodes_a_framed_message_with_ok_trailers() {
        // google.protobuf.StringValue("hi"): field 1, length 2.
        let body = [0, 0, 0, 0, 4, 0x0a, 2, b'h', b'i'];
        let r: String = grpc_decode(&resp(200, &[], &body, &[("grpc-status", "0")])).expect("ok");
        assert_eq!(r, "hi");
    }

    #[test]
    fn statuses_from_trailers_only_and_http() {
        let e = grpc_decode::<String>(&resp(
            200,
            &[("grpc-status", "7"), ("grpc-message", "no%20way")],
            b"",
            &[],
        ))
        .expect_err("denied");
        assert_eq!((e.status, e.message.as_str()), (7, "no way"));
        let e = grpc_decode::<String>(&resp(503, &[], b"", &[])).expect_err("503");
        assert_eq!(e.status, grpc_status::UNAVAILABLE);
        let e = grpc_decode::<String>(&resp(
            200,
            &[],
            &[0, 0, 0, 0, 9, 1],
            &[("grpc-status", "0")],
        ))
        .expect_err("short");
        assert_eq!(e.status, grpc_status::INTERNAL);
    }

    #[test]
    fn no_callouts_is_unavailable() {
        let f = grpc_unary::<String, String>(
            &NoCallouts,
            "c",
            "c",
            "/a.B/C",
            &"x".to_owned(),
            Duration::from_millis(5),
            &[],
        );
        let e = futures_util::FutureExt::now_or_never(f)
            .expect("ready")
            .expect_err("no cluster");
        assert_eq!(e.status, grpc_status::UNAVAILABLE);
    }
}
