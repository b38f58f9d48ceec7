"""One by-name conversion between a layout's optimizer state and a plain optimizer's on the full
model (app/state_dicts.py), written and read in placements' boxes (app/sharded_checkpoint.py),
and ZeRO's flat slices built from it (app/parallel/flat.py)."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app import checkpoint, fileio, optim, sharded_checkpoint
from app.parallel.flat import FlatShard
from app.parallel.placement import Placement
from app.state_dicts import by_index, by_name, full_model_order


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


def written(directory: Path, shards: list) -> checkpoint.Reader:
    """A sharded checkpoint's weights, optimizer state and index, each shard as its rank writes it."""
    directory.mkdir()
    answers = [sharded_checkpoint.write_files(directory, rank, shard) for rank, shard in enumerate(shards)]
    index = sharded_checkpoint.build_index(answers, shards[0].groups, shards[0].order)
    fileio.write_json(directory / sharded_checkpoint.INDEX, index)
    return checkpoint.Reader(directory)


def layout_rank(model: Odd, reader: checkpoint.Reader, half: int):
    """A layout rank holding half `half` of each parameter's rows, loaded from a checkpoint."""
    placements = halves(model, half)
    pieces = {name: torch.nn.Parameter(reader.weight(p)) for name, p in placements.items()}
    state = {name: reader.state(p) for name, p in placements.items()}
    named = {"state": {name: entry for name, entry in state.items() if entry is not None}, "groups": reader.groups}
    optimizer = torch.optim.AdamW([{"params": [pieces[n] for n in names]} for names in LAYOUT_ORDER], lr=0.1)
    optimizer.load_state_dict(by_index(named, LAYOUT_ORDER))
    return pieces, optimizer


def rank_shard(model: Odd, pieces: dict, optimizer, half: int, order) -> sharded_checkpoint.Shard:
    boxes = halves(model, half)
    named = by_name(optimizer.state_dict(), LAYOUT_ORDER)
    return sharded_checkpoint.shard_of([(boxes[n], p.detach()) for n, p in pieces.items()],
                                       [(boxes[n], entry) for n, entry in named["state"].items()],
                                       named["groups"], order)


def test_plain_state_goes_to_a_layout_in_another_order_by_name_and_comes_back_unchanged(tmp_path):
    """Saved by one process, read by two ranks holding half of every parameter's rows (their
    optimizer in an order of its own), saved by them as two shards, read back whole."""
    model = Odd()
    plain = stepped_plain_optimizer(model)
    order = full_model_order(model)
    assert order == [["weight", "unused"], ["norm"]]
    assert [name for name, _ in model.named_parameters()] == ["norm", "weight", "frozen", "unused"]
    named = by_name(plain.state_dict(), order)
    assert set(named["state"]) == {"weight", "norm"}  # frozen and unused have none
    assert torch.equal(named["state"]["norm"]["exp_avg"], plain.state[model.norm]["exp_avg"])
    wholes = {name: Placement.whole(name, p.shape, ()) for name, p in model.named_parameters()}
    one = sharded_checkpoint.shard_of([(wholes[n], p.detach()) for n, p in model.named_parameters()],
                                      [(wholes[n], entry) for n, entry in named["state"].items()],
                                      named["groups"], order)
    reader = written(tmp_path / "one", [one])

    (first, first_optimizer), (second, second_optimizer) = (layout_rank(model, reader, half) for half in (0, 1))
    assert torch.equal(first_optimizer.state[first["weight"]]["exp_avg_sq"],
                       plain.state[model.weight]["exp_avg_sq"][:2])
    assert torch.equal(second_optimizer.state[second["norm"]]["exp_avg"], plain.state[model.norm]["exp_avg"][2:])
    assert first["unused"] not in first_optimizer.state
    assert float(first_optimizer.state[first["weight"]]["step"]) == 2

    # Saved by the two ranks, each its own boxes, and read back into a plain optimizer.
    two = written(tmp_path / "two", [rank_shard(model, pieces, rank_optimizer, half, order)
                                     for half, (pieces, rank_optimizer) in enumerate(((first, first_optimizer),
                                                                                       (second, second_optimizer)))])
    fresh = torch.optim.AdamW(optim.parameter_groups(model, weight_decay=0.1), lr=0.1)
    fresh.load_state_dict(two.optimizer_state_dict())
    weights = dict(two.weights())
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
    pieces = [piece.reshape(p.shape) for piece, p in
              zip(torch.cat([s["exp_avg"] for s in slices]).split([6, 12, 6]), (a, b, c))]
    assert torch.equal(pieces[0], entries[0]["exp_avg"]) and torch.equal(pieces[2], entries[2]["exp_avg"])
    assert torch.equal(pieces[1], torch.zeros(4, 3))  # a fresh optimizer's moments
    slices[0]["step"] += 1
    assert float(entries[2]["step"]) == 5  # the source's step counter is not shared
