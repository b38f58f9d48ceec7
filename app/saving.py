"""The loop's checkpoint saves, synchronous or async, and what each costs the loop.

Synchronous (train.checkpoint_async=false): every rank writes its shard and rank 0 commits it
(app/checkpoint.py `save`) while the loop waits. Async: at the step boundary each rank copies
its shard (into pinned host memory from a GPU) and a background thread writes and fsyncs the
copy while training goes on. The thread only writes files: every collective (the staging
directory, the ranks' reports, the commit) stays on the main thread, since Horovod's object
helpers are not thread-safe. The commit runs at the next save, at the end of the run or on a
stop, after joining the writer: at most one save is in flight (as torchtitan's async
checkpoint), and a failed write raises the same SaveFailed, the previous checkpoint in use.

Per save this rank records the loop's stall (sync: the whole save; async: waiting for the
previous writer, its commit, and the copy), the write's seconds and bytes, and its peak
resident set from the save's start to its commit.
"""
import copy
import logging
import resource
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional

import psutil
import torch

from app import checkpoint
from app.sharded_checkpoint import Shard, model_file, optim_file

log = logging.getLogger("app.train")

# Often enough to see a save's serialisation buffers (each lives for a whole file's write),
# rarely enough that the sampling thread costs the loop nothing measurable.
RSS_SAMPLE_S = 0.005


class PeakSampler:
    """This process's resident set's peak from now until `stop`, sampled by a thread (ru_maxrss
    is the peak since the process started: it cannot isolate a save)."""

    def __init__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="checkpoint-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stopped.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, process.memory_info().rss)

    def stop(self) -> int:
        self._stopped.set()
        self._thread.join()
        return max(self.peak, psutil.Process().memory_info().rss)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy the loop cannot change: pinned host memory from a GPU (a fast DMA, and the writer
    reads host memory), a clone on the CPU."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
    return tensor.clone()


def copied(shard: Optional[Shard]) -> Optional[Shard]:
    """The shard with every tensor copied, so the writer's files hold this step's values while
    the optimizer changes the live ones. The extras (local SGD's replicas) are already copies:
    they arrive through an allgather."""
    if shard is None:
        return None
    weights = [(box, host_copy(tensor)) for box, tensor in shard.weights]
    state = [(box, key, host_copy(tensor)) for box, key, tensor in shard.state]
    scalars = {name: {key: host_copy(value) if torch.is_tensor(value) else value for key, value in entry.items()}
               for name, entry in shard.scalars.items()}
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed before the writer reads them
    return replace(shard, weights=weights, state=state, scalars=scalars, groups=copy.deepcopy(shard.groups))


@dataclass
class SaveRecord:
    """One save as this rank saw it; checkpoint_bytes (every file of the checkpoint) on rank 0 only."""
    step: int
    stall_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0
    peak_rss_bytes: int = 0
    checkpoint_bytes: int = 0


@dataclass
class Pending:
    """A save whose files this rank writes (or has written), not yet committed."""
    started: float
    record: SaveRecord
    sampler: PeakSampler
    staging: Path = Path()
    shard: Optional[Shard] = None
    state: Optional[checkpoint.TrainState] = None
    rng_states: list = field(default_factory=list)
    written: dict = field(default_factory=dict)
    thread: Optional[threading.Thread] = None

    def write(self, rank: int) -> None:
        started = time.perf_counter()
        try:
            self.written = checkpoint.write_shard(self.staging, rank, self.shard)
        except Exception as error:
            # Reported through the commit like a failed write: raised here, on one rank, it would
            # leave the others waiting in the commit's collectives.
            self.written = {"error": f"rank {rank} could not write its checkpoint files into {self.staging}: "
                                     f"{type(error).__name__}: {error}"}
        self.record.write_s = time.perf_counter() - started
        files = [self.staging / model_file(rank), self.staging / optim_file(rank)]
        self.record.bytes = sum(path.stat().st_size for path in files if path.is_file())


class Saver:
    """The run's saves on this rank; every method is a collective over `world`."""

    def __init__(self, run_dir: Path, model, keep_last: int, asynchronous: bool):
        self.run_dir, self.model, self.keep_last, self.asynchronous = run_dir, model, keep_last, asynchronous
        self.world = checkpoint.World()
        self.records: List[SaveRecord] = []
        self.training_peak_rss_bytes: Optional[int] = None
        self.pending: Optional[Pending] = None

    def start(self, step: int, world: checkpoint.World) -> Pending:
        """Before a save gathers its shard: the save in flight committed (its wait is this
        save's stall), the measures started. `world` is this save's (an elastic run's changes;
        an async save is refused there, so a save in flight always has the world it began in)."""
        started = time.perf_counter()
        if self.training_peak_rss_bytes is None:
            self.training_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
        self.flush()
        self.world = world
        return Pending(started, SaveRecord(step), PeakSampler())

    def save(self, pending: Pending, shard: Optional[Shard], state: checkpoint.TrainState, rng_states: list) -> None:
        """Sync: write and commit now. Async: copy, and leave the writing to a thread."""
        try:
            pending.staging = checkpoint.begin(self.run_dir, state.step, self.world)
        except checkpoint.SaveFailed:
            pending.sampler.stop()  # its thread would otherwise sample for the rest of the process
            raise
        pending.rng_states = rng_states
        self.pending = pending
        if self.asynchronous:
            pending.shard, pending.state = copied(shard), copy.deepcopy(state)
            pending.thread = threading.Thread(target=pending.write, args=(self.world.rank,), name="checkpoint-write")
            pending.thread.start()
        else:
            pending.shard, pending.state = shard, state
            pending.write(self.world.rank)
            self.flush()
        pending.record.stall_s = time.perf_counter() - pending.started
        self.records.append(pending.record)
        if not self.asynchronous:
            self.log(pending.record)

    def finish(self) -> None:
        """At the run's end or a stop: the save in flight committed, the wait added to its stall."""
        started = time.perf_counter()
        committing = self.pending
        self.flush()
        if committing is not None:
            committing.record.stall_s += time.perf_counter() - started

    def flush(self) -> None:
        """Join the save in flight, if any, and commit it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        try:
            final = checkpoint.commit(self.run_dir, pending.staging, pending.written, self.model, pending.shard,
                                      pending.state, pending.rng_states, self.keep_last, self.world)
        finally:
            pending.record.peak_rss_bytes = pending.sampler.stop()
        if self.world.rank == 0:
            pending.record.checkpoint_bytes = sum(path.stat().st_size for path in final.iterdir() if path.is_file())
        if self.asynchronous:  # its stall was measured at the save
            self.log(pending.record)

    def log(self, record: SaveRecord) -> None:
        if self.world.rank == 0:
            log.info("checkpoint %s committed | %.1f MB; rank 0's %.1f MB written in %.2f s (%.2f GB/s) | "
                     "the loop stalled %.2f s (%s)", checkpoint.step_dir_name(record.step),
                     record.checkpoint_bytes / 1e6, record.bytes / 1e6, record.write_s,
                     record.bytes / max(record.write_s, 1e-9) / 1e9, record.stall_s,
                     "async" if self.asynchronous else "sync")

    def summary(self) -> dict:
        """This rank's saves, for the run summary's checkpoint block (`summary_block`)."""
        return {"rank": self.world.rank, "training_peak_rss_bytes": self.training_peak_rss_bytes,
                "saves": [vars(record) for record in self.records]}


def summary_block(asynchronous: bool, ranks: List[dict]) -> dict:
    """summary.json's checkpoint block from every rank's `Saver.summary`: per save the slowest
    rank's stall and write (the loop waits for the slowest), and every rank's memory."""
    per_save = list(zip(*(rank["saves"] for rank in ranks)))
    return {
        "async": asynchronous, "saves": len(per_save),
        "steps": [saves[0]["step"] for saves in per_save],
        "stall_s": [max(save["stall_s"] for save in saves) for saves in per_save],
        "write_s": [max(save["write_s"] for save in saves) for saves in per_save],
        "bytes_per_save": [sum(save["checkpoint_bytes"] for save in saves) for saves in per_save],
        "bytes": sum(save["checkpoint_bytes"] for saves in per_save for save in saves),
        "shard_bytes": [sum(save["bytes"] for save in saves) for saves in per_save],
        "ranks": [{"rank": rank["rank"], "training_peak_rss_bytes": rank["training_peak_rss_bytes"],
                   "save_peak_rss_bytes": [save["peak_rss_bytes"] for save in rank["saves"]],
                   "stall_s": [save["stall_s"] for save in rank["saves"]]} for rank in ranks],
    }
