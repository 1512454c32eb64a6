//! `envoy.filters.http.header_mutation`, validated.
use std::sync::Arc;

use http::HeaderName;

use super::{HeaderAdd, StringMatcher};

/// `envoy.extensions.filters.http.header_mutation.v3.HeaderMutation`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderMutationConfig {
    pub mutations: Arc<Mutations>,
    pub most_specific_wins: bool,
}

/// `Mutations` (the filter's, or a `HeaderMutationPerRoute`'s).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mutations {
    pub request: Vec<HeaderOp>,
    pub response: Vec<HeaderOp>,
}

impl Mutations {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }

    /// Whether a response mutation's format reads the request (the filter
    /// then keeps the request head for the response phase).
    pub fn response_reads_request(&self) -> bool {
        use super::{Command, FormatPart};
        self.response.iter().any(|op| match op {
            HeaderOp::Append(a) => a.value.parts.iter().any(|p| {
                matches!(
                    p,
                    FormatPart::Op(o) if matches!(
                        o.cmd,
                        Command::Req(..) | Command::Method | Command::Path | Command::Protocol
                    )
                )
            }),
            _ => false,
        })
    }
}

/// `envoy.config.common.mutation_rules.v3.HeaderMutation`.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderOp {
    Remove(HeaderName),
    /// `remove_on_match.key_matcher`.
    RemoveOnMatch(StringMatcher),
    Append(HeaderAdd),
}
