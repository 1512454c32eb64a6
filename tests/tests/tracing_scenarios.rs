//! The HCM's trace decision (`tracing` without a provider): which requests
//! are traced, the reason written into x-request-id, and the
//! `http.<prefix>.tracing.*` stats, against weir and real Envoy 1.40:
//!
//! ```sh
//! cargo test -p weir-tests --test tracing_scenarios
//! WEIR_SCENARIO_TARGET=envoy cargo test -p weir-tests --test tracing_scenarios
//! ```
use serde_json::{json, Value};
use weir_tests::scenario::{Http, Ports, Proxy, StartOptions, Target};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const UUID_EXT: &str =
    "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig";

fn sock(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// A listener whose HCM (prefix `t`) answers 200 directly and echoes the
/// request id; `extra`: more HCM fields (`tracing`, ...).
fn bootstrap(p: &Ports, extra: &Value) -> String {
    let mut hcm = json!({
        "@type": HCM, "stat_prefix": "t", "always_set_request_id_in_response": true,
        "route_config": {"name": "rc", "virtual_hosts": [{
            "name": "vh", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    });
    if let (Some(h), Value::Object(e)) = (hcm.as_object_mut(), extra.clone()) {
        h.extend(e);
    }
    json!({
        "admin": {"address": sock(p.admin)},
        "static_resources": {"listeners": [{
            "name": "l", "address": sock(p.listen),
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
        }]},
    })
    .to_string()
}

fn start(extra: Value) -> Proxy {
    Proxy::start(move |p| bootstrap(p, &extra))
}

/// The x-request-id the proxy answered with for a request with `headers`.
async fn rid(p: &Proxy, headers: &[(&str, &str)]) -> String {
    let r = Http::h1().get(&format!("{}/", p.base()), headers).await;
    assert_eq!(r.status, 200);
    r.header("x-request-id").expect("x-request-id").to_owned()
}

/// The trace-reason character of a UUID.
fn mark(id: &str) -> char {
    id.as_bytes()[14] as char
}

async fn tracing_stats(p: &Proxy) -> [Option<i64>; 5] {
    let mut out = [None; 5];
    for (i, s) in [
        "client_enabled",
        "health_check",
        "not_traceable",
        "random_sampling",
        "service_forced",
    ]
    .iter()
    .enumerate()
    {
        out[i] = p.stat(&format!("http.t.tracing.{s}")).await;
    }
    out
}

/// An id whose first 8 hex digits are 100 (mod 10000: 100).
const ID_100: &str = "00000064-1234-4234-8234-123456789012";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sampling_marks_the_request_id() {
    let p = start(json!({"tracing": {"random_sampling": {"value": 100}}}));
    let id = rid(&p, &[]).await;
    assert_eq!(id.len(), 36);
    assert_eq!(mark(&id), '9', "{id}");
    assert_eq!(
        tracing_stats(&p).await,
        [Some(0), Some(0), Some(0), Some(1), Some(0)]
    );
    let prom = p.admin("GET", "/stats/prometheus").await.text();
    assert!(
        prom.contains("envoy_http_tracing_random_sampling{envoy_http_conn_manager_prefix=\"t\"} 1"),
        "{prom}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_nothing_is_marked_or_counted() {
    let p = start(json!({}));
    let id = rid(&p, &[]).await;
    assert_eq!(mark(&id), '4', "{id}");
    // As Envoy, the stats exist for every HCM.
    assert_eq!(tracing_stats(&p).await, [Some(0); 5]);
}

/// The request id's first 8 hex digits mod 10000 against the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_decided_by_the_request_id() {
    // 1.01% = 101 / 10000 > 100: sampled; 1% = 100: not.
    let p = start(json!({"tracing": {"random_sampling": {"value": 1.01}}}));
    assert_eq!(
        rid(&p, &[("x-request-id", ID_100)]).await,
        "00000064-1234-9234-8234-123456789012"
    );
    let p = start(json!({"tracing": {"random_sampling": {"value": 1}}}));
    assert_eq!(rid(&p, &[("x-request-id", ID_100)]).await, ID_100);
    assert_eq!(
        tracing_stats(&p).await,
        [Some(0), Some(0), Some(1), Some(0), Some(0)]
    );
    // Not a UUID: neither sampled nor rewritten.
    assert_eq!(rid(&p, &[("x-request-id", "abc")]).await, "abc");
}

/// HCM fields making loopback clients internal (they may force traces).
fn internal_loopback(mut extra: Value) -> Value {
    extra["use_remote_address"] = json!(true);
    extra["internal_address_config"] =
        json!({"cidr_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]});
    extra
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trace_id_and_force_trace() {
    let p = start(internal_loopback(
        json!({"tracing": {"random_sampling": {"value": 0}}}),
    ));
    assert_eq!(mark(&rid(&p, &[("x-client-trace-id", "c1")]).await), 'b');
    // An internal (loopback) request may force a trace; its id comes back
    // even without always_set_request_id_in_response.
    assert_eq!(mark(&rid(&p, &[("x-envoy-force-trace", "1")]).await), 'a');
    assert_eq!(mark(&rid(&p, &[]).await), '4');
    assert_eq!(
        tracing_stats(&p).await,
        [Some(1), Some(0), Some(1), Some(0), Some(1)]
    );

    let p = start(internal_loopback(json!({
        "always_set_request_id_in_response": false,
        "tracing": {"random_sampling": {"value": 0}},
    })));
    let r = Http::h1()
        .get(&format!("{}/", p.base()), &[("x-envoy-force-trace", "1")])
        .await;
    assert_eq!(r.header("x-request-id").map(mark), Some('a'));
    let r = Http::h1().get(&format!("{}/", p.base()), &[]).await;
    assert_eq!(r.header("x-request-id"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overall_sampling_caps_every_reason() {
    let p = start(
        json!({"tracing": {"overall_sampling": {"value": 0}, "client_sampling": {"value": 100}}}),
    );
    assert_eq!(mark(&rid(&p, &[("x-client-trace-id", "c1")]).await), '4');
    assert_eq!(mark(&rid(&p, &[]).await), '4');
    // An already sampled id is cleared too.
    let sampled = "00000064-1234-9234-8234-123456789012";
    assert_eq!(rid(&p, &[("x-request-id", sampled)]).await, ID_100);
    assert_eq!(
        tracing_stats(&p).await,
        [Some(0), Some(0), Some(3), Some(0), Some(0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_extension_switches() {
    let ext = |pack: bool, use_rid: bool| {
        json!({
            "tracing": {"random_sampling": {"value": 100}},
            "request_id_extension": {"typed_config": {
                "@type": UUID_EXT, "pack_trace_reason": pack,
                "use_request_id_for_trace_sampling": use_rid,
            }},
        })
    };
    // Sampled, but nothing packed into the id.
    let p = start(ext(false, true));
    assert_eq!(rid(&p, &[("x-request-id", ID_100)]).await, ID_100);
    assert_eq!(tracing_stats(&p).await[3], Some(1));
    // Not by the request id: every request is sampled, the id untouched.
    let p = start(ext(true, false));
    assert_eq!(rid(&p, &[("x-request-id", "abc")]).await, "abc");
    assert_eq!(tracing_stats(&p).await[3], Some(1));
}

/// An edge request's kept external id: its trace reason is not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_request_ids_at_the_edge() {
    let p = start(json!({
        "use_remote_address": true, "preserve_external_request_id": true,
        "internal_address_config": {"cidr_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]},
        "tracing": {"random_sampling": {"value": 0}},
    }));
    let sampled = "00000064-1234-9234-8234-123456789012";
    // Kept, with its trace reason reset (random sampling is 0 here).
    assert_eq!(rid(&p, &[("x-request-id", sampled)]).await, ID_100);
    // An external client cannot force a trace.
    assert_eq!(mark(&rid(&p, &[("x-envoy-force-trace", "1")]).await), '4');
    assert_eq!(
        tracing_stats(&p).await,
        [Some(0), Some(0), Some(2), Some(0), Some(0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_tracer_fields_are_rejected_by_weir() {
    if Target::from_env().is_envoy() {
        return; // Envoy splits the spans; weir names the field it lacks.
    }
    let extra = json!({"tracing": {"provider": {"name": "envoy.tracers.zipkin", "typed_config": {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": "z", "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON", "split_spans_for_request": true,
    }}}});
    let r = Proxy::try_start(Target::from_env(), StartOptions::default(), move |p| {
        bootstrap(p, &extra)
    });
    let Err(e) = r else {
        panic!("started with split_spans_for_request")
    };
    assert!(
        format!("{e:#}").contains("tracing.provider.typed_config.split_spans_for_request"),
        "{e:#}"
    );
}
