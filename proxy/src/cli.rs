//! Envoy-compatible command line.
use clap::{Parser, ValueEnum};

/// weir: an Envoy-compatible L7 gateway proxy.
#[derive(Debug, Clone, Parser)]
#[command(name = "weir", version = concat!(env!("CARGO_PKG_VERSION"), " (envoy-compatible)"), about)]
pub struct Options {
    /// Path to the bootstrap (YAML or JSON). Without -c and --config-yaml,
    /// weir runs its embedded example gateway config.
    #[arg(short = 'c', long = "config-path")]
    pub config_path: Option<String>,
    /// Bootstrap YAML merged over -c with protobuf merge semantics.
    #[arg(long = "config-yaml")]
    pub config_yaml: Option<String>,
    #[arg(long, value_enum, default_value = "serve")]
    pub mode: Mode,
    /// trace, debug, info, warning/warn, error, critical, off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    pub log_level: String,
    /// component:level,component:level (applies to weir's modules).
    #[arg(long = "component-log-level")]
    pub component_log_level: Option<String>,
    /// Envoy's (spdlog) log line pattern, e.g. `[%Y-%m-%d %T.%e][%t][%l][%n] %v`.
    #[arg(long = "log-format")]
    pub log_format: Option<String>,
    /// Write logs to this file instead of stderr.
    #[arg(long = "log-path")]
    pub log_path: Option<String>,
    /// Data-plane worker threads (default: number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    #[arg(long = "drain-time-s", default_value_t = 600)]
    pub drain_time_s: u64,
    #[arg(long = "drain-strategy", value_enum, default_value = "gradual")]
    pub drain_strategy: DrainStrategy,
    #[arg(long = "parent-shutdown-time-s", default_value_t = 900)]
    pub parent_shutdown_time_s: u64,
    #[arg(long = "local-address-ip-version", value_enum, default_value = "v4")]
    pub local_address_ip_version: IpVersion,
    /// Access log flush interval in milliseconds.
    #[arg(long = "file-flush-interval-msec", default_value_t = 10000)]
    pub file_flush_interval_msec: u64,
    /// Flush an access log buffer once it holds this many KiB.
    #[arg(long = "file-flush-min-size-kb", default_value_t = 64)]
    pub file_flush_min_size_kb: u64,
    /// Hot restart does not exist in weir; accepted.
    #[arg(long = "disable-hot-restart")]
    pub disable_hot_restart: bool,
    #[arg(long = "allow-unknown-static-fields")]
    pub allow_unknown_static_fields: bool,
    /// Accepted; applies to xDS resources once the xDS client lands.
    #[arg(long = "reject-unknown-dynamic-fields")]
    pub reject_unknown_dynamic_fields: bool,
    /// Accepted; applies to xDS resources once the xDS client lands.
    #[arg(long = "ignore-unknown-dynamic-fields")]
    pub ignore_unknown_dynamic_fields: bool,
    #[arg(long = "service-cluster")]
    pub service_cluster: Option<String>,
    #[arg(long = "service-node")]
    pub service_node: Option<String>,
    #[arg(long = "service-zone")]
    pub service_zone: Option<String>,
    /// Hot-restart shared memory id; accepted, unused.
    #[arg(long = "base-id")]
    pub base_id: Option<u64>,
    #[arg(long = "use-dynamic-base-id")]
    pub use_dynamic_base_id: bool,
    #[arg(long = "base-id-path")]
    pub base_id_path: Option<String>,
    #[arg(long = "restart-epoch", default_value_t = 0)]
    pub restart_epoch: u32,
    #[arg(long = "skip-deprecated-logs")]
    pub skip_deprecated_logs: bool,
    #[arg(long = "enable-core-dump")]
    pub enable_core_dump: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Serve,
    Validate,
    #[value(name = "init_only")]
    InitOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DrainStrategy {
    Gradual,
    Immediate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpVersion {
    V4,
    V6,
}

impl Options {
    /// Options for an in-process server in tests.
    pub fn for_test(concurrency: usize) -> Options {
        Options::parse_from([
            "weir",
            "--concurrency",
            &concurrency.to_string(),
            "-l",
            "warning",
            "--drain-strategy",
            "immediate",
            "--drain-time-s",
            "5",
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_pilot_agent_flags() {
        let o = Options::try_parse_from([
            "weir",
            "-c",
            "etc/istio/proxy/envoy-rev.json",
            "--drain-time-s",
            "45",
            "--drain-strategy",
            "immediate",
            "--local-address-ip-version",
            "v4",
            "--file-flush-interval-msec",
            "1000",
            "--disable-hot-restart",
            "--allow-unknown-static-fields",
            "-l",
            "warning",
            "--component-log-level",
            "misc:error",
            "--concurrency",
            "2",
            "--log-format",
            "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t",
            "--service-cluster",
            "c",
            "--service-node",
            "n",
            "--restart-epoch",
            "0",
            "--base-id",
            "1",
            "--use-dynamic-base-id",
            "--skip-deprecated-logs",
            "--enable-core-dump",
            "--parent-shutdown-time-s",
            "60",
            "--file-flush-min-size-kb",
            "32",
            "--reject-unknown-dynamic-fields",
            "--mode",
            "init_only",
        ])
        .expect("pilot-agent flags parse");
        assert_eq!(o.concurrency, Some(2));
        assert_eq!(o.mode, Mode::InitOnly);
        assert_eq!(o.drain_strategy, DrainStrategy::Immediate);
    }
}
