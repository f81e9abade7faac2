#!/usr/bin/env bash
# Installs the Debian packages meshd's tests and demo use (run as root). Idempotent: installs only
# what is missing. Used by deploy/test.sh and .ci/run.
#   openssl                 independent verification of every certificate
#   etcd-server etcd-client a real etcd with mTLS, started by the tests
#   kubernetes-client       kubectl (skipped when a kubectl is already installed)
#   protobuf-compiler       protoc, which etcd-client's build script needs to compile etcd's protos
#   libprotobuf-dev         google/protobuf/descriptor.proto, which those protos import
#   wireguard-tools         `wg`, to check meshd's WireGuard devices from outside (no kernel module needed)
#   tcpdump                 captures on the underlay: no pod packet may cross it in clear
#   iputils-ping iproute2   ping and `ip` for the network-namespace tests
#   containernetworking-plugins  the real CNI plugins (bridge, host-local, portmap in /usr/lib/cni)
#                           that wire pods from meshd's conflist (the lab, the mesh tests)
#   jq                      deploy/lab.sh reads meshd's JSON and chains the CNI plugins with it
#   nftables                the mesh tests: a NAT (masquerade) in front of a node, routers that drop ICMP
#   python3 python3-venv    a venv for sslyze (PyPI, in /opt/meshd-sslyze, apart from the system's
#                           packages): the audit tests compare meshd audit's verdicts with it
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ip >/dev/null || need+=(iproute2)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v jq >/dev/null || need+=(jq)
command -v nft >/dev/null || need+=(nftables)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "${MESHD_BENCH_DEPS:-0}" = 1 ]; then
  command -v cfssl >/dev/null || need+=(golang-cfssl)
  command -v wireguard-go >/dev/null || need+=(wireguard-go)
  command -v iperf3 >/dev/null || need+=(iperf3)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]}; run as root (or: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# sslyze from PyPI in its own venv (only PyPI is needed; nothing else is fetched).
SSLYZE_VENV=${MESHD_SSLYZE_VENV:-/opt/meshd-sslyze}
if [ ! -x "$SSLYZE_VENV/bin/sslyze" ]; then
  echo "installing sslyze into $SSLYZE_VENV"
  python3 -m venv "$SSLYZE_VENV"
  "$SSLYZE_VENV/bin/pip" install --quiet --disable-pip-version-check 'sslyze==6.*'
fi
