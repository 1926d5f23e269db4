#!/usr/bin/env bash
# SFT step throughput, one run, same CPU: `magpie sft` against a plain transformers + PyTorch AdamW
# loop on SmolLM2-135M (converted from the embedded GGUF) in f32, batch 4 x 256 tokens, the same 4
# conversations, full fine-tuning and LoRA (PEFT's on the PyTorch side; r 16, alpha 32, dropout 0.05
# on q_proj,v_proj on both). Prints tokens/s of each (steps after the first), the ratios, both
# first-step losses, which must agree within 1e-4, and each run's peak RSS.
#   scripts/bench/sft.sh [STEPS]
set -euo pipefail
STEPS=${1:-6}
source "$(dirname "${BASH_SOURCE[0]}")/train_common.sh"
python -c "import peft" 2>/dev/null || pip install -q peft
peak() { /usr/bin/time -f %M -o "$1" "${@:2}"; }  # peak RSS in KiB into $1

for mode in full lora; do
  echo "== PyTorch (transformers, torch.optim.AdamW), $mode, $STEPS steps"
  peak "$work/pytorch-$mode.rss" python scripts/bench/sft_pytorch.py "$work/smollm2" "$work/sft.parquet" "$STEPS" 256 \
    $([ $mode = lora ] && echo lora) > "$work/pytorch-$mode.json"
  echo "== magpie sft, $mode, $STEPS steps"
  # One epoch of 4 conversations is one step of batch 4, so every step sees the same batch.
  peak "$work/ours-$mode.rss" "$MAGPIE_BIN" sft --model "$work/smollm2" -i "$work/sft.parquet" -o "$work/ours-$mode" --device cpu \
    --max-length 256 --per-device-train-batch-size 4 --num-train-epochs "$STEPS" --learning-rate 1e-5 --lr-scheduler-type constant \
    --save-steps 0 $([ $mode = lora ] && echo --use-peft) 2> "$work/ours-$mode.log"
done

python - "$work" <<'PY'
import json, sys
work = sys.argv[1]
rss = lambda name: int(open(f"{work}/{name}.rss").read().split()[-1]) / 1024
print()
for mode in ("full", "lora"):
    torch_side = json.load(open(f"{work}/pytorch-{mode}.json"))
    ours = [json.loads(l) for l in open(f"{work}/ours-{mode}/metrics.jsonl") if '"loss"' in l]
    tok_s = sum(r["tokens"] for r in ours[1:]) / sum(r["tokens"] / r["tokens_per_second"] for r in ours[1:])
    print(f"SmolLM2-135M f32, batch 4 x 256, AdamW, {mode}, {torch_side['threads']} threads")
    print(f"{'side':<34}{'tok/s':>8}{'first-step loss':>18}{'peak RSS MiB':>14}")
    anchor = "PyTorch eager" + (" + PEFT" if mode == "lora" else " (transformers)")
    print(f"{anchor:<34}{torch_side['tok_per_s']:>8.1f}{torch_side['first_loss']:>18.6f}{rss(f'pytorch-{mode}'):>14.0f}")
    print(f"{'magpie sft (tch)':<34}{tok_s:>8.1f}{ours[0]['loss']:>18.6f}{rss(f'ours-{mode}'):>14.0f}")
    print(f"ratio magpie / PyTorch, {mode}: {tok_s / torch_side['tok_per_s']:.2f}x")
    print(f"first-step loss difference: {abs(ours[0]['loss'] - torch_side['first_loss']):.2e} (must be <= 1e-4)")
    print("later losses, PyTorch:", " ".join(f"{l:.4f}" for l in torch_side["losses"]))
    print("later losses, magpie: ", " ".join(f"{r['loss']:.4f}" for r in ours))
    print()
PY
