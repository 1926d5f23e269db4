#!/usr/bin/env bash
# The GPU checks of the training and synthesis issues (#11, #12, #14), in one run on the GPU machine
# the device tool lends (an H100, no network, no Rust, no fonts; python3 with torch 2.11,
# transformers, pyarrow). Needs what scripts/build-device.sh puts in ./device-bin (git ignores it):
#   device-bin/magpie.xz  device-bin/tokenizer/{tokenizer.json,...}  device-tests/magpie-tests.xz
# then on the device:  scripts/gpu-check.sh device-bin     # under 8 minutes; the table at the end
# GPU_CHECK_PARTS picks parts: "train synth" (the default; one call carrying device-bin) and
# "units" (a second call carrying device-tests: each binary is ~42 MB, a call carries 64 MiB).
# 0. units: the library's CUDA unit tests (`on_cuda_*`: varlen flash attention per document, the
#    chunked vocabulary loss and its gradients), from device-tests/ (GPU_CHECK_TESTS);
# 1. parity: SFT, SmolLM2-135M shape, random weights, f32, 4 steps: losses on CPU vs CUDA (1e-3);
# 2. NCCL at world size 1 (torchrun's variables): the same losses as without a process group;
# 3. throughput: SFT, Llama-3.2-1B shape, bf16, packing, 4 x 2048 tokens, against a PyTorch eager
#    loop (transformers + SDPA + fused AdamW, bf16) on the same model: tok/s, ratio, MFU
#    (6 N tok/s over 989 TFLOP/s), peak GPU memory;
# 4. DPO, 6 steps on CUDA with precomputed reference log-probs;
# 5. bf16 DPO at lr 1e-6, 3 steps: the share of weights the saved model changed.
# 6. synthesis: 2,000 instructions + responses with a random-weight 1B-class model (Llama-3.2-1B's
#    shape, SmolLM2's vocabulary) on mistralrs (safetensors, PagedAttention) and llama.cpp (the same
#    weights as F16 GGUF, written by gpu_check_synth.py), tok/s against transformers' batched
#    `generate` (SDPA, bf16) at the same lengths;
# 7. batch invariance on llama.cpp CUDA: greedy answers to 64 prompts alone and 64 at a time.
# GPU_CHECK_DEVICE=cpu rehearses steps 1-2 and 4-7 on a CPU machine at a small scale (MAGPIE=path
# picks a binary).
set -euo pipefail
BIN_DIR=${1:-device-bin}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PARTS=${GPU_CHECK_PARTS:-train synth}
part() { [[ " $PARTS " == *" $1 "* ]]; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export MAGPIE_CACHE="$W/cache"
if [ -n "${MAGPIE:-}" ]; then M=$MAGPIE; elif [ -f "$BIN_DIR/magpie.xz" ]; then xz -dc "$BIN_DIR/magpie.xz" > "$W/magpie" && chmod +x "$W/magpie" && M="$W/magpie"; fi
torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
# cuBLAS, cuRAND and NVRTC for the CUDA engines: the torch wheel's nvidia/cu13/lib.
cuda_lib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$torch_lib:$cuda_lib:${LD_LIBRARY_PATH:-}"
say() { printf '\n== %s\n' "$*"; }
losses() { python3 scripts/gpu_check.py losses "$1"; }

units="not run"
if part units; then
  say "0. CUDA unit tests"
  TESTS=${GPU_CHECK_TESTS:-device-tests}
  xz -dc "$TESTS/magpie-tests.xz" > "$W/magpie-tests" && chmod +x "$W/magpie-tests"
  CARGO_MANIFEST_DIR="$PWD" "$W/magpie-tests" on_cuda --test-threads 1 2>&1 | tee "$W/units.log" | tail -8
  units=$(grep -E "^test result" "$W/units.log" | tail -1)
fi

parity="not run"; group="not run"; throughput="not run"; dpo="not run"; master="not run"
if part train; then
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
# The group's optimizer is the sharded one (bucketed gradients, the norm from bucket sums), so the
# rounding differs from the plain path's: the tests' 1e-5, not equality.
group=$(python3 - "$(losses "$W/sft-pg")" "$(losses "$W/sft-dev")" <<'PY'
import sys
a, b = [list(map(float, x.split())) for x in sys.argv[1:3]]
worst = max(abs(x - y) for x, y in zip(a, b))
print(f"max |difference| from no group {worst:.1e} over {len(a)} steps ({'ok' if worst <= 1e-5 and len(a) == len(b) else 'FAILED'})")
PY
)
echo "$group"

throughput="not run on $DEVICE"
if [ "$DEVICE" = cuda ]; then
  say "3. throughput: 1B shape, bf16, packed 4 x 2048"
  # Peak memory of both processes as nvidia-smi sees it (context and allocator cache included).
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$W/smi-torch.txt" & smi=$!
  python3 scripts/gpu_check.py torch-sft "$W/m1b" "$W/sft.parquet" 12 > "$W/torch.json"
  kill $smi
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
peak = lambda name: max(int(x) for x in open(f"{w}/{name}").read().split()) / 1024
print(f"magpie {ours:,.0f} tok/s (MFU {6 * n * ours / 989e12:.1%}), PyTorch eager {t['tok_per_s']:,.0f} tok/s (MFU {6 * n * t['tok_per_s'] / 989e12:.1%}): "
      f"{ours / t['tok_per_s']:.2f}x; peak GPU memory (nvidia-smi) magpie {peak('smi.txt'):.1f} GiB, PyTorch {peak('smi-torch.txt'):.1f} GiB "
      f"({t['peak_gib']:.1f} GiB allocated); N = {n / 1e9:.2f}B")
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

fi

synth_ll="not run"; synth_mr="not run"; synth_hf="not run"; invariance="not run"
if part synth; then
  if [ "$DEVICE" = cuda ]; then size=full; num=2000; seqs=256; hf_prompts=1024; else size=small; num=16; seqs=8; hf_prompts=16; fi
  say "6. synthesis: $num instructions + responses, random-weight model ($size), both engines"
  python3 scripts/gpu_check_synth.py models "$BIN_DIR/tokenizer" "$W" "$size" 2>/dev/null | tail -1
  synth() { "$M" synth --num "$num" --max-tokens 64 --response-max-tokens 128 --max-num-seqs "$seqs" "$@"; }
  rate() { grep -E "generated (tokens|tok/s)" "$1" | awk '{print $NF}' | paste -sd' ' | awk '{printf "%.0f tok/s (%d tokens)", $2, $1}'; }
  synth --model "$W/s1b.gguf" --engine llamacpp -o "$W/synth-ll" > "$W/synth-ll.txt" 2> "$W/synth-ll.log" || tail -5 "$W/synth-ll.log"
  synth_ll=$(rate "$W/synth-ll.txt"); echo "llama.cpp: $synth_ll"
  synth --model "$W/s1b" --engine mistralrs -o "$W/synth-mr" > "$W/synth-mr.txt" 2> "$W/synth-mr.log" || tail -5 "$W/synth-mr.log"
  synth_mr=$(rate "$W/synth-mr.txt"); echo "mistralrs: $synth_mr"
  if [ "$hf_prompts" -gt 0 ]; then
    # The same lengths and batch size (see gpu_check_synth.py).
    synth_hf=$(python3 scripts/gpu_check_synth.py hf-generate "$W/s1b" "$hf_prompts" "$seqs" 2>/dev/null | tail -1)
    echo "transformers generate: $synth_hf"
  fi
  say "7. llama.cpp greedy answers, alone and 64 at a time"
  python3 - "$W" <<'PY'
import glob, sys, pyarrow as pa, pyarrow.parquet as pq
w = sys.argv[1]
rows = pa.concat_tables([pq.read_table(f, columns=["uuid", "messages"]) for f in sorted(glob.glob(f"{w}/synth-ll/**/*.parquet", recursive=True))])
pq.write_table(rows.slice(0, 64), f"{w}/prompts.parquet")
PY
  for n in 1 64; do
    "$M" synth --input "$W/prompts.parquet" --model "$W/s1b.gguf" --engine llamacpp --response-temperature 0 --response-max-tokens 64 \
      --max-num-seqs $n -o "$W/greedy-$n" > /dev/null 2> "$W/greedy-$n.log" || tail -5 "$W/greedy-$n.log"
  done
  invariance=$(python3 - "$W" <<'PY'
import glob, sys, pyarrow as pa, pyarrow.parquet as pq
w = sys.argv[1]
read = lambda d: {r["uuid"]: r["response"] for r in pa.concat_tables([pq.read_table(f, columns=["uuid", "response"]) for f in glob.glob(f"{w}/{d}/**/*.parquet", recursive=True)]).to_pylist()}
alone, batched = read("greedy-1"), read("greedy-64")
print(f"{sum(alone[k] != batched.get(k) for k in alone)} of {len(alone)} greedy answers differ between alone and 64 at a time")
PY
)
  echo "$invariance"
fi

say "summary ($DEVICE; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo no nvidia-smi))"
printf '%-26s %s\n' "CUDA unit tests" "$units" "parity CPU vs $DEVICE" "$parity" "process group of one" "$group" \
  "throughput 1B bf16" "$throughput" "DPO 6 steps" "$dpo" "bf16 DPO lr 1e-6" "$master" "synth llama.cpp" "$synth_ll" \
  "synth mistralrs" "$synth_mr" "transformers generate" "$synth_hf" "llama.cpp batch invariance" "$invariance"
