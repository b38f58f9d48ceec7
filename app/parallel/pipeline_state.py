"""Optimizer state between a stage's optimizer and the full model's, by parameter name.

A torch optimizer's state_dict keys its per-parameter state by position in its param groups.
A stage's optimizer (built by optim.build_optimizer on the stage module) holds a subsequence of
the full model's parameters, in the same groups and order. Re-keying by the full model's
parameter names turns one into the other, so a checkpoint holds exactly what a plain optimizer
on the full model would have (the SavedState contract) and any layout can resume from it.
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
    the meta device count too: only their names and shapes are read)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return param_order(optim.parameter_groups(model, weight_decay=0.0), name_of)


def by_name(state_dict: dict, order: List[List[str]]) -> dict:
    """An optimizer state_dict re-keyed by parameter name; group settings kept without "params"."""
    names = [name for group in order for name in group]
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


def merge(pieces: List[dict]) -> dict:
    """Stages' by_name states as one: every stage holds the same group settings."""
    return {"state": {k: v for piece in pieces for k, v in piece["state"].items()}, "groups": pieces[0]["groups"]}


def restrict(named: dict, names: List[str]) -> dict:
    """The part of a by_name state that concerns `names`."""
    wanted = set(names)
    return {"state": {k: v for k, v in named["state"].items() if k in wanted}, "groups": named["groups"]}
