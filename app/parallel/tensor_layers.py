"""Megatron-LM's tensor-parallel pieces over a Horovod process set: the two conjugate
communication Functions, column- and row-parallel linears, a vocabulary-parallel embedding and
the vocabulary-parallel cross-entropy that lets no rank hold the full logits.

Every collective is a blocking Horovod op on the tensor-parallel set, named `tensor.<site>`:
the layer and the pass that issued it, the same name every step, so Horovod's response cache
answers it after the first step without a negotiation round. All ranks of a group run the same
layers in the same order (forward, then autograd's deterministic backward), so their names
agree. A name may repeat within a step (micro-batches, activation-checkpoint recomputes,
evaluation) because each op is waited for before its caller goes on, on the one thread that
issues them all: no rank ever has two of the group's ops in flight, let alone two of one name.
hvd.allreduce's own autograd op cannot serve as Megatron's "g": its backward
allreduces the gradient again, counting it T times. Communication is fp32 whatever the compute
precision: Horovod reduces no bfloat16.
"""
import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn


class TensorGroup:
    """The ranks that hold the shards of one model copy: their process set, this rank's index in
    it, and the names of their collectives."""

    def __init__(self, process_set, size: int, rank: int):
        self.process_set, self.size, self.rank = process_set, size, rank
        self.bytes_reduced = 0  # the payload this rank has put into allreduces (app.bench reads it)

    def allreduce(self, x: torch.Tensor, site: str, op=hvd.Sum) -> torch.Tensor:
        wire = x.detach().contiguous()
        if wire.dtype in (torch.bfloat16, torch.float16):  # no bf16 in Horovod; fp16 sums lose too much
            wire = wire.float()
        self.bytes_reduced += wire.numel() * wire.element_size()
        handle = hvd.allreduce_async(wire, op=op, name=f"tensor.{site}", process_set=self.process_set)
        return hvd.synchronize(handle).to(x.dtype)

    def allgather(self, x: torch.Tensor, site: str, dim: int = 0) -> torch.Tensor:
        """The group's shards of `x` joined along `dim`, in group order (no autograd)."""
        wire = x.detach().movedim(dim, 0).contiguous()
        handle = hvd.allgather_async(wire, name=f"tensor.{site}", process_set=self.process_set)
        # Contiguous: a transposed view saved as optimizer state would reach the fused AdamW
        # kernel of a resumed run, which reads it in the wrong element order.
        return hvd.synchronize(handle).movedim(0, dim).contiguous()

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous 1/T of `full` along `dim`."""
        return full.chunk(self.size, dim)[self.rank].clone(memory_format=torch.contiguous_format)


class CopyToShards(torch.autograd.Function):
    """Megatron's f: the input goes unchanged to every shard; the gradients the shards send back
    are partial sums of the input's gradient, so backward sums them over the group."""

    @staticmethod
    def forward(ctx, x, group: TensorGroup, site: str):
        ctx.group, ctx.site = group, site
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.allreduce(grad, ctx.site + ".bwd"), None, None


class SumShards(torch.autograd.Function):
    """Megatron's g, f's conjugate: the shards' partial outputs are summed; the gradient of a sum
    is the same for every term, so backward passes it through."""

    @staticmethod
    def forward(ctx, x, group: TensorGroup, site: str):
        return group.allreduce(x, site + ".fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _sharded_parameter(tensor: torch.Tensor, group: TensorGroup, dim: int) -> nn.Parameter:
    return nn.Parameter(group.shard(tensor.detach(), dim))


class ColumnParallelLinear(nn.Module):
    """y[:, shard] = x W[shard]^T: output features split, input replicated (q/k/v, gate/up, LM head).
    Layers that share one input (q, k and v) leave f to their parent (copy_inputs_to_shards), so
    backward sums their input gradients once, not once per layer."""

    def __init__(self, linear: nn.Linear, group: TensorGroup, site: str, copy_input: bool = True):
        super().__init__()
        self.group, self.site, self.copy_input = group, site, copy_input
        self.weight = _sharded_parameter(linear.weight, group, 0)
        self.bias = None if linear.bias is None else _sharded_parameter(linear.bias, group, 0)

    def forward(self, x):
        if self.copy_input:
            x = CopyToShards.apply(x, self.group, self.site)
        return F.linear(x, self.weight, self.bias)


def copy_inputs_to_shards(module: nn.Module, group: TensorGroup, site: str) -> None:
    """Megatron's f on a module's hidden-states input (torchtitan's PrepareModuleInput): one
    backward allreduce for every column-parallel layer inside that reads it."""

    def hook(_, args, kwargs):
        if args:
            return (CopyToShards.apply(args[0], group, site), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": CopyToShards.apply(kwargs["hidden_states"], group, site)}

    module.register_forward_pre_hook(hook, with_kwargs=True)


class RowParallelLinear(nn.Module):
    """y = sum over shards of x[:, shard] W[:, shard]^T: input features split (o, down); the
    bias, replicated, is added once after the sum."""

    def __init__(self, linear: nn.Linear, group: TensorGroup, site: str):
        super().__init__()
        self.group, self.site = group, site
        self.weight = _sharded_parameter(linear.weight, group, 1)
        self.bias = linear.bias

    def forward(self, x):
        out = SumShards.apply(F.linear(x, self.weight), self.group, self.site)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds the rows of its slice of the vocabulary and looks up only those tokens;
    the others' rows are zero, so the sum over the group is the full lookup. The padding row
    (BERT's) gets no gradient from lookups, as in nn.Embedding, on the rank that holds it."""

    def __init__(self, embedding: nn.Embedding, group: TensorGroup, site: str):
        super().__init__()
        self.group, self.site = group, site
        self.weight = _sharded_parameter(embedding.weight, group, 0)
        self.start = group.rank * self.weight.shape[0]
        pad = None if embedding.padding_idx is None else embedding.padding_idx - self.start
        self.padding_idx = pad if pad is not None and 0 <= pad < self.weight.shape[0] else None

    def forward(self, input_ids):
        outside = (input_ids < self.start) | (input_ids >= self.start + self.weight.shape[0])
        local = (input_ids - self.start).masked_fill(outside, 0)
        rows = F.embedding(local, self.weight, padding_idx=self.padding_idx).masked_fill(outside.unsqueeze(-1), 0.0)
        return SumShards.apply(rows, self.group, self.site)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocabulary-sharded logits (Megatron's cross_entropy.py): the
    group agrees on each token's maximum logit, then sums the target's logit (held by one rank)
    and the softmax denominator, two numbers per token instead of V/T logits."""

    @staticmethod
    def forward(ctx, logits, targets, group: TensorGroup, start: int):
        logits = logits.float()
        top = group.allreduce(logits.max(dim=-1).values, "cross_entropy.max", op=hvd.Max)
        shifted = logits - top.unsqueeze(-1)
        outside = (targets < start) | (targets >= start + logits.shape[-1])
        local = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        summed = group.allreduce(torch.stack([target_logit, exp.sum(dim=-1)]), "cross_entropy.sums")
        target_logit, denominator = summed[0], summed[1]
        softmax = exp.div_(denominator.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return denominator.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        # d loss / d logit = softmax - one_hot(target); the one-hot lives on the target's rank.
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), -(~outside).unsqueeze(-1).float())
        return grad_logits * grad.unsqueeze(-1), None, None, None


class VocabParallelLoss:
    """Reads a vocabulary-parallel head's logits (batch x ... x V/T): called, F.cross_entropy of
    them, targets equal to ignore_index skipped; `predictions`, their argmax over the whole
    vocabulary. parallelize attaches it to the model (models.logits_loss and
    models.predicted_tokens use a model's own when it has one)."""

    def __init__(self, group: TensorGroup, shard_rows: int):
        self.group, self.start = group, group.rank * shard_rows

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                 ignore_index: int = -100) -> torch.Tensor:
        # An ignored target lies outside every rank's slice, so the Function computes a finite
        # loss for it; masking that loss zeroes its gradient too.
        kept = targets != ignore_index
        losses = VocabParallelCrossEntropy.apply(logits, targets, self.group, self.start).masked_fill(~kept, 0.0)
        total = losses.sum()
        return {"sum": total, "mean": total / kept.sum()}[reduction]

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Each position's most likely token id: the group's best (value, global id) pairs
        gathered, the first rank's on a tie, so the lowest id wins, as torch.argmax picks."""
        best, index = logits.detach().float().max(dim=-1)
        pairs = torch.stack([best, (index + self.start).float()], dim=-1).unsqueeze(0)  # ids < 2^24: exact
        gathered = self.group.allgather(pairs, "predictions")  # T x batch x ... x 2
        winner = gathered[..., 0].argmax(dim=0, keepdim=True)
        return gathered[..., 1].gather(0, winner).squeeze(0).long()
