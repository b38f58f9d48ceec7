"""Pipeline parallelism against data parallelism on the same processes, in one bench run:
tokens/s, the measured bubble beside the ideal (P-1)/(m+P-1), peak memory per rank, and a text
timeline of one step. It runs the trainer's own step (app/step.py), as the breakdown does.

    python -m app.bench sections=[pipeline]                          # llama_small, 2 processes
    mpirun -np 2 python -m app.bench.pipeline SPEC.json              # one layout (the worker)

Measured bubble: on each rank, the share of its forward/backward span spent waiting for a
neighbour (receives, the last sends, the loss from the last stage), averaged over ranks.
"""
import time

from app import dist, fileio, metrics
from app.bench import launch, worker
from app.step import PhaseTimer, train_step

PHASES = ("forward", "backward", "pipeline_wait", "allreduce_wait", "optimizer")


def run_steps(training, first: int, count: int, timer: PhaseTimer) -> None:
    batch = training.task.stream.global_batch
    for step in range(first, first + count):
        train_step(training, step * batch, step, timer)


def timed_steps(training, spec: dict, timer: PhaseTimer) -> float:
    """Wall seconds of the spec's measured steps after its warm-up steps, from the first rank to
    start to the last to finish; the timer holds the measured steps' phases only."""
    run_steps(training, 0, spec["warmup_steps"], timer)
    timer.take()
    dist.barrier()
    started = time.perf_counter()
    run_steps(training, spec["warmup_steps"], spec["measure_steps"], timer)
    dist.barrier()
    return time.perf_counter() - started


def main() -> None:
    spec, cfg, training = worker.read_spec_and_start()
    timer = PhaseTimer(training.device)
    elapsed = timed_steps(training, spec, timer)
    seconds = {phase: total / spec["measure_steps"] for phase, total in timer.take().items()}
    busy = seconds.get("forward", 0.0) + seconds.get("backward", 0.0)
    rows = dist.allgather_object({
        "rank": dist.rank(), "stage": training.parallel.replica_group(), "seconds_per_step": seconds,
        "wait_fraction": seconds.get("pipeline_wait", 0.0) / (busy + seconds.get("pipeline_wait", 0.0)),
        "peak_memory_bytes": metrics.peak_memory_bytes(training.device),
        "timeline": getattr(training.parallel, "timeline", [])}, name="pipeline_rows")
    if dist.is_main():
        tokens_per_step = training.task.stream.global_batch * training.task.seq_len
        fileio.write_json(spec["result"], {
            "layout": training.parallel.layout(), "processes": dist.size(), "precision": cfg.train.precision,
            "micro_batches": cfg.train.grad_accum_steps, "micro_batch_size": cfg.train.micro_batch_size,
            "measured_steps": spec["measure_steps"], "tokens_per_second": tokens_per_step * spec["measure_steps"] / elapsed,
            "bubble_fraction": sum(r["wait_fraction"] for r in rows) / len(rows), "ranks": rows,
        })


def measure(ctx, log=print) -> dict:
    """Data parallelism and a P-stage pipeline on P processes, same micro-batches per step."""
    pc = ctx.bench.pipeline
    shared = [*ctx.overrides(pc.precision), f"train.grad_accum_steps={pc.micro_batches}"]
    layouts = {"data_parallel": shared,
               "pipeline": [*shared, f"parallel.pipeline={pc.stages}", f"parallel.schedule={pc.schedule}"]}
    results = {}
    for name, overrides in layouts.items():
        log(f"bench: {name}, {pc.stages} processes, {pc.micro_batches} micro-batches per step")
        spec = {"overrides": overrides, "threads": ctx.threads_per_process, "warmup_steps": pc.warmup_steps,
                "measure_steps": pc.measure_steps}
        # Pipelines need MPI's point-to-point whatever bench.launcher says.
        results[name] = launch.run_worker("app.bench.pipeline", spec, ctx.work_dir / f"pipeline_{name}", "mpi",
                                          pc.stages, ctx.bench)
    return {"stages": pc.stages, "schedule": pc.schedule, "model": ctx.bench.model, **results}


if __name__ == "__main__":
    main()
