"""Run under mpirun -np 2: rank 0 sends a bf16 and an fp32 tensor to rank 1 over the pipeline's
Link; rank 1 reports whether every bit arrived."""
import json
from types import SimpleNamespace

import torch

from app import dist
from app.parallel.p2p import ACTIVATION, GRADIENT, Link

dist.init(layout=SimpleNamespace(tensor=1, pipeline=2))
comm = dist.mpi_communicator("pipeline")
torch.manual_seed(0)
# Values whose bf16 patterns include the sign bit and subnormals: an int16 view must keep them.
sent = {"bf16": (torch.randn(3, 5, 7) * torch.logspace(-40, 30, 7)).to(torch.bfloat16),
        "fp32": torch.randn(3, 5, 7)}
link = {name: Link(comm, tensor.dtype) for name, tensor in sent.items()}
if comm.Get_rank() == 0:
    for kind, (name, tensor) in zip((ACTIVATION, GRADIENT), sent.items()):
        link[name].send(tensor, to=1, kind=kind, micro_batch=3)
    for each in link.values():
        each.finish()
else:
    received = {}
    for kind, (name, tensor) in zip((ACTIVATION, GRADIENT), sent.items()):
        request, buffer = link[name].post_receive(tensor.shape, source=0, kind=kind, micro_batch=3)
        request.Wait()
        received[name] = {"dtype": str(buffer.dtype), "bitwise_equal": bool(
            torch.equal(buffer.view(torch.int16 if name == "bf16" else torch.int32),
                        tensor.view(torch.int16 if name == "bf16" else torch.int32)))}
    print(json.dumps(received))
