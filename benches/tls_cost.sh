#!/usr/bin/env bash
# Per-request cost of downstream TLS at 16 and 128 connections, in counts
# that a busy machine does not distort: instructions and simulated cache
# misses (callgrind) and syscalls (perf tracepoints), per request.
#
#   bash benches/tls_cost.sh [weir-binary]      # default target/release/weir
#
# weir runs with `--concurrency 1` and three listeners, all answering 1 KiB:
#   tls-direct  TLS 1.3 (ECDSA P-256, ALPN h2,http/1.1), direct_response
#   tls-proxy   the same TLS listener, routed to a local nginx origin (/1k)
#   plain       plaintext, direct_response (the control: no TLS)
# Load is h2load (`--h1`, or h2 with `-m1`), on LOAD_CPU; weir on PROXY_CPU.
#
# Each cell is two windows on the same weir process: h2load -n C (C
# handshakes, one request each) and h2load -n C+REQS. Their difference is
# REQS requests on C established connections, without connection setup and
# teardown; divided by REQS it gives the per-request figures:
#   Ir       instructions (callgrind)
#   D1 miss  L1 data misses, reads + writes (callgrind's simulated cache)
#   LL miss  last-level misses, instruction + data (simulated). The
#            simulated D1 is 48 KiB, 12-way; the simulated last level is
#            SIM_LL (default 1 MiB, 8-way: one core's L2 here), since the
#            32 MiB L3 is shared with whatever else runs on the machine.
#   sys      syscalls (perf raw_syscalls:sys_enter, native run)
#   rd / wr  read-side (read, recvfrom, readv) and write-side (write,
#            writev, sendto, sendmsg) syscalls
#   ep       epoll_wait calls
#   cpu us   utime+stime per request, native run (noisy on a shared box)
#
# Knobs: REQS (default 20000), CONNS (default "16 128"), PROTOS (default
# "h1 h2"), TARGETS (default "tls-direct tls-proxy plain"), CALLGRIND=0 to
# skip the valgrind runs (they take ~30 s per cell), NATIVE=0 to skip the
# perf runs, MEM=0 to skip the memory per connection (MEM_CONNS, default
# 500, connections held open after one request each: `benches/conn_mem.py`),
# TLS13_CIPHERS (h2load --tls13-ciphers: the TLS 1.3 suites it offers, in
# order; default OpenSSL's, AES-256-GCM first), CG_KEEP=dir to keep each callgrind window's profile there (as
# dir/TARGET.PROTO.CONNS.REQUESTS.cg; `benches/cg_diff.py A B REQS` gives
# the per-function difference of two windows, per request), PROXY_CPU / LOAD_CPU (default 1 / 0), BASE_PORT (default 28700).
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=benches/lib/origin.sh
. benches/lib/origin.sh
WEIR="$(realpath "${1:-target/release/weir}")"
REQS="${REQS:-20000}"
CONNS="${CONNS:-16 128}"
PROTOS="${PROTOS:-h1 h2}"
TARGETS="${TARGETS:-tls-direct tls-proxy plain}"
CALLGRIND="${CALLGRIND:-1}"
NATIVE="${NATIVE:-1}"
PROXY_CPU="${PROXY_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
BASE="${BASE_PORT:-28700}"
SIM_LL="${SIM_LL:-1048576,8,64}"
CG_KEEP="${CG_KEEP:-}"
MEM="${MEM:-1}"
TLS13_CIPHERS="${TLS13_CIPHERS:-}"
MEM_CONNS="${MEM_CONNS:-500}"
[ -n "$CG_KEEP" ] && mkdir -p "$CG_KEEP" && CG_KEEP="$(realpath "$CG_KEEP")"
P_DIRECT=$BASE P_PROXY=$((BASE + 1)) P_PLAIN=$((BASE + 2)) P_ADMIN=$((BASE + 3)) P_ORIGIN=$((BASE + 4))

[ -x "$WEIR" ] || { echo "build weir first: cargo build --release -p weir" >&2; exit 1; }
for tool in h2load nginx openssl taskset curl perf; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ "$CALLGRIND" = 1 ] && ! command -v valgrind >/dev/null && { echo "missing valgrind" >&2; exit 1; }

WORK="$(mktemp -d /tmp/weir-tls-cost.XXXXXX)"
PID= NGINX_PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj "/CN=bench.test" 2>/dev/null
# nginx's workers (not root) read the origin's files.
chmod 755 "$WORK"
BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
mkdir -p "$WORK/www" "$WORK/tmp"
printf '%s' "$BODY" > "$WORK/www/1k"

write_origin_nginx_conf "$WORK" "$P_ORIGIN"

tls_chain() {
    cat <<EOF
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_params: {tls_minimum_protocol_version: TLSv1_3}
            tls_certificates:
            - certificate_chain: {filename: "$WORK/cert.pem"}
              private_key: {filename: "$WORK/key.pem"}
EOF
}
hcm() { # $1 = stat prefix, $2 = route action
    cat <<EOF
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                $2
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
EOF
}
DIRECT="direct_response: {status: 200, body: {inline_string: \"$BODY\"}}"
{
    cat <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $P_ADMIN}}
static_resources:
  listeners:
  - name: tls-direct
    address: {socket_address: {address: 127.0.0.1, port_value: $P_DIRECT}}
EOF
    tls_chain
    hcm tls-direct "$DIRECT"
    cat <<EOF
  - name: tls-proxy
    address: {socket_address: {address: 127.0.0.1, port_value: $P_PROXY}}
EOF
    tls_chain
    hcm tls-proxy "route: {cluster: origin}"
    cat <<EOF
  - name: plain
    address: {socket_address: {address: 127.0.0.1, port_value: $P_PLAIN}}
    filter_chains:
EOF
    hcm plain "$DIRECT" | sed '1s/^      filters:/    - filters:/'
    cat <<EOF
  clusters:
  - name: origin
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: origin
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $P_ORIGIN}}}
EOF
} > "$WORK/weir.yaml"

taskset -c "$LOAD_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK" >/dev/null 2>&1 &
NGINX_PID=$!

url() { # $1 = target
    case "$1" in
        tls-direct) echo "https://127.0.0.1:$P_DIRECT/1k" ;;
        tls-proxy) echo "https://127.0.0.1:$P_PROXY/1k" ;;
        plain) echo "http://127.0.0.1:$P_PLAIN/1k" ;;
    esac
}

start_weir() { # $@ = wrapper command (may be empty)
    taskset -c "$PROXY_CPU" "$@" "$WEIR" -c "$WORK/weir.yaml" --concurrency 1 -l error \
        > "$WORK/weir.log" 2>&1 &
    PID=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$P_ADMIN/ready" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "weir did not start:" >&2; cat "$WORK/weir.log" >&2; exit 1
}
stop_weir() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; }

load() { # $1 = target, $2 = proto, $3 = conns, $4 = requests
    local flags=()
    [ "$2" = h1 ] && flags+=(--h1) || flags+=(-m1)
    [ -n "$TLS13_CIPHERS" ] && flags+=("--tls13-ciphers=$TLS13_CIPHERS")
    local out
    out=$(taskset -c "$LOAD_CPU" timeout 600 h2load "${flags[@]}" -c"$3" -n"$4" "$(url "$1")" 2>&1)
    local ok
    ok=$(echo "$out" | awk '/^requests:/ {print $8}')
    if [ "$ok" != "$4" ]; then
        echo "h2load ($1 $2 -c$3): $ok of $4 requests succeeded:" >&2; echo "$out" | tail -8 >&2; exit 1
    fi
}

# Waits (bounded) until the listener has no connection left, so that a
# window includes the closes of its connections.
settle() { # $1 = target
    local stat="http.$1.downstream_cx_active"
    for _ in $(seq 300); do
        v=$(curl -s "http://127.0.0.1:$P_ADMIN/stats?filter=^${stat//./\\.}\$" | awk '{print $2}')
        [ "$v" = 0 ] && return 0
        sleep 0.1
    done
    echo "connections of $1 did not close" >&2; exit 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

EVENTS="raw_syscalls:sys_enter"
for s in read recvfrom readv write writev sendto sendmsg epoll_wait; do
    EVENTS="$EVENTS,syscalls:sys_enter_$s"
done

# One native window: prints "sys rd wr ep ticks".
native_window() { # target proto conns reqs
    perf stat -x, -e "$EVENTS" -p "$PID" -o "$WORK/perf.out" &
    local perf=$!
    sleep 0.3
    local t0; t0=$(cpu_ticks "$PID")
    load "$1" "$2" "$3" "$4"
    settle "$1"
    local t1; t1=$(cpu_ticks "$PID")
    kill -INT "$perf"; wait "$perf" 2>/dev/null || true
    awk -F, -v t=$((t1 - t0)) '
        { n = $1 + 0; e = $3 }
        e == "raw_syscalls:sys_enter" { sys = n }
        e ~ /sys_enter_(read|recvfrom|readv)$/ { rd += n }
        e ~ /sys_enter_(write|writev|sendto|sendmsg)$/ { wr += n }
        e ~ /sys_enter_epoll_wait$/ { ep = n }
        END { print sys + 0, rd + 0, wr + 0, ep + 0, t }' "$WORK/perf.out"
}

# One callgrind window: prints "Ir D1miss LLmiss".
cg_window() { # target proto conns reqs
    callgrind_control -z "$PID" >/dev/null 2>&1
    load "$1" "$2" "$3" "$4"
    settle "$1"
    rm -f "$WORK"/cg.out.*
    callgrind_control -d "$PID" >/dev/null 2>&1
    local f
    for _ in $(seq 100); do
        f=$(ls "$WORK"/cg.out.* 2>/dev/null | grep -v '\.0$' | head -1 || true)
        [ -n "$f" ] && grep -q '^totals:' "$f" && break
        sleep 0.1
    done
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    awk '/^totals:/ { print $2, $6 + $7, $8 + $9 + $10 }' "$f"
    [ -n "$CG_KEEP" ] && cp "$f" "$CG_KEEP/$1.$2.$3.$4.cg"
    return 0
}

declare -A NAT CG MEMB
hz=$(getconf CLK_TCK)
port_of() { case "$1" in tls-direct) echo "$P_DIRECT" ;; tls-proxy) echo "$P_PROXY" ;; plain) echo "$P_PLAIN" ;; esac; }
if [ "$MEM" = 1 ]; then
    for t in $TARGETS; do for p in $PROTOS; do
        # Downstream state only: tls-proxy would add upstream connections.
        [ "$t" = tls-proxy ] && continue
        # A fresh weir per cell: what earlier cells freed stays in the heap.
        start_weir
        tls=1; [ "$t" = plain ] && tls=0
        MEMB[$t.$p]=$(python3 benches/conn_mem.py "$PID" "$(port_of "$t")" "$MEM_CONNS" "$p" "$tls")
        stop_weir
    done; done
fi
if [ "$NATIVE" = 1 ]; then
    start_weir
    for t in $TARGETS; do for p in $PROTOS; do for c in $CONNS; do
        load "$t" "$p" "$c" $((c + REQS)) # warm-up
        settle "$t"
        read -r a_sys a_rd a_wr a_ep a_t < <(native_window "$t" "$p" "$c" "$c")
        read -r b_sys b_rd b_wr b_ep b_t < <(native_window "$t" "$p" "$c" $((c + REQS)))
        NAT[$t.$p.$c]=$(awk -v r="$REQS" -v hz="$hz" \
            -v s=$((b_sys - a_sys)) -v rd=$((b_rd - a_rd)) -v wr=$((b_wr - a_wr)) \
            -v ep=$((b_ep - a_ep)) -v t=$((b_t - a_t)) \
            'BEGIN { printf "%.2f | %.2f | %.2f | %.2f | %.1f", s / r, rd / r, wr / r, ep / r, t / hz * 1e6 / r }')
    done; done; done
    stop_weir
fi
if [ "$CALLGRIND" = 1 ]; then
    start_weir valgrind --tool=callgrind --cache-sim=yes --D1=49152,12,64 --LL="$SIM_LL" \
        --callgrind-out-file="$WORK/cg.out.%p" --dump-instr=no
    for t in $TARGETS; do for p in $PROTOS; do for c in $CONNS; do
        load "$t" "$p" "$c" "$c" # warm-up: first connections, lazy state
        settle "$t"
        read -r a_ir a_d1 a_ll < <(cg_window "$t" "$p" "$c" "$c")
        read -r b_ir b_d1 b_ll < <(cg_window "$t" "$p" "$c" $((c + REQS)))
        CG[$t.$p.$c]=$(awk -v r="$REQS" -v i=$((b_ir - a_ir)) -v d=$((b_d1 - a_d1)) -v l=$((b_ll - a_ll)) \
            'BEGIN { printf "%.0f | %.1f | %.2f", i / r, d / r, l / r }')
    done; done; done
    stop_weir
fi

echo "# weir $("$WEIR" --version 2>/dev/null | head -1); $REQS requests per cell; TLS 1.3 suites offered: ${TLS13_CIPHERS:-OpenSSL default}; $(date -u +%FT%TZ); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| target | proto | conns | Ir/req | D1 miss/req | LL miss/req | sys/req | rd/req | wr/req | epoll/req | cpu us/req |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for t in $TARGETS; do for p in $PROTOS; do for c in $CONNS; do
    cg="${CG[$t.$p.$c]:-- | - | -}"
    nat="${NAT[$t.$p.$c]:-- | - | - | - | -}"
    echo "| $t | $p | $c | $cg | $nat |"
done; done; done
if [ "$MEM" = 1 ]; then
    echo
    echo "Memory per open connection after one request (RssAnon growth over $MEM_CONNS connections):"
    echo "| target | proto | bytes/conn |"
    echo "|---|---|---|"
    for t in $TARGETS; do for p in $PROTOS; do
        [ "$t" = tls-proxy ] && continue
        echo "| $t | $p | ${MEMB[$t.$p]} |"
    done; done
fi
