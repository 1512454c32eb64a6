#!/usr/bin/env bash
# xDS at scale, weir against Envoy from the same in-process control plane:
# time to apply a snapshot of 5,000 EDS clusters (50,000 endpoints) and a
# 500-virtual-host x 10-route RDS table, RSS afterwards, and the latency of
# a one-cluster EDS update. See benches/README.md ("xDS scale") and
# benches/src/bin/xds_scale.rs for what exactly is timed.
#
#   bash benches/xds_scale.sh [xds_scale options...]
#
# e.g. `--runs 3 --eds-updates 20 --apis delta,sotw --late-rss 35`
# (those are the defaults here, apart from --late-rss).
#
# weir: a release build of COMMIT (default HEAD) exported with `git archive`,
# so the binary is exactly that commit whatever the working tree holds,
# built in CARGO_TARGET_DIR=/tmp/weir-release. WEIR_BIN=path skips the build.
# Envoy: $ENVOY_BIN, else .tools/envoy-path (scripts/install-test-deps.sh);
# NO_ENVOY=1 runs weir alone.
# The proxy runs on core PROXY_CPU (default 1), the harness (control plane,
# probes) on HARNESS_CPU (default 0). Output goes to stdout and to
# $OUT (default /tmp/xds-scale-<time>.txt).
set -euo pipefail

cd "$(dirname "$0")/.."
COMMIT="${COMMIT:-HEAD}"
PROXY_CPU="${PROXY_CPU:-1}"
HARNESS_CPU="${HARNESS_CPU:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/weir-release}"
OUT="${OUT:-/tmp/xds-scale-$(date -u +%Y%m%dT%H%M%SZ).txt}"

short="$(git rev-parse --short "$COMMIT")"
# shellcheck source=benches/lib/harness.sh
. benches/lib/harness.sh
release_weir xds-scale

# The harness comes from the working tree (this script's own sources).
cargo build --release -p weir-benches --bin xds_scale
HARNESS="$CARGO_TARGET_DIR/release/xds_scale"

args=(--weir "$WEIR_BIN")
envoy_args

{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# weir: $WEIR_BIN (commit $short)"
    [ -n "${ENVOY:-}" ] && echo "# envoy: $("$ENVOY" --version 2>/dev/null | grep -o 'version: .*')"
    echo "# machine: $(nproc) CPUs, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "# proxy on CPU $PROXY_CPU, harness on CPU $HARNESS_CPU"
    taskset -c "$HARNESS_CPU" timeout 3600 "$HARNESS" "${args[@]}" --proxy-cpu "$PROXY_CPU" "$@"
} 2>&1 | tee "$OUT"
echo "results: $OUT"
