"""python -m app.plan calibrate: this machine's costs for the planner, in under a minute, cached
as a HardwareProfile (plan.cache). Measured:

- the process baseline: a rank's resident memory once Horovod and MPI run and the trainer's
  libraries are loaded, before any model (app/plan/collectives.py measures it);
- compute: forward + backward of small LLaMA models (plan.calibration.models) at each precision,
  with the threads one rank of a plan.calibration.ranks-rank job gets, fitted by least squares
  to seconds = a + b * layers + FLOPs / rate (app/plan/time.py's compute model);
- an AdamW step over plan.calibration.optimizer_parameters parameters, per parameter;
- the collectives: a real plan.calibration.ranks-rank MPI job (app/plan/collectives.py), each
  fitted to seconds = latency + bytes * seconds_per_byte.

Not measured, kept at cpu_default's value: backward_overlap (checked by the planner bench) and
activation_factor (1.0: the formula as derived)."""
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
from omegaconf import OmegaConf

from app import cores, models
from app.bench import bandwidth, launch
from app.parallel.layers import transformer_layers
from app.plan import layout_costs, profile
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


def time_model(model_cfg, vocab: int, shape: List[int], dtype, repeats: int) -> tuple:
    """(layers, FLOPs, median seconds) of one forward + backward of a model of `shape`."""
    hidden, layers, seq_len, batch = shape
    model = models.build_causal_lm(OmegaConf.merge(model_cfg, model_overrides(hidden, layers, seq_len)), vocab)
    per_layer = sum(p.numel() for p in transformer_layers(model)[0].parameters())
    flops = batch * seq_len * (layers * (6 * per_layer + 12 * hidden * seq_len) + 6 * vocab * hidden)
    tokens = torch.randint(vocab, (batch, seq_len))
    seconds = []
    for _ in range(repeats + 1):  # the first warms the allocator and kernels up
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        seconds.append(time.perf_counter() - started)
    return layers, flops, statistics.median(seconds[1:])


def compute_fit(model_cfg, vocab: int, calibration, precision: str) -> ComputeFit:
    rows = [time_model(model_cfg, vocab, list(shape), DTYPES[precision], calibration.repeats)
            for shape in calibration.models]
    design = np.array([[1.0, layers, flops] for layers, flops, _ in rows])
    coefficients, *_ = np.linalg.lstsq(design, np.array([s for *_, s in rows]), rcond=None)
    fixed, per_layer, per_flop = (max(float(c), SMALLEST_COST) for c in coefficients)
    return ComputeFit(micro_batch_overhead_s=fixed, layer_overhead_s=per_layer, flops_per_s=1 / per_flop)


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
    hidden, layers, seq_len, _ = calibration.layout_model
    layout_model = model_overrides(hidden, layers, seq_len)
    tensor, zero = layout_costs.tensor_layout(cfg, layout_model), layout_costs.zero_layouts(cfg, layout_model)
    job = collective_job(cfg, threads, tensor, log)
    layouts = {**layout_costs.zero_job(cfg, zero, threads, log), "tensor": job["layout_seconds_per_step"][0]}
    fits = {name: linear_fit([r["bytes"] for r in rows], [r["time_s"] for r in rows])
            for name, rows in job["rows"].items()}
    torch.set_num_threads(threads)
    log(f"calibrate: LLaMA forward + backward at {', '.join(calibration.precisions)}, {threads} threads")
    compute = {p: compute_fit(cfg.model, cfg.data.vocab_size, calibration, p) for p in calibration.precisions}
    default = profile.hardware(profile.DEFAULT_HARDWARE)
    measured = HardwareProfile(
        name=f"calibrated on {os.uname().nodename}", validated=False, calibrated=True, device="cpu", threads=threads,
        compute=compute, optimizer_s_per_parameter=optimizer_seconds_per_parameter(
            calibration.optimizer_parameters, calibration.repeats),
        calibration_ranks=calibration.ranks, calibration_cycle_time_ms=calibration.cycle_time_ms,
        process_baseline_bytes=job["baseline_bytes"], activation_factor=default.activation_factor,
        backward_overlap=default.backward_overlap, host_cores=len(cores.affinity()), **fits)
    measured = layout_costs.fit(cfg, layout_model, layouts, measured, log)
    path = profile.cache_path(cfg.plan)
    profile.write_cache(measured, path)
    log(f"calibrate: wrote {path}")
    return measured
