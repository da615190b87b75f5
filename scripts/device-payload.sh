#!/usr/bin/env bash
# What one call of the device tool would send: the working tree (tracked files and untracked
# ones git does not ignore) plus the carried paths given as arguments, against its 64 MiB limit.
#
#   scripts/device-payload.sh dist/voxtrald-cuda.xz
#
# Exits 1 when it would not fit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z --cached --others --exclude-standard |
    xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=0
for p in "$@"; do
    [[ -e $p ]] || { echo "device-payload: $p does not exist" >&2 && exit 2; }
    carried=$((carried + $(du -sb -- "$p" | cut -f1)))
done
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "device payload: tree $(mib "$tree") + carried $(mib "$carried") = $(mib "$total")" \
    "of $(mib "$limit")"
if ((total > limit)); then
    echo "device payload: too large for one call; carry less" >&2
    exit 1
fi
