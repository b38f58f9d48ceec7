"""Device, numeric precision, logging and host memory, shared by training, evaluation and generation."""
import ctypes
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from app.config import ConfigError


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def autocast_context(precision: str, device: torch.device, cache_casts: bool = True):
    """bf16 autocast on CPU and GPU; fp16 only on CUDA (it needs a GradScaler, see train.py).
    cache_casts=False where weights are gathered and freed layer by layer (ZeRO stage 3): the
    cache would keep every layer's low-precision copy alive until the forward ends."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_casts)


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
    # transformers reports loads (progress bars, a model.init_from's load report) itself: once
    # per job is enough, and rank 0 says what it loaded (app/models.py).
    if rank == 0:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return
    file_handler = logging.FileHandler(Path(run_dir) / "train.log")
    file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    root.addHandler(file_handler)


# glibc's mallopt parameters (malloc.h); blocks at or above the mmap threshold get their own
# mapping, and free space above the trim threshold at the heap's top goes back to the kernel.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW_BYTES = 1 << 30  # keep: everything a step frees below 1 GiB stays for reuse
_RETURN_FROM_BYTES = 128 << 10  # return: glibc's own starting threshold, fixed so it cannot grow


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks below 1 GiB for reuse instead of handing them back to the
    kernel. A step frees and reallocates the same activation buffers every step; by default
    glibc serves blocks over 32 MiB (a llama_small step's logits and their gradient) with mmap
    and unmaps them on free, so every step faults in and zeroes fresh pages, and it trims the
    heap's top whenever enough is free. (Intel's CPU launcher swaps in jemalloc or tcmalloc for
    the same reason.) False where the C library is not glibc; memory stays at its peak."""
    return _set_thresholds(_KEEP_BELOW_BYTES)


def return_freed_memory() -> bool:
    """Have glibc hand every block of 128 KiB or more back to the kernel when it is freed. For
    sharded training (ZeRO), whose point is memory: a layer's gathered parameters, its flat
    gradients and its reduce-scatter buffers are freed within the step, and kept blocks would
    hold on to them; glibc's default raises the threshold to 32 MiB after the first such free,
    and scattered heap blocks that size cannot be returned. Costs page faults on each reuse."""
    return _set_thresholds(_RETURN_FROM_BYTES)


def trim_freed_memory() -> bool:
    """Hand what glibc holds freed back to the kernel now (malloc_trim); whether it could."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _set_thresholds(size: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, size)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def set_freed_memory(keep: bool) -> bool:
    """keep_freed_memory or return_freed_memory; whether glibc took the setting."""
    return keep_freed_memory() if keep else return_freed_memory()
