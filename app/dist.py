"""Everything Horovod: start-up, ranks, threads, the optimizer wrapper, parameter averaging
and collectives for metrics. The model, data and loop code never import horovod directly."""
import contextlib
import os
import time
from typing import Iterable, Optional

import horovod.torch as hvd
import torch

from app import cores

# Launchers that start ranks as one MPI job (mpirun, srun with PMI/PMIx) set these.
_MPI_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    # horovodrun --gloo sets its rendezvous address instead; then Gloo runs the collectives.
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ:
        return False
    return any(name in os.environ for name in _MPI_LAUNCH_VARS)


# The start-up variables for the knobs in config.HorovodConfig, with each value's spelling:
# Horovod's own (read by hvd.init) and an OpenMPI MCA parameter (read at MPI_Init, which
# hvd.init or mpi4py's import performs).
_SETTINGS_ENV = {
    "cycle_time_ms": ("HOROVOD_CYCLE_TIME", lambda ms: f"{ms:g}"),
    "fusion_threshold_mb": ("HOROVOD_FUSION_THRESHOLD", lambda mb: str(mb * 2**20)),
    "mpi_yield_when_idle": ("OMPI_MCA_mpi_yield_when_idle", lambda on: "1" if on else "0"),
}


def init(settings=None) -> None:
    """Start Horovod; under an MPI launcher from MPI.COMM_WORLD, so mpi4py and Horovod share one
    world and MPI sub-communicators can become Horovod process sets. `settings` (a
    config.HorovodConfig) fills the start-up variables the environment leaves unset."""
    if hvd.is_initialized():
        return
    for key, (variable, spell) in _SETTINGS_ENV.items():
        value = getattr(settings, key, None)
        if value is not None:
            os.environ.setdefault(variable, spell(value))
    if launched_by_mpi() and hvd.mpi_built():
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)
    else:
        hvd.init()


def settings_in_effect() -> dict:
    """The start-up variables this process ran with (unset: the library's default)."""
    return {variable: os.environ.get(variable, "default") for variable, _ in _SETTINGS_ENV.values()}


def rank() -> int:
    return hvd.rank()


def size() -> int:
    return hvd.size()


def local_rank() -> int:
    return hvd.local_rank()


def is_main() -> bool:
    return hvd.rank() == 0


def controller() -> str:
    return "mpi" if hvd.mpi_enabled() else "gloo"


def place_rank(requested: Optional[int], bind: bool) -> int:
    """Pin this rank to its share of its host's cores (see app/cores.py); return torch's thread
    count. Ranks compare core masks with the others on their host (same cross rank) to tell a
    binding launcher's distinct masks from one shared mask."""
    masks = allgather_object((hvd.cross_rank(), cores.affinity()), name="core_masks")
    on_host = [mask for node, mask in masks if node == hvd.cross_rank()]
    return cores.place(hvd.local_rank(), hvd.local_size(), on_host, requested, bind)


def run_stamp() -> str:
    """One run name for every rank: the SLURM job (so a requeued job finds its run again) or
    rank 0's clock, broadcast."""
    stamp = None
    if is_main():
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if job:
            stamp = f"slurm-{job}" + (f"_{task}" if task else "")
        else:
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return hvd.broadcast_object(stamp, root_rank=0, name="run_stamp")


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, sync_cfg, accum_steps: int):
    """hvd.DistributedOptimizer for gradient averaging; the plain optimizer for local SGD."""
    if not sync_cfg.gradient_allreduce:
        return optimizer
    compression = hvd.Compression.fp16 if sync_cfg.compression == "fp16" else hvd.Compression.none
    op = hvd.Adasum if sync_cfg.op == "adasum" else hvd.Average
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=compression,
        op=op,
        # Hooks count backward passes and allreduce once per optimizer step, not per micro-batch.
        backward_passes_per_step=accum_steps,
    )


def _is_distributed(optimizer) -> bool:
    """True for the averaging wrapper. Adasum's wrapper (marked by its _starting_models) steps
    locally and combines the parameter deltas inside step(), so it has no separate sync phase:
    clipping then applies to each rank's own gradients."""
    return hasattr(optimizer, "skip_synchronize") and not hasattr(optimizer, "_starting_models")


def synchronize_gradients(optimizer) -> None:
    """Wait for the gradient allreduce, so clipping and unscaling see averaged gradients."""
    if _is_distributed(optimizer):
        optimizer.synchronize()


def step_without_sync(optimizer):
    """Context for optimizer.step() after synchronize_gradients (Horovod's documented pattern)."""
    return optimizer.skip_synchronize() if _is_distributed(optimizer) else contextlib.nullcontext()


def broadcast_model_and_optimizer(model: torch.nn.Module, optimizer, resumed: bool) -> None:
    """Make every rank start from rank 0's parameters and, when resuming, its optimizer state.

    A fresh optimizer has no state on any rank, so only parameters need to travel then; we
    avoid hvd.broadcast_optimizer_state there because it initialises state by taking a step
    with zero gradients, which moves Adam's step count and applies weight decay once."""
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if resumed:
        state = hvd.broadcast_object(optimizer.state_dict() if is_main() else None, root_rank=0, name="optim_state")
        optimizer.load_state_dict(state)


def average_parameters(parameters: Iterable[torch.nn.Parameter], backend: str) -> None:
    """Replace every rank's parameters by their mean across ranks, in place."""
    tensors = [p.data for p in parameters]
    if backend == "horovod":
        hvd.grouped_allreduce_(tensors, op=hvd.Average, name="param_average")
        return
    from mpi4py import MPI

    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    flat /= hvd.size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def check_mpi_world() -> None:
    """MPI collectives need every rank in one MPI job, which horovodrun --gloo does not make."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() != hvd.size():
        raise ValueError(
            "sync.param_average_backend=mpi needs an MPI launch (mpirun, srun or horovodrun --mpi); "
            "launch that way, or use sync.param_average_backend=horovod"
        )


def sum_over_ranks(tensor: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allreduce(tensor, op=hvd.Sum, name=name)


def broadcast_object(obj, name: str):
    return hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_object(obj, name: str):
    return hvd.allgather_object(obj, name=name)


def barrier() -> None:
    hvd.barrier()
