//! Copies the Envoy `FileDescriptorSet` that the `envoy-types` crate ships
//! (`src/generated/types.bin`) into `OUT_DIR`, so the bootstrap parser can
//! build a `prost-reflect` descriptor pool for Envoy's JSON/YAML mapping
//! without a system `protoc`.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(&manifest_dir)
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata json");
    let pkg = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types is a dependency");
    let manifest = PathBuf::from(pkg["manifest_path"].as_str().expect("manifest_path"));
    let bin = manifest
        .parent()
        .expect("crate dir")
        .join("src/generated/types.bin");
    println!("cargo:rerun-if-changed=build.rs");
    fs::copy(&bin, out.join("envoy_descriptors.bin"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", bin.display()));
}
