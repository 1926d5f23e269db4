# Shared start of the training benchmarks (sourced by sft.sh and dpo.sh): set-up if needed,
# transformers and pyarrow in the venv, a work dir removed on exit, SmolLM2 converted into
# $work/smollm2, and the fixed benchmark data (scripts/bench/train_data.py) in $work.
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
cd "$MAGPIE_ROOT"
[ -x "$MAGPIE_BIN" ] || scripts/setup.sh
python -c "import transformers, pyarrow" 2>/dev/null || pip install -q transformers pyarrow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$MAGPIE_BIN" convert -o "$work/smollm2"
python scripts/bench/train_data.py "$work"
