"""Metrics of a checkpoint on a prepared split, alone or under Horovod: loss and perplexity for
language models, accuracy, macro F1 and the confusion matrix for classifiers.

    python -m app.evaluate checkpoint=runs/2026-11-22_05-10-00
    horovodrun -np 2 python -m app.evaluate checkpoint=runs/... data=data/other split=val
"""
import json

from omegaconf import OmegaConf

from app import checkpoint, cli, config, dist, prepared, runtime, tasks


def evaluate(cfg) -> dict:
    dist.init()
    found = checkpoint.find(cfg.checkpoint)
    state = checkpoint.read_state(found)
    run_cfg = OmegaConf.create(state.config)
    if cfg.data:
        run_cfg.data.dir = cfg.data
    if cfg.seq_len:
        run_cfg.train.seq_len = cfg.seq_len
    meta = prepared.read_meta(run_cfg.data.dir)
    if meta["tokenizer_sha256"] != state.tokenizer_sha256:
        raise ValueError(f"{run_cfg.data.dir} was tokenized with another tokenizer than {found}; "
                         "prepare it with that run's tokenizer (data.tokenizer_path)")
    task = tasks.build(run_cfg, dist.rank(), dist.size(), split=cfg.split)
    device = runtime.pick_device("auto", dist.local_rank())
    model = checkpoint.load_trained_model(found, device)
    result = task.evaluate(model, (dist.rank(), dist.size()), device, runtime.autocast_context(cfg.precision, device),
                           cfg.batch_size, cfg.max_batches)
    result = {"checkpoint": str(found), "split": cfg.split, "ranks": dist.size(), **result}
    if dist.is_main():
        print(json.dumps(result))
    return result


def main() -> None:
    cli.run_tool(config.EvaluateConfig, evaluate)


if __name__ == "__main__":
    main()
