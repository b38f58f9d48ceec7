"""Tokens/s of the trainer at 1..N processes, of a plain PyTorch loop at 1 and of DDP, each
with the same model, batch, precision and threads per process; MFU, scaling efficiency and
the ratios the trainer is held to.

The trainer runs as users run it (python -m app.train under mpirun or horovodrun --gloo, as
bench.launcher says); its tokens/s comes from its own metrics.jsonl, leaving out the logging
windows that cover the warm-up steps."""
import json
import math
import shutil
from typing import List

from app import metrics
from app.bench import launch
from app.bench.context import Context


def trainer_tokens_per_second(rows: List[dict], warmup_steps: int) -> float:
    """Tokens over seconds across the logging windows after warm-up (a window is the steps
    since the previous row; the trainer's tokens_per_second is that window's rate)."""
    tokens = seconds = 0.0
    previous_step, previous_tokens = 0, 0
    for row in rows:
        if previous_step >= warmup_steps:
            window_tokens = row["tokens_seen"] - previous_tokens
            tokens += window_tokens
            seconds += window_tokens / row["tokens_per_second"]
        previous_step, previous_tokens = row["step"], row["tokens_seen"]
    if seconds == 0:
        raise ValueError("no logging window after the warm-up steps; raise throughput.measure_steps")
    return tokens / seconds


def run_trainer(ctx: Context, precision: str, processes: int, method: str = "trainer",
                extra_overrides: List[str] = ()) -> dict:
    tp = ctx.bench.throughput
    run_dir = ctx.work_dir / f"{method}-{precision}-{processes}p"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends; a stale one would mix runs
    # Windows that end exactly at the warm-up's last step, so none straddles it.
    log_every = math.gcd(tp.warmup_steps, tp.measure_steps)
    args = [
        *ctx.overrides(precision),
        f"train.threads_per_rank={ctx.threads_per_process}",
        f"train.max_steps={tp.warmup_steps + tp.measure_steps}", f"train.log_every={log_every}",
        "train.eval_every=0", "train.checkpoint_every=0", "train.sample_tokens=0", "train.progress_bar=false",
        "train.resume=never", f"train.peak_tflops={ctx.peaks.tflops(precision, ctx.threads_per_process)}",
        f"hydra.run.dir={run_dir}", *extra_overrides,
    ]
    cmd = launch.command(ctx.bench.launcher, processes, "app.train", args, [], list(ctx.bench.mpirun_args))
    launch.run(cmd, ctx.work_dir / f"{run_dir.name}.log", ctx.bench.launch_timeout_s)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if not ctx.bench.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"method": method, "processes": processes, "measured_steps": tp.measure_steps, "run_dir": str(run_dir),
            "controller": json.loads((run_dir / "summary.json").read_text())["controller"],
            "tokens_per_second": trainer_tokens_per_second(rows, tp.warmup_steps)}


def run_reference(ctx: Context, precision: str, processes: int, method: str) -> dict:
    tp = ctx.bench.throughput
    spec = {"overrides": ctx.overrides(precision), "threads": ctx.threads_per_process,
            "warmup_steps": tp.warmup_steps, "measure_steps": tp.measure_steps}
    launcher = "torchrun" if method == "ddp" else "none"
    return launch.run_worker("app.bench.reference_loop", spec, ctx.work_dir / f"{method}-{precision}-{processes}p",
                             launcher, processes, ctx.bench)


def _tokens_per_second(runs: List[dict], method: str, precision: str, processes: int) -> float:
    return next(r["tokens_per_second"] for r in runs
                if (r["method"], r["precision"], r["processes"]) == (method, precision, processes))


def _target(name: str, precision: str, value: float, threshold: float) -> dict:
    return {"name": name, "precision": precision, "value": value, "threshold": threshold, "met": value >= threshold}


def _plan(ctx: Context):
    """The trainer's process counts (always with 1, the scaling baseline) and DDP's, if it fits."""
    tp = ctx.bench.throughput
    counts = set(tp.process_counts or range(1, ctx.max_processes + 1)) | {1}
    ddp_processes = tp.ddp_processes if tp.ddp_processes <= ctx.max_processes else None
    if ddp_processes:
        counts.add(ddp_processes)
    return sorted(counts), ddp_processes


def _measured_run(ctx: Context, method: str, precision: str, processes: int) -> dict:
    if method == "trainer":
        run = run_trainer(ctx, precision, processes)
    elif method == "trainer_untuned":
        run = run_trainer(ctx, precision, processes, method, ctx.bench.throughput.untuned_overrides)
    else:
        run = run_reference(ctx, precision, processes, method)
    per_process = run["tokens_per_second"] / processes
    peak = ctx.peaks.tflops(precision, ctx.threads_per_process)
    return {**run, "precision": precision, "processes": processes, "threads_per_process": ctx.threads_per_process,
            "tokens_per_second_per_process": per_process, "mfu": metrics.mfu(ctx.flops_per_token, per_process, peak)}


def measure(ctx: Context, log=print) -> dict:
    tp = ctx.bench.throughput
    counts, ddp_processes = _plan(ctx)
    runs = []
    for precision in tp.precisions:
        plan = [("plain", 1)] + [("trainer", p) for p in counts] + ([("ddp", ddp_processes)] if ddp_processes else [])
        if tp.untuned_overrides and counts[-1] > 1:
            plan.append(("trainer_untuned", counts[-1]))
        for method, processes in plan:
            log(f"bench: throughput {method} {precision} {processes} process(es)")
            runs.append(_measured_run(ctx, method, precision, processes))

    scaling, targets = {}, []
    for precision in tp.precisions:
        trainer = {p: _tokens_per_second(runs, "trainer", precision, p) for p in counts}
        # Against p copies of the 1-process run with the same threads per process.
        scaling[precision] = [{"processes": p, "tokens_per_second": trainer[p],
                               "efficiency": trainer[p] / (p * trainer[1])} for p in counts]
        for run in runs:
            if run["method"].startswith("trainer") and run["precision"] == precision:
                run["scaling_efficiency"] = run["tokens_per_second"] / (run["processes"] * trainer[1])
        targets.append(_target("trainer / plain PyTorch, 1 process", precision,
                               trainer[1] / _tokens_per_second(runs, "plain", precision, 1),
                               1 - tp.max_overhead_vs_plain))
        if ddp_processes:
            targets.append(_target(f"trainer / DDP (gloo), {ddp_processes} processes", precision,
                                   trainer[ddp_processes] / _tokens_per_second(runs, "ddp", precision, ddp_processes),
                                   tp.min_ratio_vs_ddp))
        if counts[-1] > 1:
            targets.append(_target(f"scaling efficiency, {counts[-1]} processes", precision,
                                   scaling[precision][-1]["efficiency"], tp.min_scaling_efficiency))
    return {
        "model": ctx.bench.model, "parameters": ctx.n_parameters, "flops_per_token": ctx.flops_per_token,
        "seq_len": ctx.seq_len, "tokens_per_step_per_process": ctx.tokens_per_step_per_process,
        "threads_per_process": ctx.threads_per_process, "launcher": ctx.bench.launcher, "warmup_steps": tp.warmup_steps,
        "measure_steps": tp.measure_steps, "untuned_overrides": list(tp.untuned_overrides), "runs": runs,
        "scaling": scaling, "targets": targets,
        "ddp_skipped": None if ddp_processes else (
            f"needs {tp.ddp_processes} processes, max_processes is {ctx.max_processes}"),
    }
