"""Local SGD's meeting, observed from inside: replicas step alone on their own data, so before a
meeting they differ; the meeting replaces each by the mean of all. Run under a launcher with the
averaging backend as argv[1]; prints one JSON line from rank 0."""
import json
import sys

import horovod.torch as hvd
import torch
from omegaconf import OmegaConf

from app import config, dist
from app.parallel.data import LocalSGD

backend, every = sys.argv[1], 3
dist.init()
sync_cfg = OmegaConf.merge(OmegaConf.structured(config.SyncConfig), {
    "name": "local_sgd", "gradient_allreduce": False, "param_average_every": every,
    "param_average_backend": backend})
torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
layout = LocalSGD(model, sync_cfg, accum_steps=1, process_set=hvd.global_process_set)
layout.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
generator = torch.Generator().manual_seed(100 + dist.rank())  # each rank its own data


def flat() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


report = []
for step in range(1, 2 * every + 1):
    inputs = torch.randn(16, 8, generator=generator)
    model(inputs).square().mean().backward()
    layout.optimizer_step(None)
    before = dist.allgather_object(flat(), name=f"before_{step}")
    layout.after_step(step)
    after = dist.allgather_object(flat(), name=f"after_{step}")
    mean = torch.stack(before).mean(0)
    report.append({
        "step": step,
        "spread_before": max((b - before[0]).abs().max().item() for b in before),
        "spread_after": max((a - after[0]).abs().max().item() for a in after),
        "after_minus_mean": max((a - mean).abs().max().item() for a in after),
        "moved_by_meeting": max((a - b).abs().max().item() for a, b in zip(after, before)),
    })
if dist.is_main():
    print(json.dumps({"ranks": dist.size(), "controller": dist.controller(), "steps": report}))
