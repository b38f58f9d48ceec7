"""Throughput, MFU and memory formulas in one place, and the rank-0 sinks: TensorBoard,
metrics.jsonl and a progress bar. Other ranks get a logger that does nothing."""
import json
import time
from pathlib import Path
from typing import Dict, Optional

import psutil
import torch

from app import fileio


def _seconds_for(a: torch.Tensor, b: torch.Tensor, iterations: int) -> float:
    """Wall time of `iterations` matmuls. A GPU runs them asynchronously: one synchronize after
    the batch times their completion without a host round trip between them."""
    started = time.perf_counter()
    for _ in range(iterations):
        torch.matmul(a, b)
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - started


def measure_matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 1024, trials: int = 5,
                          seconds_per_trial: float = 0.1) -> float:
    """Achieved TFLOP/s of a square matmul on this rank's threads: the peak MFU is measured
    against. The best of several short trials, so a neighbour's start-up burst does not lower it;
    each trial runs a batch of matmuls sized (by doubling) to last about seconds_per_trial."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    iterations = 1
    while _seconds_for(a, b, iterations) < seconds_per_trial / 2:  # also the warm-up: kernel selection
        iterations *= 2
    best = 0.0
    for _ in range(trials):
        best = max(best, 2 * size**3 * iterations / _seconds_for(a, b, iterations) / 1e12)
    return best


def mfu(flops_per_token: float, tokens_per_second_per_rank: float, peak_tflops_per_rank: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak, per rank."""
    return flops_per_token * tokens_per_second_per_rank / (peak_tflops_per_rank * 1e12)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak so far: the allocator's on a GPU, the resident set's on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def process_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


class NullLogger:
    """What ranks other than 0 hold: the same calls, no output."""

    def log(self, step: int, values: Dict[str, float]) -> None:
        pass

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def progress(self, advance: int, postfix: Optional[dict] = None) -> None:
        pass

    def image(self, tag: str, image, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_rows(run_dir: Path) -> list:
    """A run's metrics.jsonl, one dict a row (what RunLogger.log wrote)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def drop_rows_after(jsonl_path: Path, last_step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without rows past last_step: a resumed run logs those
    steps again, and its logs must read as one run. A torn last line, from a crash mid-write,
    goes too. Rows at last_step were logged before that step's checkpoint was saved: they stay."""
    if not jsonl_path.is_file():
        return
    lines = jsonl_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if (step := row_step(line)) is not None and step <= last_step]
    if len(kept) != len(lines):
        fileio.write_text(jsonl_path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def row_step(line: str) -> Optional[int]:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class RunLogger(NullLogger):
    """Rank 0's TensorBoard writer, metrics.jsonl and tqdm bar, all in the run directory.
    initial_step is the step a run resumes at (0 when fresh): what earlier attempts logged after
    it is dropped from metrics.jsonl and purged from TensorBoard, since this run logs it again."""

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, progress_bar: bool):
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        # TensorBoard hides events at steps >= purge_step that were written before this writer.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=initial_step + 1)
        drop_rows_after(run_dir / "metrics.jsonl", initial_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: Dict[str, float]) -> None:
        self.scalars(step, values)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """TensorBoard only: numbers that summary.json already holds (the plan block's), kept
        out of metrics.jsonl, whose rows are the loop's windows and evaluations."""
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def progress(self, advance: int, postfix: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.update(advance)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()
