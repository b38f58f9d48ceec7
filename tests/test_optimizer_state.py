"""One by-name conversion between a layout's optimizer state and a plain optimizer's on the full
model (app/state_dicts.py), cut into placements' boxes and assembled back
(app/parallel/placement.py), and ZeRO's flat slices built from it (app/parallel/flat.py)."""
from types import SimpleNamespace

import pytest
import torch

from app import optim
from app.parallel.flat import FlatShard
from app.state_dicts import by_index, by_name, full_model_order
from app.parallel.placement import Placement, assemble, assemble_state, cut_state


class Odd(torch.nn.Module):
    """Parameters whose plain optimizer order (decayed matrices first) is not named_parameters'
    order, one frozen and one that never gets a gradient: neither has optimizer state."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.randn(4))
        self.weight = torch.nn.Parameter(torch.randn(4, 3))
        self.frozen = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
        self.unused = torch.nn.Parameter(torch.randn(2, 3))


def stepped_plain_optimizer(model: Odd, steps: int = 2) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(optim.parameter_groups(model, weight_decay=0.1), lr=0.1)
    for _ in range(steps):
        ((model.weight @ torch.ones(3)) * model.norm * (model.frozen @ torch.ones(3))).square().sum().backward()
        optimizer.step()
    return optimizer


LAYOUT_ORDER = [["unused", "weight"], ["norm"]]  # a layout's own order, not the plain one's


def halves(model: Odd, half: int) -> dict:
    """The placements of a layout rank holding half `half` of each parameter's rows."""
    return {name: Placement.whole(name, p.shape, ["tensor"]).split(0, 2, half, "tensor")
            for name, p in model.named_parameters()}


def layout_rank(model: Odd, named: dict, half: int):
    """A layout rank holding half `half` of each parameter's rows, loaded from by_name's form."""
    cut = cut_state(halves(model, half), dict(model.named_parameters()), named)
    pieces = {name: torch.nn.Parameter(tensor) for name, tensor in cut["model"].items()}
    optimizer = torch.optim.AdamW([{"params": [pieces[n] for n in names]} for names in LAYOUT_ORDER], lr=0.1)
    optimizer.load_state_dict(by_index(cut["optimizer"], LAYOUT_ORDER))
    return pieces, optimizer


def test_plain_state_goes_to_a_layout_in_another_order_by_name_and_comes_back_unchanged():
    model = Odd()
    plain = stepped_plain_optimizer(model)
    order = full_model_order(model)
    assert order == [["weight", "unused"], ["norm"]]
    assert [name for name, _ in model.named_parameters()] == ["norm", "weight", "frozen", "unused"]
    named = by_name(plain.state_dict(), order)
    assert set(named["state"]) == {"weight", "norm"}  # frozen and unused have none
    assert torch.equal(named["state"]["norm"]["exp_avg"], plain.state[model.norm]["exp_avg"])

    (first, first_optimizer), (second, second_optimizer) = (layout_rank(model, named, half) for half in (0, 1))
    assert torch.equal(first_optimizer.state[first["weight"]]["exp_avg_sq"],
                       plain.state[model.weight]["exp_avg_sq"][:2])
    assert torch.equal(second_optimizer.state[second["norm"]]["exp_avg"], plain.state[model.norm]["exp_avg"][2:])
    assert first["unused"] not in first_optimizer.state
    assert float(first_optimizer.state[first["weight"]]["step"]) == 2

    # Assembled back from both ranks' boxes into a plain optimizer's form.
    entries = [(halves(model, half)[name], entry) for half, rank_optimizer in enumerate((first_optimizer,
                                                                                         second_optimizer))
               for name, entry in by_name(rank_optimizer.state_dict(), LAYOUT_ORDER)["state"].items()]
    gathered = {"state": assemble_state(entries), "groups": named["groups"]}
    fresh = torch.optim.AdamW(optim.parameter_groups(model, weight_decay=0.1), lr=0.1)
    fresh.load_state_dict(by_index(gathered, order))
    weights = assemble((halves(model, half)[name], p.detach()) for half, rank in enumerate((first, second))
                       for name, p in rank.items())
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())
    for param in (model.weight, model.norm):
        for key, value in plain.state[param].items():
            assert torch.equal(fresh.state[param][key], value), key
    assert model.unused not in fresh.state and model.frozen not in fresh.state
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.1, 0.0]


def test_a_saved_optimizer_of_another_shape_is_refused_with_the_fix():
    model = Odd()
    state = stepped_plain_optimizer(model).state_dict()
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:1]
    with pytest.raises(ValueError, match=r"sizes \[1, 1\], this model \[2, 1\]; resume with the model and optim"):
        by_name(state, full_model_order(model))


def test_a_flat_slice_keeps_its_members_state_when_one_member_has_none():
    a, b, c = (torch.nn.Parameter(torch.randn(*shape)) for shape in [(2, 3), (4, 3), (2, 3)])
    entries = [{"step": torch.tensor(2.0), "exp_avg": torch.randn(2, 3)}, None,
               {"step": torch.tensor(5.0), "exp_avg": torch.randn(2, 3)}]
    # Two ranks' slices of one flat buffer (20 elements: 10 each, the middle member split).
    slices = [FlatShard([a, b, c], 0, SimpleNamespace(size=lambda: 2, rank=lambda r=r: r), shard_is_view=True)
              .owned_state(entries) for r in range(2)]
    assert all(s is not None and float(s["step"]) == 5 for s in slices)  # the slice steps as one: the most steps
    flat = FlatShard([a, b, c], 0, SimpleNamespace(size=lambda: 1, rank=lambda: 0), shard_is_view=True)
    pieces = flat.split_full(torch.cat([s["exp_avg"] for s in slices]))
    assert torch.equal(pieces[0], entries[0]["exp_avg"]) and torch.equal(pieces[2], entries[2]["exp_avg"])
    assert torch.equal(pieces[1], torch.zeros(4, 3))  # a fresh optimizer's moments
    slices[0]["step"] += 1
    assert float(entries[2]["step"]) == 5  # the source's step counter is not shared
