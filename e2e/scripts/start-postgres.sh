#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL 15 cluster in DATA_DIR on a free loopback port, with
# database memu_test and the vector extension. Prints only the DSN on stdout.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

data=${1:?usage: start-postgres.sh DATA_DIR}
bin=/usr/lib/postgresql/15/bin
mkdir -p "$data"
data=$(cd "$data" && pwd)
# PostgreSQL refuses to run as root: the cluster belongs to the postgres system user.
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
chown postgres "$data" 2>/dev/null || true
chmod 700 "$data"
# The parent directories must be traversable by the postgres user.
p=$(dirname "$data"); while [ "$p" != / ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done

pgdata="$data/pgdata"
port_file="$data/port"
dsn() { echo "postgres://postgres@127.0.0.1:$(cat "$port_file")/memu_test"; }

if [ -f "$pgdata/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1 \
  && "$bin/pg_isready" -q -h 127.0.0.1 -p "$(cat "$port_file")"; then
  log "reusing the running cluster in $pgdata"
  dsn
  exit 0
fi

if [ ! -f "$pgdata/PG_VERSION" ]; then
  log "initdb $pgdata"
  as_pg "$bin/initdb" -D "$pgdata" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
fi
port=$(free_port)
echo "$port" > "$port_file"
log "starting PostgreSQL on 127.0.0.1:$port"
as_pg "$bin/pg_ctl" -D "$pgdata" -l "$data/postgres.log" -w -t 60 start -o "\
  -c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$pgdata \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
  -c max_connections=300 -c shared_buffers=256MB -c maintenance_work_mem=256MB" >/dev/null
psql() { "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'memu_test'" | grep -q 1 \
  || psql -d postgres -c "CREATE DATABASE memu_test" >/dev/null
psql -d memu_test -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
dsn
