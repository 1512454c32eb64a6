//! Parser for Envoy's substitution format strings.
use crate::config::{Command, Format, FormatPart, HeaderKey, Operator};

/// Envoy's default access log format (`%START_TIME%` ... `"%UPSTREAM_HOST%"`).
pub const DEFAULT_ACCESS_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Parses a format string; the error names the offending operator.
pub fn parse_format(s: &str) -> Result<Format, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        // An operator runs to the next '%' that is outside parentheses.
        let end = find_op_end(rest).ok_or_else(|| format!("unterminated operator in {s:?}"))?;
        let op = &rest[..end];
        rest = &rest[end + 1..];
        if !lit.is_empty() {
            parts.push(FormatPart::Literal(std::mem::take(&mut lit)));
        }
        parts.push(FormatPart::Op(parse_operator(op)?));
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        parts.push(FormatPart::Literal(lit));
    }
    Ok(Format { parts })
}

fn find_op_end(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '%' if depth <= 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_operator(op: &str) -> Result<Operator, String> {
    // NAME, NAME(args), NAME(args):len, NAME:len
    let (head, max_len) = match op.rfind(':') {
        Some(i)
            if op[i + 1..].bytes().all(|b| b.is_ascii_digit())
                && i + 1 < op.len()
                && !op[i..].contains(')') =>
        {
            let n = op[i + 1..]
                .parse::<usize>()
                .map_err(|_| format!("bad length in %{op}%"))?;
            (&op[..i], Some(n))
        }
        _ => (op, None),
    };
    let (name, args) = match head.find('(') {
        Some(i) => {
            let Some(inner) = head[i + 1..].strip_suffix(')') else {
                return Err(format!("missing ')' in %{op}%"));
            };
            (&head[..i], Some(inner))
        }
        None => (head, None),
    };
    fn need_args<'a>(a: Option<&'a str>, name: &str) -> Result<&'a str, String> {
        a.ok_or_else(|| format!("%{name}% needs an argument"))
    }
    let header_pair = |a: &str| -> Result<(HeaderKey, Option<HeaderKey>), String> {
        let (main, alt) = match a.split_once('?') {
            Some((m, alt)) => (m, Some(alt)),
            None => (a, None),
        };
        let k = HeaderKey::parse(main)
            .ok_or_else(|| format!("invalid header name {main:?} in %{op}%"))?;
        let alt = match alt {
            Some(a) => Some(
                HeaderKey::parse(a)
                    .ok_or_else(|| format!("invalid header name {a:?} in %{op}%"))?,
            ),
            None => None,
        };
        Ok((k, alt))
    };
    let no_args = |c: Command| -> Result<Command, String> {
        if args.is_some() {
            Err(format!("%{name}% takes no argument"))
        } else {
            Ok(c)
        }
    };
    let cmd = match name {
        "REQ" => {
            let (k, alt) = header_pair(need_args(args, name)?)?;
            Command::Req(k, alt)
        }
        "RESP" => {
            let (k, alt) = header_pair(need_args(args, name)?)?;
            Command::Resp(k, alt)
        }
        "TRAILER" => {
            let (k, alt) = header_pair(need_args(args, name)?)?;
            Command::Trailer(k, alt)
        }
        "START_TIME" => Command::StartTime(args.filter(|a| !a.is_empty()).map(str::to_owned)),
        "PROTOCOL" => no_args(Command::Protocol)?,
        "RESPONSE_CODE" => no_args(Command::ResponseCode)?,
        "RESPONSE_CODE_DETAILS" => no_args(Command::ResponseCodeDetails)?,
        "RESPONSE_FLAGS" => no_args(Command::ResponseFlags)?,
        "RESPONSE_FLAGS_LONG" => no_args(Command::ResponseFlagsLong)?,
        "BYTES_RECEIVED" => no_args(Command::BytesReceived)?,
        "BYTES_SENT" => no_args(Command::BytesSent)?,
        "DURATION" => no_args(Command::Duration)?,
        "REQUEST_DURATION" => no_args(Command::RequestDuration)?,
        "RESPONSE_DURATION" => no_args(Command::ResponseDuration)?,
        "UPSTREAM_SERVICE_TIME" => no_args(Command::UpstreamServiceTime)?,
        "UPSTREAM_HOST" => no_args(Command::UpstreamHost)?,
        "UPSTREAM_CLUSTER" => no_args(Command::UpstreamCluster)?,
        "UPSTREAM_LOCAL_ADDRESS" => no_args(Command::UpstreamLocalAddress)?,
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_args(Command::UpstreamLocalAddressWithoutPort)?,
        "UPSTREAM_LOCAL_PORT" => no_args(Command::UpstreamLocalPort)?,
        "UPSTREAM_REMOTE_ADDRESS" => no_args(Command::UpstreamRemoteAddress)?,
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_args(Command::UpstreamRemoteAddressWithoutPort)?
        }
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_args(Command::UpstreamTransportFailureReason)?,
        "DOWNSTREAM_REMOTE_ADDRESS" => no_args(Command::DownstreamRemoteAddress)?,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_args(Command::DownstreamRemoteAddressWithoutPort)?
        }
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => no_args(Command::DownstreamDirectRemoteAddress)?,
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_args(Command::DownstreamDirectRemoteAddressWithoutPort)?
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => no_args(Command::DownstreamLocalAddress)?,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => {
            no_args(Command::DownstreamLocalAddressWithoutPort)?
        }
        "DOWNSTREAM_LOCAL_PORT" => no_args(Command::DownstreamLocalPort)?,
        "REQUESTED_SERVER_NAME" => no_args(Command::RequestedServerName)?,
        "DOWNSTREAM_PEER_URI_SAN" => no_args(Command::DownstreamPeerUriSan)?,
        "DOWNSTREAM_PEER_DNS_SAN" => no_args(Command::DownstreamPeerDnsSan)?,
        "DOWNSTREAM_PEER_SUBJECT" => no_args(Command::DownstreamPeerSubject)?,
        "DOWNSTREAM_PEER_ISSUER" => no_args(Command::DownstreamPeerIssuer)?,
        "DOWNSTREAM_PEER_FINGERPRINT_256" => no_args(Command::DownstreamPeerFingerprint256)?,
        "DOWNSTREAM_PEER_SERIAL" => no_args(Command::DownstreamPeerSerial)?,
        "DOWNSTREAM_PEER_CERT" => no_args(Command::DownstreamPeerCert)?,
        "DOWNSTREAM_LOCAL_URI_SAN" => no_args(Command::DownstreamLocalUriSan)?,
        "DOWNSTREAM_LOCAL_DNS_SAN" => no_args(Command::DownstreamLocalDnsSan)?,
        "DOWNSTREAM_LOCAL_SUBJECT" => no_args(Command::DownstreamLocalSubject)?,
        "DOWNSTREAM_TLS_VERSION" => no_args(Command::DownstreamTlsVersion)?,
        "DOWNSTREAM_TLS_CIPHER" => no_args(Command::DownstreamTlsCipher)?,
        "UPSTREAM_PEER_URI_SAN" => no_args(Command::UpstreamPeerUriSan)?,
        "UPSTREAM_PEER_DNS_SAN" => no_args(Command::UpstreamPeerDnsSan)?,
        "UPSTREAM_PEER_SUBJECT" => no_args(Command::UpstreamPeerSubject)?,
        "UPSTREAM_PEER_ISSUER" => no_args(Command::UpstreamPeerIssuer)?,
        "UPSTREAM_LOCAL_URI_SAN" => no_args(Command::UpstreamLocalUriSan)?,
        "UPSTREAM_LOCAL_DNS_SAN" => no_args(Command::UpstreamLocalDnsSan)?,
        "ROUTE_NAME" => no_args(Command::RouteName)?,
        "HOSTNAME" => no_args(Command::Hostname)?,
        "CONNECTION_ID" => no_args(Command::ConnectionId)?,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => no_args(Command::UpstreamRequestAttemptCount)?,
        "METHOD" => no_args(Command::Method)?,
        "PATH" => no_args(Command::Path)?,
        "ENVIRONMENT" => Command::Environment(need_args(args, name)?.to_owned()),
        "UPSTREAM_METADATA" | "DYNAMIC_METADATA" => {
            let a = need_args(args, name)?;
            let (ns, keys) =
                parse_metadata_args(a).ok_or_else(|| format!("invalid arguments in %{op}%"))?;
            if name == "UPSTREAM_METADATA" {
                Command::UpstreamMetadata(ns, keys)
            } else {
                Command::DynamicMetadata(ns, keys)
            }
        }
        "FILTER_STATE" => {
            let a = need_args(args, name)?;
            let mut it = a.split(':');
            let key = it.next().unwrap_or_default().to_owned();
            let plain = match (it.next(), it.next()) {
                (None | Some("TYPED"), None) => false,
                (Some("PLAIN"), None) => true,
                (Some("TYPED"), Some(_)) => {
                    return Err(format!(
                        "%{op}%: weir does not implement FIELD access in filter state"
                    ))
                }
                _ => return Err(format!("invalid arguments in %{op}%")),
            };
            if key.is_empty() {
                return Err(format!("invalid arguments in %{op}%"));
            }
            Command::FilterState { key, plain }
        }
        other => return Err(format!("weir does not implement format operator %{other}%")),
    };
    Ok(Operator { cmd, max_len })
}

/// `NS:KEY:KEY` or the legacy JSON-array form `["NS", "KEY"]`.
fn parse_metadata_args(a: &str) -> Option<(String, Vec<String>)> {
    let a = a.trim();
    if a.starts_with('[') {
        let v: Vec<String> = serde_json::from_str(a).ok()?;
        let (ns, keys) = v.split_first()?;
        return Some((ns.clone(), keys.to_vec()));
    }
    let mut it = a.split(':');
    let ns = it.next()?.to_owned();
    if ns.is_empty() {
        return None;
    }
    Some((ns, it.map(str::to_owned).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_default_format() {
        let f = parse_format(DEFAULT_ACCESS_LOG_FORMAT).expect("default parses");
        let ops = f
            .parts
            .iter()
            .filter(|p| matches!(p, FormatPart::Op(_)))
            .count();
        assert_eq!(ops, 15);
    }

    #[test]
    fn literal_percent_and_lengths() {
        let f = parse_format("100%% %REQ(x-a?x-b):3% %START_TIME(%s)%").expect("parses");
        assert_eq!(f.parts[0], FormatPart::Literal("100% ".into()));
        match &f.parts[1] {
            FormatPart::Op(Operator {
                cmd: Command::Req(_, Some(_)),
                max_len: Some(3),
            }) => {}
            other => panic!("{other:?}"),
        }
        match &f.parts[3] {
            FormatPart::Op(Operator {
                cmd: Command::StartTime(Some(s)),
                ..
            }) => assert_eq!(s, "%s"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_unknown_and_unterminated() {
        assert!(parse_format("%NOPE%").is_err());
        assert!(parse_format("abc %REQ(x)").is_err());
        assert!(parse_format("%REQ%").is_err());
    }

    #[test]
    fn filter_state_args() {
        let f = parse_format("%FILTER_STATE(a.b:PLAIN)% %FILTER_STATE(k)%").expect("parses");
        assert!(
            matches!(&f.parts[0], FormatPart::Op(Operator { cmd: Command::FilterState { key, plain: true }, .. }) if key == "a.b")
        );
        assert!(
            matches!(&f.parts[2], FormatPart::Op(Operator { cmd: Command::FilterState { key, plain: false }, .. }) if key == "k")
        );
        assert!(parse_format("%FILTER_STATE(k:TYPED:f)%").is_err());
        assert!(parse_format("%FILTER_STATE(k:RAW)%").is_err());
        assert!(parse_format("%FILTER_STATE(:PLAIN)%").is_err());
    }

    #[test]
    fn metadata_args() {
        let f = parse_format("%UPSTREAM_METADATA([\"ns\", \"k\"])% %DYNAMIC_METADATA(a:b:c)%")
            .expect("ok");
        assert!(
            matches!(&f.parts[0], FormatPart::Op(Operator { cmd: Command::UpstreamMetadata(ns, k), .. }) if ns == "ns" && k == &["k"])
        );
        assert!(
            matches!(&f.parts[2], FormatPart::Op(Operator { cmd: Command::DynamicMetadata(ns, k), .. }) if ns == "a" && k.len() == 2)
        );
    }
}
