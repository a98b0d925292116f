#!/usr/bin/env bash
# Stops the server started by start-redis.sh in DATA_DIR (no error if it is not running).
set -euo pipefail
data=${1:?usage: stop-redis.sh DATA_DIR}
[ -f "$data/redis.pid" ] || exit 0
kill "$(cat "$data/redis.pid")" 2>/dev/null || true
rm -f "$data/redis.pid"
