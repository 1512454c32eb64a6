#!/usr/bin/env bash
# User-space instructions per HTTP request, counted by callgrind: a
# noise-free figure for weir's CPU per request (wall-clock benchmarks on a
# shared machine are not).
#
# weir runs under `valgrind --tool=callgrind` with one worker, in front of a
# local nginx origin serving 1 KiB (the peers.sh shape: listener -> HCM ->
# router -> cluster `origin`, HTTP/1.1 upstream). Instrumentation is off
# while weir loads its config and during a short warm-up; it is switched on
# (`callgrind_control -i on`) for exactly N requests from h2load, then the
# counters are dumped (`callgrind_control -d`) before weir is stopped, so
# start-up and shutdown are not counted. Ir / N is the figure.
#
# Cases (CASES, default all four):
#   h1        h2load --h1 -c16 -n N, router only
#   h2c       h2load -c16 -m1 -n N (h2c prior knowledge), router only
#   h1-istio  as h1, with the filters istiod always installs before the
#             router: grpc_stats (emit_filter_state), fault, cors (all
#             empty), Istio's peer metadata (istio_headers) and istio.stats
#   h2c-istio as h2c, same filters
#   haproxy-h1, haproxy-h2c, nginx-h1, nginx-h2c: the peers of
#             ../shared/bench/peers.sh in front of the same origin, one
#             thread/worker, configured as peers.sh configures them (not in
#             the default CASES)
#
# Usage (from the repository root, after `cargo build --release -p weir`):
#   bash benches/callgrind.sh                 # prints a table
#   N=20000 CASES="h1 h2c" KEEP=1 bash benches/callgrind.sh
# KEEP=1 keeps the work dir with the callgrind.out files; then
#   callgrind_annotate --inclusive=yes <dir>/h1/callgrind.out.*.1 | head -60
# shows where the instructions go.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WEIR=${WEIR:-$ROOT/target/release/weir}
N=${N:-20000}
WARM=${WARM:-500}
CONNS=${CONNS:-16}
CASES=${CASES:-h1 h2c h1-istio h2c-istio}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
for b in "$WEIR" valgrind callgrind_control h2load "$NGINX_BIN"; do
    command -v "$b" >/dev/null || { echo "missing: $b" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/weir-callgrind.XXXXXX)
chmod 711 "$WORK"
mkdir -p "$WORK"/{www,log,tmp}
head -c 1024 /dev/zero | tr '\0' 'a' >"$WORK/www/1k"
chmod 755 "$WORK/www"
chmod 644 "$WORK/www/1k"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # wait_port PORT (at most 120 s: weir starts slowly under valgrind)
    for _ in $(seq 1 1200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

ORIGIN=$(free_port)
cat >"$WORK/origin.conf" <<EOF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/log/origin-error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile off;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    etag off;
    client_body_temp_path $WORK/tmp/b;
    proxy_temp_path $WORK/tmp/p;
    fastcgi_temp_path $WORK/tmp/f;
    uwsgi_temp_path $WORK/tmp/u;
    scgi_temp_path $WORK/tmp/s;
    server { listen 127.0.0.1:$ORIGIN; root $WORK/www; location / { } }
}
EOF
"$NGINX_BIN" -p "$WORK" -e "$WORK/log/origin-error.log" -c "$WORK/origin.conf" \
    >"$WORK/log/origin.out" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN" || { echo "origin did not start" >&2; cat "$WORK/log/"* >&2; exit 1; }

bootstrap() { # bootstrap PORT ISTIO(0|1)
    local filters=""
    if [ "$2" = 1 ]; then
        local ts=type.googleapis.com/udpa.type.v1.TypedStruct
        filters="
      - name: envoy.filters.http.grpc_stats
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
          emit_filter_state: true
          stats_for_all_methods: false
      - name: envoy.filters.http.fault
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
      - name: envoy.filters.http.cors
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
      - name: istio.metadata_exchange
        typed_config:
          \"@type\": $ts
          type_url: type.googleapis.com/io.istio.http.peer_metadata.Config
          value: {upstream_discovery: [{istio_headers: {}}], upstream_propagation: [{istio_headers: {}}]}
      - name: istio.stats
        typed_config:
          \"@type\": $ts
          type_url: type.googleapis.com/stats.PluginConfig
          value: {disable_host_header_fallback: true, reporter: SERVER_GATEWAY}"
    fi
    cat <<EOF
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: $1 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: r
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: origin }
          http_filters:$(printf '%s' "$filters" | sed 's/^/    /')
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: origin
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: origin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: { socket_address: { address: 127.0.0.1, port_value: $ORIGIN } }
EOF
}

# The peers under the same count, configured as ../shared/bench/peers.sh
# configures them (one worker or thread, keep-alive upstream connections).
haproxy_cfg() { # haproxy_cfg PORT H2(0|1)
    local proto=""
    [ "$2" = 1 ] && proto=" proto h2"
    cat <<EOF
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:$1$proto
    default_backend be
backend be
    server origin 127.0.0.1:$ORIGIN
EOF
}

nginx_cfg() { # nginx_cfg PORT H2(0|1) DIR
    local h2=""
    [ "$2" = 1 ] && h2=" http2"
    cat <<EOF
worker_processes 1;
master_process off;
pid $3/nginx.pid;
error_log $3/nginx-error.log warn;
daemon off;
events { worker_connections 16384; multi_accept on; }
http {
    access_log off;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    http2_max_concurrent_streams 1024;
    client_body_temp_path $3/b;
    proxy_temp_path $3/p;
    fastcgi_temp_path $3/f;
    uwsgi_temp_path $3/u;
    scgi_temp_path $3/s;
    upstream backend {
        server 127.0.0.1:$ORIGIN;
        keepalive 512;
        keepalive_requests 100000000;
        keepalive_timeout 120s;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffer_size 16k;
    proxy_buffers 16 16k;
    server {
        listen 127.0.0.1:$1$h2 backlog=4096;
        location / { proxy_pass http://backend; }
    }
}
EOF
}

run_case() { # run_case NAME -> prints "Ir requests Ir/req"
    local name=$1 istio=0 h2=0 dir port pid peer=""
    case "$name" in
        h1) ;; h2c) h2=1 ;; h1-istio) istio=1 ;; h2c-istio) h2=1; istio=1 ;;
        haproxy-h1|nginx-h1) peer=${name%-*} ;;
        haproxy-h2c|nginx-h2c) peer=${name%-*}; h2=1 ;;
        *) echo "unknown case $name" >&2; return 1 ;;
    esac
    dir="$WORK/$name"
    mkdir -p "$dir"
    port=$(free_port)
    local cmd
    case "$peer" in
        haproxy)
            command -v haproxy >/dev/null || { echo "$name: haproxy not installed" >&2; return 1; }
            haproxy_cfg "$port" "$h2" >"$dir/haproxy.cfg"
            cmd=(haproxy -db -f "$dir/haproxy.cfg") ;;
        nginx)
            nginx_cfg "$port" "$h2" "$dir" >"$dir/nginx.conf"
            cmd=("$NGINX_BIN" -p "$dir" -e "$dir/nginx-error.log" -c "$dir/nginx.conf") ;;
        *)
            bootstrap "$port" "$istio" >"$dir/weir.yaml"
            "$WEIR" --mode validate -c "$dir/weir.yaml" >"$dir/validate.log" 2>&1 \
                || { echo "$name: bootstrap rejected" >&2; cat "$dir/validate.log" >&2; return 1; }
            cmd=("$WEIR" -c "$dir/weir.yaml" --concurrency 1 -l error) ;;
    esac
    (cd "$dir" && exec valgrind --tool=callgrind --trace-children=no --instr-atstart=no \
        --callgrind-out-file="$dir/callgrind.out.%p" "${cmd[@]}") >"$dir/weir.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$port" || { echo "$name: weir did not start" >&2; cat "$dir/weir.log" >&2; return 1; }
    local load=(h2load -t 1 -c "$CONNS" -m 1)
    [ "$h2" = 1 ] || load+=(--h1)
    local url="http://127.0.0.1:$port/1k"
    timeout 300 "${load[@]}" -n "$WARM" "$url" >"$dir/warm.out" 2>&1
    callgrind_control -i on "$pid" >/dev/null 2>&1
    timeout 900 "${load[@]}" -n "$N" "$url" >"$dir/load.out" 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local ok
    ok=$(awk '/^requests:/{gsub(/,/,""); print $8}' "$dir/load.out")
    [ "$ok" = "$N" ] || { echo "$name: only $ok of $N requests succeeded" >&2; cat "$dir/load.out" >&2; return 1; }
    local out ir
    out=$(ls "$dir"/callgrind.out.*.1 | head -1)
    ir=$(awk '/^(summary|totals):/{print $2; exit}' "$out")
    printf '%s\t%s\t%s\t%d\n' "$name" "$ir" "$N" $((ir / N))
}

printf 'case\tIr\trequests\tIr/request\n'
for c in $CASES; do run_case "$c"; done
