"""BERT tasks on labelled passages: sequence classification and masked-language pretraining.

Both are world-size invariant: 2 ranks with micro-batch b train exactly as 1 rank with 2b.
Classification is so by itself (a mean over equal-sized rank batches is the global mean);
masked LM is made so here: a passage's masks depend only on its global sample index, and the
loss is normalised by the masked tokens of the whole global batch, not of each micro-batch.
"""
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from app import classification_metrics, data, dist, labelled_data, models, prepared, tokenizer

IGNORE = -100  # the label cross-entropy skips: every token not chosen for prediction


class EncoderTask:
    def __init__(self, cfg, rank: int, world: int, split: str = "val"):
        self.cfg = cfg
        self.rank, self.world = rank, world
        meta = prepared.read_meta(cfg.data.dir)
        self.labels = meta["labels"]
        self.vocab_size = meta["vocab_size"]
        self.pad_token_id = meta["pad_token_id"]
        self.tokenizer_sha256 = meta["tokenizer_sha256"]
        directory = Path(cfg.data.dir)
        self.train_samples = labelled_data.ShuffledPassages(
            labelled_data.Passages(directory, "train", self.pad_token_id), cfg.train.seed)
        self.eval_passages = labelled_data.Passages(directory, split, self.pad_token_id)
        # Seeded by the data, not the run: runs with other seeds are scored on the same passages.
        self.eval_order = self.eval_passages.stratified_order(cfg.data.seed)
        self.stream = self.rank_stream(self.train_samples)

    def rank_stream(self, samples) -> data.RankStream:
        """This rank's slices of the global batches drawn from `samples` (its `batch(first, count)`)."""
        return data.RankStream(samples, self.rank, self.world, self.cfg.train.micro_batch_size,
                               self.cfg.train.grad_accum_steps)

    def flops_per_token(self, model) -> float:
        return models.flops_per_token(model, self.cfg.model.num_layers, self.cfg.model.hidden_size,
                                      self.cfg.data.max_tokens)

    def micro_batch(self, samples_before: int, micro_step: int) -> dict:
        return self.stream.micro_batch_at(samples_before, micro_step)

    @staticmethod
    def tokens_in(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def my_eval_indices(self, share: Tuple[int, int], batch_size: int, max_batches: int):
        """Batches of passage indices for share (index, count). The evaluated set is the first
        max_batches * batch_size passages of the stratified order (all when 0), so every class
        is in it, whatever the number of ranks; share r takes its passages r, r + count, ...
        Shards may differ by one passage, and no collective runs inside the loop, so an
        uneven shard cannot leave a rank waiting."""
        limit = min(len(self.eval_order), max_batches * batch_size) if max_batches else len(self.eval_order)
        index, count = share
        mine = self.eval_order[index:limit:count].tolist()
        for start in range(0, len(mine), batch_size):
            yield mine[start : start + batch_size]

    @staticmethod
    def sum_over_shares(totals: torch.Tensor, share: Tuple[int, int], name: str) -> torch.Tensor:
        """Evaluation totals summed over the shares: the ranks that compute one share together
        (a tensor set, on the split model) each hold its totals whole, so they count once."""
        return dist.sum_over_ranks(totals, name=name) / (dist.size() // share[1])

    def finish(self, sampling_model, run_dir, logger, log) -> None:
        pass


class Classify(EncoderTask):
    def architecture(self) -> models.Architecture:
        return models.encoder(self.cfg.model, self.vocab_size, self.pad_token_id, "classify",
                                    self.cfg.model.num_labels or len(self.labels))

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    @torch.no_grad()
    def evaluate(self, model, share, device, precision_ctx, batch_size: int, max_batches: int, logger=None,
                 step: int = 0):
        was_training = model.training
        model.eval()
        k = len(self.labels)
        matrix = np.zeros((k, k), dtype=np.int64)
        loss_sum = 0.0
        for indices in self.my_eval_indices(share, batch_size, max_batches):
            batch = {key: value.to(device) for key, value in self.eval_passages.collate(indices).items()}
            with precision_ctx:
                output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss_sum += output.loss.item() * len(batch["labels"])
            matrix += classification_metrics.confusion_matrix(
                batch["labels"].cpu().numpy(), output.logits.argmax(-1).cpu().numpy(), k
            )
        model.train(was_training)
        # Counts are summed, so the metrics are those of the whole set, not a mean of rank means.
        summed = self.sum_over_shares(torch.tensor([*matrix.flatten(), loss_sum], dtype=torch.float64), share,
                                      "eval_cls")
        matrix = summed[:-1].numpy().round().astype(np.int64).reshape(k, k)
        result = {f"val/{key}": value for key, value in classification_metrics.summarize(matrix, self.labels).items()}
        result.update({"val/loss": summed[-1].item() / matrix.sum(), "val/examples": int(matrix.sum()),
                       "val/confusion_matrix": matrix.tolist()})
        if logger is not None:
            logger.image("val/confusion_matrix", classification_metrics.confusion_image(matrix, self.labels), step)
        return result


def mask_tokens(ids: np.ndarray, special_ids: np.ndarray, mask_id: int, vocab_size: int, probability: float,
                rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one passage: choose `probability` of its non-special tokens; of those
    80% become [MASK], 10% a random token and 10% stay. Labels are IGNORE everywhere else.
    Drawn over the passage's own length, so padding cannot change what is drawn."""
    chosen = (rng.random(len(ids)) < probability) & ~np.isin(ids, special_ids)
    draw = rng.random(len(ids))
    random_tokens = rng.integers(vocab_size, size=len(ids))
    inputs = ids.astype(np.int64)
    inputs[chosen & (draw < 0.8)] = mask_id
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[swap] = random_tokens[swap]
    labels = np.where(chosen, ids, IGNORE).astype(np.int64)
    return inputs, labels


# Generator streams, so a training sample and an eval passage of the same number never share masks.
TRAIN_STREAM, EVAL_STREAM = 0, 1


class Masker:
    """Masks a passage from a generator seeded by (seed, stream, index) alone: the index is a
    training sample's place in the global stream or an eval passage's place in its split, never
    a batch's or a rank's, so the masks are the same on any number of ranks and any batching."""

    def __init__(self, tok, vocab_size: int, probability: float):
        self.special_ids = np.array(tok.all_special_ids)
        self.mask_id = tok.mask_token_id
        self.vocab_size = vocab_size
        self.probability = probability

    def mask(self, ids: np.ndarray, seed: int, stream: int, index: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, stream, index])
        return mask_tokens(ids, self.special_ids, self.mask_id, self.vocab_size, self.probability, rng)

    @staticmethod
    def batch(passages: labelled_data.Passages, masked: List[Tuple[np.ndarray, np.ndarray]]) -> dict:
        batch = passages.padded([inputs for inputs, _ in masked])
        batch["labels"] = labelled_data.pad([labels for _, labels in masked], IGNORE)
        return batch


class MaskedSamples:
    """The training stream with every sample masked by its global index: what the rank stream
    slices for task=mlm, and what counts the masked tokens of a whole global batch."""

    def __init__(self, samples: labelled_data.ShuffledPassages, masker: Masker, seed: int):
        self.samples, self.masker, self.seed = samples, masker, seed

    def masked(self, first_sample: int, count: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        indices = self.samples.indices(first_sample, count)
        return [self.masker.mask(self.samples.passages.row(passage), self.seed, TRAIN_STREAM, first_sample + i)
                for i, passage in enumerate(indices)]

    def batch(self, first_sample: int, count: int) -> dict:
        return self.masker.batch(self.samples.passages, self.masked(first_sample, count))

    @lru_cache(maxsize=1)
    def masked_tokens(self, first_sample: int, count: int) -> int:
        """Tokens to predict in samples [first_sample, first_sample + count); cached, as every
        micro-batch of a step asks for its global batch's count."""
        return sum(int((labels != IGNORE).sum()) for _, labels in self.masked(first_sample, count))


class MaskedLM(EncoderTask):
    def __init__(self, cfg, rank: int, world: int, split: str = "val"):
        super().__init__(cfg, rank, world, split)
        self.masker = Masker(tokenizer.load(cfg.data.dir), self.vocab_size, cfg.train.mlm_probability)
        self.masked_samples = MaskedSamples(self.train_samples, self.masker, cfg.train.seed)
        self.stream = self.rank_stream(self.masked_samples)

    def architecture(self) -> models.Architecture:
        return models.encoder(self.cfg.model, self.vocab_size, self.pad_token_id, "mlm")

    def micro_batch(self, samples_before: int, micro_step: int) -> dict:
        """The rank's micro-batch, with the factor that turns its summed token losses into its
        share of the global batch's mean: Horovod averages gradients over W ranks and the loop
        divides by A accumulation steps, so the share is sum * W * A / N_global. Every rank
        counts N_global itself, as the masks depend only on the sample index."""
        batch = super().micro_batch(samples_before, micro_step)
        global_masked = self.masked_samples.masked_tokens(samples_before, self.stream.global_batch)
        scale = self.world * self.cfg.train.grad_accum_steps / max(global_masked, 1)
        batch["loss_scale"] = torch.tensor(scale, dtype=torch.float32)
        return batch

    @staticmethod
    def summed_loss(model, batch: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """The summed cross-entropy of the masked tokens (the vocabulary-parallel one when the
        layout split the decoder), and the model's logits."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return models.logits_loss(model)(logits, batch["labels"], reduction="sum", ignore_index=IGNORE), logits

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return MaskedLM.summed_loss(model, batch)[0] * batch["loss_scale"]

    def eval_batch(self, indices) -> dict:
        masked = [self.masker.mask(self.eval_passages.row(i), self.cfg.data.seed, EVAL_STREAM, i) for i in indices]
        return self.masker.batch(self.eval_passages, masked)

    @torch.no_grad()
    def evaluate(self, model, share, device, precision_ctx, batch_size: int, max_batches: int, logger=None,
                 step: int = 0):
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, masked tokens, correct predictions
        for indices in self.my_eval_indices(share, batch_size, max_batches):
            batch = {key: value.to(device) for key, value in self.eval_batch(indices).items()}
            with precision_ctx:
                loss_sum, logits = self.summed_loss(model, batch)
            masked = batch["labels"] != IGNORE
            correct = (models.predicted_tokens(model, logits)[masked] == batch["labels"][masked]).sum()
            totals += torch.tensor([loss_sum.item(), masked.sum().item(), correct.item()], dtype=torch.float64)
        model.train(was_training)
        totals = self.sum_over_shares(totals, share, "eval_mlm")
        loss = (totals[0] / totals[1]).item()
        return {"val/loss": loss, "val/perplexity": float(np.exp(loss)),
                "val/masked_accuracy": (totals[2] / totals[1]).item(), "val/masked_tokens": int(totals[1])}
