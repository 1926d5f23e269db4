#!/usr/bin/env bash
# Set-up, then every test: unit tests beside the code, the binary-driving tests in tests/, and
# the docs (every relative link resolves; the README's quick-start blocks run).
# Release profile, so the tests and the binary share one compile of mistralrs, tch and llama.cpp.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
scripts/setup.sh --test
# The docs first (setup.sh built the binary they run), so cargo's summary closes the output.
scripts/check-docs.sh --run
cargo test --release --locked
