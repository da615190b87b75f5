#!/usr/bin/env bash
# Builds voxtrald with candle's CUDA backend (cargo feature `cuda`, without the sound card) and
# copies it to dist/voxtrald-cuda, stripped and xz-compressed to dist/voxtrald-cuda.xz (what
# travels to a GPU machine; scripts/gpu-check.sh unpacks it).
#
#   scripts/build-cuda.sh [extra `cargo build` args, e.g. --locked]
#
# Uses nvcc 13.0.x from PATH, $CUDA_HOME or $CUDA_PATH; without one it installs the pinned NVIDIA
# toolkit wheels into a venv (.cuda-toolkit/, needs python3 and PyPI). The binary links no CUDA
# library: it loads libcuda, cuBLAS and cuRAND when a CUDA device is opened (driver >= 580 and
# CUDA 13 libraries on the target). See README "Building with CUDA".
#
# Environment:
#   CUDA_COMPUTE_CAP           PTX target (default 80, see below)
#   VOXTRALD_CUDA_TOOLKIT_DIR  venv location (default <repo>/.cuda-toolkit)
#   VOXTRALD_CUDA_TARGET_DIR   cargo target dir (default <repo>/target/cuda)
#   PYTHON                     interpreter for the venv (default python3)
set -euo pipefail

# --- nvcc shim mode (invoked through the link $CARGO_TARGET_DIR/nvcc-shim/bin/nvcc) ---------------
# candle-kernels compiles its moe/mmq static library (quantized matmuls, e.g. `--quant q8`) as SASS
# for CUDA_COMPUTE_CAP only (-gencode arch=compute_80,code=sm_80), which does not run on other
# major architectures (Hopper); launches there fail silently. Embed that arch's PTX as well so the
# driver JIT-compiles it, like the PTX of all other candle kernels.
if [[ $(basename "$0") == nvcc ]]; then
    compile=0
    for a in "$@"; do [[ $a == -c ]] && compile=1; done
    args=()
    for a in "$@"; do
        if ((compile)) && [[ $a =~ ^(-gencode=)?arch=(compute_[0-9]+[a-z]?),code=(sm_[0-9]+[a-z]?)$ ]]; then
            a="${BASH_REMATCH[1]}arch=${BASH_REMATCH[2]},code=[${BASH_REMATCH[3]},${BASH_REMATCH[2]}]"
        fi
        args+=("$a")
    done
    exec "$VOXTRALD_REAL_NVCC" "${args[@]}"
fi

# --- rustc wrapper mode -------------------------------------------------------------------------
# candle-core 0.11.1 turns on cudarc's `dynamic-linking` (DT_NEEDED libcuda.so.1, libcublas.so.13,
# ...: the binary would not even start without a driver, and linking needs every CUDA library).
# Cargo features cannot switch that off, and cudarc's build script rejects `dynamic-loading` next to
# it, so cargo runs this script as RUSTC_WRAPPER and it edits two rustc command lines:
#   cudarc:         drop the -l link libraries and set cfg feature="dynamic-loading" (cudarc then
#                   dlopens each library and symbol lazily; its sources support exactly that cfg);
#   candle_kernels: link the CUDA runtime of its moe/mmq static library statically (cudart_static
#                   dlopens libcuda itself) instead of needing libcudart.so.13 at run time.
if [[ -n ${VOXTRALD_CUDA_WRAP:-} ]]; then
    crate="" prev=""
    for a in "$@"; do
        [[ $prev == --crate-name ]] && crate=$a
        prev=$a
    done
    args=()
    case $crate in
    cudarc)
        skip=0
        for a in "$@"; do
            if ((skip)); then skip=0 && continue; fi
            case $a in
            -l) skip=1 && continue ;;
            -l*) continue ;;
            esac
            args+=("$a")
        done
        args+=(--cfg 'feature="dynamic-loading"')
        ;;
    candle_kernels)
        for a in "$@"; do
            case $a in
            dylib=cudart) a=static=cudart_static ;;
            -ldylib=cudart) a=-lstatic=cudart_static ;;
            esac
            args+=("$a")
        done
        args+=(-L "native=$VOXTRALD_CUDA_LIBDIR")
        ;;
    *) args=("$@") ;;
    esac
    # Keep a wrapper the caller already had (e.g. sccache).
    if [[ -n ${VOXTRALD_INNER_RUSTC_WRAPPER:-} ]]; then
        exec "$VOXTRALD_INNER_RUSTC_WRAPPER" "${args[@]}"
    fi
    exec "${args[@]}"
fi

# --- toolkit ------------------------------------------------------------------------------------
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# One CUDA 13.0 release (13.0 Update 1): PTX from a newer nvcc uses a PTX ISA that driver 580
# (CUDA 13.0) cannot JIT. CCCL has no 13.0.88 wheel; 13.0.85 (CCCL 3.0.1) is the one released with
# nvcc 13.0.88.
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.88
    nvidia-cuda-cccl==13.0.85
)

nvcc_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p'; }

find_system_nvcc() {
    local c
    for c in "$(command -v nvcc || true)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
        "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}"; do
        [[ -n $c && -x $c ]] || continue
        if [[ $(nvcc_release "$c") == 13.0 ]]; then
            echo "$c"
            return 0
        fi
        echo "build-cuda: ignoring $c (CUDA $(nvcc_release "$c"), need 13.0.x)" >&2
    done
    return 1
}

# Installs the pinned wheels into a venv and assembles a CUDA_HOME-shaped tree of links.
pip_toolkit() {
    local dir=${VOXTRALD_CUDA_TOOLKIT_DIR:-$repo/.cuda-toolkit}
    local venv=$dir/venv stamp=$dir/venv/voxtrald-pins
    if [[ ! -x $venv/bin/python ]]; then
        echo "build-cuda: creating $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    if [[ ! -f $stamp || $(cat "$stamp") != "${pins[*]}" ]]; then
        # --no-deps: nvcc's wheel asks for unpinned crt/nvvm/runtime; all five are pinned here.
        "$venv/bin/python" -m pip install --disable-pip-version-check --no-deps "${pins[@]}" >&2
        echo "${pins[*]}" >"$stamp"
    fi
    local cu
    cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
    [[ -x $cu/bin/nvcc ]] || { echo "build-cuda: no nvcc in $cu" >&2 && return 1; }
    # The wheels share one prefix (bin, include with crt/ and cccl/, lib, nvvm/bin/cicc), but
    # nvcc.profile and candle's tooling expect lib64 next to bin.
    local root=$dir/root
    mkdir -p "$root"
    local d
    for d in bin include nvvm lib; do ln -sfn "$cu/$d" "$root/$d"; done
    ln -sfn "$cu/lib" "$root/lib64"
    echo "$root"
}

if nvcc=$(find_system_nvcc); then
    cuda_root=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
    echo "build-cuda: using system nvcc $nvcc" >&2
else
    cuda_root=$(pip_toolkit)
    nvcc=$cuda_root/bin/nvcc
    echo "build-cuda: using pip toolkit in $cuda_root" >&2
fi

libdir=""
for d in "$cuda_root/lib64" "$cuda_root/lib" "$cuda_root/targets/x86_64-linux/lib" \
    /usr/lib/x86_64-linux-gnu; do
    if [[ -f $d/libcudart_static.a ]]; then libdir=$d && break; fi
done
[[ -n $libdir ]] || { echo "build-cuda: libcudart_static.a not found under $cuda_root" >&2 && exit 1; }

# Own target dir: the wrapper's artifacts must never be mixed with a plain `--features cuda` build.
export CARGO_TARGET_DIR=${VOXTRALD_CUDA_TARGET_DIR:-$repo/target/cuda}

# cudaforge (candle-kernels' build script) takes NVCC first (here the shim above; it derives the
# include dir from NVCC's location, hence the include link), then PATH; cudarc and others read the
# *_HOME/PATH/ROOT variables.
shim=$CARGO_TARGET_DIR/nvcc-shim
mkdir -p "$shim/bin"
ln -sfn "$repo/scripts/build-cuda.sh" "$shim/bin/nvcc"
ln -sfn "$cuda_root/include" "$shim/include"
export NVCC=$shim/bin/nvcc VOXTRALD_REAL_NVCC=$nvcc
export CUDA_HOME=$cuda_root CUDA_PATH=$cuda_root CUDA_ROOT=$cuda_root
PATH=$(dirname "$nvcc"):$PATH
export PATH
# 80 (Ampere) PTX: the driver JIT-compiles it for Ampere, Ada and Hopper. candle's bf16 kernels
# need >= 80 (below that they are compiled out and the moe/mmq library gets -DNO_BF16_KERNEL);
# fp8 kernels need 89. Do not use 90 for a portable build: cudaforge turns it into sm_90a, which
# loads on Hopper only. The moe/mmq static library gets this arch's SASS and PTX (nvcc shim above).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export VOXTRALD_INNER_RUSTC_WRAPPER=${RUSTC_WRAPPER:-}
export RUSTC_WRAPPER=$repo/scripts/build-cuda.sh VOXTRALD_CUDA_WRAP=1 VOXTRALD_CUDA_LIBDIR=$libdir

echo "build-cuda: $("$nvcc" --version | tail -n 2 | head -n 1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP;" \
    "target dir $CARGO_TARGET_DIR" >&2
start=$SECONDS
# JSON messages give the binary's path whatever --target/--profile was passed.
# The sound card (feature `playback`, ALSA) is left out unless VOXTRALD_CUDA_PLAYBACK=1: a GPU
# machine runs a CUDA image that may have no libasound, and the check needs no speakers.
features=(--no-default-features --features cuda)
[[ ${VOXTRALD_CUDA_PLAYBACK:-0} == 1 ]] && features=(--features cuda)
bin=$(cargo build --release "${features[@]}" --bin voxtrald --message-format=json-render-diagnostics "$@" |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[[ -n $bin ]] || { echo "build-cuda: cargo reported no executable" >&2 && exit 1; }
echo "build-cuda: built $bin in $((SECONDS - start)) s" >&2

mkdir -p dist
cp -f "$bin" dist/voxtrald-cuda
echo "build-cuda: copied to $repo/dist/voxtrald-cuda; ldd:" >&2
ldd dist/voxtrald-cuda >&2 || true
if ldd dist/voxtrald-cuda | grep -E 'lib(cuda|cudart|cublas|cublasLt|curand|nvrtc)\.so' >&2; then
    echo "build-cuda: warning: CUDA libraries are linked in (above); the binary needs them to start" >&2
fi
if readelf -d dist/voxtrald-cuda | grep -q 'NEEDED.*libasound'; then
    echo "build-cuda: note: this binary needs libasound.so.2 (ALSA) to start" >&2
fi
# Stripped and compressed, it travels to the device machine with the working tree (64 MiB in
# all); gpu-check.sh unpacks it.
strip -o dist/voxtrald-cuda.stripped dist/voxtrald-cuda
xz -T0 -9 -c dist/voxtrald-cuda.stripped >dist/voxtrald-cuda.xz
rm -f dist/voxtrald-cuda.stripped
echo "build-cuda: dist/voxtrald-cuda.xz, $(stat -c %s dist/voxtrald-cuda.xz) bytes" >&2
scripts/device-payload.sh dist/voxtrald-cuda.xz >&2
