#!/usr/bin/env bash
# The test suite: real multi-process Horovod jobs, plus SLURM and multi-host tests that start
# their own daemons. Run through `make test` (which installs first).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec .venv/bin/python -m pytest "$@"
