#!/usr/bin/env bash
# Chaos testing against the local cluster (scripts/cluster.sh).
#
#   scripts/chaos.sh smoke   ~60 s of submits and HTTP workers while the leader
#                            is killed (-9, restarted after 2 s) and paused
#                            (SIGSTOP, resumed after 2 s: longer than the
#                            election timeout) in turn, every 15 s; then the
#                            checker. Exits non-zero when the verdict is FAIL.
#
# Environment: DURATION (60), FAULT_EVERY (15), HISTORY (history file, default
# under $RUN_DIR), RUN_DIR (./run), CARGO_TARGET_DIR (see scripts/env.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/env.sh"
RUN_DIR=${RUN_DIR:-$ROOT/run}
BIN=$CARGO_TARGET_DIR/debug/jobsched-chaos

smoke() {
  cargo build -p jobsched-chaos
  # Start the cluster only when it is not already up and ready.
  if ! "$ROOT/scripts/cluster.sh" ready 3 >/dev/null 2>&1; then
    "$ROOT/scripts/cluster.sh" up
  fi
  mkdir -p "$RUN_DIR"
  local history=${HISTORY:-$RUN_DIR/chaos-$(date -u +%Y%m%dT%H%M%S).jsonl}
  # Faults alternate; {leader} is the leader's node id at the time of the fault.
  "$BIN" run --duration "${DURATION:-60}" --submitters 4 --workers 4 --history "$history" \
    --fault-every "${FAULT_EVERY:-15}" \
    --fault-cmd "$ROOT/scripts/cluster.sh kill {leader}; sleep 2; $ROOT/scripts/cluster.sh start {leader}" \
    --fault-cmd "$ROOT/scripts/cluster.sh pause {leader}; sleep 2; $ROOT/scripts/cluster.sh resume {leader}"
  echo "history: $history"
  "$BIN" check --history "$history"
}

case "${1:-}" in
  smoke) smoke ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
