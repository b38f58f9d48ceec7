"""The trainer's own tensor-parallel step (app/step.py) on a tensor group, watched from inside:
the names of the group's collectives in two consecutive steps; an fp16 loss scaler
(torch.amp.GradScaler on the CPU, the same unscale, clip and step path as on a GPU) through a
step where one rank's shard alone overflows; and evaluation on the sharded model beside the
gathered whole model's, with the RNG state around both.

    horovodrun -np 2 python tests/workers/tensor_steps.py DATA_DIR
"""
import hashlib
import json
import sys
from types import SimpleNamespace

import horovod.torch as hvd
import torch

from app import models, train
from app.bench.worker import start_training
from app.step import PhaseTimer, train_step

OVERRIDES = ["model=llama_tiny", "data.vocab_size=512", f"data.dir={sys.argv[1]}", "parallel.tensor=2",
             "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.precision=fp32",
             "train.deterministic=true", "train.eval_batches=2"]
NAMED_STEPS = (1, 2)  # step 0 may differ: it is the first
OVERFLOW_STEP = 3
STEPS = 5

issued = []  # the tensor group's collective names, in order


def recording(collective):
    def record(tensor, *args, name=None, **kwargs):
        if name is not None and name.startswith("tensor."):
            issued.append(name)
        return collective(tensor, *args, name=name, **kwargs)
    return record


hvd.allreduce_async = recording(hvd.allreduce_async)
hvd.allgather_async = recording(hvd.allgather_async)

cfg, training = start_training({"overrides": OVERRIDES, "threads": 1})
layout = training.parallel
training.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
shard = training.model.model.layers[0].mlp.down_proj.weight  # row-parallel: each rank holds its own half
replicated = [(name, p) for name, p in training.model.named_parameters() if name not in layout.part.splits]
timer, names, overflow = PhaseTimer(training.device), {}, {}
for step in range(STEPS):
    overflowing = step == OVERFLOW_STEP and layout.part.tensor_group.rank == 1
    hook = shard.register_hook(lambda grad: torch.full_like(grad, float("inf"))) if overflowing else None
    before = {name: p.detach().clone() for name, p in training.model.named_parameters()}
    scale_before, issued[:] = training.scaler.get_scale(), []
    train_step(training, step * training.task.stream.global_batch, step, timer)
    names[step] = list(issued)
    if step == OVERFLOW_STEP:
        if hook is not None:
            hook.remove()
        overflow = {"scale_before": scale_before, "scale_after": training.scaler.get_scale(),
                    "changed": sorted(name for name, p in training.model.named_parameters()
                                      if not torch.equal(p.detach(), before[name]))}

rng_before = torch.get_rng_state()
sharded = train.evaluate(cfg, training, SimpleNamespace(step=STEPS), SimpleNamespace(log=lambda *_: None))
rng_after_evaluation = torch.get_rng_state()
with layout.full_model() as whole:
    rng_after_gathering = torch.get_rng_state()
    # Every rank evaluates every batch with the whole model, as one process would.
    alone = training.task.evaluate(whole, (0, 1), training.device, training.precision_ctx,
                                   cfg.train.micro_batch_size, cfg.train.eval_batches)
    whole_checksum = models.parameter_checksum(whole)

digest = hashlib.sha256()
models.add_to_checksum(digest, replicated)
rows = hvd.allgather_object({
    "rank": hvd.rank(), "names": [names[step] for step in NAMED_STEPS], "overflow": overflow,
    "replicated_checksum": digest.hexdigest(),
    "sharded_val_loss": sharded["val/loss"], "whole_val_loss": alone["val/loss"], "whole_checksum": whole_checksum,
    "rng_kept_by_evaluation": torch.equal(rng_before, rng_after_evaluation),
    "rng_kept_by_gathering": torch.equal(rng_before, rng_after_gathering),
}, name="tensor_steps_rows")
if hvd.rank() == 0:
    print(json.dumps({"rows": rows, "replicated": [name for name, _ in replicated]}))
training.batches.close()
