"""The trainer's own step (app/step.py) run eagerly and with train.compile=MODE on the same
batches, under Horovod on however many ranks launched it: prints, from rank 0, the largest
differences in loss and weights, and whether the compiled replicas agree across ranks.

    mpirun -np 2 python tests/workers/compile_equivalence.py DATA MODE PRECISION STEPS [OVERRIDE...]

OVERRIDEs (a layout, activation checkpointing) apply to both runs.
"""
import json
import sys

import torch
from omegaconf import OmegaConf

from app import cli, dist, models, runtime
from app.step import PhaseTimer, build_training, train_step

data_dir, mode, precision, steps, overrides = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]


def run(compile_mode: str):
    """Losses per step and the final weights of `steps` steps; two micro-batches per step, so
    Horovod's hooks must count backward passes through the compiled graph too."""
    cfg = cli.compose_config([
        "model=llama_tiny", "data.vocab_size=512", f"data.dir={data_dir}", "train.micro_batch_size=2",
        "train.grad_accum_steps=2", f"train.precision={precision}", f"train.compile={compile_mode}",
        "optim.warmup_steps=1", *overrides,
    ])
    OmegaConf.resolve(cfg)
    training = build_training(cfg, runtime.pick_device("cpu"))
    training.parallel.start(None)
    training.model.train()
    timer, losses = PhaseTimer(training.device), []
    for step in range(steps):
        output = train_step(training, step * training.task.stream.global_batch, step, timer)
        losses.append(dist.sum_over_ranks(output.loss.detach().double(), name=f"loss.{compile_mode}.{step}").item()
                      / dist.size())
    training.batches.close()
    # The full model's weights on every rank (a sharded layout gathers them, as its checkpoint does).
    with training.parallel.full_model() as model:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, weights, training.parallel.model


dist.init()
torch.set_num_threads(1)
eager_losses, eager_weights, _ = run("false")
compiled_losses, compiled_weights, model = run(mode)
checksums = dist.allgather_object(models.parameter_checksum(model), name="checksums")
if dist.is_main():
    print(json.dumps({
        "ranks": dist.size(), "eager_losses": eager_losses, "compiled_losses": compiled_losses,
        "max_loss_diff": max(abs(a - b) for a, b in zip(eager_losses, compiled_losses)),
        "max_weight_diff": max((eager_weights[k] - compiled_weights[k]).abs().max().item() for k in eager_weights),
        "same_names": sorted(eager_weights) == sorted(compiled_weights),
        "replicas_identical": len(set(checksums)) == 1,
    }), flush=True)
