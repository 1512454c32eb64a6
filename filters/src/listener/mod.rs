//! Listener filters: pure parsers over the bytes peeked from a new connection.
//!
//! Envoy's listener filters (`envoy.filters.listener.*`) run before a filter
//! chain is chosen. They `MSG_PEEK` the socket, look at what arrived so far,
//! and either ask for more bytes, or decide and let the chain match go on.
//! The modules here hold only that decision logic, as functions from a byte
//! slice to an [`Inspect`] outcome, so they can be unit tested and fuzzed
//! without sockets:
//!
//! - [`tls_inspector`]: `envoy.filters.listener.tls_inspector` (SNI, ALPN).
//! - [`http_inspector`]: `envoy.filters.listener.http_inspector` (http/1.0,
//!   http/1.1, h2c).
//! - [`proxy_protocol`]: `envoy.filters.listener.proxy_protocol` (v1 and v2
//!   headers), plus the encoders the upstream PROXY-protocol transport uses.
//!
//! Contract shared by all three: the caller passes *every* byte peeked so far
//! (not only the new ones) and calls again when more arrive; the functions
//! keep no state, never panic, never recurse, and only allocate for what they
//! return, bounded by the (capped) input length. Once a buffer gives
//! [`Inspect::Done`], every longer buffer with the same prefix gives the same
//! outcome, so the caller may stop peeking at the first `Done`.

pub mod http_inspector;
pub mod proxy_protocol;
pub mod tls_inspector;

/// The outcome of inspecting a peeked prefix of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspect<T> {
    /// The bytes so far are consistent with several outcomes: peek again
    /// once more data has arrived.
    NeedMore,
    /// Decided; more bytes would not change the outcome.
    Done(T),
}

// === impl Inspect ===

impl<T> Inspect<T> {
    /// Whether more bytes are needed.
    pub fn is_need_more(&self) -> bool {
        matches!(self, Inspect::NeedMore)
    }

    /// The decided value, if any.
    pub fn done(self) -> Option<T> {
        match self {
            Inspect::NeedMore => None,
            Inspect::Done(t) => Some(t),
        }
    }

    /// Maps the decided value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Inspect<U> {
        match self {
            Inspect::NeedMore => Inspect::NeedMore,
            Inspect::Done(t) => Inspect::Done(f(t)),
        }
    }
}
