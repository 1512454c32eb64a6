//! Filter-chain selection with a listener's `filter_chain_matcher` (the
//! xDS matcher API over the connection's metadata) or, without one, the
//! chains' `filter_chain_match` ([`crate::listener::select_chain`]).
//!
//! As Envoy's `findFilterChainUsingMatcher`: no match selects the
//! `default_filter_chain`; a match naming no chain selects nothing (the
//! connection is closed and counted in `no_filter_chain_match`).
use std::borrow::Cow;
use std::sync::Arc;

use xds_client::config::{DataInput, InputData, MatchingData};

use crate::listener::{ChainRuntime, ConnMeta, ListenerRuntime};

/// The chain for a new connection whose listener filters are done.
/// `state` is the connection's filter state at that point (none yet on a
/// TCP listener: network filters run once the chain is chosen).
pub fn select<'a>(
    lr: &'a ListenerRuntime,
    meta: &ConnMeta,
    state: Option<&filters::FilterState>,
) -> Option<&'a Arc<ChainRuntime>> {
    let Some(matcher) = &lr.config.filter_chain_matcher else {
        return crate::listener::select_chain(&lr.chains, meta).or(lr.default_chain.as_ref());
    };
    match matcher.evaluate(&ConnData { meta, state }) {
        Some(action) => action.index.and_then(|i| lr.chains.get(i)),
        None => lr.default_chain.as_ref(),
    }
}

/// The matcher's view of a connection.
struct ConnData<'a> {
    meta: &'a ConnMeta,
    state: Option<&'a filters::FilterState>,
}

impl MatchingData for ConnData<'_> {
    fn get(&self, input: &DataInput) -> InputData<'_> {
        let m = self.meta;
        match input {
            DataInput::DestinationIp => InputData::Ip(m.dst.ip()),
            DataInput::DestinationPort => InputData::Port(m.dst.port()),
            DataInput::SourceIp => InputData::Ip(m.src.ip()),
            DataInput::SourcePort => InputData::Port(m.src.port()),
            DataInput::DirectSourceIp => InputData::Ip(m.direct_src.ip()),
            DataInput::SourceType if crate::listener::is_same_ip_or_loopback(m) => {
                InputData::Str(Cow::Borrowed("local"))
            }
            DataInput::SourceType => InputData::None,
            DataInput::ServerName => match &m.sni {
                Some(s) if !s.is_empty() => InputData::Str(Cow::Borrowed(s)),
                _ => InputData::None,
            },
            DataInput::TransportProtocol => InputData::Str(Cow::Borrowed(m.transport)),
            // Envoy renders the list quoted: `'h2','http/1.1'`.
            DataInput::ApplicationProtocol if m.alpn.is_empty() => InputData::None,
            DataInput::ApplicationProtocol => {
                InputData::Str(Cow::Owned(format!("'{}'", m.alpn.join("','"))))
            }
            DataInput::FilterState(key) => self
                .state
                .and_then(|s| s.get(key))
                .and_then(|v| v.serialize_as_string())
                .map_or(InputData::None, |v| InputData::Str(Cow::Owned(v))),
            // Not accepted for listeners (rejected at translation).
            DataInput::RequestHeader(_)
            | DataInput::UriSan
            | DataInput::DnsSan
            | DataInput::Subject => InputData::None,
        }
    }
}
