"""Tensor parallelism (Megatron-LM) inside groups of `parallel.tensor` consecutive ranks, data
parallelism across the groups: the hybrid layout.

`parallelize` applies a plan to a built LlamaForCausalLM from outside, as torchtitan's apply_tp
does (the model file never changes): each block's q/k/v and gate/up projections become
column-parallel (attention heads, grouped-query KV heads included, and FFN columns split), o and
down row-parallel, and the embedding and LM head split the vocabulary, with a
vocabulary-parallel cross-entropy so no rank ever holds the full logits. Per block that is two
allreduces forward and two backward of batch x seq x hidden activations.

`TensorParallel` is the layout: gradients are averaged over the data-parallel set only (the
ranks holding the same shard), initial weights are broadcast per data-parallel set from its
first rank, clipping uses the true global norm, and checkpoints hold the full model and a plain
optimizer's state (app/checkpoint.py SavedState), so any layout can resume them.
"""
import socket
from contextlib import contextmanager
from functools import partial
from typing import Dict, Optional

import horovod.torch as hvd
import torch

from app import dist
from app.checkpoint import SavedState
from app.config import check_divisible_by_tensor
from app.parallel.base import load_model_state
from app.parallel.data import DataParallel
from app.parallel.optimizer_state import by_index, by_name, full_model_order, map_pieces, param_order
from app.parallel.tensor_layers import (ColumnParallelLinear, RowParallelLinear, TensorGroup, VocabParallelEmbedding,
                                        VocabParallelLoss, copy_inputs_to_shards)

# Module (relative to each decoder block) -> its tensor-parallel replacement. The attention and
# MLP modules apply f to their input once (copy_inputs_to_shards), so their column-parallel
# layers do not; the LM head, alone on its input, does.
SHARED_INPUT = partial(ColumnParallelLinear, copy_input=False)
BLOCK_PLAN = {
    "self_attn.q_proj": SHARED_INPUT, "self_attn.k_proj": SHARED_INPUT, "self_attn.v_proj": SHARED_INPUT,
    "self_attn.o_proj": RowParallelLinear,
    "mlp.gate_proj": SHARED_INPUT, "mlp.up_proj": SHARED_INPUT, "mlp.down_proj": RowParallelLinear,
}
BLOCK_INPUTS = ("self_attn", "mlp")
MODEL_PLAN = {"model.embed_tokens": VocabParallelEmbedding, "lm_head": ColumnParallelLinear}
# The dimension of each sharded parameter that is split (weights are out x in).
SPLIT_DIMS = {ColumnParallelLinear: {"weight": 0, "bias": 0}, RowParallelLinear: {"weight": 1},
              VocabParallelEmbedding: {"weight": 0}}


def check_divisible(config, tensor: int) -> None:
    """The built model's sizes (its vocabulary may come from the tokenizer) split into `tensor` shards."""
    check_divisible_by_tensor({"model.num_heads": config.num_attention_heads,
                               "model.num_kv_heads": config.num_key_value_heads,
                               "model.intermediate_size": config.intermediate_size,
                               "model.vocab_size": config.vocab_size}, tensor)


def parallelize(model: torch.nn.Module, group: TensorGroup) -> Dict[str, int]:
    """Shard a LlamaForCausalLM in place over `group`; return each sharded parameter's split
    dimension by its (unchanged) state-dict name."""
    check_divisible(model.config, group.size)
    plan = dict(MODEL_PLAN)
    for index, block in enumerate(model.model.layers):
        plan.update({f"model.layers.{index}.{path}": style for path, style in BLOCK_PLAN.items()})
        for name in BLOCK_INPUTS:
            copy_inputs_to_shards(block.get_submodule(name), group, site=f"model.layers.{index}.{name}")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    splits = {}
    for path, style in plan.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        replacement = style(getattr(parent, child), group, site=path)
        setattr(parent, child, replacement)
        splits.update({f"{path}.{name}": dim for name, dim in SPLIT_DIMS[type(replacement)].items()
                       if getattr(replacement, name, None) is not None})
    if tied:  # one vocabulary shard serves as both embedding and output rows, as before
        model.lm_head.weight = model.model.embed_tokens.weight
    # The loss that reads vocabulary-sharded logits (torchtitan's loss_parallel, as a function).
    model.logits_cross_entropy = VocabParallelLoss(group, model.lm_head.weight.shape[0])
    return splits


class TensorParallel(DataParallel):
    """Megatron tensor parallelism in each tensor-parallel set, Horovod's DistributedOptimizer
    over each data-parallel set."""

    name = "tensor"

    def __init__(self, model: torch.nn.Module, sync_cfg, accum_steps: int):
        self.mesh = dist.mesh()
        self.coordinates = self.mesh.coordinates(dist.rank())
        self.group = TensorGroup(dist.process_set("tensor"), self.mesh.tensor, self.coordinates["tensor"])
        self.splits = parallelize(model, self.group)
        super().__init__(model, sync_cfg, accum_steps, process_set=dist.process_set("data"))
        self.hosts = dist.allgather_object(socket.gethostname(), name="tensor_hosts")

    # --- start: per data-parallel set, or a full checkpoint sliced -------------------------------
    def start(self, saved: Optional[SavedState]) -> None:
        resuming = dist.broadcast_object(saved is not None, name="resuming")
        if not resuming:
            self._broadcast_from_data_root()
            return
        # Every rank takes the full state and keeps its slice (see README for the memory cost).
        full = dist.broadcast_object((saved.model, saved.optimizer) if saved is not None else None,
                                     name="tensor_resume")
        load_model_state(self.model, {k: self._slice(k, v) for k, v in full[0].items()})
        named = map_pieces(by_name(full[1], full_model_order(self.model)), self._slice)
        self.optimizer.load_state_dict(by_index(named, self._order()))

    def _broadcast_from_data_root(self) -> None:
        """hvd.broadcast_parameters knows no process sets: it would overwrite other shards."""
        root = self.mesh.group(dist.rank(), "data")[0]
        handles = [hvd.broadcast_async_(param.data, root, name=f"tensor_start.{name}", process_set=self.process_set)
                   for name, param in self.model.named_parameters()]
        for handle in handles:
            hvd.synchronize(handle)

    def _slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full if name not in self.splits else self.group.shard(full, self.splits[name])

    def _gather(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        if name not in self.splits:
            return shard.detach().clone()
        return self.group.allgather(shard, f"save.{name}", dim=self.splits[name])

    def _order(self):
        """This rank's optimizer's parameters by name: the shards keep their parameters' names."""
        return param_order(self.optimizer, {id(p): n for n, p in self.model.named_parameters()})

    # --- one step -------------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ over the whole model: a sharded parameter's squares are summed
        over the group; a replicated one (the norms' gains, equal on every shard) counted once."""
        named = [(name, param.grad) for name, param in self.model.named_parameters() if param.grad is not None]
        grads = [grad for _, grad in named]
        # On the parameters' device: a CUDA square added in place into a CPU tensor raises.
        sharded = torch.zeros((), dtype=torch.float64, device=next(self.model.parameters()).device)
        replicated = torch.zeros_like(sharded)
        for name, grad in named:
            square = grad.detach().double().pow(2).sum()
            if name in self.splits:
                sharded += square
            else:
                replicated += square
        total = (self.group.allreduce(sharded, "grad_norm") + replicated).sqrt().float()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
        return total

    def unscale_gradients(self, scaler) -> None:
        """fp16: unscale, then let the group agree on overflow. Each rank checks only its own
        shards, so an inf in one shard would make that rank alone skip the step, and the
        replicated parameters (the norms' gains) would part for good. As Megatron reduces its
        found-inf flag over the model-parallel group (and torch's ShardedGradScaler over its
        shards), the flag becomes the group's maximum before scaler.step and scaler.update read
        it: every rank of the group skips, or steps, together."""
        super().unscale_gradients(scaler)
        # GradScaler keeps the flags, one per device, in its per-optimizer state only.
        found = list(scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values())
        flag = torch.stack([f.to(found[0].device) for f in found]).amax()
        agreed = self.group.allreduce(flag, "found_inf", op=hvd.Max)
        for f in found:
            f.copy_(agreed)

    def counts_tokens(self) -> bool:
        # The group's ranks all process the same batch: its first rank counts it.
        return self.group.rank == 0

    # --- checkpoints and the end -------------------------------------------------------------------
    def _full_model_state(self) -> Dict[str, torch.Tensor]:
        """The whole model's state dict, gathered within this rank's tensor group (a collective
        of the group)."""
        full, by_storage = {}, {}
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() not in by_storage:  # a tied weight gathered once
                by_storage[tensor.data_ptr()] = self._gather(name, tensor)
            full[name] = by_storage[tensor.data_ptr()]
        return full

    def saved_state(self) -> Optional[SavedState]:
        # Only rank 0's group gathers; the others wait for it at the barrier: Horovod shuts down
        # for everyone when one rank runs ahead and exits.
        saved = None
        if self.coordinates["data"] == 0:
            saved = SavedState(model=self._full_model_state(),
                               optimizer=self._plain_optimizer_state(),
                               world_size=dist.size())
        dist.barrier()
        return saved if dist.is_main() else None

    def _plain_optimizer_state(self) -> dict:
        """A plain optimizer's state on the full model, each shard's state gathered in the group."""
        named = map_pieces(by_name(self.optimizer.state_dict(), self._order()), self._gather)
        return by_index(named, full_model_order(self.model))

    @contextmanager
    def evaluation_model(self):
        """The sharded model itself, whose vocabulary-parallel loss is the whole model's: the
        ranks of a group evaluate one share (their data-parallel position) together."""
        yield self.model, dist.data_position()

    @contextmanager
    def full_model(self):
        """A plain copy of the whole model on every rank, for as long as it is used (the closing
        sample, which rank 0 generates alone): built on the meta device, so no weight is
        initialised and the RNG does not move, then filled with the group's gathered shards."""
        device = next(self.model.parameters()).device
        with torch.device("meta"):
            plain = type(self.model)(self.model.config)
        plain.to_empty(device=device)
        plain.tie_weights()  # to_empty gives the tied head a storage of its own
        load_model_state(plain, self._full_model_state())
        # Buffers outside the state dict (the rotary inverse frequencies) are the same on every shard.
        for name, buffer in self.model.named_buffers():
            plain.get_buffer(name).copy_(buffer)
        dist.barrier()  # a group done first must not exit while another still gathers
        yield plain.train(self.model.training)

    def replica_group(self) -> int:
        return self.group.rank

    def layout(self) -> dict:
        return {"mode": self.name, "world_size": dist.size(), "sync": self.sync.name, **self.mesh.sizes(),
                "groups": {"tensor": self.mesh.groups("tensor"), "data": self.mesh.groups("data")},
                "ranks": self.mesh.describe(self.hosts)["ranks"]}
