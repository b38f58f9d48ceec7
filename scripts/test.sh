#!/usr/bin/env bash
# The test suite: real multi-process Horovod jobs, plus SLURM and multi-host tests that start
# their own daemons. Run through `make test` (which installs first).
#
# Two passes. The jobs spend much of their time starting interpreters (one import of torch and
# transformers per rank) and waiting on each other, which leaves cores idle, so the first pass
# runs TEST_WORKERS test files at a time (pytest-xdist; default 2, this machine's cores;
# --dist loadfile keeps each file on one worker, and tests/conftest.py puts the longest files
# first; --no-loadscope-reorder keeps that order, which xdist would otherwise replace by the
# number of tests per file). The second runs the tests marked serial alone.
# Extra arguments go to both passes; a pass they select nothing from is skipped (pytest exit 5).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
workers=${TEST_WORKERS:-2}

run_pass() {
    .venv/bin/python -m pytest "$@"
    local status=$?
    [ "$status" -eq 5 ] && return 0  # nothing selected in this pass
    return "$status"
}

status=0
run_pass -n "$workers" --dist loadfile --no-loadscope-reorder -m "not serial" "$@" || status=$?
run_pass -m serial "$@" || status=$?
exit "$status"
