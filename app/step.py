"""One training step, and what it needs, built the same way for the trainer and the benchmark.

    training = build_training(cfg, device)        # task, model, optimizer, parallelism
    output = train_step(training, samples_before, step, timer)

A step: this rank's micro-batches of the global batch (prepared ahead by app/prefetch.py),
forward and backward (the layout may replace that part, as a pipeline does; train.compile has
compiled the loss or the decoder layers, app/compilation.py), wait for the gradients, unscale and clip
them by their global norm, step, then whatever the layout does between steps (parameter
averaging). The timer records each phase, which is all app.bench.breakdown adds to what
training runs.
"""
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from app import compilation, config, dist, models, optim, parallel, runtime, tasks
from app.initialization import Initializer
from app.parallel.base import Parallelism
from app.prefetch import BatchPrefetcher


class PhaseTimer:
    """Wall-clock seconds per phase, summed until taken. GPU kernels run asynchronously, so on a
    GPU the clock is read only after the device has finished the phase's work: honest phases
    at the cost of a little CPU/GPU overlap at each boundary."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        started = self.now()
        try:
            # Named in a profiler trace too (train.profile_steps); microseconds when none records.
            with torch.profiler.record_function(f"phase/{name}"):
                yield
        finally:
            self.seconds[name] += self.now() - started

    def take(self) -> Dict[str, float]:
        """The seconds so far, and start again from zero."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


@dataclass
class Training:
    """Everything a step needs."""
    task: tasks.Task  # this rank's slice of the world's global batches: replaced with the world (use_world)
    # task.loss, or its compiled graph (train.compile=model): a static method of the task's
    # class, the same for any world, so it outlives the task it came from.
    loss_of: Callable
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    parallel: Parallelism
    device: torch.device
    precision_ctx: object
    scaler: Optional[torch.amp.GradScaler]
    grad_accum_steps: int
    grad_clip: float
    batches: BatchPrefetcher  # each step's micro-batches, prepared ahead
    compiled: bool  # train.compile is on: the first step also compiles
    parameters: int = 0  # of the whole model, however a layout splits it
    flops_per_token: float = 0.0

    def use_world(self, cfg, data_rank: int, data_replicas: int) -> None:
        """Read this rank's slice of another world's batches from here on (elastic, after a
        reset): the task is rebuilt for its place, and the prefetcher, whose thread was reading
        the old world's slice (and masking it for the old world size), with it."""
        self.batches.close()
        self.task, self.batches = build_data(cfg, self.device, data_rank, data_replicas)


@dataclass
class StepOutput:
    loss: torch.Tensor  # this rank's mean loss, on the device: reading it back would sync a GPU
    grad_norm: Optional[torch.Tensor]
    tokens: int  # this rank's tokens (padding excluded); 0 where another rank of its pipeline counts them
    samples: List[range]  # the global sample indices of each micro-batch this rank trained on


def build_data(cfg, device: torch.device, data_rank: int, data_replicas: int) -> Tuple[tasks.Task, BatchPrefetcher]:
    """What depends on this rank's place among the data replicas: its task, which slices every
    global batch (and, for masked LM, scales the loss by the world size), and the prefetcher
    that reads that slice ahead."""
    task = tasks.build(cfg, data_rank, data_replicas)
    return task, BatchPrefetcher(task, cfg.train.grad_accum_steps, cfg.train.prefetch_steps,
                                 pin_memory=device.type == "cuda")


def plain_model(task: tasks.Task, cfg, device: torch.device) -> Tuple[torch.nn.Module, Optional[Initializer]]:
    """The task's plain model and, for a fresh one, the initializer of its weights. A fresh model
    is built on the meta device, shapes without storage: the layout materialises on each rank
    only what it holds (app/parallel/model_part.py). model.init_from's weights load on `device`
    as they are."""
    if not cfg.model.init_from:
        model = task.architecture().shapes()
        return model, Initializer(model, cfg.train.seed)
    # A classifier's fresh head on a pretrained encoder is drawn by transformers from the global
    # RNG: seeded alike, every rank draws the same.
    torch.manual_seed(cfg.train.seed)
    return task.architecture().build().to(device), None


def build_training(cfg, device: torch.device) -> Training:
    """The task, a plain model, its optimizer and the layout that parallelizes them (not yet
    synchronised: Parallelism.start does that, after any resume)."""
    data_rank, data_replicas = dist.data_position()
    task, batches = build_data(cfg, device, data_rank, data_replicas)
    return training_for(cfg, device, task, batches)


def training_for(cfg, device: torch.device, task: tasks.Task, batches: BatchPrefetcher) -> Training:
    """build_training's model, optimizer and layout around a task and its batches."""
    model, initializer = plain_model(task, cfg, device)
    torch.manual_seed(cfg.train.seed + dist.noise_rank())  # dropout noise differs per replica
    # Counted on the whole model (on the meta device: shapes only), before a layout may shard it.
    parameters, flops_per_token = models.count_parameters(model), task.flops_per_token(model)
    layout = parallel.build(cfg, model, device, initializer)
    # After the layout has changed the model (as torchtitan orders it); nothing is renamed or
    # replaced, so the optimizer and Horovod's hooks see the same parameters.
    loss_of = compilation.apply(model, task.loss, cfg.train.compile)
    # The optimizer holds what this rank trains (a pipeline stage's layers, or the whole model).
    optimizer = layout.wrap_optimizer(
        optim.build_optimizer(layout.model, cfg.optim,
                              optim.lr_at(0, cfg.optim, cfg.train.max_steps, dist.data_position()[1])))
    return Training(
        task=task, loss_of=loss_of, model=model, optimizer=optimizer, parallel=layout, device=device,
        parameters=parameters, flops_per_token=flops_per_token,
        precision_ctx=runtime.autocast_context(cfg.train.precision, device,
                                               cache_casts=cfg.parallel.zero_stage < 3),
        scaler=torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None,
        grad_accum_steps=cfg.train.grad_accum_steps, grad_clip=cfg.train.grad_clip,
        batches=batches,
        compiled=config.compilation_mode(cfg.train.compile) != "false",
    )


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def train_step(training: Training, samples_before: int, step: int, timer: PhaseTimer) -> StepOutput:
    """Optimizer step `step` (0-based), whose global batch starts at sample `samples_before`."""
    run = training
    with timer.phase("data"):  # near zero when the batches were prepared ahead
        batches, tokens, samples = run.batches.get(samples_before)
        tokens = tokens if run.parallel.counts_tokens() else 0
        batches = [_to_device(batch, run.device) for batch in batches]
    loss = run.parallel.forward_backward(run.loss_of, batches, run.precision_ctx, run.scaler, timer)
    with timer.phase("allreduce_wait"):
        run.parallel.sync_gradients()
    with timer.phase("optimizer"):
        if run.scaler is not None:
            run.parallel.unscale_gradients(run.scaler)
        grad_norm = run.parallel.clip_grad_norm(run.grad_clip) if run.grad_clip > 0 else None
        run.parallel.optimizer_step(run.scaler)
    with timer.phase("parameter_average"):
        run.parallel.after_step(step + 1)
    return StepOutput(loss=loss, grad_norm=grad_norm, tokens=tokens, samples=samples)
