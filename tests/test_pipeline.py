"""Pipeline parallelism computes what one process computes: real mpirun jobs against a
single-process run with the same global batch, and the pieces (schedules, the cut model, the
optimizer state's re-keying) checked alone.

Tolerances: runs are fp32 with deterministic kernels. A pipeline runs the same operations in the
same order as one process (stage boundaries only hand tensors over), so P=2 alone matches
exactly in practice; data parallelism across 2 pipelines averages two half-batch gradients,
which reorders float32 sums (~1e-7 relative per step), and AdamW's division by sqrt(v) can
amplify that where gradients are tiny: the same 1e-5 bound as tests/test_equivalence.py. A real
bug (a micro-batch dropped or counted twice, a stage stepping on unaveraged gradients, a clip by
one stage's norm) moves weights by about lr = 1e-3.

The runs train with SGD (momentum) and no clipping, and compare the logged gradient norms too:
a uniform factor in the gradient (a mean over micro-batches or pipelines taken twice) reaches
SGD's update, where clipping or AdamW's update would erase it. AdamW with clipping, and the
stages' optimizer state, are checked by the composed cells of tests/test_layouts.py.
"""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from app import checkpoint, cli, config, models, optim
from app.parallel import pipeline_schedule as schedule
from app import state_dicts as optimizer_state
from app.parallel.stages import Stage, layer_bounds
from conftest import (UNCLIPPED, assert_never_clipped, assert_same_grad_norms,
                      last_json_line, read_metrics, run_job, run_worker, tiny_train_args)

ADAM_ATOL = 1e-5
LOSS_ATOL = 1e-5
# 4 micro-batches of 4 per step (16 windows); checkpoints at step 3 for the resumes.
COMMON = ("train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3", "train.keep_last=3")
SGD = ("optim=sgd_momentum", UNCLIPPED)


# --- the pieces, in one process ------------------------------------------------------------
@pytest.mark.parametrize("name", schedule.SCHEDULES)
@pytest.mark.parametrize("stages,micro_batches", [(2, 4), (4, 8), (4, 2)])
def test_every_stage_runs_each_micro_batch_forward_then_backward_once(name, stages, micro_batches):
    for stage in range(stages):
        plan = schedule.actions(name, stage, stages, micro_batches)
        assert sorted(plan) == sorted([(k, i) for k in "FB" for i in range(micro_batches)])
        assert all(plan.index(("F", i)) < plan.index(("B", i)) for i in range(micro_batches))


def test_1f1b_holds_at_most_p_minus_s_micro_batches_where_gpipe_holds_all():
    assert schedule.actions("1f1b", 0, 2, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3),
                                                 ("B", 2), ("B", 3)]
    assert [schedule.most_activations_held(schedule.actions("1f1b", s, 4, 8)) for s in range(4)] == [4, 3, 2, 1]
    assert schedule.most_activations_held(schedule.actions("gpipe", 0, 4, 8)) == 8
    assert schedule.ideal_bubble_fraction(2, 4) == pytest.approx(1 / 5)


def tiny_model(num_layers=3, tie_embeddings=False):
    spec = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=2, num_kv_heads=None,
                           max_seq_len=16, rope_theta=1e4, norm_eps=1e-5, dropout=0.0, tie_embeddings=tie_embeddings,
                           init_std=0.02, init_from=None, vocab_size=None)
    torch.manual_seed(0)
    return models.build_causal_lm(spec, 64)


def test_stages_in_a_row_compute_the_whole_models_loss_and_own_every_parameter_once():
    model = tiny_model()
    assert [list(b) for b in layer_bounds(3, 2)] == [[0, 1], [2]]
    ids, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    first, last = Stage(model, 0, 2), Stage(model, 1, 2)
    assert models.next_token_loss(last(first(ids)), targets).item() == models.causal_lm_loss(model, ids, targets).item()
    owned = list(first.full_names.values()) + list(last.full_names.values())
    assert owned == [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_tied_models_cut_gives_each_end_its_own_weight_under_the_one_name_and_the_middle_neither(stage):
    model = tiny_model(tie_embeddings=True)
    tied = model.lm_head.weight
    initial, names = tied.detach().clone(), [name for name, _ in model.named_parameters()]
    cut = Stage(model, stage, 3)
    cut.free_others()
    held = {cut.full_names[name]: p for name, p in cut.named_parameters()}
    if stage == 1:
        assert "model.embed_tokens.weight" not in held
    else:  # the embedding on the first stage, the head's own copy on the last: real, equal, one name
        assert torch.equal(held["model.embed_tokens.weight"], initial)
        assert (held["model.embed_tokens.weight"] is tied) == (stage == 0)
    # The whole model stays tied (one weight, the checkpoint's names), on this rank's end where it has one.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert [name for name, _ in model.named_parameters()] == names
    assert model.lm_head.weight.is_meta == (stage == 1)


def test_optimizer_state_rekeyed_by_name_is_the_full_models_and_comes_back():
    model = tiny_model()
    stage = Stage(model, 1, 2)
    opt_cfg = OmegaConf.structured(config.OptimConfig)
    stage_optimizer = optim.build_optimizer(stage, opt_cfg, 1e-3)
    models.next_token_loss(stage(torch.randn(2, 8, 32)), torch.randint(0, 64, (2, 8))).backward()
    stage_optimizer.step()
    name_of = {id(p): stage.full_names[n] for n, p in stage.named_parameters()}
    stage_order = optimizer_state.param_order(stage_optimizer, name_of)
    named = optimizer_state.by_name(stage_optimizer.state_dict(), stage_order)
    full = optimizer_state.by_index(named, optimizer_state.full_model_order(model))
    # A plain optimizer on the full model accepts it, and its lm_head state is the stage's.
    full_optimizer = optim.build_optimizer(model, opt_cfg, 1e-3)
    full_optimizer.load_state_dict(full)
    lm_head_state = full_optimizer.state[model.lm_head.weight]["exp_avg"]
    assert torch.equal(lm_head_state, stage_optimizer.state[model.lm_head.weight]["exp_avg"])
    full_named = optimizer_state.by_name(full, optimizer_state.full_model_order(model))
    back = optimizer_state.by_index(full_named, optimizer_state.param_order(stage_optimizer, name_of))
    assert back["param_groups"] == stage_optimizer.state_dict()["param_groups"]


@pytest.mark.parametrize("override, message", [
    ("parallel.schedule=zigzag", "parallel.schedule='zigzag' is not one of gpipe, 1f1b"),
    ("model.tie_embeddings=true parallel.zero_stage=1", "cannot shard tied embeddings with parallel.zero_stage=1: "
                                                       "the first stage's and the last stage's flat ZeRO slices"),
    ("sync=local_sgd", "use sync=allreduce"),
    ("model.num_layers=1", "at least one decoder layer per stage"),
])
def test_a_pipeline_it_cannot_run_is_refused_naming_the_key(override, message):
    cfg = cli.compose_config(["parallel.pipeline=2", "model=llama_tiny", *override.split()])
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(cfg)


def test_tied_embeddings_and_fp16_are_accepted_under_a_pipeline_and_beside_tensors():
    for extra in ([], ["parallel.tensor=2", "parallel.zero_stage=0"]):
        config.validate(cli.compose_config(["parallel.pipeline=2", "model=llama_tiny", "model.tie_embeddings=true",
                                            "train.precision=fp16", *extra]))


# --- real jobs -------------------------------------------------------------------------------
def weights(run_dir, step=6):
    return checkpoint.read_weights(checkpoint.checkpoints_root(run_dir) / checkpoint.step_dir_name(step))


def max_abs_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_losses(run_dir):
    return [row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row]


def val_losses(run_dir):
    return {row["step"]: row["val/loss"] for row in read_metrics(run_dir) if "val/loss" in row}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One process (SGD, and AdamW for 1F1B), and P=2 GPipe (SGD) and 1F1B (AdamW), with the
    same global batch; then SGD resumes across layouts: the GPipe run's step-3 checkpoint on one
    process, and the one-process step-3 checkpoint on P=2 x data 2 (4 processes, 2 micro-batches
    per pipeline)."""
    root = tmp_path_factory.mktemp("pipeline")

    def train(name, np_, *extra):
        run_job(tiny_train_args(tiny_data, root / name, *COMMON, *extra), np_=np_,
                launcher="mpi" if np_ > 1 else "none")
        return root / name

    one = train("one", 1, *SGD, "train.grad_accum_steps=4")
    found = {"one": one,
             "gpipe": train("gpipe", 2, *SGD, "train.grad_accum_steps=4", "parallel.pipeline=2",
                            "parallel.schedule=gpipe"),
             "1f1b": train("1f1b", 2, *SGD, "train.grad_accum_steps=4", "parallel.pipeline=2",
                           "parallel.schedule=1f1b")}
    found["gpipe_then_one"] = train("gpipe_then_one", 1, *SGD, "train.grad_accum_steps=4",
                                    f"train.resume={found['gpipe'] / 'checkpoints' / 'step-000003'}")
    found["one_then_p2xd2"] = train("one_then_p2xd2", 4, *SGD, "train.grad_accum_steps=2", "parallel.pipeline=2",
                                    f"train.resume={one / 'checkpoints' / 'step-000003'}")
    return found


@pytest.mark.parametrize("layout", ["gpipe", "1f1b"])
def test_two_stages_take_the_steps_of_one_process(runs, layout):
    one = runs["one"]
    initial_to_final = max_abs_difference(weights(one, 3), weights(one, 6))
    assert initial_to_final > 100 * ADAM_ATOL, "the runs barely moved: the comparison would prove nothing"
    assert max_abs_difference(weights(runs[layout]), weights(one)) < ADAM_ATOL
    assert train_losses(runs[layout]) == pytest.approx(train_losses(one), abs=LOSS_ATOL)
    assert_same_grad_norms(runs[layout], one)
    # Evaluation during training runs on the whole model, gathered from the stages.
    assert val_losses(runs[layout]) == pytest.approx(val_losses(one), abs=LOSS_ATOL)


def test_sgd_runs_were_never_clipped(runs):
    assert_never_clipped(runs["one"])


def test_two_pipelines_of_two_stages_resume_a_one_process_checkpoint_and_match_it(runs):
    assert max_abs_difference(weights(runs["one_then_p2xd2"]), weights(runs["one"])) < ADAM_ATOL
    assert_same_grad_norms(runs["one_then_p2xd2"], runs["one"])
    # Steps 4-6: every rank reports the global mean, so rank 0's log is the one-process loss.
    assert train_losses(runs["one_then_p2xd2"]) == pytest.approx(train_losses(runs["one"])[3:], abs=LOSS_ATOL)
    summary = json.loads((runs["one_then_p2xd2"] / "summary.json").read_text())
    assert summary["layout"]["data"] == 2 and summary["replicas_identical"]
    assert summary["tokens_seen"] == json.loads((runs["one"] / "summary.json").read_text())["tokens_seen"]


def test_a_pipeline_checkpoint_resumes_on_one_process_and_matches(runs):
    assert max_abs_difference(weights(runs["gpipe_then_one"]), weights(runs["one"])) < ADAM_ATOL


def test_a_pipeline_checkpoint_is_a_plain_model_for_evaluate(runs):
    result = run_job([f"checkpoint={runs['1f1b']}", "max_batches=2", "batch_size=4"], launcher="none",
                     module="app.evaluate")
    assert json.loads(result.stdout.strip().splitlines()[-1])["val/loss"] > 0


def test_bf16_activations_travel_as_their_raw_bits():
    received = last_json_line(run_worker("p2p_bf16.py", np_=2, launcher="mpi").stdout)
    assert received == {"bf16": {"dtype": "torch.bfloat16", "bitwise_equal": True},
                        "fp32": {"dtype": "torch.float32", "bitwise_equal": True}}


def test_a_gloo_launch_is_refused_on_every_rank_in_one_line(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "parallel.pipeline=2"), launcher="gloo",
                     check=False, timeout=120)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("parallel.pipeline=2 sends activations over MPI point-to-point") == 2
    assert not re.search(r"\[\d+\]<std\w+>:Traceback", result.stdout + result.stderr)  # none from a rank
