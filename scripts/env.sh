# Sourced by the scripts: shared build settings.
# The cargo target directory lives outside the clone so that the slow bundled
# RocksDB C++ build is done once per machine and reused by every clone (CI
# runs in a fresh clone). A cold build still works, it just takes longer.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/jobsched/target}
mkdir -p "$CARGO_TARGET_DIR"
