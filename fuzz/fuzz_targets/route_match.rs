//! Route tables built from structured fuzz input through the real path
//! (bootstrap JSON text -> `parse_bootstrap` -> `bootstrap_to_snapshot`), then
//! queried with fuzz-derived hosts and paths.
//!
//! Beyond "never panics", two oracles:
//! - virtual host selection agrees with a reference model of Envoy's order
//!   (exact, longest `*suffix`, longest `prefix*`, `*`; case-insensitive);
//! - route selection agrees with a reference path matcher: the chosen route's
//!   path matches, and no earlier route without extra conditions (headers,
//!   query parameters, regexes) matches.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use xds_client::bootstrap::{parse_bootstrap, ParseOptions};
use xds_client::config::{strip_port, NetworkFilter, RequestInfo, RouteConfig};
use xds_client::translate::bootstrap_to_snapshot;

const MAX_VHOSTS: usize = 6;
const MAX_DOMAINS: usize = 4;
const MAX_ROUTES: usize = 8;
const MAX_REQUESTS: usize = 8;

/// A short string over an alphabet chosen so that generated hosts and
/// domains often collide (and ports and IPv6 brackets appear).
#[derive(Debug)]
struct Label(String);

impl<'a> Arbitrary<'a> for Label {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        const ALPHABET: &[u8] = b"abAB.-:19[]";
        let len = u.int_in_range(0..=10)?;
        let mut s = String::with_capacity(len);
        for _ in 0..len {
            s.push(char::from(*u.choose(ALPHABET)?));
        }
        Ok(Label(s))
    }
}

/// A short path-like string (ASCII letters in both cases, separators, and
/// one non-ASCII letter to exercise the case-insensitive comparisons).
#[derive(Debug)]
struct PathStr(String);

impl<'a> Arbitrary<'a> for PathStr {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        const ALPHABET: &[char] = &['/', 'a', 'A', 'b', 'B', '.', '-', '%', 'é', 'É'];
        let len = u.int_in_range(0..=10)?;
        let mut s = String::with_capacity(len + 1);
        if u.ratio(3, 4)? {
            s.push('/');
        }
        for _ in 0..len {
            s.push(*u.choose(ALPHABET)?);
        }
        Ok(PathStr(s))
    }
}

#[derive(Arbitrary, Debug)]
enum Domain {
    Exact(Label),
    Suffix(Label),
    Prefix(Label),
    Any,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum PathSpec {
    Prefix(PathStr),
    Path(PathStr),
    SeparatedPrefix(PathStr),
    Regex(String),
    Connect,
}

#[derive(Arbitrary, Debug)]
enum StrSpec {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(String),
}

#[derive(Arbitrary, Debug)]
enum HeaderKind {
    String(StrSpec, bool),
    Present(bool),
    Range(i64, i64),
}

#[derive(Arbitrary, Debug)]
struct HeaderSpec {
    name: u8,
    kind: HeaderKind,
    invert: bool,
}

#[derive(Arbitrary, Debug)]
struct RouteSpec {
    path: PathSpec,
    case_sensitive: Option<bool>,
    grpc: bool,
    runtime_ppm: Option<u32>,
    header: Option<HeaderSpec>,
    query: Option<(Label, Option<StrSpec>)>,
}

#[derive(Arbitrary, Debug)]
struct VHostSpec {
    /// At least one domain: a virtual host without any is rejected.
    domain: Domain,
    more_domains: Vec<Domain>,
    routes: Vec<RouteSpec>,
}

#[derive(Arbitrary, Debug)]
struct Request {
    host: Label,
    path: PathStr,
    query: Option<String>,
    method: u8,
    headers: Vec<(u8, String)>,
    random_ppm: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ignore_port_in_host_matching: bool,
    vhosts: Vec<VHostSpec>,
    requests: Vec<Request>,
}

const HEADER_NAMES: &[&str] = &[
    "x-a",
    "x-b",
    "content-type",
    ":method",
    ":authority",
    ":path",
];

fn header_name(i: u8) -> &'static str {
    HEADER_NAMES[usize::from(i) % HEADER_NAMES.len()]
}

fn string_matcher(s: &StrSpec, ignore_case: bool) -> Value {
    let mut m = match s {
        StrSpec::Exact(v) => json!({ "exact": v }),
        StrSpec::Prefix(v) => json!({ "prefix": v }),
        StrSpec::Suffix(v) => json!({ "suffix": v }),
        StrSpec::Contains(v) => json!({ "contains": v }),
        StrSpec::Regex(v) => json!({ "safe_regex": { "regex": v } }),
    };
    // Envoy rejects ignore_case on safe_regex; keep generated tables valid.
    if ignore_case && !matches!(s, StrSpec::Regex(_)) {
        m["ignore_case"] = json!(true);
    }
    m
}

fn route_json(r: &RouteSpec, name: &str) -> Value {
    let mut m = match &r.path {
        PathSpec::Prefix(p) => json!({ "prefix": p.0 }),
        PathSpec::Path(p) => json!({ "path": p.0 }),
        PathSpec::SeparatedPrefix(p) => json!({ "path_separated_prefix": p.0 }),
        PathSpec::Regex(re) => json!({ "safe_regex": { "regex": re } }),
        PathSpec::Connect => json!({ "connect_matcher": {} }),
    };
    if let Some(cs) = r.case_sensitive {
        m["case_sensitive"] = json!(cs);
    }
    if r.grpc {
        m["grpc"] = json!({});
    }
    if let Some(ppm) = r.runtime_ppm {
        m["runtime_fraction"] = json!({
            "default_value": { "numerator": ppm % 1_000_001, "denominator": "MILLION" },
            "runtime_key": "k",
        });
    }
    if let Some(h) = &r.header {
        let mut hm = match &h.kind {
            HeaderKind::String(s, ic) => json!({ "string_match": string_matcher(s, *ic) }),
            HeaderKind::Present(p) => json!({ "present_match": p }),
            HeaderKind::Range(a, b) => {
                json!({ "range_match": { "start": a.to_string(), "end": b.to_string() } })
            }
        };
        hm["name"] = json!(header_name(h.name));
        hm["invert_match"] = json!(h.invert);
        m["headers"] = json!([hm]);
    }
    if let Some((name, sm)) = &r.query {
        let mut q = json!({ "name": name.0 });
        match sm {
            Some(s) => q["string_match"] = string_matcher(s, false),
            None => q["present_match"] = json!(true),
        }
        m["query_parameters"] = json!([q]);
    }
    json!({ "name": name, "match": m, "route": { "cluster": "c" } })
}

/// Each virtual host's domains as written in the config. A domain already
/// listed (in any case) is dropped: duplicates are rejected at translation,
/// which would leave nothing to match against.
fn domains(input: &Input) -> Vec<Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    input
        .vhosts
        .iter()
        .take(MAX_VHOSTS)
        .map(|vh| {
            std::iter::once(&vh.domain)
                .chain(vh.more_domains.iter())
                .take(MAX_DOMAINS)
                .map(|d| match d {
                    Domain::Exact(l) => l.0.clone(),
                    Domain::Suffix(l) => format!("*{}", l.0),
                    Domain::Prefix(l) => format!("{}*", l.0),
                    Domain::Any => "*".to_owned(),
                    Domain::Raw(s) => s.clone(),
                })
                .filter(|d| seen.insert(d.to_ascii_lowercase()))
                .collect()
        })
        .collect()
}

fn bootstrap_json(input: &Input) -> Value {
    let domains = domains(input);
    let vhosts: Vec<Value> = input
        .vhosts
        .iter()
        .take(MAX_VHOSTS)
        .zip(domains)
        .enumerate()
        // A virtual host left without domains would be rejected; leave it out
        // (it keeps its index as its name, and can match nothing).
        .filter(|(_, (_, domains))| !domains.is_empty())
        .map(|(i, (vh, domains))| {
            let routes: Vec<Value> = vh
                .routes
                .iter()
                .take(MAX_ROUTES)
                .enumerate()
                .map(|(j, r)| route_json(r, &format!("{i}/{j}")))
                .collect();
            json!({ "name": format!("{i}"), "domains": domains, "routes": routes })
        })
        .collect();
    json!({
        "static_resources": {
            "clusters": [{ "name": "c", "connect_timeout": "1s", "type": "STATIC" }],
            "listeners": [{
                "name": "l",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 10000 } },
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "f",
                        "route_config": {
                            "name": "rc",
                            "ignore_port_in_host_matching": input.ignore_port_in_host_matching,
                            "virtual_hosts": vhosts,
                        },
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                        }],
                    },
                }] }],
            }],
        },
    })
}

/// Envoy's virtual host order, written independently of `RouteConfig`.
fn reference_vhost(input: &Input, host: &str) -> Option<usize> {
    let host = host.to_ascii_lowercase();
    let host = if input.ignore_port_in_host_matching {
        strip_port(&host).to_owned()
    } else {
        host
    };
    let mut exact = None;
    let mut suffix: Option<(usize, usize)> = None;
    let mut prefix: Option<(usize, usize)> = None;
    let mut any = None;
    for (i, ds) in domains(input).iter().enumerate() {
        for d in ds {
            let d = d.to_ascii_lowercase();
            if d == "*" {
                any = Some(i);
            } else if let Some(s) = d.strip_prefix('*') {
                let better = suffix.is_none_or(|(len, _)| s.len() > len);
                if host.len() > s.len() && host.ends_with(s) && better {
                    suffix = Some((s.len(), i));
                }
            } else if let Some(p) = d.strip_suffix('*') {
                let better = prefix.is_none_or(|(len, _)| p.len() > len);
                if host.len() > p.len() && host.starts_with(p) && better {
                    prefix = Some((p.len(), i));
                }
            } else if d == host {
                exact = Some(i);
            }
        }
    }
    exact
        .or(suffix.map(|(_, i)| i))
        .or(prefix.map(|(_, i)| i))
        .or(any)
}

/// The path part of a route's match; `None` when the route has conditions
/// the model does not cover.
fn reference_route(r: &RouteSpec, req: &RequestInfo<'_>) -> Option<bool> {
    let cs = r.case_sensitive.unwrap_or(true);
    let fold = |s: &str| {
        if cs {
            s.to_owned()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let path = fold(req.path);
    let path_ok = match &r.path {
        PathSpec::Connect => req.is_connect,
        _ if req.is_connect => false,
        PathSpec::Prefix(p) => path.starts_with(&fold(&p.0)),
        PathSpec::Path(p) => path == fold(&p.0),
        PathSpec::SeparatedPrefix(p) => {
            let p = fold(&p.0);
            path.starts_with(&p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
        }
        PathSpec::Regex(_) => return None,
    };
    if !path_ok {
        return Some(false);
    }
    if r.header.is_some() || r.query.is_some() {
        return None;
    }
    if let Some(ppm) = r.runtime_ppm {
        if req.random_ppm >= ppm % 1_000_001 {
            return Some(false);
        }
    }
    if r.grpc {
        let grpc = req
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "application/grpc" || v.starts_with("application/grpc+"));
        return Some(grpc);
    }
    Some(true)
}

fn route_table(input: &Input) -> Option<std::sync::Arc<RouteConfig>> {
    let text = serde_json::to_string(&bootstrap_json(input)).expect("JSON values serialise");
    let b = parse_bootstrap(&text, ParseOptions::default()).ok()?;
    let snapshot = bootstrap_to_snapshot(&b).ok()?;
    match &snapshot.listeners.first()?.filter_chains.first()?.filter {
        NetworkFilter::Http(h) => h.routes.inline().cloned(),
        _ => None,
    }
}

fuzz_target!(|input: Input| {
    let Some(rc) = route_table(&input) else {
        return;
    };
    for req in input.requests.iter().take(MAX_REQUESTS) {
        let method = match req.method % 4 {
            0 => Method::GET,
            1 => Method::POST,
            2 => Method::CONNECT,
            _ => Method::HEAD,
        };
        let mut headers = HeaderMap::new();
        for (n, v) in req.headers.iter().take(4) {
            let n = header_name(*n);
            if n.starts_with(':') {
                continue;
            }
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(HeaderName::from_static(n), v);
            }
        }
        let full_path = match &req.query {
            Some(q) => format!("{}?{q}", req.path.0),
            None => req.path.0.clone(),
        };
        let info = RequestInfo {
            method: &method,
            path: &req.path.0,
            query: req.query.as_deref(),
            full_path: &full_path,
            authority: &req.host.0,
            scheme: "http",
            headers: &headers,
            is_connect: method == Method::CONNECT,
            peer_cert: false,
            random_ppm: req.random_ppm % 1_000_000,
        };

        let got = rc.select_vhost(&req.host.0);
        let want = reference_vhost(&input, &req.host.0);
        assert_eq!(
            got.map(|v| v.name.to_string()),
            want.map(|i| i.to_string()),
            "virtual host for {:?}",
            req.host.0
        );
        let (Some(vh), Some(vi)) = (got, want) else {
            continue;
        };
        let chosen = vh.select_route(&info).map(|r| r.name.to_string());
        let specs: Vec<&RouteSpec> = input.vhosts[vi].routes.iter().take(MAX_ROUTES).collect();
        let chosen_idx = chosen.as_ref().map(|n| {
            n.rsplit('/')
                .next()
                .and_then(|j| j.parse::<usize>().ok())
                .expect("route names are i/j")
        });
        if let Some(j) = chosen_idx {
            assert_ne!(
                reference_route(specs[j], &info),
                Some(false),
                "route {j} chosen for {info:?} but its match does not hold"
            );
        }
        let limit = chosen_idx.unwrap_or(specs.len());
        for (j, spec) in specs.iter().enumerate().take(limit) {
            assert_ne!(
                reference_route(spec, &info),
                Some(true),
                "route {j} matches {info:?} but {chosen:?} was chosen"
            );
        }
    }
});
