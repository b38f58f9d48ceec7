"""Every layout cell (data, tensor and pipeline parallelism, ZeRO, and their compositions) on the
same ranks, model, precision and global batch: tokens/s, seconds per step and peak memory per rank
(metrics.peak_memory_bytes, what the memory section reports: the resident set's high-water mark
on a CPU, the allocator's peak on a GPU).

    python -m app.bench sections=[layouts]                           # every cell but the opt-in ones
    python -m app.bench sections=[layouts] layouts.names=[D4,P2xT2xD2-ZeRO1]
    mpirun -np 4 python -m app.bench.layouts SPEC.json               # one cell (the worker)

A cell the trainer refuses (app/config.py) is a row with the refusal's one line, read from the
failed launch's output, and the section goes on: once a composition is built, its cell runs.
A row is oversubscribed when its ranks outnumber this machine's cores: they time-share the cores,
so its tokens/s say more about the machine than about the layout.
"""
import re

from app import allocator
from app.bench import launch

if __name__ == "__main__":
    # Before the imports below: a ZeRO cell's ranks re-execute under jemalloc, as app.train's
    # do, and then import torch, transformers and Horovod once, not twice.
    allocator.ensure_at_launch(launch.read_spec()["overrides"])

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from app import cli, dist, fileio, metrics
from app.bench import worker
from app.bench.context import Context
from app.bench.pipeline import timed_steps
from app.config import ConfigError
from app.step import PhaseTimer

# The line a worker prints for a config it refuses (worker.start_training, through cli.fail),
# after whatever prefix the launcher puts before each rank's lines.
REFUSAL = re.compile(r"(?:^|:)error: (.+)$", re.MULTILINE)
# OpenMPI refuses to start more ranks than cores unless told to oversubscribe.
OVERSUBSCRIBE = {"OMPI_MCA_rmaps_base_oversubscribe": "1"}


def main() -> None:
    spec, _, training = worker.read_spec_and_start()
    elapsed = timed_steps(training, spec, PhaseTimer(training.device))
    peaks = dist.allgather_object(metrics.peak_memory_bytes(training.device), name="layout_peaks")
    if dist.is_main():
        stream, steps = training.task.stream, spec["measure_steps"]
        fileio.write_json(spec["result"], {
            "global_batch": stream.global_batch, "micro_batch_per_rank": stream.micro_batch,
            "seconds_per_step": elapsed / steps,
            "tokens_per_second": stream.global_batch * training.task.seq_len * steps / elapsed,
            "peak_memory_bytes_per_rank": peaks, "max_peak_memory_bytes": max(peaks),
        })


def selected_cells(layouts) -> list:
    """The cells layouts.names lists, in the cells' order; None: every cell not marked opt_in."""
    if layouts.names is None:
        return [cell for cell in layouts.cells if not cell.opt_in]
    return [cell for cell in layouts.cells if cell.name in layouts.names]


def cell_plan(ctx: Context, cell) -> tuple:
    """(training overrides, row of the cell's mesh) with the global batch split over its data ranks."""
    lc = ctx.bench.layouts
    processes, micro_batches = cell.processes or lc.processes, cell.micro_batches or lc.micro_batches
    shared = [o for o in ctx.train_overrides if not o.startswith("model=")]
    overrides = [f"model={lc.model}", *shared, f"train.precision={lc.precision}",
                 f"train.grad_accum_steps={micro_batches}", *cell.overrides]
    try:
        parallel = cli.compose_config(overrides).parallel
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"layouts cell {cell.name}: {' '.join(str(error).split())}") from error
    model_ranks = parallel.tensor * parallel.pipeline
    data = processes // model_ranks
    if processes % model_ranks or lc.global_batch % (data * micro_batches):
        raise ConfigError(f"layouts cell {cell.name}: {processes} ranks at tensor {parallel.tensor} x pipeline "
                          f"{parallel.pipeline} leave {data} data ranks, whose {micro_batches} micro-batches do not "
                          f"split layouts.global_batch={lc.global_batch}; set a global batch they divide")
    overrides.append(f"train.micro_batch_size={lc.global_batch // (data * micro_batches)}")
    row = {"cell": cell.name, "processes": processes, "pipeline": parallel.pipeline, "tensor": parallel.tensor,
           "data": data, "zero_stage": parallel.zero_stage,
           "schedule": parallel.schedule if parallel.pipeline > 1 else None, "micro_batches": micro_batches,
           # Pipelines need MPI's point-to-point whatever bench.launcher says.
           "launcher": "mpi" if parallel.pipeline > 1 else ctx.bench.launcher,
           "oversubscribed": processes > ctx.cores}
    return overrides, row


def run_cell(ctx: Context, cell, overrides: list, row: dict, log=print) -> dict:
    """One cell's row: its measurements, or the one line that refused it."""
    lc = ctx.bench.layouts
    log(f"bench: layout {cell.name}, {row['processes']} ranks under {row['launcher']}"
        + (" (oversubscribed)" if row["oversubscribed"] else ""))
    spec = {"overrides": overrides, "threads": max(1, ctx.cores // row["processes"]),
            "warmup_steps": lc.warmup_steps, "measure_steps": lc.measure_steps}
    work_dir = ctx.work_dir / f"layouts-{cell.name}"
    try:
        result = launch.run_worker("app.bench.layouts", spec, work_dir, row["launcher"], row["processes"], ctx.bench,
                                   OVERSUBSCRIBE if row["oversubscribed"] else None)
    except launch.LaunchError:
        refusal = REFUSAL.search((work_dir / "output.log").read_text(encoding="utf-8", errors="replace"))
        if refusal is None:  # a crash, not a refusal: the section fails with the log's tail
            raise
        return {**row, "refused": refusal.group(1).strip()}
    return {**row, **result, "refused": None}


def measure(ctx: Context, log=print) -> dict:
    lc = ctx.bench.layouts
    cells = selected_cells(lc)
    plans = [cell_plan(ctx, cell) for cell in cells]  # every cell's bad input before the first launch
    rows = [run_cell(ctx, cell, overrides, row, log) for cell, (overrides, row) in zip(cells, plans)]
    return {"model": lc.model, "precision": lc.precision, "global_batch": lc.global_batch,
            "micro_batches": lc.micro_batches, "warmup_steps": lc.warmup_steps, "measure_steps": lc.measure_steps,
            "cores": ctx.cores, "rows": rows}


if __name__ == "__main__":
    main()
