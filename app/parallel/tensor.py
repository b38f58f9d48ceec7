"""Tensor parallelism (Megatron-LM) inside groups of `parallel.tensor` consecutive ranks, data
parallelism across the groups: the hybrid layout.

`parallelize` applies its model family's plan to a built model from outside, as torchtitan's
apply_tp does (the model file never changes). LLaMA: each block's q/k/v and gate/up projections
become column-parallel (attention heads, grouped-query KV heads included, and FFN columns split),
o and down row-parallel, and the embedding and LM head split the vocabulary. BERT (Megatron's
BERT split): each layer's query/key/value and intermediate.dense column-parallel, the attention's
output.dense and the layer's output.dense row-parallel (their biases added once, after the sum),
the word embeddings and the masked-LM decoder tied to them vocabulary-parallel; position and
token-type embeddings, LayerNorms, pooler and classifier stay replicated. Where the logits are
vocabulary-parallel a vocabulary-parallel cross-entropy reads them, so no rank ever holds them
all. Per block that is two allreduces forward and two backward of batch x seq x hidden
activations.

Each sharded parameter's split dimension becomes its placement (app/parallel/model_part.py):
the data dimension's gradient handling, clipping by the true global norm and checkpoints that
any layout resumes come from the layout around it (app/parallel/layout.py).
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch

from app.config import check_divisible_by_tensor
from app.parallel.tensor_layers import (ColumnParallelLinear, RowParallelLinear, TensorGroup, VocabParallelEmbedding,
                                        VocabParallelLoss, copy_inputs_to_shards)


@dataclass(frozen=True)
class Plan:
    """How one model class splits."""
    blocks: str  # the module list of its blocks (decoder or encoder layers)
    block: Dict[str, Callable]  # module path inside a block -> its tensor-parallel replacement
    block_inputs: Tuple[str, ...]  # block modules whose hidden-states input gets f once (see SHARED_INPUT)
    head_counts: Tuple[str, ...]  # attributes inside a block that count all heads or their width: made local
    model: Dict[str, Callable]  # module path outside the blocks -> its replacement
    logits: Optional[str]  # the vocabulary-parallel layer whose logits the loss reads; None: whole logits


# The attention and MLP modules apply f to their input once (copy_inputs_to_shards), so their
# column-parallel layers do not; a column-parallel layer alone on its input (an LM head, BERT's
# intermediate.dense) does.
SHARED_INPUT = partial(ColumnParallelLinear, copy_input=False)
LLAMA = Plan(
    blocks="model.layers",
    block={"self_attn.q_proj": SHARED_INPUT, "self_attn.k_proj": SHARED_INPUT, "self_attn.v_proj": SHARED_INPUT,
           "self_attn.o_proj": RowParallelLinear,
           "mlp.gate_proj": SHARED_INPUT, "mlp.up_proj": SHARED_INPUT, "mlp.down_proj": RowParallelLinear},
    block_inputs=("self_attn", "mlp"),
    head_counts=(),  # LlamaAttention reads its head count from the projections' shapes
    model={"model.embed_tokens": VocabParallelEmbedding, "lm_head": ColumnParallelLinear},
    logits="lm_head")
BERT_BLOCK = {
    "attention.self.query": SHARED_INPUT, "attention.self.key": SHARED_INPUT, "attention.self.value": SHARED_INPUT,
    "attention.output.dense": RowParallelLinear,
    "intermediate.dense": ColumnParallelLinear, "output.dense": RowParallelLinear,
}
# transformers 5 reshapes by -1 heads, but BertSelfAttention's counts are public attributes
# (older versions reshape by them): they tell the local truth.
BERT_HEAD_COUNTS = ("attention.self.num_attention_heads", "attention.self.all_head_size")
BERT_ENCODER = dict(blocks="bert.encoder.layer", block=BERT_BLOCK, block_inputs=("attention.self",),
                    head_counts=BERT_HEAD_COUNTS)
PLANS = {
    "LlamaForCausalLM": LLAMA,
    "BertForMaskedLM": Plan(**BERT_ENCODER, logits="cls.predictions.decoder",
                            model={"bert.embeddings.word_embeddings": VocabParallelEmbedding,
                                   "cls.predictions.decoder": ColumnParallelLinear}),
    "BertForSequenceClassification": Plan(**BERT_ENCODER, logits=None,
                                          model={"bert.embeddings.word_embeddings": VocabParallelEmbedding}),
}
# The dimension of each sharded parameter that is split (weights are out x in).
SPLIT_DIMS = {ColumnParallelLinear: {"weight": 0, "bias": 0}, RowParallelLinear: {"weight": 1},
              VocabParallelEmbedding: {"weight": 0}}
# Config key -> the built model's config attribute, for the sizes a split divides (a family
# without one, BERT's KV heads, skips it).
SPLIT_SIZES = {"model.num_heads": "num_attention_heads", "model.num_kv_heads": "num_key_value_heads",
               "model.intermediate_size": "intermediate_size", "model.vocab_size": "vocab_size"}


def check_divisible(config, tensor: int) -> None:
    """The built model's sizes (its vocabulary may come from the tokenizer) split into `tensor` shards."""
    check_divisible_by_tensor({key: getattr(config, attr, None) for key, attr in SPLIT_SIZES.items()}, tensor)


def parallelize(model: torch.nn.Module, group: TensorGroup) -> Dict[str, int]:
    """Shard a model of a planned class in place over `group`; return each sharded parameter's
    split dimension by its (unchanged) state-dict name."""
    plan = PLANS.get(type(model).__name__)
    if plan is None:
        raise ValueError(f"no tensor-parallel plan for {type(model).__name__}; use parallel.tensor=1")
    check_divisible(model.config, group.size)
    ties = _tied_names(model)
    replacements = dict(plan.model)
    for index, block in enumerate(model.get_submodule(plan.blocks)):
        prefix = f"{plan.blocks}.{index}"
        replacements.update({f"{prefix}.{path}": style for path, style in plan.block.items()})
        for name in plan.block_inputs:
            copy_inputs_to_shards(block.get_submodule(name), group, site=f"{prefix}.{name}")
        for path in plan.head_counts:
            owner, _, attribute = path.rpartition(".")
            module = block.get_submodule(owner)
            setattr(module, attribute, getattr(module, attribute) // group.size)
    splits = {}
    for path, style in replacements.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        replacement = style(getattr(parent, child), group, site=path)
        setattr(parent, child, replacement)
        splits.update({f"{path}.{name}": dim for name, dim in SPLIT_DIMS[type(replacement)].items()
                       if getattr(replacement, name, None) is not None})
    _retie(model, ties, splits)
    if plan.logits is not None:
        # The loss that reads vocabulary-sharded logits (torchtitan's loss_parallel, as a function).
        model.logits_cross_entropy = VocabParallelLoss(group, model.get_submodule(plan.logits).weight.shape[0])
    return splits


def _tied_names(model: torch.nn.Module) -> List[List[str]]:
    """The names of each parameter that has several (tied weights), in registration order."""
    names: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: torch.nn.Module, ties: List[List[str]], splits: Dict[str, int]) -> None:
    """Tie again what the split untied: each tied group shares the shard of its first split
    member (the embedding's vocabulary rows serve as the LM head's too; the MLM decoder's bias
    shard is cls.predictions.bias), under every one of its names, with that member's split dim."""
    for group in ties:
        split = [name for name in group if name in splits]
        if not split:
            continue
        shard = model.get_parameter(split[0])
        for name in group:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, shard)
            splits[name] = splits[split[0]]
