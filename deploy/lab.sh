#!/usr/bin/env bash
# The local lab: a whole encrypted meshd cluster with pods, on this one machine, in network namespaces.
#
#   deploy/lab.sh up       build meshd and bring the lab up (tears down a previous lab first)
#   deploy/lab.sh status   what runs, the pods' addresses, `meshd status`
#   deploy/lab.sh down     stop everything and remove it (idempotent; also after a half-finished up)
#
# Topology (run as root; only private addresses, all inside the lab's own namespaces):
#   meshd-lab-ul          the underlay: a bridge `br0` joining one veth per node (10.213.0.0/24)
#   meshd-lab-cp          the control plane `cp` (10.213.0.1): meshd init + meshd run (API on :7443)
#   meshd-lab-n1, -n2 ... nodes (10.213.0.11, .12, ...): meshd token create (on cp), meshd join, meshd run
#   meshd-lab-<node>-pod  one pod per node, wired by the real CNI `bridge` + `host-local` + `portmap`
#                         plugins (/usr/lib/cni) from the conflist meshd wrote for that node
# Every node runs its own WireGuard interface `wg-lab-<node>` (distinct names: the UAPI socket
# directory /var/run/wireguard is shared by all namespaces), UDP 51820 on its underlay address.
# Files: $MESHD_LAB_DIR (default /tmp/meshd-lab)/<node>/{data/,meshd.log,meshd.pid,subnet.env,
# 10-meshd.conflist,cni-result.json}. MESHD_LAB_NODES sets the number of nodes besides cp (default 2);
# MESHD_BIN runs that meshd binary instead of building target/debug/meshd.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
LAB=${MESHD_LAB_DIR:-/tmp/meshd-lab}
P=meshd-lab
UL=$P-ul
UL_NET=10.213.0
API_PORT=7443
CNI_PATH=/usr/lib/cni
MESHD=${MESHD_BIN:-$REPO/target/debug/meshd}

die() { echo "lab: $*" >&2; exit 1; }
ns_of() { echo "$P-$1"; }
pod_of() { echo "$P-$1-pod"; }
if_of() { echo "wg-lab-$1"; }
addr_of() { if [ "$1" = cp ]; then echo "$UL_NET.1"; else echo "$UL_NET.$((10 + ${1#n}))"; fi; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# The lab's nodes: recorded by `up` (so that `down` finds them), else guessed from the namespaces.
lab_nodes() {
  if [ -s "$LAB/nodes" ]; then
    cat "$LAB/nodes"
  else
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$P-\([a-z0-9]*\)$/\1/p" | grep -vx ul || true
  fi
}

# Runs the plugins of a node's conflist against its pod namespace, as a container runtime does:
# each plugin's config merged with the list's cniVersion and name, the previous plugin's result
# passed on as prevResult (ADD in order, DEL in reverse order with the ADD result).
cni() {
  local cmd=$1 node=$2 conf n i order cfg type out prev=""
  local ns pod
  ns=$(ns_of "$node")
  pod=$(pod_of "$node")
  if [ "$cmd" = ADD ]; then
    cp "$LAB/$node/10-meshd.conflist" "$LAB/$node/cni-conf.json"
  fi
  conf=$LAB/$node/cni-conf.json
  [ -s "$conf" ] || return 0
  n=$(jq '.plugins | length' "$conf")
  if [ "$cmd" = ADD ]; then order=$(seq 0 $((n - 1))); else
    order=$(seq $((n - 1)) -1 0)
    [ -s "$LAB/$node/cni-result.json" ] && prev=$(cat "$LAB/$node/cni-result.json")
  fi
  for i in $order; do
    cfg=$(jq -c --argjson i "$i" '.plugins[$i] + {cniVersion: .cniVersion, name: .name}' "$conf")
    if [ -n "$prev" ]; then cfg=$(jq -c --argjson p "$prev" '. + {prevResult: $p}' <<<"$cfg"); fi
    type=$(jq -r .type <<<"$cfg")
    if ! out=$(in_ns "$ns" env CNI_COMMAND="$cmd" CNI_CONTAINERID="$pod" \
      CNI_NETNS="/var/run/netns/$pod" CNI_IFNAME=eth0 CNI_PATH="$CNI_PATH" \
      "$CNI_PATH/$type" <<<"$cfg"); then
      echo "lab: CNI $cmd of plugin $type for $pod failed: $out" >&2
      return 1
    fi
    [ "$cmd" = ADD ] && prev=$out
  done
  if [ "$cmd" = ADD ]; then echo "$prev" >"$LAB/$node/cni-result.json"; else rm -f "$LAB/$node/cni-result.json"; fi
}

pod_ip() { jq -r '.ips[0].address' "$LAB/$1/cni-result.json" | cut -d/ -f1; }

# Starts `meshd run` for a node inside its namespace, detached, pid in $LAB/<node>/meshd.pid.
start_meshd() {
  local node=$1 d=$LAB/$1
  in_ns "$(ns_of "$node")" setsid sh -c 'echo $$ >"$0"; exec "$@"' "$d/meshd.pid" \
    "$MESHD" run --data-dir "$d/data" --wg-interface "$(if_of "$node")" \
    --subnet-env "$d/subnet.env" --cni-conf "$d/10-meshd.conflist" \
    </dev/null >>"$d/meshd.log" 2>&1 &
}

# Waits until a node's meshd has its WireGuard interface up and has written subnet.env and the conflist.
wait_meshd() {
  local node=$1 d=$LAB/$1 i
  for i in $(seq 300); do
    if [ -s "$d/subnet.env" ] && [ -s "$d/10-meshd.conflist" ] \
      && ip -n "$(ns_of "$node")" link show "$(if_of "$node")" >/dev/null 2>&1; then
      return 0
    fi
    if [ -s "$d/meshd.pid" ] && ! kill -0 "$(cat "$d/meshd.pid")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "lab: meshd on $node did not come up; the end of $d/meshd.log:" >&2
  tail -20 "$d/meshd.log" >&2 || true
  die "see above; \`deploy/lab.sh down\` removes what was made"
}

# The pid of a node's meshd from its pid file, if that process is still this lab's meshd.
meshd_pid() {
  local pid
  pid=$(cat "$LAB/$1/meshd.pid" 2>/dev/null || true)
  [ -n "$pid" ] && { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null \
    | grep -qF -- "--data-dir $LAB/$1/data" && echo "$pid"
  true
}

down() {
  local node pid ns p i
  local nodes
  nodes=$(lab_nodes)
  # 1. the daemons, by the pids recorded in the lab directory
  for node in $nodes; do
    pid=$(meshd_pid "$node")
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  for node in $nodes; do
    pid=$(meshd_pid "$node")
    [ -n "$pid" ] || continue
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # 2. the pods' networking (releases their host-local addresses)
  for node in $nodes; do cni DEL "$node" || true; done
  # 3. anything else still running inside the lab's namespaces (a half-finished up)
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  # 4. the namespaces (their interfaces go with them), then sockets a killed daemon left behind
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  for node in $nodes; do rm -f "/var/run/wireguard/$(if_of "$node").sock"; done
  # 5. addresses host-local still holds for the lab's pods when CNI DEL could not run (the lab
  #    directory was gone): each file starts with its container id, the pod namespace's name
  for f in /var/lib/cni/networks/*/*; do
    [ -f "$f" ] && head -1 "$f" 2>/dev/null | tr -d '\r' | grep -qx "$P-[a-z0-9]*-pod" && rm -f "$f"
  done
  rm -rf "$LAB"
}

up() {
  local workers=${MESHD_LAB_NODES:-2} node nodes ns pod i addr tok hash json
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  trap 'echo "lab: up failed (line $LINENO); deploy/lab.sh down removes what was made" >&2' ERR
  [[ "$workers" =~ ^[0-9]+$ ]] && [ "$workers" -ge 1 ] && [ "$workers" -le 200 ] \
    || die "MESHD_LAB_NODES must be 1..200"
  deploy/install-deps.sh
  [ -x "$CNI_PATH/bridge" ] || die "$CNI_PATH/bridge missing (apt-get install containernetworking-plugins)"
  command -v jq >/dev/null || die "jq missing (apt-get install jq)"
  if [ -z "${MESHD_BIN:-}" ]; then
    echo "== building meshd"
    cargo build -q -p meshd
  fi
  "$MESHD" run --help | grep -q -- --wg-interface || die "this meshd has no WireGuard mesh (meshd run --wg-interface)"
  if [ -d "$LAB" ] || ip netns list 2>/dev/null | grep -q "^$P-"; then
    echo "== a previous lab is there: tearing it down first"
    down
  fi
  mkdir -p "$LAB"
  nodes="cp"
  for i in $(seq "$workers"); do nodes="$nodes n$i"; done
  echo "$nodes" | tr ' ' '\n' >"$LAB/nodes"

  echo "== underlay: namespace $UL, bridge br0, $UL_NET.0/24"
  ip netns add "$UL"
  ip -n "$UL" link set lo up
  ip -n "$UL" link add br0 type bridge
  ip -n "$UL" link set br0 up
  for node in $nodes; do
    ns=$(ns_of "$node")
    pod=$(pod_of "$node")
    addr=$(addr_of "$node")
    mkdir -p "$LAB/$node"
    ip netns add "$ns"
    ip netns add "$pod"
    ip -n "$ns" link set lo up
    ip -n "$pod" link set lo up
    in_ns "$ns" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$UL" link add "ul-$node" type veth peer name eth0 netns "$ns"
    ip -n "$UL" link set "ul-$node" master br0 up
    ip -n "$ns" address add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    echo "   $ns: eth0 $addr"
  done

  echo "== control plane: meshd init + meshd run in $(ns_of cp)"
  in_ns "$(ns_of cp)" "$MESHD" init --data-dir "$LAB/cp/data" --node-name cp \
    --advertise-address "$(addr_of cp)" --api-port "$API_PORT" >"$LAB/cp/init.log"
  start_meshd cp
  wait_meshd cp
  for i in $(seq 100); do
    in_ns "$(ns_of cp)" bash -c "exec 3<>/dev/tcp/$(addr_of cp)/$API_PORT" 2>/dev/null && break
    sleep 0.1
  done

  echo "== meshd token create (on cp)"
  json=$(in_ns "$(ns_of cp)" "$MESHD" token create --data-dir "$LAB/cp/data" \
    --uses "$workers" --ttl 1h --description lab --output json)
  tok=$(jq -r .token <<<"$json")
  hash=$(jq -r .ca_hash <<<"$json")
  for node in $nodes; do
    [ "$node" = cp ] && continue
    echo "== $node: meshd join + meshd run in $(ns_of "$node")"
    in_ns "$(ns_of "$node")" "$MESHD" join --server "$(addr_of cp):$API_PORT" --token "$tok" \
      --ca-hash "$hash" --node-name "$node" --advertise-address "$(addr_of "$node")" \
      --data-dir "$LAB/$node/data" >"$LAB/$node/join.log" \
      || { cat "$LAB/$node/join.log" >&2; die "meshd join failed on $node"; }
    start_meshd "$node"
  done
  for node in $nodes; do
    [ "$node" = cp ] || wait_meshd "$node"
  done

  echo "== pods: CNI ADD (bridge + host-local + portmap from each node's conflist)"
  for node in $nodes; do
    cni ADD "$node" || die "CNI ADD failed on $node; \`deploy/lab.sh down\` removes what was made"
    echo "   $(pod_of "$node"): $(pod_ip "$node") (subnet $(sed -n 's/^FLANNEL_SUBNET=//p' "$LAB/$node/subnet.env"))"
  done

  echo "== pod to pod, across the mesh"
  local ok=1 from to many=0 i_from i_to
  [ "$(echo $nodes | wc -w)" -gt 6 ] && many=1
  i_from=0
  for from in $nodes; do
    i_from=$((i_from + 1)); i_to=0
    for to in $nodes; do
      i_to=$((i_to + 1))
      [ "$from" = "$to" ] && continue
      # beyond 6 nodes, each pod pings the next one only
      [ "$many" = 1 ] && [ "$i_to" != $((i_from + 1)) ] && ! { [ "$i_from" = "$(echo $nodes | wc -w)" ] && [ "$i_to" = 1 ]; } && continue
      if in_ns "$(pod_of "$from")" ping -n -q -c 1 -W 3 "$(pod_ip "$to")" >/dev/null; then
        echo "   $from -> $to ($(pod_ip "$to")): ok"
      else
        echo "   $from -> $to ($(pod_ip "$to")): NO ANSWER"
        ok=0
      fi
    done
  done
  [ "$ok" = 1 ] || echo "lab: some pods did not answer; see $LAB/*/meshd.log" >&2
  local n1; n1=$(sed -n 2p "$LAB/nodes")
  local n2; n2=$(sed -n 3p "$LAB/nodes")
  [ -n "$n2" ] || n2=cp
  cat <<EOF

The lab is up: $(echo $nodes | wc -w) nodes, logs and data in $LAB. Try:

  # a pod on $n1 pings the pod on $n2 (through WireGuard)
  ip netns exec $(pod_of "$n1") ping -c 3 $(pod_ip "$n2")
  # the WireGuard interface of $n1: peers, endpoints, latest handshakes, transfer
  ip netns exec $(ns_of "$n1") wg show $(if_of "$n1")
  # nodes, subnets, peers, handshakes, bytes
  ip netns exec $(ns_of cp) $MESHD status --data-dir $LAB/cp/data --wg-interface $(if_of cp)
  ip netns exec $(ns_of "$n1") $MESHD status --data-dir $LAB/$n1/data --wg-interface $(if_of "$n1")
  # what crosses the underlay: only UDP to port 51820 (and TLS to the API on :$API_PORT)
  ip netns exec $UL tcpdump -n -i any -c 10 udp
  # the TLS coverage report: live handshakes, certificates, the overlay (exit 0 = clean)
  ip netns exec $(ns_of cp) $MESHD audit --data-dir $LAB/cp/data --wg-interface $(if_of cp)
  # what rotation would renew now (nothing for ~60 days), and a forced renewal of one node's bundle
  ip netns exec $(ns_of cp) $MESHD rotate --data-dir $LAB/cp/data --dry-run
  ip netns exec $(ns_of "$n1") $MESHD rotate --data-dir $LAB/$n1/data --force all
  deploy/lab.sh status
  deploy/lab.sh down

EOF
}

status() {
  local node pid state
  if [ ! -s "$LAB/nodes" ]; then
    echo "no lab (deploy/lab.sh up)"
    ip netns list 2>/dev/null | grep "^$P-" && echo "(leftover namespaces: deploy/lab.sh down)"
    return 0
  fi
  printf '%-6s %-16s %-12s %-14s %-10s %s\n' NODE NAMESPACE UNDERLAY INTERFACE MESHD POD
  for node in $(lab_nodes); do
    pid=$(meshd_pid "$node")
    if [ -n "$pid" ]; then state="pid $pid"; else state=down; fi
    printf '%-6s %-16s %-12s %-14s %-10s %s\n' "$node" "$(ns_of "$node")" "$(addr_of "$node")" \
      "$(if_of "$node")" "$state" "$( [ -s "$LAB/$node/cni-result.json" ] && pod_ip "$node" || echo -)"
  done
  echo
  in_ns "$(ns_of cp)" "$MESHD" status --data-dir "$LAB/cp/data" --wg-interface "$(if_of cp)" || true
}

case "${1:-}" in
  up) up ;;
  down)
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
    command -v jq >/dev/null || die "jq missing (apt-get install jq)"
    down
    echo "lab: down" ;;
  status) status ;;
  *) echo "usage: deploy/lab.sh up|down|status" >&2; exit 2 ;;
esac
