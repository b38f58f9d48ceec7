"""Device and numeric precision, shared by training, evaluation and generation."""
from contextlib import nullcontext

import torch

from app.config import ConfigError


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CPU and GPU; fp16 only on CUDA (it needs a GradScaler, see train.py)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
