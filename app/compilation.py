"""torch.compile applied to a plain model from outside, as torchtitan applies it: after tensor
parallelism and activation checkpointing have changed the model, before the optimizer is wrapped.

- `model`: the task's loss, the whole model's forward and the cross-entropy on its logits, is
  one graph (and its backward another), as Hugging Face's Trainer compiles a model that computes
  its own loss: the most fusion (the logits' float cast and log-softmax fuse too), the longest
  warm-up, and every gradient appears at the end of one backward graph, so Horovod's
  allreduces start later (less overlap with backward).
- `regional`: each repeated block (a decoder layer) is compiled in place with
  `nn.Module.compile()`; the blocks share one graph, so the warm-up is one layer's, and
  gradients still appear layer by layer for Horovod to send.

Neither renames anything: parameter names, state dicts, checkpoints and Horovod's per-parameter
gradient hooks are the same as eager. Evaluation and generation run eagerly (`eager()`): their
shapes differ from training's and each would cost a warm-up of its own.
"""
from contextlib import contextmanager
from typing import Callable

import torch

from app.config import compilation_mode
from app.parallel.layers import transformer_layers


def apply(model: torch.nn.Module, loss_of: Callable, mode: str) -> Callable:
    """Compile as train.compile says; returns the loss function the step calls (loss_of(model, batch))."""
    mode = compilation_mode(mode)
    if mode == "model":
        return torch.compile(loss_of)
    if mode == "regional":
        for block in transformer_layers(model):
            # torch's automatic dynamic shapes: a causal LM's micro-batches all have one shape
            # (one graph); padded encoder batches that vary get one shape-generic graph.
            block.compile()
    return loss_of


@contextmanager
def eager():
    """Run compiled modules eagerly inside (evaluation, generation): other shapes, no warm-up."""
    with torch.compiler.set_stance("force_eager"):
        yield
