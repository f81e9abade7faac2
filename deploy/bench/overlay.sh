#!/usr/bin/env bash
# Overlay benchmark (issue 4): meshd's WireGuard mesh beside wireguard-go and the raw veth, in ONE run.
#
#   deploy/bench/overlay.sh              # as root; ~4-5 min with the defaults (after the build)
#   knobs: RUNS=3 (rounds) DUR=10 (s per iperf3 test) PINGS=20 SKIP_BUILD=1 (reuse target/release/meshd)
#          ENDPOINTS=pods|nodes (default pods) OUT_DIR=target/bench/overlay (raw iperf3 JSON, pings,
#          daemon logs, results.tsv, summary.md)
#          MESHD_ENGINE=default|fast|boringtun: meshd's WireGuard data path (`meshd run --wg-engine`;
#          default: meshd's default)
#          MESHD_MTU=auto (meshd's own detection: underlay 1500 - 80 = 1420) or N (`meshd run --mtu N`)
#          TXQUEUELEN=N: set txqueuelen N on all four tunnel interfaces (default: leave the TUN default,
#          500). A diagnostic: the TUN drops column shows packets the kernel dropped because the
#          daemon did not read its TUN queue in time.
#
# Topology: two network namespaces A and B joined by one veth pair (underlay 10.231.0.1 / .2, MTU 1500).
# Three paths run side by side in those same two namespaces, measured one after the other:
#   veth          A -> B's underlay address
#   meshd         `meshd init` + `meshd run` (release build) in A (the control plane), `meshd join` +
#                 `meshd run` in B; traffic between their tunnel addresses (each node's lease network
#                 address, on its WireGuard interface), UDP 51820, MTU detected (1500 - 80 = 1420).
#                 The script prints both MTUs and stops unless they equal wireguard-go's 1420 (before
#                 4df1385 the control plane detected `lo` and took 65456: its outer UDP datagrams
#                 were fragmented on the veth, an unequal comparison; MESHD_MTU=1420 forces it)
#   wireguard-go  Debian's wireguard-go, one daemon per namespace, configured with `wg` as in
#                 shared/design/lab/02_wireguard_go.sh (10.232.0.1 / .2, MTU 1420), UDP 51821
# ENDPOINTS=pods (default): iperf3 and ping run between "pods": for each path, one more namespace on
# each side, wired to its node namespace by a veth pair and routed (/32 route on the node, default
# route in the pod; the node forwards). meshd's pods take addresses in their node's lease
# (subnet + 10), so they travel through meshd's route and AllowedIPs exactly as CNI pods would (the
# CNI `bridge` plugin would add a bridge hop; it is left out for all three paths alike);
# wireguard-go's pods are 10.233.{1,2}.10 (in its AllowedIPs), the veth path's 10.234.{1,2}.10
# (routed over the underlay). So every path pays the same two extra veth hops and forwarding. Pod
# MTU = the path's MTU (1420 for the tunnels, as meshd's CNI conflist sets it; 1500 for the veth).
# ENDPOINTS=nodes: between the node namespaces themselves (underlay / tunnel addresses).
# Each round measures every path (the order rotates from round to round): iperf3 TCP A -> B, 1 stream
# and 4 streams (DUR s each, receiver-side Gbit/s from `iperf3 -J`), ping RTT (avg of PINGS pings,
# 0.2 s apart), and for the tunnels the CPU seconds their two daemons burned per GB received
# (utime+stime of /proc/<pid>/stat, all threads, before/after each iperf3 test). Diagnostics beside
# them: TCP retransmits, UDP receive-buffer overflows (nstat UdpRcvbufErrors, both namespaces), TUN
# drops (rx+tx dropped of both tunnel interfaces), the daemons' CPU in cores (sending / receiving
# side) and its kernel share, and how busy the whole machine was (/proc/stat). Ratios
# meshd/wireguard-go and meshd/veth are taken per round (same conditions), then summarized as
# median (min-max), and the issue's target (meshd >= 4x wireguard-go, 1 stream) is checked.
#
# Cleanup (trap on EXIT/INT/TERM): kills the processes this script started, by pid; deletes its
# namespaces (names carry this script's pid) and the UAPI sockets of its interfaces; removes its
# temporary directory (meshd data dirs and keys). Only traffic inside its own namespaces.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
RUNS=${RUNS:-3}
DUR=${DUR:-10}
PINGS=${PINGS:-20}
ENDPOINTS=${ENDPOINTS:-pods}
MESHD_MTU=${MESHD_MTU:-auto}
MESHD_ENGINE=${MESHD_ENGINE:-default}
OUT_DIR=${OUT_DIR:-$REPO/target/bench/overlay}
MESHD=$REPO/target/release/meshd

[ "$(id -u)" = 0 ] || { echo "overlay.sh: needs root (network namespaces, TUN)" >&2; exit 1; }
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a positive integer" >&2; exit 1; }
case $ENDPOINTS in pods | nodes) ;; *) echo "ENDPOINTS must be pods or nodes" >&2; exit 1 ;; esac

T=$$
NA="mdb$T-a"; NB="mdb$T-b"                 # namespaces
VA="mdb$T-va"; VB="mdb$T-vb"               # veth ends (renamed veth0 inside)
MIA="mdw${T}a"; MIB="mdw${T}b"             # meshd interfaces (UAPI sockets are machine-wide: unique names)
WIA="wgo${T}a"; WIB="wgo${T}b"             # wireguard-go interfaces
UA=10.231.0.1; UB=10.231.0.2               # underlay
TA=10.232.0.1; TB=10.232.0.2               # wireguard-go tunnel
P_VETH=5201; P_MESHD=5202; P_WGGO=5203     # iperf3 servers in B

PIDS=()
NSS=()
TMP=""
FG=""
cleanup() {
  local rc=$? p n
  set +e
  [ -n "$FG" ] && kill "$FG" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  for n in "${NSS[@]}"; do ip netns del "$n" 2>/dev/null; done
  for n in "$MIA" "$MIB" "$WIA" "$WIB"; do rm -f "/var/run/wireguard/$n.sock"; done
  [ -n "$TMP" ] && rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start LOG CMD... : start CMD in the background (ip netns exec execs, so $! is the daemon itself)
start() {
  local log=$1
  shift
  "$@" </dev/null >"$log" 2>&1 &
  BG=$!
  PIDS+=("$BG")
}

# run_fg CMD... : run CMD in the background and wait for it, so that a signal runs the trap at once
# (bash defers traps while a foreground child runs); returns CMD's status
run_fg() {
  "$@" &
  FG=$!
  local rc=0
  wait "$FG" || rc=$?
  FG=""
  return "$rc"
}

wait_for() { # SECONDS CMD...
  local s=$1 i
  shift
  for i in $(seq $((s * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "overlay.sh: timeout ($s s) waiting for: $*" >&2
  return 1
}

cpu_ticks() { # PID... -> "utime stime" summed over the processes (whole thread groups), clock ticks
  local u=0 s=0 p a b
  for p in "$@"; do
    read -r a b < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}')
    u=$((u + a)); s=$((s + b))
  done
  echo "$u $s"
}

tun_drops() { # NS:IF... -> rx+tx dropped packets summed over the interfaces
  local t=0 x
  for x in "$@"; do
    t=$((t + $(ip -n "${x%%:*}" -s -j link show dev "${x#*:}" | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["rx"]["dropped"] + s["tx"]["dropped"])')))
  done
  echo "$t"
}

# add_pod NODE_NS POD_NS HOST_VETH POD_IP GW_IP MTU : a routed "pod" namespace behind NODE_NS
add_pod() {
  local node=$1 pod=$2 hv=$3 pip=$4 gw=$5 mtu=$6
  ip netns add "$pod"
  NSS+=("$pod")
  ip -n "$pod" link set lo up
  ip link add "$hv" mtu "$mtu" type veth peer name "${hv}p" mtu "$mtu"
  ip link set "$hv" netns "$node"
  ip link set "${hv}p" netns "$pod"
  ip -n "$pod" link set "${hv}p" name eth0
  ip -n "$pod" addr add "$pip/32" dev eth0
  ip -n "$pod" link set eth0 up
  ip -n "$pod" route add "$gw/32" dev eth0
  ip -n "$pod" route add default via "$gw" dev eth0
  ip -n "$node" addr add "$gw/32" dev "$hv"
  ip -n "$node" link set "$hv" up
  ip -n "$node" route add "$pip/32" dev "$hv"
}

cpu_busy_idle() { # -> "busy idle" jiffies of the whole machine (all CPUs; iowait counts as idle)
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat
}

udp_rcvbuf_errs() { # sum over both namespaces
  local n t=0 v
  for n in "$NA" "$NB"; do
    v=$(ip netns exec "$n" nstat -asz UdpRcvbufErrors 2>/dev/null | awk '/UdpRcvbufErrors/ {print $2}')
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

echo "== dependencies and build"
MESHD_BENCH_DEPS=1 deploy/install-deps.sh
command -v nstat >/dev/null || { echo "nstat missing (iproute2)" >&2; exit 1; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then cargo build -q --release -p meshd; fi
[ -x "$MESHD" ] || { echo "$MESHD missing (cargo build --release -p meshd)" >&2; exit 1; }
"$MESHD" run --help | grep -q -- --wg-interface || { echo "this meshd has no WireGuard mesh" >&2; exit 1; }

mkdir -p "$OUT_DIR"
# only what an earlier run of this script wrote there
rm -f "$OUT_DIR"/{veth,meshd,wireguard-go}-P[14]-r*.json "$OUT_DIR"/{veth,meshd,wireguard-go}-ping-r*.txt \
  "$OUT_DIR"/{meshd,wggo,iperf3-server}-*.log "$OUT_DIR"/{results.tsv,summary.md,devices.txt}
TMP=$(mktemp -d /tmp/meshd-bench-overlay.XXXXXX)
HZ=$(getconf CLK_TCK)
LOAD0=$(cut -d' ' -f1 /proc/loadavg)
START=$(date -u +%FT%TZ)

echo "== namespaces $NA / $NB, veth $UA <-> $UB"
for n in "$NA" "$NB"; do
  ip netns add "$n"
  NSS+=("$n")
  ip -n "$n" link set lo up
done
ip link add "$VA" type veth peer name "$VB"
ip link set "$VA" netns "$NA"
ip link set "$VB" netns "$NB"
ip -n "$NA" link set "$VA" name veth0
ip -n "$NB" link set "$VB" name veth0
ip -n "$NA" addr add "$UA/24" dev veth0
ip -n "$NB" addr add "$UB/24" dev veth0
ip -n "$NA" link set veth0 up
ip -n "$NB" link set veth0 up

echo "== meshd: control plane in $NA, joined node in $NB"
DA=$TMP/cp; DB=$TMP/node
ip netns exec "$NA" "$MESHD" init --data-dir "$DA" --node-name benchcp --advertise-address "$UA" \
  >"$OUT_DIR/meshd-init.log"
MTU_ARGS=()
[ "$MESHD_MTU" = auto ] || MTU_ARGS=(--mtu "$MESHD_MTU")
[ "$MESHD_ENGINE" = default ] || MTU_ARGS+=(--wg-engine "$MESHD_ENGINE")
start "$OUT_DIR/meshd-a.log" ip netns exec "$NA" "$MESHD" run --data-dir "$DA" --wg-interface "$MIA" \
  --subnet-env "$DA/subnet.env" --cni-conf "$DA/cni.conflist" "${MTU_ARGS[@]}"
MPA=$BG
wait_for 30 ip netns exec "$NA" bash -c "exec 3<>/dev/tcp/$UA/7443"
JSON=$(ip netns exec "$NA" "$MESHD" token create --data-dir "$DA" --ttl 1h --description bench --output json)
TOK=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$JSON")
HASH=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_hash"])' <<<"$JSON")
ip netns exec "$NB" "$MESHD" join --data-dir "$DB" --server "$UA:7443" --token "$TOK" --ca-hash "$HASH" \
  --node-name benchn1 --advertise-address "$UB" >"$OUT_DIR/meshd-join.log"
start "$OUT_DIR/meshd-b.log" ip netns exec "$NB" "$MESHD" run --data-dir "$DB" --wg-interface "$MIB" \
  --subnet-env "$DB/subnet.env" --cni-conf "$DB/cni.conflist" "${MTU_ARGS[@]}"
MPB=$BG
tun_addr() { ip -n "$1" -4 -o addr show dev "$2" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1; }
has_addr() { [ -n "$(tun_addr "$1" "$2")" ]; }
wait_for 30 has_addr "$NA" "$MIA"
wait_for 30 has_addr "$NB" "$MIB"
MA=$(tun_addr "$NA" "$MIA"); MB=$(tun_addr "$NB" "$MIB")
wait_for 30 ip netns exec "$NA" ping -c 1 -W 1 "$MB"
link_mtu() { ip -n "$1" -j link show dev "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["mtu"])'; }
echo "   meshd tunnel $MA <-> $MB (pids $MPA $MPB): up; MTU $(link_mtu "$NA" "$MIA") / $(link_mtu "$NB" "$MIB")"
if [ "$(link_mtu "$NA" "$MIA")" != 1420 ] || [ "$(link_mtu "$NB" "$MIB")" != 1420 ]; then
  echo "overlay.sh: meshd's tunnel MTU is not 1420 (wireguard-go's): not a like-for-like comparison; set MESHD_MTU=1420" >&2
  exit 1
fi
for p in "$MPA" "$MPB"; do
  [ "$(cat "/proc/$p/comm")" = meshd ] || { echo "pid $p is not meshd" >&2; exit 1; }
done

echo "== wireguard-go in both namespaces"
(umask 077
  wg genkey >"$TMP/a.key"; wg pubkey <"$TMP/a.key" >"$TMP/a.pub"
  wg genkey >"$TMP/b.key"; wg pubkey <"$TMP/b.key" >"$TMP/b.pub")
start "$OUT_DIR/wggo-a.log" ip netns exec "$NA" wireguard-go -f "$WIA"
WPA=$BG
start "$OUT_DIR/wggo-b.log" ip netns exec "$NB" wireguard-go -f "$WIB"
WPB=$BG
wait_for 10 test -S "/var/run/wireguard/$WIA.sock"
wait_for 10 test -S "/var/run/wireguard/$WIB.sock"
ip netns exec "$NA" wg set "$WIA" private-key "$TMP/a.key" listen-port 51821 \
  peer "$(cat "$TMP/b.pub")" allowed-ips "$TB/32" endpoint "$UB:51821"
ip netns exec "$NB" wg set "$WIB" private-key "$TMP/b.key" listen-port 51821 \
  peer "$(cat "$TMP/a.pub")" allowed-ips "$TA/32" endpoint "$UA:51821"
ip -n "$NA" addr add "$TA/24" dev "$WIA"; ip -n "$NA" link set "$WIA" up
ip -n "$NB" addr add "$TB/24" dev "$WIB"; ip -n "$NB" link set "$WIB" up
wait_for 20 ip netns exec "$NA" ping -c 1 -W 1 "$TB"
echo "   wireguard-go tunnel $TA <-> $TB (pids $WPA $WPB): up"
for p in "$WPA" "$WPB"; do
  [ "$(cat "/proc/$p/comm")" = wireguard-go ] || { echo "pid $p is not wireguard-go" >&2; exit 1; }
done

# Endpoints of each path: client namespace (side A), server namespace (side B), destination address.
if [ "$ENDPOINTS" = pods ]; then
  echo "== pods: one per path and side, routed behind the node namespaces"
  ip netns exec "$NA" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$NB" sysctl -qw net.ipv4.ip_forward=1
  # meshd: pod = lease network + 10, gateway = lease network + 1 (as CNI's host-local/bridge would)
  plus() { python3 -c 'import ipaddress,sys; print(ipaddress.ip_address(sys.argv[1]) + int(sys.argv[2]))' "$1" "$2"; }
  MTU_M=$(link_mtu "$NB" "$MIB")
  add_pod "$NA" "$NA-pm" "mdb${T}pma" "$(plus "$MA" 10)" "$(plus "$MA" 1)" "$MTU_M"
  add_pod "$NB" "$NB-pm" "mdb${T}pmb" "$(plus "$MB" 10)" "$(plus "$MB" 1)" "$MTU_M"
  # wireguard-go: pods in 10.233.1.0/24 (A) and 10.233.2.0/24 (B), added to AllowedIPs and routed
  add_pod "$NA" "$NA-pw" "mdb${T}pwa" 10.233.1.10 10.233.1.1 1420
  add_pod "$NB" "$NB-pw" "mdb${T}pwb" 10.233.2.10 10.233.2.1 1420
  ip netns exec "$NA" wg set "$WIA" peer "$(cat "$TMP/b.pub")" allowed-ips "$TB/32,10.233.2.0/24"
  ip netns exec "$NB" wg set "$WIB" peer "$(cat "$TMP/a.pub")" allowed-ips "$TA/32,10.233.1.0/24"
  ip -n "$NA" route add 10.233.2.0/24 dev "$WIA"
  ip -n "$NB" route add 10.233.1.0/24 dev "$WIB"
  # veth: pods in 10.234.1.0/24 (A) and 10.234.2.0/24 (B), routed over the underlay
  add_pod "$NA" "$NA-pv" "mdb${T}pva" 10.234.1.10 10.234.1.1 1500
  add_pod "$NB" "$NB-pv" "mdb${T}pvb" 10.234.2.10 10.234.2.1 1500
  ip -n "$NA" route add 10.234.2.0/24 via "$UB" dev veth0
  ip -n "$NB" route add 10.234.1.0/24 via "$UA" dev veth0
  CL_VETH=$NA-pv; SV_VETH=$NB-pv; D_VETH=10.234.2.10
  CL_MESHD=$NA-pm; SV_MESHD=$NB-pm; D_MESHD=$(plus "$MB" 10)
  CL_WGGO=$NA-pw; SV_WGGO=$NB-pw; D_WGGO=10.233.2.10
  wait_for 20 ip netns exec "$CL_VETH" ping -c 1 -W 1 "$D_VETH"
  wait_for 20 ip netns exec "$CL_MESHD" ping -c 1 -W 1 "$D_MESHD"
  wait_for 20 ip netns exec "$CL_WGGO" ping -c 1 -W 1 "$D_WGGO"
  echo "   pods: veth $CL_VETH -> $D_VETH, meshd $CL_MESHD -> $D_MESHD, wireguard-go $CL_WGGO -> $D_WGGO: reachable"
else
  CL_VETH=$NA; SV_VETH=$NB; D_VETH=$UB
  CL_MESHD=$NA; SV_MESHD=$NB; D_MESHD=$MB
  CL_WGGO=$NA; SV_WGGO=$NB; D_WGGO=$TB
fi

if [ -n "${TXQUEUELEN:-}" ]; then
  for x in "$NA:$MIA" "$NB:$MIB" "$NA:$WIA" "$NB:$WIB"; do ip -n "${x%%:*}" link set "${x#*:}" txqueuelen "$TXQUEUELEN"; done
  echo "   txqueuelen $TXQUEUELEN on the tunnel interfaces"
fi

{
  echo "# meshd"
  ip netns exec "$NA" wg show "$MIA"
  ip -n "$NA" link show "$MIA"
  ip -n "$NB" link show "$MIB"
  ip netns exec "$NA" "$MESHD" status --data-dir "$DA" --wg-interface "$MIA" || true
  echo "# wireguard-go"
  ip netns exec "$NA" wg show "$WIA"
  ip -n "$NA" link show "$WIA"
  ip -n "$NB" link show "$WIB"
} >"$OUT_DIR/devices.txt" 2>&1

echo "== iperf3 servers (side B)"
start "$OUT_DIR/iperf3-server-veth.log" ip netns exec "$SV_VETH" iperf3 -s -B "$D_VETH" -p $P_VETH
start "$OUT_DIR/iperf3-server-meshd.log" ip netns exec "$SV_MESHD" iperf3 -s -B "$D_MESHD" -p $P_MESHD
start "$OUT_DIR/iperf3-server-wggo.log" ip netns exec "$SV_WGGO" iperf3 -s -B "$D_WGGO" -p $P_WGGO
wait_for 10 ip netns exec "$SV_VETH" bash -c "ss -ltn | grep -q ':$P_VETH '"
wait_for 10 ip netns exec "$SV_MESHD" bash -c "ss -ltn | grep -q ':$P_MESHD '"
wait_for 10 ip netns exec "$SV_WGGO" bash -c "ss -ltn | grep -q ':$P_WGGO '"

RES=$OUT_DIR/results.tsv
printf 'round\tpath\tmetric\tvalue\n' >"$RES"
rec() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$RES"; }

# measure ROUND PATH CLIENT_NS DEST PORT [NS_A:IF_A NS_B:IF_B DAEMON_PID...]
measure() {
  local r=$1 path=$2 cl=$3 dst=$4 port=$5
  shift 5
  local ifs=() pids=() s f c0 c1 e0 e1 d0 d1 line a0 a1 m0 m1
  if [ $# -gt 0 ]; then ifs=("$1" "$2"); shift 2; pids=("$@"); fi
  for s in 1 4; do
    f="$OUT_DIR/$path-P$s-r$r.json"
    c0="0 0"; c1="0 0"; d0=0; d1=0
    e0=$(udp_rcvbuf_errs)
    m0=$(cpu_busy_idle)
    [ ${#pids[@]} -gt 0 ] && { c0=$(cpu_ticks "${pids[@]}"); a0=$(cpu_ticks "${pids[0]}"); d0=$(tun_drops "${ifs[@]}"); }
    run_fg timeout $((DUR + 30)) ip netns exec "$cl" iperf3 -c "$dst" -p "$port" -t "$DUR" -P "$s" -J >"$f" \
      || { echo "iperf3 $path -P $s failed (round $r); see $f" >&2; exit 1; }
    [ ${#pids[@]} -gt 0 ] && { c1=$(cpu_ticks "${pids[@]}"); a1=$(cpu_ticks "${pids[0]}"); d1=$(tun_drops "${ifs[@]}"); }
    m1=$(cpu_busy_idle)
    e1=$(udp_rcvbuf_errs)
    line=$(python3 - "$f" "$c0" "$c1" "$HZ" "${a0:-0 0}" "${a1:-0 0}" "$m0" "$m1" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
u0, s0 = map(int, sys.argv[2].split())
u1, s1 = map(int, sys.argv[3].split())
hz = int(sys.argv[4])
au0, as0 = map(int, sys.argv[5].split())
au1, as1 = map(int, sys.argv[6].split())
rcv = j["end"]["sum_received"]
gb = rcv["bytes"] / 1e9
cpu = (u1 - u0 + s1 - s0) / hz
cpu_a = (au1 - au0 + as1 - as0) / hz
mb0, mi0 = map(int, sys.argv[7].split())
mb1, mi1 = map(int, sys.argv[8].split())
busy = (mb1 - mb0) / max(mb1 - mb0 + mi1 - mi0, 1)
print("%.4f %.3f %d %.3f %.3f %.3f %.3f %.3f" % (rcv["bits_per_second"] / 1e9, cpu / gb,
      j["end"]["sum_sent"].get("retransmits", 0), (s1 - s0) / max(u1 - u0 + s1 - s0, 1),
      cpu / rcv["seconds"], cpu_a / rcv["seconds"], (cpu - cpu_a) / rcv["seconds"], busy))
EOF
)
    read -r gbps cpg retr sysf cores cores_a cores_b busy <<<"$line"
    rec "$r" "$path" "gbps$s" "$gbps"
    rec "$r" "$path" "retrans$s" "$retr"
    rec "$r" "$path" "busy$s" "$busy"
    printf '   round %s %-13s %s stream(s): %7s Gbit/s  retransmits %-6s machine busy %s' "$r" "$path" "$s" "$gbps" "$retr" "$busy"
    if [ ${#pids[@]} -gt 0 ]; then
      rec "$r" "$path" "cpu$s" "$cpg"
      rec "$r" "$path" "sysfrac$s" "$sysf"
      rec "$r" "$path" "cores$s" "$cores"
      rec "$r" "$path" "coresA$s" "$cores_a"
      rec "$r" "$path" "coresB$s" "$cores_b"
      rec "$r" "$path" "udpdrops$s" "$((e1 - e0))"
      rec "$r" "$path" "tundrops$s" "$((d1 - d0))"
      printf '  daemons %6s CPU-s/GB (%s cores: sender %s, receiver %s; %s in kernel)  drops: UDP rcvbuf %s, TUN %s' \
        "$cpg" "$cores" "$cores_a" "$cores_b" "$sysf" "$((e1 - e0))" "$((d1 - d0))"
    fi
    printf '\n'
  done
  f="$OUT_DIR/$path-ping-r$r.txt"
  run_fg ip netns exec "$cl" ping -c "$PINGS" -i 0.2 -w $((PINGS + 10)) -q "$dst" >"$f"
  rtt=$(awk -F/ '/^rtt|^round-trip/ {print $5}' "$f")
  rec "$r" "$path" rtt "$rtt"
  printf '   round %s %-13s ping avg %s ms\n' "$r" "$path" "$rtt"
}

PATHS=(veth meshd wireguard-go)
echo "== $RUNS round(s): iperf3 ${DUR} s, 1 and 4 streams; $PINGS pings"
for r in $(seq 1 "$RUNS"); do
  for i in 0 1 2; do
    p=${PATHS[$(((i + r - 1) % 3))]}
    case $p in
      veth) measure "$r" veth "$CL_VETH" "$D_VETH" $P_VETH ;;
      meshd) measure "$r" meshd "$CL_MESHD" "$D_MESHD" $P_MESHD "$NA:$MIA" "$NB:$MIB" "$MPA" "$MPB" ;;
      wireguard-go) measure "$r" wireguard-go "$CL_WGGO" "$D_WGGO" $P_WGGO "$NA:$WIA" "$NB:$WIB" "$WPA" "$WPB" ;;
    esac
  done
done
LOAD1=$(cut -d' ' -f1 /proc/loadavg)

echo
echo "== results ($START; endpoints: $ENDPOINTS; $RUNS rounds x ${DUR} s; load average $LOAD0 -> $LOAD1; $(nproc) CPUs)"
echo "   meshd $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') (engine $MESHD_ENGINE, boringtun $(awk '/^name = "boringtun"/ {getline; print $3}' "$REPO/Cargo.lock" | tr -d '"')), $(wireguard-go --version | head -1), $(iperf3 --version | head -1 | cut -d' ' -f1-2), kernel $(uname -r)"
python3 - "$RES" <<'EOF' | tee "$OUT_DIR/summary.md"
import csv, statistics, sys
from collections import defaultdict
v = defaultdict(dict)  # (path, metric) -> {round: value}
for row in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    v[(row["path"], row["metric"])][int(row["round"])] = float(row["value"])

def fmt(xs, d):
    if not xs:
        return "–"
    return "%.*f (%.*f–%.*f)" % (d, statistics.median(xs), d, min(xs), d, max(xs))

def vals(path, metric):
    return list(v.get((path, metric), {}).values())

def ratios(p, q, metric):
    a, b = v.get((p, metric), {}), v.get((q, metric), {})
    return [a[r] / b[r] for r in sorted(a) if r in b and b[r] > 0]

print("| path | TCP 1 stream, Gbit/s | TCP 4 streams, Gbit/s | ping RTT, ms | daemons' CPU-s per GB, 1 stream | 4 streams |")
print("|---|---|---|---|---|---|")
for p in ("veth", "meshd", "wireguard-go"):
    tun = p != "veth"
    print("| %s | %s | %s | %s | %s | %s |" % (
        p, fmt(vals(p, "gbps1"), 3), fmt(vals(p, "gbps4"), 3), fmt(vals(p, "rtt"), 3),
        fmt(vals(p, "cpu1"), 1) if tun else "–", fmt(vals(p, "cpu4"), 1) if tun else "–"))
print()
print("Diagnostics, 1 stream / 4 streams, median (min–max):")
print()
print("| path | TCP retransmits | UDP rcvbuf drops (both namespaces) | TUN drops (both interfaces) | whole machine busy (all CPUs, every process) | daemons' CPU, cores busy | sending side's daemon | receiving side's daemon | share of the daemons' CPU in the kernel |")
print("|---|---|---|---|---|---|---|---|---|")
for p in ("veth", "meshd", "wireguard-go"):
    tun = p != "veth"
    pair = lambda m, d: "%s / %s" % (fmt(vals(p, m + "1"), d), fmt(vals(p, m + "4"), d)) if tun else "–"
    print("| %s | %s / %s | %s | %s | %s / %s | %s | %s | %s | %s |" % (
        p, fmt(vals(p, "retrans1"), 0), fmt(vals(p, "retrans4"), 0), pair("udpdrops", 0),
        pair("tundrops", 0), fmt(vals(p, "busy1"), 2), fmt(vals(p, "busy4"), 2), pair("cores", 2), pair("coresA", 2), pair("coresB", 2), pair("sysfrac", 2)))
print()
print("Ratios, per round (same conditions), median (min–max):")
print()
print("| ratio | TCP 1 stream | TCP 4 streams | ping RTT | CPU-s per GB, 1 stream | 4 streams |")
print("|---|---|---|---|---|---|")
print("| meshd / wireguard-go | %s | %s | %s | %s | %s |" % tuple(
    fmt(ratios("meshd", "wireguard-go", m), 2) for m in ("gbps1", "gbps4", "rtt", "cpu1", "cpu4")))
print("| meshd / veth | %s | %s | %s | – | – |" % tuple(
    fmt(ratios("meshd", "veth", m), 3) for m in ("gbps1", "gbps4", "rtt")))
print("| wireguard-go / veth | %s | %s | %s | – | – |" % tuple(
    fmt(ratios("wireguard-go", "veth", m), 3) for m in ("gbps1", "gbps4", "rtt")))
r1 = ratios("meshd", "wireguard-go", "gbps1")
met = sum(1 for x in r1 if x >= 4)
print()
print("Target (meshd ≥ 4× wireguard-go, TCP 1 stream, same run): %s — median %.2f×, met in %d of %d rounds." % (
    "MET" if r1 and statistics.median(r1) >= 4 else "NOT MET", statistics.median(r1) if r1 else 0, met, len(r1)))
EOF
echo
echo "raw results: $OUT_DIR (results.tsv, iperf3 JSON, pings, daemon logs, devices.txt, summary.md)"
