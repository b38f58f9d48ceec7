"""Tokens/s of the trainer at 1..N processes (eager, and compiled as throughput.trainer_compile
says), of a plain PyTorch loop at 1, of DDP, and of Hugging Face's Trainer at 1 (as users run
it, and with torch_compile=True), each with the same model, batch, precision and threads per
process; MFU, scaling efficiency and the ratios the trainer is held to.

The trainer runs as users run it (python -m app.train under mpirun or horovodrun --gloo, as
bench.launcher says); its tokens/s comes from its own metrics.jsonl, leaving out the logging
windows that cover the warm-up steps (and with them the compilation)."""
import functools
import json
import math
import shutil
from typing import List

from app import metrics
from app.config import compilation_mode
from app.bench import launch
from app.bench.context import Context


def trainer_tokens_per_second(rows: List[dict], warmup_steps: int) -> float:
    """Tokens over seconds across the logging windows after warm-up (a window is the steps
    since the previous row; the trainer's tokens_per_second is that window's rate)."""
    tokens = seconds = 0.0
    previous_step, previous_tokens = 0, 0
    for row in rows:
        # A row without a rate (the compile warm-up's, an evaluation's) times no window.
        if previous_step >= warmup_steps and "tokens_per_second" in row:
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
    rows = metrics.read_rows(run_dir)
    if not ctx.bench.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    warmups = [row["time/compile_warmup_s"] for row in rows if "time/compile_warmup_s" in row]
    return {"method": method, "processes": processes, "measured_steps": tp.measure_steps, "run_dir": str(run_dir),
            "controller": json.loads((run_dir / "summary.json").read_text())["controller"],
            "tokens_per_second": trainer_tokens_per_second(rows, tp.warmup_steps),
            "compile_warmup_s": warmups[0] if warmups else None}


def run_reference(ctx: Context, precision: str, processes: int, method: str) -> dict:
    tp = ctx.bench.throughput
    spec = {"overrides": ctx.overrides(precision), "threads": ctx.threads_per_process,
            "warmup_steps": tp.warmup_steps, "measure_steps": tp.measure_steps}
    if method.startswith("hf_trainer"):
        spec.update(method=method, torch_compile=method == "hf_trainer_compile")
        return launch.run_worker("app.bench.hf_trainer", spec, ctx.work_dir / f"{method}-{precision}",
                                 "none", 1, ctx.bench)
    launcher = "torchrun" if method == "ddp" else "none"
    return launch.run_worker("app.bench.reference_loop", spec, ctx.work_dir / f"{method}-{precision}-{processes}p",
                             launcher, processes, ctx.bench)


def _tokens_per_second(runs: List[dict], method: str, precision: str, processes: int) -> float:
    return next(r["tokens_per_second"] for r in runs
                if (r["method"], r["precision"], r["processes"]) == (method, precision, processes))


def _target(name: str, precision: str, value: float, threshold: float) -> dict:
    return {"name": name, "precision": precision, "value": value, "threshold": threshold, "met": value >= threshold}


def _counts(ctx: Context):
    """The trainer's process counts (always with 1, the scaling baseline) and DDP's, if it fits."""
    tp = ctx.bench.throughput
    counts = set(tp.process_counts or range(1, ctx.max_processes + 1)) | {1}
    ddp_processes = tp.ddp_processes if tp.ddp_processes <= ctx.max_processes else None
    if ddp_processes:
        counts.add(ddp_processes)
    return sorted(counts), ddp_processes


def _plan(ctx: Context, counts: List[int], ddp_processes) -> List[tuple]:
    """(method, processes) in the order they run: each one-process run beside the one it is
    compared with, so a change in the machine's load between them matters least."""
    tp = ctx.bench.throughput
    compiled = compilation_mode(tp.trainer_compile) != "false"
    hf = {variant: f"hf_trainer{'_compile' if variant == 'compile' else ''}" for variant in tp.hf_trainer}
    plan = [("plain", 1), ("trainer", 1)]
    plan += [(hf["eager"], 1)] if "eager" in hf else []
    plan += [("trainer_compile", 1)] if compiled else []
    plan += [(hf["compile"], 1)] if "compile" in hf else []
    for processes in counts[1:]:
        plan += [("trainer", processes)] + ([("trainer_compile", processes)] if compiled else [])
    plan += [("ddp", ddp_processes)] if ddp_processes else []
    if tp.untuned_overrides and counts[-1] > 1:
        plan.append(("trainer_untuned", counts[-1]))
    return plan


def _measured_run(ctx: Context, method: str, precision: str, processes: int) -> dict:
    tp = ctx.bench.throughput
    if method in ("trainer", "trainer_compile"):
        extra = [f"train.compile={tp.trainer_compile}"] if method == "trainer_compile" else []
        run = run_trainer(ctx, precision, processes, method, extra)
    elif method == "trainer_untuned":
        run = run_trainer(ctx, precision, processes, method, tp.untuned_overrides)
    else:
        run = run_reference(ctx, precision, processes, method)
    per_process = run["tokens_per_second"] / processes
    peak = ctx.peaks.tflops(precision, ctx.threads_per_process)
    return {**run, "precision": precision, "processes": processes, "threads_per_process": ctx.threads_per_process,
            "tokens_per_second_per_process": per_process, "mfu": metrics.mfu(ctx.flops_per_token, per_process, peak)}


def _scaling(runs: List[dict], precision: str, counts: List[int], method: str) -> List[dict]:
    """Tokens/s at p processes over p copies of the same method's 1-process run."""
    rate = {p: _tokens_per_second(runs, method, precision, p) for p in counts}
    return [{"processes": p, "tokens_per_second": rate[p], "efficiency": rate[p] / (p * rate[1])} for p in counts]


def _targets(ctx: Context, runs: List[dict], precision: str, counts: List[int], ddp_processes) -> List[dict]:
    tp = ctx.bench.throughput
    rate = functools.partial(_tokens_per_second, runs, precision=precision)
    methods = {r["method"] for r in runs if r["precision"] == precision}
    targets = [_target("trainer / plain PyTorch, 1 process", precision, rate("trainer", processes=1) / rate(
        "plain", processes=1), 1 - tp.max_overhead_vs_plain)]
    if ddp_processes:
        targets.append(_target(f"trainer / DDP (gloo), {ddp_processes} processes", precision,
                               rate("trainer", processes=ddp_processes) / rate("ddp", processes=ddp_processes),
                               tp.min_ratio_vs_ddp))
    best = "trainer_compile" if "trainer_compile" in methods else "trainer"
    label = f"trainer (compile={compilation_mode(tp.trainer_compile)})" if best == "trainer_compile" else "trainer"
    for peer, threshold in (("hf_trainer", tp.min_ratio_vs_hf_trainer),
                            ("hf_trainer_compile", tp.min_ratio_vs_hf_trainer_compile)):
        if peer in methods:
            name = "HF Trainer" + (" + torch_compile" if peer == "hf_trainer_compile" else "")
            targets.append(_target(f"{label} / {name}, 1 process", precision,
                                   rate(best, processes=1) / rate(peer, processes=1), threshold))
    one = next(r for r in runs if (r["method"], r["precision"], r["processes"]) == (best, precision, 1))
    targets.append(_target(f"{label} MFU, 1 process", precision, one["mfu"], tp.min_mfu))
    if counts[-1] > 1:
        for method in ("trainer", "trainer_compile") if best == "trainer_compile" else ("trainer",):
            name = "scaling efficiency" + (" with compile" if method == "trainer_compile" else "")
            targets.append(_target(f"{name}, {counts[-1]} processes", precision,
                                   _scaling(runs, precision, counts, method)[-1]["efficiency"],
                                   tp.min_scaling_efficiency))
    return targets


def measure(ctx: Context, log=print) -> dict:
    tp = ctx.bench.throughput
    counts, ddp_processes = _counts(ctx)
    runs = []
    for precision in tp.precisions:
        for method, processes in _plan(ctx, counts, ddp_processes):
            log(f"bench: throughput {method} {precision} {processes} process(es)")
            runs.append(_measured_run(ctx, method, precision, processes))

    scaling, targets = {}, []
    for precision in tp.precisions:
        scaling[precision] = _scaling(runs, precision, counts, "trainer")
        one = {m: _tokens_per_second(runs, m, precision, 1) for m in ("trainer", "trainer_compile")
               if any(r["method"] == m for r in runs)}
        for run in runs:
            if run["method"].startswith("trainer") and run["precision"] == precision:
                # The untuned trainer is held against the tuned one at 1 process.
                baseline = one["trainer_compile" if run["method"] == "trainer_compile" else "trainer"]
                run["scaling_efficiency"] = run["tokens_per_second"] / (run["processes"] * baseline)
        targets += _targets(ctx, runs, precision, counts, ddp_processes)
    return {
        "model": ctx.bench.model, "parameters": ctx.n_parameters, "flops_per_token": ctx.flops_per_token,
        "seq_len": ctx.seq_len, "tokens_per_step_per_process": ctx.tokens_per_step_per_process,
        "threads_per_process": ctx.threads_per_process, "launcher": ctx.bench.launcher, "warmup_steps": tp.warmup_steps,
        "measure_steps": tp.measure_steps, "untuned_overrides": list(tp.untuned_overrides), "runs": runs,
        "scaling": scaling, "targets": targets, "trainer_compile": compilation_mode(tp.trainer_compile),
        "ddp_skipped": None if ddp_processes else (
            f"needs {tp.ddp_processes} processes, max_processes is {ctx.max_processes}"),
    }
