//! Translation of Envoy protos into validated config types.
//!
//! The static bootstrap and (later) xDS resources go through the same
//! functions. Each one first runs the [`crate::support`] walk, so a field weir
//! does not implement is rejected with its path, then builds the immutable
//! types, collecting every error it finds.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use http::{HeaderName, HeaderValue};
use prost::Message;

use crate::api::envoy::config::bootstrap::v3::Bootstrap;
use crate::api::envoy::config::core::v3 as core;
use crate::api::google::protobuf as pb;
use crate::config::*;
use crate::error::{join, ConfigErrors};

pub mod cluster;
pub mod compressor;
pub mod cors;
pub mod ext_authz;
pub mod fault;
pub mod format;
pub mod grpc_stats;
pub mod hcm;
pub mod header_mutation;
pub mod health_check;
pub mod istio;
pub mod jwt_authn;
pub mod listener;
pub mod local_ratelimit;
pub mod match_tree;
pub mod network;
pub mod per_filter;
pub mod rate_limit_service;
pub mod ratelimit;
pub mod rbac;
pub mod route;
pub mod set_filter_state;
pub mod tls;
pub mod workload;
pub mod xds;

pub use format::{parse_format, DEFAULT_ACCESS_LOG_FORMAT};

/// Translates a whole bootstrap into a snapshot.
pub fn bootstrap_to_snapshot(b: &Bootstrap) -> Result<Snapshot, ConfigErrors> {
    // Unimplemented fields are reported, and translation goes on so that
    // one run lists every problem (`--mode validate`).
    let mut errs = crate::support::check_proto(b, "");
    let mut dynamic = match &b.dynamic_resources {
        Some(d) => xds::dynamic_config(d, "dynamic_resources").unwrap_or_else(|e| {
            errs.extend(e);
            DynamicConfig::default()
        }),
        None => DynamicConfig::default(),
    };
    let node = b
        .node
        .as_ref()
        .map(|n| {
            let loc = n.locality.clone().unwrap_or_default();
            Node {
                id: n.id.clone(),
                cluster: n.cluster.clone(),
                zone: loc.zone,
                region: loc.region,
                sub_zone: loc.sub_zone,
                metadata: n
                    .metadata
                    .as_ref()
                    .map(struct_to_json)
                    .unwrap_or(serde_json::Value::Null),
            }
        })
        .unwrap_or_default();

    let admin = match &b.admin {
        Some(a) => match &a.address {
            Some(addr) => match listen_address(addr, "admin.address") {
                Ok(address) => {
                    let mut logs = Vec::new();
                    for (i, l) in a.access_log.iter().enumerate() {
                        match hcm::access_log(l, &format!("admin.access_log[{i}]")) {
                            Ok(l) => logs.push(Arc::new(l)),
                            Err(e) => errs.extend(e),
                        }
                    }
                    Some(Admin {
                        address,
                        access_logs: logs,
                    })
                }
                Err(e) => {
                    errs.extend(e);
                    None
                }
            },
            None => None,
        },
        None => None,
    };

    let mut clusters = ClusterMap::new();
    let mut secrets = BTreeMap::new();
    let mut listeners = Vec::new();
    // Each translated listener's index in static_resources.listeners.
    let mut listener_index: Vec<usize> = Vec::new();
    if let Some(sr) = &b.static_resources {
        for (i, s) in sr.secrets.iter().enumerate() {
            let path = format!("static_resources.secrets[{i}]");
            match tls::secret(s, &path) {
                Ok((name, s)) => {
                    if secrets.insert(name, Arc::new(s)).is_some() {
                        errs.push(join(&path, "name"), "duplicate secret name");
                    }
                }
                Err(e) => errs.extend(e),
            }
        }
        for (i, c) in sr.clusters.iter().enumerate() {
            let path = format!("static_resources.clusters[{i}]");
            match cluster::cluster(c, &path) {
                Ok(c) => {
                    if clusters.insert(c.name.clone(), Arc::new(c)).is_some() {
                        errs.push(join(&path, "name"), "duplicate cluster name");
                    }
                }
                Err(e) => errs.extend(e),
            }
        }
        for (i, l) in sr.listeners.iter().enumerate() {
            let path = format!("static_resources.listeners[{i}]");
            match listener::listener(l, &path) {
                Ok(l) => {
                    if listeners.iter().any(|x: &Arc<Listener>| x.name == l.name) {
                        errs.push(join(&path, "name"), "duplicate listener name");
                    }
                    if listeners
                        .iter()
                        // As Envoy, listeners on port 0 never collide.
                        .any(|x: &Arc<Listener>| {
                            x.address == l.address
                                && l.address.port() != 0
                                && !l.internal
                                && !x.internal
                        })
                    {
                        errs.push(join(&path, "address"), "another listener has this address");
                    }
                    listeners.push(Arc::new(l));
                    listener_index.push(i);
                }
                Err(e) => errs.extend(e),
            }
        }
    }
    // Static routes must name clusters that exist (Envoy's validate_clusters
    // default for static route configs).
    let ads = dynamic.ads.is_some();
    if let Some(a) = &dynamic.ads {
        if let GrpcTarget::Cluster(c) = &a.target {
            if !clusters.contains_key(c) {
                errs.push(
                    "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                    format!("unknown static cluster {c:?}"),
                );
            }
        }
    }
    for (field, cs) in [("lds_config", &dynamic.lds), ("cds_config", &dynamic.cds)] {
        if let Some(cs) = cs {
            xds::check_source(
                cs,
                &format!("dynamic_resources.{field}"),
                ads,
                &clusters,
                &mut errs,
            );
        }
    }
    for l in &listeners {
        check_listener_refs(l, &clusters, &secrets, ads, true, &mut errs);
    }
    for (_, c) in clusters.iter() {
        check_cluster_refs(c, &clusters, &secrets, ads, &mut errs);
    }

    let stats = match &b.stats_config {
        Some(sc) => match &sc.stats_matcher {
            Some(m) => stats_matcher(m).unwrap_or_else(|e| {
                errs.extend(e);
                StatsConfig::All
            }),
            None => StatsConfig::All,
        },
        None => StatsConfig::All,
    };

    let mut max_downstream_connections = None;
    if let Some(om) = &b.overload_manager {
        for (i, rm) in om.resource_monitors.iter().enumerate() {
            let path = format!("overload_manager.resource_monitors[{i}]");
            let any = match &rm.config_type {
                Some(crate::api::envoy::config::overload::v3::resource_monitor::ConfigType::TypedConfig(a)) => a,
                None => {
                    errs.push(path, "resource monitor has no typed_config");
                    continue;
                }
            };
            match decode::<crate::api::envoy::extensions::resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig>(any, &path) {
                Ok(c) => max_downstream_connections = Some(c.max_active_downstream_connections.max(0) as u64),
                Err(e) => errs.extend(e),
            }
        }
    }
    let mut internal_listener_buffer = None;
    for (i, ext) in b.bootstrap_extensions.iter().enumerate() {
        let path = format!("bootstrap_extensions[{i}]");
        let type_url = ext.typed_config.as_ref().map(|a| a.type_url.as_str());
        match type_url {
            Some(t) if t.ends_with("envoy.extensions.bootstrap.internal_listener.v3.InternalListener") => {
                use crate::api::envoy::extensions::bootstrap::internal_listener::v3::InternalListener;
                let Some(a) = ext.typed_config.as_ref() else {
                    continue;
                };
                match decode::<InternalListener>(a, &join(&path, "typed_config")) {
                    // Envoy's default is 1 MiB per direction.
                    Ok(il) => {
                        internal_listener_buffer =
                            Some(il.buffer_size_kb.map_or(1024, |v| v.value as usize) * 1024)
                    }
                    Err(e) => errs.extend(e),
                }
            }
            // istio/proxy's `envoy.bootstrap.workload_discovery`
            // (`metadata_discovery` in istio-agent's bootstrap).
            Some(t) if t.ends_with(&format!("/{}", crate::descriptors::ISTIO_WORKLOAD_EXTENSION)) => {
                let tpath = join(&path, "typed_config");
                if dynamic.wds.is_some() {
                    errs.push(tpath, "a second workload discovery extension");
                    continue;
                }
                let value = ext.typed_config.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
                match workload::bootstrap_extension(value, &tpath) {
                    Ok(cs) => {
                        xds::check_source(&cs, &join(&tpath, "config_source"), ads, &clusters, &mut errs);
                        dynamic.wds = Some(cs);
                    }
                    Err(e) => errs.extend(e),
                }
            }
            _ => errs.push(
                path,
                "only envoy.bootstrap.internal_listener and istio.workload.BootstrapExtension are accepted",
            ),
        }
    }
    for (l, i) in listeners.iter().zip(&listener_index) {
        if l.internal && internal_listener_buffer.is_none() {
            errs.push(
                format!("static_resources.listeners[{i}].internal_listener"),
                INTERNAL_LISTENER_WITHOUT_REGISTRY,
            );
        }
    }

    let default_tracer = match b.tracing.as_ref().and_then(|t| t.http.as_ref()) {
        Some(h) => hcm::tracing_provider(h, "tracing.http")
            .map_err(|e| errs.extend(e))
            .ok()
            .map(Arc::new),
        None => None,
    };
    // As Envoy: the local cluster must be a static cluster.
    let local_cluster = b
        .cluster_manager
        .as_ref()
        .map(|m| m.local_cluster_name.as_str())
        .filter(|n| !n.is_empty())
        .map(|n| {
            if !clusters.contains_key(n) {
                errs.push(
                    "cluster_manager.local_cluster_name",
                    format!("local cluster '{n}' must be defined"),
                );
            }
            Name::from(n)
        });
    errs.into_result(Snapshot {
        internal_listener_buffer,
        local_cluster,
        default_tracer,
        node,
        admin,
        listeners,
        clusters,
        secrets,
        routes: BTreeMap::new(),
        dynamic,
        stats,
        max_downstream_connections,
    })
}

/// A listener's references (see [`check_chain_refs`]). `static_routes`:
/// inline routes must name known clusters (Envoy's `validate_clusters`
/// default for static listeners; an LDS listener's routes may name clusters
/// CDS has not sent yet).
pub fn check_listener_refs(
    l: &Listener,
    clusters: &ClusterMap,
    secrets: &BTreeMap<Name, Arc<Secret>>,
    ads: bool,
    static_routes: bool,
    errs: &mut ConfigErrors,
) {
    for fc in l.filter_chains.iter().chain(&l.default_filter_chain) {
        check_chain_refs(fc, clusters, secrets, ads, static_routes, errs);
    }
}

/// A listener chain's references: route and tcp_proxy clusters, SDS
/// secret names and config sources.
fn check_chain_refs(
    fc: &FilterChain,
    clusters: &ClusterMap,
    secrets: &BTreeMap<Name, Arc<Secret>>,
    ads: bool,
    static_routes: bool,
    errs: &mut ConfigErrors,
) {
    match &fc.filter {
        NetworkFilter::Http(h) => match &h.routes {
            RouteSource::Static(rc) => check_route_clusters(
                rc,
                &format!("{}.filters[0].typed_config.route_config", fc.path),
                clusters,
                static_routes,
                errs,
            ),
            RouteSource::Rds(r) => xds::check_source(
                &r.source,
                &format!("{}.filters[0].typed_config.rds.config_source", fc.path),
                ads,
                clusters,
                errs,
            ),
        },
        // As Envoy, tcp_proxy resolves its cluster per connection: a
        // missing one closes the connection (NC, downstream_cx_no_route).
        NetworkFilter::Tcp(_) => {}
    }
    if let Some(t) = &fc.tls {
        check_tls_refs(&t.certs, &t.validation, &t.sds, &t.path, secrets, errs);
        check_ticket_keys_ref(t, secrets, errs);
        check_sds_sources(&t.sds, &t.path, ads, clusters, errs);
    }
}

/// The clusters a route configuration names. `require_known`: an unknown
/// cluster is an error (Envoy's `validate_clusters` default for inline
/// routes of static listeners); otherwise it is answered 503 (NC) at run
/// time, as for RDS. A mirror to a cluster with the upstream PROXY protocol
/// transport is rejected in any case (which addresses a shadow's header
/// carries is not settled; routes to such clusters work).
pub fn check_route_clusters(
    rc: &RouteConfig,
    base: &str,
    clusters: &ClusterMap,
    require_known: bool,
    errs: &mut ConfigErrors,
) {
    for (vi, vh) in rc.vhosts.iter().enumerate() {
        for (ri, r) in vh.routes.iter().enumerate() {
            let RouteKind::Forward(a) = &r.action else {
                continue;
            };
            let names: Vec<(String, &Name)> = match &a.cluster {
                ClusterSpecifier::Name(n) => vec![("route.cluster".to_owned(), n)],
                ClusterSpecifier::Weighted(w) => w
                    .clusters
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        (
                            format!("route.weighted_clusters.clusters[{i}].name"),
                            &c.name,
                        )
                    })
                    .collect(),
                ClusterSpecifier::Header(_) => vec![],
            };
            let mirrors = a
                .mirrors
                .iter()
                .enumerate()
                .filter_map(|(i, m)| match &m.cluster {
                    MirrorCluster::Name(n) => {
                        Some((format!("route.request_mirror_policies[{i}].cluster"), n))
                    }
                    MirrorCluster::Header(_) => None,
                });
            let names = names.into_iter().map(|(f, n)| (f, n, false));
            for (field, n, mirror) in names.chain(mirrors.map(|(f, n)| (f, n, true))) {
                match clusters.get(n) {
                    None if require_known => errs.push(
                        format!("{base}.virtual_hosts[{vi}].routes[{ri}].{field}"),
                        format!("unknown cluster {n:?}"),
                    ),
                    None => {}
                    Some(c)
                        if mirror
                            && std::iter::once(&c.transport)
                            .chain(c.transport_matches.iter().map(|m| &m.transport))
                            .any(|t| t.proxy_protocol().is_some()) =>
                    {
                        errs.push(
                            format!("{base}.virtual_hosts[{vi}].routes[{ri}].{field}"),
                            format!("cluster {n:?} uses the upstream PROXY protocol transport, which weir does not implement for request mirrors"),
                        )
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// A cluster's references: SDS secrets, and the EDS and SDS sources.
pub fn check_cluster_refs(
    c: &Cluster,
    clusters: &ClusterMap,
    secrets: &BTreeMap<Name, Arc<Secret>>,
    ads: bool,
    errs: &mut ConfigErrors,
) {
    let transports =
        std::iter::once(&c.transport).chain(c.transport_matches.iter().map(|m| &m.transport));
    for t in transports {
        if let Some(t) = t.tls() {
            check_tls_refs(
                t.cert.as_slice(),
                &t.validation,
                &t.sds,
                &t.path,
                secrets,
                errs,
            );
            check_sds_sources(&t.sds, &t.path, ads, clusters, errs);
        }
    }
    if let Some(e) = &c.eds {
        xds::check_source(
            &e.source,
            &format!("cluster {:?} eds_cluster_config.eds_config", c.name),
            ads,
            clusters,
            errs,
        );
    }
}

fn check_sds_sources(
    sds: &[SdsRef],
    path: &str,
    ads: bool,
    clusters: &ClusterMap,
    errs: &mut ConfigErrors,
) {
    for r in sds {
        xds::check_source(
            &r.source,
            &join(
                path,
                &format!("common_tls_context (secret {:?}).sds_config", r.name),
            ),
            ads,
            clusters,
            errs,
        );
    }
}

/// `session_ticket_keys_sds_secret_config` without `sds_config` names a
/// static `session_ticket_keys` secret (Envoy: "Unknown tls session ticket
/// keys").
fn check_ticket_keys_ref(
    t: &DownstreamTls,
    secrets: &BTreeMap<Name, Arc<Secret>>,
    errs: &mut ConfigErrors,
) {
    let Some(SecretRef::Sds(n)) = &t.ticket_keys else {
        return;
    };
    if t.sds.iter().any(|r| &r.name == n) {
        return;
    }
    let path = join(&t.path, "session_ticket_keys_sds_secret_config");
    match secrets.get(n).map(|s| &**s) {
        Some(Secret::SessionTicketKeys(_)) => {}
        Some(_) => errs.push(path, format!("secret {n:?} is not session_ticket_keys")),
        None => errs.push(path, format!("Unknown tls session ticket keys: {n}")),
    }
}

/// Secrets named without `sds_config` must be static secrets of the right
/// kind; SDS-fetched ones are checked when they arrive.
fn check_tls_refs(
    certs: &[SecretRef<TlsCertificate>],
    validation: &Option<ValidationRef>,
    sds: &[SdsRef],
    path: &str,
    secrets: &BTreeMap<Name, Arc<Secret>>,
    errs: &mut ConfigErrors,
) {
    let dynamic = |n: &Name| sds.iter().any(|r| &r.name == n);
    for c in certs {
        if let SecretRef::Sds(n) = c {
            if dynamic(n) {
                continue;
            }
            match secrets.get(n).map(|s| &**s) {
                Some(Secret::Certificate(_)) => {}
                Some(_) => errs.push(
                    join(
                        path,
                        "common_tls_context.tls_certificate_sds_secret_configs",
                    ),
                    format!("secret {n:?} is not a tls_certificate"),
                ),
                None => errs.push(
                    join(
                        path,
                        "common_tls_context.tls_certificate_sds_secret_configs",
                    ),
                    format!("unknown static secret {n:?}"),
                ),
            }
        }
    }
    let n = match validation {
        Some(ValidationRef::Sds(n)) | Some(ValidationRef::Combined { sds: n, .. }) => n,
        _ => return,
    };
    if dynamic(n) {
        return;
    }
    match secrets.get(n).map(|s| &**s) {
        Some(Secret::Validation(_)) => {}
        Some(_) => errs.push(
            join(path, "common_tls_context"),
            format!("secret {n:?} is not a validation_context"),
        ),
        None => errs.push(
            join(path, "common_tls_context"),
            format!("unknown static secret {n:?}"),
        ),
    }
}

fn stats_matcher(
    m: &crate::api::envoy::config::metrics::v3::StatsMatcher,
) -> Result<StatsConfig, ConfigErrors> {
    use crate::api::envoy::config::metrics::v3::stats_matcher::StatsMatcher as M;
    let list = |l: &crate::api::envoy::r#type::matcher::v3::ListStringMatcher, p: &str| {
        let mut errs = ConfigErrors::default();
        let mut out = Vec::new();
        for (i, s) in l.patterns.iter().enumerate() {
            match string_matcher(s, &format!("{p}.patterns[{i}]")) {
                Ok(s) => out.push(s),
                Err(e) => errs.extend(e),
            }
        }
        errs.into_result(out)
    };
    Ok(match &m.stats_matcher {
        Some(M::RejectAll(true)) => StatsConfig::None,
        Some(M::RejectAll(false)) | None => StatsConfig::All,
        Some(M::InclusionList(l)) => {
            StatsConfig::Include(list(l, "stats_config.stats_matcher.inclusion_list")?)
        }
        Some(M::ExclusionList(l)) => {
            StatsConfig::Exclude(list(l, "stats_config.stats_matcher.exclusion_list")?)
        }
    })
}

// === helpers shared by the translate modules ===

/// Decodes an `Any` into the expected message type.
pub fn decode<M: Message + Default + prost::Name>(
    any: &pb::Any,
    path: &str,
) -> Result<M, ConfigErrors> {
    let want = M::full_name();
    let got = any.type_url.rsplit('/').next().unwrap_or_default();
    if got != want {
        let mut e = ConfigErrors::default();
        e.push(path.to_owned(), format!("expected {want}, got {got}"));
        return Err(e);
    }
    M::decode(any.value.as_slice()).map_err(|err| {
        let mut e = ConfigErrors::default();
        e.push(path.to_owned(), format!("invalid {want}: {err}"));
        e
    })
}

pub(crate) fn err(path: impl Into<String>, reason: impl Into<String>) -> ConfigErrors {
    let mut e = ConfigErrors::default();
    e.push(path, reason);
    e
}

/// A protobuf Duration; negative is an error.
/// `google.protobuf.Duration`'s largest number of seconds.
pub const MAX_DURATION_SECS: i64 = 315_576_000_000;

pub fn duration(d: &pb::Duration, path: &str) -> Result<Duration, ConfigErrors> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(err(path, "duration must not be negative"));
    }
    // google.protobuf.Duration's range (about 10 000 years), as the JSON
    // mapping enforces; binary xDS must not smuggle in larger values.
    if d.seconds > MAX_DURATION_SECS || d.nanos > 999_999_999 {
        return Err(err(path, "duration out of range"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// An optional timeout where `0s` means disabled; `default` when unset.
pub fn timeout(
    d: Option<&pb::Duration>,
    default: Option<Duration>,
    path: &str,
) -> Result<Option<Duration>, ConfigErrors> {
    match d {
        None => Ok(default),
        Some(d) => {
            let d = duration(d, path)?;
            Ok(if d.is_zero() { None } else { Some(d) })
        }
    }
}

pub fn header_name(s: &str, path: &str) -> Result<HeaderName, ConfigErrors> {
    HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| err(path, format!("invalid header name {s:?}")))
}

pub fn string_matcher(
    m: &crate::api::envoy::r#type::matcher::v3::StringMatcher,
    path: &str,
) -> Result<StringMatcher, ConfigErrors> {
    use crate::api::envoy::r#type::matcher::v3::string_matcher::MatchPattern as P;
    let kind = match &m.match_pattern {
        Some(P::Exact(s)) => StringMatch::Exact(s.clone()),
        Some(P::Prefix(s)) => StringMatch::Prefix(s.clone()),
        Some(P::Suffix(s)) => StringMatch::Suffix(s.clone()),
        Some(P::Contains(s)) => StringMatch::Contains(s.clone()),
        Some(P::SafeRegex(r)) => StringMatch::Regex(regex_full(r, &join(path, "safe_regex"))?),
        Some(_) => return Err(err(path, "weir does not implement this string matcher")),
        None => return Err(err(path, "string matcher has no pattern")),
    };
    if m.ignore_case && matches!(kind, StringMatch::Regex(_)) {
        return Err(err(
            join(path, "ignore_case"),
            "ignore_case has no effect on safe_regex (Envoy rejects it)",
        ));
    }
    Ok(StringMatcher {
        kind,
        ignore_case: m.ignore_case,
    })
}

pub fn regex_full(
    r: &crate::api::envoy::r#type::matcher::v3::RegexMatcher,
    path: &str,
) -> Result<Pattern, ConfigErrors> {
    Pattern::full(&r.regex).map_err(|e| err(join(path, "regex"), format!("invalid regex: {e}")))
}

pub fn regex_unanchored(
    r: &crate::api::envoy::r#type::matcher::v3::RegexMatcher,
    path: &str,
) -> Result<Pattern, ConfigErrors> {
    Pattern::unanchored(&r.regex)
        .map_err(|e| err(join(path, "regex"), format!("invalid regex: {e}")))
}

/// Converts an Envoy `\1` style substitution into the regex crate's `${1}`.
pub fn substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    let d = *d;
                    chars.next();
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// Largest file a `DataSource` may name (direct-response bodies are further
/// limited to 4096 bytes, as Envoy).
const MAX_DATA_SOURCE: u64 = 1 << 20;

/// Reads a `DataSource` (inline, file, or environment variable).
pub fn data_source(d: &core::DataSource, path: &str) -> Result<Vec<u8>, ConfigErrors> {
    use core::data_source::Specifier as S;
    match &d.specifier {
        Some(S::InlineBytes(b)) => Ok(b.clone()),
        Some(S::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        // Bounded read: a data source is config, never an unbounded stream
        // (a path like /dev/zero must not hang the loader).
        Some(S::Filename(f)) => {
            use std::io::Read;
            let mut out = Vec::new();
            std::fs::File::open(f)
                .and_then(|file| file.take(MAX_DATA_SOURCE + 1).read_to_end(&mut out))
                .map_err(|e| err(join(path, "filename"), format!("cannot read {f:?}: {e}")))?;
            if out.len() as u64 > MAX_DATA_SOURCE {
                return Err(err(
                    join(path, "filename"),
                    format!("{f:?} is larger than {MAX_DATA_SOURCE} bytes"),
                ));
            }
            Ok(out)
        }
        Some(S::EnvironmentVariable(v)) => std::env::var(v).map(String::into_bytes).map_err(|_| {
            err(
                join(path, "environment_variable"),
                format!("environment variable {v:?} is not set"),
            )
        }),
        None => Err(err(path, "data source is empty")),
    }
}

/// Envoy's error for an internal listener without the
/// `envoy.bootstrap.internal_listener` bootstrap extension.
pub const INTERNAL_LISTENER_WITHOUT_REGISTRY: &str =
    "internal listener registry is not initialized (the envoy.bootstrap.internal_listener bootstrap extension is required)";

/// A socket or pipe address to listen on.
pub fn listen_address(a: &core::Address, path: &str) -> Result<ListenAddress, ConfigErrors> {
    use core::address::Address as A;
    match &a.address {
        Some(A::SocketAddress(sa)) => {
            socket_address(sa, &join(path, "socket_address")).map(ListenAddress::Socket)
        }
        Some(A::Pipe(p)) => Ok(ListenAddress::Pipe(PathBuf::from(&p.path))),
        Some(A::EnvoyInternalAddress(_)) => {
            Err(err(path, "internal addresses are not implemented yet"))
        }
        None => Err(err(path, "address is empty")),
    }
}

/// An IP socket address (no DNS).
pub fn socket_address(sa: &core::SocketAddress, path: &str) -> Result<SocketAddr, ConfigErrors> {
    use core::socket_address::PortSpecifier as P;
    let port = match &sa.port_specifier {
        Some(P::PortValue(p)) if *p <= 65535 => *p as u16,
        Some(P::PortValue(p)) => {
            return Err(err(
                join(path, "port_value"),
                format!("port {p} out of range"),
            ))
        }
        Some(P::NamedPort(_)) => {
            return Err(err(
                join(path, "named_port"),
                "named ports are not supported",
            ))
        }
        None => 0,
    };
    if !sa.resolver_name.is_empty() {
        return Err(err(
            join(path, "resolver_name"),
            "custom resolvers are not supported",
        ));
    }
    if sa.protocol != 0 {
        return Err(err(join(path, "protocol"), "only TCP is supported"));
    }
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        err(
            join(path, "address"),
            format!("{:?} is not an IP address", sa.address),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

pub fn header_mutations(
    req_add: &[core::HeaderValueOption],
    req_remove: &[String],
    resp_add: &[core::HeaderValueOption],
    resp_remove: &[String],
    path: &str,
) -> Result<HeaderMutations, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = HeaderMutations::default();
    for (i, h) in req_add.iter().enumerate() {
        match header_add(h, &format!("{path}request_headers_to_add[{i}]"), true) {
            Ok(h) => out.request_add.push(h),
            Err(e) => errs.extend(e),
        }
    }
    for (i, h) in resp_add.iter().enumerate() {
        match header_add(h, &format!("{path}response_headers_to_add[{i}]"), false) {
            Ok(h) => out.response_add.push(h),
            Err(e) => errs.extend(e),
        }
    }
    for (i, n) in req_remove.iter().enumerate() {
        match removable(n, &format!("{path}request_headers_to_remove[{i}]")) {
            Ok(n) => out.request_remove.push(n),
            Err(e) => errs.extend(e),
        }
    }
    for (i, n) in resp_remove.iter().enumerate() {
        match removable(n, &format!("{path}response_headers_to_remove[{i}]")) {
            Ok(n) => out.response_remove.push(n),
            Err(e) => errs.extend(e),
        }
    }
    errs.into_result(out)
}

fn removable(n: &str, path: &str) -> Result<HeaderName, ConfigErrors> {
    // As Envoy: pseudo-headers and Host cannot be removed.
    if n.starts_with(':') || n.eq_ignore_ascii_case("host") {
        return Err(err(path, format!("{n:?} cannot be removed")));
    }
    header_name(&n.to_ascii_lowercase(), path)
}

pub(crate) fn header_add(
    h: &core::HeaderValueOption,
    path: &str,
    request: bool,
) -> Result<HeaderAdd, ConfigErrors> {
    use core::header_value_option::HeaderAppendAction as A;
    let Some(hv) = &h.header else {
        return Err(err(path, "header is required"));
    };
    let key = hv.key.to_ascii_lowercase();
    if key.starts_with(':') || (request && key == "host") {
        return Err(err(
            join(path, "header.key"),
            format!("{:?} cannot be modified this way", hv.key),
        ));
    }
    let name = header_name(&key, &join(path, "header.key"))?;
    let raw = if !hv.raw_value.is_empty() {
        String::from_utf8(hv.raw_value.clone())
            .map_err(|_| err(join(path, "header.raw_value"), "raw_value must be UTF-8"))?
    } else {
        hv.value.clone()
    };
    let value = parse_format(&raw).map_err(|e| err(join(path, "header.value"), e))?;
    let action = match (h.append, A::try_from(h.append_action)) {
        (Some(pb::BoolValue { value: true }), _) => A::AppendIfExistsOrAdd,
        (Some(pb::BoolValue { value: false }), _) => A::OverwriteIfExistsOrAdd,
        (None, Ok(a)) => a,
        (None, Err(_)) => return Err(err(join(path, "append_action"), "unknown append_action")),
    };
    if h.append.is_some() && h.append_action != 0 {
        return Err(err(path, "append and append_action are mutually exclusive"));
    }
    Ok(HeaderAdd {
        name,
        value,
        action: match action {
            A::AppendIfExistsOrAdd => AppendAction::AppendIfExistsOrAdd,
            A::AddIfAbsent => AppendAction::AddIfAbsent,
            A::OverwriteIfExistsOrAdd => AppendAction::OverwriteIfExistsOrAdd,
            A::OverwriteIfExists => AppendAction::OverwriteIfExists,
        },
        keep_empty_value: h.keep_empty_value,
    })
}

/// `google.protobuf.Struct` to JSON.
pub fn struct_to_json(s: &pb::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind as K;
    match &v.kind {
        None | Some(K::NullValue(_)) => serde_json::Value::Null,
        Some(K::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(K::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(K::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(K::StructValue(s)) => struct_to_json(s),
        Some(K::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
    }
}

/// `HeaderValue` for a literal; invalid bytes are an error.
pub fn header_value(s: &str, path: &str) -> Result<HeaderValue, ConfigErrors> {
    HeaderValue::from_str(s).map_err(|_| err(path, format!("invalid header value {s:?}")))
}

/// Parses `FractionalPercent` into parts per million.
pub fn fraction_ppm(f: &crate::api::envoy::r#type::v3::FractionalPercent) -> u32 {
    let denom: u64 = match f.denominator {
        0 => 100,
        1 => 10_000,
        _ => 1_000_000,
    };
    let n = u64::from(f.numerator).min(denom);
    (n * 1_000_000 / denom) as u32
}

#[cfg(test)]
mod tests;
