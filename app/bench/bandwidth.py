"""Allreduce bus bandwidth over message sizes through Horovod, under whichever launcher started
the ranks (horovodrun --gloo: Gloo over TCP; mpirun: MPI), defined as nccl-tests does:
algbw = bytes / time, busbw = algbw * 2(n-1)/n (the bytes each rank's links carry in a ring
allreduce, so busbw is comparable across process counts and with link speeds).

    horovodrun -np 2 -H localhost:2 --gloo python -m app.bench.bandwidth SPEC.json
    mpirun -np 2 python -m app.bench.bandwidth SPEC.json
"""
import math
import time
from typing import Callable, List

import horovod.torch as hvd
import torch

from app import dist, fileio
from app.bench import launch

BYTES_PER_ELEMENT = 4  # float32 messages


def message_sizes(min_bytes: int, max_bytes: int, factor: int) -> List[int]:
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def bus_bandwidth(algbw: float, processes: int) -> float:
    return algbw * 2 * (processes - 1) / processes


def _slowest(seconds: float, name: str) -> float:
    return hvd.allreduce(torch.tensor([seconds], dtype=torch.float64), op=hvd.Max, name=name).item()


def allreduce(tensor: torch.Tensor, name: str) -> None:
    hvd.allreduce_(tensor, op=hvd.Sum, name=name)


def sweep(spec: dict, collective: Callable[[torch.Tensor, str], None] = allreduce, prefix: str = "bandwidth"
          ) -> List[dict]:
    """Seconds per call of `collective` on a float32 buffer of each of spec's sizes (the slowest
    rank's); the planner's calibration passes its other collectives."""
    processes = hvd.size()
    rows = []
    for size in spec["sizes"]:
        # Zeros stay zeros under Sum, so repeated allreduces never overflow into inf.
        tensor = torch.zeros(size // BYTES_PER_ELEMENT, dtype=torch.float32)
        name = f"{prefix}.{size}"
        iterations = spec["min_iterations"]
        if spec["warmup_iterations"]:
            started = time.perf_counter()
            for _ in range(spec["warmup_iterations"]):
                collective(tensor, name)
            probe = _slowest((time.perf_counter() - started) / spec["warmup_iterations"], f"{name}.probe")
            # Every rank derives the count from the same (allreduced) probe, so all agree on it.
            wanted = math.ceil(spec["seconds_per_size"] / max(probe, 1e-9))
            iterations = min(spec["max_iterations"], max(spec["min_iterations"], wanted))
        hvd.barrier()
        started = time.perf_counter()
        for _ in range(iterations):
            collective(tensor, name)
        seconds = _slowest((time.perf_counter() - started) / iterations, f"{name}.time")
        algbw = size / seconds / 1e9
        rows.append({"bytes": size, "iterations": iterations, "time_s": seconds,
                     "algbw_gbps": algbw, "busbw_gbps": bus_bandwidth(algbw, processes)})
    return rows


def main() -> None:
    spec = launch.read_spec()
    dist.init()
    torch.set_num_threads(spec["threads"])
    rows = sweep(spec)
    if dist.is_main():
        fileio.write_json(spec["result"], {"processes": dist.size(), "controller": dist.controller(), "rows": rows})


def measure(ctx, log=print) -> dict:
    bc = ctx.bench.bandwidth
    spec = {
        "sizes": message_sizes(bc.min_bytes, bc.max_bytes, bc.size_factor), "threads": ctx.threads_per_process,
        "warmup_iterations": bc.warmup_iterations, "min_iterations": bc.min_iterations,
        "max_iterations": bc.max_iterations, "seconds_per_size": bc.seconds_per_size,
    }
    results = {}
    for launcher in bc.launchers:
        log(f"bench: allreduce bandwidth under {launcher}, {ctx.max_processes} processes")
        results[launcher] = launch.run_worker("app.bench.bandwidth", spec, ctx.work_dir / f"bandwidth-{launcher}",
                                              launcher, ctx.max_processes, ctx.bench)
    return {"processes": ctx.max_processes, "launchers": results}


if __name__ == "__main__":
    main()
