"""python -m app.bench: how fast this machine trains, and where the time goes.

    python -m app.bench                    # every section, 8.5 minutes on a quiet 2-core machine, plus compilations
    python -m app.bench preset=quick       # every section in about 1.5 minutes, plus three small compilations
    python -m app.bench sections=[throughput] throughput.precisions=[bf16] out=runs/bench/tp
    python -m app.bench sections=[memory]  # ZeRO stages 0-3 x activation checkpointing, llama_125m
    python -m app.bench sections=[layouts] # every layout cell on 4 ranks: tokens/s, peak memory per rank
    python -m app.bench sections=[planner] # the planner's predictions against a grid of measured layouts
    python -m app.bench sections=[checkpoint]  # sharded saves (sync, async), resume on 4 ranks, export; llama_1b

Sections: the matmul peak (fp32, bf16; 1 thread and all cores); tokens/s and MFU of the trainer
at 1..N processes, eager and compiled, against a plain PyTorch loop, DDP and Hugging Face's
Trainer (eager and torch_compile=True), with scaling efficiency; allreduce bus
bandwidth under Gloo and MPI; the gradient-set allreduce under Horovod's fusion and cycle
settings; a step-time breakdown; on request, a pipeline against data parallelism (sections=[pipeline])
and every layout cell, composed ones included (sections=[layouts]). Writes <out>/bench.md (also
printed) and <out>/bench.json.
Targets are measured and reported; a miss does not fail the command, a failed section does.
"""
import platform
import sys
import time
from pathlib import Path

import horovod
import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app import cli, config, fileio
from app.bench import (bandwidth, breakdown, checkpoint, context, fusion, launch, layouts, memory, peak, pipeline,
                       planner, report, tensor_parallel, throughput)
from app.bench import config as bench_config

CONF_DIR = str(Path(cli.CONF_DIR) / "bench")
# The instruction-set features that decide the matmul peak on a CPU.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def load_config(argv) -> bench_config.BenchConfig:
    """BenchConfig from conf/bench/ and key=value arguments; bad input is one line and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    bench_config.register()
    try:
        # conf/bench/ is its own config root: `model=...` here is a plain key, not the training
        # config's model group.
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(argv))
        OmegaConf.resolve(cfg)
        bench_config.validate(cfg)
    except (HydraException, OmegaConfBaseException, config.ConfigError) as error:
        cli.fail(" ".join(str(error).split()))
    return cfg


def machine_info(cores: int) -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": cores, "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "torch": torch.__version__, "horovod": horovod.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_sections(cfg, ctx: context.Context) -> dict:
    """Each section's results by name; a section that fails is recorded and the rest still run."""
    measure = {
        "peak": lambda: peak.measure(ctx.peaks, list(peak.DTYPES), ctx.cores),
        "throughput": lambda: throughput.measure(ctx, log),
        "bandwidth": lambda: bandwidth.measure(ctx, log),
        "fusion": lambda: fusion.measure(ctx, log),
        "breakdown": lambda: breakdown.measure(ctx, log),
        "pipeline": lambda: pipeline.measure(ctx, log),
        "memory": lambda: memory.measure(ctx, log),
        "tensor": lambda: tensor_parallel.measure(ctx, log),
        "layouts": lambda: layouts.measure(ctx, log),
        "planner": lambda: planner.measure(ctx, log),
        "checkpoint": lambda: checkpoint.measure(ctx, log),
    }
    results, failed = {}, {}
    for name in bench_config.BENCH_SECTIONS:  # a fixed order: the peak first, while the machine is quiet
        if name not in cfg.sections:
            continue
        log(f"bench: {name}")
        try:
            results[name] = measure[name]()
        except (launch.LaunchError, ValueError, KeyError, FileNotFoundError) as error:
            log(f"bench: {name} failed: {error}")
            failed[name] = str(error)
    return {**results, "errors": failed}


def main() -> None:
    cfg = load_config(sys.argv[1:])
    started = time.perf_counter()
    out = Path(cfg.out).resolve()
    try:
        ctx = context.build(cfg, out, log)
    except (FileNotFoundError, ValueError) as error:
        cli.fail(str(error))
    results = {"machine": machine_info(ctx.cores), "config": OmegaConf.to_container(cfg),
               "max_processes": ctx.max_processes, "threads_per_process": ctx.threads_per_process}
    results.update(run_sections(cfg, ctx))
    results["elapsed_s"] = time.perf_counter() - started
    markdown = report.markdown(results)
    fileio.write_json(out / "bench.json", results)
    fileio.write_text(out / "bench.md", markdown)
    print(markdown)
    log(f"bench: wrote {out / 'bench.md'} and {out / 'bench.json'}")
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
