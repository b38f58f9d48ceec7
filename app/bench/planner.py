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
  fastest predicted whose predicted peak fits, or the plain rule's choice where predicted
  within plan.pick_margin of it, as parallel.auto picks) against the fastest measured cell that
  fits, and the plain rule's pick (data parallel if it fits, else the lowest ZeRO stage that
  fits, else the first pipeline cell that fits; fitting by measured peak, which favours the rule).
Cells with more ranks than cores are flagged oversubscribed and left out of the pick cases
and the fit: the profile's two assumed numbers (backward_overlap, activation_factor) fitted to
the measured rows, with each model's errors under the values fitted on the other models alone.
planner.measured=<bench.json> predicts a previous run's rows again instead of running them (after
a recalibration, or to try a profile's numbers).
"""
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from app import cli
from app.bench import layouts
from app.bench.context import Context
from app.plan import choose, profile
from app.plan.cell import Cell, from_config


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


def planner_of(overrides: List[str], processes: int) -> Tuple[choose.Planner, Cell]:
    """The planner a training run with these overrides would use (its profile: plan.cache, else
    plan.hardware), and the run's cell."""
    cfg = cli.compose_config(overrides)
    # The bench runs every cell on this one host.
    return choose.Planner(cfg, profile.load(cfg.plan), processes), from_config(cfg, processes)


def predict(overrides: List[str], processes: int) -> choose.Prediction:
    planner, cell = planner_of(overrides, processes)
    return planner.predict(cell)


def remeasured_cells(path: str) -> List[dict]:
    """A previous run's rows (planner.measured), each predicted again with today's profile."""
    try:
        rows = json.loads(Path(path).read_text())["planner"]["rows"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"planner.measured={path} is not a bench.json with a planner section ({error}); "
                         "point it at a previous `python -m app.bench sections=[planner]` run's bench.json") from None
    return [row if row["refused"] else {**row, **errors(predict(row["overrides"], row["processes"]), row)}
            for row in rows]


def measure_cells(ctx: Context, log) -> List[dict]:
    """Every (model, cell): its prediction and its measured runs' medians."""
    pc = ctx.bench.planner
    if pc.measured:
        return remeasured_cells(pc.measured)
    cells = layouts.selected_cells(pc.grid)
    plans = []
    for model in pc.models:
        model_ctx = model_context(ctx, model)
        for cell in cells:
            overrides, row = layouts.cell_plan(model_ctx, cell)
            plans.append((model_ctx, OmegaConf.merge(cell, {"name": f"{model}-{cell.name}"}), overrides,
                          {**row, "model": model, "cell": cell.name, "overrides": overrides},
                          predict(overrides, row["processes"])))
    runs: Dict[int, List[dict]] = {i: [] for i in range(len(plans))}
    for _ in range(pc.repeats):
        for index, (model_ctx, cell, overrides, row, _) in enumerate(plans):
            runs[index].append(layouts.run_cell(model_ctx, cell, overrides, row, log))
    return [summarise(row, prediction, runs[i]) for i, (_, _, _, row, prediction) in enumerate(plans)]


def summarise(row: dict, prediction: choose.Prediction, runs: List[dict]) -> dict:
    if runs[0]["refused"]:
        return {**row, "refused": runs[0]["refused"]}
    measured = {"measured_step_s": statistics.median(r["seconds_per_step"] for r in runs),
                "measured_peak_bytes": statistics.median(r["max_peak_memory_bytes"] for r in runs)}
    return {**row, "refused": None, "runs": len(runs), **measured, **errors(prediction, measured),
            "checkpointing": prediction.cell.checkpointing}


def errors(prediction: choose.Prediction, measured: dict) -> dict:
    return {"predicted_step_s": prediction.step_s, "step_error": prediction.step_s / measured["measured_step_s"] - 1,
            "predicted_peak_bytes": prediction.peak_bytes,
            "memory_error": prediction.peak_bytes / measured["measured_peak_bytes"] - 1}


def plain_rule(rows: List[dict], cap: float) -> Optional[dict]:
    """Data parallel if it fits, else the lowest ZeRO stage that fits, else the first pipeline
    cell (choose.plain_rank's order; among equals, the grid's)."""
    ruled = [r for r in rows if r["measured_peak_bytes"] <= cap and choose.plain_rank(row_cell(r)) is not None]
    return min(ruled, key=lambda r: choose.plain_rank(row_cell(r)), default=None)


def row_cell(row: dict) -> Cell:
    """The layout of a measured row, as the planner's pick reads it."""
    return Cell(row["processes"], row["tensor"], row["pipeline"], row["zero_stage"], row["schedule"] or "1f1b",
                row["checkpointing"])


def pick_cases(rows: List[dict], pc, margin: float) -> List[dict]:
    """Per model and cap: the planner's pick among the grid's cells (choose.prefer_plain, as
    parallel.auto picks), the plain rule's, and the fastest measured."""
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
            pick = choose.prefer_plain(predicted, row_cell, lambda r: r["predicted_step_s"], margin)
            rule = plain_rule(measured, cap)
            cases.append({
                "model": model, "cap_gib": cap_gib, "fastest": fastest["cell"], "pick": pick["cell"],
                "pick_fits": pick["measured_peak_bytes"] <= cap,
                "pick_over_fastest": pick["measured_step_s"] / fastest["measured_step_s"],
                "rule": rule["cell"] if rule else None,
                "rule_over_fastest": rule["measured_step_s"] / fastest["measured_step_s"] if rule else None})
    return cases


def _grid(low_high: List[float], steps: int) -> List[float]:
    low, high = low_high
    return [low + (high - low) * i / steps for i in range(steps + 1)]


def _abs_errors(entries, key: str, field_name: str, value: float) -> List[float]:
    """The absolute errors over entries (planner, cell, row) with the profile's field set to value."""
    found = []
    for planner, cell, row in entries:
        planner.profile = dataclasses.replace(planner.profile, **{field_name: value})
        found.append(abs(errors(planner.predict(cell), row)[key]))
    return found


def _median_error(entries, key: str, field_name: str, value: float) -> float:
    return statistics.median(_abs_errors(entries, key, field_name, value))


def _best(entries, key: str, field_name: str, candidates: List[float]) -> Tuple[float, float]:
    """(value, median error) of the candidate with the smallest mean error: the mean, since cells
    the field does not touch (a stage's overlap where nothing is left to hide) would make every
    candidate's median alike. Among equals, the lowest."""
    value = min(candidates, key=lambda v: statistics.mean(_abs_errors(entries, key, field_name, v)))
    return value, _median_error(entries, key, field_name, value)


def fit(rows: List[dict], pc) -> dict:
    """The profile's two assumed numbers fitted to the measured rows (not oversubscribed): the
    data dimension's backward_overlap to the step times, activation_factor to the peaks, each
    by a grid search on the mean absolute error. Out of sample: each model's errors with the
    values fitted on the other models alone."""
    entries = [(*planner_of(r["overrides"], r["processes"]), r) for r in rows
               if not r["refused"] and not r["oversubscribed"]]
    if not entries:
        return {}
    overlaps = _grid(pc.fit_overlap_range, pc.fit_steps)
    factors = _grid(pc.fit_activation_factor_range, pc.fit_steps)
    overlap, step_error = _best(entries, "step_error", "backward_overlap", overlaps)
    factor, memory_error = _best(entries, "memory_error", "activation_factor", factors)
    held_out = {}
    for model in pc.models:
        fitted_on = [e for e in entries if e[2]["model"] != model]
        tested = [e for e in entries if e[2]["model"] == model]
        if not fitted_on or not tested:
            continue
        other_overlap, _ = _best(fitted_on, "step_error", "backward_overlap", overlaps)
        other_factor, _ = _best(fitted_on, "memory_error", "activation_factor", factors)
        held_out[model] = {
            "backward_overlap": other_overlap, "activation_factor": other_factor,
            "median_step_error": _median_error(tested, "step_error", "backward_overlap", other_overlap),
            "median_memory_error": _median_error(tested, "memory_error", "activation_factor", other_factor)}
    return {"backward_overlap": overlap, "median_step_error": step_error, "activation_factor": factor,
            "median_memory_error": memory_error, "held_out": held_out}


def measure(ctx: Context, log=print) -> dict:
    pc = ctx.bench.planner
    rows = measure_cells(ctx, log)
    ran = [r for r in rows if not r["refused"]]
    correlations = {model: spearman([r["predicted_step_s"] for r in ran if r["model"] == model],
                                    [r["measured_step_s"] for r in ran if r["model"] == model])
                    for model in pc.models}
    cases = pick_cases(rows, pc, cli.compose_config(list(ctx.train_overrides)).plan.pick_margin)
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
        "fitted": fit(rows, pc),
        "targets": {"max_step_error": pc.max_step_error, "min_spearman": pc.min_spearman,
                    "max_memory_error": pc.max_memory_error, "max_pick_slowdown": pc.max_pick_slowdown},
    }
