#!/usr/bin/env bash
# ftcomm's tests in a container, on a fresh Debian machine, in one command:
#
#   scripts/docker-test.sh                 # build the image, run the README's test command inside it
#   scripts/docker-test.sh --fast          # scripts/test.sh --fast inside (unit and CLI tiers)
#   scripts/docker-test.sh -- -L e2e       # these arguments to scripts/test.sh inside
#   scripts/docker-test.sh --nodes         # containers as nodes: a node lost, replaced; one gone for good
#   scripts/docker-test.sh --build-only    # the image alone
#
# What it does, each step only when needed:
#   1. a container engine: Debian's docker.io (and docker-compose) when `docker`
#      cannot reach a daemon and none is installed (needs root or sudo; without
#      either: exit 2 with what to install);
#   2. the daemon: an engine already running is used as it is; otherwise dockerd is
#      started here (data in $FTCOMM_DOCKER_ROOT, default /var/lib/docker) and
#      stopped at the end, by its pid;
#   3. the base image debian:bookworm: used when present, pulled when a registry
#      answers, else built locally with mmdebstrap from the machine's Debian mirror
#      (with the machine's own CA certificates, so that HTTPS works inside) and
#      `docker import`ed;
#   4. the image ftcomm:test from docker/Dockerfile (Debian + PyPI only);
#   5. the tests inside it, with the capabilities the network-namespace tests need.
# The exit status is the tests' (2: no engine; 3: the image did not build). On
# exit, Ctrl-C or SIGTERM, the containers, networks and volumes it made, and a
# daemon it started, are removed.
#
# Environment: FTCOMM_DOCKER_ROOT (dockerd's data root when started here),
# FTCOMM_IMAGE (default ftcomm:test), FTCOMM_BASE (default debian:bookworm),
# DEBIAN_MIRROR (default: the machine's apt source, else http://deb.debian.org/debian).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
mode=tests build_only=0
test_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --fast) test_args+=(--fast) ;;
    --nodes) mode=nodes ;;
    --build-only) build_only=1 ;;
    --) shift; test_args+=("$@"); break ;;
    *) echo "docker-test: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

image=${FTCOMM_IMAGE:-ftcomm:test}
base=${FTCOMM_BASE:-debian:bookworm}
say() { printf 'docker-test: %s\n' "$*"; }
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# --- cleanup: what this run made, and nothing else ---------------------------
work=$(mktemp -d /tmp/ftcomm-docker-test.XXXXXX)
started_daemon=
containers=()
child=
# Long steps run in the background and are waited for, so that a signal is acted
# on at once (bash runs a trap only after its foreground command ends).
# in_background LOG|- COMMAND...: its output to LOG (- leaves it), never through a
# redirection of this function's own (a trap would write there).
in_background() {
  local log=$1
  shift
  if [ "$log" = - ]; then "$@" & else "$@" >"$log" 2>&1 & fi
  child=$!
  wait "$child"
  local rc=$?
  child=
  return "$rc"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$child" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1; done
  if [ -n "$started_daemon" ]; then
    say "stopping the dockerd this run started (pid $started_daemon)"
    $SUDO kill "$started_daemon" 2>/dev/null
    for _ in $(seq 1 30); do $SUDO kill -0 "$started_daemon" 2>/dev/null || break; sleep 1; done
    $SUDO kill -9 "$started_daemon" 2>/dev/null
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# --- 1. the engine -------------------------------------------------------------
if ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null; then
  if [ -z "$SUDO" ] || sudo -n true 2>/dev/null; then
    say "installing Debian's docker.io and docker-compose (no container engine found)"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      docker.io docker-compose >/dev/null || { say "installing docker.io failed"; exit 2; }
  else
    say "no container engine, and no permission to install one: install Debian's docker.io (sudo apt-get install" \
        "docker.io docker-compose) or run this as root"
    exit 2
  fi
fi

# --- 2. the daemon -------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  say "using the running container engine ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
else
  root=${FTCOMM_DOCKER_ROOT:-/var/lib/docker}
  say "starting dockerd (data in $root; stopped at the end)"
  $SUDO mkdir -p "$root"
  $SUDO dockerd --data-root "$root" --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
  started_daemon=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not come up in 60 s:"; tail -20 "$work/dockerd.log"; exit 2; }
fi

# --- 3. the base image ---------------------------------------------------------
if ! docker image inspect "$base" >/dev/null 2>&1; then
  if timeout 60 docker pull -q "$base" >/dev/null 2>&1; then
    say "pulled $base"
  else
    say "no registry answered for $base: building it with mmdebstrap (about a minute)"
    command -v mmdebstrap >/dev/null || $SUDO apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null ||
      { say "mmdebstrap is missing and could not be installed"; exit 3; }
    mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
    mirror=${mirror:-http://deb.debian.org/debian}
    # The machine's own CA certificates (what update-ca-certificates took from
    # /usr/local/share/ca-certificates): HTTPS from inside may go through them.
    cas=$(find /usr/local/share/ca-certificates -name '*.crt' 2>/dev/null | tr '\n' ' ')
    suite=${base#*:}
    in_background "$work/mmdebstrap.log" $SUDO mmdebstrap --variant=minbase --include=ca-certificates \
      --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"; for c in $cas; do cp \"\$c\" \"\$1/usr/local/share/ca-certificates/\"; done; chroot \"\$1\" update-ca-certificates >/dev/null" \
      "$suite" "$work/rootfs.tar" "$mirror" ||
      { tail -20 "$work/mmdebstrap.log"; say "mmdebstrap failed"; exit 3; }
    docker import "$work/rootfs.tar" "$base" >/dev/null || { say "docker import failed"; exit 3; }
    say "built $base from $mirror (CA certificates: ${cas:-none})"
  fi
fi

# --- 4. the image --------------------------------------------------------------
say "building $image from docker/Dockerfile (first time: torch's wheels, several GB, and the build)"
t=$(date +%s)
if ! DOCKER_BUILDKIT=0 in_background "$work/build.log" docker build -q -f docker/Dockerfile --build-arg BASE="$base" \
    -t "$image" .; then
  tail -40 "$work/build.log"
  say "the image did not build (the engine's error is above)"
  exit 3
fi
say "built $image in $(( $(date +%s) - t )) s, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.1f GB", $1/1e9}')"
((build_only)) && exit 0

# --- 5. the tests --------------------------------------------------------------
caps=(--cap-add SYS_ADMIN --cap-add NET_ADMIN --security-opt seccomp=unconfined)
if [ "$mode" = nodes ]; then
  say "containers as nodes: tests/e2e/container_nodes_test.py"
  in_background - python3 tests/e2e/container_nodes_test.py --image "$image" --workdir "$work/nodes"
  exit $?
fi
name=ftcomm-test-$$
containers+=("$name")
say "running scripts/test.sh ${test_args[*]} in $name"
in_background - docker run --name "$name" --init "${caps[@]}" "$image" scripts/test.sh "${test_args[@]}"
rc=$?
say "scripts/test.sh ${test_args[*]} exited $rc"
exit "$rc"
