#!/usr/bin/env bash
# Builds the image from the Dockerfile and runs it for real: the default command (the 2-rank
# smoke run), then the same run with a mounted work directory whose summary.json is checked
# (2 ranks, parameters identical on both). Prints every command it runs, and the build time,
# image size and smoke run time.
#
#   scripts/container_test.sh                 # what `make image` runs
#   scripts/container_test.sh --no-build      # run an image built before (the test suite does)
#
# Options: --no-build; --image NAME (llama-horovod); --workdir DIR (the directory mounted at
# /workspace for the second run; default: a new temporary one).
# Environment: CONTAINER_ENGINE (docker or podman; default: docker when its daemon answers, else
# podman, installed with runc and debootstrap when missing), BASE_IMAGE (debian:bookworm-slim),
# TORCH_INDEX_URL and HOROVOD_GPU_OPERATIONS (passed to the build as install.sh reads them).
#
# The build gets the host's pip set-up, so pip in it reaches the package index as pip here does:
# the CA bundle pip trusts (a build secret), the rest of pip's effective configuration (a build
# secret), and, under podman, the local directories that configuration names (read-only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=llama-horovod
BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
# The Dockerfile's CMD; the second run passes it explicitly to name its work directory.
SMOKE_ARGS=(-np 2 experiment=smoke)
EXPECTED_RANKS=2
# The image's user (Dockerfile: USER 1000:1000) must be able to write the mounted directory.
IMAGE_UID=1000

die() { echo "container_test.sh: $*" >&2; exit 2; }
say() { printf '[container] %s\n' "$*"; }
# Every command is printed shell-quoted before it runs, so it can be pasted back into a shell;
# to the script's own stderr (fd 3), also for a command whose output goes to a log.
exec 3>&2
run() { printf '+%s\n' "$(printf ' %q' "$@")" >&3; "$@"; }

build=1 workdir=""
while (($#)); do
    case $1 in
        --no-build) build=0; shift ;;
        --image) [ $# -ge 2 ] || die "--image needs a name"; IMAGE=$2; shift 2 ;;
        --workdir) [ $# -ge 2 ] || die "--workdir needs a directory"; workdir=$2; shift 2 ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

docker_answers() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

pick_engine() {
    case ${CONTAINER_ENGINE:-} in
        docker) docker_answers || die "CONTAINER_ENGINE=docker but the Docker daemon does not answer: start it (or unset CONTAINER_ENGINE to use podman)"; echo docker ;;
        podman) command -v podman >/dev/null || die "CONTAINER_ENGINE=podman but podman is not installed: apt-get install podman runc debootstrap"; echo podman ;;
        "") if docker_answers; then echo docker; else echo podman; fi ;;
        *) die "CONTAINER_ENGINE must be docker or podman, not '$CONTAINER_ENGINE'" ;;
    esac
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ENGINE=$(pick_engine)
engine=("$ENGINE")
if [ "$ENGINE" = podman ]; then
    if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
        ((build)) || die "no container engine: start Docker's daemon, or install podman (apt-get install podman runc debootstrap)"
        command -v apt-get >/dev/null || die "no container engine and no apt-get: start Docker's daemon or install podman and runc"
        # shellcheck source=scripts/apt.sh
        source "$ROOT/scripts/apt.sh"
        apt_install_missing container podman runc debootstrap
    fi
    # crun fails on this kind of machine's cgroups where runc works, and without systemd the
    # cgroups are podman's to manage. A machine that refuses setrlimit needs podman's default
    # ulimits emptied; a containers.conf the caller chose is left alone.
    engine+=(--runtime runc --cgroup-manager=cgroupfs)
    if [ -z "${CONTAINERS_CONF:-}" ]; then
        CONTAINERS_CONF=$tmp/containers.conf
        printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_CONF"
        export CONTAINERS_CONF
        say "CONTAINERS_CONF=$CONTAINERS_CONF: $(tr '\n' ' ' <"$CONTAINERS_CONF")"
    fi
fi

# podman has no registry to pull from on a machine like ours, so it makes the Debian base from
# Debian's package archive instead: the same release as debian:bookworm-slim, a larger image.
ensure_base_image() {
    [ "$ENGINE" = podman ] || return 0
    podman image exists "$BASE_IMAGE" && return 0
    [ "$BASE_IMAGE" = debian:bookworm-slim ] \
        || die "base image $BASE_IMAGE is not in podman's store: podman pull or podman import it first"
    command -v debootstrap >/dev/null || die "debootstrap is missing to make $BASE_IMAGE: apt-get install debootstrap"
    say "making $BASE_IMAGE with debootstrap (about half a minute)"
    run debootstrap --variant=minbase bookworm "$tmp/rootfs" >"$tmp/debootstrap.log" \
        || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # As in the registry's slim image: no package archives or lists (each stage runs apt-get update).
    run find "$tmp/rootfs/var/cache/apt" "$tmp/rootfs/var/lib/apt/lists" -type f -delete
    # shellcheck disable=SC2016  # a pipe, printed as it runs
    printf '+ tar -C %q -c . | podman import - %q\n' "$tmp/rootfs" "$BASE_IMAGE" >&3
    tar -C "$tmp/rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
    rm -rf "$tmp/rootfs"
}

# The host's pip set-up as build options: the CA bundle pip trusts becomes the ca-bundle secret;
# the rest of pip's effective configuration (`pip config list`: its files and PIP_* variables)
# becomes the pip-conf secret; under podman, the local paths it names are mounted read-only at
# the same place (a file:// index from its root, since its pages link to ../../files/).
pip_build_options() {
    python3 -m pip --version >/dev/null 2>&1 || return 0
    python3 - "$ENGINE" "$tmp/pip.conf" <<'EOF'
import configparser, os, subprocess, sys

engine, pip_conf = sys.argv[1:]
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
files, variables = {}, {}
for line in listing.splitlines():
    name, _, value = line.partition("=")
    section, _, key = name.rpartition(".")
    if section == ":env:":
        variables[key] = value.strip("'")
    else:
        files.setdefault(section, {})[key] = value.strip("'")
# A PIP_* variable wins over every file's setting of the same option, as in pip.
for options in files.values():
    for key in variables:
        options.pop(key, None)
files.setdefault("global", {}).update(variables)

def local_paths(value):
    for word in value.split():
        path = word.removeprefix("file://")
        if path.startswith("/") and os.path.exists(path):
            yield os.path.dirname(path) if os.path.basename(path) == "simple" else path

mounts = set()
for section, options in files.items():
    for key, value in list(options.items()):
        if key == "cert":
            if not os.access(value, os.R_OK):
                sys.exit(f"container_test.sh: pip's CA bundle {value} is not readable: fix pip's cert setting or PIP_CERT")
            print(f"--secret=id=ca-bundle,src={value}")
            del options[key]
        elif paths := set(local_paths(value)):
            if engine == "docker":
                print(f"[container] pip's {section}.{key} names host paths, which docker build cannot mount: "
                      f"left out ({value})", file=sys.stderr)
                del options[key]
            mounts |= paths
config = configparser.ConfigParser(interpolation=None)
config.read_dict({section: options for section, options in files.items() if options})
if config.sections():
    with open(pip_conf, "w") as file:
        config.write(file)
    settings = "; ".join(f"[{s}] " + ", ".join(f"{k} = {v}" for k, v in config[s].items()) for s in config.sections())
    print(f"[container] pip configuration for the build: {settings}", file=sys.stderr)
    print(f"--secret=id=pip-conf,src={pip_conf}")
if engine == "podman":
    for path in sorted(mounts):
        print(f"--volume={path}:{path}:ro")
EOF
}

build_image() {
    ensure_base_image
    local options=()
    # Through a file, not a process substitution, so that its die stops the script.
    pip_build_options >"$tmp/build-options"
    mapfile -t options <"$tmp/build-options"
    local command=("${engine[@]}" build --network host --tag "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE"
        --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" --build-arg "HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-}"
        "${options[@]}" "$ROOT")
    # Secrets need BuildKit under docker; podman's build has them built in.
    [ "$ENGINE" = podman ] || export DOCKER_BUILDKIT=1
    local start=$SECONDS
    run "${command[@]}"
    build_s=$((SECONDS - start))
}

image_exists() {
    if [ "$ENGINE" = podman ]; then podman image exists "$IMAGE"; else docker image inspect "$IMAGE" >/dev/null 2>&1; fi
}

if ((build)); then
    build_image
else
    image_exists || die "image $IMAGE is not built: run make image (or scripts/container_test.sh without --no-build)"
fi

size_bytes=$("${engine[@]}" image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE: $((size_bytes / 1000000)) MB"

# The runtime image must run as a user and carry no compilers (they stay in the build stage).
# shellcheck disable=SC2016  # expanded by the container's shell
user_and_compilers=$(run "${engine[@]}" run --rm --network host --entrypoint /bin/sh "$IMAGE" \
    -c 'id -u; for c in cc gcc g++ c++ cmake make; do command -v "$c" || true; done')
[ "$(head -1 <<<"$user_and_compilers")" != 0 ] || die "the image runs as root; the Dockerfile's USER must be a user"
compilers=$(tail -n +2 <<<"$user_and_compilers")
[ -z "$compilers" ] || die "the runtime image has compilers or build tools: $(tr '\n' ' ' <<<"$compilers")"
say "runs as uid $(head -1 <<<"$user_and_compilers"), no compilers"

# 1. The default command: the image's own 2-rank smoke run.
start=$SECONDS
run "${engine[@]}" run --rm --network host "$IMAGE" 2>&1 | tee "$tmp/smoke.log"
smoke_s=$((SECONDS - start))
grep -q "parameters identical on all $EXPECTED_RANKS ranks holding the same part: True" "$tmp/smoke.log" \
    || die "the default command's smoke run did not end with parameters identical on $EXPECTED_RANKS ranks (log above)"

# 2. The same run with a work directory from the host: its summary.json lands there.
if [ -z "$workdir" ]; then workdir=$tmp/work; fi
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
if [ "$(id -u)" -eq 0 ]; then chown "$IMAGE_UID:$IMAGE_UID" "$workdir"; else chmod a+rwx "$workdir"; fi
run "${engine[@]}" run --rm --network host --volume "$workdir:/workspace" "$IMAGE" \
    "${SMOKE_ARGS[@]}" hydra.run.dir=runs/container-test >"$tmp/work.log" 2>&1 \
    || { tail -40 "$tmp/work.log" >&2; die "the run with $workdir mounted at /workspace failed (log above)"; }
summary=$workdir/runs/container-test/summary.json
[ -f "$summary" ] || die "the run with a mounted work directory wrote no $summary"
python3 - "$summary" "$EXPECTED_RANKS" <<'EOF' || die "$summary is not a $EXPECTED_RANKS-rank run with identical parameters"
import json, sys
summary, ranks = json.load(open(sys.argv[1])), int(sys.argv[2])
print(f"[container] {sys.argv[1]}: world_size {summary['world_size']}, {len(summary['replicas'])} replicas, "
      f"replicas_identical {summary['replicas_identical']}, step {summary['step']}")
sys.exit(not (summary["world_size"] == ranks == len(summary["replicas"]) and summary["replicas_identical"] is True))
EOF

say "passed: engine $ENGINE, image $IMAGE $((size_bytes / 1000000)) MB${build_s:+, build ${build_s} s}, smoke run ${smoke_s} s"
