#!/usr/bin/env bash
# Filter at the seed's size on this machine, one run:
# 1. ROWS (1,000,000) generated conversations with 20% planted near duplicates through the
#    Pro-300K recipe's model-free steps (exact_dedup, minhash_dedup, heuristics, select down to
#    300,000): wall time, peak RSS and each step's seconds, against the goals of 120 s and 4 GiB.
# 2. semantic dedup's kNN on KNN_ROWS (1,000,000) precomputed 384-d unit vectors (every fifth a
#    near copy of an earlier row) with `index: hnsw`: build and search time (the LSH buckets'
#    share of it too), recall of the near duplicates and of the nearest neighbour against exact
#    kNN on 1,000 rows, planted pairs joined and peak RSS, against the goals of 600 s and recall 0.95.
# Random vectors are the hard case for a graph index (every distance is near 2), so the recall
# here is a floor for real sentence embeddings.
#   scripts/bench/filter-1m.sh [ROWS] [KNN_ROWS]     (KNN_ROWS 0: the steps only)
#   KNN_HNSW='{"connectivity": 8, "expansion_add": 32, "expansion_search": 16}' sets the graph
#   (semantic_dedup's `hnsw` keys, as JSON over the defaults).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
cd "$MAGPIE_ROOT"
ROWS=${1:-1000000}
KNN_ROWS=${2:-1000000}
[ -x "$MAGPIE_BIN" ] || scripts/setup.sh
python -c "import pyarrow" 2>/dev/null || pip install -q pyarrow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) threads"

echo "== model-free steps over $ROWS rows"
start=$(date +%s.%N)
python scripts/bench/filter_corpus.py "$work/corpus.parquet" "$ROWS"
echo "corpus generated in $(python -c "print(round($(date +%s.%N) - $start, 1))") s"
cat > "$work/steps.yaml" <<'YAML'
steps:
  - step: exact_dedup
  - step: minhash_dedup
  - step: heuristics
  - step: select
    rules:
      - {column: instruction, op: not_ends_with, value: ":"}
      - {column: empty, op: "==", value: false}
    sort_by: response_length
    descending: true
    limit: 300000
    shuffle_seed: 42
YAML
/usr/bin/time -f "%M %e" -o "$work/time" "$MAGPIE_BIN" filter --recipe "$work/steps.yaml" \
  -i "$work/corpus.parquet" -o "$work/out" > "$work/log"
read -r rss wall < "$work/time"
python - "$work/out.report.json" "$rss" "$wall" <<'PY'
import json, sys
report, rss, wall = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3])
for step in report["steps"]:
    print(f"  {step['step']:<14} {step['rows_in']:>9} -> {step['rows_out']:>9} rows  {step['seconds']:6.1f} s")
gib = rss / 1024 / 1024
print(json.dumps({"rows": report["rows_in"] if "rows_in" in report else None, "rows_out": report["steps"][-1]["rows_out"],
                  "wall_s": wall, "peak_rss_gib": round(gib, 2),
                  "goal_wall_120s": "met" if wall < 120 else "missed", "goal_rss_4gib": "met" if gib < 4 else "missed"}))
PY

[ "$KNN_ROWS" -gt 0 ] || exit 0
echo "== semantic dedup kNN, index hnsw, $KNN_ROWS rows of 384-d"
KNN_ROWS=$KNN_ROWS KNN_INDEX=hnsw /usr/bin/time -f "peak RSS %M KiB, %e s wall (with generating the vectors)" \
  cargo test --release --lib knn_seconds_for_rows_in_env -- --ignored --nocapture 2>&1 | grep -E "knn index=|peak RSS|^error|panicked"
