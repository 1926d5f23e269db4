"""Writes the 1M-row filter benchmark corpus: N conversations whose instruction is 20-40 random
words and response 40-200, DUP_SHARE of them planted near duplicates of an earlier row's
instruction (a word dropped, two neighbours swapped, or the case changed), an instruction in 50
ending with ":", as parquet with `uuid`, `instruction`, `response` and `planted_from`.

    python scripts/bench/filter_corpus.py OUT.parquet N [DUP_SHARE]
"""
import os, random, sys
import pyarrow as pa, pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minhash_corpus import near_copy, vocabulary

out, n = sys.argv[1], int(sys.argv[2])
dup_share = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
rng = random.Random(0)
vocab = vocabulary(rng)
writer = None
block = 100_000
texts = []
for start in range(0, n, block):
    uuids, instructions, responses, planted = [], [], [], []
    for i in range(start, min(n, start + block)):
        if texts and rng.random() < dup_share:
            j = rng.randrange(len(texts))
            text, source = near_copy(rng, texts[j]), f"row-{j:07d}"
        else:
            text, source = " ".join(rng.choices(vocab, k=rng.randint(20, 40))), None
            if rng.random() < 0.02:
                text += ":"
        texts.append(text)
        uuids.append(f"row-{i:07d}")
        instructions.append(text)
        responses.append(" ".join(rng.choices(vocab, k=rng.randint(40, 200))))
        planted.append(source)
    table = pa.table({"uuid": uuids, "instruction": instructions, "response": responses, "planted_from": planted})
    writer = writer or pq.ParquetWriter(out, table.schema)
    writer.write_table(table)
writer.close()
