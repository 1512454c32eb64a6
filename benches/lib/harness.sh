# Sourced by benches/hbone.sh and benches/xds_scale.sh (run from the
# repository root, CARGO_TARGET_DIR and COMMIT set).

# release_weir <tag>: sets WEIR_BIN unless it is set: a release build of
# $COMMIT exported with `git archive` (the binary is exactly that commit,
# whatever the working tree holds), copied to weir-<tag>-<short>. The
# export and the copy stay in $CARGO_TARGET_DIR/commits (a cache next to
# the build they belong to: a later run of the same commit rebuilds
# nothing), not as loose entries in /tmp.
release_weir() {
    [ -n "${WEIR_BIN:-}" ] && return 0
    local short src
    short="$(git rev-parse --short "$COMMIT")"
    mkdir -p "$CARGO_TARGET_DIR/commits"
    src="$CARGO_TARGET_DIR/commits/$1-src-$short"
    if [ ! -f "$src/Cargo.toml" ]; then
        rm -rf "$src.tmp"
        mkdir -p "$src.tmp"
        git archive "$COMMIT" | tar -x -C "$src.tmp"
        mv "$src.tmp" "$src"
    fi
    (cd "$src" && cargo build --release -p weir)
    WEIR_BIN="$CARGO_TARGET_DIR/commits/weir-$1-$short"
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
