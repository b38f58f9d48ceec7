"""Write checkpoints of a llama_small-sized model in a loop until killed: the test kills this
process at random moments and checks that `latest` always names a loadable checkpoint."""
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from app import checkpoint, config, models, optim
from tests.conftest import plain_shard

run_dir = Path(sys.argv[1])
model_cfg = OmegaConf.merge(OmegaConf.structured(config.ModelConfig), OmegaConf.load(Path(__file__).parents[2] / "conf/model/llama_small.yaml"))
model = models.build_causal_lm(model_cfg, vocab_size=4096)
optimizer = optim.build_optimizer(model, OmegaConf.structured(config.OptimConfig), lr=1e-3)
print("ready", flush=True)
# The test starts writers ahead of their turn, so their start-ups overlap: each touches the run
# dir only when told to go, after the writer before it was killed. No word (the test is gone): exit.
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
found = checkpoint.latest(run_dir)
step = checkpoint.read_state(found).step if found else 0
while True:
    step += 1
    with torch.no_grad():
        next(model.parameters()).fill_(float(step))  # each checkpoint's content names its step
    state = checkpoint.TrainState(step=step, model_signature=checkpoint.model_signature(model))
    checkpoint.save(run_dir, model, plain_shard(model, optimizer), state, [torch.get_rng_state()], keep_last=2)
    print(step, flush=True)
