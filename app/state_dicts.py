"""State dicts by name: the model's weights with tied ones stored once, and optimizer state
between a layout's optimizer and a plain one on the full model, by parameter name.

A torch optimizer's state_dict keys its per-parameter state by position in its param groups, and
a layout's optimizer holds its parameters in an order of its own: a pipeline stage's a subsequence
of the full model's, a tensor-parallel rank's shards, ZeRO's flat slices. Checkpoints hold what a
plain optimizer (optim.build_optimizer) on the full model would, in boxes
(app/sharded_checkpoint.py), so any layout resumes from any other. Every layout converts through one form, the state keyed by global
parameter name (`by_name`): the plain state_dict re-keyed with `full_model_order`, then cut into
this rank's boxes by their placements (app/parallel/placement.py), then keyed by the layout's own
order (`by_index`); and the reverse to save. No position of one optimizer is ever read as a position of another.
"""
from typing import Dict, List

import torch

from app import optim


def param_order(optimizer_or_groups, name_of: Dict[int, str]) -> List[List[str]]:
    """The names of an optimizer's parameters, group by group, in its order."""
    groups = getattr(optimizer_or_groups, "param_groups", optimizer_or_groups)
    return [[name_of[id(p)] for p in group["params"]] for group in groups]


def full_model_order(model: torch.nn.Module) -> List[List[str]]:
    """The order optim.build_optimizer(model) gives the full model's parameters (parameters on
    the meta device, or a layout's shards of them, count too: only names, dims and requires_grad
    are read)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return param_order(optim.parameter_groups(model, weight_decay=0.0), name_of)


def by_name(state_dict: dict, order: List[List[str]]) -> dict:
    """An optimizer state_dict re-keyed by parameter name; group settings kept without "params"."""
    sizes = [len(group["params"]) for group in state_dict["param_groups"]]
    if sizes != [len(names) for names in order]:
        raise ValueError(f"the saved optimizer has parameter groups of sizes {sizes}, this model "
                         f"{[len(names) for names in order]}; resume with the model and optim it was saved with")
    names = {index: name for group, group_names in zip(state_dict["param_groups"], order)
             for index, name in zip(group["params"], group_names)}
    return {"state": {names[index]: value for index, value in state_dict["state"].items()},
            "groups": [{k: v for k, v in group.items() if k != "params"} for group in state_dict["param_groups"]]}


def by_index(named: dict, order: List[List[str]]) -> dict:
    """The state_dict an optimizer whose parameters are `order` loads, from by_name's form."""
    state, groups, index = {}, [], 0
    for settings, names in zip(named["groups"], order):
        groups.append({**settings, "params": list(range(index, index + len(names)))})
        for name in names:
            if name in named["state"]:
                state[index] = named["state"][name]
            index += 1
    return {"state": state, "param_groups": groups}


def is_per_element(value) -> bool:
    """State shaped like its parameter (Adam's moments, momentum), not a scalar (Adam's step)."""
    return torch.is_tensor(value) and value.dim() > 0


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a full state dict whose tied weights may be stored once (safetensors keeps one name
    per storage): a key may be missing only if it shares its storage with one that is present."""
    own = model.state_dict()
    result = model.load_state_dict(state, strict=False)
    present = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in present]
    if missing or result.unexpected_keys:
        raise ValueError(f"saved weights do not fit the model (missing {missing[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]}); use the model config they were trained with")
