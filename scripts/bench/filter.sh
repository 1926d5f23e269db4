#!/usr/bin/env bash
# MinHash dedup, one run, same machine: `magpie filter` minhash_dedup against datasketch
# MinHashLSH with the same normalisation, 5-grams, 128 permutations and threshold 0.7, on a
# generated corpus with planted near duplicates (word drops, swaps, case). Prints docs/s per core
# for both, the ratio, and precision/recall of found duplicate pairs against exact Jaccard. Then
# the peak RSS of exact + MinHash dedup over ROWS_RSS rows.
# Semantic dedup: all-MiniLM-L6-v2 embeddings/s against sentence-transformers on the same CPU,
# and the exact kNN time for 100K rows.
#   scripts/bench/filter.sh [ROWS] [ROWS_RSS] [EMBED_ROWS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
cd "$MAGPIE_ROOT"
ROWS=${1:-100000}
ROWS_RSS=${2:-1000000}
EMBED_ROWS=${3:-2000}
[ -x "$MAGPIE_BIN" ] || scripts/setup.sh
python -c "import datasketch, pyarrow" 2>/dev/null || pip install -q datasketch==2.0.0 pyarrow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python scripts/bench/minhash_corpus.py "$work/corpus.parquet" "$ROWS"

threads=$(nproc)
runs=()
for verify in true false; do
  out="$work/magpie-$verify.parquet"
  "$MAGPIE_BIN" filter -i "$work/corpus.parquet" -o "$out" \
    --steps "[{\"step\": \"minhash_dedup\", \"ngram\": 5, \"num_perm\": 128, \"threshold\": 0.7, \"drop\": false, \"verify\": $verify}]" > /dev/null
  # The step's own time (shingling, sketches, LSH, union-find, labels), as datasketch's excludes
  # reading and writing the corpus.
  runs+=("magpie_verify_$verify" "$out" "$(python -c "import json; print(json.load(open('$out.report.json'))['steps'][0]['seconds'])")")
done
echo "== MinHash: magpie (verified, and plain LSH) vs datasketch, $ROWS instructions, $threads threads"
python scripts/bench/minhash_datasketch.py "$work/corpus.parquet" "$threads" "${runs[@]}"

echo "== semantic: embeddings/s against sentence-transformers ($EMBED_ROWS instructions, $threads threads)"
python scripts/bench/minhash_corpus.py "$work/embed.parquet" "$EMBED_ROWS" 0
python -c "import sentence_transformers" 2>/dev/null || pip install -q sentence-transformers
HF_HUB_OFFLINE=1 python scripts/bench/embed_sentence_transformers.py "$work/embed.parquet" "$threads"
"$MAGPIE_BIN" filter -i "$work/embed.parquet" -o "$work/embed-out.parquet" --steps '[{"step": "semantic_dedup", "drop": false}]' > /dev/null
python -c "import json; s = json.load(open('$work/embed-out.parquet.report.json'))['steps'][0]; print(json.dumps({'rows': $EMBED_ROWS, 'seconds': round(s['embed_seconds'], 2), 'embeddings_per_s': round($EMBED_ROWS / s['embed_seconds'], 1)}))"
echo "== semantic: exact kNN (k=500) for 100K rows of 384-d unit vectors"
cargo test --release --lib knn_seconds_for_rows_in_env -- --ignored --nocapture 2>&1 | grep "knn index="

echo "== peak RSS, exact + MinHash dedup over $ROWS_RSS rows"
python scripts/bench/minhash_corpus.py "$work/big.parquet" "$ROWS_RSS"
/usr/bin/time -f "peak RSS %M KiB, %e s" "$MAGPIE_BIN" filter -i "$work/big.parquet" -o "$work/big-out" \
  --steps '[{"step": "exact_dedup"}, {"step": "minhash_dedup"}]'
