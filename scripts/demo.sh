#!/usr/bin/env bash
# Set-up, then the main job on the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
# Each stage issue extends this. Today: synthesise tens of two-turn conversations with two
# sampled responses each (recipes/magpie-smollm2-demo.yaml), then inspect them. Rerunning
# resumes: finished chunks in out/demo/synth are kept.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
scripts/setup.sh
mkdir -p out/demo
"$MAGPIE_BIN" synth --recipe recipes/magpie-smollm2-demo.yaml -o out/demo/synth
"$MAGPIE_BIN" inspect out/demo/synth --samples 3
