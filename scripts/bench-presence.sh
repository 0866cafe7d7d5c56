#!/usr/bin/env bash
# The cost of presence: 1,000 users (distinct subs) joining one channel spread over three instances
# (`scripts/cluster.sh`: Postgres, Redis, ports 8081-8083), without and with every one of them watching the
# channel's join/leave events. Prints the servers' CPU for the joins (connection and subscribe included) and
# the presence writes to Redis (count, bytes) and list reads from /metrics.
#   BIN=.build/release/gateway LOADTEST=.build/release/loadtest scripts/bench-presence.sh
set -euo pipefail
BIN=${BIN:?path of the gateway binary}; LOADTEST=${LOADTEST:?path of the loadtest binary}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
if [ "${1:-}" != "--inside" ]; then
  ulimit -n 20000 2>/dev/null || true
  exec env BIN="$BIN" "$(dirname "$0")/cluster.sh" "$0" --inside
fi
PIDS=$(pgrep -f "$(basename "$BIN") serve" | paste -sd, -)
metric() {  # the sum over the three instances
  for p in 8081 8082 8083; do curl -s "http://127.0.0.1:$p/metrics" | awk -v m="$1" 'index($1, m) == 1 {s += $NF} END {print s + 0}'; done | paste -sd+ | bc
}
for mode in distinct-users presence distinct-users presence; do
  bytes=$(metric gateway_presence_write_bytes_total); writes=$(metric gateway_presence_writes_total); reads=$(metric gateway_presence_reads_total)
  events=$(metric gateway_presence_events_total)
  "$LOADTEST" fanout --server http://127.0.0.1:8081 --server http://127.0.0.1:8082 --server http://127.0.0.1:8083 \
    --subscribers "$SUBSCRIBERS" --idle "--$mode" --pids "$PIDS" --channel "presence-$mode-$RANDOM" | grep -v "RESULT target"
  sleep 3
  echo "  redis: $(( $(metric gateway_presence_writes_total) - writes )) presence writes, $(( $(metric gateway_presence_write_bytes_total) - bytes )) bytes; $(( $(metric gateway_presence_reads_total) - reads )) list reads; $(( $(metric gateway_presence_events_total) - events )) join/leave events handed to sessions"
  sleep 5  # the joined users leave (their lists travel) before the next round
done
