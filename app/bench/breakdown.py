"""Where a data-parallel step's time goes: data, forward, backward, allreduce wait, optimizer.
An instrumented copy of the trainer's step, built from the same pieces (the clm task's data
stream, model and loss; optim; dist.wrap_optimizer, i.e. hvd.DistributedOptimizer).

    mpirun -np 2 python -m app.bench.breakdown SPEC.json   # or horovodrun --gloo

Backward and allreduce overlap: DistributedOptimizer's hooks start each gradient's allreduce
as soon as backward produces it, and Horovod's background thread sends it while backward goes
on. So the phases are wall-clock spans that never double-count:
  backward        loss.backward(): the compute, slowed by whatever the concurrent sends take
                  from it (on CPU, Gloo's copies and reductions run on the same cores);
  allreduce wait  optimizer.synchronize(): the part of the allreduce not hidden behind backward;
  standalone      the same gradient set allreduced with nothing to overlap (gradient_set.py);
                  hidden fraction = 1 - wait / standalone estimates how much backward hides
                  (the wait also holds any skew: a rank done first waits for the slowest).
"""
import time

import torch
from omegaconf import OmegaConf

from app import cli, dist, fileio, optim, runtime, tasks
from app.bench import gradient_set, launch

PHASES = ("data", "forward", "backward", "allreduce_wait", "optimizer")


def main() -> None:
    spec = launch.read_spec()
    cfg = cli.compose_config(spec["overrides"])
    OmegaConf.resolve(cfg)
    dist.init(cfg.horovod)
    torch.set_num_threads(dist.place_rank(spec["threads"], cfg.train.bind_cores))
    device = runtime.pick_device(cfg.train.device, dist.local_rank())
    task = tasks.build(cfg, dist.rank(), dist.size())
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().to(device)
    model.train()
    optimizer = optim.build_optimizer(model, cfg.optim, cfg.optim.lr)
    optimizer = dist.wrap_optimizer(optimizer, model, cfg.sync, cfg.train.grad_accum_steps)
    dist.broadcast_model_and_optimizer(model, optimizer, resumed=False)
    precision_ctx = runtime.autocast_context(cfg.train.precision, device)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous; time their completion
        return time.perf_counter()

    totals = dict.fromkeys(PHASES + ("step",), 0.0)
    warmup, measured = spec["warmup_steps"], spec["measure_steps"]
    for step in range(warmup + measured):
        spent = dict.fromkeys(PHASES, 0.0)
        step_started = clock()
        for micro_step in range(cfg.train.grad_accum_steps):
            t0 = clock()
            batch = task.micro_batch(step * task.stream.global_batch, micro_step)
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            t1 = clock()
            with precision_ctx:
                loss = task.loss(model, batch)
            t2 = clock()
            (loss / cfg.train.grad_accum_steps).backward()
            t3 = clock()
            spent["data"] += t1 - t0
            spent["forward"] += t2 - t1
            spent["backward"] += t3 - t2
        t0 = clock()
        dist.synchronize_gradients(optimizer)
        t1 = clock()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        with dist.step_without_sync(optimizer):
            optimizer.step()
        optimizer.zero_grad()
        t2 = clock()
        spent["allreduce_wait"] += t1 - t0
        spent["optimizer"] += t2 - t1
        if step >= warmup:
            for phase in PHASES:
                totals[phase] += spent[phase]
            totals["step"] += t2 - step_started

    # Mean over ranks of each rank's mean per step, as the trainer's time/* metrics are.
    per_step = dist.sum_over_ranks(
        torch.tensor([totals[k] / measured for k in PHASES + ("step",)], dtype=torch.float64), name="breakdown"
    ) / dist.size()
    tensors = gradient_set.like_gradients(gradient_set.shapes(model))
    standalone = gradient_set.summary(tensors, gradient_set.seconds_per_set(tensors, 1, spec["standalone_sets"]))
    if dist.is_main():
        seconds = dict(zip(PHASES + ("step",), per_step.tolist()))
        fileio.write_json(spec["result"], {
            "processes": dist.size(), "controller": dist.controller(), "threads": torch.get_num_threads(),
            "precision": cfg.train.precision,
            "measured_steps": measured, "seconds_per_step": seconds,
            "tokens_per_second": dist.size() * task.stream.per_rank * task.seq_len / seconds["step"],
            "standalone_allreduce": standalone,
            "hidden_fraction": max(0.0, 1 - seconds["allreduce_wait"] / standalone["median_s"]),
        })


def measure(ctx, log=print) -> dict:
    bc = ctx.bench.breakdown
    spec = {"overrides": ctx.overrides(bc.precision), "threads": ctx.threads_per_process,
            "warmup_steps": bc.warmup_steps, "measure_steps": bc.measure_steps, "standalone_sets": bc.standalone_sets}
    log(f"bench: step-time breakdown, {bc.precision}, {ctx.max_processes} processes")
    return launch.run_worker("app.bench.breakdown", spec, ctx.work_dir / "breakdown", ctx.bench.launcher,
                             ctx.max_processes, ctx.bench)


if __name__ == "__main__":
    main()
