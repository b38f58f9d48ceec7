"""The trainer's yardsticks: the same Hugging Face model, batch and precision with fused AdamW
in a plain PyTorch loop (one process, no Horovod), or under DistributedDataParallel with Gloo.

    python -m app.bench.reference_loop SPEC.json                                  # plain
    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 -m app.bench.reference_loop SPEC.json  # DDP

Only the model, the token windows and the loss come from the project, so the comparison
isolates what the trainer adds around them (Horovod, logging, scheduling)."""
import contextlib
import gc
import os
import time

import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from app import cli, cores, data, fileio, models, prepared, runtime
from app.bench import launch


def build_reference(cfg, rank: int, world: int, distributed: bool):
    """This rank's token stream, the model (under DDP when distributed) and fused AdamW."""
    meta = prepared.read_meta(cfg.data.dir)
    seq_len = cfg.train.seq_len or cfg.model.max_seq_len
    windows = data.TokenWindows(data.split_tokens(cfg.data.dir, meta, "train"), seq_len, cfg.train.seed, "train")
    stream = data.RankStream(windows, rank, world, cfg.train.micro_batch_size, cfg.train.grad_accum_steps)
    torch.manual_seed(cfg.train.seed)
    model = models.build_causal_lm(cfg.model, meta["vocab_size"])
    model.train()
    if distributed:
        model = DistributedDataParallel(model)  # broadcasts rank 0's parameters on construction
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=True,
    )
    return stream, seq_len, model, optimizer


def main() -> None:
    spec = launch.read_spec()
    cfg = cli.compose_config(spec["overrides"])
    OmegaConf.resolve(cfg)
    # torchrun sets WORLD_SIZE; a plain `python -m` run is the one-process loop.
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        torch_dist.init_process_group("gloo")
    rank, world = (torch_dist.get_rank(), torch_dist.get_world_size()) if distributed else (0, 1)
    # The trainer's placement rule, so every method runs on the same cores (torchrun never binds).
    local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(cores.place(local_rank, local_size, [cores.affinity()], spec["threads"],
                                      cfg.train.bind_cores))

    stream, seq_len, model, optimizer = build_reference(cfg, rank, world, distributed)
    precision_ctx = runtime.autocast_context(cfg.train.precision, torch.device("cpu"))
    accum = cfg.train.grad_accum_steps

    def train_step(step: int) -> None:
        for micro_step in range(accum):
            inputs, targets = stream.micro_batch_at(step * stream.global_batch, micro_step)
            # DDP allreduces on every backward unless told to wait for the last micro-batch.
            wait = model.no_sync() if distributed and micro_step < accum - 1 else contextlib.nullcontext()
            with wait:
                with precision_ctx:
                    loss = models.causal_lm_loss(model, inputs, targets)
                (loss / accum).backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(spec["warmup_steps"]):
        train_step(step)
    if distributed:
        torch_dist.barrier()
    started = time.perf_counter()
    for step in range(spec["warmup_steps"], spec["warmup_steps"] + spec["measure_steps"]):
        train_step(step)
    elapsed = time.perf_counter() - started
    # Summed per-process rates, as the trainer reports tokens_per_second.
    rate = torch.tensor([spec["measure_steps"] * stream.per_rank * seq_len / elapsed], dtype=torch.float64)
    if distributed:
        torch_dist.all_reduce(rate)
    if rank == 0:
        fileio.write_json(spec["result"], {
            "method": "ddp" if distributed else "plain", "processes": world, "threads": torch.get_num_threads(),
            "tokens_per_second": rate.item(), "measured_steps": spec["measure_steps"],
        })
    if distributed:
        # Free DDP's reducer before the process group: left to interpreter exit, the two
        # destructors can deadlock in Gloo's teardown (one holds the GIL, the other a lock).
        del model, optimizer
        gc.collect()
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
