#!/usr/bin/env bash
# The GPU checks of the training issues, in one run on the GPU machine the device tool lends (an
# H100, no network, no Rust, no fonts; python3 with torch 2.11, transformers, pyarrow). Needs the
# binary scripts/build-device.sh makes and SmolLM2's tokenizer files, carried in one folder:
#   device-bin/magpie.xz  device-bin/tokenizer/{tokenizer.json,tokenizer_config.json,...}
# (scripts/build-device.sh puts them in ./device-bin, which git ignores), then on the
# device:  scripts/gpu-check.sh device-bin     # about 5 minutes; the table at the end
# 1. parity: SFT, SmolLM2-135M shape, random weights, f32, 4 steps: losses on CPU vs CUDA (1e-3);
# 2. NCCL at world size 1 (torchrun's variables): the same losses as without a process group;
# 3. throughput: SFT, Llama-3.2-1B shape, bf16, packing, 4 x 2048 tokens, against a PyTorch eager
#    loop (transformers + SDPA + fused AdamW, bf16) on the same model: tok/s, ratio, MFU
#    (6 N tok/s over 989 TFLOP/s), peak GPU memory;
# 4. DPO, 6 steps on CUDA with precomputed reference log-probs;
# 5. bf16 DPO at lr 1e-6, 3 steps: the share of weights the saved model changed.
# GPU_CHECK_DEVICE=cpu rehearses steps 1-2 and 4-5 on a CPU machine (MAGPIE=path picks a binary).
set -euo pipefail
BIN_DIR=${1:-device-bin}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export MAGPIE_CACHE="$W/cache"
if [ -n "${MAGPIE:-}" ]; then M=$MAGPIE; else xz -dc "$BIN_DIR/magpie.xz" > "$W/magpie" && chmod +x "$W/magpie" && M="$W/magpie"; fi
torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
say() { printf '\n== %s\n' "$*"; }
losses() { python3 scripts/gpu_check.py losses "$1"; }

say "models and data (random weights, SmolLM2 tokenizer)"
python3 scripts/gpu_check.py models "$BIN_DIR/tokenizer" "$W" "$([ "$DEVICE" = cuda ] && echo full || echo small)"
sft() { "$M" sft --model "$W/m135" -i "$W/sft.parquet" --max-length 512 --per-device-train-batch-size 4 --max-steps 4 --learning-rate 1e-4 \
  --lr-scheduler-type constant --save-steps 0 --logging-steps 1 "$@"; }

say "1. parity: SFT f32 on CPU and on $DEVICE"
sft --device cpu -o "$W/sft-cpu" 2> "$W/sft-cpu.log"
sft --device "$DEVICE" -o "$W/sft-dev" 2> "$W/sft-dev.log"
parity=$(python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
read = lambda d: [json.loads(l)["loss"] for l in open(f"{w}/{d}/metrics.jsonl") if '"grad_norm"' in l]
a, b = read("sft-cpu"), read("sft-dev")
print(f"max |difference| {max(abs(x - y) for x, y in zip(a, b)):.2e} over {len(a)} steps ({'ok' if max(abs(x - y) for x, y in zip(a, b)) <= 1e-3 else 'FAILED'})")
PY
)
echo "$parity"

say "2. process group of one (NCCL on CUDA, Gloo on CPU)"
WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29561 sft --device "$DEVICE" -o "$W/sft-pg" 2> "$W/sft-pg.log"
grep -m1 "rank 0 of 1" "$W/sft-pg.log" || true
if [ "$(losses "$W/sft-pg")" = "$(losses "$W/sft-dev")" ]; then group="same losses as without a process group: ok"; else group="losses differ: $(losses "$W/sft-pg") vs $(losses "$W/sft-dev")"; fi
echo "$group"

throughput="not run on $DEVICE"
if [ "$DEVICE" = cuda ]; then
  say "3. throughput: 1B shape, bf16, packed 4 x 2048"
  python3 scripts/gpu_check.py torch-sft "$W/m1b" "$W/sft.parquet" 12 > "$W/torch.json"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$W/smi.txt" & smi=$!
  "$M" sft --model "$W/m1b" -i "$W/sft.parquet" --bf16 --packing --max-length 2048 --per-device-train-batch-size 4 --max-steps 12 \
    --learning-rate 1e-5 --lr-scheduler-type constant --save-steps 0 --logging-steps 12 --device cuda -o "$W/sft-1b" 2> "$W/sft-1b.log"
  kill $smi
  throughput=$(python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
t = json.load(open(f"{w}/torch.json"))
rows = [json.loads(l) for l in open(f"{w}/sft-1b/metrics.jsonl") if '"grad_norm"' in l]
ours = rows[-1]["tokens_per_second"]
n = t["parameters"]
peak = max(int(x) for x in open(f"{w}/smi.txt").read().split()) / 1024
print(f"magpie {ours:,.0f} tok/s (MFU {6 * n * ours / 989e12:.1%}), PyTorch eager {t['tok_per_s']:,.0f} tok/s (MFU {6 * n * t['tok_per_s'] / 989e12:.1%}): "
      f"{ours / t['tok_per_s']:.2f}x; peak GPU memory magpie {peak:.1f} GiB (nvidia-smi), PyTorch {t['peak_gib']:.1f} GiB allocated; N = {n / 1e9:.2f}B")
PY
)
  echo "$throughput"
fi

say "4. DPO, 6 steps on $DEVICE, precomputed reference log-probs"
"$M" dpo --model "$W/m135" -i "$W/dpo.parquet" --max-length 256 --max-prompt-length 128 --per-device-train-batch-size 4 --max-steps 6 \
  --learning-rate 1e-6 --save-steps 0 --precompute-ref-log-probs --device "$DEVICE" -o "$W/dpo" 2> "$W/dpo.log"
dpo="losses $(losses "$W/dpo")"
echo "$dpo"

say "5. bf16 DPO at lr 1e-6, 3 steps: do the saved weights move?"
python3 - "$W" <<'PY'
import sys
from transformers import AutoModelForCausalLM
import torch
w = sys.argv[1]
AutoModelForCausalLM.from_pretrained(f"{w}/m135", dtype=torch.bfloat16).save_pretrained(f"{w}/m135-bf16")
PY
cp "$W"/m135/tokenizer* "$W"/m135/*.jinja "$W/m135-bf16/" 2>/dev/null || true
"$M" dpo --model "$W/m135-bf16" -i "$W/dpo.parquet" --max-length 256 --max-prompt-length 128 --per-device-train-batch-size 4 --max-steps 3 \
  --learning-rate 1e-6 --lr-scheduler-type constant --save-steps 0 --precompute-ref-log-probs --bf16 --device "$DEVICE" -o "$W/dpo-bf16" 2> "$W/dpo-bf16.log"
master=$(python3 scripts/gpu_check.py changed "$W/m135-bf16" "$W/dpo-bf16/model")
echo "$master"

say "summary ($DEVICE; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo no nvidia-smi))"
printf '%-26s %s\n' "parity CPU vs $DEVICE" "$parity" "process group of one" "$group" "throughput 1B bf16" "$throughput" \
  "DPO 6 steps" "$dpo" "bf16 DPO lr 1e-6" "$master"
