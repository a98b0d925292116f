#!/usr/bin/env bash
# Builds kstatus-eval (e2e/tools/kstatus), the kstatus health computation Flux uses, against
# sigs.k8s.io/cli-utils; cached under $MEMU_TOOLS_HOME (default ~/.cache/memu/tools). Prints the
# binary's path. A rerun with the same version and source takes well under a second.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
src="$(cd "$(dirname "$0")/../tools/kstatus" && pwd)/main.go"

CLI_UTILS_VERSION=${MEMU_CLI_UTILS_VERSION:-v0.37.2}
home=${MEMU_TOOLS_HOME:-$HOME/.cache/memu/tools}
bin="$home/bin/kstatus-eval"
stampfile="$home/bin/.kstatus-eval.version"
want="$CLI_UTILS_VERSION $(sha256sum "$src" | cut -c1-16)"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

if [ -x "$bin" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$want" ]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null 2>&1 || { log "go is needed to build kstatus-eval"; exit 1; }
mod="$home/kstatus-$CLI_UTILS_VERSION"
mkdir -p "$mod" "$home/bin"
cp "$src" "$mod/main.go"
if [ ! -f "$mod/go.mod" ]; then
  log "resolving sigs.k8s.io/cli-utils $CLI_UTILS_VERSION"
  printf 'module memu.local/kstatus-eval\n\ngo %s\n\nrequire sigs.k8s.io/cli-utils %s\n' \
    "$(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//')" "$CLI_UTILS_VERSION" > "$mod/go.mod"
fi
log "go build kstatus-eval (cli-utils $CLI_UTILS_VERSION)"
(cd "$mod" && go mod tidy >&2 && go build -trimpath -ldflags "-s -w" -o "$bin" .)
echo "$want" > "$stampfile"
echo "$bin"
