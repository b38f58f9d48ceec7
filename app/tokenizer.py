"""Tokenizers trained locally with HF `tokenizers` and saved as a transformers tokenizer
directory, so `AutoTokenizer.from_pretrained(dir)` loads them with no project code."""
import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE as GPT-2 and LLaMA-3 use: any byte sequence round-trips, no [UNK]."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
    )


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT's uncased WordPiece with [CLS] text [SEP] framing."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=True)


def train(kind: str, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size)
    raise ValueError(f"data.tokenizer_kind={kind!r} is not one of bpe, wordpiece")


def load(directory: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    if not (Path(directory) / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {directory}; run `python -m app.prepare` first or fix data.tokenizer_path"
        )
    return AutoTokenizer.from_pretrained(directory)


def fingerprint(directory: str) -> str:
    """A hash of tokenizer.json: checkpoints record it so a mismatched tokenizer is refused."""
    return hashlib.sha256((Path(directory) / "tokenizer.json").read_bytes()).hexdigest()[:16]
