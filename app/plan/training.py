"""What a training run asks the planner: parallel.auto's pick, made before Horovod starts (the
mesh is read at start-up), and the prediction its summary checks against what it measured.

The pick is a function of the config, the profile (plan.hardware or the calibration cache),
the launched world and the memory cap, so every rank computes the same one without talking to
the others. The cap is plan.memory_gib when set; otherwise it comes from each host's memory,
which can differ between unlike hosts: set plan.memory_gib for those.
"""
import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from app import cli, config, dist
from app.plan import choose, profile
from app.plan.cell import from_config

# The launchers' variables for (ranks, ranks on this host), read before Horovod starts:
# OpenMPI's mpirun, MPICH/srun with PMI, horovodrun --gloo.
_WORLD_VARS = (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"), ("PMI_SIZE", "MPI_LOCALNRANKS"),
               ("HOROVOD_SIZE", "HOROVOD_LOCAL_SIZE"))


def launched_world() -> Tuple[int, int]:
    """(ranks, ranks on this host) as the launcher set them; (1, 1) without one."""
    for size, local in _WORLD_VARS:
        if size in os.environ:
            world = int(os.environ[size])
            return world, int(os.environ.get(local, world))
    return 1, 1


def auto_argv(argv: List[str]) -> List[str]:
    """argv with parallel.auto's pick appended over the layout keys it sets; argv itself when
    parallel.auto is off. Raises config.ConfigError when nothing fits."""
    startup = cli.startup_config(argv)
    if not startup.parallel.auto:
        return argv
    config.validate(startup)  # bad input reports its own line, not "nothing fits"
    world, ranks_on_host = launched_world()
    hardware = profile.load(startup.plan)
    global_batch = startup.train.micro_batch_size * startup.train.grad_accum_steps * world
    cap = choose.memory_cap_bytes(startup.plan, hardware, ranks_on_host)
    pick = choose.Planner(startup, hardware, ranks_on_host).pick(world, global_batch, cap, mpi=dist.launched_by_mpi())
    if pick is None:
        raise config.ConfigError(
            f"parallel.auto=true found no layout of {startup.model.name} on {world} ranks within {cap / 2**30:.2f} GiB "
            f"per rank at global batch {global_batch}; launch more ranks, raise plan.memory_gib or lower "
            "train.micro_batch_size")
    chosen = pick.cell.overrides()
    keys = {override.split("=", 1)[0] for override in chosen}
    return [arg for arg in argv if arg.split("=", 1)[0].lstrip("+~") not in keys] + chosen


@dataclass
class PlannedRun:
    """This run as the planner predicted it: its own cell's prediction and the profile behind it,
    both None where no prediction was made (a rank other than 0, or an unreadable profile)."""
    prediction: Optional[choose.Prediction] = None
    hardware: Optional[profile.HardwareProfile] = None

    def block(self, replicas: List[dict]) -> dict:
        """summary.json's plan block: predicted against measured step time and peak memory (the
        slowest rank's median step, the fullest rank's peak)."""
        prediction, hardware = self.prediction, self.hardware
        medians = [r["median_step_s"] for r in replicas if r["median_step_s"] is not None]
        return {
            "predicted_step_s": prediction.step_s if prediction else None,
            "measured_step_s": max(medians) if medians else None,
            "predicted_peak_bytes": prediction.peak_bytes if prediction else None,
            "measured_peak_bytes": max(r["memory"]["training_peak_bytes"] for r in replicas),
            "cell": prediction.cell.name() if prediction else None,
            "profile": hardware.name if hardware else None,
            "calibrated": hardware.calibrated if hardware else False,
            "validated": hardware.validated if hardware else False,
        }


def predict_run(cfg, world: int, warn: Callable[[str], None], note: Callable[[str], None]) -> PlannedRun:
    """This run's own cell predicted (under parallel.auto, the cell main's pick composed, noted
    as the pick). An unreadable profile leaves it unpredicted: the run goes on, its plan block
    holding measurements only. An uncalibrated profile is noted, not warned of: the run did not
    ask for a plan."""
    cell = from_config(cfg, world)
    if cfg.parallel.auto:
        note(f"parallel.auto: the planner picked {' '.join(cell.overrides())}")
    try:
        hardware = profile.load(cfg.plan)
        planner = choose.Planner(cfg, hardware, launched_world()[1])
    except config.ConfigError as error:
        warn(f"no prediction for this run: {error}")
        return PlannedRun()
    if not hardware.calibrated or not hardware.validated:
        note(f"the plan block's predictions come from {profile.describe(hardware)}")
    return PlannedRun(planner.predict(cell), hardware)


def median_step_s(step_seconds: List[float]) -> Optional[float]:
    return statistics.median(step_seconds) if step_seconds else None


def scalars(block: dict) -> dict:
    """The plan block's numbers for TensorBoard (plan/...), those that exist."""
    keys = ("predicted_step_s", "measured_step_s", "predicted_peak_bytes", "measured_peak_bytes")
    return {f"plan/{k}": float(block[k]) for k in keys if block[k] is not None and math.isfinite(block[k])}
