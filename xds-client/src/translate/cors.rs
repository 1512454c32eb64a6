//! `envoy.filters.http.cors` translation: the filter itself (`Cors`, no
//! fields) and its policies, `envoy.extensions.filters.http.cors.v3.CorsPolicy`
//! (`typed_per_filter_config`) and the deprecated
//! `envoy.config.route.v3.CorsPolicy` (`cors` of virtual hosts and route
//! actions), which Envoy 1.40 still honours.
use http::HeaderValue;

use crate::api::envoy::config::core::v3::RuntimeFractionalPercent;
use crate::api::envoy::config::route::v3 as r;
use crate::api::envoy::extensions::filters::http::cors::v3 as c;
use crate::api::envoy::r#type::matcher::v3::StringMatcher as PbStringMatcher;
use crate::api::envoy::r#type::v3::FractionalPercent;
use crate::config::*;
use crate::error::{join, ConfigErrors};

/// `envoy.extensions.filters.http.cors.v3.CorsPolicy` (per-route config).
pub const CORS_POLICY: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// The fields both `CorsPolicy` messages share.
struct Fields<'a> {
    allow_origin_string_match: &'a [PbStringMatcher],
    allow_methods: &'a str,
    allow_headers: &'a str,
    expose_headers: &'a str,
    max_age: &'a str,
    allow_credentials: Option<bool>,
    allow_private_network_access: Option<bool>,
    forward_not_matching_preflights: Option<bool>,
    filter_enabled: Option<&'a RuntimeFractionalPercent>,
    shadow_enabled: Option<&'a RuntimeFractionalPercent>,
}

/// `typed_per_filter_config` `CorsPolicy` -> [`CorsPolicy`]; `path` names it.
pub fn cors_policy(p: &c::CorsPolicy, path: &str) -> Result<CorsPolicy, ConfigErrors> {
    policy(
        Fields {
            allow_origin_string_match: &p.allow_origin_string_match,
            allow_methods: &p.allow_methods,
            allow_headers: &p.allow_headers,
            expose_headers: &p.expose_headers,
            max_age: &p.max_age,
            allow_credentials: p.allow_credentials.map(|b| b.value),
            allow_private_network_access: p.allow_private_network_access.map(|b| b.value),
            forward_not_matching_preflights: p.forward_not_matching_preflights.map(|b| b.value),
            filter_enabled: p.filter_enabled.as_ref(),
            shadow_enabled: p.shadow_enabled.as_ref(),
        },
        path,
    )
}

/// A `typed_per_filter_config` value of type [`CORS_POLICY`] (`path` names it).
pub fn per_route(
    any: &crate::api::google::protobuf::Any,
    path: &str,
) -> Result<FilterOverride, ConfigErrors> {
    let p: c::CorsPolicy = super::decode(any, path)?;
    Ok(FilterOverride::Cors(std::sync::Arc::new(cors_policy(
        &p, path,
    )?)))
}

/// The deprecated `cors` field of a virtual host or route action.
pub fn legacy_cors_policy(p: &r::CorsPolicy, path: &str) -> Result<CorsPolicy, ConfigErrors> {
    use r::cors_policy::EnabledSpecifier;
    policy(
        Fields {
            allow_origin_string_match: &p.allow_origin_string_match,
            allow_methods: &p.allow_methods,
            allow_headers: &p.allow_headers,
            expose_headers: &p.expose_headers,
            max_age: &p.max_age,
            allow_credentials: p.allow_credentials.map(|b| b.value),
            allow_private_network_access: p.allow_private_network_access.map(|b| b.value),
            forward_not_matching_preflights: p.forward_not_matching_preflights.map(|b| b.value),
            filter_enabled: match &p.enabled_specifier {
                Some(EnabledSpecifier::FilterEnabled(f)) => Some(f),
                None => None,
            },
            shadow_enabled: p.shadow_enabled.as_ref(),
        },
        path,
    )
}

fn policy(p: Fields<'_>, path: &str) -> Result<CorsPolicy, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut allow_origins = Vec::with_capacity(p.allow_origin_string_match.len());
    for (i, m) in p.allow_origin_string_match.iter().enumerate() {
        match super::string_matcher(m, &format!("{path}.allow_origin_string_match[{i}]")) {
            Ok(m) => allow_origins.push(m),
            Err(e) => errs.extend(e),
        }
    }
    let mut value = |s: &str, field: &str| -> Option<HeaderValue> {
        if s.is_empty() {
            return None;
        }
        // Envoy would send the string as is; one that is no valid header
        // value is refused here rather than sent malformed.
        HeaderValue::from_str(s)
            .map_err(|_| {
                errs.push(
                    join(path, field),
                    format!("{s:?} is not a valid header value"),
                )
            })
            .ok()
    };
    let allow_methods = value(p.allow_methods, "allow_methods");
    let allow_headers = value(p.allow_headers, "allow_headers");
    let expose_headers = value(p.expose_headers, "expose_headers");
    let max_age = value(p.max_age, "max_age");
    let mut fraction = |f: Option<&RuntimeFractionalPercent>, field: &str| -> Option<Fraction> {
        let f = f?;
        match &f.default_value {
            Some(d) => Some(fractional_percent(d)),
            None => {
                // As Envoy's proto validation: `default_value` is required.
                errs.push(
                    join(&join(path, field), "default_value"),
                    "default_value is required",
                );
                None
            }
        }
    };
    let filter_enabled = fraction(p.filter_enabled, "filter_enabled");
    let shadow_enabled = fraction(p.shadow_enabled, "shadow_enabled");
    errs.into_result(CorsPolicy {
        allow_origins,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials: p.allow_credentials,
        allow_private_network_access: p.allow_private_network_access,
        forward_not_matching_preflights: p.forward_not_matching_preflights,
        filter_enabled,
        shadow_enabled,
    })
}

fn fractional_percent(p: &FractionalPercent) -> Fraction {
    Fraction {
        numerator: p.numerator,
        denominator: match p.denominator {
            0 => 100,
            1 => 10_000,
            _ => 1_000_000,
        },
    }
}

/// Keeps a level's legacy `cors` policy with its `typed_per_filter_config`
/// (see [`LEGACY_CORS_KEY`]); `path` names the `cors` field.
pub fn add_legacy(
    per_filter: &mut PerFilterConfigs,
    p: &r::CorsPolicy,
    path: &str,
) -> Result<(), ConfigErrors> {
    let policy = legacy_cors_policy(p, path)?;
    per_filter.0.push((
        LEGACY_CORS_KEY.into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Cors(std::sync::Arc::new(policy))),
        },
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::bootstrap::{parse_bootstrap, ParseOptions};
    use crate::config::*;
    use crate::translate::bootstrap_to_snapshot;

    const POLICY: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";
    const ROUTES: &str =
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config";

    /// A bootstrap whose route configuration, virtual host and route get
    /// the given extra fields (flow-style YAML mappings' contents).
    fn config(rc: &str, vhost: &str, route: &str, action: &str) -> String {
        format!(
            r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config: {{name: rc, {rc} virtual_hosts: [{{name: v, domains: ["*"], {vhost} routes: [{{match: {{prefix: /}}, {route} route: {{cluster: c, {action}}}}}]}}]}}
          http_filters:
          - name: envoy.filters.http.cors
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - {{name: c, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}}}
"#
        )
    }

    fn translate(yaml: &str) -> Result<Snapshot, String> {
        let b = parse_bootstrap(yaml, ParseOptions::default()).map_err(|e| e.to_string())?;
        bootstrap_to_snapshot(&b).map_err(|e| e.to_string())
    }

    /// Route, virtual host and route configuration per-filter configs.
    fn levels(s: &Snapshot) -> [PerFilterConfigs; 3] {
        let NetworkFilter::Http(h) = &s.listeners[0].filter_chains[0].filter else {
            panic!("HCM")
        };
        assert_eq!(h.http_filters[0].kind, HttpFilterKind::Cors);
        let RouteSource::Static(rc) = &h.routes else {
            panic!("static routes")
        };
        let vh = &rc.vhosts[0];
        [
            vh.routes[0].per_filter.clone(),
            vh.per_filter.clone(),
            rc.per_filter.clone(),
        ]
    }

    fn cors(l: &PerFilterConfigs, key: &str) -> CorsPolicy {
        match l.get(key).and_then(|c| c.config.clone()) {
            Some(FilterOverride::Cors(p)) => (*p).clone(),
            other => panic!("no CORS policy under {key:?}: {other:?}"),
        }
    }

    #[test]
    fn policies_at_every_level() {
        let full = format!(
            r#"typed_per_filter_config: {{envoy.filters.http.cors: {{"@type": {POLICY}, allow_origin_string_match: [{{exact: "https://a"}}, {{prefix: "https://b", ignore_case: true}}, {{safe_regex: {{regex: "https://.*\\.c"}}}}], allow_methods: "GET, PUT", allow_headers: "x-a", expose_headers: "x-e", max_age: "600", allow_credentials: true, allow_private_network_access: false, forward_not_matching_preflights: false, filter_enabled: {{default_value: {{numerator: 50, denominator: TEN_THOUSAND}}, runtime_key: k}}, shadow_enabled: {{default_value: {{numerator: 100}}}}}}}},"#
        );
        let wrapped = format!(
            r#"typed_per_filter_config: {{envoy.filters.http.cors: {{"@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {{"@type": {POLICY}, max_age: "5"}}}}}},"#
        );
        let empty = format!(r#"typed_per_filter_config: {{cors: {{"@type": {POLICY}}}}},"#);
        let s = translate(&config(&empty, &wrapped, &full, "")).unwrap_or_else(|e| panic!("{e}"));
        let [route, vhost, rc] = levels(&s);
        let p = cors(&route, "envoy.filters.http.cors");
        assert_eq!(p.allow_origins.len(), 3);
        assert!(p.allow_origins[0].matches("https://a"));
        assert!(p.allow_origins[1].matches("HTTPS://B.example"));
        assert!(p.allow_origins[2].matches("https://x.c"));
        assert!(!p.allow_origins[2].matches("https://x.c.d"));
        assert_eq!(
            p.allow_methods.as_ref().map(|v| v.as_bytes()),
            Some(&b"GET, PUT"[..])
        );
        assert_eq!(
            p.allow_headers.as_ref().map(|v| v.as_bytes()),
            Some(&b"x-a"[..])
        );
        assert_eq!(
            p.expose_headers.as_ref().map(|v| v.as_bytes()),
            Some(&b"x-e"[..])
        );
        assert_eq!(p.max_age.as_ref().map(|v| v.as_bytes()), Some(&b"600"[..]));
        assert_eq!(p.allow_credentials, Some(true));
        assert_eq!(p.allow_private_network_access, Some(false));
        assert_eq!(p.forward_not_matching_preflights, Some(false));
        assert_eq!(
            p.filter_enabled,
            Some(Fraction {
                numerator: 50,
                denominator: 10_000
            })
        );
        assert_eq!(
            p.shadow_enabled,
            Some(Fraction {
                numerator: 100,
                denominator: 100
            })
        );
        let v = cors(&vhost, "envoy.filters.http.cors");
        assert_eq!(v.max_age.as_ref().map(|v| v.as_bytes()), Some(&b"5"[..]));
        assert_eq!(cors(&rc, "cors"), CorsPolicy::default());
    }

    #[test]
    fn legacy_cors_fields_are_kept_apart() {
        let s = translate(&config(
            "",
            r#"cors: {allow_origin_string_match: [{exact: "https://v"}], filter_enabled: {default_value: {numerator: 0}}},"#,
            "",
            r#"cors: {allow_methods: GET, shadow_enabled: {default_value: {numerator: 100}}}"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let [route, vhost, rc] = levels(&s);
        let r = cors(&route, LEGACY_CORS_KEY);
        assert_eq!(
            r.allow_methods.as_ref().map(|v| v.as_bytes()),
            Some(&b"GET"[..])
        );
        assert_eq!(r.shadow_enabled.map(|f| f.numerator), Some(100));
        let v = cors(&vhost, LEGACY_CORS_KEY);
        assert!(v.allow_origins[0].matches("https://v"));
        assert_eq!(v.filter_enabled.map(|f| f.numerator), Some(0));
        assert!(rc.is_empty());
    }

    #[test]
    fn bad_policies_are_named_by_path() {
        let route = |body: &str| {
            config(
                "",
                "",
                &format!(
                    r#"typed_per_filter_config: {{envoy.filters.http.cors: {{"@type": {POLICY}, {body}}}}},"#
                ),
                "",
            )
        };
        let at = format!(
            "{ROUTES}.virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.cors\"]"
        );
        for (body, field) in [
            (
                r#"allow_origin_string_match: [{exact: a}, {safe_regex: {regex: "("}}]"#,
                "allow_origin_string_match[1].safe_regex.regex",
            ),
            (
                r#"allow_origin_string_match: [{safe_regex: {regex: "a"}, ignore_case: true}]"#,
                "allow_origin_string_match[0].ignore_case",
            ),
            (r#"allow_methods: "GET\nPUT""#, "allow_methods"),
            (r#"expose_headers: "\u0000""#, "expose_headers"),
            (
                r#"filter_enabled: {runtime_key: k}"#,
                "filter_enabled.default_value",
            ),
        ] {
            let e = translate(&route(body)).expect_err(body);
            assert!(e.contains(&format!("{at}.{field}")), "{body}: {e}");
        }
        // The legacy fields too.
        let e = translate(&config(
            "",
            r#"cors: {shadow_enabled: {runtime_key: k}},"#,
            "",
            r#"cors: {allow_headers: "a\rb"}"#,
        ))
        .expect_err("legacy");
        assert!(
            e.contains(&format!(
                "{ROUTES}.virtual_hosts[0].cors.shadow_enabled.default_value"
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "{ROUTES}.virtual_hosts[0].routes[0].route.cors.allow_headers"
            )),
            "{e}"
        );
        // An empty key names no filter.
        let e = translate(&config(
            "",
            "",
            &format!(r#"typed_per_filter_config: {{"": {{"@type": {POLICY}}}}},"#),
            "",
        ))
        .expect_err("empty key");
        assert!(
            e.contains("routes[0].typed_per_filter_config[\"\"]: a typed_per_filter_config key must name a filter"),
            "{e}"
        );
    }

    /// RDS (the binary xDS path): the policies as istiod sends them.
    #[test]
    fn policies_from_rds() {
        use crate::xds::resources::{decode, Resource, ResourceType};
        let yaml = format!(
            r#"
name: r
virtual_hosts:
- name: v
  domains: ["*"]
  typed_per_filter_config:
    envoy.filters.http.cors: {{"@type": {POLICY}, allow_origin_string_match: [{{exact: "https://a"}}], allow_methods: GET, filter_enabled: {{default_value: {{numerator: 100}}, runtime_key: k}}}}
  routes:
  - match: {{prefix: /}}
    route: {{cluster: c, cors: {{allow_headers: x-a}}}}
"#
        );
        let any = crate::bootstrap::any_from_text(ResourceType::Route.type_url(), &yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let Ok((_, Resource::Route(rc))) = decode(ResourceType::Route, &any) else {
            panic!("route configuration rejected")
        };
        let vh = &rc.vhosts[0];
        let p = cors(&vh.per_filter, "envoy.filters.http.cors");
        assert!(p.allow_origins[0].matches("https://a"));
        assert_eq!(p.filter_enabled.map(|f| f.numerator), Some(100));
        let l = cors(&vh.routes[0].per_filter, LEGACY_CORS_KEY);
        assert_eq!(
            l.allow_headers.as_ref().map(|v| v.as_bytes()),
            Some(&b"x-a"[..])
        );
        // A bad policy is rejected naming its field.
        let bad = yaml.replace("allow_methods: GET", "allow_methods: \"a\\u0001\"");
        let any = crate::bootstrap::any_from_text(ResourceType::Route.type_url(), &bad)
            .unwrap_or_else(|e| panic!("{e}"));
        let Err(e) = decode(ResourceType::Route, &any) else {
            panic!("bad allow_methods accepted")
        };
        assert!(
            e.reason.contains(
                "virtual_hosts[0].typed_per_filter_config[\"envoy.filters.http.cors\"].allow_methods"
            ),
            "{}",
            e.reason
        );
    }
}
