"""Elastic training: the loop keeps going while workers leave and join (Horovod elastic, Gloo).

    scripts/launch.sh --elastic --min-np 1 --max-np 4 --hostfile hosts.txt train.elastic_commit_every=10

horovodrun starts and stops workers as the hosts that scripts/discover_hosts.sh prints change.
The loop runs under hvd.elastic.run with an `ElasticState`: the model, the optimizer and the
progress (step, global sample position, tokens), copied in memory at each commit, every
train.elastic_commit_every steps. When the hosts change, all ranks stop at the same commit and
Horovod restarts itself on the new world (shutdown(); init()); when a worker dies, the
survivors get HorovodInternalError, roll back to the last commit and do the same. Every rank,
old or new, then enters the loop again through `join_world`. The data stream is indexed by the
global sample position, so a world of any size continues it, no sample repeated or skipped.

Why no reset callbacks and no collectives at start-up: a worker that joins starts in the
state's sync while the others come out of a reset, so the only place where all ranks meet in
step is the entry of the elastic function. Everything that depends on the world (thread
placement, a collective; this rank's slice of the global batch; rank 0's logs) is rebuilt
there, and start-up is local: the run directory comes from the environment, the data is
prepared before the job, and rank 0 alone reads the checkpoint it resumes from, which the
first sync then hands to every rank.
"""
import copy
import json
import logging
import time
from pathlib import Path
from typing import Callable, List, Optional

import horovod.torch as hvd
import torch
from horovod.common.elastic import State

from app import checkpoint, dist, runtime
from app.config import ConfigError
from app.state_dicts import full_model_order, load_model_state

log = logging.getLogger("app.elastic")

# The fields of checkpoint.TrainState that change as the run goes, committed and synced.
PROGRESS = ("step", "samples_seen", "tokens_seen")


def check_launch(cfg) -> None:
    """train.elastic and an elastic launch go together (one line on every rank otherwise)."""
    if cfg.train.elastic and not dist.elastic_launch():
        raise ConfigError("train.elastic=true needs an elastic launch over Gloo: scripts/launch.sh --elastic "
                          "--min-np N --max-np M --hostfile FILE (horovodrun --host-discovery-script)")
    if dist.elastic_launch() and not cfg.train.elastic:
        raise ConfigError("horovodrun started this job in elastic mode, but train.elastic=false; "
                          "set train.elastic=true")


class Journal:
    """run_dir/elastic.jsonl, written by rank 0: a row per optimizer step with the global samples
    [first, end) it trained on and the world size, and a row per event: `start` (the job starts
    or restarts at this step), `world` (a world of this size continues from this step),
    `rollback` (survivors of a failure go back to the last commit). The steps after a start or
    rollback row are done again, so the run's history is each step's last row (`replay`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "elastic.jsonl"
        self.pending: List[dict] = []  # events noted on any rank, written by whichever rank is 0 next
        self.file = None

    def event(self, name: str, **fields) -> None:
        self.pending.append({"event": name, "time": time.time(), **fields})

    def write_pending(self) -> None:
        if dist.is_main():
            for row in self.pending:
                self._write(row)
        self.pending = []

    def step(self, progress: checkpoint.TrainState, global_batch: int) -> None:
        if dist.is_main():
            first = progress.samples_seen - global_batch
            self._write({"step": progress.step, "samples": [first, progress.samples_seen], "world_size": dist.size(),
                         "time": time.time()})

    def _write(self, row: dict) -> None:
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def replay(rows: List[dict]) -> List[dict]:
    """The step rows of the run as it finally went: a start or rollback row undoes later steps."""
    steps = {}
    for row in rows:
        if row.get("event") in ("start", "rollback"):
            steps = {step: kept for step, kept in steps.items() if step <= row["step"]}
        elif "samples" in row:
            steps[row["step"]] = row
    return [steps[step] for step in sorted(steps)]


class ElasticState(State):
    """What survives a change of world: model, optimizer and progress as of the last commit.

    Horovod's TorchState syncs the optimizer with broadcast_optimizer_state, which first steps a
    fresh optimizer on zero gradients: a joining rank's AdamW would decay its weights once and
    count one step more than the others. Here rank 0's state dict travels as an object and is
    loaded as it is."""

    def __init__(self, training, progress: checkpoint.TrainState, journal: Journal, commit_every: int,
                 start_error: Optional[str] = None):
        self.training, self.progress, self.journal = training, progress, journal
        self.commit_every = commit_every
        self.start_error = start_error  # rank 0's start-up error, raised on every rank by the first sync
        super().__init__(bcast_object=self._broadcast_host_updates, get_rank=dist.rank)
        self.save()

    @staticmethod
    def _broadcast_host_updates(obj):
        return hvd.broadcast_object(obj, root_rank=0, name="elastic_host_updates")

    def save(self) -> None:
        self._model = {name: tensor.detach().clone() for name, tensor in self.training.model.state_dict().items()}
        self._optimizer = copy.deepcopy(self.training.optimizer.state_dict())
        self._progress = {key: getattr(self.progress, key) for key in PROGRESS}

    def restore(self) -> None:
        """After a failure, before Horovod resets: back to the last commit."""
        lost = self.progress.step - self._progress["step"]
        log.warning("elastic: a worker failed at step %d; back to the commit at step %d (%d steps lost)",
                    self.progress.step, self._progress["step"], lost)
        self.journal.event("rollback", step=self._progress["step"], from_step=self.progress.step, steps_lost=lost)
        self.training.model.load_state_dict(self._model)
        # load_state_dict keeps the tensors it is given: a copy, or the next step would change the commit.
        self.training.optimizer.load_state_dict(copy.deepcopy(self._optimizer))
        self.training.model.zero_grad(set_to_none=True)  # the failed step's gradients
        for key, value in self._progress.items():
            setattr(self.progress, key, value)

    def sync(self) -> None:
        """Every rank takes rank 0's model, optimizer and progress: a joining rank, or all after a failure."""
        shared = dist.broadcast_object(self._shared() if dist.is_main() else None, name="elastic_sync")
        if shared["start_error"]:
            raise ValueError(shared["start_error"])
        hvd.broadcast_parameters(self.training.model.state_dict(), root_rank=0)
        if not dist.is_main():
            self.training.optimizer.load_state_dict(shared["optimizer"])
            for key in PROGRESS:
                setattr(self.progress, key, shared["progress"][key])
            if self.training.scaler is not None:
                self.training.scaler.load_state_dict(shared["scaler"])
        self.save()  # a rank that joined has nothing committed yet

    def _shared(self) -> dict:
        return {"start_error": self.start_error, "optimizer": self.training.optimizer.state_dict(),
                "progress": {key: getattr(self.progress, key) for key in PROGRESS},
                "scaler": self.training.scaler.state_dict() if self.training.scaler is not None else None}

    def after_step(self, window) -> None:
        """The loop calls this after every optimizer step: journal it, and commit every K steps."""
        self.journal.step(self.progress, self.training.task.stream.global_batch)
        if self.progress.step % self.commit_every == 0:
            window.count_tokens(self.progress)  # the tokens trained so far belong to the commit
            self.commit()  # raises HostsUpdatedInterrupt on every rank when the hosts changed


def join_world(cfg, training, progress: checkpoint.TrainState, run, journal: Journal) -> None:
    """On entering the loop, first or after a reset, every rank rebuilds what depends on the
    world: logging and rank 0's sinks, thread placement, its slice of every global batch (the
    task and the prefetcher reading it), its dropout noise. The learning rate follows
    dist.size() at every step."""
    runtime.configure_logging(run.run_dir, dist.rank())
    # Rank 0 (maybe another process than before) reopens its logs at this step: metrics a failed
    # world logged after its last commit are dropped, since this world trains those steps again.
    run.open_logger(progress.step)
    torch.set_num_threads(dist.place_rank(cfg.train.threads_per_rank, cfg.train.bind_cores))
    training.use_world(cfg, *dist.data_position())
    torch.manual_seed(cfg.train.seed + dist.noise_rank() + 1_000_003 * progress.step)
    journal.event("world", step=progress.step, world_size=dist.size())
    journal.write_pending()
    run.logger.log(progress.step, {"elastic/world_size": dist.size()})
    log.info("elastic: %d ranks continue from step %d (global sample %d), %d threads each", dist.size(),
             progress.step, progress.samples_seen, torch.get_num_threads())


def resume_on_main(cfg, run_dir: Path, training, progress: checkpoint.TrainState) -> Optional[str]:
    """Rank 0 loads the checkpoint train.resume names into its own model, optimizer and progress;
    the first sync hands them to every rank. Rank 0's bad-input error is returned, not raised,
    so that sync reports it on every rank."""
    if not dist.is_main():
        return None
    try:
        found = checkpoint.resolve_resume(cfg.train.resume, run_dir, warn=log.warning)
        if found is None:
            return None
        saved = checkpoint.compatible_state(found, training.model, progress.tokenizer_sha256)
        # Plain data parallelism: every rank holds the whole model, rank 0 reads it whole.
        reader = checkpoint.Reader(found, full_model_order(training.model))
        load_model_state(training.model, dict(reader.weights()))
        training.optimizer.load_state_dict(checkpoint.load_optimizer_state(found, reader))
    except dist.BAD_INPUT as error:
        return str(error).strip("'\"")
    for key in PROGRESS:
        setattr(progress, key, getattr(saved, key))
    if training.scaler is not None and saved.grad_scaler:
        training.scaler.load_state_dict(saved.grad_scaler)
    log.info("resumed from %s at step %d (%d samples seen)", found, progress.step, progress.samples_seen)
    return None


def run_loop(cfg, training, progress: checkpoint.TrainState, run, loop: Callable, start_error: Optional[str]) -> dict:
    """`loop(cfg, run_dir, training, progress, run)` under hvd.elastic.run, entered again after each reset."""
    journal = Journal(run.run_dir)
    journal.event("start", step=progress.step)
    state = ElasticState(training, progress, journal, cfg.train.elastic_commit_every, start_error)
    run.after_step = state.after_step

    @hvd.elastic.run
    def elastic_loop(state: ElasticState) -> dict:
        join_world(cfg, training, progress, run, journal)
        return loop(cfg, run.run_dir, training, progress, run)

    return elastic_loop(state)
