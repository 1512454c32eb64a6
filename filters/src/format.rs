//! Request-time evaluation of substitution formats for filters
//! (`set_filter_state`): the operators whose value is known when a filter
//! sees the request headers. Translators accept only these
//! (`xds_client::translate::set_filter_state::request_time`); the proxy
//! evaluates full formats (access logs, header mutations) itself.
use xds_client::config::{Command, Format, FormatPart, HeaderKey};

use crate::FilterContext;

/// Renders `f` for the request `head`; an operator without a value
/// renders as `-`, as Envoy's text formatter does.
pub fn eval_request(f: &Format, cx: &FilterContext, head: &http::request::Parts) -> String {
    eval(f, cx, Some(head), None, "-")
}

/// Renders `f` with what a filter has: the request head (if kept) and, in
/// the response phase, the response head; an operator without a value
/// renders as `none_as` (`-` in values, empty in headers).
pub fn eval(
    f: &Format,
    cx: &FilterContext,
    req: Option<&http::request::Parts>,
    resp: Option<&http::response::Parts>,
    none_as: &str,
) -> String {
    let mut out = String::new();
    for p in &f.parts {
        match p {
            FormatPart::Literal(s) => out.push_str(s),
            FormatPart::Op(op) => {
                if let Some(mut v) = value(&op.cmd, cx, req, resp) {
                    if let Some(n) = op.max_len {
                        if v.len() > n {
                            let mut cut = n;
                            while !v.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            v.truncate(cut);
                        }
                    }
                    out.push_str(&v);
                } else {
                    out.push_str(none_as);
                }
            }
        }
    }
    out
}

fn header(k: &HeaderKey, head: &http::request::Parts) -> Option<String> {
    match k {
        HeaderKey::Name(n) => head
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        HeaderKey::Method => Some(head.method.as_str().to_owned()),
        HeaderKey::Path => head.uri.path_and_query().map(|p| p.as_str().to_owned()),
        HeaderKey::Authority => head
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| head.uri.authority().map(|a| a.as_str().to_owned())),
        HeaderKey::Scheme => head.uri.scheme_str().map(str::to_owned),
        HeaderKey::Status => None,
    }
}

fn resp_header(k: &HeaderKey, resp: &http::response::Parts) -> Option<String> {
    match k {
        HeaderKey::Name(n) => resp
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        HeaderKey::Status => Some(resp.status.as_u16().to_string()),
        _ => None,
    }
}

fn value(
    c: &Command,
    cx: &FilterContext,
    req: Option<&http::request::Parts>,
    resp: Option<&http::response::Parts>,
) -> Option<String> {
    let d = cx.downstream.as_deref();
    let remote = cx.downstream_remote.or(d.map(|d| d.remote));
    match c {
        Command::Req(k, alt) => {
            let head = req?;
            header(k, head).or_else(|| alt.as_ref().and_then(|a| header(a, head)))
        }
        Command::Resp(k, alt) => {
            let r = resp?;
            resp_header(k, r).or_else(|| alt.as_ref().and_then(|a| resp_header(a, r)))
        }
        Command::ResponseCode => resp.map(|r| r.status.as_u16().to_string()),
        Command::Protocol => Some(
            match req?.version {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_11 => "HTTP/1.1",
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_3 => "HTTP/3",
                _ => return None,
            }
            .to_owned(),
        ),
        Command::DownstreamRemoteAddress => remote.map(|a| a.to_string()),
        Command::DownstreamRemoteAddressWithoutPort => remote.map(|a| a.ip().to_string()),
        Command::DownstreamDirectRemoteAddress => d.map(|d| d.direct_remote.to_string()),
        Command::DownstreamDirectRemoteAddressWithoutPort => {
            d.map(|d| d.direct_remote.ip().to_string())
        }
        Command::DownstreamLocalAddress => d.map(|d| d.local.to_string()),
        Command::DownstreamLocalAddressWithoutPort => d.map(|d| d.local.ip().to_string()),
        Command::DownstreamLocalPort => d.map(|d| d.local.port().to_string()),
        Command::RequestedServerName => d.and_then(|d| d.sni.clone()),
        Command::DownstreamPeerUriSan => d
            .filter(|d| !d.peer_uri_sans.is_empty())
            .map(|d| d.peer_uri_sans.join(",")),
        Command::DownstreamPeerDnsSan => d
            .filter(|d| !d.peer_dns_sans.is_empty())
            .map(|d| d.peer_dns_sans.join(",")),
        Command::DownstreamPeerSubject => d
            .and_then(|d| d.peer_subject.clone())
            .filter(|s| !s.is_empty()),
        // The waypoint's `io.istio.local_principal`.
        Command::DownstreamLocalUriSan => d
            .filter(|d| !d.local_uri_sans.is_empty())
            .map(|d| d.local_uri_sans.join(",")),
        Command::RouteName => cx.route_name.as_deref().map(str::to_owned),
        Command::Hostname => Some(hostname().to_owned()),
        Command::ConnectionId => d.map(|d| d.connection_id.to_string()),
        Command::DynamicMetadata(ns, keys) => {
            let root = cx.metadata.namespace(ns)?;
            let Some((first, rest)) = keys.split_first() else {
                return Some(serde_json::Value::Object(root.clone()).to_string());
            };
            let mut v = root.get(first)?;
            for k in rest {
                v = v.get(k)?;
            }
            Some(match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }
        Command::FilterState { key, plain } => {
            let v = cx.filter_state_get(key)?;
            if *plain {
                v.serialize_as_string()
            } else {
                v.serialize_as_json()
            }
        }
        Command::Environment(v) => std::env::var(v).ok(),
        Command::Method => req.map(|h| h.method.as_str().to_owned()),
        Command::Path => req?.uri.path_and_query().map(|p| p.as_str().to_owned()),
        // Not request-time: rejected by the translators.
        _ => None,
    }
}

/// The machine's host name (`%HOSTNAME%`), read once.
pub fn hostname() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into())
    })
}

/// Renders `f` for a connection being accepted (the network
/// `set_filter_state`): the connection's addresses, SNI, filter state so
/// far; an operator without a value renders `-`.
pub fn eval_connection(
    f: &Format,
    conn: &crate::network::ConnectionInfo<'_>,
    state: &crate::FilterState,
) -> String {
    let mut out = String::new();
    for p in &f.parts {
        match p {
            FormatPart::Literal(s) => out.push_str(s),
            FormatPart::Op(op) => {
                let v = match &op.cmd {
                    Command::DownstreamRemoteAddress => Some(conn.remote.to_string()),
                    Command::DownstreamRemoteAddressWithoutPort => {
                        Some(conn.remote.ip().to_string())
                    }
                    Command::DownstreamDirectRemoteAddress => Some(conn.direct_remote.to_string()),
                    Command::DownstreamDirectRemoteAddressWithoutPort => {
                        Some(conn.direct_remote.ip().to_string())
                    }
                    Command::DownstreamLocalAddress => Some(conn.local.to_string()),
                    Command::DownstreamLocalAddressWithoutPort => Some(conn.local.ip().to_string()),
                    Command::DownstreamLocalPort => Some(conn.local.port().to_string()),
                    Command::RequestedServerName => conn.sni.map(str::to_owned),
                    Command::Hostname => Some(hostname().to_owned()),
                    Command::FilterState { key, plain } => state.get(key).and_then(|v| {
                        if *plain {
                            v.serialize_as_string()
                        } else {
                            v.serialize_as_json()
                        }
                    }),
                    Command::Environment(v) => std::env::var(v).ok(),
                    // Not known at a new connection: rejected by the translator.
                    _ => None,
                };
                match v {
                    Some(mut v) => {
                        if let Some(n) = op.max_len {
                            if v.len() > n {
                                let mut cut = n;
                                while !v.is_char_boundary(cut) {
                                    cut -= 1;
                                }
                                v.truncate(cut);
                            }
                        }
                        out.push_str(&v);
                    }
                    None => out.push('-'),
                }
            }
        }
    }
    out
}
