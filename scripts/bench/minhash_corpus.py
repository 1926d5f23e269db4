"""Writes the MinHash benchmark corpus: N instructions of 20-40 random words with planted near
duplicates (a word dropped, two neighbours swapped, or the case changed), as parquet with
`uuid`, `instruction` and `planted_from` (the uuid of the row a variant was made from).

    python scripts/bench/minhash_corpus.py OUT.parquet N [DUP_SHARE]
"""
import random, sys


def vocabulary(rng):
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]


def near_copy(rng, text):
    """`text` with a word dropped, two neighbours swapped, or the case changed."""
    words = text.split()
    kind = rng.choice(["drop", "swap", "case"])
    if kind == "drop":
        del words[rng.randrange(len(words))]
    elif kind == "swap":
        k = rng.randrange(len(words) - 1)
        words[k], words[k + 1] = words[k + 1], words[k]
    else:
        words = [w.upper() if rng.random() < 0.5 else w.capitalize() for w in words]
    return " ".join(words)


if __name__ == "__main__":
    import pyarrow as pa, pyarrow.parquet as pq

    out, n = sys.argv[1], int(sys.argv[2])
    dup_share = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
    rng = random.Random(0)
    vocab = vocabulary(rng)
    uuids, texts, planted = [], [], []
    for i in range(n):
        if texts and rng.random() < dup_share:
            j = rng.randrange(len(texts))
            text, source = near_copy(rng, texts[j]), uuids[j]
        else:
            text, source = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 40))), None
        uuids.append(f"row-{i:07d}")
        texts.append(text)
        planted.append(source)
    pq.write_table(pa.table({"uuid": uuids, "instruction": texts, "planted_from": planted}), out)
