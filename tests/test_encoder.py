"""BERT on the same machinery: genre passages, masking, exact distributed metrics, MLM then
fine-tuning, and classification that really learns."""
import json

import numpy as np
import pytest
import torch

from app import checkpoint, classification_metrics, cli, labelled_data, tasks
from app.tasks.encoder import IGNORE, mask_tokens
from conftest import last_json_line, read_summary, run_job, tiny_encoder_args


def test_genre_passages_are_split_by_play_with_every_genre_held_out(tiny_genre_data):
    meta = json.loads((tiny_genre_data / "meta.json").read_text())
    assert meta["labels"] == ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
    assert set(meta["val_plays"]) == set(meta["labels"]) and all(meta["val_plays"].values())
    assert set(meta["class_balance"]["val"]) == set(meta["labels"])
    majority = max(meta["class_balance"]["val"].values()) / sum(meta["class_balance"]["val"].values())
    assert meta["majority_baseline_accuracy"] <= majority
    passages = labelled_data.Passages(tiny_genre_data, "val", meta["pad_token_id"])
    assert len(passages) == sum(meta["class_balance"]["val"].values())


def test_passages_hold_spoken_lines_only():
    markdown = "# Hamlet\n\n## ACT I\n\n**HAMLET**  \nTo be, or not to be:  \n_Exit_\nthat is the question.\n"
    assert labelled_data.play_passages(markdown, 2) == ["To be, or not to be: that is the question."]


def test_masking_follows_bert_80_10_10_and_never_touches_specials():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, 20_000)
    ids[::50] = 2  # [CLS]-like specials scattered through the passage
    inputs, labels = mask_tokens(ids, np.array([0, 1, 2, 3, 4]), mask_id=4, vocab_size=1000, probability=0.15, rng=rng)
    chosen = labels != IGNORE
    candidates = ids > 4
    assert not (chosen & ~candidates).any()
    assert chosen.sum() / candidates.sum() == pytest.approx(0.15, abs=0.01)
    assert (labels[chosen] == ids[chosen]).all()
    n = chosen.sum()
    assert ((inputs == 4) & chosen).sum() / n == pytest.approx(0.8, abs=0.03)
    kept = (inputs == ids) & chosen
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 1000, abs=0.03)  # kept, or drawn equal by chance
    assert (inputs[~chosen] == ids[~chosen]).all()


def encoder_task(task: str, data_dir, rank: int, world: int, *extra):
    cfg = cli.compose_config([f"task={task}", "model=bert_tiny", "data=shakespeare_genre", "data.vocab_size=2048",
                              f"data.dir={data_dir}", *extra])
    return tasks.build(cfg, rank, world)


def evaluated_passages(data_dir, world: int, batch_size: int, batches: int) -> list:
    """Passage indices each rank of `world` evaluates with eval_batches=batches, in rank order."""
    return [[i for batch in encoder_task("classify", data_dir, rank, world).my_eval_indices((rank, world), batch_size, batches)
             for i in batch] for rank in range(world)]


def test_evaluation_subset_holds_every_class_and_is_the_same_on_any_number_of_ranks(tiny_genre_data):
    labels = np.load(tiny_genre_data / "val.labels.npy")
    assert (np.diff(labels) >= 0).all(), "the val split is stored sorted by class (what made the bug)"
    (one,) = evaluated_passages(tiny_genre_data, 1, 8, 2)
    assert len(one) == len(set(one)) == 16
    assert set(labels[one]) == set(range(6))  # all six genres in 16 passages
    for world in (2, 3):
        shards = evaluated_passages(tiny_genre_data, world, 8, 2)
        assert sorted(i for shard in shards for i in shard) == sorted(one)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # A larger subset keeps the classes in proportion: each within 2 passages of its share.
    (larger,) = evaluated_passages(tiny_genre_data, 1, 8, 12)
    shares = np.bincount(labels, minlength=6) / len(labels) * len(larger)
    assert np.abs(np.bincount(labels[larger], minlength=6) - shares).max() <= 2


def test_mlm_masks_and_loss_scale_depend_on_the_global_sample_alone(tiny_genre_data):
    """1 rank with micro-batch 8 and 2 ranks with 4 see the same masked samples, and both scale
    their summed token losses so that the step's gradient is the global batch's token mean."""
    one = encoder_task("mlm", tiny_genre_data, 0, 1, "train.micro_batch_size=8").micro_batch(80, 0)
    halves = [encoder_task("mlm", tiny_genre_data, rank, 2, "train.micro_batch_size=4").micro_batch(80, 0)
              for rank in range(2)]

    def rows(batch, key):
        return [row[mask.bool()].tolist() for row, mask in zip(batch[key], batch["attention_mask"])]

    for key in ("input_ids", "labels"):
        assert rows(one, key) == rows(halves[0], key) + rows(halves[1], key)
    masked = int((one["labels"] != IGNORE).sum())
    assert masked > 0 and (one["labels"] != IGNORE).any(dim=1).all()
    # Loss is sum * scale; the loop divides by accum steps A and Horovod averages over W ranks.
    assert one["loss_scale"].item() == pytest.approx(1 / masked)
    assert all(half["loss_scale"].item() == pytest.approx(2 / masked) for half in halves)


def test_classification_metrics_from_a_known_confusion_matrix():
    matrix = classification_metrics.confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    result = classification_metrics.summarize(matrix, ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision/a"] == 1.0 and result["recall/a"] == pytest.approx(2 / 3)
    assert result["precision/b"] == 0.5 and result["recall/b"] == 0.5
    assert result["precision/c"] == 0.5 and result["recall/c"] == 1.0
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert result["macro_f1"] == pytest.approx(np.mean(f1))
    image = classification_metrics.confusion_image(matrix, ["a", "b", "c"])
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


@pytest.fixture(scope="module")
def pretrained_then_fine_tuned(tiny_genre_data, tmp_path_factory):
    """Masked-LM pretraining on 2 ranks, then classifiers started from its checkpoint: one not
    trained at all (one process, max_steps=0) and one fine-tuned on 2 ranks. Their run dirs."""
    root = tmp_path_factory.mktemp("encoder")
    mlm_dir, start_dir, tuned_dir = root / "mlm", root / "start", root / "tuned"
    run_job(tiny_encoder_args("mlm", tiny_genre_data, mlm_dir, "train.eval_every=6", "train.eval_batches=2"))
    run_job(tiny_encoder_args("classify", tiny_genre_data, start_dir, f"model.init_from={mlm_dir}",
                              "train.max_steps=0"), np_=1, launcher="none")
    run_job(tiny_encoder_args("classify", tiny_genre_data, tuned_dir, f"model.init_from={mlm_dir}",
                              "train.eval_every=6", "train.eval_batches=4"))
    return mlm_dir, start_dir, tuned_dir


def test_evaluation_on_two_ranks_equals_one_rank_exactly_on_an_odd_sized_set(tiny_genre_data,
                                                                             pretrained_then_fine_tuned):
    _, _, run_dir = pretrained_then_fine_tuned  # any trained classifier: the fine-tuned one is there
    # The whole validation set, in batches of 7 that two ranks cannot split evenly (a capped
    # number of batches is test_checkpoint.py's test_evaluate_on_two_ranks_equals_one_rank).
    args = [f"checkpoint={run_dir}", "batch_size=7", "max_batches=0"]
    one = last_json_line(run_job(args, launcher="none", module="app.evaluate").stdout)
    two = last_json_line(run_job(args, np_=2, module="app.evaluate").stdout)
    examples = len(np.load(tiny_genre_data / "val.labels.npy"))
    assert two["ranks"] == 2 and examples % (2 * 7)  # the ranks cannot take equal full batches
    assert two["val/confusion_matrix"] == one["val/confusion_matrix"]
    assert all(sum(row) > 0 for row in one["val/confusion_matrix"])  # every genre was evaluated
    assert two["val/examples"] == one["val/examples"] == examples
    assert two["val/accuracy"] == one["val/accuracy"]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)


def test_mlm_pretraining_then_fine_tuning_from_its_checkpoint(pretrained_then_fine_tuned):
    mlm_dir, start_dir, tuned_dir = pretrained_then_fine_tuned
    mlm = read_summary(mlm_dir)
    assert mlm["replicas_identical"] and 0 < mlm["metrics"]["val/masked_accuracy"] < 1
    assert mlm["metrics"]["train/loss"] < np.log(2048)

    pretrained = checkpoint.read_weights(checkpoint.latest(mlm_dir))
    started = checkpoint.read_weights(checkpoint.latest(start_dir))
    encoder = [k for k in started if k.startswith("bert.encoder.") or k.startswith("bert.embeddings.")]
    assert encoder and all(torch.equal(started[k], pretrained[k]) for k in encoder)

    tuned = read_summary(tuned_dir)
    assert tuned["replicas_identical"] and tuned["metrics"]["val/examples"] == 4 * 8


def test_classifier_learns_a_local_csv_table_through_horovod(tmp_path):
    rng = np.random.default_rng(0)
    war = ["sword", "battle", "siege", "army", "drum", "banner", "soldier", "cannon"]
    love = ["sweet", "kiss", "heart", "rose", "darling", "sigh", "ring", "wooing"]
    lines = ["text,label"]
    for i in range(400):
        words, label = (war, "war") if i % 2 else (love, "love")
        lines.append(" ".join(rng.choice(words, 6)) + f" and more words here,{label}")
    table = tmp_path / "tickets.csv"
    table.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    run_job(["task=classify", "model=bert_tiny", "data=table", f"data.path={table}", f"data.dir={tmp_path / 'prep'}",
             "data.vocab_size=200", "data.max_tokens=32", "train.micro_batch_size=16", "train.max_steps=40",
             "train.log_every=10", "train.eval_every=40", "train.eval_batches=0", "train.progress_bar=false",
             "train.precision=fp32", "train.peak_tflops=1.0", "optim.lr=3e-3", "optim.warmup_steps=5",
             f"hydra.run.dir={run_dir}"])
    summary = read_summary(run_dir)
    assert summary["metrics"]["val/accuracy"] >= 0.95
    assert summary["metrics"]["val/examples"] == 40
