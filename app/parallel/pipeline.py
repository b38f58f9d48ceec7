"""Pipeline parallelism: consecutive decoder layers on consecutive ranks, micro-batches flowing
through them so the stages work at once, with data parallelism across pipelines.

    mpirun -np 4 python -m app.train parallel.pipeline=2 parallel.schedule=1f1b train.grad_accum_steps=8

Each rank runs one stage (app/parallel/stages.py) of one pipeline; a step's grad_accum_steps
micro-batches are the pipeline's micro-batches, run in the order of the schedule
(app/parallel/pipeline_schedule.py: GPipe or 1F1B), with activations and their gradients moving
between neighbours over MPI point-to-point (app/parallel/p2p.py). Ranks holding the same stage
in different pipelines average their gradients with Horovod, over the data process set, as
plain data parallelism does. The last stage has the loss and shares it along the pipeline, so
every rank reports the true mean. Checkpoints hold the full model and its plain optimizer's
state (app/parallel/optimizer_state.py), so any layout resumes from them.
"""
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from app import dist, models
from app.checkpoint import SavedState
from app.parallel.data import DataParallel
from app.parallel.optimizer_state import by_index, by_name, full_model_order, merge, param_order, restrict
from app.parallel.p2p import ACTIVATION, GRADIENT, Inbox, Link
from app.parallel.pipeline_schedule import BACKWARD, FORWARD, actions, ideal_bubble_fraction, receives
from app.parallel.stages import Stage, layer_bounds, owner_names
from app.tensors import to_cpu

log = logging.getLogger(__name__)

NEEDS_MPI = ("sends activations over MPI point-to-point, which needs an MPI launch (mpirun, srun or horovodrun "
             "--mpi); a Gloo launch (horovodrun --gloo) has no MPI world")


@dataclass
class _Step:
    """One step's traffic and what its backward passes will need."""
    link: Link
    inbox: Inbox
    kept: Dict[int, tuple] = field(default_factory=dict)  # micro-batch -> (stage input, output or loss)
    losses: List[torch.Tensor] = field(default_factory=list)
    # (action, micro-batch, start, end) on time.perf_counter's clock, which the processes of one
    # host share, so stages' timelines line up (app/bench/pipeline.py draws them).
    timeline: List[tuple] = field(default_factory=list)


class PipelineParallel(DataParallel):
    name = "pipeline"

    def __init__(self, full_model: torch.nn.Module, cfg):
        mesh = dist.mesh()
        self.position = mesh.coordinates(dist.rank())
        self.stage_index, self.stages, self.data_replicas = self.position["pipeline"], mesh.pipeline, mesh.data
        self.comm = dist.mpi_communicator("pipeline")
        if self.comm is None:
            raise ValueError(f"parallel.pipeline={self.stages} {NEEDS_MPI}")
        self.full = full_model
        super().__init__(Stage(full_model, self.stage_index, self.stages), cfg.sync, cfg.train.grad_accum_steps,
                         process_set=dist.process_set("data"))
        self.schedule = cfg.parallel.schedule
        # Under bf16 autocast the residual stream is still fp32; sending it as bf16 halves the
        # bytes at the cost of the rounding autocast applies anyway at the next layer's matmuls.
        self.wire_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.device = next(full_model.parameters()).device
        self.timeline: List[tuple] = []
        if cfg.train.grad_accum_steps < self.stages and dist.is_main():
            log.warning("train.grad_accum_steps=%d micro-batches for %d pipeline stages: stages mostly wait "
                        "(ideal bubble %.0f%%); use at least %d, better several times more",
                        cfg.train.grad_accum_steps, self.stages,
                        100 * ideal_bubble_fraction(self.stages, cfg.train.grad_accum_steps),
                        self.stages)

    @property
    def first(self) -> bool:
        return self.stage_index == 0

    @property
    def last(self) -> bool:
        return self.stage_index == self.stages - 1

    # --- one step ----------------------------------------------------------------------------
    def forward_backward(self, loss_of, batches: List[dict], precision_ctx, scaler, timer) -> torch.Tensor:
        """This stage's part of the step's micro-batches, in the schedule's order; returns the
        pipeline's mean loss on every stage. (loss_of is the task's whole-model loss; the last
        stage computes the same loss from its logits.)"""
        plan = actions(self.schedule, self.stage_index, self.stages, len(batches))
        link = Link(self.comm, self.wire_dtype)
        expected = [(ACTIVATION, self.stage_index - 1, i) if kind == FORWARD else
                    (GRADIENT, self.stage_index + 1, i)
                    for kind, i in receives(plan, self.stage_index, self.stages)]
        hidden = self.full.config.hidden_size
        run = _Step(link, Inbox(link, expected, lambda i: (*batches[i]["input_ids"].shape, hidden)))
        for kind, i in plan:
            if kind == FORWARD:
                self._forward(run, i, batches[i], precision_ctx, timer)
            else:
                self._backward(run, i, len(batches), scaler, timer)
            link.progress()
        with timer.phase("pipeline_wait"):
            link.finish()
            loss = self._shared_loss(run.losses, len(batches))
        self.timeline = run.timeline
        return loss

    def _forward(self, run: _Step, i: int, batch: dict, precision_ctx, timer) -> None:
        if self.first:
            inputs = batch["input_ids"]
        else:
            with timer.phase("pipeline_wait"):
                received = run.inbox.take(ACTIVATION, i)
            inputs = received.to(self.device, next(self.model.parameters()).dtype).requires_grad_()
        started = time.perf_counter()
        with timer.phase("forward"), precision_ctx:
            output = self.model(inputs)
            if self.last:
                output = models.next_token_loss(output, batch["targets"])
        run.timeline.append((FORWARD, i, started, time.perf_counter()))
        if self.last:
            run.losses.append(output.detach())
        else:
            run.link.send(output, self.stage_index + 1, ACTIVATION, i)
        run.kept[i] = (inputs, output)

    def _backward(self, run: _Step, i: int, micro_batches: int, scaler, timer) -> None:
        inputs, output = run.kept.pop(i)
        grad = None
        if not self.last:
            with timer.phase("pipeline_wait"):
                grad = run.inbox.take(GRADIENT, i)
        started = time.perf_counter()
        with timer.phase("backward"):
            if self.last:  # gradients are the mean over micro-batches, as in Parallelism.forward_backward
                scaled = output / micro_batches
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            else:
                torch.autograd.backward(output, grad.to(output.device, output.dtype))
        run.timeline.append((BACKWARD, i, started, time.perf_counter()))
        if not self.first:
            run.link.send(inputs.grad, self.stage_index - 1, GRADIENT, i)

    def _shared_loss(self, losses: List[torch.Tensor], micro_batches: int) -> torch.Tensor:
        mine = float(torch.stack(losses).float().sum()) / micro_batches if self.last else None
        return torch.tensor(self.comm.bcast(mine, root=self.stages - 1), device=self.device)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: every stage's squared norms summed
        along the pipeline (torch.nn.utils.clip_grad_norm_'s formula, over all stages)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        squares = np.array([sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads)])
        self.comm.Allreduce(dist.mpi_in_place(), squares)
        total = torch.tensor(float(np.sqrt(squares[0])), dtype=torch.float32)
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        return total

    # --- state -------------------------------------------------------------------------------
    def _order(self) -> List[List[str]]:
        name_of = {id(p): self.model.full_names[name] for name, p in self.model.named_parameters()}
        return param_order(self.optimizer, name_of)

    def start(self, saved: Optional[SavedState]) -> None:
        """Rank 0 cuts its full model (fresh, or `saved`) into stages and sends each rank its own
        stage's weights and optimizer state; then each rank frees the layers it does not run."""
        pieces = None
        if dist.is_main():
            full_names = [name for name, _ in self.full.named_parameters()]
            weights = saved.model if saved is not None else self.full.state_dict()
            optimizer = (by_name(saved.optimizer, full_model_order(self.full))
                         if saved is not None else None)
            by_stage = [{"model": {n: weights[n] for n in names},
                         "optimizer": optimizer and restrict(optimizer, names)}
                        for names in owner_names(full_names, self.stages, self.full.config.num_hidden_layers)]
            mesh = dist.mesh()
            pieces = [by_stage[mesh.coordinates(r)["pipeline"]] for r in range(mesh.world)]
        mine = dist.mpi_world().scatter(to_cpu(pieces), root=0)
        self.model.load_full_state(mine["model"])
        if mine["optimizer"] is not None:
            self.optimizer.load_state_dict(by_index(mine["optimizer"], self._order()))
        self.model.free_others()

    def saved_state(self) -> Optional[SavedState]:
        """The first pipeline's stages (data replica 0) send their weights and optimizer state,
        by name, to rank 0, which puts them in the full model's order."""
        mine = None
        if self.position["data"] == 0 and self.position["tensor"] == 0:
            mine = {"model": self.model.full_state(),
                    "optimizer": by_name(self.optimizer.state_dict(), self._order())}
        pieces = dist.mpi_world().gather(to_cpu(mine), root=0)
        if not dist.is_main():
            return None
        pieces = [piece for piece in pieces if piece is not None]
        weights = {k: v for piece in pieces for k, v in piece["model"].items()}
        optimizer = by_index(merge([p["optimizer"] for p in pieces]),
                                            full_model_order(self.full))
        names = [name for name, _ in self.full.named_parameters()]
        return SavedState(model={n: weights[n] for n in names}, optimizer=optimizer, world_size=dist.size())

    @contextmanager
    def full_model(self):
        """The whole model on every rank for a while (evaluation, the closing sample): the
        pipeline's stages exchange their weights and each fills the layers it freed."""
        state = {k: v for piece in self.comm.allgather(self.model.full_state()) for k, v in piece.items()}
        self.model.restore_others(state, self.device)
        try:
            yield self.full
        finally:
            self.model.free_others()

    def counts_tokens(self) -> bool:
        return self.first and self.position["tensor"] == 0

    def replica_group(self) -> int:
        return self.stage_index

    def layout(self) -> dict:
        bounds = layer_bounds(self.full.config.num_hidden_layers, self.stages)
        return {"mode": f"pipeline_{self.schedule}", "world_size": dist.size(), "pipeline": self.stages,
                "data": self.data_replicas, "micro_batches": self.accum_steps,
                "stage_layers": [[b.start, b.stop] for b in bounds],
                "ideal_bubble_fraction": ideal_bubble_fraction(self.stages, self.accum_steps)}
