#!/usr/bin/env bash
# `make bench` (cluster part): publish→deliver and publish→ack across three instances through Redis, with
# Postgres, at 5,000 WebSocket subscribers over 200 channels and 8 publishers: `loadtest` at each rate of
# CLUSTER_RATES (default "500 1000 2000" msgs/s; target p99 publish→deliver <= 20 ms at 2,000). Prints the
# tester's own figures (latencies, ordering violations, how busy the machine and the tester were: on this
# 2-core machine the tester and Postgres share the cores with the three instances) and the servers' CPU
# per delivery. Then the same workload against Nchan (3 nginx instances, 1 worker each, one Redis; no
# durable store), driven by `loadtest fanout --latency` (its publishers POST over HTTP; send times stamped
# in the bodies), and the gateway / Nchan ratio of the p99s.
# A benchmark, not a test: nothing here asserts a number.
#   BIN, LOADTEST: paths of the release binaries.  CLUSTER_SECONDS: publishing seconds per rate (default 20).
#   CLUSTER_WARMUP: seconds of the same workload at the first rate before the measured ones (default 5; 0: none).
#   CLUSTER_REPEATS: runs per rate and server (default 3): on this box one run's p99 at 2,000 msgs/s moved
#   between 14 and 52 ms with the same binaries (the machine is ~97 % busy), so each run is printed and the
#   ratio is taken between the medians.
#   CLUSTER_THREADS: event loops per instance (GATEWAY_THREADS; default 1: three instances share 2 cores,
#   and more loops than the cores an instance has only add thread switches — p99 at 1,000 msgs/s measured
#   28 ms with 1 loop each, 63 ms with 2).
set -euo pipefail
BIN=${BIN:?gateway binary}; LOADTEST=${LOADTEST:?loadtest binary}
RATES=${CLUSTER_RATES-"500 1000 2000"}
SECONDS_EACH=${CLUSTER_SECONDS:-20}
CLUSTER_WARMUP=${CLUSTER_WARMUP:-5}
REPEATS=${CLUSTER_REPEATS:-3}
[ -n "$RATES" ] || exit 0
[ "$SECONDS_EACH" -ge 5 ] || { echo "CLUSTER_SECONDS: at least 5"; exit 2; }
export GATEWAY_THREADS=${CLUSTER_THREADS:-1} GATEWAY_LOG_LEVEL=${GATEWAY_LOG_LEVEL:-warning}
. "$(dirname "$0")/bench-lib.sh"
bench_scratch gw-bench-cluster
CLUSTER_CPU=$DIR/cpu; CLUSTER_P99=$DIR/p99
export LOADTEST RATES SECONDS_EACH CLUSTER_CPU CLUSTER_P99 CLUSTER_WARMUP REPEATS
# median: the middle value of the numbers on standard input (the lower middle of an even count).
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
echo "== 3 instances (Postgres + Redis, $GATEWAY_THREADS event loop(s) each): 5000 WebSocket subscribers, 200 channels, 8 publishers, ${SECONDS_EACH} s per rate =="
BIN=$BIN "$(dirname "$0")/cluster.sh" bash -c '
  cpu() {  # CPU ms (user + system) of the processes named $@
    local t=0 p
    for n in "$@"; do for p in $(pgrep -x "$n"); do t=$((t + $(awk "{print \$14+\$15}" /proc/$p/stat 2>/dev/null || echo 0))); done; done
    echo $((t * 1000 / $(getconf CLK_TCK)))
  }
  status=0
  : >"$CLUSTER_P99"
  # A fresh cluster first meets its 200 channels (their rows, Redis subscriptions, cold caches): warm it up
  # with the same workload at the first rate for CLUSTER_WARMUP seconds, not counted.
  if [ "$CLUSTER_WARMUP" -gt 0 ]; then
    echo "-- warm-up: ${CLUSTER_WARMUP} s at ${RATES%% *} msgs/s (not counted)"
    "$LOADTEST" $CLUSTER_URLS --subscribers 5000 --transports ws=1 --publishers 8 --rate "${RATES%% *}" --channels 200 \
      --duration "$CLUSTER_WARMUP" --ramp 5 >/dev/null 2>&1 || true
  fi
  for rate in $RATES; do for run in $(seq 1 "$REPEATS"); do
    echo "-- $rate msgs/s (run $run of $REPEATS)"
    # Server CPU over a window inside the publishing (from 2 s after the 5-s ramp to 1 s before the end):
    # each message reaches 25 subscribers (5,000 over 200 channels).
    window=$((SECONDS_EACH - 3))
    ( sleep 7; g0=$(cpu gateway); s0=$(cpu postgres redis-server); sleep "$window"; g1=$(cpu gateway); s1=$(cpu postgres redis-server)
      awk -v g=$((g1 - g0)) -v s=$((s1 - s0)) -v w="$window" -v r="$rate" "BEGIN {
        printf \"   servers CPU while publishing: the 3 instances %.2f cores (%.1f µs per delivery, publishing included), Postgres + Redis %.2f cores\n\",
          g / 1000 / w, g * 1000 / (w * r * 25), s / 1000 / w }" >"$CLUSTER_CPU" ) &
    out=$("$LOADTEST" $CLUSTER_URLS --subscribers 5000 --transports ws=1 --publishers 8 --rate "$rate" --channels 200 \
            --duration "$SECONDS_EACH" --ramp 5 2>&1) || status=1
    wait
    echo "$out" | sed "s/^/  /"
    cat "$CLUSTER_CPU"
    echo "$rate $(echo "$out" | sed -n "s/.*publish → deliver (ms):.* p99 \([0-9.]*\).*/\1/p") $(echo "$out" | sed -n "s/.*publish → ack (ms):.* p99 \([0-9.]*\).*/\1/p")" >>"$CLUSTER_P99"
  done; done
  exit $status' || status=$?

echo "== the same against Nchan: 3 nginx instances (1 worker each), one Redis; 5000 WebSocket subscribers, 200 channels, 8 HTTP publishers =="
start_nchan_redis
start_nchan 3
if [ "$CLUSTER_WARMUP" -gt 0 ]; then
  echo "-- warm-up: ${CLUSTER_WARMUP} s at ${RATES%% *} msgs/s (not counted)"
  "$LOADTEST" fanout --target nchan "${NCHAN_SERVERS[@]}" --pids "$NCHAN_PIDS" --subscribers 5000 --channels 200 --publishers 8 \
    --rate "${RATES%% *}" --duration "$CLUSTER_WARMUP" --latency >/dev/null 2>&1 || true
fi
NCHAN_P99=$DIR/nchan-p99
: >"$NCHAN_P99"
for rate in $RATES; do
  for run in $(seq 1 "$REPEATS"); do
    echo "-- $rate msgs/s (run $run of $REPEATS)"
    out=$("$LOADTEST" fanout --target nchan "${NCHAN_SERVERS[@]}" --pids "$NCHAN_PIDS" --subscribers 5000 --channels 200 --publishers 8 \
            --rate "$rate" --duration "$SECONDS_EACH" --latency 2>&1) || true
    echo "$out" | grep -v '^RESULT' | sed 's/^/  /'
    nd=$(echo "$out" | sed -n 's/.*deliver_p99_ms=\([0-9.]*\).*/\1/p'); na=$(echo "$out" | sed -n 's/.*ack_p99_ms=\([0-9.]*\).*/\1/p')
    [ -n "$nd" ] && echo "$rate $nd ${na:-0}" >>"$NCHAN_P99"
  done
done
echo "== p99 by rate: each run, and the medians' ratio (gateway / Nchan) =="
for rate in $RATES; do
  runs() { awk -v r="$rate" -v c="$2" '$1 == r && $c != "" { printf "%s%s", (n++ ? " " : ""), $c }' "$1"; }
  middle() { awk -v r="$rate" -v c="$2" '$1 == r && $c != "" { print $c }' "$1" | median; }
  gd=$(middle "$CLUSTER_P99" 2); ga=$(middle "$CLUSTER_P99" 3); nd=$(middle "$NCHAN_P99" 2); na=$(middle "$NCHAN_P99" 3)
  echo "   $rate msgs/s publish→deliver p99 (ms): gateway [$(runs "$CLUSTER_P99" 2)], Nchan [$(runs "$NCHAN_P99" 2)]; publish→ack: gateway [$(runs "$CLUSTER_P99" 3)], Nchan [$(runs "$NCHAN_P99" 3)]"
  [ -n "$gd" ] && [ -n "$nd" ] && awk -v gd="$gd" -v ga="${ga:-0}" -v nd="$nd" -v na="${na:-0}" 'BEGIN {
    printf "   medians: publish→deliver gateway %.2f ms, Nchan %.2f ms: ratio %.2f; publish→ack gateway %.2f ms, Nchan %.2f ms\n", gd, nd, (nd > 0 ? gd / nd : 0), ga, na }'
done
stop_nchan
exit ${status:-0}
