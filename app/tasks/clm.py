"""Causal language modelling on token windows (LLaMA pretraining)."""
import math
from pathlib import Path
from typing import Tuple

import torch

from app import checkpoint, data, dist, models, prepared, tokenizer
from app.generate import generate_text


@torch.no_grad()
def mean_loss(model, windows, share: Tuple[int, int], batch_size: int, total_windows: int, device,
              precision_ctx) -> float:
    """Token-weighted mean loss over the windows, summed over ranks (not a mean of means). Ranks
    that compute one share together each count it, which scales both sums alike."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs, targets in data.evaluation_batches(windows, *share, batch_size, total_windows):
        with precision_ctx:
            loss = models.causal_lm_loss(model, inputs.to(device), targets.to(device))
        totals += torch.tensor([loss.item() * targets.numel(), targets.numel()], dtype=torch.float64)
    model.train(was_training)
    totals = dist.sum_over_ranks(totals, name="eval_loss")
    return (totals[0] / totals[1]).item()


class CausalLM:
    def __init__(self, cfg, rank: int, world: int, split: str = "val"):
        self.cfg = cfg
        meta = prepared.read_meta(cfg.data.dir)
        self.vocab_size = meta["vocab_size"]
        self.tokenizer_sha256 = meta["tokenizer_sha256"]
        self.seq_len = cfg.train.seq_len or cfg.model.max_seq_len
        train = data.TokenWindows(data.split_tokens(cfg.data.dir, meta, "train"), self.seq_len, cfg.train.seed, "train")
        self.eval_windows = data.TokenWindows(data.split_tokens(cfg.data.dir, meta, split), self.seq_len,
                                              cfg.train.seed, split)
        self.stream = data.RankStream(train, rank, world, cfg.train.micro_batch_size, cfg.train.grad_accum_steps)

    def architecture(self) -> models.Architecture:
        return models.causal_lm(self.cfg.model, self.vocab_size)

    def flops_per_token(self, model) -> float:
        return models.flops_per_token(model, self.cfg.model.num_layers, self.cfg.model.hidden_size, self.seq_len)

    def micro_batch(self, samples_before: int, micro_step: int) -> dict:
        inputs, targets = self.stream.micro_batch_at(samples_before, micro_step)
        return {"input_ids": inputs, "targets": targets}

    @staticmethod
    def tokens_in(batch: dict) -> int:
        return batch["input_ids"].numel()

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return models.causal_lm_loss(model, batch["input_ids"], batch["targets"])

    def evaluate(self, model, share, device, precision_ctx, batch_size: int, max_batches: int, logger=None,
                 step: int = 0):
        total = max_batches * batch_size if max_batches else self.eval_windows.windows_per_epoch
        loss = mean_loss(model, self.eval_windows, share, batch_size, total, device, precision_ctx)
        return {"val/loss": loss, "val/perplexity": math.exp(loss),
                "val/windows": min(total, self.eval_windows.windows_per_epoch)}

    def finish(self, sampling_model, run_dir: Path, logger, log) -> None:
        """A sample from the trained model, printed and logged by rank 0. `sampling_model()` is a
        collective on sharded layouts: every rank enters it, and only when a sample is asked for.
        Every rank generates the same sample (the same seed): at ZeRO-3 each forward gathers the
        layers, a collective that every rank must run as often."""
        train_cfg = self.cfg.train
        if train_cfg.sample_tokens <= 0:
            return
        with sampling_model() as model:
            tok = tokenizer.load(checkpoint.run_tokenizer_dir(run_dir))
            sample = generate_text(model, tok, train_cfg.sample_prompt, train_cfg.sample_tokens,
                                   train_cfg.sample_temperature, train_cfg.sample_top_k, seed=train_cfg.seed)
        if not dist.is_main():
            return
        log.info("sample:\n%s", sample)
        logger.text("sample", sample)
