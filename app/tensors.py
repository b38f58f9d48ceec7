"""Tensors taken off the accelerator before they are pickled or saved.

A pickled CUDA tensor is rebuilt on the sender's device index (every receiver would put it on
cuda:0, the root's), and a file saved with CUDA storages cannot be read on a host without a GPU
unless the reader maps it. So everything that leaves a rank (broadcast_object, allgather_object,
mpi4py's pickled messages) or goes to disk passes through `to_cpu` first; receivers load it into
their own parameters, which puts it on their own device."""
import dataclasses

import torch


def to_cpu(obj):
    """`obj` with every tensor inside (dicts, lists, tuples, dataclasses) on the CPU; tensors
    already there are the same objects, not copies."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return type(obj)((key, to_cpu(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        return dataclasses.replace(obj, **{name: to_cpu(getattr(obj, name)) for name in fields})
    return obj
