#!/usr/bin/env bash
# User and system CPU per request of each proxy, and the TCP segments per
# request, with ../shared/bench/peers.sh's configurations: the origin
# (nginx) and the load (h2load) on core 0, the proxy alone on core 1, one
# worker. peers.sh reports user+system together; this splits them, and
# alternates the proxies for ROUNDS rounds so that drift on a shared
# machine hits every row alike (medians are printed).
#
# Usage (from the repository root, after `cargo build --release -p weir`):
#   bash benches/cpu_split.sh
# Knobs: PROXIES (default "haproxy nginx weir"; also weir-istio: weir with
# istiod's always-installed filters, and weir:PATH / weir-istio:PATH for
# another binary), SC (h1 or h2c, default h1), C (connections, 16),
# N (requests per run, 200000), ROUNDS (3), PEERS_DIR (../shared/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/bench}
WEIR=${WEIR:-$ROOT/target/release/weir}
N=${N:-200000}; C=${C:-16}; SC=${SC:-h1}; ROUNDS=${ROUNDS:-3}
PROXIES=${PROXIES:-"haproxy nginx weir"}
for b in haproxy nginx h2load nstat taskset openssl; do
    command -v "$b" >/dev/null || { echo "missing: $b" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/weir-cpu-split.XXXXXX)
chmod 711 "$WORK"
mkdir -p "$WORK"/{conf,log,tmp,www,tls,run}
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
head -c 1024 /dev/zero | tr '\0' a >"$WORK/www/1k"
chmod 755 "$WORK/www"; chmod 644 "$WORK/www/1k"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 2 -subj /CN=localhost \
    >/dev/null 2>&1
cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" >"$WORK/tls/combined.pem"
export WORK WORKERS=1 BACKEND_WORKERS=1 BACKEND_H1_PORT=18080 BACKEND_H2C_PORT=18081 \
    BACKEND_TLS_PORT=18082 LOAD_STREAM_MODULE=
render() { # render TEMPLATE OUT, {{NAME}} -> $NAME (as peers.sh)
    local a=() v
    for v in WORK WORKERS BACKEND_WORKERS BACKEND_H1_PORT BACKEND_H2C_PORT BACKEND_TLS_PORT \
             P_H1 P_H2C P_TLS P_TCP P_ADMIN LOAD_STREAM_MODULE; do
        a+=(-e "s|{{$v}}|${!v:-}|g")
    done
    sed "${a[@]}" "$1" >"$2"
}
render "$PEERS_DIR/backend-nginx.conf.tmpl" "$WORK/conf/backend.conf"
P_H1=18100 P_H2C=18101 P_TLS=18102 P_TCP=18103 render "$PEERS_DIR/nginx-proxy.conf.tmpl" "$WORK/conf/nginx-proxy.conf"
: >"$WORK/conf/nginx-proxy-stream.conf"
P_H1=18200 P_H2C=18201 P_TLS=18202 P_TCP=18203 render "$PEERS_DIR/haproxy.cfg.tmpl" "$WORK/conf/haproxy.cfg"
P_H1=18400 P_H2C=18401 P_TLS=18402 P_TCP=18403 P_ADMIN=18409 render "$PEERS_DIR/envoy.yaml.tmpl" "$WORK/conf/weir.yaml"
# istiod's always-installed filters before the router (as filter_cost.sh).
python3 "$ROOT/benches/lib/istio_filters.py" "$WORK/conf/weir.yaml" "$WORK/conf/weir-istio.yaml" all
taskset -c 0 nginx -p "$WORK" -e "$WORK/log/backend-error.log" -c "$WORK/conf/backend.conf" \
    >"$WORK/log/backend.out" 2>&1 &
PIDS+=($!)
sleep 1
ticks() { # user and system clock ticks of PIDs
    local u=0 s=0 p a b
    for p in "$@"; do
        read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat")
        u=$((u + a)); s=$((s + b))
    done
    echo "$u $s"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
HZ=$(getconf CLK_TCK)
RES="$WORK/results.tsv"
for r in $(seq 1 "$ROUNDS"); do
    for px in $PROXIES; do
        case "$px" in
            haproxy) base=18200; cmd=(haproxy -db -f "$WORK/conf/haproxy.cfg") ;;
            nginx) base=18100; cmd=(nginx -p "$WORK" -e "$WORK/log/nginx-error.log" -c "$WORK/conf/nginx-proxy.conf") ;;
            weir*) base=18400
                bin=$WEIR; [[ "$px" == *:* ]] && bin=${px#*:}
                cfg="$WORK/conf/weir.yaml"; [[ "$px" == weir-istio* ]] && cfg="$WORK/conf/weir-istio.yaml"
                cmd=("$bin" -c "$cfg" --concurrency 1 -l error) ;;
            *) echo "unknown proxy $px" >&2; exit 1 ;;
        esac
        port=$base; extra=(--h1)
        [ "$SC" = h2c ] && { port=$((base + 1)); extra=(); }
        taskset -c 1 "${cmd[@]}" >"$WORK/log/proxy.out" 2>&1 &
        P=$!
        for _ in $(seq 1 100); do port_open "$port" && break; sleep 0.1; done
        port_open "$port" || { echo "$px did not start" >&2; tail -5 "$WORK/log/proxy.out" >&2; exit 1; }
        # shellcheck disable=SC2207
        pids=($P $(pgrep -P "$P" || true))
        url="http://127.0.0.1:$port/1k"
        timeout 120 taskset -c 0 h2load -t1 -c "$C" -m1 "${extra[@]}" -n 20000 "$url" >/dev/null 2>&1
        read -r u0 s0 < <(ticks "${pids[@]}")
        nstat -n >/dev/null
        out=$(timeout 600 taskset -c 0 h2load -t1 -c "$C" -m1 "${extra[@]}" -n "$N" "$url" 2>&1)
        segs=$(nstat -z TcpOutSegs | awk '$1=="TcpOutSegs"{print $2}')
        read -r u1 s1 < <(ticks "${pids[@]}")
        ok=$(awk '/^requests:/{gsub(/,/,""); print $8}' <<<"$out")
        [ "$ok" = "$N" ] || { echo "$px: only $ok of $N requests succeeded" >&2; exit 1; }
        awk -v px="$px" -v n="$N" -v hz="$HZ" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v sg="$segs" \
            'BEGIN { printf "%s\t%.2f\t%.2f\t%.2f\t%.2f\n", px, du*1e6/hz/n, ds*1e6/hz/n, (du+ds)*1e6/hz/n, sg/n }' \
            | tee -a "$RES"
        kill "$P" 2>/dev/null || true
        wait "$P" 2>/dev/null || true
        sleep 0.5
    done
done
echo
echo "medians over $ROUNDS rounds ($SC, $C connections, $N requests per run), µs per request:"
python3 - "$RES" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    px, *v = line.split("\t")
    rows[px].append([float(x) for x in v])
print("| proxy | user | system | total | TCP segments sent |")
print("|---|---|---|---|---|")
for px, vs in rows.items():
    med = [statistics.median(c) for c in zip(*vs)]
    print(f"| {px} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} |")
PY
