"""Which cores a rank's threads run on.

Ranks that a launcher bound (mpirun --bind-to core, srun --cpu-bind) hold core masks of their
own and keep them. Ranks that share one mask (horovodrun never binds) split it: each takes an
equal share and, with train.bind_cores, is pinned to it, so its compute thread and Horovod's
communication threads stay on one core's caches instead of being moved between cores by the
scheduler. Two llama_small ranks on 2 cores ran 5% faster pinned (README, "Measured here").
A rank alone on its host is never pinned: a second job started there would share its cores."""
import os
from typing import List, Optional


def affinity() -> List[int]:
    return sorted(os.sched_getaffinity(0))


_launch_mask: Optional[List[int]] = None


def launch_affinity() -> List[int]:
    """The cores the launcher gave this process, before place() narrowed them: an elastic reset
    places the rank again, on a host whose number of ranks may have changed."""
    global _launch_mask
    if _launch_mask is None:
        _launch_mask = affinity()
    return _launch_mask


def place(local_rank: int, local_size: int, masks_on_host: List[List[int]], requested: Optional[int],
          bind: bool) -> int:
    """Pin every thread of this process to its share of the host's cores (when bind, and no
    launcher did) and return how many threads torch should run."""
    mask = launch_affinity()
    if any(other != mask for other in masks_on_host):
        return requested or len(mask)
    threads = requested or max(1, len(mask) // local_size)
    share = mask
    if bind and local_size > 1 and threads * local_size <= len(mask):
        share = mask[local_rank * threads:(local_rank + 1) * threads]
    if share != affinity():  # also a rank placed before a reset left it alone on its host
        # sched_setaffinity binds one thread; Horovod's and Gloo's threads already run.
        for task in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(task), share)
    return threads
