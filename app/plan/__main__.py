"""python -m app.plan: model state by ZeRO stage, the ranked layouts for a world, or calibration.

    python -m app.plan model=llama_7b                                  # model-state GiB per rank by stage and world
    python -m app.plan model=llama_small world=2 memory_gib=4 global_batch=16 [top=10] [training overrides]
    python -m app.plan calibrate [plan.cache=PATH]                    # measure this machine (under a minute)

world, memory_gib, global_batch and top are the planner's own arguments; the rest are training
overrides (plan.hardware=h100_8x, train.precision=fp32, train.seq_len=2048, ...). memory_gib
defaults to plan.memory_gib, then the profile's memory per rank, then this host's memory over
`world`; global_batch to micro_batch_size x grad_accum_steps x world.
"""
import sys
from typing import List, Optional

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app import cli, config
from app.plan import calibrate, choose, profile, state

PLAN_ARGUMENTS = ("world", "memory_gib", "global_batch", "top")
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TOP = 10


def state_table(cfg, memory_gib: Optional[str]) -> str:
    """Model-state GiB per rank by ZeRO stage and world size, and the smallest fit in memory_gib."""
    parameters = state.count_parameters(cfg)
    optimizer_bytes = state.optimizer_bytes_per_parameter(cfg.optim.name, cfg.optim.momentum)
    lines = [f"{cfg.model.name}: {parameters / 1e9:.3f}B parameters, {cfg.optim.name} ({optimizer_bytes} bytes/parameter "
             "of state); model state per rank (python -m app.plan ... world=N adds activations and time):", "",
             "| ranks | " + " | ".join(f"stage {s} GiB/rank" for s in range(4)) + " |", "|" + "---|" * 5]
    for world in WORLD_SIZES:
        cells = [sum(state.model_state_bytes(parameters, s, world, optimizer_bytes).values()) / 2**30 for s in range(4)]
        lines.append(f"| {world} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    if memory_gib is not None:
        fit = state.smallest_fit(parameters, optimizer_bytes, float(memory_gib) * 2**30)
        lines.append(f"\nfits in {memory_gib} GiB per rank: "
                     + (f"{fit[0]} ranks at parallel.zero_stage={fit[1]}" if fit else "no stage up to 1024 ranks"))
    return "\n".join(lines)


def command_line(cfg, prediction: choose.Prediction, overrides: List[str]) -> str:
    cell = prediction.cell
    launcher = (f"mpirun -np {cell.world}" if cell.pipeline > 1 else f"horovodrun -np {cell.world}")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in {k.split("=")[0] for k in cell.overrides()}]
    return " ".join([launcher, "python -m app.train", *kept, *cell.overrides()])


def ranked_table(ranked: List[choose.Prediction], top: int) -> str:
    lines = ["| # | layout | peak GiB/rank | step s | tokens/s | compute s | bubble s | communication s "
             "| ZeRO work s |", "|---|---|---|---|---|---|---|---|---|"]
    for index, p in enumerate(ranked[:top], 1):
        s = p.seconds
        lines.append(f"| {index} | {p.cell.name()} | {p.peak_bytes / 2**30:.2f} | {p.step_s:.3f} | "
                     f"{p.tokens_per_s:,.0f} | {s['compute']:.3f} | {s['bubble']:.3f} | "
                     f"{s['tensor'] + s['pipeline_sends'] + s['data']:.3f} | {s['zero_work']:.3f} |")
    return "\n".join(lines)


def plan_layouts(cfg, args: dict, overrides: List[str]) -> None:
    hardware = profile.load(cfg.plan)
    world = int(args["world"])
    global_batch = int(args.get("global_batch", cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world))
    plan_cfg = OmegaConf.merge(cfg.plan, {"memory_gib": float(args["memory_gib"])} if "memory_gib" in args else {})
    cap = choose.memory_cap_bytes(plan_cfg, hardware, world)
    planner = choose.Planner(cfg, hardware)
    ranked = planner.rank(world, global_batch, cap)
    print(f"{cfg.model.name} on {world} ranks, global batch {global_batch} x {planner.shape.seq_len} tokens, "
          f"at most {cap / 2**30:.2f} GiB per rank; {profile.describe(hardware)}")
    if not ranked:
        cli.fail(f"no layout of {cfg.model.name} on {world} ranks fits {cap / 2**30:.2f} GiB per rank at global batch "
                 f"{global_batch}; add ranks, raise memory_gib or lower global_batch")
    print(f"{len(ranked)} layouts fit, fastest first:\n\n{ranked_table(ranked, int(args.get('top', DEFAULT_TOP)))}")
    print(f"\nbest: {command_line(cfg, ranked[0], overrides)}")


def main() -> None:
    argv = sys.argv[1:]
    calibrating = bool(argv) and argv[0] == "calibrate"
    argv = argv[1:] if calibrating else argv
    args = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in PLAN_ARGUMENTS)
    overrides = [a for a in argv if a.split("=", 1)[0] not in args]
    try:
        cfg = cli.compose_config(overrides)
        if calibrating:
            calibrate.calibrate(cfg)
        elif "world" in args:
            plan_layouts(cfg, args, overrides)
        else:
            print(state_table(cfg, args.get("memory_gib")))
    except (HydraException, OmegaConfBaseException, config.ConfigError, ValueError) as error:
        cli.fail(" ".join(str(error).split()))


if __name__ == "__main__":
    main()
