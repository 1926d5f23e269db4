#!/usr/bin/env bash
# Set-up, then the main job on the embedded default model. Each stage issue extends this.
# Today: inspect a dataset in Magpie's released shape (read through the same normaliser every
# stage uses).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MAGPIE_ROOT"
scripts/setup.sh
"$MAGPIE_BIN" inspect data/fixtures/magpie-released.parquet data/fixtures/ultrafeedback-armorm.parquet
