#!/usr/bin/env bash
# The GPU check, in one device call (under 8 minutes on an H100/H200): parity of CUDA bf16 and
# q8 with the f32 CPU path on the tiny fixture, then, on a `full` random checkpoint (the real
# model's shapes) written to the machine's local disk, bf16 and q8 benchmarks with peak GPU
# memory, 1/4/16 streams decoded together, first audio, a two-minute run, and the refusal of a
# load over --max-memory. The summary is printed last; logs go to $OUT when it is set.
#
#   scripts/gpu-check.sh                 # on the GPU machine
#   scripts/gpu-check.sh --device cpu    # the same steps on the CPU and tiny checkpoints (CI)
#
# The binary: $VOXTRALD_BIN, else dist/voxtrald-cuda, else dist/voxtrald-cuda.xz unpacked
# (scripts/build-cuda.sh makes both). On a GPU it finds the driver (/usr/local/nvidia, the
# system) and the CUDA 13 libraries (the nvidia-* Python packages python3 knows, or
# LD_LIBRARY_PATH) by itself and says where.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
device=cuda
while [[ $# -gt 0 ]]; do
    case $1 in
    --device) device=${2:-} && shift 2 ;;
    --device=*) device=${1#*=} && shift ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2 && exit 2 ;;
    esac
done
[[ $device == cuda || $device == cpu ]] || { echo "gpu-check: --device cuda or cpu" >&2 && exit 2; }

scratch=${WORK:-/tmp/voxtrald-gpu-check}
logs=$scratch/logs
rm -rf "$logs" && mkdir -p "$logs"
summary=$scratch/summary.txt
: >"$summary"
status=0
fixture=$repo/tests/fixtures/voxtral-tiny
start_all=$SECONDS

note() { echo "$*" | tee -a "$summary"; }

# Runs a step, keeps its log, records pass/fail and the last JSON line it printed.
step() {
    local name=$1
    shift
    local log=$logs/$name.log t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        note "PASS $name ($((SECONDS - t0)) s): $(grep -E '^\{' "$log" | tail -1 | cut -c1-600)"
    else
        note "FAIL $name ($((SECONDS - t0)) s): $(tail -3 "$log" | tr '\n' ' ' | cut -c1-600)"
        status=1
    fi
}

# A step with the GPU's used memory sampled every 50 ms by nvidia-smi; reports the peak.
measured() {
    local name=$1
    shift
    if [[ $device != cuda ]]; then
        step "$name" "$@"
        return
    fi
    local samples=$logs/$name.mem
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$samples" 2>/dev/null &
    local smi=$!
    step "$name" "$@"
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    note "     peak GPU memory during $name: $(sort -n "$samples" | tail -1) MiB (idle $(head -1 "$samples") MiB)"
}

finish() {
    note ""
    note "gpu-check --device $device: $(grep -c '^PASS' "$summary") passed, $(grep -c '^FAIL' "$summary") failed, $((SECONDS - start_all)) s"
    if [[ -n ${OUT:-} ]]; then
        cp "$summary" "$OUT/summary.txt"
        tar -czf "$OUT/logs.tar.gz" -C "$scratch" logs 2>/dev/null
    fi
    rm -rf "$scratch/ckpt"
    echo
    echo "---- summary ----"
    tail -n 38 "$summary"
    exit $status
}

# The binary.
bin=${VOXTRALD_BIN:-}
if [[ -z $bin ]]; then
    if [[ -x $repo/dist/voxtrald-cuda ]]; then
        bin=$repo/dist/voxtrald-cuda
    elif [[ -f $repo/dist/voxtrald-cuda.xz ]]; then
        bin=$scratch/voxtrald-cuda
        packed=$repo/dist/voxtrald-cuda.xz
        # xz, else Python's lzma: a CUDA image may have either.
        if command -v xz >/dev/null; then
            xz -dc "$packed" >"$bin"
        else
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$packed" "$bin"
        fi && chmod +x "$bin" || { echo "gpu-check: cannot unpack $packed" >&2 && exit 2; }
    else
        echo "gpu-check: no binary: set VOXTRALD_BIN or run scripts/build-cuda.sh" >&2
        exit 2
    fi
fi
note "voxtrald GPU check, $(date -u +%FT%TZ), device $device"
note "binary: $bin ($(stat -c %s "$bin") bytes)"

# The libraries, found where this machine keeps them.
if [[ $device == cuda ]]; then
    dirs=()
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
        [[ -e $d/libcuda.so.1 ]] && dirs+=("$d")
    done
    py_dirs=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = set()
try:
    import nvidia
    roots.update(nvidia.__path__)
except Exception:
    pass
for sp in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    if sp and os.path.isdir(os.path.join(sp, "nvidia")):
        roots.add(os.path.join(sp, "nvidia"))
seen = []
for r in sorted(roots):
    for lib in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13"):
        for f in glob.glob(os.path.join(r, "**", lib), recursive=True):
            d = os.path.dirname(f)
            if d not in seen:
                seen.append(d)
print("\n".join(seen))
EOF
    )
    while IFS= read -r d; do [[ -n $d ]] && dirs+=("$d"); done <<<"$py_dirs"
    joined=$(IFS=:; echo "${dirs[*]}")
    export LD_LIBRARY_PATH=$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
        found=""
        for d in ${LD_LIBRARY_PATH//:/ }; do
            [[ -e $d/$lib ]] && found=$d/$lib && break
        done
        note "library $lib: ${found:-NOT FOUND}"
    done
    note "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
fi
# A binary that cannot start here says why at once (a missing ALSA, say).
if missing=$(ldd "$bin" 2>/dev/null | grep 'not found'); then
    note "FAIL start: the loader cannot find: $(echo "$missing" | tr '\n' ' ')"
    status=1
    finish
fi

ckpt=$scratch/ckpt
mkdir -p "$ckpt"
if [[ $device == cuda ]]; then
    gpu=(--device cuda --dtype bf16)
    q8=(--device cuda --dtype bf16 --quant q8)
    preset=full
    frames=100
    long=1500
else
    gpu=(--device cpu --dtype bf16)
    q8=(--device cpu --dtype f32 --quant q8)
    preset=tiny
    frames=12
    long=60
fi

# 1. Parity with the f32 CPU path (teacher-forced frames, same noise), on the tiny fixture.
step tiny-bf16 "$bin" dev compare --model "$fixture" "${gpu[@]}"
step tiny-q8 "$bin" dev compare --model "$fixture" "${q8[@]}" --min-cos 0.99 --allow-code-changes
if [[ $device == cuda ]]; then
    step tiny-f32 "$bin" dev compare --model "$fixture" --device cuda --dtype f32 --min-cos 0.99999
fi

# 2. Speed and memory on the real model's shapes (a random checkpoint on local disk).
step checkpoint "$bin" dev random-checkpoint --preset "$preset" --out "$ckpt/model" --seed 2
measured bench-bf16 "$bin" bench --model "$ckpt/model" "${gpu[@]}" --frames "$frames" --runs 3 --json
measured bench-q8 "$bin" bench --model "$ckpt/model" "${q8[@]}" --frames "$frames" --runs 3 --json
# Concurrent utterances decoded together (shared backbone steps and flow passes).
measured streams "$bin" bench --model "$ckpt/model" "${gpu[@]}" --frames "$frames" --runs 1 \
    --streams 1,4,16 --json
# Two minutes of audio (1500 frames) in one stream: the memory bound.
measured long-run "$bin" bench --model "$ckpt/model" "${gpu[@]}" --frames "$long" --runs 1 --json
# The refusal before loading when the memory is not there.
limit=2GiB
[[ $device == cpu ]] && limit=64KiB
if "$bin" say --model "$ckpt/model" "${gpu[@]}" --max-memory "$limit" --out "$scratch/x.wav" Hi \
    >"$logs/refuse.log" 2>&1; then
    note "FAIL refuse: loaded despite --max-memory $limit"
    status=1
elif grep -q "not enough memory" "$logs/refuse.log"; then
    note "PASS refuse: $(tail -1 "$logs/refuse.log" | cut -c1-300)"
else
    note "FAIL refuse: another error: $(tail -1 "$logs/refuse.log" | cut -c1-300)"
    status=1
fi
finish
