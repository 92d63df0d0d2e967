#!/usr/bin/env bash
# jobsched in Docker, without an image registry: build the images, run the
# 3-coordinator + workers cluster of docker-compose.yml, and inject faults.
#
# usage: scripts/docker.sh COMMAND [ARG]
#
#   build        build our binaries (cargo, $PROFILE) and the images: the base
#                image (once: a Debian bookworm minbase root filesystem made by
#                debootstrap, cached as a tarball) and the thin app image that
#                only adds our binaries (seconds when only our code changed)
#   base         only the base image (runs debootstrap when no tarball is cached)
#   up           build (unless SKIP_BUILD=1), then compose down + up -d, and
#                wait until ready
#   wait         wait until 3 coordinators are healthy and ready (leader known)
#                and $WORKERS workers are registered (timeout $WAIT_TIMEOUT s)
#   down         stop and remove the containers and network (data volumes kept)
#   wipe         down -v: also delete the data volumes
#   status       containers with health, then role/term/leader of each node
#   leader       print the leader's node id
#   images       image names and sizes
#   kill N       docker kill -s KILL coordinator N's container (N = 1, 2, 3)
#   start N      docker start it again (it rejoins and catches up)
#   stop N       graceful stop (SIGTERM)
#   pause N / unpause N             docker pause / unpause (freeze, thaw)
#   disconnect N / connect N        docker network disconnect / connect
#                (connect restores the service-name alias peers resolve)
#   logs [SVC]   follow the logs (all services, or coord1..3 / worker)
#   compose ...  docker-compose (or `docker compose`) with this project's
#                file and project name, e.g. `compose up -d --scale worker=4`
#
# Environment: PROFILE (dev | release; default dev), SKIP_CARGO=1 (use the
# binaries already in $CARGO_TARGET_DIR/debug or /release), COMPOSE_PROJECT_NAME
# (jobsched), JOBSCHED_PORT_1..3 (host ports, 5001-5003), JOBSCHED_PUBLISH_ADDR
# (127.0.0.1), JOBSCHED_IMAGE (jobsched:local), JOBSCHED_BASE_IMAGE
# (jobsched-base:bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
# DOCKER_COMPOSE (the compose command; default `docker compose` when present,
# else docker-compose), WORKERS (2), WAIT_TIMEOUT (120).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/env.sh"

PROFILE=${PROFILE:-dev}
case "$PROFILE" in
  dev | debug) PROFILE=dev BIN_DIR=$CARGO_TARGET_DIR/debug ;;
  release) BIN_DIR=$CARGO_TARGET_DIR/release ;;
  *) echo "docker.sh: error: PROFILE must be dev (default) or release, got '$PROFILE'" >&2; exit 2 ;;
esac
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-jobsched}
export JOBSCHED_IMAGE=${JOBSCHED_IMAGE:-jobsched:local}
# A JOBSCHED_BASE_IMAGE of your own (e.g. debian:bookworm-slim from a
# registry) is used as it is: no debootstrap, docker build pulls it.
BASE_IMAGE=${JOBSCHED_BASE_IMAGE:-jobsched-base:bookworm}
[ "$BASE_IMAGE" = jobsched-base:bookworm ] && OWN_BASE=1 || OWN_BASE=0
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${JOBSCHED_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobsched/docker}
ROOTFS=$CACHE/rootfs-bookworm-minbase.tar.gz
PORTS=("${JOBSCHED_PORT_1:-5001}" "${JOBSCHED_PORT_2:-5002}" "${JOBSCHED_PORT_3:-5003}")
PUBLISH_ADDR=${JOBSCHED_PUBLISH_ADDR:-127.0.0.1}
# curl/health checks from the host go to loopback when published on all interfaces.
[ "$PUBLISH_ADDR" = "0.0.0.0" ] && HOST_ADDR=127.0.0.1 || HOST_ADDR=$PUBLISH_ADDR
WORKERS=${WORKERS:-2}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-120}
# Binaries that go into the app image.
BINS=(jobsched-coordinator jobsched-worker jobsched)

say() { echo "docker.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ----- compose ----------------------------------------------------------------

compose() {
  local cmd
  if [ -n "${DOCKER_COMPOSE:-}" ]; then
    read -r -a cmd <<<"$DOCKER_COMPOSE"
  elif docker compose version >/dev/null 2>&1; then
    cmd=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    cmd=(docker-compose)
  else
    die "neither 'docker compose' nor docker-compose is installed"
  fi
  "${cmd[@]}" -f "$ROOT/docker-compose.yml" -p "$COMPOSE_PROJECT_NAME" "$@"
}

# The project name as compose writes it into its labels (v1 and v2 agree).
project_label() { echo "$COMPOSE_PROJECT_NAME" | tr '[:upper:]' '[:lower:]' | tr -cd 'a-z0-9_-'; }

# Container id of a service's (first) container, running or not.
container_of() {
  docker ps -aq --filter "label=com.docker.compose.project=$(project_label)" \
    --filter "label=com.docker.compose.service=$1" | head -n1
}

node_container() {
  local n=${1:-}
  [[ "$n" =~ ^[123]$ ]] || die "expected a coordinator number 1, 2 or 3, got '${n}'"
  local c
  c=$(container_of "coord$n")
  [ -n "$c" ] || die "no container for coord$n in project $COMPOSE_PROJECT_NAME (is the cluster up?)"
  echo "$c"
}

# The project's network (compose's "default" network, <project>_default).
project_network() {
  local net
  net=$(docker network ls -q --filter "label=com.docker.compose.project=$(project_label)" \
    --filter "label=com.docker.compose.network=default" | head -n1)
  [ -n "$net" ] || die "no network for project $COMPOSE_PROJECT_NAME"
  docker network inspect -f '{{.Name}}' "$net"
}

# ----- images -----------------------------------------------------------------

ensure_debootstrap() {
  command -v debootstrap >/dev/null 2>&1 && return 0
  say "installing debootstrap (apt-get)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap >/dev/null
}

# A trimmed Debian bookworm minbase root filesystem, made once and cached.
make_rootfs() {
  [ -s "$ROOTFS" ] && return 0
  [ "$(id -u)" -eq 0 ] || die "debootstrap needs root (or copy a cached $ROOTFS here)"
  ensure_debootstrap
  mkdir -p "$CACHE"
  local dir
  dir=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  chmod 755 "$dir" # it becomes the image's /
  say "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR (a few minutes, done once)"
  local t0=$SECONDS
  if ! debootstrap --variant=minbase bookworm "$dir" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -n 20 "$CACHE/debootstrap.log" >&2
    umount_below "$dir"
    rm -rf --one-file-system "$dir"
    die "debootstrap failed (log: $CACHE/debootstrap.log)"
  fi
  umount_below "$dir"
  trim_rootfs "$dir"
  say "packing the root filesystem"
  tar --numeric-owner --one-file-system --xattrs -C "$dir" -czf "$ROOTFS.tmp" .
  mv "$ROOTFS.tmp" "$ROOTFS"
  rm -rf --one-file-system "$dir"
  say "root filesystem cached: $ROOTFS ($(du -h "$ROOTFS" | cut -f1), $((SECONDS - t0)) s)"
}

umount_below() {
  local m
  for m in $(awk -v d="$1" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" || true
  done
}

# Drop what a container never needs: documentation (licences kept), man pages,
# locales, apt lists and caches, logs; host files debootstrap copied in.
trim_rootfs() {
  local r=$1
  find "$r/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/lintian "$r"/usr/share/linda
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/debconf/*-old \
    "$r"/var/lib/dpkg/*-old "$r"/var/log/* "$r"/tmp/* "$r"/var/tmp/* "$r"/dev/*
  : >"$r/etc/resolv.conf"
  : >"$r/etc/hostname"
  : >"$r/etc/machine-id" 2>/dev/null || true
  # Keep later `apt-get install`s in derived images just as small.
  mkdir -p "$r/etc/dpkg/dpkg.cfg.d" "$r/etc/apt/apt.conf.d"
  cat >"$r/etc/dpkg/dpkg.cfg.d/01-jobsched-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
  cat >"$r/etc/apt/apt.conf.d/01-jobsched-small" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
}

image_label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

# The base image: FROM scratch + the cached root filesystem. Rebuilt only when
# the tarball or docker/base.Dockerfile changed (their hash is a label).
build_base() {
  make_rootfs
  local sum ctx
  sum=$( (sha256sum <"$ROOTFS"; sha256sum <"$ROOT/docker/base.Dockerfile") | sha256sum | cut -c1-16)
  if [ "$(image_label "$BASE_IMAGE" org.jobsched.base-hash)" = "$sum" ]; then
    return 0
  fi
  say "building $BASE_IMAGE from $ROOTFS"
  ctx=$CACHE/base-context
  rm -rf "$ctx"
  mkdir -p "$ctx"
  ln "$ROOTFS" "$ctx/rootfs.tar.gz" 2>/dev/null || cp "$ROOTFS" "$ctx/rootfs.tar.gz"
  cp "$ROOT/docker/base.Dockerfile" "$ctx/Dockerfile"
  docker build -q --label "org.jobsched.base-hash=$sum" -t "$BASE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
}

# Our binaries, stripped of debug info, into the app build context. A binary
# is copied again only when cargo produced a newer one; the copy keeps the
# source's mtime so docker's layer cache sees unchanged files as unchanged.
stage_binaries() {
  local ctx=$1 src=$BIN_DIR b
  mkdir -p "$ctx/bin"
  for b in "${BINS[@]}"; do
    [ -x "$src/$b" ] || die "$src/$b is missing: run without SKIP_CARGO=1 to build it"
    if [ ! -e "$ctx/bin/$b" ] || [ "$src/$b" -nt "$ctx/bin/$b" ] || [ "$src/$b" -ot "$ctx/bin/$b" ]; then
      strip --strip-debug -o "$ctx/bin/$b.tmp" "$src/$b"
      touch -r "$src/$b" "$ctx/bin/$b.tmp"
      mv "$ctx/bin/$b.tmp" "$ctx/bin/$b"
    fi
  done
}

build() {
  command -v docker >/dev/null 2>&1 || die "docker is not installed"
  docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (docker info failed)"
  if [ "${SKIP_CARGO:-0}" != 1 ]; then
    "$ROOT/scripts/install-deps.sh"
    # The whole workspace, as scripts/test.sh builds it: building a subset
    # could unify dependency features differently and recompile them.
    say "cargo build --workspace --bins --profile $PROFILE"
    cargo build --workspace --bins --profile "$PROFILE"
  fi
  local t0=$SECONDS
  [ "$OWN_BASE" = 0 ] || build_base
  local ctx=$CACHE/app-context-$PROFILE
  stage_binaries "$ctx"
  cp "$ROOT/docker/Dockerfile" "$ctx/Dockerfile"
  cp "$ROOT/docker/coordinator.toml" "$ctx/coordinator.toml"
  say "building $JOBSCHED_IMAGE ($PROFILE binaries) on $BASE_IMAGE"
  local old
  old=$(docker image inspect -f '{{.Id}}' "$JOBSCHED_IMAGE" 2>/dev/null || true)
  docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$JOBSCHED_IMAGE" "$ctx" >/dev/null
  # The previous build, now untagged, only takes disk space (kept while a
  # container still uses it).
  if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$JOBSCHED_IMAGE")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
  # The binaries must run on the base's libraries (glibc, libstdc++).
  local b
  for b in "${BINS[@]}"; do
    docker run --rm --network none "$JOBSCHED_IMAGE" "$b" --help >/dev/null ||
      die "$b does not run inside $JOBSCHED_IMAGE (a library missing from the base?)"
  done
  say "images ready in $((SECONDS - t0)) s: $(docker image inspect -f '{{.Size}}' "$JOBSCHED_IMAGE" | awk '{printf "%s %.0f MB", "'"$JOBSCHED_IMAGE"'", $1/1e6}')"
}

images() {
  docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}\t{{.CreatedSince}}' |
    grep -E "^(${BASE_IMAGE}|${JOBSCHED_IMAGE})\b" || true
}

# ----- cluster ----------------------------------------------------------------

port_busy() { ss -Hltn "sport = :$1" | grep -q .; }

up() {
  [ "${SKIP_BUILD:-0}" = 1 ] || build
  say "compose down (a previous run of project $COMPOSE_PROJECT_NAME), then up -d"
  compose down --remove-orphans >/dev/null 2>&1 || true
  local p
  for p in "${PORTS[@]}"; do
    if port_busy "$p"; then
      die "host port $p is in use (a local cluster? scripts/cluster.sh status / down), or choose others: JOBSCHED_PORT_1..3"
    fi
  done
  compose up -d
  wait_ready
}

health_of() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null || echo missing; }

# Prints one line per node: "N role term leader applied" ("N down" when it does not answer).
cluster_views() {
  local i
  for i in 1 2 3; do
    local body
    if body=$(curl -fsS --max-time 2 "http://$HOST_ADDR:${PORTS[$((i - 1))]}/api/cluster" 2>/dev/null); then
      python3 -c 'import json,sys; c=json.loads(sys.argv[2]); print(sys.argv[1], c["role"], c["term"], c.get("leaderId"), c["lastAppliedIndex"])' "$i" "$body"
    else
      echo "$i down"
    fi
  done
}

leader() {
  # The Leader with the highest term (a cut-off old leader may still think it leads).
  cluster_views | awk '$2 == "Leader" && $3 > t {t = $3; id = $1} END {if (id == "") exit 1; print id}'
}

active_workers() {
  local p
  for p in "${PORTS[@]}"; do
    curl -fsS --max-time 3 "http://$HOST_ADDR:$p/api/workers" 2>/dev/null |
      python3 -c 'import json,sys; print(len(json.load(sys.stdin)["workers"]))' 2>/dev/null && return 0
  done
  echo 0
}

wait_ready() {
  local end=$((SECONDS + WAIT_TIMEOUT)) t0=$SECONDS
  say "waiting for 3 healthy and ready coordinators and $WORKERS workers (up to $WAIT_TIMEOUT s)"
  while :; do
    local ok=1 i c
    for i in 1 2 3; do
      c=$(container_of "coord$i")
      [ -n "$c" ] && [ "$(health_of "$c")" = healthy ] || ok=0
      curl -fsS --max-time 2 -o /dev/null "http://$HOST_ADDR:${PORTS[$((i - 1))]}/ready" 2>/dev/null || ok=0
    done
    if [ "$ok" = 1 ] && [ "$(active_workers)" -ge "$WORKERS" ]; then
      say "ready after $((SECONDS - t0)) s: leader is node $(leader)"
      return 0
    fi
    if [ $SECONDS -ge $end ]; then
      status >&2 || true
      compose logs --tail 30 >&2 || true
      die "cluster not ready after $WAIT_TIMEOUT s"
    fi
    sleep 1
  done
}

status() {
  local svc c
  printf '%-8s %-14s %-10s %s\n' SERVICE CONTAINER HEALTH PORT
  for svc in coord1 coord2 coord3; do
    c=$(container_of "$svc")
    local paused=""
    [ -n "$c" ] && [ "$(docker inspect -f '{{.State.Paused}}' "$c")" = true ] && paused=" (paused)"
    printf '%-8s %-14s %-10s %s\n' "$svc" "${c:-none}" "$( [ -n "$c" ] && health_of "$c" || echo none)$paused" \
      "$HOST_ADDR:${PORTS[$((${svc#coord} - 1))]}"
  done
  for c in $(docker ps -aq --filter "label=com.docker.compose.project=$(project_label)" \
    --filter "label=com.docker.compose.service=worker"); do
    printf '%-8s %-14s %-10s\n' worker "$c" "$(health_of "$c")"
  done
  echo
  printf '%-5s %-10s %-6s %-7s %s\n' NODE ROLE TERM LEADER APPLIED
  cluster_views | awk '{printf "%-5s %-10s %-6s %-7s %s\n", $1, $2, $3, $4, $5}'
  echo "active workers: $(active_workers)"
}

# fault ACTION N: one fault (or its undoing) on coordinator N's container.
fault() {
  local action=$1 n=$2 c net
  c=$(node_container "$n")
  case "$action" in
    kill) docker kill -s KILL "$c" >/dev/null && say "coord$n killed" ;;
    start) docker start "$c" >/dev/null && say "coord$n started" ;;
    stop) docker stop "$c" >/dev/null && say "coord$n stopped" ;;
    pause) docker pause "$c" >/dev/null && say "coord$n paused" ;;
    unpause | resume) docker unpause "$c" >/dev/null && say "coord$n unpaused" ;;
    disconnect)
      net=$(project_network)
      docker network disconnect "$net" "$c"
      say "coord$n disconnected from $net"
      ;;
    connect)
      net=$(project_network)
      # The alias is the service name the peers and workers resolve.
      docker network connect --alias "coord$n" "$net" "$c"
      say "coord$n connected to $net"
      ;;
  esac
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  build) build ;;
  base) build_base; images ;;
  up) up ;;
  wait) wait_ready ;;
  down) compose down --remove-orphans ;;
  wipe) compose down -v --remove-orphans ;;
  status) status ;;
  leader) leader || die "no leader" ;;
  images) images ;;
  kill | start | stop | pause | unpause | resume | disconnect | connect) fault "$cmd" "${1:-}" ;;
  logs) compose logs -f --tail 100 "$@" ;;
  compose) compose "$@" ;;
  *) usage; exit 2 ;;
esac
