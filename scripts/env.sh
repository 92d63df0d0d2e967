# Sourced by the scripts: shared build settings.
# The cargo target directory lives outside the clone so that the slow bundled
# RocksDB C++ build is done once per machine and reused by every clone (CI
# runs in a fresh clone). A cold build still works, it just takes longer.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/jobsched/target}
mkdir -p "$CARGO_TARGET_DIR"

# Why the stamp: cargo names our crates' artifacts by their path relative to
# the workspace and judges them fresh by comparing source mtimes with the
# artifact's. Two checkouts sharing this directory would therefore reuse each
# other's binaries whenever this checkout's files are older than the other's
# build (e.g. /work/main after a build in a fresh clone): the tests would run
# someone else's code. When the checkout that last built here is not this
# one, bump our sources' mtimes so cargo rebuilds our crates (dependencies,
# RocksDB included, stay cached).
_jobsched_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_jobsched_stamp="$CARGO_TARGET_DIR/.last-checkout"
if [ "$(cat "$_jobsched_stamp" 2>/dev/null)" != "$_jobsched_root" ]; then
  find "$_jobsched_root/crates" "$_jobsched_root/tests" "$_jobsched_root/examples" "$_jobsched_root/Cargo.toml" \
    \( -name '*.rs' -o -name 'Cargo.toml' \) -exec touch {} + 2>/dev/null || true
  echo "$_jobsched_root" >"$_jobsched_stamp"
fi
unset _jobsched_root _jobsched_stamp
