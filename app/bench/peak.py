"""This machine's measured matmul peak, per thread and for all cores: what MFU is measured
against. Measured in the bench's own process, one thread count at a time, and remembered, so
every MFU in the report divides by the same number."""
from typing import Dict, Tuple

import torch

from app import metrics

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PeakTable:
    def __init__(self, peak_cfg):
        self.cfg = peak_cfg
        self.measured: Dict[Tuple[str, int], float] = {}

    def tflops(self, precision: str, threads: int) -> float:
        """Peak TFLOP/s of one process with `threads` threads, measured on first use."""
        key = (precision, threads)
        if key not in self.measured:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                self.measured[key] = metrics.measure_matmul_tflops(
                    DTYPES[precision], torch.device("cpu"), self.cfg.matrix_size, self.cfg.trials,
                    self.cfg.seconds_per_trial,
                )
            finally:
                torch.set_num_threads(previous)
        return self.measured[key]


def measure(peaks: PeakTable, precisions, cores: int) -> dict:
    """fp32 and bf16 peaks with 1 thread and with one thread per core."""
    section = {"cores": cores, "matrix_size": peaks.cfg.matrix_size, "precisions": {}}
    for precision in precisions:
        one = peaks.tflops(precision, 1)
        every = peaks.tflops(precision, cores)
        section["precisions"][precision] = {
            "tflops_1_thread": one,
            "tflops_all_cores": every,
            # Below 1 when cores share memory bandwidth, clocks or a neighbour's load.
            "all_cores_over_cores_x_1_thread": every / (cores * one),
        }
    return section
