#!/usr/bin/env bash
# HBONE through the ambient waypoint, weir against Envoy on the same
# bootstrap (tests/src/waypoint.rs, istiod's waypoint shape): single-stream
# throughput (whole waypoint and connect_terminate alone), tunnelled
# requests per second (keep-alive and one request per tunnel), RSS per idle
# tunnel. See benches/README.md ("HBONE and the waypoint (issue 6)") and
# benches/src/bin/hbone_bench.rs for what exactly is measured.
#
#   bash benches/hbone.sh [hbone_bench options...]
#
# e.g. `--runs 3 --mib 1024 --seconds 10 --conns 4 --streams 16
# --requests 40000 --new-tunnels 4000 --tunnels 100,1000` (the defaults),
# `--phases throughput,rps` for a subset.
#
# weir: a release build of COMMIT (default HEAD) exported with `git archive`,
# so the binary is exactly that commit whatever the working tree holds,
# built in CARGO_TARGET_DIR (default /tmp/weir-release). WEIR_BIN=path skips
# the build. Envoy: $ENVOY_BIN, else .tools/envoy-path
# (scripts/install-test-deps.sh); NO_ENVOY=1 runs weir alone.
# The proxy runs on core PROXY_CPU (default 1), the harness (HBONE client,
# the destination's HBONE server, the apps) on HARNESS_CPU (default 0).
# Output goes to stdout and to $OUT (default /tmp/hbone-<time>.txt).
# Not run by CI (only built, as part of the workspace).
set -euo pipefail

cd "$(dirname "$0")/.."
COMMIT="${COMMIT:-HEAD}"
PROXY_CPU="${PROXY_CPU:-1}"
HARNESS_CPU="${HARNESS_CPU:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/weir-release}"
OUT="${OUT:-/tmp/hbone-$(date -u +%Y%m%dT%H%M%SZ).txt}"

short="$(git rev-parse --short "$COMMIT")"
# shellcheck source=benches/lib/harness.sh
. benches/lib/harness.sh
release_weir hbone

# The harness comes from the working tree (this script's own sources).
cargo build --release -p weir-benches --bin hbone_bench
HARNESS="$CARGO_TARGET_DIR/release/hbone_bench"

args=(--weir "$WEIR_BIN")
envoy_args

# 1,000 tunnels are 1,000 connections from the HBONE server to the app and
# 1,000 accepted by it, in the harness.
ulimit -n 8192 2>/dev/null || true

{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# weir: $WEIR_BIN (commit $short)"
    [ -n "${ENVOY:-}" ] && echo "# envoy: $("$ENVOY" --version 2>/dev/null | grep -o 'version: .*')"
    echo "# machine: $(nproc) CPUs, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "# proxy on CPU $PROXY_CPU, harness on CPU $HARNESS_CPU"
    taskset -c "$HARNESS_CPU" timeout 3600 "$HARNESS" "${args[@]}" --proxy-cpu "$PROXY_CPU" "$@"
} 2>&1 | tee "$OUT"
echo "results: $OUT"
