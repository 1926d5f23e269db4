#!/usr/bin/env bash
# judge_tags with answers constrained to each tag's JSON object (structured_output, the default:
# llama.cpp's grammar sampler) against the same step with free `{`-prefilled answers, one run
# each, same machine, the embedded SmolLM2 as judge over the 80 instructions of
# data/eval/magpie-eval-80.parquet. Prints each side's step seconds and parse failures, and the
# time ratio.
#   scripts/bench/judge-structured.sh [MAX_TOKENS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
cd "$MAGPIE_ROOT"
MAX_TOKENS=${1:-128}
input=data/eval/magpie-eval-80.parquet
[ -x "$MAGPIE_BIN" ] || scripts/setup.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for structured in true false; do
  "$MAGPIE_BIN" filter -i "$input" -o "$work/$structured.parquet" \
    --steps "[{\"step\": \"judge_tags\", \"max_tokens\": $MAX_TOKENS, \"structured_output\": $structured}]" > /dev/null
done
python - "$work" <<'PY'
import json, sys
work = sys.argv[1]
step = {s: json.load(open(f"{work}/{s}.parquet.report.json"))["steps"][0] for s in ("true", "false")}
for s, name in (("true", "structured"), ("false", "free text")):
    failures = step[s]["parse_failures"]
    print(f"{name:>10}: {step[s]['seconds']:7.1f} s for {step[s]['rows_in']} rows x 3 tags; unparsed fields {json.dumps(failures)}")
print(f"structured / free-text time: {step['true']['seconds'] / step['false']['seconds']:.2f}x")
PY
