#!/usr/bin/env bash
# Installs PostgreSQL 15 from Debian and builds pgvector >= 0.8 from Debian trixie's source
# package (iterative index scans need 0.8). Idempotent: a second run does nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
CONTROL=/usr/share/postgresql/15/extension/vector.control
CACHE=${MEMU_CACHE:-$HOME/.cache/memu}

pgvector_ok() {
  [ -f "$CONTROL" ] || return 1
  local v
  v=$(awk -F"'" '/default_version/ { print $2 }' "$CONTROL")
  [ "$(printf '%s\n0.8.0\n' "$v" | sort -V | head -1)" = "0.8.0" ]
}

if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -f /usr/include/postgresql/15/server/postgres.h ]; then
  apt_update_once
  log "installing postgresql-15, postgresql-server-dev-15"
  # The package's own cluster is not used: tests start throwaway clusters.
  mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql-15 postgresql-server-dev-15 postgresql-client-15 build-essential dpkg-dev >&2
fi

if pgvector_ok; then
  log "pgvector $(awk -F"'" '/default_version/ { print $2 }' "$CONTROL") already installed"
  exit 0
fi

# A deb-src entry for trixie with this machine's own mirror, pinned low so that nothing is ever
# installed from trixie: only its source package is fetched.
uris=$(debian_mirror_uris)
[ -n "${uris// /}" ] || { log "cannot find this machine's Debian mirror in /etc/apt"; exit 1; }
src=/etc/apt/sources.list.d/memu-trixie-src.sources
if [ ! -f "$src" ]; then
  log "adding deb-src trixie (mirror taken from the machine's apt config)"
  cat > "$src" <<SRC
Types: deb-src
URIs: ${uris% }
Suites: trixie
Components: main
Signed-By: $(debian_keyring)
SRC
  cat > /etc/apt/preferences.d/memu-trixie-low <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 50
PIN
  rm -f "$apt_updated_marker"
fi
apt_update_once
command -v dpkg-source >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >&2

work="$CACHE/pgvector-src"
mkdir -p "$work"
cd "$work"
dir=$(find . -maxdepth 1 -type d -name 'pgvector-*' | sort -V | tail -1)
if [ -z "$dir" ]; then
  log "apt-get source pgvector/trixie"
  apt-get source -qq pgvector/trixie >&2
  dir=$(find . -maxdepth 1 -type d -name 'pgvector-*' | sort -V | tail -1)
fi
cd "$dir"
log "building $(basename "$dir") against PostgreSQL 15"
make -s PG_CONFIG="$PG_CONFIG" OPTFLAGS="" >&2
make -s PG_CONFIG="$PG_CONFIG" install >&2
pgvector_ok || { log "pgvector installed but older than 0.8"; exit 1; }
log "pgvector $(awk -F"'" '/default_version/ { print $2 }' "$CONTROL") installed"
