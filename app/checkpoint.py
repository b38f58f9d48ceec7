"""Checkpoints that lose nothing, written only by rank 0.

    run_dir/checkpoints/step-000100/
        model.safetensors   weights (safetensors: loading runs no code)
        optimizer.pt        optimizer state, saved from the CPU and read back onto it with
                            torch.load(weights_only=True, map_location="cpu"): any host resumes it
        rng.pt              every rank's torch RNG states (CPU, and CUDA on a GPU), gathered to rank 0
        state.json          step, samples and tokens seen, world size, model signature,
                            tokenizer hash, scaler state, the resolved config
    run_dir/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is built in a temporary directory, fsynced and renamed into place before
`latest` is (atomically) pointed at it, and older ones are pruned only after that. A kill at
any moment leaves `latest` naming a complete checkpoint. What a kill cannot do (a full disk, a
copy cut short, bit rot) a reader meets as a CheckpointError naming the file, never a traceback,
and `train.resume=auto` falls back to the newest checkpoint that still verifies.
"""
import json
import pickle
import re
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file

from app import fileio
from app.tensors import to_cpu

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, OPTIMIZER, RNG, STATE, HF_CONFIG = "model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json"


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
class SavedState:
    """What a checkpoint holds of the model and optimizer, independent of the layout that
    wrote it: the full model's state dict and its optimizer's state dict, plus whatever one
    layout alone needs to resume exactly (local SGD's per-rank replicas)."""
    model: Dict[str, torch.Tensor]
    optimizer: dict
    extra: Dict[str, object] = field(default_factory=dict)
    world_size: int = 1


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


def one_name_per_storage(weights: dict) -> dict:
    """Tied weights (an LM head sharing the embedding) stored once, under their first name, as
    Hugging Face saves them; safetensors refuses tensors that share memory."""
    seen, unique = set(), {}
    for name, tensor in weights.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.detach().contiguous().cpu()
    return unique


def save(run_dir: Path, model, saved: SavedState, state: TrainState, rng_states: list, keep_last: int) -> Path:
    """`model` gives the Hugging Face config; `saved` the weights and optimizer state to write."""
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a save that was killed half-way.
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(state.step)
    with fileio.staged_directory(final) as staging:
        save_file(one_name_per_storage(saved.model), str(staging / "model.safetensors"))
        # The Hugging Face config (with the class name) rebuilds the model with no project config.
        model.config.architectures = [type(model).__name__]
        model.config.to_json_file(staging / "config.json")
        torch.save(to_cpu(saved.optimizer), staging / "optimizer.pt")
        for name, extra in saved.extra.items():
            torch.save(to_cpu(extra), staging / f"{name}.pt")
        torch.save(to_cpu(rng_states), staging / "rng.pt")
        fileio.write_json(staging / "state.json", asdict(state))
    fileio.write_text(root / "latest", final.name + "\n")
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def check_safetensors(path: Path) -> None:
    """The header parses and the file is exactly as long as its tensors' data offsets say: this
    catches a file cut short (or padded) without reading the weights."""
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


def reading_safetensors(path: Path, read: Callable[[str], object]):
    """read(path) after the header check, with safetensors' errors as a CheckpointError."""
    check_safetensors(path)
    try:
        return read(str(path))
    except SafetensorError as error:
        raise damaged(path, error) from None


def load_weights(checkpoint_dir: Path, model) -> None:
    reading_safetensors(Path(checkpoint_dir) / WEIGHTS, lambda path: load_model(model, path))


def read_weights(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    return reading_safetensors(Path(checkpoint_dir) / WEIGHTS, load_file)


def weights_one_at_a_time(checkpoint_dir: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in the file's order, each read from the file when asked for: a reader
    that holds one tensor at a time. The one place that knows the weights are one file; a
    checkpoint sharded over ranks would feed its readers the same pairs."""
    path = Path(checkpoint_dir) / WEIGHTS
    check_safetensors(path)
    try:
        # pread, not mmap: a mapped page that was read stays in the resident set until the file
        # is unmapped, so streaming llama_1b's 4.4 GB file through a mapping peaked at 4.44 GiB
        # RSS (1.20 GiB with pread). Either way only the tensor's own bytes are read.
        with safe_open(str(path), framework="pt", backend="pread") as weights:
            for name in weights.keys():
                yield name, weights.get_tensor(name)
    except SafetensorError as error:
        raise damaged(path, error) from None


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


def load_optimizer_state(checkpoint_dir: Path, mmap: bool = False) -> dict:
    path = Path(checkpoint_dir) / OPTIMIZER
    loaded = load_tensor_file(path, mmap)
    if not (isinstance(loaded, dict) and "state" in loaded and "param_groups" in loaded):
        raise damaged(path, f"a {type(loaded).__name__}, not an optimizer state dict")
    return loaded


def load_extras(checkpoint_dir: Path, mmap: bool = False) -> Dict[str, object]:
    """The *.pt files one layout alone writes (SavedState.extra), by name."""
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
    The optimizer state is memory-mapped, so its tensors are checked for presence, not read."""
    checkpoint_dir = Path(checkpoint_dir)
    state = read_state(checkpoint_dir)
    read_json(checkpoint_dir / HF_CONFIG)
    check_safetensors(checkpoint_dir / WEIGHTS)
    load_optimizer_state(checkpoint_dir, mmap=True)
    load_extras(checkpoint_dir, mmap=True)
    rng_states = load_rng_states(checkpoint_dir)
    if len(rng_states) != state.world_size:
        raise damaged(checkpoint_dir / RNG, f"{len(rng_states)} ranks' states for a {state.world_size}-rank run")


@dataclass
class Loaded:
    """A checkpoint as rank 0 reads it to resume."""
    saved: SavedState
    state: TrainState
    rng_states: list


def read(checkpoint_dir: Path, model, tokenizer_sha256: str) -> Loaded:
    """Everything a resume needs, after checking the checkpoint fits `model` and the tokenizer."""
    state = read_state(checkpoint_dir)
    check_compatible(state, model, tokenizer_sha256, checkpoint_dir)
    saved = SavedState(model=read_weights(checkpoint_dir), optimizer=load_optimizer_state(checkpoint_dir),
                       extra=load_extras(checkpoint_dir), world_size=state.world_size)
    return Loaded(saved=saved, state=state, rng_states=load_rng_states(checkpoint_dir))


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
