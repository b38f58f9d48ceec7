"""A step's micro-batches, prepared ahead by a background thread while the model computes.

A step's batches are a pure function of where its global batch starts in the sample stream
(app/data.py; MLM masks are seeded by that position too), so preparing them early changes
nothing: the thread prepares the steps that follow in order, and a step takes the batches made
for its own position. A request for another position (a resume, a second loop over the same
task) drops what was prepared and starts again there. Knows nothing of Horovod or the model.
"""
import queue
import threading
from typing import List, Optional, Tuple

import torch

# The micro-batches (CPU tensors), their real tokens, and the global sample indices each holds.
Prepared = Tuple[List[dict], int, List[range]]
# How long a blocked thread waits before looking at its stop flag again.
_POLL_S = 0.1


class BatchPrefetcher:
    """Serves one task: one rank's slice of one world's global batches. A rank of another
    world needs another prefetcher (app/step.py, Training.use_world)."""

    def __init__(self, task, accum_steps: int, depth: int, pin_memory: bool = False):
        """`depth` steps are prepared ahead (0: each step's batches are made when asked for);
        `pin_memory` for a faster asynchronous copy to a GPU."""
        self.task = task
        self.accum_steps = accum_steps
        self.depth = depth
        self.pin_memory = pin_memory
        self.step_samples = task.stream.global_batch
        self._next: Optional[int] = None  # the position the next get() is expected at
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def prepare(self, samples_before: int) -> Prepared:
        batches = [self.task.micro_batch(samples_before, i) for i in range(self.accum_steps)]
        tokens = sum(self.task.tokens_in(batch) for batch in batches)
        samples = [self.task.stream.samples_at(samples_before, i) for i in range(self.accum_steps)]
        if self.pin_memory:
            batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        return batches, tokens, samples

    def get(self, samples_before: int) -> Prepared:
        """The micro-batches of the step whose global batch starts at sample `samples_before`."""
        if self.depth == 0:
            return self.prepare(samples_before)
        if samples_before != self._next:
            self._restart(samples_before)
        position, prepared = self._queue.get()
        if isinstance(prepared, BaseException):
            raise prepared
        assert position == samples_before, (position, samples_before)
        self._next = samples_before + self.step_samples
        return prepared

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._next = None

    def _restart(self, samples_before: int) -> None:
        self.close()
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(samples_before, self._queue, self._stop),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()
        self._next = samples_before

    def _run(self, position: int, out: "queue.Queue", stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (position, self.prepare(position))
            except Exception as error:  # noqa: BLE001 -- handed to the training thread, raised there
                item = (position, error)
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            position += self.step_samples
