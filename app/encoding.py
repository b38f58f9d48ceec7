"""Documents -> token arrays, by `data.workers` processes, in the order the documents came in.

Batches go out to a pool and come back through a queue of at most two per worker, read in the
order they were sent: the output never depends on which worker finishes first, and the memory
held is a few batches whatever the corpus size. Each worker runs the `tokenizers` Rust encoder
on one thread; one worker encodes in this process with the encoder's own threads instead.
"""
import multiprocessing
import os
from collections import deque
from typing import Iterable, Iterator, List, Tuple

import numpy as np

from app import cores

# In flight per worker: one being encoded and one waiting, so no worker idles between batches.
BATCHES_PER_WORKER = 2

_encoder = None


def _load_encoder(tokenizer_file: str, threads: int):
    # Rust's thread pool reads this once, at the first parallel call.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_file)


def _start_worker(tokenizer_file: str) -> None:
    global _encoder
    # One thread per worker: the workers are the parallelism. Read at every call, so this holds
    # even where the parent had started the encoder's thread pool before forking.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _encoder = _load_encoder(tokenizer_file, threads=1)


def encode(encoder, texts: List[str], eos_id: int, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Every text's tokens followed by eos, concatenated, and each text's token count (eos included)."""
    ids = [encoding.ids for encoding in encoder.encode_batch(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    tokens = np.full(int(lengths.sum()), eos_id, dtype=dtype)
    ends = np.cumsum(lengths) - 1
    for doc, end in zip(ids, ends):
        tokens[end - len(doc) : end] = doc
    return tokens, lengths


def _encode_in_worker(texts: List[str], eos_id: int, dtype):
    return encode(_encoder, texts, eos_id, dtype)


def encoded_batches(tokenizer_file: str, batches: Iterable[List[str]], eos_id: int, dtype,
                    workers: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) per batch of texts, in the batches' order."""
    if workers == 1:
        encoder = _load_encoder(tokenizer_file, threads=len(cores.affinity()))
        for texts in batches:
            yield encode(encoder, texts, eos_id, dtype)
        return
    # fork, not spawn: a spawned worker re-imports the launching module (app.prepare or
    # app.train: torch and transformers, 250+ MiB and seconds each). A forked one only encodes;
    # it never touches the parent's threads, MPI or the Rust pool (parallelism off, above).
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer_file,)) as pool:
        in_flight = deque()
        for texts in batches:
            in_flight.append(pool.apply_async(_encode_in_worker, (texts, eos_id, dtype)))
            if len(in_flight) >= BATCHES_PER_WORKER * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
