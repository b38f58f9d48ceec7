"""Tensor parallelism (Megatron-LM) inside groups of `parallel.tensor` consecutive ranks, data
parallelism across the groups: the hybrid layout.

`parallelize` applies a plan to a built LlamaForCausalLM from outside, as torchtitan's apply_tp
does (the model file never changes): each block's q/k/v and gate/up projections become
column-parallel (attention heads, grouped-query KV heads included, and FFN columns split), o and
down row-parallel, and the embedding and LM head split the vocabulary, with a
vocabulary-parallel cross-entropy so no rank ever holds the full logits. Per block that is two
allreduces forward and two backward of batch x seq x hidden activations.

Each sharded parameter's split dimension becomes its placement (app/parallel/model_part.py):
the data dimension's gradient handling, clipping by the true global norm and checkpoints that
any layout resumes come from the layout around it (app/parallel/layout.py).
"""
from functools import partial
from typing import Dict

import torch

from app.config import check_divisible_by_tensor
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
