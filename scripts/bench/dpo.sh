#!/usr/bin/env bash
# DPO step throughput, one run, same CPU: `magpie dpo` (sigmoid loss, precomputed reference) against
# the same loss in plain PyTorch on SmolLM2-135M f32 (converted from the embedded GGUF), the same 4
# pairs as one batch per step. Prints pairs/s and tokens/s of both and the ratio, and peak memory
# (max RSS) of the PyTorch side and of magpie with and without `precompute_ref_log_probs`.
#   scripts/bench/dpo.sh [STEPS]
set -euo pipefail
STEPS=${1:-6}
source "$(dirname "${BASH_SOURCE[0]}")/train_common.sh"

echo "== PyTorch (same loss, torch.optim.AdamW), $STEPS steps"
/usr/bin/time -f "%M" -o "$work/pytorch.rss" python scripts/bench/dpo_pytorch.py "$work/smollm2" "$work/dpo.parquet" "$STEPS" 0.1 > "$work/pytorch.json"
common=(--model "$work/smollm2" -i "$work/dpo.parquet" --device cpu --per-device-train-batch-size 4
        --num-train-epochs "$STEPS" --learning-rate 1e-6 --lr-scheduler-type constant --beta 0.1 --save-steps 0)
for mode in precomputed live; do
  echo "== magpie dpo, $mode reference, $STEPS steps"
  flag=(); [ "$mode" = precomputed ] && flag=(--precompute-ref-log-probs)
  /usr/bin/time -f "%M" -o "$work/$mode.rss" "$MAGPIE_BIN" dpo "${common[@]}" "${flag[@]}" -o "$work/$mode" 2> "$work/$mode.log" \
    || { cat "$work/$mode.log"; exit 1; }
done

python - "$work" <<'PY'
import json, sys
work = sys.argv[1]
torch_side = json.load(open(f"{work}/pytorch.json"))
step_tokens = json.loads(open(f"{work}/precomputed/metrics.jsonl").readline())["tokens"]
print(f"\nSmolLM2-135M f32, 4 pairs per step (8 sequences, {step_tokens} tokens), sigmoid DPO, {torch_side['threads']} threads\n")
print(f"{'side':<34}{'pairs/s':>9}{'tok/s':>8}{'first loss':>12}{'peak RSS':>11}")
torch_rss = int(open(f"{work}/pytorch.rss").read().split()[-1]) / 1024 / 1024
print(f"{'PyTorch eager (transformers)':<34}{torch_side['pairs_per_s']:>9.2f}{torch_side['tok_per_s']:>8.1f}{torch_side['first_loss']:>12.6f}{torch_rss:>9.2f} GiB")
for mode in ["precomputed", "live"]:
    rows = [json.loads(l) for l in open(f"{work}/{mode}/metrics.jsonl") if '"loss"' in l and "eval_loss" not in l]
    seconds = sum(r["tokens"] / r["tokens_per_second"] for r in rows[1:])
    pairs_s = 4 * len(rows[1:]) / seconds
    tok_s = sum(r["tokens"] for r in rows[1:]) / seconds
    rss = int(open(f"{work}/{mode}.rss").read().split()[-1]) / 1024 / 1024
    print(f"{'magpie dpo, ' + mode + ' reference':<34}{pairs_s:>9.2f}{tok_s:>8.1f}{rows[0]['loss']:>12.6f}{rss:>9.2f} GiB")
    if mode == "precomputed":
        ratio = pairs_s / torch_side["pairs_per_s"]
print(f"\nratio magpie (precomputed reference) / PyTorch: {ratio:.2f}x")
PY
