"""torch.compile applied to a plain model from outside, as torchtitan applies it: after tensor
parallelism and activation checkpointing have changed the model, before the optimizer is wrapped.

- `model`: the whole model is one graph (forward and backward each fused across layers): the
  most fusion, the longest warm-up, and every gradient appears at the end of one backward graph,
  so Horovod's allreduces start later (less overlap with backward).
- `regional`: each repeated block (a decoder layer) is compiled; the blocks share one graph, so
  the warm-up is one layer's, and gradients still appear layer by layer for Horovod to send.

Both use `nn.Module.compile()`, which compiles the module's call in place: parameter names,
state dicts, checkpoints and Horovod's per-parameter gradient hooks are the same as eager.
Evaluation and generation run eagerly (`eager()`): their shapes differ from training's and
each would cost a warm-up of its own.
"""
from contextlib import contextmanager
from typing import List

import torch

from app.config import compilation_mode


def repeated_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The blocks of the model's longest nn.ModuleList: a transformer's layers (LLaMA's
    model.layers, BERT's encoder.layer), whatever wrappers a layout put around them."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"train.compile=regional needs a model with repeated layers; {type(model).__name__} "
                         "has no nn.ModuleList; use train.compile=model")
    return list(max(lists, key=len))


def apply(model: torch.nn.Module, mode: str) -> List[torch.nn.Module]:
    """Compile `model` in place as train.compile says; returns the modules compiled."""
    mode = compilation_mode(mode)
    if mode == "false":
        return []
    compiled = [model] if mode == "model" else repeated_blocks(model)
    for module in compiled:
        # torch's automatic dynamic shapes: a causal LM's micro-batches all have one shape (one
        # graph); padded encoder batches that vary get one shape-generic graph, not one each.
        module.compile()
    return compiled


@contextmanager
def eager():
    """Run compiled modules eagerly inside (evaluation, generation): other shapes, no warm-up."""
    with torch.compiler.set_stance("force_eager"):
        yield
