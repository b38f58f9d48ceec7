"""Where each rank sits in a pipeline x data x tensor layout (torchtitan's ParallelDims).

Ranks are numbered tensor-fastest: rank = (pipeline_index * data + data_index) * tensor +
tensor_index. So a tensor-parallel group is `tensor` consecutive ranks, which launchers place on
one node (its traffic, every layer, stays inside the node), and pipeline stages, which exchange
only activations, are the farthest apart, as in Megatron-LM's default order.
"""
from dataclasses import dataclass
from typing import Dict, List

DIMENSIONS = ("pipeline", "data", "tensor")


@dataclass(frozen=True)
class Mesh:
    world: int
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self):
        for name in ("tensor", "pipeline"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be at least 1")
        if self.world % (self.tensor * self.pipeline):
            raise ValueError(
                f"{self.world} ranks cannot be split into pipeline {self.pipeline} x tensor {self.tensor} groups; "
                f"launch a multiple of {self.tensor * self.pipeline} ranks or change parallel.tensor/parallel.pipeline")

    @property
    def data(self) -> int:
        return self.world // (self.tensor * self.pipeline)

    def sizes(self) -> Dict[str, int]:
        return {"pipeline": self.pipeline, "data": self.data, "tensor": self.tensor}

    def coordinates(self, rank: int) -> Dict[str, int]:
        """This rank's index along each dimension."""
        return {"tensor": rank % self.tensor, "data": rank // self.tensor % self.data,
                "pipeline": rank // (self.tensor * self.data)}

    def rank_at(self, pipeline: int, data: int, tensor: int) -> int:
        return (pipeline * self.data + data) * self.tensor + tensor

    def group(self, rank: int, dimension: str) -> List[int]:
        """The ranks that differ from `rank` only along `dimension`, in order."""
        at = self.coordinates(rank)
        return [self.rank_at(**{**at, dimension: i}) for i in range(self.sizes()[dimension])]

    def groups(self, dimension: str) -> List[List[int]]:
        """Every group along `dimension`, each once, ordered by their first rank."""
        seen = {tuple(self.group(rank, dimension)) for rank in range(self.world)}
        return [list(group) for group in sorted(seen)]

    def describe(self, hosts: List[str]) -> dict:
        """The layout for a run's summary: sizes, and each rank's coordinates and host."""
        return {**self.sizes(), "ranks": [{"rank": r, "host": hosts[r], **self.coordinates(r)}
                                          for r in range(self.world)]}
