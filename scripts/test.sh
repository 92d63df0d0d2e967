#!/usr/bin/env bash
# The whole test suite: unit and property tests, the openraft storage suite,
# and the multi-process cluster tests. Installs what is missing first.
# Extra arguments go to `cargo nextest run` (e.g. a test name filter).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/env.sh
scripts/install-deps.sh
# The cluster tests start the real binaries: build them (dev profile, the
# same one the tests use, so nothing is compiled twice).
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
