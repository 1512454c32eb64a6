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
pub mod xds;

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
    // Collect as many errors as possible: parse problems (unknown fields,
    // bad values) and translation problems of what did parse.
    let (mut base, mut errs) = match config {
        Some(t) => bootstrap::parse_bootstrap_collect(t, opts),
        None => (Some(Default::default()), ConfigErrors::default()),
    };
    if let Some(t) = config_yaml {
        let (over, mut e) = bootstrap::parse_bootstrap_collect(t, opts);
        for err in &mut e.0 {
            err.path = error::join("--config-yaml", &err.path);
        }
        errs.extend(e);
        match (&mut base, over) {
            (Some(b), Some(o)) => {
                use prost::Message;
                if let Err(e) = b.merge(o.encode_to_vec().as_slice()) {
                    errs.push("--config-yaml", e.to_string());
                }
            }
            _ => base = None,
        }
    }
    let Some(b) = base else { return Err(errs) };
    match translate::bootstrap_to_snapshot(&b) {
        Ok(s) if errs.is_empty() => Ok((b, s)),
        Ok(_) => Err(errs),
        Err(e) => {
            errs.extend(e);
            errs.dedup();
            Err(errs)
        }
    }
}
