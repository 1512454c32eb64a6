//! Envoy's local replies: status, body text and response flag.
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;

/// Builds a local reply as Envoy does: `content-type: text/plain` when there
/// is a body.
pub fn reply(status: u16, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(bytes::Bytes::from_static(body.as_bytes())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

pub fn reply_owned(
    status: u16,
    body: bytes::Bytes,
    content_type: Option<&'static str>,
) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if len > 0 {
        if let Some(ct) = content_type {
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        }
    }
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

pub const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
pub const UPSTREAM_TIMEOUT: &str = "upstream request timeout";
