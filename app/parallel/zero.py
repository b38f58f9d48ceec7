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

Under a pipeline (`pipelined`), whose micro-batches interleave forwards and backwards, stage 2
reduce-scatters each unit once, after the step's last micro-batch (its flat gradient summing the
micro-batches meanwhile), and stage 3 keeps a gathered unit until the step's gradients are
reduced instead of resharding between micro-batches, as torchtitan runs FSDP under PP.

Gradients travel in fp32 (Horovod has no bf16 collectives), or fp16 with sync.compression=fp16.
It works on the data-parallel set only, over this rank's part (the whole model, or its pipeline
stage's tensor shards); its state converts to the plain optimizer's, by local name, so a
checkpoint resumes at any stage and layout. Every collective is named from the unit's index.
"""
import functools
import hashlib
import inspect
from contextlib import contextmanager
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from app import models
from app.parallel.base import held_bytes
from app.parallel.data import DataSync
from app.parallel.flat import FlatShard, Unit, copy_value
from app.parallel.layers import transformer_layers
from app.parallel.placement import Placement
from app.state_dicts import is_per_element

# Units whose reduce-scatter may be outstanding (their full gradients alive) during backward,
# and whose allgather may be outstanding when every unit is gathered: enough to keep the wire
# busy while one unit is copied, few enough that in-flight copies stay a unit or two.
MAX_REDUCES_IN_FLIGHT = 2
MAX_GATHERS_IN_FLIGHT = 2


def build_units(model, groups: List[dict], layers: List[torch.nn.Module], process_set, shard_is_view: bool,
                counted: Callable[[torch.nn.Parameter], bool], initial=None):
    """Unit 0 is the model minus `layers`; unit i + 1 is layers[i]. Within a unit, one FlatShard
    per optimizer group and per `counted` (whether the parameter's squares count in a global
    norm on this rank: a tensor-replicated one only on the tensor set's first rank), its
    parameters in the optimizer's order; a fresh model's filled from `initial`, a unit at a time."""
    unit_of = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
    units = []
    for u in range(len(layers) + 1):
        flats = []
        for g, group in enumerate(groups):
            mine = [p for p in group["params"] if unit_of.get(id(p), 0) == u]
            for kind in (True, False):
                params = [p for p in mine if counted(p) == kind]
                if params:
                    flats.append(FlatShard(params, g, process_set, shard_is_view, counted=kind, initial=initial))
        units.append(Unit(u, model if u == 0 else layers[u - 1], flats, process_set))
    return units


def local_optimizer(plain: torch.optim.Optimizer, shards_per_group: List[List[torch.nn.Parameter]]):
    """An optimizer of the plain one's class and settings over this rank's slices."""
    accepted = inspect.signature(type(plain).__init__).parameters
    settings = {k: v for k, v in plain.defaults.items() if k in accepted}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": shards}
              for group, shards in zip(plain.param_groups, shards_per_group)]
    return type(plain)(groups, **settings)


class Zero(DataSync):
    sharded = True

    def __init__(self, model: torch.nn.Module, stage: int, sync_cfg, grad_accum_steps: int, process_set,
                 pipelined: bool = False, counted: Callable[[str], bool] = lambda name: True,
                 initial: Optional[Callable[[str], torch.Tensor]] = None):
        super().__init__(model, sync_cfg, grad_accum_steps, process_set)
        self.stage, self.pipelined = stage, pipelined
        names = {id(p): name for name, p in model.named_parameters()}
        self.counted = lambda param: counted(names[id(param)])
        # A fresh model's parameters are empty shells: each box by local name (ModelPart.initial_value).
        self.initial = None if initial is None else (lambda param: initial(names[id(param)]))
        # Stage 1 keeps whole gradients, summed over the micro-batches in place: a unit is reduced
        # once its parameters' last micro-batch is in. Stages 2-3 reduce each micro-batch's, but
        # under a pipeline once per step.
        self.passes_per_reduce = grad_accum_steps if stage == 1 or pipelined else 1
        # Stage 3 frees a unit after each use, but under a pipeline only once the step's
        # gradients are reduced: its micro-batches come back to every unit again and again.
        self.reshards = stage == 3 and not pipelined
        self.wire_dtype = torch.float16 if sync_cfg.compression == "fp16" else torch.float32
        # Units whose gather is issued ahead of the forward reaching them: stage 3 one, as each
        # gathered unit is memory that sharding gave back; stages 1-2 hold every full buffer anyway.
        self.gathers_ahead = 1 if stage == 3 else MAX_GATHERS_IN_FLIGHT
        self.layers = transformer_layers(model)
        self.units: List[Unit] = []
        self.pending = []  # (unit, handle) of reduce-scatters in flight
        self.whole = False  # stage 3 while whole_part(): every parameter gathered, hooks idle
        self.whole_gathers = 0  # times whole_part() gathered every unit at stage 3 (the summary says)
        self.resting_bytes: Optional[Dict[str, int]] = None

    @property
    def name(self) -> str:
        return f"zero{self.stage}"

    @property
    def flats(self) -> List[FlatShard]:
        return [flat for unit in self.units for flat in unit.flats]

    def wrap_optimizer(self, optimizer):
        self.units = build_units(self.model, optimizer.param_groups, self.layers, self.process_set,
                                 shard_is_view=self.stage < 3, counted=self.counted, initial=self.initial)
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
    def load(self, model_state: Mapping[str, torch.Tensor], named_optimizer: Optional[dict]) -> None:
        """This rank's part of a checkpoint, read one tensor at a time from mappings that may read
        lazily (Layout.start's): stages 1-2 into the full buffers (parameters are views of them),
        stage 3 into its slice alone, so a rank never holds more than its share and one tensor;
        the plain optimizer's by-name state cut into the slices, one unit at a time."""
        names = self._names()
        with torch.no_grad():
            for flat in self.flats:
                if self.stage == 3:
                    flat.load_slice(lambda param: model_state[names[id(param)]])
                    continue
                for param in flat.params:
                    param.copy_(model_state[names[id(param)]])
        if named_optimizer is not None:
            self.optimizer.load_state_dict(self._sliced_state(named_optimizer))

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

    def own_slices(self, placements: Dict[str, Placement]) -> Tuple[list, list, List[dict]]:
        """This rank's share of a checkpoint, with no collective: for each counted parameter
        (flat.counted: one tensor rank's copy of a replicated box) the flat range of its box
        that this rank's slice holds, with the weights of that range (at stages 1-2, whose
        weights every rank of the set holds whole, only that range, so each element is written
        once) and the optimizer state of it, in the plain optimizer's form: (range, weights),
        (range, state entry), and the groups' settings."""
        names, weights, optimizer = self._names(), [], []
        for flat in self._flats_in_optimizer_order():
            if not flat.counted:
                continue
            entry = self.optimizer.state.get(flat.shard) or {}
            for param, low, high, at in flat.owned_ranges():
                piece = placements[names[id(param)]].flat_range(low, high - low)
                weights.append((piece, flat.shard.detach()[at : at + high - low]))
                if entry:  # a scalar (the step) a copy each: a shared counter would be bumped once per range
                    optimizer.append((piece, {key: value[at : at + high - low] if is_per_element(value) else
                                              copy_value(value) for key, value in entry.items()}))
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        return weights, optimizer, settings

    # --- one step -----------------------------------------------------------------------------
    def _grad_ready(self, unit: Unit, param) -> None:
        if self.stage >= 2:
            unit.flat_of[id(param)].absorb_grad(param)
        unit.grads_ready += 1
        if unit.grads_ready == len(unit.params) * self.passes_per_reduce:
            self._reduce(unit)

    def _reduce(self, unit: Unit) -> None:
        self.pending.append((unit, unit.reduce_async(self.wire_dtype)))
        if self.reshards and not self.whole:
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

    def squared_norm(self, counted) -> torch.Tensor:
        """The squares of this rank's slices of the gradients (the flats' own `counted` flags
        say which count); the layout sums them over the set."""
        grads = [f.shard.grad for f in self.flats if f.shard.grad is not None and f.counted]
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.flats[0].full.device)
        # One fused norm kernel per dtype, as torch's clip_grad_norm_ (a pow and a sum per slice
        # cost stage 1 twice the time of the norms).
        return torch.stack(torch._foreach_norm(grads)).double().square().sum()

    def scale_gradients(self, scale: torch.Tensor) -> None:
        grads = [f.shard.grad for f in self.flats if f.shard.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device, grads[0].dtype))

    def optimizer_step(self, scaler) -> None:
        DataSync.optimizer_step(self, scaler)
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
            if unit.current or not unit.flats:
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
        if self.reshards:
            self.model.register_forward_hook(self._after_model)
            for unit in self.units[1:]:
                unit.module.register_forward_hook(functools.partial(self._after_layer, unit))

    def _gather(self, unit: Unit) -> None:
        if not unit.flats:  # a middle pipeline stage has nothing outside its layers
            return
        if unit.gathering is not None:
            handle, unit.gathering = unit.gathering, None
            unit.finish_gather(handle)
        elif not unit.current:
            unit.finish_gather(unit.gather_async())

    def _prefetch(self, index: int) -> None:
        if 0 <= index < len(self.units):
            unit = self.units[index]
            if unit.flats and unit.gathering is None and not unit.current:
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
    def whole_part(self):
        """Stage 3: every unit gathered for the duration and freed after (FSDP's
        summon_full_params; evaluation's ranks run different numbers of batches, so no gather
        may sit inside its forward); the forward hooks stand idle meanwhile. Stages 1-2: the
        gathers the last step left pending, completed."""
        self._gather_all()
        if self.stage < 3 or self.whole:
            yield self.model
            return
        self.whole = True
        self.whole_gathers += 1
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

    def checksum(self) -> str:
        """Stage 3: each unit gathered, hashed and freed in turn (the whole model never held)."""
        if self.stage < 3 or self.whole:
            self._gather_all()
            return super().checksum()
        names = {id(p): name for name, p in self.model.named_parameters()}
        digest = hashlib.sha256()
        for unit in self.units:
            self._gather(unit)
            models.add_to_checksum(digest, [(names[id(p)], p) for p in unit.params])
            unit.free()
        return digest.hexdigest()[:16]

    def resting_state_bytes(self) -> Dict[str, int]:
        return self.resting_bytes or self.state_bytes()

    def describe(self) -> dict:
        return {**super().describe(), "zero_stage": self.stage, "units": len(self.units),
                "whole_model_gathers": self.whole_gathers}
