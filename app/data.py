"""Token windows for causal-LM training, read from the token shards prepare.py writes (or the
one {split}.bin file of datasets prepared before shards existed).

The training stream is one global sequence of samples, fixed by the seed alone: sample i is
window perm_e[i mod n] of epoch e = i div n, each epoch a fresh permutation of the
non-overlapping windows (shifted by a per-epoch offset so window boundaries move). At
optimizer step s, the global batch is samples [s*G, (s+1)*G) with G = ranks x accumulation x
micro-batch, and rank r takes its own contiguous slice. So ranks never see the same sample,
the stream is the same whatever the number of ranks (resuming on a different world size just
continues it), and 2 ranks with batch b see exactly what 1 rank with batch 2b sees.
"""
from functools import lru_cache
from pathlib import Path
from typing import List

import numpy as np
import torch


class ShardedTokens:
    """A split's shards read as one token array: len() and slices that may cross shard ends.
    Each shard is its own memmap, so no single file has to hold the dataset."""

    def __init__(self, paths: List[Path], dtype: str):
        self.shards = [np.memmap(path, dtype=np.dtype(dtype), mode="r") for path in paths]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(len(self))
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self.starts[first]
            piece = self.shards[first][offset : offset + stop - start]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return np.concatenate(pieces) if pieces else self.shards[0][:0]


def split_tokens(data_dir, meta: dict, split: str):
    """The tokens of a prepared split: its shards, or the single file of an older dataset."""
    data_dir = Path(data_dir)
    if "shards" not in meta:
        return np.memmap(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    return ShardedTokens([data_dir / shard["file"] for shard in meta["shards"][split]], meta["dtype"])


class TokenWindows:
    def __init__(self, tokens, seq_len: int, seed: int, name: str = "the split"):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        # Each window needs seq_len + 1 tokens (inputs and shifted targets) plus room to shift.
        self.windows_per_epoch = (len(self.tokens) - 1 - seq_len) // seq_len
        if self.windows_per_epoch < 1:
            raise ValueError(
                f"{name} has {len(self.tokens)} tokens, too few for train.seq_len={seq_len}; "
                "use more text or a shorter sequence"
            )

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.windows_per_epoch), int(rng.integers(self.seq_len))

    def window_starts(self, first_sample: int, count: int) -> np.ndarray:
        samples = np.arange(first_sample, first_sample + count)
        starts = np.empty(count, dtype=np.int64)
        for epoch in np.unique(samples // self.windows_per_epoch):
            perm, shift = self._epoch(int(epoch))
            mask = samples // self.windows_per_epoch == epoch
            starts[mask] = shift + perm[samples[mask] % self.windows_per_epoch] * self.seq_len
        return starts

    def batch(self, first_sample: int, count: int):
        """Inputs and next-token targets for samples [first_sample, first_sample + count)."""
        starts = self.window_starts(first_sample, count)
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class RankStream:
    """The slice of the global sample stream that one rank trains on, step by step."""

    def __init__(self, windows: TokenWindows, rank: int, world: int, micro_batch: int, accum_steps: int):
        self.windows = windows
        self.rank = rank
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.per_rank = micro_batch * accum_steps
        self.global_batch = self.per_rank * world

    def samples_at(self, samples_before: int, micro_step: int) -> range:
        """The global sample indices of micro-batch `micro_step` of the step whose global batch
        starts at `samples_before`: this rank's slice."""
        first = samples_before + self.rank * self.per_rank + micro_step * self.micro_batch
        return range(first, first + self.micro_batch)

    def micro_batch_at(self, samples_before: int, micro_step: int):
        """Micro-batch `micro_step` of the step whose global batch starts at `samples_before`."""
        samples = self.samples_at(samples_before, micro_step)
        return self.windows.batch(samples.start, len(samples))


def evaluation_batches(windows: TokenWindows, rank: int, world: int, batch_size: int, total_windows: int):
    """The first `total_windows` windows of the fixed epoch-0 order, in batches dealt
    round-robin to ranks; the last batch may be short, so no window is dropped or repeated."""
    total_windows = min(total_windows, windows.windows_per_epoch)
    for first in range(rank * batch_size, total_windows, world * batch_size):
        yield windows.batch(first, min(batch_size, total_windows - first))
