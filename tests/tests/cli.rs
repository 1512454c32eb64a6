//! The `weir` binary's command line: `--mode validate`, `--config-yaml`
//! merged over `-c`, `--allow-unknown-static-fields`, `--service-node` /
//! `--service-cluster`, `--version`, `--help`, `--mode init_only`.
//!
//! Build the binary first: `cargo build -p weir`. The tests that serve
//! traffic run Envoy instead with `WEIR_SCENARIO_TARGET=envoy` (the flags
//! are Envoy's); the validate-output tests are weir's own format.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use weir_tests::scenario::{Http, Target};
use weir_tests::tmp::TempDir;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn weir() -> PathBuf {
    if let Some(w) = weir_tests::proc::weir_binary_staleness() {
        eprintln!("warning: {w}");
    }
    weir_tests::proc::weir_binary().expect("weir binary (cargo build -p weir)")
}

/// The binary under test for the serving tests.
fn binary() -> PathBuf {
    if Target::from_env().is_envoy() {
        weir_tests::proc::envoy_binary().expect("envoy")
    } else {
        weir()
    }
}

/// A fresh temporary directory for one test.
fn tmp_dir() -> TempDir {
    TempDir::new("cli").expect("tmp dir")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// Runs a binary to completion (bounded: killed after 20 s).
fn run(bin: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("{} {args:?} did not exit within 20 s", bin.display());
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bootstrap with admin on `admin_port`, one listener with a direct
/// response, one STATIC cluster `a`; `route_extra` / `cluster_extra` add
/// fields to the route action / cluster.
fn bootstrap(admin_port: u16, listen_port: u16, route_extra: &str, cluster_extra: &str) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen_port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: rc
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - match: {{prefix: /direct}}
                direct_response: {{status: 200, body: {{inline_string: direct}}}}
              - match: {{prefix: /}}
                route: {{cluster: a{route_extra}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: a
    connect_timeout: 1s
{cluster_extra}    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}
"#
    )
}

/// A serving process, killed on drop.
struct Running {
    child: Child,
    admin_port: u16,
    dir: PathBuf,
}

impl Running {
    /// Starts `binary() args...` and waits for `/ready` on `admin_port`.
    fn start(args: &[&str], admin_port: u16, dir: &Path) -> Running {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let base_id = ((std::process::id() % 10_000) * 100 + 50 + seq % 50).to_string();
        let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let child = Command::new(binary())
            .args(args)
            .args([
                "--disable-hot-restart",
                "--base-id",
                &base_id,
                "-l",
                "warning",
            ])
            .args(["--concurrency", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn");
        let mut r = Running {
            child,
            admin_port,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = r.child.try_wait().expect("wait") {
                panic!("exited with {status} before ready: {}", r.stderr());
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin_port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                if buf.starts_with(b"HTTP/1.1 200") {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "not ready: {}", r.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    async fn admin(&self, path: &str) -> weir_tests::scenario::Resp {
        Http::h1()
            .get(&format!("http://127.0.0.1:{}{path}", self.admin_port), &[])
            .await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- --mode validate

#[test]
fn validate_good_config_exits_0_and_says_ok() {
    let dir = tmp_dir();
    let cfg = write(&dir, "good.yaml", &bootstrap(9901, 10000, "", ""));
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("good.yaml"), "names the file: {stdout}");
}

#[test]
fn validate_does_not_bind_ports() {
    // A port in use must not matter to validation.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let dir = tmp_dir();
    let cfg = write(&dir, "busy.yaml", &bootstrap(port, port, "", ""));
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

const ROUTE_PATH: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[1].route";

#[test]
fn validate_lists_unknown_and_unimplemented_fields_with_paths() {
    let dir = tmp_dir();
    let cfg = write(
        &dir,
        "bad.yaml",
        &bootstrap(
            9901,
            10000,
            ", bogus_field: 1",
            "    lb_subset_config: {fallback_policy: ANY_ENDPOINT}\n",
        ),
    );
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("invalid configuration"), "{err}");
    assert!(
        err.contains(&format!("{ROUTE_PATH}.bogus_field: unknown field")),
        "{err}"
    );
    assert!(
        err.contains(
            "static_resources.clusters[0].lb_subset_config: subset load balancing (lb_subset_config) is not implemented"
        ),
        "{err}"
    );
}

#[test]
fn validate_reports_a_bad_duration_with_its_path() {
    let dir = tmp_dir();
    let cfg = write(
        &dir,
        "dur.yaml",
        &bootstrap(9901, 10000, ", timeout: 1.5xs", ""),
    );
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{ROUTE_PATH}.timeout")), "{err}");
}

#[test]
fn validate_reports_an_unknown_cluster_reference() {
    let dir = tmp_dir();
    let cfg =
        bootstrap(9901, 10000, "", "").replace("route: {cluster: a}", "route: {cluster: nope}");
    let cfg = write(&dir, "nocluster.yaml", &cfg);
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("unknown cluster \"nope\""), "{err}");
    assert!(err.contains("static_resources.listeners[0]"), "{err}");
}

#[test]
fn validate_lists_every_error_in_one_run() {
    let dir = tmp_dir();
    let cfg = bootstrap(
        9901,
        10000,
        ", bogus_field: 1",
        "    lb_subset_config: {fallback_policy: ANY_ENDPOINT}\n",
    )
    .replace("route: {cluster: a,", "route: {cluster: nope,")
    .replace("connect_timeout: 1s", "connect_timeout: 1.5xs");
    let cfg = write(&dir, "all.yaml", &cfg);
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for needle in [
        format!("{ROUTE_PATH}.bogus_field"),
        "static_resources.clusters[0].connect_timeout".to_owned(),
        "static_resources.clusters[0].lb_subset_config".to_owned(),
        format!("{ROUTE_PATH}.cluster"),
    ] {
        assert!(err.contains(&needle), "missing {needle}:\n{err}");
    }
}

#[test]
fn validate_config_yaml_without_config_path() {
    let good = bootstrap(9901, 10000, "", "");
    let out = run(&weir(), &["--mode", "validate", "--config-yaml", &good]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(
        &weir(),
        &[
            "--mode",
            "validate",
            "--config-yaml",
            "static_resources: {bogus: 1}",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("static_resources.bogus"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn validate_allow_unknown_static_fields() {
    let dir = tmp_dir();
    let cfg = write(
        &dir,
        "unknown.yaml",
        &bootstrap(9901, 10000, ", bogus_field: 1", ""),
    );
    let path = cfg.to_str().expect("utf-8");
    let out = run(&weir(), &["--mode", "validate", "-c", path]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(
        &weir(),
        &[
            "--mode",
            "validate",
            "-c",
            path,
            "--allow-unknown-static-fields",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Unimplemented (known) fields are still errors.
    let cfg = write(
        &dir,
        "unimpl.yaml",
        &bootstrap(
            9901,
            10000,
            "",
            "    lb_subset_config: {fallback_policy: ANY_ENDPOINT}\n",
        ),
    );
    let out = run(
        &weir(),
        &[
            "--mode",
            "validate",
            "-c",
            cfg.to_str().expect("utf-8"),
            "--allow-unknown-static-fields",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
}

// ---------------------------------------------------------------- other flags

#[test]
fn version_and_help_exit_0() {
    let out = run(&weir(), &["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        text(&out.stdout)
    );
    let out = run(&weir(), &["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for flag in [
        "--config-path",
        "--config-yaml",
        "--mode",
        "--concurrency",
        "--service-node",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn init_only_binds_and_exits_0() {
    let dir = tmp_dir();
    let (admin, listen) = (weir_tests::free_port(), weir_tests::free_port());
    let cfg = write(&dir, "init.yaml", &bootstrap(admin, listen, "", ""));
    let bin = binary();
    let out = run(
        &bin,
        &[
            "--mode",
            "init_only",
            "-c",
            cfg.to_str().expect("utf-8"),
            "--disable-hot-restart",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_yaml_is_merged_over_config_path() {
    let dir = tmp_dir();
    let (admin1, admin2, listen) = (
        weir_tests::free_port(),
        weir_tests::free_port(),
        weir_tests::free_port(),
    );
    let cfg = write(&dir, "base.yaml", &bootstrap(admin1, listen, "", ""));
    // Scalars are replaced, repeated fields appended (protobuf merge).
    let overlay = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin2}}}}}}}\nstatic_resources: {{clusters: [{{name: extra, connect_timeout: 2s, load_assignment: {{cluster_name: extra, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 2}}}}}}}}]}}]}}}}]}}\n"
    );
    let p = Running::start(
        &[
            "-c",
            cfg.to_str().expect("utf-8"),
            "--config-yaml",
            &overlay,
        ],
        admin2,
        &dir,
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", admin1)).is_err(),
        "the -c admin port is overridden"
    );
    let r = p.admin("/clusters").await;
    let t = r.text();
    assert!(t.contains("a::127.0.0.1:1::"), "{t}");
    assert!(t.contains("extra::127.0.0.1:2::"), "{t}");
    let r = Http::h1()
        .get(&format!("http://127.0.0.1:{listen}/direct"), &[])
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "direct"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_unknown_static_fields_serves() {
    let dir = tmp_dir();
    let (admin, listen) = (weir_tests::free_port(), weir_tests::free_port());
    let cfg = write(
        &dir,
        "u.yaml",
        &bootstrap(admin, listen, ", bogus_field: 1", ""),
    );
    let p = Running::start(
        &[
            "-c",
            cfg.to_str().expect("utf-8"),
            "--allow-unknown-static-fields",
        ],
        admin,
        &dir,
    );
    let r = Http::h1()
        .get(&format!("http://127.0.0.1:{listen}/direct"), &[])
        .await;
    assert_eq!(r.status, 200);
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_node_and_cluster_in_server_info() {
    let dir = tmp_dir();
    let (admin, listen) = (weir_tests::free_port(), weir_tests::free_port());
    let cfg = write(&dir, "n.yaml", &bootstrap(admin, listen, "", ""));
    let p = Running::start(
        &[
            "-c",
            cfg.to_str().expect("utf-8"),
            "--service-node",
            "node-1",
            "--service-cluster",
            "cluster-1",
        ],
        admin,
        &dir,
    );
    let r = p.admin("/server_info").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["node"]["id"], "node-1", "{v}");
    assert_eq!(v["node"]["cluster"], "cluster-1", "{v}");
    assert_eq!(v["state"], "LIVE");
    assert_eq!(v["command_line_options"]["concurrency"], 1);
}

#[test]
fn unknown_flag_exits_1() {
    let out = run(&binary(), &["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

/// An ambient proxy's bootstrap as istio-agent renders it
/// (istio/istio `pkg/bootstrap/testdata/ambient_golden.json`, trimmed to
/// the parts that matter here): the `metadata_discovery` extension
/// (`istio.workload.BootstrapExtension`, WDS over ADS, as a TypedStruct)
/// and the internal listener extension, delta ADS over the agent's socket.
/// `config_source` is the extension's, spliced in.
fn ambient_bootstrap(config_source: &str) -> String {
    format!(
        r#"{{
  "node": {{"id": "sidecar~10.0.0.1~waypoint-abc.default~default.svc.cluster.local",
            "cluster": "waypoint.default",
            "metadata": {{"NAMESPACE": "default", "CLUSTER_ID": "Kubernetes", "ENABLE_HBONE": true}}}},
  "bootstrap_extensions": [
    {{"name": "metadata_discovery",
      "typed_config": {{"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "type_url": "type.googleapis.com/istio.workload.BootstrapExtension",
                        "value": {{"config_source": {config_source}}}}}}},
    {{"name": "envoy.bootstrap.internal_listener",
      "typed_config": {{"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                        "value": {{"buffer_size_kb": 64}}}}}}
  ],
  "dynamic_resources": {{
    "lds_config": {{"ads": {{}}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}},
    "cds_config": {{"ads": {{}}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}},
    "ads_config": {{"api_type": "DELTA_GRPC", "set_node_on_first_message_only": true,
                    "transport_api_version": "V3",
                    "grpc_services": [{{"envoy_grpc": {{"cluster_name": "xds-grpc"}}}}]}}
  }},
  "static_resources": {{"clusters": [
    {{"name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
      "load_assignment": {{"cluster_name": "xds-grpc", "endpoints": [{{"lb_endpoints": [
        {{"endpoint": {{"address": {{"pipe": {{"path": "./etc/istio/proxy/XDS"}}}}}}}}]}}]}},
      "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}}}}
  ]}}
}}"#
    )
}

#[test]
fn validate_accepts_the_ambient_bootstrap_with_workload_discovery() {
    let dir = tmp_dir();
    let cfg = write(&dir, "ambient.json", &ambient_bootstrap(r#"{"ads": {}}"#));
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK"), "{}", text(&out.stdout));
}

#[test]
fn validate_rejects_workload_discovery_off_ads_with_its_path() {
    let dir = tmp_dir();
    let cfg = write(
        &dir,
        "ambient-path.json",
        &ambient_bootstrap(r#"{"path": "/etc/wds.yaml"}"#),
    );
    let out = run(
        &weir(),
        &["--mode", "validate", "-c", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "bootstrap_extensions[0].typed_config.config_source: only ads is supported for workload discovery"
        ),
        "{err}"
    );
}
