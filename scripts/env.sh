# Sourced by the other scripts: the environment every build and run of magpie shares.
# - the project venv, whose torch wheel is the libtorch tch links against;
# - a persistent cargo target dir outside the checkout, so CI and fresh clones reuse the
#   (long) build of mistralrs, tch and llama.cpp;
# - the model folder filled by setup.sh.
# The venv and the target dir live in a cache outside the checkout ($MAGPIE_CACHE), and `.venv`
# in the checkout links to the venv: the libtorch path that torch-sys bakes into the build (and
# the binary's rpath) is then the same for every clone, so a fresh clone reuses the build.
MAGPIE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MAGPIE_ROOT
export MAGPIE_CACHE="${MAGPIE_CACHE:-$HOME/.cache/magpie}"
export VIRTUAL_ENV="$MAGPIE_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MAGPIE_CACHE/target}"
export MAGPIE_HOME="${MAGPIE_HOME:-$MAGPIE_ROOT/models}"
export MAGPIE_BIN="$CARGO_TARGET_DIR/release/magpie"
