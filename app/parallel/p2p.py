"""Activations and their gradients between neighbouring pipeline stages, over MPI point-to-point.

Horovod has no send/recv, so mpi4py does it, on the pipeline's own MPI sub-communicator (Horovod
duplicates COMM_WORLD for its own traffic, so the two never match each other's messages).
Sends are non-blocking (Isend) and receives are posted ahead of need (Irecv), so a transfer
proceeds while the stage computes. MPI has no bfloat16 type: a bf16 tensor travels as its raw
16-bit pattern (an int16 view) and is viewed back on arrival, bit for bit.
"""
from collections import deque
from typing import Callable, List, Tuple

import torch

# Tags tell a micro-batch's activation from its gradient and from other micro-batches', so a
# receive posted early can only ever match the message it was posted for.
ACTIVATION, GRADIENT = 0, 1


def tag(kind: int, micro_batch: int) -> int:
    return 2 * micro_batch + kind


def raw_buffer(tensor: torch.Tensor):
    """A numpy view MPI can send or fill: bf16 as int16 bits, other dtypes as themselves."""
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


class Link:
    """This stage's sends and receives within one step."""

    def __init__(self, comm, wire_dtype: torch.dtype):
        self.comm = comm
        self.wire_dtype = wire_dtype
        self.sends: List[Tuple[object, torch.Tensor]] = []  # buffers stay alive until sent

    def send(self, tensor: torch.Tensor, to: int, kind: int, micro_batch: int) -> None:
        buffer = tensor.detach().to("cpu", self.wire_dtype).contiguous()
        request = self.comm.Isend(raw_buffer(buffer), dest=to, tag=tag(kind, micro_batch))
        self.sends.append((request, buffer))

    def post_receive(self, shape, source: int, kind: int, micro_batch: int):
        buffer = torch.empty(shape, dtype=self.wire_dtype)
        return self.comm.Irecv(raw_buffer(buffer), source=source, tag=tag(kind, micro_batch)), buffer

    def progress(self) -> None:
        """Let MPI move pending messages (it progresses only inside its own calls) and free the
        buffers of sends that are done."""
        self.sends = [(request, buffer) for request, buffer in self.sends if not request.Test()]

    def finish(self) -> None:
        """Wait until every send of the step has left."""
        for request, _ in self.sends:
            request.Wait()
        self.sends = []


class Inbox:
    """Receives posted `ahead` at a time, in the order the schedule consumes them."""

    def __init__(self, link: Link, expected: List[Tuple[int, int, int]], shape_of: Callable[[int], tuple],
                 ahead: int = 2):
        self.link = link
        self.expected = deque(expected)  # (kind, source, micro_batch)
        self.shape_of = shape_of
        self.posted = deque()
        for _ in range(ahead):
            self._post_next()

    def _post_next(self) -> None:
        if self.expected:
            kind, source, micro_batch = self.expected.popleft()
            self.posted.append((kind, micro_batch, self.link.post_receive(self.shape_of(micro_batch), source, kind,
                                                                          micro_batch)))

    def take(self, kind: int, micro_batch: int) -> torch.Tensor:
        posted_kind, posted_batch, (request, buffer) = self.posted.popleft()
        if (posted_kind, posted_batch) != (kind, micro_batch):
            raise RuntimeError(f"pipeline schedule out of order: wanted {(kind, micro_batch)}, "
                               f"next posted {(posted_kind, posted_batch)}")
        self._post_next()
        request.Wait()
        return buffer
