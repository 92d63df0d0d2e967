#!/usr/bin/env bash
# The docker-compose part of CI (scripts/test.sh runs it after the cargo tests).
#
# usage: scripts/docker-ci.sh
#
#   1. build the images (scripts/docker.sh build; the debootstrap base is made
#      only when its cached tarball is missing)
#   2. bring the compose cluster up (3 coordinators, 2 workers) and wait
#   3. the README's curl flow through each published port: submit a job with
#      curl, see it Completed by one of the compose workers
#   4. one chaos round (scripts/chaos-compose.sh): the workload of
#      jobsched-chaos while the leader's container is killed (-s KILL) and
#      started again, then the leader is disconnected from the network and
#      connected again; the checker's verdict must be PASS
#   5. docker-compose down -v, also on failure (trap)
#
# Without a reachable Docker engine (docker info fails) or a compose tool it
# prints SKIP and exits 0. Exits non-zero on any failure.
#
# Environment: COMPOSE_PROJECT_NAME (jobsched-ci), JOBSCHED_PORT_1..3 (default
# 5001-5003, or the first free trio from 15001 up when one of those is taken),
# CHAOS_DURATION (30), CHAOS_FAULT_EVERY (8), PROFILE, SKIP_CARGO (see
# scripts/docker.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DOCKER_SH=$ROOT/scripts/docker.sh
say() { echo "docker-ci: $*" >&2; }

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  say "SKIP: no Docker engine here (docker info failed): the docker-compose images, cluster and chaos checks did NOT run"
  exit 0
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  say "SKIP: Docker is here but no compose tool (docker-compose or docker compose): the docker-compose checks did NOT run"
  exit 0
fi

T0=$SECONDS
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-jobsched-ci}
export JOBSCHED_PUBLISH_ADDR=127.0.0.1

port_busy() { ss -Hltn "sport = :$1" | grep -q .; }

# Ports: 5001-5003 unless another cluster (a local one, or an operator's
# compose project) holds one of them; then the first free trio from 15001.
if [ -z "${JOBSCHED_PORT_1:-}${JOBSCHED_PORT_2:-}${JOBSCHED_PORT_3:-}" ]; then
  # Our own leftovers from an interrupted run hold the ports: remove them first.
  "$DOCKER_SH" compose down -v --remove-orphans >/dev/null 2>&1 || true
  base=5001
  while port_busy "$base" || port_busy $((base + 1)) || port_busy $((base + 2)); do
    [ "$base" -lt 15001 ] && base=15001 || base=$((base + 3))
    [ "$base" -lt 16000 ] || { say "error: no 3 free consecutive ports below 16000"; exit 1; }
  done
  [ "$base" = 5001 ] || say "ports 5001-5003 are taken on this host: using $base-$((base + 2))"
  export JOBSCHED_PORT_1=$base JOBSCHED_PORT_2=$((base + 1)) JOBSCHED_PORT_3=$((base + 2))
fi
PORTS=("$JOBSCHED_PORT_1" "$JOBSCHED_PORT_2" "$JOBSCHED_PORT_3")

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    say "FAILED (exit $rc): state and last logs follow"
    "$DOCKER_SH" status >&2 || true
    "$DOCKER_SH" compose logs --no-color --tail 40 >&2 || true
  fi
  say "tearing down (down -v)"
  "$DOCKER_SH" compose down -v --remove-orphans >/dev/null 2>&1 || say "warning: down -v failed"
  exit "$rc"
}
trap cleanup EXIT

step() { say "== $* ($((SECONDS - T0)) s)"; }

step "build the images"
"$DOCKER_SH" build
"$DOCKER_SH" images

step "compose up (project $COMPOSE_PROJECT_NAME, ports ${PORTS[*]})"
SKIP_BUILD=1 "$DOCKER_SH" up
"$DOCKER_SH" status

step "curl flow through each node"
json() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k] if v is not None else None
print("" if v is None else v if isinstance(v, str) else json.dumps(v))' "$1"; }

declare -A job_of=()
for p in "${PORTS[@]}"; do
  # The README's example, as the original one: a 'sample' job (5 s of work).
  body=$(curl -fsS -X POST "http://127.0.0.1:$p/api/jobs" -H "Content-Type: application/json" \
    -d '{"name":"My Job","type":"sample","payload":"Hello, World!","maxRetries":3,"priority":5}')
  id=$(json id <<<"$body")
  [ -n "$id" ] && [ "$(json status <<<"$body")" = Pending ] || { say "error: unexpected answer from :$p: $body"; exit 1; }
  job_of[$p]=$id
  say "submitted through :$p -> job $id (Pending)"
done
workers=$(curl -fsS "http://127.0.0.1:${PORTS[0]}/api/workers")
# Follow the three jobs together, each through the node it was submitted to.
# A Completed job no longer names its worker: note who runs it (5 s of work).
declare -A runner_of=() done_of=()
ndone=0
deadline=$((SECONDS + 60))
while [ "$ndone" -lt "${#PORTS[@]}" ]; do
  for p in "${PORTS[@]}"; do
    [ -n "${done_of[$p]:-}" ] && continue
    id=${job_of[$p]}
    job=$(curl -fsS "http://127.0.0.1:$p/api/jobs/$id")
    st=$(json status <<<"$job")
    case "$st" in
      Pending) ;;
      Running) runner_of[$p]=$(json workerId <<<"$job") ;;
      Completed)
        wid=${runner_of[$p]:-}
        name=$(python3 -c 'import json,sys; print(next((w["name"] for w in json.loads(sys.argv[1])["workers"] if w["id"] == sys.argv[2]), ""))' "$workers" "$wid")
        [ -n "$name" ] || { say "error: job $id: run by '$wid', not seen running on a compose worker ($workers)"; exit 1; }
        say "job $id Completed (read through :$p), run by worker $name: $(json result <<<"$job")"
        done_of[$p]=1
        ndone=$((ndone + 1))
        ;;
      *) say "error: job $id is $st: $job"; exit 1 ;;
    esac
  done
  [ $SECONDS -lt $deadline ] || { say "error: jobs not Completed after 60 s"; exit 1; }
  sleep 0.5
done

# The shell handler runs /bin/sh inside the worker's container.
body=$(curl -fsS -X POST "http://127.0.0.1:${PORTS[0]}/api/jobs" -H "Content-Type: application/json" \
  -d '{"name":"uname","type":"shell","payload":{"shell":true,"command":"uname -s; id -u"}}')
id=$(json id <<<"$body")
deadline=$((SECONDS + 30))
while :; do
  job=$(curl -fsS "http://127.0.0.1:${PORTS[1]}/api/jobs/$id")
  st=$(json status <<<"$job")
  [ "$st" = Completed ] && break
  case "$st" in Pending | Running) ;; *) say "error: shell job $id is $st: $job"; exit 1 ;; esac
  [ $SECONDS -lt $deadline ] || { say "error: shell job $id still $st: $job"; exit 1; }
  sleep 1
done
say "shell job $id Completed: $(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["result"]))' "$job")"

step "chaos round: kill the leader's container, then disconnect the leader from the network"
mkdir -p "$ROOT/run"
HISTORY=${HISTORY:-$ROOT/run/chaos-compose-ci-$(date -u +%Y%m%dT%H%M%S).jsonl} \
  NO_UP=1 SKIP_CARGO=1 FAULTS=kill,partition DURATION=${CHAOS_DURATION:-30} FAULT_EVERY=${CHAOS_FAULT_EVERY:-8} \
  "$ROOT/scripts/chaos-compose.sh" smoke

step "all nodes healthy after the faults"
"$DOCKER_SH" wait
"$DOCKER_SH" status

step "PASS: docker-compose images, curl flow on ports ${PORTS[*]}, chaos round"
