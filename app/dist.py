"""Horovod start-up, ranks, threads and the small collectives the loop needs (metrics, agreeing
on rank 0's decisions). How gradients and parameters move lives in app/parallel; the model,
data and task code never import horovod."""
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import horovod.torch as hvd
import torch

from app import cores
from app.mesh import DIMENSIONS, Mesh
from app.tensors import to_cpu

# Launchers that start ranks as one MPI job (mpirun, srun with PMI/PMIx) set these.
_MPI_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    # horovodrun --gloo sets its rendezvous address instead; then Gloo runs the collectives.
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ:
        return False
    return any(name in os.environ for name in _MPI_LAUNCH_VARS)


# The start-up variables for the knobs in config.HorovodConfig, with each value's spelling:
# Horovod's own (read by hvd.init) and an OpenMPI MCA parameter (read at MPI_Init, which
# hvd.init or mpi4py's import performs).
_SETTINGS_ENV = {
    "cycle_time_ms": ("HOROVOD_CYCLE_TIME", lambda ms: f"{ms:g}"),
    "fusion_threshold_mb": ("HOROVOD_FUSION_THRESHOLD", lambda mb: str(mb * 2**20)),
    "mpi_yield_when_idle": ("OMPI_MCA_mpi_yield_when_idle", lambda on: "1" if on else "0"),
}


# Horovod's tools (config.HorovodConfig timeline and autotune), also read once at hvd.init. Their
# files belong in the run directory, which is decided after hvd.init (the ranks agree on it over
# Horovod): the timeline starts there later (HOROVOD_TIMELINE=DYNAMIC, start_timeline); the
# autotuner opens its log at init, so it writes to a staging file that save_autotune_log copies.
TIMELINE_FILE = "horovod_timeline.json"
AUTOTUNE_FILE = "horovod_autotune.csv"
_TOOL_VARIABLES = ("HOROVOD_TIMELINE", "HOROVOD_AUTOTUNE", "HOROVOD_AUTOTUNE_LOG")


def _autotune_staging() -> str:
    # Per process: only rank 0 (the coordinator) writes it; the others' names stay unused.
    return os.path.join(tempfile.gettempdir(), f"llama-horovod-autotune-{os.getpid()}.csv")


def _request_tools(settings) -> None:
    if getattr(settings, "timeline", False):
        os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")
    if getattr(settings, "autotune", False):
        os.environ.setdefault("HOROVOD_AUTOTUNE", "1")
        os.environ.setdefault("HOROVOD_AUTOTUNE_LOG", _autotune_staging())


# Measured on CPU ranks (README, "Measured here"); a GPU rank keeps Horovod's own 1 ms, which
# suits steps of milliseconds.
CPU_CYCLE_TIME_MS = 10.0
# Tensor parallelism waits for a cycle at every one of its blocking collectives, dozens a step:
# 10 ms each made llama_tiny at T=2 2.6x slower than 1 ms (README, "Tensor parallelism").
TENSOR_PARALLEL_CYCLE_TIME_MS = 1.0


def default_cycle_time_ms(tensor: int) -> Optional[float]:
    """horovod.cycle_time_ms=null resolved for this layout; None: Horovod's own (1 ms)."""
    if tensor > 1:
        return TENSOR_PARALLEL_CYCLE_TIME_MS
    return None if torch.cuda.is_available() else CPU_CYCLE_TIME_MS


# The layout's process sets, made once at start-up (Horovod's static process sets): this
# rank's set along each mesh dimension, and under an MPI launch the matching MPI communicator.
_mesh: Optional[Mesh] = None
_process_sets: Dict[str, "hvd.ProcessSet"] = {}
_communicators: Dict[str, object] = {}


def init(settings=None, layout=None) -> None:
    """Start Horovod; under an MPI launcher from MPI.COMM_WORLD, so mpi4py and Horovod share one
    world and MPI sub-communicators become Horovod process sets. `settings` (a
    config.HorovodConfig) fills the start-up variables the environment leaves unset; `layout`
    (a config.ParallelConfig) asks for tensor/pipeline groups, whose process sets are made here."""
    global _mesh
    if hvd.is_initialized():
        return
    tensor, pipeline = getattr(layout, "tensor", 1), getattr(layout, "pipeline", 1)
    for key, (variable, spell) in _SETTINGS_ENV.items():
        value = getattr(settings, key, None)
        if key == "cycle_time_ms" and value is None:
            value = default_cycle_time_ms(tensor)
        if value is not None:
            os.environ.setdefault(variable, spell(value))
    _request_tools(settings)
    if launched_by_mpi() and hvd.mpi_built():
        from mpi4py import MPI  # only under an MPI launch: importing it initialises MPI

        _mesh = Mesh(MPI.COMM_WORLD.Get_size(), tensor, pipeline)
        sets = _mpi_process_sets(MPI.COMM_WORLD, _mesh)
        hvd.init(comm=MPI.COMM_WORLD, process_sets=sets)
        if pipeline > 1 and not hvd.mpi_threads_supported():
            raise ValueError(f"parallel.pipeline={pipeline} sends with mpi4py beside Horovod's MPI thread, which "
                             "needs an MPI built with MPI_THREAD_MULTIPLE; rebuild MPI with thread support")
    elif pipeline > 1:
        # Refused before hvd.init, so every rank exits at once instead of waiting on the others.
        raise ValueError(f"parallel.pipeline={pipeline} sends activations over MPI point-to-point, which needs "
                         "an MPI launch (mpirun, srun or horovodrun --mpi); this is horovodrun --gloo or no launcher")
    else:
        _mesh = Mesh(int(os.environ.get("HOROVOD_SIZE", "1")), tensor, pipeline)
        sets = _rank_list_process_sets(int(os.environ.get("HOROVOD_RANK", "0")), _mesh)
        hvd.init(process_sets=sets)


def _needs_sets(mesh: Mesh) -> bool:
    # Every process set adds work to each round of Horovod's background thread: none for plain
    # data parallelism, whose only group is the world.
    return mesh.tensor > 1 or mesh.pipeline > 1


def _mpi_process_sets(world_comm, mesh: Mesh) -> list:
    """This rank's group along each dimension as an MPI sub-communicator and a process set on it."""
    rank, sets, by_group = world_comm.Get_rank(), [], {}
    for dimension in DIMENSIONS if _needs_sets(mesh) else ():
        group = tuple(mesh.group(rank, dimension))
        # Every rank calls Split for every dimension, in the same order, as MPI requires.
        comm = world_comm.Split(color=group[0], key=rank)
        _communicators[dimension] = comm
        if len(group) == mesh.world:
            _process_sets[dimension] = hvd.global_process_set
        elif group in by_group:
            _process_sets[dimension] = by_group[group]
        else:
            by_group[group] = _process_sets[dimension] = hvd.ProcessSet(comm)
            sets.append(by_group[group])
    return sets


def _rank_list_process_sets(rank: int, mesh: Mesh) -> list:
    """Under Gloo every rank registers every group, identically and in the same order."""
    sets, by_group = [], {}
    for dimension in DIMENSIONS if _needs_sets(mesh) else ():
        for group in map(tuple, mesh.groups(dimension)):
            if len(group) < mesh.world and group not in by_group:
                by_group[group] = hvd.ProcessSet(list(group))
                sets.append(by_group[group])
        mine = tuple(mesh.group(rank, dimension))
        _process_sets[dimension] = by_group.get(mine, hvd.global_process_set)
    return sets


def mesh() -> Mesh:
    return _mesh


def process_set(dimension: str):
    """This rank's Horovod process set along a mesh dimension (the global set for plain data
    parallelism)."""
    return _process_sets.get(dimension, hvd.global_process_set)


def mpi_communicator(dimension: str):
    """This rank's MPI communicator along a mesh dimension; None unless launched by MPI with a
    tensor or pipeline layout."""
    return _communicators.get(dimension)


def mpi_world():
    """MPI.COMM_WORLD, for layouts that launched by MPI (pipelines); Horovod uses its own copy."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def mpi_in_place():
    from mpi4py import MPI

    return MPI.IN_PLACE


def mpi_op(name: str):
    """MPI's reduction by its lower-case name: sum, max."""
    from mpi4py import MPI

    return getattr(MPI, name.upper())


def data_position() -> Tuple[int, int]:
    """This rank's index among the data-parallel replicas, and how many there are: the ranks of
    one pipeline (or tensor group) train on the same samples."""
    if _mesh is None or _mesh.world != size():
        return rank(), size()
    return _mesh.coordinates(rank())["data"], _mesh.data


def noise_rank() -> int:
    """This rank's index for its random noise (dropout): the same on a tensor set's ranks, whose
    replicated activations must see the same masks (as Megatron seeds them), distinct across data
    replicas and pipeline stages. Ranks are numbered tensor-fastest (app/mesh.py)."""
    if _mesh is None or _mesh.world != size():
        return rank()
    return rank() // _mesh.tensor


def settings_in_effect() -> dict:
    """The start-up variables this process ran with (unset: the library's default)."""
    variables = [variable for variable, _ in _SETTINGS_ENV.values()] + list(_TOOL_VARIABLES)
    return {variable: os.environ.get(variable, "default") for variable in variables}


def start_timeline(run_dir: Path) -> Optional[Path]:
    """Start Horovod's timeline in the run directory if HOROVOD_TIMELINE=DYNAMIC asked for it
    (every rank calls this; the coordinator, rank 0, writes). A HOROVOD_TIMELINE path set by
    the user is Horovod's own business: it started at init."""
    if os.environ.get("HOROVOD_TIMELINE") != "DYNAMIC":
        return None
    path = Path(run_dir) / TIMELINE_FILE
    hvd.start_timeline(str(path))
    return path


def stop_timeline() -> None:
    """Close the timeline, so the file ends as complete JSON."""
    if os.environ.get("HOROVOD_TIMELINE") == "DYNAMIC":
        hvd.stop_timeline()


def save_autotune_log(run_dir: Path) -> Optional[Path]:
    """Rank 0 moves the autotuner's staged log (config horovod.autotune) into the run directory.
    Horovod writes each line as it samples, so the log is complete up to this moment."""
    staged = os.environ.get("HOROVOD_AUTOTUNE_LOG")
    if not is_main() or staged != _autotune_staging() or not os.path.exists(staged):
        return None  # not ours to move: a log the user named stays where they put it
    target = Path(run_dir) / AUTOTUNE_FILE
    shutil.move(staged, target)
    return target


def rank() -> int:
    return hvd.rank()


def size() -> int:
    return hvd.size()


def local_rank() -> int:
    return hvd.local_rank()


def local_size() -> int:
    return hvd.local_size()


def is_main() -> bool:
    return hvd.rank() == 0


def controller() -> str:
    return "mpi" if hvd.mpi_enabled() else "gloo"


def place_rank(requested: Optional[int], bind: bool) -> int:
    """Pin this rank to its share of its host's cores (see app/cores.py); return torch's thread
    count. Ranks compare core masks with the others on their host (same cross rank) to tell a
    binding launcher's distinct masks from one shared mask."""
    masks = allgather_object((hvd.cross_rank(), cores.launch_affinity()), name="core_masks")
    on_host = [mask for node, mask in masks if node == hvd.cross_rank()]
    return cores.place(hvd.local_rank(), hvd.local_size(), on_host, requested, bind)


def elastic_launch() -> bool:
    """Started by horovodrun in elastic mode (--min-np/--max-np/--host-discovery-script)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def _slurm_stamp() -> Optional[str]:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"slurm-{job}" + (f"_{task}" if task else "") if job else None


def run_stamp() -> str:
    """One run name for every rank: LLAMA_RUN_STAMP if set (scripts/launch.sh --elastic sets it
    once, so a restarted job finds its run again), else the SLURM job (so a requeued job does)
    or rank 0's clock, broadcast. An elastic job cannot broadcast at start-up: a worker that
    joins later would meet the others elsewhere (app/elastic.py)."""
    if os.environ.get("LLAMA_RUN_STAMP"):
        return os.environ["LLAMA_RUN_STAMP"]
    if elastic_launch():
        if _slurm_stamp() is None:
            raise ValueError("an elastic job's ranks cannot agree on a run directory at start-up; set "
                             "LLAMA_RUN_STAMP to the run's name (scripts/launch.sh --elastic does)")
        return _slurm_stamp()
    stamp = (_slurm_stamp() or time.strftime("%Y-%m-%d_%H-%M-%S")) if is_main() else None
    return hvd.broadcast_object(stamp, root_rank=0, name="run_stamp")


def sum_over_ranks(tensor: torch.Tensor, name: str, process_set=None) -> torch.Tensor:
    return hvd.allreduce(tensor, op=hvd.Sum, name=name, process_set=process_set or hvd.global_process_set)


# Every object sent is pickled: its tensors go as CPU tensors (app/tensors.py says why).
def broadcast_object(obj, name: str):
    return hvd.broadcast_object(to_cpu(obj), root_rank=0, name=name)


def allgather_object(obj, name: str):
    return hvd.allgather_object(to_cpu(obj), name=name)


def _mpi_world_is_ours() -> bool:
    return launched_by_mpi() and mpi_world().Get_size() == size()


def gather_object(obj, name: str):
    """Every rank's object, in rank order, on rank 0 (None elsewhere): over MPI to rank 0
    alone; under Gloo by an allgather."""
    if _mpi_world_is_ours():
        return mpi_world().gather(to_cpu(obj), root=0)
    gathered = allgather_object(obj, name=name)
    return gathered if is_main() else None


def barrier() -> None:
    hvd.barrier()


# The errors of bad input (a missing file, a bad value): on rank 0 they are reported to every
# rank, so all exit with the same one line instead of a Horovod shutdown traceback.
BAD_INPUT = (ValueError, FileNotFoundError, KeyError)


def run_on_main(work: Callable, name: str, share: bool = True):
    """Run `work` on rank 0 alone and return its result on every rank (on rank 0 only if not
    `share`, for results too large to send); a bad-input error is raised on every rank."""
    outcome, result = None, None
    if is_main():
        try:
            result = work()
            outcome = {"result": result if share else None}
        except BAD_INPUT as error:
            outcome = {"error": str(error).strip("'\"")}
    outcome = broadcast_object(outcome, name=name)
    if "error" in outcome:
        raise ValueError(outcome["error"])
    return outcome["result"] if share else result
