#!/usr/bin/env bash
# Copies the generated files the Helm chart carries into charts/memu-operator/:
#   crds/memucluster.yaml            <- crds/yaml/memucluster.yaml (crdgen's output, committed)
#   files/operator-clusterrole.yaml  <- `rbacgen`: the least-privilege ClusterRole whose rules the
#                                       chart's ClusterRole template uses verbatim
#   Chart.yaml version/appVersion    <- the Cargo workspace version
#
#   scripts/sync-chart.sh           write them
#   scripts/sync-chart.sh --check   only compare; exit 1 naming what is stale (e2e/test.sh runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
chart=charts/memu-operator
check=false
[ "${1:-}" = --check ] && check=true

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
version=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 } p && /^version *=/ { gsub(/[" ]/, "", $0); sub(/version=/, "", $0); print; exit }' Cargo.toml)
[ -n "$version" ] || { echo "no version in [workspace.package] of Cargo.toml" >&2; exit 1; }

cp crds/yaml/memucluster.yaml "$tmp/memucluster.yaml"
cargo run -q --locked -p memu-operator --bin rbacgen > "$tmp/operator-clusterrole.yaml"
sed -e "s/^version: .*/version: $version/" -e "s/^appVersion: .*/appVersion: \"$version\"/" "$chart/Chart.yaml" > "$tmp/Chart.yaml"

stale=0
for pair in "memucluster.yaml:crds/memucluster.yaml" "operator-clusterrole.yaml:files/operator-clusterrole.yaml" "Chart.yaml:Chart.yaml"; do
  src="$tmp/${pair%%:*}" dst="$chart/${pair#*:}"
  if $check; then
    diff -u "$dst" "$src" || { echo "$dst is stale: run scripts/sync-chart.sh" >&2; stale=1; }
  else
    mkdir -p "$(dirname "$dst")"
    cmp -s "$src" "$dst" || { cp "$src" "$dst"; echo "updated $dst" >&2; }
  fi
done
exit $stale
