"""Seconds per optimizer step of a cell, and what each part assumes:

- Compute: the profile's fit of one micro-batch's forward + backward, a fixed cost plus one per
  layer plus FLOPs at a measured rate. Training FLOPs per token are app/models.py's (6 per
  weight, 12 h s per layer for attention) and 6 V h for the head; a recomputed layer adds its
  forward again (a third). Tensor parallelism divides the FLOPs by `tensor`, not the fixed costs.
- Collectives: the profile's latency-bandwidth fit for the whole buffer, measured on
  calibration_ranks ranks, scaled to a group of n as a ring: the bytes term by (n-1)/n over the
  calibration's, the latency by log2 n over the calibration's. A blocking Horovod collective
  waits on average half a background cycle; the fit already holds half the calibration's cycle,
  so the difference is added per collective (cycle time as the run would resolve it, app/dist.py).
  One fit per collective whatever nodes the group spans: a group wider than a node is priced at
  the profile's in-node speed (optimistic), not modelled separately.
- Tensor parallelism: per layer and micro-batch four blocking fp32 allreduces of the activation
  (Megatron's f and g, forward and backward; a recomputed layer's forward two more), plus the
  vocabulary-parallel embedding and head input (two more) and the loss's two small ones. None of
  them overlaps compute.
  The tensor-parallel layers' own work beyond those collectives' wire time (splitting and
  gathering activations, the blocking waits' wake-ups) is the profile's tensor_s_per_byte per
  byte allreduced; calibration measures it (app/plan/layout_costs.py).
- Pipeline: m micro-batches through P stages take m times the slowest stage's micro-batch
  (forward, backward, its sends of the activation and its gradient by mpi4py) plus one of each
  other stage's, the fill and drain (T = (m - 1) t_max + sum of t_s); with equal stages the
  bubble is (P - 1)/(m + P - 1), for GPipe and 1F1B alike (app/parallel/pipeline_schedule.py).
  The schedule's own work beyond the sends' fit, per micro-batch of a stage and per step (the
  loss and gradient norm exchanged between stages), is the profile's pipeline_s_per_micro_batch
  and pipeline_s_per_step; calibration measures them (app/plan/layout_costs.py).
- Data dimension: plain data parallelism allreduces the gradients during the last micro-batch's
  backward, one fused piece per Horovod cycle that backward spans (at most one per layer, more
  where a piece would exceed the fusion threshold); ZeRO-1 reduce-scatters each unit (a layer, plus one
  for the ends) in that backward and allgathers the updated slices before the next forward;
  ZeRO-2 reduce-scatters every micro-batch's gradients; ZeRO-3 also gathers each unit before its
  forward and before its backward, every micro-batch. The profile's backward_overlap of the compute
  they can run behind hides that much of them; the last collective is never hidden.
  ZeRO's own work beyond its collectives' wire time (the flat buffers' copies, the per-unit
  hooks, Horovod's background thread copying beside the compute on a CPU) is the profile's
  zero_s_per_parameter of its stage, per parameter the rank's part holds and per reduction pass
  (stage 1 and under a pipeline one a step, stages 2-3 one a micro-batch); calibration measures
  it (app/plan/layout_costs.py), and it is never hidden behind compute.
- Optimizer: the profile's cost per parameter updated (its slice under ZeRO).
- Fixed costs per micro-batch (the profile's micro_batch_overhead_s: the embedding, the head and
  the loss, Python's dispatch) are shared by a pipeline's stages, each paying its 1/P.
- Oversubscription: ranks beyond the host's cores (the profile's host_cores, the run's ranks on
  a host) time-share them, so the parts that are CPU work (compute, the bubble's, ZeRO's work,
  the optimizer) stretch by ranks / cores; waits on the wire do not.
"""
import math
from typing import Dict, Optional

from app import dist
from app.plan.cell import Cell, Settings, Shape
from app.plan.memory import FP32_BYTES, recomputed_layers, stage_layers, stage_parameters
from app.plan.profile import HardwareProfile, LinkFit

# Horovod's own HOROVOD_CYCLE_TIME default, which GPU ranks keep (app/dist.py).
HOROVOD_CYCLE_TIME_MS = 1.0
# A decoder layer's tensor-parallel allreduces per micro-batch: f and g, forward and backward.
TENSOR_ALLREDUCES_PER_LAYER = 4
# Of them, the ones a recomputed forward runs again.
TENSOR_ALLREDUCES_PER_FORWARD = 2
# The vocabulary-parallel embedding's and head input's activation-sized allreduces, and the
# loss's small ones (max and sums over the vocabulary shards).
VOCAB_ACTIVATION_ALLREDUCES = 2
VOCAB_LOSS_ALLREDUCES = 2
# The parts that are a rank's own CPU work, which time-shared cores stretch; the rest is waiting
# on collectives and sends, during which a rank yields its core (app/dist.py).
CPU_WORK = ("compute", "bubble", "zero_work", "optimizer")
# Of a micro-batch's compute, the backward's share (twice the forward's FLOPs).
BACKWARD_SHARE = 2 / 3
# A recomputed layer runs its forward again: a third of its training FLOPs.
RECOMPUTE_SHARE = 1 / 3


def cycle_time_ms(settings: Settings, cell: Cell, profile: HardwareProfile) -> float:
    """horovod.cycle_time_ms as the run resolves it (app/dist.py default_cycle_time_ms)."""
    if settings.cycle_time_ms is not None:
        return settings.cycle_time_ms
    if cell.tensor > 1:
        return dist.TENSOR_PARALLEL_CYCLE_TIME_MS
    return dist.CPU_CYCLE_TIME_MS if profile.device == "cpu" else HOROVOD_CYCLE_TIME_MS


class Links:
    """Collective costs for one layout: the profile's fits, scaled to a group and cycle time."""

    def __init__(self, profile: HardwareProfile, cycle_ms: float):
        self.profile = profile
        self.cycle_s = cycle_ms / 1000
        self.wait_s = (cycle_ms - profile.calibration_cycle_time_ms) / 2 / 1000

    def seconds(self, fit: LinkFit, group: int, n_bytes: float, horovod: bool = True) -> float:
        if group <= 1:
            return 0.0
        base = self.profile.calibration_ranks
        ring = ((group - 1) / group) / ((base - 1) / base)
        took = fit.latency_s * math.log2(group) / math.log2(base) + fit.seconds_per_byte * n_bytes * ring
        return max(0.0, took + (self.wait_s if horovod else 0.0))


def micro_batch_compute_s(shape: Shape, cell: Cell, stage: int, settings: Settings, profile: HardwareProfile) -> float:
    fit = profile.compute[settings.precision]
    tokens = cell.micro_batch_size * shape.seq_len
    layers = stage_layers(shape.layers, cell.pipeline)[stage]
    recomputed = recomputed_layers(layers, cell.checkpointing, settings.activation_checkpointing_every)
    layer_flops = tokens * (6 * shape.layer_parameters + 12 * shape.hidden * shape.seq_len)
    flops = layer_flops * (layers + RECOMPUTE_SHARE * recomputed)
    if stage == cell.pipeline - 1:
        flops += tokens * 6 * shape.vocab * shape.hidden
    layer_overheads = fit.layer_overhead_s * (layers + RECOMPUTE_SHARE * recomputed)
    overheads = fit.micro_batch_overhead_s / cell.pipeline + layer_overheads
    return overheads + flops / cell.tensor / fit.flops_per_s


def tensor_allreduces(shape: Shape, cell: Cell, stage: int, settings: Settings) -> float:
    """One micro-batch's activation-sized tensor-parallel allreduces on `stage`."""
    layers = stage_layers(shape.layers, cell.pipeline)[stage]
    recomputed = recomputed_layers(layers, cell.checkpointing, settings.activation_checkpointing_every)
    count = TENSOR_ALLREDUCES_PER_LAYER * layers + TENSOR_ALLREDUCES_PER_FORWARD * recomputed
    return count + VOCAB_ACTIVATION_ALLREDUCES * ((stage == 0) + (stage == cell.pipeline - 1)) / 2


def tensor_allreduce_bytes(shape: Shape, cell: Cell, stage: int, settings: Settings) -> float:
    """The bytes of one micro-batch's activation-sized tensor-parallel allreduces on `stage`."""
    activation = cell.micro_batch_size * shape.seq_len * shape.hidden * FP32_BYTES
    return tensor_allreduces(shape, cell, stage, settings) * activation if cell.tensor > 1 else 0.0


def tensor_s(shape: Shape, cell: Cell, stage: int, settings: Settings, links: Links) -> float:
    """One micro-batch's tensor-parallel collectives on `stage`, and the layers' own work per
    byte they allreduce (the profile's tensor_s_per_byte)."""
    if cell.tensor == 1:
        return 0.0
    activation = cell.micro_batch_size * shape.seq_len * shape.hidden * FP32_BYTES
    count = tensor_allreduces(shape, cell, stage, settings)
    small = VOCAB_LOSS_ALLREDUCES * (stage == cell.pipeline - 1)
    fit = links.profile.allreduce
    tokens_bytes = cell.micro_batch_size * shape.seq_len * FP32_BYTES
    return (count * links.seconds(fit, cell.tensor, activation) + small * links.seconds(fit, cell.tensor, tokens_bytes)
            + links.profile.tensor_s_per_byte * count * activation)


def send_s(shape: Shape, cell: Cell, links: Links) -> float:
    """A stage's sends per micro-batch: its activation forward and its gradient backward, and the
    schedule's own work around them (the profile's pipeline_s_per_micro_batch)."""
    if cell.pipeline == 1:
        return 0.0
    activation = cell.micro_batch_size * shape.seq_len * shape.hidden * FP32_BYTES
    return (2 * links.seconds(links.profile.point_to_point, 2, activation, horovod=False)
            + links.profile.pipeline_s_per_micro_batch)


def zero_passes(cell: Cell) -> int:
    """Times a step reduces ZeRO's gradients: once at stage 1 and under a pipeline, else once a
    micro-batch (app/parallel/zero.py passes_per_reduce)."""
    return cell.grad_accum_steps if cell.zero_stage >= 2 and cell.pipeline == 1 else 1


def zero_work_s(cell: Cell, held: float, profile: HardwareProfile) -> float:
    """ZeRO's own work beyond its collectives' wire time (module docstring)."""
    return profile.zero_s_per_parameter[cell.zero_stage] * held * zero_passes(cell) if cell.data > 1 else 0.0


def data_s(cell: Cell, units: int, held: float, compute_s: float, fusion_bytes: int, links: Links) -> float:
    """The data dimension's exposed communication per step (module docstring: what overlaps)."""
    if cell.data == 1:
        return 0.0
    profile, m, d = links.profile, cell.grad_accum_steps, cell.data
    # ZeRO sends each unit (a layer, the rest of the part one more) alone; Horovod's plain
    # allreduce fuses whatever gradients are ready at each cycle, so it sends one piece per
    # cycle the last backward spans (at most one per unit), more where a piece would exceed the
    # fusion threshold.
    pieces = units
    if cell.zero_stage == 0:
        hideable = BACKWARD_SHARE * compute_s / m
        cycles = max(1, math.ceil(hideable / links.cycle_s))
        pieces = max(min(pieces, cycles), math.ceil(held * FP32_BYTES / max(fusion_bytes, 1)))
        costs = [links.seconds(profile.allreduce, d, held * FP32_BYTES / pieces)] * pieces
    else:
        piece_bytes = held * FP32_BYTES / pieces
        scatters = pieces * zero_passes(cell)
        # Stage 3 gathers each unit before its forward and its backward, but under a pipeline
        # once a step (it keeps the unit until the step's gradients are reduced).
        gathers = pieces * (2 * m if cell.zero_stage == 3 and cell.pipeline == 1 else 1)
        costs = ([links.seconds(profile.reducescatter, d, piece_bytes)] * scatters
                 + [links.seconds(profile.allgather, d, piece_bytes)] * gathers)
        hideable = {1: BACKWARD_SHARE / m, 2: BACKWARD_SHARE, 3: 1.0}[cell.zero_stage] * compute_s
    total = sum(costs)
    return max(costs[-1], total - profile.backward_overlap * hideable)


def oversubscription(profile: HardwareProfile, ranks_on_host: Optional[int]) -> float:
    """How much slower a rank's CPU work runs when a host's ranks outnumber its cores (module docstring)."""
    if not profile.host_cores or not ranks_on_host:
        return 1.0
    return max(1.0, ranks_on_host / profile.host_cores)


def step_seconds(shape: Shape, cell: Cell, settings: Settings, fusion_bytes: int, profile: HardwareProfile,
                 ranks_on_host: Optional[int] = None) -> Dict[str, float]:
    """Seconds per optimizer step by part, with their sum under "total"."""
    links = Links(profile, cycle_time_ms(settings, cell, profile))
    m, p = cell.grad_accum_steps, cell.pipeline
    per_stage = [micro_batch_compute_s(shape, cell, s, settings, profile) for s in range(p)]
    tensor = [tensor_s(shape, cell, s, settings, links) for s in range(p)]
    slowest = max(range(p), key=lambda s: per_stage[s] + tensor[s])
    sends = send_s(shape, cell, links)
    fullest = max(range(p), key=lambda s: stage_parameters(shape, cell, s))
    held = stage_parameters(shape, cell, fullest)
    units = stage_layers(shape.layers, p)[fullest] + 1  # its layers and the rest of its part
    parts = {
        "compute": m * per_stage[slowest],
        # m rounds at the slowest stage's pace, and the fill and drain through the others.
        "bubble": sum(per_stage[s] + tensor[s] + sends for s in range(p) if s != slowest),
        "tensor": m * tensor[slowest],
        "pipeline_sends": m * sends + (profile.pipeline_s_per_step if p > 1 else 0.0),
        "data": data_s(cell, units, held, m * per_stage[slowest], fusion_bytes, links),
        "zero_work": zero_work_s(cell, held, profile),
        "optimizer": profile.optimizer_s_per_parameter * held / (cell.data if cell.zero_stage >= 1 else 1),
    }
    stretch = oversubscription(profile, ranks_on_host)
    parts = {name: seconds * (stretch if name in CPU_WORK else 1.0) for name, seconds in parts.items()}
    return {**parts, "total": sum(parts.values())}
