"""Where a step's time goes, recorded by the tools that can show it: a torch.profiler trace of
chosen steps (train.profile_steps) and Horovod's own timeline and autotune log (horovod.timeline,
horovod.autotune; switched on in app/dist.py before hvd.init). All land in the run directory.

    python -m app.train train.profile_steps=[5,6] horovod.timeline=true
    # open RUN_DIR/profile/*.pt.trace.json in ui.perfetto.dev (or chrome://tracing);
    python scripts/step_timeline.py RUN_DIR 6 step.png   # one step's phases and Horovod ops as a PNG
"""
import logging
from pathlib import Path
from typing import List, Optional

import torch

log = logging.getLogger("app.profiling")

PROFILE_DIR = "profile"


def trace_path(run_dir: Path, first: int, last: int, rank: int = 0) -> Path:
    # The Chrome trace format (Kineto's *.pt.trace.json), which Perfetto and chrome://tracing read.
    return Path(run_dir) / PROFILE_DIR / f"rank{rank}.steps_{first}-{last}.pt.trace.json"


class StepProfiler:
    """torch.profiler over optimizer steps [first, last], counted from 1 as the log counts them.
    One rank records (the run directory has one writer); the others run unprofiled."""

    def __init__(self, steps: List[int], run_dir: Path, device: torch.device, enabled: bool):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.run_dir = run_dir
        self.enabled = enabled and bool(steps)
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler: Optional[torch.profiler.profile] = None
        self.step_range = None  # the open ProfilerStep#N range

    def before_step(self, step: int) -> None:
        """`step`: the number (from 1) of the optimizer step about to run."""
        if self.enabled and step == self.first and self.profiler is None:
            self.profiler = torch.profiler.profile(activities=self.activities, record_shapes=True)
            self.profiler.start()
        if self.profiler is not None:
            # Each step as one range named by the log's step number, the span a viewer zooms to.
            self.step_range = torch.profiler.record_function(f"ProfilerStep#{step}")
            self.step_range.__enter__()

    def after_step(self, step: int) -> None:
        if self.profiler is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        if step >= self.last:
            self.close()

    def close(self) -> Optional[Path]:
        """Stop and write the trace (also when the run ends inside the profiled steps)."""
        if self.profiler is None:
            return None
        if self.step_range is not None:  # the run stopped inside a step
            self.step_range.__exit__(None, None, None)
        self.profiler.stop()
        path = trace_path(self.run_dir, self.first, self.last)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(path))
        self.profiler = None
        log.info("torch.profiler trace of steps %d-%d: %s (TensorBoard --logdir %s, or ui.perfetto.dev)",
                 self.first, self.last, path, path.parent)
        return path
