#!/usr/bin/env bash
# Installs redis-server from Debian (the large tier's optional cache). Idempotent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
if ! command -v redis-server >/dev/null 2>&1; then
  apt_update_once
  log "installing redis-server"
  # No service is wanted: tests start their own throwaway server.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >&2
  if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
fi
