"""Damaged checkpoints give one clear line, never a traceback; train.resume=auto falls back to the
newest good one; RNG states round-trip; a resumed run's metrics read as one run."""
import argparse
import json
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from app import checkpoint, config, export, metrics, models, optim
from conftest import ROOT, run_job


def tiny_model_and_optimizer():
    model_cfg = OmegaConf.merge(OmegaConf.structured(config.ModelConfig),
                                OmegaConf.load(ROOT / "conf/model/llama_tiny.yaml"))
    model = models.build_causal_lm(model_cfg, vocab_size=64)
    optimizer = optim.build_optimizer(model, OmegaConf.structured(config.OptimConfig), lr=1e-3)
    # One step, so optimizer.pt holds moments and not only hyperparameters.
    model(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss.backward()
    optimizer.step()
    return model, optimizer


def save_at(run_dir: Path, step: int, model, optimizer, rng_states: list) -> Path:
    state = checkpoint.TrainState(step=step, model_signature=checkpoint.model_signature(model))
    saved = checkpoint.SavedState(model=model.state_dict(), optimizer=optimizer.state_dict())
    return checkpoint.save(run_dir, model, saved, state, rng_states, keep_last=3)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with intact checkpoints at steps 2, 4 and 6 (latest: 6)."""
    model, optimizer = tiny_model_and_optimizer()
    for step in (2, 4, 6):
        save_at(tmp_path / "run", step, model, optimizer, [checkpoint.capture_rng_state(torch.device("cpu"))])
    return tmp_path / "run"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint.checkpoints_root(run_dir) / checkpoint.step_dir_name(step)


def cut(path: Path, keep_bytes: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep_bytes])
    return path


def truncate_weights(checkpoint_dir: Path) -> Path:
    return cut(checkpoint_dir / "model.safetensors", (checkpoint_dir / "model.safetensors").stat().st_size // 2)


def cut_weights_inside_their_header(checkpoint_dir: Path) -> Path:
    return cut(checkpoint_dir / "model.safetensors", 1000)


def pickle_an_object_as_optimizer_state(checkpoint_dir: Path) -> Path:
    # What a careless tool or a hostile file would hold: arbitrary objects, which must not load.
    path = checkpoint_dir / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "args": argparse.Namespace(lr=1e-3)}, path)
    return path


def plain_pickle_as_optimizer_state(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "optimizer.pt"
    path.write_bytes(pickle.dumps(argparse.Namespace(lr=1e-3)))
    return path


def garbage_state(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "state.json"
    path.write_text('{"step": 6, "samples_')
    return path


def truncate_rng(checkpoint_dir: Path) -> Path:
    return cut(checkpoint_dir / "rng.pt", 100)


def rng_of_another_world_size(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "rng.pt"
    torch.save(torch.load(path, weights_only=True) * 2, path)  # two ranks' states in a one-rank run
    return path


def truncate_a_layout_extra(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "replicas.pt"  # what local SGD writes beside the averaged weights
    torch.save([torch.ones(1000)], path)
    return cut(path, path.stat().st_size - 200)


DAMAGES = [truncate_weights, cut_weights_inside_their_header, pickle_an_object_as_optimizer_state,
           plain_pickle_as_optimizer_state, garbage_state, truncate_rng, rng_of_another_world_size,
           truncate_a_layout_extra]


def test_a_checkpoint_just_saved_verifies_and_loads(run_dir):
    found = checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail)
    assert found == step_dir(run_dir, 6)
    checkpoint.verify(found)
    assert checkpoint.read_state(found).step == 6
    assert checkpoint.load_optimizer_state(found)["state"]
    assert set(checkpoint.load_rng_states(found)[0]) == {"cpu"}
    checkpoint.load_trained_model(found)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_verify_names_the_damaged_file_and_the_fix(run_dir, damage):
    damaged_file = damage(step_dir(run_dir, 6))
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.verify(step_dir(run_dir, 6))
    message = str(caught.value)
    assert f"checkpoint file {damaged_file} is damaged" in message and "train.resume=never" in message
    assert "\n" not in message and message.count("checkpoint file") == 1
    checkpoint.verify(step_dir(run_dir, 4))  # the others are untouched


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_auto_resume_falls_back_to_the_previous_good_checkpoint_with_a_warning(run_dir, damage):
    damaged_file = damage(step_dir(run_dir, 6))
    warnings = []
    assert checkpoint.resolve_resume("auto", run_dir, warn=warnings.append) == step_dir(run_dir, 4)
    assert len(warnings) == 1 and "\n" not in warnings[0] and "checkpoint file" not in warnings[0]
    assert f"skipping damaged checkpoint {step_dir(run_dir, 6)} ({damaged_file.name}: " in warnings[0]


def test_auto_resume_skips_every_damaged_checkpoint_back_to_a_good_one(run_dir):
    truncate_weights(step_dir(run_dir, 6))
    garbage_state(step_dir(run_dir, 4))
    warnings = []
    assert checkpoint.resolve_resume("auto", run_dir, warn=warnings.append) == step_dir(run_dir, 2)
    assert len(warnings) == 2
    assert "step-000006 (model.safetensors: " in warnings[0] and "step-000004 (state.json: " in warnings[1]


def test_auto_resume_refuses_to_start_over_when_no_checkpoint_is_intact(run_dir):
    for step in (2, 4, 6):
        truncate_weights(step_dir(run_dir, step))
    warnings = []
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* is intact .*model\.safetensors"):
        checkpoint.resolve_resume("auto", run_dir, warn=warnings.append)
    assert len(warnings) == 3


def test_auto_resume_of_a_fresh_run_directory_starts_from_scratch(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path / "new", warn=pytest.fail) is None
    assert checkpoint.resolve_resume("never", tmp_path / "new", warn=pytest.fail) is None


def test_auto_resume_ignores_a_garbled_latest_pointer_and_uses_the_newest_good_checkpoint(run_dir):
    (checkpoint.checkpoints_root(run_dir) / "latest").write_bytes(b"\xff\x00../../etc\n")
    assert checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail) == step_dir(run_dir, 6)


@pytest.mark.parametrize("named", ["checkpoint", "run"])
def test_an_explicitly_named_damaged_checkpoint_is_an_error_naming_the_file(run_dir, named):
    damaged_file = pickle_an_object_as_optimizer_state(step_dir(run_dir, 6))
    resume = step_dir(run_dir, 6) if named == "checkpoint" else run_dir
    expected = f"checkpoint file {re.escape(str(damaged_file))} is damaged .*refuses to unpickle argparse.Namespace"
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        checkpoint.resolve_resume(str(resume), run_dir / "elsewhere", warn=pytest.fail)


def as_if_saved_on_a_gpu(path: Path) -> None:
    """Rewrite a torch.save archive so that its storages say cuda:0, as a GPU run's would (for
    files with no "cpu" string of their own, such as an optimizer's state)."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pickled = next(name for name in members if name.endswith("/data.pkl"))
    # Each storage's location is a pickled 3-character string; a GPU's is "cuda:0".
    members[pickled] = members[pickled].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_a_checkpoint_written_on_a_gpu_host_resumes_on_a_cpu_only_host(run_dir):
    newest = step_dir(run_dir, 6)
    as_if_saved_on_a_gpu(newest / "optimizer.pt")
    assert b"cuda:0" in (newest / "optimizer.pt").read_bytes()
    assert checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail) == newest
    moments = [v for entry in checkpoint.load_optimizer_state(newest)["state"].values() for v in entry.values()]
    assert moments and all(v.device.type == "cpu" for v in moments)


def test_loaders_raise_checkpoint_error_not_library_exceptions(run_dir):
    found = step_dir(run_dir, 6)
    for damage in (truncate_weights, plain_pickle_as_optimizer_state, truncate_rng, truncate_a_layout_extra):
        damage(found)
    model, _ = tiny_model_and_optimizer()
    loaders = [lambda: checkpoint.load_weights(found, model), lambda: checkpoint.read_weights(found),
               lambda: checkpoint.load_optimizer_state(found), lambda: checkpoint.load_rng_states(found),
               lambda: checkpoint.load_extras(found), lambda: checkpoint.load_trained_model(found),
               lambda: checkpoint.read(found, model, "")]
    for load in loaders:
        with pytest.raises(checkpoint.CheckpointError):
            load()
    garbage_state(found)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_state(found)


def assert_one_line_naming(result, damaged_file: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().startswith(f"error: checkpoint file {damaged_file} is damaged")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


@pytest.mark.parametrize("module, damage", [("app.generate", truncate_weights), ("app.evaluate", garbage_state)])
def test_tools_report_a_damaged_checkpoint_in_one_line_and_exit_2(run_dir, module, damage):
    damaged_file = damage(step_dir(run_dir, 6))
    assert_one_line_naming(run_job([f"checkpoint={run_dir}"], launcher="none", module=module, check=False),
                           damaged_file)


def remove_weights(checkpoint_dir: Path) -> Path:
    (checkpoint_dir / "model.safetensors").unlink()
    return checkpoint_dir / "model.safetensors"


def previous_export(tmp_path: Path) -> Path:
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous export")
    return out


def assert_untouched(out: Path) -> None:
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the previous export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["exported", "run"]  # no staging directory left


@pytest.mark.parametrize("damage", [truncate_weights, remove_weights], ids=lambda damage: damage.__name__)
def test_an_export_of_damaged_weights_is_one_line_and_leaves_the_previous_export_as_it_was(run_dir, tmp_path, damage):
    damaged_file = damage(step_dir(run_dir, 6))
    out = previous_export(tmp_path)
    result = run_job([f"checkpoint={run_dir}", f"out={out}"], launcher="none", module="app.export", check=False)
    assert_one_line_naming(result, damaged_file)
    assert_untouched(out)


def test_an_export_that_fails_after_its_weights_are_written_leaves_the_previous_export(run_dir, tmp_path):
    out = previous_export(tmp_path)
    # run_dir has no tokenizer, which the export copies last.
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        export.export(OmegaConf.structured(config.ExportConfig(checkpoint=str(run_dir), out=str(out))))
    assert_untouched(out)


def test_rng_state_round_trips_through_a_checkpoint(run_dir):
    cpu = torch.device("cpu")
    torch.manual_seed(123)
    torch.rand(3)
    saved_at = save_at(run_dir, 8, *tiny_model_and_optimizer(), [checkpoint.capture_rng_state(cpu)])
    expected = torch.rand(5)
    torch.manual_seed(999)
    checkpoint.restore_rng_state(checkpoint.load_rng_states(saved_at)[0], cpu)
    assert torch.equal(torch.rand(5), expected)


def test_rng_state_of_an_older_checkpoint_a_bare_cpu_tensor_still_restores(run_dir):
    saved_at = save_at(run_dir, 8, *tiny_model_and_optimizer(), [torch.get_rng_state()])
    expected = torch.rand(5)
    torch.manual_seed(999)
    checkpoint.restore_rng_state(checkpoint.load_rng_states(saved_at)[0], torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_rng_state_on_a_gpu_carries_that_device_generator(monkeypatch):
    # No GPU here: stand in for torch.cuda's generator to check what is saved and restored where.
    generators = {1: torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[device.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: generators.__setitem__(device.index, state))
    gpu = torch.device("cuda", 1)
    saved = checkpoint.capture_rng_state(gpu)
    assert set(saved) == {"cpu", "cuda"}
    generators[1] = torch.tensor([0], dtype=torch.uint8)
    checkpoint.restore_rng_state(saved, gpu)
    assert generators[1].tolist() == [7]


def jsonl_rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir: Path, tag: str) -> list:
    """(step, value) in the order TensorBoard shows them, after it applies purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_a_resumed_run_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    crashed = metrics.RunLogger(tmp_path, total_steps=10, initial_step=0, progress_bar=False)
    for step in (2, 4, 6, 8):
        crashed.log(step, {"train/loss": float(step)})
    crashed.close()
    with open(tmp_path / "metrics.jsonl", "a") as jsonl:
        jsonl.write('{"step": 10, "train/lo')  # torn by the crash

    resumed = metrics.RunLogger(tmp_path, total_steps=10, initial_step=4, progress_bar=False)
    for step in (6, 8, 10):
        resumed.log(step, {"train/loss": step + 0.5})
    resumed.close()

    expected = {2: 2.0, 4: 4.0, 6: 6.5, 8: 8.5, 10: 10.5}
    assert [(row["step"], row["train/loss"]) for row in jsonl_rows(tmp_path)] == list(expected.items())
    assert tensorboard_scalars(tmp_path, "train/loss") == list(expected.items())


def test_a_fresh_run_keeps_rows_at_step_0(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "note": 1}\n')
    metrics.RunLogger(tmp_path, total_steps=10, initial_step=0, progress_bar=False).close()
    assert jsonl_rows(tmp_path) == [{"step": 0, "note": 1}]
