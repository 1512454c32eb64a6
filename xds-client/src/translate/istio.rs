//! Istio's telemetry filter configs (hand-built descriptors, decoded as
//! `DynamicMessage`s): `io.istio.http.peer_metadata.Config` and
//! `stats.PluginConfig`.
use prost_reflect::{DynamicMessage, Value};

use crate::config::{
    DimensionExpr, IstioAlpnConfig, IstioMetricConfig, IstioStatsConfig, MetadataExchangeConfig,
    PeerDiscovery, PeerField, PeerMetadataConfig, PeerPropagation,
};
use crate::error::{join, ConfigErrors};

fn field<'a>(m: &'a DynamicMessage, name: &str) -> Option<std::borrow::Cow<'a, Value>> {
    m.has_field_by_name(name)
        .then(|| m.get_field_by_name(name))
        .flatten()
}

fn list(m: &DynamicMessage, name: &str) -> Vec<Value> {
    match field(m, name).as_deref() {
        Some(Value::List(l)) => l.clone(),
        _ => Vec::new(),
    }
}

fn boolean(m: &DynamicMessage, name: &str) -> bool {
    matches!(field(m, name).as_deref(), Some(Value::Bool(true)))
}

fn string(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// `io.istio.http.peer_metadata.Config` -> [`PeerMetadataConfig`].
pub fn peer_metadata(m: &DynamicMessage, path: &str) -> Result<PeerMetadataConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut discovery = |name: &str, downstream: bool| -> Vec<PeerDiscovery> {
        let mut out = Vec::new();
        for (i, v) in list(m, name).iter().enumerate() {
            let p = format!("{}[{i}]", join(path, name));
            let Some(d) = v.as_message() else { continue };
            if d.has_field_by_name("istio_headers") {
                out.push(PeerDiscovery::IstioHeaders);
            } else if d.has_field_by_name("baggage") {
                // As Istio: baggage discovery is for the downstream peer
                // only; upstream it is ignored (with a warning there).
                if downstream {
                    out.push(PeerDiscovery::Baggage);
                } else {
                    tracing::warn!(
                        path = %join(&p, "baggage"),
                        "baggage peer discovery is only available downstream; ignored"
                    );
                }
            } else if d.has_field_by_name("workload_discovery") {
                out.push(PeerDiscovery::WorkloadDiscovery);
            } else if d.has_field_by_name("upstream_filter_state") {
                errs.push(
                    join(&p, "upstream_filter_state"),
                    "peer discovery from upstream filter state is not implemented",
                );
            }
        }
        out
    };
    let downstream_discovery = discovery("downstream_discovery", true);
    let upstream_discovery = discovery("upstream_discovery", false);
    let propagation = |name: &str| -> Vec<PeerPropagation> {
        let mut out = Vec::new();
        for v in list(m, name).iter() {
            let Some(d) = v.as_message() else { continue };
            if let Some(Value::Message(h)) = field(d, "istio_headers").as_deref() {
                out.push(PeerPropagation::IstioHeaders {
                    skip_external_clusters: boolean(h, "skip_external_clusters"),
                });
            } else if d.has_field_by_name("baggage") {
                out.push(PeerPropagation::Baggage);
            }
        }
        out
    };
    let downstream_propagation = propagation("downstream_propagation");
    let upstream_propagation = propagation("upstream_propagation");
    let additional_labels = list(m, "additional_labels").iter().map(string).collect();
    errs.into_result(PeerMetadataConfig {
        downstream_discovery,
        upstream_discovery,
        downstream_propagation,
        upstream_propagation,
        shared_with_upstream: if boolean(m, "shared_with_upstream") {
            crate::config::Sharing::Once
        } else {
            crate::config::Sharing::None
        },
        additional_labels,
    })
}

/// `istio.alpn`'s `FilterConfig` -> [`IstioAlpnConfig`]. As Istio's
/// config: the first entry of a protocol wins; an ALPN value must be 1 to
/// 255 bytes (BoringSSL refuses others when the connection is made).
pub fn istio_alpn(m: &DynamicMessage, path: &str) -> Result<IstioAlpnConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = IstioAlpnConfig::default();
    for (i, v) in list(m, "alpn_override").iter().enumerate() {
        let p = format!("{}[{i}]", join(path, "alpn_override"));
        let Some(o) = v.as_message() else { continue };
        let proto = match field(o, "upstream_protocol").as_deref() {
            Some(Value::EnumNumber(n)) => *n,
            _ => 0,
        };
        let Some(slot) = usize::try_from(proto)
            .ok()
            .and_then(|n| out.by_protocol.get_mut(n))
        else {
            errs.push(join(&p, "upstream_protocol"), "unknown upstream protocol");
            continue;
        };
        let mut alpn = Vec::new();
        for (j, a) in list(o, "alpn_override").iter().enumerate() {
            let a = string(a);
            if a.is_empty() || a.len() > 255 {
                errs.push(
                    format!("{}[{j}]", join(&p, "alpn_override")),
                    "an ALPN protocol is 1 to 255 bytes",
                );
            }
            alpn.push(a.into_bytes());
        }
        if slot.is_none() {
            *slot = Some(alpn.into());
        }
    }
    errs.into_result(out)
}

/// `envoy.tcp.metadataexchange.config.MetadataExchange` ->
/// [`MetadataExchangeConfig`] (downstream or upstream). An empty
/// `protocol` is rejected: Istio asserts it is set (a release build would
/// start the exchange on every connection without ALPN).
pub fn metadata_exchange(
    m: &DynamicMessage,
    path: &str,
) -> Result<MetadataExchangeConfig, ConfigErrors> {
    let protocol = field(m, "protocol").map(|v| string(&v)).unwrap_or_default();
    if protocol.is_empty() {
        return Err(crate::translate::err(
            join(path, "protocol"),
            "the metadata exchange needs the ALPN protocol that starts it",
        ));
    }
    Ok(MetadataExchangeConfig {
        protocol,
        additional_labels: list(m, "additional_labels").iter().map(string).collect(),
        enable_discovery: boolean(m, "enable_discovery"),
    })
}

/// `stats.PluginConfig` -> [`IstioStatsConfig`] (HTTP). `inbound` is set
/// later by the listener translator (the listener's direction).
pub fn istio_stats(m: &DynamicMessage, path: &str) -> Result<IstioStatsConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if !list(m, "definitions").is_empty() {
        errs.push(
            join(path, "definitions"),
            "custom Istio metrics are not implemented",
        );
    }
    let server_gateway = matches!(field(m, "reporter").as_deref(), Some(Value::EnumNumber(1)));
    let mut expressions: Vec<DimensionExpr> = Vec::new();
    let mut metrics = Vec::new();
    for (i, v) in list(m, "metrics").iter().enumerate() {
        let p = format!("{}[{i}]", join(path, "metrics"));
        let Some(mc) = v.as_message() else { continue };
        if field(mc, "match").is_some_and(|v| !v.as_str().unwrap_or_default().is_empty()) {
            errs.push(
                join(&p, "match"),
                "metric match expressions are not implemented",
            );
        }
        let mut dimensions = Vec::new();
        if let Some(Value::Map(map)) = field(mc, "dimensions").as_deref() {
            for (k, v) in map {
                let tag = match k {
                    prost_reflect::MapKey::String(s) => s.clone(),
                    _ => continue,
                };
                let text = v.as_str().unwrap_or_default();
                match dimension(text) {
                    Some(e) => {
                        let idx = match expressions.iter().position(|x| *x == e) {
                            Some(i) => i,
                            None => {
                                expressions.push(e);
                                expressions.len() - 1
                            }
                        };
                        dimensions.push((tag, idx));
                    }
                    None => errs.push(
                        format!("{}[{tag}]", join(&p, "dimensions")),
                        format!(
                            "expression {text:?} is not one weir evaluates (string literals, \
                             request.host|method|path|url_path|scheme|protocol, \
                             request.headers['x'], response.code, response.headers['x'], \
                             xds.cluster_name, xds.route_name, upstream_peer.<field>, \
                             downstream_peer.<field>)"
                        ),
                    ),
                }
            }
        }
        // As Istio: the tags in sorted order (the map's order is not).
        dimensions.sort();
        metrics.push(IstioMetricConfig {
            name: field(mc, "name").map(|v| string(&v)).unwrap_or_default(),
            dimensions,
            tags_to_remove: list(mc, "tags_to_remove").iter().map(string).collect(),
            drop: boolean(mc, "drop"),
        });
    }
    errs.into_result(IstioStatsConfig {
        disable_host_header_fallback: boolean(m, "disable_host_header_fallback"),
        server_gateway,
        inbound: false,
        metrics,
        expressions,
    })
}

/// Parses the CEL attribute forms weir evaluates.
pub fn dimension(text: &str) -> Option<DimensionExpr> {
    let t = text.trim();
    if let Some(lit) = quoted(t) {
        return Some(DimensionExpr::Literal(lit.to_owned()));
    }
    let index = |rest: &str| -> Option<String> {
        let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
        quoted(inner.trim()).map(str::to_ascii_lowercase)
    };
    if let Some(rest) = t.strip_prefix("request.headers") {
        return index(rest).map(DimensionExpr::RequestHeader);
    }
    if let Some(rest) = t.strip_prefix("response.headers") {
        return index(rest).map(DimensionExpr::ResponseHeader);
    }
    let peer = |rest: &str| rest.strip_prefix('.').and_then(PeerField::from_token);
    for (prefix, up) in [
        ("filter_state.upstream_peer", true),
        ("upstream_peer", true),
        ("filter_state.downstream_peer", false),
        ("downstream_peer", false),
    ] {
        if let Some(rest) = t.strip_prefix(prefix) {
            let f = peer(rest)?;
            return Some(if up {
                DimensionExpr::UpstreamPeer(f)
            } else {
                DimensionExpr::DownstreamPeer(f)
            });
        }
    }
    Some(match t {
        "request.host" => DimensionExpr::RequestHost,
        "request.method" => DimensionExpr::RequestMethod,
        "request.path" => DimensionExpr::RequestPath,
        "request.url_path" => DimensionExpr::RequestUrlPath,
        "request.scheme" => DimensionExpr::RequestScheme,
        "request.protocol" => DimensionExpr::RequestProtocol,
        "response.code" => DimensionExpr::ResponseCode,
        "xds.cluster_name" => DimensionExpr::ClusterName,
        "xds.route_name" => DimensionExpr::RouteName,
        _ => return None,
    })
}

/// The text of a CEL string literal without escapes.
fn quoted(t: &str) -> Option<&str> {
    let q = t.chars().next()?;
    if q != '\'' && q != '"' {
        return None;
    }
    let inner = t.strip_prefix(q)?.strip_suffix(q)?;
    (!inner.contains(q) && !inner.contains('\\')).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimension_forms() {
        use DimensionExpr as D;
        assert_eq!(dimension("'gw'"), Some(D::Literal("gw".into())));
        assert_eq!(dimension("\"a b\""), Some(D::Literal("a b".into())));
        assert_eq!(dimension("request.host"), Some(D::RequestHost));
        assert_eq!(
            dimension("request.headers['X-Team']"),
            Some(D::RequestHeader("x-team".into()))
        );
        assert_eq!(
            dimension("response.headers[\"server\"]"),
            Some(D::ResponseHeader("server".into()))
        );
        assert_eq!(
            dimension("upstream_peer.workload"),
            Some(D::UpstreamPeer(PeerField::Workload))
        );
        assert_eq!(
            dimension("filter_state.downstream_peer.namespace"),
            Some(D::DownstreamPeer(PeerField::Namespace))
        );
        assert_eq!(dimension("xds.cluster_name"), Some(D::ClusterName));
        for bad in [
            "'a' + 'b'",
            "request.headers",
            "request.headers['x'",
            "upstream_peer.labels['x']",
            "size(request.path)",
            "'it\\'s'",
        ] {
            assert_eq!(dimension(bad), None, "{bad}");
        }
    }
}
