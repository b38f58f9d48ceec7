"""A machine's costs as the planner uses them: a hardware profile (conf/plan/hardware/*.yaml)
or the calibration cache `python -m app.plan calibrate` writes, both of the HardwareProfile schema.

Which one a prediction uses: plan.hardware when set, else the cache when it exists, else
cpu_default, whose numbers are rough guesses for a small CPU host and say so (calibrated: false).
A cache that exists but cannot be read is an error naming the file and the fix; the planner
never recalibrates on its own (a calibration launches ranks, which a training run must not do
behind the user's back).

Collective fits are `latency_s + seconds_per_byte * bytes` for the whole buffer (an allgather's
output, a reducescatter's input), measured on `calibration_ranks` ranks with Horovod's cycle time
at `calibration_cycle_time_ms`; app/plan/time.py scales them to other group sizes and cycle times.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app import cli, fileio
from app.config import ConfigError

HARDWARE_DIR = Path(cli.CONF_DIR) / "plan" / "hardware"
DEFAULT_HARDWARE = "cpu_default"


@dataclass
class LinkFit:
    latency_s: float = 1e-4
    seconds_per_byte: float = 1e-9


@dataclass
class ComputeFit:
    """Forward + backward of one micro-batch: a fixed cost, one per layer, and FLOPs at a rate."""
    micro_batch_overhead_s: float = 1e-3
    layer_overhead_s: float = 2e-4
    flops_per_s: float = 2e10


@dataclass
class HardwareProfile:
    name: str = "???"
    # true only once a measured run has been compared with this profile's predictions
    # (python -m app.bench sections=[planner]); the tool prints a warning for an unvalidated one.
    validated: bool = False
    # true when these numbers were measured here by python -m app.plan calibrate.
    calibrated: bool = False
    device: str = "cpu"  # cpu | cuda: Horovod's cycle-time default differs (app/dist.py)
    # Threads each rank ran with when the compute fits were measured.
    threads: int = 1
    # Per precision (fp32, bf16, fp16).
    compute: Dict[str, ComputeFit] = field(default_factory=dict)
    # An optimizer step's cost per parameter it updates (AdamW, fp32).
    optimizer_s_per_parameter: float = 1e-8
    allreduce: LinkFit = field(default_factory=LinkFit)
    reducescatter: LinkFit = field(default_factory=LinkFit)
    allgather: LinkFit = field(default_factory=LinkFit)
    point_to_point: LinkFit = field(default_factory=LinkFit)
    calibration_ranks: int = 2
    calibration_cycle_time_ms: float = 1.0
    # A rank's resident memory before its model: interpreter, torch, Horovod, MPI, transformers.
    process_baseline_bytes: int = 0
    # Measured activation bytes over the formula's (app/plan/memory.py; calibration measures it); 1.0 unmeasured.
    activation_factor: float = 1.0
    # The share of gradient communication that runs behind backward (and of ZeRO's parameter
    # gathers behind forward); an assumption per profile, checked by the planner bench.
    backward_overlap: float = 0.5
    # ZeRO's own seconds per parameter a rank's part holds and per reduction pass, by stage
    # (index 0, plain data parallelism, is 0): its work beyond the collectives' wire time
    # (app/plan/time.py), measured by calibration's 2-rank steps (app/plan/layout_costs.py).
    zero_s_per_parameter: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    # Tensor-parallel layers' own seconds per byte of activation they allreduce, beyond the
    # allreduce's fit; measured the same way.
    tensor_s_per_byte: float = 0.0
    # A pipeline stage's own seconds per micro-batch beyond its sends' fit (the schedule's work,
    # posting and completing its receives); measured the same way.
    pipeline_s_per_micro_batch: float = 0.0
    # A pipeline's own seconds per step beyond its stages' micro-batches (the step's exchanges
    # between stages: the loss, the gradient norm); measured the same way.
    pipeline_s_per_step: float = 0.0
    # CPU cores a host gives its ranks: more ranks than these time-share them (app/plan/time.py);
    # None where each rank has its own device.
    host_cores: Optional[int] = None
    # Memory a rank may use; None: the host's memory divided by its ranks.
    memory_per_rank_gib: Optional[float] = None


def _typed(raw, source: Path) -> HardwareProfile:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareProfile), raw))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source} does not match the profile schema ({' '.join(str(error).split())}); "
                          f"rerun python -m app.plan calibrate or fix the file") from error


def hardware(name: str) -> HardwareProfile:
    path = HARDWARE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml")))
        raise ConfigError(f"plan.hardware={name} has no profile {path}; use one of {known}")
    return _typed(OmegaConf.load(path), path)


def cache_path(plan_cfg) -> Path:
    return Path(plan_cfg.cache).expanduser()


def read_cache(path: Path) -> HardwareProfile:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"calibration cache {path} is unreadable ({error}); delete it or rerun "
                          "python -m app.plan calibrate") from error
    return _typed(raw, path)


def load(plan_cfg) -> HardwareProfile:
    """The profile predictions use (module docstring: which one, and what a bad cache does)."""
    if plan_cfg.hardware:
        return hardware(plan_cfg.hardware)
    path = cache_path(plan_cfg)
    return read_cache(path) if path.exists() else hardware(DEFAULT_HARDWARE)


def describe(profile: HardwareProfile) -> str:
    """One line on where the numbers come from, saying plainly when they are guesses."""
    notes = [] if profile.calibrated else ["not calibrated here (python -m app.plan calibrate)"]
    if not profile.validated:
        notes.append("unvalidated: no measured run has checked it")
    return f"profile {profile.name}" + (": " + "; ".join(notes) if notes else "")


def write_cache(profile: HardwareProfile, path: Path) -> None:
    fileio.write_json(path, OmegaConf.to_container(OmegaConf.structured(profile)))
