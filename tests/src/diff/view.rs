//! Flattening and normalising an [`Outcome`] into comparable fields.
//!
//! Field names:
//! - `outcome`: `response`, `closed`, `timeout`, `http2 frames` or
//!   `error: ...`
//! - `status`
//! - `header.<name>`: response header values joined with ` | `, in order
//! - `body`: the body, when it is not an echo upstream's JSON
//! - `upstream.<field>` and `upstream.header.<name>`: what the echo upstream
//!   received, when the body is its JSON report
//!
//! Normalisation (the same for both proxies; documented in ALLOWLIST.md):
//! - `date` is dropped; `x-envoy-upstream-service-time` becomes `<present>`
//!   when it is a number.
//! - `x-request-id` values shaped like a UUID become `<uuid>`; the harness's
//!   own `x-echo-id` becomes `<echo-id>`.
//! - The proxy's own listener and admin ports become `{{LISTENER_PORT}}` /
//!   `{{ADMIN_PORT}}` wherever they appear as a whole number.
//! - On a retried request (`seen > 1`) the upstream's
//!   `x-envoy-expected-rq-timeout-ms` becomes `<time left on retry>`: it is
//!   the remaining budget, which depends on scheduling.
//! - The `content-length` of an echo JSON body becomes `<body length>` when
//!   it is right (the JSON itself is compared field by field).
use std::collections::BTreeMap;

use crate::client::Outcome;
use crate::upstream::EchoView;

/// Field name -> normalised value.
pub type FlatView = BTreeMap<String, String>;

/// Per-proxy values to hide (ports that necessarily differ).
#[derive(Debug, Clone, Default)]
pub struct Masks {
    /// (literal, replacement)
    pub ports: Vec<(String, String)>,
}

impl Masks {
    pub fn new(listener_port: u16, admin_port: u16) -> Masks {
        Masks {
            ports: vec![
                (listener_port.to_string(), "{{LISTENER_PORT}}".into()),
                (admin_port.to_string(), "{{ADMIN_PORT}}".into()),
            ],
        }
    }

    fn apply(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for (lit, rep) in &self.ports {
            out = replace_number(&out, lit, rep);
        }
        out
    }
}

/// Replaces `num` in `s` where it is not part of a longer digit run.
fn replace_number(s: &str, num: &str, rep: &str) -> String {
    if num.is_empty() || !s.contains(num) {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(num) {
            let before_digit = i > 0 && bytes[i - 1].is_ascii_digit();
            let end = i + num.len();
            let after_digit = end < bytes.len() && bytes[end].is_ascii_digit();
            if !before_digit && !after_digit {
                out.push_str(rep);
                i = end;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn norm_header(name: &str, value: &str, masks: &Masks) -> String {
    match name {
        "x-request-id" if is_uuid(value) => "<uuid>".into(),
        "x-echo-id" => "<echo-id>".into(),
        "x-envoy-upstream-service-time" if value.parse::<u64>().is_ok() => "<present>".into(),
        _ => masks.apply(value),
    }
}

fn push_headers<'a>(
    out: &mut FlatView,
    prefix: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    masks: &Masks,
) {
    let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        if k == "date" {
            continue;
        }
        let v = norm_header(&k, v, masks);
        grouped.entry(k).or_default().push(v);
    }
    for (k, vs) in grouped {
        out.insert(format!("{prefix}{k}"), vs.join(" | "));
    }
}

/// Flattens `outcome` into comparable fields.
pub fn flatten(outcome: &Outcome, masks: &Masks) -> FlatView {
    let mut out = FlatView::new();
    let reply = match outcome {
        Outcome::Response(r) => r,
        Outcome::Closed { .. } => {
            out.insert("outcome".into(), "closed".into());
            return out;
        }
        Outcome::Timeout { .. } => {
            out.insert("outcome".into(), "timeout".into());
            return out;
        }
        Outcome::Http2Frames => {
            out.insert("outcome".into(), "http2 frames".into());
            return out;
        }
        Outcome::Error(e) => {
            out.insert("outcome".into(), format!("error: {}", masks.apply(e)));
            return out;
        }
    };
    out.insert("outcome".into(), "response".into());
    out.insert("status".into(), reply.status.to_string());
    push_headers(
        &mut out,
        "header.",
        reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        masks,
    );
    let is_json = reply
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json"));
    let echo = if is_json {
        serde_json::from_slice::<EchoView>(&reply.body).ok()
    } else {
        None
    };
    match echo {
        Some(v) => {
            if reply.header("content-length") == Some(reply.body.len().to_string().as_str()) {
                out.insert("header.content-length".into(), "<body length>".into());
            }
            out.insert("upstream.name".into(), v.upstream);
            out.insert("upstream.version".into(), v.version);
            out.insert("upstream.method".into(), v.method);
            out.insert("upstream.path".into(), masks.apply(&v.path));
            out.insert("upstream.authority".into(), masks.apply(&v.authority));
            out.insert("upstream.body_len".into(), v.body_len.to_string());
            out.insert("upstream.seen".into(), v.seen.to_string());
            push_headers(
                &mut out,
                "upstream.header.",
                v.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                masks,
            );
            // A retry carries the time left, which depends on scheduling.
            if v.seen > 1 {
                if let Some(t) = out.get_mut("upstream.header.x-envoy-expected-rq-timeout-ms") {
                    if t.parse::<u64>().is_ok() {
                        *t = "<time left on retry>".into();
                    }
                }
            }
        }
        None => {
            out.insert(
                "body".into(),
                masks.apply(&String::from_utf8_lossy(&reply.body)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_whole_numbers_only() {
        let m = Masks::new(41000, 41001);
        assert_eq!(m.apply("127.0.0.1:41000"), "127.0.0.1:{{LISTENER_PORT}}");
        assert_eq!(m.apply("x410001"), "x410001");
        assert_eq!(m.apply("41001,41000"), "{{ADMIN_PORT}},{{LISTENER_PORT}}");
    }

    #[test]
    fn uuid_shape() {
        assert!(is_uuid("0f0c8d3b-5b2e-4c5e-9c57-1a2b3c4d5e6f"));
        assert!(!is_uuid("my-request-id"));
    }
}
