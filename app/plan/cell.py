"""One point of the planner's grid (a layout, checkpointing and micro-batching for a world), and
the model's shape as the planner needs it: parameters per decoder/encoder layer and at the ends."""
from dataclasses import dataclass
from typing import List, Optional

from app.parallel.layers import transformer_layers
from app.plan import state


@dataclass(frozen=True)
class Cell:
    world: int
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    schedule: str = "1f1b"
    checkpointing: str = "none"  # train.activation_checkpointing
    micro_batch_size: int = 1
    grad_accum_steps: int = 1  # a pipeline's micro-batches

    @property
    def data(self) -> int:
        return self.world // (self.tensor * self.pipeline)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data

    def overrides(self) -> List[str]:
        """The training overrides that run this cell."""
        return [f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}",
                f"parallel.schedule={self.schedule}", f"parallel.zero_stage={self.zero_stage}",
                f"train.activation_checkpointing={self.checkpointing}",
                f"train.micro_batch_size={self.micro_batch_size}", f"train.grad_accum_steps={self.grad_accum_steps}"]

    def name(self) -> str:
        parts = [f"P{self.pipeline}-{self.schedule}" if self.pipeline > 1 else "", f"T{self.tensor}" if self.tensor > 1
                 else "", f"D{self.data}", f"ZeRO{self.zero_stage}" if self.zero_stage else "",
                 "ckpt" if self.checkpointing != "none" else "", f"mb{self.micro_batch_size}x{self.grad_accum_steps}"]
        return " ".join(p for p in parts if p)


def from_config(cfg, world: int) -> Cell:
    """The cell a training config runs on `world` ranks."""
    return Cell(world, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage, cfg.parallel.schedule,
                cfg.train.activation_checkpointing, cfg.train.micro_batch_size, cfg.train.grad_accum_steps)


@dataclass(frozen=True)
class Settings:
    """What memory and time read of the training config, read once: OmegaConf's lookups cost
    more than the arithmetic of a whole prediction."""
    precision: str
    activation_checkpointing_every: int
    cycle_time_ms: Optional[float]  # horovod.cycle_time_ms; None: app/dist.py's default

    @classmethod
    def of(cls, cfg) -> "Settings":
        return cls(cfg.train.precision, cfg.train.activation_checkpointing_every, cfg.horovod.cycle_time_ms)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    layer_parameters: int
    first_parameters: int  # the first stage's besides its layers: embeddings
    last_parameters: int  # the last stage's: final norm, head (none of its own when tied)
    tied: bool


def shape(cfg) -> Shape:
    """Counted on the model built on the meta device (no memory, whatever its size)."""
    model = state.meta_model(cfg)
    vocab = model.get_input_embeddings().weight.shape[0]
    layers = transformer_layers(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    first = model.get_input_embeddings().weight.numel()
    model_cfg = cfg.model
    return Shape(len(layers), model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_heads,
                 model_cfg.num_kv_heads or model_cfg.num_heads, vocab, cfg.train.seq_len or model_cfg.max_seq_len,
                 per_layer, first, total - first - per_layer * len(layers), cfg.model.tie_embeddings)
