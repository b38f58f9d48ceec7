"""A prepared data directory's meta.json: the recipe it was built from, and reading it back.

Both kinds of prepared data (token windows in app/prepare.py, labelled passages in
app/labelled_data.py) and every reader of them use this one module, so none of them has to
import another to learn whether a directory is up to date.
"""
import json
from pathlib import Path


def recipe(data_cfg, keys) -> dict:
    """The data config keys that decide a prepared directory's content."""
    return {key: data_cfg[key] for key in keys}


def is_up_to_date(out: Path, wanted: dict, log, keys_added_since=None) -> bool:
    """True when `out` was prepared from the same recipe, so nothing needs redoing.
    `keys_added_since` gives the recipe keys that older meta.json files lack, with the values
    that reproduce what was prepared before they existed."""
    meta_path = Path(out) / "meta.json"
    if not meta_path.is_file():
        return False
    recorded = json.loads(meta_path.read_text()).get("recipe")
    if recorded is not None and {**(keys_added_since or {}), **recorded} == wanted:
        log(f"prepare: {out} is up to date")
        return True
    return False


def read_meta(data_dir) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; run `python -m app.prepare data=...` first")
    return json.loads(meta_path.read_text())
