#!/usr/bin/env bash
# Stops what start.sh started in STATE_DIR.
set -euo pipefail
state=${1:?usage: stop.sh STATE_DIR}
for p in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  f="$state/run/$p.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
done
