# Sourced by benches/hbone.sh and benches/xds_scale.sh (run from the
# repository root, CARGO_TARGET_DIR and COMMIT set).

# release_weir <tag>: sets WEIR_BIN unless it is set: a release build of
# $COMMIT exported with `git archive` (the binary is exactly that commit,
# whatever the working tree holds), copied to /tmp/weir-<tag>-weir-<short>.
release_weir() {
    [ -n "${WEIR_BIN:-}" ] && return 0
    local short src
    short="$(git rev-parse --short "$COMMIT")"
    src="/tmp/weir-$1-src-$short"
    if [ ! -f "$src/Cargo.toml" ]; then
        rm -rf "$src.tmp"
        mkdir -p "$src.tmp"
        git archive "$COMMIT" | tar -x -C "$src.tmp"
        mv "$src.tmp" "$src"
    fi
    (cd "$src" && cargo build --release -p weir)
    WEIR_BIN="/tmp/weir-$1-weir-$short"
    cp "$CARGO_TARGET_DIR/release/weir" "$WEIR_BIN"
}

# envoy_args: appends `--envoy PATH` to the array `args` unless NO_ENVOY=1
# ($ENVOY_BIN, else .tools/envoy-path; without either, weir runs alone).
envoy_args() {
    [ "${NO_ENVOY:-0}" = 1 ] && return 0
    local envoy
    envoy="${ENVOY_BIN:-$(cat .tools/envoy-path 2>/dev/null || true)}"
    if [ -n "$envoy" ] && [ -x "$envoy" ]; then
        args+=(--envoy "$envoy")
    else
        echo "Envoy not found (ENVOY_BIN or .tools/envoy-path); running weir alone" >&2
    fi
}
