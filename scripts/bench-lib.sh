# What the benchmark scripts share (sourced by bench-fanout.sh and bench-cluster.sh): a scratch folder and the
# processes stopped at exit, free loopback ports, and Nchan — one Redis and N nginx instances (1 worker each)
# sharing it (nginx-light and libnginx-mod-nchan must be installed).
bench_scratch() {  # $1: name prefix; sets DIR (removed at exit) and PIDS (stopped at exit); raises the open-files limit
  DIR=$(mktemp -d "/tmp/$1-XXXXXX")
  PIDS=()
  trap bench_stop EXIT INT TERM
  ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
}
bench_stop() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_nchan_redis() {  # sets R_PORT, R_PID
  R_PORT=$(free_port)
  redis-server --port "$R_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$DIR/redis.log" 2>&1 &
  R_PID=$!; PIDS+=($R_PID)
}

NGINX_MASTERS=()
start_nchan() {  # $1: instances (default 2); sets NCHAN_SERVERS, NCHAN_PIDS (workers and Redis), NGINX_WORKERS
  local count=${1:-2} ports=() i port
  NGINX_MASTERS=()
  for i in $(seq 1 "$count"); do
    port=$(free_port); ports+=("$port"); rm -rf "$DIR/nginx-$i"; mkdir -p "$DIR/nginx-$i"
    cat >"$DIR/nginx-$i/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $DIR/nginx-$i/nginx.pid;
error_log $DIR/nginx-$i/error.log warn;
events { worker_connections 19500; }
http {
  access_log off;
  keepalive_requests 10000000;  # the publishers pipeline thousands of requests on one connection
  client_body_temp_path $DIR/nginx-$i;
  nchan_redis_url "redis://127.0.0.1:$R_PORT";
  server {
    listen 127.0.0.1:$port;
    location ~ /sub/(\w+)$ { nchan_subscriber websocket eventsource longpoll; nchan_channel_id \$1; nchan_use_redis on; }
    location ~ /pub/(\w+)$ { nchan_publisher; nchan_channel_id \$1; nchan_use_redis on; }
  }
}
CONF
    nginx -c "$DIR/nginx-$i/nginx.conf" -p "$DIR/nginx-$i" >"$DIR/nginx-$i/out.log" 2>&1 &
    NGINX_MASTERS+=($!); PIDS+=($!)
  done
  sleep 1
  NCHAN_PIDS="$R_PID"; NGINX_WORKERS=""; NCHAN_SERVERS=()
  for i in $(seq 1 "$count"); do
    local workers; workers=$(pgrep -P "$(cat "$DIR/nginx-$i/nginx.pid")" | paste -sd,)
    NCHAN_PIDS="$NCHAN_PIDS,$workers"; NGINX_WORKERS="${NGINX_WORKERS:+$NGINX_WORKERS,}$workers"
    NCHAN_SERVERS+=(--server "http://127.0.0.1:${ports[$((i - 1))]}")
  done
}
stop_nchan() { for pid in "${NGINX_MASTERS[@]}"; do kill -QUIT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
