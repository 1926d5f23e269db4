#!/usr/bin/env bash
# Set-up, then every test: unit tests beside the code and the binary-driving tests in tests/.
# Release profile, so the tests and the binary share one compile of mistralrs, tch and llama.cpp.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
scripts/setup.sh --test
cargo test --release --locked
