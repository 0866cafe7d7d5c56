#!/usr/bin/env bash
# `make conformance`: starts the gateway with /v1/echo enabled (and a message limit that lets the 16 MiB
# cases of 9.* through) on a free port, runs the Autobahn|Testsuite runner kept in ../shared/tools, stops
# the gateway. Extra arguments go to the runner (e.g. '1.*,5.*', or -z for the permessage-deflate cases).
set -euo pipefail
BIN=${BIN:?path of the gateway binary}
RUNNER=${AUTOBAHN:-$(cd "$(dirname "$0")/.." && pwd)/../shared/tools/autobahn.sh}
[ -x "$RUNNER" ] || { echo "conformance: Autobahn runner not found at $RUNNER (set AUTOBAHN=…)" >&2; exit 2; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DATA=$(mktemp -d)
GATEWAY_PORT=$PORT GATEWAY_DATA_DIR=$DATA GATEWAY_ECHO=1 GATEWAY_BODY_LIMIT=$((4 * 1024 * 1024)) \
  GATEWAY_JWT_SECRET=${GATEWAY_JWT_SECRET:-conformance-secret-conformance-secret-0000} GATEWAY_LOG_LEVEL=error "$BIN" serve &
GW=$!
trap 'kill -TERM $GW 2>/dev/null; wait $GW 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
if [ "${1:-}" = "-z" ]; then shift; exec_args=(-z "ws://127.0.0.1:$PORT/v1/echo" "$@"); else exec_args=("ws://127.0.0.1:$PORT/v1/echo" "$@"); fi
"$RUNNER" "${exec_args[@]}"
