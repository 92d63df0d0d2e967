#!/usr/bin/env bash
# Chaos testing on a local process cluster of its own (scripts/cluster.sh with
# PORT_BASE=5100, SPLIT_IPS=1: node N on 127.0.51.(10+N):510N, so it never
# collides with a developer's cluster or the docker-compose one on 5001-5003).
#
#   scripts/chaos.sh smoke     one round of every fault, then the checker;
#                              at most 5 minutes including the cluster start.
#                              Exits non-zero when the verdict is FAIL.
#   scripts/chaos.sh soak      many rounds per fault family (one checked run
#                              per family, same cluster); writes the figures
#                              to docs/chaos-results.md. Exits non-zero on FAIL.
#   scripts/chaos.sh compose   the same against the docker-compose cluster
#                              (scripts/chaos-compose.sh).
#
# Faults (each waits FAULT_EVERY seconds after the previous one ended):
# leader kill -9 (restart after 2 s), kill -9 of a random node, leader
# SIGSTOP for 2 s (longer than the 400 ms election timeout), network
# partition of the leader and of a follower (iptables DROP between node IPs,
# PARTITION_SECS), in-process worker kill -9 (held jobs abandoned) and pause
# (frozen WORKER_PAUSE_SECS, beyond its lease and the worker timeout, then it
# reports: must get 409 stale), all three coordinators kill -9 at once.
#
# Environment: RUN_DIR (default ./run/chaos), PORT_BASE (5100), KEEP=1 (leave
# the cluster running afterwards), NO_BUILD=1 (use the binaries already
# built), DURATION, FAULT_EVERY, PARTITION_SECS, WORKER_PAUSE_SECS,
# DRAIN_TIMEOUT (60: seconds without progress before the drain gives up); soak
# rounds: KILL_ROUNDS (100, leader hit every other round), PAUSE_ROUNDS
# (100), PARTITION_ROUNDS (12, leader every other), PARTITION_SECS (180 in
# soak), WORKER_ROUNDS (20), ALLKILL_ROUNDS (5), RESULTS
# (docs/chaos-results.md). Needs root for the partitions.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/env.sh"

setup_env() {
  export RUN_DIR=${RUN_DIR:-$ROOT/run/chaos}
  export PORT_BASE=${PORT_BASE:-5100}
  export SPLIT_IPS=1 WORKER=0 SKIP_BUILD=1
  # Short worker timeout and leases so that worker faults play out within the
  # smoke budget: a worker silent 3 s is dead; leases are 2 s, heartbeats 0.5 s.
  export JOBSCHED_WORKER_TIMEOUT_MS=${JOBSCHED_WORKER_TIMEOUT_MS:-3000}
  LEASE_SECONDS=2
  HEARTBEAT_MS=500
}
CL="$ROOT/scripts/cluster.sh"

teardown() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "chaos: exit code $rc; last lines of the node logs (all under $RUN_DIR):" >&2
    for f in "$RUN_DIR"/node?.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }; done
  fi
  if [ "${KEEP:-0}" = 1 ]; then "$CL" heal >/dev/null 2>&1 || true; return; fi
  "$CL" down >/dev/null 2>&1 || true
}

start_cluster() {
  setup_env
  if [ "${NO_BUILD:-0}" != 1 ]; then cargo build -q -p jobsched-chaos -p jobsched-coordinator; fi
  trap teardown EXIT
  trap 'exit 130' INT TERM
  # A fresh cluster every time: no leftovers from an earlier run.
  "$CL" down >/dev/null 2>&1 || true
  rm -rf "$RUN_DIR"
  mkdir -p "$RUN_DIR/bin"
  # Run from a private copy of the binaries: the shared target directory may
  # be rebuilt by someone else mid-run, and a node restarted by a fault must
  # run the same build as the others (and must not find the file missing
  # while cargo replaces it).
  cp "$CARGO_TARGET_DIR/debug/jobsched-coordinator" "$CARGO_TARGET_DIR/debug/jobsched-chaos" "$RUN_DIR/bin/"
  export BIN_DIR=$RUN_DIR/bin
  BIN=$RUN_DIR/bin/jobsched-chaos
  "$CL" up >"$RUN_DIR/cluster-up.log" 2>&1 || { cat "$RUN_DIR/cluster-up.log"; exit 1; }
  COORDS=$("$CL" urls)
  echo "cluster up: $COORDS (run dir $RUN_DIR)"
}

# run_check NAME DURATION MIN_FAULTS FAULT_EVERY FAULT... : one recorded run and
# its check; the check's output goes to $RUN_DIR/NAME.check.
run_check() {
  local name=$1 duration=$2 min_faults=$3 every=$4; shift 4
  local args=() f
  for f in "$@"; do args+=(--fault-cmd "$f"); done
  "$BIN" run --coordinators "$COORDS" --duration "$duration" --min-faults "$min_faults" \
    --submitters 4 --workers 4 --history "$RUN_DIR/$name.jsonl" --fault-every "$every" \
    --lease-seconds "$LEASE_SECONDS" --heartbeat-ms "$HEARTBEAT_MS" --request-timeout 2 \
    --drain-timeout "${DRAIN_TIMEOUT:-60}" "${args[@]}" | tee "$RUN_DIR/$name.run"
  echo "history: $RUN_DIR/$name.jsonl"
  local rc=0
  "$BIN" check --coordinators "$COORDS" --history "$RUN_DIR/$name.jsonl" | tee "$RUN_DIR/$name.check" || rc=$?
  return $rc
}

# A fault command's exit code is recorded and the checker fails the run when
# it is not 0 (a fault that did not happen tested nothing); the second half
# (restart, resume, heal) always runs.
KILL_LEADER="leader-kill: $CL kill {leader} && sleep 2; r=\$?; $CL start {leader} && exit \$r"
KILL_FOLLOWER="follower-kill: $CL kill {follower} && sleep 2; r=\$?; $CL start {follower} && exit \$r"
KILL_RANDOM="random-kill: $CL kill {random} && sleep 2; r=\$?; $CL start {random} && exit \$r"
PAUSE_LEADER="leader-pause: $CL pause {leader} && sleep 2; r=\$?; $CL resume {leader} && exit \$r"
KILL_ALL="all-kill: $CL kill-all && sleep 1; r=\$?; $CL start-all && exit \$r"
part() { echo "$1-partition: $CL partition {$1} && sleep $2; r=\$?; $CL heal && exit \$r"; }

smoke() {
  local t0=$SECONDS
  start_cluster
  local ps=${PARTITION_SECS:-5}
  local faults=(
    "$KILL_LEADER"
    "worker-kill: @worker-kill"
    "$PAUSE_LEADER"
    "$(part leader "$ps")"
    "worker-pause: @worker-pause ${WORKER_PAUSE_SECS:-8}"
    "$KILL_RANDOM"
    "$(part follower "$ps")"
    "$KILL_ALL"
  )
  local rc=0
  run_check smoke "${DURATION:-30}" "${#faults[@]}" "${FAULT_EVERY:-5}" "${faults[@]}" || rc=$?
  echo "smoke: $((SECONDS - t0)) s wall, including the cluster start"
  return $rc
}

soak() {
  local t0=$SECONDS started; started=$(date -u +%Y-%m-%dT%H:%MZ)
  start_cluster
  local kr=${KILL_ROUNDS:-100} pr=${PAUSE_ROUNDS:-100} nr=${PARTITION_ROUNDS:-12} ps=${PARTITION_SECS:-180}
  local wr=${WORKER_ROUNDS:-20} ar=${ALLKILL_ROUNDS:-5} every=${FAULT_EVERY:-3}
  local rc=0 phases=()
  # Each family is one recorded, checked run: rounds = faults; the leader is
  # hit every other round where the issue asks for it.
  if ((kr > 0)); then run_check kill 0 "$kr" "$every" "$KILL_LEADER" "$KILL_FOLLOWER" || rc=1; phases+=(kill); fi
  if ((pr > 0)); then run_check pause 0 "$pr" "$every" "$PAUSE_LEADER" || rc=1; phases+=(pause); fi
  if ((nr > 0)); then run_check partition 0 "$nr" "$every" "$(part leader "$ps")" "$(part follower "$ps")" || rc=1; phases+=(partition); fi
  if ((wr > 0)); then
    run_check worker 0 "$wr" "$every" "worker-kill: @worker-kill" "worker-pause: @worker-pause ${WORKER_PAUSE_SECS:-8}" || rc=1
    phases+=(worker)
  fi
  if ((ar > 0)); then run_check all-kill 0 "$ar" "$every" "$KILL_ALL" || rc=1; phases+=(all-kill); fi
  local wall=$((SECONDS - t0))
  write_results "$started" "$wall" "$rc" "${phases[@]}"
  return $rc
}

# Writes docs/chaos-results.md from the checks' outputs.
write_results() {
  local started=$1 wall=$2 rc=$3; shift 3
  local out=${RESULTS:-$ROOT/docs/chaos-results.md}
  mkdir -p "$(dirname "$out")"
  {
    echo "# Chaos soak results"
    echo
    echo "Latest run of \`scripts/chaos.sh soak\` (written by the script; see README \"Chaos testing\")."
    echo
    echo "- date: $started, wall time $((wall / 60)) min $((wall % 60)) s"
    echo "- verdict: $([ "$rc" = 0 ] && echo PASS || echo FAIL)"
    echo "- command: \`KILL_ROUNDS=${KILL_ROUNDS:-100} PAUSE_ROUNDS=${PAUSE_ROUNDS:-100} PARTITION_ROUNDS=${PARTITION_ROUNDS:-12} PARTITION_SECS=${PARTITION_SECS:-180} WORKER_ROUNDS=${WORKER_ROUNDS:-20} ALLKILL_ROUNDS=${ALLKILL_ROUNDS:-5} scripts/chaos.sh soak\`"
    echo "- machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr); dev-profile binaries; default coordinator timing (heartbeat 100 ms, election 250-400 ms), worker_timeout_ms=$JOBSCHED_WORKER_TIMEOUT_MS, leases ${LEASE_SECONDS} s"
    echo "- git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo
    echo "Each section is one recorded run of that fault family on the same cluster"
    echo "(4 closed-loop submitters, 4 in-process workers, faults ${FAULT_EVERY:-3} s apart) and"
    echo "its checker output. \"unavailability\" is client-observed: the longest gap"
    echo "between acknowledged submits from a fault's start until 5 s after its"
    echo "command returned (restart or heal included), with a 2 s client request"
    echo "timeout, a hedge (same requestId to the next node) after 300 ms without"
    echo "an answer, 10/50/100 ms between retries, and a node avoided after a"
    echo "timeout, hedge or refused connection (one probe at a time after 2 s);"
    echo "\"failover\" takes the faults that hit the leader (kill -9, SIGSTOP,"
    echo "partition)."
    for p in "$@"; do
      echo
      echo "## $p"
      echo
      echo '```'
      grep -v '^  fault ' "$RUN_DIR/$p.check" || true
      echo '```'
    done
  } >"$out"
  echo "results written to $out"
}

case "${1:-}" in
  smoke) smoke ;;
  soak) soak ;;
  compose) exec "$ROOT/scripts/chaos-compose.sh" "${@:2}" ;;
  *) sed -n '2,29p' "$0"; exit 2 ;;
esac
