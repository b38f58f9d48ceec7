"""Configuration mistakes fail at once, on every rank, with a message naming the key."""
import pytest
from omegaconf import OmegaConf

from app import cli, config
from conftest import run_job, tiny_train_args


def test_misspelt_override_fails_fast_under_horovod_naming_the_key(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "train.max_stepz=3"), check=False, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "max_stepz" in output and "not in 'TrainConfig'" in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wrong_type_is_refused(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "train.max_steps=many"), np_=1, launcher="none",
                     check=False, timeout=120)
    assert result.returncode != 0
    assert "max_steps" in result.stderr and "many" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.name=lion", "optim.name='lion' is not one of sgd, adam, adamw"),
    ("horovod.cycle_time_ms=0", "horovod.cycle_time_ms=0.0 must be above 0"),
])
def test_value_outside_the_choices_is_one_line_naming_the_fix(tiny_data, tmp_path, override, message):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", override), np_=1, launcher="none",
                     check=False, timeout=120)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr
    # Hydra makes the run directory before the config is checked; nothing is written into it.
    assert not list((tmp_path / "run").glob("*"))


def test_horovod_settings_come_from_the_overrides_hydra_composes_later():
    cfg = cli.startup_config(["model=llama_tiny", "horovod.cycle_time_ms=2.5", "hydra.run.dir=/x", "--multirun"])
    assert cfg.horovod.cycle_time_ms == 2.5 and cfg.model.name == "llama_tiny"
    # Overrides that do not compose leave the schema's values; Hydra reports the error itself.
    assert cli.startup_config(["train.max_stepz=3"]).horovod.cycle_time_ms is None  # auto: 10 ms on CPU ranks


def test_a_ranks_start_composes_its_startup_config_once_and_each_caller_gets_its_own(monkeypatch):
    composed = []
    monkeypatch.setattr(cli, "compose_config", lambda overrides: composed.append(overrides) or
                        OmegaConf.structured(config.Config))
    cli._startup_config.cache_clear()  # what earlier tests in this process composed
    argv = ["model=llama_tiny", "train.max_steps=7", "hydra.run.dir=/x"]
    first = cli.startup_config(argv)
    first.train.max_steps = 1  # the planner changes its copy per layout
    again = cli.startup_config(argv[:2])  # the same overrides: Hydra's own are not the config's
    assert composed == [argv[:2]] and again is not first
    assert again.train.max_steps == OmegaConf.structured(config.Config).train.max_steps
    cli.startup_config(["model=llama_tiny", "train.max_steps=8"])
    assert composed[1:] == [["model=llama_tiny", "train.max_steps=8"]]


@pytest.mark.parametrize("overrides, message", [
    (["sync=adasum", "sync.gradient_allreduce=false", "sync.param_average_every=2"],
     "sync.op=adasum combines every step's updates, which sync.gradient_allreduce=false turns off"),
    (["sync=local_sgd", "sync.compression=fp16"],
     "sync.compression=fp16 compresses the gradient allreduce, which sync.gradient_allreduce=false turns off"),
    (["sync=local_sgd", "sync.param_average_every=0"], "sync.gradient_allreduce=false needs sync.param_average_every"),
])
def test_sync_settings_that_would_silently_do_something_else_are_refused(overrides, message):
    cfg = cli.compose_config(["model=llama_tiny", *overrides])
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)
    config.validate(cli.compose_config(["model=llama_tiny", "sync=local_sgd"]))  # local SGD itself is fine
