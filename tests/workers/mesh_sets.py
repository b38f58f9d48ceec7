"""The layout's process sets, checked from inside a real job: each rank sums its global rank over
its tensor, data and pipeline groups and reports the sums with its coordinates."""
import json
import sys
from types import SimpleNamespace

import torch

from app import dist

tensor, pipeline = int(sys.argv[1]), int(sys.argv[2])
dist.init(layout=SimpleNamespace(tensor=tensor, pipeline=pipeline))
mine = torch.tensor([float(dist.rank())])
sums = {dimension: dist.sum_over_ranks(mine, name=f"sum_{dimension}", process_set=dist.process_set(dimension)).item()
        for dimension in ("tensor", "data", "pipeline")}
rows = dist.allgather_object({"rank": dist.rank(), **dist.mesh().coordinates(dist.rank()), "sums": sums,
                              "mpi_communicators": {d: dist.mpi_communicator(d) is not None for d in sums}},
                             name="rows")
if dist.is_main():
    print(json.dumps({"controller": dist.controller(), "rows": rows}))
