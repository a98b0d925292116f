#!/usr/bin/env bash
# Installs Debian's lua5.4 interpreter, which runs the Argo CD health script of MemUCluster in
# the tests (config/argocd/memucluster-health.lua). Idempotent; prints the interpreter's path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
if ! command -v lua5.4 >/dev/null 2>&1; then
  apt_update_once
  log "installing lua5.4"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lua5.4 >&2
fi
command -v lua5.4
