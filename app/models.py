"""Hugging Face models built from our presets (no hub), and the one place that counts their
parameters and training FLOPs. Knows nothing of Horovod."""
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from app import checkpoint

log = logging.getLogger("app.models")


def llama_config(model_cfg, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_seq_len,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.norm_eps,
        attention_dropout=model_cfg.dropout,
        tie_word_embeddings=model_cfg.tie_embeddings,
        initializer_range=model_cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def resolve_vocab_size(model_cfg, tokenizer_vocab: int) -> int:
    if model_cfg.vocab_size is None:
        return tokenizer_vocab
    if model_cfg.vocab_size < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            "leave model.vocab_size unset (null) to follow the tokenizer"
        )
    return model_cfg.vocab_size


def init_source(init_from: str) -> str:
    """model.init_from: one of our run or checkpoint directories, or any local HF model directory."""
    path = Path(init_from)
    if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        found = checkpoint.find(init_from)
        checkpoint.verify(found)  # a damaged file is one line naming it, not a loader's traceback
        return str(found)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.init_from={init_from} is not a run, a checkpoint or a Hugging Face model directory")
    return str(path)


@dataclass(frozen=True)
class Architecture:
    """A model to build: its class and transformers config, the preset's or model.init_from's
    (whose weights `build` then loads)."""
    model_class: type
    config: transformers.PretrainedConfig
    init_from: Optional[str] = None  # a verified source (init_source)
    loading: dict = field(default_factory=dict)  # from_pretrained's loading arguments

    def build(self) -> torch.nn.Module:
        """The model on the default device: model.init_from's weights, else transformers'
        initialisation of the config (the meta device gives shapes without storage)."""
        if self.init_from is None:
            return self.model_class(self.config)
        return load_pretrained(self.model_class, self.config, self.init_from, self.loading)

    def shapes(self) -> torch.nn.Module:
        """Every tensor on the meta device, nothing loaded: the model's shapes, whatever its
        size, for counting and planning."""
        with torch.device("meta"):
            return self.model_class(self.config)


def pretrained(model_class, init_from: str, **extra) -> Architecture:
    """model.init_from's architecture; `extra` are from_pretrained's arguments (config ones like
    num_labels go to the config, the rest to loading)."""
    source = init_source(init_from)
    config, loading = transformers.AutoConfig.from_pretrained(source, return_unused_kwargs=True, **extra)
    return Architecture(model_class, config, source, loading)


def load_pretrained(model_class, config, source: str, loading: dict):
    """The source's weights in float32, whatever dtype they were saved in: under transformers 5
    a bf16 checkpoint (most published LLaMAs) would otherwise stay bf16, which Horovod's
    collectives refuse and which would train with bf16 optimizer state."""
    # Our checkpoints' weights are boxes by rank, which transformers cannot read: assembled here.
    state_dict = checkpoint.read_weights(Path(source)) if checkpoint.is_sharded(Path(source)) else None
    model = model_class.from_pretrained(None if state_dict is not None else source, config=config,
                                        state_dict=state_dict, dtype=torch.float32, **loading)
    log.info("model.init_from: %s loaded from %s (%s parameters, float32)", model_class.__name__, source,
             f"{count_parameters(model):,}")
    return model


def causal_lm(model_cfg, vocab_size: int) -> Architecture:
    if model_cfg.init_from:
        return pretrained(LlamaForCausalLM, model_cfg.init_from)
    config = llama_config(model_cfg, resolve_vocab_size(model_cfg, vocab_size))
    # sdpa is the fused attention kernel; eager would materialise the T x T matrix in Python ops.
    config._attn_implementation = "sdpa"
    return Architecture(LlamaForCausalLM, config)


def build_causal_lm(model_cfg, vocab_size: int) -> LlamaForCausalLM:
    return causal_lm(model_cfg, vocab_size).build()


def bert_config(model_cfg, vocab_size: int, pad_token_id: int, num_labels: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_seq_len,
        hidden_dropout_prob=model_cfg.dropout,
        attention_probs_dropout_prob=model_cfg.dropout,
        layer_norm_eps=model_cfg.norm_eps,
        initializer_range=model_cfg.init_std,
        pad_token_id=pad_token_id,
        num_labels=num_labels,
    )


def encoder(model_cfg, vocab_size: int, pad_token_id: int, task: str, num_labels: int = 2) -> Architecture:
    """BertForSequenceClassification (task=classify) or BertForMaskedLM (task=mlm). From an
    MLM checkpoint, a classifier keeps the encoder and starts a fresh classification head."""
    model_class = BertForSequenceClassification if task == "classify" else BertForMaskedLM
    if model_cfg.init_from:
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if task == "classify" else {}
        return pretrained(model_class, model_cfg.init_from, **extra)
    config = bert_config(model_cfg, resolve_vocab_size(model_cfg, vocab_size), pad_token_id, num_labels)
    config._attn_implementation = "sdpa"
    return Architecture(model_class, config)


def build_encoder(model_cfg, vocab_size: int, pad_token_id: int, task: str, num_labels: int = 2):
    return encoder(model_cfg, vocab_size, pad_token_id, task, num_labels).build()


def causal_lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets are the inputs shifted by one (data.py)."""
    return logits_loss(model)(model(input_ids=inputs).logits, targets)


def logits_loss(model):
    """The cross-entropy of this model's logits, called as token_cross_entropy is. A model whose
    logits are split across ranks carries the loss that reads them (app/parallel/tensor.py
    attaches it), so a task computes its loss without knowing the layout."""
    return getattr(model, "logits_cross_entropy", token_cross_entropy)


def predicted_tokens(model, logits: torch.Tensor) -> torch.Tensor:
    """Each position's most likely token, over the whole vocabulary also where a layout split the
    logits across ranks."""
    own = getattr(model, "logits_cross_entropy", None)
    return logits.argmax(-1) if own is None else own.predictions(logits)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                        ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of each position's logits against its target, F.cross_entropy's arguments."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction=reduction,
                           ignore_index=ignore_index)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of causal_lm_loss from the logits, for a pipeline's last stage that has only them."""
    return token_cross_entropy(logits, targets)


def count_parameters(model: torch.nn.Module, include_embeddings: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    # A tied embedding is also the output projection, a real matmul: keep it counted.
    output = model.get_output_embeddings()  # None for a classifier
    tied = output is not None and output.weight is embedding
    if include_embeddings or tied:
        return total
    return total - embedding.numel()


def parameter_checksum(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all ranks exactly when replicas agree."""
    digest = hashlib.sha256()
    add_to_checksum(digest, model.named_parameters())
    return digest.hexdigest()[:16]


def add_to_checksum(digest, named_parameters) -> None:
    """Feed (name, parameter) pairs to a running hash, for callers that hold a part at a time."""
    for name, param in named_parameters:
        digest.update(name.encode())
        # A copy: numpy() pins a storage's size for good, and ZeRO frees storages by resizing them.
        digest.update(param.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())


def flops_per_token(model: torch.nn.Module, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B / nanoGPT's estimate_mfu:
    6N for the weight matmuls (forward 2N, backward 4N) plus 12*L*d*T for attention scores
    (QK^T and AV, forward and backward; L layers, d = heads x head_dim, T tokens of context).
    The input embedding is a lookup, not a matmul, so it is left out of N."""
    n = count_parameters(model, include_embeddings=False)
    return 6 * n + 12 * num_layers * hidden_size * seq_len

