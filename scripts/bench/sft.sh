#!/usr/bin/env bash
# SFT step throughput, one run, same CPU: `magpie sft` against a plain transformers + PyTorch AdamW
# loop on SmolLM2-135M (converted from the embedded GGUF) in f32, batch 4 x 256 tokens, the same 4
# conversations. Prints tokens/s of both (steps after the first), the ratio, and both first-step
# losses, which must agree within 1e-4.
#   scripts/bench/sft.sh [STEPS]
set -euo pipefail
STEPS=${1:-6}
source "$(dirname "${BASH_SOURCE[0]}")/train_common.sh"

echo "== PyTorch (transformers, torch.optim.AdamW), $STEPS steps"
python scripts/bench/sft_pytorch.py "$work/smollm2" "$work/sft.parquet" "$STEPS" 256 > "$work/pytorch.json"
echo "== magpie sft, $STEPS steps"
# One epoch of 4 conversations is one step of batch 4, so every step sees the same batch.
"$MAGPIE_BIN" sft --model "$work/smollm2" -i "$work/sft.parquet" -o "$work/ours" --device cpu --max-length 256 \
  --per-device-train-batch-size 4 --num-train-epochs "$STEPS" --learning-rate 1e-5 --lr-scheduler-type constant \
  --save-steps 0 2> "$work/ours.log"

python - "$work" <<'PY'
import json, sys
work = sys.argv[1]
torch_side = json.load(open(f"{work}/pytorch.json"))
ours = [json.loads(l) for l in open(f"{work}/ours/metrics.jsonl") if '"loss"' in l]
tok_s = sum(r["tokens"] for r in ours[1:]) / sum(r["tokens"] / r["tokens_per_second"] for r in ours[1:])
print(f"\nSmolLM2-135M f32, batch 4 x 256, AdamW, {torch_side['threads']} threads\n")
print(f"{'side':<30}{'tok/s':>8}{'first-step loss':>18}")
print(f"{'PyTorch eager (transformers)':<30}{torch_side['tok_per_s']:>8.1f}{torch_side['first_loss']:>18.6f}")
print(f"{'magpie sft (tch)':<30}{tok_s:>8.1f}{ours[0]['loss']:>18.6f}")
print(f"\nratio magpie / PyTorch: {tok_s / torch_side['tok_per_s']:.2f}x")
print(f"first-step loss difference: {abs(ours[0]['loss'] - torch_side['first_loss']):.2e} (must be <= 1e-4)")
print("later losses, PyTorch:", " ".join(f"{l:.4f}" for l in torch_side["losses"]))
print("later losses, magpie: ", " ".join(f"{r['loss']:.4f}" for r in ours))
PY
