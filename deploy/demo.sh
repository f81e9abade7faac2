#!/usr/bin/env bash
# What meshd does today, on this one machine (loopback only):
#  1. `meshd init` creates a control-plane node's whole certificate inventory (three CAs, every
#     certificate and kubeconfig of kubeadm's layout, the kubelet's CA-signed serving certificate);
#  2. `meshd certs check` checks it, openssl and kubectl verify it independently;
#  3. `meshd run` serves the meshd API; `meshd token create` makes a bootstrap token;
#  4. `meshd join` (a second data directory, a second "node" on 127.0.0.2) pins the CA, sends CSRs,
#     and gets its certificates and pod subnet; `meshd node list` shows it.
#   deploy/demo.sh [WORK_DIR]      (default /tmp/meshd-demo; removed first if it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/meshd-demo}"
CP="$WORK/cp1"
NODE="$WORK/node1"
PORT="${MESHD_DEMO_API_PORT:-17443}"
deploy/install-deps.sh
cargo build -q -p meshd
MESHD="$PWD/target/debug/meshd"
rm -rf "$WORK"
mkdir -p "$WORK"
RUN_PID=""
cleanup() { [ -n "$RUN_PID" ] && kill "$RUN_PID" 2>/dev/null && wait "$RUN_PID" 2>/dev/null; true; }
trap cleanup EXIT

echo "== meshd init (control plane cp1 on 127.0.0.1)"
"$MESHD" init --data-dir "$CP" --node-name cp1 --advertise-address 127.0.0.1 \
  --api-port "$PORT" --apiserver-cert-sans api.example.com
echo
echo "== meshd init again (idempotent: keeps everything)"
"$MESHD" init --data-dir "$CP" --node-name cp1 --advertise-address 127.0.0.1 \
  --api-port "$PORT" --apiserver-cert-sans api.example.com | tail -2
echo
echo "== meshd certs check"
"$MESHD" certs check --data-dir "$CP"
echo
echo "== independent checks"
openssl verify -CAfile "$CP/pki/ca.crt" "$CP/pki/apiserver.crt" "$CP/kubelet/pki/kubelet.crt"
openssl verify -CAfile "$CP/pki/etcd/ca.crt" "$CP/pki/etcd/server.crt" "$CP/pki/apiserver-etcd-client.crt"
openssl x509 -in "$CP/pki/apiserver.crt" -noout -subject -ext subjectAltName,extendedKeyUsage
echo
echo "== meshd run (the meshd API on 127.0.0.1:$PORT; log in $WORK/cp1.log)"
"$MESHD" run --no-mesh --data-dir "$CP" >"$WORK/cp1.log" 2>&1 &   # the mesh itself: deploy/lab.sh
RUN_PID=$!
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done
echo
echo "== meshd token create"
"$MESHD" token create --data-dir "$CP" --description demo | tee "$WORK/token.txt"
JOIN=$(grep -o 'meshd join .*' "$WORK/token.txt" \
  | sed "s|<NAME>|node1|; s|<IP>|127.0.0.2|; s|--data-dir /var/lib/meshd|--data-dir $NODE|")
echo
echo "== on the new node: ${JOIN%%--token*}--token <redacted> ..."
"$MESHD" ${JOIN#meshd }
echo
echo "== meshd node list (control plane)"
"$MESHD" node list --data-dir "$CP"
echo
echo "== meshd certs check (node1)"
"$MESHD" certs check --data-dir "$NODE"
openssl verify -CAfile "$CP/pki/ca.crt" "$NODE/kubelet/pki/kubelet.crt" "$NODE/pki/meshd/node.crt"
openssl x509 -in "$NODE/kubelet/pki/kubelet.crt" -noout -subject -ext subjectAltName
echo
echo "Done. Files: $CP (control plane), $NODE (node1). Try:"
echo "  $MESHD certs check --data-dir $CP --output json"
echo "  $MESHD token list --data-dir $CP   (needs: $MESHD run --no-mesh --data-dir $CP)"
