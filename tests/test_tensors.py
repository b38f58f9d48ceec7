"""Every tensor a rank sends (pickled by Horovod's object collectives or mpi4py) or saves is moved
to the CPU first, and every checkpoint loads onto the CPU whatever device saved it (issue 24,
item 6). No GPU here: `Elsewhere` (conftest) counts the moves a GPU tensor would need."""
import json
import subprocess
import sys

import torch

from app import checkpoint
from app.tensors import to_cpu
from conftest import ROOT, Elsewhere, job_env, plain_shard
from test_checkpoint_integrity import tiny_model_and_optimizer


def elsewhere(*values) -> Elsewhere:
    return torch.tensor(values).as_subclass(Elsewhere)


def test_to_cpu_moves_every_tensor_inside_dicts_lists_tuples_and_dataclasses_and_keeps_the_rest():
    Elsewhere.moves = 0
    plain = torch.ones(2)
    moved = to_cpu({"state": {0: {"exp_avg": elsewhere(1.0, 2.0), "step": elsewhere(3.0)}},
                    "param_groups": [{"lr": 0.1}], "pair": (elsewhere(4.0), "name"),
                    "saved": checkpoint.TrainState(grad_scaler={"scale": elsewhere(5.0)}), "plain": plain})
    assert Elsewhere.moves == 4
    assert type(moved["state"][0]["exp_avg"]) is torch.Tensor and moved["state"][0]["exp_avg"].tolist() == [1.0, 2.0]
    assert moved["pair"][1] == "name" and type(moved["pair"]) is tuple and moved["param_groups"] == [{"lr": 0.1}]
    assert type(moved["saved"]) is checkpoint.TrainState and type(moved["saved"].grad_scaler["scale"]) is torch.Tensor
    assert moved["plain"] is plain  # a CPU tensor is not copied


# One process, Horovod started alone: its object collectives pickle whatever they are given.
SEND = """
import json, torch, horovod.torch as hvd
from app import dist
from conftest import Elsewhere
hvd.init()
sent = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2).as_subclass(Elsewhere)}}},
        "replicas": [torch.zeros(1).as_subclass(Elsewhere)]}
received = [dist.broadcast_object(sent, name="probe_broadcast"), dist.allgather_object(sent, name="probe_allgather")[0]]
types = {type(got["optimizer"]["state"][0]["exp_avg"]).__name__ for got in received}
types |= {type(got["replicas"][0]).__name__ for got in received}
print(json.dumps({"moves": Elsewhere.moves, "types": sorted(types)}))
"""


def test_objects_a_rank_sends_are_moved_to_the_cpu_before_pickling():
    result = subprocess.run([sys.executable, "-c", SEND], cwd=ROOT / "tests", env=job_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"moves": 4, "types": ["Tensor"]}


def test_a_checkpoint_moves_weights_optimizer_extras_and_rng_state_to_the_cpu_before_saving(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    shard = plain_shard(model, optimizer, extra={"replicas": [elsewhere(1.0)]})
    box, first_weight = shard.weights[0]
    shard.weights[0] = (box, first_weight.as_subclass(Elsewhere))
    box, key, moments = shard.state[0]
    shard.state[0] = (box, key, moments.as_subclass(Elsewhere))
    Elsewhere.moves = 0
    run_state = checkpoint.TrainState(step=1, model_signature=checkpoint.model_signature(model))
    written = checkpoint.save(tmp_path / "run", model, shard, run_state, [{"torch": elsewhere(2.0)}], keep_last=1)
    assert Elsewhere.moves == 4
    # weights_only loading would refuse a pickled tensor subclass as damage
    assert type(checkpoint.read_weights(written)[box.name]) is torch.Tensor
    assert all(type(v) is torch.Tensor for entry in checkpoint.load_optimizer_state(written)["state"].values()
               for v in entry.values())
    assert checkpoint.load_extras(written)["replicas"][0].tolist() == [1.0]
    assert checkpoint.load_rng_states(written)[0]["torch"].tolist() == [2.0]
