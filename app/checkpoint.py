"""Checkpoints that lose nothing, written by every rank that holds a part of the model.

    run_dir/checkpoints/step-000100/
        model-rank00000.safetensors   each rank's boxes of the weights, written by that rank in
        optim-rank00000.safetensors   parallel, and of the optimizer's per-element state; the
        ...                           layout (app/sharded_checkpoint.py) is the plain optimizer's
        index.json                    which file holds which box of which global tensor, and the
                                      optimizer's groups, parameter order and scalar state
        config.json                   the Hugging Face config (rebuilds the model with no project config)
        rng.pt                        every rank's torch RNG states (CPU, and CUDA on a GPU), gathered to rank 0
        replicas.pt                   what one layout alone needs to continue exactly (local SGD's replicas)
        state.json                    step, samples and tokens seen, world size, model signature,
                                      tokenizer hash, scaler state, the resolved config
    run_dir/checkpoints/latest   the name of the newest complete checkpoint

No rank ever holds the whole model to save or load one: each writes its own boxes, and a resume
on any layout (world size, ZeRO stage, tensor and pipeline sizes) has each rank read only the
parts of the saved boxes that overlap its own (`Reader`). A whole-model checkpoint of before
(model.safetensors + optimizer.pt) reads as one box per tensor.

A checkpoint is built in a temporary directory; rank 0 renames it into place only after every
rank has reported its files written and fsynced, then (atomically) points `latest` at it, and
prunes older ones only after that. A kill at any moment, on any rank, leaves `latest` naming a
complete checkpoint. What a kill cannot do (a full disk, a copy cut short, a shard file lost or
left over, bit rot) a reader meets as a CheckpointError naming the file, never a traceback, and
`train.resume=auto` falls back to the newest checkpoint that still verifies.
"""
import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import transformers
from safetensors import SafetensorError

from app import fileio
from app.state_dicts import by_index, by_name, is_per_element, load_model_state
from app.sharded_checkpoint import (INDEX, RANK_FILE, CheckpointError, Shard, build_index, check_files,
                                    check_safetensors, damaged, read_box, read_index, scalar_value, write_files)
from app.tensors import to_cpu

STEP_DIR = re.compile(r"^step-(\d+)$")
# WEIGHTS and OPTIMIZER: the whole-model files of checkpoints written before they were sharded.
WEIGHTS, OPTIMIZER, RNG, STATE, HF_CONFIG = "model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json"


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    model_signature: dict = field(default_factory=dict)
    tokenizer_sha256: str = ""
    grad_scaler: Optional[dict] = None
    config: dict = field(default_factory=dict)


@dataclass
class World:
    """The collectives a save needs (app.dist's, in training); one process by default (tools, tests)."""
    rank: int = 0
    broadcast: Callable = lambda obj, name: obj
    gather: Callable = lambda obj, name: [obj]


def model_signature(model: torch.nn.Module) -> dict:
    """What must match for weights to load: the architecture's shape, not its training knobs."""
    config = model.config.to_dict()
    keys = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "num_labels", "tie_word_embeddings",
    )
    return {key: config.get(key) for key in keys if key in config}


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Optional[Path]:
    pointer = checkpoints_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    # A damaged pointer names nothing (and must not name a path outside checkpoints/).
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    path = checkpoints_root(run_dir) / name
    return path if STEP_DIR.match(name) and (path / STATE).is_file() else None


def step_of(checkpoint_dir: Path) -> int:
    return int(STEP_DIR.match(Path(checkpoint_dir).name).group(1))


def complete_checkpoints(root: Path) -> List[Path]:
    """Oldest first, by step (the names stop sorting by step past six digits)."""
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=step_of)


class SaveFailed(CheckpointError):
    """A save that did not complete on some rank: the previous checkpoint stays the one in use.
    Its message is one line naming the rank and the directory."""


def save(run_dir: Path, model, shard: Optional[Shard], state: TrainState, rng_states: list, keep_last: int,
         world: World = World()) -> Path:
    """Collective over `world`: every rank writes its `shard` (None: it holds no counted box) into
    one staging directory; rank 0, once every rank reports its files written, adds the index and
    the rest (`model` gives the Hugging Face config) and renames the directory into place. A
    staging directory rank 0 cannot make, or a failed write on any rank, removes the staging
    directory and raises SaveFailed on every rank; `latest` stays where it was. The three parts
    are apart so that an async save (app/saving.py) writes in between."""
    staging = begin(run_dir, state.step, world)
    written = write_shard(staging, world.rank, shard)
    return commit(run_dir, staging, written, model, shard, state, rng_states, keep_last, world)


def begin(run_dir: Path, step: int, world: World = World()) -> Path:
    """Collective: the staging directory of step's save, made by rank 0; SaveFailed on every
    rank when it cannot be made (none may wait for a directory never made)."""
    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    begun = None
    if world.rank == 0:
        try:
            begun = begin_save(root, final)
        except OSError as error:
            begun = f"rank 0 could not make the staging directory of {final}: {error}"
    staging = world.broadcast(begun, name="checkpoint_staging")
    if isinstance(staging, str):
        raise save_failed(staging, root)
    return staging


def write_shard(staging: Path, rank: int, shard: Optional[Shard]) -> dict:
    """This rank's files, written and fsynced (no collective: a background thread may run it);
    what the index says of them, or {"error": the line every rank will raise}."""
    try:
        return write_files(staging, rank, shard) if shard is not None else {}
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        return {"error": f"rank {rank} could not write its checkpoint files into {staging}: {error}"}


def commit(run_dir: Path, staging: Path, written: dict, model, shard: Optional[Shard], state: TrainState,
           rng_states: list, keep_last: int, world: World = World()) -> Path:
    """Collective, once this rank's `write_shard` returned: rank 0, every rank's files written,
    completes the checkpoint; else removes the staging directory and every rank raises SaveFailed."""
    final = checkpoints_root(run_dir) / step_dir_name(state.step)
    gathered = world.gather(written, name="checkpoint_written")
    failure = None
    if world.rank == 0:
        failure = next((rank["error"] for rank in gathered if "error" in rank), None)
        try:
            if failure is None:
                fileio.write_json(staging / INDEX, build_index(gathered, shard.groups, shard.order))
                complete_save(staging, final, model, shard.extra, state, rng_states, keep_last)
        except OSError as error:
            failure = f"could not complete checkpoint {final}: {error}"
        if failure is not None:
            shutil.rmtree(staging, ignore_errors=True)
    failure = world.broadcast(failure, name="checkpoint_saved")
    if failure is not None:
        raise save_failed(failure, final.parent)
    return final


def save_failed(failure: str, root: Path) -> "SaveFailed":
    return SaveFailed(f"{' '.join(failure.split())}; the previous checkpoint stays the latest: free space or fix "
                      f"{root}, then rerun (train.resume=auto continues from it)")


def begin_save(root: Path, final: Path) -> Path:
    """The staging directory of a save, after removing the leftovers of saves killed half-way."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return fileio.new_staging_directory(final)


def complete_save(staging: Path, final: Path, model, extra: dict, state: TrainState, rng_states: list,
                  keep_last: int) -> None:
    """Rank 0, every rank's shard files written: the rest, then the rename, `latest` and pruning."""
    # The Hugging Face config (with the class name) rebuilds the model with no project config.
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(staging / HF_CONFIG)
    for name, value in extra.items():
        torch.save(to_cpu(value), staging / f"{name}.pt")
    torch.save(to_cpu(rng_states), staging / RNG)
    fileio.write_json(staging / STATE, asdict(state))
    fileio.replace_directory(staging, final)
    fileio.write_text(final.parent / "latest", final.name + "\n")
    for old in complete_checkpoints(final.parent)[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise damaged(path, f"not valid JSON: {error}") from None


def read_state(checkpoint_dir: Path) -> TrainState:
    path = Path(checkpoint_dir) / STATE
    fields = read_json(path)
    try:
        return TrainState(**fields)
    except TypeError as error:  # not an object, or fields of something else
        raise damaged(path, f"not a train state: {error}") from None


def check_compatible(state: TrainState, model, tokenizer_sha256: str, checkpoint_dir: Path) -> None:
    """Refuse a checkpoint of another shape or tokenizer with a message that says which."""
    expected = model_signature(model)
    if state.model_signature != expected:
        differing = sorted(k for k in expected if state.model_signature.get(k) != expected[k])
        detail = ", ".join(f"{k}: checkpoint {state.model_signature.get(k)} vs config {expected[k]}" for k in differing)
        raise ValueError(
            f"checkpoint {checkpoint_dir} is of another model shape ({detail}); "
            "use the model config it was trained with, or train.resume=never"
        )
    if tokenizer_sha256 and state.tokenizer_sha256 and state.tokenizer_sha256 != tokenizer_sha256:
        raise ValueError(
            f"checkpoint {checkpoint_dir} was trained with another tokenizer "
            f"({state.tokenizer_sha256} vs {tokenizer_sha256}); use its data directory, or train.resume=never"
        )


def compatible_state(checkpoint_dir: Path, model, tokenizer_sha256: str) -> TrainState:
    """The checkpoint's train state, after checking it fits `model` and the tokenizer."""
    state = read_state(checkpoint_dir)
    check_compatible(state, model, tokenizer_sha256, checkpoint_dir)
    return state


def is_sharded(checkpoint_dir: Path) -> bool:
    """Written by ranks in boxes (an index, or any rank's file: an index lost is damage, not
    another format), rather than as one whole-model file."""
    directory = Path(checkpoint_dir)
    return (directory / INDEX).exists() or any(RANK_FILE.match(p.name) for p in directory.glob("*.safetensors"))


def whole_model_index(checkpoint_dir: Path, order: Optional[List[List[str]]]) -> dict:
    """A whole-model checkpoint of before as an index: each tensor of model.safetensors one box;
    the optimizer state (when `order`, the plain optimizer's parameter names, is given) memory-
    mapped from optimizer.pt and keyed by name, so a reader touches only its boxes' bytes."""
    path = Path(checkpoint_dir) / WEIGHTS
    header = check_safetensors(path)
    weights = {name: {"shape": entry["shape"], "dtype": entry["dtype"],
                      "boxes": [{"file": WEIGHTS, "key": name, "offsets": [0] * len(entry["shape"]),
                                 "sizes": entry["shape"]}]}
               for name, entry in sorted(header.items()) if name != "__metadata__"}
    optimizer = {"groups": [], "order": order, "state": {}}
    if order is not None:
        named = by_name(load_optimizer_file(checkpoint_dir, mmap=True), order)
        optimizer.update(groups=named["groups"], state=named["state"])
    return {"weights": weights, "optimizer": optimizer}


class ReadOnDemand(Mapping):
    """Local name -> `read(placement)`, read each time it is asked for and never kept: a ZeRO rank
    keeps a slice of each value and drops the rest, so it never holds them all at once."""

    def __init__(self, read: Callable, placements: Dict[str, object]):
        self.read, self.placements = read, placements

    def __getitem__(self, local: str):
        return self.read(self.placements[local])

    def __contains__(self, local) -> bool:  # Mapping's own would read the value to find out
        return local in self.placements

    def __iter__(self) -> Iterator[str]:
        return iter(self.placements)

    def __len__(self) -> int:
        return len(self.placements)


class Reader:
    """A checkpoint as global tensors made of boxes, whatever layout wrote it: each rank reads
    the box it holds of each tensor, only from the saved boxes that overlap it. `order`, the
    plain optimizer's parameter names group by group, is needed for a whole-model checkpoint's
    optimizer state (a sharded one names its own)."""

    def __init__(self, checkpoint_dir: Path, order: Optional[List[List[str]]] = None):
        self.dir = Path(checkpoint_dir)
        self.index = read_index(self.dir) if is_sharded(self.dir) else whole_model_index(self.dir, order)

    @property
    def groups(self) -> List[dict]:
        return self.index["optimizer"]["groups"]

    @property
    def order(self) -> List[List[str]]:
        return self.index["optimizer"]["order"]

    def weight_boxes(self, placements: Dict[str, object]) -> ReadOnDemand:
        """The boxes of the weights these placements (by local name) describe, read on demand."""
        return ReadOnDemand(self.weight, placements)

    def state_boxes(self, placements: Dict[str, object]) -> ReadOnDemand:
        """The plain optimizer's states of those of these placements' parameters that have one,
        read on demand."""
        saved = self.index["optimizer"]["state"]
        return ReadOnDemand(self.state, {local: p for local, p in placements.items() if p.name in saved})

    def weight(self, placement) -> torch.Tensor:
        """The box of a weight a Placement (global name, shape, offsets, sizes) describes."""
        tensor = self.index["weights"].get(placement.name)
        if tensor is None:
            raise ValueError(f"saved weights lack {placement.name}; use the model config they were trained with")
        if tuple(tensor["shape"]) != tuple(placement.shape):
            raise ValueError(f"saved tensor {placement.name} has shape {tuple(tensor['shape'])}, this model "
                             f"{tuple(placement.shape)}; use the model config it was trained with")
        return read_box(self.dir, placement.name, tensor, placement.offsets, placement.sizes)

    def state(self, placement) -> Optional[dict]:
        """The plain optimizer's state of a parameter, per-element values cut to the placement's
        box, scalars (Adam's step) as they are; None where the optimizer has none yet."""
        entry = self.index["optimizer"]["state"].get(placement.name)
        if entry is None:
            return None
        return {key: self._state_value(f"{placement.name}/{key}", saved, placement) for key, saved in entry.items()}

    def _state_value(self, name: str, saved, placement):
        if isinstance(saved, dict):  # a sharded checkpoint's entry
            return read_box(self.dir, name, saved, placement.offsets, placement.sizes) if "boxes" in saved \
                else scalar_value(saved)
        return saved[placement.box].clone(memory_format=torch.contiguous_format) if is_per_element(saved) else saved

    def extras(self) -> Dict[str, object]:
        """What one layout alone wrote (local SGD's replicas), memory-mapped."""
        return load_extras(self.dir, mmap=True)

    def whole(self, name: str, tensor: dict) -> torch.Tensor:
        return read_box(self.dir, name, tensor, [0] * len(tensor["shape"]), tensor["shape"])

    def weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, global tensor) in name order, each assembled from its boxes when asked for."""
        for name, tensor in self.index["weights"].items():
            yield name, self.whole(name, tensor)

    def optimizer_state_dict(self) -> dict:
        """A sharded checkpoint's plain optimizer state_dict, whole (a tool's, or elastic's
        whole-model resume)."""
        state = {name: {key: self.whole(f"{name}/{key}", saved) if "boxes" in saved else scalar_value(saved)
                        for key, saved in entry.items()}
                 for name, entry in self.index["optimizer"]["state"].items()}
        return by_index({"state": state, "groups": self.groups}, self.order)


def load_weights(checkpoint_dir: Path, model) -> None:
    load_model_state(model, read_weights(checkpoint_dir))


def read_weights(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    return dict(weights_one_at_a_time(checkpoint_dir))


def weights_one_at_a_time(checkpoint_dir: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, global tensor) pairs, each assembled from its boxes when asked for: a reader that
    holds one tensor at a time, whatever layout wrote the checkpoint."""
    return Reader(checkpoint_dir).weights()


def load_tensor_file(path: Path, mmap: bool = False):
    """torch.load(weights_only=True), with damage reported as a CheckpointError naming the file."""
    if not path.is_file():
        raise damaged(path, "missing")
    # torch.save writes a zip archive; one cut short has lost its central directory at the end.
    if not zipfile.is_zipfile(path):
        raise damaged(path, "not a zip archive as torch.save writes: cut short, or written by something else")
    try:
        # Onto the CPU whatever device saved it (a GPU this host may lack); loading into the
        # model and optimizer puts each tensor on its parameter's device.
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        raise damaged(path, "not a plain tensor file: torch.load(weights_only=True) refuses to unpickle "
                      + (refused.group(1) if refused else "its objects")) from None
    except Exception as error:  # a damaged archive surfaces as RuntimeError, EOFError, ValueError, ...
        first_sentence = str(error).split(". ")[0]
        raise damaged(path, f"{type(error).__name__}: {first_sentence}") from None


def load_optimizer_file(checkpoint_dir: Path, mmap: bool = False) -> dict:
    """A whole-model checkpoint's optimizer.pt."""
    path = Path(checkpoint_dir) / OPTIMIZER
    loaded = load_tensor_file(path, mmap)
    if not (isinstance(loaded, dict) and "state" in loaded and "param_groups" in loaded):
        raise damaged(path, f"a {type(loaded).__name__}, not an optimizer state dict")
    return loaded


def load_optimizer_state(checkpoint_dir: Path, reader: Optional[Reader] = None) -> dict:
    """The plain optimizer's state_dict, whole, whatever wrote the checkpoint."""
    if is_sharded(checkpoint_dir):
        return (reader or Reader(checkpoint_dir)).optimizer_state_dict()
    return load_optimizer_file(checkpoint_dir)


def load_extras(checkpoint_dir: Path, mmap: bool = False) -> Dict[str, object]:
    """The *.pt files one layout alone writes (Shard.extra), by name."""
    paths = sorted(Path(checkpoint_dir).glob("*.pt"))
    return {path.stem: load_tensor_file(path, mmap) for path in paths if path.name not in (OPTIMIZER, RNG)}


def load_rng_states(checkpoint_dir: Path) -> list:
    """One entry per rank: a capture_rng_state dict, or a bare CPU state from older checkpoints."""
    path = Path(checkpoint_dir) / RNG
    loaded = load_tensor_file(path)
    if not (isinstance(loaded, list) and all(isinstance(entry, (torch.Tensor, dict)) for entry in loaded)):
        raise damaged(path, f"a {type(loaded).__name__}, not a list of per-rank RNG states")
    return loaded


def capture_rng_state(device: torch.device) -> dict:
    """This rank's RNG states: CPU always, and the device's own generator on a GPU (dropout on
    the GPU draws from it, so a resume without it would differ from an uninterrupted run)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(saved, device: torch.device) -> None:
    """Undo capture_rng_state; a bare tensor is the CPU state that older checkpoints held alone."""
    if isinstance(saved, torch.Tensor):
        torch.set_rng_state(saved)
        return
    torch.set_rng_state(saved["cpu"])
    # A CPU checkpoint resumed on a GPU (or the reverse) has no device state to carry over.
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"], device)


def verify(checkpoint_dir: Path) -> None:
    """Cheap integrity check of every file, without building the model: raises CheckpointError.
    Shard files are checked against the index by their headers and sizes, the optimizer state
    of a whole-model checkpoint memory-mapped: present, not read."""
    checkpoint_dir = Path(checkpoint_dir)
    state = read_state(checkpoint_dir)
    read_json(checkpoint_dir / HF_CONFIG)
    if is_sharded(checkpoint_dir):
        check_files(checkpoint_dir, read_index(checkpoint_dir))
    else:
        check_safetensors(checkpoint_dir / WEIGHTS)
        load_optimizer_file(checkpoint_dir, mmap=True)
    load_extras(checkpoint_dir, mmap=True)
    rng_states = load_rng_states(checkpoint_dir)
    if len(rng_states) != state.world_size:
        raise damaged(checkpoint_dir / RNG, f"{len(rng_states)} ranks' states for a {state.world_size}-rank run")


def find(path: str) -> Path:
    """A checkpoint directory, or a run directory meaning its latest checkpoint."""
    candidate = Path(path)
    if (candidate / "checkpoints").is_dir():
        found = latest(candidate)
        if found is None:
            raise FileNotFoundError(f"run directory {candidate} has no complete checkpoint yet")
        return found
    if not (candidate / STATE).is_file():
        raise FileNotFoundError(f"{candidate} is neither a checkpoint (no state.json) nor a run directory")
    return candidate


def run_tokenizer_dir(run_dir: Path) -> Path:
    """Rank 0 copies the tokenizer into the run directory, beside checkpoints/."""
    return Path(run_dir) / "tokenizer"


def tokenizer_dir(checkpoint_dir: Path) -> Path:
    return run_tokenizer_dir(Path(checkpoint_dir).parent.parent)


def trained_model_class(checkpoint_dir: Path) -> Tuple[type, transformers.PretrainedConfig]:
    """The transformers class and config that the checkpoint's own config.json names."""
    config_path = Path(checkpoint_dir) / HF_CONFIG
    read_json(config_path)  # transformers reports a bad file as an OSError with a traceback
    config = transformers.AutoConfig.from_pretrained(checkpoint_dir)
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:
        raise damaged(config_path, f"architectures={config.architectures} names no transformers model class")
    return model_class, config


def load_trained_model(checkpoint_dir: Path, device: str = "cpu"):
    """The trained model, rebuilt from the checkpoint's own config.json and weights."""
    model_class, config = trained_model_class(checkpoint_dir)
    model = model_class(config)
    load_weights(checkpoint_dir, model)
    return model.to(device).eval()


def resolve_resume(resume: str, run_dir: Path, warn: Callable[[str], None] = print) -> Optional[Path]:
    """train.resume: auto (the run dir's newest checkpoint that verifies, if any), never, or a
    checkpoint or run directory, which must verify. Raises CheckpointError, never resumes from
    nothing over a run whose checkpoints are all damaged."""
    if resume == "never":
        return None
    if resume != "auto":
        found = find(resume)
        verify(found)
        return found
    candidates = resume_candidates(run_dir)
    newest_error = None
    for candidate in candidates:
        try:
            verify(candidate)
            return candidate
        except CheckpointError as error:
            warn(f"skipping damaged checkpoint {candidate} ({error.path.name}: {error.why})")
            newest_error = newest_error or error
    if newest_error is not None:
        raise CheckpointError(
            f"no checkpoint in {checkpoints_root(run_dir)} is intact (the newest's {newest_error.path.name}: "
            f"{newest_error.why}); resume from a good copy with train.resume=DIR, or train.resume=never to start over"
        )
    return None


def resume_candidates(run_dir: Path) -> List[Path]:
    """Newest first, from the one `latest` names back; keep_last leaves the earlier ones as fallbacks."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    newest = latest(run_dir)
    candidates = complete_checkpoints(root)
    if newest is not None:
        # `latest` names the newest save that finished; a newer directory's save was killed first.
        candidates = [p for p in candidates if step_of(p) <= step_of(newest)]
    return candidates[::-1]
