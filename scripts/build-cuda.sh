#!/usr/bin/env bash
# Builds `magpie --features cuda` (mistralrs with PagedAttention, llama.cpp with every layer on the
# GPU, tch on the CUDA torch wheel) on a machine with no GPU and no system CUDA:
#   scripts/build-cuda.sh            # -> $MAGPIE_CACHE/target-cuda13.0-sm90/release/magpie
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh      # A100 instead of H100/H200 (one architecture a build)
# - The CUDA compiler, headers and libraries come from PyPI wheels (nvidia-cuda-nvcc, -runtime,
#   -cublas, -curand, -nvrtc, -crt, -cccl, -nvvm; CUDA 13.0, which driver 580 supports) in their
#   own venv, $MAGPIE_CACHE/cuda-13.0, laid out as a CUDA root.
# - The wheels have no libcuda.so link stub (the driver's library) and no static cuBLAS, which
#   llama-cpp-sys-2 asks for. So the script writes a stub libcuda.so from cuda.h (soname
#   libcuda.so.1, every entry point returns CUDA_ERROR_STUB_LIBRARY, as the toolkit's own stub;
#   the driver's real library replaces it at run time) and empty cublas_static/culibos archives:
#   cuBLAS is then linked dynamically, the same libcublas.so.13 that candle's cudarc links.
# - Portable CPU baseline (x86-64-v3: AVX2, no AVX-512, no AMX) as scripts/build-device.sh.
# - The binary's rpath names the project venv's nvidia/cu13/lib, where the torch wheel keeps
#   cuBLAS, cuRAND and NVRTC; the GPU machine's driver provides libcuda.so.1.
# Overrides: CUDA_COMPUTE_CAP (90), MAGPIE_TORCH_VENV (the venv whose torch tch links against;
# default the project's), MAGPIE_CUDA_SRC (the tree to build; default this checkout),
# MAGPIE_FEATURES (cargo features, `cuda`; empty leaves out the generation engines' CUDA kernels,
# as scripts/build-device.sh does for the unit tests: training's CUDA is libtorch's), extra
# arguments go to cargo. CI does not run this (it needs no GPU but takes an hour cold on 2 cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
say() { printf '\033[1m[build-cuda]\033[0m %s\n' "$*"; }

CUDA=13.0
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
TOOLKIT_VENV="$MAGPIE_CACHE/cuda-$CUDA"
TORCH_VENV=${MAGPIE_TORCH_VENV:-$MAGPIE_CACHE/venv}
SRC=${MAGPIE_CUDA_SRC:-$MAGPIE_ROOT}

if [ ! -x "$TOOLKIT_VENV/bin/python" ]; then python3 -m venv "$TOOLKIT_VENV"; fi
wheels=(nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cublas nvidia-cuda-nvrtc nvidia-cuda-crt nvidia-cuda-cccl nvidia-nvvm)
if ! "$TOOLKIT_VENV/bin/pip" show "${wheels[@]}" nvidia-curand >/dev/null 2>&1; then
  say "CUDA $CUDA compiler, headers and libraries from PyPI into $TOOLKIT_VENV"
  "$TOOLKIT_VENV/bin/pip" install -q "${wheels[@]/%/==$CUDA.*}" "nvidia-curand==10.4.*"
fi
ROOT=$("$TOOLKIT_VENV/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
if [ ! -f "$ROOT/lib/stubs/libcuda.so" ]; then
  say "link names, a libcuda.so stub and empty static cuBLAS archives in $ROOT/lib"
  for lib in "$ROOT"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  mkdir -p "$ROOT/lib/stubs"
  # Every driver entry point cuda.h declares (after its _v2/_v3 renames), returning 34.
  gcc -E -P -I"$ROOT/include" -x c - <<<'#include <cuda.h>' \
    | grep -oE '\bCUresult[[:space:]]+[A-Za-z_]*[[:space:]]*(cu[A-Za-z0-9_]+)[[:space:]]*\(' \
    | grep -oE 'cu[A-Za-z0-9_]+[[:space:]]*\($' | tr -d '( ' | sort -u \
    | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$ROOT/lib/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda.c"
  say "stub exports $(nm -D --defined-only "$ROOT/lib/stubs/libcuda.so" | grep -c ' T cu') driver entry points"
  for archive in cublas_static cublasLt_static culibos; do ar rcs "$ROOT/lib/lib$archive.a"; done
fi
# The rpath names the project venv's copy (scripts/setup.sh's torch wheel), whichever torch tch
# links: RUSTFLAGS are part of every crate's fingerprint, so one fixed value lets
# scripts/build-device.sh reuse this build's CUDA kernels (it runs with LD_LIBRARY_PATH anyway).
torch_cuda_lib=$("$MAGPIE_CACHE/venv/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))")

export CUDA_HOME="$ROOT" CUDA_PATH="$ROOT/" CUDA_ROOT="$ROOT" CUDAToolkit_ROOT="$ROOT" CUDACXX="$ROOT/bin/nvcc"
export PATH="$ROOT/bin:$TORCH_VENV/bin:$PATH" VIRTUAL_ENV="$TORCH_VENV"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs:${LIBRARY_PATH:-}"
# llama-cpp-sys-2 finds cudart_static through find_cuda_helper, which looks in $CUDA_LIBRARY_PATH/lib64.
[ -e "$ROOT/lib64" ] || ln -s lib "$ROOT/lib64"
export CUDA_LIBRARY_PATH="$ROOT"
export CMAKE_CUDA_ARCHITECTURES="$CUDA_COMPUTE_CAP-real"
export CARGO_TARGET_DIR=${MAGPIE_CUDA_TARGET:-$MAGPIE_CACHE/target-cuda$CUDA-sm$CUDA_COMPUTE_CAP}
export RUSTFLAGS="-C target-cpu=x86-64-v3 -C link-arg=-Wl,-rpath,$torch_cuda_lib"
# What x86-64-v3 may use, for the binary's start-up check (src/cpu.rs), and a llama.cpp without
# -march=native (no AVX-512, no AMX).
export MAGPIE_BUILD_CPU_FLAGS="sse sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 movbe abm xsave"
export GGML_NATIVE=OFF GGML_AVX=ON GGML_AVX2=ON GGML_FMA=ON GGML_F16C=ON
say "nvcc $(nvcc --version | grep -oE 'release [0-9.]+'), sm_$CUDA_COMPUTE_CAP, torch from $TORCH_VENV, target $CARGO_TARGET_DIR"
say "building (cold: about an hour on 2 cores: the CUDA kernels of llama.cpp, candle and mistralrs)"
# MAGPIE_CARGO=test builds the test binaries instead (`cargo test --no-run`), as build-device.sh does.
(cd "$SRC" && cargo "${MAGPIE_CARGO:-build}" --release --features "${MAGPIE_FEATURES-cuda}" "$@")
say "built in $CARGO_TARGET_DIR/release"
