#!/usr/bin/env bash
# PKI issuance speed: meshd's PKI engine (in process, criterion) against the openssl CLI and cfssl,
# all in the same run (absolute figures drift between runs on a shared 2-vCPU machine: compare the
# ratios).
#
#  1. cargo bench -p meshd-pki --bench pki            -> mean of each bench from
#     target/criterion/pki/<bench>/new/estimates.json (criterion runs one thread: figures are per core)
#  2. openssl CLI, N_OPENSSL times: genpkey P-256 + req (CSR with SANs) + x509 -req signed by a CA,
#     once with the default trust store and once with SSL_CERT_FILE pointed at the CA (OpenSSL 3
#     otherwise parses the whole system CA bundle on every `x509 -req`)
#  3. cfssl gencert | cfssljson -bare, N_CFSSL times (ECDSA P-256)
#  4. process spawn baselines (`openssl version`, `cfssl version`) and, unless SPEED_SECONDS=0,
#     `openssl speed ecdsap256` pinned to one core
# Prints a Markdown table (meshd µs/cert, peers ms/cert, ratios, targets).
#
# Usage: deploy/bench/pki-vs-openssl.sh
#   env: N_OPENSSL (200) N_CFSSL (100) SPEED_SECONDS (3; 0 skips openssl speed) SKIP_CARGO (unset)
# Needs: cargo, openssl, cfssl + cfssljson (golang-cfssl), jq, awk; taskset (util-linux) for speed.
set -euo pipefail

N_OPENSSL="${N_OPENSSL:-200}"
N_CFSSL="${N_CFSSL:-100}"
SPEED_SECONDS="${SPEED_SECONDS:-3}"

# Targets of issue 2.
TARGET_CSR_PER_SEC=10000
TARGET_INVENTORY_MS=10

die() {
  echo "pki-vs-openssl: $*" >&2
  exit 1
}
for tool in cargo openssl cfssl cfssljson jq awk; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
[[ -n "${EPOCHREALTIME:-}" ]] || die "bash 5 or later is needed (EPOCHREALTIME)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/pki-bench.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { echo "$EPOCHREALTIME"; }
# ms_per T0 T1 N: milliseconds per iteration
ms_per() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.2f", (b - a) * 1000 / n }'; }
# calc EXPR [var=value ...]: evaluates an awk expression
calc() {
  local expr=$1
  shift
  local args=()
  for kv in "$@"; do args+=(-v "$kv"); done
  awk "${args[@]}" "BEGIN { printf \"%s\", ($expr) }"
}

log() { echo "== $*" >&2; }

load_start="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo '?')"

# ---------------------------------------------------------------- 1. meshd (criterion)
TARGET_DIR="${CARGO_TARGET_DIR:-}"
if [[ -z "$TARGET_DIR" ]]; then
  TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r '.target_directory')" ||
    die "cargo metadata failed"
fi
CRIT="$TARGET_DIR/criterion/pki"
STAMP="$TMP/stamp"
: >"$STAMP"
sleep 1 # so that files written by this run are strictly newer than the stamp
if [[ -z "${SKIP_CARGO:-}" ]]; then
  log "cargo bench -p meshd-pki --bench pki"
  (cd "$ROOT" && cargo bench -p meshd-pki --bench pki -- --color never) >"$TMP/bench.log" 2>&1 || {
    tail -n 40 "$TMP/bench.log" >&2
    die "cargo bench failed"
  }
  grep -E '^pki/|time:|thrpt:' "$TMP/bench.log" >&2 || true
fi

# mean_ns BENCH: criterion's mean estimate, ns
mean_ns() {
  local f="$CRIT/$1/new/estimates.json"
  [[ -f "$f" ]] || die "no criterion estimate at $f (did the bench run?)"
  if [[ -z "${SKIP_CARGO:-}" && ! "$f" -nt "$STAMP" ]]; then
    die "$f was not written by this run"
  fi
  local v
  v="$(jq -er '.mean.point_estimate' "$f")" || die "no mean in $f"
  echo "$v"
}
elements() {
  local f="$CRIT/$1/new/benchmark.json"
  [[ -f "$f" ]] || die "no $f"
  jq -er '.throughput.Elements // 1' "$f" || die "no throughput in $f"
}

csr_ns="$(mean_ns csr_parse_and_sign)"
sign_ns="$(mean_ns csr_sign_only)"
parse_ns="$(mean_ns csr_parse_only)"
inv_ns="$(mean_ns inventory_issue_all)"
inv_n="$(elements inventory_issue_all)"
inspect_ns="$(mean_ns inspect_der)"
keygen_ns="$(mean_ns keygen_p256)"
ring_sign_ns="$(mean_ns ring_p256_sign)"
ring_verify_ns="$(mean_ns ring_p256_verify)"

# ---------------------------------------------------------------- 2. openssl CLI
cd "$TMP"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
openssl req -new -x509 -key ca.key -subj "/CN=bench-ca" -days 1 -sha256 -out ca.crt \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
cat >leaf.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
EOF

# openssl_loop TAG: N_OPENSSL x (genpkey, req, x509 -req); prints ms per certificate
openssl_loop() {
  local tag=$1 i t0 t1
  mkdir -p "$tag"
  t0=$(now)
  for ((i = 0; i < N_OPENSSL; i++)); do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tag/$i.key" 2>/dev/null
    openssl req -new -key "$tag/$i.key" -subj "/O=system:nodes/CN=system:node:n$i" \
      -addext "subjectAltName=DNS:n$i,IP:192.0.2.21" -out "$tag/$i.csr"
    openssl x509 -req -in "$tag/$i.csr" -CA ca.crt -CAkey ca.key -set_serial "$((i + 1))" -days 1 \
      -sha256 -copy_extensions copy -extfile leaf.ext -out "$tag/$i.crt" 2>/dev/null
  done
  t1=$(now)
  openssl verify -CAfile ca.crt "$tag/0.crt" "$tag/$((N_OPENSSL - 1)).crt" >/dev/null ||
    die "openssl-issued certificates do not verify"
  rm -rf "$tag"
  ms_per "$t0" "$t1" "$N_OPENSSL"
}

log "openssl CLI x $N_OPENSSL (default trust store)"
# The default trust store: the caller's SSL_CERT_FILE/SSL_CERT_DIR (often exported) are dropped.
os_ms="$(
  unset SSL_CERT_FILE SSL_CERT_DIR
  openssl_loop os
)"
log "openssl CLI x $N_OPENSSL (SSL_CERT_FILE=CA)"
os_ca_ms="$(SSL_CERT_FILE="$TMP/ca.crt" SSL_CERT_DIR="$TMP/no-such-dir" openssl_loop osn)"
t0=$(now)
for ((i = 0; i < N_OPENSSL; i++)); do openssl version >/dev/null; done
t1=$(now)
os_spawn_ms="$(ms_per "$t0" "$t1" "$N_OPENSSL")"

# ---------------------------------------------------------------- 3. cfssl
cat >ca-csr.json <<'EOF'
{"CN":"bench-ca","key":{"algo":"ecdsa","size":256},"ca":{"expiry":"24h"}}
EOF
cat >cfg.json <<'EOF'
{"signing":{"default":{"expiry":"24h"},
 "profiles":{"node":{"expiry":"24h","usages":["digital signature","server auth"]}}}}
EOF
cat >node.json <<'EOF'
{"CN":"system:node:n1","names":[{"O":"system:nodes"}],"hosts":["n1","192.0.2.21"],
 "key":{"algo":"ecdsa","size":256}}
EOF
cfssl gencert -initca ca-csr.json 2>/dev/null | cfssljson -bare cfca
[[ -s cfca.pem && -s cfca-key.pem ]] || die "cfssl could not make its CA"
log "cfssl gencert | cfssljson x $N_CFSSL"
mkdir -p cf
t0=$(now)
for ((i = 0; i < N_CFSSL; i++)); do
  cfssl gencert -ca cfca.pem -ca-key cfca-key.pem -config cfg.json -profile node node.json 2>/dev/null |
    cfssljson -bare "cf/n$i"
done
t1=$(now)
cf_ms="$(ms_per "$t0" "$t1" "$N_CFSSL")"
openssl verify -CAfile cfca.pem "cf/n0.pem" "cf/n$((N_CFSSL - 1)).pem" >/dev/null ||
  die "cfssl-issued certificates do not verify"
t0=$(now)
for ((i = 0; i < N_CFSSL; i++)); do cfssl version >/dev/null; done
t1=$(now)
cf_spawn_ms="$(ms_per "$t0" "$t1" "$N_CFSSL")"

# ---------------------------------------------------------------- 4. openssl speed
speed_sign="n/a"
speed_verify="n/a"
speed_label="skipped (SPEED_SECONDS=0)"
if [[ "$SPEED_SECONDS" != 0 ]]; then
  speed_label="taskset -c 0, ${SPEED_SECONDS}s"
  log "openssl speed -seconds $SPEED_SECONDS ecdsap256 (one core)"
  pin=()
  command -v taskset >/dev/null 2>&1 && pin=(taskset -c 0)
  if "${pin[@]}" openssl speed -seconds "$SPEED_SECONDS" ecdsap256 >speed.txt 2>/dev/null; then
    read -r speed_sign speed_verify < <(awk '/ecdsa \(nistp256\)/ { print $(NF-1), $NF }' speed.txt) ||
      true
    [[ -n "${speed_sign:-}" ]] && speed_sign="$(calc 'sprintf("%.0f", x)' "x=$speed_sign")"
    [[ -n "${speed_verify:-}" ]] && speed_verify="$(calc 'sprintf("%.0f", x)' "x=$speed_verify")"
    speed_sign="${speed_sign:-n/a}"
    speed_verify="${speed_verify:-n/a}"
  else
    echo "openssl speed failed; skipping" >&2
  fi
fi

# ---------------------------------------------------------------- report
fmt_us() { calc 'sprintf("%.1f", x / 1000)' "x=$1"; }
per_entry_ns="$(calc 'x / n' "x=$inv_ns" "n=$inv_n")"
csr_per_s="$(calc 'sprintf("%.0f", 1e9 / x)' "x=$csr_ns")"
sign_per_s="$(calc 'sprintf("%.0f", 1e9 / x)' "x=$sign_ns")"
inv_ms="$(calc 'sprintf("%.3f", x / 1e6)' "x=$inv_ns")"
ratio() { calc 'sprintf("%.0f", (ms * 1e6) / ns)' "ms=$1" "ns=$2"; }
pass() { if [[ "$(calc "$1" "${@:2}")" == 1 ]]; then echo "met"; else echo "NOT met"; fi; }
csr_ok="$(pass 'x >= t' "x=$csr_per_s" "t=$TARGET_CSR_PER_SEC")"
sign_ok="$(pass 'x >= t' "x=$sign_per_s" "t=$TARGET_CSR_PER_SEC")"
inv_ok="$(pass 'x < t' "x=$inv_ms" "t=$TARGET_INVENTORY_MS")"
ring_sign_per_s="$(calc 'sprintf("%.0f", 1e9 / x)' "x=$ring_sign_ns")"
ring_verify_per_s="$(calc 'sprintf("%.0f", 1e9 / x)' "x=$ring_verify_ns")"

cat <<EOF

## PKI issuance, same run: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) vCPU, load average at start $load_start, $(openssl version | awk '{print $1, $2}'), $(cfssl version 2>/dev/null | awk '/^Version/ {print "cfssl " $2}')

| what | per certificate |
|---|---|
| meshd: P-256 key + signed leaf, in process (whole inventory / $inv_n entries) | $(fmt_us "$per_entry_ns") µs |
| meshd: CSR parse (self-signature verified) + policy + sign | $(fmt_us "$csr_ns") µs |
| meshd: sign only (CSR pre-parsed) | $(fmt_us "$sign_ns") µs |
| meshd: CSR parse only (self-signature verified) | $(fmt_us "$parse_ns") µs |
| meshd: P-256 key generation alone | $(fmt_us "$keygen_ns") µs |
| meshd: inspect_der (parse one leaf) | $(fmt_us "$inspect_ns") µs |
| openssl CLI: genpkey + req + x509 -req (N=$N_OPENSSL) | $os_ms ms |
| openssl CLI: same, SSL_CERT_FILE=CA (N=$N_OPENSSL) | $os_ca_ms ms |
| openssl: bare process spawn (openssl version) | $os_spawn_ms ms |
| cfssl gencert \| cfssljson -bare (N=$N_CFSSL) | $cf_ms ms |
| cfssl: bare process spawn (cfssl version) | $cf_spawn_ms ms |

| ratio (peer / meshd, both making a P-256 key and a signed leaf) | |
|---|---|
| openssl CLI / meshd | $(ratio "$os_ms" "$per_entry_ns")x |
| openssl CLI with SSL_CERT_FILE / meshd | $(ratio "$os_ca_ms" "$per_entry_ns")x |
| cfssl / meshd | $(ratio "$cf_ms" "$per_entry_ns")x |

| target | measured | |
|---|---|---|
| >= $TARGET_CSR_PER_SEC CSR signatures/s per core (parse + verify + policy + sign) | $csr_per_s/s | $csr_ok |
| same, sign only (CSR pre-parsed) | $sign_per_s/s | $sign_ok |
| whole control-plane inventory ($inv_n keys + certificates) < $TARGET_INVENTORY_MS ms | $inv_ms ms | $inv_ok |

| raw ECDSA P-256, one core | sign/s | verify/s |
|---|---|---|
| ring (in the bench) | $ring_sign_per_s | $ring_verify_per_s |
| openssl speed ecdsap256 ($speed_label) | $speed_sign | $speed_verify |
EOF
