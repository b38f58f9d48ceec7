"""Ways of splitting training across ranks, each an implementation of `base.Parallelism`."""
import torch

from app import dist
from app.parallel.base import Parallelism
from app.parallel.data import Adasum, DataParallel, LocalSGD
from app.parallel.layers import apply_activation_checkpointing
from app.parallel.pipeline import PipelineParallel
from app.parallel.tensor import TensorParallel
from app.parallel.zero import Zero


def build(cfg, model: torch.nn.Module) -> Parallelism:
    """The layout the config asks for, applied to a plain model (torchtitan's parallelize order:
    activation checkpointing first, then how ranks split the work)."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every)
    if cfg.parallel.pipeline > 1:
        return PipelineParallel(model, cfg)
    if cfg.parallel.tensor > 1:  # config.validate allows only plain gradient averaging beside it
        return TensorParallel(model, cfg.sync, cfg.train.grad_accum_steps)
    if cfg.parallel.zero_stage:
        # Shards over the ranks that hold replicas: the world, or under tensor or pipeline
        # parallelism this rank's data-parallel group.
        return Zero(model, cfg.parallel.zero_stage, cfg.sync, cfg.train.grad_accum_steps, dist.process_set("data"))
    if not cfg.sync.gradient_allreduce:
        return LocalSGD(model, cfg.sync, cfg.train.grad_accum_steps)
    if cfg.sync.op == "adasum":
        return Adasum(model, cfg.sync, cfg.train.grad_accum_steps)
    return DataParallel(model, cfg.sync, cfg.train.grad_accum_steps)
