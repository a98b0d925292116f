#!/usr/bin/env bash
# Installs the chart tools the tests use, built with Go from their modules and cached under
# $MEMU_TOOLS_HOME (default ~/.cache/memu/tools):
#   helm          helm.sh/helm/v3/cmd/helm                      (lint, template, install, uninstall)
#   kubeconform   github.com/yannh/kubeconform/cmd/kubeconform  (rendered manifests against schemas
#                                                                the tests generate offline)
# Prints the bin directory. A rerun with both built takes well under a second.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

HELM_VERSION=${MEMU_HELM_VERSION:-v3.22.0}
KUBECONFORM_VERSION=${MEMU_KUBECONFORM_VERSION:-v0.8.0}
home=${MEMU_TOOLS_HOME:-$HOME/.cache/memu/tools}
bin="$home/bin"
mkdir -p "$bin"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

go_tool() { # name package version [extra ldflags]
  have_tool "$bin" "$1" "$3" && return 0
  log "go install $2@$3 (first build takes a few minutes; the Go build cache keeps it)"
  local started
  started=$(date +%s)
  GOBIN="$bin" go install -trimpath -ldflags "-s -w ${4:-}" "$2@$3"
  stamp_tool "$bin" "$1" "$3"
  log "$1 $3 built in $(( $(date +%s) - started ))s"
}

# Helm's own release build stamps its version and the Kubernetes version it targets (the default
# of `helm template` / `helm lint` capabilities, checked against the chart's kubeVersion).
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags="$helm_ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${MEMU_HELM_K8S_MINOR:-34}"
done
go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "$helm_ldflags"
go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"

echo "$bin"
