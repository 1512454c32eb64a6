//! Per-request stream info (what access logs and `%VAR%` headers read) and
//! the format evaluator.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, Method};
use xds_client::config::{Command, Format, FormatPart, HeaderKey};

/// Facts about one request, filled in as it proceeds.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub start: SystemTime,
    pub start_instant: tokio::time::Instant,
    pub protocol: &'static str,
    pub method: Method,
    pub path: String,
    pub authority: String,
    pub scheme: &'static str,
    pub request_headers: Option<HeaderMap>,
    pub response_headers: Option<HeaderMap>,
    pub response_code: u16,
    pub response_code_details: &'static str,
    pub flags: Flags,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Option<Duration>,
    pub upstream_service_time: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<Arc<str>>,
    pub upstream_failure_reason: Option<String>,
    pub upstream_metadata: Option<serde_json::Value>,
    pub route_name: Option<Arc<str>>,
    pub downstream_remote: SocketAddr,
    pub downstream_direct_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub connection_id: u64,
    pub attempt_count: u32,
}

/// Envoy response flags, as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(pub u32);

impl Flags {
    pub const NR: u32 = 1;
    pub const UH: u32 = 1 << 1;
    pub const UF: u32 = 1 << 2;
    pub const URX: u32 = 1 << 3;
    pub const UT: u32 = 1 << 4;
    pub const UC: u32 = 1 << 5;
    pub const DC: u32 = 1 << 6;
    pub const LR: u32 = 1 << 7;
    pub const DPE: u32 = 1 << 8;
    pub const UPE: u32 = 1 << 9;
    pub const SI: u32 = 1 << 10;
    pub const DT: u32 = 1 << 11;
    pub const UMSDR: u32 = 1 << 12;
    pub const UO: u32 = 1 << 13;

    const NAMES: [(u32, &'static str, &'static str); 14] = [
        (Self::NR, "NR", "NoRouteFound"),
        (Self::UH, "UH", "NoHealthyUpstream"),
        (Self::UF, "UF", "UpstreamConnectionFailure"),
        (Self::URX, "URX", "UpstreamRetryLimitExceeded"),
        (Self::UT, "UT", "UpstreamRequestTimeout"),
        (Self::UC, "UC", "UpstreamConnectionTermination"),
        (Self::DC, "DC", "DownstreamConnectionTermination"),
        (Self::LR, "LR", "LocalReset"),
        (Self::DPE, "DPE", "DownstreamProtocolError"),
        (Self::UPE, "UPE", "UpstreamProtocolError"),
        (Self::SI, "SI", "StreamIdleTimeout"),
        (Self::DT, "DT", "DurationTimeout"),
        (Self::UMSDR, "UMSDR", "UpstreamMaxStreamDurationReached"),
        (Self::UO, "UO", "UpstreamOverflow"),
    ];

    pub fn set(&mut self, f: u32) {
        self.0 |= f;
    }

    /// `%RESPONSE_FLAGS%`: comma-separated short names, `-` when none.
    pub fn short(&self) -> String {
        self.render(false)
    }

    pub fn long(&self) -> String {
        self.render(true)
    }

    fn render(&self, long: bool) -> String {
        let mut out = String::new();
        for (bit, s, l) in Self::NAMES {
            if self.0 & bit != 0 {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(if long { l } else { s });
            }
        }
        if out.is_empty() {
            out.push('-');
        }
        out
    }

    /// Whether any of the named short flags is set (`response_flag_filter`).
    pub fn has_any(&self, names: &[String]) -> bool {
        if names.is_empty() {
            return self.0 != 0;
        }
        Self::NAMES
            .iter()
            .any(|(bit, s, _)| self.0 & bit != 0 && names.iter().any(|n| n == s))
    }
}

/// The local hostname for `%HOSTNAME%`.
pub fn hostname() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into())
    })
}

fn header_from(map: Option<&HeaderMap>, key: &HeaderKey, info: &StreamInfo) -> Option<String> {
    match key {
        HeaderKey::Method => Some(info.method.as_str().to_owned()),
        HeaderKey::Path => Some(info.path.clone()),
        HeaderKey::Authority => Some(info.authority.clone()),
        HeaderKey::Scheme => Some(info.scheme.to_owned()),
        HeaderKey::Status => Some(info.response_code.to_string()),
        HeaderKey::Name(n) => map
            .and_then(|m| m.get(n))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    }
}

/// Envoy's `%START_TIME%` default: `2024-01-02T03:04:05.678Z`.
pub fn format_time(t: SystemTime, fmt: Option<&str>) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let millis = d.subsec_millis();
    let (y, mo, da, h, mi, s) = civil(secs);
    match fmt {
        None => format!("{y:04}-{mo:02}-{da:02}T{h:02}:{mi:02}:{s:02}.{millis:03}Z"),
        Some(f) => {
            // A small strftime subset: %Y %m %d %H %M %S %s %3f %6f %9f %z %%.
            let mut out = String::new();
            let mut it = f.chars().peekable();
            while let Some(c) = it.next() {
                if c != '%' {
                    out.push(c);
                    continue;
                }
                match it.next() {
                    Some('Y') => {
                        let _ = write!(out, "{y:04}");
                    }
                    Some('m') => {
                        let _ = write!(out, "{mo:02}");
                    }
                    Some('d') => {
                        let _ = write!(out, "{da:02}");
                    }
                    Some('H') => {
                        let _ = write!(out, "{h:02}");
                    }
                    Some('M') => {
                        let _ = write!(out, "{mi:02}");
                    }
                    Some('S') => {
                        let _ = write!(out, "{s:02}");
                    }
                    Some('s') => {
                        let _ = write!(out, "{secs}");
                    }
                    Some('z') => out.push_str("+0000"),
                    Some('%') => out.push('%'),
                    Some(d @ ('3' | '6' | '9')) if it.peek() == Some(&'f') => {
                        it.next();
                        let nanos = d_nanos(d, t);
                        out.push_str(&nanos);
                    }
                    Some(o) => {
                        out.push('%');
                        out.push(o);
                    }
                    None => out.push('%'),
                }
            }
            out
        }
    }
}

fn d_nanos(d: char, t: SystemTime) -> String {
    let n = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    match d {
        '3' => format!("{:03}", n / 1_000_000),
        '6' => format!("{:06}", n / 1_000),
        _ => format!("{n:09}"),
    }
}

/// Days-from-civil inverse (UTC), no dependency needed.
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

fn addr_no_port(a: SocketAddr) -> String {
    a.ip().to_string()
}

fn metadata_lookup(root: Option<&serde_json::Value>, ns: &str, keys: &[String]) -> Option<String> {
    let mut v = root?.get(ns)?;
    for k in keys {
        v = v.get(k)?;
    }
    Some(match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Evaluates one command; `None` renders as `-` in text logs and is omitted
/// from headers.
pub fn eval(
    cmd: &Command,
    info: &StreamInfo,
    req: Option<&HeaderMap>,
    resp: Option<&HeaderMap>,
) -> Option<String> {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis().to_string());
    let req = req.or(info.request_headers.as_ref());
    let resp = resp.or(info.response_headers.as_ref());
    match cmd {
        Command::Req(k, alt) => header_from(req, k, info)
            .or_else(|| alt.as_ref().and_then(|a| header_from(req, a, info))),
        Command::Resp(k, alt) => header_from(resp, k, info)
            .or_else(|| alt.as_ref().and_then(|a| header_from(resp, a, info))),
        Command::Trailer(_, _) => None,
        Command::StartTime(f) => Some(format_time(info.start, f.as_deref())),
        Command::Protocol => Some(info.protocol.to_owned()),
        Command::ResponseCode => Some(info.response_code.to_string()),
        Command::ResponseCodeDetails => Some(info.response_code_details.to_owned()),
        Command::ResponseFlags => Some(info.flags.short()),
        Command::ResponseFlagsLong => Some(info.flags.long()),
        Command::BytesReceived => Some(info.bytes_received.to_string()),
        Command::BytesSent => Some(info.bytes_sent.to_string()),
        Command::Duration | Command::RequestDuration | Command::ResponseDuration => {
            ms(info.duration)
        }
        Command::UpstreamServiceTime => ms(info.upstream_service_time),
        Command::UpstreamHost | Command::UpstreamRemoteAddress => {
            info.upstream_host.map(|a| a.to_string())
        }
        Command::UpstreamRemoteAddressWithoutPort => info.upstream_host.map(addr_no_port),
        Command::UpstreamLocalAddress => None,
        Command::UpstreamCluster => info.upstream_cluster.as_deref().map(str::to_owned),
        Command::UpstreamTransportFailureReason => info.upstream_failure_reason.clone(),
        Command::DownstreamRemoteAddress => Some(info.downstream_remote.to_string()),
        Command::DownstreamRemoteAddressWithoutPort => Some(addr_no_port(info.downstream_remote)),
        Command::DownstreamDirectRemoteAddress => Some(info.downstream_direct_remote.to_string()),
        Command::DownstreamDirectRemoteAddressWithoutPort => {
            Some(addr_no_port(info.downstream_direct_remote))
        }
        Command::DownstreamLocalAddress => Some(info.downstream_local.to_string()),
        Command::DownstreamLocalAddressWithoutPort => Some(addr_no_port(info.downstream_local)),
        Command::DownstreamLocalPort => Some(info.downstream_local.port().to_string()),
        Command::RequestedServerName => None,
        Command::RouteName => info.route_name.as_deref().map(str::to_owned),
        Command::Hostname => Some(hostname().to_owned()),
        Command::ConnectionId => Some(info.connection_id.to_string()),
        Command::UpstreamRequestAttemptCount => Some(info.attempt_count.to_string()),
        Command::UpstreamMetadata(ns, keys) => {
            metadata_lookup(info.upstream_metadata.as_ref(), ns, keys)
        }
        Command::DynamicMetadata(_, _) => None,
        Command::Environment(v) => std::env::var(v).ok(),
        Command::Method => Some(info.method.as_str().to_owned()),
        Command::Path => Some(info.path.clone()),
    }
}

/// Renders a format. `none_as` is what a missing value becomes (`-` in
/// access logs, empty in headers).
pub fn render(
    f: &Format,
    info: &StreamInfo,
    req: Option<&HeaderMap>,
    resp: Option<&HeaderMap>,
    none_as: &str,
) -> String {
    let mut out = String::new();
    for p in &f.parts {
        match p {
            FormatPart::Literal(s) => out.push_str(s),
            FormatPart::Op(op) => match eval(&op.cmd, info, req, resp) {
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
                None => out.push_str(none_as),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_700_000_000), (2023, 11, 14, 22, 13, 20));
    }

    #[test]
    fn flags_render() {
        let mut f = Flags::default();
        assert_eq!(f.short(), "-");
        f.set(Flags::UF);
        f.set(Flags::URX);
        assert_eq!(f.short(), "UF,URX");
        assert!(f.has_any(&["URX".into()]));
    }
}
