//! weir's configuration side: Envoy protos, bootstrap parsing, the table of
//! supported fields, translation into validated immutable types, and the
//! snapshot store. Nothing here touches sockets on the data path.
#![forbid(unsafe_code)]
// Envoy's deprecated fields are still configuration users write; we read them.
#![allow(deprecated)]

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod descriptors;
pub mod error;
pub mod snapshot;
pub mod support;
pub mod translate;

pub use error::{ConfigErrors, InvalidConfig};

/// Parses and translates a bootstrap in one step.
pub fn load_bootstrap(
    config: Option<&str>,
    config_yaml: Option<&str>,
    opts: bootstrap::ParseOptions,
) -> Result<
    (
        api::envoy::config::bootstrap::v3::Bootstrap,
        config::Snapshot,
    ),
    ConfigErrors,
> {
    let b = bootstrap::parse_and_merge(config, config_yaml, opts)?;
    let s = translate::bootstrap_to_snapshot(&b)?;
    Ok((b, s))
}
