"""BERT under tensor parallelism (app/parallel/tensor.py's BERT plans) trains as one process on
the same global batch: masked LM at T2 (2 ranks) and T2 x D2 (4 ranks), classification at T2;
its evaluation on the split model scores as one process's; and with dropout on, each tensor set
draws the same masks (its replicated parameters stay identical) while the data replicas draw
their own.

Three launches serve every cell (tests/workers/layout_cells.py runs the trainer's own step):
one process for the references, then horovodrun --gloo with 2 and 4 ranks. All runs are fp32,
6 AdamW steps of 2 accumulated micro-batches, clipped at every step (conftest.ALWAYS_CLIPS), so
the gradient norm is under test too. Equivalence runs switch dropout off (model.dropout=0.0),
as tests/test_encoder_equivalence.py does: its draws differ per data replica by design.
Tolerance: 1e-5 on the weights, the bound tests/test_layouts.py and test_tensor_parallel.py
explain (row-parallel layers and the vocabulary-parallel loss reorder float32 sums, which AdamW
can amplify where gradients are tiny); a real fault (a bias added twice, an ignored token's loss
counted, a padding row trained by lookups) moves weights by about lr = 1e-3.
"""
import json
from collections import defaultdict

import pytest
import torch
from transformers import BertConfig

from app import cli, config
from app.parallel.tensor import check_divisible
from tests.conftest import ALWAYS_CLIPS, CLIPPED, GRAD_NORM_RTOL, run_worker, tiny_encoder_args
from tests.test_layouts import max_abs_difference

ATOL = 1e-5
GLOBAL_BATCH = 16  # micro-batch x 2 micro-batches x data replicas
COMMON = ("optim=adamw", CLIPPED, "train.grad_accum_steps=2", "train.log_every=1")
NO_DROPOUT = "model.dropout=0.0"

# Cells by launch: (ranks, tensor) -> {cell: (task, its own overrides)}.
LAUNCHES = {
    (1, 1): {"mlm_untrained": ("mlm", [NO_DROPOUT, "train.max_steps=0"]),
             "mlm": ("mlm", [NO_DROPOUT]), "classify": ("classify", [NO_DROPOUT])},
    (2, 2): {"mlm_t2": ("mlm", [NO_DROPOUT]), "classify_t2": ("classify", [NO_DROPOUT])},
    (4, 2): {"mlm_t2d2": ("mlm", [NO_DROPOUT]), "mlm_t2d2_dropout": ("mlm", ["model.dropout=0.1"])},
}
# Each split cell -> the one-process cell it must equal, in training and in evaluation.
EQUIVALENT = {"mlm_t2": "mlm", "mlm_t2d2": "mlm", "classify_t2": "classify"}
# 24 validation passages: on the split model a tensor set evaluates one share together.
EVALUATE = {"batch_size": 8, "max_batches": 3}


def overrides(data_dir, ranks: int, tensor: int, task: str, *extra) -> list:
    data = ranks // tensor
    args = tiny_encoder_args(task, data_dir, "unused", *COMMON, f"train.micro_batch_size={GLOBAL_BATCH // 2 // data}",
                             f"parallel.tensor={tensor}", *extra)
    return [arg for arg in args if not arg.startswith("hydra.")]


@pytest.fixture(scope="module")
def cells(tiny_genre_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder_tensor")
    for (ranks, tensor), named in LAUNCHES.items():
        specs = [{"name": name, "overrides": overrides(tiny_genre_data, ranks, tensor, task, *extra),
                  "evaluate": EVALUATE if name in EQUIVALENT or name in EQUIVALENT.values() else None,
                  "ranks": name == "mlm_t2d2_dropout"}
                 for name, (task, extra) in named.items()]
        run_worker("layout_cells.py", [out, json.dumps(specs)], np_=ranks, launcher="gloo" if ranks > 1 else "none",
                   timeout=900)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for named in LAUNCHES.values() for name in named}


@pytest.mark.parametrize("cell", EQUIVALENT)
def test_a_tensor_parallel_bert_trains_as_one_process_on_the_same_global_batch(cells, cell):
    got, expected = cells[cell], cells[EQUIVALENT[cell]]
    data = 2 if "d2" in cell else 1
    assert {d: got["layout"][d] for d in ("tensor", "data")} == {"tensor": 2, "data": data}, got["layout"]
    if cell.startswith("mlm"):
        moved = max_abs_difference(cells["mlm_untrained"]["model"], expected["model"])
        assert moved > 100 * ATOL, "the reference barely moved: the comparison would prove nothing"
    difference = max_abs_difference(got["model"], expected["model"])
    print(f"{cell}: max |split - one process| = {difference:.3g} (bound {ATOL:g})")
    assert difference < ATOL
    assert len(got["steps"]) == len(expected["steps"]) == 6
    for row, reference in zip(got["steps"], expected["steps"]):
        assert reference["grad_norm"] > ALWAYS_CLIPS, "a step went unclipped, so clipping went untested"
        assert row["grad_norm"] == pytest.approx(reference["grad_norm"], rel=GRAD_NORM_RTOL), (row, reference)
        if data == 1:  # the step's loss is rank 0's, of the whole global batch only without data replicas
            assert row["loss"] == pytest.approx(reference["loss"], abs=ATOL), (row, reference)


@pytest.mark.parametrize("cell", EQUIVALENT)
def test_evaluation_on_the_split_model_scores_as_one_process(cells, cell):
    """The masked-LM accuracy takes the argmax over the whole vocabulary, not this rank's slice;
    the tensor set's ranks, which evaluate one share together, count its passages once."""
    got, expected = cells[cell]["evaluated"], cells[EQUIVALENT[cell]]["evaluated"]
    assert got["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-5)
    if cell.startswith("mlm"):
        assert got["val/masked_tokens"] == expected["val/masked_tokens"] > 0
        assert expected["val/masked_accuracy"] > 0
        # Weights 1e-6 apart may flip a near-tie: one token at most.
        assert got["val/masked_accuracy"] == pytest.approx(expected["val/masked_accuracy"],
                                                           abs=1.01 / expected["val/masked_tokens"])
    else:
        assert got["val/examples"] == expected["val/examples"] == EVALUATE["batch_size"] * EVALUATE["max_batches"]
        assert got["val/confusion_matrix"] == expected["val/confusion_matrix"]


def test_dropout_masks_agree_within_a_tensor_set_and_differ_across_data_replicas(cells):
    """Seeded by dist.noise_rank: a tensor set's ranks draw the same masks, so the parameters they
    replicate (LayerNorms, position embeddings) stay identical; the data replicas draw their own."""
    dropout, plain = cells["mlm_t2d2_dropout"], cells["mlm_t2d2"]
    assert max_abs_difference(dropout["model"], plain["model"]) > 100 * ATOL, "dropout was not on"
    by_replica = defaultdict(list)
    for rank in dropout["ranks"]:
        by_replica[rank["coordinates"]["data"]].append(rank)
    assert sorted(by_replica) == [0, 1] and all(len(ranks) == 2 for ranks in by_replica.values())
    for ranks in by_replica.values():
        assert ranks[0]["replicated"] == ranks[1]["replicated"], ranks
        assert torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    assert not torch.equal(by_replica[0][0]["rng"], by_replica[1][0]["rng"])


BERT = ["model=bert_tiny", "data=shakespeare_genre", "parallel.tensor=2"]


@pytest.mark.parametrize("task", ["mlm", "classify"])
def test_bert_tasks_may_split_where_the_sizes_divide(task):
    config.validate(cli.compose_config([f"task={task}", *BERT]))


@pytest.mark.parametrize("override", ["model.num_heads=1", "model.intermediate_size=255", "model.vocab_size=2047"])
def test_a_bert_that_does_not_split_is_refused_naming_the_key(override):
    cfg = cli.compose_config(["task=mlm", *BERT, override])
    with pytest.raises(config.ConfigError, match=f"^{override} is not divisible by parallel.tensor=2; set"):
        config.validate(cfg)


def test_a_bert_vocabulary_left_to_the_tokenizer_is_checked_when_the_model_is_built():
    bert = BertConfig(vocab_size=2047, hidden_size=64, num_attention_heads=2, intermediate_size=256)
    with pytest.raises(ValueError, match="model.vocab_size=2047 is not divisible by parallel.tensor=2; set"):
        check_divisible(bert, 2)
