"""SIGTERM or SIGUSR1 (what SLURM sends before a time limit) asks for a checkpoint and a clean
exit. The handler is installed before anything else runs, so a signal during data preparation,
model build or the peak measurement still ends in a checkpoint, not a dead rank."""
import signal

import torch

from app import dist

_requested = False


def _handle(_signum, _frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _handle)


def agreed() -> bool:
    """True on every rank if any rank was signalled, so all ranks stop at the same step."""
    flag = torch.tensor([1.0 if _requested else 0.0])
    return bool(dist.sum_over_ranks(flag, name="stop_request").item() > 0)
