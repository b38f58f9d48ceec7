"""Sharded checkpoints (each rank its boxes, one index) read back exactly, box by box; damaged ones
(a shard missing, cut short, extra or mismatched, a broken index) give one clear line naming the
file, never a traceback; train.resume=auto falls back to the newest good one, and a save that
failed or crashed on one rank leaves the previous one in use; whole-model checkpoints of before
still load; RNG states round-trip; a resumed run's metrics read as one run."""
import argparse
import itertools
import json
import pickle
import re
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from safetensors.torch import load_file, save_file

from app import checkpoint, config, export, metrics, models, optim, saving, sharded_checkpoint
from app.parallel.placement import Placement
from app.state_dicts import by_name, full_model_order
from conftest import ROOT, plain_shard, read_metrics, run_job, tensorboard_scalars


def tiny_model_and_optimizer():
    """The same model and optimizer state at every call (what the checkpoints hold)."""
    torch.manual_seed(0)
    model_cfg = OmegaConf.merge(OmegaConf.structured(config.ModelConfig),
                                OmegaConf.load(ROOT / "conf/model/llama_tiny.yaml"))
    model = models.build_causal_lm(model_cfg, vocab_size=64)
    optimizer = optim.build_optimizer(model, OmegaConf.structured(config.OptimConfig), lr=1e-3)
    # One step, so optimizer.pt holds moments and not only hyperparameters.
    model(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss.backward()
    optimizer.step()
    return model, optimizer


def save_at(run_dir: Path, step: int, model, optimizer, rng_states: list, fail_rank_1: bool = False) -> Path:
    """A checkpoint as two ranks save one, each holding half the rows of every tensor: rank 1's
    write (its files, then its report) stands inside rank 0's gather, as it happens in parallel.
    `fail_rank_1`: rank 1 reports its write failed."""
    state = checkpoint.TrainState(step=step, world_size=len(rng_states),
                                  model_signature=checkpoint.model_signature(model))
    shards = [plain_shard(model, optimizer, parts=2, index=rank) for rank in (0, 1)]
    sent = {}

    def rank_1_writes(written, name):
        other = {"error": "rank 1: disk full"} if fail_rank_1 else \
            sharded_checkpoint.write_files(sent["checkpoint_staging"], 1, shards[1])
        return [written, other]

    world = checkpoint.World(rank=0, broadcast=lambda obj, name: sent.setdefault(name, obj), gather=rank_1_writes)
    return checkpoint.save(run_dir, model, shards[0], state, rng_states, keep_last=3, world=world)


def save_whole_model_checkpoint_of_before(checkpoint_dir: Path, model, optimizer) -> None:
    """The files a checkpoint held before checkpoints were sharded: one weights file, one
    optimizer file (state.json, config.json and rng.pt were as they are)."""
    for path in checkpoint_dir.glob("*-rank*.safetensors"):
        path.unlink()
    (checkpoint_dir / "index.json").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint_dir / "model.safetensors"))
    torch.save(optimizer.state_dict(), checkpoint_dir / "optimizer.pt")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with intact two-rank checkpoints at steps 2, 4 and 6 (latest: 6)."""
    model, optimizer = tiny_model_and_optimizer()
    for step in (2, 4, 6):
        save_at(tmp_path / "run", step, model, optimizer, [checkpoint.capture_rng_state(torch.device("cpu"))] * 2)
    return tmp_path / "run"


@pytest.fixture
def whole_model_run(tmp_path) -> Path:
    """A run directory whose step-6 checkpoint is in the whole-model format of before."""
    model, optimizer = tiny_model_and_optimizer()
    found = save_at(tmp_path / "old", 6, model, optimizer, [checkpoint.capture_rng_state(torch.device("cpu"))] * 2)
    save_whole_model_checkpoint_of_before(found, model, optimizer)
    return tmp_path / "old"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoint.checkpoints_root(run_dir) / checkpoint.step_dir_name(step)


def cut(path: Path, keep_bytes: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep_bytes])
    return path


def truncate_a_shard(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "optim-rank00001.safetensors"
    return cut(path, path.stat().st_size // 2)


def cut_a_shard_inside_its_header(checkpoint_dir: Path) -> Path:
    return cut(checkpoint_dir / "model-rank00001.safetensors", 100)


def remove_a_shard(checkpoint_dir: Path) -> Path:
    (checkpoint_dir / "model-rank00001.safetensors").unlink()
    return checkpoint_dir / "model-rank00001.safetensors"


def an_extra_shard(checkpoint_dir: Path) -> Path:
    """A rank's file that no index lists (left by a save of a larger world, say)."""
    extra = checkpoint_dir / "model-rank00002.safetensors"
    extra.write_bytes((checkpoint_dir / "model-rank00001.safetensors").read_bytes())
    return extra


def a_mismatched_shard(checkpoint_dir: Path) -> Path:
    """Rank 1's weights file replaced by rank 0's: the names and shapes the index lists are not there."""
    path = checkpoint_dir / "model-rank00001.safetensors"
    path.write_bytes((checkpoint_dir / "model-rank00000.safetensors").read_bytes())
    return path


def a_shard_of_other_shapes(checkpoint_dir: Path) -> Path:
    """Rank 1's weights under the names the index lists, each one row short."""
    path = checkpoint_dir / "model-rank00001.safetensors"
    save_file({key: tensor[1:].contiguous() for key, tensor in load_file(str(path)).items()}, str(path))
    return path


def garbage_index(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "index.json"
    path.write_text('{"weights": {"model.embed')
    return path


def an_index_with_a_box_left_out(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "index.json"
    index = json.loads(path.read_text())
    next(iter(index["weights"].values()))["boxes"].pop()
    path.write_text(json.dumps(index))
    return path


def remove_the_index(checkpoint_dir: Path) -> Path:
    (checkpoint_dir / "index.json").unlink()
    return checkpoint_dir / "index.json"


def pickle_an_object_as_optimizer_state(checkpoint_dir: Path) -> Path:
    # What a careless tool or a hostile file would hold: arbitrary objects, which must not load.
    path = checkpoint_dir / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "args": argparse.Namespace(lr=1e-3)}, path)
    return path


def plain_pickle_as_optimizer_state(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "optimizer.pt"
    path.write_bytes(pickle.dumps(argparse.Namespace(lr=1e-3)))
    return path


def truncate_whole_model_weights(checkpoint_dir: Path) -> Path:
    return cut(checkpoint_dir / "model.safetensors", (checkpoint_dir / "model.safetensors").stat().st_size // 2)


def garbage_state(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "state.json"
    path.write_text('{"step": 6, "samples_')
    return path


def truncate_rng(checkpoint_dir: Path) -> Path:
    return cut(checkpoint_dir / "rng.pt", 100)


def rng_of_another_world_size(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "rng.pt"
    torch.save(torch.load(path, weights_only=True) * 2, path)  # four ranks' states in a two-rank run
    return path


def truncate_a_layout_extra(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / "replicas.pt"  # what local SGD writes beside the averaged weights
    torch.save([torch.ones(1000)], path)
    return cut(path, path.stat().st_size - 200)


DAMAGES = [truncate_a_shard, cut_a_shard_inside_its_header, remove_a_shard, an_extra_shard, a_mismatched_shard,
           a_shard_of_other_shapes, garbage_index, an_index_with_a_box_left_out, remove_the_index, garbage_state,
           truncate_rng,
           rng_of_another_world_size, truncate_a_layout_extra]
WHOLE_MODEL_DAMAGES = [truncate_whole_model_weights, pickle_an_object_as_optimizer_state,
                       plain_pickle_as_optimizer_state]


def test_a_checkpoint_just_saved_verifies_and_loads(run_dir):
    found = checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail)
    assert found == step_dir(run_dir, 6)
    checkpoint.verify(found)
    assert checkpoint.read_state(found).step == 6
    assert checkpoint.load_optimizer_state(found)["state"]
    assert set(checkpoint.load_rng_states(found)[0]) == {"cpu"}
    checkpoint.load_trained_model(found)


def test_each_rank_writes_only_its_own_boxes_and_the_whole_tensors_read_back_exactly(run_dir):
    """No whole-model file; each rank's file holds half the rows of every tensor; the readers
    assemble each global tensor from the two halves, weights and the optimizer's moments alike."""
    model, optimizer = tiny_model_and_optimizer()
    found = step_dir(run_dir, 6)
    assert sorted(p.name for p in found.glob("*.safetensors")) == [
        "model-rank00000.safetensors", "model-rank00001.safetensors",
        "optim-rank00000.safetensors", "optim-rank00001.safetensors"]
    for rank in (0, 1):
        held = load_file(str(found / f"model-rank0000{rank}.safetensors"))
        assert len(held) == len(dict(model.named_parameters()))
        for name, param in model.named_parameters():
            rows = param.shape[0] // 2
            assert torch.equal(held[f"{name}@{rank * rows}" + ",0" * (param.dim() - 1)],
                               param.detach()[rank * rows:(rank + 1) * rows])
    weights = checkpoint.read_weights(found)
    assert weights.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(weights[name], param.detach()) for name, param in model.named_parameters())
    saved, plain = checkpoint.load_optimizer_state(found), optimizer.state_dict()
    assert saved["state"].keys() == plain["state"].keys()
    for index, entry in plain["state"].items():
        assert all(torch.equal(saved["state"][index][key], value) for key, value in entry.items()), index
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in plain["param_groups"]]


def test_a_reader_reads_a_box_spanning_two_saved_boxes(run_dir):
    """A layout of other boxes than the saver's: rows 1..N-1 cross rank 0's and rank 1's halves."""
    model, optimizer = tiny_model_and_optimizer()
    name, param = next((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    wanted = Placement(name, tuple(param.shape), (1, 0), (param.shape[0] - 2, param.shape[1]), ())
    reader = checkpoint.Reader(step_dir(run_dir, 6))
    assert torch.equal(reader.weight(wanted), param.detach()[1:-1])
    moments = optimizer.state[param]["exp_avg"]
    assert torch.equal(reader.state(wanted)["exp_avg"], moments[1:-1])
    assert reader.state(wanted)["step"] == optimizer.state[param]["step"]


def test_a_whole_model_checkpoint_of_before_still_verifies_and_loads_box_by_box(whole_model_run):
    model, optimizer = tiny_model_and_optimizer()
    found = checkpoint.resolve_resume("auto", whole_model_run, warn=pytest.fail)
    assert not checkpoint.is_sharded(found)
    name, param = next((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    half = Placement.whole(name, param.shape, ()).split(0, 2, 1, "tensor")
    reader = checkpoint.Reader(found, full_model_order(model))
    assert torch.equal(reader.weight(half), param.detach()[half.box])
    assert torch.equal(reader.state(half)["exp_avg_sq"], optimizer.state[param]["exp_avg_sq"][half.box])
    assert all(torch.equal(w, model.state_dict()[n]) for n, w in checkpoint.read_weights(found).items())
    checkpoint.load_trained_model(found)


@pytest.mark.parametrize("damage", WHOLE_MODEL_DAMAGES, ids=lambda damage: damage.__name__)
def test_verify_names_the_damaged_file_of_a_whole_model_checkpoint(whole_model_run, damage):
    damaged_file = damage(step_dir(whole_model_run, 6))
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint file {re.escape(str(damaged_file))} is damaged"):
        checkpoint.verify(step_dir(whole_model_run, 6))


def test_a_save_one_rank_failed_leaves_the_previous_checkpoint_in_use(run_dir):
    """Rank 1 reports its files unwritten: nothing renamed, no staging left, `latest` unmoved."""
    model, optimizer = tiny_model_and_optimizer()
    with pytest.raises(checkpoint.CheckpointError, match="rank 1: disk full.*the previous checkpoint stays the latest"):
        save_at(run_dir, 8, model, optimizer, [checkpoint.capture_rng_state(torch.device("cpu"))] * 2,
                fail_rank_1=True)
    root = checkpoint.checkpoints_root(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004", "step-000006"]
    assert checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail) == step_dir(run_dir, 6)


def test_a_crash_between_two_ranks_writes_leaves_the_previous_checkpoint_in_use(run_dir):
    """Killed after rank 0 wrote its files and before rank 1 did: the staging directory holds one
    rank's files and no index; it is never read, and the next save clears it."""
    root = checkpoint.checkpoints_root(run_dir)
    staging = root / ".step-000008.crashed.tmp"
    staging.mkdir()
    sharded_checkpoint.write_files(staging, 0, plain_shard(*tiny_model_and_optimizer(), parts=2, index=0))
    assert checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail) == step_dir(run_dir, 6)
    save_at(run_dir, 8, *tiny_model_and_optimizer(), [checkpoint.capture_rng_state(torch.device("cpu"))] * 2)
    assert not staging.exists() and checkpoint.latest(run_dir) == step_dir(run_dir, 8)


# How long the held writer below keeps a save's files unwritten after the loop lets it go on.
HELD_WRITE_S = 0.5


@pytest.fixture
def held_writer(monkeypatch) -> threading.Event:
    """An async save's writer that writes only once the event is set: what the loop does in the
    meantime is what a slow disk would let it do."""
    release, write = threading.Event(), checkpoint.write_shard

    def held(*args):
        assert release.wait(timeout=60), "the test never released the writer"
        return write(*args)

    monkeypatch.setattr(checkpoint, "write_shard", held)
    return release


def save_async(saver: saving.Saver, step: int, model, optimizer) -> saving.Pending:
    """One process's async save at `step` (world of one), as the loop makes it."""
    pending = saver.start(step, checkpoint.World())
    state = checkpoint.TrainState(step=step, world_size=1, model_signature=checkpoint.model_signature(model))
    saver.save(pending, plain_shard(model, optimizer), state, [checkpoint.capture_rng_state(torch.device("cpu"))])
    return pending


def train_one_more_step(model, optimizer) -> None:
    model(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss.backward()
    optimizer.step()


def test_an_async_save_holds_its_steps_values_while_the_loop_trains_on(run_dir, held_writer):
    """The optimizer changes weights and moments in place while the writer waits: the files hold
    the values of the save's step, and the checkpoint counts only once the writer is joined."""
    model, optimizer = tiny_model_and_optimizer()
    at_save = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    moments_at_save = {name: optimizer.state[param]["exp_avg"].clone() for name, param in model.named_parameters()}
    saver = saving.Saver(run_dir, model, keep_last=3, asynchronous=True)
    save_async(saver, 8, model, optimizer)
    train_one_more_step(model, optimizer)
    assert checkpoint.latest(run_dir) == step_dir(run_dir, 6), "committed before its files were written"
    held_writer.set()
    saver.finish()
    assert checkpoint.latest(run_dir) == step_dir(run_dir, 8)
    saved = checkpoint.read_weights(step_dir(run_dir, 8))
    assert saved.keys() == at_save.keys()
    assert all(torch.equal(saved[name], at_save[name]) for name in saved)
    assert not torch.equal(saved["model.norm.weight"], model.state_dict()["model.norm.weight"]), "the step changed nothing"
    saved_state = by_name(checkpoint.load_optimizer_state(step_dir(run_dir, 8)), full_model_order(model))["state"]
    assert saved_state.keys() == moments_at_save.keys()
    assert all(torch.equal(saved_state[name]["exp_avg"], moments_at_save[name]) for name in saved_state)


def test_an_async_saves_stall_includes_waiting_for_the_previous_writer(run_dir, held_writer):
    """The next save joins the writer in flight first: the loop's stall at that save counts the
    wait, the summary has one stall per save, and its bytes are the checkpoints' files."""
    model, optimizer = tiny_model_and_optimizer()
    saver = saving.Saver(run_dir, model, keep_last=3, asynchronous=True)
    save_async(saver, 8, model, optimizer)
    threading.Timer(HELD_WRITE_S, held_writer.set).start()
    save_async(saver, 10, model, optimizer)
    saver.finish()
    block = saving.summary_block(True, [saver.summary()])
    assert block["saves"] == 2 and block["steps"] == [8, 10] and len(block["stall_s"]) == 2
    assert block["stall_s"][0] < HELD_WRITE_S <= block["stall_s"][1]
    assert block["write_s"][0] >= HELD_WRITE_S
    files = [path for step in (8, 10) for path in step_dir(run_dir, step).iterdir()]
    assert block["bytes"] == sum(path.stat().st_size for path in files)
    ranks = block["ranks"][0]
    assert 0 < ranks["training_peak_rss_bytes"] and all(peak > 0 for peak in ranks["save_peak_rss_bytes"])


def test_a_failed_background_write_is_one_line_and_leaves_the_previous_checkpoint_in_use(run_dir, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_files", disk_full)
    model, optimizer = tiny_model_and_optimizer()
    saver = saving.Saver(run_dir, model, keep_last=3, asynchronous=True)
    save_async(saver, 8, model, optimizer)
    with pytest.raises(checkpoint.SaveFailed, match=r"rank 0 could not write its checkpoint files into .*"
                                                    r"No space left on device") as failure:
        saver.finish()
    assert "\n" not in str(failure.value)
    root = checkpoint.checkpoints_root(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000004", "step-000006"]
    assert checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail) == step_dir(run_dir, 6)


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
    truncate_a_shard(step_dir(run_dir, 6))
    garbage_state(step_dir(run_dir, 4))
    warnings = []
    assert checkpoint.resolve_resume("auto", run_dir, warn=warnings.append) == step_dir(run_dir, 2)
    assert len(warnings) == 2
    assert "step-000006 (optim-rank00001.safetensors: " in warnings[0] and "step-000004 (state.json: " in warnings[1]


def test_auto_resume_refuses_to_start_over_when_no_checkpoint_is_intact(run_dir):
    for step in (2, 4, 6):
        truncate_a_shard(step_dir(run_dir, step))
    warnings = []
    refused = r"no checkpoint in .* is intact .*optim-rank00001\.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=refused):
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
    damaged_file = remove_a_shard(step_dir(run_dir, 6))
    resume = step_dir(run_dir, 6) if named == "checkpoint" else run_dir
    expected = f"checkpoint file {re.escape(str(damaged_file))} is damaged \\(missing\\)"
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


def test_a_checkpoint_written_on_a_gpu_host_resumes_on_a_cpu_only_host(whole_model_run):
    run_dir = whole_model_run
    newest = step_dir(run_dir, 6)
    as_if_saved_on_a_gpu(newest / "optimizer.pt")
    assert b"cuda:0" in (newest / "optimizer.pt").read_bytes()
    assert checkpoint.resolve_resume("auto", run_dir, warn=pytest.fail) == newest
    moments = [v for entry in checkpoint.load_optimizer_state(newest)["state"].values() for v in entry.values()]
    assert moments and all(v.device.type == "cpu" for v in moments)


def test_loaders_raise_checkpoint_error_not_library_exceptions(run_dir):
    found = step_dir(run_dir, 6)
    for damage in (cut_a_shard_inside_its_header, truncate_a_shard, truncate_rng, truncate_a_layout_extra):
        damage(found)
    model, _ = tiny_model_and_optimizer()
    loaders = [lambda: checkpoint.load_weights(found, model), lambda: checkpoint.read_weights(found),
               lambda: checkpoint.load_optimizer_state(found), lambda: checkpoint.load_rng_states(found),
               lambda: checkpoint.load_extras(found), lambda: checkpoint.load_trained_model(found)]
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


@pytest.mark.parametrize("module, damage", [("app.generate", cut_a_shard_inside_its_header),
                                            ("app.evaluate", garbage_state)])
def test_tools_report_a_damaged_checkpoint_in_one_line_and_exit_2(run_dir, module, damage):
    damaged_file = damage(step_dir(run_dir, 6))
    assert_one_line_naming(run_job([f"checkpoint={run_dir}"], launcher="none", module=module, check=False),
                           damaged_file)


def previous_export(tmp_path: Path) -> Path:
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous export")
    return out


def assert_untouched(out: Path) -> None:
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the previous export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["exported", "run"]  # no staging directory left


@pytest.mark.parametrize("damage", [cut_a_shard_inside_its_header, remove_a_shard], ids=lambda damage: damage.__name__)
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
    assert [(row["step"], row["train/loss"]) for row in read_metrics(tmp_path)] == list(expected.items())
    assert tensorboard_scalars(tmp_path, "train/loss") == list(expected.items())


def test_a_fresh_run_keeps_rows_at_step_0(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "note": 1}\n')
    metrics.RunLogger(tmp_path, total_steps=10, initial_step=0, progress_bar=False).close()
    assert read_metrics(tmp_path) == [{"step": 0, "note": 1}]


def test_a_reader_reads_every_box_of_a_tensor_saved_as_flat_ranges(tmp_path):
    """Two boxes of rows of a 3-D tensor, each cut into flat ranges at places inside rows and
    inside a row's rows (as ZeRO's slices fall): every box of the tensor reads back exactly."""
    full = torch.arange(4 * 3 * 5, dtype=torch.float32).reshape(4, 3, 5)
    stored, boxes = {}, []
    for first_row, rows, cuts in ((0, 3, [0, 7, 8, 31, 45]), (3, 1, [0, 15])):
        flat = full[first_row : first_row + rows].reshape(-1)
        for low, high in zip(cuts, cuts[1:]):
            key = f"t@{first_row},0,0+{low}"
            stored[key] = flat[low:high].clone()
            boxes.append({"file": "model-rank00000.safetensors", "key": key, "offsets": [first_row, 0, 0],
                          "sizes": [rows, 3, 5], "flat_offset": low, "flat_length": high - low})
    save_file(stored, str(tmp_path / "model-rank00000.safetensors"))
    tensor = {"shape": [4, 3, 5], "dtype": "F32", "boxes": boxes}
    sharded_checkpoint.check_boxes("t", tensor)
    for offsets in itertools.product(range(4), range(0, 3, 2), range(0, 5, 2)):
        for sizes in itertools.product(*(range(1, d - o + 1) for d, o in zip(full.shape, offsets))):
            box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            assert torch.equal(sharded_checkpoint.read_box(tmp_path, "t", tensor, offsets, sizes), full[box]), box
