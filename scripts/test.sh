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
# One test at a time per two cores: the tests that run a model use two threads each (llama.cpp
# and libtorch spin while they wait), so two at once on two cores oversubscribe them. On a 2-core
# AVX2 EPYC, tests/cli took 280 s one at a time against 1,031 s two at a time, tests/server 297 s
# against 1,469 s. RUST_TEST_THREADS set by the caller wins.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))}"
cargo test --release --locked
