"""Peak bytes per rank of a cell: model state, activations, the layout's transient working set
and the process itself. Each term's assumption:

- Model state (ZeRO paper, section 5): fp32 weights (4 bytes), fp32 gradients (4; Horovod has no
  bf16 collectives) and the optimizer's state (app/plan/state.py) for the parameters this rank's
  pipeline stage and tensor shard hold; ZeRO divides them by the data size from stages 3, 2, 1.
  A stage holds its layers (app/parallel/stages.py layer_bounds), the first also the embeddings,
  the last the final norm and head (and under a pipeline a tied head's own copy). Tensor
  parallelism divides every parameter by `tensor`: its replicated norms are too small to matter.
- Activations per layer and micro-batch: Korthikanti et al. (2022), counted for a LLaMA layer
  with fused (sdpa, flash-style) attention, which keeps O(s) per head, so their 5as/h term drops:
  per token, the two fp32 residual inputs (2h x 4 bytes), and at the compute precision (4 bytes
  fp32, 2 bf16/fp16) the normalised inputs (2h), q, rotated q and the attention output (3h/t),
  k, v and rotated k (3kv/t), SwiGLU's gate, up, activation and product (4f/t). The loss keeps
  three fp32 copies of the logits (logits, softmax, their gradient) per token, V/t each. The
  profile's activation_factor scales the sum (calibration measures it; 1.0 in an uncalibrated profile).
- Checkpointing keeps a recomputed layer's fp32 input only, plus one layer's full activations
  while it is recomputed in backward. every_k recomputes layers 0, k, 2k, ...
- Micro-batches held: 1 without a pipeline (accumulation runs them one after another); under a
  pipeline what the stage's schedule holds at its peak (GPipe all m, 1F1B at most P - stage).
- Working set: bf16/fp16 autocast caches a low-precision copy of every weight it casts (not at
  ZeRO-3, app/parallel/zero.py); ZeRO-3 holds two gathered fp32 units (one prefetched); ZeRO-1/2
  two units' flat reduce-scatter or gather buffers; plain data parallelism Horovod's fusion
  buffer; tensor parallelism and a pipeline two fp32 activation-sized buffers each (the
  collectives' and the sends' copies).
- The process baseline from the profile (calibration measures it).
"""
import functools
from typing import Dict, Tuple

from app.parallel.pipeline_schedule import actions, most_activations_held
from app.parallel.stages import layer_bounds
from app.plan.cell import Cell, Settings, Shape
from app.plan.profile import HardwareProfile

FP32_BYTES = 4
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Logits, their softmax and their gradient, each fp32 (the loss upcasts).
LOGIT_COPIES = 3
# Units in flight at once: ZeRO's prefetch keeps the next one coming while one is used.
UNITS_IN_FLIGHT = 2
# Collective or send buffers of activation size: the outgoing and the incoming copy.
ACTIVATION_BUFFERS = 2


@functools.lru_cache(maxsize=None)
def stage_layers(layers: int, stages: int) -> Tuple[int, ...]:
    """Layers per pipeline stage (remembered: the grid asks for the same few cuts thousands of times)."""
    return tuple(len(bounds) for bounds in layer_bounds(layers, stages))


@functools.lru_cache(maxsize=None)
def micro_batches_held(schedule: str, stage: int, stages: int, micro_batches: int) -> int:
    """The most micro-batches whose activations `stage` holds at once under `schedule`."""
    return most_activations_held(actions(schedule, stage, stages, micro_batches))


def stage_parameters(shape: Shape, cell: Cell, stage: int) -> float:
    """Parameters one rank of `stage` holds before ZeRO (its tensor shard of them)."""
    held = stage_layers(shape.layers, cell.pipeline)[stage] * shape.layer_parameters
    if stage == 0:
        held += shape.first_parameters
    if stage == cell.pipeline - 1:
        held += shape.last_parameters + (shape.first_parameters if shape.tied and cell.pipeline > 1 else 0)
    return held / cell.tensor


def layer_activation_bytes_per_token(shape: Shape, cell: Cell, precision: str) -> float:
    t, width = cell.tensor, COMPUTE_BYTES[precision]
    return 2 * shape.hidden * FP32_BYTES + width * (
        2 * shape.hidden + (3 * shape.hidden + 3 * shape.kv_heads * shape.hidden // shape.heads + 4 * shape.ffn) / t)


def recomputed_layers(count: int, checkpointing: str, every: int) -> int:
    if checkpointing == "full":
        return count
    if checkpointing == "every_k":
        return len(range(0, count, every))
    return 0


def activation_bytes(shape: Shape, cell: Cell, stage: int, precision: str, every: int, factor: float) -> float:
    """Activations the stage holds at its peak, over all micro-batches in flight."""
    tokens = cell.micro_batch_size * shape.seq_len
    layers = stage_layers(shape.layers, cell.pipeline)[stage]
    recomputed = recomputed_layers(layers, cell.checkpointing, every)
    full = layer_activation_bytes_per_token(shape, cell, precision)
    per_micro_batch = tokens * ((layers - recomputed) * full + recomputed * shape.hidden * FP32_BYTES)
    if stage == cell.pipeline - 1:
        per_micro_batch += tokens * LOGIT_COPIES * FP32_BYTES * shape.vocab / cell.tensor
    held = 1
    if cell.pipeline > 1:
        held = micro_batches_held(cell.schedule, stage, cell.pipeline, cell.grad_accum_steps)
    recomputing = tokens * full if recomputed else 0  # one layer rebuilt during its backward
    return factor * (held * per_micro_batch + recomputing)


def working_set_bytes(shape: Shape, cell: Cell, held_parameters: float, precision: str, fusion_bytes: int) -> float:
    activation = cell.micro_batch_size * shape.seq_len * shape.hidden * FP32_BYTES
    largest_unit = max(shape.layer_parameters, shape.first_parameters + shape.last_parameters) / cell.tensor
    extra = 0.0
    if precision != "fp32" and cell.zero_stage < 3:
        extra += COMPUTE_BYTES[precision] * held_parameters
    if cell.zero_stage >= 1:
        extra += UNITS_IN_FLIGHT * largest_unit * FP32_BYTES
    elif cell.data > 1:
        extra += min(fusion_bytes, held_parameters * FP32_BYTES)
    extra += ACTIVATION_BUFFERS * activation * ((cell.tensor > 1) + (cell.pipeline > 1))
    return extra


def stage_bytes(shape: Shape, cell: Cell, stage: int, settings: Settings, optimizer_bytes: int, fusion_bytes: int,
                profile: HardwareProfile) -> Dict[str, float]:
    held = stage_parameters(shape, cell, stage)

    def share(from_stage: int) -> float:
        return held / cell.data if cell.zero_stage >= from_stage else held

    return {
        "parameters": FP32_BYTES * share(3), "gradients": FP32_BYTES * share(2),
        "optimizer_state": optimizer_bytes * share(1),
        "activations": activation_bytes(shape, cell, stage, settings.precision,
                                         settings.activation_checkpointing_every, profile.activation_factor),
        "working_set": working_set_bytes(shape, cell, held, settings.precision, fusion_bytes),
        "process": profile.process_baseline_bytes,
    }


def peak_bytes(shape: Shape, cell: Cell, settings: Settings, optimizer_bytes: int, fusion_bytes: int,
               profile: HardwareProfile) -> Dict[str, float]:
    """The fullest stage's breakdown, with its total under "total"."""
    stages = [stage_bytes(shape, cell, s, settings, optimizer_bytes, fusion_bytes, profile)
              for s in range(cell.pipeline)]
    fullest = max(stages, key=lambda parts: sum(parts.values()))
    return {**fullest, "total": sum(fullest.values())}
