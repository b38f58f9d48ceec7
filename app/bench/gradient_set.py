"""A model's gradients as hvd.DistributedOptimizer sends them: one named allreduce_async_ per
parameter, issued in backward order (the last layers' gradients are ready first), then all
waited for. Timed with every rank starting together, so skew between ranks is not counted."""
import statistics
import time
from typing import List, Tuple

import horovod.torch as hvd
import torch

NamedTensors = List[Tuple[str, torch.Tensor]]


def shapes(model: torch.nn.Module) -> List[Tuple[str, List[int]]]:
    """Each parameter's name and shape, in backward order (plain data, to pass to a worker)."""
    return [(name, list(p.shape)) for name, p in reversed(list(model.named_parameters()))]


def like_gradients(named_shapes) -> NamedTensors:
    """Float32 tensors of those shapes (gradients of an autocast model are float32)."""
    return [(name, torch.zeros(shape, dtype=torch.float32)) for name, shape in named_shapes]


def allreduce(tensors: NamedTensors) -> None:
    handles = [hvd.allreduce_async_(t, name=f"allreduce.{name}", op=hvd.Average) for name, t in tensors]
    for handle in handles:
        hvd.synchronize(handle)


def seconds_per_set(tensors: NamedTensors, warmup: int, measured: int) -> List[float]:
    """Each measured set's time, the slowest rank's (a collective ends when its last rank does)."""
    for _ in range(warmup):
        allreduce(tensors)
    times = []
    for _ in range(measured):
        hvd.barrier()
        started = time.perf_counter()
        allreduce(tensors)
        times.append(time.perf_counter() - started)
    return hvd.allreduce(torch.tensor(times, dtype=torch.float64), op=hvd.Max, name="gradient_set_times").tolist()


def summary(tensors: NamedTensors, times: List[float]) -> dict:
    return {
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for _, t in tensors),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "sets": len(times),
    }
