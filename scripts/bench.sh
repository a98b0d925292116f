#!/usr/bin/env bash
# Runs the benchmark suite with an optimised build: starts what it needs (PostgreSQL + pgvector,
# the Kubernetes control plane of the e2e harness; installed and cached as e2e/test.sh does),
# then memu-bench with these arguments.
#
#   scripts/bench.sh --full --write-docs     the sizes of the targets; results into docs/benchmarks.md
#   scripts/bench.sh --smoke                 quick
#   scripts/bench.sh --full --only retrieve  one benchmark (retrieve, memorize, operator)
set -euo pipefail
cd "$(dirname "$0")/.."
state=${MEMU_BENCH_STATE:-$PWD/target/bench-state}
mkdir -p "$state"
log() { printf '\n== %s\n' "$*" >&2; }

log "building memu-bench and memu-operator (release)"
cargo build --release --locked -p memu-bench -p memu-operator

stop=()
cleanup() { for s in "${stop[@]}"; do eval "$s" || true; done; }
trap cleanup EXIT
if [ -z "${MEMU_TEST_DATABASE_URL:-}" ]; then
  log "PostgreSQL 15 + pgvector"
  bash e2e/scripts/install-postgres.sh
  MEMU_TEST_DATABASE_URL=$(bash e2e/scripts/start-postgres.sh "$state/pg")
  stop+=("bash e2e/scripts/stop-postgres.sh '$state/pg'")
  export MEMU_TEST_DATABASE_URL
fi
if [ -z "${MEMU_TEST_KUBECONFIG:-}" ]; then
  log "Kubernetes control plane (cached after the first build)"
  bash e2e/k8s/install.sh >/dev/null
  MEMU_TEST_KUBECONFIG=$(bash e2e/k8s/start.sh "$state/k8s")
  stop+=("bash e2e/k8s/stop.sh '$state/k8s'")
  export MEMU_TEST_KUBECONFIG
fi
RUST_LOG=${RUST_LOG:-error} target/release/memu-bench "$@"
