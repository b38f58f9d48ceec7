"""The grid of cells a world can run, each cell's prediction, and the pick.

The grid: every tensor size that divides the world and the model's heads, KV heads, FFN width
and vocabulary; every pipeline size that divides what is left (MPI launches only, at most one
stage per layer), with GPipe and 1F1B; ZeRO 0-3 where the data size is above 1; checkpointing
none or full; and every micro-batch size that divides a data rank's share of the global batch,
the rest accumulated (a pipeline's micro-batches). A cell app/config.py refuses is never
proposed: each distinct layout goes through config.validate. The pick is the fastest predicted
cell whose predicted peak fits the memory cap, unless the plain rule's choice among the fitting
cells ("data parallel, else the lowest ZeRO stage, else the pipeline") is predicted within
plan.pick_margin of it: a difference that small is inside the planner's error, and the plainer
layout is the safer bet. Ties go to the earlier cell in the grid's order (smaller tensor,
pipeline, ZeRO stage; no checkpointing; larger micro-batches), so every rank that plans the
same inputs picks the same cell.
"""
import copy
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

import psutil

from app import config
from app.parallel.pipeline_schedule import SCHEDULES
from app.plan import memory, state, time
from app.plan.cell import Cell, Settings, Shape, shape
from app.plan.profile import HardwareProfile

# Horovod's HOROVOD_FUSION_THRESHOLD default, in MiB.
HOROVOD_FUSION_THRESHOLD_MB = 64
CHECKPOINTING = ("none", "full")
T = TypeVar("T")


@dataclass(frozen=True)
class Prediction:
    cell: Cell
    memory: Dict[str, float]
    seconds: Dict[str, float]
    tokens_per_s: float

    @property
    def peak_bytes(self) -> float:
        return self.memory["total"]

    @property
    def step_s(self) -> float:
        return self.seconds["total"]


class Planner:
    """Predictions for one model and training config on one profile."""

    def __init__(self, cfg, profile: HardwareProfile, ranks_on_host: Optional[int] = None):
        """`ranks_on_host`: the launch's ranks per host, where plan.ranks_per_host leaves it open."""
        self.cfg, self.profile, self.shape = cfg, profile, shape(cfg)
        self.ranks_on_host = cfg.plan.ranks_per_host or ranks_on_host
        self.optimizer_bytes = state.optimizer_bytes_per_parameter(cfg.optim.name, cfg.optim.momentum)
        fusion_mb = cfg.horovod.fusion_threshold_mb
        self.fusion_bytes = (HOROVOD_FUSION_THRESHOLD_MB if fusion_mb is None else fusion_mb) * 2**20
        self.settings = Settings.of(cfg)
        if self.settings.precision not in profile.compute:
            raise config.ConfigError(f"profile {profile.name} has no compute costs for train.precision="
                                     f"{self.settings.precision}; pick one of {', '.join(profile.compute)} or another "
                                     "plan.hardware")
        self._checked = copy.deepcopy(cfg)  # changed in place per layout by allowed()
        self._allowed: Dict[tuple, bool] = {}

    def predict(self, cell: Cell) -> Prediction:
        parts = memory.peak_bytes(self.shape, cell, self.settings, self.optimizer_bytes, self.fusion_bytes, self.profile)
        seconds = time.step_seconds(self.shape, cell, self.settings, self.fusion_bytes, self.profile,
                                    min(cell.world, self.ranks_on_host) if self.ranks_on_host else None)
        return Prediction(cell, parts, seconds, cell.global_batch * self.shape.seq_len / seconds["total"])

    def allowed(self, cell: Cell) -> bool:
        """Whether app/config.py accepts the cell's layout (and the vocabulary splits, which
        the trainer checks once the tokenizer is known)."""
        key = (cell.tensor, cell.pipeline, cell.zero_stage, cell.schedule, cell.checkpointing)
        if key not in self._allowed:
            checked = self._checked
            checked.parallel.tensor, checked.parallel.pipeline = cell.tensor, cell.pipeline
            checked.parallel.zero_stage, checked.parallel.schedule = cell.zero_stage, cell.schedule
            checked.train.activation_checkpointing = cell.checkpointing
            try:
                config.validate(checked)
                config.check_divisible_by_tensor({"data.vocab_size": self.shape.vocab}, cell.tensor)
                self._allowed[key] = True
            except config.ConfigError:
                self._allowed[key] = False
        return self._allowed[key]

    def grid(self, world: int, global_batch: int, mpi: bool) -> Iterator[Cell]:
        for tensor, pipeline in _mesh_sizes(world, self.shape, mpi):
            data = world // (tensor * pipeline)
            if global_batch % data:
                continue
            schedules = SCHEDULES if pipeline > 1 else (self.cfg.parallel.schedule,)
            stages = range(4) if data > 1 else (0,)
            for zero_stage, schedule, checkpointing in itertools.product(stages, schedules, CHECKPOINTING):
                for micro_batch in _divisors_descending(global_batch // data):
                    cell = Cell(world, tensor, pipeline, zero_stage, schedule, checkpointing, micro_batch,
                                global_batch // data // micro_batch)
                    if self.allowed(cell):
                        yield cell

    def rank(self, world: int, global_batch: int, cap_bytes: float, mpi: bool = True) -> List[Prediction]:
        """Every allowed cell's prediction that fits the cap, fastest first."""
        fitting = [p for p in map(self.predict, self.grid(world, global_batch, mpi)) if p.peak_bytes <= cap_bytes]
        return sorted(fitting, key=lambda p: p.step_s)  # stable: ties keep the grid's order

    def pick(self, world: int, global_batch: int, cap_bytes: float, mpi: bool) -> Optional[Prediction]:
        return prefer_plain(self.rank(world, global_batch, cap_bytes, mpi), lambda p: p.cell, lambda p: p.step_s,
                            self.cfg.plan.pick_margin)


def plain_rank(cell: Cell) -> Optional[tuple]:
    """A cell's place in the plain rule ("data parallel if it fits, else the lowest ZeRO stage
    that fits, else the pipeline"): lower first; None for what the rule never picks (tensor
    parallelism, checkpointing)."""
    if cell.tensor > 1 or cell.checkpointing != "none":
        return None
    return cell.pipeline > 1, cell.zero_stage


def prefer_plain(fitting: List[T], cell_of: Callable[[T], Cell], seconds_of: Callable[[T], float],
                 margin: float) -> Optional[T]:
    """The fastest of `fitting` (cells that fit, as predictions or rows), unless the plain rule's
    own choice among them (its first place, the fastest of its micro-batchings) is predicted
    within `margin` of it: a less plain layout must promise more than the planner's error."""
    if not fitting:
        return None
    fastest = min(fitting, key=seconds_of)
    ranked = [(rank, seconds_of(x), i) for i, x in enumerate(fitting) if (rank := plain_rank(cell_of(x))) is not None]
    if not ranked:
        return fastest
    rule = fitting[min(ranked)[2]]
    return rule if seconds_of(rule) <= (1 + margin) * seconds_of(fastest) else fastest


def memory_cap_bytes(plan_cfg, profile: HardwareProfile, ranks_on_host: int) -> float:
    """plan.memory_gib, else the profile's memory per rank, else this host's memory over its ranks."""
    if plan_cfg.memory_gib is not None:
        return plan_cfg.memory_gib * 2**30
    if profile.memory_per_rank_gib is not None:
        return profile.memory_per_rank_gib * 2**30
    return psutil.virtual_memory().total / ranks_on_host


def _divisors_descending(n: int) -> List[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def _mesh_sizes(world: int, model: Shape, mpi: bool) -> Iterator[tuple]:
    for tensor in reversed(_divisors_descending(world)):
        for pipeline in reversed(_divisors_descending(world // tensor)):
            if pipeline == 1 or (mpi and pipeline <= model.layers):
                yield tensor, pipeline
