//! `envoy.filters.network.set_filter_state`: string objects put into the
//! connection's filter state when it is accepted (`on_new_connection`),
//! from substitution formats over the connection's facts. HTTP filters see
//! them as the connection's filter state (`FilterContext::filter_state_get`,
//! RBAC `filter_state` principals, `%FILTER_STATE%`).
use std::sync::Arc;

use xds_client::config::{Name, SetFilterState};

use super::{ConnectionInfo, NetworkFilterFactory};
use crate::set_filter_state::state_object;
use crate::{format::eval_connection, FilterState, StateFlags};

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

impl NetworkFilterFactory for SetFilterStateFactory {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_state(&self, conn: &ConnectionInfo<'_>, state: &mut FilterState) {
        for v in &self.config.on_request_headers {
            let value = eval_connection(&v.format, conn, state);
            if value.is_empty() && v.skip_if_empty {
                continue;
            }
            let flags = StateFlags {
                read_only: v.read_only,
                shared_with_upstream: v.shared_with_upstream,
            };
            let Some(object) = state_object(value, v) else {
                tracing::debug!(key = %v.key, "set_filter_state: value is not a valid object");
                continue;
            };
            if let Err(e) = state.set(v.key.clone(), object, flags) {
                tracing::debug!("set_filter_state: {e}");
            }
        }
    }
}
