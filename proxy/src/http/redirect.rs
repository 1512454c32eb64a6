//! Internal redirects (`RouteAction.internal_redirect_policy`): a 3xx
//! upstream response the router follows itself, as Envoy's
//! `Filter::setupRedirect` and `convertRequestHeadersForInternalRedirect`.
//!
//! The router keeps the request as it forwarded it ([`Source`]); when the
//! chosen response is a redirect the policy covers, [`convert`] checks
//! Envoy's conditions in Envoy's order and builds the next request, which
//! the connection manager runs through the whole pipeline again (Envoy
//! recreates the stream: new route, filters, cluster).
use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use xds_client::config::{InternalRedirectPolicy, RedirectPredicate};

use super::headers::XFP;

/// `x-envoy-original-url`: the URL of the request a redirect replaced
/// (set again by each redirect, as Envoy).
pub static X_ENVOY_ORIGINAL_URL: http::HeaderName =
    http::HeaderName::from_static("x-envoy-original-url");

/// The request as the router forwarded it, kept while a redirect may follow.
pub struct Source {
    pub head: http::request::Parts,
    /// The whole request body, when it was complete and within the buffer
    /// limit (else the redirect is not followed, as Envoy).
    pub body: Option<Bytes>,
}

/// The next request of a followed redirect.
pub struct Next {
    pub head: http::request::Parts,
    pub body: Bytes,
    /// The redirect's status (what the recreated stream logs).
    pub status: u16,
    /// The cluster of the new route, when it names one (Envoy's recreated
    /// stream logs it: its route was refreshed).
    pub cluster: Option<std::sync::Arc<str>>,
}

/// What the redirects of one downstream request share across its
/// recreated streams (Envoy keeps it in request-lifespan filter state).
#[derive(Default)]
pub struct State {
    /// Redirects followed so far.
    pub count: u32,
    /// `previous_routes`: the routes already targeted, per owning route.
    previous: HashMap<String, HashSet<String>>,
    /// The request to run next, once a redirect is followed.
    pub next: Option<Next>,
    /// The first pass's edge processing: as Envoy, a recreated stream's
    /// headers are not sanitized again (no second x-forwarded-for entry,
    /// `x-envoy-original-url` kept).
    pub edge: Option<super::headers::Edge>,
}

/// Why a redirect was not followed: the router stat counting it
/// (`http.<prefix>.passthrough_internal_redirect_*`), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Request incomplete, body over the buffer limit, or no `location`.
    Unavailable,
    BadLocation,
    UnsafeScheme,
    TooManyRedirects,
    NoRoute,
    Predicate,
}

/// A parsed absolute `location` (Envoy's `Http::Utility::Url`).
struct Url<'a> {
    scheme: &'a str,
    host_and_port: &'a str,
    path_and_query: String,
}

fn parse_url(s: &str) -> Option<Url<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+')
    {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host_and_port = &rest[..end];
    if host_and_port.is_empty() {
        return None;
    }
    let mut path_and_query = &rest[end..];
    // The fragment is dropped (Envoy would reject it on the new request).
    if let Some(i) = path_and_query.find('#') {
        path_and_query = &path_and_query[..i];
    }
    if !path_and_query.starts_with('/') {
        return Some(Url {
            scheme,
            host_and_port,
            path_and_query: format!("/{path_and_query}"),
        });
    }
    Some(Url {
        scheme,
        host_and_port,
        path_and_query: path_and_query.to_owned(),
    })
}

/// Whether the downstream request is plain HTTP (Envoy's `schemeIsHttp`:
/// `x-forwarded-proto` when set, else the connection).
fn downstream_is_http(headers: &HeaderMap, conn_scheme: &str) -> bool {
    match headers.get(&XFP).map(|v| v.as_bytes()) {
        Some(v) if v.eq_ignore_ascii_case(b"http") => true,
        Some(v) if v.eq_ignore_ascii_case(b"https") => false,
        _ => conn_scheme != "https",
    }
}

/// Envoy's `convertRequestHeadersForInternalRedirect` (and the request
/// checks of `setupRedirect`): the next request, or why not.
///
/// `route_of` finds the route the new request would take (its name), as
/// Envoy re-resolves the route; `owner` is the name of the route whose
/// policy this is; `status` the redirect's status code.
#[allow(clippy::too_many_arguments)]
pub fn convert(
    policy: &InternalRedirectPolicy,
    src: Source,
    status: u16,
    response: &HeaderMap,
    conn_scheme: &str,
    owner: &str,
    state: &mut State,
    route_of: impl FnOnce(&http::request::Parts, &str) -> Option<(String, Option<std::sync::Arc<str>>)>,
) -> Result<Next, Refused> {
    let Some(body) = src.body else {
        return Err(Refused::Unavailable);
    };
    let Some(location) = response.get(header::LOCATION) else {
        return Err(Refused::Unavailable);
    };
    let location = location.to_str().map_err(|_| Refused::BadLocation)?;
    if location.is_empty() {
        return Err(Refused::BadLocation);
    }
    let url = parse_url(location).ok_or(Refused::BadLocation)?;
    let mut head = src.head;
    let scheme_is_http = downstream_is_http(&head.headers, conn_scheme);
    let target_is_http = url.scheme.eq_ignore_ascii_case("http");
    if !policy.allow_cross_scheme && scheme_is_http != target_is_http {
        return Err(Refused::UnsafeScheme);
    }
    if state.count >= policy.max_redirects {
        return Err(Refused::TooManyRedirects);
    }
    let original_host = head
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| head.uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let original_path = head
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    for name in &policy.headers_to_copy {
        let values: Vec<HeaderValue> = response.get_all(name).iter().cloned().collect();
        head.headers.remove(name);
        for v in values {
            head.headers.append(name.clone(), v);
        }
    }
    let host = HeaderValue::from_str(url.host_and_port).map_err(|_| Refused::BadLocation)?;
    let pq: http::uri::PathAndQuery = url
        .path_and_query
        .parse()
        .map_err(|_| Refused::BadLocation)?;
    head.headers.insert(header::HOST, host);
    head.uri = http::Uri::from(pq);
    let Some((route_name, cluster)) = route_of(&head, url.host_and_port) else {
        return Err(Refused::NoRoute);
    };
    for p in &policy.predicates {
        let ok = match p {
            RedirectPredicate::PreviousRoutes(_) => state
                .previous
                .entry(owner.to_owned())
                .or_default()
                .insert(route_name.clone()),
            RedirectPredicate::AllowListed(names) => names.contains(&route_name),
            RedirectPredicate::SafeCrossScheme => !scheme_is_http || target_is_http,
        };
        if !ok {
            return Err(Refused::Predicate);
        }
    }
    let mut body = body;
    // RFC 7231 6.4.4: a 303 is followed with GET, without a body.
    if status == 303 && head.method != Method::GET && head.method != Method::HEAD {
        head.method = Method::GET;
        head.headers.remove(header::CONTENT_LENGTH);
        body = Bytes::new();
    }
    state.count += 1;
    let scheme = if scheme_is_http { "http" } else { "https" };
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{original_host}{original_path}")) {
        head.headers.insert(X_ENVOY_ORIGINAL_URL.clone(), v);
    }
    Ok(Next {
        head,
        body,
        status,
        cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_locations_only() {
        let u = parse_url("http://h:1/p?q#f").expect("absolute");
        assert_eq!((u.scheme, u.host_and_port), ("http", "h:1"));
        assert_eq!(u.path_and_query, "/p?q");
        let u = parse_url("https://h").expect("absolute");
        assert_eq!(u.path_and_query, "/");
        assert!(parse_url("/relative").is_none());
        assert!(parse_url("http:///nohost").is_none());
    }
}
