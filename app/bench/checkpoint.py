"""sections=[checkpoint]: what a sharded checkpoint costs (issue 26), from the trainer's own
summary.json (its checkpoint block, app/saving.py).

    python -m app.bench sections=[checkpoint]                       # llama_1b, ZeRO-3, 2 ranks, then 4
    python -m app.bench sections=[checkpoint] checkpoint.model=llama_tiny checkpoint.seq_len=64

The same run on checkpoint.processes ranks for each of checkpoint.modes (sync, async), each
saving every checkpoint.checkpoint_every steps and at the end: per save the loop's stall and
the write's throughput beside this disk's sequential write speed (dd, fdatasync'ed, in the same
work directory); every rank's peak resident set while saving against its training peak before
the first save; the export's peak resident set; and the sync run's first checkpoint resumed on
checkpoint.resume_processes ranks, its first loss against the first run's at the same step.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from app import checkpoint as checkpoints
from app import metrics
from app.bench import launch
from app.bench.context import Context
from app.bench.layouts import OVERSUBSCRIBE

# dd's last line on stderr: "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 2.1 s, 511 MB/s".
DD_COPIED = re.compile(r"^(\d+) bytes .* copied, ([\d.e+-]+) s", re.MULTILINE)


def train_args(ctx: Context, run_dir: Path, micro_batch_size: int, *extra) -> list:
    cc = ctx.bench.checkpoint
    shared = [o for o in ctx.train_overrides if not o.startswith("model=")]
    return [f"model={cc.model}", *shared, f"parallel.zero_stage={cc.zero_stage}", f"train.precision={cc.precision}",
            f"train.seq_len={cc.seq_len}", f"train.micro_batch_size={micro_batch_size}",
            f"train.checkpoint_every={cc.checkpoint_every}", "train.final_checkpoint=true",
            # Every save kept: the resume reads the first, and the bytes add up to the files.
            f"train.keep_last={cc.steps // cc.checkpoint_every + 1}", "train.log_every=1", "train.eval_every=0",
            "train.sample_tokens=0", "train.progress_bar=false", "train.deterministic=true",
            "train.peak_tflops=1.0", f"hydra.run.dir={run_dir}", *extra]


def run_trainer(ctx: Context, name: str, processes: int, args: list) -> dict:
    """One training run under bench.launcher; its summary and metrics rows."""
    run_dir = ctx.work_dir / name
    oversubscribed = processes > ctx.cores
    cmd = launch.command(ctx.bench.launcher, processes, "app.train",
                         [*args, f"train.threads_per_rank={max(1, ctx.cores // processes)}"],
                         list(OVERSUBSCRIBE) if oversubscribed else [], list(ctx.bench.mpirun_args))
    launch.run(cmd, ctx.work_dir / f"{name}.log", ctx.bench.launch_timeout_s, OVERSUBSCRIBE if oversubscribed else None)
    rows = metrics.read_rows(run_dir)
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "oversubscribed": oversubscribed,
            "losses": {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}}


def disk_write_bytes_per_s(directory: Path, mib: int) -> float:
    """This disk's sequential write speed: dd of mib MiB of zeros, fdatasync'ed as a save's files are."""
    path = directory / "ddtest"
    try:
        done = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync"],
                              capture_output=True, text=True, check=True)
    finally:
        path.unlink(missing_ok=True)
    copied = DD_COPIED.search(done.stderr)
    if copied is None:
        raise ValueError(f"dd printed no 'bytes ... copied, S s' line: {done.stderr.strip()[-200:]}")
    return int(copied.group(1)) / float(copied.group(2))


def export_peak_rss_bytes(ctx: Context, checkpoint_dir: Path) -> int:
    """python -m app.export of the checkpoint; its peak resident set, from the kernel's own account."""
    out = ctx.work_dir / "checkpoint-export"
    shutil.rmtree(out, ignore_errors=True)
    with open(ctx.work_dir / "checkpoint-export.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "app.export", f"checkpoint={checkpoint_dir}", f"out={out}"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=launch.ROOT,
                                   env={**os.environ, "PYTHONPATH": str(launch.ROOT)})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise launch.LaunchError(f"app.export exited {process.returncode}\n"
                                 f"{launch.tail(ctx.work_dir / 'checkpoint-export.log')}")
    shutil.rmtree(out, ignore_errors=True)
    return usage.ru_maxrss * 1024  # KiB on Linux


def saves(block: dict, disk_bytes_per_s: float) -> list:
    """Per save: the loop's stall, and the ranks' parallel write as throughput beside the disk's."""
    rows = []
    for step, stall, write, written in zip(block["steps"], block["stall_s"], block["write_s"], block["shard_bytes"]):
        throughput = written / write
        rows.append({"step": step, "stall_s": stall, "write_s": write, "shard_bytes": written,
                     "write_bytes_per_s": throughput, "of_disk": throughput / disk_bytes_per_s})
    return rows


def memory(block: dict) -> list:
    """Per rank: its peak resident set while saving over its training peak before the first save."""
    return [{"rank": rank["rank"], "training_peak_rss_bytes": rank["training_peak_rss_bytes"],
             "save_peak_rss_bytes": max(rank["save_peak_rss_bytes"]),
             "ratio": max(rank["save_peak_rss_bytes"]) / rank["training_peak_rss_bytes"]} for rank in block["ranks"]]


def resume(ctx: Context, first: dict) -> dict:
    """The first run's first checkpoint resumed on resume_processes ranks, the global batch kept."""
    cc = ctx.bench.checkpoint
    run_dir = ctx.work_dir / "checkpoint-resume"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = cc.checkpoint_every
    found = checkpoints.checkpoints_root(ctx.work_dir / "checkpoint-sync") / checkpoints.step_dir_name(start)
    micro_batch = cc.micro_batch_size * cc.processes // cc.resume_processes
    resumed = run_trainer(ctx, run_dir.name, cc.resume_processes, train_args(
        ctx, run_dir, micro_batch, f"train.resume={found}", f"train.max_steps={start + cc.resume_steps}",
        "train.final_checkpoint=false", "train.checkpoint_every=0"))
    step = start + 1
    difference = abs(resumed["losses"][step] - first["losses"][step])
    return {"processes": cc.resume_processes, "from_step": start, "step": step, "loss": resumed["losses"][step],
            "first_run_loss": first["losses"][step], "difference": difference,
            "within_tolerance": difference <= cc.resume_loss_tolerance, "oversubscribed": resumed["oversubscribed"]}


def measure(ctx: Context, log=print) -> dict:
    cc = ctx.bench.checkpoint
    runs = {}
    for mode in cc.modes:
        name = f"checkpoint-{mode}"
        shutil.rmtree(ctx.work_dir / name, ignore_errors=True)
        log(f"bench: checkpoint, {cc.model} at ZeRO-{cc.zero_stage} on {cc.processes} ranks, {mode} saves")
        runs[mode] = run_trainer(ctx, name, cc.processes, train_args(
            ctx, ctx.work_dir / name, cc.micro_batch_size, f"train.max_steps={cc.steps}",
            f"train.checkpoint_async={str(mode == 'async').lower()}", "train.resume=never"))
    disk = disk_write_bytes_per_s(ctx.work_dir, cc.dd_mib)
    log(f"bench: checkpoint, export and resume on {cc.resume_processes} ranks")
    last = checkpoints.latest(ctx.work_dir / "checkpoint-sync")
    result = {
        "model": cc.model, "zero_stage": cc.zero_stage, "processes": cc.processes, "steps": cc.steps,
        "checkpoint_every": cc.checkpoint_every, "precision": cc.precision, "seq_len": cc.seq_len,
        "micro_batch_size": cc.micro_batch_size, "cores": ctx.cores,
        "oversubscribed": runs["sync"]["oversubscribed"], "disk_write_bytes_per_s": disk,
        "modes": {mode: {"bytes": run["summary"]["checkpoint"]["bytes"],
                         "saves": saves(run["summary"]["checkpoint"], disk),
                         "memory": memory(run["summary"]["checkpoint"])} for mode, run in runs.items()},
        "export_peak_rss_bytes": export_peak_rss_bytes(ctx, last),
        "resume": resume(ctx, runs["sync"]) if cc.resume_processes else None,
    }
    result["targets"] = targets(cc, result)
    if not ctx.bench.keep_checkpoints:
        for name in ("checkpoint-sync", "checkpoint-async"):
            shutil.rmtree(ctx.work_dir / name / "checkpoints", ignore_errors=True)
    return result


def targets(cc, result: dict) -> list:
    """The issue's targets, measured and reported, never asserted."""
    sync = result["modes"]["sync"]
    rss_ratio = max(rank["ratio"] for rank in sync["memory"])
    of_disk = min(save["of_disk"] for save in sync["saves"])
    found = [
        {"name": "save peak RSS / training peak (sync, worst rank)", "value": rss_ratio,
         "target": f"<= {cc.max_save_rss_ratio:g}", "met": rss_ratio <= cc.max_save_rss_ratio},
        {"name": "save write throughput / disk's (sync, slowest save)", "value": of_disk,
         "target": f">= {cc.min_write_of_disk:g}", "met": of_disk >= cc.min_write_of_disk},
        {"name": "export peak RSS (GiB)", "value": result["export_peak_rss_bytes"] / 2**30,
         "target": f"< {cc.max_export_rss_gib:g}", "met": result["export_peak_rss_bytes"] < cc.max_export_rss_gib * 2**30},
    ]
    resumed = result["resume"]
    if resumed is not None:
        found.append({"name": f"resumed loss - first run's at step {resumed['step']}", "value": resumed["difference"],
                      "target": f"<= {cc.resume_loss_tolerance:g}", "met": resumed["within_tolerance"]})
    return found
