use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use xds_client::config::{
    Cidr, FilterOverride, HeaderKey, HeaderMatch, HeaderMatcher, HttpRbac, PerFilterConfig,
    PerFilterConfigs, RbacPolicy, StringMatch,
};

use super::*;
use crate::http::{Counter, Downstream, FilterContext, HttpFilterFactory, RouteView, StatsScope};

fn rules(action: RbacAction, policies: Vec<(&str, RbacPolicy)>) -> RbacRules {
    let n = policies.len();
    RbacRules {
        action,
        policies: policies
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect(),
        denied_details: (0..n)
            .map(|_| "policy")
            .chain(std::iter::once("none"))
            .collect(),
    }
}

fn policy(perm: Permission, id: Principal) -> RbacPolicy {
    RbacPolicy {
        permissions: vec![perm],
        principals: vec![id],
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn cidr(s: &str, len: u8) -> Cidr {
    Cidr {
        addr: s.parse().expect("ip"),
        len,
    }
}

fn head(method: &str, uri: &str, headers: &[(&'static str, &str)]) -> ::http::request::Parts {
    let mut b = ::http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn input<'a>(head: Option<&'a ::http::request::Parts>) -> Input<'a> {
    Input {
        head,
        source: addr("10.0.0.1:1000"),
        direct_remote: addr("10.0.0.2:1000"),
        remote: addr("10.0.0.3:1000"),
        local: addr("127.0.0.1:8080"),
        sni: "svc.example.com",
        tls: None,
        filter_state: [None, None],
        metadata: None,
    }
}

fn sm(kind: StringMatch) -> StringMatcher {
    StringMatcher {
        kind,
        ignore_case: false,
    }
}

fn header(name: &str, kind: HeaderMatch, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: HeaderKey::parse(name).expect("name"),
        kind,
        invert,
        treat_missing_as_empty: false,
    }
}

#[test]
fn actions_and_the_first_policy_in_name_order() {
    let any = || policy(Permission::Any, Principal::Any);
    let never = || policy(Permission::Not(Box::new(Permission::Any)), Principal::Any);
    let i = input(None);
    let r = rules(
        RbacAction::Allow,
        vec![("a", never()), ("b", any()), ("c", any())],
    );
    assert_eq!(
        evaluate(&r, &i),
        Decision {
            allowed: true,
            policy: Some(1)
        }
    );
    let r = rules(RbacAction::Deny, vec![("a", never()), ("b", any())]);
    assert_eq!(
        evaluate(&r, &i),
        Decision {
            allowed: false,
            policy: Some(1)
        }
    );
    // ALLOW without a match denies; DENY without one allows; LOG allows.
    let r = rules(RbacAction::Allow, vec![("a", never())]);
    assert!(!evaluate(&r, &i).allowed);
    assert!(!evaluate(&rules(RbacAction::Allow, vec![]), &i).allowed);
    let r = rules(RbacAction::Deny, vec![("a", never())]);
    assert!(evaluate(&r, &i).allowed);
    let r = rules(RbacAction::Log, vec![("a", any())]);
    assert_eq!(
        evaluate(&r, &i),
        Decision {
            allowed: true,
            policy: Some(0)
        }
    );
    // A policy needs a permission and a principal to match.
    let r = rules(
        RbacAction::Allow,
        vec![(
            "a",
            policy(Permission::Any, Principal::Not(Box::new(Principal::Any))),
        )],
    );
    assert!(!evaluate(&r, &i).allowed);
}

#[test]
fn connection_matchers() {
    let i = input(None);
    let p = |x: Permission| permission(&x, &i);
    assert!(p(Permission::DestinationPort(8080)));
    assert!(!p(Permission::DestinationPort(80)));
    assert!(p(Permission::DestinationPortRange(8000, 8081)));
    assert!(!p(Permission::DestinationPortRange(8000, 8080)));
    assert!(p(Permission::DestinationIp(cidr("127.0.0.0", 8))));
    assert!(p(Permission::RequestedServerName(sm(StringMatch::Suffix(
        ".example.com".into()
    )))));
    assert!(p(Permission::And(vec![
        Permission::Any,
        Permission::DestinationPort(8080)
    ])));
    assert!(!p(Permission::And(vec![
        Permission::Any,
        Permission::DestinationPort(1)
    ])));
    assert!(p(Permission::Or(vec![
        Permission::DestinationPort(1),
        Permission::DestinationPort(8080)
    ])));
    let q = |x: Principal| principal(&x, &i);
    assert!(q(Principal::SourceIp(cidr("10.0.0.1", 32))));
    assert!(!q(Principal::SourceIp(cidr("10.0.0.2", 32))));
    assert!(q(Principal::DirectRemoteIp(cidr("10.0.0.2", 32))));
    assert!(q(Principal::RemoteIp(cidr("10.0.0.3", 32))));
    assert!(q(Principal::Not(Box::new(Principal::RemoteIp(cidr(
        "10.0.0.1", 32
    ))))));
}

#[test]
fn authenticated_reads_uri_then_dns_sans_then_subject() {
    let uri = vec!["spiffe://cluster.local/ns/foo/sa/bar".to_owned()];
    let dns = vec!["bar.foo.svc".to_owned()];
    let m = |s: &str| Some(StringMatcher::exact(s));
    let mut i = input(None);
    // Plain connection: never authenticated.
    assert!(!authenticated(None, &i));
    assert!(!authenticated(m("").as_ref(), &i));
    // TLS without a certificate: authenticated without a name; the empty
    // subject is matched otherwise (as Envoy).
    i.tls = Some(Peer::default());
    assert!(authenticated(None, &i));
    assert!(authenticated(m("").as_ref(), &i));
    i.tls = Some(Peer {
        uri_sans: &uri,
        dns_sans: &dns,
        subject: "CN=bar",
    });
    assert!(authenticated(
        m("spiffe://cluster.local/ns/foo/sa/bar").as_ref(),
        &i
    ));
    assert!(authenticated(m("bar.foo.svc").as_ref(), &i));
    assert!(authenticated(m("CN=bar").as_ref(), &i));
    assert!(!authenticated(
        m("spiffe://cluster.local/ns/foo/sa/other").as_ref(),
        &i
    ));
}

#[test]
fn request_matchers_and_the_network_filters_empty_headers() {
    let h = head(
        "POST",
        "http://svc/admin/x?debug=1",
        &[("x-user", "a"), ("x-user", "b")],
    );
    let i = input(Some(&h));
    let path = |k: StringMatch| Permission::UrlPath(sm(k));
    // url_path ignores the query; `:path` headers see it.
    assert!(permission(&path(StringMatch::Exact("/admin/x".into())), &i));
    assert!(permission(
        &Permission::Header(header(
            ":path",
            HeaderMatch::String(sm(StringMatch::Exact("/admin/x?debug=1".into()))),
            false
        )),
        &i
    ));
    assert!(permission(
        &Permission::Header(header(
            ":method",
            HeaderMatch::String(sm(StringMatch::Exact("POST".into()))),
            false
        )),
        &i
    ));
    assert!(permission(
        &Permission::Header(header(
            ":authority",
            HeaderMatch::String(sm(StringMatch::Exact("svc".into()))),
            false
        )),
        &i
    ));
    // Several values: joined, or any one for string matchers.
    let xu = |v: &str| {
        Permission::Header(header(
            "x-user",
            HeaderMatch::String(sm(StringMatch::Exact(v.into()))),
            false,
        ))
    };
    assert!(permission(&xu("a,b"), &i));
    assert!(permission(&xu("b"), &i));
    assert!(!permission(&xu("c"), &i));
    // The network filter: no path, no headers, but an inverted presence
    // match matches the empty map (as Envoy's).
    let n = input(None);
    assert!(!permission(&path(StringMatch::Prefix("/".into())), &n));
    assert!(!permission(
        &Permission::Header(header(":method", HeaderMatch::Present(true), false)),
        &n
    ));
    assert!(permission(
        &Permission::Header(header(":method", HeaderMatch::Present(true), true)),
        &n
    ));
}

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(String, Arc<AtomicU64>)>>);
struct Count(Arc<AtomicU64>);
impl Counter for Count {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
}
impl Recorder {
    fn get(&self, name: &str) -> Option<u64> {
        let v = self.0.lock().expect("lock");
        v.iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.load(Relaxed))
    }
}
impl StatsScope for Recorder {
    fn counter(&self, name: &str) -> Arc<dyn Counter> {
        let c = Arc::new(AtomicU64::new(0));
        self.0
            .lock()
            .expect("lock")
            .push((name.to_owned(), c.clone()));
        Arc::new(Count(c))
    }
    fn gauge(&self, name: &str) -> Arc<dyn crate::http::Gauge> {
        crate::http::NoStats.gauge(name)
    }
}

fn run(
    f: &http::RbacFactory,
    view: &RouteView<'_>,
    cx: &mut FilterContext,
    mut h: ::http::request::Parts,
) -> Option<crate::http::LocalReply> {
    let mut inst: Vec<Box<dyn crate::http::HttpFilter>> = f.create(view).into_iter().collect();
    crate::http::run_request_headers(&mut inst, cx, &mut h)
        .now_or_never()
        .expect("ready")
}

#[test]
fn http_filter_denies_counts_and_follows_route_overrides() {
    let principal = "spiffe://cluster.local/ns/foo/sa/bar";
    let allow_bar = Arc::new(xds_client::translate::rbac::compile(
        RbacAction::Allow,
        vec![(
            "allow-bar".into(),
            policy(
                Permission::Any,
                Principal::Authenticated(Some(StringMatcher::exact(principal))),
            ),
        )],
    ));
    let config = Arc::new(HttpRbac {
        rules: Some(allow_bar.clone()),
        rules_stat_prefix: String::new(),
        shadow_rules: Some(allow_bar),
        shadow_rules_stat_prefix: "dry_".into(),
        ..Default::default()
    });
    let rec = Arc::new(Recorder::default());
    let scope: Arc<dyn StatsScope> = rec.clone();
    let f = http::RbacFactory::new("envoy.filters.http.rbac".into(), config, &scope);
    let ds = |uris: Vec<String>| Downstream {
        local_uri_sans: vec![],
        remote: addr("10.0.0.1:1"),
        direct_remote: addr("10.0.0.1:1"),
        local: addr("127.0.0.1:80"),
        sni: None,
        connection_id: 1,
        peer_uri_sans: uris,
        peer_dns_sans: Vec::new(),
        peer_subject: Some(String::new()),
        peer_pem: None,
        tls: true,
        state: Default::default(),
        filter_state: Default::default(),
    };
    let mut cx = FilterContext {
        downstream: Some(Arc::new(ds(vec![principal.to_owned()]))),
        ..Default::default()
    };
    assert!(run(&f, &RouteView::empty(), &mut cx, head("GET", "/", &[])).is_none());
    let mut cx = FilterContext {
        downstream: Some(Arc::new(ds(vec!["spiffe://x/ns/a/sa/b".into()]))),
        ..Default::default()
    };
    let r = run(&f, &RouteView::empty(), &mut cx, head("GET", "/", &[])).expect("denied");
    assert_eq!(r.status, ::http::StatusCode::FORBIDDEN);
    assert_eq!(&r.body[..], b"RBAC: access denied");
    assert_eq!(r.details, "rbac_access_denied_matched_policy[none]");
    assert_eq!(rec.get("rbac.allowed"), Some(1));
    assert_eq!(rec.get("rbac.denied"), Some(1));
    assert_eq!(rec.get("rbac.dry_.shadow_allowed"), Some(1));
    assert_eq!(rec.get("rbac.dry_.shadow_denied"), Some(1));
    // A route's RBACPerRoute without rbac: no instance at all.
    let empty = PerFilterConfigs::default();
    let route = PerFilterConfigs(vec![(
        "envoy.filters.http.rbac".into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Rbac(Arc::new(HttpRbac::default()))),
        },
    )]);
    let view = RouteView {
        per_filter: [&route, &empty, &empty],
        cluster: None,
        request: None,
        rate_limits: None,
    };
    assert!(f.create(&view).is_none());
    // A route's DENY override replaces the filter's engines.
    let deny = Arc::new(xds_client::translate::rbac::compile(
        RbacAction::Deny,
        vec![("deny all".into(), policy(Permission::Any, Principal::Any))],
    ));
    let route = PerFilterConfigs(vec![(
        "envoy.filters.http.rbac".into(),
        PerFilterConfig {
            disabled: None,
            config: Some(FilterOverride::Rbac(Arc::new(HttpRbac {
                rules: Some(deny),
                ..Default::default()
            }))),
        },
    )]);
    let view = RouteView {
        per_filter: [&empty, &route, &empty],
        cluster: None,
        request: None,
        rate_limits: None,
    };
    let r = run(&f, &view, &mut cx, head("GET", "/", &[])).expect("denied");
    assert_eq!(r.details, "rbac_access_denied_matched_policy[deny_all]");
}

#[test]
fn metadata_principal_reads_jwt_payload() {
    use serde_json::json;
    // Istio's `request.auth.claims[groups]` with a claim that is a list or
    // a string.
    let claim = |v: ValueMatcher| {
        Principal::Metadata(MetadataMatcher {
            filter: "envoy.filters.http.jwt_authn".into(),
            path: vec!["issuer.example".into(), "groups".into()],
            value: v,
            invert: false,
        })
    };
    let admin = ValueMatcher::String(sm(StringMatch::Exact("admin".into())));
    let rules = xds_client::translate::rbac::compile(
        RbacAction::Allow,
        vec![(
            "claims".into(),
            policy(
                Permission::Any,
                Principal::Or(vec![
                    claim(admin.clone()),
                    claim(ValueMatcher::ListOneOf(Box::new(admin))),
                ]),
            ),
        )],
    );
    let mut md = crate::state::DynamicMetadata::default();
    let mut with = |payload: serde_json::Value| {
        md = crate::state::DynamicMetadata::default();
        md.merge(
            "envoy.filters.http.jwt_authn",
            json!({ "issuer.example": payload })
                .as_object()
                .expect("object")
                .clone(),
        );
        let mut i = input(None);
        i.metadata = Some(&md);
        evaluate(&rules, &i).allowed
    };
    assert!(with(json!({"groups": ["dev", "admin"]})));
    assert!(with(json!({"groups": "admin"})));
    assert!(!with(json!({"groups": ["dev"]})));
    assert!(!with(json!({"sub": "x"})));
    assert!(!with(json!("not an object")));
    // No metadata at all (no jwt_authn ran): no match.
    assert!(!evaluate(&rules, &input(None)).allowed);
    // Present, bool, double and inverted matchers.
    let one = |v: ValueMatcher, invert: bool, payload: serde_json::Value| {
        let rules = xds_client::translate::rbac::compile(
            RbacAction::Allow,
            vec![(
                "p".into(),
                policy(
                    Permission::Any,
                    Principal::Metadata(MetadataMatcher {
                        filter: "ns".into(),
                        path: vec!["k".into()],
                        value: v,
                        invert,
                    }),
                ),
            )],
        );
        let mut md = crate::state::DynamicMetadata::default();
        md.merge("ns", payload.as_object().expect("object").clone());
        let mut i = input(None);
        i.metadata = Some(&md);
        evaluate(&rules, &i).allowed
    };
    assert!(one(ValueMatcher::Present(true), false, json!({"k": 1})));
    assert!(!one(ValueMatcher::Present(true), false, json!({"j": 1})));
    assert!(one(ValueMatcher::Present(true), true, json!({"j": 1})));
    assert!(one(ValueMatcher::Bool(true), false, json!({"k": true})));
    assert!(!one(ValueMatcher::Bool(true), false, json!({"k": "true"})));
    assert!(one(
        ValueMatcher::DoubleRange(1.0, 2.0),
        false,
        json!({"k": 1.5})
    ));
    assert!(!one(
        ValueMatcher::DoubleRange(1.0, 2.0),
        false,
        json!({"k": 2})
    ));
    assert!(one(ValueMatcher::DoubleExact(3.0), false, json!({"k": 3})));
    assert!(one(ValueMatcher::Null, false, json!({"k": null})));
}
