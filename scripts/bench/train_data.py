"""Writes the fixed data the SFT and DPO benchmarks train on, as parquet in our format:
4 long single-turn conversations (`messages`, each well over 256 tokens) and 4 preference pairs
(`prompt`, `chosen`, `rejected`). Deterministic, so both sides see the same tokens.

    python scripts/bench/train_data.py OUT_DIR
"""
import pathlib, random, sys
import pyarrow as pa, pyarrow.parquet as pq

out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(7)
words = ("model data train token loss step batch learn river mountain city garden music light paper "
         "stone water number story answer question simple careful quick slow bright quiet").split()


def text(n):
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


conversations = [[{"role": "user", "content": f"Question {i}: {text(20)}"},
                  {"role": "assistant", "content": text(400)}] for i in range(4)]
pq.write_table(pa.table({"messages": conversations}), out / "sft.parquet")
pairs = {"prompt": [], "chosen": [], "rejected": []}
for i in range(4):
    pairs["prompt"].append([{"role": "user", "content": f"Prompt {i}: {text(30)}"}])
    pairs["chosen"].append([{"role": "assistant", "content": text(90)}])
    pairs["rejected"].append([{"role": "assistant", "content": text(70)}])
pq.write_table(pa.table(pairs), out / "dpo.parquet")
