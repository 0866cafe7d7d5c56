#!/usr/bin/env bash
# The `make run` check: starts `make run` as a user would (on a free port, a fresh data folder), waits for
# /readyz, streams a channel with `curl -N` (SSE), publishes one message with curl, checks the stream got it,
# then stops the gateway with SIGTERM and checks that it exited.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
WORK=$(mktemp -d)
LOG="$WORK/run.log"
cleanup() {
  [ -n "${SSE_PID:-}" ] && kill "$SSE_PID" 2>/dev/null || true
  [ -n "${RUN_PID:-}" ] && kill -TERM -- "-$RUN_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# Debug build by default here: `make test` just built it.
setsid make run BUILD_CONFIG="${CHECK_BUILD_CONFIG:-debug}" GATEWAY_PORT="$PORT" GATEWAY_DATA_DIR="$WORK/data" >"$LOG" 2>&1 &
RUN_PID=$!
for _ in $(seq 1 1200); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$RUN_PID" 2>/dev/null || { cat "$LOG"; echo "check-run: make run exited early" >&2; exit 1; }
  sleep 0.5
done
curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null || { cat "$LOG"; echo "check-run: not ready" >&2; exit 1; }
TOKEN=$(sed -n 's/^ Dev token:  //p' "$LOG")
[ -n "$TOKEN" ] || { cat "$LOG"; echo "check-run: no dev token printed" >&2; exit 1; }
curl -sN -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/v1/channels/topic:check/events" >"$WORK/sse.txt" &
SSE_PID=$!
for _ in $(seq 1 100); do grep -q '^id: ' "$WORK/sse.txt" 2>/dev/null && break; sleep 0.1; done
STATUS=$(curl -s -o "$WORK/publish.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
  -d '{"body":{"text":"hello from check-run"}}' "http://127.0.0.1:$PORT/v1/channels/topic:check/messages")
[ "$STATUS" = 201 ] || { cat "$WORK/publish.json"; echo "check-run: publish answered $STATUS" >&2; exit 1; }
for _ in $(seq 1 100); do grep -q 'hello from check-run' "$WORK/sse.txt" && break; sleep 0.1; done
grep -q '^event: message' "$WORK/sse.txt" && grep -q 'hello from check-run' "$WORK/sse.txt" \
  || { cat "$WORK/sse.txt"; echo "check-run: the SSE stream did not get the message" >&2; exit 1; }
kill -TERM -- "-$RUN_PID"
for _ in $(seq 1 100); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$RUN_PID" 2>/dev/null; then echo "check-run: gateway did not stop on SIGTERM" >&2; exit 1; fi
RUN_PID=""
grep -q "gateway drained" "$LOG" || { cat "$LOG"; echo "check-run: no graceful shutdown (no \"gateway drained\" in the log)" >&2; exit 1; }
echo "check-run: make run served, published, streamed and stopped (port $PORT)"
