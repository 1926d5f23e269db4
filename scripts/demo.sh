#!/usr/bin/env bash
# Set-up, then the main job on the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
# Each stage issue extends this. Today:
#   1. synth: tens of two-turn conversations with two sampled responses each
#      (recipes/magpie-smollm2-demo.yaml); rerunning resumes from out/demo/synth;
#   2. filter: exact + MinHash dedup, heuristic tags, selection and a test split
#      (recipes/smollm2-demo-filter.yaml), with its report;
#   3. inspect the result.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
scripts/setup.sh
mkdir -p out/demo
"$MAGPIE_BIN" synth --recipe recipes/magpie-smollm2-demo.yaml -o out/demo/synth
"$MAGPIE_BIN" filter --recipe recipes/smollm2-demo-filter.yaml -i out/demo/synth -o out/demo/filtered
"$MAGPIE_BIN" inspect out/demo/filtered --samples 3
