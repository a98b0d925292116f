#!/usr/bin/env bash
# Starts a throwaway redis-server in DATA_DIR on a free loopback port, no persistence; prints the
# URL on stdout. Reuses a server of that directory that is still running.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
data=${1:?usage: start-redis.sh DATA_DIR}
mkdir -p "$data"
data=$(cd "$data" && pwd)
if [ -f "$data/port" ] && redis-cli -p "$(cat "$data/port")" ping >/dev/null 2>&1; then
  echo "redis://127.0.0.1:$(cat "$data/port")/0"
  exit 0
fi
port=$(free_port)
echo "$port" > "$data/port"
redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --dir "$data" \
  --pidfile "$data/redis.pid" --logfile "$data/redis.log" --save "" --appendonly no >/dev/null
for _ in $(seq 1 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null
log "redis-server on 127.0.0.1:$port"
echo "redis://127.0.0.1:$port/0"
