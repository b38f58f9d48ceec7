"""The calibration's layout steps: the trainer's own step (app/step.py) on a small LLaMA fed random
tokens, under several layouts of one mesh one after another in one job on
plan.calibration.ranks ranks, with the training's Horovod settings and the malloc the first
layout runs under (app/allocator.py). Calibration runs this module's job twice (plain data
parallelism and each ZeRO stage; the pipeline), and tensor parallelism inside the collectives
job (app/plan/collectives.py, whose cycle time is tensor parallelism's); app/plan/layout_costs.py
turns the seconds per step into the profile's layout costs.

    mpirun -np 2 python -m app.plan.layout_steps SPEC.json   (python -m app.plan calibrate runs it)
"""
import gc
import math
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from app import allocator, cli, config, dist, fileio, runtime, step
from app.bench import launch
from app.bench.pipeline import timed_steps
from app.tasks.clm import CausalLM


class RandomTokens:
    """A step's micro-batches as app/prefetch.py hands them out: the same random tokens every step,
    whose values do not change the time."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int, micro_batches: int, seed: int):
        tokens = torch.randint(vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
        batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}
        self.prepared = ([batch] * micro_batches, micro_batch * seq_len * micro_batches, [range(0)] * micro_batches)

    def get(self, samples_before: int):
        return self.prepared

    def close(self) -> None:
        pass


class RandomLM(CausalLM):
    """CausalLM's model, loss and FLOPs without its corpus (CausalLM's own start reads the
    prepared data, which calibration must not need): the stream says only the global batch."""

    def __init__(self, cfg, vocab: int, global_batch: int):
        self.cfg, self.vocab_size, self.seq_len = cfg, vocab, cfg.train.seq_len
        self.stream = SimpleNamespace(global_batch=global_batch)


def seconds_per_step(cfg, spec: dict, device: torch.device) -> float:
    train = cfg.train
    vocab = cfg.data.vocab_size
    data_rank, data_replicas = dist.data_position()
    task = RandomLM(cfg, vocab, train.micro_batch_size * train.grad_accum_steps * data_replicas)
    batches = RandomTokens(vocab, train.micro_batch_size, train.seq_len, train.grad_accum_steps,
                           train.seed + data_rank)
    training = step.training_for(cfg, device, task, batches)
    training.parallel.start(None)
    training.model.train()
    timer = step.PhaseTimer(device)
    probe = timed_steps(training, {"warmup_steps": spec["warmup_steps"], "measure_steps": 1}, timer)
    # As many steps as fill measure_seconds (a small model's steps are milliseconds, and a few
    # of them are noise), at least measure_steps; every rank takes the slowest rank's count.
    wanted = max(math.ceil(spec["measure_seconds"] / max(probe, 1e-6)), spec["measure_steps"])
    steps = max(dist.allgather_object(wanted, name="layout_steps.count"))
    elapsed = timed_steps(training, {"warmup_steps": 0, "measure_steps": steps}, timer)
    del training
    gc.collect()  # this layout's model and buffers, before the next one builds its own
    return elapsed / steps


def configs(layout_spec: dict) -> list:
    """Each run's training config (the job's overrides, then the run's), checked as app.train would."""
    found = [cli.compose_config([*layout_spec["overrides"], *run]) for run in layout_spec["runs"]]
    for cfg in found:
        OmegaConf.resolve(cfg)
        config.validate(cfg)
    return found


def timed(found: list, layout_spec: dict) -> list:
    """Seconds per step of each config, in order, on this rank's device (Horovod started), with
    glibc keeping or returning freed memory as the first config's training would. The first
    config runs once untimed before: the process's first layout pays one-time costs (thread
    pools, Horovod's first negotiations) that its warm-up steps do not absorb."""
    runtime.set_freed_memory(config.keeps_freed_memory(found[0]))
    device = runtime.pick_device(found[0].train.device, dist.local_rank())
    seconds_per_step(found[0], layout_spec, device)
    return [seconds_per_step(cfg, layout_spec, device) for cfg in found]


def main() -> None:
    spec = launch.read_spec()
    found = configs(spec)
    first = found[0]
    allocator.ensure(first)  # may re-execute this process
    dist.init(first.horovod, first.parallel)  # one mesh: every run's tensor and pipeline sizes alike
    torch.set_num_threads(dist.place_rank(spec["threads"], first.train.bind_cores))
    seconds = timed(found, spec)
    if dist.is_main():
        fileio.write_json(spec["result"], {"processes": dist.size(), "seconds_per_step": seconds})


if __name__ == "__main__":
    main()
