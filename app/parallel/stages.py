"""A plain Hugging Face LLaMA cut into pipeline stages from outside (torchtitan's pipeline.py):
consecutive decoder layers per stage, the embedding with the first, the final norm and LM head
with the last. The model file is untouched; a stage module holds references to the model's own
submodules, so parameter names map back to the full model's (its placements' global names).

Tied embeddings (Megatron's embedding group): the first stage holds the embedding, the last
stage its own copy of the same weight as its LM head, both under the checkpoint's one name,
model.embed_tokens.weight; app/parallel/tied.py keeps the copies equal. Middle stages hold neither.
"""
from typing import Dict, List

import torch
from transformers.masking_utils import create_causal_mask


def layer_bounds(num_layers: int, stages: int) -> List[range]:
    """Near-equal runs of layers; the first stages take the remainder, since the last stage also
    carries the LM head and the loss."""
    base, extra = divmod(num_layers, stages)
    bounds, start = [], 0
    for stage in range(stages):
        end = start + base + (1 if stage < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


def stage_prefixes(stage: int, stages: int, num_layers: int) -> List[str]:
    """The full model's parameter-name prefixes that stage `stage` owns."""
    prefixes = ["model.embed_tokens."] if stage == 0 else []
    prefixes += [f"model.layers.{i}." for i in layer_bounds(num_layers, stages)[stage]]
    return prefixes + (["model.norm.", "lm_head."] if stage == stages - 1 else [])


def owner_names(full_names: List[str], stages: int, num_layers: int) -> List[List[str]]:
    """For each stage, the names (of `full_names`, in their order) it owns."""
    return [[name for name in full_names if name.startswith(tuple(stage_prefixes(s, stages, num_layers)))]
            for s in range(stages)]


class Stage(torch.nn.Module):
    """One stage's part of a LlamaForCausalLM: token ids or hidden states in, hidden states or
    logits out. Computes what LlamaModel.forward computes over its layers (same mask, same
    rotary embeddings), so P stages in a row equal the whole model."""

    def __init__(self, model, stage: int, stages: int):
        super().__init__()
        decoder, num_layers = model.model, model.config.num_hidden_layers
        self.config, self.first, self.last = model.config, stage == 0, stage == stages - 1
        # Registered in the full model's parameter order, so the optimizer's order here is a
        # subsequence of the full model's (app/state_dicts.py relies on it).
        self.embed_tokens = decoder.embed_tokens if self.first else None
        self.layers = torch.nn.ModuleDict({str(i): decoder.layers[i]
                                           for i in layer_bounds(num_layers, stages)[stage]})
        self.norm = decoder.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.rotary_emb = decoder.rotary_emb  # no parameters; every stage needs the angles
        full_name = {id(p): name for name, p in model.named_parameters()}  # a tied weight: the embedding's name
        # A tied model's embedding and LM head are one Parameter object: the first stage steps it as
        # its embedding, the last as its head, each a copy of its own under the one name.
        tied = model.lm_head.weight is decoder.embed_tokens.weight
        self.tied_ends = (decoder.embed_tokens, model.lm_head) if tied else None
        self.tied_name = full_name[id(decoder.embed_tokens.weight)] if tied else None
        if tied and self.last:
            # The head's own Parameter (the same storage, nothing copied), before anything is freed.
            shared = model.lm_head.weight
            model.lm_head.weight = torch.nn.Parameter(shared.detach(), requires_grad=shared.requires_grad)
            full_name[id(model.lm_head.weight)] = self.tied_name
        self.full_names: Dict[str, str] = {name: full_name[id(p)] for name, p in self.named_parameters()}
        # The full model's modules this stage does not run, freed once the stage has its weights.
        owned, module_name = {id(m) for m in self.modules()}, {id(m): name for name, m in model.named_modules()}
        self.others = [(module_name[id(m)] + ".", m) for m in [decoder.embed_tokens, *decoder.layers, decoder.norm,
                                                              model.lm_head] if id(m) not in owned]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(inputs) if self.first else inputs
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None, position_ids=position_ids)
        angles = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_embeddings=angles, position_ids=position_ids)
        return self.lm_head(self.norm(hidden)) if self.last else hidden

    def free_others(self) -> None:
        """Give back the memory of the layers other stages run (their structure stays, on the
        meta device: the whole model's parameter names and shapes, which checkpoints read)."""
        for _, module in self.others:
            module.to("meta")
        if self.tied_ends is not None:
            # Moving one of two tied modules gives it a meta Parameter of its own: the whole model
            # would count (and checkpoints name) two weights. The end this rank holds serves both.
            embedding, head = self.tied_ends
            if self.last:
                embedding.weight = head.weight
            else:
                head.weight = embedding.weight
