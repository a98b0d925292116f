#!/usr/bin/env bash
# Unpacks promtool from Debian's prometheus package (dpkg -x: no service is installed or
# started) into ~/.cache/memu/promtool; the tests check and unit-test the alert rules with it.
# Idempotent; prints promtool's path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
home=${MEMU_PROMTOOL_HOME:-$HOME/.cache/memu/promtool}
if [ ! -x "$home/bin/promtool" ]; then
  apt_update_once
  log "unpacking promtool from Debian's prometheus package"
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq prometheus >&2)
  dpkg -x "$work"/prometheus_*.deb "$work/root"
  mkdir -p "$home/bin"
  cp "$work/root/usr/bin/promtool" "$home/bin/promtool"
  rm -rf "$work"
fi
echo "$home/bin/promtool"
