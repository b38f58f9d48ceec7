"""Write checkpoints of a llama_small-sized model in a loop until killed: the test kills the
writer at random moments and checks that `latest` always names a loadable checkpoint.

Start-up (imports, building the model) costs seconds; a write attempt, a fraction of one. So
this process starts once and, at each "go" on stdin, forks a writer: it prints the writer's pid,
which the test kills, then, once the writer is reaped, "ended" and its exit code (-9 when the
SIGKILL ended it, not an error of its own). End of stdin (the test is gone): exit.
"""
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from app import checkpoint, config, models, optim
from tests.conftest import plain_shard


def write_until_killed(run_dir: Path, model, optimizer) -> None:
    found = checkpoint.latest(run_dir)
    step = checkpoint.read_state(found).step if found else 0
    while True:
        step += 1
        with torch.no_grad():
            next(model.parameters()).fill_(float(step))  # each checkpoint's content names its step
        state = checkpoint.TrainState(step=step, model_signature=checkpoint.model_signature(model))
        checkpoint.save(run_dir, model, plain_shard(model, optimizer), state, [torch.get_rng_state()], keep_last=2)


def main() -> None:
    run_dir = Path(sys.argv[1])
    # One thread: a forked child must not meet an OpenMP pool its parent started.
    torch.set_num_threads(1)
    model_cfg = OmegaConf.merge(OmegaConf.structured(config.ModelConfig),
                                OmegaConf.load(Path(__file__).parents[2] / "conf/model/llama_small.yaml"))
    model = models.build_causal_lm(model_cfg, vocab_size=4096)
    optimizer = optim.build_optimizer(model, OmegaConf.structured(config.OptimConfig), lr=1e-3)
    print("ready", flush=True)
    for line in sys.stdin:
        assert line.strip() == "go", line
        writer = os.fork()
        if writer == 0:
            write_until_killed(run_dir, model, optimizer)
        print(writer, flush=True)
        _, status = os.waitpid(writer, 0)
        print("ended", os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
