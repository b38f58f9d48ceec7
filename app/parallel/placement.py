"""What each parameter a rank holds is of the whole model (DTensor's Shard/Replicate idea, in
plain data): its global name and shape, the box of the global tensor it holds, and the mesh
dimensions over which identical copies of that box live.

Everything that must see the whole model through the layouts reads placements, never a
layout's class: gradient clipping counts a replicated box once, checkpoints cut a global tensor
into this rank's box on load and put the boxes back together on save, and the whole model is
rebuilt from the boxes for evaluation or a sample.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import torch

from app.state_dicts import is_per_element


@dataclass(frozen=True)
class Placement:
    name: str  # the parameter's name in the plain model
    shape: Tuple[int, ...]  # the global tensor's shape
    offsets: Tuple[int, ...]  # where this rank's box starts along each dimension
    sizes: Tuple[int, ...]  # the box's shape: the local parameter's
    replicated: Tuple[str, ...]  # mesh dimensions holding identical copies of the box

    @staticmethod
    def whole(name: str, shape, replicated: Iterable[str]) -> "Placement":
        shape = tuple(shape)
        return Placement(name, shape, (0,) * len(shape), shape, tuple(replicated))

    def split(self, dim: int, parts: int, index: int, over: str) -> "Placement":
        """This box cut into `parts` equal pieces along `dim`, piece `index`; no longer
        replicated over `over`, the dimension that now holds the other pieces."""
        piece = self.sizes[dim] // parts
        offsets, sizes = list(self.offsets), list(self.sizes)
        offsets[dim] += index * piece
        sizes[dim] = piece
        return Placement(self.name, self.shape, tuple(offsets), tuple(sizes),
                         tuple(d for d in self.replicated if d != over))

    @property
    def box(self) -> Tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's box of the global tensor `full`, as its own contiguous tensor."""
        if tuple(full.shape) != self.shape:
            raise ValueError(f"saved tensor {self.name} has shape {tuple(full.shape)}, this model {self.shape}; "
                             "use the model config it was trained with")
        return full[self.box].clone(memory_format=torch.contiguous_format)

    def counted(self, coordinates: Dict[str, int]) -> bool:
        """Whether this rank's copy is the one that counts in a sum over the mesh (a global
        norm): the first along every dimension that replicates it."""
        return all(coordinates[d] == 0 for d in self.replicated)


def assemble(pieces: Iterable[Tuple[Placement, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Global tensors from boxes (each box at least once; copies of a box are equal), keyed by
    global name, in the order names are first met."""
    full: Dict[str, torch.Tensor] = {}
    for placement, tensor in pieces:
        if placement.name not in full:
            full[placement.name] = tensor.new_empty(placement.shape)
        full[placement.name][placement.box] = tensor
    return full


def assemble_state(entries: Iterable[Tuple[Placement, dict]]) -> Dict[str, dict]:
    """Optimizer state per global name from each box's entry: per-element values (Adam's
    moments) assembled like their parameters, scalars (its step) taken from any box."""
    by_key: Dict[str, Dict[str, list]] = {}
    for placement, entry in entries:
        for key, value in entry.items():
            by_key.setdefault(placement.name, {}).setdefault(key, []).append((placement, value))
    return {name: {key: assemble(pieces)[name] if is_per_element(pieces[0][1]) else pieces[0][1]
                   for key, pieces in keys.items()}
            for name, keys in by_key.items()}


def cut_state(placements: Dict[str, Placement], model_state: Dict[str, torch.Tensor], named_optimizer: dict) -> dict:
    """A rank's part of a whole model's weights and of a plain optimizer's by-name state (global
    names), keyed by its local names: per-element state cut like its parameter, scalars (Adam's
    step) as they are."""
    missing = [p.name for p in placements.values() if p.name not in model_state]
    if missing:
        raise ValueError(f"saved weights lack {missing[:3]}; use the model config they were trained with")
    state = {}
    for local, placement in placements.items():
        entry = named_optimizer["state"].get(placement.name)
        if entry is not None:
            state[local] = {k: placement.cut(v) if is_per_element(v) else v for k, v in entry.items()}
    return {"model": {local: p.cut(model_state[p.name]) for local, p in placements.items()},
            "optimizer": {"state": state, "groups": named_optimizer["groups"]}}
