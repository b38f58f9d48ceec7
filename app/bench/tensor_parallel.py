"""Tensor parallelism against data parallelism on the same ranks and the same global batch:
tokens/s, and the bytes each rank puts into allreduces per step beside Megatron's formula.

    mpirun -np 2 python -m app.bench.tensor_parallel SPEC.json   # or horovodrun --gloo

Data parallelism allreduces every gradient once per step (4 bytes a parameter in fp32). Tensor
parallelism allreduces activations instead: per block, forward sums the attention and MLP
outputs (2 x batch x seq x hidden) and backward the gradients of their inputs (2 more), which
is Megatron's 4 x L x b x s x h per step; the embedding's forward sum, the LM head input's
backward sum and the loss's per-token numbers come on top, and are measured here with the rest.
A ring allreduce over n ranks sends 2(n-1)/n times its payload from each rank.
"""
import torch

from app import dist, fileio
from app.bench import launch, worker
from app.step import PhaseTimer, train_step

FP32_BYTES = 4


def megatron_bytes(cfg, micro_batch: int, seq_len: int) -> int:
    """4 allreduces of b x s x h fp32 activations per block per step (forward and backward)."""
    return 4 * cfg.model.num_layers * micro_batch * seq_len * cfg.model.hidden_size * FP32_BYTES


def ring_sent(payload: int, ranks: int) -> float:
    return payload * 2 * (ranks - 1) / ranks if ranks > 1 else 0.0


def allreduce_bytes(training, cfg, measured_tensor_bytes: int, steps: int) -> dict:
    """Per rank and step: the payload of the tensor-parallel and the data-parallel allreduces."""
    mesh = dist.mesh()
    gradients = sum(p.numel() for p in training.model.parameters()) * (2 if cfg.sync.compression == "fp16" else 4)
    data_payload = gradients if mesh.data > 1 else 0
    tensor_payload = measured_tensor_bytes / steps
    return {"tensor_payload": tensor_payload, "data_payload": data_payload,
            "sent_estimate": ring_sent(tensor_payload, mesh.tensor) + ring_sent(data_payload, mesh.data)}


def main() -> None:
    spec, cfg, training = worker.read_spec_and_start()
    timer, group = PhaseTimer(training.device), training.parallel.part.tensor_group
    stream = training.task.stream
    for step in range(spec["warmup_steps"]):
        train_step(training, step * stream.global_batch, step, timer)
    before = group.bytes_reduced if group else 0
    started, measured = timer.now(), spec["measure_steps"]
    for step in range(spec["warmup_steps"], spec["warmup_steps"] + measured):
        train_step(training, step * stream.global_batch, step, timer)
    seconds = dist.sum_over_ranks(torch.tensor([(timer.now() - started) / measured], dtype=torch.float64),
                                  name="tp_bench_step").item() / dist.size()
    traffic = allreduce_bytes(training, cfg, (group.bytes_reduced if group else 0) - before, measured)
    if dist.is_main():
        micro = stream.micro_batch * stream.accum_steps
        fileio.write_json(spec["result"], {
            "layout": training.parallel.layout(), "controller": dist.controller(), "seconds_per_step": seconds,
            "global_batch": stream.global_batch, "micro_batch_per_rank": stream.micro_batch,
            "tokens_per_second": stream.global_batch * training.task.seq_len / seconds,
            "megatron_tensor_payload": megatron_bytes(cfg, micro, training.task.seq_len) if group else 0,
            **{f"{k}_bytes_per_step": v for k, v in traffic.items()},
        })


def measure(ctx, log=print) -> dict:
    """Both layouts on bench.tensor.processes ranks, same precision and global batch."""
    tc = ctx.bench.tensor
    rows = []
    for tensor in (tc.tensor, 1):
        data = tc.processes // tensor
        overrides = [*ctx.overrides(tc.precision), f"parallel.tensor={tensor}",
                     f"train.micro_batch_size={tc.global_batch // data}"]
        spec = {"overrides": overrides, "threads": ctx.threads_per_process, "warmup_steps": tc.warmup_steps,
                "measure_steps": tc.measure_steps}
        log(f"bench: tensor {tensor} x data {data}, {tc.precision}, global batch {tc.global_batch}")
        rows.append(launch.run_worker("app.bench.tensor_parallel", spec, ctx.work_dir / f"tensor{tensor}",
                                      ctx.bench.launcher, tc.processes, ctx.bench))
    return {"model": ctx.bench.model, "precision": tc.precision, "launcher": ctx.bench.launcher, "rows": rows}


if __name__ == "__main__":
    main()
