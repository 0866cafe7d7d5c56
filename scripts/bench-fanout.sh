#!/usr/bin/env bash
# `make bench` (fan-out part): one channel, N WebSocket or SSE subscribers, 100-byte bodies; the same
# harness (`loadtest fanout`) drives the gateway (embedded, one process; write delay 0 and, for the trade of
# latency for CPU, GATEWAY_WRITE_DELAY_MS=5) and Nchan (2 nginx instances with 1 worker each, one Redis), in
# the same run. Server CPU comes from /proc (gateway: its process; Nchan: both nginx workers and Redis).
# Prints the resident memory per idle subscribed WebSocket (measured first, on fresh processes), then each
# fan-out run and the ratio gateway / Nchan.
# A benchmark, not a test: nothing here asserts a number.
#   BIN, LOADTEST: paths of the release binaries.
#   FANOUT_CASES: "transport:subscribers:rate ..." (transport ws, sse or poll; default below; empty skips them).  FANOUT_SECONDS: publishing seconds per
#   case (default 10).  FANOUT_IDLE: idle WebSocket connection counts for the memory figures (default
#   "10000 19000"; one client process holds at most ~19,900).  FANOUT_IDLE_SSE: the same for idle SSE streams (default "10000").  BENCH: the bench binary (stores the catch-up
#   backlog); FANOUT_CATCHUP: messages for the catch-up figure (default 100000; 0 skips it).
set -euo pipefail
BIN=${BIN:?gateway binary}; LOADTEST=${LOADTEST:?loadtest binary}; BENCH=${BENCH:-}
CASES=${FANOUT_CASES-"ws:1000:100 ws:5000:20 sse:1000:100 poll:200:20"}
IDLE=${FANOUT_IDLE-"10000 19000"}
IDLE_SSE=${FANOUT_IDLE_SSE-"10000"}
SECONDS_EACH=${FANOUT_SECONDS:-10}
"$(dirname "$0")/ensure-packages.sh" nginx-light libnginx-mod-nchan redis-server curl
. "$(dirname "$0")/bench-lib.sh"
bench_scratch gw-fanout
export GATEWAY_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

start_gateway() {  # $1: write delay in ms, $2: data folder (default: a new one); sets GW_PORT, GW_PID
  GW_PORT=$(free_port)
  GATEWAY_PORT=$GW_PORT GATEWAY_DATA_DIR="${2:-$(mktemp -d "$DIR/gw-XXXXXX")}" GATEWAY_LOG_LEVEL=error GATEWAY_MAX_CONNECTIONS_PER_IP=0 \
    GATEWAY_MAX_STREAMS_PER_USER=0 GATEWAY_WRITE_DELAY_MS=$1 "$BIN" serve >"$DIR/gateway-$1.log" 2>&1 &
  GW_PID=$!; PIDS+=($GW_PID)
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$GW_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
}

# Nchan: one Redis, two nginx instances (1 worker each) sharing it.
start_nchan_redis

field() { echo "$1" | sed -n "s/.*$2=\([0-9.]*\).*/\1/p"; }
run() {  # prints the human line, returns the RESULT line in $OUT
  OUT=$("$LOADTEST" fanout "$@" 2>&1) || true
  echo "$OUT" | grep -v '^RESULT' | sed 's/^/  /' || true
  share=$(field "$OUT" client_cpu_share)
  [ -n "$share" ] && awk -v s="$share" 'BEGIN { if (s > 0.9) print "   note: the load generator used " int(s * 100) "% of a core: it may be the limit" }'
  return 0
}

echo "== resident memory per idle subscribed WebSocket, then per idle SSE stream (fresh server processes for each count) =="
for n in $IDLE; do
  start_gateway 0
  run --target gateway --server "http://127.0.0.1:$GW_PORT" --pids "$GW_PID" --subscribers "$n" --idle; gi=$(field "$OUT" rss_bytes_per_connection)
  kill -TERM "$GW_PID"; wait "$GW_PID" 2>/dev/null || true
  start_nchan
  run --target nchan "${NCHAN_SERVERS[@]}" --pids "$NGINX_WORKERS" --subscribers "$n" --idle; ni=$(field "$OUT" rss_bytes_per_connection)
  stop_nchan
  [ -n "$gi" ] && [ -n "$ni" ] && awk -v g="$gi" -v n="$ni" -v c="$n" 'BEGIN {
    printf "   %d connections: gateway %d bytes, Nchan (nginx workers) %d bytes per connection: ratio %.2f (target: gateway <= 6000)\n", c, g, n, (n > 0 ? g / n : 0) }'
done

# The same for idle SSE streams (no target; the issue asks for the figure).
for n in $IDLE_SSE; do
  start_gateway 0
  run --target gateway --server "http://127.0.0.1:$GW_PORT" --pids "$GW_PID" --transport sse --subscribers "$n" --idle; gi=$(field "$OUT" rss_bytes_per_connection)
  kill -TERM "$GW_PID"; wait "$GW_PID" 2>/dev/null || true
  start_nchan
  run --target nchan "${NCHAN_SERVERS[@]}" --pids "$NGINX_WORKERS" --transport sse --subscribers "$n" --idle; ni=$(field "$OUT" rss_bytes_per_connection)
  stop_nchan
  [ -n "$gi" ] && [ -n "$ni" ] && awk -v g="$gi" -v n="$ni" -v c="$n" 'BEGIN {
    printf "   %d SSE streams: gateway %d bytes, Nchan (nginx workers) %d bytes per stream: ratio %.2f\n", c, g, n, (n > 0 ? g / n : 0) }'
done

# The fan-out runs: gateways (embedded, one process each, the caps meant for the Internet off: one client
# address, one user) with write delay 0 and 5 ms, and Nchan.
start_gateway 0; GW0_PORT=$GW_PORT; GW0_PID=$GW_PID
start_gateway 5; GW5_PORT=$GW_PORT; GW5_PID=$GW_PID
start_nchan

echo "== fan-out: one channel, 100-byte bodies, ${SECONDS_EACH} s each; server CPU from /proc =="
for case in $CASES; do
  IFS=: read -r kind subs rate <<<"$case"
  common=(--transport "$kind" --subscribers "$subs" --rate "$rate" --duration "$SECONDS_EACH")
  run --target gateway --server "http://127.0.0.1:$GW0_PORT" --pids "$GW0_PID" "${common[@]}"; g0=$(field "$OUT" cpu_us_per_delivery); gk=$(field "$OUT" sys_us_per_delivery)
  run --target gateway --server "http://127.0.0.1:$GW5_PORT" --pids "$GW5_PID" "${common[@]}"; g5=$(field "$OUT" cpu_us_per_delivery)
  run --target nchan "${NCHAN_SERVERS[@]}" --pids "$NCHAN_PIDS" "${common[@]}"; n=$(field "$OUT" cpu_us_per_delivery); nk=$(field "$OUT" sys_us_per_delivery)
  if [ -n "$g0" ] && [ -n "$n" ]; then
    awk -v g="$g0" -v g5="${g5:-0}" -v n="$n" -v s="$subs" -v k="$kind" 'BEGIN {
      printf "   %s, %d subscribers: gateway %.2f µs/delivery (write delay 5 ms: %.2f), Nchan %.2f: ratio %.2f (%.2f with the delay; target <= 0.5)\n",
        k, s, g, g5, n, (n > 0 ? g / n : 0), (n > 0 ? g5 / n : 0) }'
    # Where the time goes: the kernel's part (the writes, and on loopback the receiving side's TCP they run)
    # is what one write per delivery costs whatever the server does in user space.
    [ -n "$gk" ] && [ -n "$nk" ] && awk -v g="$g0" -v gk="$gk" -v n="$n" -v nk="$nk" 'BEGIN {
      printf "     in the kernel: gateway %.2f of its %.2f µs, Nchan %.2f of its %.2f; the gateway'"'"'s kernel part alone is %.2f of Nchan'"'"'s whole\n",
        gk, g, nk, n, (n > 0 ? gk / n : 0) }'
  fi
done

CATCHUP=${FANOUT_CATCHUP:-100000}
if [ -n "$BENCH" ] && [ "$CATCHUP" -gt 0 ]; then
  echo "== catch-up: $CATCHUP stored messages (SQLite) to one WebSocket client =="
  CU_DIR=$(mktemp -d "$DIR/cu-XXXXXX")
  BENCH_FILL_DIR=$CU_DIR BENCH_FILL_COUNT=$CATCHUP BENCH_FILL_CHANNEL=topic:catchup "$BENCH" | sed 's/^/  /'
  start_gateway 0 "$CU_DIR"
  TOKEN=$("$BIN" token --sub bench --roles service)
  # The channel's start: "0." and the hash part of any of its cursors.
  ZERO=$(curl -fs -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW_PORT/v1/channels/topic:catchup/messages?limit=1" \
           | sed -n 's/.*"cursor":"[0-9]*\.\([0-9a-f]*\)".*/0.\1/p' | head -1)
  run --target gateway --server "http://127.0.0.1:$GW_PORT" --pids "$GW_PID" --channel catchup --since "$ZERO" --count "$CATCHUP"
  c=$(field "$OUT" catch_up_per_s)
  [ -n "$c" ] && awk -v c="$c" 'BEGIN { printf "   %d msgs/s (target >= 200000)\n", c }'
fi
