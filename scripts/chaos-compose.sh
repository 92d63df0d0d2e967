#!/usr/bin/env bash
# Chaos testing against the docker-compose cluster (scripts/docker.sh): the
# same workload, recorder and checker as the local mode (scripts/chaos.sh
# smoke), with the faults done to the leader's container.
#
# usage: scripts/chaos-compose.sh [smoke]
#        (also reached as `scripts/chaos.sh compose [smoke]`)
#
#   Starts the compose cluster when it is not up and ready, then runs
#   `jobsched-chaos run` for $DURATION s against the published ports while,
#   every $FAULT_EVERY s, the next fault of $FAULTS hits the current leader:
#     kill       docker kill -s KILL, docker start after 2 s
#     pause      docker pause, docker unpause after 2 s (longer than an election)
#     partition  docker network disconnect, connect again after 3 s
#   then `jobsched-chaos check`. Exits non-zero when the verdict is FAIL.
#
# Environment: DURATION (60), FAULT_EVERY (15), FAULTS (kill,pause,partition),
# HISTORY (history file; default under $RUN_DIR), RUN_DIR (./run), NO_UP=1
# (never start the cluster: fail if it is not ready), SKIP_CARGO=1 (do not
# build jobsched-chaos), and those of scripts/docker.sh (COMPOSE_PROJECT_NAME,
# JOBSCHED_PORT_1..3, ...).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/env.sh"
RUN_DIR=${RUN_DIR:-$ROOT/run}
DOCKER_SH=$ROOT/scripts/docker.sh
BIN=$CARGO_TARGET_DIR/debug/jobsched-chaos
PUBLISH_ADDR=${JOBSCHED_PUBLISH_ADDR:-127.0.0.1}
[ "$PUBLISH_ADDR" = "0.0.0.0" ] && HOST_ADDR=127.0.0.1 || HOST_ADDR=$PUBLISH_ADDR
NODES="http://$HOST_ADDR:${JOBSCHED_PORT_1:-5001},http://$HOST_ADDR:${JOBSCHED_PORT_2:-5002},http://$HOST_ADDR:${JOBSCHED_PORT_3:-5003}"

say() { echo "chaos-compose: $*" >&2; }

smoke() {
  if [ "${SKIP_CARGO:-0}" != 1 ]; then
    cargo build --workspace --bins # as scripts/test.sh: no feature-unification rebuilds
  fi
  [ -x "$BIN" ] || { say "error: $BIN is missing (cargo build --workspace --bins)"; exit 1; }
  if ! WAIT_TIMEOUT=3 "$DOCKER_SH" wait >/dev/null 2>&1; then
    if [ "${NO_UP:-0}" = 1 ]; then
      say "error: the compose cluster is not up and ready (NO_UP=1)"
      exit 1
    fi
    "$DOCKER_SH" up
  fi
  local fault_args=() f label=""
  IFS=, read -r -a faults <<<"${FAULTS:-kill,pause,partition}"
  # Name each fault kind in the checker's report when the recorder takes a
  # `kind: ` prefix (else the kind is the command's first word).
  grep -q '\[kind: \]' <<<"$("$BIN" run --help)" && label=1
  for f in "${faults[@]}"; do
    local prefix=""
    [ -z "$label" ] || prefix="docker-leader-$f: "
    case "$f" in
      kill) fault_args+=(--fault-cmd "${prefix}$DOCKER_SH kill {leader}; sleep 2; $DOCKER_SH start {leader}") ;;
      pause) fault_args+=(--fault-cmd "${prefix}$DOCKER_SH pause {leader}; sleep 2; $DOCKER_SH unpause {leader}") ;;
      partition) fault_args+=(--fault-cmd "${prefix}$DOCKER_SH disconnect {leader}; sleep 3; $DOCKER_SH connect {leader}") ;;
      *) say "error: unknown fault '$f' in FAULTS (kill, pause, partition)"; exit 2 ;;
    esac
  done
  mkdir -p "$RUN_DIR"
  local history=${HISTORY:-$RUN_DIR/chaos-compose-$(date -u +%Y%m%dT%H%M%S).jsonl}
  say "workload for ${DURATION:-60} s, faults (${FAULTS:-kill,pause,partition}) every ${FAULT_EVERY:-15} s on $NODES"
  "$BIN" run --coordinators "$NODES" --duration "${DURATION:-60}" --submitters 4 --workers 4 \
    --history "$history" --fault-every "${FAULT_EVERY:-15}" "${fault_args[@]}"
  echo "history: $history"
  # A fault's restart half has run, but a node may still be catching up.
  "$DOCKER_SH" wait >/dev/null
  "$BIN" check --coordinators "$NODES" --history "$history"
}

case "${1:-smoke}" in
  smoke) smoke ;;
  *) usage; exit 2 ;;
esac
