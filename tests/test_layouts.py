"""The layouts compose: every cell of pipeline x tensor x data, with ZeRO on the data dimension,
trains as one process on the same global batch (app/parallel/layout.py), and its checkpoints stay
layout-independent.

One launch per mesh serves all its cells (tests/workers/layout_cells.py runs the trainer's own
step and learning-rate schedule); the reference is a real one-process `app.train` run. All runs
are fp32 and deterministic, 6 AdamW steps of 2 accumulated micro-batches, clipped at every step
(conftest.ALWAYS_CLIPS), so the gradient norm itself is under test: a box counted twice (a norm
gain the tensor set replicates), a stage or slice left out, moves it. Tolerance: 1e-5 on the
weights, the bound tests/test_equivalence.py explains (data-parallel sums reorder float32 adds,
which AdamW can amplify where gradients are tiny); a real fault moves them by about lr = 1e-3.
Launches: horovodrun --gloo without a pipeline, mpirun with one. 8 ranks of llama_tiny on 2
cores are oversubscribed, which costs time, not correctness.

Tied embeddings under a pipeline (`_tied` cells) are held to a tied one-process run. The `_fp16`
cells train with an fp16 loss scaler and one rank's gradients forced to inf at one step: every
rank must skip that step and halve its scale; before it, the scaled steps are one process's (the
loss scaled once, unscaled before the clip).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from app import checkpoint
from tests.conftest import (ALWAYS_CLIPS, CLIPPED, GRAD_NORM_RTOL, read_metrics, run_job, run_worker,
                            tiny_train_args)

# A test runs a launch the first time it needs one of its cells: 8 oversubscribed ranks on a
# loaded 2-core machine can take over the default 600 s.
pytestmark = pytest.mark.timeout(1800)
ATOL = 1e-5
STEPS = 6
SAVE_AT = 3
COMMON = ("optim=adamw", CLIPPED, "train.grad_accum_steps=2", "train.log_every=1")
UNTIED, TIED = "model.tie_embeddings=false", "model.tie_embeddings=true"
GLOBAL_BATCH = 16  # micro-batch x 2 micro-batches x data replicas

# Cells by launch: (launcher, ranks, pipeline, tensor) -> {cell: its own overrides}.
LAUNCHES = {
    ("gloo", 4, 1, 2): {
        **{f"t2d2_zero{stage}": [f"parallel.zero_stage={stage}"] for stage in (1, 2, 3)},
        "t2d2_zero3_resumed": ["parallel.zero_stage=3"],
        # Averaging identical replicas changes nothing, unless it mixes other sets' shards in.
        "t2d2_param_average": ["sync=param_average", "sync.param_average_every=2"]},
    ("mpi", 4, 2, 1): {
        "p2d2_zero1_1f1b": ["parallel.zero_stage=1", "parallel.schedule=1f1b"],
        "p2d2_zero1_gpipe": ["parallel.zero_stage=1", "parallel.schedule=gpipe"],
        "p2d2_zero2": ["parallel.zero_stage=2"],
        "p2d2_zero3": ["parallel.zero_stage=3"],
        "p2d2_tied": [TIED],
        "p2d2_tied_resumed": [TIED],
        "p2d2_zero2_fp16": ["parallel.zero_stage=2"],
        "p2d2_zero3_from_t2d2_zero3": ["parallel.zero_stage=3"]},
    ("mpi", 4, 2, 2): {"p2t2": [], "p2t2_tied": [TIED], "p2t2_fp16": [], "p2t2_from_p2d2_zero3": []},
    ("mpi", 8, 2, 2): {
        "p2t2d2_zero1": ["parallel.zero_stage=1"],
        "p2t2d2_zero1_resumed": ["parallel.zero_stage=1"]},
}
CELLS = [cell for cells in LAUNCHES.values() for cell in cells]
# Save at step 3 in one layout, resume in another (its own launch's): with the one-process run's
# checkpoint and p2t2d2_zero1's, every one of 1 process, D2 ZeRO-3, T2 and P2 both saves and
# resumes, each time in other boxes than it saved. Resumer -> the cell whose checkpoint it reads.
RESUMES = {"t2d2_zero3_resumed": "one", "p2t2d2_zero1_resumed": "one", "p2d2_tied_resumed": "one",
           "p2d2_zero3_from_t2d2_zero3": "t2d2_zero3", "p2t2_from_p2d2_zero3": "p2d2_zero3"}
# Saver -> the ranks that write boxes: under ZeRO every rank, each the flat ranges of its own slices
# (no gather onto the data set's first rank).
SAVERS = {"p2t2d2_zero1": list(range(8)), "t2d2_zero3": list(range(4)), "p2d2_zero3": list(range(4))}
# After its step-3 save, this cell tries a save whose staging directory rank 0 cannot make.
BLOCKED_SAVE = "t2d2_zero3"
# The step at which one rank's gradients overflow, and the rank: (p1, t1) and (p1, d1), whose
# overflow the other stage must agree on, and the rest of its tensor or ZeRO data set.
OVERFLOWS = {"p2t2_fp16": {"step": 4, "rank": 3}, "p2d2_zero2_fp16": {"step": 4, "rank": 3}}
INITIAL_SCALE = 2.0 ** 10  # tests/workers/layout_cells.py's
EQUIVALENT = [cell for cell in CELLS if cell not in OVERFLOWS]
TIED_CELLS = [cell for cell in CELLS if "_tied" in cell]


def overrides(data_dir, ranks: int, pipeline: int, tensor: int, *extra) -> list:
    data = ranks // (pipeline * tensor)
    tie = TIED if TIED in extra else UNTIED
    args = tiny_train_args(data_dir, "unused", *COMMON, f"train.micro_batch_size={GLOBAL_BATCH // 2 // data}",
                           f"parallel.pipeline={pipeline}", f"parallel.tensor={tensor}", tie,
                           *(arg for arg in extra if arg != TIED))
    return [arg for arg in args if not arg.startswith("hydra.")]


def one_process(data_dir, run_dir, tie: str):
    """One process, the whole global batch; its step-3 checkpoint is resumed by a composed cell."""
    run_job(tiny_train_args(data_dir, run_dir, *COMMON, tie, f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                            f"train.checkpoint_every={SAVE_AT}"), launcher="none")
    return run_dir


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    return one_process(tiny_data, tmp_path_factory.mktemp("layouts") / "one", UNTIED)


@pytest.fixture(scope="module")
def tied_reference(tiny_data, tmp_path_factory):
    return one_process(tiny_data, tmp_path_factory.mktemp("layouts") / "one_tied", TIED)


def reference_of(cell: str, reference, tied_reference):
    return tied_reference if cell in TIED_CELLS else reference


@pytest.fixture(scope="module")
def cells(tiny_data, reference, tied_reference, tmp_path_factory):
    """cell name -> what rank 0 saved of it (and "dir": their run directories), running a
    launch the first time one of its cells is asked for (after the launches whose checkpoints
    its cells resume): each test pays only for its own."""
    out = tmp_path_factory.mktemp("cells")
    launched = {}

    def get(name):
        if name == "dir":
            return out
        key = next(key for key, named in LAUNCHES.items() if name in named)
        if key not in launched:
            launcher, ranks, pipeline, tensor = key
            specs = [{"name": cell, "overrides": overrides(tiny_data, ranks, pipeline, tensor, *extra),
                      "overflow": OVERFLOWS.get(cell), "save_at": SAVE_AT if cell in SAVERS else None,
                      "blocked_save": cell == BLOCKED_SAVE}
                     for cell, extra in LAUNCHES[key].items()]
            for spec in specs:
                saver = RESUMES.get(spec["name"])
                if saver is not None:
                    if saver != "one":
                        get(saver)
                    saved = reference_of(spec["name"], reference, tied_reference) if saver == "one" else out / saver
                    spec["resume"] = str(checkpoint.checkpoints_root(saved) / checkpoint.step_dir_name(SAVE_AT))
            run_worker("layout_cells.py", [out, json.dumps(specs)], np_=ranks, launcher=launcher, timeout=900)
            launched[key] = {cell: torch.load(out / f"{cell}.pt", weights_only=False) for cell in LAUNCHES[key]}
        return launched[key][name]

    return get

def reference_weights(run_dir, step=STEPS):
    return checkpoint.read_weights(checkpoint.checkpoints_root(run_dir) / checkpoint.step_dir_name(step))


def reference_steps(run_dir) -> dict:
    return {row["step"]: row for row in read_metrics(run_dir) if "grad_norm" in row}


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("cell", EQUIVALENT)
def test_each_cell_trains_as_one_process_on_the_same_global_batch(cells, reference, tied_reference, cell):
    reference = reference_of(cell, reference, tied_reference)
    got, expected = cells(cell), reference_steps(reference)
    sizes = {d: got["layout"][d] for d in ("pipeline", "tensor", "data")}
    layout = cell.split("_from_")[0]  # not the layout it resumed from
    assert sizes == {"pipeline": 2 if layout.startswith("p2") else 1, "tensor": 2 if "t2" in layout else 1,
                     "data": 2 if "d2" in layout else 1}, got["layout"]
    assert got["layout"].get("zero_stage", 0) == (int(layout.split("zero")[1][0]) if "zero" in layout else 0)
    assert max_abs_difference(reference_weights(reference, SAVE_AT), reference_weights(reference)) > 100 * ATOL
    assert max_abs_difference(got["model"], reference_weights(reference)) < ATOL
    for row in got["steps"]:
        assert row["grad_norm"] == pytest.approx(expected[row["step"]]["grad_norm"], rel=GRAD_NORM_RTOL), row
        assert row["loss"] == pytest.approx(expected[row["step"]]["train/loss"], abs=ATOL), row
    # The plain optimizer's state, assembled from every rank's boxes, is one process's.
    plain = checkpoint.load_optimizer_state(checkpoint.checkpoints_root(reference) / checkpoint.step_dir_name(STEPS))
    for index, entry in plain["state"].items():
        for key, value in entry.items():
            assert torch.allclose(got["optimizer"]["state"][index][key].float(), value.float(), atol=ATOL), (index, key)


@pytest.mark.parametrize("cell", CELLS)
def test_every_rank_builds_bitwise_slices_of_the_one_process_initial_weights(cells, untrained_run, cell):
    """Built on the meta device, each rank draws each global tensor from its own seeded generator
    and keeps its box: every box of every rank (ZeRO-3's slices gathered, a pipeline's tied ends
    both) is exactly its slice of a one-process run's start (untied: a tied model's weights are a
    subset of it by name), and the boxes cover every tensor of the cell's model."""
    start = checkpoint.read_weights(checkpoint.latest(untrained_run))
    got = cells(cell)
    covered = {name: torch.zeros(tensor.shape, dtype=torch.bool) for name, tensor in got["model"].items()}
    for rank, boxes in enumerate(got["initial"]):
        for placement, values in boxes:
            assert torch.equal(values, start[placement.name][placement.box]), (rank, placement.name)
            covered[placement.name][placement.box] = True
    assert all(mask.all() for mask in covered.values()), [name for name, mask in covered.items() if not mask.all()]


def test_the_references_clip_at_every_step(reference, tied_reference):
    for one in (reference, tied_reference):
        assert min(row["grad_norm"] for row in reference_steps(one).values()) > ALWAYS_CLIPS


def test_zero_under_a_pipeline_reduces_and_gathers_once_a_step_not_once_a_micro_batch(cells):
    """Stage 2 under a pipeline reduce-scatters each unit once, after the last micro-batch, as
    stage 1 does; stage 3 gathers each unit once a step and keeps it through the micro-batches,
    as stage 1's once-a-step gathers do. Without a pipeline, stages 2-3 do it per micro-batch."""
    def on_rank0(cell, key):
        return cells(cell)["steps"][SAVE_AT - 1][key]
    assert on_rank0("p2d2_zero2", "reduce_scatters") == on_rank0("p2d2_zero1_1f1b", "reduce_scatters") > 0
    assert on_rank0("p2d2_zero3", "gathers") == on_rank0("p2d2_zero1_1f1b", "gathers") > 0
    assert on_rank0("t2d2_zero2", "reduce_scatters") == 2 * on_rank0("t2d2_zero1", "reduce_scatters")


def test_a_p2_t2_d2_checkpoint_resumes_on_one_process_and_the_reverse(cells, reference, tiny_data):
    """Saved at step 3 by 8 ranks, resumed by one process; and the one-process step-3 checkpoint
    resumed by 8 ranks (the `_resumed` cell): both end where the uninterrupted run does."""
    cells("p2t2d2_zero1")
    saved = cells("dir") / "p2t2d2_zero1" / "checkpoints" / checkpoint.step_dir_name(SAVE_AT)
    run_dir = cells("dir") / "one_from_p2t2d2"
    run_job(tiny_train_args(tiny_data, run_dir, *COMMON, f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                            f"train.resume={saved}"), launcher="none")
    assert max_abs_difference(reference_weights(run_dir), reference_weights(reference)) < ATOL
    expected = reference_steps(reference)
    resumed = reference_steps(run_dir)
    assert sorted(resumed) == [4, 5, 6]
    for step, row in resumed.items():
        assert row["train/loss"] == pytest.approx(expected[step]["train/loss"], abs=ATOL)
    assert [row["step"] for row in cells("p2t2d2_zero1_resumed")["steps"]] == [4, 5, 6]


@pytest.mark.parametrize("cell", RESUMES)
def test_a_checkpoint_saved_in_one_layout_resumes_in_another(cells, cell):
    """Losses and weights are held to the uninterrupted run by the equivalence test above; here,
    that the cell did resume (from step 3) rather than train from scratch."""
    assert [row["step"] for row in cells(cell)["steps"]] == [4, 5, 6]


@pytest.mark.parametrize("cell", SAVERS)
def test_a_checkpoint_is_sharded_each_writer_holding_only_its_boxes(cells, reference, cell):
    """No whole-model file: each writer's file holds part of the model, and the files together
    hold every weight exactly once (a replicated box written once, by its counted copy; a ZeRO
    data set's ranks each the flat ranges of their slices)."""
    cells(cell)
    saved = checkpoint.checkpoints_root(cells("dir") / cell) / checkpoint.step_dir_name(SAVE_AT)
    files = sorted(saved.glob("*.safetensors"))
    assert [f.name for f in files if f.name.startswith("model")] == [
        f"model-rank{rank:05d}.safetensors" for rank in SAVERS[cell]]
    assert not (saved / "model.safetensors").exists() and not (saved / "optimizer.pt").exists()
    whole = sum(t.numel() for t in reference_weights(reference).values())
    held = [sum(t.numel() for t in load_file(str(f)).values()) for f in files if f.name.startswith("model")]
    assert max(held) < whole and sum(held) == whole, (held, whole)


def test_a_save_rank_0_cannot_stage_fails_on_every_rank_and_keeps_the_previous_checkpoint(cells):
    """A file stands where the checkpoints directory was: rank 0 cannot make the staging
    directory, and every rank learns it (none waits), as one CheckpointError line."""
    blocked = cells(BLOCKED_SAVE)["blocked"]
    assert len(blocked["errors"]) == 4
    for error in blocked["errors"]:
        assert error is not None and "\n" not in error, blocked
        assert error.startswith("rank 0 could not make the staging directory of ") and \
            "the previous checkpoint stays the latest" in error, error
    assert blocked["latest"] == checkpoint.step_dir_name(SAVE_AT)


@pytest.mark.parametrize("cell", TIED_CELLS)
def test_the_ends_of_a_tied_pipeline_keep_bitwise_equal_copies(cells, cell):
    """The first stage's embedding and the last stage's head took the same summed gradient."""
    assert cells(cell)["tied_difference"] == 0.0


@pytest.mark.parametrize("cell", OVERFLOWS)
def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank_and_halves_every_scale(cells, reference, cell):
    at, per_rank = OVERFLOWS[cell]["step"], cells(cell)["scaling"]
    assert len(per_rank) == 4
    for rows in per_rank:
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
        for row in rows:
            overflowed = row["step"] == at
            assert row["changed"] != overflowed, row  # skipped there, and the next step trains
            assert row["scale_after"] == row["scale_before"] / (2 if overflowed else 1), row
        assert rows[0]["scale_before"] == INITIAL_SCALE
    # Before the overflow the scaled steps are one process's (powers of two scale exactly): the
    # loss was scaled once (the pipeline's last stage), and unscaled before the norm and the clip.
    expected = reference_steps(reference)
    for row in cells(cell)["steps"][:at - 1]:
        assert row["grad_norm"] == pytest.approx(expected[row["step"]]["grad_norm"], rel=GRAD_NORM_RTOL), row
        assert row["loss"] == pytest.approx(expected[row["step"]]["train/loss"], abs=ATOL), row
