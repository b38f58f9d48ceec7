"""Parameter averaging across ranks, over Horovod's allreduce or MPI's (the seeds' parameter
averaging; local SGD's meetings)."""
from typing import Dict, Iterable, List

import horovod.torch as hvd
import torch

from app import dist


def _mpi():
    # Imported only when MPI is wanted: importing mpi4py initialises MPI, which a Gloo launch must
    # not do behind Horovod's back.
    from mpi4py import MPI

    return MPI


def check_mpi_world() -> None:
    """MPI collectives need every rank in one MPI job, which horovodrun --gloo does not make."""
    MPI = _mpi()
    if MPI.COMM_WORLD.Get_size() != hvd.size():
        raise ValueError(
            "sync.param_average_backend=mpi needs an MPI launch (mpirun, srun or horovodrun --mpi); "
            "launch that way, or use sync.param_average_backend=horovod"
        )


def _average_in_place(tensors: List[torch.Tensor], backend: str, name: str, process_set) -> None:
    if backend == "horovod":
        hvd.grouped_allreduce_(tensors, op=hvd.Average, name=name, process_set=process_set)
        return
    # One flat fp32 buffer: one MPI call, and a dtype MPI reduces everywhere.
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    MPI = _mpi()
    # The data-parallel set's communicator under a tensor or pipeline layout, else the world.
    comm = dist.mpi_communicator("data") or MPI.COMM_WORLD
    comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    flat /= comm.Get_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_parameters(parameters: Iterable[torch.nn.Parameter], backend: str,
                       process_set=hvd.global_process_set) -> None:
    """Replace every rank's parameters by their mean across the set's ranks, in place."""
    with torch.no_grad():
        _average_in_place([p.data for p in parameters], backend, "param_average", process_set)


def mean_state(state: Dict[str, torch.Tensor], process_set=hvd.global_process_set) -> Dict[str, torch.Tensor]:
    """The mean across the set's ranks of a state dict, leaving the ranks' own tensors as they are."""
    copies = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
    hvd.grouped_allreduce_(list(copies.values()), op=hvd.Average, name="mean_state", process_set=process_set)
    return {k: copies.get(k, v) for k, v in state.items()}
