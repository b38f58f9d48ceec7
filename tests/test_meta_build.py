"""The model is built on the meta device and each rank materialises only what it holds
(app/initialization.py, app/parallel/model_part.py, app/parallel/flat.py).

In-process: the per-tensor seeded initialisation gives every parameter the distribution
transformers' own `_init_weights` gives it (LLaMA and BERT). On real jobs: a rank's peak resident
set while building rises by its share plus about one global tensor, not by the whole model.
(That every rank's boxes are bitwise slices of one process's start, in every layout cell, is
tests/test_layouts.py's, on the launches it already has.)
"""
import json

import pytest
import torch
from omegaconf import OmegaConf

from app import cli, initialization, models
from tests.conftest import TINY_VOCAB, last_json_line, run_worker

# A normal(0, 0.02) draw's sample std over >= 4096 values stays within 10% of 0.02 (its relative
# standard error is about 1/sqrt(2n) = 1.1%).
STD_RTOL = 0.1


def built_both_ways(family: str, **build):
    """(transformers' own initialisation, ours) of one preset, on the CPU."""
    model_cfg = OmegaConf.merge(cli.compose_config([f"model={family}_tiny"]).model, {"init_std": 0.02})
    builder = models.build_causal_lm if family == "llama" else models.build_encoder
    torch.manual_seed(0)
    theirs = builder(model_cfg, 4096, **build)
    with torch.device("meta"):
        meta = builder(model_cfg, 4096, **build)
    init = initialization.Initializer(meta, seed=3)
    return theirs, {name: init.tensor(name) for name, _ in meta.named_parameters()}


@pytest.mark.parametrize("family, build", [("llama", {}), ("bert", {"pad_token_id": 0, "task": "mlm"}),
                                           ("bert", {"pad_token_id": 0, "task": "classify", "num_labels": 3})])
def test_each_parameter_starts_with_the_distribution_transformers_gives_it(family, build):
    theirs, ours = built_both_ways(family, **build)
    assert list(ours) == [name for name, _ in theirs.named_parameters()]
    for name, param in theirs.named_parameters():
        expected, got = param.detach(), ours[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        if expected.std() == 0:  # norms' gains, biases: constants, exactly
            assert torch.equal(got, expected), name
            continue
        drawn = got.flatten() if "embeddings.word" not in name else got[1:].flatten()
        assert drawn.std().item() == pytest.approx(0.02, rel=STD_RTOL), name
        assert abs(drawn.mean().item()) < 0.02 * STD_RTOL, name
    if family == "bert":  # the padding row of the word embeddings: zero in both
        assert ours["bert.embeddings.word_embeddings.weight"][0].abs().sum() == 0


def test_each_tensor_is_drawn_from_its_own_name_and_seed_alone():
    """Per-name generators: the same bits in any process, order or layout; another seed or
    another name, other bits."""
    _, ours = built_both_ways("llama")
    _, again = built_both_ways("llama")
    assert all(torch.equal(ours[name], again[name]) for name in ours)
    q0, q1 = ours["model.layers.0.self_attn.q_proj.weight"], ours["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)
    # sha256, not Python's per-process salted hash(): a fixed number for a fixed name.
    assert initialization.seed_of(0, "lm_head.weight") == initialization.seed_of(0, "lm_head.weight") < 2**63
    assert initialization.seed_of(0, "lm_head.weight") != initialization.seed_of(1, "lm_head.weight")


@pytest.fixture(scope="module")
def build_memory(tiny_data):
    """Per rank: its peak resident-set rise while building llama_small, the parameter bytes it
    holds, the whole model's and the largest global tensor's; one process, and ZeRO-3 on 2 ranks."""
    common = ["model=llama_small", f"data.vocab_size={TINY_VOCAB}", f"data.dir={tiny_data}", "train.precision=fp32"]
    runs = {"one": (1, "none", []), "zero3": (2, "gloo", ["parallel.zero_stage=3"])}
    return {name: last_json_line(run_worker("build_memory.py", [json.dumps(common + extra)], np_=ranks,
                                            launcher=launcher, timeout=600).stdout)["ranks"]
            for name, (ranks, launcher, extra) in runs.items()}


def test_a_zero3_rank_builds_within_its_share_plus_one_tensor_never_the_whole_model(build_memory):
    """What building costs beside the parameters (the task, Python's objects of the meta model,
    the one global tensor drawn at a time: about 10 MB) is nearly the same in both runs, so it
    cancels: a ZeRO-3 rank's rise is one process's less the half of the model it does not hold,
    within two global tensors (measured on llama_small: 53.8 MB for one process, 32.9 MB per
    ZeRO-3 rank, 1.3 MB above the difference; the largest tensor is 1.6 MB). Materialising the
    rank's whole part before ZeRO shards it rose by 60.3 MB, more than the whole model."""
    one = build_memory["one"][0]
    assert one["held_bytes"] == one["model_bytes"]
    for rank in build_memory["zero3"]:
        assert rank["held_bytes"] == pytest.approx(one["model_bytes"] / 2, rel=0.01)
        saved = one["held_bytes"] - rank["held_bytes"]
        assert rank["peak_rise_bytes"] <= one["peak_rise_bytes"] - saved + 2 * rank["largest_tensor_bytes"], rank
        assert rank["peak_rise_bytes"] < rank["model_bytes"], rank
