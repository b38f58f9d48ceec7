"""The benchmark's typed schema (python -m app.bench), registered in Hydra's ConfigStore beside
the training schema it launches with."""
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from app.config import ConfigError, compilation_mode


@dataclass
class BenchPeakConfig:
    """The matmul that measures this machine's peak (metrics.measure_matmul_tflops)."""
    matrix_size: int = 1024
    # The best of several short trials, so a neighbour's burst does not lower the peak.
    trials: int = 10
    seconds_per_trial: float = 0.1


@dataclass
class BenchThroughputConfig:
    """Tokens/s of the trainer against a plain PyTorch loop and DDP, and its scaling."""
    precisions: List[str] = field(default_factory=lambda: ["bf16", "fp32"])
    # Process counts for the trainer; None: 1, 2, ..., bench.max_processes.
    process_counts: Optional[List[int]] = None
    # Steps left out of the measurement (kernel selection, allocator growth), then steps timed.
    warmup_steps: int = 2
    # Single logging windows vary by +-10% on a shared 2-core machine; 16 steps average that down.
    measure_steps: int = 16
    # The trainer is compared with DistributedDataParallel at this many processes.
    ddp_processes: int = 2
    # The trainer at bench.max_processes once more with these overrides ("trainer, untuned"):
    # Horovod's own 1 ms cycle, no core pinning and OpenMPI's busy polling, to show what this
    # project's defaults buy. []: skip that run.
    untuned_overrides: List[str] = field(
        default_factory=lambda: ["horovod.cycle_time_ms=1", "train.bind_cores=false",
                                 "horovod.mpi_yield_when_idle=null"])
    # The trainer once more at every process count with train.compile set to this
    # ("trainer_compile"; the warm-up steps hold the compilation, reported on its own); false: not.
    trainer_compile: str = "model"
    # Hugging Face's transformers.Trainer on the same model, windows and batch, one process
    # (app/bench/hf_trainer.py): eager (bf16=True as the precision says) and compile (also
    # torch_compile=True). []: neither.
    hf_trainer: List[str] = field(default_factory=lambda: ["eager", "compile"])
    # Targets are measured and reported, never asserted: a miss is printed, not an error.
    max_overhead_vs_plain: float = 0.03
    min_ratio_vs_ddp: float = 1.0
    min_scaling_efficiency: float = 0.90
    min_ratio_vs_hf_trainer: float = 1.3
    min_ratio_vs_hf_trainer_compile: float = 1.0
    # MFU of the trainer (compiled, if it is), one process, against the measured matmul peak.
    min_mfu: float = 0.5


@dataclass
class BenchBandwidthConfig:
    """Allreduce bus bandwidth over message sizes, as nccl-tests defines it."""
    launchers: List[str] = field(default_factory=lambda: ["gloo", "mpi"])
    min_bytes: int = 4 * 1024
    max_bytes: int = 256 * 1024 * 1024
    # Sizes are min_bytes, min_bytes * factor, ... up to max_bytes.
    size_factor: int = 4
    warmup_iterations: int = 2
    # Each size runs for about seconds_per_size, within these bounds.
    min_iterations: int = 3
    max_iterations: int = 1000
    seconds_per_size: float = 0.5


@dataclass
class BenchFusionConfig:
    """Time to allreduce the model's gradient set under Horovod's fusion and cycle settings."""
    # HOROVOD_FUSION_THRESHOLD; 0 turns tensor fusion off (one allreduce per gradient).
    # 4 MiB: under MPI the buffer stays in cache; 2 llama_small ranks ran 4-6% faster in fp32 (README).
    fusion_thresholds_bytes: List[int] = field(default_factory=lambda: [0, 4 * 1024 * 1024, 64 * 1024 * 1024])
    # HOROVOD_CYCLE_TIME: how long Horovod's background thread gathers tensors before a round.
    cycle_times_ms: List[float] = field(default_factory=lambda: [1.0, 10.0])
    warmup_sets: int = 3
    measured_sets: int = 20


@dataclass
class BenchBreakdownConfig:
    """Where one training step's time goes: data, forward, backward, allreduce wait, optimizer."""
    precision: str = "bf16"
    warmup_steps: int = 2
    measure_steps: int = 6
    # The same gradient set allreduced with nothing to hide behind: the cost backward overlaps.
    standalone_sets: int = 10


@dataclass
class BenchPipelineConfig:
    """A pipeline against data parallelism on the same processes (app/bench/pipeline.py); opt in
    with sections=[pipeline]."""
    stages: int = 2
    schedule: str = "1f1b"
    # Micro-batches per step (train.grad_accum_steps) for both layouts; the ideal bubble is
    # (stages - 1) / (micro_batches + stages - 1).
    micro_batches: int = 8
    precision: str = "bf16"
    warmup_steps: int = 2
    measure_steps: int = 6


@dataclass
class BenchTensorConfig:
    """Tensor parallelism (tensor x data/tensor ranks) against data parallelism on the same ranks,
    the same precision and the same global batch (app/bench/tensor_parallel.py); opt in with
    sections=[tensor]."""
    processes: int = 2
    tensor: int = 2
    precision: str = "bf16"
    global_batch: int = 16
    warmup_steps: int = 2
    measure_steps: int = 6


@dataclass
class BenchMemoryConfig:
    """Peak memory per rank at ZeRO stages, with and without activation checkpointing, and their
    tokens/s (not in the default sections: about a minute per configuration on 2 cores)."""
    model: str = "llama_125m"
    stages: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    activation_checkpointing: List[str] = field(default_factory=lambda: ["none", "full"])
    processes: int = 2
    # fp32: bf16 autocast keeps a bf16 copy of every weight it casts during the forward, which
    # no stage shards.
    precision: str = "fp32"
    seq_len: int = 256
    micro_batch_size: int = 2
    warmup_steps: int = 1
    measure_steps: int = 4
    # One more stage-0 run under jemalloc, the malloc ZeRO stages run by default
    # (train.allocator), so they are also compared with stage 0 on the same allocator.
    like_for_like: bool = True


@dataclass
class BenchLayoutCell:
    """One layout of bench.layouts: a name for the table and the training overrides that make it."""
    name: str = "???"
    overrides: List[str] = field(default_factory=list)
    # None: bench.layouts.processes.
    processes: Optional[int] = None
    # Left out unless named in bench.layouts.names (the 8-rank cell: a long run on a small machine).
    opt_in: bool = False
    # Micro-batches per step (train.grad_accum_steps); None: the section's micro_batches.
    micro_batches: Optional[int] = None


@dataclass
class BenchLayoutsConfig:
    """Tokens/s and peak memory per rank of every layout cell on the same ranks, model, precision
    and global batch (app/bench/layouts.py); opt in with sections=[layouts]. The cells are listed in
    conf/bench/config.yaml; a cell the trainer refuses is a row with the refusal's reason."""
    model: str = "llama_tiny"
    precision: str = "bf16"
    processes: int = 4
    global_batch: int = 16
    # Micro-batches per step (train.grad_accum_steps) in every cell: a pipeline needs several
    # to fill its stages, and the other cells take the same number so the step is the same work.
    micro_batches: int = 4
    warmup_steps: int = 2
    measure_steps: int = 4
    cells: List[BenchLayoutCell] = field(default_factory=list)
    # Cells to run, by name; None: every cell not marked opt_in.
    names: Optional[List[str]] = None


@dataclass
class BenchPlannerConfig:
    """sections=[planner]: the planner's predictions (app/plan) against measured runs of a grid
    of cells, each model's run as the layouts section runs its cells (grid: its model ignored)."""
    models: List[str] = field(default_factory=lambda: ["llama_tiny", "llama_small"])
    # Sized so the whole grid, both models, runs in about half an hour on a 2-core machine
    # (llama_small's steps take seconds there): a step after one warm-up is a steady one.
    grid: BenchLayoutsConfig = field(default_factory=lambda: BenchLayoutsConfig(
        precision="fp32", processes=2, global_batch=8, micro_batches=2, warmup_steps=1, measure_steps=3))
    # Runs of each cell, interleaved (every cell once, then again), so load drifts hit all alike.
    repeats: int = 2
    # Memory caps per rank for the pick-quality cases (each with every model); null: no cap.
    memory_caps_gib: List[Optional[float]] = field(default_factory=lambda: [None, 0.6, 0.45])
    # A previous run's bench.json whose planner rows are reused (nothing runs): each is predicted
    # again with today's profile and code, e.g. after `python -m app.plan calibrate`.
    measured: Optional[str] = None
    # The grids over which the profile's backward_overlap and activation_factor are fitted to the
    # measured rows: [low, high] in fit_steps equal steps.
    fit_overlap_range: List[float] = field(default_factory=lambda: [0.0, 1.0])
    fit_activation_factor_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    fit_steps: int = 30
    # Targets, reported, never asserted (issue 27): median step-time error, rank correlation,
    # median peak-memory error, and the pick within this much of the fastest measured cell.
    max_step_error: float = 0.15
    min_spearman: float = 0.8
    max_memory_error: float = 0.10
    max_pick_slowdown: float = 0.10


@dataclass
class BenchCheckpointConfig:
    """sections=[checkpoint]: sharded checkpoints' cost (app/bench/checkpoint.py): a run saving
    every checkpoint_every steps, sync then async; its first checkpoint resumed on resume_processes
    ranks with the same global batch; the export of its last. Defaults: issue 26's llama_1b case
    (about 18 GB of state at fp32: a machine with room for it, not a shared 2-core one)."""
    model: str = "llama_1b"
    zero_stage: int = 3
    processes: int = 2
    steps: int = 4
    checkpoint_every: int = 2
    # Small, so the steps take minutes on a CPU: what a save costs does not depend on them.
    # The global batch (micro_batch_size x processes) must split over resume_processes.
    micro_batch_size: int = 2
    seq_len: int = 128
    # fp32: the resumed run's loss is compared with the first run's to resume_loss_tolerance.
    precision: str = "fp32"
    # 0: no resume (llama_1b's ZeRO-3 state on 4 ranks wants ~25 GB: more than a 24 GiB machine).
    resume_processes: int = 4
    resume_steps: int = 2
    # The runs, in order: sync is needed (the resume, the export and the targets read it); an
    # async save holds a copy of each rank's shard while writing it (llama_1b's ZeRO-3 share is
    # 6.6 GB a rank: more than a 24 GiB machine has beside two ranks' training).
    modes: List[str] = field(default_factory=lambda: ["sync", "async"])
    # The disk's sequential write speed: dd of this many MiB, fdatasync'ed.
    dd_mib: int = 1024
    # Targets (issue 26), measured and reported, never asserted.
    max_save_rss_ratio: float = 1.10
    min_write_of_disk: float = 0.5
    max_export_rss_gib: float = 2.0
    resume_loss_tolerance: float = 1e-5


@dataclass
class BenchConfig:
    """python -m app.bench [preset=quick] [out=DIR] [model=PRESET] [throughput.precisions=[bf16]] ..."""
    out: str = "runs/bench/${now:%Y-%m-%d_%H-%M-%S}"
    # A preset from conf/model/, for the trainer and every reference loop alike.
    model: str = "llama_small"
    # More overrides of the training config (e.g. train.micro_batch_size=4), applied to the
    # trainer, the plain and DDP loops and the breakdown, so all run the same model and batch.
    train_overrides: List[str] = field(default_factory=list)
    # None: the cores this process may run on.
    max_processes: Optional[int] = None
    # None: cores // max_processes, so max_processes fill the machine and 1 process gets the
    # same threads as each of N (what scaling efficiency compares).
    threads_per_process: Optional[int] = None
    sections: List[str] = field(default_factory=lambda: ["peak", "throughput", "bandwidth", "fusion", "breakdown"])
    # How the trainer, the fusion grid and the breakdown start, and so which Horovod controller
    # runs their allreduces: mpi (mpirun; what horovodrun and srun give when Horovod has MPI,
    # as make train does) or gloo (horovodrun --gloo). The bandwidth section runs both.
    launcher: str = "mpi"
    # Arguments for mpirun besides -np; binding off, as horovodrun leaves it, so the two compare.
    mpirun_args: List[str] = field(default_factory=lambda: ["--bind-to", "none"])
    # Keep the trainer's final checkpoints in the work directory (about 12 bytes per parameter each).
    keep_checkpoints: bool = False
    launch_timeout_s: int = 600
    peak: BenchPeakConfig = field(default_factory=BenchPeakConfig)
    throughput: BenchThroughputConfig = field(default_factory=BenchThroughputConfig)
    bandwidth: BenchBandwidthConfig = field(default_factory=BenchBandwidthConfig)
    fusion: BenchFusionConfig = field(default_factory=BenchFusionConfig)
    breakdown: BenchBreakdownConfig = field(default_factory=BenchBreakdownConfig)
    pipeline: BenchPipelineConfig = field(default_factory=BenchPipelineConfig)
    memory: BenchMemoryConfig = field(default_factory=BenchMemoryConfig)
    tensor: BenchTensorConfig = field(default_factory=BenchTensorConfig)
    layouts: BenchLayoutsConfig = field(default_factory=BenchLayoutsConfig)
    planner: BenchPlannerConfig = field(default_factory=BenchPlannerConfig)
    checkpoint: BenchCheckpointConfig = field(default_factory=BenchCheckpointConfig)


def register() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


BENCH_SECTIONS = ("peak", "throughput", "bandwidth", "fusion", "breakdown", "pipeline", "memory", "tensor", "layouts",
                  "planner", "checkpoint")


def validate(cfg: BenchConfig) -> None:
    _check_choices(cfg)
    _check_positive(cfg)
    _check_relations(cfg)


def _check_choices(cfg: BenchConfig) -> None:
    precisions = ("fp32", "bf16")
    for key, values, allowed in (
        ("sections", cfg.sections, BENCH_SECTIONS),
        ("throughput.precisions", cfg.throughput.precisions, precisions),
        ("breakdown.precision", [cfg.breakdown.precision], precisions),
        ("tensor.precision", [cfg.tensor.precision], precisions),
        ("bandwidth.launchers", cfg.bandwidth.launchers, ("gloo", "mpi")),
        ("launcher", [cfg.launcher], ("gloo", "mpi")),
        ("pipeline.precision", [cfg.pipeline.precision], precisions),
        ("pipeline.schedule", [cfg.pipeline.schedule], ("gpipe", "1f1b")),
        ("memory.stages", cfg.memory.stages, (0, 1, 2, 3)),
        ("memory.activation_checkpointing", cfg.memory.activation_checkpointing, ("none", "full", "every_k")),
        ("memory.precision", [cfg.memory.precision], precisions),
        ("throughput.trainer_compile", [compilation_mode(cfg.throughput.trainer_compile)],
         ("false", "model", "regional")),
        ("throughput.hf_trainer", cfg.throughput.hf_trainer, ("eager", "compile")),
        ("layouts.precision", [cfg.layouts.precision], precisions),
        ("layouts.names", cfg.layouts.names or [], [cell.name for cell in cfg.layouts.cells]),
        ("planner.grid.precision", [cfg.planner.grid.precision], precisions),
        ("planner.grid.names", cfg.planner.grid.names or [], [cell.name for cell in cfg.planner.grid.cells]),
        ("checkpoint.precision", [cfg.checkpoint.precision], precisions),
        ("checkpoint.zero_stage", [cfg.checkpoint.zero_stage], (0, 1, 2, 3)),
    ):
        for value in values:
            if value not in allowed:
                raise ConfigError(f"{key} has {value!r}, not one of {', '.join(allowed)}")


def _check_positive(cfg: BenchConfig) -> None:
    positive = {
        "throughput.measure_steps": cfg.throughput.measure_steps,
        "throughput.ddp_processes": cfg.throughput.ddp_processes,
        "bandwidth.min_bytes": cfg.bandwidth.min_bytes,
        "bandwidth.min_iterations": cfg.bandwidth.min_iterations,
        "fusion.measured_sets": cfg.fusion.measured_sets,
        "breakdown.measure_steps": cfg.breakdown.measure_steps,
        "breakdown.standalone_sets": cfg.breakdown.standalone_sets,
        "peak.trials": cfg.peak.trials,
        "pipeline.measure_steps": cfg.pipeline.measure_steps,
        "pipeline.micro_batches": cfg.pipeline.micro_batches,
        "memory.processes": cfg.memory.processes,
        "memory.measure_steps": cfg.memory.measure_steps,
        "layouts.processes": cfg.layouts.processes,
        "layouts.global_batch": cfg.layouts.global_batch,
        "layouts.micro_batches": cfg.layouts.micro_batches,
        "layouts.measure_steps": cfg.layouts.measure_steps,
        "planner.repeats": cfg.planner.repeats,
        "planner.fit_steps": cfg.planner.fit_steps,
        "planner.grid.processes": cfg.planner.grid.processes,
        "planner.grid.global_batch": cfg.planner.grid.global_batch,
        "planner.grid.micro_batches": cfg.planner.grid.micro_batches,
        "planner.grid.measure_steps": cfg.planner.grid.measure_steps,
        "checkpoint.processes": cfg.checkpoint.processes,
        "checkpoint.checkpoint_every": cfg.checkpoint.checkpoint_every,
        "checkpoint.micro_batch_size": cfg.checkpoint.micro_batch_size,
        "checkpoint.seq_len": cfg.checkpoint.seq_len,
        "checkpoint.resume_steps": cfg.checkpoint.resume_steps,
        "checkpoint.dd_mib": cfg.checkpoint.dd_mib,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")


def _check_relations(cfg: BenchConfig) -> None:
    if cfg.pipeline.stages < 2:
        raise ConfigError(f"pipeline.stages={cfg.pipeline.stages} must be at least 2")
    if cfg.tensor.tensor < 2 or cfg.tensor.processes % cfg.tensor.tensor or cfg.tensor.global_batch % cfg.tensor.processes:
        raise ConfigError(f"tensor.processes={cfg.tensor.processes} must be a multiple of tensor.tensor="
                          f"{cfg.tensor.tensor} (at least 2), and tensor.global_batch={cfg.tensor.global_batch} "
                          f"of tensor.processes, so both layouts split the same batch")
    if cfg.bandwidth.size_factor < 2:
        raise ConfigError(f"bandwidth.size_factor={cfg.bandwidth.size_factor} must be at least 2")
    if cfg.bandwidth.max_bytes < cfg.bandwidth.min_bytes:
        raise ConfigError("bandwidth.max_bytes must be at least bandwidth.min_bytes")
    if cfg.bandwidth.min_bytes % 4:
        raise ConfigError(f"bandwidth.min_bytes={cfg.bandwidth.min_bytes} must be a multiple of 4 (float32 elements)")
    if cfg.bandwidth.max_iterations < cfg.bandwidth.min_iterations:
        raise ConfigError("bandwidth.max_iterations must be at least bandwidth.min_iterations")
    for key in ("fit_overlap_range", "fit_activation_factor_range"):
        low_high = list(getattr(cfg.planner, key))
        if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1]:
            raise ConfigError(f"planner.{key}={low_high} must be [low, high] with 0 <= low <= high")
    _check_checkpoint(cfg.checkpoint)


def _check_checkpoint(cc: BenchCheckpointConfig) -> None:
    if "sync" not in cc.modes or not set(cc.modes) <= {"sync", "async"}:
        raise ConfigError(f"checkpoint.modes={list(cc.modes)} must hold sync (the resume, export and targets read it) "
                          "and otherwise only async")
    if cc.steps < cc.checkpoint_every + 1:
        raise ConfigError(f"checkpoint.steps={cc.steps} must pass checkpoint.checkpoint_every={cc.checkpoint_every}: "
                          "the resume compares the step after the first save")
    global_batch = cc.micro_batch_size * cc.processes
    if cc.resume_processes < 0:
        raise ConfigError(f"checkpoint.resume_processes={cc.resume_processes} must be at least 0 (0: no resume)")
    if cc.resume_processes and global_batch % cc.resume_processes:
        raise ConfigError(f"the checkpoint section's global batch (checkpoint.micro_batch_size x processes = "
                          f"{global_batch}) must split over checkpoint.resume_processes={cc.resume_processes}; "
                          "raise checkpoint.micro_batch_size")
