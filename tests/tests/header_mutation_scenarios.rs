//! `envoy.filters.http.header_mutation` with a real echo upstream and real
//! HTTP/1.1 and HTTP/2 clients.
//!
//! Every test runs against weir in-process by default and against real
//! Envoy 1.40 with `WEIR_SCENARIO_TARGET=envoy` (see `weir_tests::scenario`),
//! which is how the expectations were checked:
//!
//! ```sh
//! cargo test -p weir-tests --test header_mutation_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test header_mutation_scenarios
//! ```
use serde_json::{json, Value};
use weir_tests::config::{bootstrap, chain, cluster, filter, hcm, listener, route, vhost};
use weir_tests::scenario::{echo_header, echo_headers, Http, Proxy, StartOptions, Target};
use weir_tests::upstream;

const HEADER_MUTATION: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
const PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute";

fn append(name: &str, value: &str, action: &str) -> Value {
    json!({"append": {"header": {"key": name, "value": value}, "append_action": action}})
}

fn remove(name: &str) -> Value {
    json!({"remove": name})
}

fn per_route(request: Vec<Value>, response: Vec<Value>) -> Value {
    json!({"typed_per_filter_config": {"envoy.filters.http.header_mutation": {
        "@type": PER_ROUTE,
        "mutations": {"request_mutations": request, "response_mutations": response},
    }}})
}

/// A proxy in front of an echo upstream with the header_mutation filter
/// (`fields`), a route `/r` with `route_extra` in a virtual host with
/// `vhost_extra`, and a plain route `/`.
async fn proxy(
    fields: Value,
    route_extra: Value,
    vhost_extra: Value,
) -> (Proxy, upstream::EchoServer) {
    let echo = upstream::http1("echo").await.expect("echo upstream");
    let port = echo.port();
    let p = Proxy::start(move |ports| {
        let h = hcm(
            "ingress",
            vec![filter(
                "envoy.filters.http.header_mutation",
                HEADER_MUTATION,
                fields.clone(),
            )],
            vec![vhost(
                "vh",
                vec![
                    route("/r", "echo", route_extra.clone()),
                    route("/", "echo", json!({})),
                ],
                vhost_extra.clone(),
            )],
            json!({}),
        );
        bootstrap(
            ports,
            vec![listener("l", ports.listen, vec![chain(vec![h])])],
            vec![cluster("echo", &[port], json!({}))],
        )
    });
    (p, echo)
}

/// Request and response mutations of the filter: removals (by name and by
/// matcher), appends with each append action, values from request and
/// response headers; an operator without a value renders empty and the
/// header is not added unless `keep_empty_value`. HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_mutations_on_requests_and_responses() {
    let fields = json!({"mutations": {
        "request_mutations": [
            remove("x-drop"),
            {"remove_on_match": {"key_matcher": {"prefix": "x-secret-"}}},
            append("x-added", "v1", "APPEND_IF_EXISTS_OR_ADD"),
            append("x-multi", "two", "APPEND_IF_EXISTS_OR_ADD"),
            append("x-once", "new", "ADD_IF_ABSENT"),
            append("x-over", "new", "OVERWRITE_IF_EXISTS_OR_ADD"),
            append("x-only-if", "new", "OVERWRITE_IF_EXISTS"),
            append("x-copy", "from-%REQ(x-src)%", "APPEND_IF_EXISTS_OR_ADD"),
            append("x-missing", "%REQ(x-nope)%", "APPEND_IF_EXISTS_OR_ADD"),
            {"append": {"header": {"key": "x-empty", "value": "%REQ(x-nope)%"},
                "keep_empty_value": true}},
            // Reads the header added above: values see the live headers.
            append("x-chain", "%REQ(x-added)%+", "APPEND_IF_EXISTS_OR_ADD"),
        ],
        "response_mutations": [
            remove("x-echo-seen"),
            append("x-resp", "%RESP(x-up)%/%REQ(x-src)%/%RESPONSE_CODE%", "APPEND_IF_EXISTS_OR_ADD"),
        ],
    }});
    let (p, _echo) = proxy(fields, json!({}), json!({})).await;
    for c in [Http::h1(), Http::h2c()] {
        let r = c
            .get(
                &format!("{}/x", p.base()),
                &[
                    ("x-drop", "1"),
                    ("x-secret-a", "1"),
                    ("x-secret-b", "1"),
                    ("x-multi", "one"),
                    ("x-once", "old"),
                    ("x-over", "old"),
                    ("x-src", "s"),
                    ("x-echo-header-x-up", "u"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(echo_header(&e, "x-drop"), None);
        assert_eq!(echo_header(&e, "x-secret-a"), None);
        assert_eq!(echo_header(&e, "x-secret-b"), None);
        assert_eq!(echo_header(&e, "x-added"), Some("v1"));
        assert_eq!(echo_headers(&e, "x-multi"), ["one", "two"]);
        assert_eq!(echo_header(&e, "x-once"), Some("old"));
        assert_eq!(echo_header(&e, "x-over"), Some("new"));
        assert_eq!(echo_header(&e, "x-only-if"), None);
        assert_eq!(echo_header(&e, "x-copy"), Some("from-s"));
        assert_eq!(echo_header(&e, "x-missing"), None);
        assert_eq!(echo_header(&e, "x-empty"), Some(""));
        assert_eq!(echo_header(&e, "x-chain"), Some("v1+"));
        assert_eq!(r.header("x-echo-seen"), None);
        assert_eq!(r.header("x-resp"), Some("u/s/200"));
    }
}

/// Per-route mutations apply after the filter's: by default the most
/// specific level first (route, then virtual host), so the virtual host's
/// overwrite is the last word; `most_specific_header_mutations_wins`
/// reverses the per-route order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_levels_and_their_order() {
    for (most_specific_wins, want) in [(false, "vhost"), (true, "route")] {
        let fields = json!({
            "mutations": {"request_mutations": [
                append("x-order", "filter", "OVERWRITE_IF_EXISTS_OR_ADD"),
                append("x-trace", "filter", "APPEND_IF_EXISTS_OR_ADD"),
            ]},
            "most_specific_header_mutations_wins": most_specific_wins,
        });
        let (p, _echo) = proxy(
            fields,
            per_route(
                vec![
                    append("x-order", "route", "OVERWRITE_IF_EXISTS_OR_ADD"),
                    append("x-trace", "route", "APPEND_IF_EXISTS_OR_ADD"),
                ],
                vec![append("x-resp-level", "route", "APPEND_IF_EXISTS_OR_ADD")],
            ),
            per_route(
                vec![
                    append("x-order", "vhost", "OVERWRITE_IF_EXISTS_OR_ADD"),
                    append("x-trace", "vhost", "APPEND_IF_EXISTS_OR_ADD"),
                ],
                vec![append("x-resp-level", "vhost", "APPEND_IF_EXISTS_OR_ADD")],
            ),
        )
        .await;
        let c = Http::h1();
        let r = c.get(&format!("{}/r", p.base()), &[]).await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(
            echo_header(&e, "x-order"),
            Some(want),
            "{most_specific_wins}"
        );
        let trace: Vec<&str> = if most_specific_wins {
            vec!["filter", "vhost", "route"]
        } else {
            vec!["filter", "route", "vhost"]
        };
        assert_eq!(echo_headers(&e, "x-trace"), trace);
        assert_eq!(r.header_all("x-resp-level").len(), 2);
        // The other route has only the virtual host's mutations.
        let r = c.get(&format!("{}/other", p.base()), &[]).await;
        let e = r.echo();
        assert_eq!(echo_headers(&e, "x-trace"), ["filter", "vhost"]);
        assert_eq!(r.header_all("x-resp-level"), ["vhost"]);
    }
}

/// What weir does not do is refused naming the field (weir only: Envoy
/// accepts both): query parameter mutations, and removing a pseudo-header
/// or `host` (which would break the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_mutations_are_rejected() {
    // Weir's own refusals: nothing to compare with Envoy.
    if Target::from_env().is_envoy() {
        return;
    }
    for (fields, field) in [
        (
            json!({"mutations": {"query_parameter_mutations": [{"remove": "q"}]}}),
            "mutations.query_parameter_mutations",
        ),
        (
            json!({"mutations": {"request_mutations": [{"remove": ":path"}]}}),
            "mutations.request_mutations[0].remove",
        ),
    ] {
        let r = Proxy::try_start(Target::from_env(), StartOptions::default(), move |ports| {
            let h = hcm(
                "ingress",
                vec![filter(
                    "envoy.filters.http.header_mutation",
                    HEADER_MUTATION,
                    fields.clone(),
                )],
                vec![vhost("vh", vec![route("/", "echo", json!({}))], json!({}))],
                json!({}),
            );
            bootstrap(
                ports,
                vec![listener("l", ports.listen, vec![chain(vec![h])])],
                vec![cluster("echo", &[1], json!({}))],
            )
        });
        let Err(e) = r else {
            panic!("{field}: started")
        };
        let e = format!("{e:#}");
        assert!(e.contains(field), "{e}");
    }
}
