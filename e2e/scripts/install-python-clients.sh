#!/usr/bin/env bash
# Installs the real client libraries the compatibility tests drive: memU's published SDK
# (memu-py) and the official MCP Python SDK (mcp), pinned, into a private virtualenv from PyPI.
# Prints the virtualenv's python. Idempotent: reinstalls only when the pins change.
set -euo pipefail
CACHE=${MEMU_CACHE:-$HOME/.cache/memu}
venv="$CACHE/python-clients"
pins="memu-py==0.1.8 mcp==2.3.0"
log() { printf '[install-python-clients] %s\n' "$*" >&2; }

if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins" ]; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$CACHE"
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
log "pip install $pins"
# shellcheck disable=SC2086 # the pins are separate words
"$venv/bin/pip" install -q $pins >&2
echo "$pins" > "$venv/.pins"
echo "$venv/bin/python"
