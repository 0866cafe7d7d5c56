#!/usr/bin/env bash
# `make bench` (fan-out part): one channel, N WebSocket subscribers, 100-byte bodies; the same harness
# (`loadtest fanout`) drives the gateway (embedded, one process) and Nchan (2 nginx instances with 1 worker
# each, one Redis), in the same run. Server CPU comes from /proc (gateway: its process; Nchan: both nginx
# workers and Redis). Prints each run and the ratio gateway / Nchan. A benchmark, not a test.
#   BIN, LOADTEST: paths of the release binaries.  FANOUT_CASES: "subscribers:rate ..." (default below).
#   FANOUT_SECONDS: publishing seconds per case (default 10).
set -euo pipefail
BIN=${BIN:?gateway binary}; LOADTEST=${LOADTEST:?loadtest binary}
CASES=${FANOUT_CASES:-"1000:100 5000:20"}
SECONDS_EACH=${FANOUT_SECONDS:-10}
"$(dirname "$0")/ensure-packages.sh" nginx-light libnginx-mod-nchan redis-server curl
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DIR=$(mktemp -d /tmp/gw-fanout-XXXXXX)
PIDS=()
stop() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap stop EXIT INT TERM
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
export GATEWAY_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

# The gateway: embedded, one process, the caps meant for the Internet off (one client address, one user).
GW_PORT=$(free_port)
GATEWAY_PORT=$GW_PORT GATEWAY_DATA_DIR="$DIR/gw" GATEWAY_LOG_LEVEL=error GATEWAY_MAX_CONNECTIONS_PER_IP=0 \
  GATEWAY_MAX_STREAMS_PER_USER=0 "$BIN" serve >"$DIR/gateway.log" 2>&1 &
GW_PID=$!; PIDS+=($GW_PID)

# Nchan: one Redis, two nginx instances (1 worker each) sharing it.
R_PORT=$(free_port)
redis-server --port "$R_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$DIR/redis.log" 2>&1 &
R_PID=$!; PIDS+=($R_PID)
N_PORTS=()
for i in 1 2; do
  port=$(free_port); N_PORTS+=("$port"); mkdir -p "$DIR/nginx-$i"
  cat >"$DIR/nginx-$i/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $DIR/nginx-$i/nginx.pid;
error_log $DIR/nginx-$i/error.log warn;
events { worker_connections 19000; }
http {
  access_log off;
  client_body_temp_path $DIR/nginx-$i;
  nchan_redis_url "redis://127.0.0.1:$R_PORT";
  server {
    listen 127.0.0.1:$port;
    location ~ /sub/(\w+)$ { nchan_subscriber websocket; nchan_channel_id \$1; nchan_use_redis on; }
    location ~ /pub/(\w+)$ { nchan_publisher; nchan_channel_id \$1; nchan_use_redis on; }
  }
}
CONF
  nginx -c "$DIR/nginx-$i/nginx.conf" -p "$DIR/nginx-$i" >"$DIR/nginx-$i/out.log" 2>&1 &
  PIDS+=($!)
done
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$GW_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
NCHAN_PIDS="$R_PID"
for i in 1 2; do
  master=$(cat "$DIR/nginx-$i/nginx.pid")
  NCHAN_PIDS="$NCHAN_PIDS,$(pgrep -P "$master" | paste -sd,)"
done

echo "== fan-out: one channel, WebSocket subscribers, 100-byte bodies, ${SECONDS_EACH} s each (server CPU from /proc) =="
for case in $CASES; do
  subs=${case%%:*}; rate=${case##*:}
  g=$("$LOADTEST" fanout --target gateway --server "http://127.0.0.1:$GW_PORT" --subscribers "$subs" --rate "$rate" \
        --duration "$SECONDS_EACH" --pids "$GW_PID" 2>&1) || true
  echo "$g" | grep -v '^RESULT' || true
  n=$("$LOADTEST" fanout --target nchan --server "http://127.0.0.1:${N_PORTS[0]}" --server "http://127.0.0.1:${N_PORTS[1]}" \
        --subscribers "$subs" --rate "$rate" --duration "$SECONDS_EACH" --pids "$NCHAN_PIDS" 2>&1) || true
  echo "$n" | grep -v '^RESULT' || true
  gus=$(echo "$g" | sed -n 's/.*cpu_us_per_delivery=\([0-9.]*\).*/\1/p'); nus=$(echo "$n" | sed -n 's/.*cpu_us_per_delivery=\([0-9.]*\).*/\1/p')
  if [ -n "$gus" ] && [ -n "$nus" ]; then
    awk -v g="$gus" -v n="$nus" -v s="$subs" 'BEGIN { printf "   %d subscribers: gateway %.2f µs/delivery, Nchan %.2f µs/delivery: ratio %.2f (target <= 0.5)\n", s, g, n, (n > 0 ? g / n : 0) }'
  fi
  # A load generator near a full core is the limit, not the server.
  for out in "$g" "$n"; do
    share=$(echo "$out" | sed -n 's/.*client_cpu_share=\([0-9.]*\).*/\1/p')
    [ -n "$share" ] && awk -v s="$share" 'BEGIN { if (s > 0.9) print "   note: the load generator used " int(s * 100) "% of a core: it may be the limit" }'
  done
done
