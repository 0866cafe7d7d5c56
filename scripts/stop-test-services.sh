#!/usr/bin/env bash
# Safety net after `swift test`: stops any Postgres or Redis a test started and did not stop (a crashed test
# run). Tests record each server's PID under /tmp/gw-test-services/pids and remove it when they stop it.
DIR=/tmp/gw-test-services/pids
[ -d "$DIR" ] || exit 0
for f in "$DIR"/*; do
  [ -f "$f" ] || continue
  pid=$(basename "$f")
  kill -9 "$pid" 2>/dev/null && echo "stopped leftover test service $pid"
  rm -f "$f"
done
exit 0
