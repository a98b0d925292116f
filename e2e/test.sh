#!/usr/bin/env bash
# Runs the whole test suite on this machine: installs and starts what the tests need (idempotent
# and cached), checks formatting, lints and generated files, then runs every test with nextest.
#
#   e2e/test.sh              everything
#   e2e/test.sh -E 'test(x)' extra arguments go to `cargo nextest run`
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
state=${MEMU_TEST_STATE:-$root/target/e2e-state}
mkdir -p "$state"
log() { printf '\n== %s\n' "$*" >&2; }
started=$(date +%s)

log "PostgreSQL 15 + pgvector"
bash e2e/scripts/install-postgres.sh

log "Redis"
bash e2e/scripts/install-redis.sh

log "local embedding model"
model_dir=$(bash scripts/install-model.sh)

log "Kubernetes control plane (etcd from Debian, kube-apiserver & co. built with Go; cached)"
bash e2e/k8s/install.sh >/dev/null

log "Helm and kubeconform (built with Go; cached)"
helm_tools=$(bash e2e/scripts/install-helm-tools.sh)

log "lua5.4 (Argo CD health script) and kstatus-eval (Flux health, built with Go; cached)"
lua=$(bash e2e/scripts/install-lua.sh)
kstatus=$(bash e2e/scripts/install-kstatus.sh)

log "promtool (alert rules and dashboard queries; Debian's prometheus package, unpacked)"
promtool=$(bash e2e/scripts/install-promtool.sh)

log "memU's Python SDK and the MCP Python SDK (PyPI, pinned; cached virtualenv)"
python_clients=$(bash e2e/scripts/install-python-clients.sh)

log "Argo CD and Flux CRDs (from their Go modules; cached)"
gitops_crds=$(bash e2e/scripts/install-gitops-crds.sh)

log "cargo-nextest"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest >&2
fi

cleanup() {
  bash e2e/scripts/stop-postgres.sh "$state/pg" || true
  bash e2e/scripts/stop-redis.sh "$state/redis" || true
  bash e2e/k8s/stop.sh "$state/k8s" || true
}
trap cleanup EXIT
log "starting PostgreSQL"
dsn=$(bash e2e/scripts/start-postgres.sh "$state/pg")
log "starting Redis"
redis_url=$(bash e2e/scripts/start-redis.sh "$state/redis")
log "starting the Kubernetes control plane"
kubeconfig=$(bash e2e/k8s/start.sh "$state/k8s")

log "generated CRD, RBAC YAML and the chart's copies are current"
cargo run -q --locked -p memu-crds --bin crdgen > "$state/memucluster.yaml"
diff -u crds/yaml/memucluster.yaml "$state/memucluster.yaml" \
  || { echo "crds/yaml/memucluster.yaml is stale: run cargo run -p memu-crds --bin crdgen > crds/yaml/memucluster.yaml" >&2; exit 1; }
cargo run -q --locked -p memu-crds --bin crdgen -- --reference > "$state/crd-reference.md"
diff -u docs/crd-reference.md "$state/crd-reference.md" \
  || { echo "docs/crd-reference.md is stale: run cargo run -p memu-crds --bin crdgen -- --reference > docs/crd-reference.md" >&2; exit 1; }
cargo run -q --locked -p memu-operator --bin rbacgen > "$state/operator-rbac.yaml"
diff -u config/rbac/operator.yaml "$state/operator-rbac.yaml" \
  || { echo "config/rbac/operator.yaml is stale: run cargo run -p memu-operator --bin rbacgen > config/rbac/operator.yaml" >&2; exit 1; }
bash scripts/sync-chart.sh --check \
  || { echo "charts/memu-operator carries a stale CRD, ClusterRole or version: run scripts/sync-chart.sh" >&2; exit 1; }

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests"
export MEMU_TEST_DATABASE_URL="$dsn" MEMU_TEST_REDIS_URL="$redis_url" MEMU_TEST_MODEL_DIR="$model_dir" MEMU_TEST_KUBECONFIG="$kubeconfig"
export MEMU_TEST_HELM="$helm_tools/helm" MEMU_TEST_KUBECONFORM="$helm_tools/kubeconform"
export MEMU_TEST_LUA="$lua" MEMU_TEST_KSTATUS="$kstatus" MEMU_TEST_PROMTOOL="$promtool"
export MEMU_TEST_GITOPS_CRDS="$gitops_crds" MEMU_TEST_PYTHON_CLIENTS="$python_clients"
cargo nextest run --workspace --locked --no-fail-fast "$@"

if [ $# -eq 0 ]; then
  log "benchmarks, smoke size (keeps them compiling and working; figures from the dev profile mean nothing)"
  cargo build --locked -p memu-bench -p memu-operator
  RUST_LOG=error target/debug/memu-bench --smoke
fi

log "done in $(( $(date +%s) - started ))s"
