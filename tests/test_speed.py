"""What makes training fast, and what shows where its time goes: torch.compile (train.compile),
batches prepared ahead (train.prefetch_steps), the torch.profiler trace (train.profile_steps),
Horovod's timeline and autotune log (horovod.timeline, horovod.autotune)."""
import csv
import json
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from app import cli, compilation, config, models
from app.prefetch import BatchPrefetcher
from app.tasks import CausalLM
from conftest import ROOT, TINY_VOCAB, last_json_line, read_metrics, read_summary, run_job, run_worker, tiny_train_args

# Compiled kernels add and multiply in another order than eager ones: fp32 losses agree to
# rounding, and after three AdamW steps (whose first update is lr x sign(gradient)) weights
# differ by a few 1e-6; 1e-4 is far below lr = 1e-3 times anything a wrong gradient would move.
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4


# Each mode once, on two ranks (a compile costs far more than the second rank): the whole model
# under Horovod's gradient hooks, and each decoder layer compiled after the layout has changed it
# (recomputed, checkpointed layers; gradients sharded by ZeRO).
@pytest.mark.parametrize("ranks,mode,layout", [
    (2, "model", []),
    (2, "regional", ["parallel.zero_stage=1", "train.activation_checkpointing=full"]),
])
def test_compiled_step_matches_eager_loss_and_weights(tiny_data, ranks, mode, layout):
    result = last_json_line(run_worker("compile_equivalence.py", [tiny_data, mode, "fp32", 3, *layout], np_=ranks,
                                       launcher="mpi", timeout=900).stdout)
    assert result["ranks"] == ranks and result["same_names"]
    assert result["eager_losses"][-1] < result["eager_losses"][0]  # it trains
    assert result["max_loss_diff"] <= LOSS_TOLERANCE, result
    assert result["max_weight_diff"] <= WEIGHT_TOLERANCE, result
    assert result["replicas_identical"]  # Horovod's hooks averaged the compiled graph's gradients


def test_regional_compile_compiles_each_decoder_layer_in_place_and_model_compiles_the_loss():
    cfg = cli.compose_config(["model=llama_tiny"])
    model = models.build_causal_lm(cfg.model, vocab_size=64)
    names = [name for name, _ in model.named_parameters()]
    assert compilation.apply(model, models.causal_lm_loss, "regional") is models.causal_lm_loss
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints and hooks unchanged
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == list(model.model.layers) and len(compiled) == cfg.model.num_layers
    loss_of = compilation.apply(model, models.causal_lm_loss, "model")
    assert loss_of is not models.causal_lm_loss and loss_of.__wrapped__ is models.causal_lm_loss
    assert compilation.apply(model, models.causal_lm_loss, "False") is models.causal_lm_loss


def _task(data_dir, rank=0, world=2, accum=2):
    cfg = cli.compose_config(["model=llama_tiny", f"data.vocab_size={TINY_VOCAB}", f"data.dir={data_dir}",
                              "train.micro_batch_size=3", f"train.grad_accum_steps={accum}"])
    OmegaConf.resolve(cfg)
    return CausalLM(cfg, rank, world)


def _same(left, right) -> bool:
    (left_batches, left_tokens, left_samples), (right_batches, right_tokens, right_samples) = left, right
    return left_tokens == right_tokens and left_samples == right_samples and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(left_batches, right_batches))


def test_prefetched_batches_are_the_ones_each_step_would_read(tiny_data):
    task = _task(tiny_data, rank=1)
    on_demand, ahead = BatchPrefetcher(task, 2, depth=0), BatchPrefetcher(task, 2, depth=3)
    step_samples = task.stream.global_batch
    # Steps in order, then a jump (a resume elsewhere in the stream) and a step back.
    positions = [0, step_samples, 2 * step_samples, 40 * step_samples, 41 * step_samples, step_samples]
    try:
        for position in positions:
            assert _same(ahead.get(position), on_demand.get(position)), position
    finally:
        ahead.close()
    first, _, samples = on_demand.get(0)
    assert len(first) == 2 and first[0]["input_ids"].shape == (3, task.seq_len)
    # Rank 1 of 2, 2 micro-batches of 3: its slice is the global batch's second half, as read.
    assert samples == [range(6, 9), range(9, 12)]
    assert torch.equal(first[1]["input_ids"], task.stream.windows.batch(9, 3)[0])
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])  # micro-batches differ


def test_a_failing_batch_is_raised_in_the_step_that_needed_it(tiny_data):
    task = _task(tiny_data)
    task.micro_batch = lambda samples_before, micro_step: {"input_ids": torch.zeros(1)} if samples_before == 0 \
        else (_ for _ in ()).throw(ValueError("bad window"))
    prefetcher = BatchPrefetcher(task, 1, depth=2)
    try:
        prefetcher.get(0)
        with pytest.raises(ValueError, match="bad window"):
            prefetcher.get(task.stream.global_batch)
    finally:
        prefetcher.close()


def _trace_events(path) -> list:
    return json.loads(path.read_text())["traceEvents"]


def test_profile_timeline_and_autotune_files_land_in_the_run_dir_and_parse(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_job(tiny_train_args(tiny_data, run_dir, "train.profile_steps=[2,3]", "horovod.timeline=true",
                            "horovod.autotune=true"), np_=2, launcher="mpi")
    traces = list((run_dir / "profile").glob("*.pt.trace.json"))
    assert [t.name for t in traces] == ["rank0.steps_2-3.pt.trace.json"]  # one writer: rank 0
    names = {event.get("name", "") for event in _trace_events(traces[0])}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#4" not in names
    assert any(name.startswith("aten::mm") for name in names)

    timeline = json.loads((run_dir / "horovod_timeline.json").read_text())  # complete JSON: stopped at the end
    allreduced = {event.get("args", {}).get("name", "") for event in timeline if event.get("ph") == "M"}
    assert any("model.layers.0" in name for name in allreduced), sorted(allreduced)[:5]
    assert any(event.get("name") == "ALLREDUCE" for event in timeline)

    # The autotuner's samples need more steps than a test runs; its log starts with the header.
    with open(run_dir / "horovod_autotune.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert {"cycle_time_ms", "tensor_fusion_threshold", "score"} <= set(header)
    horovod = read_summary(run_dir)["horovod"]
    assert horovod["HOROVOD_TIMELINE"] == "DYNAMIC" and horovod["HOROVOD_AUTOTUNE"] == "1"


def test_compile_warmup_is_reported_alone_and_left_out_of_tokens_per_second(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_job(tiny_train_args(tiny_data, run_dir, "train.compile=regional", "train.max_steps=4",
                                     "train.progress_bar=true"), np_=1, launcher="none")
    # tqdm redraws the bar with carriage returns; its last state counts the warm-up step too.
    assert re.findall(r"\b(\d)/4\b", result.stderr)[-1] == "4"
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 1 and rows[0]["time/compile_warmup_s"] > 0 and "tokens_per_second" not in rows[0]
    timed = [row for row in rows if "tokens_per_second" in row]
    assert [row["step"] for row in timed] == [2, 4]
    # The first window holds one step (2) after the warm-up, the next two (3, 4): tokens_seen counts all.
    assert timed[-1]["tokens_seen"] == 4 * 4 * 64
    assert read_summary(run_dir)["replicas_identical"]


@pytest.mark.parametrize("override,message", [
    ("train.compile=fast", "train.compile='fast' is not one of false, model, regional"),
    ("train.profile_steps=[3,2]", "train.profile_steps=[3, 2] must be [first, last]"),
    ("train.prefetch_steps=-1", "train.prefetch_steps=-1 must be 0 (off) or more"),
])
def test_bad_speed_settings_are_one_line_and_exit_2(tiny_data, tmp_path, override, message):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", override), np_=1, launcher="none", check=False,
                     timeout=120)
    assert result.returncode == 2
    errors = [line for line in (result.stdout + result.stderr).splitlines() if message in line]
    assert len(errors) == 1, result.stdout[-2000:] + result.stderr[-2000:]


# Page faults while a 64 MiB tensor is made and freed five times, before and after the trainer
# asks glibc to keep freed memory (train.keep_freed_memory), in a fresh interpreter.
_CHURN = """
import resource, torch
from app import runtime
def faults_while_churning():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults_while_churning()
kept = runtime.keep_freed_memory()
faults_while_churning()  # the heap grows once
print(default, kept, faults_while_churning())
"""


def test_kept_freed_memory_is_reused_without_new_page_faults():
    output = subprocess.run([sys.executable, "-c", _CHURN], cwd=ROOT, capture_output=True, text=True, check=True)
    default, kept, after = output.stdout.split()
    assert kept == "True"
    # By default each 64 MiB block is a fresh mmap: 16,384 pages faulted in, five times over.
    assert int(default) > 5 * 16_000 and int(after) < int(default) / 20, output.stdout


# How far the resident set drops when a 16 MiB tensor is freed, the second time one is made and
# freed, with glibc told to return freed memory (ZeRO's default), to keep it, or left alone, each in
# a fresh interpreter. Left alone, glibc raises its mmap threshold to 16 MiB at the first free and
# keeps the second block. Measured as a drop, not as growth since the start, so that torch's
# thread pool starting up in the first op does not count.
_HOLD = """
import sys, psutil, torch
from app import runtime
taken = {"return": runtime.return_freed_memory, "keep": runtime.keep_freed_memory, "default": lambda: True}
print(taken[sys.argv[1]]())
for _ in range(2):
    block = torch.ones(4 << 20)
    alive = psutil.Process().memory_info().rss
    del block
    drop = alive - psutil.Process().memory_info().rss
print(drop)
"""


@pytest.mark.parametrize("policy, returned", [("return", True), ("keep", False), ("default", False)])
def test_returned_freed_memory_leaves_the_resident_set(policy, returned):
    output = subprocess.run([sys.executable, "-c", _HOLD, policy], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    taken, drop = output.stdout.split()
    assert taken == "True"
    assert (int(drop) > 14 << 20) if returned else (int(drop) < 2 << 20), output.stdout


@pytest.mark.parametrize("setting, stage, keeps", [(None, 0, True), (None, 1, False), (None, 3, False),
                                                   (True, 3, True), (False, 0, False)])
def test_freed_memory_is_kept_by_default_unless_zero_shards_the_model(setting, stage, keeps):
    cfg = OmegaConf.create({"train": {"keep_freed_memory": setting}, "parallel": {"zero_stage": stage}})
    assert config.keeps_freed_memory(cfg) is keeps


def test_whole_model_compile_is_refused_under_a_pipeline_on_every_rank(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "parallel.pipeline=2", "train.compile=model",
                                     "train.grad_accum_steps=2"), np_=2, launcher="mpi", check=False, timeout=300)
    assert result.returncode == 2
    message = "train.compile=model compiles the whole model's loss, which no pipeline stage runs"
    assert sum(message in line for line in (result.stdout + result.stderr).splitlines()) == 2  # one per rank
