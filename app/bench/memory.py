"""Peak memory per rank at ZeRO stages 0-3, with and without activation checkpointing, beside
the formula's model-state bytes (app/plan.py), and the tokens/s each costs.

Each configuration is the trainer as users run it (python -m app.train under bench.launcher).
Model-state memory is a rank's peak over training less its memory just before the model was
built (train.py records both), so the interpreter and libraries, which sharding cannot shrink,
are left out; on a CPU the peak is the resident set's high-water mark, activations included.
Bytes held at rest are the storages behind parameters, gradients and optimizer state after the
last step (Parallelism.state_bytes)."""
import json
import shutil
from typing import Optional

from omegaconf import OmegaConf

from app import cli, config, metrics, models, plan, tasks
from app.bench import launch
from app.bench.context import Context
from app.bench.throughput import trainer_tokens_per_second


def training_overrides(ctx: Context) -> list:
    """The bench's training overrides with the memory section's own model, batch and precision."""
    mem = ctx.bench.memory
    shared = [o for o in ctx.train_overrides if not o.startswith("model=")]
    return [f"model={mem.model}", *shared, f"train.precision={mem.precision}", f"train.seq_len={mem.seq_len}",
            f"train.micro_batch_size={mem.micro_batch_size}"]


def run_one(ctx: Context, stage: int, checkpointing: str, allocator: Optional[str] = None) -> dict:
    """One training run; allocator as train.allocator (None: the trainer's default)."""
    mem = ctx.bench.memory
    wanted = OmegaConf.create({"train": {"keep_freed_memory": None, "allocator": allocator},
                               "parallel": {"zero_stage": stage}})
    suffix = "" if allocator is None else f"-{allocator}"
    run_dir = ctx.work_dir / f"memory-zero{stage}-{checkpointing}{suffix}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends
    args = [*training_overrides(ctx), f"parallel.zero_stage={stage}", f"train.activation_checkpointing={checkpointing}",
            f"train.threads_per_rank={ctx.threads_per_process}",
            f"train.max_steps={mem.warmup_steps + mem.measure_steps}", "train.log_every=1", "train.eval_every=0",
            "train.checkpoint_every=0", "train.sample_tokens=0", "train.progress_bar=false", "train.resume=never",
            "train.peak_tflops=1.0", f"hydra.run.dir={run_dir}",
            f"train.allocator={allocator or 'null'}"]
    cmd = launch.command(ctx.bench.launcher, mem.processes, "app.train", args, [], list(ctx.bench.mpirun_args))
    launch.run(cmd, ctx.work_dir / f"{run_dir.name}.log", ctx.bench.launch_timeout_s)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = metrics.read_rows(run_dir)
    if not ctx.bench.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    ranks = [r["memory"] for r in summary["replicas"]]
    malloc = ranks[0]["malloc"]
    if malloc == "glibc":  # whose freed-memory setting matters
        malloc += ", freed memory " + ("kept" if config.keeps_freed_memory(wanted) else "returned")
    return {
        "zero_stage": stage, "activation_checkpointing": checkpointing,
        "malloc": malloc, "default_allocator": allocator is None,
        "peak_bytes_per_rank": [r["training_peak_bytes"] for r in ranks],
        # The larger rank: the one that decides whether a job fits.
        "model_state_bytes": max(r["training_peak_bytes"] - r["before_model_bytes"] for r in ranks),
        "held_bytes_rank0": summary["layout"]["state_bytes"],
        "tokens_per_second": trainer_tokens_per_second(rows, mem.warmup_steps),
    }


def _ratio_target(name: str, value: float, threshold: float, formula: str, at_most: bool) -> dict:
    met = value <= threshold if at_most else value >= threshold
    return {"name": name, "value": value, "threshold": threshold, "at_most": at_most, "met": met, "formula": formula}


def targets(runs: list) -> list:
    """The issue's targets on 2 ranks, without checkpointing, each with its formula; each stage as
    the trainer runs it by default, and also against stage 0 under ZeRO's malloc."""
    plain = {r["zero_stage"]: r for r in runs if r["activation_checkpointing"] == "none" and r["default_allocator"]}
    same_malloc = [r for r in runs if r["zero_stage"] == 0 and r["activation_checkpointing"] == "none"
                   and not r["default_allocator"]]
    bases = (("", plain.get(0)), (", both under ZeRO's malloc", same_malloc[0] if same_malloc else None))
    found = []
    if 0 in plain and 1 in plain:
        found.append(_ratio_target(
            "stage 1 / stage 0 optimizer-state bytes per rank", plain[1]["held_bytes_rank0"]["optimizer_state"]
            / plain[0]["held_bytes_rank0"]["optimizer_state"], 0.55, "held optimizer.state bytes, rank 0", True))
    if 3 in plain:
        model_state = "max over ranks of (peak - memory before the model)"
        for name, base in bases:
            if base is not None:
                found.append(_ratio_target(f"stage 3 / stage 0 model-state bytes per rank{name}",
                                           plain[3]["model_state_bytes"] / base["model_state_bytes"], 0.55,
                                           model_state, True))
    for name, base in bases:
        for stage, floor in ((1, 0.95), (2, 0.95), (3, 0.85)):
            if base is not None and stage in plain:
                found.append(_ratio_target(f"stage {stage} / stage 0 tokens/s{name}", plain[stage]["tokens_per_second"]
                                           / base["tokens_per_second"], floor, "trainer's tokens/s after warm-up",
                                           False))
    return found


def measure(ctx: Context, log=print) -> dict:
    mem = ctx.bench.memory
    cfg = cli.compose_config(training_overrides(ctx))
    parameters = models.count_parameters(tasks.build(cfg, rank=0, world=1).architecture().shapes())
    optimizer_bytes = plan.optimizer_bytes_per_parameter(cfg.optim.name, cfg.optim.momentum)
    runs = []
    for checkpointing in mem.activation_checkpointing:
        for stage in mem.stages:
            log(f"bench: memory zero_stage={stage} activation_checkpointing={checkpointing}")
            run = run_one(ctx, stage, checkpointing)
            run["predicted_model_state_bytes"] = plan.model_state_bytes(parameters, stage, mem.processes,
                                                                        optimizer_bytes)
            runs.append(run)
    if mem.like_for_like and 0 in mem.stages and "none" in mem.activation_checkpointing:
        log("bench: memory zero_stage=0 under jemalloc, as ZeRO runs by default")
        run = run_one(ctx, 0, "none", allocator="jemalloc")
        run["predicted_model_state_bytes"] = plan.model_state_bytes(parameters, 0, mem.processes, optimizer_bytes)
        runs.append(run)
    return {"model": mem.model, "parameters": parameters, "processes": mem.processes, "precision": mem.precision,
            "seq_len": mem.seq_len, "micro_batch_size": mem.micro_batch_size, "optimizer": cfg.optim.name,
            "launcher": ctx.bench.launcher, "runs": runs, "targets": targets(runs)}
