#!/usr/bin/env bash
# Checks docker/nginx.conf without a Docker engine: three real instances (scripts/cluster.sh: Postgres, Redis,
# ports 8081-8083) behind that very file (upstreams rewritten to loopback, on a free port), then WebSocket and
# SSE fan-out through it (loadtest fanout: every delivery must arrive) and a publish answered through it.
#   BIN=.build/release/gateway LOADTEST=.build/release/loadtest scripts/check-lb.sh
set -euo pipefail
BIN=${BIN:?path of the gateway binary}; LOADTEST=${LOADTEST:?path of the loadtest binary}
if [ "${1:-}" != "--inside" ]; then
  "$(dirname "$0")/ensure-packages.sh" nginx-light curl
  exec env BIN="$BIN" LOADTEST="$LOADTEST" "$(dirname "$0")/cluster.sh" "$0" --inside
fi
DIR=$(mktemp -d /tmp/gw-lb-XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/gateway-\([123]\):8080/127.0.0.1:808\1/" -e "s/listen 8080;/listen 127.0.0.1:$PORT;/" "$(dirname "$0")/../docker/nginx.conf" >"$DIR/nginx.conf"
nginx -t -p "$DIR" -c "$DIR/nginx.conf" -g "pid $DIR/nginx.pid; error_log $DIR/error.log;" 2>&1 | tail -1
nginx -p "$DIR" -c "$DIR/nginx.conf" -g "daemon off; pid $DIR/nginx.pid; error_log $DIR/error.log;" &
NGINX=$!
trap 'kill $NGINX 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$("$BIN" token --sub lb --roles service --ttl 10m)
curl -fsS -o /dev/null -w "publish through the balancer: HTTP %{http_code}\n" -X POST -H "Authorization: Bearer $TOKEN" \
  -H "Content-Type: application/json" -d '{"body":{"via":"lb"}}' "http://127.0.0.1:$PORT/v1/channels/topic:lb/messages"
for transport in ws sse; do
  "$LOADTEST" fanout --server "http://127.0.0.1:$PORT" --transport "$transport" --subscribers 60 --rate 20 --duration 3 | grep -v RESULT
done
echo "check-lb: docker/nginx.conf passed WebSocket and SSE fan-out and a publish to three instances"
