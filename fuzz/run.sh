#!/usr/bin/env bash
# Builds every fuzz target and runs each for a short, bounded time.
#
#   bash fuzz/run.sh                 # all targets, 20 s each
#   FUZZ_SECONDS=300 bash fuzz/run.sh route_match
#
# Runs on the stable toolchain: `-s none` builds without a sanitizer (ASan
# needs nightly's -Zsanitizer), which still gives libFuzzer's coverage
# instrumentation, debug assertions and overflow checks. Exits non-zero when
# any target crashes; the input is left in fuzz/artifacts/<target>/.
set -euo pipefail

cd "$(dirname "$0")"

FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
# Extra wall-clock allowance per target (startup, merge of the seed corpus).
GRACE_SECONDS=120

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "--- installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
    cargo install --locked cargo-fuzz --version "${CARGO_FUZZ_VERSION}"
fi

# xds-client/build.rs runs `cargo metadata --offline` in the main workspace,
# which needs all of that workspace's crates in the local registry.
cargo fetch --locked --quiet --manifest-path ../Cargo.toml

# The fuzz crate has its own lockfile; refuse to run with a stale one (it
# goes stale when xds-client or filters gains a dependency).
if ! cargo fetch --locked --quiet; then
    echo "error: fuzz/Cargo.lock is out of date; run" >&2
    echo "  cargo update --manifest-path fuzz/Cargo.toml --workspace" >&2
    echo "and commit fuzz/Cargo.lock" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
    # Only the named targets: one broken target does not block the others.
    echo "--- building fuzz targets: ${targets[*]}"
    for t in "${targets[@]}"; do
        cargo fuzz build --sanitizer none "${t}"
    done
else
    echo "--- building fuzz targets"
    cargo fuzz build --sanitizer none
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
    echo "--- fuzzing ${t} for ${FUZZ_SECONDS}s"
    mkdir -p "corpus/${t}" "artifacts/${t}"
    args=(
        -max_total_time="${FUZZ_SECONDS}"
        -timeout=10          # one input taking over 10 s is a hang
        -rss_limit_mb=2048
        -print_final_stats=1
    )
    if [ -f "dicts/${t}.dict" ]; then
        args+=(-dict="dicts/${t}.dict")
    fi
    case "${t}" in
        # Structured input: allow room for several virtual hosts and routes
        # from the start instead of growing inputs slowly from a few bytes.
        route_match) args+=(-max_len=2048 -len_control=0) ;;
    esac
    # New inputs go to corpus/<t> (gitignored); seeds/<t> is read-only.
    if timeout "$((FUZZ_SECONDS + GRACE_SECONDS))" \
        cargo fuzz run --sanitizer none "${t}" "corpus/${t}" "seeds/${t}" -- "${args[@]}" \
        2>"artifacts/${t}.log"; then
        grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)' "artifacts/${t}.log" || true
    else
        status=$?
        tail -n 60 "artifacts/${t}.log"
        echo "!!! ${t} failed (exit ${status}); crashing inputs:"
        ls -l "artifacts/${t}/" || true
        failed+=("${t}")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "--- fuzzing found problems in: ${failed[*]}"
    exit 1
fi
echo "--- fuzzing: no crashes in ${targets[*]}"
