"""Tensor parallelism checked layer math against the same model in one process: every rank
builds the same plain LLaMA (grouped-query attention, tied embeddings), keeps a copy, shards the
other over its tensor-parallel group, runs one batch through both, and reports how far the
gathered logits, the loss and every gradient are from the plain model's."""
import copy
import json
import sys
from types import SimpleNamespace

import torch

from app import dist, models
from app.parallel.tensor import parallelize
from app.parallel.tensor_layers import TensorGroup

tensor = int(sys.argv[1])
dist.init(layout=SimpleNamespace(tensor=tensor, pipeline=1))
torch.manual_seed(0)
shape = SimpleNamespace(init_from=None, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_seq_len=32, rope_theta=1e4, norm_eps=1e-5, dropout=0.0,
                        tie_embeddings=True, init_std=0.02, vocab_size=None)
plain = models.build_causal_lm(shape, 512)
inputs, targets = torch.randint(0, 512, (3, 32)), torch.randint(0, 512, (3, 32))

sharded = copy.deepcopy(plain)
group = TensorGroup(dist.process_set("tensor"), tensor, dist.mesh().coordinates(dist.rank())["tensor"])
splits = parallelize(sharded, group)

plain_logits = plain(input_ids=inputs).logits
plain_loss = models.causal_lm_loss(plain, inputs, targets)
plain_loss.backward()
shard_logits = sharded(input_ids=inputs).logits
before = group.bytes_reduced
shard_loss = models.causal_lm_loss(sharded, inputs, targets)
shard_loss.backward()
reduced = group.bytes_reduced - before  # one forward and backward's allreduce payload

gathered = group.allgather(shard_logits, "test.logits", dim=-1)
plain_grads = dict(plain.named_parameters())
grad_differences = {}
for name, param in sharded.named_parameters():
    grad = group.allgather(param.grad, f"test.{name}", dim=splits[name]) if name in splits else param.grad
    grad_differences[name] = (grad - plain_grads[name].grad).abs().max().item()
rows = dist.allgather_object({
    "rank": dist.rank(), "bytes_reduced": reduced, "local_vocab": shard_logits.shape[-1],
    "tied": sharded.lm_head.weight is sharded.model.embed_tokens.weight,
    "logits": (gathered - plain_logits).abs().max().item(), "logit_scale": plain_logits.abs().max().item(),
    "loss": abs(shard_loss.item() - plain_loss.item()), "grads": grad_differences,
    "grad_scale": max(p.grad.abs().max().item() for p in plain.parameters()),
}, name="rows")
if dist.is_main():
    print(json.dumps({"controller": dist.controller(), "rows": rows}))
