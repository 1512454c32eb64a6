//! `envoy.filters.http.header_mutation`: header removals and appends on
//! requests and responses, from the filter's config and the route's
//! `HeaderMutationPerRoute`s (Envoy's `HeaderMutation` filter).
//!
//! Order, as Envoy: the filter's own mutations first, then the per-route
//! ones — most specific first (route, virtual host, route configuration),
//! or least specific first with `most_specific_header_mutations_wins` — so
//! that by default the least specific level has the last word. Values are
//! substitution formats; an operator without a value renders empty, and an
//! empty value is not added unless `keep_empty_value`.
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use xds_client::config::{FilterOverride, HeaderMutationConfig, HeaderOp, Mutations, Name};

use crate::{format, Action, FilterContext, HttpFilter, HttpFilterFactory, RouteView};

#[derive(Debug)]
pub struct HeaderMutationFactory {
    name: Name,
    config: Arc<HeaderMutationConfig>,
}

impl HeaderMutationFactory {
    pub fn new(name: Name, config: Arc<HeaderMutationConfig>) -> Self {
        HeaderMutationFactory { name, config }
    }
}

impl HttpFilterFactory for HeaderMutationFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, route: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        // Levels most specific first; absent levels are skipped.
        let mut levels: Vec<Arc<Mutations>> = Vec::new();
        if !self.config.mutations.is_empty() {
            levels.push(self.config.mutations.clone());
        }
        let mut per_route: Vec<Arc<Mutations>> = route
            .per_filter
            .iter()
            .filter_map(
                |l| match l.get(&self.name).and_then(|c| c.config.as_ref()) {
                    Some(FilterOverride::HeaderMutation(m)) if !m.is_empty() => Some(m.clone()),
                    _ => None,
                },
            )
            .collect();
        if self.config.most_specific_wins {
            per_route.reverse();
        }
        levels.extend(per_route);
        if levels.is_empty() {
            return None;
        }
        let keep_request = levels.iter().any(|m| m.response_reads_request());
        Some(Box::new(HeaderMutationFilter {
            levels,
            keep_request,
            request: None,
        }))
    }
}

struct HeaderMutationFilter {
    levels: Vec<Arc<Mutations>>,
    /// A response value reads the request: keep its head.
    keep_request: bool,
    request: Option<http::request::Parts>,
}

/// Applies `ops` in order to `target`'s headers; each value is rendered
/// from the target as it is at that point (Envoy's formatters read the
/// live header map).
pub fn apply<T>(
    ops: &[HeaderOp],
    target: &mut T,
    headers: fn(&mut T) -> &mut HeaderMap,
    value: impl Fn(&xds_client::config::Format, &T) -> String,
) {
    for op in ops {
        match op {
            HeaderOp::Remove(n) => {
                headers(target).remove(n);
            }
            HeaderOp::RemoveOnMatch(m) => {
                let h = headers(target);
                let names: Vec<_> = h
                    .keys()
                    .filter(|k| m.matches(k.as_str()))
                    .cloned()
                    .collect();
                for n in names {
                    h.remove(n);
                }
            }
            HeaderOp::Append(a) => {
                let v = value(&a.value, target);
                if v.is_empty() && !a.keep_empty_value {
                    continue;
                }
                let Ok(v) = HeaderValue::from_str(&v) else {
                    continue;
                };
                a.apply_to(headers(target), v);
            }
        }
    }
}

/// A copy of the request head without its extensions (for response
/// formats that read the request).
fn head_copy(h: &http::request::Parts) -> Option<http::request::Parts> {
    let mut r = http::Request::builder()
        .method(h.method.clone())
        .uri(h.uri.clone())
        .version(h.version)
        .body(())
        .ok()?;
    *r.headers_mut() = h.headers.clone();
    Some(r.into_parts().0)
}

impl HttpFilter for HeaderMutationFilter {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        for m in &self.levels {
            apply(
                &m.request,
                head,
                |h| &mut h.headers,
                |f, h| format::eval(f, cx, Some(h), None, ""),
            );
        }
        if self.keep_request {
            self.request = head_copy(head);
        }
        Action::Continue
    }

    fn on_response_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::response::Parts,
    ) -> Action {
        let req = self.request.as_ref();
        for m in &self.levels {
            apply(
                &m.response,
                head,
                |h| &mut h.headers,
                |f, h| format::eval(f, cx, req, Some(h), ""),
            );
        }
        Action::Continue
    }
}
