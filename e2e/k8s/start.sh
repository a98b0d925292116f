#!/usr/bin/env bash
# Starts (or reuses) a real Kubernetes control plane on loopback in STATE_DIR: etcd,
# kube-apiserver (RBAC, service-account tokens), kube-controller-manager, and kwok managing fake
# nodes so that pods of Deployments and StatefulSets become Running. Prints the kubeconfig path.
# The service CIDR is only an allocation range inside the API server: no traffic goes there.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"

state=${1:?usage: start.sh STATE_DIR}
mkdir -p "$state"/{pki,logs,etcd,run}
state=$(cd "$state" && pwd)
bin=$(bash "$(dirname "$0")/install.sh")
pki="$state/pki"
kubeconfig="$state/kubeconfig"

# Reused only when the API answers and every component is still running: an API server whose
# kwok died would leave its nodes NotReady and every pod Pending.
healthy() {
  for p in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    kill -0 "$(cat "$state/run/$p.pid" 2>/dev/null || echo 0)" 2>/dev/null || return 1
  done
  [ -f "$kubeconfig" ] && "$bin/kubectl" --kubeconfig "$kubeconfig" get --raw /readyz >/dev/null 2>&1
}
if healthy; then
  log "reusing the running control plane in $state"
  echo "$kubeconfig"
  exit 0
fi
"$(dirname "$0")/stop.sh" "$state" >/dev/null 2>&1 || true

# Certificates: one CA, the API server's serving cert, an admin client (system:masters), and
# clients for the controller manager and kwok; a key pair that signs service-account tokens.
if [ ! -f "$pki/ca.crt" ]; then
  log "generating certificates"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=memu-e2e-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cat > "$pki/server.ext" <<EXT
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
EXT
  # rustls accepts only X.509 v3 certificates: every certificate gets extensions.
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$pki/client.ext"
  cert() { # name subject [extfile]
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -out "$pki/$1.crt" -extfile "${3:-$pki/client.ext}" 2>/dev/null
  }
  cert apiserver "/CN=kube-apiserver" "$pki/server.ext"
  cert admin "/O=system:masters/CN=memu-e2e-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
fi

etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
log "etcd on 127.0.0.1:$etcd_port"
nohup "$bin/etcd" --data-dir "$state/etcd" --name memu-e2e \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "memu-e2e=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --quota-backend-bytes 4294967296 \
  > "$state/logs/etcd.log" 2>&1 &
echo $! > "$state/run/etcd.pid"

log "kube-apiserver on 127.0.0.1:$api_port"
nohup "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --cert-dir "$state/pki" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
  --allow-privileged --enable-priority-and-fairness=false --watch-cache=true \
  --profiling=false --v=0 > "$state/logs/kube-apiserver.log" 2>&1 &
echo $! > "$state/run/kube-apiserver.pid"

kubeconfig_for() { # file user
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: memu-e2e
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: memu-e2e
  context: {cluster: memu-e2e, user: $2, namespace: default}
current-context: memu-e2e
KC
}
kubeconfig_for "$state/kubeconfig.tmp" admin
kubeconfig_for "$state/controller-manager.kubeconfig" controller-manager
kubeconfig_for "$state/scheduler.kubeconfig" scheduler
# kwok reads its own copy: kubeconfig.tmp is renamed at the end, maybe before kwok has read it.
kubeconfig_for "$state/kwok.kubeconfig" admin

for _ in $(seq 1 120); do
  "$bin/kubectl" --kubeconfig "$state/kubeconfig.tmp" get --raw /readyz >/dev/null 2>&1 && break
  sleep 0.5
done
"$bin/kubectl" --kubeconfig "$state/kubeconfig.tmp" get --raw /readyz >/dev/null \
  || { log "kube-apiserver did not become ready; see $state/logs/kube-apiserver.log"; exit 1; }

log "kube-controller-manager"
nohup "$bin/kube-controller-manager" --kubeconfig "$state/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$state/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$state/controller-manager.kubeconfig" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
  --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-attachdetach' \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  > "$state/logs/kube-controller-manager.log" 2>&1 &
echo $! > "$state/run/kube-controller-manager.pid"

log "kube-scheduler"
nohup "$bin/kube-scheduler" --kubeconfig "$state/scheduler.kubeconfig" \
  --authentication-kubeconfig "$state/scheduler.kubeconfig" --authorization-kubeconfig "$state/scheduler.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
  > "$state/logs/kube-scheduler.log" 2>&1 &
echo $! > "$state/run/kube-scheduler.pid"

log "kwok with fake nodes"
nohup "$bin/kwok" --kubeconfig "$state/kwok.kubeconfig" --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-ip 127.0.0.1 --cidr 10.244.0.0/16 --node-lease-duration-seconds 40 > "$state/logs/kwok.log" 2>&1 &
echo $! > "$state/run/kwok.pid"
for n in 0 1 2; do
  cat <<NODE | "$bin/kubectl" --kubeconfig "$state/kubeconfig.tmp" apply -f - >/dev/null
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$n
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {type: kwok, kubernetes.io/hostname: kwok-node-$n, topology.kubernetes.io/zone: zone-$n}
spec: {}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
NODE
done
# The default namespace's service account must exist before pods can be created.
for _ in $(seq 1 60); do
  "$bin/kubectl" --kubeconfig "$state/kubeconfig.tmp" get serviceaccount default >/dev/null 2>&1 && break
  sleep 0.5
done
nodes_ready=false
for _ in $(seq 1 120); do
  if ! "$bin/kubectl" --kubeconfig "$state/kubeconfig.tmp" get nodes -o jsonpath='{.items[*].spec.taints}' | grep -q not-ready; then
    nodes_ready=true
    break
  fi
  sleep 0.5
done
$nodes_ready || { log "kwok's nodes did not become Ready; see $state/logs/kwok.log"; exit 1; }
mv "$state/kubeconfig.tmp" "$kubeconfig"
echo "$kubeconfig"
