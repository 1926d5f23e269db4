#!/usr/bin/env bash
# DPO step throughput, one run, same CPU: `magpie dpo` (sigmoid loss, precomputed reference) against
# the same loss in plain PyTorch on SmolLM2-135M f32 (converted from the embedded GGUF), the same 4
# pairs as one batch per step, full fine-tuning and LoRA (PEFT's on the PyTorch side; r 16, alpha 32
# on q_proj,v_proj on both). Prints pairs/s and tokens/s of each and the ratios, and peak memory
# (max RSS) of the PyTorch sides and of magpie with and without `precompute_ref_log_probs`.
#   scripts/bench/dpo.sh [STEPS]
set -euo pipefail
STEPS=${1:-6}
source "$(dirname "${BASH_SOURCE[0]}")/train_common.sh"
python -c "import peft" 2>/dev/null || pip install -q peft

for mode in full lora; do
  echo "== PyTorch (same loss, torch.optim.AdamW), $mode, $STEPS steps"
  /usr/bin/time -f "%M" -o "$work/pytorch-$mode.rss" python scripts/bench/dpo_pytorch.py "$work/smollm2" "$work/dpo.parquet" "$STEPS" 0.1 \
    $([ $mode = lora ] && echo lora) > "$work/pytorch-$mode.json"
done
common=(--model "$work/smollm2" -i "$work/dpo.parquet" --device cpu --per-device-train-batch-size 4
        --num-train-epochs "$STEPS" --learning-rate 1e-6 --lr-scheduler-type constant --beta 0.1 --save-steps 0)
for mode in precomputed live lora-precomputed lora-live; do
  echo "== magpie dpo, $mode reference, $STEPS steps"
  flag=(); [[ "$mode" = *precomputed ]] && flag=(--precompute-ref-log-probs)
  [[ "$mode" = lora-* ]] && flag+=(--use-peft)
  /usr/bin/time -f "%M" -o "$work/$mode.rss" "$MAGPIE_BIN" dpo "${common[@]}" "${flag[@]}" -o "$work/$mode" 2> "$work/$mode.log" \
    || { cat "$work/$mode.log"; exit 1; }
done

python - "$work" <<'PY'
import json, sys
work = sys.argv[1]
step_tokens = json.loads(open(f"{work}/precomputed/metrics.jsonl").readline())["tokens"]
rss = lambda name: int(open(f"{work}/{name}.rss").read().split()[-1]) / 1024 / 1024
for kind, modes in [("full", ["precomputed", "live"]), ("lora", ["lora-precomputed", "lora-live"])]:
    torch_side = json.load(open(f"{work}/pytorch-{kind}.json"))
    print(f"\nSmolLM2-135M f32, 4 pairs per step (8 sequences, {step_tokens} tokens), sigmoid DPO, {kind}, {torch_side['threads']} threads\n")
    print(f"{'side':<40}{'pairs/s':>9}{'tok/s':>8}{'first loss':>12}{'peak RSS':>11}")
    anchor = "PyTorch eager" + (" + PEFT" if kind == "lora" else " (transformers)")
    print(f"{anchor:<40}{torch_side['pairs_per_s']:>9.2f}{torch_side['tok_per_s']:>8.1f}{torch_side['first_loss']:>12.6f}{rss('pytorch-' + kind):>9.2f} GiB")
    for mode in modes:
        rows = [json.loads(l) for l in open(f"{work}/{mode}/metrics.jsonl") if '"loss"' in l and "eval_loss" not in l]
        seconds = sum(r["tokens"] / r["tokens_per_second"] for r in rows[1:])
        pairs_s = 4 * len(rows[1:]) / seconds
        tok_s = sum(r["tokens"] for r in rows[1:]) / seconds
        print(f"{'magpie dpo, ' + mode + ' reference':<40}{pairs_s:>9.2f}{tok_s:>8.1f}{rows[0]['loss']:>12.6f}{rss(mode):>9.2f} GiB")
        if mode.endswith("precomputed"):
            ratio = pairs_s / torch_side["pairs_per_s"]
    print(f"\nratio magpie (precomputed reference) / PyTorch, {kind}: {ratio:.2f}x")
PY
