#!/usr/bin/env bash
# Stops the cluster started by start-postgres.sh in DATA_DIR (no error if it is not running).
set -euo pipefail
data=${1:?usage: stop-postgres.sh DATA_DIR}
pgdata="$data/pgdata"
[ -f "$pgdata/postmaster.pid" ] || exit 0
if [ "$(id -u)" = 0 ]; then
  runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$pgdata" -m fast -w stop >/dev/null
else
  /usr/lib/postgresql/15/bin/pg_ctl -D "$pgdata" -m fast -w stop >/dev/null
fi
