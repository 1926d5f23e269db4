"""The baseline for scripts/bench/filter.sh: datasketch MinHashLSH dedup of the benchmark corpus
with the same normalisation, word 5-grams, num_perm and threshold as `magpie filter`'s
minhash_dedup. Each document queries the index; it is a duplicate if any earlier document is a
candidate, else it is inserted. Then scores both sides' duplicate pairs against exact Jaccard.

    python scripts/bench/minhash_datasketch.py CORPUS.parquet THREADS LABEL OUTPUT.parquet SECONDS [LABEL OUTPUT SECONDS ...]
"""
import json, re, sys, time
import pyarrow.parquet as pq
from datasketch import MinHash, MinHashLSH

corpus, threads = sys.argv[1], int(sys.argv[2])
runs = [(sys.argv[i], sys.argv[i + 1], float(sys.argv[i + 2])) for i in range(3, len(sys.argv), 3)]
NGRAM, PERM, THRESHOLD = 5, 128, 0.7
table = pq.read_table(corpus).to_pydict()
uuids, texts = table["uuid"], table["instruction"]

def shingles(text):
    words = [re.sub(r"[^\w]", "", w).lower() for w in re.split(r"[\s]+|[^\w\s']", text)]
    words = [w for w in words if w]
    if len(words) <= NGRAM:
        return {" ".join(words)}
    return {" ".join(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)}

start = time.perf_counter()
lsh = MinHashLSH(threshold=THRESHOLD, num_perm=PERM)
first_of = {}
for uuid, text in zip(uuids, texts):
    m = MinHash(num_perm=PERM)
    for s in shingles(text):
        m.update(s.encode())
    found = lsh.query(m)
    if found:
        first_of[uuid] = min(found)
    else:
        lsh.insert(uuid, m)
datasketch_seconds = time.perf_counter() - start

datasketch_pairs = set(first_of.items())
index = {u: i for i, u in enumerate(uuids)}
cache = {}
def jaccard(a, b):
    sa = cache.setdefault(a, shingles(texts[index[a]]))
    sb = cache.setdefault(b, shingles(texts[index[b]]))
    return len(sa & sb) / len(sa | sb)

# Ground truth: planted pairs (and any found pair) whose exact Jaccard reaches the threshold.
truth = {(u, p) for u, p in zip(uuids, table["planted_from"]) if p is not None and jaccard(u, p) >= THRESHOLD}
def scores(pairs):
    # A duplicate found through any member of its planted source's cluster counts as found.
    root = {}
    for u, c in pairs:
        root[u] = c
    def find(u):
        while u in root:
            u = root[u]
        return u
    found = sum(find(u) == find(p) for u, p in truth)
    correct = sum(jaccard(u, c) >= THRESHOLD for u, c in pairs)
    return (correct / len(pairs) if pairs else 1.0), (found / len(truth) if truth else 1.0)

n = len(uuids)
dp, dr = scores(datasketch_pairs)
result = {"docs": n, "true_pairs": len(truth),
          "datasketch": {"seconds": round(datasketch_seconds, 2), "docs_per_s_per_core": round(n / datasketch_seconds), "pairs": len(datasketch_pairs), "precision": round(dp, 4), "recall": round(dr, 4)}}
for label, path, seconds in runs:
    out = pq.read_table(path, columns=["uuid", "minhash_cluster"]).to_pydict()
    pairs = {(u, c) for u, c in zip(out["uuid"], out["minhash_cluster"]) if u != c}
    p, r = scores(pairs)
    per_core = n / seconds / threads
    result[label] = {"seconds": round(seconds, 2), "threads": threads, "docs_per_s_per_core": round(per_core), "pairs": len(pairs),
                     "precision": round(p, 4), "recall": round(r, 4), "ratio_per_core": round(per_core / (n / datasketch_seconds), 1)}
print(json.dumps(result, indent=1))
