"""The sample stream: disjoint across ranks, identical whatever the world size, deterministic."""
import json

import numpy as np

from app import data
from conftest import run_worker


def _flatten(rank_record):
    return [s for _step, _micro, starts in rank_record["starts"] for s in starts]


def test_two_ranks_draw_disjoint_windows_that_together_equal_the_one_rank_stream(tiny_data, tmp_path):
    out = tmp_path / "starts.json"
    run_worker("rank_samples.py", [tiny_data, out, 5], np_=2)
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    rank0, rank1 = _flatten(ranks[0]), _flatten(ranks[1])
    assert len(rank0) == len(rank1) == 5 * 2 * 3
    assert not set(rank0) & set(rank1), "ranks trained on the same window"

    meta = json.loads((tiny_data / "meta.json").read_text())
    windows = data.TokenWindows(data.split_tokens(tiny_data, meta, "train"), seq_len=32, seed=7)
    one_rank = windows.window_starts(0, 5 * 12)
    assert sorted(rank0 + rank1) == sorted(one_rank.tolist())


def test_stream_is_a_permutation_per_epoch_and_repeats_with_the_seed(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    windows = data.TokenWindows(data.split_tokens(tiny_data, meta, "train"), seq_len=64, seed=3)
    n = windows.windows_per_epoch
    epoch0 = windows.window_starts(0, n)
    assert len(set(epoch0.tolist())) == n  # no window twice within an epoch
    assert np.diff(np.sort(epoch0)).min() == 64  # non-overlapping
    epoch1 = windows.window_starts(n, n)
    assert not np.array_equal(epoch0, epoch1)  # reshuffled (and shifted) next epoch
    again = data.TokenWindows(data.split_tokens(tiny_data, meta, "train"), seq_len=64, seed=3)
    assert np.array_equal(again.window_starts(5, 50), windows.window_starts(5, 50))
    other_seed = data.TokenWindows(data.split_tokens(tiny_data, meta, "train"), seq_len=64, seed=4)
    assert not np.array_equal(other_seed.window_starts(0, 50), windows.window_starts(0, 50))


def test_targets_are_inputs_shifted_by_one(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    windows = data.TokenWindows(data.split_tokens(tiny_data, meta, "train"), seq_len=16, seed=0)
    inputs, targets = windows.batch(0, 4)
    assert inputs.shape == targets.shape == (4, 16)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
