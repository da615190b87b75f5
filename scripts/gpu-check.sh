#!/usr/bin/env bash
# The GPU check of issue 5, in one run (about 6-8 minutes on an H100): CUDA against the f32 CPU
# path on the tiny fixture and on a `bench` random checkpoint, then benchmarks and peak GPU
# memory on a `full` random checkpoint (the real model's shapes), bf16 and q8.
#
#   scripts/gpu-check.sh            # uses dist/voxtrald-cuda (scripts/build-cuda.sh makes it)
#   VOXTRALD_BIN=path/to/voxtrald scripts/gpu-check.sh
#
# Needs an NVIDIA driver >= 580 and the CUDA 13 libraries (cuBLAS, cuRAND) on the loader path,
# nvidia-smi, and about 12 GB of free disk for the random checkpoints (in $WORK, default /tmp).
# Prints a summary at the end; every step's full output goes to $WORK/logs.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${VOXTRALD_BIN:-$repo/dist/voxtrald-cuda}
work=${WORK:-/tmp/voxtrald-gpu-check}
fixture=$repo/tests/fixtures/voxtral-tiny
mkdir -p "$work/logs"
summary=$work/summary.txt
: >"$summary"
status=0

note() { echo "$*" | tee -a "$summary"; }

# Runs a step, keeps its log, records pass/fail and the JSON line it printed, if any.
step() {
    local name=$1
    shift
    local log=$work/logs/$name.log t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        note "PASS $name ($((SECONDS - t0)) s): $(grep -E '^\{' "$log" | tail -1)"
    else
        note "FAIL $name ($((SECONDS - t0)) s): $(tail -3 "$log" | tr '\n' ' ')"
        status=1
    fi
}

# Runs a step while nvidia-smi samples used memory every 50 ms; reports the peak.
with_peak_memory() {
    local name=$1
    shift
    local samples=$work/logs/$name.mem
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$samples" &
    local smi=$!
    step "$name" "$@"
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    note "     peak GPU memory during $name: $(sort -n "$samples" | tail -1) MiB (baseline $(head -1 "$samples") MiB)"
}

[[ -x $bin ]] || { echo "gpu-check: no binary at $bin (run scripts/build-cuda.sh)" >&2 && exit 2; }
note "voxtrald GPU check, $(date -u +%FT%TZ)"
note "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
note "binary: $bin"

# 1. Parity with the f32 CPU path (teacher-forced frames, same noise).
step tiny-bf16 "$bin" dev compare --model "$fixture" --device cuda --dtype bf16
step tiny-q8 "$bin" dev compare --model "$fixture" --device cuda --dtype bf16 --quant q8 \
    --min-cos 0.99 --allow-code-changes
step tiny-f32 "$bin" dev compare --model "$fixture" --device cuda --dtype f32 --min-cos 0.99999
step bench-checkpoint "$bin" dev random-checkpoint --preset bench --out "$work/bench" --seed 1
step bench-bf16 "$bin" dev compare --model "$work/bench" --device cuda --dtype bf16 \
    --allow-code-changes
step bench-q8 "$bin" dev compare --model "$work/bench" --device cuda --dtype bf16 --quant q8 \
    --min-cos 0.99 --allow-code-changes

# 2. Speed and memory on the real model's shapes.
step full-checkpoint "$bin" dev random-checkpoint --preset full --out "$work/full" --seed 2
with_peak_memory full-bf16 "$bin" bench --model "$work/full" --device cuda --dtype bf16 \
    --frames 100 --runs 3 --json
with_peak_memory full-q8 "$bin" bench --model "$work/full" --device cuda --dtype bf16 \
    --quant q8 --frames 100 --runs 3 --json
# Throughput with concurrent utterances decoded together (shared backbone steps and flow passes).
with_peak_memory full-streams "$bin" bench --model "$work/full" --device cuda --dtype bf16 \
    --frames 100 --runs 1 --streams 1,4,16 --json
# Two minutes of audio (1500 frames) in one stream: the memory bound of the issue.
with_peak_memory full-bf16-2min "$bin" bench --model "$work/full" --device cuda --dtype bf16 \
    --frames 1500 --runs 1 --json
# The refusal before loading when the memory is not there.
if "$bin" say --model "$work/full" --device cuda --max-memory 2GiB --out "$work/x.wav" Hi \
    >"$work/logs/refuse.log" 2>&1; then
    note "FAIL refuse: loaded despite --max-memory 2GiB"
    status=1
else
    note "PASS refuse: $(tail -1 "$work/logs/refuse.log")"
fi

note ""
note "summary in $summary, logs in $work/logs"
rm -rf "$work/full" "$work/bench"
exit $status
