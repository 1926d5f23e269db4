#!/usr/bin/env bash
# The whole Magpie pipeline on the embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF), after set-up:
#   1. synth: two-turn conversations with three sampled responses each
#      (recipes/magpie-smollm2-demo.yaml); rerunning resumes from out/demo/synth;
#   2. convert: the GGUF to a Hugging Face directory (the SFT base), and the same model as a
#      judge reward model (score = logit(Yes) - logit(No), `--judge-reward-head`);
#   3. filter: exact + MinHash + semantic dedup, heuristics, reward scores and preference pairs,
#      selection and a test split (recipes/smollm2-demo-filter.yaml), with its report;
#   4. sft on the filtered conversations (recipes/smollm2-135m-sft-demo.yaml), then a few
#      responses from the trained checkpoint through `magpie synth --model <ckpt>` (mistralrs);
#   5. dpo of the SFT model on the pairs (recipes/smollm2-135m-dpo-demo.yaml);
#   6. eval (recipes/smollm2-demo-eval.yaml): the SFT model against the base model, then the DPO
#      model against the SFT model's answers, judged in both orders and graded by the embedded
#      model (a 135M judge is a mechanism check, not a verdict);
#   7. a summary table: rows per stage, the DPO eval metrics and the win rates; plots in
#      out/demo/{sft,dpo,eval-sft,eval-dpo}.
# Rerunning replaces the demo's own outputs in out/demo (--overwrite removes only what magpie
# wrote there); synth resumes, or has nothing to do once finished.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
scripts/setup.sh
started=$(date +%s)
mkdir -p out/demo
"$MAGPIE_BIN" synth --recipe recipes/magpie-smollm2-demo.yaml -o out/demo/synth
"$MAGPIE_BIN" convert -o out/demo/smollm2-hf --overwrite
"$MAGPIE_BIN" convert --judge-reward-head -o out/demo/judge-rm --overwrite
"$MAGPIE_BIN" filter --recipe recipes/smollm2-demo-filter.yaml -i out/demo/synth -o out/demo/filtered --overwrite
"$MAGPIE_BIN" inspect out/demo/filtered --samples 1
"$MAGPIE_BIN" sft --recipe recipes/smollm2-135m-sft-demo.yaml --overwrite
"$MAGPIE_BIN" synth --model out/demo/sft/model --num 4 --max-tokens 48 --response-max-tokens 64 -o out/demo/synth-sft --overwrite
"$MAGPIE_BIN" inspect out/demo/synth-sft --samples 2
"$MAGPIE_BIN" dpo --recipe recipes/smollm2-135m-dpo-demo.yaml --overwrite
"$MAGPIE_BIN" eval --recipe recipes/smollm2-demo-eval.yaml --model out/demo/sft/model \
  --baseline "$MAGPIE_HOME/smollm2-135m-instruct-q4_1.gguf" -o out/demo/eval-sft --overwrite
"$MAGPIE_BIN" eval --recipe recipes/smollm2-demo-eval.yaml --model out/demo/dpo/model \
  --baseline-answers out/demo/eval-sft/answers.parquet -o out/demo/eval-dpo --overwrite
"$VIRTUAL_ENV/bin/python" scripts/demo_summary.py out/demo "$(( $(date +%s) - started ))"
