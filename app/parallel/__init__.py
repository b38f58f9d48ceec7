"""Ways of splitting training across ranks, applied to a plain model from outside, in
torchtitan's order, each concern one object (app/parallel/layout.py composes them):

1. cut this rank's pipeline stage (stages.py) and 2. split its tensors across the tensor set
   (tensor.py): the rank's part and its placements (model_part.py, placement.py);
3. activation checkpointing (layers.py); 4. compile (app/compilation.py, applied by the step);
5. the data dimension's gradient handling over the data set (data.py, zero.py), and a tied
   embedding's between a pipeline's ends (tied.py);
6. the schedule: plain, or a pipeline's GPipe or 1F1B (pipeline.py).
"""
from typing import Optional

import torch

from app import dist, models
from app.initialization import Initializer
from app.parallel import data, tied
from app.parallel.base import Parallelism
from app.parallel.layers import apply_activation_checkpointing
from app.parallel.layout import Layout
from app.parallel.model_part import ModelPart
from app.parallel.pipeline import PipelineSchedule
from app.parallel.zero import Zero


def build(cfg, model: torch.nn.Module, device: torch.device, initializer: Optional[Initializer]) -> Parallelism:
    """The layout the config asks for, applied to a plain model: a fresh one (`initializer`) split
    and cut on the meta device, then made real on `device`, only what this rank holds; ZeRO fills
    its slices itself, a unit at a time. A loaded one (model.init_from) is already on `device`."""
    part = ModelPart(model)
    zero = cfg.parallel.zero_stage > 0
    if initializer is not None:
        part.materialize(initializer, device, values=not zero)
    apply_activation_checkpointing(part.module, cfg.train.activation_checkpointing,
                                   cfg.train.activation_checkpointing_every)
    mesh, accum = part.mesh, cfg.train.grad_accum_steps
    data_set = dist.process_set("data")
    if zero:
        sync = Zero(part.module, cfg.parallel.zero_stage, cfg.sync, accum, data_set,
                    pipelined=part.stage is not None, counted=part.counted_in_model,
                    initial=part.initial_value if initializer is not None else None)
    else:
        sync = data.build(part.module, cfg.sync, accum, data_set)
    schedule = None
    if part.stage is not None:
        # The last stage's loss from its logits: the vocabulary-parallel one when tensors are split.
        loss_of_logits = models.logits_loss(model)
        schedule = PipelineSchedule(part.stage, part.coordinates, mesh.pipeline, cfg, loss_of_logits)
    return Layout(part, sync, schedule, tied.build(part))
