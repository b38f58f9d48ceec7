"""The initial weights, the same bits whatever the layout: each global parameter drawn from its own
generator, seeded by (train.seed, its global name), with the distribution transformers'
`_init_weights` gives it. A rank draws a global tensor only to keep its box of it, so a layout
never changes what any rank holds of the whole, and nothing needs sending at start.

The distributions (transformers 5, PreTrainedModel._init_weights and BertPreTrainedModel's):
Linear weights and Embedding rows normal(0, initializer_range), biases zero, an Embedding's
padding row zero, LayerNorm/RMSNorm gains one and biases zero, BERT's LM-head bias zero. A tied
weight (an LM head sharing the embedding) takes the spec of the module it is registered in first,
the embedding, as `named_parameters` names it. Buffers (rotary inverse frequencies, BERT's
position and token-type ids) are computed by the model's own `_init_weights`.

Knows nothing of Horovod: it works on a plain model built on the meta device (app/step.py).
"""
import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

# transformers' fallback where a config's initializer_range is 0 or unset (`... or 0.02`).
TRANSFORMERS_DEFAULT_STD = 0.02


@dataclass(frozen=True)
class Init:
    """How one global parameter starts."""
    fill: str  # "normal" (mean 0, `std`), "ones" or "zeros"
    shape: Tuple[int, ...]
    dtype: torch.dtype
    std: float = 0.0
    zero_row: Optional[int] = None  # an Embedding's padding row, zero after the draw


def _module_inits(module: nn.Module) -> Dict[str, Tuple[str, Optional[int]]]:
    """(fill, zero row) of a module's own parameters, as `_init_weights` treats its type."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return {"weight": ("normal", None), "bias": ("zeros", None)}
    if isinstance(module, nn.Embedding):
        return {"weight": ("normal", module.padding_idx)}
    if "LayerNorm" in kind or "RMSNorm" in kind:
        return {"weight": ("ones", None), "bias": ("zeros", None)}
    if kind == "BertLMPredictionHead":
        return {"bias": ("zeros", None)}
    return {}


def plan(model: nn.Module) -> Dict[str, Init]:
    """Each parameter of the plain model (by `named_parameters` name) and how it starts."""
    std = getattr(model.config, "initializer_range", None) or TRANSFORMERS_DEFAULT_STD
    by_id: Dict[int, Init] = {}
    for module in model.modules():
        kinds = _module_inits(module)
        for attribute, param in module.named_parameters(recurse=False):
            if attribute in kinds and id(param) not in by_id:
                fill, zero_row = kinds[attribute]
                by_id[id(param)] = Init(fill, tuple(param.shape), param.dtype, std if fill == "normal" else 0.0,
                                        zero_row)
    inits = {}
    for name, param in model.named_parameters():
        if id(param) not in by_id:
            raise ValueError(f"no initialisation known for {name} of {type(model).__name__}; "
                             "add its module type to app/initialization.py")
        inits[name] = by_id[id(param)]
    return inits


def seed_of(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run's seed and a global name (sha256: Python's hash() is
    salted per process, so ranks would disagree)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Initializer:
    """The global tensors of one plain model's fresh start, drawn one at a time on the CPU (a
    CUDA generator draws other numbers: CPU draws give the same bits on any device)."""

    def __init__(self, model: nn.Module, seed: int):
        self.inits, self.seed = plan(model), seed

    def tensor(self, name: str) -> torch.Tensor:
        init = self.inits[name]
        if init.fill == "ones":
            return torch.ones(init.shape, dtype=init.dtype)
        if init.fill == "zeros":
            return torch.zeros(init.shape, dtype=init.dtype)
        generator = torch.Generator().manual_seed(seed_of(self.seed, name))
        values = torch.empty(init.shape, dtype=init.dtype).normal_(0.0, init.std, generator=generator)
        if init.zero_row is not None:
            values[init.zero_row] = 0.0
        return values


def materialize_buffers(model: nn.Module, modules, device: torch.device) -> None:
    """The meta buffers of `modules` (of `model`, a transformers model) made real on `device` and
    computed by the model's `_init_weights`, as its constructor computes them."""
    for module in modules:
        buffers = {name: b for name, b in module.named_buffers(recurse=False) if b.is_meta}
        if not buffers:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            # `_init_weights` would redraw its parameters from the global RNG.
            raise ValueError(f"{type(module).__name__} holds parameters and buffers; "
                             "app/initialization.py cannot compute its buffers alone")
        for name, buffer in buffers.items():
            module._buffers[name] = torch.empty_like(buffer, device=device)
        model._init_weights(module)
