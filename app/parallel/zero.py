"""ZeRO over Horovod's collectives: data parallelism whose ranks each keep only a slice of the
optimizer state (stage 1), of the gradients too (stage 2), and of the parameters too (stage 3).

Layout (app/parallel/flat.py): each optimizer group's parameters in each unit (a decoder or
encoder layer, or the rest of the model: embeddings, final norm, head) live in one flat fp32
buffer; rank r owns the contiguous slice Horovod's reducescatter gives it, and a plain torch
optimizer of the same class steps on those slices alone (DeepSpeed's stage_1_and_2 layout).

A unit is a decoder or encoder layer, or the rest of the model (torchtitan's root unit); its
collectives are grouped (one negotiation, one fused buffer) and at most two units' are in flight,
so the transient copies stay a layer or two whatever the model's size.

- Stage 1: the parameters' gradients are views of the units' flat buffers and accumulate there
  over the micro-batches; in the last backward each unit is reduce-scattered (Average) as soon as
  its gradients are complete, overlapping the rest of backward (DeepSpeed's overlap_comm); the
  optimizer steps on the rank's slices; each unit's allgather, issued after the step, is waited
  for just before the unit's next forward, the next unit's already in flight (FSDP's forward
  prefetch without resharding), so the gathers overlap the forward instead of stalling the step.
- Stage 2: gradients sharded too: each micro-batch's gradients of a unit are added into a flat
  buffer as they arrive (post-accumulate hooks), reduce-scattered once the unit is complete, and
  dropped; each rank keeps its slice's sum.
- Stage 3: stage 2, and a layer's full parameters exist only around its use: gathered before its
  forward (the next layer's gather issued at once, FSDP's prefetch), freed after it, gathered
  again when the gradient of its output arrives (prefetching the layer before it) and freed
  once its gradients are reduced. The rest of the model is gathered for the whole forward.

Gradients travel in fp32 (Horovod has no bf16 collectives), or fp16 with sync.compression=fp16.
Checkpoints hold the full model and the plain optimizer's state dict (app/checkpoint.py), so a
run resumes at any stage and world size. Every collective is named from the unit's index.
"""
import functools
import hashlib
import inspect
from contextlib import contextmanager
from typing import Dict, List, Optional

import horovod.torch as hvd
import torch

from app import dist, models
from app.checkpoint import SavedState
from app.parallel.base import Parallelism, held_bytes, load_model_state
from app.parallel.flat import FlatShard, Unit, copy_value
from app.parallel.layers import transformer_layers
from app.parallel.optimizer_state import by_index, by_name, full_model_order, is_per_element

# Units whose reduce-scatter may be outstanding (their full gradients alive) during backward,
# and whose allgather may be outstanding when every unit is gathered: enough to keep the wire
# busy while one unit is copied, few enough that in-flight copies stay a unit or two.
MAX_REDUCES_IN_FLIGHT = 2
MAX_GATHERS_IN_FLIGHT = 2


def build_units(model, groups: List[dict], layers: List[torch.nn.Module], process_set, shard_is_view: bool):
    """Unit 0 is the model minus `layers`; unit i + 1 is layers[i]. Within a unit, one FlatShard
    per optimizer group, its parameters in the optimizer's order."""
    unit_of = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
    members = [[[] for _ in groups] for _ in range(len(layers) + 1)]
    for g, group in enumerate(groups):
        for param in group["params"]:
            members[unit_of.get(id(param), 0)][g].append(param)
    units = []
    for u, per_group in enumerate(members):
        flats = [FlatShard(params, g, process_set, shard_is_view) for g, params in enumerate(per_group) if params]
        units.append(Unit(u, model if u == 0 else layers[u - 1], flats, process_set))
    return units


def local_optimizer(plain: torch.optim.Optimizer, shards_per_group: List[List[torch.nn.Parameter]]):
    """An optimizer of the plain one's class and settings over this rank's slices."""
    accepted = inspect.signature(type(plain).__init__).parameters
    settings = {k: v for k, v in plain.defaults.items() if k in accepted}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": shards}
              for group, shards in zip(plain.param_groups, shards_per_group)]
    return type(plain)(groups, **settings)


class Zero(Parallelism):
    def __init__(self, model: torch.nn.Module, stage: int, sync_cfg, grad_accum_steps: int,
                 process_set=hvd.global_process_set):
        super().__init__(model)
        self.stage, self.process_set = stage, process_set
        # Stage 1 keeps whole gradients, summed over the micro-batches in place: a unit is reduced
        # once its parameters' last micro-batch is in. Stages 2-3 reduce each micro-batch's.
        self.passes_per_reduce = grad_accum_steps if stage == 1 else 1
        self.wire_dtype = torch.float16 if sync_cfg.compression == "fp16" else torch.float32
        # Units whose gather is issued ahead of the forward reaching them: stage 3 one, as each
        # gathered unit is memory that sharding gave back; stages 1-2 hold every full buffer anyway.
        self.gathers_ahead = 1 if stage == 3 else MAX_GATHERS_IN_FLIGHT
        self.layers = transformer_layers(model)
        self.units: List[Unit] = []
        self.pending = []  # (unit, handle) of reduce-scatters in flight
        self.whole = False  # stage 3 after finish(): every parameter gathered, hooks idle
        self.resting_bytes: Optional[Dict[str, int]] = None

    @property
    def name(self) -> str:
        return f"zero{self.stage}"

    @property
    def flats(self) -> List[FlatShard]:
        return [flat for unit in self.units for flat in unit.flats]

    def wrap_optimizer(self, optimizer):
        self.units = build_units(self.model, optimizer.param_groups, self.layers, self.process_set,
                                 shard_is_view=self.stage < 3)
        shards = [[f.shard for f in self.flats if f.group == g] for g in range(len(optimizer.param_groups))]
        self.optimizer = local_optimizer(optimizer, shards)
        if self.stage == 1:
            for flat in self.flats:
                flat.keep_grads_in_flat_buffer()
        for unit in self.units:
            for param in unit.params:
                param.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, unit))
        self._install_gather_hooks()
        return self.optimizer

    # --- start and checkpoints ----------------------------------------------------------------
    def start(self, saved: Optional[SavedState]) -> None:
        """Rank 0's weights (from `saved` when resuming) to every rank's full buffers, each rank
        keeps its slice; the plain optimizer state, when resuming, is cut into the slices."""
        # Root 0: the rank that reads checkpoints, a member of every data-parallel group while
        # tensor and pipeline parallelism are off (config refuses them); with them on, each
        # group's first rank would need its share of `saved`.
        resuming = dist.broadcast_object(saved is not None, name="zero_resuming")
        if saved is not None:
            load_model_state(self.model, saved.model)  # into the full buffers: parameters are views
        with torch.no_grad():
            for unit in self.units:
                for flat in unit.flats:
                    hvd.broadcast_(flat.full, root_rank=0, name=f"zero.start.{unit.index}.{flat.group}",
                                   process_set=self.process_set)
                    flat.take_shard()
            for name, buffer in self.model.named_buffers():
                hvd.broadcast_(buffer, root_rank=0, name=f"zero.buffer.{name}", process_set=self.process_set)
        if resuming:
            plain = dist.broadcast_object(saved.optimizer if saved is not None else None, name="zero_optim_state")
            self.optimizer.load_state_dict(self._sliced_state(by_name(plain, full_model_order(self.model))))
        if self.stage == 3:
            for unit in self.units:
                unit.free()

    def _sliced_state(self, named: dict) -> dict:
        """A by-name plain optimizer state cut to this rank's slices (the local optimizer's)."""
        names = self._names()
        state = {}
        for local_index, flat in enumerate(self._flats_in_optimizer_order()):
            entry = flat.owned_state([named["state"].get(names[id(p)]) for p in flat.params])
            if entry is not None:
                state[local_index] = entry
        local_groups = self.optimizer.state_dict()["param_groups"]
        groups = [{**settings, "params": own["params"]} for settings, own in zip(named["groups"], local_groups)]
        return {"state": state, "param_groups": groups}

    def _names(self) -> Dict[int, str]:
        return {id(p): name for name, p in self.model.named_parameters()}

    def _flats_in_optimizer_order(self) -> List[FlatShard]:
        by_shard = {id(f.shard): f for f in self.flats}
        return [by_shard[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def saved_state(self) -> Optional[SavedState]:
        """Collective: the full model (stage 3 gathers it) and the plain optimizer's state dict,
        each slice's state allgathered and cut back into its parameters by name."""
        model_state = self._model_state()
        names, state = self._names(), {}
        for local_index, flat in enumerate(self._flats_in_optimizer_order()):
            entry = self.optimizer.state.get(flat.shard)
            for key, value in sorted((entry or {}).items()):
                if is_per_element(value):
                    full = hvd.allgather(value.detach().float(), name=f"zero.state.{local_index}.{key}",
                                         process_set=self.process_set)
                    values = flat.split_full(full)
                else:  # a copy each: a shared step counter would be bumped once per parameter
                    values = [copy_value(value) for _ in flat.params]
                if dist.is_main():  # the others only take part in the allgathers
                    for param, piece in zip(flat.params, values):
                        state.setdefault(names[id(param)], {})[key] = piece
        if not dist.is_main():
            return None
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        optimizer = by_index({"state": state, "groups": settings}, full_model_order(self.model))
        return SavedState(model=model_state, optimizer=optimizer, world_size=dist.size())

    def _model_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """Rank 0's copy of the model's state dict; stage 3 gathers one unit at a time, so no
        rank ever holds the whole model twice."""
        entries = self.model.state_dict(keep_vars=True)
        if self.stage < 3 or self.whole:
            self._gather_all()
            return {k: v.detach().clone() for k, v in entries.items()} if dist.is_main() else None
        keys_of = {}
        for key, value in entries.items():
            keys_of.setdefault(id(value), []).append(key)
        copies = {}
        for unit in self.units:
            self._gather(unit)
            for param in unit.params:
                for key in keys_of.pop(id(param), []):
                    if dist.is_main():
                        copies[key] = param.detach().clone()
            unit.free()
        if not dist.is_main():
            return None
        buffers = {key: entries[key].detach().clone() for keys in keys_of.values() for key in keys}
        return {key: copies.get(key, buffers.get(key)) for key in entries}

    # --- one step -----------------------------------------------------------------------------
    def _grad_ready(self, unit: Unit, param) -> None:
        if self.stage >= 2:
            unit.flat_of[id(param)].absorb_grad(param)
        unit.grads_ready += 1
        if unit.grads_ready == len(unit.params) * self.passes_per_reduce:
            self._reduce(unit)

    def _reduce(self, unit: Unit) -> None:
        self.pending.append((unit, unit.reduce_async(self.wire_dtype)))
        if self.stage == 3 and not self.whole:
            unit.free()
        while len(self.pending) > MAX_REDUCES_IN_FLIGHT:
            self._finish_oldest_reduce()

    def _finish_oldest_reduce(self) -> None:
        unit, handle = self.pending.pop(0)
        unit.finish_reduce(handle)

    def sync_gradients(self) -> None:
        """Every rank holds its slice's gradient, averaged over ranks and summed over micro-batches."""
        for unit in self.units:
            # A unit some of whose parameters got no gradient from some micro-batch (its count
            # never completed): reduced now, the missing gradients counting as zero.
            if unit.grads_ready:
                self._reduce(unit)
        while self.pending:
            self._finish_oldest_reduce()
        for unit in self.units:
            unit.reductions = 0
            if self.stage == 3 and not self.whole:
                unit.free()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global norm from the slices' squared norms summed over ranks; torch's clip rule."""
        grads = [f.shard.grad for f in self.flats if f.shard.grad is not None]
        # One fused norm kernel per dtype, as torch's clip_grad_norm_ (a pow and a sum per slice
        # cost stage 1 twice the time of the norms).
        squares = torch.stack(torch._foreach_norm(grads)).square().sum() if grads else torch.zeros(())
        total = hvd.allreduce(squares.reshape(1), op=hvd.Sum, name="zero.grad_norm",
                              process_set=self.process_set)[0].sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(scale)
        return total

    def optimizer_step(self, scaler) -> None:
        super().optimizer_step(scaler)
        for unit in self.units:
            unit.stale = True
        if self.stage < 3:  # the first units' gathers start now; stage 3's at their first use
            for index in range(self.gathers_ahead):
                self._prefetch(index)

    def _gather_all(self) -> None:
        """Every unit's full buffer rebuilt from the ranks' slices where a step changed them, the
        next unit's allgather in flight while one is copied in (Horovod's output is a second copy
        of a unit: all at once would hold the whole model twice)."""
        for unit in self.units:
            if unit.gathering is not None:  # a prefetch: complete it, its name is reused
                self._gather(unit)
        handles = []
        for unit in self.units:
            if unit.current:
                continue
            handles.append((unit, unit.gather_async()))
            if len(handles) > MAX_GATHERS_IN_FLIGHT:
                done, handle = handles.pop(0)
                done.finish_gather(handle)
        for unit, handle in handles:
            unit.finish_gather(handle)

    # --- parameters gathered at their first use after a step; at stage 3, around each use -----
    def _install_gather_hooks(self) -> None:
        self.model.register_forward_pre_hook(lambda module, args: self._before_forward(self.units[0]))
        for unit in self.units[1:]:
            unit.module.register_forward_pre_hook(lambda module, args, unit=unit: self._before_forward(unit))
        if self.stage == 3:
            self.model.register_forward_hook(self._after_model)
            for unit in self.units[1:]:
                unit.module.register_forward_hook(functools.partial(self._after_layer, unit))

    def _gather(self, unit: Unit) -> None:
        if unit.gathering is not None:
            handle, unit.gathering = unit.gathering, None
            unit.finish_gather(handle)
        elif not unit.current:
            unit.finish_gather(unit.gather_async())

    def _prefetch(self, index: int) -> None:
        if 0 <= index < len(self.units):
            unit = self.units[index]
            if unit.gathering is None and not unit.current:
                unit.gathering = unit.gather_async()

    def _before_forward(self, unit: Unit) -> None:
        if not self.whole:
            self._gather(unit)
            for ahead in range(1, self.gathers_ahead + 1):
                self._prefetch(unit.index + ahead)

    def _after_model(self, module, args, output) -> None:
        # In training the rest of the model stays until its gradients are reduced; in
        # evaluation (no graph) nothing else needs it.
        if not self.whole and not torch.is_grad_enabled():
            self.units[0].free()

    def _after_layer(self, unit: Unit, module, args, output) -> None:
        if self.whole:
            return
        unit.free()
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        hidden = next((t for t in outputs if torch.is_tensor(t) and t.requires_grad), None)
        if hidden is not None:
            hidden.register_hook(lambda grad: self._before_backward(unit))

    def _before_backward(self, unit: Unit) -> None:
        """The gradient of the layer's output has arrived: its backward is next."""
        self._gather(unit)
        self._prefetch(unit.index - 1)

    # --- the end, memory and layout -------------------------------------------------------------
    def state_bytes(self) -> Dict[str, int]:
        shards = [f.shard for f in self.flats]
        return held_bytes(list(self.model.parameters()) + shards, self.optimizer)

    @contextmanager
    def full_model(self):
        """Stage 3: every unit gathered for the duration and freed after (FSDP's
        summon_full_params; evaluation's ranks run different numbers of batches, so no gather
        may sit inside its forward); the forward hooks stand idle meanwhile. Stages 1-2: the
        gathers the last step left pending, completed."""
        self._gather_all()
        if self.stage < 3 or self.whole:
            yield self.model
            return
        self.whole = True
        try:
            yield self.model
        finally:
            self.whole = False
            for unit in self.units:
                unit.free()

    def finish(self) -> None:
        """Memory at rest recorded for the summary. Stage 3 stays sharded: what follows training
        gathers a unit (checksum) or the whole model (a sample) only for as long as it needs it."""
        if self.stage < 3:
            self._gather_all()  # the last step's: the model is whole again
        self.resting_bytes = self.state_bytes()

    def parameter_checksum(self) -> str:
        """Stage 3: each unit gathered, hashed and freed in turn (the whole model never held)."""
        if self.stage < 3 or self.whole:
            self._gather_all()
            return super().parameter_checksum()
        names = {id(p): name for name, p in self.model.named_parameters()}
        digest = hashlib.sha256()
        for unit in self.units:
            self._gather(unit)
            models.add_to_checksum(digest, [(names[id(p)], p) for p in unit.params])
            unit.free()
        return digest.hexdigest()[:16]

    def layout(self) -> dict:
        return {**super().layout(), "zero_stage": self.stage, "units": len(self.units),
                "state_bytes": self.resting_bytes or self.state_bytes()}
