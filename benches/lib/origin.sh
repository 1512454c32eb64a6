# Sourced by benches/idle_rss.sh and benches/tls_cost.sh: the nginx origin
# both put behind weir (one worker, keep-alive without limits, static files
# from <work>/www), as peers.sh configures its origin.

# write_origin_nginx_conf <work-dir> <port>: writes <work-dir>/nginx.conf.
write_origin_nginx_conf() {
    cat > "$1/nginx.conf" <<EOF
worker_processes 1;
pid $1/nginx.pid;
error_log $1/nginx-error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path $1/tmp; proxy_temp_path $1/tmp;
    fastcgi_temp_path $1/tmp; uwsgi_temp_path $1/tmp; scgi_temp_path $1/tmp;
    server { listen 127.0.0.1:$2; root $1/www; location / { } }
}
EOF
}
