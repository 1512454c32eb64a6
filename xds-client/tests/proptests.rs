//! Property tests for the matchers the data path relies on: each one is
//! compared with a small reference model written from Envoy's documented
//! behaviour, not from our implementation.
use std::sync::Arc;

use http::{HeaderMap, Method};
use proptest::prelude::*;
use xds_client::config::{
    strip_port, Command, FormatPart, HeaderKey, HeaderMutations, PathMatch, RequestInfo,
    RouteConfig, RouteMatch, StringMatch, StringMatcher, TlsRequirement, VirtualHost,
    WeightedCluster, WeightedClusters,
};
use xds_client::translate::parse_format;

// === helpers ===

fn vhost(name: String, domains: Vec<String>) -> Arc<VirtualHost> {
    Arc::new(VirtualHost {
        name: name.into(),
        domains,
        routes: vec![],
        require_tls: TlsRequirement::None,
        headers: HeaderMutations::default(),
        retry_policy: None,
        include_request_attempt_count: false,
        include_attempt_count_in_response: false,
        per_filter: Default::default(),
        rate_limits: Default::default(),
        hedge_on_per_try_timeout: None,
    })
}

/// One virtual host per domain, named after its index.
fn table(domains: &[String], ignore_port: bool) -> RouteConfig {
    let vhosts = domains
        .iter()
        .enumerate()
        .map(|(i, d)| vhost(i.to_string(), vec![d.clone()]))
        .collect();
    RouteConfig::new(
        "rc".into(),
        vhosts,
        HeaderMutations::default(),
        vec![],
        false,
        ignore_port,
    )
    .expect("test domains are distinct")
}

fn selected(rc: &RouteConfig, host: &str) -> Option<usize> {
    rc.select_vhost(host)
        .map(|v| v.name.parse().expect("vhosts are named by index"))
}

/// Envoy's virtual host order: exact, then the longest `*suffix`, then the
/// longest `prefix*`, then `*`; wildcards match at least one character, and
/// all comparisons ignore ASCII case.
fn reference_vhost(domains: &[String], host: &str, ignore_port: bool) -> Option<usize> {
    let host = host.to_ascii_lowercase();
    let host = if ignore_port {
        strip_port(&host)
    } else {
        &host
    };
    let mut best: Option<(u8, usize, usize)> = None; // (rank, -len via order, index)
    for (i, d) in domains.iter().enumerate() {
        let d = d.to_ascii_lowercase();
        let candidate = if d == "*" {
            Some((3, 0))
        } else if let Some(s) = d.strip_prefix('*') {
            (host.len() > s.len() && host.ends_with(s)).then_some((1, s.len()))
        } else if let Some(p) = d.strip_suffix('*') {
            (host.len() > p.len() && host.starts_with(p)).then_some((2, p.len()))
        } else {
            (d == host).then_some((0, d.len()))
        };
        if let Some((rank, len)) = candidate {
            let better = match best {
                None => true,
                Some((r, l, _)) => rank < r || (rank == r && len > l),
            };
            if better {
                best = Some((rank, len, i));
            }
        }
    }
    best.map(|(_, _, i)| i)
}

/// Random ASCII case for each letter of `s`, driven by `flips`.
fn recase(s: &str, flips: &[bool]) -> String {
    s.chars()
        .zip(flips.iter().cycle())
        .map(|(c, f)| if *f { c.to_ascii_uppercase() } else { c })
        .collect()
}

/// Labels over a small alphabet so that hosts and domains collide often.
fn label() -> impl Strategy<Value = String> {
    "[ab.]{1,4}"
}

/// Hosts: mostly over the label alphabet (so wildcards hit), sometimes with
/// upper case, ports and other bytes.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ab.]{0,6}",
        1 => "[abAB.:1]{0,8}",
    ]
}

fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        label(),
        label().prop_map(|l| format!("*{l}")),
        label().prop_map(|l| format!("{l}*")),
        Just("*".to_owned()),
    ]
}

fn distinct_domains() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set(domain(), 0..8).prop_map(|s| s.into_iter().collect())
}

fn request<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> RequestInfo<'a> {
    RequestInfo {
        method,
        path,
        query: None,
        full_path: path,
        authority: "example.com",
        scheme: "http",
        headers,
        is_connect: method == Method::CONNECT,
        peer_cert: false,
        random_ppm: 0,
    }
}

fn route_match(path: PathMatch, case_sensitive: bool) -> RouteMatch {
    RouteMatch {
        path,
        case_sensitive,
        headers: vec![],
        query: vec![],
        grpc: false,
        runtime_fraction_ppm: None,
        tls_presented: None,
        tls_validated: None,
    }
}

// === domain selection ===

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn vhost_selection_matches_reference(
        domains in distinct_domains(),
        host in host(),
        ignore_port in any::<bool>(),
    ) {
        let rc = table(&domains, ignore_port);
        prop_assert_eq!(selected(&rc, &host), reference_vhost(&domains, &host, ignore_port));
    }

    #[test]
    fn exact_beats_wildcards(host in "[ab]{1,4}\\.[ab]{1,4}", rotate in 0usize..4) {
        let (first, rest) = host.split_at(1);
        let mut domains = vec![
            "*".to_owned(),
            format!("*{rest}"),
            format!("{first}*"),
            host.clone(),
        ];
        // Config order must not matter.
        domains.rotate_left(rotate);
        let exact = domains.iter().position(|d| d == &host).expect("present");
        let rc = table(&domains, false);
        prop_assert_eq!(selected(&rc, &host), Some(exact));
    }

    #[test]
    fn longest_suffix_wildcard_wins(host in "[ab.]{2,10}", cuts in prop::collection::btree_set(1usize..10, 1..5)) {
        // Every proper suffix of `host` as `*suffix`; the longest must win.
        let cuts: Vec<usize> = cuts.into_iter().filter(|c| *c < host.len()).collect();
        prop_assume!(!cuts.is_empty());
        let domains: Vec<String> = cuts.iter().map(|c| format!("*{}", &host[*c..])).collect();
        let longest = cuts.iter().enumerate().min_by_key(|(_, c)| **c).map(|(i, _)| i);
        let rc = table(&domains, false);
        prop_assert_eq!(selected(&rc, &host), longest);
    }

    #[test]
    fn star_catches_everything_else(domains in distinct_domains(), host in host()) {
        let mut domains: Vec<String> = domains.into_iter().filter(|d| d != "*").collect();
        let matched_without_star = selected(&table(&domains, false), &host);
        domains.push("*".to_owned());
        let star = domains.len() - 1;
        let rc = table(&domains, false);
        prop_assert_eq!(selected(&rc, &host), Some(matched_without_star.unwrap_or(star)));
    }

    #[test]
    fn selection_ignores_ascii_case(
        domains in distinct_domains(),
        host in "[ab.:1]{0,8}",
        flips in prop::collection::vec(any::<bool>(), 1..8),
        dflips in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        let lower = table(&domains, false);
        let upper_domains: Vec<String> = domains.iter().map(|d| recase(d, &dflips)).collect();
        let upper = table(&upper_domains, false);
        let h = recase(&host, &flips);
        prop_assert_eq!(selected(&lower, &host), selected(&lower, &h));
        prop_assert_eq!(selected(&upper, &host), selected(&lower, &host));
    }

    #[test]
    fn ignore_port_equals_portless_lookup(domains in distinct_domains(), host in "[ab.]{1,6}", port in 0u16..) {
        let rc = table(&domains, true);
        let with_port = format!("{host}:{port}");
        prop_assert_eq!(selected(&rc, &with_port), selected(&rc, &host));
    }
}

// === path matching ===

fn path_str() -> impl Strategy<Value = String> {
    "/?[/aAbBé.]{0,8}"
}

proptest! {
    #[test]
    fn prefix_matches_reference(prefix in path_str(), path in path_str(), cs in any::<bool>()) {
        let m = route_match(PathMatch::Prefix(prefix.clone()), cs);
        let headers = HeaderMap::new();
        let want = if cs {
            path.starts_with(&prefix)
        } else {
            path.to_ascii_lowercase().starts_with(&prefix.to_ascii_lowercase())
        };
        prop_assert_eq!(m.matches(&request(&Method::GET, &path, &headers)), want);
        // Matching `prefix` itself, and anything that extends it.
        let extended = format!("{prefix}{path}");
        prop_assert!(m.matches(&request(&Method::GET, &extended, &headers)));
    }

    #[test]
    fn exact_path_matches_reference(p in path_str(), path in path_str(), cs in any::<bool>()) {
        let m = route_match(PathMatch::Path(p.clone()), cs);
        let headers = HeaderMap::new();
        let want = if cs { path == p } else { path.eq_ignore_ascii_case(&p) };
        prop_assert_eq!(m.matches(&request(&Method::GET, &path, &headers)), want);
        prop_assert!(m.matches(&request(&Method::GET, &p, &headers)));
    }

    #[test]
    fn separated_prefix_matches_reference(prefix in "(/[aAb]{1,3}){1,3}", rest in "[/aAb.]{0,6}", cs in any::<bool>()) {
        let m = route_match(PathMatch::SeparatedPrefix(prefix.clone()), cs);
        let headers = HeaderMap::new();
        let path = format!("{prefix}{rest}");
        // Envoy: the prefix, then the end of the path or a `/`.
        let want = rest.is_empty() || rest.starts_with('/');
        prop_assert_eq!(m.matches(&request(&Method::GET, &path, &headers)), want);
        let upper = path.to_ascii_uppercase();
        let want_upper = if cs { prefix.to_ascii_uppercase() == prefix && want } else { want };
        prop_assert_eq!(m.matches(&request(&Method::GET, &upper, &headers)), want_upper);
    }

    #[test]
    fn connect_only_matches_connect(prefix in path_str(), path in path_str()) {
        let headers = HeaderMap::new();
        let connect = route_match(PathMatch::Connect, true);
        let prefix_route = route_match(PathMatch::Prefix(prefix), true);
        prop_assert!(connect.matches(&request(&Method::CONNECT, &path, &headers)));
        prop_assert!(!connect.matches(&request(&Method::GET, &path, &headers)));
        prop_assert!(!prefix_route.matches(&request(&Method::CONNECT, &path, &headers)));
    }
}

// === string matchers ===

fn text() -> impl Strategy<Value = String> {
    "[aAbBéÉß.]{0,6}"
}

proptest! {
    #[test]
    fn string_matcher_matches_reference(pattern in text(), value in text(), kind in 0u8..4, ignore_case in any::<bool>()) {
        let fold = |s: &str| if ignore_case { s.to_ascii_lowercase() } else { s.to_owned() };
        let (p, v) = (fold(&pattern), fold(&value));
        let (kind, want) = match kind {
            0 => (StringMatch::Exact(pattern), v == p),
            1 => (StringMatch::Prefix(pattern), v.starts_with(&p)),
            2 => (StringMatch::Suffix(pattern), v.ends_with(&p)),
            _ => (StringMatch::Contains(pattern), v.contains(&p)),
        };
        let m = StringMatcher { kind, ignore_case };
        prop_assert_eq!(m.matches(&value), want);
    }

    #[test]
    fn ignore_case_accepts_any_ascii_recasing(pattern in text(), flips in prop::collection::vec(any::<bool>(), 1..8), kind in 0u8..4) {
        let value = recase(&pattern, &flips);
        let kind = match kind {
            0 => StringMatch::Exact(pattern),
            1 => StringMatch::Prefix(pattern),
            2 => StringMatch::Suffix(pattern),
            _ => StringMatch::Contains(pattern),
        };
        let m = StringMatcher { kind, ignore_case: true };
        prop_assert!(m.matches(&value), "{m:?} rejects {value:?}");
    }
}

// === format strings ===

/// Operators with what they must parse to.
fn operator() -> impl Strategy<Value = (String, Command, Option<usize>)> {
    let name = |s: &str| HeaderKey::parse(s).expect("valid header");
    prop_oneof![
        Just(("%PROTOCOL%".to_owned(), Command::Protocol, None)),
        Just(("%RESPONSE_CODE%".to_owned(), Command::ResponseCode, None)),
        Just(("%UPSTREAM_HOST%".to_owned(), Command::UpstreamHost, None)),
        Just(("%START_TIME%".to_owned(), Command::StartTime(None), None)),
        Just((
            "%START_TIME(%s.%3f)%".to_owned(),
            Command::StartTime(Some("%s.%3f".to_owned())),
            None
        )),
        Just((
            "%REQ(:AUTHORITY)%".to_owned(),
            Command::Req(HeaderKey::Authority, None),
            None
        )),
        Just((
            "%REQ(X-A?X-B):7%".to_owned(),
            Command::Req(name("x-a"), Some(name("x-b"))),
            Some(7)
        )),
        Just((
            "%RESP(server)%".to_owned(),
            Command::Resp(name("server"), None),
            None
        )),
        Just((
            "%DYNAMIC_METADATA(ns:k)%".to_owned(),
            Command::DynamicMetadata("ns".to_owned(), vec!["k".to_owned()]),
            None
        )),
    ]
}

#[derive(Debug, Clone)]
enum Piece {
    /// Text without `%`.
    Text(String),
    /// `%%`, an escaped percent sign.
    Percent,
    Op(String, Command, Option<usize>),
}

fn literal_piece() -> impl Strategy<Value = Piece> {
    prop_oneof!["[^%]{1,8}".prop_map(Piece::Text), Just(Piece::Percent),]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        2 => literal_piece(),
        1 => operator().prop_map(|(s, c, l)| Piece::Op(s, c, l)),
    ]
}

/// The text of `pieces` and the parts it must parse to (adjacent literals
/// merged, `%%` unescaped).
fn render(pieces: &[Piece]) -> (String, Vec<FormatPart>) {
    let mut text = String::new();
    let mut parts = Vec::new();
    let mut lit = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => {
                text.push_str(t);
                lit.push_str(t);
            }
            Piece::Percent => {
                text.push_str("%%");
                lit.push('%');
            }
            Piece::Op(s, cmd, max_len) => {
                text.push_str(s);
                if !lit.is_empty() {
                    parts.push(FormatPart::Literal(std::mem::take(&mut lit)));
                }
                parts.push(FormatPart::Op(xds_client::config::Operator {
                    cmd: cmd.clone(),
                    max_len: *max_len,
                }));
            }
        }
    }
    if !lit.is_empty() {
        parts.push(FormatPart::Literal(lit));
    }
    (text, parts)
}

proptest! {
    #[test]
    fn format_parse_never_panics(s in any::<String>()) {
        let _ = parse_format(&s);
    }

    #[test]
    fn format_parse_never_panics_on_operator_soup(s in "[%():?A-Z_a-z0-9\\[\\]\", ]{0,40}") {
        let _ = parse_format(&s);
    }

    #[test]
    fn literal_only_parses_to_one_unescaped_literal(pieces in prop::collection::vec(literal_piece(), 0..8)) {
        let (text, parts) = render(&pieces);
        let f = parse_format(&text).expect("literal text parses");
        prop_assert!(f.is_literal());
        prop_assert!(f.parts.len() <= 1);
        prop_assert_eq!(f.parts, parts);
    }

    #[test]
    fn composed_formats_parse_to_their_parts(pieces in prop::collection::vec(piece(), 0..8)) {
        let (text, parts) = render(&pieces);
        let f = parse_format(&text).map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(f.parts, parts);
    }
}

// === weighted clusters ===

fn weighted(weights: &[u32]) -> WeightedClusters {
    WeightedClusters {
        clusters: weights
            .iter()
            .enumerate()
            .map(|(i, w)| WeightedCluster {
                name: i.to_string().into(),
                weight: *w,
                headers: HeaderMutations::default(),
                host_rewrite: None,
            })
            .collect(),
        total: weights.iter().map(|w| u64::from(*w)).sum(),
    }
}

/// Envoy: walk the clusters in order, subtracting weights, from
/// `random % total`.
fn reference_pick(weights: &[u32], random: u64) -> usize {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut point = random % total;
    for (i, w) in weights.iter().enumerate() {
        if point < u64::from(*w) {
            return i;
        }
        point -= u64::from(*w);
    }
    unreachable!("point < total")
}

proptest! {
    #[test]
    fn pick_matches_reference(weights in prop::collection::vec(0u32..1000, 1..8), random in any::<u64>()) {
        prop_assume!(weights.iter().any(|w| *w > 0));
        let w = weighted(&weights);
        let got: usize = w.pick(random).name.parse().expect("named by index");
        prop_assert_eq!(got, reference_pick(&weights, random));
        prop_assert!(weights[got] > 0, "a zero-weight cluster is never picked");
    }

    #[test]
    fn pick_distribution_is_exactly_proportional(weights in prop::collection::vec(0u32..50, 1..6), offset in any::<u32>()) {
        // Over any `total` consecutive random values each cluster is picked
        // exactly `weight` times.
        prop_assume!(weights.iter().any(|w| *w > 0));
        let w = weighted(&weights);
        let mut counts = vec![0u32; weights.len()];
        for r in 0..w.total {
            let i: usize = w.pick(u64::from(offset) + r).name.parse().expect("named by index");
            counts[i] += 1;
        }
        prop_assert_eq!(counts, weights);
    }
}
