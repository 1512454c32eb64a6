//! `envoy.filters.http.router`: the terminal filter. Its factory carries the
//! router config; the forwarding itself (pools, retries, timeouts) lives in
//! the proxy's upstream module, which reads these settings.
use std::sync::Arc;

use xds_client::config::RouterConfig;

/// The router's factory.
#[derive(Debug, Clone)]
pub struct RouterFactory {
    pub name: Arc<str>,
    pub config: RouterConfig,
}

impl RouterFactory {
    pub fn new(name: Arc<str>, config: RouterConfig) -> Self {
        RouterFactory { name, config }
    }

    /// `suppress_envoy_headers`: do not add x-envoy-* response headers
    /// such as x-envoy-upstream-service-time.
    pub fn suppress_envoy_headers(&self) -> bool {
        self.config.suppress_envoy_headers
    }
}
