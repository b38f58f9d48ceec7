"""Checkpoints that lose nothing, written only by rank 0.

    run_dir/checkpoints/step-000100/
        model.safetensors   weights (safetensors: loading runs no code)
        optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
        rng.pt              every rank's torch RNG state, gathered to rank 0
        state.json          step, samples and tokens seen, world size, model signature,
                            tokenizer hash, scaler state, the resolved config
    run_dir/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is built in a temporary directory, fsynced and renamed into place before
`latest` is (atomically) pointed at it, and older ones are pruned only after that. A kill at
any moment leaves `latest` naming a complete checkpoint.
"""
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, load_model, save_file

from app import fileio

STEP_DIR = re.compile(r"^step-(\d+)$")


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
    path = checkpoints_root(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def complete_checkpoints(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file())


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
        torch.save(saved.optimizer, staging / "optimizer.pt")
        for name, extra in saved.extra.items():
            torch.save(extra, staging / f"{name}.pt")
        torch.save(rng_states, staging / "rng.pt")
        fileio.write_json(staging / "state.json", asdict(state))
    fileio.write_text(root / "latest", final.name + "\n")
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint_dir: Path) -> TrainState:
    return TrainState(**json.loads((Path(checkpoint_dir) / "state.json").read_text()))


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


def load_weights(checkpoint_dir: Path, model) -> None:
    load_model(model, str(Path(checkpoint_dir) / "model.safetensors"))


def load_optimizer_state(checkpoint_dir: Path) -> dict:
    return torch.load(Path(checkpoint_dir) / "optimizer.pt", weights_only=True)


def load_rng_states(checkpoint_dir: Path) -> list:
    return torch.load(Path(checkpoint_dir) / "rng.pt", weights_only=True)


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
    extras = {path.stem: torch.load(path, weights_only=True) for path in sorted(Path(checkpoint_dir).glob("*.pt"))
              if path.stem not in ("optimizer", "rng")}
    saved = SavedState(model=load_file(str(Path(checkpoint_dir) / "model.safetensors")),
                       optimizer=load_optimizer_state(checkpoint_dir), extra=extras, world_size=state.world_size)
    return Loaded(saved=saved, state=state, rng_states=load_rng_states(checkpoint_dir))


def find(path: str) -> Path:
    """A checkpoint directory, or a run directory meaning its latest checkpoint."""
    candidate = Path(path)
    if (candidate / "checkpoints").is_dir():
        found = latest(candidate)
        if found is None:
            raise FileNotFoundError(f"run directory {candidate} has no complete checkpoint yet")
        return found
    if not (candidate / "state.json").is_file():
        raise FileNotFoundError(f"{candidate} is neither a checkpoint (no state.json) nor a run directory")
    return candidate


def run_tokenizer_dir(run_dir: Path) -> Path:
    """Rank 0 copies the tokenizer into the run directory, beside checkpoints/."""
    return Path(run_dir) / "tokenizer"


def tokenizer_dir(checkpoint_dir: Path) -> Path:
    return run_tokenizer_dir(Path(checkpoint_dir).parent.parent)


def load_trained_model(checkpoint_dir: Path, device: str = "cpu"):
    """The trained model, rebuilt from the checkpoint's own config.json and weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint_dir)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class(config)
    load_weights(checkpoint_dir, model)
    return model.to(device).eval()


def capture_rng_state(device) -> dict:
    return {"cpu": torch.get_rng_state()}


def restore_rng_state(saved, device) -> None:
    torch.set_rng_state(saved["cpu"] if isinstance(saved, dict) else saved)


def resolve_resume(resume: str, run_dir: Path, warn=print) -> Optional[Path]:
    """train.resume: auto (the run dir's latest, if any), never, or a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(run_dir)
    return find(resume)
