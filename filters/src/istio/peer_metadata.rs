//! Istio's peer metadata filter (`io.istio.http.peer_metadata.Config`), as
//! istio/proxy's `peer_metadata/filter.cc`: discovers the downstream peer
//! from the request headers and the upstream peer from the response headers
//! (`istio_headers`: `x-envoy-peer-metadata` + `-id`, removed once read;
//! `baggage`, downstream only, kept), stores them as filter state
//! `downstream_peer` / `upstream_peer`, and sends this proxy's node metadata
//! upstream (request) and downstream (response): `istio_headers` (downstream
//! only when the request carried them) and `baggage` (always).
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use http::{HeaderName, HeaderValue};
use xds_client::config::{PeerDiscovery, PeerMetadataConfig, PeerPropagation};

use super::workloads::Workloads;
use super::{LocalNode, PeerInfo, DOWNSTREAM_PEER, UPSTREAM_PEER};
use crate::http::{Action, FilterContext, HttpFilter, HttpFilterFactory, RouteView};
use crate::state::StateFlags;

/// `x-envoy-peer-metadata`.
pub const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
/// `x-envoy-peer-metadata-id`.
pub const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");
/// W3C `baggage`.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// `x-forwarded-network`: the network a request came from (set by an
/// east-west gateway).
pub const FORWARDED_NETWORK: HeaderName = HeaderName::from_static("x-forwarded-network");

/// Decoded peers kept per factory and method (Istio keeps a per-worker
/// cache too).
const PEER_CACHE: usize = 1000;
/// Longer header values are decoded per request, not kept: the cache stays
/// within `PEER_CACHE` times this many key bytes (a `baggage` header may
/// carry per-request members of any length up to the header limit).
const MAX_CACHED_VALUE: usize = 4096;

/// Built once per config: the propagated header values are encoded here.
#[derive(Debug)]
pub struct PeerMetadataFactory {
    name: Arc<str>,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<PeerMetadataConfig>,
    /// Our `node.id`, for `x-envoy-peer-metadata-id`.
    id: Option<HeaderValue>,
    /// Our node metadata, encoded once, for `x-envoy-peer-metadata`.
    value: Option<HeaderValue>,
    /// Our node metadata as Istio renders it for `baggage`, once.
    baggage: Option<HeaderValue>,
    /// Decoded peers by header value, so equal headers share one object.
    cache: RwLock<HashMap<Box<[u8]>, Arc<PeerInfo>>>,
    /// Likewise for `baggage` values.
    baggage_cache: RwLock<HashMap<Box<[u8]>, Arc<PeerInfo>>>,
    /// The workloads of workload discovery (the proxy's; `None` in tests
    /// without one: `workload_discovery` then finds nothing, as Istio
    /// without a provider).
    workloads: Option<Workloads>,
    /// Our node metadata's `NETWORK` (empty when unset).
    network: String,
}

impl PeerMetadataFactory {
    pub fn new(
        name: Arc<str>,
        config: Arc<PeerMetadataConfig>,
        local: &LocalNode,
        workloads: Option<Workloads>,
    ) -> Self {
        // As Istio: the node's locality stands in for a missing `REGION` /
        // `AVAILABILITY_ZONE` in both propagated forms.
        let mut me = PeerInfo::local(
            &local.metadata,
            &local.region,
            &local.zone,
            &config.additional_labels,
        );
        me.identity.clear();
        let value = HeaderValue::from_str(&me.encode_header()).ok();
        let id = HeaderValue::from_str(&local.id).ok();
        // Baggage carries no labels. A value that is no valid header value
        // (a control character in the node metadata) is not sent.
        let baggage = HeaderValue::from_str(&me.baggage()).ok();
        PeerMetadataFactory {
            name,
            inner: Arc::new(Inner {
                config,
                id,
                value,
                baggage,
                cache: RwLock::new(HashMap::new()),
                baggage_cache: RwLock::new(HashMap::new()),
                workloads,
                network: local
                    .metadata
                    .get("NETWORK")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
            }),
        }
    }
}

/// The peer `value` describes, from `cache` or decoded by `decode` (and
/// kept: at most [`PEER_CACHE`] values, then the cache starts over).
fn cached(
    cache: &RwLock<HashMap<Box<[u8]>, Arc<PeerInfo>>>,
    value: &[u8],
    decode: impl FnOnce(&[u8]) -> Option<PeerInfo>,
) -> Option<Arc<PeerInfo>> {
    if value.len() > MAX_CACHED_VALUE {
        return decode(value).map(Arc::new);
    }
    if let Some(p) = cache
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(value)
    {
        return Some(p.clone());
    }
    let p = Arc::new(decode(value)?);
    let mut c = cache.write().unwrap_or_else(PoisonError::into_inner);
    if c.len() >= PEER_CACHE {
        c.clear();
    }
    c.insert(value.into(), p.clone());
    Some(p)
}

/// Whether `headers` hold `x-envoy-peer-metadata-id` / `x-envoy-peer-metadata`,
/// in one scan of the names (compared by length first): a lookup by name
/// hashes the name and probes even when the header is absent, which is
/// the common case (most requests and responses carry neither).
fn istio_headers_present(headers: &http::HeaderMap) -> (bool, bool) {
    let (id, md) = ("x-envoy-peer-metadata-id", "x-envoy-peer-metadata");
    let mut seen = (false, false);
    for k in headers.keys() {
        let k = k.as_str();
        if k.len() == id.len() && k == id {
            seen.0 = true;
        } else if k.len() == md.len() && k == md {
            seen.1 = true;
        }
    }
    seen
}

impl Inner {
    /// The peer an `x-envoy-peer-metadata` value describes.
    fn lookup(&self, value: &[u8]) -> Option<Arc<PeerInfo>> {
        cached(&self.cache, value, |v| {
            PeerInfo::decode_header(v, &self.config.additional_labels)
        })
    }

    /// The peer a `baggage` value describes (always one, as Istio).
    fn lookup_baggage(&self, value: &[u8]) -> Arc<PeerInfo> {
        cached(&self.baggage_cache, value, |v| {
            Some(PeerInfo::from_baggage(v))
        })
        .unwrap_or_default()
    }

    /// `workload_discovery`, as Istio's `XDSMethod`: downstream, the
    /// request's remote address (unless `x-forwarded-network` names
    /// another network than ours); upstream, the address of the host that
    /// answered.
    fn workload_peer(
        &self,
        headers: &http::HeaderMap,
        cx: &FilterContext,
        downstream: bool,
    ) -> Option<Arc<PeerInfo>> {
        let index = self.workloads.as_ref()?;
        let addr = if downstream {
            if let Some(n) = headers.get(&FORWARDED_NETWORK) {
                if n.as_bytes() != self.network.as_bytes() {
                    return None;
                }
            }
            cx.downstream_remote
                .or_else(|| cx.downstream.as_ref().map(|d| d.remote))?
        } else {
            cx.upstream_host?
        };
        index.load().get(addr.ip()).cloned()
    }

    /// Runs the discovery methods on `headers`; the first result is stored
    /// under `key` (unless already there, as Istio), then every method's
    /// headers are removed. Returns whether the two headers were present.
    fn discover(
        &self,
        methods: &[PeerDiscovery],
        headers: &mut http::HeaderMap,
        cx: &mut FilterContext,
        key: &'static str,
    ) -> (bool, bool) {
        let mut seen = (false, false);
        let mut asked = false;
        let mut found = None;
        // As Istio: the methods run in order until one finds the peer; the
        // later ones are not asked (so `seen` stays false behind a hit).
        for m in methods {
            found = match m {
                PeerDiscovery::IstioHeaders => {
                    asked = true;
                    seen = istio_headers_present(headers);
                    let v = if seen.1 {
                        headers.get(&PEER_METADATA)
                    } else {
                        None
                    };
                    v.filter(|v| !v.is_empty())
                        .and_then(|v| self.lookup(v.as_bytes()))
                }
                // The first `baggage` header, whatever it holds.
                PeerDiscovery::Baggage => headers
                    .get(&BAGGAGE)
                    .map(|v| self.lookup_baggage(v.as_bytes())),
                PeerDiscovery::WorkloadDiscovery => {
                    self.workload_peer(headers, cx, key == DOWNSTREAM_PEER)
                }
            };
            if found.is_some() {
                break;
            }
        }
        if let Some(p) = found {
            if cx.filter_state.get(key).is_none() {
                let flags = StateFlags {
                    read_only: false,
                    shared_with_upstream: self.config.shared_with_upstream,
                };
                // A mutable entry: setting cannot fail.
                let _ = cx.filter_state.set(key, p, flags);
            }
        }
        // Removed even when an earlier method found the peer; when
        // `istio_headers` was asked, only what it saw (a remove by name
        // hashes and probes even for an absent header).
        if methods.contains(&PeerDiscovery::IstioHeaders) {
            if !asked || seen.0 {
                headers.remove(&PEER_METADATA_ID);
            }
            if !asked || seen.1 {
                headers.remove(&PEER_METADATA);
            }
        }
        seen
    }

    /// Adds our headers (`only`, downstream: of the two `istio_headers`
    /// only those the request carried).
    fn propagate(
        &self,
        methods: &[PeerPropagation],
        headers: &mut http::HeaderMap,
        external: bool,
        only: Option<(bool, bool)>,
    ) {
        for m in methods {
            let skip_external_clusters = match m {
                PeerPropagation::IstioHeaders {
                    skip_external_clusters,
                } => skip_external_clusters,
                // As Istio: set (replacing any) in both directions, to
                // every cluster.
                PeerPropagation::Baggage => {
                    if let Some(v) = &self.baggage {
                        headers.insert(BAGGAGE, v.clone());
                    }
                    continue;
                }
            };
            if *skip_external_clusters && external {
                continue;
            }
            let (id, md) = only.unwrap_or((true, true));
            if let (true, Some(v)) = (id, &self.id) {
                headers.insert(PEER_METADATA_ID, v.clone());
            }
            if let (true, Some(v)) = (md, &self.value) {
                headers.insert(PEER_METADATA, v.clone());
            }
        }
    }
}

impl HttpFilterFactory for PeerMetadataFactory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        Some(Box::new(PeerMetadata {
            inner: self.inner.clone(),
            // As Istio's `skipMXHeaders`: the passthrough cluster is
            // external (weir has no cluster metadata `istio.external`).
            external: route.cluster == Some("PassthroughCluster"),
            request_headers: (false, false),
        }))
    }
}

/// One request's instance.
struct PeerMetadata {
    inner: Arc<Inner>,
    external: bool,
    /// The request carried `x-envoy-peer-metadata-id` / `x-envoy-peer-metadata`.
    request_headers: (bool, bool),
}

impl HttpFilter for PeerMetadata {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        let c = &self.inner.config;
        let seen = self.inner.discover(
            &c.downstream_discovery,
            &mut head.headers,
            cx,
            DOWNSTREAM_PEER,
        );
        if c.downstream_discovery
            .contains(&PeerDiscovery::IstioHeaders)
        {
            self.request_headers = seen;
        }
        self.inner.propagate(
            &c.upstream_propagation,
            &mut head.headers,
            self.external,
            None,
        );
        Action::Continue
    }

    fn on_response_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        let c = &self.inner.config;
        self.inner
            .discover(&c.upstream_discovery, &mut head.headers, cx, UPSTREAM_PEER);
        self.inner.propagate(
            &c.downstream_propagation,
            &mut head.headers,
            self.external,
            Some(self.request_headers),
        );
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> LocalNode {
        LocalNode::new(&xds_client::config::Node {
            id: "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local".into(),
            metadata: serde_json::json!({
                "NAME": "gw-1", "NAMESPACE": "istio-system", "CLUSTER_ID": "Kubernetes",
                "WORKLOAD_NAME": "gw", "LABELS": {"app": "gw"},
            }),
            ..Default::default()
        })
    }

    #[test]
    fn reads_strips_and_propagates() {
        let config = Arc::new(PeerMetadataConfig {
            downstream_discovery: vec![PeerDiscovery::IstioHeaders],
            upstream_discovery: vec![
                PeerDiscovery::IstioHeaders,
                PeerDiscovery::WorkloadDiscovery,
            ],
            downstream_propagation: vec![PeerPropagation::IstioHeaders {
                skip_external_clusters: false,
            }],
            upstream_propagation: vec![PeerPropagation::IstioHeaders {
                skip_external_clusters: true,
            }],
            ..Default::default()
        });
        let f = PeerMetadataFactory::new("pm".into(), config, &node(), None);
        let client = PeerInfo {
            workload: "client".into(),
            namespace: "apps".into(),
            ..Default::default()
        };
        let mut i = f.create(&RouteView::empty()).expect("instance");
        let mut cx = FilterContext::default();
        let (mut req, _) = http::Request::get("/")
            .header(&PEER_METADATA, client.encode_header())
            .header(&PEER_METADATA_ID, "client-id")
            .body(())
            .expect("request")
            .into_parts();
        assert!(matches!(
            i.on_request_headers(&mut cx, &mut req),
            Action::Continue
        ));
        let got = cx
            .filter_state
            .get_typed::<PeerInfo>(DOWNSTREAM_PEER)
            .expect("peer");
        assert_eq!(got.workload, "client");
        // Ours replace the client's on the way upstream.
        assert_eq!(req.headers[&PEER_METADATA_ID], *node().id);
        let ours =
            PeerInfo::decode_header(req.headers[&PEER_METADATA].as_bytes(), &[]).expect("ours");
        assert_eq!(
            (ours.workload.as_str(), ours.namespace.as_str()),
            ("gw", "istio-system")
        );
        // The upstream's are read and removed; ours go downstream.
        let server = PeerInfo {
            workload: "server".into(),
            ..Default::default()
        };
        let (mut resp, _) = http::Response::builder()
            .header(&PEER_METADATA, server.encode_header())
            .body(())
            .expect("response")
            .into_parts();
        i.on_response_headers(&mut cx, &mut resp);
        let up = cx
            .filter_state
            .get_typed::<PeerInfo>(UPSTREAM_PEER)
            .expect("upstream");
        assert_eq!(up.workload, "server");
        assert_eq!(resp.headers[&PEER_METADATA_ID], *node().id);
        assert_eq!(resp.headers[&PEER_METADATA], req.headers[&PEER_METADATA]);
    }

    #[test]
    fn skips_external_and_answers_only_what_was_asked() {
        let config = Arc::new(PeerMetadataConfig {
            downstream_discovery: vec![PeerDiscovery::IstioHeaders],
            downstream_propagation: vec![PeerPropagation::IstioHeaders {
                skip_external_clusters: false,
            }],
            upstream_propagation: vec![PeerPropagation::IstioHeaders {
                skip_external_clusters: true,
            }],
            ..Default::default()
        });
        let f = PeerMetadataFactory::new("pm".into(), config, &node(), None);
        let route = RouteView {
            cluster: Some("PassthroughCluster"),
            ..RouteView::empty()
        };
        let mut i = f.create(&route).expect("instance");
        let mut cx = FilterContext::default();
        let (mut req, _) = http::Request::get("/")
            .header(&PEER_METADATA, "@@not base64")
            .body(())
            .expect("request")
            .into_parts();
        i.on_request_headers(&mut cx, &mut req);
        assert!(cx.filter_state.get(DOWNSTREAM_PEER).is_none());
        assert!(!req.headers.contains_key(&PEER_METADATA));
        assert!(!req.headers.contains_key(&PEER_METADATA_ID));
        let (mut resp, _) = http::Response::builder()
            .body(())
            .expect("response")
            .into_parts();
        i.on_response_headers(&mut cx, &mut resp);
        // The request had the metadata header but no id: only that one.
        assert!(resp.headers.contains_key(&PEER_METADATA));
        assert!(!resp.headers.contains_key(&PEER_METADATA_ID));
    }

    #[test]
    fn baggage_discovery_in_order_and_propagation() {
        let config = Arc::new(PeerMetadataConfig {
            downstream_discovery: vec![PeerDiscovery::Baggage, PeerDiscovery::IstioHeaders],
            downstream_propagation: vec![
                PeerPropagation::IstioHeaders {
                    skip_external_clusters: false,
                },
                PeerPropagation::Baggage,
            ],
            upstream_propagation: vec![PeerPropagation::Baggage],
            ..Default::default()
        });
        let f = PeerMetadataFactory::new("pm".into(), config, &node(), None);
        let ours = "k8s.pod.name=gw,app.name=gw,k8s.namespace.name=istio-system,\
                    k8s.cluster.name=Kubernetes,k8s.instance.name=gw-1";
        let mx = PeerInfo {
            workload: "mx".into(),
            ..Default::default()
        };
        // Baggage first: it wins, istio_headers is not asked (so nothing
        // of it goes back) but its headers are removed all the same.
        let mut i = f.create(&RouteView::empty()).expect("instance");
        let mut cx = FilterContext::default();
        let (mut req, _) = http::Request::get("/")
            .header("baggage", "k8s.namespace.name=apps,service.name=client")
            .header("baggage", "k8s.namespace.name=second")
            .header(&PEER_METADATA, mx.encode_header())
            .body(())
            .expect("request")
            .into_parts();
        i.on_request_headers(&mut cx, &mut req);
        let got = cx
            .filter_state
            .get_typed::<PeerInfo>(DOWNSTREAM_PEER)
            .expect("peer");
        assert_eq!(
            (got.namespace.as_str(), got.app.as_str()),
            ("apps", "client")
        );
        assert!(!req.headers.contains_key(&PEER_METADATA));
        // Ours replaces the client's baggage upstream.
        assert_eq!(
            req.headers.get_all(&BAGGAGE).iter().collect::<Vec<_>>(),
            [ours]
        );
        let (mut resp, _) = http::Response::builder()
            .body(())
            .expect("response")
            .into_parts();
        i.on_response_headers(&mut cx, &mut resp);
        assert_eq!(resp.headers[&BAGGAGE], ours);
        assert!(!resp.headers.contains_key(&PEER_METADATA));

        // Without baggage the next method is asked.
        let mut i = f.create(&RouteView::empty()).expect("instance");
        let mut cx = FilterContext::default();
        let (mut req, _) = http::Request::get("/")
            .header(&PEER_METADATA, mx.encode_header())
            .body(())
            .expect("request")
            .into_parts();
        i.on_request_headers(&mut cx, &mut req);
        let got = cx
            .filter_state
            .get_typed::<PeerInfo>(DOWNSTREAM_PEER)
            .expect("peer");
        assert_eq!(got.workload, "mx");
        let (mut resp, _) = http::Response::builder()
            .body(())
            .expect("response")
            .into_parts();
        i.on_response_headers(&mut cx, &mut resp);
        assert!(resp.headers.contains_key(&PEER_METADATA));
    }

    #[test]
    fn long_baggage_is_read_but_not_cached() {
        let config = Arc::new(PeerMetadataConfig {
            downstream_discovery: vec![PeerDiscovery::Baggage],
            ..Default::default()
        });
        let f = PeerMetadataFactory::new("pm".into(), config, &node(), None);
        let long = format!("junk={},k8s.namespace.name=big", "x".repeat(8000));
        for _ in 0..2 {
            let mut i = f.create(&RouteView::empty()).expect("instance");
            let mut cx = FilterContext::default();
            let (mut req, _) = http::Request::get("/")
                .header("baggage", long.as_str())
                .body(())
                .expect("request")
                .into_parts();
            i.on_request_headers(&mut cx, &mut req);
            let got = cx
                .filter_state
                .get_typed::<PeerInfo>(DOWNSTREAM_PEER)
                .expect("peer");
            assert_eq!(got.namespace, "big");
            assert_eq!(req.headers["baggage"], long.as_str());
        }
        let cached = f.inner.baggage_cache.read().expect("lock").len();
        assert_eq!(cached, 0);
    }
}
