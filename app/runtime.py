"""Device, numeric precision, logging and host memory, shared by training, evaluation and generation."""
import ctypes
import logging
from contextlib import nullcontext
from pathlib import Path

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


def configure_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs INFO to stdout and run_dir/train.log (appended, so a restarted or resized run
    keeps one log), other ranks WARNING to stdout; every line names its rank. Called again
    when an elastic reset renumbers the ranks."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):  # the previous rank 0's train.log
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setFormatter(logging.Formatter(f"[%(asctime)s][rank {rank}][%(levelname)s] %(message)s"))
    if rank == 0:
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        root.addHandler(file_handler)


# glibc's mallopt parameters (malloc.h) and the value both get: 1 GiB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES = -1, -3, 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks below 1 GiB for reuse instead of handing them back to the
    kernel. A step frees and reallocates the same activation buffers every step; by default
    glibc serves blocks over 32 MiB (a llama_small step's logits and their gradient) with mmap
    and unmaps them on free, so every step faults in and zeroes fresh pages, and it trims the
    heap's top whenever enough is free. (Intel's CPU launcher swaps in jemalloc or tcmalloc for
    the same reason.) False where the C library is not glibc; memory stays at its peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW_BYTES))
    except (OSError, AttributeError):
        return False
