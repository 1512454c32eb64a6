//! `envoy.filters.http.set_filter_state`, validated.
use std::sync::Arc;

use super::Format;

/// `envoy.extensions.filters.http.set_filter_state.v3.Config`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SetFilterState {
    /// `on_request_headers`, in order.
    pub on_request_headers: Vec<FilterStateValue>,
}

/// `envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue`
/// for a string object (`envoy.string` and the string-valued well-known
/// keys weir knows).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterStateValue {
    /// `object_key`.
    pub key: Arc<str>,
    /// `format_string` (request-time operators only; checked at config).
    pub format: Format,
    pub read_only: bool,
    /// `shared_with_upstream` other than NONE.
    pub shared_with_upstream: bool,
    pub skip_if_empty: bool,
    /// A hashable string (`envoy.hashable_string`): `filter_state` hash
    /// policies hash it.
    pub hashable: bool,
    /// An upstream ALPN override (`envoy.network.application_protocols`):
    /// the value split at `,`.
    pub application_protocols: bool,
}
