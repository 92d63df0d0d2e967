#!/usr/bin/env bash
# Runs the local 3-node cluster (config/node{1,2,3}.toml, APIs on
# 127.0.0.1:5001-5003) and one worker as background processes.
#
#   scripts/cluster.sh up            install deps, build, start 3 nodes + 1 worker, wait until ready
#   scripts/cluster.sh down          stop everything (SIGTERM, then SIGKILL)
#   scripts/cluster.sh status        role/term/applied index of each node, worker pid
#   scripts/cluster.sh kill N        kill -9 node N
#   scripts/cluster.sh start N       start node N again (it rejoins with its data)
#   scripts/cluster.sh stop N        graceful stop (SIGTERM) of node N
#   scripts/cluster.sh pause N       SIGSTOP node N (a frozen "zombie" node)
#   scripts/cluster.sh resume N      SIGCONT node N
#   scripts/cluster.sh leader        print the leader's node id
#   scripts/cluster.sh worker-start | worker-stop | worker-kill
#   scripts/cluster.sh wipe          down, then delete the run directory
#
# Everything lives under $RUN_DIR (default ./run): node data, logs, pid files.
# PROFILE=release builds and runs optimised binaries (default: dev profile,
# whose dependencies are optimised; the same build the tests use).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUN_DIR=${RUN_DIR:-$ROOT/run}
PROFILE=${PROFILE:-dev}
source "$ROOT/scripts/env.sh"
TARGET_DIR=$CARGO_TARGET_DIR
case "$PROFILE" in dev) BIN_DIR=$TARGET_DIR/debug ;; *) BIN_DIR=$TARGET_DIR/$PROFILE ;; esac
NODES=(1 2 3)
COORDINATORS=http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003

port() { echo $((5000 + $1)); }
pidfile() { echo "$RUN_DIR/$1.pid"; }
# Running and not a zombie (a killed process may linger unreaped for a moment).
alive() {
  local f st; f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  st=$(ps -o stat= -p "$(cat "$f")" 2>/dev/null) || return 1
  [ -n "$st" ] && [[ "$st" != Z* ]]
}

build() {
  "$ROOT/scripts/install-deps.sh"
  (cd "$ROOT" && cargo build --profile "$PROFILE" -p jobsched-coordinator -p jobsched-worker -p jobsched-client -p jobsched-bench)
}

start_node() {
  local n=$1
  if alive "node$n"; then echo "node $n already running (pid $(cat "$(pidfile "node$n")"))"; return; fi
  mkdir -p "$RUN_DIR/node$n"
  # Started directly (no subshell) so that $! is the node's own pid, which
  # `kill` then hits with SIGKILL; no inherited stdout keeps callers waiting.
  JOBSCHED_DATA_DIR="$RUN_DIR/node$n/data" nohup "$BIN_DIR/jobsched-coordinator" \
      --config "$ROOT/config/node$n.toml" </dev/null >>"$RUN_DIR/node$n.log" 2>&1 &
  echo $! >"$(pidfile "node$n")"
  echo "node $n started (pid $(cat "$(pidfile "node$n")"), log $RUN_DIR/node$n.log)"
}

start_worker() {
  if alive worker; then echo "worker already running"; return; fi
  mkdir -p "$RUN_DIR"
  nohup "$BIN_DIR/jobsched-worker" --coordinators "$COORDINATORS" --name local-worker \
      </dev/null >>"$RUN_DIR/worker.log" 2>&1 &
  echo $! >"$(pidfile worker)"
  echo "worker started (pid $(cat "$(pidfile worker)"), log $RUN_DIR/worker.log)"
}

signal() { # signal NAME SIG
  local f; f=$(pidfile "$1")
  if [ -f "$f" ]; then kill "-$2" "$(cat "$f")" 2>/dev/null || true; fi
}

wait_ready() {
  local deadline=$((SECONDS + ${1:-60}))
  for n in "${NODES[@]}"; do
    until curl -fs "http://127.0.0.1:$(port "$n")/ready" >/dev/null 2>&1; do
      if ((SECONDS > deadline)); then echo "node $n not ready; see $RUN_DIR/node$n.log" >&2; return 1; fi
      sleep 0.2
    done
  done
}

status() {
  for n in "${NODES[@]}"; do
    local state="down"
    if alive "node$n"; then
      state=$(curl -fs --max-time 2 "http://127.0.0.1:$(port "$n")/api/cluster" 2>/dev/null \
        | python3 -c 'import json,sys; c=json.load(sys.stdin); print("%-9s term=%s leader=%s applied=%s" % (c["role"], c["term"], c["leaderId"], c["lastAppliedIndex"]))' 2>/dev/null \
        || echo "running (not answering)")
    fi
    echo "node $n  127.0.0.1:$(port "$n")  $state"
  done
  if alive worker; then echo "worker   pid $(cat "$(pidfile worker)")"; else echo "worker   down"; fi
}

leader() {
  for n in "${NODES[@]}"; do
    local l
    l=$(curl -fs --max-time 2 "http://127.0.0.1:$(port "$n")/api/cluster" 2>/dev/null \
      | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["leaderId"] or "")' 2>/dev/null || true)
    if [ -n "$l" ]; then echo "$l"; return 0; fi
  done
  return 1
}

stop_all() {
  for name in worker node1 node2 node3; do signal "$name" TERM; done
  for _ in $(seq 50); do
    local any=0
    for name in worker node1 node2 node3; do alive "$name" && any=1; done
    [ $any -eq 0 ] && break
    sleep 0.2
  done
  for name in worker node1 node2 node3; do signal "$name" KILL; rm -f "$(pidfile "$name")"; done
}

cmd=${1:-}
case "$cmd" in
  up)
    build
    for n in "${NODES[@]}"; do start_node "$n"; done
    wait_ready 90
    start_worker
    echo
    echo "cluster ready: APIs on 127.0.0.1:5001-5003. Try:"
    echo "  curl -X POST http://localhost:5001/api/jobs -H 'Content-Type: application/json' \\"
    echo "    -d '{\"name\":\"My Job\",\"type\":\"sample\",\"payload\":\"Hello, World!\",\"maxRetries\":3,\"priority\":5}'"
    ;;
  down) stop_all ;;
  wipe) stop_all; rm -rf "$RUN_DIR" ;;
  status) status ;;
  leader) leader ;;
  ready) wait_ready "${2:-60}" ;;
  kill)
    signal "node${2:?node number}" KILL
    # Wait until it is really gone so that an immediate `start` works.
    for _ in $(seq 100); do alive "node$2" || break; sleep 0.05; done ;;
  stop) signal "node${2:?node number}" TERM ;;
  start) start_node "${2:?node number}" ;;
  pause) signal "node${2:?node number}" STOP ;;
  resume) signal "node${2:?node number}" CONT ;;
  worker-start) start_worker ;;
  worker-stop) signal worker TERM ;;
  worker-kill) signal worker KILL ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
