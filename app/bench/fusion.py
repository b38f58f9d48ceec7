"""The model's gradient set allreduced under each HOROVOD_FUSION_THRESHOLD x HOROVOD_CYCLE_TIME
setting: fusion packs many small gradients into one buffer (fewer, larger messages); the cycle
time is how long Horovod's background thread collects ready tensors before each round.

    HOROVOD_FUSION_THRESHOLD=0 HOROVOD_CYCLE_TIME=5 \\
        mpirun -np 2 python -m app.bench.fusion SPEC.json   # or horovodrun --gloo

Horovod reads both at start-up, so each setting is its own launch (restarting Horovod inside
one job races with Gloo's rendezvous, which keeps the first start's addresses). The worker
gets the gradient shapes from the spec, so it starts without building the model."""
import torch

from app import dist, fileio
from app.bench import gradient_set, launch


def main() -> None:
    spec = launch.read_spec()
    dist.init()
    torch.set_num_threads(spec["threads"])
    tensors = gradient_set.like_gradients(spec["gradient_shapes"])
    times = gradient_set.seconds_per_set(tensors, spec["warmup_sets"], spec["measured_sets"])
    if dist.is_main():
        fileio.write_json(spec["result"], {"processes": dist.size(), "controller": dist.controller(),
                                           **gradient_set.summary(tensors, times)})


def measure(ctx, log=print) -> dict:
    fc, launcher = ctx.bench.fusion, ctx.bench.launcher
    spec = {"gradient_shapes": ctx.gradient_shapes, "threads": ctx.threads_per_process,
            "warmup_sets": fc.warmup_sets, "measured_sets": fc.measured_sets}
    rows = []
    for threshold in fc.fusion_thresholds_bytes:
        for cycle_ms in fc.cycle_times_ms:
            log(f"bench: gradient-set allreduce, fusion threshold {threshold} B, cycle time {cycle_ms} ms "
                f"({launcher})")
            env = {"HOROVOD_FUSION_THRESHOLD": str(threshold), "HOROVOD_CYCLE_TIME": str(cycle_ms)}
            result = launch.run_worker("app.bench.fusion", spec, ctx.work_dir / f"fusion-{threshold}B-{cycle_ms:g}ms",
                                       launcher, ctx.max_processes, ctx.bench, env)
            rows.append({"fusion_threshold_bytes": threshold, "cycle_time_ms": cycle_ms, **result})
    return {"launcher": launcher, "model": ctx.bench.model, "processes": ctx.max_processes, "rows": rows}


if __name__ == "__main__":
    main()
