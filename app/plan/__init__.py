"""The planner: memory and step time of every layout a world can run, the pick, and the check
every training run makes of its own prediction (README, "Planning a run").

    python -m app.plan model=llama_7b world=16 memory_gib=80 global_batch=256   # ranked layouts
    python -m app.plan calibrate                                                # this machine's costs

cell.py (a grid point and the model's shape), memory.py, time.py, choose.py (the grid, the
pick), profile.py (hardware profiles and the calibration cache), calibrate.py, training.py (what
the trainer asks), state.py (model-state bytes by ZeRO stage, the start-up shortfall warning)."""
from app.plan.state import (count_parameters, model_state_bytes, optimizer_bytes_per_parameter, shortfall_warning,
                            smallest_fit)

__all__ = ["count_parameters", "model_state_bytes", "optimizer_bytes_per_parameter", "shortfall_warning",
           "smallest_fit"]
