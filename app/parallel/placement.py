"""What each parameter a rank holds is of the whole model (DTensor's Shard/Replicate idea, in
plain data): its global name and shape, the box of the global tensor it holds, and the mesh
dimensions over which identical copies of that box live.

Everything that must see the whole model through the layouts reads placements, never a
layout's class: gradient clipping counts a replicated box once, checkpoints write each counted
box with its offsets and read this rank's box from any layout's (app/sharded_checkpoint.py), and
the whole model is rebuilt from the boxes for evaluation or a sample. A ZeRO slice holds a
flat range of a box (`FlatRange`), which is what it writes.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import torch


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

    def flat_range(self, offset: int, length: int) -> "FlatRange":
        """Elements [offset, offset + length) of this box in row-major order: what a ZeRO slice
        holds of it."""
        return FlatRange(self.name, self.shape, self.offsets, self.sizes, offset, length)

    def counted(self, coordinates: Dict[str, int]) -> bool:
        """Whether this rank's copy is the one that counts in a sum over the mesh (a global
        norm): the first along every dimension that replicates it."""
        return all(coordinates[d] == 0 for d in self.replicated)


@dataclass(frozen=True)
class FlatRange:
    """A contiguous run of a box's row-major elements (app/sharded_checkpoint.py's flat entries)."""
    name: str
    shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    flat_offset: int
    flat_length: int


def assemble(pieces: Iterable[Tuple[Placement, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Global tensors from boxes (each box at least once; copies of a box are equal), keyed by
    global name, in the order names are first met."""
    full: Dict[str, torch.Tensor] = {}
    for placement, tensor in pieces:
        if placement.name not in full:
            full[placement.name] = tensor.new_empty(placement.shape)
        full[placement.name][placement.box] = tensor
    return full
