"""sections=[planner]: how far the planner's predictions (app/plan) are from measured runs.

    python -m app.bench sections=[planner]                                    # the whole grid (long)
    python -m app.bench sections=[planner] planner.models=[llama_tiny] planner.grid.names=[D2,P2-1f1b-m4] planner.repeats=1

Every cell of planner.grid runs for every model as the layouts section runs its cells (its
worker, warm-up and timed steps, peak memory: the fullest rank's), planner.repeats times,
interleaved; a cell's measurement is the median of its runs. Predictions use the profile a
training run would (plan.cache, else cpu_default). Reported, per the issue's targets:
- the median relative step-time error and the Spearman rank correlation of predicted against
  measured step times (per model, over its cells);
- the median relative peak-memory error;
- pick quality: for each model and memory cap, the planner's pick among the grid's cells (the
  fastest predicted whose predicted peak fits) against the fastest measured cell that fits, and
  the plain rule's pick (data parallel if it fits, else the lowest ZeRO stage that fits, else the
  first pipeline cell that fits; fitting by measured peak, which favours the rule).
Cells with more ranks than cores are flagged oversubscribed and left out of the pick cases.
"""
import dataclasses
import math
import statistics
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from app import cli
from app.bench import layouts
from app.bench.context import Context
from app.plan import choose, profile
from app.plan.cell import from_config


def _ranks(values: List[float]) -> List[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: List[float], b: List[float]) -> Optional[float]:
    """Spearman's rank correlation (Pearson's on the ranks); None for fewer than 3 pairs or no spread."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    spread = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb)) / spread if spread else None


def model_context(ctx: Context, model: str) -> Context:
    """ctx with the layouts section set to this section's grid and model."""
    bench = OmegaConf.merge(ctx.bench, {"layouts": ctx.bench.planner.grid}, {"layouts": {"model": model}})
    return dataclasses.replace(ctx, bench=bench)


def predict(overrides: List[str], processes: int) -> choose.Prediction:
    cfg = cli.compose_config(overrides)
    return choose.Planner(cfg, profile.load(cfg.plan)).predict(from_config(cfg, processes))


def measure_cells(ctx: Context, log) -> List[dict]:
    """Every (model, cell): its prediction and its measured runs' medians."""
    pc = ctx.bench.planner
    cells = layouts.selected_cells(pc.grid)
    plans = []
    for model in pc.models:
        model_ctx = model_context(ctx, model)
        for cell in cells:
            overrides, row = layouts.cell_plan(model_ctx, cell)
            plans.append((model_ctx, OmegaConf.merge(cell, {"name": f"{model}-{cell.name}"}), overrides,
                          {**row, "model": model, "cell": cell.name}, predict(overrides, row["processes"])))
    runs: Dict[int, List[dict]] = {i: [] for i in range(len(plans))}
    for _ in range(pc.repeats):
        for index, (model_ctx, cell, overrides, row, _) in enumerate(plans):
            runs[index].append(layouts.run_cell(model_ctx, cell, overrides, row, log))
    return [summarise(row, prediction, runs[i]) for i, (_, _, _, row, prediction) in enumerate(plans)]


def summarise(row: dict, prediction: choose.Prediction, runs: List[dict]) -> dict:
    if runs[0]["refused"]:
        return {**row, "refused": runs[0]["refused"]}
    step = statistics.median(r["seconds_per_step"] for r in runs)
    peak = statistics.median(r["max_peak_memory_bytes"] for r in runs)
    return {**row, "refused": None, "runs": len(runs), "predicted_step_s": prediction.step_s,
            "measured_step_s": step, "step_error": prediction.step_s / step - 1,
            "predicted_peak_bytes": prediction.peak_bytes, "measured_peak_bytes": peak,
            "memory_error": prediction.peak_bytes / peak - 1, "checkpointing": prediction.cell.checkpointing}


def plain_rule(rows: List[dict], cap: float) -> Optional[dict]:
    """Data parallel if it fits, else the lowest ZeRO stage that fits, else the first pipeline cell."""
    fits = [r for r in rows if r["measured_peak_bytes"] <= cap and r["checkpointing"] == "none"]
    data = sorted((r for r in fits if r["tensor"] == r["pipeline"] == 1), key=lambda r: r["zero_stage"])
    pipelines = [r for r in fits if r["pipeline"] > 1]
    return (data or pipelines or [None])[0]


def pick_cases(rows: List[dict], pc) -> List[dict]:
    cases = []
    for model in pc.models:
        measured = [r for r in rows if r["model"] == model and not r["refused"] and not r["oversubscribed"]]
        for cap_gib in pc.memory_caps_gib:
            cap = math.inf if cap_gib is None else cap_gib * 2**30
            fitting = [r for r in measured if r["measured_peak_bytes"] <= cap]
            predicted = [r for r in measured if r["predicted_peak_bytes"] <= cap]
            if not fitting or not predicted:
                cases.append({"model": model, "cap_gib": cap_gib, "fastest": None})
                continue
            fastest = min(fitting, key=lambda r: r["measured_step_s"])
            pick = min(predicted, key=lambda r: r["predicted_step_s"])
            rule = plain_rule(measured, cap)
            cases.append({
                "model": model, "cap_gib": cap_gib, "fastest": fastest["cell"], "pick": pick["cell"],
                "pick_fits": pick["measured_peak_bytes"] <= cap,
                "pick_over_fastest": pick["measured_step_s"] / fastest["measured_step_s"],
                "rule": rule["cell"] if rule else None,
                "rule_over_fastest": rule["measured_step_s"] / fastest["measured_step_s"] if rule else None})
    return cases


def measure(ctx: Context, log=print) -> dict:
    pc = ctx.bench.planner
    rows = measure_cells(ctx, log)
    ran = [r for r in rows if not r["refused"]]
    correlations = {model: spearman([r["predicted_step_s"] for r in ran if r["model"] == model],
                                    [r["measured_step_s"] for r in ran if r["model"] == model])
                    for model in pc.models}
    cases = pick_cases(rows, pc)
    judged = [c for c in cases if c["fastest"]]
    return {
        "precision": pc.grid.precision, "processes": pc.grid.processes, "global_batch": pc.grid.global_batch,
        "repeats": pc.repeats,
        "profile": profile.describe(profile.load(cli.compose_config(list(ctx.train_overrides)).plan)), "rows": rows,
        "picks": cases,
        "median_step_error": statistics.median(abs(r["step_error"]) for r in ran) if ran else None,
        "median_memory_error": statistics.median(abs(r["memory_error"]) for r in ran) if ran else None,
        "spearman": correlations,
        "picks_within_target": sum(c["pick_fits"] and c["pick_over_fastest"] <= 1 + pc.max_pick_slowdown
                                   for c in judged),
        "picks_judged": len(judged),
        "targets": {"max_step_error": pc.max_step_error, "min_spearman": pc.min_spearman,
                    "max_memory_error": pc.max_memory_error, "max_pick_slowdown": pc.max_pick_slowdown},
    }
