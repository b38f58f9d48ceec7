"""The malloc a rank runs under: glibc's, or jemalloc preloaded (train.allocator).

ZeRO frees a layer's gathered parameters, flat gradients and collective buffers within every
step. glibc either keeps such blocks (its heap then grows by what sharding saved) or, told to
return them (app/runtime.py), unmaps and faults them in again on each reuse. jemalloc reuses
freed blocks within a step and returns pages idle for ~10 s, so it has both: on llama_125m
over 2 ranks, stage 3 held what it held under glibc returning memory at 25% more tokens/s
(README, ZeRO). A malloc is chosen when the process starts: a rank that
wants jemalloc and runs without it re-executes itself with LD_PRELOAD, before Horovod or MPI
start (same pid, so launchers and MPI see one process), as torch.backends.xeon.run_cpu and
Intel's ipexrun preload it."""
import ctypes.util
import os
import sys
from typing import List

from app import cli, config

JEMALLOC = "jemalloc"
# Set on the re-executed process: if jemalloc still is not loaded, do not try again.
_REEXECUTED = "LLAMA_HOROVOD_PRELOADED"


def active() -> str:
    """The malloc this process runs: jemalloc if its library is mapped, else glibc's."""
    with open("/proc/self/maps") as maps:
        return JEMALLOC if any("libjemalloc" in line for line in maps) else "glibc"


def ensure(cfg) -> None:
    """Re-execute this process under jemalloc if cfg wants it and it is missing. Call before
    Horovod starts. An explicit train.allocator=jemalloc that is not installed is an error; the
    default falls back to glibc (train() logs which malloc runs)."""
    if config.allocator(cfg) != JEMALLOC or active() == JEMALLOC or os.environ.get(_REEXECUTED):
        return
    library = ctypes.util.find_library(JEMALLOC)
    if library is None:
        if cfg.train.allocator == JEMALLOC:
            cli.fail("train.allocator=jemalloc but libjemalloc is not installed; apt-get install libjemalloc2, "
                     "or set train.allocator=glibc")
        return
    env = dict(os.environ, **{_REEXECUTED: "1"})
    env["LD_PRELOAD"] = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def ensure_at_launch(argv: List[str]) -> None:
    """ensure() for `python -m app.train argv`, called before the trainer's imports (torch,
    transformers, Horovod: seconds of CPU a rank) so that a rank re-executing itself pays them
    once. Under parallel.auto the planner's pick decides the layout, so main() decides then."""
    startup = cli.startup_config(argv)
    if not startup.parallel.auto:
        ensure(startup)
