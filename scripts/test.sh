#!/usr/bin/env bash
# The whole test suite, in three parts:
#   1. cargo tests (nextest): unit and property tests, the openraft storage
#      suite, and the multi-process cluster tests;
#   2. the chaos smoke run (scripts/chaos.sh smoke, at most 5 minutes: leader
#      kills, pauses, partitions, worker faults, all nodes killed; history
#      checker verdict);
#   3. the docker-compose round (scripts/docker-ci.sh: images built without a
#      registry, curl flow on every node, one chaos round in containers);
#      skipped with a clear message when no Docker engine is reachable.
# Installs what is missing first. Every part runs even when an earlier one
# failed; the exit status is non-zero if any failed.
# Extra arguments go to `cargo nextest run` (e.g. a test name filter) and then
# only part 1 runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/env.sh
scripts/install-deps.sh
# The cluster tests start the real binaries: build them (dev profile, the
# same one the tests use, so nothing is compiled twice).
cargo build --workspace --bins

failed=()
cargo nextest run --workspace --no-fail-fast "$@" || failed+=("cargo tests")
if [ $# -eq 0 ]; then
  NO_BUILD=1 scripts/chaos.sh smoke || failed+=("chaos smoke")
  SKIP_CARGO=1 scripts/docker-ci.sh || failed+=("docker-compose round")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "all test parts passed"
