"""Tied embeddings under a pipeline, as Megatron-LM's embedding group keeps them: the first stage
holds the embedding, the last stage its own copy of the same weight as its LM head (the cut,
app/parallel/stages.py, gives it one). One process adds the head's gradient to the embedding's
in the one weight; here the two ends add each other's, once each has its gradient synchronised
over its data set, so both copies take identical steps and stay equal. Middle stages hold
neither. The placements count and save the first stage's copy only (app/parallel/model_part.py).
"""
from typing import Optional

import torch

from app import dist


class TiedEmbedding:
    def __init__(self, weight: torch.nn.Parameter, ends):
        self.weight = weight  # this end's copy: the embedding, or the LM head
        self.ends = ends  # an MPI communicator of the two ends of this rank's pipeline

    def sum_gradients(self) -> None:
        """Both ends' gradients summed, on both ends: MPI reads host memory, in fp32 (a CPU fp32
        gradient is reduced in place). Two addends, so both ends get the same bits."""
        grad = self.weight.grad
        wire = grad.detach().to("cpu", torch.float32).contiguous()
        self.ends.Allreduce(dist.mpi_in_place(), wire.numpy(), op=dist.mpi_op("sum"))
        grad.copy_(wire)


def build(part) -> Optional[TiedEmbedding]:
    """The tied weight's gradient sum on the ends of a pipeline of a tied model, else None."""
    if part.stage is None or part.stage.tied_name is None:
        return None
    from mpi4py import MPI  # a pipeline runs under an MPI launch only (app/dist.py refuses others)

    # Split is a collective of the whole pipeline: every stage calls it, the middle ones for nothing.
    ends = dist.mpi_communicator("pipeline").Split(color=0 if part.tied is not None else MPI.UNDEFINED,
                                                   key=part.coordinates["pipeline"])
    if part.tied is None:
        return None
    return TiedEmbedding(dict(part.module.named_parameters())[part.tied], ends)
