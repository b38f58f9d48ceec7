"""The calibration's collectives job: Horovod's allreduce, reducescatter and allgather, and
mpi4py's point-to-point exchange, timed over buffer sizes by the bandwidth bench's sweep; a
rank's resident memory before any model (the planner's process baseline), measured once Horovod
and MPI run and everything the trainer imports is loaded; then, on the same ranks and cycle
time, the spec's layout steps (app/plan/layout_steps.py: tensor parallelism's).

    mpirun -np 2 python -m app.plan.collectives SPEC.json   (python -m app.plan calibrate runs it)
"""
import horovod.torch as hvd
import psutil
import torch
from omegaconf import OmegaConf

from app import dist, fileio, train  # noqa: F401  train: the libraries a training rank loads, in the baseline
from app.bench import bandwidth, launch
from app.plan import layout_steps


def reducescatter(tensor: torch.Tensor, name: str) -> None:
    hvd.reducescatter(tensor, op=hvd.Sum, name=name)


def allgather(tensor: torch.Tensor, name: str) -> None:
    """Each rank brings its share, so the gathered output is the whole buffer."""
    hvd.allgather(tensor[: tensor.numel() // hvd.size()], name=name)


def exchange(comm):
    """A pipeline's traffic between neighbours: ranks in pairs send each other the buffer."""
    peer = hvd.rank() ^ 1

    def send_receive(tensor: torch.Tensor, name: str) -> None:
        received = torch.empty_like(tensor)
        if peer < hvd.size():
            comm.Sendrecv(tensor.numpy(), dest=peer, recvbuf=received.numpy(), source=peer)

    return send_receive


def main() -> None:
    spec = launch.read_spec()
    layouts = layout_steps.configs(spec["layout"]) if spec.get("layout") else []
    # As a training rank starts (its cycle time, MPI's yielding), with the timed layout's mesh.
    dist.init(OmegaConf.create(spec["horovod"]), layouts[0].parallel if layouts else None)
    torch.set_num_threads(spec["threads"])
    from mpi4py import MPI  # after dist.init, which starts MPI under this MPI launch

    baseline = psutil.Process().memory_info().rss

    collectives = {"allreduce": bandwidth.allreduce, "reducescatter": reducescatter, "allgather": allgather,
                   "point_to_point": exchange(MPI.COMM_WORLD)}
    rows = {name: bandwidth.sweep(spec, collective, prefix=name) for name, collective in collectives.items()}
    layout_seconds = layout_steps.timed(layouts, spec["layout"]) if layouts else []
    if dist.is_main():
        fileio.write_json(spec["result"], {"processes": hvd.size(), "rows": rows, "baseline_bytes": baseline,
                                           "layout_seconds_per_step": layout_seconds})


if __name__ == "__main__":
    main()
