use prost::Message;

use super::*;
use crate::api::envoy::extensions::filters::http::rbac::v3 as hr;
use crate::api::envoy::extensions::filters::network::rbac::v3 as nr;

fn http(yaml: &str) -> Result<HttpRbac, String> {
    let any = crate::bootstrap::any_from_text(HTTP_RBAC, yaml).map_err(|e| e.to_string())?;
    let p = hr::Rbac::decode(any.value.as_slice()).expect("decodes");
    http_rbac(&p, "f").map_err(|e| e.to_string())
}

fn network(yaml: &str) -> Result<NetworkRbac, String> {
    let any = crate::bootstrap::any_from_text(NETWORK_RBAC, yaml).map_err(|e| e.to_string())?;
    let p = nr::Rbac::decode(any.value.as_slice()).expect("decodes");
    network_rbac(&p, "f").map_err(|e| e.to_string())
}

#[test]
fn policies_are_sorted_by_name_with_their_denial_details() {
    let c = http(
        r#"
rules:
  action: DENY
  policies:
    "z policy":
      permissions: [{any: true}]
      principals: [{any: true}]
    a:
      permissions: [{url_path: {path: {prefix: /admin}}}]
      principals: [{authenticated: {principal_name: {exact: "spiffe://cluster.local/ns/foo/sa/bar"}}}]
rules_stat_prefix: r_
shadow_rules: {action: ALLOW}
shadow_rules_stat_prefix: s_
"#,
    )
    .expect("valid");
    let rules = c.rules.as_ref().expect("rules");
    assert_eq!(rules.action, RbacAction::Deny);
    let names: Vec<&str> = rules.policies.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "z policy"]);
    assert_eq!(
        rules.details(Some(0)),
        "rbac_access_denied_matched_policy[a]"
    );
    assert_eq!(
        rules.details(Some(1)),
        "rbac_access_denied_matched_policy[z_policy]"
    );
    assert_eq!(
        rules.details(None),
        "rbac_access_denied_matched_policy[none]"
    );
    assert_eq!(
        rules.policies[0].1.principals[0],
        Principal::Authenticated(Some(StringMatcher::exact(
            "spiffe://cluster.local/ns/foo/sa/bar"
        )))
    );
    let shadow = c.shadow_rules.as_ref().expect("shadow");
    assert_eq!(shadow.action, RbacAction::Allow);
    assert!(shadow.policies.is_empty());
    assert_eq!(
        (&*c.rules_stat_prefix, &*c.shadow_rules_stat_prefix),
        ("r_", "s_")
    );
    // Interned: the same text is the same static string.
    assert!(std::ptr::eq(
        denied_details(Some("a")),
        rules.details(Some(0))
    ));
}

#[test]
fn every_matcher_translates() {
    let c = http(
        r#"
rules:
  policies:
    p:
      permissions:
      - and_rules:
          rules:
          - header: {name: ":method", string_match: {exact: GET}}
          - or_rules: {rules: [{destination_port: 80}, {destination_port_range: {start: 8000, end: 9000}}]}
          - not_rule: {destination_ip: {address_prefix: 10.0.0.0, prefix_len: 8}}
          - requested_server_name: {suffix: .example.com}
      principals:
      - and_ids:
          ids:
          - or_ids: {ids: [{source_ip: {address_prefix: 127.0.0.1}}, {remote_ip: {address_prefix: "::1"}}]}
          - not_id: {direct_remote_ip: {address_prefix: 192.168.0.0, prefix_len: 16}}
          - authenticated: {}
          - url_path: {path: {exact: /x}}
"#,
    )
    .expect("valid");
    let p = &c.rules.as_ref().expect("rules").policies[0].1;
    let Permission::And(v) = &p.permissions[0] else {
        panic!("and_rules")
    };
    assert_eq!(v.len(), 4);
    assert!(
        matches!(v[1], Permission::Or(ref o) if o[1] == Permission::DestinationPortRange(8000, 9000))
    );
    let Principal::And(ids) = &p.principals[0] else {
        panic!("and_ids")
    };
    assert_eq!(ids[2], Principal::Authenticated(None));
    assert!(matches!(ids[1], Principal::Not(_)));
}

#[test]
fn bad_values_name_their_field() {
    let e =
        http("rules: {policies: {p: {permissions: [{any: true}]}}}").expect_err("no principals");
    assert!(e.contains("f.rules.policies[\"p\"].principals"), "{e}");
    let e = http(
        "rules: {policies: {p: {permissions: [{destination_port_range: {start: 9, end: 9}}], principals: [{any: true}]}}}",
    )
    .expect_err("empty range");
    assert!(
        e.contains("f.rules.policies[\"p\"].permissions[0].destination_port_range")
            && e.contains("cannot be greater or equal"),
        "{e}"
    );
    let e = http(
        "rules: {policies: {p: {permissions: [{any: true}], principals: [{filter_state: {key: io.istio.peer_principal, address_match: {ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]}}}]}}}",
    )
    .expect_err("filter state address_match");
    assert!(e.contains("principals[0].filter_state"), "{e}");
    http(
        "rules: {policies: {p: {permissions: [{any: true}], principals: [{filter_state: {key: io.istio.peer_principal, string_match: {exact: x}}}]}}}",
    )
    .expect("filter state string_match");
    let e = http(
        "rules: {policies: {p: {permissions: [{and_rules: {rules: [{metadata: {filter: f, value: {present_match: true}}}]}}], principals: [{any: true}]}}}",
    )
    .expect_err("metadata without a path");
    assert!(
        e.contains("permissions[0].and_rules.rules[0].metadata.path"),
        "{e}"
    );
    // Istio's request.auth.claims[groups] over jwt_authn's payload.
    let ok = http(
        "rules: {policies: {p: {permissions: [{any: true}], principals: [{metadata: {filter: envoy.filters.http.jwt_authn, path: [{key: iss}, {key: groups}], value: {list_match: {one_of: {string_match: {exact: admin}}}}}}]}}}",
    )
    .expect("metadata principal");
    let rules = ok.rules.expect("rules");
    assert!(matches!(
        &rules.policies[0].1.principals[0],
        Principal::Metadata(MetadataMatcher { filter, path, value: ValueMatcher::ListOneOf(_), invert: false })
            if filter == "envoy.filters.http.jwt_authn" && path == &["iss".to_owned(), "groups".to_owned()]
    ));
    let e = http(
        "rules: {policies: {p: {permissions: [{any: true}], principals: [{source_ip: {address_prefix: nope}}]}}}",
    )
    .expect_err("bad CIDR");
    assert!(e.contains("principals[0].source_ip.address_prefix"), "{e}");
    let e = http("matcher: {matcher_list: {matchers: []}}\ntrack_per_rule_stats: true")
        .expect_err("matcher");
    assert!(
        e.contains("f.matcher") && e.contains("f.track_per_rule_stats"),
        "{e}"
    );
    let e = http(
        "rules: {policies: {p: {permissions: [{any: true}], principals: [{authenticated: {principal_name: {safe_regex: {regex: \"(\"}}}}]}}}",
    )
    .expect_err("bad regex");
    assert!(e.contains("authenticated.principal_name.safe_regex"), "{e}");
}

#[test]
fn network_config() {
    let c = network(
        "stat_prefix: tcp.\nshadow_rules_stat_prefix: dry_\nrules: {action: DENY, policies: {p: {permissions: [{any: true}], principals: [{not_id: {any: true}}]}}}",
    )
    .expect("valid");
    assert_eq!(c.stat_prefix, "tcp.");
    assert_eq!(c.rules.as_ref().map(|r| r.action), Some(RbacAction::Deny));
    assert!(c.shadow_rules.is_none());
    // As Envoy: header rules refused at config time, url_path accepted.
    let e = network(
        "stat_prefix: x\nshadow_rules: {policies: {p: {permissions: [{or_rules: {rules: [{url_path: {path: {prefix: /}}}, {header: {name: \":method\", present_match: true}}]}}], principals: [{not_id: {header: {name: x}}}]}}}",
    )
    .expect_err("header rules");
    assert!(
        e.contains("f.shadow_rules.policies[\"p\"].permissions[0].or_rules.rules[1].header")
            && e.contains("f.shadow_rules.policies[\"p\"].principals[0].not_id.header")
            && !e.contains("url_path"),
        "{e}"
    );
    let e = network("rules: {}").expect_err("stat_prefix");
    assert!(e.contains("f.stat_prefix"), "{e}");
    let e = network("stat_prefix: x\nenforcement_type: CONTINUOUS\ndelay_deny: 1s")
        .expect_err("continuous");
    assert!(
        e.contains("f.enforcement_type") && e.contains("f.delay_deny"),
        "{e}"
    );
}

#[test]
fn per_route_without_rbac_has_no_engines() {
    let any = crate::bootstrap::any_from_text(HTTP_RBAC_PER_ROUTE, "{}").expect("parses");
    let p = hr::RbacPerRoute::decode(any.value.as_slice()).expect("decodes");
    assert_eq!(
        http_rbac_per_route(&p, "r").expect("valid"),
        HttpRbac::default()
    );
    let any = crate::bootstrap::any_from_text(
        HTTP_RBAC_PER_ROUTE,
        "rbac: {rules: {policies: {p: {permissions: [{any: true}], principals: []}}}}",
    )
    .expect("parses");
    let p = hr::RbacPerRoute::decode(any.value.as_slice()).expect("decodes");
    let e = http_rbac_per_route(&p, "r").expect_err("no principals");
    assert!(
        e.to_string()
            .contains("r.rbac.rules.policies[\"p\"].principals"),
        "{e}"
    );
}

/// Through the whole loader: the support table rejects unimplemented
/// fields by path before translation.
#[test]
fn the_loader_rejects_unimplemented_fields_by_path() {
    let b = r#"{"static_resources": {"listeners": [{"name": "l",
      "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
      "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.rbac", "typed_config": {
          "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
          "stat_prefix": "t", "rules": {"policies": {"p": {"permissions": [{"any": true}],
            "principals": [{"sourced_metadata": {"metadata_matcher": {"filter": "f", "path": [{"key": "k"}], "value": {"present_match": true}}}}]}}}}},
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
          "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
          "stat_prefix": "t", "cluster": "c"}}]}]}],
      "clusters": [{"name": "c", "connect_timeout": "1s"}]}}"#;
    let e = crate::load_bootstrap(Some(b), None, Default::default())
        .map(|_| ())
        .expect_err("sourced_metadata");
    let e = e.to_string();
    assert!(
        e.contains("rules.policies[\"p\"].principals[0].sourced_metadata")
            && e.contains("metadata matching is not implemented"),
        "{e}"
    );
}

const ACTION: &str = "type.googleapis.com/envoy.config.rbac.v3.Action";

#[test]
fn matcher_translates_and_replaces_rules() {
    let c = http(&format!(
        r#"
rules: {{action: DENY}}
matcher:
  matcher_list:
    matchers:
    - predicate:
        or_matcher:
          predicate:
          - single_predicate:
              input: {{name: h, typed_config: {{"@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput, header_name: X-A}}}}
              value_match: {{prefix: v}}
          - single_predicate:
              input: {{name: s, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.SourceIPInput}}}}
              custom_match: {{name: ip, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip, stat_prefix: s, cidr_ranges: [{{address_prefix: 10.0.0.0, prefix_len: 8}}]}}}}
      on_match: {{action: {{name: a, typed_config: {{"@type": {ACTION}, name: "p 1", action: DENY}}}}}}
  on_no_match: {{action: {{name: a, typed_config: {{"@type": {ACTION}, name: rest, action: LOG}}}}}}
"#
    ))
    .expect("valid");
    assert!(c.rules.is_none(), "a matcher replaces the rules");
    let m = c.matcher.as_ref().expect("matcher");
    let actions: Vec<(&str, RbacAction, &str)> = m
        .actions()
        .into_iter()
        .map(|a| (a.name.as_str(), a.action, a.denied_details))
        .collect();
    assert_eq!(
        actions,
        [
            (
                "p 1",
                RbacAction::Deny,
                "rbac_access_denied_matched_policy[p_1]"
            ),
            (
                "rest",
                RbacAction::Log,
                "rbac_access_denied_matched_policy[rest]"
            ),
        ]
    );
    let MatchKind::List(l) = &m.kind else {
        panic!("a list: {m:?}")
    };
    let Predicate::Or(ps) = &l[0].predicate else {
        panic!("or: {l:?}")
    };
    assert!(
        matches!(&ps[0], Predicate::Single(DataInput::RequestHeader(HeaderKey::Name(n)), InputMatcher::Value(_)) if n == "x-a")
    );
    assert!(
        matches!(&ps[1], Predicate::Single(DataInput::SourceIp, InputMatcher::Ip(r)) if r.len() == 1)
    );
}

#[test]
fn matcher_errors_name_the_field() {
    let input = |ty: &str| {
        format!(
            "{{name: i, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.{ty}}}}}"
        )
    };
    let single = |input: String, on_match: String| {
        format!(
            "matcher: {{matcher_list: {{matchers: [{{predicate: {{single_predicate: {{input: {input}, value_match: {{exact: x}}}}}}, on_match: {on_match}}}]}}}}"
        )
    };
    let allow = format!("{{action: {{name: a, typed_config: {{\"@type\": {ACTION}, name: p}}}}}}");
    // A header input in the network filter.
    let header = "{name: h, typed_config: {\"@type\": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput, header_name: x}}";
    let e = network(&format!(
        "stat_prefix: n\n{}",
        single(header.to_owned(), allow.clone())
    ))
    .expect_err("header in network");
    assert!(
        e.contains(
            "f.matcher.matcher_list.matchers[0].predicate.single_predicate.input.typed_config"
        ) && e.contains("RBAC network filter cannot match"),
        "{e}"
    );
    // An empty action name, keep_matching, a one-predicate or_matcher.
    let unnamed = format!("{{action: {{name: a, typed_config: {{\"@type\": {ACTION}}}}}}}");
    let e = http(&single(input("SourceIPInput"), unnamed)).expect_err("unnamed");
    assert!(e.contains("on_match.action.typed_config.name"), "{e}");
    let keep = format!("{{keep_matching: true, action: {{name: a, typed_config: {{\"@type\": {ACTION}, name: p}}}}}}");
    let e = http(&single(input("SourceIPInput"), keep)).expect_err("keep_matching");
    assert!(e.contains("on_match.keep_matching"), "{e}");
    let e = http(&format!(
        "matcher: {{matcher_list: {{matchers: [{{predicate: {{or_matcher: {{predicate: [{{single_predicate: {{input: {}, value_match: {{exact: x}}}}}}]}}}}, on_match: {allow}}}]}}}}",
        input("SourceIPInput")
    ))
    .expect_err("one predicate");
    assert!(e.contains("predicate.or_matcher.predicate"), "{e}");
    // A tree without entries.
    let e = http(&format!(
        "matcher: {{matcher_tree: {{input: {}, exact_match_map: {{map: {{}}}}}}}}",
        input("ServerNameInput")
    ))
    .expect_err("empty map");
    assert!(
        e.contains("f.matcher.matcher_tree.exact_match_map.map"),
        "{e}"
    );
}
