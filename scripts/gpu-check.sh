#!/usr/bin/env bash
# The GPU checks of training, synthesis and filtering, on the GPU machine the device tool lends
# (an H200, no network, no Rust, no fonts; python3 with torch 2.11, transformers, pyarrow). Needs
# what scripts/build-device.sh puts in ./device-bin (git ignores it; one device call carries it):
#   device-bin/binaries.tar.xz (magpie, magpie-tests)  device-bin/tokenizer/  device-bin/encoder/
# then on the device:  scripts/gpu-check.sh device-bin     # 9 minutes at most; the table at the end
# GPU_CHECK_PARTS picks parts: "units train filter synth" (the default: all of them, in this order).
# 0. units, from the library's test binary (magpie-tests): its CUDA unit tests (`on_cuda_*`:
#    varlen flash attention per document, the chunked vocabulary loss and its gradients, the
#    exact kNN against the CPU's, the GPU's memory as the memory plan reads it);
# 1. parity: SFT, SmolLM2-135M shape, random weights, f32, 4 steps: losses on CPU vs CUDA (1e-3);
# 2. NCCL at world size 1 (torchrun's variables): the same losses as without a process group;
# 3. throughput: SFT, Llama-3.2-1B shape, bf16, packing, 4 x 2048 tokens, against a PyTorch eager
#    loop (transformers + SDPA + fused AdamW, f32 weights under bf16 autocast as HF's Trainer runs
#    bf16=True: mixed precision, as magpie's f32 master weights) on the same model: tok/s, ratio, MFU
#    (6 N tok/s over 989 TFLOP/s), peak GPU memory; then whether fusing q/k/v into one matmul
#    and gate/up into another would pay (PyTorch alone, 135M, 1B and 8B layer shapes, forward + backward);
# 4. DPO, 6 steps on CUDA with precomputed reference log-probs;
# 5. bf16 DPO at lr 1e-6, 3 steps: the share of weights the saved model changed;
# 5b. resume after kill -9, bf16 packed SFT: bit for bit with --full-determinism, and the
#    difference without it (the tolerance a resumed GPU run keeps);
# 5c. LoRA: SFT with adapters on all linear layers, CUDA (gradient checkpointing) vs CPU, f32,
#    dropout 0 (1e-3); a bf16 LoRA DPO's losses with its adapters-off reference;
# 5d. filter: semantic dedup's exact kNN on 1M random 384-d vectors with planted near duplicates
#    on the GPU (seconds, planted pairs joined); its embedding on the GPU (an
#    all-MiniLM-L6-v2-shaped encoder, random weights) of 100,000 corpus instructions, rows/s
#    against sentence-transformers' encode written out in transformers;
# 6. synthesis: 1,000 instructions + responses with a random-weight 1B-class model (Llama-3.2-1B's
#    shape, SmolLM2's vocabulary) on mistralrs (safetensors, PagedAttention) and llama.cpp (the same
#    weights as F16 GGUF, written by gpu_check_synth.py), tok/s against transformers' batched
#    `generate` (SDPA, bf16) at the same lengths;
# 7. batch invariance on CUDA: greedy answers to 64 prompts alone and 64 at a time, on llama.cpp
#    and on mistralrs (whose CPU batching mixes up sequences, see src/engine/mistralrs.rs): how
#    many differ, and how many batched answers are another prompt's.
# GPU_CHECK_DEVICE=cpu rehearses every step on a CPU machine at a small scale (the throughput at 135M)
# (MAGPIE=path picks the binary and MAGPIE_TESTS=path the test binary instead of the archive's;
# GPU_CHECK_BUDGET=3600 lets a CPU reach every step).
#
# The device time is short, so one failing step does not end the run: each step runs in a shell of
# its own, and a failure becomes a FAILED line (with its log's last lines) in the summary. Every
# command has a time limit (GPU_CHECK_LIMIT seconds, 240), and the whole run a budget
# (GPU_CHECK_BUDGET seconds, 540, counted from the start, unpacking included: inside a device
# call's 10 minutes): no command runs past it, and once less than 30 s is left the remaining steps
# are SKIPPED lines, so the call always comes back with the figures it has (a second call with
# GPU_CHECK_PARTS naming the parts left runs those). The summary and the logs are written as the
# steps finish into $OUT/gpu-check (the device tool brings $OUT back, also after a time-out), or
# into the work folder without $OUT.
set -euo pipefail
BIN_DIR=${1:-device-bin}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PARTS=${GPU_CHECK_PARTS:-units train filter synth}
LIMIT=${GPU_CHECK_LIMIT:-240}
BUDGET=${GPU_CHECK_BUDGET:-540}
# The time limit of the next command: GPU_CHECK_LIMIT, or what is left of the budget if less.
limit() { local left=$(( BUDGET - SECONDS )); echo $(( left < LIMIT ? (left > 1 ? left : 1) : LIMIT )); }
part() { [[ " $PARTS " == *" $1 "* ]]; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
LOGS=${OUT:+$OUT/gpu-check}
LOGS=${LOGS:-$W/logs}
mkdir -p "$LOGS"
export MAGPIE_CACHE="$W/cache"
# Both binaries in one archive: they share most of their code, so one xz dictionary over both
# carries it once.
if [ -f "$BIN_DIR/binaries.tar.xz" ]; then xz -dc "$BIN_DIR/binaries.tar.xz" | tar -C "$W" -x; fi
BIN=${MAGPIE:-$W/magpie}
TESTS_BIN=${MAGPIE_TESTS:-$W/magpie-tests}
[ -x "$BIN" ] || { echo "no binary: $BIN_DIR/binaries.tar.xz is missing (scripts/build-device.sh makes it) and MAGPIE is unset" >&2; exit 1; }
magpie() { timeout "$(limit)" "$BIN" "$@"; }
torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
# cuBLAS, cuRAND and NVRTC for the CUDA engines: the torch wheel's nvidia/cu13/lib.
cuda_lib=$(python3 -c 'import nvidia, os; print(":".join(p for p in (os.path.join(d, "cu13", "lib") for d in nvidia.__path__) if os.path.isdir(p)))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$torch_lib:$cuda_lib:${LD_LIBRARY_PATH:-}"
say() { printf '\n== %s\n' "$*"; }
losses() { python3 scripts/gpu_check.py losses "$1"; }

# result TEXT: the running step's line of the summary, kept as soon as the step has it.
result() { printf '%-28s %s\n' "$STEP" "$1" | tee -a "$LOGS/summary.txt"; }
# step NAME FUNCTION [ARGS]: runs one check, NAME being its summary line's label, with errexit in a
# shell of its own, its stderr kept in NAME.stderr. A failure is a summary line naming the exit
# status and the end of that file, or of the newest log the step wrote; the next step runs.
# STEP_OK says whether it passed (steps that need its files look).
step() {
  local status=0 log errors
  STEP=$1 STEP_OK=false
  errors="$LOGS/${STEP//[^A-Za-z0-9.]/-}.stderr"
  say "$STEP"
  if [ $(( BUDGET - SECONDS )) -lt 30 ]; then result "SKIPPED (the ${BUDGET} s budget is spent)"; return 0; fi
  touch "$W/step-start"
  ( set -euo pipefail; "${@:2}" ) 2> "$errors" &
  wait $! || status=$?
  cat "$errors" >&2
  if [ "$status" != 0 ]; then
    log=$errors
    [ -s "$log" ] || log=$(find "$LOGS" -name '*.log' -size +0 -newer "$W/step-start" -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
    if [ "$status" = 124 ]; then status="124: over GPU_CHECK_LIMIT ($LIMIT s) or the budget ($BUDGET s)"; fi
    result "FAILED (exit $status${log:+; $(basename "$log"): $(tail -3 "$log" | tr '\n' ' ' | cut -c1-300)})"
  else
    STEP_OK=true
  fi
}

say "magpie doctor"
magpie doctor > "$LOGS/doctor.log" 2>&1 || true
grep -iE "cuda|libtorch|gpu" "$LOGS/doctor.log" | head -8 || true
# A library the binaries need and the loader cannot find fails every step: say so first.
missing=$(ldd "$BIN" "$TESTS_BIN" 2>/dev/null | grep "not found" | sort -u | tr -s ' \t\n' ' ' || true)
if [ -n "$missing" ]; then STEP="libraries"; result "MISSING: $missing"; fi

# lib_tests ARGS: the library's test binary with ARGS, under the time limit.
lib_tests() {
  CARGO_MANIFEST_DIR="$PWD" timeout "$(limit)" "$TESTS_BIN" "$@"
}

units() {
  lib_tests on_cuda --test-threads 1 > "$LOGS/units.log" 2>&1
  tail -8 "$LOGS/units.log"
  line=$(grep -E "^test result" "$LOGS/units.log" | tail -1)
  if [ "$DEVICE" = cuda ] && grep -q "skipped: no CUDA" "$LOGS/units.log"; then line="FAILED: libtorch sees no CUDA device, the tests skipped ($line)"; fi
  result "$line"
}

# semantic dedup's exact kNN on the device over precomputed vectors (the CPU's figures with
# `index: hnsw` are in docs/benchmarks.md).
knn_exact() {
  KNN_ROWS=$knn_rows KNN_INDEX=exact KNN_DEVICE=$DEVICE lib_tests knn_seconds_for_rows_in_env --ignored --nocapture --test-threads 1 > "$LOGS/knn.log" 2>&1
  result "$(grep -o -m1 "knn index=.*" "$LOGS/knn.log")"
}

# semantic dedup's embedding on the device, against the same encoder in transformers.
embedding() {
  timeout "$(limit)" python3 scripts/gpu_check.py encoder "$BIN_DIR/encoder" "$W/encoder" > "$LOGS/encoder.log" 2>&1
  timeout "$(limit)" python3 scripts/bench/filter_corpus.py "$W/embed-corpus.parquet" "$embed_rows"
  EMBED_MODEL="$W/encoder" EMBED_CORPUS="$W/embed-corpus.parquet" EMBED_DEVICE=$DEVICE \
    lib_tests semantic_dedup_seconds_on_the_corpus_in_env --ignored --nocapture --test-threads 1 > "$LOGS/embed.log" 2>&1
  # (the test harness prints the test's name on the same line first)
  ours=$(grep -o -m1 "semantic_dedup device=.*" "$LOGS/embed.log")
  theirs=$(timeout "$(limit)" python3 scripts/gpu_check.py embed "$W/encoder" "$W/embed-corpus.parquet" "$DEVICE" 64 2> "$LOGS/embed-transformers.log")
  result "magpie: ${ours#semantic_dedup }; $theirs"
}

if [ "$DEVICE" = cuda ]; then knn_rows=1000000 embed_rows=100000; else knn_rows=20000 embed_rows=2000; fi
if part units; then
  step "CUDA unit tests" units
fi

sft() {
  magpie sft --model "$W/m135" -i "$W/sft.parquet" --max-length 512 --per-device-train-batch-size 4 --max-steps 4 --learning-rate 1e-4 \
    --lr-scheduler-type constant --save-steps 0 --logging-steps 1 "$@"
}

parity() {
  sft --device cpu -o "$W/sft-cpu" 2> "$LOGS/sft-cpu.log"
  sft --device "$DEVICE" -o "$W/sft-dev" 2> "$LOGS/sft-dev.log"
  line=$(python3 scripts/gpu_check.py compare "$W/sft-cpu" "$W/sft-dev" 1e-3)
  result "$line"
}

process_group() {
  WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29561 sft --device "$DEVICE" -o "$W/sft-pg" 2> "$LOGS/sft-pg.log"
  grep -m1 "rank 0 of 1" "$LOGS/sft-pg.log" || true
  # The group's optimizer is the sharded one (bucketed gradients, the norm from bucket sums), so the
  # rounding differs from the plain path's: the tests' 1e-5, not equality.
  line=$(python3 scripts/gpu_check.py compare "$W/sft-pg" "$W/sft-dev" 1e-5)
  result "$line"
}

# Peak memory of a process as nvidia-smi sees it (context and allocator cache included), sampled
# every 200 ms into FILE while COMMAND runs: with_smi FILE COMMAND... (FILE stays empty without
# nvidia-smi: the CPU rehearsal).
with_smi() {
  local file=$1 smi= status=0
  shift
  : > "$file"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$file" &
    smi=$!
  fi
  "$@" || status=$?
  if [ -n "$smi" ]; then kill "$smi" 2>/dev/null || true; fi
  return $status
}

# The 1B shape on the GPU; on a CPU (the rehearsal) the 135M one at 256 tokens.
if [ "$DEVICE" = cuda ]; then tp_model=m1b tp_length=2048 tp_steps=12 tp_log=4; else tp_model=m135 tp_length=256 tp_steps=4 tp_log=2; fi
throughput() {
  # magpie first: a baseline that fails still leaves magpie's figures.
  with_smi "$LOGS/smi.txt" magpie sft --model "$W/$tp_model" -i "$W/sft.parquet" --bf16 --packing --max-length "$tp_length" --per-device-train-batch-size 4 \
    --max-steps "$tp_steps" --learning-rate 1e-5 --lr-scheduler-type constant --save-steps 0 --logging-steps "$tp_log" --device "$DEVICE" -o "$W/sft-1b" 2> "$LOGS/sft-1b.log"
  cp "$W/sft-1b/metrics.jsonl" "$LOGS/sft-1b-metrics.jsonl"
  with_smi "$LOGS/smi-torch.txt" timeout "$(limit)" python3 scripts/gpu_check.py torch-sft "$W/$tp_model" "$W/sft.parquet" "$tp_steps" "$DEVICE" "$tp_length" \
    > "$LOGS/torch.json" 2> "$LOGS/torch-sft.log" || true
  line=$(python3 - "$LOGS" <<'PY'
import json, os, sys
logs = sys.argv[1]
# Logged every tp_log steps, each line with its own steps' tokens and seconds: all lines but the
# first (the baseline times the steps after its first two, each synchronised).
steady = [json.loads(l) for l in open(f"{logs}/sft-1b-metrics.jsonl") if '"grad_norm"' in l][1:]
seconds = sum(r["tokens"] / r["tokens_per_second"] for r in steady)
ours = sum(r["tokens"] for r in steady) / seconds
def peak(name):
    values = [int(x) for x in open(f"{logs}/{name}").read().split() if x.isdigit()]
    return max(values) / 1024 if values else None
gib = lambda v: "n/a" if v is None else f"{v:.1f} GiB"
goal = lambda met: "met" if met else "MISSED"
ours_peak = peak("smi.txt")
# The loop's own MFU (metrics.jsonl, 6 x matrix parameters x tokens over the GPU's peak), time
# weighted over the steady steps; PyTorch's by the same formula, through the tok/s ratio.
loop_mfu = sum(r["mfu"] * r["tokens"] / r["tokens_per_second"] for r in steady) / seconds if all("mfu" in r for r in steady) else None
t = json.load(open(f"{logs}/torch.json")) if os.path.getsize(f"{logs}/torch.json") else None
if t is None:
    print(f"magpie {ours:,.0f} tok/s (MFU {'n/a' if loop_mfu is None else f'{loop_mfu:.1%}'}), peak GPU memory {gib(ours_peak)}; "
          "the PyTorch baseline FAILED (torch-sft.log)")
    sys.exit()
n = t["parameters"]
mfu = loop_mfu if loop_mfu is not None else 6 * n * ours / 989.4e12
torch_mfu = mfu * t["tok_per_s"] / ours
ratio, torch_peak = ours / t["tok_per_s"], peak("smi-torch.txt")
peak_goal = "n/a" if ours_peak is None or torch_peak is None else goal(ours_peak <= torch_peak)
print(f"magpie {ours:,.0f} tok/s (MFU {mfu:.1%}), PyTorch eager AMP bf16 {t['tok_per_s']:,.0f} tok/s (MFU {torch_mfu:.1%}): "
      f"{ratio:.2f}x; peak GPU memory (nvidia-smi) magpie {gib(ours_peak)}, PyTorch {gib(torch_peak)} "
      f"({t['peak_gib']:.1f} GiB allocated); N = {n / 1e9:.2f}B. Goals: >= 1.2x {goal(ratio >= 1.2)}, "
      f"MFU >= 40% {goal(mfu >= 0.4)}, peak <= PyTorch's {peak_goal}")
PY
)
  result "$line"
}

fusion() {
  line=$(timeout "$(limit)" python3 scripts/gpu_check.py fusion "$DEVICE" "$([ "$DEVICE" = cuda ] && echo 8192 || echo 256)" 2> "$LOGS/fusion.log")
  result "$line"
}

dpo() {
  magpie dpo --model "$W/m135" -i "$W/dpo.parquet" --max-length 256 --max-prompt-length 128 --per-device-train-batch-size 4 --max-steps 6 \
    --learning-rate 1e-6 --save-steps 0 --precompute-ref-log-probs --device "$DEVICE" -o "$W/dpo" 2> "$LOGS/dpo.log"
  line="losses $(losses "$W/dpo")"
  result "$line"
}

# Padding-free DPO (TRL's padding_free: varlen flash attention over one row) against padded:
# the same losses to bf16 rounding, and each one's training tokens per second.
dpo_padding_free() {
  local mode extra
  for mode in padded padding-free; do
    extra=(); if [ "$mode" = padding-free ]; then extra=(--padding-free); fi
    magpie dpo --model "$W/m135" -i "$W/dpo.parquet" --max-length 256 --max-prompt-length 128 --per-device-train-batch-size 8 --max-steps 6 \
      --learning-rate 1e-6 --save-steps 0 --precompute-ref-log-probs --bf16 --device "$DEVICE" "${extra[@]}" -o "$W/dpo-$mode" 2> "$LOGS/dpo-$mode.log"
  done
  local same padded free
  same=$(python3 scripts/gpu_check.py compare "$W/dpo-padded" "$W/dpo-padding-free" 1e-2)
  padded=$(python3 scripts/gpu_check.py rate "$W/dpo-padded")
  free=$(python3 scripts/gpu_check.py rate "$W/dpo-padding-free")
  result "losses $same; tok/s padded $padded, padding-free $free"
}

master_weights() {
  python3 - "$W" <<'PY'
import sys
from transformers import AutoModelForCausalLM
import torch
w = sys.argv[1]
AutoModelForCausalLM.from_pretrained(f"{w}/m135").to(torch.bfloat16).save_pretrained(f"{w}/m135-bf16")
PY
  cp "$W"/m135/tokenizer* "$W"/m135/*.jinja "$W/m135-bf16/" 2>/dev/null || true
  magpie dpo --model "$W/m135-bf16" -i "$W/dpo.parquet" --max-length 256 --max-prompt-length 128 --per-device-train-batch-size 4 --max-steps 3 \
    --learning-rate 1e-6 --lr-scheduler-type constant --save-steps 0 --precompute-ref-log-probs --bf16 --device "$DEVICE" -o "$W/dpo-bf16" 2> "$LOGS/dpo-bf16.log"
  line=$(python3 scripts/gpu_check.py changed "$W/m135-bf16" "$W/dpo-bf16/model")
  result "$line"
}

# Resume on the device: an uninterrupted bf16 packed run against one killed after its step-2
# checkpoint and rerun, with --full-determinism (must be bit for bit) and without (the
# difference the GPU's nondeterministic kernels leave: the tolerance a resume keeps).
resume() {
  local mode extra pid
  for mode in deterministic default; do
    extra=(--device "$DEVICE" --bf16 --packing --save-steps 2 --save-total-limit 1)
    if [ "$mode" = deterministic ]; then extra+=(--full-determinism); fi
    sft "${extra[@]}" -o "$W/resume-$mode-a" 2> "$LOGS/resume-$mode-a.log"
    sft "${extra[@]}" -o "$W/resume-$mode-b" 2> "$LOGS/resume-$mode-b.log" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null && [ ! -d "$W/resume-$mode-b/checkpoint-2" ]; do sleep 0.01; done
    # $pid is the shell running the sft function: kill the binary under it (and its timeout),
    # which would otherwise go on writing the folder beside the resumed run.
    pkill -9 -f -- "-o $W/resume-$mode-b\$" 2>/dev/null || true
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    sft "${extra[@]}" --resume -o "$W/resume-$mode-b" 2>> "$LOGS/resume-$mode-b.log"
  done
  local exact default
  exact=$(python3 scripts/gpu_check.py compare "$W/resume-deterministic-a" "$W/resume-deterministic-b" 0)
  default=$(python3 scripts/gpu_check.py compare "$W/resume-default-a" "$W/resume-default-b" 1e-2)
  result "full determinism: $exact; default: $default"
}

# LoRA on the device against the CPU (f32, dropout 0: the two devices' generators draw other
# masks), the device run with gradient checkpointing; and LoRA DPO with its adapters-off reference.
lora() {
  local adapters=(--use-peft --lora-dropout 0 --lora-target-modules all-linear)
  sft "${adapters[@]}" --device cpu -o "$W/lora-cpu" 2> "$LOGS/lora-cpu.log"
  sft "${adapters[@]}" --device "$DEVICE" --gradient-checkpointing -o "$W/lora-dev" 2> "$LOGS/lora-dev.log"
  magpie dpo --model "$W/m135" -i "$W/dpo.parquet" --max-length 256 --max-prompt-length 128 --per-device-train-batch-size 4 --max-steps 3 \
    --learning-rate 1e-4 --save-steps 0 --use-peft --bf16 --device "$DEVICE" -o "$W/lora-dpo" 2> "$LOGS/lora-dpo.log"
  local sft dpo
  sft=$(python3 scripts/gpu_check.py compare "$W/lora-cpu" "$W/lora-dev" 1e-3)
  dpo=$(losses "$W/lora-dpo")
  result "sft: $sft; dpo bf16 losses $dpo"
}

training_models() {
  timeout "$(limit)" python3 scripts/gpu_check.py models "$BIN_DIR/tokenizer" "$W" "$([ "$DEVICE" = cuda ] && echo full || echo small)" > "$LOGS/models.log" 2>&1
}

if part train; then
  step "training models" training_models
fi
if part train && $STEP_OK; then
  step "parity CPU vs $DEVICE" parity
  step "process group of one" process_group
  step "throughput $tp_model bf16" throughput
  step "q/k/v, gate/up fused" fusion
  step "DPO 6 steps" dpo
  step "DPO padding-free vs padded" dpo_padding_free
  step "bf16 DPO lr 1e-6" master_weights
  step "resume, full determinism" resume
  step "LoRA CPU vs $DEVICE" lora
fi

if part filter; then
  step "kNN exact on $DEVICE" knn_exact
  step "embedding on $DEVICE" embedding
fi

if [ "$DEVICE" = cuda ]; then size=full num=1000 seqs=256 hf_prompts=512; else size=small num=16 seqs=8 hf_prompts=16; fi
synth() { magpie synth --num "$num" --max-tokens 64 --response-max-tokens 128 --max-num-seqs "$seqs" "$@"; }
rate() { grep -E "generated (tokens|tok/s)" "$1" | awk '{print $NF}' | paste -sd' ' | awk '{printf "%.0f tok/s (%d tokens)", $2, $1}'; }

# synth_rate ENGINE MODEL: $num instructions + responses on ENGINE; its generated tok/s.
synth_rate() {
  synth --model "$2" --engine "$1" -o "$W/synth-$1" > "$LOGS/synth-$1.txt" 2> "$LOGS/synth-$1.log"
  line=$(rate "$LOGS/synth-$1.txt")
  result "$line"
}

# The same lengths and batch size (see gpu_check_synth.py).
synth_transformers() {
  timeout "$(limit)" python3 scripts/gpu_check_synth.py hf-generate "$W/s1b" "$hf_prompts" "$seqs" > "$LOGS/hf-generate.txt" 2> "$LOGS/hf-generate.log"
  line=$(tail -1 "$LOGS/hf-generate.txt")
  result "$line"
}

# batch_invariance ENGINE MODEL: greedy answers to 64 synthesised instructions, alone and 64 at a time.
batch_invariance() {
  [ -f "$W/prompts.parquet" ] || timeout "$(limit)" python3 scripts/gpu_check_synth.py prompts "$W/prompts.parquet" 64 "$W/synth-llamacpp" "$W/synth-mistralrs"
  for n in 1 64; do
    magpie synth --input "$W/prompts.parquet" --model "$2" --engine "$1" --response-temperature 0 --response-max-tokens 64 \
      --max-num-seqs $n -o "$W/greedy-$1-$n" > /dev/null 2> "$LOGS/greedy-$1-$n.log"
  done
  line=$(python3 scripts/gpu_check_synth.py invariance "$W/greedy-$1-1" "$W/greedy-$1-64")
  result "$line"
}

synthesis_models() {
  timeout "$(limit)" python3 scripts/gpu_check_synth.py models "$BIN_DIR/tokenizer" "$W" "$size" > "$LOGS/synth-models.log" 2>&1
  tail -1 "$LOGS/synth-models.log"
}

if part synth; then
  step "synthesis models ($size)" synthesis_models
fi
if part synth && $STEP_OK; then
  step "synth llama.cpp" synth_rate llamacpp "$W/s1b.gguf"
  step "synth mistralrs" synth_rate mistralrs "$W/s1b"
  step "transformers generate" synth_transformers
  step "llama.cpp batch invariance" batch_invariance llamacpp "$W/s1b.gguf"
  step "mistralrs batch invariance" batch_invariance mistralrs "$W/s1b"
fi

say "summary ($DEVICE; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo no nvidia-smi))"
cat "$LOGS/summary.txt"
