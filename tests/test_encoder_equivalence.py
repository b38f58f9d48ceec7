"""Masked-LM is world-size invariant: real Horovod runs with 2 ranks and micro-batch b take the
steps of 1 rank with 2b, and report the same loss; evaluation scores the same masked tokens on
any number of ranks. All runs are fp32, deterministic, without dropout (dropout draws differ
per rank by design).

Tolerances, as in test_equivalence.py: only the order of float32 sums differs (two half-batch
gradients averaged, token losses summed per rank, other padded widths), ~1e-7 relative per
step; Adam may amplify that where gradients are tiny. Masks seeded per micro-batch or a loss
normalised per micro-batch moves weights by ~lr = 1e-3: far outside both bounds.

SGD runs unclipped and the logged gradient norms are compared too (test_equivalence.py says
why); the AdamW case clips every step.
"""
import pytest

from conftest import (CLIPPED, UNCLIPPED, assert_always_clipped, assert_never_clipped, assert_same_grad_norms,
                      last_json_line, launched_once, read_metrics, run_job, tiny_encoder_args)
from test_equivalence import ADAM_ATOL, SGD_ATOL, max_abs_difference, update_size, weights

LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def trained(tiny_genre_data, tmp_path_factory):
    """train(np_, *overrides) -> the run dir of that masked-LM run, launched once for the module:
    the untrained weights serve both optimizers, and evaluation scores the one-rank AdamW run."""
    def launch(run_dir, np_, *extra):
        run_job(tiny_encoder_args("mlm", tiny_genre_data, run_dir, "train.log_every=1", "train.deterministic=true",
                                  "model.dropout=0.0", *extra), np_=np_, launcher="gloo" if np_ > 1 else "none")

    return launched_once(tmp_path_factory, launch)


ONE_RANK = ("train.micro_batch_size=8",)


@pytest.mark.parametrize("optimizer,clipping,atol,two_rank_batch", [
    (("optim=sgd_momentum", UNCLIPPED), assert_never_clipped, SGD_ATOL, ["train.micro_batch_size=4"]),
    # Accumulation too: each rank's 4 samples as 2 micro-batches of 2.
    (("optim=adamw", CLIPPED), assert_always_clipped, ADAM_ATOL,
     ["train.micro_batch_size=2", "train.grad_accum_steps=2"]),
], ids=["sgd_unclipped", "adamw_clipped"])
def test_mlm_two_ranks_with_batch_b_take_the_steps_of_one_rank_with_batch_2b(trained, optimizer, clipping, atol,
                                                                             two_rank_batch):
    two_dir, one_dir = trained(2, *optimizer, *two_rank_batch), trained(1, *optimizer, *ONE_RANK)
    clipping(one_dir)
    two, one = weights(two_dir), weights(one_dir)
    # No step taken: the weights both optimizers start from.
    initial = weights(trained(1, "train.max_steps=0"))
    assert update_size(initial, one) > 100 * atol, "the runs barely moved: the comparison would prove nothing"
    difference = max_abs_difference(two, one)
    print(f"{optimizer}: max |two - one| = {difference:.3g} (bound {atol:g}); update {update_size(initial, one):.3g}")
    assert difference < atol
    # The logged loss is the global batch's mean over its masked tokens, on both layouts.
    losses_two = [row["train/loss"] for row in read_metrics(two_dir)]
    losses_one = [row["train/loss"] for row in read_metrics(one_dir)]
    assert len(losses_one) == 6 and losses_two == pytest.approx(losses_one, rel=LOSS_RTOL)
    assert_same_grad_norms(two_dir, one_dir)


def test_mlm_evaluation_is_the_same_on_one_and_two_ranks(trained):
    run_dir = trained(1, "optim=adamw", CLIPPED, *ONE_RANK)  # the one-rank AdamW run above: any trained checkpoint does
    # 21 passages: rank 0 evaluates 11 in batches of 7 and 4, rank 1 10 in 7 and 3, while 1 rank
    # has 7, 7, 7: other batches, other padded widths, the same masked tokens.
    args = [f"checkpoint={run_dir}", "batch_size=7", "max_batches=3"]
    one = last_json_line(run_job(args, launcher="none", module="app.evaluate").stdout)
    two = last_json_line(run_job(args, np_=2, module="app.evaluate").stdout)
    assert two["ranks"] == 2 and one["val/masked_tokens"] > 0 and one["val/masked_accuracy"] > 0
    assert two["val/masked_tokens"] == one["val/masked_tokens"]
    assert two["val/masked_accuracy"] == one["val/masked_accuracy"]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)
