//! The HCM's trace decision (`tracing` without a tracer provider), as
//! Envoy's `ConnectionManagerUtility::mutateTracingRequestHeader` with the
//! UUID request ID extension: the reason is read from and written into the
//! x-request-id UUID (its 15th character), and counted in
//! `http.<prefix>.tracing.*`. Spans (a `provider`) are `crate::trace`.
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use xds_client::config::{RequestIdConfig, TracingConfig};

use super::headers::X_REQUEST_ID;
use crate::stats::{Counter, StatName, Store};

static X_CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");
static X_ENVOY_FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");

/// Where a UUID keeps the trace reason.
const REASON_AT: usize = 14;
const UUID_LEN: usize = 36;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotTraceable,
    ClientForced,
    ServiceForced,
    Sampling,
}

impl Reason {
    /// The character Envoy 1.40 writes for the reason (checked against it).
    fn mark(self) -> u8 {
        match self {
            Reason::NotTraceable => b'4',
            Reason::ServiceForced => b'a',
            Reason::Sampling => b'9',
            Reason::ClientForced => b'b',
        }
    }

    fn of_mark(c: u8) -> Reason {
        match c {
            b'a' => Reason::ServiceForced,
            b'9' => Reason::Sampling,
            b'b' => Reason::ClientForced,
            _ => Reason::NotTraceable,
        }
    }
}

/// `http.<prefix>.tracing.*` (for every HCM, as Envoy).
pub struct TracingStats {
    client_enabled: Arc<Counter>,
    not_traceable: Arc<Counter>,
    random_sampling: Arc<Counter>,
    service_forced: Arc<Counter>,
    // Never written: weir has no health_check filter to mark requests.
    _health_check: Arc<Counter>,
}

impl TracingStats {
    pub fn new(store: &Store, prefix: &str) -> TracingStats {
        let t = |s: &str| {
            store.counter(StatName::tagged(
                "http",
                prefix,
                &format!("tracing.{s}"),
                "envoy_http_conn_manager_prefix",
            ))
        };
        TracingStats {
            client_enabled: t("client_enabled"),
            not_traceable: t("not_traceable"),
            random_sampling: t("random_sampling"),
            service_forced: t("service_forced"),
            _health_check: t("health_check"),
        }
    }

    pub fn charge(&self, r: Reason) {
        match r {
            Reason::NotTraceable => self.not_traceable.inc(),
            Reason::ClientForced => self.client_enabled.inc(),
            Reason::ServiceForced => self.service_forced.inc(),
            Reason::Sampling => self.random_sampling.inc(),
        }
    }
}

fn request_id(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(&X_REQUEST_ID).map(HeaderValue::as_bytes)
}

/// The request ID's first 8 hex digits, as Envoy's `getInteger`.
fn rid_integer(rid: &[u8]) -> Option<u64> {
    let head = std::str::from_utf8(rid.get(..8)?).ok()?;
    u64::from_str_radix(head, 16).ok()
}

fn get_reason(rid: &RequestIdConfig, headers: &HeaderMap) -> Reason {
    match request_id(headers) {
        Some(v) if rid.pack_trace_reason && v.len() == UUID_LEN => Reason::of_mark(v[REASON_AT]),
        _ => Reason::NotTraceable,
    }
}

pub fn set_reason(rid: &RequestIdConfig, headers: &mut HeaderMap, r: Reason) {
    if !rid.pack_trace_reason {
        return;
    }
    let Some(v) = request_id(headers).filter(|v| v.len() == UUID_LEN) else {
        return;
    };
    let mut id = v.to_vec();
    id[REASON_AT] = r.mark();
    if let Ok(v) = HeaderValue::from_bytes(&id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
}

/// Decides whether the request is traced and records the reason in its
/// x-request-id. `random` draws the client-sampling coin. The route's
/// `tracing` samplings, when it has them, replace the HCM's (Envoy's
/// `mutateTracingRequestHeader`).
pub fn decide(
    cfg: &TracingConfig,
    route: Option<&xds_client::config::RouteTracing>,
    rid: &RequestIdConfig,
    headers: &mut HeaderMap,
    random: impl FnOnce() -> u64,
) -> Reason {
    if !rid.use_request_id_for_trace_sampling {
        return Reason::Sampling;
    }
    // A missing or corrupt request ID: not traced, nothing written.
    let Some(result) = request_id(headers)
        .and_then(rid_integer)
        .map(|v| v % 10_000)
    else {
        return Reason::NotTraceable;
    };
    let (client, sampling, overall) = match route {
        Some(r) => (r.client_sampling, r.random_sampling, r.overall_sampling),
        None => (
            (cfg.client_sampling, 10_000),
            (cfg.random_sampling, 10_000),
            (cfg.overall_sampling, 10_000),
        ),
    };
    // Envoy's `evaluateFractionalPercent`: value mod denominator < numerator.
    let on = |(num, den): (u32, u32), v: u64| v % u64::from(den.max(1)) < u64::from(num);
    let mut reason = get_reason(rid, headers);
    if reason == Reason::NotTraceable {
        if headers.contains_key(&X_CLIENT_TRACE_ID) && on(client, random()) {
            reason = Reason::ClientForced;
            set_reason(rid, headers, reason);
        } else if headers.contains_key(&X_ENVOY_FORCE_TRACE) {
            reason = Reason::ServiceForced;
            set_reason(rid, headers, reason);
        } else if on(sampling, result) {
            reason = Reason::Sampling;
            set_reason(rid, headers, reason);
        }
    }
    if reason != Reason::NotTraceable && !on(overall, result) {
        reason = Reason::NotTraceable;
        set_reason(rid, headers, reason);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(client: u32, random: u32, overall: u32) -> TracingConfig {
        TracingConfig {
            client_sampling: client,
            random_sampling: random,
            overall_sampling: overall,
            ..Default::default()
        }
    }

    fn with_rid(rid: &str, extra: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(rid).expect("rid"));
        for (k, v) in extra {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn decide_hcm(
        cfg: &TracingConfig,
        rid: &RequestIdConfig,
        h: &mut HeaderMap,
        random: impl FnOnce() -> u64,
    ) -> Reason {
        decide(cfg, None, rid, h, random)
    }

    const RID: &str = "00000064-1234-4234-8234-123456789012"; // 100 % 10000 = 100

    #[test]
    fn sampling_by_request_id_and_marks() {
        let rid = RequestIdConfig::default();
        let mut h = with_rid(RID, &[]);
        assert_eq!(
            decide_hcm(&cfg(10_000, 101, 10_000), &rid, &mut h, || 0),
            Reason::Sampling
        );
        assert_eq!(h[&X_REQUEST_ID], "00000064-1234-9234-8234-123456789012");
        // Already sampled: kept, even at 0% random sampling.
        assert_eq!(
            decide_hcm(&cfg(10_000, 0, 10_000), &rid, &mut h, || 0),
            Reason::Sampling
        );
        // Overall sampling below the id's value: cleared.
        assert_eq!(
            decide_hcm(&cfg(10_000, 0, 100), &rid, &mut h, || 0),
            Reason::NotTraceable
        );
        assert_eq!(h[&X_REQUEST_ID], RID);
        let mut h = with_rid(RID, &[]);
        assert_eq!(
            decide_hcm(&cfg(10_000, 100, 10_000), &rid, &mut h, || 0),
            Reason::NotTraceable
        );
        assert_eq!(h[&X_REQUEST_ID], RID, "unchanged when not traced");
    }

    #[test]
    fn client_and_forced() {
        let rid = RequestIdConfig::default();
        let mut h = with_rid(RID, &[("x-client-trace-id", "x")]);
        assert_eq!(
            decide_hcm(&cfg(10_000, 0, 10_000), &rid, &mut h, || 9_999),
            Reason::ClientForced
        );
        assert_eq!(h[&X_REQUEST_ID].as_bytes()[REASON_AT], b'b');
        // Client sampling missed: falls through to force-trace.
        let mut h = with_rid(
            RID,
            &[("x-client-trace-id", "x"), ("x-envoy-force-trace", "1")],
        );
        assert_eq!(
            decide_hcm(&cfg(0, 0, 10_000), &rid, &mut h, || 0),
            Reason::ServiceForced
        );
        assert_eq!(h[&X_REQUEST_ID].as_bytes()[REASON_AT], b'a');
    }

    #[test]
    fn corrupt_ids_and_extension_switches() {
        let rid = RequestIdConfig::default();
        let mut h = with_rid("not-a-uuid", &[]);
        assert_eq!(
            decide_hcm(&cfg(10_000, 10_000, 10_000), &rid, &mut h, || 0),
            Reason::NotTraceable
        );
        let mut h = HeaderMap::new();
        assert_eq!(
            decide_hcm(&cfg(10_000, 10_000, 10_000), &rid, &mut h, || 0),
            Reason::NotTraceable
        );
        // A short id still samples by its first 8 digits, but nothing is packed.
        let mut h = with_rid("00000001-short", &[]);
        assert_eq!(
            decide_hcm(&cfg(10_000, 10_000, 10_000), &rid, &mut h, || 0),
            Reason::Sampling
        );
        assert_eq!(h[&X_REQUEST_ID], "00000001-short");
        let no_pack = RequestIdConfig {
            pack_trace_reason: false,
            use_request_id_for_trace_sampling: true,
        };
        let mut h = with_rid(RID, &[]);
        assert_eq!(
            decide_hcm(&cfg(10_000, 10_000, 10_000), &no_pack, &mut h, || 0),
            Reason::Sampling
        );
        assert_eq!(h[&X_REQUEST_ID], RID);
        let no_rid = RequestIdConfig {
            pack_trace_reason: true,
            use_request_id_for_trace_sampling: false,
        };
        assert_eq!(
            decide_hcm(&cfg(0, 0, 0), &no_rid, &mut h, || 0),
            Reason::Sampling
        );
    }
}
