"""Loss and perplexity of a checkpoint on a prepared split, alone or under Horovod.

    python -m app.evaluate checkpoint=runs/2026-11-22_05-10-00
    horovodrun -np 2 python -m app.evaluate checkpoint=runs/... data=data/other split=val
"""
import json
import math
from pathlib import Path

import torch

from app import checkpoint, cli, config, data, dist, models, prepare, runtime


@torch.no_grad()
def mean_loss(model, windows, batch_size: int, total_windows: int, device, precision_ctx) -> float:
    """Token-weighted mean loss over the windows, summed over ranks (not a mean of means)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs, targets in data.evaluation_batches(windows, dist.rank(), dist.size(), batch_size, total_windows):
        with precision_ctx:
            loss = models.causal_lm_loss(model, inputs.to(device), targets.to(device))
        totals += torch.tensor([loss.item() * targets.numel(), targets.numel()], dtype=torch.float64)
    model.train(was_training)
    totals = dist.sum_over_ranks(totals, name="eval_loss")
    return (totals[0] / totals[1]).item()


def evaluate(cfg) -> dict:
    dist.init()
    found = checkpoint.find(cfg.checkpoint)
    state = checkpoint.read_state(found)
    data_dir = Path(cfg.data or state.config["data"]["dir"])
    meta = prepare.read_meta(data_dir)
    if meta["tokenizer_sha256"] != state.tokenizer_sha256:
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than {found}; prepare it with that run's tokenizer")
    device = runtime.pick_device("auto", dist.local_rank())
    model = checkpoint.load_trained_model(found, device)
    seq_len = cfg.seq_len or state.config["train"]["seq_len"] or state.config["model"]["max_seq_len"]
    windows = data.TokenWindows(data_dir / f"{cfg.split}.bin", meta["dtype"], seq_len, seed=0)
    total = cfg.max_batches * cfg.batch_size if cfg.max_batches else windows.windows_per_epoch
    loss = mean_loss(model, windows, cfg.batch_size, total, device, runtime.autocast_context(cfg.precision, device))
    result = {
        "checkpoint": str(found), "split": cfg.split, "loss": loss, "perplexity": math.exp(loss),
        "windows": min(total, windows.windows_per_epoch), "tokens": min(total, windows.windows_per_epoch) * seq_len,
        "ranks": dist.size(),
    }
    if dist.is_main():
        print(json.dumps(result))
    return result


def main() -> None:
    cli.run_tool(config.EvaluateConfig, evaluate)


if __name__ == "__main__":
    main()
