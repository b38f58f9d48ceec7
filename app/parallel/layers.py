"""The repeated blocks of a plain model, the unit that sharding and activation checkpointing
work in: LLaMA's decoder layers (model.layers), BERT's encoder layers (bert.encoder.layer).
Found by shape, not by name, so the model code needs no hooks for either."""
import functools
from typing import List

import torch
from torch.utils.checkpoint import checkpoint


def transformer_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The blocks of the ModuleList (or a pipeline stage's ModuleDict) holding most of the
    model's parameters."""
    lists = [list(m.values()) if isinstance(m, torch.nn.ModuleDict) else list(m) for m in model.modules()
             if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of layers to shard or checkpoint; "
                         "use parallel.zero_stage=0 and train.activation_checkpointing=none")
    return max(lists, key=lambda blocks: sum(p.numel() for block in blocks for p in block.parameters()))


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing is kept for backward anyway
        return forward(*args, **kwargs)
    # Non-reentrant: works with keyword arguments and with inputs that need no gradient, and
    # restores the RNG (dropout) and autocast state when it recomputes.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every: int) -> List[int]:
    """Recompute the chosen layers' activations in backward (train.activation_checkpointing:
    none | full | every_k); returns the indices of those layers. The layer's own forward is
    wrapped, not the module, so state-dict keys and module hooks (ZeRO stage 3's gathers) stay
    as they were and the recompute runs the bare forward without firing those hooks again."""
    if mode == "none":
        return []
    chosen = []
    for index, layer in enumerate(transformer_layers(model)):
        if mode == "full" or index % every == 0:
            layer.forward = functools.partial(_recomputed, layer.forward)
            chosen.append(index)
    return chosen
