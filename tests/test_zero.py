"""ZeRO sharding (parallel.zero_stage=1..3) and activation checkpointing.

Real 2-rank Horovod jobs, fp32 with deterministic kernels, two micro-batches accumulated per
step. The reference is one process with the same global batch at stage 0. Stages 1-3 train with
SGD (momentum) and no clipping, so a uniform factor in the gradient (a mean taken twice, a sum
for a mean) reaches the weights and the logged gradient norm; clipping, or AdamW's update,
would erase it. One AdamW case clipped on every step (conftest.CLIPPED, far below the tiny
model's gradient norm) keeps the optimizer state's sharding and the sharded clip tested: a
plain AdamW run resumed at stage 3.

Tolerance: ADAM_ATOL = 1e-5 on the weights after 6 steps, as in test_equivalence.py, for both
optimizers (SGD has no division to amplify rounding, so it stays further inside). Sharding
changes only the order of float32 sums: the reducescatter's mean over ranks, the global norm
as a sum of the slices' squared norms instead of a norm of per-tensor norms, the micro-batch
sum of already-averaged slices (stages 2-3). Each is ~1e-7 relative per step; Adam divides by
sqrt(v), which amplifies it where gradients are tiny, so weights differ by up to a few 1e-6
(measured with AdamW on every stage: 5.6e-6 at stage 1, 2.8e-6 at stage 3). A real bug (a slice applied at the wrong
offset, a missing average, a rank's slice lost, no clipping) moves weights by ~lr = 1e-3.

Launches are shared (module fixture): one reference process per optimizer, stages 1, 2 and 3 on
2 ranks (checkpointing at steps 3 and 6), two resumes across stage and world size, and one of
stage 1's checkpoint into a tensor split.
"""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from app import checkpoint, cli, config, export, generate, tokenizer
from app.parallel.flat import split_sizes
from app.parallel.layers import apply_activation_checkpointing, transformer_layers
from conftest import (CLIPPED, ROOT, UNCLIPPED, assert_always_clipped, assert_never_clipped, assert_same_grad_norms,
                      job_env, last_json_line, read_metrics, read_summary, run_job, tiny_train_args)

ADAM_ATOL = 1e-5
# Evaluation at step 4 and at the end, right after a step: stages 1-2 gather the parameters
# lazily (at the next forward), so evaluation sees the updated model only if it gathers first.
SETTINGS = ("train.grad_accum_steps=2", "train.checkpoint_every=3", "train.keep_last=2", "train.resume=never",
            "train.eval_every=4", "train.eval_batches=2")
SGD = ("optim=sgd_momentum", UNCLIPPED)
ADAMW_CLIPPED = ("optim=adamw", CLIPPED)


def launch(data, run_dir, np_, *extra):
    """6 optimizer steps of 8 samples (4 per rank on 2 ranks), checkpoints at steps 3 and 6."""
    micro = 4 // np_
    run_job(tiny_train_args(data, run_dir, *SETTINGS, f"train.micro_batch_size={micro}", *extra), np_=np_,
            launcher="gloo" if np_ > 1 else "none")
    return run_dir


def step_dir(run_dir, step):
    return checkpoint.checkpoints_root(run_dir) / checkpoint.step_dir_name(step)


def weights(run_dir, step=6):
    return checkpoint.read_weights(step_dir(run_dir, step))


def max_abs_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    found = {"one": launch(tiny_data, root / "one", 1, *SGD),
             "one_adamw": launch(tiny_data, root / "one_adamw", 1, *ADAMW_CLIPPED)}
    for stage in (1, 2, 3):
        # Stage 3 also ends with a sample, which gathers the whole model only then.
        sample = ["train.sample_tokens=4"] if stage == 3 else []
        found[stage] = launch(tiny_data, root / f"stage{stage}", 2, *SGD, f"parallel.zero_stage={stage}", *sample)
    # Across stage and world size, both ways, from the step-3 checkpoints; into stage 3 with AdamW.
    found["3_to_1rank_stage0"] = launch(tiny_data, root / "to0", 1, *SGD, f"train.resume={step_dir(found[3], 3)}")
    found["1rank_stage0_to_3"] = launch(tiny_data, root / "to3", 2, *ADAMW_CLIPPED, "parallel.zero_stage=3",
                                        f"train.resume={step_dir(found['one_adamw'], 3)}")
    # Stage 1's flat slices into a tensor split (one data replica: the whole batch per step).
    found["1_to_t2"] = root / "to_t2"
    run_job(tiny_train_args(tiny_data, found["1_to_t2"], *SETTINGS, "train.micro_batch_size=4", *SGD,
                            "parallel.tensor=2", f"train.resume={step_dir(found[1], 3)}"), np_=2, launcher="gloo")
    return found


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_on_two_ranks_takes_the_steps_of_one_process_with_the_whole_batch(runs, stage):
    reference, initial = weights(runs["one"]), weights(runs["one"], step=3)
    assert max_abs_difference(reference, initial) > 100 * ADAM_ATOL, "the runs barely moved"
    assert max_abs_difference(weights(runs[stage]), reference) < ADAM_ATOL
    assert_never_clipped(runs["one"])
    assert_same_grad_norms(runs[stage], runs["one"])
    summary = read_summary(runs[stage])
    assert summary["layout"]["mode"] == f"zero{stage}" and summary["replicas_identical"]
    # ZeRO runs under jemalloc by default (train.allocator): every rank re-executed itself with it.
    assert {r["memory"]["malloc"] for r in summary["replicas"]} == {"jemalloc"}
    assert {r["memory"]["malloc"] for r in read_summary(runs["one"])["replicas"]} == {"glibc"}


def test_evaluation_right_after_a_step_sees_the_updated_model(runs):
    """Stages 1-2 gather updated parameters lazily, at the next forward; evaluation right after a
    step (step 4, and the end) must see them, as stage 3's layer-by-layer forwards gather them.
    Two ranks evaluate other windows than one, so the 2-rank runs are compared with each other."""
    val = {stage: [row["val/loss"] for row in read_metrics(runs[stage]) if "val/loss" in row] for stage in (1, 2, 3)}
    assert len(val[3]) == 2
    assert val[1] == pytest.approx(val[3], rel=1e-6) and val[2] == pytest.approx(val[3], rel=1e-6)


def test_stage_3_evaluates_and_samples_layer_by_layer_as_one_process_does(runs):
    """Stage 3 never gathers the whole model after training (its summary counts the whole-model
    gathers: the end's evaluation and sample included, none), and its last evaluation and its
    sample equal one process's on the final checkpoint: the same windows (2 batches of 2), the
    same tokens by seed."""
    assert read_summary(runs[3])["layout"]["whole_model_gathers"] == 0
    final = step_dir(runs[3], 6)
    evaluated = last_json_line(run_job([f"checkpoint={final}", "batch_size=2", "max_batches=2"], launcher="none",
                                       module="app.evaluate").stdout)
    last = [row["val/loss"] for row in read_metrics(runs[3]) if "val/loss" in row][-1]
    assert evaluated["val/loss"] == pytest.approx(last, abs=1e-5)
    train_cfg = OmegaConf.create(checkpoint.read_state(final).config).train
    expected = generate.generate_text(checkpoint.load_trained_model(final), tokenizer.load(checkpoint.tokenizer_dir(final)),
                                      train_cfg.sample_prompt, train_cfg.sample_tokens, train_cfg.sample_temperature,
                                      train_cfg.sample_top_k, seed=train_cfg.seed)
    sample = re.search(r"sample:\n(.*?)\n\[", (runs[3] / "train.log").read_text(), re.DOTALL)
    assert sample is not None and sample.group(1) == expected


def test_stage_3_ends_sharded(runs):
    log = (runs[3] / "train.log").read_text()
    assert "sample:" in log and "parameters identical on all 2 ranks holding the same part: True" in log
    # The memory at rest is recorded after the last step: the slices, not the gathered model.
    assert read_summary(runs[3])["layout"]["state_bytes"]["parameters"] < 0.55 * read_summary(runs["one"])[
        "layout"]["state_bytes"]["parameters"]


@pytest.mark.parametrize("stage", [1, 3])
def test_each_rank_writes_only_the_flat_ranges_of_its_own_slices(runs, stage):
    """Both ranks write, each about half of the weights and of the optimizer state (its slices,
    gathered by nobody: at stage 1 the replicated weights' matching ranges), every entry a flat
    range, every element once."""
    saved = step_dir(runs[stage], 3)
    whole = sum(t.numel() for t in weights(runs[stage], 3).values())
    for kind in ("model", "optim"):
        held = [sum(t.numel() for t in load_file(str(saved / f"{kind}-rank{rank:05d}.safetensors")).values())
                for rank in (0, 1)]
        assert sum(held) == whole and max(held) <= 0.51 * whole, (kind, held, whole)
    index = json.loads((saved / "index.json").read_text())
    boxes = [box for tensor in index["weights"].values() for box in tensor["boxes"]]
    assert all("flat_offset" in box for box in boxes)
    assert sum(box["flat_length"] for box in boxes) == whole


@pytest.mark.parametrize("damage", ["overlap", "gap"])
def test_a_damaged_flat_range_is_an_error_naming_the_index(runs, tmp_path, damage):
    """One flat range moved back over its neighbour's, or shortened to leave a hole."""
    saved = tmp_path / "step"
    shutil.copytree(step_dir(runs[3], 3), saved)
    index = json.loads((saved / "index.json").read_text())
    tensor = next(t for t in index["weights"].values() if len(t["boxes"]) == 2)
    later = max(tensor["boxes"], key=lambda box: box["flat_offset"])
    if damage == "overlap":
        later["flat_offset"] -= 1
    else:
        later["flat_length"] -= 1
    (saved / "index.json").write_text(json.dumps(index))
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint file {re.escape(str(saved / 'index.json'))} "
                       "is damaged .*(overlap|do not cover)"):
        checkpoint.verify(saved)


def test_a_run_without_a_final_checkpoint_writes_none(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_job(tiny_train_args(tiny_data, run_dir, "train.max_steps=2", "train.final_checkpoint=false"), np_=1,
            launcher="none")
    assert read_summary(run_dir)["step"] == 2
    assert not checkpoint.checkpoints_root(run_dir).exists() or not any(checkpoint.checkpoints_root(run_dir).iterdir())


def test_clipping_was_active_so_the_global_norm_was_tested(runs):
    # grad_norm is logged before clipping; above grad_clip means every step was scaled down.
    assert_always_clipped(runs["1rank_stage0_to_3"])
    assert_same_grad_norms(runs["1rank_stage0_to_3"], runs["one_adamw"])


def test_sharded_checkpoint_holds_the_plain_optimizer_state_dict(runs):
    """AdamW's state (two moments and a step count per parameter), saved from stage 3's slices."""
    sharded = checkpoint.load_optimizer_state(step_dir(runs["1rank_stage0_to_3"], 6))
    plain = checkpoint.load_optimizer_state(step_dir(runs["one_adamw"], 6))
    assert [g["params"] for g in sharded["param_groups"]] == [g["params"] for g in plain["param_groups"]]
    assert sharded["state"].keys() == plain["state"].keys()
    for index, entry in plain["state"].items():
        assert sharded["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            other = sharded["state"][index][key]
            assert other.shape == value.shape
            assert (other - value).abs().max() <= 1e-3 * value.abs().max() + 1e-12, (index, key)


def test_resume_across_stage_and_world_size_both_ways(runs):
    reference = weights(runs["one"])
    assert max_abs_difference(weights(runs["3_to_1rank_stage0"]), reference) < ADAM_ATOL
    assert max_abs_difference(weights(runs["1_to_t2"]), reference) < ADAM_ATOL
    assert [row["step"] for row in read_metrics(runs["1_to_t2"]) if "train/loss" in row][0] > 3  # resumed
    assert max_abs_difference(weights(runs["1rank_stage0_to_3"]), weights(runs["one_adamw"])) < ADAM_ATOL


def test_export_of_a_sharded_run_is_the_full_hugging_face_model(runs, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "exported"
    export.export(OmegaConf.structured(config.ExportConfig(checkpoint=str(runs[3]), out=str(out))))
    exported = LlamaForCausalLM.from_pretrained(out).state_dict()
    reference = weights(runs["one"])
    assert max((exported[k] - reference[k]).abs().max().item() for k in reference) < ADAM_ATOL


def test_each_rank_holds_about_half_the_model_state_of_a_replica(runs):
    """Bytes held at rest (after the last step) by rank 0, the rank with the larger slice."""
    replica = read_summary(runs["one"])["layout"]["state_bytes"]
    stage1 = read_summary(runs[1])["layout"]["state_bytes"]
    stage3 = read_summary(runs[3])["layout"]["state_bytes"]
    # Stage 1: SGD's momentum per element, half the elements per rank.
    assert stage1["optimizer_state"] <= 0.55 * replica["optimizer_state"]
    assert stage1["parameters"] >= replica["parameters"]  # replicated (plus nothing: slices are views)
    # Stage 3: parameters too (the slices alone; full buffers are freed between uses).
    assert stage3["parameters"] <= 0.55 * replica["parameters"]
    assert sum(stage3.values()) <= 0.55 * sum(replica.values())


# Stands in for os.execve: says whether torch had been imported when app.train re-executed itself.
_REEXEC_PROBE = """
import os, runpy, sys
os.environ.pop("LLAMA_HOROVOD_PRELOADED", None)
os.execve = lambda *args: (print("torch imported:", "torch" in sys.modules), sys.exit(0))
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__")
"""
_ZERO = ["parallel.zero_stage=1", "train.allocator=jemalloc"]


@pytest.mark.parametrize("module", ["app.train", "app.bench.layouts"])
def test_a_zero_rank_re_executes_itself_under_jemalloc_before_importing_torch(module, tmp_path):
    spec = tmp_path / "spec.json"  # a bench worker's overrides are in its spec
    spec.write_text(json.dumps({"overrides": _ZERO}))
    argv = _ZERO if module == "app.train" else [str(spec)]
    result = subprocess.run([sys.executable, "-c", _REEXEC_PROBE, module, *argv], cwd=ROOT, env=job_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "torch imported: False", result.stdout + result.stderr[-2000:]


def test_split_follows_horovods_reducescatter_rule():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 4) == [1, 1, 1, 0]


@pytest.mark.parametrize("override, message", [
    ("parallel.zero_stage=4", "parallel.zero_stage=4 is not one of 0, 1, 2, 3"),
    ("train.activation_checkpointing=some", "train.activation_checkpointing='some' is not one of none, full"),
    ("sync=local_sgd", "parallel.zero_stage=2 averages gradients itself"),
    ("train.allocator=tcmalloc", "train.allocator='tcmalloc' is not one of null, glibc, jemalloc"),
])
def test_bad_sharding_settings_are_one_line_naming_the_fix(override, message):
    cfg = cli.compose_config(["model=llama_tiny", "parallel.zero_stage=2", override])
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")) as raised:
        config.validate(cfg)
    assert "\n" not in str(raised.value)


def _gradients(model, batch, loss_of):
    model.zero_grad()
    loss_of(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _counting_forwards(layer):
    calls = []
    original = layer.forward
    layer.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    return calls


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("mode", ["full", "every_k"])
def test_activation_checkpointing_gives_the_gradients_of_no_checkpointing(family, mode):
    """Recomputation runs the same kernels on the same inputs (and, for BERT, the same dropout
    masks: the RNG state is restored), so gradients are bitwise equal."""
    from app import models
    model_cfg = cli.compose_config([f"model={family}_tiny"]).model
    torch.manual_seed(0)
    if family == "llama":
        model = models.build_causal_lm(model_cfg, 128)
        batch = torch.randint(0, 128, (2, 16))
        loss_of = lambda m, b: models.causal_lm_loss(m, b[:, :-1], b[:, 1:])  # noqa: E731
    else:
        model = models.build_encoder(model_cfg, 128, 0, "mlm")
        batch = torch.randint(1, 128, (2, 16))
        loss_of = lambda m, b: m(input_ids=b, labels=b).loss  # noqa: E731
    model.train()
    torch.manual_seed(1)
    plain = _gradients(model, batch, loss_of)
    counters = [_counting_forwards(layer) for layer in transformer_layers(model)]
    chosen = apply_activation_checkpointing(model, mode, every=2)
    torch.manual_seed(1)
    recomputed = _gradients(model, batch, loss_of)
    assert chosen == ([0, 1] if mode == "full" else [0])
    # A checkpointed layer runs its forward twice (once more in backward), the others once.
    assert [len(c) for c in counters] == [2 if i in chosen else 1 for i in range(len(counters))]
    assert plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)


def test_planner_counts_the_7b_preset_without_memory_and_shards_by_stage():
    from app import plan
    parameters = plan.count_parameters(cli.compose_config(["model=llama_7b"]))
    assert parameters == 6_738_415_616  # LLaMA-2 7B's count: the preset is its shape
    per_rank = plan.model_state_bytes(parameters, stage=3, world=8)
    assert per_rank == {"parameters": 4 * parameters / 8, "gradients": 4 * parameters / 8,
                        "optimizer_state": 8 * parameters / 8}
    assert plan.model_state_bytes(parameters, stage=1, world=8)["gradients"] == 4 * parameters
    # 16 bytes per parameter replicated is 100 GiB: no stage fits one 80 GiB rank, stage 1 fits 2.
    assert plan.smallest_fit(parameters, 8, 80 * 2**30) == (2, 1)


def test_bench_memory_targets_are_the_issues_ratios_of_measured_values():
    from app.bench import memory, report

    def run(stage, optimizer_state, model_state, tokens_per_second, malloc="jemalloc", default=True):
        return {"zero_stage": stage, "activation_checkpointing": "none", "peak_bytes_per_rank": [2**30, 2**30],
                "malloc": malloc, "default_allocator": default,
                "model_state_bytes": model_state, "tokens_per_second": tokens_per_second,
                "held_bytes_rank0": {"parameters": 4, "gradients": 0, "optimizer_state": optimizer_state},
                "predicted_model_state_bytes": {"parameters": 4, "gradients": 4, "optimizer_state": 8}}
    runs = [run(0, 800, 1600, 100.0, "glibc, freed memory kept"), run(1, 420, 1200, 96.0), run(3, 400, 900, 80.0),
            run(0, 800, 1700, 90.0, default=False)]
    found = {t["name"]: t for t in memory.targets(runs)}
    assert found["stage 1 / stage 0 optimizer-state bytes per rank"]["value"] == 420 / 800
    assert found["stage 1 / stage 0 optimizer-state bytes per rank"]["met"]  # 0.525 <= 0.55
    assert found["stage 3 / stage 0 model-state bytes per rank"]["value"] == 900 / 1600
    assert not found["stage 3 / stage 0 model-state bytes per rank"]["met"]  # 0.5625 > 0.55
    # The like-for-like ratios divide by the stage-0 run under ZeRO's malloc, not the default one.
    like = found["stage 3 / stage 0 model-state bytes per rank, both under ZeRO's malloc"]
    assert like["value"] == 900 / 1700 and like["met"]
    assert found["stage 3 / stage 0 tokens/s, both under ZeRO's malloc"]["value"] == 80 / 90
    # As run, throughput compares with the default stage-0 run (100 tokens/s), not the extra one.
    assert found["stage 1 / stage 0 tokens/s"]["met"] and not found["stage 3 / stage 0 tokens/s"]["met"]
    section = {"model": "llama_tiny", "parameters": 10**6, "processes": 2, "launcher": "mpi", "precision": "fp32",
               "optimizer": "adamw", "micro_batch_size": 2, "seq_len": 64, "runs": runs, "targets": list(found.values())}
    assert "## Memory per rank under ZeRO" in report.memory(section)


@pytest.mark.parametrize("cache_casts", [True, False])
def test_stage_3_autocast_keeps_no_cast_of_a_freed_layer(cache_casts):
    # Stage 3 frees each layer's gathered weights after its forward; a cached bf16 cast would
    # keep a copy of every layer alive until the forward ends (app/step.py turns it off).
    from app import runtime

    with runtime.autocast_context("bf16", torch.device("cpu"), cache_casts=cache_casts):
        assert torch.is_autocast_cache_enabled() is cache_casts
