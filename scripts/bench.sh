#!/usr/bin/env bash
# Benchmarks jobsched against etcd on this machine and writes docs/benchmarks.md.
#
#   scripts/bench.sh [compare]   fresh 3-node jobsched cluster (release build,
#                                default durability) and, next to it, a fresh
#                                3-member etcd (Debian etcd-server, default
#                                durability); each point (submit at 1/16/64/256
#                                connections) on ours, then at once the same on
#                                etcd (POST /v3/kv/put through its HTTP/JSON
#                                gateway); e2e, pickup, batch on a fresh cluster;
#                                prints the table with our/etcd ratios
#   scripts/bench.sh scale       1 thousand vs 1 million retained jobs: resident
#                                memory per node and acquire throughput
#   scripts/bench.sh all         compare, then scale
#   scripts/bench.sh ab 'A:ENV=V ..' 'B:ENV=V ..' ...
#                                A/B of node settings or builds: for each round
#                                and each variant (label:environment, e.g.
#                                'one:JOBSCHED_RUNTIME_THREADS=1' or
#                                'new:BIN=/tmp/binB'), a fresh cluster, one
#                                AB_MODE point, and the nodes' CPU per 1,000
#                                jobs (utime+stime from /proc) and Raft entries
#                                per job; variants alternate so drift in the
#                                machine's load hits all of them alike.
#                                AB_MODE=submit|e2e (submit), AB_C=64, ROUNDS=3,
#                                AB_WORKERS=8 AB_SLOTS=8 (e2e: workers x slots each),
#                                AB_NODE=leader|follower (submit: all connections
#                                to that node; default: spread over the nodes)
#   scripts/bench.sh up          only start the jobsched cluster (for profiling by hand)
#   scripts/bench.sh stop        stop what `up` or an interrupted run left running
#   scripts/bench.sh report compare|scale   re-render that table from the last run's results
#
# Settings (environment):
#   DURATION=10         seconds measured per point (after a 1 s warm-up)
#   CONCURRENCY="1 16 64 256"
#   PORT_BASE=5200      jobsched nodes listen on PORT_BASE+1..3 (not 5001-5003,
#                       nor chaos.sh's 5101-5103, so those can stay up)
#   ETCD_PORT_BASE=23800  etcd member i: client PORT_BASE+10*i+1, peer +2
#   BENCH_DIR=run/bench data, logs and raw results (wiped at the start of a run)
#   SCALE_JOBS="1000 1000000"  retained-job counts of the scale run
#   SCALE_POOL=50000    ready jobs the 16 x 1 acquire measurement draws from
#   SCALE_POOL16=150000 ready jobs the 4 x 16 acquire measurement draws from
#                       (both sized to last the measured seconds at ~5k and ~15k jobs/s)
#   SETTLE_MAX=90       seconds the scale run waits at most for the nodes to go idle after a preload
#   SKIP_BUILD=1        use the existing release binaries
#   BIN=DIR             take the binaries from DIR (e.g. a debug build, for a dry run)
#   NO_DOC=1            do not rewrite docs/benchmarks.md
#   RUNTIME_THREADS=1   runtime_threads of each jobsched node (0: one per core)
#
# Everything started here is stopped on exit (trap), also on Ctrl-C.
# docs/benchmarks.md keeps its hand-written parts: only the blocks between
# the "generated" markers are replaced.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/env.sh"
BIN=${BIN:-$CARGO_TARGET_DIR/release}
BENCH_DIR=${BENCH_DIR:-$ROOT/run/bench}
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-"1 16 64 256"}
PORT_BASE=${PORT_BASE:-5200}
ETCD_PORT_BASE=${ETCD_PORT_BASE:-23800}
SCALE_JOBS=${SCALE_JOBS:-"1000 1000000"}
SCALE_POOL=${SCALE_POOL:-50000}
SCALE_POOL16=${SCALE_POOL16:-150000}
SETTLE_MAX=${SETTLE_MAX:-90}
DOC=$ROOT/docs/benchmarks.md
DEFAULT_DURATION=10 DEFAULT_CONCURRENCY="1 16 64 256" DEFAULT_SCALE_JOBS="1000 1000000" DEFAULT_SCALE_POOL=50000 DEFAULT_SCALE_POOL16=150000 DEFAULT_SETTLE_MAX=90
NODES=(1 2 3)
PIDS_FILE=$BENCH_DIR/pids

log() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }

# ----- processes we start ----------------------------------------------------

track() { echo "$1" >>"$PIDS_FILE"; }

# Stop every process this script started (recorded in $PIDS_FILE): SIGTERM,
# a grace period, then SIGKILL. Only those pids, never by name.
stop_tracked() {
  [ -f "$PIDS_FILE" ] || return 0
  local pids; pids=$(cat "$PIDS_FILE")
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local any=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && any=1; done
    [ $any -eq 0 ] && break
    sleep 0.2
  done
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$PIDS_FILE"
}

cleanup() {
  local rc=$?
  stop_tracked
  exit $rc
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

require_free_ports() {
  for p in "$@"; do
    if ! port_free "$p"; then
      echo "port $p is in use (another benchmark or cluster?); set PORT_BASE / ETCD_PORT_BASE" >&2
      exit 1
    fi
  done
}

# ----- jobsched cluster --------------------------------------------------------

our_port() { echo $((PORT_BASE + $1)); }
our_urls() { echo "http://127.0.0.1:$(our_port 1),http://127.0.0.1:$(our_port 2),http://127.0.0.1:$(our_port 3)"; }

start_ours() { # start_ours DIR
  local dir=$1 peers="" n
  require_free_ports "$(our_port 1)" "$(our_port 2)" "$(our_port 3)"
  for n in "${NODES[@]}"; do peers+="{ id = $n, addr = \"127.0.0.1:$(our_port "$n")\" }, "; done
  for n in "${NODES[@]}"; do
    mkdir -p "$dir/node$n"
    # Default durability and defaults for everything else: only identity,
    # addresses, the data directory and (as in config/nodeN.toml, because
    # the three nodes share this machine's cores) one runtime thread per
    # node are set here.
    cat >"$dir/node$n.toml" <<EOF
node_id = $n
listen = "127.0.0.1:$(our_port "$n")"
data_dir = "$dir/node$n/data"
peers = [ $peers]
runtime_threads = ${RUNTIME_THREADS:-1}
EOF
    "$BIN/jobsched-coordinator" --config "$dir/node$n.toml" </dev/null >>"$dir/node$n.log" 2>&1 &
    track $!
    echo $! >"$dir/node$n.pid"
  done
  local deadline=$((SECONDS + 90))
  for n in "${NODES[@]}"; do
    wait_healthy "http://127.0.0.1:$(our_port "$n")/ready" . "$deadline" "node $n" "$dir/node$n.log"
  done
  log "jobsched cluster up on ports $(our_port 1)-$(our_port 3) ($dir)"
}

# SIGTERM every member whose pid file is DIR/PREFIX<n>.pid, then wait up to
# 10 s each before SIGKILL (both clusters flush and close their data).
stop_members() { # stop_members DIR PREFIX
  local dir=$1 prefix=$2 n p
  for n in "${NODES[@]}"; do
    [ -f "$dir/$prefix$n.pid" ] && kill -TERM "$(cat "$dir/$prefix$n.pid")" 2>/dev/null || true
  done
  for n in "${NODES[@]}"; do
    [ -f "$dir/$prefix$n.pid" ] || continue
    p=$(cat "$dir/$prefix$n.pid")
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
    rm -f "$dir/$prefix$n.pid"
  done
}
stop_ours() { stop_members "$1" node; }

# Poll URL until its body matches PATTERN; exit with a pointer to LOG after
# DEADLINE (a $SECONDS value).
wait_healthy() { # wait_healthy URL PATTERN DEADLINE WHAT LOG
  until curl -fs "$1" 2>/dev/null | grep -q "$2"; do
    if ((SECONDS > $3)); then echo "$4 not ready; see $5" >&2; exit 1; fi
    sleep 0.2
  done
}

# VmRSS and VmHWM (peak) of each node, in MiB, as JSON.
rss_json() { # rss_json DIR
  local dir=$1 n p out="" rss hwm
  for n in "${NODES[@]}"; do
    p=$(cat "$dir/node$n.pid")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status")
    out+="{\"node\":$n,\"rssMiB\":$((rss / 1024)),\"peakMiB\":$((hwm / 1024)),\"diskMiB\":$(du -sm "$dir/node$n/data" | cut -f1)},"
  done
  echo "[${out%,}]"
}

# Wait (at most SETTLE_MAX s) until the nodes of DIR use less than a tenth of
# a core, i.e. RocksDB's flushes and compactions after a bulk load are done.
# Prints the seconds waited. Why: right after a 1M-job preload, compactions
# run for a minute or more on one of the two cores; a history that built up
# over days would have been compacted long before.
wait_settled() { # wait_settled DIR
  local dir=$1 n t0=$SECONDS before after
  local pids=(); for n in "${NODES[@]}"; do pids+=("$(cat "$dir/node$n.pid")"); done
  cpu_ticks() { local p sum=0; for p in "${pids[@]}"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$sum"; }
  while ((SECONDS - t0 < SETTLE_MAX)); do
    before=$(cpu_ticks); sleep 2; after=$(cpu_ticks)
    # 2 s at 100 ticks/s: 20 ticks = 10 % of one core.
    ((after - before < 20)) && break
  done
  echo $((SECONDS - t0))
}

# ----- etcd ------------------------------------------------------------------

etcd_client_port() { echo $((ETCD_PORT_BASE + 10 * $1 + 1)); }
etcd_peer_port() { echo $((ETCD_PORT_BASE + 10 * $1 + 2)); }
etcd_urls() { echo "http://127.0.0.1:$(etcd_client_port 1),http://127.0.0.1:$(etcd_client_port 2),http://127.0.0.1:$(etcd_client_port 3)"; }

ensure_etcd() {
  if ! command -v etcd >/dev/null 2>&1; then
    log "installing Debian's etcd-server and etcd-client"
    # The package's systemd unit does not start here (no systemd in
    # containers); on a systemd host it would start a member on 2379, which
    # our ports do not collide with.
    DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server etcd-client >/dev/null
  fi
}

start_etcd() { # start_etcd DIR
  local dir=$1 cluster="" n
  for n in "${NODES[@]}"; do
    require_free_ports "$(etcd_client_port "$n")" "$(etcd_peer_port "$n")"
    cluster+="e$n=http://127.0.0.1:$(etcd_peer_port "$n"),"
  done
  for n in "${NODES[@]}"; do
    mkdir -p "$dir/e$n"
    # Default durability: etcd fsyncs its WAL before acknowledging a put.
    etcd --name "e$n" --data-dir "$dir/e$n" \
      --listen-client-urls "http://127.0.0.1:$(etcd_client_port "$n")" \
      --advertise-client-urls "http://127.0.0.1:$(etcd_client_port "$n")" \
      --listen-peer-urls "http://127.0.0.1:$(etcd_peer_port "$n")" \
      --initial-advertise-peer-urls "http://127.0.0.1:$(etcd_peer_port "$n")" \
      --initial-cluster "${cluster%,}" --initial-cluster-state new \
      --initial-cluster-token "jobsched-bench-$$" --log-level warn \
      </dev/null >>"$dir/e$n.log" 2>&1 &
    track $!
    echo $! >"$dir/e$n.pid"
  done
  local deadline=$((SECONDS + 60))
  for n in "${NODES[@]}"; do
    wait_healthy "http://127.0.0.1:$(etcd_client_port "$n")/health" '"health":"true"' "$deadline" "etcd member $n" "$dir/e$n.log"
  done
  log "etcd up on client ports $(etcd_client_port 1),$(etcd_client_port 2),$(etcd_client_port 3) ($dir)"
}

stop_etcd() { stop_members "$1" e; }

# Index (0-based, into the URL lists) of the current leader, for the
# single-connection points by placement: which node a lone client talks to
# decides whether its write takes a relay hop (ours) or a proposal forward
# (etcd), so the spread figure depends on where each leader happened to be.
our_leader_index() {
  local n
  for n in "${NODES[@]}"; do
    curl -s -m 2 "http://127.0.0.1:$(our_port "$n")/api/cluster" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["leaderId"] - 1)' 2>/dev/null && return
  done
  echo 0
}
etcd_leader_index() {
  local n
  for n in "${NODES[@]}"; do
    if curl -s -m 2 -X POST -d '{}' "http://127.0.0.1:$(etcd_client_port "$n")/v3/maintenance/status" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["header"]["member_id"] != d["leader"])' 2>/dev/null; then
      echo $((n - 1))
      return
    fi
  done
  echo 0
}

# ----- running the tool ----------------------------------------------------------

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# bench TAG ARGS...: run jobsched-bench, append its JSON (tagged) to RESULTS.
bench() {
  local tag=$1; shift
  log "$tag: jobsched-bench $* (load $(loadavg))"
  "$BIN/jobsched-bench" --json-out "$RESULTS" --tag "$tag" "$@" | tee -a "$BENCH_DIR/bench.out"
}

machine_json() {
  python3 - "$@" <<'EOF'
import json, os, platform, subprocess, sys
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
print(json.dumps({
    "date": sh("date -u '+%Y-%m-%d %H:%M UTC'"), "cpu": cpu, "cores": os.cpu_count(), "memMiB": mem,
    "kernel": platform.release(), "disk": " ".join(sh("df -h --output=source,fstype " + sys.argv[1] + " | tail -1").split()),
    # The compare step rewrites docs/benchmarks.md before scale runs: not a code change.
    "commit": sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no -- . ':!docs/benchmarks.md'") else ""),
    "etcd": sh("etcd --version | head -1"), "rustc": sh("rustc --version"),
}))
EOF
}

build() {
  if [ "${SKIP_BUILD:-0}" = 1 ]; then return; fi
  "$ROOT/scripts/install-deps.sh"
  log "building release binaries (the first release build compiles RocksDB: ~25 min on 2 cores)"
  cargo build --release -p jobsched-coordinator -p jobsched-bench
}

# ----- modes ------------------------------------------------------------------------

compare() {
  RESULTS=$BENCH_DIR/compare.jsonl
  : >"$RESULTS"
  machine_json "$BENCH_DIR" >"$BENCH_DIR/machine.json"
  echo "{\"loadBefore\":\"$(loadavg)\"}" >"$BENCH_DIR/compare-load.json"

  # Both clusters run side by side and each point is measured for ours and
  # then at once for etcd. Why: the machine is shared and its speed drifts
  # by 10-20 % within minutes; measured minutes apart (all of ours, then all
  # of etcd) a ratio from one run moved between 1.4x and 1.8x for the same
  # build. An idle cluster costs the other next to nothing (heartbeats).
  ensure_etcd
  start_ours "$BENCH_DIR/ours"
  start_etcd "$BENCH_DIR/etcd"
  local urls; urls=$(our_urls)
  local eurls; eurls=$(etcd_urls)
  # Warm both (leader, connections, storage) without measuring.
  "$BIN/jobsched-bench" --coordinators "$urls" submit -c 16 -d 2 >/dev/null 2>&1 || true
  "$BIN/jobsched-bench" etcd-put --endpoints "$eurls" -c 16 -d 2 >/dev/null 2>&1 || true
  # Single-connection points first, while the clusters are as idle as for
  # the spread c=1 point (after the 256-connection point they are still
  # flushing and compacting).
  local li eli; li=$(our_leader_index); eli=$(etcd_leader_index)
  bench "ours-submit-c1-leader" --coordinators "$urls" submit -c 1 -d "$DURATION" --node "$li"
  bench "etcd-put-c1-leader" etcd-put --endpoints "$eurls" -c 1 -d "$DURATION" --node "$eli"
  bench "ours-submit-c1-follower" --coordinators "$urls" submit -c 1 -d "$DURATION" --node $(((li + 1) % ${#NODES[@]}))
  bench "etcd-put-c1-follower" etcd-put --endpoints "$eurls" -c 1 -d "$DURATION" --node $(((eli + 1) % ${#NODES[@]}))
  for c in $CONCURRENCY; do
    bench "ours-submit-c$c" --coordinators "$urls" submit -c "$c" -d "$DURATION"
    bench "etcd-put-c$c" etcd-put --endpoints "$eurls" -c "$c" -d "$DURATION"
  done
  # The other modes on a fresh cluster: the submit points leave a few
  # hundred thousand queued jobs behind, and the memtable flushes and
  # compactions they cause would run during (and move) the e2e figure.
  stop_ours "$BENCH_DIR/ours"
  start_ours "$BENCH_DIR/ours-modes"
  "$BIN/jobsched-bench" --coordinators "$urls" submit -c 16 -d 2 >/dev/null 2>&1 || true
  bench "ours-e2e-c64" --coordinators "$urls" e2e -c 64 --workers 8 --slots 8 -d "$DURATION"
  # etcd at 64 again, right after the e2e point: the e2e target's reference.
  bench "etcd-put-c64-by-e2e" etcd-put --endpoints "$eurls" -c 64 -d "$DURATION"
  # Twice the slots: shows whether the 64 slots or the cluster set the pace.
  bench "ours-e2e-c64-s128" --coordinators "$urls" e2e -c 64 --workers 8 --slots 16 -d "$DURATION"
  bench "ours-pickup" --coordinators "$urls" pickup -n 200
  bench "ours-batch-c16" --coordinators "$urls" submit -c 16 --batch 100 -d "$DURATION"
  stop_ours "$BENCH_DIR/ours-modes"
  stop_etcd "$BENCH_DIR/etcd"
  echo "{\"loadAfter\":\"$(loadavg)\"}" >>"$BENCH_DIR/compare-load.json"

  report compare
}

# CPU ticks (utime+stime) of the running nodes of DIR, summed.
nodes_cpu_ticks() { # nodes_cpu_ticks DIR
  local n sum=0
  for n in "${NODES[@]}"; do
    [ -f "$1/node$n.pid" ] || continue
    sum=$((sum + $(awk '{print $14 + $15}' "/proc/$(cat "$1/node$n.pid")/stat")))
  done
  echo "$sum"
}
last_log_index() { curl -fs "http://127.0.0.1:$(our_port 1)/api/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("lastLogIndex") or 0)'; }

ab() { # ab VARIANT...
  [ $# -ge 1 ] || { echo "ab: give at least one 'label:ENV=V ...' variant" >&2; exit 2; }
  local mode=${AB_MODE:-submit} c=${AB_C:-64} rounds=${ROUNDS:-3} r v label envs dir t0 t1 i0 i1 out
  RESULTS=$BENCH_DIR/ab.jsonl
  : >"$RESULTS"
  local hz; hz=$(getconf CLK_TCK)
  for r in $(seq "$rounds"); do
    for v in "$@"; do
      label=${v%%:*}; envs=${v#*:}; [ "$envs" = "$v" ] && envs=""
      dir=$BENCH_DIR/ab-$label
      rm -rf "$dir"
      # The variant's environment reaches the nodes (JOBSCHED_* settings) and
      # may name other binaries (BIN=...).
      (
        # shellcheck disable=SC2086
        [ -n "$envs" ] && export $envs
        start_ours "$dir"
        local urls; urls=$(our_urls)
        "$BIN/jobsched-bench" --coordinators "$urls" submit -c 16 -d 2 >/dev/null 2>&1 || true
        t0=$(nodes_cpu_ticks "$dir"); i0=$(last_log_index)
        if [ "$mode" = e2e ]; then
          out=$("$BIN/jobsched-bench" --json-out "$RESULTS" --tag "$label" --coordinators "$urls" \
            e2e -c "$c" --workers "${AB_WORKERS:-8}" --slots "${AB_SLOTS:-8}" -d "$DURATION" 2>/dev/null | tail -1)
        else
          # AB_NODE=leader|follower: every connection to that node (placement
          # decides whether a write takes the relay hop); else spread.
          local place=()
          case ${AB_NODE:-} in
            leader) place=(--node "$(our_leader_index)") ;;
            follower) place=(--node "$((($(our_leader_index) + 1) % ${#NODES[@]}))") ;;
          esac
          out=$("$BIN/jobsched-bench" --json-out "$RESULTS" --tag "$label" --coordinators "$urls" \
            submit -c "$c" -d "$DURATION" "${place[@]}" 2>/dev/null | tail -1)
        fi
        t1=$(nodes_cpu_ticks "$dir"); i1=$(last_log_index)
        stop_ours "$dir"
        python3 - "$RESULTS" "$label" "$r" "$((t1 - t0))" "$((i1 - i0))" "$hz" "$out" <<'PY'
import json, sys
path, label, rnd, ticks, entries, hz, out = sys.argv[1:]
row = [json.loads(l) for l in open(path) if l.strip()][-1]
rate = row.get("completedPerSecond") or row.get("perSecond") or 0
# The bench measures `seconds` after a 1 s warm-up; the CPU window covers both.
jobs = rate * (row["seconds"] + 1)
cpu_ms = int(ticks) * 1000 / int(hz)
print(f"round {rnd} {label:>12}: {rate:9.0f}/s  cluster CPU {cpu_ms / jobs * 1000 if jobs else 0:7.1f} ms per 1,000 jobs"
      f"  jobs per Raft entry {jobs / int(entries) if int(entries) else 0:5.1f}  | {' '.join(out.split())[:90]}")
PY
      )
    done
  done
}

scale() {
  RESULTS=$BENCH_DIR/scale.jsonl
  : >"$RESULTS"
  machine_json "$BENCH_DIR" >"$BENCH_DIR/machine.json"
  for n in $SCALE_JOBS; do
    local dir=$BENCH_DIR/scale-$n
    rm -rf "$dir"
    start_ours "$dir"
    local urls; urls=$(our_urls)
    local t0=$SECONDS
    # The retained history: n jobs submitted, acquired and completed (they
    # stay for the 7-day retention), then a pool of ready jobs to acquire.
    bench "scale-$n-preload" --coordinators "$urls" preload -n "$n" --job-type retained --finish -c 4
    # One pool per measurement, so each starts with the same queue; a run
    # that empties its pool early is measured over the time it took.
    bench "scale-$n-pool1" --coordinators "$urls" preload -n "$SCALE_POOL" --job-type acq1 -c 4
    bench "scale-$n-pool16" --coordinators "$urls" preload -n "$SCALE_POOL16" --job-type acq16 -c 4
    local preload_s=$((SECONDS - t0)) settle_s
    settle_s=$(wait_settled "$dir")
    log "scale-$n: nodes idle after ${settle_s} s (compactions after the preload done)"
    echo "{\"tag\":\"scale-$n-rss-before\",\"retained\":$n,\"load\":\"$(loadavg)\",\"preloadSeconds\":$preload_s,\"settleSeconds\":$settle_s,\"nodes\":$(rss_json "$dir")}" >>"$RESULTS"
    bench "scale-$n-acquire" --coordinators "$urls" acquire -c 16 --max-jobs 1 -d "$DURATION" --job-type acq1
    bench "scale-$n-acquire16" --coordinators "$urls" acquire -c 4 --max-jobs 16 -d "$DURATION" --job-type acq16
    echo "{\"tag\":\"scale-$n-rss-after\",\"retained\":$n,\"load\":\"$(loadavg)\",\"nodes\":$(rss_json "$dir")}" >>"$RESULTS"
    stop_ours "$dir"
  done
  report scale
}

# report compare|scale: print the table and (unless NO_DOC=1) rewrite that
# block of docs/benchmarks.md. The command line recorded in the doc names the
# settings that differ from the defaults.
report() {
  local what=$1 cmd="" v
  for v in DURATION CONCURRENCY SCALE_JOBS SCALE_POOL SCALE_POOL16 SETTLE_MAX; do
    local def="DEFAULT_$v"
    if [ "${!v}" != "${!def}" ]; then cmd+="$v=\"${!v}\" "; fi
  done
  cmd+="scripts/bench.sh $what"
  python3 - "$what" "$BENCH_DIR" "$DOC" "$cmd" "${NO_DOC:-0}" <<'PYEOF'
import json, os, re, sys

what, bench_dir, doc, cmd, no_doc = sys.argv[1:6]

def rows(name):
    out = []
    path = os.path.join(bench_dir, name)
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out

def by_tag(rs):
    return {r.get("tag"): r for r in rs}

def etcd_version():
    import subprocess
    try: return subprocess.run("etcd --version | head -1", shell=True, capture_output=True, text=True).stdout.strip() or "?"
    except Exception: return "?"
def f0(x): return "-" if x is None else f"{x:,.0f}"
def f2(x): return "-" if x is None else f"{x:.2f}"
def ratio(a, b): return "-" if not a or not b else f"{a / b:.2f}x"

machine = {}
mpath = os.path.join(bench_dir, "machine.json")
if os.path.exists(mpath):
    machine = json.load(open(mpath))

def header(extra_load):
    m = machine
    lines = [
        f"- **Date**: {m.get('date', '?')}; commit {m.get('commit', '?')}",
        f"- **Machine**: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memMiB', 0) // 1024} GiB RAM, "
        f"kernel {m.get('kernel', '?')}, data on {m.get('disk', '?')}",
        # On a fresh machine etcd is installed after machine.json was written;
        # the scale run does not use etcd at all.
        f"- **Software**: {m.get('rustc', '?')}"
        + ("" if what == "scale" else f"; {m.get('etcd') or etcd_version()} (Debian etcd-server)"),
        f"- **Command**: `{cmd}`",
    ]
    if extra_load:
        lines.append(f"- **Load average** (1/5/15 min) {extra_load}")
    return "\n".join(lines)

targets = []

def compare_block():
    rs = rows("compare.jsonl")
    t = by_tag(rs)
    load = {}
    lp = os.path.join(bench_dir, "compare-load.json")
    if os.path.exists(lp):
        for line in open(lp):
            load.update(json.loads(line))
    concs = sorted({r["concurrency"] for r in rs if r.get("tag", "").startswith(("ours-submit-c", "etcd-put-c"))})
    out = [header(f"before {load.get('loadBefore', '?')}, after {load.get('loadAfter', '?')} "
                  "(the machine is shared: other builds may have been running)"), ""]
    out.append("Closed loop, one request in flight per connection, connections spread over the 3 nodes/members; "
               "each point measured for the set duration after a 1 s warm-up. jobsched: `POST /api/jobs` "
               "(one job with a requestId, acknowledged after fsync on a quorum); etcd: `POST /v3/kv/put` through "
               "the HTTP/JSON gateway (64-byte value, acknowledged after its WAL fsync on a quorum). "
               "Both clusters run side by side, and each point is measured for jobsched and right after for etcd "
               "(the machine's speed drifts within minutes). "
               "jobsched's other modes (e2e, pickup, batch) run on a second fresh cluster, not behind the "
               "submit points' queued jobs and their compactions; the e2e ratio is to an etcd point at 64 "
               "measured right after the e2e point.")
    out.append("")
    out.append("| connections | jobsched submits/s | etcd puts/s | ratio | jobsched p50 ms | etcd p50 ms | jobsched p99 ms | etcd p99 ms | jobsched max ms | etcd max ms | errors (ours/etcd) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in concs:
        o, e = t.get(f"ours-submit-c{c}", {}), t.get(f"etcd-put-c{c}", {})
        out.append(f"| {c} | {f0(o.get('perSecond'))} | {f0(e.get('perSecond'))} | {ratio(o.get('perSecond'), e.get('perSecond'))} "
                   f"| {f2(o.get('p50Ms'))} | {f2(e.get('p50Ms'))} | {f2(o.get('p99Ms'))} | {f2(e.get('p99Ms'))} "
                   f"| {f2(o.get('maxMs'))} | {f2(e.get('maxMs'))} | {o.get('errors', '-')}/{e.get('errors', '-')} |")
    out.append("")
    placed = [(w, t.get(f"ours-submit-c1-{w}", {}), t.get(f"etcd-put-c1-{w}", {})) for w in ("leader", "follower")]
    if any(o or e for _, o, e in placed):
        out.append("Single connection by placement: the lone client talks to the leader, or to a follower "
                   "(ours relays the write to the leader over HTTP; etcd forwards the proposal over its peer "
                   "stream). The spread row above uses whichever node was first in the list.")
        out.append("")
        out.append("| client talks to | jobsched submits/s | etcd puts/s | jobsched p50 / p99 ms | etcd p50 / p99 ms |")
        out.append("|---|---:|---:|---|---|")
        for w, o, e in placed:
            out.append(f"| {w} | {f0(o.get('perSecond'))} | {f0(e.get('perSecond'))} "
                       f"| {f2(o.get('p50Ms'))} / {f2(o.get('p99Ms'))} | {f2(e.get('p50Ms'))} / {f2(e.get('p99Ms'))} |")
        out.append("")
    e2e, pk, b = t.get("ours-e2e-c64", {}), t.get("ours-pickup", {}), t.get("ours-batch-c16", {})
    e64 = t.get("etcd-put-c64", {})
    # The e2e reference: etcd at 64 measured right after the e2e point (older
    # runs: the submit table's point).
    e2e_ref = t.get("etcd-put-c64-by-e2e") or e64
    out.append("| jobsched, other modes | figure |")
    out.append("|---|---:|")
    if e2e:
        how = ("a slot is free when its instant handler returns; each worker's reporter sends the waiting results in one batched call"
               if e2e.get("pipelinedReport") else "each slot held until its completion is acknowledged")
        out.append(f"| e2e: {e2e.get('submitters')} submitters + {e2e.get('slots')} worker slots over HTTP ({how}), completed jobs/s "
                   f"| {f0(e2e.get('completedPerSecond'))} ({ratio(e2e.get('completedPerSecond'), e2e_ref.get('perSecond'))} of etcd's {f0(e2e_ref.get('perSecond'))} puts/s at 64) |")
        for r in (e2e, t.get("ours-e2e-c64-s128", {})):
            if r.get("acquireCallsPerJob") is not None:
                out.append(f"| e2e with {r.get('slots')} slots: completed / submitted jobs/s; acquire and report calls per job "
                           f"| {f0(r.get('completedPerSecond'))} / {f0(r.get('submittedPerSecond'))}; "
                           f"{r.get('acquireCallsPerJob'):.2f} and {r.get('reportCallsPerJob'):.2f} |")
    if pk:
        out.append(f"| pickup: submit acknowledged -> idle long-polling worker's acquire returns, p50 / p90 / p99 ms "
                   f"| {f2(pk.get('fromAckP50Ms'))} / {f2(pk.get('fromAckP90Ms'))} / {f2(pk.get('fromAckP99Ms'))} |")
        out.append(f"| pickup: submit sent -> acquire returns, p50 / p99 ms | {f2(pk.get('fromSendP50Ms'))} / {f2(pk.get('fromSendP99Ms'))} |")
    if b:
        out.append(f"| batch submit (`POST /api/jobs/batch`, {b.get('batch')} jobs per request, 16 connections), jobs/s "
                   f"| {f0(b.get('itemsPerSecond'))} (p99 {f2(b.get('p99Ms'))} ms per request) |")
    out.append("")
    o64, o1, e1 = t.get("ours-submit-c64", {}), t.get("ours-submit-c1", {}), t.get("etcd-put-c1", {})
    def tgt(name, value, ok):
        targets.append((name, value, ok))
    if o64 and e64:
        r = o64["perSecond"] / e64["perSecond"] if e64.get("perSecond") else 0
        tgt("submit/s at 64 connections >= 2x etcd puts/s", f"{r:.2f}x ({f0(o64['perSecond'])} vs {f0(e64['perSecond'])})", r >= 2)
        tgt("submit p99 at 64 connections <= etcd's", f"{f2(o64['p99Ms'])} vs {f2(e64['p99Ms'])} ms", o64["p99Ms"] <= e64["p99Ms"])
    # A lone client's latency depends on whether it talks to the leader or
    # to a follower (one relay or proposal forward more), so the target is
    # judged like for like: ours on the leader vs etcd on its leader, ours
    # on a follower vs etcd on a follower; both must hold. The spread row
    # (node 1 of each, wherever the leaders happened to be) is shown as is.
    placed = [(where, t.get(f"ours-submit-c1-{where}", {}), t.get(f"etcd-put-c1-{where}", {})) for where in ("leader", "follower")]
    if all(o and e for _, o, e in placed):
        text = ", ".join(f"{where} {f2(o['p50Ms'])} vs {f2(e['p50Ms'])} ms" for where, o, e in placed)
        if o1 and e1:
            text += f" (spread row {f2(o1['p50Ms'])} vs {f2(e1['p50Ms'])})"
        tgt("single-connection submit p50 <= etcd's (same placement)", text, all(o["p50Ms"] <= e["p50Ms"] for _, o, e in placed))
    elif o1 and e1:
        tgt("single-connection submit p50 <= etcd's", f"{f2(o1['p50Ms'])} vs {f2(e1['p50Ms'])} ms", o1["p50Ms"] <= e1["p50Ms"])
    if e2e and e2e_ref:
        tgt("e2e completed/s (64 submitters + 64 slots) >= etcd puts/s at 64",
            f"{f0(e2e['completedPerSecond'])} vs {f0(e2e_ref['perSecond'])}", e2e["completedPerSecond"] >= e2e_ref["perSecond"])
    if pk:
        tgt("pickup p50 < 5 ms", f"{f2(pk['fromAckP50Ms'])} ms", pk["fromAckP50Ms"] < 5)
    return out

def scale_block():
    rs = rows("scale.jsonl")
    t = by_tag(rs)
    ns = sorted({r["retained"] for r in rs if "retained" in r})
    out = [header(None), ""]
    out.append("Each size on a fresh cluster: N jobs submitted in batches, then acquired and completed "
               "(the retained, finished history that the 7-day retention keeps), then a pool of "
               f"ready jobs of another type; the script then waits until the nodes are idle (RocksDB's "
               "compactions after the bulk load done, at most 90 s: a history built up over days would "
               "have been compacted long before) and measures acquire throughput over that pool. "
               "Resident memory is VmRSS of each node process (VmHWM = peak) from /proc.")
    out.append("")
    out.append("| retained jobs | preload s | settle s | RSS per node MiB (after preload) | RSS after acquire | peak RSS | disk per node MiB | acquire calls/s (16 workers, 1 job each) | p50 / p99 ms | jobs/s (4 workers x 16 per call) | load |")
    out.append("|---:|---:|---:|---|---|---|---|---:|---|---:|---|")
    acq = {}
    peak = {}
    for n in ns:
        rb, ra = t.get(f"scale-{n}-rss-before", {}), t.get(f"scale-{n}-rss-after", {})
        a1, a16 = t.get(f"scale-{n}-acquire", {}), t.get(f"scale-{n}-acquire16", {})
        nodes_b, nodes_a = rb.get("nodes", []), ra.get("nodes", [])
        rss_b = " / ".join(str(x["rssMiB"]) for x in nodes_b)
        rss_a = " / ".join(str(x["rssMiB"]) for x in nodes_a)
        pk = " / ".join(str(x["peakMiB"]) for x in nodes_a)
        disk = " / ".join(str(x["diskMiB"]) for x in nodes_a)
        acq[n] = (a1.get("itemsPerSecond"), a16.get("itemsPerSecond"))
        peak[n] = max([x["rssMiB"] for x in nodes_a + nodes_b] or [0])
        out.append(f"| {n:,} | {rb.get('preloadSeconds', '-')} | {rb.get('settleSeconds', '-')} | {rss_b} | {rss_a} | {pk} | {disk} | {f0(a1.get('itemsPerSecond'))} "
                   f"| {f2(a1.get('p50Ms'))} / {f2(a1.get('p99Ms'))} | {f0(a16.get('itemsPerSecond'))} | {ra.get('load', '-')} |")
    out.append("")
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        tgt = targets.append
        tgt((f"RSS per node with {hi:,} retained jobs < 200 MB", f"{peak[hi]} MiB (largest node, after preload or acquire)", peak[hi] * 1.048576 < 200))
        for i, label in ((0, "16 workers x 1 job"), (1, "4 workers x 16 jobs")):
            a, b = acq[hi][i], acq[lo][i]
            if a and b:
                tgt((f"acquire throughput ({label}) at {hi:,} within 20% of {lo:,}", f"{a:,.0f} vs {b:,.0f} jobs/s ({a / b:.2f}x)", a >= 0.8 * b))
    return out

block = compare_block() if what == "compare" else scale_block()
if targets:
    block.append("| target | measured | met |")
    block.append("|---|---|---|")
    for name, value, ok in targets:
        block.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
text = "\n".join(block)
print()
print(text)
if no_doc == "1":
    sys.exit(0)

begin, end = f"<!-- BEGIN GENERATED {what} (scripts/bench.sh {what}) -->", f"<!-- END GENERATED {what} -->"
if os.path.exists(doc):
    cur = open(doc).read()
else:
    cur = ("# Benchmarks\n\nGenerated by `scripts/bench.sh`; the blocks between the GENERATED markers are "
           "rewritten by each run, the rest is kept.\n\n## jobsched vs etcd\n\n"
           "<!-- BEGIN GENERATED compare (scripts/bench.sh compare) -->\n<!-- END GENERATED compare -->\n\n"
           "## 1 million retained jobs\n\n"
           "<!-- BEGIN GENERATED scale (scripts/bench.sh scale) -->\n<!-- END GENERATED scale -->\n")
pat = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
if pat.search(cur):
    cur = pat.sub(lambda _: begin + "\n" + text + "\n" + end, cur)
else:
    cur += "\n" + begin + "\n" + text + "\n" + end + "\n"
os.makedirs(os.path.dirname(doc), exist_ok=True)
open(doc, "w").write(cur)
print(f"\n(wrote {doc})", file=sys.stderr)
PYEOF
}

mode=${1:-compare}
case "$mode" in
  compare | scale | all)
    mkdir -p "$BENCH_DIR"
    stop_tracked
    rm -rf "$BENCH_DIR/ours" "$BENCH_DIR/ours-modes" "$BENCH_DIR/etcd"
    trap cleanup EXIT INT TERM
    build
    [ -x "$BIN/jobsched-bench" ] || { echo "no release build in $BIN" >&2; exit 1; }
    case "$mode" in
      compare) compare ;;
      scale) scale ;;
      all) compare; scale ;;
    esac
    ;;
  ab)
    mkdir -p "$BENCH_DIR"
    stop_tracked
    trap cleanup EXIT INT TERM
    [ -x "$BIN/jobsched-bench" ] || { echo "no release build in $BIN (run scripts/bench.sh once, or set BIN)" >&2; exit 1; }
    shift
    ab "$@"
    ;;
  up)
    # A cluster for profiling by hand (perf, callgrind); `stop` ends it.
    mkdir -p "$BENCH_DIR"
    stop_tracked
    rm -rf "$BENCH_DIR/ours"
    start_ours "$BENCH_DIR/ours"
    echo "JOBSCHED_COORDINATORS=$(our_urls)"
    echo "pids: $(cat "$BENCH_DIR"/ours/node*.pid | tr '\n' ' ')"
    ;;
  stop) stop_tracked ;;
  report)
    # Re-render a block from the results of the last run (run/bench/*.jsonl).
    case "${2:-}" in compare | scale) report "$2" ;; *) echo "usage: $0 report compare|scale" >&2; exit 2 ;; esac
    ;;
  *) sed -n '2,30p' "$0"; exit 2 ;;
esac
