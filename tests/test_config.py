"""Configuration mistakes fail at once, on every rank, with a message naming the key."""
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


def test_value_outside_the_choices_is_one_line_naming_the_fix(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "optim.name=lion"), np_=1, launcher="none",
                     check=False, timeout=120)
    assert result.returncode == 2
    assert "optim.name='lion' is not one of sgd, adam, adamw" in result.stdout + result.stderr
