"""The boxes of a sharded checkpoint: every rank writes the boxes of the global tensors it holds,
one small index says which file holds which box of which tensor, and a reader of any layout
reads only the bytes of the boxes its own overlap (torchtitan's DCP and Megatron's
dist_checkpointing, in plain safetensors and JSON).

    model-rank00003.safetensors   rank 3's boxes of the weights, each keyed NAME@OFFSETS
    optim-rank00003.safetensors   its boxes of the optimizer's per-element state (Adam's
                                  moments), keyed NAME/KEY@OFFSETS
    index.json   {"weights": {name: TENSOR}, "optimizer": {"groups": [settings], "order":
                 [[names]], "state": {name: {key: TENSOR or {"value": v, "dtype": d}}}}}
                 TENSOR = {"shape", "dtype", "boxes": [{"file", "key", "offsets", "sizes"}]}

The optimizer's part is the plain optimizer's state by global parameter name (its scalars, such
as Adam's step, as JSON values), so any layout cuts it like the parameters.
"""
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from app.state_dicts import is_per_element
from app.tensors import to_cpu

INDEX = "index.json"
RANK_FILE = re.compile(r"^(model|optim)-rank\d{5}\.safetensors$")
# safetensors' dtype names, for checking a file's header against the index.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, cut short or not what we wrote. A ValueError, so the
    command-line tools report it as one line and exit 2."""


def damaged(path: Path, why: str) -> CheckpointError:
    why = " ".join(str(why).split()) or "unreadable"
    if len(why) > 300:
        why = why[:300] + "..."
    error = CheckpointError(
        f"checkpoint file {path} is damaged ({why}); use another checkpoint "
        f"(earlier ones are kept in {Path(path).parent.parent}), or train.resume=never to start over"
    )
    error.path, error.why = Path(path), why
    return error


@dataclass
class Shard:
    """What one rank writes: its boxes (anything with a global name, shape and offsets: a
    Placement) of the weights and of the per-element optimizer state, its scalar state by
    global name and key; rank 0 also the optimizer's group settings, the plain optimizer's
    parameter names group by group, and the extras one layout alone needs (local SGD's replicas)."""
    weights: List[Tuple[object, torch.Tensor]]
    state: List[Tuple[object, str, torch.Tensor]]
    scalars: Dict[str, Dict[str, object]]
    groups: List[dict]
    order: Optional[List[List[str]]] = None
    extra: Dict[str, object] = field(default_factory=dict)


def shard_of(weights: List[Tuple[object, torch.Tensor]], optimizer: List[Tuple[object, dict]], groups: List[dict],
             order: Optional[List[List[str]]] = None, extra: Optional[dict] = None) -> Shard:
    """A Shard from (box, weight) and (box, plain optimizer state entry) pairs: the entries'
    per-element values (Adam's moments) boxed like their parameters, the scalars (its step) apart."""
    state, scalars = [], {}
    for box, entry in optimizer:
        for key, value in entry.items():
            if is_per_element(value):
                state.append((box, key, value))
            else:
                scalars.setdefault(box.name, {})[key] = value
    return Shard(weights, state, scalars, groups, order, extra or {})


def model_file(rank: int) -> str:
    return f"model-rank{rank:05d}.safetensors"


def optim_file(rank: int) -> str:
    return f"optim-rank{rank:05d}.safetensors"


def box_key(name: str, offsets: Sequence[int]) -> str:
    return f"{name}@{','.join(map(str, offsets))}"


def _entry(name: str, box, file: str, key: str, tensor: torch.Tensor) -> dict:
    return {"name": name, "shape": list(box.shape), "dtype": DTYPE_NAMES[tensor.dtype],
            "box": {"file": file, "key": key, "offsets": list(box.offsets), "sizes": list(tensor.shape)}}


def _write_fsynced(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_files(directory: Path, rank: int, shard: Shard) -> dict:
    """This rank's boxes into its own files, fsynced; what the index says of them."""
    weights, moments, written = {}, {}, {"weights": [], "state": [], "scalars": {}}
    for box, tensor in shard.weights:
        key = box_key(box.name, box.offsets)
        weights[key] = to_cpu(tensor.detach()).contiguous()
        written["weights"].append(_entry(box.name, box, model_file(rank), key, weights[key]))
    for box, state_key, tensor in shard.state:
        key = box_key(f"{box.name}/{state_key}", box.offsets)
        moments[key] = to_cpu(tensor.detach()).contiguous()
        written["state"].append({**_entry(box.name, box, optim_file(rank), key, moments[key]), "key": state_key})
    for name, scalars in shard.scalars.items():
        written["scalars"][name] = {key: scalar_json(value) for key, value in scalars.items()}
    if weights:
        _write_fsynced(Path(directory) / model_file(rank), weights)
    if moments:
        _write_fsynced(Path(directory) / optim_file(rank), moments)
    return written


def scalar_json(value) -> dict:
    """A scalar of the optimizer's state as JSON: a 0-dim tensor keeps its dtype."""
    if torch.is_tensor(value):
        return {"value": value.item(), "dtype": str(value.dtype).replace("torch.", "")}
    return {"value": value}


def scalar_value(saved: dict):
    return torch.tensor(saved["value"], dtype=getattr(torch, saved["dtype"])) if "dtype" in saved else saved["value"]


def build_index(written: Iterable[dict], groups: List[dict], order: List[List[str]]) -> dict:
    """One index from every rank's `write_files` answer, tensors by name in sorted order."""
    weights, state = {}, {}

    def add(tensors: dict, entry: dict) -> None:
        tensor = tensors.setdefault(entry["name"], {"shape": entry["shape"], "dtype": entry["dtype"], "boxes": []})
        tensor["boxes"].append(entry["box"])

    for rank in written:
        for entry in rank.get("weights", []):
            add(weights, entry)
        for entry in rank.get("state", []):
            add(state.setdefault(entry["name"], {}), {**entry, "name": entry["key"]})
        for name, scalars in rank.get("scalars", {}).items():
            state.setdefault(name, {}).update(scalars)  # equal on every box of the parameter
    return {"weights": dict(sorted(weights.items())),
            "optimizer": {"groups": groups, "order": order, "state": dict(sorted(state.items()))}}


def read_index(directory: Path) -> dict:
    """index.json, its structure checked: a CheckpointError naming it otherwise."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (OSError, ValueError) as error:
        raise damaged(path, f"not valid JSON: {error}") from None
    try:
        for name, tensor in tensors_of(index):
            check_boxes(name, tensor)
        if not isinstance(index["optimizer"]["groups"], list) or not isinstance(index["optimizer"]["order"], list):
            raise ValueError("optimizer groups and order must be lists")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise damaged(path, f"not a checkpoint index: {type(error).__name__} {error}") from None
    return index


def tensors_of(index: dict) -> List[Tuple[str, dict]]:
    """Every boxed tensor the index lists: weights by name, optimizer state as NAME/KEY."""
    found = list(index["weights"].items())
    for name, keys in index["optimizer"]["state"].items():
        found += [(f"{name}/{key}", entry) for key, entry in keys.items() if "boxes" in entry]
    return found


def check_boxes(name: str, tensor: dict) -> None:
    """The boxes lie inside the tensor, do not overlap, and together cover it exactly."""
    shape, boxes = [int(s) for s in tensor["shape"]], tensor["boxes"]
    if tensor["dtype"] not in DTYPES:
        raise ValueError(f"{name} has dtype {tensor['dtype']}")
    for i, box in enumerate(boxes):
        if not RANK_FILE.match(box["file"]) or not isinstance(box["key"], str):
            raise ValueError(f"{name} names the file {box['file']!r}")
        if len(box["offsets"]) != len(shape) or len(box["sizes"]) != len(shape) or any(
                o < 0 or s <= 0 or o + s > d for o, s, d in zip(box["offsets"], box["sizes"], shape)):
            raise ValueError(f"a box of {name} lies outside its shape {shape}")
        if any(_overlap(box["offsets"], box["sizes"], other["offsets"], other["sizes"]) for other in boxes[:i]):
            raise ValueError(f"two boxes of {name} overlap")
    if sum(math.prod(box["sizes"]) for box in boxes) != math.prod(shape):
        raise ValueError(f"the boxes of {name} do not cover its shape {shape}")


def _overlap(offsets, sizes, other_offsets, other_sizes) -> Optional[List[Tuple[int, int]]]:
    """The (low, high) range per dimension of two boxes' intersection, None if they miss."""
    ranges = [(max(o, p), min(o + s, p + q)) for o, s, p, q in zip(offsets, sizes, other_offsets, other_sizes)]
    return ranges if all(low < high for low, high in ranges) else None


def check_files(directory: Path, index: dict) -> None:
    """Every file the index names is whole and holds its boxes as listed; no shard file is
    left unlisted (a rank's file from another save). CheckpointError naming the file."""
    directory = Path(directory)
    listed: Dict[str, List[Tuple[str, dict]]] = {}
    for name, tensor in tensors_of(index):
        for box in tensor["boxes"]:
            listed.setdefault(box["file"], []).append((tensor["dtype"], box))
    for file, boxes in sorted(listed.items()):
        header = check_safetensors(directory / file)
        for dtype, box in boxes:
            held = header.get(box["key"])
            if not isinstance(held, dict) or held.get("dtype") != dtype or held.get("shape") != box["sizes"]:
                raise damaged(directory / file, f"does not hold {box['key']} as {dtype} {box['sizes']}, as "
                              f"{INDEX} lists it")
    for path in sorted(directory.glob("*.safetensors")):
        if RANK_FILE.match(path.name) and path.name not in listed:
            raise damaged(path, f"a shard file that {INDEX} does not list")


def check_safetensors(path: Path) -> dict:
    """The header parses and the file is exactly as long as its tensors' data offsets say: this
    catches a file cut short (or padded) without reading the weights. Returns the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
            header_bytes = handle.read(header_len) if header_len <= size - 8 else None
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except OSError as error:
        raise damaged(path, error) from None
    if header_bytes is None:
        raise damaged(path, f"{size} bytes, too short for its safetensors header")
    try:
        header = json.loads(header_bytes)
        data_end = max([entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"],
                       default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise damaged(path, f"unreadable safetensors header: {error}") from None
    if 8 + header_len + data_end != size:
        raise damaged(path, f"{size} bytes where its header promises {8 + header_len + data_end}")
    return header


def read_box(directory: Path, name: str, tensor: dict, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The box (offsets, sizes) of a listed tensor, read from the saved boxes it overlaps, each
    file read only where they overlap (safetensors' get_slice)."""
    out = torch.empty(tuple(sizes), dtype=DTYPES[tensor["dtype"]])
    for saved in tensor["boxes"]:
        ranges = _overlap(offsets, sizes, saved["offsets"], saved["sizes"])
        if ranges is None:
            continue
        path = Path(directory) / saved["file"]
        source = tuple(slice(low - o, high - o) for (low, high), o in zip(ranges, saved["offsets"]))
        try:
            # pread, not mmap: a mapped page that was read stays in the resident set until the
            # file is unmapped (streaming llama_1b's weights peaked at 4.44 GiB RSS mapped, 1.20 pread).
            with safe_open(str(path), framework="pt", backend="pread") as handle:
                piece = handle.get_slice(saved["key"])[source]
        except (SafetensorError, OSError) as error:
            raise damaged(path, f"{name}: {error}") from None
        out[tuple(slice(low - o, high - o) for (low, high), o in zip(ranges, offsets))] = piece
    return out
