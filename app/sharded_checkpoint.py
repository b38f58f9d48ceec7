"""The boxes of a sharded checkpoint: every rank writes the boxes of the global tensors it holds,
one small index says which file holds which box of which tensor, and a reader of any layout
reads only the bytes of the boxes its own overlap (torchtitan's DCP and Megatron's
dist_checkpointing, in plain safetensors and JSON).

    model-rank00003.safetensors   rank 3's boxes of the weights, each keyed NAME@OFFSETS
    optim-rank00003.safetensors   its boxes of the optimizer's per-element state (Adam's
                                  moments), keyed NAME/KEY@OFFSETS
    index.json   {"weights": {name: TENSOR}, "optimizer": {"groups": [settings], "order":
                 [[names]], "state": {name: {key: TENSOR or {"value": v, "dtype": d}}}}}
                 TENSOR = {"shape", "dtype", "boxes": [BOX]}
                 BOX = {"file", "key", "offsets", "sizes"}: the box of the global tensor at
                 offsets, stored with its shape `sizes`; or, with "flat_offset" and
                 "flat_length", elements [flat_offset, flat_offset + flat_length) of that box in
                 row-major order, stored as a 1-D tensor (a ZeRO rank's flat slice, keyed
                 NAME@OFFSETS+FLAT_OFFSET)

Who writes what: a rank holding a box writes it, once per set of ranks holding equal copies (its
counted copy); under ZeRO every rank of the data set writes the flat ranges its slice covers,
weights and optimizer state alike, with no gather (at stages 1-2, where the weights are whole
on every rank, the same ranges), so each element is written exactly once (Megatron's
distributed optimizer checkpoint and DeepSpeed's universal checkpoint cut the same way).

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
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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
    """A checkpoint file that is missing, cut short or not what we wrote, or a save that could
    not complete. A ValueError, so the trainer and the command-line tools report it as one line
    and exit 2."""


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
    """What one rank writes: its boxes (anything with a global name, shape, offsets and sizes: a
    Placement, or a FlatRange of one with its flat_offset and flat_length) of the weights and of the per-element optimizer state, its scalar state by
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


def box_key(name: str, box) -> str:
    key = f"{name}@{','.join(map(str, box.offsets))}"
    return key if getattr(box, "flat_offset", None) is None else f"{key}+{box.flat_offset}"


def _entry(name: str, box, file: str, key: str, tensor: torch.Tensor) -> dict:
    saved = {"file": file, "key": key, "offsets": list(box.offsets), "sizes": list(box.sizes)}
    if getattr(box, "flat_offset", None) is not None:  # a flat range (app/parallel/placement.py's FlatRange)
        saved.update(flat_offset=box.flat_offset, flat_length=box.flat_length)
    return {"name": name, "shape": list(box.shape), "dtype": DTYPE_NAMES[tensor.dtype], "box": saved}


def _write_fsynced(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_files(directory: Path, rank: int, shard: Shard) -> dict:
    """This rank's boxes into its own files, fsynced; what the index says of them."""
    weights, moments, written = {}, {}, {"weights": [], "state": [], "scalars": {}}
    for box, tensor in shard.weights:
        key = box_key(box.name, box)
        weights[key] = to_cpu(tensor.detach()).contiguous()
        written["weights"].append(_entry(box.name, box, model_file(rank), key, weights[key]))
    for box, state_key, tensor in shard.state:
        key = box_key(f"{box.name}/{state_key}", box)
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
    """The boxes (and flat ranges) lie inside the tensor, do not overlap, and together cover it
    exactly: no element is missing or listed twice."""
    shape, boxes = [int(s) for s in tensor["shape"]], tensor["boxes"]
    if tensor["dtype"] not in DTYPES:
        raise ValueError(f"{name} has dtype {tensor['dtype']}")
    for i, box in enumerate(boxes):
        if not RANK_FILE.match(box["file"]) or not isinstance(box["key"], str):
            raise ValueError(f"{name} names the file {box['file']!r}")
        if len(box["offsets"]) != len(shape) or len(box["sizes"]) != len(shape) or any(
                o < 0 or s <= 0 or o + s > d for o, s, d in zip(box["offsets"], box["sizes"], shape)):
            raise ValueError(f"a box of {name} lies outside its shape {shape}")
        if is_flat(box) and not 0 <= box["flat_offset"] < box["flat_offset"] + box["flat_length"] <= math.prod(
                box["sizes"]):
            raise ValueError(f"a flat range of {name} lies outside its box {box['sizes']}")
        if any(_entries_overlap(box, other) for other in boxes[:i]):
            raise ValueError(f"two boxes of {name} overlap")
    if sum(elements(box) for box in boxes) != math.prod(shape):
        raise ValueError(f"the boxes of {name} do not cover its shape {shape}")


def is_flat(box: dict) -> bool:
    return "flat_offset" in box


def elements(box: dict) -> int:
    return box["flat_length"] if is_flat(box) else math.prod(box["sizes"])


def _entries_overlap(box: dict, other: dict) -> bool:
    """Two flat ranges of one box overlap where their ranges do; any other two entries where
    their boxes do (no writer cuts flat ranges across boxes)."""
    if is_flat(box) and is_flat(other) and box["offsets"] == other["offsets"] and box["sizes"] == other["sizes"]:
        return max(box["flat_offset"], other["flat_offset"]) < min(
            box["flat_offset"] + box["flat_length"], other["flat_offset"] + other["flat_length"])
    return _overlap(box["offsets"], box["sizes"], other["offsets"], other["sizes"]) is not None


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
            held, stored = header.get(box["key"]), [box["flat_length"]] if is_flat(box) else box["sizes"]
            if not isinstance(held, dict) or held.get("dtype") != dtype or held.get("shape") != stored:
                raise damaged(directory / file, f"does not hold {box['key']} as {dtype} {stored}, as "
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
    file read only where they overlap (safetensors' get_slice; a flat range by the whole rows of
    it that the box crosses)."""
    out = torch.empty(tuple(sizes), dtype=DTYPES[tensor["dtype"]])
    for saved in tensor["boxes"]:
        for piece_offsets, piece_sizes, read in _contiguous_pieces(saved):
            ranges = _overlap(offsets, sizes, piece_offsets, piece_sizes)
            if ranges is None:
                continue
            path = Path(directory) / saved["file"]
            try:
                # pread, not mmap: a mapped page that was read stays in the resident set until the
                # file is unmapped (streaming llama_1b's weights peaked at 4.44 GiB RSS mapped, 1.20 pread).
                with safe_open(str(path), framework="pt", backend="pread") as handle:
                    piece = read(handle.get_slice(saved["key"]), ranges)
            except (SafetensorError, OSError) as error:
                raise damaged(path, f"{name}: {error}") from None
            out[tuple(slice(low - o, high - o) for (low, high), o in zip(ranges, offsets))] = piece
    return out


def _contiguous_pieces(saved: dict):
    """(offsets, sizes, read) per global box the saved entry holds: a box entry is one, read by
    its overlap `ranges`; a flat range is up to 2 * ndim - 1 boxes, each contiguous in its 1-D
    storage, read by whole rows of the first dimension the piece spans."""
    if not is_flat(saved):
        def read_box_part(stored, ranges):
            return stored[tuple(slice(low - o, high - o) for (low, high), o in zip(ranges, saved["offsets"]))]
        yield saved["offsets"], saved["sizes"], read_box_part
        return
    first = saved["flat_offset"]
    for offsets, sizes, start in flat_boxes(saved["sizes"], first, first + saved["flat_length"]):
        global_offsets = [o + p for o, p in zip(offsets, saved["offsets"])]

        def read_flat_part(stored, ranges, offsets=global_offsets, sizes=sizes, start=start):
            # The piece's dimensions before `dim` are one wide and those after it whole: the rows
            # of `dim` the ranges cross are one contiguous run of the storage.
            dim = next((d for d, size in enumerate(sizes) if size > 1), len(sizes) - 1)
            low, high = ranges[dim] if sizes else (0, 1)
            row = math.prod(sizes[dim + 1:])
            begin = start - first + (low - offsets[dim]) * row if sizes else start - first
            shape = list(sizes)
            if sizes:
                shape[dim] = high - low
            rows = stored[begin : begin + math.prod(shape)].reshape(shape)
            read_offsets = [low if d == dim else o for d, o in enumerate(offsets)]
            return rows[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(ranges, read_offsets))]
        yield global_offsets, sizes, read_flat_part


def flat_boxes(shape: Sequence[int], low: int, high: int) -> Iterator[Tuple[List[int], List[int], int]]:
    """Elements [low, high) of a row-major tensor of `shape` as boxes (offsets, sizes, first
    element), each contiguous: a partial first row, the whole rows, a partial last row."""
    shape = list(shape)
    if low >= high:
        return
    if not shape:
        yield [], [], low
        return
    row = math.prod(shape[1:])
    head_end = min(high, -(-low // row) * row)  # up to the first row boundary, if low is inside a row
    if low < head_end:
        at = low // row
        for offsets, sizes, start in flat_boxes(shape[1:], low - at * row, head_end - at * row):
            yield [at, *offsets], [1, *sizes], start + at * row
        low = head_end
    whole_end = high // row * row
    if low < whole_end:
        yield [low // row] + [0] * (len(shape) - 1), [(whole_end - low) // row, *shape[1:]], low
        low = whole_end
    if low < high:
        at = low // row
        for offsets, sizes, start in flat_boxes(shape[1:], 0, high - at * row):
            yield [at, *offsets], [1, *sizes], start + at * row
