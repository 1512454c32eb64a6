//! The proxy's [`Callouts`]: filters' calls to a cluster (Envoy's
//! `AsyncClient` for ext_authz, the rate-limit service, remote JWKS) over
//! the cluster manager: the cluster's load balancer picks the host, the
//! request goes through this worker's pool for the cluster's upstream
//! protocol (HTTP/2 for gRPC clusters) with the host's transport socket,
//! connect timeout and circuit breakers, and is counted in the cluster's
//! `upstream_rq_*` stats as Envoy's async client counts its requests.
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use filters::callout::{CalloutError, CalloutFuture, CalloutRequest, CalloutResponse, Callouts};
use http::{header, HeaderValue, Request, Version};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::{pool, ClusterRuntime, PoolKind};
use crate::body::Body;
use crate::Shared;

/// Sends filters' requests to the clusters of the running configuration.
/// Holds the shared state weakly: the chains that hold this are owned by
/// it.
pub struct ClusterCallouts {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for ClusterCallouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCallouts")
    }
}

impl ClusterCallouts {
    /// The callouts of `shared`, as filter chains hold them.
    pub fn shared(shared: &Arc<Shared>) -> Arc<dyn Callouts> {
        Arc::new(ClusterCallouts {
            shared: Arc::downgrade(shared),
        })
    }
}

impl Callouts for ClusterCallouts {
    fn health_check_failed(&self) -> bool {
        self.shared.upgrade().is_some_and(|s| {
            s.healthcheck_failed
                .load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    fn local_cluster(&self) -> String {
        self.shared
            .upgrade()
            .map(|s| s.snapshot.load().node.cluster.clone())
            .unwrap_or_default()
    }

    fn workloads(&self) -> Option<filters::istio::workloads::Workloads> {
        self.shared.upgrade().map(|s| s.workloads.clone())
    }

    fn cluster_membership(&self, cluster: &str) -> Option<(u64, u64)> {
        let rt = self.shared.upgrade()?.clusters.get(cluster)?;
        let n = |g: &crate::stats::Gauge| u64::try_from(g.value()).unwrap_or(0);
        Some((
            n(&rt.stats.membership_total),
            n(&rt.stats.membership_healthy),
        ))
    }

    fn send(
        &self,
        cluster: &str,
        req: CalloutRequest,
        timeout: Duration,
        max_body: usize,
    ) -> CalloutFuture {
        // The cluster is looked up now (the configuration of the moment),
        // so the future owns its runtime, not the name.
        let rt = self.shared.upgrade().and_then(|s| s.clusters.get(cluster));
        Box::pin(async move {
            let Some(rt) = rt else {
                return Err(CalloutError::ClusterNotFound);
            };
            match tokio::time::timeout(timeout, call(&rt, req, max_body)).await {
                Ok(r) => r,
                Err(_) => {
                    rt.stats.upstream_rq_timeout.inc();
                    Err(CalloutError::Timeout)
                }
            }
        })
    }
}

/// One exchange with a host of `rt`: the whole response, body bounded.
pub(crate) async fn call(
    rt: &Arc<ClusterRuntime>,
    req: CalloutRequest,
    max_body: usize,
) -> Result<CalloutResponse, CalloutError> {
    // A mirror to an `override_host` cluster follows its request's headers
    // (Envoy's async client gives the LB the shadow's headers).
    let mut overrides = rt.override_hosts(&req.headers, None);
    // An ORIGINAL_DST cluster: only the request's headers can name the
    // destination (a callout has no stream or connection of its own).
    if let Some(od) = &rt.original_dst {
        overrides.original_dst = od.destination(&super::original_dst::DstInputs {
            headers: Some(&req.headers),
            ..Default::default()
        });
    }
    let Some(host) = rt.choose_request(None, &mut overrides, &[], 0) else {
        return Err(CalloutError::NoHealthyUpstream);
    };
    // A callout has no downstream protocol to follow: HTTP/2 when the
    // cluster says so, else HTTP/1.1 (ALPN may still choose h2).
    let kind = rt.pool_kind(false);
    let sni = if rt.config.auto_sni {
        sni_of(&req.authority)
    } else {
        None
    };
    let request = build(req, kind)?;
    let stats = &rt.stats;
    stats.upstream_rq_total.inc();
    stats.upstream_rq_active.inc();
    host.active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    // Undone on every exit, the caller's timeout dropping this future
    // included.
    let _active = Active(rt.clone(), host.clone());
    let dest = rt.dest(&host);
    let resp = rt
        .pool(kind)
        .request(
            pool::Dest {
                sni: sni.or(dest.sni),
                ..dest
            },
            request,
        )
        .await
        .map_err(|e| CalloutError::Failed(e.to_string()))?
        .0;
    stats.record_status(resp.status().as_u16());
    stats
        .upstream_rq_time
        .record_us(started.elapsed().as_micros() as u64);
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = http::HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CalloutError::Failed(e.to_string()))?;
        match frame.into_data() {
            Ok(d) => {
                if data.len() + d.len() > max_body {
                    return Err(CalloutError::BodyTooLarge);
                }
                data.extend_from_slice(&d);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.extend(t);
                }
            }
        }
    }
    Ok(CalloutResponse {
        status: parts.status,
        headers: parts.headers,
        body: data.freeze(),
        trailers,
    })
}

/// The request as the pool sends it: origin-form with `host` for
/// HTTP/1.1, an absolute URI (`:authority`) for HTTP/2.
fn build(req: CalloutRequest, kind: PoolKind) -> Result<Request<Body>, CalloutError> {
    let bad = |e: http::Error| CalloutError::Failed(format!("invalid request: {e}"));
    let uri = match kind {
        PoolKind::Http1 => http::Uri::builder()
            .path_and_query(req.path_and_query.as_str())
            .build(),
        PoolKind::Http2 => http::Uri::builder()
            .scheme("http")
            .authority(req.authority.as_str())
            .path_and_query(req.path_and_query.as_str())
            .build(),
    }
    .map_err(bad)?;
    let len = req.body.len();
    let body = if len == 0 {
        Body::Empty
    } else {
        Body::full(req.body)
    };
    let mut out = Request::new(body);
    *out.method_mut() = req.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = req.headers;
    // As the router: a request with a body, or with a method that may
    // carry one, says its length.
    if len > 0 || !matches!(*out.method(), http::Method::GET | http::Method::HEAD) {
        out.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    match kind {
        PoolKind::Http1 => {
            *out.version_mut() = Version::HTTP_11;
            let v = HeaderValue::from_str(&req.authority)
                .map_err(|e| CalloutError::Failed(format!("invalid authority: {e}")))?;
            out.headers_mut().insert(header::HOST, v);
        }
        PoolKind::Http2 => {
            *out.version_mut() = Version::HTTP_2;
            out.headers_mut().remove(header::HOST);
        }
    }
    Ok(out)
}

/// `auto_sni` for a callout: the authority's host, unless it is an IP.
fn sni_of(authority: &str) -> Option<Arc<str>> {
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal, with or without a port.
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        },
    };
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(host.into())
}

/// A request in flight on a cluster and host (`upstream_rq_active`,
/// least-request accounting).
struct Active(Arc<ClusterRuntime>, Arc<super::Host>);

impl Drop for Active {
    fn drop(&mut self) {
        self.1
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.stats.upstream_rq_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn sni_skips_ips_and_ports() {
        assert_eq!(
            sni_of("authz.example:9000").as_deref(),
            Some("authz.example")
        );
        assert_eq!(sni_of("authz"), Some("authz".into()));
        assert_eq!(sni_of("127.0.0.1:80"), None);
        assert_eq!(sni_of("[::1]:80"), None);
    }

    #[test]
    fn h1_is_origin_form_with_host_and_h2_absolute() {
        let req = CalloutRequest {
            method: http::Method::POST,
            path_and_query: "/pkg.S/M".into(),
            authority: "authz".into(),
            headers: http::HeaderMap::new(),
            body: Bytes::from_static(b"abc"),
        };
        let h1 = build(req.clone(), PoolKind::Http1).expect("h1");
        assert_eq!(h1.uri(), "/pkg.S/M");
        assert_eq!(h1.headers()[header::HOST], "authz");
        assert_eq!(h1.headers()[header::CONTENT_LENGTH], "3");
        let h2 = build(req, PoolKind::Http2).expect("h2");
        assert_eq!(h2.uri(), "http://authz/pkg.S/M");
        assert!(h2.headers().get(header::HOST).is_none());
    }
}
