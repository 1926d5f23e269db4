#!/usr/bin/env bash
# Synth on a server, one run, same machine: llama.cpp's server (scripts/setup.sh --test builds
# it) on the embedded SmolLM2 GGUF with CONCURRENCY slots, and against it
#   1. `magpie synth --engine openai --instructions-only` with --max-num-seqs CONCURRENCY;
#   2. the official `openai` Python client on asyncio at the same concurrency, same prompt ids,
#      sampling, stops and seeds;
# then in-process llama.cpp (`--engine llamacpp`, the same batch width) without the server, so
# the cost of the HTTP hop shows. The two clients take turns, ROUNDS times each, on the same
# server (sampled lengths differ between runs, so one run each is noisy). Prints the mean tok/s,
# magpie/client, and each client's own CPU time as a share of its wall time (magpie's
# tokenising, rendering and writing; the goal is < 5%).
#   scripts/bench/synth-server.sh [NUM] [MAX_TOKENS] [CONCURRENCY] [ROUNDS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
cd "$MAGPIE_ROOT"
NUM=${1:-64}
MAX_TOKENS=${2:-128}
CONCURRENCY=${3:-8}
ROUNDS=${4:-3}
MODEL="$MAGPIE_HOME/smollm2-135m-instruct-q4_1.gguf"
[ -x "$MAGPIE_LLAMA_SERVER" ] && [ -x "$MAGPIE_BIN" ] || scripts/setup.sh --test
python -c "import openai" 2>/dev/null || pip install -q openai==2.8.1
work=$(mktemp -d)
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$MAGPIE_LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$port" -c $((CONCURRENCY * 1024)) -np "$CONCURRENCY" \
  -t 2 -tb 2 -fa off --no-webui > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
until curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null; do sleep 0.2; done
url="http://127.0.0.1:$port/v1"

for round in $(seq "$ROUNDS"); do
  echo "== round $round: magpie synth --engine openai (--max-num-seqs $CONCURRENCY), then the openai Python client"
  /usr/bin/time -f "%e %U %S" -o "$work/magpie-$round.time" "$MAGPIE_BIN" synth --base-url "$url" --model "$MODEL" --instructions-only \
    --num "$NUM" --chunk-rows "$NUM" --max-tokens "$MAX_TOKENS" --max-num-seqs "$CONCURRENCY" --seed "$round" -o "$work/server-$round" > "$work/magpie-$round.txt"
  python scripts/bench/synth_server.py --base-url "$url" --num "$NUM" --max-tokens "$MAX_TOKENS" --concurrency "$CONCURRENCY" --seed "$round" > "$work/client-$round.json"
done
kill $server; wait $server 2>/dev/null || true
echo "== magpie synth --engine llamacpp (in-process, --batch-size $CONCURRENCY)"
"$MAGPIE_BIN" synth --engine llamacpp --model "$MODEL" --instructions-only --num "$NUM" --chunk-rows "$NUM" \
  --max-tokens "$MAX_TOKENS" --batch-size "$CONCURRENCY" --threads 2 -o "$work/local" > "$work/local.txt"

python - "$work" "$NUM" "$CONCURRENCY" "$ROUNDS" <<'PY'
import json, re, sys
work, num, concurrency, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def summary(name):
    text = open(f"{work}/{name}.txt").read()
    return float(re.search(r"generated tok/s\s+([\d.]+)", text).group(1))
mean = lambda xs: sum(xs) / len(xs)
magpie = [summary(f"magpie-{r}") for r in range(1, rounds + 1)]
times = [list(map(float, open(f"{work}/magpie-{r}.time").read().split())) for r in range(1, rounds + 1)]
clients = [json.load(open(f"{work}/client-{r}.json")) for r in range(1, rounds + 1)]
client = [c["tok_per_s"] for c in clients]
local = summary("local")
print(f"\n{num} instructions x {rounds} rounds, T=1, SmolLM2-135M-Instruct Q4_1, llama.cpp server with {concurrency} slots, 2 threads\n")
print("per round, tok/s: magpie " + ", ".join(f"{x:.1f}" for x in magpie) + "; openai client " + ", ".join(f"{x:.1f}" for x in client))
print(f"{'side':<38}{'tok/s':>8}{'ratio':>8}{'own CPU / wall':>16}")
print(f"{'openai client (asyncio)':<38}{mean(client):>8.1f}{1.0:>8.2f}{mean([c['cpu_seconds'] / c['seconds'] for c in clients]):>16.1%}")
print(f"{'magpie --engine openai':<38}{mean(magpie):>8.1f}{mean(magpie) / mean(client):>8.2f}{mean([(u + s) / w for w, u, s in times]):>16.1%}")
print(f"{'magpie --engine llamacpp (no server)':<38}{local:>8.1f}{local / mean(client):>8.2f}{'':>16}")
PY
