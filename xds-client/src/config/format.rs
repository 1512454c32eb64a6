//! Envoy's substitution format strings (`%REQ(x)%`, `%START_TIME%`, ...),
//! parsed once at config time; evaluation lives in the proxy.
use http::HeaderName;

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Format {
    pub parts: Vec<FormatPart>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FormatPart {
    Literal(String),
    Op(Operator),
}

/// A command operator. `max_len` truncates the value (`%REQ(x):10%`).
#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    pub cmd: Command,
    pub max_len: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `%REQ(X?Y)%`: request header X, else Y.
    Req(HeaderKey, Option<HeaderKey>),
    /// `%RESP(X?Y)%`.
    Resp(HeaderKey, Option<HeaderKey>),
    /// `%TRAILER(X?Y)%` (response trailers).
    Trailer(HeaderKey, Option<HeaderKey>),
    /// `%START_TIME%` or `%START_TIME(strftime)%`.
    StartTime(Option<String>),
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    ResponseFlagsLong,
    BytesReceived,
    BytesSent,
    Duration,
    RequestDuration,
    ResponseDuration,
    UpstreamServiceTime,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    UpstreamLocalAddressWithoutPort,
    UpstreamLocalPort,
    UpstreamRemoteAddress,
    UpstreamRemoteAddressWithoutPort,
    UpstreamTransportFailureReason,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamDirectRemoteAddress,
    DownstreamDirectRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    RequestedServerName,
    DownstreamPeerUriSan,
    DownstreamPeerDnsSan,
    DownstreamPeerSubject,
    DownstreamPeerIssuer,
    DownstreamPeerFingerprint256,
    DownstreamPeerSerial,
    DownstreamPeerCert,
    DownstreamLocalUriSan,
    DownstreamLocalDnsSan,
    DownstreamLocalSubject,
    DownstreamTlsVersion,
    DownstreamTlsCipher,
    /// The upstream TLS connection's certificates (`%UPSTREAM_PEER_*%`,
    /// `%UPSTREAM_LOCAL_*%`).
    UpstreamPeerUriSan,
    UpstreamPeerDnsSan,
    UpstreamPeerSubject,
    UpstreamPeerIssuer,
    UpstreamLocalUriSan,
    UpstreamLocalDnsSan,
    RouteName,
    Hostname,
    ConnectionId,
    UpstreamRequestAttemptCount,
    /// `%UPSTREAM_METADATA(["namespace", "key", ...])%`.
    UpstreamMetadata(String, Vec<String>),
    /// `%DYNAMIC_METADATA(namespace:key...)%`.
    DynamicMetadata(String, Vec<String>),
    /// `%FILTER_STATE(KEY:PLAIN)%` / `%FILTER_STATE(KEY)%` (TYPED): a
    /// filter state object's string form, or (TYPED) its JSON form.
    FilterState {
        key: String,
        plain: bool,
    },
    /// `%ENVIRONMENT(X)%`: resolved at config time, as Envoy does.
    Environment(String),
    /// `%REQUEST_HEADERS_BYTES%` etc. are not here: unknown commands are rejected.
    Method,
    Path,
}

/// A header or pseudo-header named in `%REQ(...)%`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderKey {
    Name(HeaderName),
    Method,
    Path,
    Authority,
    Scheme,
    Status,
}

impl HeaderKey {
    /// Parses a header name; `:method`, `:path`, `:authority`, `:scheme`,
    /// `:status` are pseudo-headers. `host` reads `:authority` (as Envoy).
    pub fn parse(s: &str) -> Option<HeaderKey> {
        let lower = s.trim().to_ascii_lowercase();
        Some(match lower.as_str() {
            ":method" => HeaderKey::Method,
            ":path" => HeaderKey::Path,
            ":authority" | "host" => HeaderKey::Authority,
            ":scheme" => HeaderKey::Scheme,
            ":status" => HeaderKey::Status,
            other => HeaderKey::Name(HeaderName::from_bytes(other.as_bytes()).ok()?),
        })
    }
}

impl Format {
    /// A format made of one literal.
    pub fn literal(s: impl Into<String>) -> Self {
        Format {
            parts: vec![FormatPart::Literal(s.into())],
        }
    }

    /// True when the format has no operators.
    pub fn is_literal(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p, FormatPart::Literal(_)))
    }
}
