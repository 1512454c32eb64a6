#!/usr/bin/env bash
# The cost of the HTTP filters istiod installs in every connection manager,
# measured with ../shared/bench/peers.sh (same run, same machine):
#
#   plain   - the bench bootstrap as is (router only), Envoy and weir;
#   weir-filters - weir with istiod's upstream filters only (below);
#   filters - the same bootstrap with istiod's empty `fault`, `cors` and
#             `grpc_stats` (emit_filter_state, stats_for_all_methods: false)
#             before the router, Envoy and weir; weir also gets Istio's
#             `istio.stats` and peer metadata filters (gateway shape), which
#             upstream Envoy does not have.
#
# Usage (from the repository root, after `cargo build --release -p weir`):
#   ENVOY_BIN=$(cat .tools/envoy-path) bash benches/filter_cost.sh
# Knobs: PEERS_DIR (default ../shared/bench), SCENARIOS (default h1),
# CONNS (default 16), DURATION / WARMUP / ONE_TOOL / NICE as peers.sh;
# ROUNDS=N runs weir alone, router only and with the filters, alternately
# N times and prints the medians (the issue's measure on a noisy machine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/bench}
WEIR=${WEIR:-$ROOT/target/release/weir}
[ -x "$WEIR" ] || { echo "build weir first: cargo build --release -p weir" >&2; exit 1; }
WORK=$(mktemp -d /tmp/weir-filter-cost.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

cp -r "$PEERS_DIR" "$WORK/plain"
cp -r "$PEERS_DIR" "$WORK/filters"
rm -rf "$WORK/plain/results" "$WORK/filters/results"

# Insert istiod's always-installed filters before every router.
python3 "$ROOT/benches/lib/istio_filters.py" "$WORK/filters/envoy.yaml.tmpl" \
    "$WORK/filters/envoy.yaml.tmpl" upstream

# weir additionally runs Istio's own filters (not in upstream Envoy).
cat > "$WORK/istio-weir.sh" <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
out="$BENCH_WORKDIR/ours-istio.yaml"
python3 "$ROOT/benches/lib/istio_filters.py" "$BENCH_ENVOY_CONFIG" "$out" istio
exec "$WEIR" -c "$out" --concurrency "$BENCH_WORKERS"
EOF
chmod +x "$WORK/istio-weir.sh"

export WEIR ROOT
export SCENARIOS=${SCENARIOS:-h1} CONNS=${CONNS:-16}

# ROUNDS=N (N > 1): weir only, router-only and with every istiod filter,
# alternately N times (single runs on a shared VM move by up to a quarter;
# alternating keeps drift out of the comparison), then the medians of CPU
# µs per request per row. Envoy is not run in this mode.
if [ "${ROUNDS:-1}" -gt 1 ]; then
    mkdir -p "$WORK/results"
    export RESULTS_DIR="$WORK/results"
    for r in $(seq 1 "$ROUNDS"); do
        echo "== round $r/$ROUNDS: router only"
        (cd "$WORK/plain" && PROXIES="ours" TAG="plain-$r" \
            OURS_CMD="$WEIR -c \"\$BENCH_ENVOY_CONFIG\" --concurrency \$BENCH_WORKERS" \
            OURS_NAME=weir ./peers.sh) >"$WORK/plain-$r.log" 2>&1
        echo "== round $r/$ROUNDS: with istiod's filters"
        (cd "$WORK/filters" && PROXIES="ours" TAG="istio-$r" OURS_CMD="$WORK/istio-weir.sh" \
            OURS_NAME=weir-istio ./peers.sh) >"$WORK/istio-$r.log" 2>&1
    done
    python3 - "$WORK/results" "$ROUNDS" <<'PY'
import csv, glob, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for kind in ("plain", "istio"):
    for r in range(1, rounds + 1):
        for f in glob.glob(f"{d}/peers-{kind}-{r}.tsv"):
            for row in csv.DictReader(open(f), delimiter="\t"):
                if row["proxy"] in ("direct",) or row["cpu_us/req"] in ("-", ""):
                    continue
                key = (row["scenario"], row["body"], row["conns"], row["tool"])
                rows.setdefault(key, {}).setdefault(kind, []).append(float(row["cpu_us/req"]))
print("| scenario | body | conns | tool | router only (runs) | with filters (runs) | median ratio |")
print("|---|---|---|---|---|---|---|")
for key, v in sorted(rows.items()):
    p, i = v.get("plain", []), v.get("istio", [])
    if not p or not i:
        continue
    mp, mi = statistics.median(p), statistics.median(i)
    fmt = lambda xs: " ".join(f"{x:.1f}" for x in xs)
    print(f"| {' | '.join(key)} | {mp:.1f} ({fmt(p)}) | {mi:.1f} ({fmt(i)}) | {mi / mp - 1:+.1%} |")
PY
    exit 0
fi
echo "== plain (router only)"
(cd "$WORK/plain" && PROXIES="envoy ours" \
    OURS_CMD="$WEIR -c \"\$BENCH_ENVOY_CONFIG\" --concurrency \$BENCH_WORKERS" \
    OURS_NAME=weir ./peers.sh)
echo "== filters: weir with fault, cors, grpc_stats only"
(cd "$WORK/filters" && PROXIES="ours" \
    OURS_CMD="$WEIR -c \"\$BENCH_ENVOY_CONFIG\" --concurrency \$BENCH_WORKERS" \
    OURS_NAME=weir-filters ./peers.sh)
echo "== filters (fault, cors, grpc_stats; weir also istio.stats + peer metadata)"
(cd "$WORK/filters" && PROXIES="envoy ours" OURS_CMD="$WORK/istio-weir.sh" \
    OURS_NAME=weir-istio ./peers.sh)
