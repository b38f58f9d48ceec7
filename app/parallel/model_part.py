"""This rank's part of a plain model, cut from outside in torchtitan's order: first its pipeline
stage (app/parallel/stages.py), then its tensors split across the tensor set
(app/parallel/tensor.py). Each parameter it holds gets its placement (app/parallel/placement.py),
which is all that checkpoints, clipping and the rebuilt whole model read of the layout.

(The tensor split runs on the whole model before the cut, so the stage's modules are already the
split ones; the cut only chooses which of them this rank runs.)

A fresh model arrives on the meta device and is split and cut there; `materialize` then makes
real only what this rank holds, each parameter its box of the seeded global tensor
(app/initialization.py), so building peaks at the rank's share plus one global tensor.
"""
from typing import Dict, Optional

import torch

from app import dist
from app.initialization import Initializer, materialize_buffers
from app.parallel.placement import Placement
from app.parallel.stages import Stage
from app.parallel.tensor import parallelize
from app.parallel.tensor_layers import TensorGroup


class ModelPart:
    def __init__(self, model: torch.nn.Module):
        mesh = dist.mesh()
        self.mesh, self.coordinates = mesh, mesh.coordinates(dist.rank())
        self.whole = model  # the plain model object: split in place, and its other stages freed
        self.initializer: Optional[Initializer] = None  # a fresh model's, once materialized
        self.tensor_group: Optional[TensorGroup] = None
        splits: Dict[str, int] = {}
        if mesh.tensor > 1:
            self.tensor_group = TensorGroup(dist.process_set("tensor"), mesh.tensor, self.coordinates["tensor"])
            splits = parallelize(model, self.tensor_group)
        self.stage: Optional[Stage] = None
        if mesh.pipeline > 1:
            self.stage = Stage(model, self.coordinates["pipeline"], mesh.pipeline)
        self.module = self.stage if self.stage is not None else model  # what this rank runs and trains
        self.splits = splits
        self.global_names: Dict[str, str] = (dict(self.stage.full_names) if self.stage is not None else
                                             {name: name for name, _ in model.named_parameters()})
        # A tied weight under a pipeline: this rank's local name for it on the first or last stage.
        self.tied: Optional[str] = None
        if self.stage is not None and self.stage.tied_name is not None:
            self.tied = self.local_names().get(self.stage.tied_name)
        self.placements: Dict[str, Placement] = {
            local: self._placement(self.global_names[local], param) for local, param in self.module.named_parameters()}
        if self.stage is not None:
            self.stage.free_others()

    def _placement(self, name: str, param: torch.Tensor) -> Placement:
        # The tied weight's two ends hold equal copies (app/parallel/tied.py): replicated along the
        # pipeline too, so the first stage's copy alone counts in a norm and is saved.
        replicated = ("data", "tensor", "pipeline") if self.tied is not None and name == self.stage.tied_name \
            else ("data", "tensor")
        if name not in self.splits:
            return Placement.whole(name, param.shape, replicated)
        dim, parts = self.splits[name], self.mesh.tensor
        shape = list(param.shape)
        shape[dim] *= parts
        return Placement.whole(name, shape, replicated).split(dim, parts, self.coordinates["tensor"], "tensor")

    # --- a fresh model, built on the meta device -------------------------------------------------
    def materialize(self, initializer: Initializer, device: torch.device, values: bool) -> None:
        """This rank's meta tensors made real on `device`: its buffers computed, and each parameter
        its box of the seeded global tensor (`values`), or an empty shell of its shape that ZeRO
        fills slice by slice (app/parallel/flat.py). Swapped in place (torch.utils.swap_tensors),
        so the Parameter objects, and the ties between them, stay."""
        self.initializer = initializer
        materialize_buffers(self.whole, self.module.modules(), device)
        for local, param in self.module.named_parameters():
            real = torch.empty(param.shape, dtype=param.dtype, device=device)
            if values:
                real.copy_(self.initial_value(local))
            else:
                real.untyped_storage().resize_(0)
            torch.utils.swap_tensors(param, torch.nn.Parameter(real, requires_grad=param.requires_grad))

    def initial_value(self, local_name: str) -> torch.Tensor:
        """This rank's box of a parameter's fresh global tensor (a CPU view of it)."""
        placement = self.placements[local_name]
        return self.initializer.tensor(placement.name)[placement.box]

    # --- what the layout asks of the part ---------------------------------------------------------
    @property
    def is_whole(self) -> bool:
        """No pipeline cut and no tensor split: the rank holds the whole model."""
        return self.stage is None and self.tensor_group is None

    def local_names(self) -> Dict[str, str]:
        """Global name -> this rank's name for it."""
        return {g: local for local, g in self.global_names.items()}

    def counted_in_model(self, local_name: str) -> bool:
        """Whether this rank's copy counts in a sum over the tensor and pipeline ranks: a box the
        tensor set replicates counts on its first rank only."""
        return self.placements[local_name].counted({**self.coordinates, "data": 0})

    def pieces(self, model_state: Dict[str, torch.Tensor], named_optimizer: dict, every_box: bool = False) -> dict:
        """This rank's counted boxes (or all it holds), for a whole model to be assembled from:
        (placement, tensor) per parameter, and per optimizer-state key."""
        counted = [local for local, p in self.placements.items() if every_box or p.counted(self.coordinates)]
        return {"model": [(self.placements[local], model_state[local]) for local in counted],
                "optimizer": [(self.placements[local], named_optimizer["state"][local])
                              for local in counted if local in named_optimizer["state"]],
                "groups": named_optimizer["groups"]}
