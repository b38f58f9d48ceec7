"""Pipeline parallelism's schedule: consecutive decoder layers on consecutive ranks, micro-batches
flowing through them so the stages work at once.

    mpirun -np 4 python -m app.train parallel.pipeline=2 parallel.schedule=1f1b train.grad_accum_steps=8

Each rank runs one stage (app/parallel/stages.py) of one pipeline; a step's grad_accum_steps
micro-batches are the pipeline's micro-batches, run in the order of the schedule
(app/parallel/pipeline_schedule.py: GPipe or 1F1B), with activations and their gradients moving
between neighbours over MPI point-to-point (app/parallel/p2p.py). This object only replaces the
step's forward and backward passes: what the stage's gradients then do over the data set (an
allreduce, ZeRO) and how norms and checkpoints see the whole model is the layout's
(app/parallel/layout.py). The last stage has the loss and shares it along the pipeline, so every
rank reports the true mean.
"""
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from app import dist
from app.parallel.p2p import ACTIVATION, GRADIENT, Inbox, Link
from app.parallel.pipeline_schedule import BACKWARD, FORWARD, actions, ideal_bubble_fraction, receives
from app.parallel.stages import Stage, layer_bounds

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


class PipelineSchedule:
    def __init__(self, stage: Stage, position: Dict[str, int], stages: int, cfg, loss_of_logits: Callable):
        self.stage_index, self.stages, self.position = position["pipeline"], stages, position
        self.comm = dist.mpi_communicator("pipeline")
        if self.comm is None:
            raise ValueError(f"parallel.pipeline={stages} {NEEDS_MPI}")
        self.model, self.schedule = stage, cfg.parallel.schedule
        # The last stage's loss from its logits: the vocabulary-parallel one under tensor parallelism.
        self.loss_of_logits = loss_of_logits
        # Under bf16 autocast the residual stream is still fp32; sending it as bf16 halves the
        # bytes at the cost of the rounding autocast applies anyway at the next layer's matmuls.
        self.wire_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.device = next(stage.parameters()).device
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
        if scaler is not None and not self.last:
            # fp16: the loss is scaled once, on the last stage, and the gradients reaching the
            # other stages are scaled already; but a GradScaler creates its scale at its first
            # scale() call, and unscale_ needs it on every stage.
            scaler.scale(torch.zeros((), device=self.device))
        link = Link(self.comm, self.wire_dtype)
        expected = [(ACTIVATION, self.stage_index - 1, i) if kind == FORWARD else
                    (GRADIENT, self.stage_index + 1, i)
                    for kind, i in receives(plan, self.stage_index, self.stages)]
        hidden = self.model.config.hidden_size
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
                output = self.loss_of_logits(output, batch["targets"])
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

    def describe(self, accum_steps: int) -> dict:
        bounds = layer_bounds(self.model.config.num_hidden_layers, self.stages)
        return {"schedule": self.schedule, "micro_batches": accum_steps,
                "stage_layers": [[b.start, b.stop] for b in bounds],
                "ideal_bubble_fraction": ideal_bubble_fraction(self.stages, accum_steps)}
