"""Resident memory while the trainer builds (app/step.py build_training: a model on the meta
device, each rank materialising what it holds). Per rank: how far its peak resident set rose
above its resident set before building (Linux's VmHWM, reset first through /proc/self/clear_refs),
the bytes of parameters it holds once built (its share: ZeRO-3 slices, tensor shards), the whole
model's parameter bytes and the largest global tensor's. Rank 0 prints them as one JSON line, {"ranks": [...]}.

    horovodrun -np 2 python tests/workers/build_memory.py OVERRIDES_JSON
"""
import json
import sys
from pathlib import Path

import torch

from app import cli, config, dist, runtime
from app.step import build_training


def status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    cfg = cli.compose_config(json.loads(sys.argv[1]))
    config.validate(cfg)
    dist.init(cfg.horovod, cfg.parallel)
    torch.set_num_threads(1)
    # glibc returns freed blocks to the system, so the resident set follows the live bytes rather
    # than what malloc keeps for reuse.
    runtime.set_freed_memory(keep=False)
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from now
    before = status_kib("VmRSS")
    training = build_training(cfg, torch.device("cpu"))
    rose = (status_kib("VmHWM") - before) * 1024
    training.batches.close()
    rows = dist.allgather_object({
        "rank": dist.rank(), "peak_rise_bytes": rose,
        "held_bytes": training.parallel.state_bytes()["parameters"],
        "model_bytes": torch.float32.itemsize * training.parameters,
        "largest_tensor_bytes": max(torch.Size(init.shape).numel() * init.dtype.itemsize
                                    for init in training.parallel.part.initializer.inits.values())},
        name="build_memory")
    if dist.is_main():
        print(json.dumps({"ranks": rows}))


if __name__ == "__main__":
    main()
