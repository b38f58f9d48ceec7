"""BERT tasks on labelled passages: sequence classification and masked-language pretraining."""
from pathlib import Path

import numpy as np
import torch

from app import classification_metrics, data, dist, labelled_data, models, prepare


class EncoderTask:
    def __init__(self, cfg, rank: int, world: int, split: str = "val"):
        self.cfg = cfg
        self.rank, self.world = rank, world
        meta = prepare.read_meta(cfg.data.dir)
        self.labels = meta["labels"]
        self.vocab_size = meta["vocab_size"]
        self.pad_token_id = meta["pad_token_id"]
        self.tokenizer_sha256 = meta["tokenizer_sha256"]
        directory = Path(cfg.data.dir)
        train = labelled_data.Passages(directory, "train", self.pad_token_id)
        self.eval_passages = labelled_data.Passages(directory, split, self.pad_token_id)
        self.stream = data.RankStream(labelled_data.ShuffledPassages(train, cfg.train.seed), rank, world,
                                      cfg.train.micro_batch_size, cfg.train.grad_accum_steps)

    def flops_per_token(self, model) -> float:
        return models.flops_per_token(model, self.cfg.model.num_layers, self.cfg.model.hidden_size,
                                      self.cfg.data.max_tokens)

    def micro_batch(self, samples_before: int, micro_step: int) -> dict:
        return self.stream.micro_batch_at(samples_before, micro_step)

    @staticmethod
    def tokens_in(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def my_eval_batches(self, batch_size: int, max_batches: int):
        """Rank r evaluates passages r, r + world, ...: shards may differ by one passage, and
        no collective runs inside the loop, so an uneven shard cannot leave a rank waiting."""
        limit = min(len(self.eval_passages), max_batches * batch_size) if max_batches else len(self.eval_passages)
        mine = list(range(self.rank, limit, self.world))
        for start in range(0, len(mine), batch_size):
            yield self.eval_passages.collate(mine[start : start + batch_size])

    def finish(self, model, run_dir, logger, log) -> None:
        pass


class Classify(EncoderTask):
    def build_model(self):
        return models.build_encoder(self.cfg.model, self.vocab_size, self.pad_token_id, "classify",
                                    self.cfg.model.num_labels or len(self.labels))

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    @torch.no_grad()
    def evaluate(self, model, device, precision_ctx, batch_size: int, max_batches: int, logger=None, step: int = 0):
        was_training = model.training
        model.eval()
        k = len(self.labels)
        matrix = np.zeros((k, k), dtype=np.int64)
        loss_sum = 0.0
        for batch in self.my_eval_batches(batch_size, max_batches):
            batch = {key: value.to(device) for key, value in batch.items()}
            with precision_ctx:
                output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss_sum += output.loss.item() * len(batch["labels"])
            matrix += classification_metrics.confusion_matrix(
                batch["labels"].cpu().numpy(), output.logits.argmax(-1).cpu().numpy(), k
            )
        model.train(was_training)
        # Counts are summed, so the metrics are those of the whole set, not a mean of rank means.
        summed = dist.sum_over_ranks(torch.tensor([*matrix.flatten(), loss_sum], dtype=torch.float64), name="eval_cls")
        matrix = summed[:-1].numpy().round().astype(np.int64).reshape(k, k)
        result = {f"val/{key}": value for key, value in classification_metrics.summarize(matrix, self.labels).items()}
        result.update({"val/loss": summed[-1].item() / matrix.sum(), "val/examples": int(matrix.sum()),
                       "val/confusion_matrix": matrix.tolist()})
        if logger is not None:
            logger.image("val/confusion_matrix", classification_metrics.confusion_image(matrix, self.labels), step)
        return result


def mask_tokens(input_ids, attention_mask, special_ids, mask_id: int, vocab_size: int, probability: float,
                generator: torch.Generator):
    """BERT's masking: choose `probability` of the real tokens; of those 80% become [MASK], 10% a
    random token and 10% stay. Labels are -100 (ignored) everywhere else."""
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    draw = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (draw < 0.8)] = mask_id
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[swap] = random_tokens[swap]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return inputs, labels


class MaskedLM(EncoderTask):
    def __init__(self, cfg, rank: int, world: int, split: str = "val"):
        super().__init__(cfg, rank, world, split)
        from app import tokenizer

        tok = tokenizer.load(cfg.data.dir)
        self.mask_id = tok.mask_token_id
        self.special_ids = torch.tensor(tok.all_special_ids)

    def build_model(self):
        return models.build_encoder(self.cfg.model, self.vocab_size, self.pad_token_id, "mlm")

    def _masked(self, batch: dict, seed: int) -> dict:
        # Seeded by the batch's place in the global stream: the same masks on any world size.
        generator = torch.Generator().manual_seed(seed)
        inputs, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.special_ids, self.mask_id,
                                     self.vocab_size, self.cfg.train.mlm_probability, generator)
        return {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels}

    def micro_batch(self, samples_before: int, micro_step: int) -> dict:
        batch = super().micro_batch(samples_before, micro_step)
        return self._masked(batch, self.cfg.train.seed * 1_000_003 + batch["first_sample"])

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model, device, precision_ctx, batch_size: int, max_batches: int, logger=None, step: int = 0):
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, masked tokens, correct predictions
        for index, batch in enumerate(self.my_eval_batches(batch_size, max_batches)):
            batch = self._masked(batch, seed=index * self.world + self.rank)
            batch = {key: value.to(device) for key, value in batch.items()}
            with precision_ctx:
                output = model(**batch)
            masked = batch["labels"] != -100
            n = int(masked.sum())
            correct = int((output.logits.argmax(-1)[masked] == batch["labels"][masked]).sum())
            totals += torch.tensor([output.loss.item() * n, n, correct], dtype=torch.float64)
        model.train(was_training)
        totals = dist.sum_over_ranks(totals, name="eval_mlm")
        loss = (totals[0] / totals[1]).item()
        return {"val/loss": loss, "val/perplexity": float(np.exp(loss)),
                "val/masked_accuracy": (totals[2] / totals[1]).item(), "val/masked_tokens": int(totals[1])}
