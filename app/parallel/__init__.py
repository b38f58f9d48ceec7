"""Ways of splitting training across ranks, applied to a plain model from outside, in
torchtitan's order, each concern one object (app/parallel/layout.py composes them):

1. cut this rank's pipeline stage (stages.py) and 2. split its tensors across the tensor set
   (tensor.py): the rank's part and its placements (model_part.py, placement.py);
3. activation checkpointing (layers.py); 4. compile (app/compilation.py, applied by the step);
5. the data dimension's gradient handling over the data set (data.py, zero.py), and a tied
   embedding's between a pipeline's ends (tied.py);
6. the schedule: plain, or a pipeline's GPipe or 1F1B (pipeline.py).
"""
import torch

from app import dist, models
from app.parallel import data, tied
from app.parallel.base import Parallelism
from app.parallel.layers import apply_activation_checkpointing
from app.parallel.layout import Layout
from app.parallel.model_part import ModelPart
from app.parallel.pipeline import PipelineSchedule
from app.parallel.zero import Zero


def build(cfg, model: torch.nn.Module) -> Parallelism:
    """The layout the config asks for, applied to a plain model."""
    part = ModelPart(model)
    apply_activation_checkpointing(part.module, cfg.train.activation_checkpointing,
                                   cfg.train.activation_checkpointing_every)
    mesh, accum = part.mesh, cfg.train.grad_accum_steps
    data_set, root = dist.process_set("data"), mesh.group(dist.rank(), "data")[0]
    if cfg.parallel.zero_stage:
        sync = Zero(part.module, cfg.parallel.zero_stage, cfg.sync, accum, data_set, root,
                    pipelined=part.stage is not None, counted=part.counted_in_model)
    else:
        sync = data.build(part.module, cfg.sync, accum, data_set, root)
    schedule = None
    if part.stage is not None:
        # The last stage's loss from its logits: the vocabulary-parallel one when tensors are split.
        loss_of_logits = models.logits_loss(model)
        schedule = PipelineSchedule(part.stage, part.coordinates, mesh.pipeline, cfg, loss_of_logits)
    return Layout(part, sync, schedule, tied.build(part))
