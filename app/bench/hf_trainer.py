"""The peer most users know: Hugging Face's `transformers.Trainer` on the trainer's own model
(app/models.py), token windows (the same global sample order) and batch, one process, fused
AdamW, bf16 autocast when asked, optionally `torch_compile=True`; no evaluation, saving or
logging, so only its training step is timed.

    python -m app.bench.hf_trainer SPEC.json

The loss is the trainer's: the model gets the already shifted targets as `shift_labels`, so
every window's T tokens are predicted, as in app/models.py causal_lm_loss."""
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from app import cli, cores, data, fileio, models, prepared
from app.bench import launch


class StreamSamples(Dataset):
    """Sample i of the trainer's global stream (app/data.py), as one dict per window."""

    def __init__(self, windows: data.TokenWindows, count: int):
        self.windows, self.count = windows, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        inputs, targets = self.windows.batch(index, 1)
        return {"input_ids": inputs[0], "labels": targets[0], "shift_labels": targets[0]}


class InOrderTrainer(Trainer):
    """Trainer reading the samples in stream order (its default sampler shuffles), so both sides
    train on the same windows step by step."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class StepClock(TrainerCallback):
    """Wall time from the end of the last warm-up step to the end of the last step, and the
    first step's own time (with torch_compile, the compilation's)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.started = self.ended = self.first_step_s = self.train_began = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter()
        if state.global_step == 1:
            self.first_step_s = self.ended - self.train_began
        if state.global_step == self.warmup_steps:
            self.started = self.ended


def training_arguments(cfg, spec: dict, output_dir: Path) -> TrainingArguments:
    """The trainer's hyperparameters in Trainer's terms, with everything but training turned off."""
    return TrainingArguments(
        output_dir=str(output_dir), use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        max_steps=spec["warmup_steps"] + spec["measure_steps"],
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.train.grad_clip,
        lr_scheduler_type="cosine", warmup_steps=cfg.optim.warmup_steps, optim="adamw_torch_fused",
        bf16=cfg.train.precision == "bf16", torch_compile=spec["torch_compile"],
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, remove_unused_columns=False, seed=cfg.train.seed,
    )


def main() -> None:
    spec = launch.read_spec()
    cfg = cli.compose_config(spec["overrides"])
    OmegaConf.resolve(cfg)
    # The trainer's placement rule for one process, so every method runs on the same cores.
    threads = cores.place(0, 1, [cores.affinity()], spec["threads"], cfg.train.bind_cores)
    torch.set_num_threads(threads)
    meta = prepared.read_meta(cfg.data.dir)
    windows = data.TokenWindows(data.split_tokens(cfg.data.dir, meta, "train"),
                                cfg.train.seq_len or cfg.model.max_seq_len, cfg.train.seed, "train")
    steps = spec["warmup_steps"] + spec["measure_steps"]
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    torch.manual_seed(cfg.train.seed)
    model = models.build_causal_lm(cfg.model, meta["vocab_size"])
    clock = StepClock(spec["warmup_steps"])
    trainer = InOrderTrainer(model=model, args=training_arguments(cfg, spec, Path(spec["result"]).parent / "hf"),
                             train_dataset=StreamSamples(windows, steps * per_step), callbacks=[clock])
    torch.set_num_threads(threads)  # whatever the Trainer's set-up did to it
    trainer.train()
    elapsed = clock.ended - clock.started
    fileio.write_json(spec["result"], {
        "method": spec["method"], "processes": 1, "threads": torch.get_num_threads(),
        "tokens_per_second": spec["measure_steps"] * per_step * windows.seq_len / elapsed,
        "measured_steps": spec["measure_steps"], "torch_compile": spec["torch_compile"],
        "first_step_s": clock.first_step_s,
    })


if __name__ == "__main__":
    main()
