"""Baseline for the semantic part of scripts/bench/filter.sh: sentence-transformers embedding
the same instructions with the same all-MiniLM-L6-v2 folder, batch 64, on the same threads.
Prints one JSON line with embeddings/s.

    python scripts/bench/embed_sentence_transformers.py CORPUS.parquet THREADS
"""
import json, os, pathlib, sys, time
import pyarrow.parquet as pq, torch
from sentence_transformers import SentenceTransformer

corpus, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
home = pathlib.Path(os.environ["MAGPIE_HOME"])
texts = pq.read_table(corpus, columns=["instruction"]).column("instruction").to_pylist()
model = SentenceTransformer(str(home / "all-minilm-l6-v2"), device="cpu")
start = time.perf_counter()
model.encode(texts, batch_size=64, normalize_embeddings=True)
seconds = time.perf_counter() - start
print(json.dumps({"rows": len(texts), "seconds": round(seconds, 2), "embeddings_per_s": round(len(texts) / seconds, 1)}))
