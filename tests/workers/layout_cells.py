"""Several cells of one mesh (the same parallel.tensor and parallel.pipeline, so one launch and one
Horovod start-up serve them all), each trained from scratch, or resumed from a checkpoint, with the
trainer's own step (app/step.py) and learning-rate schedule, as the loop runs them. Each cell
ends with a real checkpoint, every rank writing its boxes; rank 0 saves the whole model and
optimizer state read back from it, every step's loss, gradient norm and number of ZeRO
reduce-scatters and allgathers, every box every rank holds of the fresh model before its first
step (its placement and values), and
where the cell asks, each rank's coordinates, checksum of its tensor-replicated parameters and
CPU RNG state (ZeRO-3 cells cannot: their parameters are freed between steps) and the task's
evaluation at the end, to OUT/<cell>.pt; a cell may also write a real checkpoint at a step, for
another layout to resume, and then try one more that cannot be staged ("blocked_save").

A cell with "overflow" trains with an fp16 loss scaler (torch.amp.GradScaler on the CPU: the
same unscale, clip and step path as on a GPU) and, at that step, one rank's gradients forced to
inf (tensor_steps.py's way); every rank's scale and parameter checksum around each step are
saved too. Every cell saves the largest difference between the copies of a tied weight that the
ranks hold (the first and last stages' under a pipeline).

    mpirun -np 8 python tests/workers/layout_cells.py OUT CELLS_JSON
    CELLS_JSON: [{"name": ..., "overrides": [...], "resume": path|null, "save_at": step|null, "blocked_save": bool,
                 "evaluate": {"batch_size": b, "max_batches": n}|null, "ranks": bool,
                 "overflow": {"step": 1-based step, "rank": global rank}|null}, ...]
"""
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
from omegaconf import OmegaConf

from app import checkpoint, dist, models, optim, saving, train
from app.bench.worker import start_training
from app.step import PhaseTimer, train_step


issued = {"reduce_scatters": 0, "gathers": 0}  # ZeRO's grouped collectives on this rank
# A power of two: scaling and unscaling are exact, so the scaled steps are the unscaled ones.
INITIAL_SCALE = 2.0 ** 10


def counting(collective, key):
    def count(*args, **kwargs):
        issued[key] += 1
        return collective(*args, **kwargs)
    return count


hvd.grouped_reducescatter_async = counting(hvd.grouped_reducescatter_async, "reduce_scatters")
hvd.grouped_allgather_async = counting(hvd.grouped_allgather_async, "gathers")


def run_cell(out: Path, cell: dict) -> None:
    cfg, training = start_training({"overrides": cell["overrides"], "threads": 1}, fresh=not cell.get("resume"))
    initial = hvd.allgather_object(fresh_boxes(training.parallel), name=f"layout_cells.initial.{cell['name']}")
    run_dir = out / cell["name"]
    state = checkpoint.TrainState(world_size=dist.size(), model_signature=checkpoint.model_signature(training.model),
                                  tokenizer_sha256=training.task.tokenizer_sha256,
                                  config=OmegaConf.to_container(cfg, resolve=True))
    if cell.get("resume"):
        train.resume_or_start(OmegaConf.merge(cfg, {"train": {"resume": cell["resume"]}}), run_dir, training, state)
    overflow = cell.get("overflow")
    if overflow:
        training.scaler = torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE)
    timer, rows, scaling, blocked = PhaseTimer(training.device), [], [], None
    while state.step < cfg.train.max_steps:
        optim.set_lr(training.optimizer, optim.lr_at(state.step, cfg.optim, cfg.train.max_steps,
                                                     dist.data_position()[1]))
        before = dict(issued)
        hook = None
        if overflow and state.step + 1 == overflow["step"] and dist.rank() == overflow["rank"]:
            first = next(training.parallel.model.parameters())
            hook = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        scaled = {"scale_before": training.scaler.get_scale(),
                  "checksum_before": training.parallel.parameter_checksum()} if overflow else {}
        output = train_step(training, state.samples_seen, state.step, timer)
        if hook is not None:
            hook.remove()
        state.step += 1
        state.samples_seen += training.task.stream.global_batch
        # The loop's logged loss: the mean over ranks of each rank's mean (its replica's share).
        loss = dist.sum_over_ranks(output.loss.reshape(1).double(), name="cell_loss").item() / dist.size()
        rows.append({"step": state.step, "loss": loss, "grad_norm": float(output.grad_norm),
                     **{key: issued[key] - before[key] for key in issued}})
        if overflow:
            scaling.append({"step": state.step, "scale_after": training.scaler.get_scale(),
                            "changed": training.parallel.parameter_checksum() != scaled.pop("checksum_before"),
                            **scaled})
        if state.step == cell.get("save_at"):
            save(cfg, run_dir, training, state)
            blocked = blocked_save(cfg, run_dir, training, state) if cell.get("blocked_save") else blocked
    evaluated = evaluate(training, cell["evaluate"]) if cell.get("evaluate") else None
    # The final state as a real (sharded) checkpoint, which rank 0 reads back whole below.
    save(cfg, run_dir, training, state)
    scaling = hvd.allgather_object(scaling, name=f"layout_cells.scaling.{cell['name']}")
    tied_difference = tied_copies_difference(training.parallel, cell["name"])
    training.batches.close()
    ranks = None
    if cell.get("ranks"):
        ranks = dist.allgather_object({"coordinates": training.parallel.coordinates,
                                       "replicated": replicated_checksum(training.parallel.part),
                                       "rng": torch.get_rng_state()}, name="cell_ranks")
    if dist.is_main():
        final = checkpoint.latest(run_dir)
        torch.save({"model": checkpoint.read_weights(final), "optimizer": checkpoint.load_optimizer_state(final),
                    "steps": rows, "ranks": ranks, "initial": initial,
                    "evaluated": evaluated, "scaling": scaling, "tied_difference": tied_difference, "blocked": blocked,
                    "layout": training.parallel.layout()}, out / f"{cell['name']}.pt")


def save(cfg, run_dir: Path, training, state) -> None:
    """The trainer's own synchronous save, committed on return."""
    run = train.Run(run_dir, cfg.train.max_steps, False, 0.0, 0.0, {},
                    saver=saving.Saver(run_dir, training.model, cfg.train.keep_last, asynchronous=False))
    train.save_checkpoint(run, training, state, train.Window(training.device))


def blocked_save(cfg, run_dir: Path, training, state) -> dict:
    """A save whose staging directory rank 0 cannot make (a file stands where checkpoints/ was):
    every rank's error (None if it returned, or it would hang here) and the checkpoint `latest`
    names afterwards, checkpoints/ put back."""
    root = checkpoint.checkpoints_root(run_dir)
    aside = root.with_name("checkpoints.aside")
    if dist.is_main():
        root.rename(aside)
        root.write_text("not a directory\n")
    try:
        # A copy of the state: a save counts the window's tokens into it.
        save(cfg, run_dir, training, dataclasses.replace(state))
        error = None
    except checkpoint.CheckpointError as failed:
        error = str(failed)
    errors = dist.allgather_object(error, name="layout_cells.blocked_save")
    if dist.is_main():
        root.unlink()
        aside.rename(root)
    return {"errors": errors, "latest": checkpoint.latest(run_dir).name if dist.is_main() else None}


def fresh_boxes(layout) -> list:
    """(placement, values) of every parameter this rank holds, as built (ZeRO-3 slices gathered
    over the data set: its part is whole only if every rank's slices are right)."""
    with layout.data.whole_part() as part:
        return [(layout.part.placements[name], param.detach().clone()) for name, param in part.named_parameters()]


def evaluate(training, batches: dict) -> dict:
    """The task's evaluation on the model the layout evaluates, as the loop runs it."""
    with training.parallel.evaluation_model() as (model, share):
        return training.task.evaluate(model, share, training.device, training.precision_ctx,
                                      batches["batch_size"], batches["max_batches"])


def replicated_checksum(part) -> str:
    """A hash of the parameters this rank's tensor set replicates (norms, BERT's position
    embeddings): equal on the set's ranks exactly when they kept their copies together."""
    digest = hashlib.sha256()
    models.add_to_checksum(digest, [(name, param) for name, param in part.module.named_parameters()
                                    if "tensor" in part.placements[name].replicated])
    return digest.hexdigest()[:16]


def tied_copies_difference(layout, name: str) -> float:
    """The largest difference between the ranks' copies of one box of a tied weight (0.0 where
    no rank holds two ends of one)."""
    tied = layout.part.tied
    mine = (layout.part.placements[tied].box, dict(layout.model.named_parameters())[tied].detach()) \
        if tied is not None else None
    copies = [copy for copy in hvd.allgather_object(mine, name=f"layout_cells.tied.{name}") if copy is not None]
    return max(((a - b).abs().max().item() for box, a in copies for other, b in copies if other == box),
               default=0.0)


def main() -> None:
    out = Path(sys.argv[1])
    for cell in json.loads(sys.argv[2]):
        run_cell(out, cell)


if __name__ == "__main__":
    main()
