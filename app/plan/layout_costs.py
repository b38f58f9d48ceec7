"""What a layout costs beyond what the planner prices its collectives at, measured by calibration:
a small LLaMA (plan.calibration.layout_model) trains at the same global batch
(app/plan/layout_steps.py) at plain data parallelism and each ZeRO stage in one 2-rank job (all
under jemalloc, ZeRO's malloc, so the stages differ in ZeRO alone) and at tensor parallelism in
the collectives job; a smaller one (plan.calibration.pipeline_model) as a pipeline in a third
job and at plain data parallelism in the ZeRO job.

Each cost is the measured step's excess over plain data parallelism's (the same model's), less
the excess the planner predicts without it (the collectives' latency and bandwidth), so the
compute model's own error cancels:
- zero_s_per_parameter per stage: over the parameters the rank's part holds and the step's
  reduction passes (app/plan/time.py zero_work_s);
- tensor_s_per_byte: over the activation bytes the tensor-parallel layers allreduce per step;
- pipeline_s_per_step and pipeline_s_per_micro_batch: two pipelines' excesses (m and 4m
  micro-batches) over the step and the micro-batch rounds of every stage (m - 1 + P).
A cost is never below 0: where the collectives' fits already explain the step, nothing is added.
"""
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from app import cli, config
from app.bench import launch
from app.plan import choose, time
from app.plan.cell import Cell
from app.plan.memory import stage_parameters
from app.plan.profile import HardwareProfile

STAGES = (0, 1, 2, 3)
ZERO = tuple(f"zero{stage}" for stage in STAGES)
# Each job's cells, in their runs' order: the ZeRO job also times the pipeline model's plain
# data-parallel step, the pipeline's baseline, on its data-parallel mesh.
JOBS = {"tensor": ("tensor",), "zero": (*ZERO, "pipeline_base"), "pipeline": ("pipeline", "pipeline_long")}


def overrides(cfg, model: Dict[str, object], cell: Cell) -> List[str]:
    """A run's training overrides: the model (`model`: model.* values), fp32, the cell's layout and batch."""
    return [*(f"model.{key}={'null' if value is None else value}" for key, value in model.items()),
            f"train.seq_len={model['max_seq_len']}", f"train.micro_batch_size={cell.micro_batch_size}",
            f"train.grad_accum_steps={cell.grad_accum_steps}", f"parallel.tensor={cell.tensor}",
            f"parallel.pipeline={cell.pipeline}", f"parallel.zero_stage={cell.zero_stage}", "train.precision=fp32",
            f"data.vocab_size={cfg.data.vocab_size}"]


def cells(cfg) -> Dict[str, Tuple[str, Cell]]:
    """Every cell the jobs time, by name: (its model, "layout" or "pipeline", and the cell). The
    layout model at D with each ZeRO stage and at T over all the ranks, one global batch; the
    pipeline model (small, so the schedule's own work stands out of its compute) at P over all
    the ranks and at D with the same global batch."""
    calibration = cfg.plan.calibration
    ranks, m = calibration.ranks, calibration.layout_micro_batches
    micro_batch, pipeline_micro_batch = calibration.layout_model[3], calibration.pipeline_model[3]
    found = {f"zero{stage}": ("layout", Cell(ranks, zero_stage=stage, micro_batch_size=micro_batch,
                                              grad_accum_steps=m)) for stage in STAGES}
    found["tensor"] = ("layout", Cell(ranks, tensor=ranks, micro_batch_size=micro_batch * ranks, grad_accum_steps=m))
    # Two pipelines, m and 4m micro-batches, so that a cost per step and one per micro-batch part.
    for name, micro_batches in (("pipeline", m * ranks), ("pipeline_long", 4 * m * ranks)):
        found[name] = ("pipeline", Cell(ranks, pipeline=ranks, micro_batch_size=pipeline_micro_batch,
                                        grad_accum_steps=micro_batches))
    found["pipeline_base"] = ("pipeline", Cell(ranks, micro_batch_size=pipeline_micro_batch, grad_accum_steps=m))
    return found


def layouts(cfg, models: Dict[str, Dict[str, object]], job: str) -> dict:
    """The layout_steps spec of one job (JOBS: "tensor" runs inside the collectives job); the
    ZeRO job's runs all under jemalloc. Each run's config is checked here: a model the layouts
    refuse is one line before any launch."""
    calibration, found = cfg.plan.calibration, cells(cfg)
    job_overrides = ["train.allocator=jemalloc"] if job == "zero" else []
    runs = [overrides(cfg, models[found[name][0]], found[name][1]) for name in JOBS[job]]
    for run in runs:
        config.validate(cli.compose_config([*job_overrides, *run]))
    return {"overrides": job_overrides, "runs": runs, "warmup_steps": calibration.layout_warmup_steps,
            "measure_steps": calibration.layout_measure_steps, "measure_seconds": calibration.layout_measure_seconds}


def run_job(cfg, spec: dict, job: str, threads: int, log) -> Dict[str, float]:
    """Seconds per step of a layouts() spec's runs, by cell name."""
    calibration = cfg.plan.calibration
    log(f"calibrate: {', '.join(JOBS[job])} steps on {calibration.ranks} ranks under mpirun")
    with tempfile.TemporaryDirectory(prefix="plan-calibrate-") as work_dir:
        result = launch.run_worker("app.plan.layout_steps", {**spec, "threads": threads}, Path(work_dir), "mpi",
                                   calibration.ranks, calibration)
    return dict(zip(JOBS[job], result["seconds_per_step"]))


def pipeline_costs(excesses: List[Tuple[Cell, float]]) -> Tuple[float, float]:
    """(per step, per micro-batch of a stage) from two pipelines' excesses: each stage's
    micro-batch time enters m - 1 + P times (app/plan/time.py), the step's once. Never below 0:
    a negative part is dropped and the other fitted alone."""
    (short, short_excess), (long, long_excess) = excesses
    rounds = [cell.grad_accum_steps - 1 + cell.pipeline for cell in (short, long)]
    per_micro_batch = (long_excess - short_excess) / (rounds[1] - rounds[0])
    per_step = short_excess - per_micro_batch * rounds[0]
    if per_micro_batch < 0:
        return max(0.0, (short_excess + long_excess) / 2), 0.0
    if per_step < 0:
        return 0.0, max(0.0, (short_excess + long_excess) / (rounds[0] + rounds[1]))
    return per_step, per_micro_batch


def fit(cfg, models: Dict[str, Dict[str, object]], measured: Dict[str, float], profile: HardwareProfile,
        log) -> HardwareProfile:
    """`profile` with zero_s_per_parameter, tensor_s_per_byte and pipeline_s_per_micro_batch set
    from the jobs' seconds (module docstring)."""
    found, ranks = cells(cfg), cfg.plan.calibration.ranks
    planners = {model: choose.Planner(cli.compose_config(overrides(cfg, models[model], found[base][1])), profile,
                                      ranks) for model, base in (("layout", "zero0"), ("pipeline", "pipeline_base"))}
    predicted = {name: planners[model].predict(cell).step_s for name, (model, cell) in found.items()}

    def excess(name: str, base: str = "zero0") -> float:
        """The measured excess over plain data parallelism's step beyond the predicted one."""
        return max(0.0, (measured[name] - measured[base]) - (predicted[name] - predicted[base]))

    layout = planners["layout"]
    held = stage_parameters(layout.shape, found["zero0"][1], 0)
    profile.zero_s_per_parameter = [0.0] + [excess(f"zero{s}") / (held * time.zero_passes(found[f"zero{s}"][1]))
                                            for s in STAGES[1:]]
    tensor = found["tensor"][1]
    tensor_bytes = tensor.grad_accum_steps * time.tensor_allreduce_bytes(layout.shape, tensor, 0, layout.settings)
    profile.tensor_s_per_byte = excess("tensor") / tensor_bytes
    profile.pipeline_s_per_step, profile.pipeline_s_per_micro_batch = pipeline_costs(
        [(found[name][1], excess(name, "pipeline_base")) for name in JOBS["pipeline"]])
    log("calibrate: steps (s) " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in measured.items())
        + "; ZeRO's own work per parameter and pass, stages 1-3: "
        + ", ".join(f"{seconds * 1e9:.2f} ns" for seconds in profile.zero_s_per_parameter[1:])
        + f"; tensor parallelism's per allreduced byte: {profile.tensor_s_per_byte * 1e9:.2f} ns"
        + f"; a pipeline's per step: {profile.pipeline_s_per_step * 1e3:.2f} ms"
        + f", a stage's per micro-batch: {profile.pipeline_s_per_micro_batch * 1e3:.2f} ms")
    return profile
