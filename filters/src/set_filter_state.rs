//! `envoy.filters.http.set_filter_state`: string objects put into the
//! request's filter state at the request headers, from substitution
//! formats (Envoy's `SetFilterState` HTTP filter).
//!
//! As Envoy's: values are set in order, so a later one can read an earlier
//! one (`%FILTER_STATE(k:PLAIN)%`); `skip_if_empty` leaves the key alone
//! when the value renders empty; a read-only object is never replaced (a
//! later write is skipped). `shared_with_upstream` is recorded on the
//! object for internal upstream connections.
use std::sync::Arc;

use xds_client::config::{Name, SetFilterState};

use crate::{
    format::eval_request, Action, FilterContext, HttpFilter, HttpFilterFactory, RouteView,
    StateFlags, StringValue,
};

#[derive(Debug)]
pub struct SetFilterStateFactory {
    name: Name,
    config: Arc<SetFilterState>,
}

impl SetFilterStateFactory {
    pub fn new(name: Name, config: Arc<SetFilterState>) -> Self {
        SetFilterStateFactory { name, config }
    }
}

impl HttpFilterFactory for SetFilterStateFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, _: &RouteView<'_>) -> Option<Box<dyn HttpFilter>> {
        if self.config.on_request_headers.is_empty() {
            return None;
        }
        Some(Box::new(SetFilterStateFilter(self.config.clone())))
    }
}

struct SetFilterStateFilter(Arc<SetFilterState>);

impl HttpFilter for SetFilterStateFilter {
    fn on_request_headers(
        &mut self,
        cx: &mut FilterContext,
        head: &mut http::request::Parts,
    ) -> Action {
        for v in &self.0.on_request_headers {
            let value = eval_request(&v.format, cx, head);
            if value.is_empty() && v.skip_if_empty {
                continue;
            }
            let flags = StateFlags {
                read_only: v.read_only,
                shared_with_upstream: v.shared_with_upstream,
            };
            // As Envoy: a value its factory cannot make an object of sets
            // nothing.
            let Some(object) = state_object(value, v) else {
                tracing::debug!(key = %v.key, "set_filter_state: value is not a valid object");
                continue;
            };
            // A read-only object stays as it is (Envoy refuses the write).
            if let Err(e) = cx.filter_state.set(v.key.clone(), object, flags) {
                tracing::debug!("set_filter_state: {e}");
            }
        }
        Action::Continue
    }
}

/// The object a value becomes: an upstream ALPN list for
/// `envoy.network.application_protocols`, an address for the address
/// factories (none when the value is not `ip:port`), else a string,
/// hashable when its factory is `envoy.hashable_string`.
pub(crate) fn state_object(
    value: String,
    v: &xds_client::config::FilterStateValue,
) -> Option<Arc<dyn crate::StateObject>> {
    Some(if v.application_protocols {
        Arc::new(crate::ApplicationProtocols::from_bytes(&value))
    } else if v.address {
        Arc::new(crate::AddressObject::parse(&value)?)
    } else if v.hashable {
        Arc::new(crate::HashableStringValue(value))
    } else {
        Arc::new(StringValue(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::config::FilterStateValue;
    use xds_client::translate::parse_format;

    fn value(key: &str, format: &str, read_only: bool, skip: bool) -> FilterStateValue {
        FilterStateValue {
            key: key.into(),
            format: parse_format(format).expect("format"),
            read_only,
            shared_with_upstream: xds_client::config::Sharing::None,
            address: false,
            skip_if_empty: skip,
            hashable: false,
            application_protocols: false,
        }
    }

    #[test]
    fn sets_in_order_skips_empty_and_keeps_read_only() {
        let f = SetFilterStateFactory::new(
            "sfs".into(),
            Arc::new(SetFilterState {
                on_request_headers: vec![
                    value("a", "%REQ(x-a)%", true, false),
                    value("b", "<%FILTER_STATE(a:PLAIN)%>", false, false),
                    value("a", "again", false, false),
                    value("c", "%REQ(x-missing)%", false, true),
                    value("d", "", false, true),
                ],
            }),
        );
        let mut inst = f.create(&RouteView::empty()).expect("instance");
        let (mut head, _) = http::Request::get("/p")
            .header("x-a", "1")
            .body(())
            .expect("request")
            .into_parts();
        let mut cx = FilterContext::default();
        assert!(matches!(
            inst.on_request_headers(&mut cx, &mut head),
            Action::Continue
        ));
        let get = |k: &str| cx.filter_state.get(k).and_then(|v| v.serialize_as_string());
        assert_eq!(get("a").as_deref(), Some("1"));
        assert_eq!(get("b").as_deref(), Some("<1>"));
        // An absent header renders `-` (not empty): set.
        assert_eq!(get("c").as_deref(), Some("-"));
        assert_eq!(get("d"), None);
    }

    #[test]
    fn address_objects_parse_ip_port_and_skip_anything_else() {
        let mut good = value(
            crate::state::ORIGINAL_DST_LOCAL_IP,
            "%REQ(:authority)%",
            false,
            false,
        );
        good.address = true;
        good.shared_with_upstream = xds_client::config::Sharing::Once;
        let mut bad = value(
            crate::state::ORIGINAL_DST_REMOTE_IP,
            "%REQ(x-r)%",
            false,
            false,
        );
        bad.address = true;
        let f = SetFilterStateFactory::new(
            "sfs".into(),
            Arc::new(SetFilterState {
                on_request_headers: vec![good, bad],
            }),
        );
        let mut inst = f.create(&RouteView::empty()).expect("instance");
        let (mut head, _) = http::Request::get("http://[::1]:9080/p")
            .header("x-r", "not-an-address")
            .body(())
            .expect("request")
            .into_parts();
        let mut cx = FilterContext::default();
        inst.on_request_headers(&mut cx, &mut head);
        let local = cx
            .filter_state
            .get_typed::<crate::AddressObject>(crate::state::ORIGINAL_DST_LOCAL_IP)
            .expect("address object");
        assert_eq!(local.0, "[::1]:9080".parse().expect("address"));
        assert_eq!(
            cx.filter_state
                .flags(crate::state::ORIGINAL_DST_LOCAL_IP)
                .map(|f| f.shared_with_upstream),
            Some(xds_client::config::Sharing::Once)
        );
        assert!(cx
            .filter_state
            .get(crate::state::ORIGINAL_DST_REMOTE_IP)
            .is_none());
    }
}
