"""The data dimension: how the ranks of one data-parallel set (the whole world, or the ranks that
hold the same pipeline stage and tensor shard) keep their replicas of this rank's part together.

- `Allreduce`: hvd.DistributedOptimizer averages gradients over the set every step (optionally
  fp16-compressed), optionally also averaging the parameters every K steps (`sync=param_average`);
- `Adasum`: each rank steps on its own (clipped) gradients and Horovod combines the updates with
  the Adasum operator;
- `LocalSGD`: ranks step alone and average parameters every K steps;
- ZeRO 1-3 (app/parallel/zero.py): gradients reduce-scattered and the state sharded over the set.

Each works on local names (this rank's module's) and its set alone; the layout
(app/parallel/layout.py) maps them to the whole model through placements.
"""
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import horovod.torch as hvd
import torch

from app import models
from app.parallel.averaging import average_parameters, check_mpi_world, mean_state
from app.parallel.base import held_bytes
from app.state_dicts import by_index, by_name, load_model_state, param_order


def _compression(sync_cfg):
    return hvd.Compression.fp16 if sync_cfg.compression == "fp16" else hvd.Compression.none


class DataSync:
    """Defaults: the set's ranks hold whole replicas of the part and the same gradients."""

    # Each rank holds a slice of the gradients (ZeRO): a global norm sums over the set.
    sharded = False

    def __init__(self, module: torch.nn.Module, sync_cfg, accum_steps: int, process_set):
        self.model, self.sync, self.accum_steps = module, sync_cfg, accum_steps
        self.process_set = process_set
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if sync_cfg.param_average_every and sync_cfg.param_average_backend == "mpi":
            check_mpi_world()

    @property
    def name(self) -> str:
        return self.sync.name

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = optimizer
        return optimizer

    # --- start and checkpoints ----------------------------------------------------------------
    def load(self, model_state: Dict[str, torch.Tensor], named_optimizer: Optional[dict]) -> None:
        """This rank's part of a checkpoint (local names): weights, and the plain optimizer's state."""
        load_model_state(self.model, model_state)
        if named_optimizer is not None:
            self.optimizer.load_state_dict(by_index(named_optimizer, self._order()))

    def local_state(self) -> Optional[tuple]:
        """(weights, by-name plain optimizer state) of this rank's part, by local name (a
        collective of the set where a layout averages its replicas: local SGD)."""
        weights = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        return weights, by_name(self.optimizer.state_dict(), self._order())

    def _order(self) -> List[List[str]]:
        return param_order(self.optimizer, {id(p): n for n, p in self.model.named_parameters()})

    # --- one step -----------------------------------------------------------------------------
    def sync_gradients(self) -> None:
        """Wait until this rank's gradients are the ones the optimizer must apply."""

    def squared_norm(self, counted: Callable[[str], bool]) -> torch.Tensor:
        """The sum of the squares of this rank's gradients whose parameters `counted` names."""
        grads = [p.grad for name, p in self.model.named_parameters() if p.grad is not None and counted(name)]
        device = next(self.model.parameters()).device
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(torch._foreach_norm(grads)).double().square().sum()

    def scale_gradients(self, scale: torch.Tensor) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device, grads[0].dtype))

    def optimizer_step(self, scaler) -> None:
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def after_step(self, step: int) -> None:
        """Called once optimizer step `step` (1-based) is done on every rank: the parameter
        averaging of sync=param_average and local SGD's meetings."""
        every = self.sync.param_average_every
        if every and step % every == 0:
            average_parameters(self.model.parameters(), self.sync.param_average_backend, self.process_set)

    # --- the end --------------------------------------------------------------------------------
    def finish(self) -> None:
        """Called once after the last step, before the final checkpoint."""

    @contextmanager
    def whole_part(self):
        """This rank's part with every parameter present (ZeRO-3 gathers them)."""
        yield self.model

    def checksum(self) -> str:
        return models.parameter_checksum(self.model)

    def state_bytes(self) -> Dict[str, int]:
        return held_bytes(list(self.model.parameters()), self.optimizer)

    def describe(self) -> dict:
        return {"sync": self.name}


class Allreduce(DataSync):
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

    def sync_gradients(self) -> None:
        # Clipping and unscaling must see the averaged gradients (Horovod's documented pattern).
        self.optimizer.synchronize()

    def optimizer_step(self, scaler) -> None:
        with self.optimizer.skip_synchronize():
            super().optimizer_step(scaler)



class Adasum(DataSync):
    """Horovod's Adasum, done here so gradient clipping is real: Horovod's Adasum wrapper steps
    each parameter inside its backward hook, before any clip the loop could apply. Here each rank
    clips its own accumulated gradients, steps locally, and the parameter deltas are combined
    with the Adasum operator (as horovod.torch's _DistributedAdasumOptimizer does, minus the
    overlap with backward)."""

    def __init__(self, *args, **kwargs):
        if not hvd.mpi_enabled():
            raise ValueError("sync=adasum needs Horovod's MPI controller on CPU; launch with mpirun, srun or "
                             "horovodrun without --gloo, or use sync=allreduce")
        super().__init__(*args, **kwargs)

    def optimizer_step(self, scaler) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        super().optimizer_step(scaler)
        deltas = [p.detach() - start for p, start in zip(params, before)]
        combined = hvd.grouped_allreduce(deltas, op=hvd.Adasum, compression=_compression(self.sync),
                                         name="adasum_deltas", process_set=self.process_set)
        with torch.no_grad():
            for p, start, delta in zip(params, before, combined):
                p.copy_(start + delta)


class LocalSGD(DataSync):
    """Ranks step alone and meet every `sync.param_average_every` steps. A checkpoint between
    meetings holds its model weights as the replicas' mean, which is what export, evaluation and a
    resume on another layout start from; `replicas()` and `load_replica` carry each rank's own
    replica and optimizer state for a resume on the same layout, which continues exactly. The
    run ends with a meeting, so the final model is the average whatever max_steps is."""

    def local_state(self):
        """The replicas' mean weights (a collective of the set) with this rank's optimizer state."""
        weights, optimizer = super().local_state()
        return mean_state(weights, self.process_set), optimizer

    def replica(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_replica(self, replica: dict) -> None:
        load_model_state(self.model, replica["model"])
        self.optimizer.load_state_dict(replica["optimizer"])

    def finish(self) -> None:
        average_parameters(self.model.parameters(), self.sync.param_average_backend, self.process_set)


def build(module: torch.nn.Module, sync_cfg, accum_steps: int, process_set) -> DataSync:
    if not sync_cfg.gradient_allreduce:
        return LocalSGD(module, sync_cfg, accum_steps, process_set)
    if sync_cfg.op == "adasum":
        return Adasum(module, sync_cfg, accum_steps, process_set)
    return Allreduce(module, sync_cfg, accum_steps, process_set)

