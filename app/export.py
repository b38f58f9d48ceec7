"""Export a checkpoint as a Hugging Face directory that plain transformers loads.

    python -m app.export checkpoint=runs/2026-11-22_05-10-00 out=exported/shakespeare-14m
    # then, with no project code:
    #   AutoModelForCausalLM.from_pretrained("exported/shakespeare-14m")
    #   AutoTokenizer.from_pretrained("exported/shakespeare-14m")

The weights stream from the checkpoint into Hugging Face's sharded format, one tensor read and
one output shard held at a time, so no process ever holds the whole model:
    model-00001-of-00003.safetensors ... + model.safetensors.index.json
or, when everything fits in one shard, a plain model.safetensors with no index, as
save_pretrained writes them.
"""
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
import transformers
from safetensors.torch import save_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from app import checkpoint, cli, config, fileio, tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Decimal units, as transformers and huggingface_hub read "5GB".
SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*$", re.IGNORECASE)


def shard_file_name(number: int, count: int) -> str:
    """The pattern save_pretrained gives huggingface_hub's splitter: model-00001-of-00003.safetensors."""
    return SAFE_WEIGHTS_NAME.replace(".safetensors", f"-{number:05d}-of-{count:05d}.safetensors")


def max_shard_bytes(value: str) -> int:
    """max_shard_size as transformers reads it: bytes, or a number with KB, MB, GB or TB."""
    match = SIZE.match(str(value))
    size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()]) if match else 0
    if size <= 0:
        raise config.ConfigError(f"max_shard_size={value!r} is not a size; give bytes (500000000) or a number "
                                 "with a unit, as transformers takes it (5GB, 500MB)")
    return size


class ShardWriter:
    """huggingface_hub's split_state_dict_into_shards_factory, streamed: tensors fill a shard in
    the order they come until the next would push it past the limit; a tensor over the limit
    alone gets a shard of its own at once. Shards are numbered in the order they are written,
    as that function numbers them, and renamed once their count is known."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.written: List[List[str]] = []  # each written shard's tensor names
        self.open: Dict[str, torch.Tensor] = {}
        self.open_bytes = self.total_bytes = self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.total_bytes += size
        self.total_parameters += tensor.numel()
        if size > self.max_bytes:
            self.write({name: tensor})
            return
        if self.open_bytes + size > self.max_bytes:
            self.write(self.open)
            self.open, self.open_bytes = {}, 0
        self.open[name] = tensor
        self.open_bytes += size

    def unnamed(self, number: int) -> Path:
        return self.directory / f".shard-{number}.tmp"

    def write(self, tensors: Dict[str, torch.Tensor]) -> None:
        # {"format": "pt"} as save_pretrained writes: transformers reads other formats differently.
        save_file(tensors, str(self.unnamed(len(self.written) + 1)), metadata={"format": "pt"})
        self.written.append(list(tensors))

    def finish(self) -> None:
        """Write the open shard, give every shard its final name, and write the index if several."""
        if self.open:
            self.write(self.open)
            self.open = {}
        count = len(self.written)
        names = [SAFE_WEIGHTS_NAME] if count == 1 else [shard_file_name(n, count) for n in range(1, count + 1)]
        for number, name in enumerate(names, start=1):
            os.replace(self.unnamed(number), self.directory / name)
        if count > 1:
            weight_map = {tensor: name for name, tensors in zip(names, self.written) for tensor in tensors}
            metadata = {"total_parameters": self.total_parameters, "total_size": self.total_bytes}
            fileio.write_json(self.directory / SAFE_WEIGHTS_INDEX_NAME, {"metadata": metadata, "weight_map": weight_map})


def converted(tensors: Iterable[Tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterable[Tuple[str, torch.Tensor]]:
    """Each floating-point tensor in `dtype`, as model.to(dtype) would leave it, one at a time."""
    for name, tensor in tensors:
        yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def write_configs(found: Path, staging: Path, dtype_name: str) -> None:
    """config.json and, for a model that generates, generation_config.json, as save_pretrained
    writes them for a model of this dtype."""
    model_class, model_config = checkpoint.trained_model_class(found)
    model_config.dtype = dtype_name
    model_config.architectures = [model_class.__name__]
    model_config.save_pretrained(staging)
    if model_class.can_generate():
        transformers.GenerationConfig.from_model_config(model_config).save_pretrained(staging)


def validate(cfg) -> None:
    if cfg.dtype not in DTYPES:
        raise config.ConfigError(f"dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    max_shard_bytes(cfg.max_shard_size)


def export(cfg) -> None:
    validate(cfg)
    found = checkpoint.find(cfg.checkpoint)
    with fileio.staged_directory(cfg.out) as staging:
        writer = ShardWriter(staging, max_shard_bytes(cfg.max_shard_size))
        for name, tensor in converted(checkpoint.weights_one_at_a_time(found), DTYPES[cfg.dtype]):
            writer.add(name, tensor)
        writer.finish()
        write_configs(found, staging, cfg.dtype)
        tokenizer.load(checkpoint.tokenizer_dir(found)).save_pretrained(staging)
    print(f"exported {found} -> {cfg.out}")


def main() -> None:
    cli.run_tool(config.ExportConfig, export)


if __name__ == "__main__":
    main()
