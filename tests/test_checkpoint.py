"""Checkpoints lose nothing: kill -9 and resume equals an uninterrupted run, writes are atomic,
signals stop every rank cleanly, exports stream into Hugging Face's sharded format and load in
plain transformers."""
import json
import math
import os
import random
import resource
import shutil
import shlex
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest
import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from app import checkpoint, config, export, fileio, generate, models, optim, tokenizer
from conftest import (ROOT, job_env, last_json_line, launcher_command, plain_shard, read_metrics, read_summary,
                      run_job, tensorboard_scalars, tiny_train_args)


def start_job(args, launcher="gloo"):
    command = launcher_command(2, launcher) + [sys.executable, "-m", "app.train", *args]
    return subprocess.Popen(command, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a node failure would."""
    procs = [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def latest_step(run_dir) -> int:
    found = checkpoint.latest(run_dir)
    return checkpoint.read_state(found).step if found else 0


def wait_for(predicate, timeout_s=120, process=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"job ended before the condition held:\n{process.stdout.read()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def final_weights(run_dir):
    return checkpoint.read_weights(checkpoint.latest(run_dir))


def long_args(data, run_dir, *extra):
    return tiny_train_args(data, run_dir, "train.max_steps=40", "train.checkpoint_every=4", "train.log_every=2",
                           "train.micro_batch_size=8", *extra)


ASYNC = "train.checkpoint_async=true"


def assert_same_shard_files(expected_dir, got_dir) -> None:
    """Every rank's weights and optimizer-state files hold the same tensors, bit for bit."""
    names = sorted(path.name for path in expected_dir.glob("*-rank*.safetensors"))
    assert names and names == sorted(path.name for path in got_dir.glob("*-rank*.safetensors"))
    for name in names:
        expected, got = load_file(expected_dir / name), load_file(got_dir / name)
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[key], got[key]) for key in expected), name


def assert_one_stall_per_save(run_dir, asynchronous: bool, steps: list) -> None:
    """summary.json's checkpoint block and TensorBoard's checkpoint/stall_s: one stall per save."""
    block = read_summary(run_dir)["checkpoint"]
    assert block["async"] is asynchronous and block["steps"] == steps and block["saves"] == len(steps)
    assert len(block["stall_s"]) == len(block["write_s"]) == len(steps)
    assert all(stall > 0 for stall in block["stall_s"]) and all(write > 0 for write in block["write_s"])
    if not asynchronous:  # the loop waited for the whole write
        assert all(write < stall for write, stall in zip(block["write_s"], block["stall_s"]))
    assert block["bytes"] == sum(block["bytes_per_save"]) > 0
    # A resumed run's TensorBoard also holds the earlier attempt's saves, before the resume step.
    assert [step for step, _ in tensorboard_scalars(run_dir, "checkpoint/stall_s") if step in steps] == steps


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run_bitwise(tiny_data, tmp_path):
    """The interrupted run saves asynchronously (train.checkpoint_async), the reference synchronously:
    killed while a writer may be in flight, resumed from an async checkpoint, it must still end
    with the reference's losses and checkpoints, tensor for tensor."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_job(long_args(tiny_data, reference))

    job = start_job(long_args(tiny_data, interrupted, ASYNC))
    wait_for(lambda: latest_step(interrupted) >= 8, process=job)
    kill_tree(job)
    killed_at = latest_step(interrupted)
    assert 8 <= killed_at < 40 and not (interrupted / "summary.json").exists(), "the kill came too late to test resume"

    result = run_job(long_args(tiny_data, interrupted, ASYNC))
    assert f"at step {killed_at}" in result.stdout
    assert read_summary(interrupted)["step"] == 40

    kept = [step_dir.name for step_dir in checkpoint.complete_checkpoints(reference / "checkpoints")]
    assert kept == ["step-000036", "step-000040"]
    for name in kept:
        assert_same_shard_files(reference / "checkpoints" / name, interrupted / "checkpoints" / name)
    assert_one_stall_per_save(reference, asynchronous=False, steps=list(range(4, 41, 4)))
    assert_one_stall_per_save(interrupted, asynchronous=True, steps=list(range(killed_at + 4, 41, 4)))
    # The loss curve too: the last value logged for each step equals the uninterrupted run's.
    reference_curve = {row["step"]: row["train/loss"] for row in read_metrics(reference)}
    resumed_curve = {row["step"]: row["train/loss"] for row in read_metrics(interrupted)}
    assert resumed_curve == reference_curve
    # The resumed run's log reads as one run: the steps logged after the checkpoint and before the
    # kill were superseded, not repeated.
    logged_steps = [row["step"] for row in read_metrics(interrupted) if "train/loss" in row]
    assert logged_steps == sorted(set(logged_steps)) == list(range(2, 41, 2))


def test_killing_during_checkpoint_writes_never_leaves_a_broken_latest(tmp_path):
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    attempts = 8
    # One start-up (imports, building the model) serves every attempt: the worker forks a writer
    # per attempt, and the test SIGKILLs that writer. A session of their own: a failed attempt
    # kills the worker and any writer it left running together.
    writers = subprocess.Popen([sys.executable, str(ROOT / "tests/workers/checkpoint_writer.py"), str(run_dir)],
                               env=job_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert writers.stdout.readline().strip() == "ready"
        for _ in range(attempts):
            writers.stdin.write("go\n")
            writers.stdin.flush()
            writer = int(writers.stdout.readline())
            time.sleep(rng.random() * 1.5)
            os.kill(writer, signal.SIGKILL)
            assert writers.stdout.readline().split() == ["ended", str(-signal.SIGKILL)]
            found = checkpoint.latest(run_dir)
            if found is None:
                continue  # killed before the first checkpoint completed: nothing claimed, nothing broken
            state = checkpoint.read_state(found)
            model = checkpoint.load_trained_model(found)
            assert float(next(model.parameters()).detach().flatten()[0]) == float(state.step)
            assert checkpoint.load_optimizer_state(found)["param_groups"]
            assert len(checkpoint.complete_checkpoints(run_dir / "checkpoints")) <= 3
    finally:
        os.killpg(writers.pid, signal.SIGKILL)
        writers.wait()
    assert checkpoint.latest(run_dir) is not None, "no checkpoint ever completed; the writer is too slow to test"


# Larger than any other file of the run (the tokenizer, logs), smaller than llama_small's shard files.
FILE_SIZE_LIMIT = 32 * 2**20


def test_a_failed_background_write_exits_2_with_one_line_and_claims_no_checkpoint(tiny_data, tmp_path):
    """The disk refuses the async writer's files (a file-size limit: EFBIG, as a full disk's
    ENOSPC): the commit at the run's end reports it on every rank in one line, nothing counts."""
    run_dir = tmp_path / "run"
    args = tiny_train_args(tiny_data, run_dir, "model=llama_small", "train.micro_batch_size=1", "train.seq_len=32",
                           "train.max_steps=2", "train.checkpoint_every=2", ASYNC)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))  # noqa: E731
    result = subprocess.run([sys.executable, "-m", "app.train", *args], cwd=ROOT, env=job_env(), capture_output=True,
                            text=True, timeout=300, preexec_fn=limit)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "rank 0 could not write its checkpoint files into" in errors[0], errors
    assert "File too large" in errors[0] and "Traceback" not in output
    assert checkpoint.latest(run_dir) is None and list((run_dir / "checkpoints").iterdir()) == []


def test_sigusr1_on_one_rank_checkpoints_all_ranks_exits_0_and_the_rerun_finishes(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = long_args(tiny_data, run_dir, "train.checkpoint_every=0")
    job = start_job(args)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text(), process=job)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
             if p.name().startswith("python") and "app.train" in p.cmdline()]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output[-3000:]
    assert "stop requested by signal" in output
    stopped_at = latest_step(run_dir)
    assert 0 < stopped_at < 40

    result = run_job(args)
    assert f"resumed from {checkpoint.latest(run_dir).parent}" in result.stdout or f"at step {stopped_at}" in result.stdout
    assert read_summary(run_dir)["step"] == 40


def test_resume_on_a_different_number_of_ranks_continues_the_sample_stream(tiny_data, tmp_path):
    """4 steps on 2 ranks x 4 samples, then 4 on 1 rank x 8: the same global batches, so the same
    weights as 8 steps on 1 rank x 8, within float32 rounding (test_equivalence.py's bound). A
    resume that lost or repeated its place in the stream would train on other samples."""
    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    args = ["optim=sgd_momentum", "optim.decay=constant"]
    run_job(tiny_train_args(tiny_data, resumed, *args, "train.max_steps=4"), np_=2)
    result = run_job(tiny_train_args(tiny_data, resumed, *args, "train.max_steps=8", "train.micro_batch_size=8"),
                     np_=1, launcher="none")
    assert "resuming a 2-rank checkpoint on 1 ranks" in result.stdout + result.stderr
    run_job(tiny_train_args(tiny_data, whole, *args, "train.max_steps=8", "train.micro_batch_size=8"), np_=1,
            launcher="none")
    summary = read_summary(resumed)
    assert summary["step"] == 8 and summary["world_size"] == 1
    assert summary["tokens_seen"] == read_summary(whole)["tokens_seen"] == 8 * 8 * 64
    expected, got = final_weights(whole), final_weights(resumed)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 2e-6


def test_a_signal_during_start_up_still_ends_in_a_checkpoint(tiny_data, tmp_path):
    """SIGUSR1 as soon as a rank logs its first line (before data, model and the peak
    measurement): the handler is already there, so the run checkpoints at its first log step."""
    run_dir = tmp_path / "run"
    job = start_job(long_args(tiny_data, run_dir, "train.checkpoint_every=0", "train.peak_tflops=null"))
    for line in job.stdout:
        if "run dir" in line:
            break
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
             if p.name().startswith("python") and "app.train" in p.cmdline()]
    ranks[-1].send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=180)
    assert job.returncode == 0, output[-3000:]
    assert "stop requested by signal" in output
    assert latest_step(run_dir) == 2  # the first log step (train.log_every=2)


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished one-process run, 8 steps with a checkpoint every 2 and the last 2 kept, for the
    tests that only read it (pruning, export, generate, evaluate): one launch serves them all."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_job(tiny_train_args(tiny_data, run_dir, "train.max_steps=8", "train.checkpoint_every=2", "train.keep_last=2"),
            np_=1, launcher="none")
    return run_dir


def test_old_checkpoints_are_pruned_to_keep_last(finished_run):
    names = [p.name for p in checkpoint.complete_checkpoints(finished_run / "checkpoints")]
    assert names == ["step-000006", "step-000008"]
    assert (finished_run / "checkpoints" / "latest").read_text().strip() == "step-000008"


def test_a_checkpoint_of_another_model_shape_is_refused_with_the_reason(tiny_data, finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)  # a copy: the other tests read the original
    result = run_job(tiny_train_args(tiny_data, run_dir, "train.max_steps=10", "model.hidden_size=32"), np_=2,
                     check=False)
    assert result.returncode != 0
    assert "another model shape (hidden_size: checkpoint 64 vs config 32)" in result.stdout + result.stderr


PLAIN_TRANSFORMERS = r"""
import sys, json, torch
sys.modules["app"] = None  # prove that no project code is needed
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("ROMEO: But soft, what light", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(input_ids=ids).logits
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
torch.save({"ids": ids, "logits": logits, "weights": model.state_dict()}, sys.argv[2])
print(json.dumps({"text": tok.decode(out[0], skip_special_tokens=True), "new_tokens": out.shape[1] - ids.shape[1]}))
"""
# Below llama_tiny's 131 KB embedding (512 x 64 float32) and its 0.5 MB in all: several shards,
# and a tensor over the limit, which gets a shard of its own.
SMALL_SHARDS = "100KB"


@pytest.fixture(scope="module")
def sharded_export(finished_run, tmp_path_factory):
    """The finished run exported in float32 with shards small enough to split it. In this process:
    bf16_export runs the command line."""
    out = tmp_path_factory.mktemp("export") / "sharded"
    export.export(OmegaConf.structured(config.ExportConfig(checkpoint=str(finished_run), out=str(out),
                                                           max_shard_size=SMALL_SHARDS)))
    return out


def test_a_sharded_export_loads_in_plain_transformers_and_generates_as_the_checkpoint_does(finished_run,
                                                                                           sharded_export, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS)
    env = {k: v for k, v in job_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(script), str(sharded_export), str(tmp_path / "plain.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    generated = json.loads(result.stdout.strip().splitlines()[-1])
    plain = torch.load(tmp_path / "plain.pt")

    found = checkpoint.find(str(finished_run))
    saved = checkpoint.read_weights(found)
    assert sorted(plain["weights"]) == sorted(saved)
    assert all(torch.equal(plain["weights"][name], tensor) for name, tensor in saved.items())
    ours = checkpoint.load_trained_model(found)
    with torch.no_grad():
        our_logits = ours(input_ids=plain["ids"]).logits
    torch.testing.assert_close(our_logits, plain["logits"], rtol=0, atol=1e-6)
    tok = tokenizer.load(checkpoint.tokenizer_dir(found))
    ours_greedy = generate.generate_text(ours, tok, "ROMEO: But soft, what light", max_new_tokens=8, temperature=1.0,
                                         top_k=0, greedy=True)
    assert generated["new_tokens"] == 8 and generated["text"] == ours_greedy


def test_a_sharded_export_is_cut_and_indexed_as_hugging_face_cuts_it(finished_run, sharded_export):
    saved = checkpoint.read_weights(checkpoint.find(str(finished_run)))
    expected = split_torch_state_dict_into_shards(saved, filename_pattern="model{suffix}.safetensors",
                                                  max_shard_size=SMALL_SHARDS)
    index = json.loads((sharded_export / "model.safetensors.index.json").read_text())
    count = len(expected.filename_to_tensors)
    assert count > 2 and index["weight_map"] == expected.tensor_to_filename
    shards = sorted(p.name for p in sharded_export.glob("model*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    for shard in shards:
        with safe_open(str(sharded_export / shard), framework="pt") as opened:
            assert sorted(opened.keys()) == sorted(expected.filename_to_tensors[shard])
            assert opened.metadata() == {"format": "pt"}
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in saved.values()),
                                 "total_parameters": sum(t.numel() for t in saved.values())}


def test_a_tied_bf16_export_writes_what_save_pretrained_writes(finished_run, tmp_path):
    """The names (the LM head stored as the embedding it shares), the dtype in config.json, the
    generation config, the shards and the index are those of transformers' own save_pretrained."""
    model_cfg = OmegaConf.merge(OmegaConf.structured(config.ModelConfig),
                                OmegaConf.load(ROOT / "conf/model/llama_tiny.yaml"), {"tie_embeddings": True})
    model = models.build_causal_lm(model_cfg, vocab_size=512)
    run_dir = tmp_path / "run"
    state = checkpoint.TrainState(step=1, model_signature=checkpoint.model_signature(model))
    optimizer = optim.build_optimizer(model, OmegaConf.structured(config.OptimConfig), lr=1e-3)
    found = checkpoint.save(run_dir, model, plain_shard(model, optimizer), state, [], keep_last=1)
    shutil.copytree(checkpoint.run_tokenizer_dir(finished_run), checkpoint.run_tokenizer_dir(run_dir))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    export.export(OmegaConf.structured(config.ExportConfig(checkpoint=str(run_dir), out=str(ours), dtype="bfloat16",
                                                           max_shard_size=SMALL_SHARDS)))
    checkpoint.load_trained_model(found).to(torch.bfloat16).save_pretrained(theirs, max_shard_size=SMALL_SHARDS)

    weights_and_configs = {p.name for p in theirs.iterdir()}
    assert "model-00002-of-00003.safetensors" in weights_and_configs
    assert weights_and_configs <= {p.name for p in ours.iterdir()}
    for name in ("config.json", "generation_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    our_index, their_index = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (ours, theirs))
    assert our_index["metadata"] == their_index["metadata"]
    assert sorted(our_index["weight_map"]) == sorted(their_index["weight_map"])
    assert "lm_head.weight" not in our_index["weight_map"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(ours)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16),
                               rtol=0, atol=0)


def test_max_shard_size_takes_transformers_sizes_or_bytes_and_refuses_anything_else(finished_run, tmp_path):
    assert [export.max_shard_bytes(v) for v in ("5GB", "500MB", "1.5KB", "500000000")] == [
        5 * 10**9, 500 * 10**6, 1500, 500000000]
    out = tmp_path / "exported"
    for bad in ("5 parsecs", "0", "-1GB", "GB"):
        with pytest.raises(config.ConfigError) as refused:
            export.export(OmegaConf.structured(config.ExportConfig(checkpoint=str(finished_run), out=str(out),
                                                                   max_shard_size=bad)))
        assert str(refused.value).startswith(f"max_shard_size={bad!r} is not a size") and "500MB" in str(refused.value)
    assert not out.exists()


def test_generate_is_reproducible_by_seed_and_greedy_is_deterministic(finished_run):
    """In this process (the command line's own path is the README line's test below), and the
    global RNG drawn from between calls, as any earlier sampling would."""
    def sample(**knobs):
        torch.rand(7)
        return generate.main_with(OmegaConf.structured(config.GenerateConfig(
            checkpoint=str(finished_run), max_new_tokens=12, stream=False, **knobs)))

    seed_1 = sample(seed=1)
    assert sample(seed=1) == seed_1
    assert sample(seed=2) != seed_1
    assert sample(greedy=True, seed=1) == sample(greedy=True, seed=2)
    bad = run_job([f"checkpoint={finished_run}", "max_new_tokenz=3"], launcher="none", module="app.generate",
                  check=False)
    assert bad.returncode == 2 and "max_new_tokenz" in bad.stderr


def test_the_readme_generation_line_runs_as_typed(finished_run):
    """The shell drops the quotes of prompt="ROMEO:", so the tool sees ROMEO: bare: still a string."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python -m app.generate checkpoint=runs/<stamp>"))
    command = line.replace("python", shlex.quote(sys.executable), 1).replace("runs/<stamp>", str(finished_run))
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:") + 20


@pytest.fixture(scope="module")
def bf16_export(finished_run, tmp_path_factory):
    """The finished run exported in bfloat16, as most published LLaMA checkpoints are."""
    out = tmp_path_factory.mktemp("export") / "bf16"
    run_job([f"checkpoint={finished_run}", f"out={out}", "dtype=bfloat16"], launcher="none", module="app.export")
    return out


def test_an_export_within_one_shard_is_one_model_safetensors_with_no_index(bf16_export):
    assert sorted(p.name for p in bf16_export.glob("model*")) == ["model.safetensors"]
    assert json.loads((bf16_export / "config.json").read_text())["dtype"] == "bfloat16"


def test_fine_tuning_from_a_bf16_export_trains_in_float32_and_says_once_what_it_loaded(tiny_data, bf16_export,
                                                                                        tmp_path):
    exported = load_file(str(bf16_export / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    run_dir = tmp_path / "run"
    result = run_job(tiny_train_args(tiny_data, run_dir, f"model.init_from={bf16_export}", "train.max_steps=2"), np_=2)
    trained = checkpoint.read_weights(checkpoint.latest(run_dir))
    assert {t.dtype for t in trained.values()} == {torch.float32}
    moved = max((trained[k] - exported[k].float()).abs().max().item() for k in exported)
    assert moved > 1e-4, "the run did not train from the exported weights"
    output = result.stdout + result.stderr
    assert output.count(f"model.init_from: LlamaForCausalLM loaded from {bf16_export}") == 1
    # transformers' own load messages come from rank 0 only.
    assert not [line for line in output.splitlines() if line.startswith("[1]") and "Loading weights" in line]


def test_runs_and_exports_are_readable_as_the_umask_allows(finished_run, bf16_export):
    """Files follow the umask (0644 under 022), as save_pretrained's do, not tempfile's 0600."""
    mask = fileio.umask()
    files = [finished_run / "config.yaml", finished_run / "summary.json", bf16_export / "model.safetensors",
             checkpoint.latest(finished_run) / "state.json", checkpoint.latest(finished_run) / "model-rank00000.safetensors"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    for path in [bf16_export, checkpoint.latest(finished_run), finished_run / "checkpoints"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask, path


def test_evaluate_on_two_ranks_equals_one_rank(finished_run):
    args = [f"checkpoint={finished_run}", "batch_size=5", "max_batches=7"]
    one = last_json_line(run_job(args, launcher="none", module="app.evaluate").stdout)
    two = last_json_line(run_job(args, np_=2, module="app.evaluate").stdout)
    assert one["val/windows"] == two["val/windows"] == 35 and two["ranks"] == 2
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-9)
    assert two["val/perplexity"] == pytest.approx(math.exp(two["val/loss"]))
