"""Parameters flattened into one fp32 buffer and cut into contiguous per-rank slices, the
storage behind ZeRO (app/parallel/zero.py).

A `FlatShard` holds the parameters of one optimizer group in one unit (a decoder layer, or
what is left of the model); the model's parameters become views into its `full` buffer, and
this rank owns `full[start:end]`, the slice Horovod's reducescatter hands it: of n elements
over s ranks, the first n % s ranks get one element more. A `Unit` is the FlatShards of one
module, moved together in grouped collectives (one negotiation, one fused buffer)."""
from typing import Callable, List, Optional, Tuple

import horovod.torch as hvd
import torch

from app.state_dicts import is_per_element


def split_sizes(numel: int, size: int) -> List[int]:
    """Horovod's reducescatter split of dim 0: the first numel % size ranks get one more."""
    base, extra = divmod(numel, size)
    return [base + (1 if rank < extra else 0) for rank in range(size)]


class FlatShard:
    """`initial` (a fresh model's, app/parallel/model_part.py): a parameter's box of its seeded
    global tensor, for parameters that are empty shells of their shape. Stages 1-2 then write each
    box into the whole buffer; stage 3 copies into its slice only the part of each box that falls
    in it, and has no buffer until its first gather, so building never holds the whole unit.
    Otherwise (loaded weights) the parameters are flattened as they are."""

    def __init__(self, params: List[torch.nn.Parameter], group: int, process_set, shard_is_view: bool,
                 counted: bool = True, initial: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None):
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("ZeRO keeps fp32 parameters (bf16 is autocast's compute type); build the model in "
                             "fp32 or use parallel.zero_stage=0")
        self.params, self.group = params, group
        self.counted = counted  # whether this rank's squares count in the global gradient norm
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        counts = split_sizes(self.numel, process_set.size())
        self.start = sum(counts[: process_set.rank()])
        self.end = self.start + counts[process_set.rank()]
        # Stages 1-2 keep the whole buffer, so the optimizer can step on a view of it; stage 3
        # frees the buffer between uses, so the rank's slice must live on its own.
        self.shard_is_view = shard_is_view
        # The flat gradients: stage 1's for good (the parameters' .grad are views of it), stages
        # 2-3's from a unit's first gradient in backward until its reduce-scatter is sent.
        self.grad_full: Optional[torch.Tensor] = None
        self.grads_are_views = False
        self.slot_of = {id(p): i for i, p in enumerate(params)}
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        with torch.no_grad():
            if initial is None:
                self._bind(torch.cat([p.detach().reshape(-1) for p in params]))
            elif shard_is_view:
                self._bind(torch.empty(self.numel, device=params[0].device))
                for param in params:
                    param.copy_(initial(param))
            else:
                self.full = torch.empty(0, device=params[0].device)  # sized at its first gather
                self.shard = torch.nn.Parameter(self._slice_from(initial))
                return
            owned = self.full[self.start : self.end]
            self.shard = torch.nn.Parameter(owned if shard_is_view else owned.clone())
            if not shard_is_view:  # the rank's slice is its own; the unit is gathered when used
                self.free()

    def _bind(self, full: torch.Tensor) -> None:
        """`full` becomes the buffer and the parameters views of it."""
        self.full = full
        for param, view in zip(self.params, full.split(self.numels)):
            param.data = view.view_as(param)

    def _slice_from(self, value_of) -> torch.Tensor:
        """This rank's slice of the unit's parameters, each parameter's value (a fresh draw of its
        box, or a checkpoint's read) asked for only if it overlaps the slice."""
        shard = torch.empty(self.end - self.start, device=self.params[0].device)
        for param, low, high, at in self.owned_ranges():
            shard[at : at + high - low] = value_of(param).reshape(-1)[low:high]
        return shard

    # --- the full buffer ----------------------------------------------------------------------
    @property
    def materialized(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def free(self) -> None:
        # Freed in place, as FSDP does: autograd's saved views of the parameters keep pointing
        # at this storage and see the data again once `fill` reallocates it.
        self.full.untyped_storage().resize_(0)

    def allocate(self) -> None:
        """Stage 3: the full buffer's storage back, its contents undefined until written."""
        if self.full.numel() != self.numel:  # a fresh model's first use: the parameters become views
            self._bind(torch.empty(self.numel, device=self.full.device))
        elif not self.materialized:
            self.full.untyped_storage().resize_(self.numel * self.full.element_size())

    def fill(self, gathered: torch.Tensor) -> None:
        if self.shard_is_view:
            self._adopt(gathered)
            return
        self.allocate()
        # Through .data: a refill between forward and backward must not bump the version
        # counter autograd checks on the views it saved.
        self.full.data.copy_(gathered)

    def _adopt(self, gathered: torch.Tensor) -> None:
        """Stages 1-2: the allgather's output becomes the full buffer, the parameters and the
        rank's slice views of it: no copy of the whole model a step. Between a step and the next
        forward no autograd graph holds the old buffer's views; the optimizer state stays with
        the slice's Parameter object, whose data alone moves."""
        self._bind(gathered)
        self.shard.data = gathered[self.start : self.end]

    def load_slice(self, value_of: Callable[[torch.nn.Parameter], torch.Tensor]) -> None:
        """Stage 3: the slice from each overlapping parameter's value, read one at a time; the
        full buffer stays unallocated."""
        self.shard.data.copy_(self._slice_from(value_of))

    # --- gradients ----------------------------------------------------------------------------
    def keep_grads_in_flat_buffer(self) -> None:
        """Stage 1: the parameters' gradients become views of one flat buffer, which backward
        accumulates into in place (DDP's gradient_as_bucket_view), so the reduce-scatter needs
        no flat copy of the gradients beside them."""
        self.grad_full = torch.zeros_like(self.full)
        self.grads_are_views = True
        for param, view in zip(self.params, self.grad_full.split(self.numels)):
            param.grad = view.view_as(param)

    def absorb_grad(self, param: torch.nn.Parameter) -> None:
        """Stages 2-3: a parameter's fresh gradient is added into the unit's flat buffer (made
        at the unit's first gradient of the pass) and released, so a unit in backward holds one
        flat copy of its gradients and one parameter's gradient, not two copies of all of them."""
        if self.grad_full is None:
            self.grad_full = torch.zeros(self.numel, dtype=torch.float32, device=self.full.device)
        slot = self.slot_of[id(param)]
        self.grad_full[self.offsets[slot] : self.offsets[slot] + self.numels[slot]].add_(param.grad.reshape(-1))
        param.grad = None

    def take_flat_grad(self) -> torch.Tensor:
        """The flat fp32 gradients to reduce-scatter (zeros for parameters that got none). The
        stage-1 buffer stays with the parameters; a stage-2/3 buffer goes to the collective."""
        if self.grads_are_views:
            return self.grad_full
        flat = self.grad_full if self.grad_full is not None else torch.zeros(self.numel, device=self.full.device)
        self.grad_full = None
        return flat

    def add_grad(self, reduced: torch.Tensor) -> None:
        """The reduce-scatter is done: its result is this rank's slice; the stage-1 buffer
        starts the next step from zero."""
        if self.grads_are_views:
            self.grad_full.zero_()
        reduced = reduced.float()
        if self.shard.grad is None:
            self.shard.grad = reduced
        else:
            self.shard.grad += reduced

    # --- optimizer state in the plain optimizer's layout -------------------------------------
    def owned_ranges(self) -> List[Tuple[torch.nn.Parameter, int, int, int]]:
        """(parameter, first element, end, where they start in the slice) of each parameter this
        rank's slice overlaps, elements counted in the parameter's row-major order."""
        ranges = []
        for param, offset, numel in zip(self.params, self.offsets, self.numels):
            low, high = max(offset, self.start), min(offset + numel, self.end)
            if low < high:
                ranges.append((param, low - offset, high - offset, low - self.start))
        return ranges

    def owned_state(self, entries: List[Optional[dict]]) -> Optional[dict]:
        """This rank's slice's optimizer state from its parameters' plain states (None where a
        parameter has none: frozen until now, or never given a gradient). Such a member's moments
        are zeros, what a fresh optimizer starts from, so the others' state survives; the slice
        steps as one, so it takes the largest step count (scalars) of the members that have one."""
        present = [entry for entry in entries if entry]
        if not present:
            return None
        per_element = {key for entry in present for key, value in entry.items() if is_per_element(value)}
        state = {key: copy_value(max((entry[key] for entry in present if key in entry), key=float))
                 for key in {key for entry in present for key in entry} - per_element}
        for key in sorted(per_element):
            like = next(entry[key] for entry in present if key in entry)
            pieces = [entry[key] if entry and key in entry else like.new_zeros(param.shape)
                      for entry, param in zip(entries, self.params)]
            state[key] = torch.cat([t.reshape(-1).float() for t in pieces])[self.start : self.end].clone()
        return state


def copy_value(value):
    """Its own copy: the optimizer bumps a step counter in place, which must not reach the source."""
    return value.clone() if torch.is_tensor(value) else value


class Unit:
    """The FlatShards of one module (a layer, or the rest of the model), gathered, freed and
    reduced together."""

    def __init__(self, index: int, module: Optional[torch.nn.Module], flats: List[FlatShard], process_set):
        self.index, self.module, self.flats, self.process_set = index, module, flats, process_set
        self.params = [p for flat in flats for p in flat.params]
        self.flat_of = {id(p): flat for flat in flats for p in flat.params}
        self.grads_ready = 0  # parameters whose gradient is in, this backward pass
        self.reductions = 0  # reduce-scatters issued this step (one per micro-batch)
        self.gathering = None  # the handle of an allgather in flight
        self.stale = False  # an optimizer step changed the slices since the full buffers were filled

    @property
    def materialized(self) -> bool:
        return all(flat.materialized for flat in self.flats)

    @property
    def current(self) -> bool:
        """The full buffers hold every rank's latest slice."""
        return self.materialized and not self.stale

    def free(self) -> None:
        for flat in self.flats:
            flat.free()

    def gather_async(self):
        return hvd.grouped_allgather_async([flat.shard.detach() for flat in self.flats],
                                           name=f"zero.gather.{self.index}", process_set=self.process_set)

    def finish_gather(self, handle) -> None:
        for flat, gathered in zip(self.flats, hvd.synchronize(handle)):
            flat.fill(gathered)
        self.stale = False

    def reduce_async(self, wire_dtype: torch.dtype):
        """Reduce-scatter (average) the unit's gradients; fp32 on the wire unless fp16 compression."""
        flats = [flat.take_flat_grad().to(wire_dtype) for flat in self.flats]
        handle = hvd.grouped_reducescatter_async(flats, name=f"zero.reduce.{self.index}.{self.reductions}",
                                                 op=hvd.Average, process_set=self.process_set)
        self.reductions += 1
        self.grads_ready = 0
        return handle

    def finish_reduce(self, handle) -> None:
        for flat, reduced in zip(self.flats, hvd.synchronize(handle)):
            flat.add_grad(reduced)
