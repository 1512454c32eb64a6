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
    /// `shared_with_upstream`.
    pub shared_with_upstream: Sharing,
    pub skip_if_empty: bool,
    /// A hashable string (`envoy.hashable_string`): `filter_state` hash
    /// policies hash it.
    pub hashable: bool,
    /// An address (Envoy's `Network::AddressObject` factories: the
    /// `original_dst` keys and `envoy.network.transport_socket.original_dst_address`):
    /// the value parsed as `ip:port`; a value that does not parse sets nothing.
    pub address: bool,
    /// An upstream ALPN override (`envoy.network.application_protocols`):
    /// the value split at `,`.
    pub application_protocols: bool,
}

/// Whether a filter state object follows the request to the upstream
/// connection (`FilterStateValue.SharedWithUpstream`, Envoy's
/// `StreamSharingMayImpactPooling`): over an internal upstream connection
/// the object is copied into the internal listener's connection; `Once`
/// stops there, `Transitive` keeps being shared from there on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sharing {
    #[default]
    None,
    Once,
    Transitive,
}

impl Sharing {
    pub fn is_shared(self) -> bool {
        self != Sharing::None
    }
}
