"""What every bench section shares: the training config they all run, process and thread
counts, the model's FLOPs per token, the peak table and the work directory."""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from app import cli, models, prepare, tasks
from app.bench import gradient_set
from app.bench.peak import PeakTable


@dataclass
class Context:
    bench: object  # the BenchConfig
    train_overrides: List[str]  # Hydra overrides every training run shares (model, data, batch)
    cores: int
    max_processes: int
    threads_per_process: int
    seq_len: int
    tokens_per_step_per_process: int
    flops_per_token: float
    n_parameters: int
    gradient_shapes: list  # (name, shape) of every parameter, in backward order
    work_dir: Path
    peaks: PeakTable

    def overrides(self, precision: str) -> List[str]:
        return [*self.train_overrides, f"train.precision={precision}"]


def available_cores() -> int:
    # The affinity mask, not os.cpu_count(): a container or a binding launcher may give us fewer.
    return len(os.sched_getaffinity(0))


def build(bench_cfg, out_dir: Path, log=print) -> Context:
    """Compose the training config once, prepare its data, count the model's FLOPs per token."""
    base = [f"model={bench_cfg.model}", *bench_cfg.train_overrides]
    train_cfg = cli.compose_config(base)
    OmegaConf.resolve(train_cfg)
    # Launched jobs may start elsewhere; an absolute data directory means the same data for all.
    data_dir = Path(train_cfg.data.dir).resolve()
    train_cfg.data.dir = str(data_dir)
    if train_cfg.task != "clm":
        raise ValueError(f"the benchmark measures causal-LM training (task=clm); got task={train_cfg.task}")
    prepare.prepare_data(train_cfg.data, log=log)
    task = tasks.build(train_cfg, rank=0, world=1)
    model = task.architecture().shapes()  # counted, never run
    cores = available_cores()
    max_processes = bench_cfg.max_processes or cores
    return Context(
        bench=bench_cfg,
        train_overrides=[*base, f"data.dir={data_dir}"],
        cores=cores,
        max_processes=max_processes,
        threads_per_process=bench_cfg.threads_per_process or max(1, cores // max_processes),
        seq_len=task.seq_len,
        tokens_per_step_per_process=task.stream.per_rank * task.seq_len,
        flops_per_token=task.flops_per_token(model),
        n_parameters=models.count_parameters(model),
        gradient_shapes=gradient_set.shapes(model),
        work_dir=out_dir / "work",
        peaks=PeakTable(bench_cfg.peak),
    )
