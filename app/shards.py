"""Token shards, written as documents stream in, resumable after a kill.

A split is one token stream (each document's tokens, then end-of-text) cut into files of
`data.shard_tokens` tokens, the last one shorter: {split}_00000.bin, ... Cutting at a token
count, not at a document boundary, makes the shards' concatenation the exact stream one file
would hold, so training reads the same samples either way. Each shard has a small index,
{split}_00000.idx.npy: the offsets in the shard at which documents begin.

A shard is written to a temporary name and renamed, then the split's progress (shards done,
the first document not wholly inside them and how many of its tokens they hold) is saved: a
killed preparation continues from there, and no reader ever meets half a shard.
"""
import io
from pathlib import Path
from typing import Callable

import numpy as np

from app import fileio


def fresh_progress() -> dict:
    return {"shards": [], "next_document": 0, "skip_tokens": 0, "text_bytes": 0, "done": False}


def shard_stem(split: str, number: int) -> str:
    return f"{split}_{number:05d}"


class ShardWriter:
    """Documents' tokens in, shards out; `progress` (resumed or fresh) says where to start."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype, progress: dict,
                 save_progress: Callable[[dict], None]):
        self.directory, self.split = Path(directory), split
        self.progress, self.save_progress = progress, save_progress
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.document_starts = []
        # The document add() meets next, and the tokens of it that earlier shards already hold.
        self.document = progress["next_document"]
        self.skip_tokens = progress["skip_tokens"]
        self.text_bytes = progress["text_bytes"]

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes) -> None:
        """Documents in order: their tokens concatenated, each one's token count and text size."""
        ends = np.cumsum(lengths)
        for end, length, size in zip(ends, lengths, text_bytes):
            remaining = tokens[end - length : end]
            if self.skip_tokens:  # resumed inside this document: it began in an earlier shard
                remaining, written, self.skip_tokens = remaining[self.skip_tokens :], self.skip_tokens, 0
            else:
                self.document_starts.append(self.filled)
                written = 0
            while remaining.size:
                take = min(remaining.size, self.buffer.size - self.filled)
                self.buffer[self.filled : self.filled + take] = remaining[:take]
                self.filled, remaining, written = self.filled + take, remaining[take:], written + take
                if self.filled == self.buffer.size:
                    if remaining.size:
                        self._write_shard(self.document, written, self.text_bytes)
                    else:
                        self._write_shard(self.document + 1, 0, self.text_bytes + int(size))
            self.document += 1
            self.text_bytes += int(size)

    def finish(self) -> dict:
        """The last, shorter shard; returns the split's final progress."""
        if self.filled:
            self._write_shard(self.document, 0, self.text_bytes, done=True)
        else:
            self.progress["done"] = True
            self.save_progress(self.progress)
        return self.progress

    def _write_shard(self, next_document: int, skip_tokens: int, text_bytes: int, done: bool = False) -> None:
        stem = shard_stem(self.split, len(self.progress["shards"]))
        index = io.BytesIO()
        np.save(index, np.asarray(self.document_starts, dtype=np.int64))
        fileio.write_bytes(self.directory / f"{stem}.idx.npy", index.getvalue())
        fileio.write_bytes(self.directory / f"{stem}.bin", memoryview(self.buffer[: self.filled]))
        self.progress["shards"].append({"file": f"{stem}.bin", "tokens": self.filled})
        self.progress.update(next_document=next_document, skip_tokens=skip_tokens, text_bytes=text_bytes, done=done)
        self.save_progress(self.progress)
        self.filled, self.document_starts = 0, []
