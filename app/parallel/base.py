"""The one object the training loop talks to about other ranks.

A `Parallelism` owns how gradients and parameters move between ranks: it wraps the optimizer,
runs a step's forward and backward passes (a pipeline replaces only that part), waits for the
gradients, clips by the true global norm, steps, averages parameters, and gives and takes the
model and optimizer state that checkpoints hold. The loop (app/train.py), the step
(app/step.py) and the benchmark call only this interface; app/parallel/layout.py implements it
for every layout, as a composition of the concerns app/parallel/ lists.
"""
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

from app import dist, models


class Parallelism:
    """The interface, with the defaults a whole model on one rank would use."""

    name = "none"

    def __init__(self, model: torch.nn.Module):
        self.model = model  # the parameters this rank trains: the whole model, or its part of it
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # --- set-up ------------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = optimizer
        return optimizer

    def start(self, reader) -> None:
        """Bring every rank to the same starting point: the fresh weights every rank built alike,
        or, resuming, the checkpoint `reader` (app.checkpoint.Reader, on every rank) holds."""
        raise NotImplementedError

    # --- one step ----------------------------------------------------------------------------
    def forward_backward(self, loss_of: Callable, batches: List[dict], precision_ctx, scaler, timer) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns their mean loss (on the
        device, not read back). Gradients are accumulated as the mean over micro-batches."""
        total = torch.zeros((), device=batches[0]["input_ids"].device)
        for batch in batches:
            with timer.phase("forward"), precision_ctx:
                loss = loss_of(self.model, batch)
            with timer.phase("backward"):
                scaled = loss / len(batches)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss.detach().float()
        return total / len(batches)

    def sync_gradients(self) -> None:
        """Wait until this rank's gradients are the ones the optimizer must apply."""

    def unscale_gradients(self, scaler) -> None:
        """fp16: divide the gradients by the loss scale, noting whether any is inf or NaN (the
        scaler then skips the step)."""
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that the whole model's global norm is at most `max_norm`;
        return the norm before."""
        raise NotImplementedError

    def optimizer_step(self, scaler) -> None:
        """Apply the gradients (through the loss scaler under fp16) and zero them."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called once optimizer step `step` (1-based) is done on every rank."""

    # --- checkpoints and the end ---------------------------------------------------------------
    def checkpoint_shard(self):
        """Collective: every rank calls it; each gets the app.checkpoint.Shard it writes of a
        checkpoint, or None where it holds no box that counts."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last step, before the final checkpoint."""

    @contextmanager
    def full_model(self):
        """The whole model, usable as a plain one (evaluation, generating a sample), on every rank;
        a collective where ranks hold only parts of it."""
        yield self.model

    @contextmanager
    def sampling_model(self):
        """The model the closing sample runs on, on every rank: by default the whole model."""
        with self.full_model() as model:
            yield model

    @contextmanager
    def evaluation_model(self):
        """(model, share) for evaluation: a model that computes the whole model's loss, and this
        rank's share (index, count) of the evaluation batches. By default the whole model, each
        rank a share of its own."""
        with self.full_model() as model:
            yield model, (dist.rank(), dist.size())

    def parameter_checksum(self) -> str:
        """A hash of this rank's parameters, equal on ranks that should hold the same ones; a
        collective where ranks hold only parts of them."""
        return models.parameter_checksum(self.model)

    def counts_tokens(self) -> bool:
        """Whether this rank's tokens count toward throughput: one rank per data-parallel
        replica, since the ranks of one pipeline all read the same micro-batches."""
        return True

    def replica_group(self) -> int:
        """Ranks whose parameters must be identical share this number (a pipeline's stage)."""
        return 0

    def state_bytes(self) -> Dict[str, int]:
        """Bytes this rank holds now for parameters, gradients and optimizer state."""
        return held_bytes(list(self.model.parameters()), self.optimizer)

    def layout(self) -> dict:
        """Who does what, for the run's summary."""
        return {"mode": self.name, "world_size": dist.size(), "state_bytes": self.state_bytes()}


def held_bytes(params: List[torch.Tensor], optimizer) -> Dict[str, int]:
    """Bytes of the storages behind `params`, their gradients and the optimizer's state, each
    storage counted once (parameters that are views of one flat buffer share it) and a freed
    storage (ZeRO stage 3 between uses) as nothing."""
    def total(tensors) -> int:
        storages = {}
        for t in tensors:
            if torch.is_tensor(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        storages.pop(0, None)  # freed storages all point at address 0
        return sum(storages.values())
    state = [] if optimizer is None else [v for entry in optimizer.state.values() for v in entry.values()]
    return {"parameters": total(params), "gradients": total(p.grad for p in params),
            "optimizer_state": total(state)}
