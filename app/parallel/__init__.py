"""Ways of splitting training across ranks, each an implementation of `base.Parallelism`."""
import torch

from app.parallel.base import Parallelism
from app.parallel.data import Adasum, DataParallel, LocalSGD
from app.parallel.pipeline import PipelineParallel


def build(cfg, model: torch.nn.Module) -> Parallelism:
    """The layout the config asks for, applied to a plain model."""
    if cfg.parallel.pipeline > 1:
        return PipelineParallel(model, cfg)
    if not cfg.sync.gradient_allreduce:
        return LocalSGD(model, cfg.sync, cfg.train.grad_accum_steps)
    if cfg.sync.op == "adasum":
        return Adasum(model, cfg.sync, cfg.train.grad_accum_steps)
    return DataParallel(model, cfg.sync, cfg.train.grad_accum_steps)
