"""Tensor parallelism (parallel.tensor=T) computes what one process computes: the same logits,
loss and gradients, and after several steps the same parameters and gradient norms, alone (T=2
on 2 ranks) and beside data parallelism (T=2 x data 2 on 4 ranks), under Gloo and MPI; its
checkpoints resume on other layouts and plain ones resume into it.

The runs train with SGD (momentum) and no clipping, so a uniform factor in the gradient (an
average taken twice, a shard's contribution summed twice) reaches the weights and the logged
norm; clipping, or AdamW's update, would erase it. The MPI T=2 x data 2 run keeps AdamW with
clipping, for the optimizer state's sharding.

Tolerances (fp32, deterministic kernels): a row-parallel layer sums two half-width products
where one process computes one full-width product, and the loss sums exp over two vocabulary
halves: the same terms in another order, float32 rounding apart (~1e-7 relative). Logits and
gradients stay within 1e-5 of scale. Over 6 AdamW steps parameters drifted 2e-6 apart
(measured; Adam divides by sqrt(v), which amplifies rounding where gradients are tiny), so the
bound is the data-parallel suite's 1e-5, while a real bug (a gradient counted twice, a missing
shard's contribution, a wrong norm clipping) moves weights by the ~1e-3 learning rate.
"""
import pytest
from omegaconf import OmegaConf

from app import checkpoint, cli, config
from app.parallel.tensor import check_divisible
from conftest import (UNCLIPPED, assert_never_clipped, assert_same_grad_norms,
                      last_json_line, read_metrics, read_summary, run_job, run_worker, tiny_train_args)

ATOL = 1e-5
LOSS_ATOL = 1e-5
GLOBAL_BATCH = 8
# Six steps with a checkpoint half-way (for the resume tests) and one evaluation at the end (the
# vocabulary-parallel loss on the validation path).
STEPS = ["train.log_every=1", "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=6"]
EVAL_WINDOWS = 16  # evaluation takes train.eval_batches batches of the micro-batch size
SGD = ("optim=sgd_momentum", UNCLIPPED)


def train(data, run_dir, np_, launcher, micro_batch, *extra):
    sizes = [f"train.micro_batch_size={micro_batch}", f"train.eval_batches={EVAL_WINDOWS // micro_batch}"]
    run_job(tiny_train_args(data, run_dir, *STEPS, *sizes, *extra), np_=np_, launcher=launcher if np_ > 1 else "none")
    return run_dir


def weights(run_dir, step=6):
    return checkpoint.read_weights(checkpoint.checkpoints_root(run_dir) / checkpoint.step_dir_name(step))


def max_abs_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(run_dir) -> list:
    return [(row["step"], row.get("train/loss", row.get("val/loss"))) for row in read_metrics(run_dir)]


def assert_same_run(run_dir, reference):
    for (step, loss), (ref_step, ref_loss) in zip(losses(run_dir), losses(reference), strict=True):
        assert step == ref_step and loss == pytest.approx(ref_loss, abs=LOSS_ATOL)
    assert max_abs_difference(weights(run_dir), weights(reference)) < ATOL
    assert_same_grad_norms(run_dir, reference)


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    """The reference: one process training on the whole global batch with unclipped SGD."""
    run_dir = train(tiny_data, tmp_path_factory.mktemp("tp") / "one", 1, "none", GLOBAL_BATCH, *SGD)
    assert max_abs_difference(weights(run_dir, 3), weights(run_dir)) > 100 * ATOL, "too little training to compare"
    assert_never_clipped(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def tensor_two(tiny_data, tmp_path_factory):
    return train(tiny_data, tmp_path_factory.mktemp("tp") / "t2", 2, "gloo", GLOBAL_BATCH, *SGD, "parallel.tensor=2")


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_sharded_layers_give_one_process_logits_loss_and_gradients(launcher):
    """Grouped-query attention (4 heads, 2 KV heads) and tied embeddings, sharded over 2 ranks."""
    result = last_json_line(run_worker("tensor_logits.py", [2], np_=2, launcher=launcher).stdout)
    assert result["controller"] == launcher
    for row in result["rows"]:
        assert row["local_vocab"] == 256 and row["tied"]  # half the vocabulary's logits, never all
        assert row["logits"] < 1e-5 * row["logit_scale"]
        assert row["loss"] < 1e-6
        assert max(row["grads"].values()) < 1e-5 * row["grad_scale"]
        assert len(row["grads"]) == 20  # every parameter checked (the tied head is the embedding)
        # Megatron's traffic: 4 allreduces of batch x seq x hidden per block, plus the
        # embedding's forward and the LM head input's backward one, plus the loss's 3 numbers a
        # token; fp32. One f per attention/MLP input, not one per q/k/v/gate/up projection.
        tokens, hidden, layers = 3 * 32, 64, 2
        assert row["bytes_reduced"] == 4 * ((4 * layers + 2) * tokens * hidden + 3 * tokens)


def test_two_way_tensor_parallel_trains_as_one_process(one_process, tensor_two):
    assert_same_run(tensor_two, one_process)
    summary = read_summary(tensor_two)
    assert summary["layout"]["groups"] == {"tensor": [[0, 1]]}  # the dimensions larger than 1
    assert summary["replicas_identical"]  # each shard's replicas: trivially one each here
    assert summary["tokens_seen"] == read_summary(one_process)["tokens_seen"]  # the group counts its batch once
    # horovod.cycle_time_ms=null: a 1 ms cycle under the blocking collectives, 10 ms elsewhere on CPU.
    assert summary["horovod"]["HOROVOD_CYCLE_TIME"] == "1"
    assert read_summary(one_process)["horovod"]["HOROVOD_CYCLE_TIME"] == "10"


def test_tensor_by_data_parallel_trains_as_one_process_with_the_whole_batch(tiny_data, tmp_path, one_process):
    """SGD, never clipped: a gradient scale error reaches the update. (AdamW with clipping at
    T2 x D2, and under MPI with a pipeline, are cells of tests/test_layouts.py.)"""
    launcher, reference = "gloo", one_process
    run_dir = train(tiny_data, tmp_path / "t2d2", 4, launcher, GLOBAL_BATCH // 2, *SGD, "parallel.tensor=2",
                    "train.sample_tokens=4")
    assert_same_run(run_dir, reference)
    assert "sample:" in (run_dir / "train.log").read_text()  # rank 0 samples from the gathered model
    summary = read_summary(run_dir)
    assert summary["controller"] == launcher
    assert summary["layout"]["groups"] == {"tensor": [[0, 1], [2, 3]], "data": [[0, 2], [1, 3]]}
    assert [(r["rank"], r["tensor"], r["data"]) for r in summary["layout"]["ranks"]] == [
        (0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    # Ranks 0 and 2 hold the same shard and must agree bit for bit; 0 and 1 hold different ones.
    checksums = {r["rank"]: r["param_sha256"] for r in summary["replicas"]}
    assert checksums[0] == checksums[2] and checksums[1] == checksums[3] and checksums[0] != checksums[1]
    assert summary["replicas_identical"]


def test_a_tensor_parallel_checkpoint_resumes_on_data_parallel_ranks_and_evaluates(tiny_data, tmp_path,
                                                                                   one_process, tensor_two):
    halfway = checkpoint.checkpoints_root(tensor_two) / checkpoint.step_dir_name(3)
    resumed = train(tiny_data, tmp_path / "dp2", 2, "gloo", GLOBAL_BATCH // 2, *SGD, f"train.resume={halfway}")
    assert max_abs_difference(weights(resumed), weights(one_process)) < ATOL
    assert_same_grad_norms(resumed, one_process)
    assert [step for step, _ in losses(resumed)] == [4, 5, 6, 6]
    evaluated = last_json_line(run_job([f"checkpoint={tensor_two}", "max_batches=2", "batch_size=8"],
                                       launcher="none", module="app.evaluate").stdout)
    logged = [row["val/loss"] for row in read_metrics(one_process) if "val/loss" in row]
    assert evaluated["val/loss"] == pytest.approx(logged[-1], abs=LOSS_ATOL)


def test_a_plain_checkpoint_resumes_into_tensor_parallel_under_mpi(tiny_data, tmp_path, one_process):
    halfway = checkpoint.checkpoints_root(one_process) / checkpoint.step_dir_name(3)
    resumed = train(tiny_data, tmp_path / "t2", 2, "mpi", GLOBAL_BATCH, *SGD, "parallel.tensor=2",
                    f"train.resume={halfway}")
    assert max_abs_difference(weights(resumed), weights(one_process)) < ATOL
    assert_same_grad_norms(resumed, one_process)
    assert read_summary(resumed)["controller"] == "mpi"


@pytest.mark.parametrize("override, message", [
    ("model.intermediate_size=171", "model.intermediate_size=171 is not divisible by parallel.tensor=2"),
    ("model.num_kv_heads=1", "model.num_kv_heads=1 is not divisible by parallel.tensor=2"),
    ("sync=local_sgd", "parallel.tensor=2 cannot run local SGD"),
    ("sync=adasum", "parallel.tensor=2 cannot run sync=adasum"),
])
def test_a_model_that_does_not_split_is_refused_naming_the_key(override, message):
    cfg = cli.compose_config(["model=llama_tiny", "parallel.tensor=2", override])
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_a_vocabulary_left_to_the_tokenizer_is_checked_when_the_model_is_built():
    model_config = OmegaConf.create({"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 172,
                                     "vocab_size": 511})
    with pytest.raises(ValueError, match="model.vocab_size=511 is not divisible by parallel.tensor=2; set"):
        check_divisible(model_config, 2)


def test_the_shipped_tiny_and_small_presets_split_in_two():
    for preset in ("llama_tiny", "llama_small"):
        config.validate(cli.compose_config([f"model={preset}", "parallel.tensor=2"]))


@pytest.fixture(scope="module")
def inside_steps(tiny_data):
    """tests/workers/tensor_steps.py on a group of 2: one launch for the tests below."""
    return last_json_line(run_worker("tensor_steps.py", [tiny_data], np_=2, launcher="gloo").stdout)


def test_the_groups_collectives_keep_their_names_from_step_to_step(inside_steps):
    """Horovod's response cache answers a name it has seen; a per-call counter made every name new."""
    for row in inside_steps["rows"]:
        one, two = row["names"]
        # Per micro-batch (2 of them) 5 forward sums, the loss's 2 and 5 backward sums; then the
        # gradient norm and the loss scaler's overflow flag, once a step.
        assert one == two and len(one) == 2 * (5 + 2 + 5) + 2
    assert inside_steps["rows"][0]["names"] == inside_steps["rows"][1]["names"]


def test_an_fp16_overflow_in_one_shard_skips_the_step_on_every_rank_of_the_group(inside_steps):
    """Rank 1's shard alone overflows: both ranks skip, halve the loss scale, and the replicated
    parameters (the norms' gains) stay equal; a per-rank flag lets rank 0 step alone."""
    rows = inside_steps["rows"]
    assert inside_steps["replicated"] and all(name.endswith("norm.weight") for name in inside_steps["replicated"])
    for row in rows:
        assert row["overflow"]["changed"] == []
        assert row["overflow"]["scale_after"] == row["overflow"]["scale_before"] / 2
    assert rows[0]["replicated_checksum"] == rows[1]["replicated_checksum"]


def test_evaluation_runs_on_the_shards_as_the_whole_model_and_leaves_the_rng_alone(inside_steps):
    for row in inside_steps["rows"]:
        assert row["sharded_val_loss"] == pytest.approx(row["whole_val_loss"], abs=LOSS_ATOL)
        assert row["rng_kept_by_evaluation"] and row["rng_kept_by_gathering"]
    assert inside_steps["rows"][0]["whole_checksum"] == inside_steps["rows"][1]["whole_checksum"]
