"""A layout is a composition along the mesh (app/mesh.py), not a class per combination:

- the part (app/parallel/model_part.py): this rank's pipeline stage, its tensors split across the
  tensor set, and each parameter's placement;
- the data dimension (app/parallel/data.py, app/parallel/zero.py): how the data set's ranks keep
  their replicas of the part together: allreduce, fp16 compression, Adasum, local SGD /
  parameter averaging, or ZeRO 1-3;
- the schedule: the plain forward and backward of every micro-batch, or a pipeline's
  (app/parallel/pipeline.py);
- under a pipeline of a tied model, the tied weight's gradient summed between its ends
  (app/parallel/tied.py).

`Layout` is the one object the loop and the step talk to (app/parallel/base.py); it reaches the
whole model only through placements: the global gradient norm, the fp16 overflow flag,
checkpoints (each rank writes its counted boxes, under ZeRO the flat ranges of its slices, and
reads its own boxes of any layout's) and the whole model rebuilt for evaluation and the closing
sample (at data-only ZeRO-3, the sharded model run layer by layer instead).
"""
import socket
from contextlib import contextmanager
from typing import Dict, Optional

import horovod.torch as hvd
import numpy as np
import torch

from app import dist
from app.parallel.base import Parallelism
from app.parallel.data import DataSync, LocalSGD
from app.parallel.model_part import ModelPart
from app.parallel.placement import assemble
from app.parallel.tied import TiedEmbedding
from app.sharded_checkpoint import Shard, shard_of
from app.state_dicts import full_model_order, load_model_state


class Layout(Parallelism):
    def __init__(self, part: ModelPart, data: DataSync, schedule=None, tied: Optional[TiedEmbedding] = None):
        super().__init__(part.module)
        self.part, self.data, self.schedule, self.tied = part, data, schedule, tied
        self.mesh, self.coordinates = part.mesh, part.coordinates
        # Where each rank runs, for the summary of a split layout (no collective otherwise: an
        # elastic run may have none before its loop).
        self.hosts = None if part.is_whole else dist.allgather_object(socket.gethostname(), name="layout_hosts")

    @property
    def name(self) -> str:
        if self.schedule is not None:
            return f"pipeline_{self.schedule.schedule}"
        return "tensor" if self.part.tensor_group is not None else self.data.name

    @property
    def timeline(self):
        return self.schedule.timeline if self.schedule is not None else []

    # --- set-up ------------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = self.data.wrap_optimizer(optimizer)
        return self.optimizer

    def start(self, reader) -> None:
        """Fresh: nothing to send, every rank built the same weights (per-tensor seeded draws,
        app/initialization.py, or the same model.init_from files). Resuming: each rank reads its
        own boxes of the weights and of the plain optimizer's state from the checkpoint `reader`
        (app.checkpoint.Reader), whatever layout wrote it; local SGD's per-rank replicas, saved
        by the same layout on as many ranks, continue exactly."""
        if reader is None:
            return
        # Read as the data dimension asks: a ZeRO rank keeps its slices of one tensor at a time.
        placements = self.part.placements
        self.data.load(reader.weight_boxes(placements),
                       {"state": reader.state_boxes(placements), "groups": reader.groups})
        replicas = reader.extras().get("replicas") if isinstance(self.data, LocalSGD) else None
        if replicas is not None and len(replicas) == dist.size():
            self.data.load_replica(replicas[dist.rank()])

    # --- one step ----------------------------------------------------------------------------
    def forward_backward(self, loss_of, batches, precision_ctx, scaler, timer) -> torch.Tensor:
        if self.schedule is not None:
            return self.schedule.forward_backward(loss_of, batches, precision_ctx, scaler, timer)
        return super().forward_backward(loss_of, batches, precision_ctx, scaler, timer)

    def sync_gradients(self) -> None:
        self.data.sync_gradients()
        if self.tied is not None:  # after the data set's average: the ends add averaged gradients
            self.tied.sum_gradients()

    def _sum_over_model(self, value: torch.Tensor, op=hvd.Sum) -> torch.Tensor:
        """`value` (a scalar) summed, or maxed, over the ranks that hold the other parts of one
        model copy: the tensor set, the pipeline, and under ZeRO the data set's slices."""
        if self.part.tensor_group is not None:
            value = self.part.tensor_group.allreduce(value, "model_sum" if op == hvd.Sum else "model_max", op=op)
        if self.schedule is not None:
            wire = np.array([float(value)])
            self.schedule.comm.Allreduce(dist.mpi_in_place(), wire, op=dist.mpi_op("sum" if op == hvd.Sum else "max"))
            value = torch.tensor(wire[0], dtype=value.dtype, device=value.device)
        if self.data.sharded:
            value = hvd.allreduce(value.reshape(1), op=op, name="layout.data_sum" if op == hvd.Sum else
                                  "layout.data_max", process_set=self.data.process_set)[0]
        return value

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ over the whole model: every box's squares counted once (a
        box the tensor set replicates on its first rank; ZeRO's slices each on their owner),
        summed over the ranks holding the rest of the model."""
        squares = self.data.squared_norm(self.part.counted_in_model)
        total = self._sum_over_model(squares).sqrt().float()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self.data.scale_gradients(scale)
        return total

    def unscale_gradients(self, scaler) -> None:
        """fp16: unscale, then agree on overflow over the ranks holding the model's other parts.
        Each rank checks only its own gradients, so an inf in one shard or stage would make that
        rank alone skip the step and the copies would part for good. As Megatron reduces its
        found-inf flag over the model-parallel group (and torch's ShardedGradScaler over its
        shards), the flag becomes their maximum before scaler.step and scaler.update read it."""
        scaler.unscale_(self.optimizer)
        if self.part.is_whole and not self.data.sharded:
            return
        # GradScaler keeps the flags, one per device, in its per-optimizer state only.
        found = list(scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values())
        flag = torch.stack([f.to(found[0].device) for f in found]).amax()
        agreed = self._sum_over_model(flag, op=hvd.Max)
        for f in found:
            f.copy_(agreed)

    def optimizer_step(self, scaler) -> None:
        self.data.optimizer_step(scaler)

    def after_step(self, step: int) -> None:
        self.data.after_step(step)

    # --- checkpoints and the end ---------------------------------------------------------------
    def checkpoint_shard(self) -> Optional[Shard]:
        """This rank's share of a checkpoint, which it writes itself: under ZeRO every rank's
        flat ranges of its counted boxes (no collective); otherwise, collective, each data set's
        first rank its counted boxes of the weights and of the plain optimizer's state (global
        names). Rank 0 also gets the optimizer's parameter order and local SGD's replicas. None
        on a rank with nothing to write."""
        main = dist.is_main()
        order = full_model_order(self.part.whole) if main else None
        if self.data.sharded:
            weights, optimizer, groups = self.data.own_slices(self.part.placements)
            return shard_of(weights, optimizer, groups, order=order)
        local = self.data.local_state()  # every rank of the set takes part; its first rank keeps it
        replicas = None
        if isinstance(self.data, LocalSGD):
            replicas = dist.allgather_object(self.data.replica(), name="local_sgd_replicas_gather")
        if self.part.is_whole:
            # Every rank holds the whole model: rank 0's own copy, whatever its coordinates were
            # (an elastic world's rank 0 may be any process of the first world).
            pieces = self.part.pieces(*local, every_box=True) if main else None
        else:
            pieces = self.part.pieces(*local) if local is not None else None
        if pieces is None:
            return None
        return shard_of(pieces["model"], pieces["optimizer"], pieces["groups"], order=order,
                        extra={"replicas": replicas} if main and replicas is not None else {})

    def finish(self) -> None:
        self.data.finish()

    @contextmanager
    def full_model(self):
        """The whole model, usable as a plain one, on every rank for as long as it is used (the
        closing sample): the part itself where it is the whole model, else a plain copy built on
        the meta device (no weight initialised, the RNG untouched) and filled with every rank's
        boxes."""
        with self.data.whole_part() as part:
            if self.part.is_whole:
                yield part
                return
            local = {name: p.detach() for name, p in part.named_parameters()}
            mine = [(self.part.placements[n], t) for n, t in local.items()
                    if self.part.placements[n].counted(self.coordinates)]
            gathered = dist.allgather_object(mine, name="layout_full_model")
        whole = assemble(piece for rank in gathered for piece in rank)
        device = next(self.model.parameters()).device
        with torch.device("meta"):
            plain = type(self.part.whole)(self.part.whole.config)
        plain.to_empty(device=device)
        plain.tie_weights()  # to_empty gives the tied head a storage of its own
        load_model_state(plain, whole)
        # Buffers outside the state dict (the rotary inverse frequencies) are the same on every rank.
        for name, buffer in self.model.named_buffers():
            plain.get_buffer(_plain_buffer_name(name, plain)).copy_(buffer)
        yield plain.train(self.model.training)

    @property
    def layer_by_layer(self) -> bool:
        """Data-only ZeRO-3: the sharded model itself evaluates and samples, its hooks gathering
        one layer at a time in each forward, as in training; no rank holds the whole model."""
        return self.part.is_whole and getattr(self.data, "reshards", False)

    @contextmanager
    def sampling_model(self):
        """What the closing sample runs on: layer by layer at data-only ZeRO-3, where each forward
        gathers, a collective of the data set, so every rank must generate the same sample (the
        same seed: the same tokens, as many forwards); otherwise the whole model."""
        if self.layer_by_layer:
            yield self.model
            return
        with super().sampling_model() as model:
            yield model

    @contextmanager
    def evaluation_model(self):
        """Under tensor parallelism alone the split model itself, whose vocabulary-parallel loss
        is the whole model's: the ranks of a tensor set evaluate one share (their data position)
        together. At data-only ZeRO-3 the sharded model, layer by layer; its gathers are
        collectives, so every rank runs the same forwards: all evaluate every batch, one share
        together (a share is counted by each rank computing it, which scales both sums of a mean
        alike). Otherwise the whole model, each rank a share of its own."""
        if self.layer_by_layer:
            yield self.model, (0, 1)
            return
        if self.schedule is None and self.part.tensor_group is not None:
            with self.data.whole_part() as part:
                yield part, dist.data_position()
            return
        with self.full_model() as model:
            yield model, (dist.rank(), dist.size())

    def parameter_checksum(self) -> str:
        return self.data.checksum()

    def counts_tokens(self) -> bool:
        # The ranks of one pipeline and tensor set all read the same batch: one of them counts it.
        return self.coordinates["pipeline"] == 0 and self.coordinates["tensor"] == 0

    def replica_group(self) -> int:
        return self.coordinates["pipeline"] * self.mesh.tensor + self.coordinates["tensor"]

    def state_bytes(self) -> Dict[str, int]:
        return self.data.state_bytes()

    def layout(self) -> dict:
        described = {"mode": self.name, "world_size": dist.size(), **self.mesh.sizes(), **self.data.describe(),
                     "state_bytes": getattr(self.data, "resting_state_bytes", self.data.state_bytes)()}
        if self.schedule is not None:
            described.update(self.schedule.describe(self.data.accum_steps))
        if not self.part.is_whole:
            described["groups"] = {d: self.mesh.groups(d) for d, size in self.mesh.sizes().items() if size > 1}
            described["ranks"] = self.mesh.describe(self.hosts)["ranks"]
        return described


def _plain_buffer_name(name: str, plain: torch.nn.Module) -> str:
    """A stage's buffer name in the plain model (its rotary embedding sits under model.)."""
    return name if name in dict(plain.named_buffers()) else f"model.{name}"
