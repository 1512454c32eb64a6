//! weir's data plane: listeners, the HTTP connection manager, the router,
//! upstream pools, admin, stats and access logs.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod alloc;
pub mod app;
pub mod body;
pub mod chain_match;
pub mod cli;
pub mod http;
pub mod internal;
pub mod io;
pub mod listener;
pub mod logging;
pub mod manager;
pub mod metrics;
pub mod mx;
pub mod netif;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod tunnel;
pub mod upstream;
pub mod xds;

pub use app::{Server, Shared};

/// The embedded default config (`examples/gateway.yaml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/gateway.yaml");

/// This thread's stats shard (pools are per worker too).
pub fn stats_shard() -> usize {
    stats::current_shard()
}

/// Loads the bootstrap named by the options (or the embedded default).
pub fn load_config(
    o: &cli::Options,
) -> Result<
    (
        xds_client::api::envoy::config::bootstrap::v3::Bootstrap,
        xds_client::config::Snapshot,
    ),
    String,
> {
    let file = match &o.config_path {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"))?),
        None if o.config_yaml.is_none() => Some(DEFAULT_CONFIG.to_owned()),
        None => None,
    };
    let opts = xds_client::bootstrap::ParseOptions {
        allow_unknown_fields: o.allow_unknown_static_fields,
    };
    let (mut b, mut s) =
        xds_client::load_bootstrap(file.as_deref(), o.config_yaml.as_deref(), opts)
            .map_err(|e| e.to_string())?;
    // CLI overrides of the node identity (as Envoy).
    if let Some(n) = &o.service_node {
        s.node.id = n.clone();
        b.node.get_or_insert_with(Default::default).id = n.clone();
    }
    if let Some(c) = &o.service_cluster {
        s.node.cluster = c.clone();
        b.node.get_or_insert_with(Default::default).cluster = c.clone();
    }
    if let Some(z) = &o.service_zone {
        s.node.zone = z.clone();
        b.node
            .get_or_insert_with(Default::default)
            .locality
            .get_or_insert_with(Default::default)
            .zone = z.clone();
    }
    Ok((b, s))
}

/// `application_log_config.log_format.text_format` of the bootstrap
/// (`--config-yaml` over `-c`), looked up before logging starts. Errors are
/// left to the full parse.
pub fn bootstrap_log_format(o: &cli::Options) -> Option<String> {
    let find = |text: &str| -> Option<String> {
        let v = xds_client::bootstrap::text_to_json(text).ok()?;
        let get = |v: &serde_json::Value, a: &str, b: &str| v.get(a).or_else(|| v.get(b)).cloned();
        let alc = get(&v, "application_log_config", "applicationLogConfig")?;
        let lf = get(&alc, "log_format", "logFormat")?;
        get(&lf, "text_format", "textFormat")?
            .as_str()
            .map(str::to_owned)
    };
    let from_yaml = o.config_yaml.as_deref().and_then(find);
    from_yaml.or_else(|| {
        let text = std::fs::read_to_string(o.config_path.as_ref()?).ok()?;
        find(&text)
    })
}
