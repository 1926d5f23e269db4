#!/usr/bin/env bash
# Synth throughput, one run, same GGUF, same machine: `magpie synth --instructions-only` with each
# engine against llama-cpp-python (sequential requests), for the same number of instructions at
# T=1 with 2 threads. Prints tok/s, the ratios, and five instructions from each side with the
# share that came back empty or truncated.
#   scripts/bench/synth.sh [NUM] [MAX_TOKENS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
cd "$MAGPIE_ROOT"
NUM=${1:-64}
MAX_TOKENS=${2:-256}
MODEL="$MAGPIE_HOME/smollm2-135m-instruct-q4_1.gguf"
[ -x "$MAGPIE_BIN" ] && [ -f "$MODEL" ] || scripts/setup.sh
python -c "import llama_cpp" 2>/dev/null || pip install -q llama-cpp-python==0.3.36 pyarrow
python -c "import pyarrow" 2>/dev/null || pip install -q pyarrow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== llama-cpp-python, sequential"
python scripts/bench/synth_llama_cpp_python.py --model "$MODEL" --num "$NUM" --max-tokens "$MAX_TOKENS" --threads 2 > "$work/python.json"

for engine in llamacpp mistralrs; do
  echo "== magpie synth --engine $engine"
  "$MAGPIE_BIN" synth --engine "$engine" --model "$MODEL" --instructions-only --num "$NUM" --chunk-rows "$NUM" \
    --max-tokens "$MAX_TOKENS" --temperature 1.0 --top-p 1.0 --threads 2 -o "$work/$engine" > "$work/$engine.txt"
done

python - "$work" "$NUM" <<'PY'
import json, sys, glob, re, pyarrow.parquet as pq
work, num = sys.argv[1], int(sys.argv[2])
base = json.load(open(f"{work}/python.json"))
print(f"\n{num} instructions, T=1, top_p=1, 2 threads, SmolLM2-135M-Instruct Q4_1\n")
print(f"{'side':<28}{'tok/s':>8}{'ratio':>8}{'empty':>8}{'truncated':>11}")
print(f"{'llama-cpp-python (serial)':<28}{base['tok_per_s']:>8.1f}{1.0:>8.2f}{base['empty']/num:>8.0%}{base['truncated']/num:>11.0%}")
samples = {"llama-cpp-python": base["samples"]}
for engine in ["llamacpp", "mistralrs"]:
    summary = open(f"{work}/{engine}.txt").read()
    tok_s = float(re.search(r"generated tok/s\s+([\d.]+)", summary).group(1))
    dropped = int(re.search(r"dropped \(empty\)\s+(\d+)", summary).group(1))
    rows = [r for f in sorted(glob.glob(f"{work}/{engine}/part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    truncated = sum(r["finish_reasons"][0] == "length" for r in rows)
    print(f"{'magpie --engine ' + engine:<28}{tok_s:>8.1f}{tok_s / base['tok_per_s']:>8.2f}{dropped/num:>8.0%}{truncated/num:>11.0%}")
    samples[engine] = [r["instruction"] for r in rows[:5]]
for side, texts in samples.items():
    print(f"\n-- five instructions: {side}")
    for t in texts:
        print("  *", t[:160])
PY
