"""How much memory a rank needs for the model state under ZeRO, and what fits.

Per parameter, in fp32: 4 bytes of weights, 4 of gradient, and the optimizer's state (AdamW and
Adam 8: two moments; SGD with momentum 4; plain SGD 0). Stage 1 divides the optimizer state by
the world size, stage 2 the gradients too, stage 3 the weights too (ZeRO paper, section 5).
This is the floor a rank needs before its first batch; app/plan/memory.py adds activations, the
layout's transient buffers and the process itself."""
from typing import Optional

import torch

from app import models

OPTIMIZER_BYTES_PER_PARAMETER = {"adamw": 8, "adam": 8, "sgd_momentum": 4, "sgd": 0}
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def optimizer_bytes_per_parameter(optim_name: str, momentum: float = 0.0) -> int:
    if optim_name == "sgd":
        return OPTIMIZER_BYTES_PER_PARAMETER["sgd_momentum" if momentum else "sgd"]
    return OPTIMIZER_BYTES_PER_PARAMETER[optim_name]


def model_state_bytes(parameters: int, stage: int, world: int, optimizer_bytes: int = 8) -> dict:
    """Bytes per rank for weights, gradients and optimizer state at a ZeRO stage."""
    def share(sharded: bool) -> float:
        return parameters / world if sharded else parameters

    return {"parameters": 4 * share(stage >= 3), "gradients": 4 * share(stage >= 2),
            "optimizer_state": optimizer_bytes * share(stage >= 1)}


def meta_model(cfg) -> torch.nn.Module:
    """The configured model built on the meta device: no memory, whatever its size."""
    vocab = cfg.model.vocab_size or cfg.data.vocab_size  # the tokenizer is trained to data.vocab_size
    if cfg.model.family == "llama":
        return models.causal_lm(cfg.model, vocab).shapes()
    return models.encoder(cfg.model, vocab, 0, cfg.task, cfg.model.num_labels or 2).shapes()


def count_parameters(cfg) -> int:
    return models.count_parameters(meta_model(cfg))


def smallest_fit(parameters: int, optimizer_bytes: int, memory_bytes: float) -> Optional[tuple]:
    """The fewest ranks, then the lowest stage, whose model state fits in memory_bytes per rank."""
    for world in WORLD_SIZES:
        for stage in range(4):
            if sum(model_state_bytes(parameters, stage, world, optimizer_bytes).values()) <= memory_bytes:
                return world, stage
    return None


def shortfall_warning(cfg, parameters: int, world: int, ranks_on_host: int, device: torch.device) -> Optional[str]:
    """A line for the log when this job's model state alone exceeds a rank's share of memory."""
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        have = psutil.virtual_memory().total / ranks_on_host
    stage = cfg.parallel.zero_stage
    need = sum(model_state_bytes(parameters, stage, world,
                                 optimizer_bytes_per_parameter(cfg.optim.name, cfg.optim.momentum)).values())
    if need <= have:
        return None
    return (f"the plan says this will not fit: the model state needs {need / 2**30:.1f} GiB per rank at "
            f"parallel.zero_stage={stage} on {world} ranks, each rank has {have / 2**30:.1f} GiB; "
            f"python -m app.plan model={cfg.model.name} memory_gib={have / 2**30:.0f} says what fits")
