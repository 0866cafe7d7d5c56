#!/usr/bin/env bash
# Starts the embedded gateway for `make run`: keeps a development HS256 secret in the data folder (so tokens
# survive a restart), prints the URL, a dev token and how to mint more, then runs in the foreground.
set -euo pipefail
BIN=${BIN:?path of the gateway binary}
DATA=${GATEWAY_DATA_DIR:-./data}
mkdir -p "$DATA"
if [ -z "${GATEWAY_JWT_SECRET:-}" ]; then
  if [ ! -s "$DATA/dev-secret" ]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DATA/dev-secret"
    chmod 600 "$DATA/dev-secret"
  fi
  GATEWAY_JWT_SECRET=$(cat "$DATA/dev-secret")
  export GATEWAY_JWT_SECRET
fi
URL="http://${GATEWAY_HOST:-127.0.0.1}:${GATEWAY_PORT:-8080}"
# The demo page (and its token endpoint) is on in `make run` unless GATEWAY_DEMO=0.
export GATEWAY_DEMO=${GATEWAY_DEMO:-1}
# Logs for people here (the binary writes JSON lines by default, for log pipelines).
export GATEWAY_LOG_FORMAT=${GATEWAY_LOG_FORMAT:-text}
TOKEN=$("$BIN" token --sub dev --roles admin --ttl 24h)
cat <<MSG
----------------------------------------------------------------------
 Realtime gateway (embedded: SQLite in $DATA, in-process fan-out)
 URL:        $URL
 Demo page:  $URL/   (browser client: $URL/client.js; GATEWAY_DEMO=0 turns the demo off)
 Dev token:  $TOKEN
 More tokens: GATEWAY_JWT_SECRET=\$(cat $DATA/dev-secret) $BIN token --sub alice --roles service --ttl 1h
 Try:
   curl -N -H "Authorization: Bearer $TOKEN" $URL/v1/channels/topic:demo/events
   curl -X POST -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" -d '{"body":{"text":"hello"}}' $URL/v1/channels/topic:demo/messages
----------------------------------------------------------------------
MSG
exec "$BIN" serve
