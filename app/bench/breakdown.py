"""Where a data-parallel step's time goes: data, forward, backward, allreduce wait, optimizer.
It runs the trainer's own step (app/step.py train_step, built by build_training exactly as
app.train builds it) and reads the step's phase timer, so a change to the step changes what
is measured.

    mpirun -np 2 python -m app.bench.breakdown SPEC.json   # or horovodrun --gloo

Backward and allreduce overlap: DistributedOptimizer's hooks start each gradient's allreduce
as soon as backward produces it, and Horovod's background thread sends it while backward goes
on. So the phases are wall-clock spans that never double-count:
  backward        loss.backward(): the compute, slowed by whatever the concurrent sends take
                  from it (on CPU, the copies and reductions run on the same cores);
  allreduce wait  optimizer.synchronize(): the part of the allreduce not hidden behind backward;
  standalone      the same gradient set allreduced with nothing to overlap (gradient_set.py);
                  hidden fraction = 1 - wait / standalone estimates how much backward hides
                  (the wait also holds any skew: a rank done first waits for the slowest).
"""
import torch

from app import dist, fileio
from app.bench import gradient_set, launch, worker
from app.step import PhaseTimer, train_step

PHASES = ("data", "forward", "backward", "allreduce_wait", "optimizer")


def main() -> None:
    spec, cfg, training = worker.read_spec_and_start()
    timer = PhaseTimer(training.device)
    warmup, measured = spec["warmup_steps"], spec["measure_steps"]
    for step in range(warmup):
        train_step(training, step * training.task.stream.global_batch, step, timer)
    timer.take()
    started = timer.now()
    for step in range(warmup, warmup + measured):
        train_step(training, step * training.task.stream.global_batch, step, timer)
    totals = {**timer.take(), "step": timer.now() - started}

    # Mean over ranks of each rank's mean per step, as the trainer's time/* metrics are.
    per_step = dist.sum_over_ranks(
        torch.tensor([totals.get(k, 0.0) / measured for k in PHASES + ("step",)], dtype=torch.float64),
        name="breakdown") / dist.size()
    tensors = gradient_set.like_gradients(gradient_set.shapes(training.model))
    standalone = gradient_set.summary(tensors, gradient_set.seconds_per_set(tensors, 1, spec["standalone_sets"]))
    if dist.is_main():
        seconds = dict(zip(PHASES + ("step",), per_step.tolist()))
        fileio.write_json(spec["result"], {
            "processes": dist.size(), "controller": dist.controller(), "threads": torch.get_num_threads(),
            "precision": cfg.train.precision, "measured_steps": measured, "seconds_per_step": seconds,
            "tokens_per_second": dist.size() * training.task.stream.per_rank * training.task.seq_len / seconds["step"],
            "standalone_allreduce": standalone,
            "hidden_fraction": max(0.0, 1 - seconds["allreduce_wait"] / standalone["median_s"]),
        })


def measure(ctx, log=print) -> dict:
    bc = ctx.bench.breakdown
    spec = {"overrides": ctx.overrides(bc.precision), "threads": ctx.threads_per_process,
            "warmup_steps": bc.warmup_steps, "measure_steps": bc.measure_steps, "standalone_sets": bc.standalone_sets}
    log(f"bench: step-time breakdown, {bc.precision}, {ctx.max_processes} processes")
    return launch.run_worker("app.bench.breakdown", spec, ctx.work_dir / "breakdown", ctx.bench.launcher,
                             ctx.max_processes, ctx.bench)


if __name__ == "__main__":
    main()
