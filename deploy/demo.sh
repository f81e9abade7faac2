#!/usr/bin/env bash
# What meshd does today, on this machine: builds meshd, creates a control-plane node's whole
# certificate inventory (three CAs, every certificate and kubeconfig kubeadm's layout has, plus the
# kubelet's CA-signed serving certificate), checks it with `meshd certs check`, and verifies it with
# openssl and kubectl, independently of meshd.
#   deploy/demo.sh [DATA_DIR]      (default /tmp/meshd-demo; removed first if it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-/tmp/meshd-demo}"
deploy/install-deps.sh
cargo build -q -p meshd
MESHD=target/debug/meshd
rm -rf "$DIR"

echo "== meshd init"
$MESHD init --data-dir "$DIR" --node-name cp1 --advertise-address 127.0.0.1 \
  --apiserver-cert-sans api.example.com
echo
echo "== meshd init again (idempotent: keeps everything)"
$MESHD init --data-dir "$DIR" --node-name cp1 --advertise-address 127.0.0.1 \
  --apiserver-cert-sans api.example.com | tail -2
echo
echo "== meshd certs check"
$MESHD certs check --data-dir "$DIR"
echo
echo "== independent checks"
openssl verify -CAfile "$DIR/pki/ca.crt" "$DIR/pki/apiserver.crt" "$DIR/kubelet/pki/kubelet.crt"
openssl verify -CAfile "$DIR/pki/etcd/ca.crt" "$DIR/pki/etcd/server.crt" "$DIR/pki/apiserver-etcd-client.crt"
openssl x509 -in "$DIR/pki/apiserver.crt" -noout -subject -ext subjectAltName,extendedKeyUsage
kubectl --kubeconfig "$DIR/admin.conf" config view --minify -o jsonpath='{.users[0].name} -> {.clusters[0].cluster.server}{"\n"}'
echo
echo "Try next:"
echo "  $MESHD certs check --data-dir $DIR --output json"
echo "  ls -l $DIR/pki $DIR/pki/etcd"
