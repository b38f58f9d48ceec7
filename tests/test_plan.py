"""The planner (app/plan): its predictions are finite and ordered as the layouts' mechanics say,
it proposes nothing the trainer refuses or the memory cap excludes, a bad calibration cache is
one line, and parallel.auto trains the planner's pick and reports the prediction beside what it
measured."""
import dataclasses
import math
import subprocess
import sys
import time

import pytest

from app import cli, config, cores
from app.plan import choose, layout_costs, memory, profile
from app.plan import time as plan_time
from app.plan.cell import Cell, from_config
from conftest import ROOT, job_env, read_metrics, read_summary, run_job, tensorboard_scalars, tiny_train_args


def planner(*overrides) -> choose.Planner:
    """A planner on the cpu_default profile, whatever calibration cache this machine holds."""
    cfg = cli.compose_config(list(overrides))
    return choose.Planner(cfg, profile.hardware(profile.DEFAULT_HARDWARE))


@pytest.fixture(scope="module")
def small() -> choose.Planner:
    return planner("model=llama_small")


def test_each_zero_stage_needs_less_memory_than_the_one_before(small):
    peaks = [small.predict(Cell(4, zero_stage=stage, micro_batch_size=8)).memory for stage in range(4)]
    totals = [p["total"] for p in peaks]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, totals
    # Stage 1 shards the optimizer state, 2 the gradients, 3 the weights: each a quarter on 4 ranks.
    assert peaks[1]["optimizer_state"] == pytest.approx(peaks[0]["optimizer_state"] / 4)
    assert peaks[2]["gradients"] == pytest.approx(peaks[1]["gradients"] / 4)
    assert peaks[3]["parameters"] == pytest.approx(peaks[2]["parameters"] / 4)


def test_checkpointing_trades_activation_memory_for_compute(small):
    kept, recomputed = (small.predict(Cell(2, checkpointing=mode, micro_batch_size=8)) for mode in ("none", "full"))
    assert recomputed.memory["activations"] < kept.memory["activations"] / 2
    # A recomputed layer runs its forward again: its FLOPs grow by a third, the head's do not.
    assert kept.seconds["compute"] < recomputed.seconds["compute"] < kept.seconds["compute"] * 4 / 3


def test_more_micro_batches_shrink_the_pipeline_bubble(small):
    bubbles = []
    for micro_batches in (2, 4, 8):
        seconds = small.predict(Cell(2, pipeline=2, schedule="gpipe", micro_batch_size=16 // micro_batches,
                                     grad_accum_steps=micro_batches)).seconds
        bubbles.append(seconds["bubble"] / (seconds["bubble"] + seconds["compute"]))
    # Near (P - 1) / (m + P - 1) at P = 2: the last stage's head makes it the slower one.
    assert bubbles == sorted(bubbles, reverse=True)
    assert bubbles == pytest.approx([1 / 3, 1 / 5, 1 / 9], rel=0.25)


def test_a_pipeline_takes_m_rounds_of_its_slowest_stage_and_one_of_each_other():
    # FLOPs alone: llama_small's 6 layers split 3 and 3, and the last stage also runs the head.
    flops_only = {"fp32": profile.ComputeFit(micro_batch_overhead_s=0.0, layer_overhead_s=0.0, flops_per_s=1e10)}
    links = profile.LinkFit(latency_s=1e-18, seconds_per_byte=1e-18)
    plan = profiled("model=llama_small", "train.precision=fp32", compute=flops_only, point_to_point=links)
    cell = Cell(2, pipeline=2, micro_batch_size=2, grad_accum_steps=4)
    first, last = (plan_time.micro_batch_compute_s(plan.shape, cell, stage, plan.settings, plan.profile)
                   for stage in (0, 1))
    assert last > first
    seconds = plan.predict(cell).seconds
    assert seconds["compute"] == pytest.approx(4 * last) and seconds["bubble"] == pytest.approx(first)


def test_one_f_one_b_holds_fewer_micro_batches_than_gpipe(small):
    gpipe, one_f_one_b = (Cell(2, pipeline=2, schedule=s, micro_batch_size=2, grad_accum_steps=8)
                          for s in ("gpipe", "1f1b"))
    first_stage = [memory.activation_bytes(small.shape, cell, 0, "bf16", 2, 1.0) for cell in (gpipe, one_f_one_b)]
    # The first stage holds all 8 micro-batches under GPipe, 2 under 1F1B; the same bubble.
    assert first_stage[1] == pytest.approx(first_stage[0] / 4)
    assert small.predict(one_f_one_b).peak_bytes < small.predict(gpipe).peak_bytes
    assert small.predict(one_f_one_b).step_s == pytest.approx(small.predict(gpipe).step_s)


def test_tensor_parallelism_splits_the_flops_and_pays_blocking_allreduces(small):
    alone, split = small.predict(Cell(1, micro_batch_size=8)), small.predict(Cell(2, tensor=2, micro_batch_size=8))
    # The FLOPs halve, the fixed per-layer costs do not.
    assert alone.seconds["compute"] / 2 < split.seconds["compute"] < alone.seconds["compute"]
    assert alone.seconds["tensor"] == 0 < split.seconds["tensor"]
    assert split.memory["parameters"] == pytest.approx(alone.memory["parameters"] / 2)


def profiled(*overrides, ranks_on_host=None, **costs) -> choose.Planner:
    """A planner on cpu_default with `costs` replacing the profile's fields."""
    cfg = cli.compose_config(list(overrides))
    return choose.Planner(cfg, dataclasses.replace(profile.hardware(profile.DEFAULT_HARDWARE), **costs), ranks_on_host)


def test_zero_sends_each_unit_once_per_pass_and_stage_3_gathers_it_twice_per_micro_batch():
    # Latency alone, no overlap, no cycle wait: the data part counts the collectives.
    latency = 1e-3
    links = {name: profile.LinkFit(latency_s=latency, seconds_per_byte=1e-18)
             for name in ("allreduce", "reducescatter", "allgather")}
    plan = profiled("model=llama_small", "horovod.cycle_time_ms=1.0", backward_overlap=0.0, **links)
    units = plan.shape.layers + 1  # each layer, and the rest of the model
    for stage, m, collectives in ((1, 4, 2), (2, 4, 4 + 1), (3, 2, 2 + 2 * 2)):
        data = plan.predict(Cell(2, zero_stage=stage, micro_batch_size=1, grad_accum_steps=m)).seconds["data"]
        assert data == pytest.approx(collectives * units * latency, rel=1e-6), (stage, m)


def test_zero_work_is_priced_per_parameter_held_and_per_reduction_pass():
    costs = [0.0, 1e-9, 2e-9, 3e-9]
    plan = profiled("model=llama_small", zero_s_per_parameter=costs)
    held = plan.shape.layer_parameters * plan.shape.layers + plan.shape.first_parameters + plan.shape.last_parameters
    for stage in (0, 1, 2, 3):
        for m in (1, 4):
            work = plan.predict(Cell(2, zero_stage=stage, micro_batch_size=1, grad_accum_steps=m)).seconds["zero_work"]
            # Stage 1 reduces once a step, stages 2-3 every micro-batch.
            assert work == pytest.approx(costs[stage] * held * (m if stage >= 2 else 1)), (stage, m)


def test_tensor_parallel_work_is_priced_per_byte_allreduced():
    plain, costly = (profiled("model=llama_small", tensor_s_per_byte=cost) for cost in (0.0, 1e-9))
    cell = Cell(2, tensor=2, micro_batch_size=4, grad_accum_steps=2)
    shape = plain.shape
    # Per layer four activation allreduces, plus the vocabulary-parallel ends' two, each micro-batch.
    allreduced = 2 * (4 * shape.layers + 2) * 4 * shape.seq_len * shape.hidden * 4
    extra = costly.predict(cell).seconds["tensor"] - plain.predict(cell).seconds["tensor"]
    assert extra == pytest.approx(1e-9 * allreduced)


def test_oversubscribed_ranks_stretch_their_cpu_work_but_not_their_waits():
    cell = Cell(4, tensor=2, micro_batch_size=2)
    alone, shared = (profiled("model=llama_small", ranks_on_host=ranks, host_cores=2).predict(cell).seconds
                     for ranks in (2, 4))
    assert shared["compute"] == pytest.approx(2 * alone["compute"])
    assert shared["optimizer"] == pytest.approx(2 * alone["optimizer"])
    assert shared["tensor"] == pytest.approx(alone["tensor"]) and shared["data"] == pytest.approx(alone["data"])
    unknown = profiled("model=llama_small", host_cores=2).predict(cell).seconds  # python -m app.plan: no host given
    assert unknown["compute"] == pytest.approx(alone["compute"])


def test_pipeline_stages_share_the_fixed_cost_of_a_micro_batch():
    fixed = {"fp32": profile.ComputeFit(micro_batch_overhead_s=0.1, layer_overhead_s=0.0, flops_per_s=1e30)}
    plan = profiled("model=llama_small", "train.precision=fp32", compute=fixed)
    whole = plan.predict(Cell(2, micro_batch_size=1, grad_accum_steps=4)).seconds
    staged = plan.predict(Cell(2, pipeline=2, micro_batch_size=2, grad_accum_steps=4)).seconds
    assert whole["compute"] == pytest.approx(4 * 0.1)
    # The bubble: one round of a stage, and its sends.
    assert staged["compute"] == pytest.approx(4 * 0.05) and staged["bubble"] == pytest.approx(0.05, rel=0.05)


def test_calibration_recovers_the_layout_costs_that_made_the_steps():
    """Steps 'measured' as the planner predicts them under known ZeRO, tensor and pipeline costs:
    the calibration's fit finds those costs again from a profile that has none."""
    from app.plan import calibrate

    cfg = cli.compose_config([])
    models = {"layout": calibrate.model_overrides(128, 2, 64), "pipeline": calibrate.model_overrides(64, 2, 32)}
    true = {"zero_s_per_parameter": [0.0, 2e-9, 5e-9, 7e-9], "tensor_s_per_byte": 3e-9,
            "pipeline_s_per_micro_batch": 4e-3, "pipeline_s_per_step": 9e-3}
    base = profile.hardware(profile.DEFAULT_HARDWARE)
    measured = {}
    for name, (model, cell) in layout_costs.cells(cfg).items():
        made = choose.Planner(cli.compose_config(layout_costs.overrides(cfg, models[model], cell)),
                              dataclasses.replace(base, **true), 2)
        measured[name] = made.predict(cell).step_s
    fitted = layout_costs.fit(cfg, models, measured, dataclasses.replace(base), log=lambda line: None)
    assert fitted.zero_s_per_parameter == pytest.approx(true["zero_s_per_parameter"], rel=1e-6)
    assert fitted.tensor_s_per_byte == pytest.approx(true["tensor_s_per_byte"], rel=1e-6)
    assert fitted.pipeline_s_per_micro_batch == pytest.approx(true["pipeline_s_per_micro_batch"], rel=1e-6)
    assert fitted.pipeline_s_per_step == pytest.approx(true["pipeline_s_per_step"], rel=1e-6)


def test_every_prediction_of_the_grid_is_finite_and_positive(small):
    predictions = [small.predict(cell) for cell in small.grid(8, 32, mpi=True)]
    assert len(predictions) > 100
    for p in predictions:
        values = [*p.memory.values(), *p.seconds.values(), p.tokens_per_s]
        assert all(math.isfinite(v) and v >= 0 for v in values), p
        assert p.step_s > 0 and p.peak_bytes > 0


def test_no_proposed_layout_exceeds_the_memory_cap(small):
    everything = small.rank(4, 32, math.inf)
    cap = sorted(p.peak_bytes for p in everything)[len(everything) // 2]
    fitting = small.rank(4, 32, cap)
    assert 0 < len(fitting) < len(everything)
    assert max(p.peak_bytes for p in fitting) <= cap
    assert small.pick(4, 32, min(p.peak_bytes for p in everything) - 1, mpi=True) is None


def test_the_pick_keeps_the_plain_rules_layout_unless_another_is_predicted_faster_by_the_margin():
    plain, zero1, pipeline, tensor = Cell(2), Cell(2, zero_stage=1), Cell(2, pipeline=2), Cell(2, tensor=2)

    def pick(seconds: dict, margin: float = 0.10):
        return choose.prefer_plain(list(seconds), lambda cell: cell, seconds.get, margin)

    assert pick({plain: 1.08, pipeline: 1.0, tensor: 1.05}) == plain  # within 10% of the fastest
    assert pick({plain: 1.12, pipeline: 1.0}) == pipeline
    assert pick({plain: 1.08, pipeline: 1.0}, margin=0.0) == pipeline
    # Without plain data parallelism the rule's next choice is the lowest ZeRO stage, then a pipeline.
    assert pick({zero1: 1.05, tensor: 1.0}) == zero1 and pick({pipeline: 1.05, tensor: 1.0}) == pipeline
    assert pick({tensor: 1.0}) == tensor and pick({}) is None
    with pytest.raises(config.ConfigError, match=r"plan.pick_margin=-0.1 must be 0 or more"):
        config.validate(cli.compose_config(["plan.pick_margin=-0.1"]))


def test_layouts_the_trainer_refuses_are_never_proposed():
    tiny = planner("model=llama_tiny")  # 2 heads, 2 layers
    cells = list(tiny.grid(8, 32, mpi=True))
    assert {c.tensor for c in cells} == {1, 2} and {c.pipeline for c in cells} == {1, 2}
    tied = planner("model=llama_tiny", "model.tie_embeddings=true")
    # A tied pipeline cannot shard its embeddings (app/config.py validate_pipeline).
    tied_cells = list(tied.grid(4, 16, mpi=True))
    assert not [c for c in tied_cells if c.pipeline > 1 and c.zero_stage > 0]
    assert [c for c in tied_cells if c.pipeline > 1] and [c for c in tied_cells if c.zero_stage > 0]


def test_a_gloo_launch_is_never_given_a_pipeline(small):
    assert {c.pipeline for c in small.grid(4, 16, mpi=False)} == {1}


def test_planning_the_whole_grid_takes_under_5_s():
    started = time.perf_counter()
    ranked = planner("model=llama_7b", "train.seq_len=2048").rank(64, 512, 80 * 2**30)
    assert ranked and time.perf_counter() - started < 5


def test_a_calibration_cache_reads_back_as_written(tmp_path):
    written = profile.hardware("a100_8x")
    written.calibrated = True
    profile.write_cache(written, tmp_path / "profile.json")
    assert profile.read_cache(tmp_path / "profile.json") == written


def plan_command(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.plan", *args], cwd=ROOT, env=job_env(), capture_output=True,
                          text=True, timeout=300)


def test_a_corrupt_cache_is_one_line_naming_the_file_and_the_fix(tmp_path):
    cache = tmp_path / "profile.json"
    cache.write_text('{"compute": ')
    result = plan_command("model=llama_tiny", "world=2", f"plan.cache={cache}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert str(cache) in result.stderr and "python -m app.plan calibrate" in result.stderr


# Calibration at its smallest: two buffer sizes, three tiny timed models at fp32, the layout jobs'
# model with one timed step.
SMALL_CALIBRATION = [
    "plan.calibration.min_bytes=4096", "plan.calibration.max_bytes=65536", "plan.calibration.size_factor=16",
    "plan.calibration.seconds_per_size=0.05", "plan.calibration.precisions=[fp32]",
    "plan.calibration.models=[[64,1,32,1],[64,2,32,1],[128,1,32,2]]", "plan.calibration.repeats=1",
    "plan.calibration.optimizer_parameters=100000", "plan.calibration.layout_model=[128,2,32,1]",
    "plan.calibration.pipeline_model=[64,2,32,1]",
    "plan.calibration.layout_warmup_steps=1", "plan.calibration.layout_measure_steps=1"]


def test_calibration_measures_every_cost_and_the_planner_then_uses_it(tmp_path):
    cache = tmp_path / "profile.json"
    result = plan_command("calibrate", f"plan.cache={cache}", *SMALL_CALIBRATION)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = profile.read_cache(cache)
    assert measured.calibrated and measured.host_cores == len(cores.affinity()) and list(measured.compute) == ["fp32"]
    assert 100 * 2**20 < measured.process_baseline_bytes < 2 * 2**30  # torch, Horovod, MPI loaded
    # A step's resident peak over the formula's activations: near 1 when both count the same things.
    assert 0.5 < measured.activation_factor < 4, measured.activation_factor
    links = [measured.allreduce, measured.reducescatter, measured.allgather, measured.point_to_point]
    assert all(link.latency_s > 0 and link.seconds_per_byte > 0 for link in links)
    # The layout jobs ran every stage and tensor parallelism (the log names each step's seconds).
    names = (*layout_costs.ZERO, "tensor", "pipeline", "pipeline_long", "pipeline_base")
    assert all(f"{name} " in result.stdout for name in names), result.stdout
    costs = [*measured.zero_s_per_parameter, measured.tensor_s_per_byte, measured.pipeline_s_per_micro_batch,
             measured.pipeline_s_per_step]
    assert len(costs) == 7 and costs[0] == 0 and all(math.isfinite(c) and c >= 0 for c in costs), costs
    planned = plan_command("model=llama_tiny", "world=2", "memory_gib=2", "train.precision=fp32", f"plan.cache={cache}")
    assert planned.returncode == 0 and f"profile {measured.name}" in planned.stdout, planned.stderr


def test_a_missing_cache_plans_with_the_default_profile_and_says_so(tmp_path):
    result = plan_command("model=llama_tiny", "world=2", "memory_gib=2", f"plan.cache={tmp_path / 'none.json'}")
    assert result.returncode == 0, result.stderr
    assert "profile cpu_default: not calibrated here" in result.stdout
    assert "best: horovodrun -np 2 python -m app.train" in result.stdout


@pytest.fixture(scope="module")
def auto_run(tiny_data, tmp_path_factory):
    """A 2-rank parallel.auto run under a cap that rules out plain data parallelism, and the
    pick the planner makes in this process from the same inputs."""
    run_dir = tmp_path_factory.mktemp("auto") / "run"
    cache = f"plan.cache={run_dir.parent / 'no-cache.json'}"
    args = tiny_train_args(tiny_data, run_dir, "parallel.auto=true", cache)
    cfg = cli.compose_config([a for a in args if not a.startswith("hydra.")])
    hardware = profile.load(cfg.plan)
    tiny = choose.Planner(cfg, hardware)
    plain = tiny.predict(from_config(cfg, 2))
    smallest = min(p.peak_bytes for p in tiny.rank(2, 8, math.inf))
    memory_gib = (smallest + plain.peak_bytes) / 2 / 2**30
    pick = tiny.pick(2, 8, memory_gib * 2**30, mpi=True)
    run_job([*args, f"plan.memory_gib={memory_gib}"], launcher="mpi")
    return run_dir, pick, plain


def test_parallel_auto_trains_the_planners_pick(auto_run):
    run_dir, pick, plain = auto_run
    assert pick.cell != plain.cell
    layout = read_summary(run_dir)["layout"]
    assert (layout["tensor"], layout["pipeline"], layout["data"], layout.get("zero_stage", 0)) == (
        pick.cell.tensor, pick.cell.pipeline, pick.cell.data, pick.cell.zero_stage)
    saved = (run_dir / "config.yaml").read_text()
    for override in pick.cell.overrides():
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert f"\n  {name}: {value}\n" in saved, override
    assert f"parallel.auto: the planner picked {' '.join(pick.cell.overrides())}" in (run_dir / "train.log").read_text()


def test_every_run_reports_its_prediction_beside_what_it_measured(auto_run):
    run_dir, pick, _ = auto_run
    block = read_summary(run_dir)["plan"]
    assert block["predicted_step_s"] == pytest.approx(pick.step_s)
    assert block["predicted_peak_bytes"] == pytest.approx(pick.peak_bytes)
    assert block["measured_step_s"] > 0 and block["measured_peak_bytes"] > 0
    assert all(math.isfinite(block[k]) for k in ("predicted_step_s", "measured_step_s", "predicted_peak_bytes",
                                                  "measured_peak_bytes"))
    assert block["profile"] == "cpu_default" and block["calibrated"] is False
    # In TensorBoard, not in metrics.jsonl, whose rows stay the loop's own.
    [(_, logged)] = tensorboard_scalars(run_dir, "plan/measured_step_s")
    assert logged == pytest.approx(block["measured_step_s"], rel=1e-6)  # TensorBoard keeps float32
    assert not any(key.startswith("plan/") for row in read_metrics(run_dir) for key in row)


def test_the_bench_judges_the_planners_pick_and_the_plain_rules_against_the_fastest_measured():
    from app.bench import planner as bench_planner
    from app.bench.config import BenchPlannerConfig

    def row(cell, pipeline, zero, predicted, measured, peak_mib):
        return {"model": "m", "cell": cell, "processes": 2, "tensor": 1, "pipeline": pipeline, "zero_stage": zero,
                "schedule": "1f1b" if pipeline > 1 else None, "checkpointing": "none", "refused": None,
                "oversubscribed": False, "predicted_step_s": predicted, "measured_step_s": measured,
                "predicted_peak_bytes": peak_mib * 2**20, "measured_peak_bytes": peak_mib * 2**20}

    rows = [row("D2", 1, 0, 1.05, 1.0, 900), row("ZeRO3", 1, 3, 1.20, 1.3, 500), row("P2", 2, 0, 1.00, 1.1, 400)]
    pc = BenchPlannerConfig(models=["m"], memory_caps_gib=[None, 0.6, 0.1])
    unlimited, capped, nothing = bench_planner.pick_cases(rows, pc, margin=0.10)
    # P2 is predicted fastest, but D2 within 10% of it: the plainer layout, which is the fastest.
    assert (unlimited["pick"], unlimited["fastest"], unlimited["rule"]) == ("D2", "D2", "D2")
    assert unlimited["pick_over_fastest"] == 1.0
    # Under 0.6 GiB: ZeRO-3 is the rule's, 20% slower in prediction than P2, which is picked and is the fastest.
    assert (capped["pick"], capped["fastest"], capped["rule"]) == ("P2", "P2", "ZeRO3")
    assert capped["rule_over_fastest"] == pytest.approx(1.3 / 1.1) and capped["pick_fits"]
    assert nothing["fastest"] is None
    assert bench_planner.pick_cases(rows, pc, margin=0.0)[0]["pick"] == "P2"


def test_the_bench_fit_recovers_the_overlap_and_activation_factor_that_made_the_measurements():
    """Rows 'measured' as the planner predicts them under known values: the fit finds those
    values, in sample and held out by model, with no error left."""
    from app.bench import planner as bench_planner
    from app.bench.config import BenchPlannerConfig

    true = {"backward_overlap": 0.3, "activation_factor": 1.25}
    rows = []
    for model in ("llama_tiny", "llama_small"):
        for stage in (0, 1, 2):
            overrides = [f"model={model}", f"parallel.zero_stage={stage}", "plan.hardware=cpu_default"]
            planner_, cell = bench_planner.planner_of(overrides, 2)
            planner_.profile = dataclasses.replace(planner_.profile, **true)
            made = planner_.predict(cell)
            rows.append({"model": model, "overrides": overrides, "processes": 2, "refused": None,
                         "oversubscribed": False, "measured_step_s": made.step_s,
                         "measured_peak_bytes": made.peak_bytes})
    pc = BenchPlannerConfig(fit_overlap_range=[0.0, 1.0], fit_activation_factor_range=[0.5, 2.0], fit_steps=20)
    fitted = bench_planner.fit(rows, pc)
    assert fitted["backward_overlap"] == pytest.approx(true["backward_overlap"])
    assert fitted["activation_factor"] == pytest.approx(true["activation_factor"])
    assert fitted["median_step_error"] == pytest.approx(0, abs=1e-9)
    assert fitted["median_memory_error"] == pytest.approx(0, abs=1e-9)
    # Held out: llama_tiny's rows alone pin the overlap down; llama_small's compute hides its
    # communication at any overlap above 0.05, so they cannot.
    small = fitted["held_out"]["llama_small"]
    assert small["backward_overlap"] == pytest.approx(true["backward_overlap"])
    assert small["activation_factor"] == pytest.approx(true["activation_factor"])
    assert small["median_step_error"] == pytest.approx(0, abs=1e-9)
    assert fitted["held_out"]["llama_tiny"]["median_step_error"] > 0
