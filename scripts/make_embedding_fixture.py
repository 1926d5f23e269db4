"""Writes data/fixtures/minilm-embeddings.json once: all-MiniLM-L6-v2 embeddings of a few
sentences computed by sentence-transformers from the set-up's model folder, which
src/filter/embed.rs must match to 1e-4.

    .venv/bin/pip install sentence-transformers && .venv/bin/python scripts/make_embedding_fixture.py
"""
import json, os, pathlib
from sentence_transformers import SentenceTransformer

root = pathlib.Path(__file__).resolve().parent.parent
home = pathlib.Path(os.environ.get("MAGPIE_HOME", root / "models"))
sentences = [
    "How do I reverse a list in Python?",
    "Write a haiku about autumn rain.",
    "What is the derivative of x^3 + 2x?",
    "Plan a three-day trip to Lisbon on a budget, with museums, food markets and a day trip to Sintra by train.",
]
model = SentenceTransformer(str(home / "all-minilm-l6-v2"), device="cpu")
embeddings = model.encode(sentences, normalize_embeddings=True).tolist()
out = root / "data" / "fixtures" / "minilm-embeddings.json"
out.write_text(json.dumps({"model": "sentence-transformers/all-MiniLM-L6-v2", "sentences": sentences, "embeddings": embeddings}))
print("wrote", out)
