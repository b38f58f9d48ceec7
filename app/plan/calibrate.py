"""python -m app.plan calibrate: this machine's costs for the planner, in about a minute, cached
as a HardwareProfile (plan.cache). Measured:

- the process baseline: a rank's resident memory once Horovod and MPI run and the trainer's
  libraries are loaded, before any model (app/plan/collectives.py measures it);
- compute: forward + backward of small LLaMA models (plan.calibration.models) with the trainer's
  loss at each precision, with the threads one rank of a plan.calibration.ranks-rank job gets,
  fitted by least squares to seconds = a + b * layers + FLOPs / rate (app/plan/time.py's
  compute model);
- activation_factor: the same runs' resident peak over app/plan/memory.py's activations (the
  median over the models, at the first precision);
- an AdamW step over plan.calibration.optimizer_parameters parameters, per parameter;
- the collectives: a real plan.calibration.ranks-rank MPI job (app/plan/collectives.py), each
  fitted to seconds = latency + bytes * seconds_per_byte;
- ZeRO's, tensor parallelism's and a pipeline's own costs beyond their collectives and sends
  (app/plan/layout_costs.py);
- host_cores: the cores this process may run on.

Not measured, kept at cpu_default's value: backward_overlap (checked by the planner bench)."""
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np
import psutil
import torch
from omegaconf import OmegaConf

from app import cores, models, runtime
from app.bench import bandwidth, launch
from app.parallel.layers import transformer_layers
from app.plan import layout_costs, memory, profile
from app.plan.cell import Cell, shape
from app.plan.profile import ComputeFit, HardwareProfile, LinkFit

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# LLaMA's proportions for the timed models: FFN 8/3 of hidden, 64-wide heads.
FFN_RATIO = 8 / 3
HEAD_WIDTH = 64
# The FFN width rounded up to a multiple of this, as LLaMA rounds it (to 256), so that tensor
# parallelism's sizes divide it.
FFN_MULTIPLE = 8
# A fit's coefficients never go below this (noise can make a least-squares cost negative).
SMALLEST_COST = 1e-12


def linear_fit(x: List[float], y: List[float]) -> LinkFit:
    """Least squares on relative residuals (weights 1/y): plain residuals would let the largest
    buffers' seconds swamp the small ones', which are what fix the latency."""
    seconds = np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(np.asarray(x, dtype=float), seconds, 1, w=1 / seconds)
    return LinkFit(latency_s=max(float(intercept), SMALLEST_COST), seconds_per_byte=max(float(slope), SMALLEST_COST))


def model_overrides(hidden: int, layers: int, seq_len: int) -> dict:
    """model.* of a timed LLaMA of LLaMA's proportions."""
    ffn = -(-int(hidden * FFN_RATIO) // FFN_MULTIPLE) * FFN_MULTIPLE
    return {"hidden_size": hidden, "intermediate_size": ffn, "num_layers": layers,
            "num_heads": max(1, hidden // HEAD_WIDTH), "num_kv_heads": None, "max_seq_len": seq_len,
            "tie_embeddings": False}


def resident_peak_bytes() -> int:
    """This process's resident high-water mark (VmHWM) since the last reset_resident_peak."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_resident_peak() -> None:
    """Linux resets VmHWM to the current resident set when 5 is written to clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")


def forward_backward(model, tokens: torch.Tensor, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = models.causal_lm_loss(model, tokens, tokens)
    loss.backward()


def held_by_a_step(model, tokens: torch.Tensor, dtype) -> int:
    """What one forward + backward holds at its peak beyond the resident set before it (the
    gradients already there): glibc returning every freed block of 128 KiB or more and trimmed
    first, so the resident set follows what is live; then back to keeping freed blocks, as
    plain data parallelism trains (app/config.py keeps_freed_memory)."""
    runtime.return_freed_memory()
    runtime.trim_freed_memory()
    before = psutil.Process().memory_info().rss
    reset_resident_peak()
    forward_backward(model, tokens, dtype)
    held = resident_peak_bytes() - before
    runtime.keep_freed_memory()
    return held


def time_model(model_cfg, vocab: int, dimensions: List[int], dtype, repeats: int, held: bool = False) -> tuple:
    """(layers, FLOPs, median seconds, bytes held by a step or None unless `held`) of one
    forward + backward of a model of `dimensions` with the trainer's loss."""
    hidden, layers, seq_len, batch = dimensions
    model = models.build_causal_lm(OmegaConf.merge(model_cfg, model_overrides(hidden, layers, seq_len)), vocab)
    per_layer = sum(p.numel() for p in transformer_layers(model)[0].parameters())
    flops = batch * seq_len * (layers * (6 * per_layer + 12 * hidden * seq_len) + 6 * vocab * hidden)
    tokens = torch.randint(vocab, (batch, seq_len))
    seconds = []
    for _ in range(repeats + 1):  # the first warms the allocator and kernels up
        started = time.perf_counter()
        forward_backward(model, tokens, dtype)
        seconds.append(time.perf_counter() - started)
    return layers, flops, statistics.median(seconds[1:]), held_by_a_step(model, tokens, dtype) if held else None


def warm_up(cfg) -> None:
    """One forward + backward of the first timed model: the process's first (thread pools, the
    kernels' one-time set-up) would otherwise weigh on that model's timings."""
    time_model(cfg.model, cfg.data.vocab_size, list(cfg.plan.calibration.models[0]), None, 1)


def compute_fit(rows: List[tuple]) -> ComputeFit:
    """time_model's rows fitted to app/plan/time.py's compute model, by least squares on relative
    residuals (as linear_fit): the small models are what fix the fixed costs."""
    seconds = np.array([s for _, _, s, _ in rows])
    design = np.array([[1.0, layers, flops] for layers, flops, *_ in rows])
    coefficients, *_ = np.linalg.lstsq(design / seconds[:, None], np.ones_like(seconds), rcond=None)
    fixed, per_layer, per_flop = (max(float(c), SMALLEST_COST) for c in coefficients)
    return ComputeFit(micro_batch_overhead_s=fixed, layer_overhead_s=per_layer, flops_per_s=1 / per_flop)


def activation_factor(cfg, rows: List[tuple], precision: str) -> float:
    """The median over the timed models of their measured activation bytes over app/plan/memory.py's."""
    calibration, ratios = cfg.plan.calibration, []
    for (hidden, layers, seq_len, batch), (*_, measured) in zip(calibration.models, rows):
        timed = OmegaConf.merge(cfg, {"model": model_overrides(hidden, layers, seq_len), "train": {"seq_len": seq_len}})
        formula = memory.activation_bytes(shape(timed), Cell(1, micro_batch_size=batch), 0, precision,
                                          cfg.train.activation_checkpointing_every, 1.0)
        ratios.append(measured / formula)
    return statistics.median(ratios)


def optimizer_seconds_per_parameter(parameters: int, repeats: int) -> float:
    weights = torch.nn.Parameter(torch.zeros(parameters))
    weights.grad = torch.ones(parameters)
    optimizer = torch.optim.AdamW([weights])
    optimizer.step()  # creates its state
    started = time.perf_counter()
    for _ in range(repeats):
        optimizer.step()
    return (time.perf_counter() - started) / repeats / parameters


def collective_job(cfg, threads: int, layout: dict, log) -> dict:
    """The collectives job's result: rows of seconds per buffer size per collective, the
    baseline, and the seconds per step of `layout` (a layout_steps spec)."""
    calibration = cfg.plan.calibration
    horovod = {**OmegaConf.to_container(cfg.horovod), "cycle_time_ms": calibration.cycle_time_ms}
    spec = {"sizes": bandwidth.message_sizes(calibration.min_bytes, calibration.max_bytes, calibration.size_factor),
            "threads": threads, "warmup_iterations": 1, "min_iterations": 2, "max_iterations": 1000,
            "seconds_per_size": calibration.seconds_per_size, "horovod": horovod, "layout": layout}
    log(f"calibrate: collectives, then a tensor-parallel step, on {calibration.ranks} ranks under mpirun")
    with tempfile.TemporaryDirectory(prefix="plan-calibrate-") as work_dir:
        return launch.run_worker("app.plan.collectives", spec, Path(work_dir), "mpi", calibration.ranks, calibration)


def calibrate(cfg, log=print) -> HardwareProfile:
    """Measure this machine (module docstring) and write the cache; returns the profile."""
    calibration = cfg.plan.calibration
    threads = max(1, len(cores.affinity()) // calibration.ranks)
    layout_models = {name: model_overrides(*shape[:3]) for name, shape in
                     (("layout", calibration.layout_model), ("pipeline", calibration.pipeline_model))}
    specs = {job: layout_costs.layouts(cfg, layout_models, job) for job in layout_costs.JOBS}
    job = collective_job(cfg, threads, specs["tensor"], log)
    layouts = {"tensor": job["layout_seconds_per_step"][0]}
    for name in ("zero", "pipeline"):
        layouts.update(layout_costs.run_job(cfg, specs[name], name, threads, log))
    fits = {name: linear_fit([r["bytes"] for r in rows], [r["time_s"] for r in rows])
            for name, rows in job["rows"].items()}
    torch.set_num_threads(threads)
    runtime.keep_freed_memory()  # as plain data parallelism trains (app/config.py keeps_freed_memory)
    warm_up(cfg)
    log(f"calibrate: LLaMA forward + backward at {', '.join(calibration.precisions)}, {threads} threads")
    # The activations are measured at the first precision alone, which activation_factor reads.
    rows = {p: [time_model(cfg.model, cfg.data.vocab_size, list(model), DTYPES[p], calibration.repeats,
                           held=p == calibration.precisions[0]) for model in calibration.models]
            for p in calibration.precisions}
    compute = {p: compute_fit(rows[p]) for p in calibration.precisions}
    default = profile.hardware(profile.DEFAULT_HARDWARE)
    measured = HardwareProfile(
        name=f"calibrated on {os.uname().nodename}", validated=False, calibrated=True, device="cpu", threads=threads,
        compute=compute, optimizer_s_per_parameter=optimizer_seconds_per_parameter(
            calibration.optimizer_parameters, calibration.repeats),
        calibration_ranks=calibration.ranks, calibration_cycle_time_ms=calibration.cycle_time_ms,
        process_baseline_bytes=job["baseline_bytes"],
        activation_factor=activation_factor(cfg, rows[calibration.precisions[0]], calibration.precisions[0]),
        backward_overlap=default.backward_overlap, host_cores=len(cores.affinity()), **fits)
    log(f"calibrate: activations measured at {measured.activation_factor:.2f} times app/plan/memory.py's")
    measured = layout_costs.fit(cfg, layout_models, layouts, measured, log)
    path = profile.cache_path(cfg.plan)
    profile.write_cache(measured, path)
    log(f"calibrate: wrote {path}")
    return measured
