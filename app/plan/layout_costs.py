"""What a layout costs beyond what the planner prices its collectives at, measured by calibration:
one small LLaMA (plan.calibration.layout_model) trains at the same global batch
(app/plan/layout_steps.py) at plain data parallelism and each ZeRO stage in one 2-rank job (all
under jemalloc, ZeRO's malloc, so the stages differ in ZeRO alone), at tensor parallelism in the
collectives job, and as a pipeline in a third job.

Each cost is the measured step's excess over plain data parallelism's, less the excess the
planner predicts without it (the collectives' latency and bandwidth), so the compute model's own
error cancels:
- zero_s_per_parameter per stage: over the parameters the rank's part holds and the step's
  reduction passes (app/plan/time.py zero_work_s);
- tensor_s_per_byte: over the activation bytes the tensor-parallel layers allreduce per step;
- pipeline_s_per_micro_batch: over the micro-batch rounds of every stage (m - 1 + P).
A cost is never below 0: where the collectives' fits already explain the step, nothing is added.
"""
import tempfile
from pathlib import Path
from typing import Dict, List

from app import cli, config
from app.bench import launch
from app.plan import choose, time
from app.plan.cell import Cell
from app.plan.memory import stage_parameters
from app.plan.profile import HardwareProfile

STAGES = (0, 1, 2, 3)


def overrides(cfg, model: Dict[str, object], cell: Cell) -> List[str]:
    """A job's training overrides: the model (`model`: model.* values), fp32, the cell's mesh and batch."""
    seq_len = cfg.plan.calibration.layout_model[2]
    return [*(f"model.{key}={'null' if value is None else value}" for key, value in model.items()),
            f"train.seq_len={seq_len}", f"train.micro_batch_size={cell.micro_batch_size}",
            f"train.grad_accum_steps={cell.grad_accum_steps}", f"parallel.tensor={cell.tensor}",
            f"parallel.pipeline={cell.pipeline}", "train.precision=fp32", f"data.vocab_size={cfg.data.vocab_size}"]


def cells(cfg, ranks: int) -> Dict[str, Cell]:
    """The jobs' cells at one global batch: D at each ZeRO stage, T and P over all the ranks
    (the pipeline's micro-batches as many as the data ranks' together)."""
    calibration = cfg.plan.calibration
    micro_batch, m = calibration.layout_model[3], calibration.layout_micro_batches
    found = {f"zero{stage}": Cell(ranks, zero_stage=stage, micro_batch_size=micro_batch, grad_accum_steps=m)
             for stage in STAGES}
    found["tensor"] = Cell(ranks, tensor=ranks, micro_batch_size=micro_batch * ranks, grad_accum_steps=m)
    found["pipeline"] = Cell(ranks, pipeline=ranks, micro_batch_size=micro_batch, grad_accum_steps=m * ranks)
    return found


def layouts(cfg, model: Dict[str, object], job: str) -> dict:
    """The layout_steps spec of one job: "zero" (plain data parallelism and each ZeRO stage, all
    under jemalloc), "tensor" (run inside the collectives job) or "pipeline". Each run's config is
    checked here: a model the layouts refuse is one line before any launch."""
    calibration, found = cfg.plan.calibration, cells(cfg, cfg.plan.calibration.ranks)
    if job == "zero":
        job_overrides = [*overrides(cfg, model, found["zero0"]), "train.allocator=jemalloc"]
        runs = [[f"parallel.zero_stage={stage}"] for stage in STAGES]
    else:
        job_overrides, runs = overrides(cfg, model, found[job]), [[]]
    for run in runs:
        config.validate(cli.compose_config([*job_overrides, *run]))
    return {"overrides": job_overrides, "runs": runs, "warmup_steps": calibration.layout_warmup_steps,
            "measure_steps": calibration.layout_measure_steps}


def run_job(cfg, spec: dict, names: List[str], threads: int, log) -> Dict[str, float]:
    """Seconds per step of a layouts() spec's runs, by cell name."""
    calibration = cfg.plan.calibration
    log(f"calibrate: {', '.join(names)} steps on {calibration.ranks} ranks under mpirun")
    with tempfile.TemporaryDirectory(prefix="plan-calibrate-") as work_dir:
        result = launch.run_worker("app.plan.layout_steps", {**spec, "threads": threads}, Path(work_dir), "mpi",
                                   calibration.ranks, calibration)
    return dict(zip(names, result["seconds_per_step"]))


def fit(cfg, model: Dict[str, object], measured: Dict[str, float], profile: HardwareProfile,
        log) -> HardwareProfile:
    """`profile` with zero_s_per_parameter and tensor_s_per_byte set from the jobs' seconds."""
    found = cells(cfg, cfg.plan.calibration.ranks)
    planner = choose.Planner(cli.compose_config(overrides(cfg, model, found["zero0"])), profile,
                             cfg.plan.calibration.ranks)
    predicted = {name: planner.predict(cell).step_s for name, cell in found.items()}

    def excess(name: str) -> float:
        """The measured excess over plain data parallelism beyond the predicted one."""
        return max(0.0, (measured[name] - measured["zero0"]) - (predicted[name] - predicted["zero0"]))

    held = stage_parameters(planner.shape, found["zero0"], 0)
    profile.zero_s_per_parameter = [0.0] + [excess(f"zero{s}") / (held * time.zero_passes(found[f"zero{s}"]))
                                            for s in STAGES[1:]]
    tensor = found["tensor"]
    tensor_bytes = tensor.grad_accum_steps * time.tensor_allreduce_bytes(planner.shape, tensor, 0, planner.settings)
    profile.tensor_s_per_byte = excess("tensor") / tensor_bytes
    pipeline = found["pipeline"]
    # Each stage's micro-batch time enters m - 1 + P times (app/plan/time.py's pipeline).
    profile.pipeline_s_per_micro_batch = excess("pipeline") / (pipeline.grad_accum_steps - 1 + pipeline.pipeline)
    log("calibrate: steps (s) " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in measured.items())
        + "; ZeRO's own work per parameter and pass, stages 1-3: "
        + ", ".join(f"{seconds * 1e9:.2f} ns" for seconds in profile.zero_s_per_parameter[1:])
        + f"; tensor parallelism's per allreduced byte: {profile.tensor_s_per_byte * 1e9:.2f} ns"
        + f"; a pipeline stage's per micro-batch: {profile.pipeline_s_per_micro_batch * 1e3:.2f} ms")
    return profile
