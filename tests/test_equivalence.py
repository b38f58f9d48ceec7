"""The distributed math is right: real Horovod runs equal the single-process computation they
stand for. All runs are fp32 with deterministic kernels.

Tolerances: averaging two half-batch gradients, (g1 + g2) / 2, sums the same terms as one
full-batch mean but in another order, so results differ by float32 rounding (~1e-7
relative) per step, never more. Over a few SGD steps that stays near 1e-7 absolute on weights
of size ~0.02; Adam divides by sqrt(v), which can amplify rounding where gradients are tiny,
so its bound is looser. A real bug (a missing average, a double-counted micro-batch, a wrong
learning rate) moves weights by ~lr = 1e-3 or more: far outside both bounds.

SGD runs unclipped (conftest.UNCLIPPED): clipping (where the norm exceeds the threshold) and
AdamW's update both erase a uniform factor in the gradient (a sum instead of a mean, a world
size divided twice), which SGD's update and the logged gradient norm keep. One AdamW pair,
clipped on every step (conftest.CLIPPED), stays for the optimizer state and the clip.
"""
import math

import pytest
from omegaconf import OmegaConf

from app import checkpoint, config, optim
from conftest import (CLIPPED, UNCLIPPED, assert_always_clipped, assert_never_clipped, assert_same_grad_norms,
                      launched_once, read_metrics, run_job, tiny_train_args)

SGD_ATOL = 2e-6
ADAM_ATOL = 1e-5
SGD = ("optim=sgd_momentum", UNCLIPPED)
ADAMW_CLIPPED = ("optim=adamw", CLIPPED)


def weights(run_dir):
    return checkpoint.read_weights(checkpoint.latest(run_dir))


def max_abs_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def update_size(before, after) -> float:
    return max((after[k] - before[k]).abs().max().item() for k in before)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """train(np_, *overrides) -> the run dir of that run, launched once for the module: the two
    layouts of SGD with momentum serve four tests."""
    def launch(run_dir, np_, *extra):
        run_job(tiny_train_args(tiny_data, run_dir, "train.log_every=1", *extra), np_=np_,
                launcher="gloo" if np_ > 1 else "none")

    return launched_once(tmp_path_factory, launch)


def two_ranks(trained, *extra):
    """2 ranks x micro-batch 4: the data-parallel layout most tests here train."""
    return trained(2, "train.micro_batch_size=4", *extra)


def one_rank(trained, *extra):
    """1 rank x micro-batch 8: the same global batch in one process."""
    return trained(1, "train.micro_batch_size=8", *extra)


def test_two_ranks_with_batch_b_take_the_unclipped_sgd_steps_of_one_rank_with_batch_2b(trained, untrained_run):
    two_dir, one_dir = two_ranks(trained, *SGD), one_rank(trained, *SGD)
    assert_never_clipped(one_dir)
    assert update_size(weights(untrained_run), weights(one_dir)) > 100 * SGD_ATOL, "the runs barely moved"
    assert max_abs_difference(weights(two_dir), weights(one_dir)) < SGD_ATOL
    assert_same_grad_norms(two_dir, one_dir)


def test_two_ranks_take_the_clipped_adamw_steps_of_one_rank_with_the_same_optimizer_state(trained, untrained_run):
    two_dir, one_dir = two_ranks(trained, *ADAMW_CLIPPED), one_rank(trained, *ADAMW_CLIPPED)
    assert_always_clipped(one_dir)
    assert update_size(weights(untrained_run), weights(one_dir)) > 100 * ADAM_ATOL, "the runs barely moved"
    assert max_abs_difference(weights(two_dir), weights(one_dir)) < ADAM_ATOL
    assert_same_grad_norms(two_dir, one_dir)  # logged before the clip: a uniform factor shows here


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(trained):
    accumulated = trained(2, *SGD, "train.micro_batch_size=2", "train.grad_accum_steps=3")
    large = trained(2, *SGD, "train.micro_batch_size=6")
    assert max_abs_difference(weights(accumulated), weights(large)) < SGD_ATOL
    assert_same_grad_norms(accumulated, large)


def test_rank_0_reports_the_mean_loss_over_ranks(trained):
    two = read_metrics(two_ranks(trained, *SGD))
    one = read_metrics(one_rank(trained, *SGD))
    # Equal-sized rank batches: the mean of the two ranks' losses is the loss of their union.
    assert len(two) == len(one) == 6
    for row_two, row_one in zip(two, one):
        assert row_two["train/loss"] == pytest.approx(row_one["train/loss"], abs=1e-5)
    assert [r["tokens_seen"] for r in two] == [r["tokens_seen"] for r in one]


def test_fp16_gradient_compression_stays_within_half_precision_of_fp32(trained, untrained_run):
    fp32 = weights(two_ranks(trained, *SGD))
    fp16 = weights(two_ranks(trained, *SGD, "sync=fp16_compression"))
    # fp16 keeps 11 significant bits: each gradient element is off by at most 2^-11 of itself,
    # so the weight change may differ by that fraction of its size, plus rounding.
    assert max_abs_difference(fp16, fp32) <= 2**-11 * update_size(weights(untrained_run), fp32) + SGD_ATOL
    assert max_abs_difference(fp16, fp32) > 0, "compression changed nothing: was it applied?"


def test_parameter_averaging_with_gradient_averaging_changes_nothing_when_replicas_agree(trained):
    plain = weights(two_ranks(trained, *SGD))
    averaged = weights(two_ranks(trained, *SGD, "sync=param_average", "sync.param_average_every=2"))
    assert max_abs_difference(plain, averaged) < SGD_ATOL


def test_local_sgd_steps_alone_so_it_is_not_synchronous_sgd_in_disguise(trained):
    """Meeting only at step 6, local SGD's replicas follow their own gradients in between:
    the averaged result must differ from synchronous SGD by far more than rounding."""
    # The synchronous run is the SGD run the tests above compare: one launch fewer.
    local = weights(two_ranks(trained, *SGD, "sync=local_sgd", "sync.param_average_every=6"))
    synced = weights(two_ranks(trained, *SGD))
    assert max_abs_difference(local, synced) > 100 * SGD_ATOL


def test_learning_rate_scaled_by_world_size_follows_the_schedule_exactly(trained):
    run_dir = two_ranks(trained, "optim.scale_lr_by_world_size=true", "optim.warmup_steps=2", "optim.decay=cosine",
                        "train.max_steps=6")
    optim_cfg = OmegaConf.merge(OmegaConf.structured(config.OptimConfig),
                                {"lr": 1e-3, "warmup_steps": 2, "decay": "cosine", "scale_lr_by_world_size": True})
    logged = [(row["step"], row["lr"]) for row in read_metrics(run_dir)]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    for step, lr in logged:
        assert lr == optim.lr_at(step - 1, optim_cfg, 6, world_size=2)
    assert logged[1][1] == 2 * 1e-3  # the end of warmup is the scaled peak
    assert logged[-1][1] == pytest.approx(2 * 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
