#!/usr/bin/env bash
# Runs the worker standalone on its embedded default: SQLite in ./data, offline mode (no LLM, no
# provider key), local embeddings from a small model installed from PyPI, API on 127.0.0.1:8080.
# Every API route needs a memU API key: the first run creates one for tenant `default` in
# ./data/dev-api-key (mode 0600); use it as `Authorization: Bearer $(cat data/dev-api-key)`.
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir=$(bash scripts/install-model.sh)
export MEMU_PROVIDERS__LOCAL__MODEL_DIR="$model_dir"
cargo build --locked -q -p memu-worker
worker=target/debug/memu-worker
if [ ! -s data/dev-api-key ]; then
  mkdir -p data
  "$worker" admin key create --tenant default --scopes read,write,admin \
    --name "local development" --output-file data/dev-api-key
fi
exec "$worker" serve "$@"
