#!/usr/bin/env bash
# Installs the real Kubernetes control plane the e2e tests run against, cached under
# $MEMU_K8S_HOME (default ~/.cache/memu/k8s):
#   etcd                                        Debian trixie's etcd-server package, unpacked with dpkg -x
#   kube-apiserver, kube-controller-manager,    built with Go from the k8s.io/kubernetes module
#   kube-scheduler, kubectl                                     (staging modules replaced by their published v0.x)
#   kwok                                        sigs.k8s.io/kwok: simulated nodes so pods become Running
# Prints the bin directory. A rerun with everything built takes well under a second.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"

K8S_VERSION=${MEMU_K8S_VERSION:-v1.34.4}
KWOK_VERSION=${MEMU_KWOK_VERSION:-v0.7.0}
home=${MEMU_K8S_HOME:-$HOME/.cache/memu/k8s}
bin="$home/bin"
mkdir -p "$bin"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

stamp() { stamp_tool "$bin" "$@"; }
have() { have_tool "$bin" "$@"; }

# etcd from Debian trixie, through an apt configuration of its own so the machine's is untouched.
if ! have etcd trixie; then
  uris=$(debian_mirror_uris)
  [ -n "${uris// /}" ] || { log "cannot find this machine's Debian mirror in /etc/apt"; exit 1; }
  aptdir="$home/apt"
  mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/sources.list.d" "$aptdir/debs"
  cat > "$aptdir/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: ${uris% }
Suites: trixie
Components: main
Signed-By: $(debian_keyring)
SRC
  : > "$aptdir/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
           -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache" -o "Dir::Etc::Preferences=/dev/null"
           -o "Dir::Etc::PreferencesParts=/dev/null" -o "APT::Get::List-Cleanup=false")
  log "apt-get update (isolated trixie list)"
  apt-get "${aptopts[@]}" update -qq >&2
  (cd "$aptdir/debs" && apt-get "${aptopts[@]}" download -qq etcd-server etcd-client >&2)
  rm -rf "$home/etcd-root" && mkdir -p "$home/etcd-root"
  for deb in "$aptdir"/debs/etcd-*.deb; do dpkg -x "$deb" "$home/etcd-root"; done
  cp "$home/etcd-root/usr/bin/etcd" "$bin/etcd"
  [ -x "$home/etcd-root/usr/bin/etcdctl" ] && cp "$home/etcd-root/usr/bin/etcdctl" "$bin/etcdctl"
  stamp etcd trixie
  log "etcd: $("$bin/etcd" --version | head -1)"
fi

# Kubernetes binaries from the k8s.io/kubernetes module.
if ! have kube-apiserver "$K8S_VERSION" || ! have kube-controller-manager "$K8S_VERSION" || ! have kube-scheduler "$K8S_VERSION" || ! have kubectl "$K8S_VERSION"; then
  mod="$home/build-$K8S_VERSION"
  mkdir -p "$mod"
  staging="v0.${K8S_VERSION#v1.}"
  if [ ! -f "$mod/go.mod" ]; then
    log "resolving k8s.io/kubernetes $K8S_VERSION"
    gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module memu.local/k8sbuild"
      echo
      echo "go $(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//')"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      # Every staging module the kubernetes go.mod points at ./staging is replaced by its release.
      grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging" '{ print "replace " $1 " => " $1 " " v }'
    } > "$mod/go.mod"
    printf 'package main\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"\n\t_ "k8s.io/kubernetes/cmd/kube-scheduler/app"\n\t_ "k8s.io/kubectl/pkg/cmd"\n)\n\nfunc main() {}\n' > "$mod/deps.go"
  fi
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    have "$cmd" "$K8S_VERSION" && continue
    log "go build $cmd $K8S_VERSION (first build takes a while; the Go build cache keeps it)"
    (cd "$mod" && go build -p 2 -trimpath -ldflags "$ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
    stamp "$cmd" "$K8S_VERSION"
  done
fi

if ! have kwok "$KWOK_VERSION"; then
  log "go install kwok $KWOK_VERSION"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  stamp kwok "$KWOK_VERSION"
fi

echo "$bin"
