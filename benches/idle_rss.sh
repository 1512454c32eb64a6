#!/usr/bin/env bash
# Idle memory of weir on the peer benchmark's bootstrap, with a breakdown.
#
#   bash benches/idle_rss.sh [weir-binary]     # default target/release/weir
#
# The bootstrap is the one `../shared/bench/peers.sh` hands to "our proxy"
# (`$BENCH_ENVOY_CONFIG`, rendered from its envoy.yaml.tmpl): four listeners
# (HTTP/1.1, h2c, TLS with a P-256 certificate and ALPN h2,http/1.1, and
# tcp_proxy), one static cluster to a local nginx origin, admin. It is
# written out below with the same content, so the script runs without the
# harness.
#
# For each concurrency in CONCS (default "default 1"; "default" passes no
# `--concurrency`, i.e. one worker per core as Envoy), weir is started
# fresh, the script waits until every listener and admin accept, then sends
# one request through each listener (HTTP/1.1, h2c, TLS h2 and TLS
# HTTP/1.1, tcp) as peers.sh's sanity check does before it reads
# `rss_idle`, waits SETTLE seconds (default 2) and reports:
#   - VmRSS, RssAnon, RssFile, VmHWM (/proc/PID/status)
#   - /proc/PID/smaps_rollup (Rss, Pss, Anonymous, Private_Dirty, ...)
#   - RSS by kind, summed from /proc/PID/smaps: the binary's text, rodata,
#     relro (relocated at load, so anonymous) and data, [heap] (main arena), other malloc arenas (anonymous 64 MiB
#     aligned heaps of glibc's per-thread arenas), thread stacks
#     (anonymous mappings right after a guard page), other anonymous,
#     shared libraries, [stack]
#   - the largest mappings (TOP, default 12)
#   - the threads (name from /proc/PID/task/*/comm)
# With LOAD=1 it also runs a bounded h2load burst (h1 and h2c, LOAD_REQS
# requests at LOAD_CONNS connections each, every run under `timeout`),
# reports VmRSS/VmHWM right after, and VmRSS again after SETTLE seconds
# (memory should come back close to idle).
#
# Knobs: CONCS, SETTLE, TOP, LOAD, LOAD_REQS (default 200000), LOAD_CONNS
# (default 128), BASE_PORT (default 28800), WEIR_ARGS (extra arguments).
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=benches/lib/origin.sh
. benches/lib/origin.sh
WEIR="$(realpath "${1:-target/release/weir}")"
CONCS="${CONCS:-default 1}"
SETTLE="${SETTLE:-2}"
TOP="${TOP:-12}"
LOAD="${LOAD:-0}"
LOAD_REQS="${LOAD_REQS:-200000}"
LOAD_CONNS="${LOAD_CONNS:-128}"
BASE="${BASE_PORT:-28800}"
P_H1=$BASE P_H2C=$((BASE + 1)) P_TLS=$((BASE + 2)) P_TCP=$((BASE + 3))
P_ADMIN=$((BASE + 9)) P_ORIGIN=$((BASE + 10))

[ -x "$WEIR" ] || { echo "build weir first: cargo build --release -p weir" >&2; exit 1; }
for tool in nginx openssl curl awk; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ "$LOAD" = 1 ] && ! command -v h2load >/dev/null && { echo "missing h2load" >&2; exit 1; }

WORK="$(mktemp -d /tmp/weir-idle-rss.XXXXXX)"
PID= NGINX_PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # wait_port <pid> <port>: up to 20 s
    local i
    for i in $(seq 1 200); do
        port_open "$2" && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# nginx's workers (not root) read the origin's files.
chmod 755 "$WORK"
mkdir -p "$WORK/www" "$WORK/tmp" "$WORK/tls"
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/www/1k"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    > "$WORK/openssl.log" 2>&1

write_origin_nginx_conf "$WORK" "$P_ORIGIN"
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log" &
NGINX_PID=$!
wait_port "$NGINX_PID" "$P_ORIGIN" || { echo "nginx did not start" >&2; exit 1; }

hcm() { # hcm <stat_prefix>: the HCM of peers.sh's envoy.yaml.tmpl
    cat <<EOF
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config:
            name: r
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: origin }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
}
{
    cat <<EOF
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: $P_ADMIN }
static_resources:
  listeners:
  - name: l_h1
    address:
      socket_address: { address: 127.0.0.1, port_value: $P_H1 }
    filter_chains:
    - filters:
EOF
    hcm h1
    cat <<EOF
  - name: l_h2c
    address:
      socket_address: { address: 127.0.0.1, port_value: $P_H2C }
    filter_chains:
    - filters:
EOF
    hcm h2c
    cat <<EOF
  - name: l_tls
    address:
      socket_address: { address: 127.0.0.1, port_value: $P_TLS }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_certificates:
            - certificate_chain: { filename: "$WORK/tls/cert.pem" }
              private_key: { filename: "$WORK/tls/key.pem" }
      filters:
EOF
    hcm tls
    cat <<EOF
  - name: l_tcp
    address:
      socket_address: { address: 127.0.0.1, port_value: $P_TCP }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: origin
  clusters:
  - name: origin
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: origin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: $P_ORIGIN }
EOF
} > "$WORK/weir.yaml"

kib() { awk -v f="$1:" '$1==f{print $2}' "/proc/$PID/status"; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

sanity() { # one request through every listener, as peers.sh before rss_idle
    local out
    for args in "--http1.1 http://127.0.0.1:$P_H1/1k" \
                "--http2-prior-knowledge http://127.0.0.1:$P_H2C/1k" \
                "--http2 -k https://127.0.0.1:$P_TLS/1k" \
                "--http1.1 -k https://127.0.0.1:$P_TLS/1k" \
                "--http1.1 http://127.0.0.1:$P_TCP/1k"; do
        # shellcheck disable=SC2086
        out=$(curl -s -m 5 -o /dev/null -w '%{http_code} %{size_download}' $args) || true
        [ "$out" = "200 1024" ] || { echo "sanity failed: curl $args -> '$out'" >&2; exit 1; }
    done
}

breakdown() { # RSS by kind and the largest mappings, from /proc/PID/smaps
    awk -v bin="$WEIR" -v top="$TOP" '
    # glibc arenas other than the main one are 64 MiB aligned (plain awk:
    # no strtonum, so test the hex digits)
    function aligned64m(h,   l, d) {
        l = length(h)
        if (l < 7 || substr(h, l - 5) != "000000") return 0
        d = index("0123456789abcdef", substr(h, l - 6, 1)) - 1
        return d % 4 == 0
    }
    function flush() {
        if (start == "") return
        kind = "other anonymous"
        if (path == bin || path ~ /\/weir( \(deleted\))?$/) {
            kind = perms ~ /x/ ? "binary text" : (perms ~ /w/ ? "binary data/bss" : (anon > 0 ? "binary relro (relocated)" : "binary rodata"))
        } else if (path == "[heap]") kind = "[heap] (main arena)"
        else if (path == "[stack]") kind = "[stack] (main thread)"
        else if (path ~ /^\[/) kind = path
        else if (path ~ /^\//) kind = "shared libraries/files"
        else if (perms ~ /rw/ && prev_guard && prev_end == start) kind = "thread stacks"
        else if (perms ~ /rw/ && aligned64m(start)) kind = "malloc arenas (threads)"
        by[kind] += rss
        n++; line[n] = sprintf("%8d KiB rss %9d KiB size  %s %s  %s", rss, size, perms, kind, path)
        rs[n] = rss
        prev_guard = (perms == "---p" && size <= 64 && path == "")
        prev_end = end
    }
    /^[0-9a-f]+-[0-9a-f]+ / {
        flush()
        split($1, a, "-"); start = a[1]; end = a[2]
        perms = $2; path = ""
        for (i = 6; i <= NF; i++) path = path (i > 6 ? " " : "") $i
        size = 0; rss = 0; anon = 0
        next
    }
    $1 == "Size:" { size = $2 }
    $1 == "Rss:" { rss = $2 }
    $1 == "Anonymous:" { anon = $2 }
    END {
        flush()
        print "  RSS by kind (KiB):"
        for (k in by) if (by[k] > 0) printf "    %8d  %s\n", by[k], k | "sort -rn"
        close("sort -rn")
        print "  largest mappings:"
        for (i = 1; i <= n; i++) printf "%d\t%s\n", rs[i], line[i] | "sort -rn | head -" top " | cut -f2- | sed \"s/^/    /\""
    }' "/proc/$PID/smaps"
}

report() {
    echo "  VmRSS $(mib "$(kib VmRSS)") MiB  RssAnon $(mib "$(kib RssAnon)") MiB  RssFile $(mib "$(kib RssFile)") MiB  VmHWM $(mib "$(kib VmHWM)") MiB  threads $(kib Threads)"
    echo "  smaps_rollup (KiB):"
    grep -E '^(Rss|Pss|Pss_Anon|Pss_File|Shared_Clean|Private_Clean|Private_Dirty|Anonymous):' "/proc/$PID/smaps_rollup" \
        | awk '{printf "    %-15s %8d\n", $1, $2}'
    breakdown
    echo "  threads: $(cat /proc/"$PID"/task/*/comm | sort | uniq -c | awk '{printf "%s%s x%d", (NR>1?", ":""), $2, $1}')"
}

burst() { # bounded h2load burst on h1 and h2c, then RSS right after and settled
    timeout 120 h2load --h1 -n "$LOAD_REQS" -c "$LOAD_CONNS" "http://127.0.0.1:$P_H1/1k" > "$WORK/h2load-h1.log" 2>&1 || true
    timeout 120 h2load -n "$LOAD_REQS" -c "$LOAD_CONNS" "http://127.0.0.1:$P_H2C/1k" > "$WORK/h2load-h2c.log" 2>&1 || true
    grep -h '^requests:' "$WORK"/h2load-*.log | sed 's/^/  h2load /'
    echo "  after load: VmRSS $(mib "$(kib VmRSS)") MiB  VmHWM $(mib "$(kib VmHWM)") MiB"
    sleep "$SETTLE"
    echo "  after load + ${SETTLE}s: VmRSS $(mib "$(kib VmRSS)") MiB  RssAnon $(mib "$(kib RssAnon)") MiB"
    if [ "${TRIM_PROBE:-0}" = 1 ]; then # how much of it is free heap: /config_dump trims
        curl -s -m 5 -o /dev/null "http://127.0.0.1:$P_ADMIN/config_dump" || true
        echo "  after /config_dump (malloc_trim): VmRSS $(mib "$(kib VmRSS)") MiB  RssAnon $(mib "$(kib RssAnon)") MiB"
    fi
}

echo "weir: $WEIR (built $(date -u -r "$WEIR" +%Y-%m-%dT%H:%MZ))  $(date -u +%Y-%m-%dT%H:%MZ)  cores: $(nproc)"
for c in $CONCS; do
    args=(-c "$WORK/weir.yaml" --log-level warn)
    [ "$c" != default ] && args+=(--concurrency "$c")
    # shellcheck disable=SC2086
    "$WEIR" "${args[@]}" ${WEIR_ARGS:-} > "$WORK/weir.log" 2>&1 &
    PID=$!
    for p in $P_H1 $P_H2C $P_TLS $P_TCP $P_ADMIN; do
        wait_port "$PID" "$p" || { echo "weir did not start:" >&2; cat "$WORK/weir.log" >&2; exit 1; }
    done
    sanity
    sleep "$SETTLE"
    echo "== concurrency $c (pid $PID)"
    report
    [ "$LOAD" = 1 ] && burst
    kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true
    PID=
done
