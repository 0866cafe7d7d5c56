#!/usr/bin/env bash
# Throwaway Postgres and Redis on loopback for `make bench` and `make cluster`.
#   scripts/services.sh start DIR    -> starts both, writes DIR/env (DATABASE_URL, REDIS_URL) and DIR/*.pid
#   scripts/services.sh stop DIR     -> stops what DIR/*.pid names, removes DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?folder}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups "$@"; else "$@"; fi; }
case "$cmd" in
start)
  "$(dirname "$0")/ensure-packages.sh" postgresql redis-server
  BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
  PGPORT=$(free_port); RPORT=$(free_port)
  as_pg "$BIN/initdb" -D "$dir/pg" -U postgres -A trust --no-sync -E UTF8 >/dev/null
  PGARGS=(-D "$dir/pg" -p "$PGPORT" -c listen_addresses=127.0.0.1 -c unix_socket_directories="$dir" -c max_connections=300 -c shared_buffers=128MB)
  # Started directly in the background (setpriv execs), so that $! is the server's own PID.
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups "$BIN/postgres" "${PGARGS[@]}" >"$dir/postgres.log" 2>&1 &
  else
    "$BIN/postgres" "${PGARGS[@]}" >"$dir/postgres.log" 2>&1 &
  fi
  echo $! >"$dir/postgres.pid"
  redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$dir/redis.log" 2>&1 &
  echo $! >"$dir/redis.pid"
  for _ in $(seq 1 100); do "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" && break; sleep 0.1; done
  "$BIN/psql" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE gateway" >/dev/null
  printf 'DATABASE_URL=postgres://postgres@127.0.0.1:%s/gateway\nREDIS_URL=redis://127.0.0.1:%s\n' "$PGPORT" "$RPORT" >"$dir/env"
  cat "$dir/env"
  ;;
stop)
  # SIGINT is Postgres's fast shutdown (it does not wait for clients); Redis stops on it too.
  pids=()
  for f in "$dir"/*.pid; do [ -f "$f" ] && pids+=("$(cat "$f")"); done
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
  ;;
esac
