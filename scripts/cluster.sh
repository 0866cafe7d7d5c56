#!/usr/bin/env bash
# `make cluster`: a throwaway Postgres and Redis on loopback, and three gateway instances on ports
# 8081-8083 sharing them. Prints a dev token; Ctrl-C (or SIGTERM) stops everything it started.
# With arguments (`make loadtest`): runs them once the cluster is up, with CLUSTER_URLS set to the three
# instances' URLs (`--url` flags), then stops the cluster and exits with the command's status.
set -euo pipefail
BIN=${BIN:?path of the gateway binary}
DIR=/tmp/gw-cluster-$$
"$(dirname "$0")/services.sh" start "$DIR" >/dev/null
set -a; . "$DIR/env"; set +a
export GATEWAY_JWT_SECRET=${GATEWAY_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export GATEWAY_CLUSTER_KEY=${GATEWAY_CLUSTER_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
PIDS=()
stop() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$(dirname "$0")/services.sh" stop "$DIR"
}
trap stop EXIT INT TERM
ulimit -n 65536 2>/dev/null || true
# Every client of a local cluster (loadtest included) comes from 127.0.0.1: the per-address cap is off here.
export GATEWAY_MAX_CONNECTIONS_PER_IP=${GATEWAY_MAX_CONNECTIONS_PER_IP:-0}
for i in 1 2 3; do
  GATEWAY_PORT=808$i GATEWAY_INSTANCE_ID=gw-$i "$BIN" serve >"$DIR/gateway-$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:808$i/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
done
if [ $# -gt 0 ]; then
  export CLUSTER_URLS="--url http://127.0.0.1:8081 --url http://127.0.0.1:8082 --url http://127.0.0.1:8083"
  status=0; "$@" || status=$?
  exit $status
fi
cat <<MSG
cluster up: http://127.0.0.1:8081 http://127.0.0.1:8082 http://127.0.0.1:8083
  DATABASE_URL=$DATABASE_URL
  REDIS_URL=$REDIS_URL
  GATEWAY_JWT_SECRET=$GATEWAY_JWT_SECRET
  dev token: $("$BIN" token --sub dev --roles admin --ttl 24h)
  logs: $DIR/gateway-{1,2,3}.log      Ctrl-C stops the cluster
MSG
wait
