#!/usr/bin/env bash
# Writes <component>.txt, the flags present in EVERY given Kubernetes release, from the binaries'
# own --help. Usage: update-from-binaries.sh DIR_1.28 DIR_1.31 [...], each DIR holding kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy of one release (from the release's
# server and node tarballs). The files it writes replace the hand-cited lists.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINDIR... (one per Kubernetes release)" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  sets=()
  versions=()
  for d in "$@"; do
    f="$(mktemp)"
    "$d/$c" --help 2>&1 | grep -oE '^\s+(-[a-z], )?--[a-z0-9-]+' | grep -oE -- '--[a-z0-9-]+' | sort -u > "$f"
    sets+=("$f")
    versions+=("$("$d/$c" --version 2>/dev/null | awk '{print $NF}')")
  done
  out="$here/$c.txt"
  {
    echo "# $c: flags present in every one of ${versions[*]}, from each binary's --help"
    echo "# (written by update-from-binaries.sh)."
    cat "${sets[0]}" > "$out.tmp"
    for s in "${sets[@]:1}"; do comm -12 "$out.tmp" "$s" > "$out.tmp2"; mv "$out.tmp2" "$out.tmp"; done
    cat "$out.tmp"
  } > "$out.new"
  rm -f "$out.tmp" "${sets[@]}"
  mv "$out.new" "$out"
  echo "wrote $out ($(grep -c '^--' "$out") flags)"
done
