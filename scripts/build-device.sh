#!/usr/bin/env bash
# Builds `magpie` on this (CPU) machine for the GPU machine the device tool lends: an H200 with
# python3, torch 2.11 + CUDA 13.0 and no Rust, no network, and another CPU than this one.
#   scripts/build-device.sh    # -> device-bin/{binaries.tar.xz,tokenizer/,encoder/}
# - against torch 2.11 (a second venv; tch 0.26 expects 2.13, so the version check is bypassed
#   and torch-sys is patched: the 15 generated wrappers torch 2.11 lacks are removed);
# - with CUDA (scripts/build-cuda.sh: CUDA 13.0 from PyPI wheels, sm_90, x86-64-v3, no AMX), so
#   one binary serves the training and the synthesis checks; it shares build-cuda.sh's target
#   dir (only torch-sys, tch and magpie differ);
# - the library's unit tests likewise but without the `cuda` feature (the CUDA unit tests are
#   libtorch's: the generation engines' CUDA kernels are left out);
# - both stripped into one xz archive whose dictionary spans both, so the code they share is
#   carried once: a device call carries at most 64 MiB, working tree included.
# scripts/gpu-check.sh runs them there in one call (carry device-bin). Not a runtime path: users
# build with scripts/setup.sh. It builds a copy of the working tree, so the patch leaves Cargo.lock alone.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
say() { printf '\033[1m[build-device]\033[0m %s\n' "$*"; }

TORCH=2.11.0
DEVICE="$MAGPIE_CACHE/device"
VENV="$DEVICE/venv-torch$TORCH"
mkdir -p "$DEVICE"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  say "venv with torch==$TORCH in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==$TORCH"
fi
cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
[ "$cuda" = 13.0 ] || { echo "torch $TORCH from PyPI has CUDA '$cuda', the device machine has 13.0" >&2; exit 1; }

# torch-sys 0.26 with the wrappers of operators torch 2.11 does not have removed.
registry=$(ls -d "$HOME"/.cargo/registry/src/*/torch-sys-0.26.* | head -1)
patched="$DEVICE/torch-sys-for-torch$TORCH"
if [ ! -f "$patched/.patched" ]; then
  say "patching $(basename "$registry") for torch $TORCH"
  rm -rf "$patched" && cp -r "$registry" "$patched"
  "$VENV/bin/python" - "$patched/libtch/torch_api_generated.cpp" <<'PY'
import re, sys
path = sys.argv[1]
missing = ["_flash_attention_forward_no_dropout_inplace", "_scaled_dot_product_attention_math_for_mps", "_philox_", "_upsample_lanczos2d_aa"]
lines, out, skipping, removed = open(path).read().split("\n"), [], False, 0
for line in lines:
    definition = re.match(r"^\S.*\batg_(\w+)\(", line)
    if not skipping and definition and any(m in definition.group(1) for m in missing):
        skipping, removed = True, removed + 1
    if skipping:
        skipping = line != "}"
        continue
    out.append(line)
open(path, "w").write("\n".join(out))
print(f"removed {removed} wrappers (15 expected)")
PY
  touch "$patched/.patched"
fi

say "building a copy of the working tree with scripts/build-cuda.sh (torch $TORCH, patched torch-sys)"
rm -rf "$DEVICE/src" && mkdir -p "$DEVICE/src"
tar -C "$MAGPIE_ROOT" --exclude=./.git --exclude=./models --exclude=./out --exclude=./.venv --exclude=./device-bin -cf - . | tar -C "$DEVICE/src" -xf -
export LIBTORCH_BYPASS_VERSION_CHECK=1 MAGPIE_TORCH_VENV="$VENV" MAGPIE_CUDA_SRC="$DEVICE/src"
patch="patch.crates-io.torch-sys.path=\"$patched\""
"$MAGPIE_ROOT/scripts/build-cuda.sh" --config "$patch"
# The library's unit tests too: the CUDA ones (`on_cuda_*`) run on the GPU machine only.
MAGPIE_CARGO=test MAGPIE_FEATURES='' "$MAGPIE_ROOT/scripts/build-cuda.sh" --config "$patch" --lib --no-run 2> "$DEVICE/test-build.log" || { cat "$DEVICE/test-build.log" >&2; exit 1; }
tests=$(grep -oE 'Executable unittests src/lib.rs \(([^)]*)\)' "$DEVICE/test-build.log" | sed -E 's/.*\((.*)\)/\1/' | tail -1)
CARGO_TARGET_DIR=${MAGPIE_CUDA_TARGET:-$MAGPIE_CACHE/target-cuda13.0-sm${CUDA_COMPUTE_CAP:-90}}
# What this script writes into device-bin/ (magpie.xz: an older layout's binary), and nothing else.
rm -rf "$DEVICE/binaries" "$MAGPIE_ROOT"/device-bin/{binaries.tar.xz,magpie.xz,tokenizer,encoder}
mkdir -p "$DEVICE/binaries" "$MAGPIE_ROOT/device-bin"
strip -o "$DEVICE/binaries/magpie" "$CARGO_TARGET_DIR/release/magpie"
# (cargo names it by its absolute path: the target dir is outside the copied tree)
strip -o "$DEVICE/binaries/magpie-tests" "$tests"
# The test binary (about 90 MB stripped) first: what the CUDA binary shares with it then lies less
# than the dictionary's 256 MiB behind it.
say "compressing both binaries into one archive (a few minutes: one 256 MiB dictionary, one thread)"
tar -C "$DEVICE/binaries" -cf - magpie-tests magpie | xz -9e --lzma2=dict=256MiB -c > "$MAGPIE_ROOT/device-bin/binaries.tar.xz"
# The embedding check's encoder without its weights (gpu_check.py encoder draws random ones).
mkdir -p "$MAGPIE_ROOT/device-bin/encoder"
find "$MAGPIE_HOME/all-minilm-l6-v2" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.bin' -exec cp {} "$MAGPIE_ROOT/device-bin/encoder/" \;
# SmolLM2's tokenizer and chat template for the random-weight models gpu-check.sh makes.
rm -rf "$DEVICE/smollm2" && mkdir -p "$MAGPIE_ROOT/device-bin/tokenizer"
"$MAGPIE_BIN" convert -o "$DEVICE/smollm2"
cp "$DEVICE"/smollm2/{tokenizer.json,tokenizer_config.json} "$MAGPIE_ROOT/device-bin/tokenizer/"
cp "$DEVICE"/smollm2/{special_tokens_map.json,chat_template.jinja} "$MAGPIE_ROOT/device-bin/tokenizer/" 2>/dev/null || true
# A device call carries the working tree and the carried folder, 64 MiB in all.
carried=$(( $(du -sb "$MAGPIE_ROOT/device-bin" | cut -f1) + $(git -C "$MAGPIE_ROOT" ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
say "device-bin/binaries.tar.xz: $(du -h "$MAGPIE_ROOT/device-bin/binaries.tar.xz" | cut -f1); $((carried >> 20)) MiB with the working tree; run: scripts/gpu-check.sh device-bin"
[ "$carried" -lt $((64 << 20)) ] || { echo "device-bin and the working tree hold $((carried >> 20)) MiB, more than the 64 MiB a device call carries" >&2; exit 1; }
