"""What every bench worker that trains does first: the spec's config, Horovod with its layout, this
rank's cores, and the trainer's own step pieces (app/step.py), synchronised and in train mode."""
import torch
from omegaconf import OmegaConf

from app import allocator, cli, config, dist, runtime
from app.bench import launch
from app.step import Training, build_training


def start_training(spec: dict, fresh: bool = True):
    """(cfg, training) for the worker whose spec this is. A config the trainer refuses, or a layout
    the world size cannot take, is one `error:` line on every rank and exit 2, as in app.train.
    `fresh=False` leaves the start to the caller, which resumes (app.train.resume_or_start): the
    layout starts once, as ZeRO-3 frees its parameters after it."""
    cfg = cli.compose_config(spec["overrides"])
    OmegaConf.resolve(cfg)
    try:
        config.validate(cfg)
        allocator.ensure(cfg)  # the malloc app.train would run this layout under; may re-execute
        dist.init(cfg.horovod, cfg.parallel)
    except ValueError as error:  # config.ConfigError is one
        cli.fail(" ".join(str(error).split()))
    torch.set_num_threads(dist.place_rank(spec["threads"], cfg.train.bind_cores))
    runtime.set_freed_memory(config.keeps_freed_memory(cfg))  # as app.train's place_threads does
    training: Training = build_training(cfg, runtime.pick_device(cfg.train.device, dist.local_rank()))
    if fresh:
        training.parallel.start(None)
    training.model.train()
    return cfg, training


def read_spec_and_start():
    spec = launch.read_spec()
    return (spec, *start_training(spec))
