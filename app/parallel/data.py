"""Data parallelism over Horovod: every rank holds the whole model and trains on its own slice of
the global batch. Three ways to keep replicas together:

- `DataParallel`: hvd.DistributedOptimizer averages gradients every step (optionally
  fp16-compressed), optionally also averaging the parameters every K steps (`sync=param_average`);
- `Adasum`: each rank steps on its own (clipped) gradients and Horovod combines the updates with
  the Adasum operator;
- `LocalSGD`: ranks step alone and average parameters every K steps.
"""
from typing import Optional

import horovod.torch as hvd
import torch

from app import dist
from app.parallel.averaging import average_parameters, check_mpi_world, mean_state
from app.checkpoint import SavedState
from app.parallel.base import Parallelism, load_model_state


def _compression(sync_cfg):
    return hvd.Compression.fp16 if sync_cfg.compression == "fp16" else hvd.Compression.none


class DataParallel(Parallelism):
    def __init__(self, model: torch.nn.Module, sync_cfg, accum_steps: int, process_set=None):
        super().__init__(model)
        self.sync = sync_cfg
        self.accum_steps = accum_steps
        # The ranks that hold replicas of the same parameters: the world, or under tensor or
        # pipeline parallelism this rank's data-parallel group (dist.process_set("data")).
        self.process_set = process_set or hvd.global_process_set
        if sync_cfg.param_average_every and sync_cfg.param_average_backend == "mpi":
            check_mpi_world()

    def wrap_optimizer(self, optimizer):
        self.optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=self.model.named_parameters(),
            compression=_compression(self.sync),
            op=hvd.Average,
            # Hooks count backward passes and allreduce once per optimizer step, not per micro-batch.
            backward_passes_per_step=self.accum_steps,
            process_set=self.process_set,
        )
        return self.optimizer

    def start(self, saved: Optional[SavedState]) -> None:
        """Rank 0 loads `saved` (if resuming) and every rank takes rank 0's weights and optimizer
        state. A fresh optimizer has no state anywhere, so then only parameters travel:
        hvd.broadcast_optimizer_state would initialise state by a step with zero gradients,
        which moves Adam's step count and applies weight decay once."""
        resuming = dist.broadcast_object(saved is not None, name="resuming")
        if saved is not None:
            load_into(self.model, self.optimizer, saved)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        if resuming:
            state = dist.broadcast_object(self.optimizer.state_dict() if dist.is_main() else None, name="optim_state")
            self.optimizer.load_state_dict(state)

    def sync_gradients(self) -> None:
        # Clipping and unscaling must see the averaged gradients (Horovod's documented pattern).
        self.optimizer.synchronize()

    def optimizer_step(self, scaler) -> None:
        with self.optimizer.skip_synchronize():
            super().optimizer_step(scaler)

    def after_step(self, step: int) -> None:
        every = self.sync.param_average_every
        if every and step % every == 0:
            average_parameters(self.model.parameters(), self.sync.param_average_backend)

    def saved_state(self) -> Optional[SavedState]:
        if not dist.is_main():
            return None
        return SavedState(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), world_size=dist.size())

    def layout(self) -> dict:
        return {**super().layout(), "mode": self.sync.name}


class Adasum(DataParallel):
    """Horovod's Adasum, done here so gradient clipping is real: Horovod's Adasum wrapper steps
    each parameter inside its backward hook, before any clip the loop could apply. Here each rank
    clips its own accumulated gradients, steps locally, and the parameter deltas are combined
    with the Adasum operator (as horovod.torch's _DistributedAdasumOptimizer does, minus the
    overlap with backward)."""

    def __init__(self, model: torch.nn.Module, sync_cfg, accum_steps: int):
        if not hvd.mpi_enabled():
            raise ValueError("sync=adasum needs Horovod's MPI controller on CPU; launch with mpirun, srun or "
                             "horovodrun without --gloo, or use sync=allreduce")
        super().__init__(model, sync_cfg, accum_steps)

    def wrap_optimizer(self, optimizer):
        self.optimizer = optimizer
        return optimizer

    def sync_gradients(self) -> None:
        """Nothing to wait for: Adasum combines updates, not gradients."""

    def optimizer_step(self, scaler) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        Parallelism.optimizer_step(self, scaler)
        deltas = [p.detach() - start for p, start in zip(params, before)]
        combined = hvd.grouped_allreduce(deltas, op=hvd.Adasum, compression=_compression(self.sync),
                                         name="adasum_deltas")
        with torch.no_grad():
            for p, start, delta in zip(params, before, combined):
                p.copy_(start + delta)


class LocalSGD(DataParallel):
    """Ranks step alone and meet every `sync.param_average_every` steps. A checkpoint between
    meetings holds every rank's replica and optimizer state (extra "replicas"), so a resume on
    the same number of ranks continues exactly; its model weights are the replicas' mean, which
    is what export, evaluation and a resume on another number of ranks start from. The run
    ends with a meeting, so the final model is the average whatever max_steps is."""

    def wrap_optimizer(self, optimizer):
        self.optimizer = optimizer
        return optimizer

    def sync_gradients(self) -> None:
        """Nothing to wait for: gradients stay on their rank."""

    def optimizer_step(self, scaler) -> None:
        Parallelism.optimizer_step(self, scaler)

    def start(self, saved: Optional[SavedState]) -> None:
        replicas = dist.broadcast_object(saved.extra.get("replicas") if saved is not None else None,
                                         name="local_sgd_replicas")
        if replicas is None or len(replicas) != dist.size():
            super().start(saved)  # a fresh run, or another world size: all start from the mean
            return
        mine = replicas[dist.rank()]
        load_model_state(self.model, mine["model"])
        self.optimizer.load_state_dict(mine["optimizer"])

    def saved_state(self) -> Optional[SavedState]:
        mine = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}
        replicas = dist.allgather_object(mine, name="local_sgd_replicas_gather")
        mean = mean_state(self.model.state_dict())
        if not dist.is_main():
            return None
        return SavedState(model=mean, optimizer=self.optimizer.state_dict(), extra={"replicas": replicas},
                          world_size=dist.size())

    def finish(self) -> None:
        average_parameters(self.model.parameters(), self.sync.param_average_backend)


def load_into(model: torch.nn.Module, optimizer, saved: SavedState) -> None:
    load_model_state(model, saved.model)
    optimizer.load_state_dict(saved.optimizer)
