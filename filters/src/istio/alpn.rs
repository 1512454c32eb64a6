//! Istio's `istio.alpn` HTTP filter, as istio/proxy's `alpn_filter.cc`: at
//! the request headers of a routed request, the ALPN list configured for
//! the upstream protocol goes into filter state
//! `envoy.network.application_protocols` (read-only), so the upstream TLS
//! handshake offers it instead of the cluster's `alpn_protocols`.
//!
//! Istio resolves the protocol from the cluster here; weir stores the
//! per-protocol table and the router resolves it with the protocol it
//! connects with (the same rule: HTTP/2 for `http2_protocol_options` and
//! `auto_config`, the downstream's for `use_downstream_protocol_config`
//! with HTTP/1.0 as HTTP/1.1, else HTTP/1.1).
use std::sync::Arc;

use xds_client::config::IstioAlpnConfig;

use crate::http::{Action, FilterContext, HttpFilter, HttpFilterFactory, RouteView};
use crate::state::{ApplicationProtocols, StateFlags, APPLICATION_PROTOCOLS};

#[derive(Debug)]
pub struct IstioAlpnFactory {
    name: Arc<str>,
    object: Arc<ApplicationProtocols>,
}

impl IstioAlpnFactory {
    pub fn new(name: Arc<str>, config: Arc<IstioAlpnConfig>) -> Self {
        IstioAlpnFactory {
            name,
            object: Arc::new(ApplicationProtocols::ByProtocol(config)),
        }
    }
}

impl HttpFilterFactory for IstioAlpnFactory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // As Istio: nothing without a route entry (direct responses,
        // redirects, no route).
        route.cluster?;
        Some(Box::new(IstioAlpn(self.object.clone())))
    }
}

struct IstioAlpn(Arc<ApplicationProtocols>);

impl HttpFilter for IstioAlpn {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        _head: &mut http::request::Parts,
    ) -> Action {
        let flags = StateFlags {
            read_only: true,
            shared_with_upstream: xds_client::config::Sharing::None,
        };
        // A read-only object set before stays (Envoy would assert).
        if let Err(e) = cx
            .filter_state
            .set(APPLICATION_PROTOCOLS, self.0.clone(), flags)
        {
            tracing::debug!("istio.alpn: {e}");
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_table_for_routed_requests_only() {
        let list: Arc<[Vec<u8>]> = vec![b"istio-h2".to_vec(), b"h2".to_vec()].into();
        let config = Arc::new(IstioAlpnConfig {
            by_protocol: [None, Some(vec![].into()), Some(list.clone())],
        });
        let f = IstioAlpnFactory::new("alpn".into(), config);
        assert!(f.create(&RouteView::empty()).is_none());
        let route = RouteView {
            cluster: Some("c"),
            ..RouteView::empty()
        };
        let mut i = f.create(&route).expect("instance");
        let mut cx = FilterContext::default();
        let (mut head, _) = http::Request::get("/").body(()).expect("req").into_parts();
        i.on_request_headers(&mut cx, &mut head);
        let got = cx
            .filter_state
            .get_typed::<ApplicationProtocols>(APPLICATION_PROTOCOLS)
            .expect("set");
        assert_eq!(got.resolve(Some(2)), Some(list));
        // HTTP/1.1 has an empty list, HTTP/1.0 none: no override.
        assert_eq!(got.resolve(Some(1)), None);
        assert_eq!(got.resolve(Some(0)), None);
        assert_eq!(got.resolve(None), None);
        assert!(
            cx.filter_state
                .flags(APPLICATION_PROTOCOLS)
                .expect("flags")
                .read_only
        );
        assert_eq!(
            ApplicationProtocols::from_bytes("a,b").resolve(None),
            Some(vec![b"a".to_vec(), b"b".to_vec()].into())
        );
        assert_eq!(ApplicationProtocols::from_bytes("a,,b").resolve(None), None);
    }
}
