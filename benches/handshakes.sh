#!/usr/bin/env bash
# Full TLS handshakes per second and proxy CPU per handshake, weir against
# Envoy, with the same bootstrap and certificate (ECDSA P-256 and RSA 2048).
#
#   bash benches/handshakes.sh [weir-binary]
#
# Each proxy runs alone on core 1 with one worker (`--concurrency 1`); wrk
# runs on core 0 with `Connection: close`, so every request is a new TCP
# connection and a TLS 1.3 handshake. wrk keeps its session for the next
# connection (SSL_clear), so the server disables resumption (tickets and the
# session cache) unless RESUME=1: every handshake is then a full one with a
# certificate signature.
# The proxy's CPU time (utime+stime from /proc) over the measured window
# divided by the handshakes done gives CPU us per handshake. Bounded:
# DURATION seconds per cell (default 10), 4 cells per proxy.
set -euo pipefail

cd "$(dirname "$0")/.."
WEIR="${1:-target/release/weir}"
ENVOY="${ENVOY_BIN:-$(cat .tools/envoy-path 2>/dev/null || true)}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-16}"
PROXY_CPU="${PROXY_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
PORT="${PORT:-18643}"
NO_RESUME=true
[ "${RESUME:-0}" = 1 ] && NO_RESUME=false
ADMIN="${ADMIN:-18644}"
WORK="$(mktemp -d /tmp/weir-hs.XXXXXX)"
trap 'rm -rf "$WORK"; [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true' EXIT

for tool in wrk openssl taskset; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$WORK/ecdsa.key" -out "$WORK/ecdsa.pem" -subj "/CN=bench.test" 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
    -keyout "$WORK/rsa.key" -out "$WORK/rsa.pem" -subj "/CN=bench.test" 2>/dev/null

config() { # $1 = ecdsa|rsa
    cat <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $ADMIN}}
static_resources:
  listeners:
  - name: tls
    address: {socket_address: {address: 127.0.0.1, port_value: $PORT}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          disable_stateless_session_resumption: $NO_RESUME
          disable_stateful_session_resumption: $NO_RESUME
          common_tls_context:
            alpn_protocols: [http/1.1]
            tls_certificates:
            - certificate_chain: {filename: "$WORK/$1.pem"}
              private_key: {filename: "$WORK/$1.key"}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: tls
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response: {status: 200, body: {inline_string: "ok"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
EOF
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # $1 = name, $2 = binary, $3 = cert type
    config "$3" > "$WORK/$3.yaml"
    taskset -c "$PROXY_CPU" "$2" -c "$WORK/$3.yaml" --concurrency 1 -l error \
        > "$WORK/$1-$3.log" 2>&1 &
    PID=$!
    for _ in $(seq 50); do
        curl -sk "https://127.0.0.1:$PORT/" >/dev/null 2>&1 && break
        sleep 0.1
    done
    # Warm-up, then the measured window.
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s -H 'Connection: close' \
        "https://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
    local before after hz out reqs
    before=$(cpu_ticks "$PID")
    out=$(taskset -c "$LOAD_CPU" timeout $((DURATION + 20)) wrk -t1 -c"$CONNS" \
        -d"${DURATION}s" -H 'Connection: close' "https://127.0.0.1:$PORT/")
    after=$(cpu_ticks "$PID")
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    hz=$(getconf CLK_TCK)
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    awk -v n="$1" -v c="$3" -v r="$reqs" -v d="$DURATION" -v t=$((after - before)) -v hz="$hz" \
        'BEGIN { cpu = t / hz; printf "| %s | %s | %.0f | %.2f | %.0f | %.0f |\n", n, c, r / d, cpu, (r > 0 ? cpu * 1e6 / r : 0), (cpu > 0 ? r / cpu : 0) }'
}

echo "| proxy | cert | handshakes/s | proxy CPU s | CPU us/handshake | handshakes per CPU-second |"
echo "|---|---|---|---|---|---|"
for cert in ecdsa rsa; do
    run weir "$WEIR" "$cert"
    if [ -n "$ENVOY" ] && [ -x "$ENVOY" ]; then
        run envoy "$ENVOY" "$cert"
    fi
done
