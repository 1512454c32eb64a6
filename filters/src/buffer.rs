//! `envoy.filters.http.buffer`: the whole request body is read before the
//! router acts (Envoy's `BufferFilter`). The proxy does the reading
//! ([`HttpFilter::buffer_request_body`]): a body over `max_request_bytes`
//! is answered 413 `Payload Too Large`; a buffered request without
//! `content-length` gets one. `BufferPerRoute` disables the filter or sets
//! another limit on a route.
use xds_client::config::{FilterOverride, Name};

use crate::{HttpFilter, HttpFilterFactory, RouteView};

#[derive(Debug)]
pub struct BufferFactory {
    name: Name,
    max: u32,
}

impl BufferFactory {
    pub fn new(name: Name, max: u32) -> Self {
        BufferFactory { name, max }
    }
}

impl HttpFilterFactory for BufferFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        let max = match route.override_for(&self.name) {
            Some(FilterOverride::Buffer(None)) => return None,
            Some(FilterOverride::Buffer(Some(m))) => *m,
            _ => self.max,
        };
        // A request without a body has nothing to buffer.
        if route.request.is_some_and(|h| {
            h.headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v == "0")
        }) {
            return None;
        }
        Some(Box::new(BufferFilter(u64::from(max))))
    }
}

struct BufferFilter(u64);

impl HttpFilter for BufferFilter {
    fn buffer_request_body(&self) -> Option<u64> {
        Some(self.0)
    }
}
