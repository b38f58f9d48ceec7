"""What is trained: each task owns its data stream, model, loss and evaluation, so the loop
in app/train.py is the same for a LLaMA decoder and a BERT encoder."""
from pathlib import Path
from typing import Protocol, Tuple

import torch

from app.data import RankStream
from app.models import Architecture
from app.tasks.clm import CausalLM
from app.tasks.encoder import Classify, MaskedLM


class Task(Protocol):
    stream: RankStream  # this rank's slice of the global sample stream
    tokenizer_sha256: str  # checkpoints refuse to resume with another tokenizer

    def architecture(self) -> Architecture:
        """The plain Hugging Face model to build; parallelism is applied from outside (app/parallel)."""

    def flops_per_token(self, model: torch.nn.Module) -> float:
        """Training FLOPs per token, for MFU."""

    def micro_batch(self, samples_before: int, micro_step: int) -> dict:
        """Tensors of micro-batch `micro_step` of the step whose global batch starts at `samples_before`."""

    def tokens_in(self, batch: dict) -> int:
        """Real (unpadded) tokens in a micro-batch, for throughput."""

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The micro-batch's loss; its mean over ranks and micro-batches is the global batch's loss."""

    def evaluate(self, model, share: Tuple[int, int], device, precision_ctx, batch_size: int, max_batches: int,
                 logger=None, step: int = 0) -> dict:
        """Validation metrics over the whole split (a collective), this rank computing share
        (index, count) of its batches; ranks given the same share (a tensor group's) compute it
        together."""

    def finish(self, sampling_model, run_dir: Path, logger, log) -> None:
        """Anything the task does once training ends (a generated sample); `sampling_model()`
        gives a context holding the model to run (the whole model, or at ZeRO-3 the sharded one,
        gathering layer by layer), a collective that every rank must enter or none."""


TASKS = {"clm": CausalLM, "classify": Classify, "mlm": MaskedLM}


def build(cfg, rank: int, world: int, split: str = "val") -> Task:
    """The task of cfg.task, evaluating on `split` of the prepared data."""
    return TASKS[cfg.task](cfg, rank, world, split)
