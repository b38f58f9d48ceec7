"""python -m app.bench: the quick preset runs every section for real (horovodrun, mpirun,
torchrun) and reports numbers that agree with each other and with their definitions."""
import json
import math
import os

import pytest

from app.bench.bandwidth import bus_bandwidth, message_sizes
from app.bench.throughput import trainer_tokens_per_second
from conftest import TINY_VOCAB, read_metrics, read_summary, run_job

SECTIONS = ("peak", "throughput", "bandwidth", "fusion", "breakdown", "checkpoint")
# The checkpoint section's run cut to a save at step 2 and a final one at step 3, resumed on the
# same 2 ranks: its resharding onto other world sizes is test_checkpoint's, and 4 ranks on 2
# cores would cost the suite most of a minute more.
# Synchronous saves only: async ones are the kill -9 test's (test_checkpoint.py), and each run is
# a 2-rank launch.
CHECKPOINT = ["checkpoint.steps=3", "checkpoint.resume_processes=2", "checkpoint.resume_steps=1",
              "checkpoint.modes=[sync]"]
# Three of the quick bench's runs compile llama_tiny (the compiled trainer at 1 and 2 processes,
# HF Trainer with torch_compile): about three minutes on a quiet 2-core machine, far more on a
# busy one, so the module gets more than the suite's 600 s.
pytestmark = pytest.mark.timeout(1800)
# Each fusion-grid setting is a launch of its own (Horovod reads both knobs at start-up): six
# launches were the quick bench's costliest part here. Fusion off and on by two cycle times is
# still a grid; the preset's third threshold, 64 MiB, fuses the tiny model's 0.66 MB of
# gradients into one buffer just as 4 MiB does.
FUSION_THRESHOLDS = (0, 4 * 2**20)
# HF Trainer with torch_compile is transformers' own compile of the same model, which the
# compiled trainer rows already pay for once per process count: its row is the eager one's
# with one flag (test_hf_trainer_rows_...), so the test leaves out its minute-long compile.
HF_TRAINER = ["eager"]


@pytest.fixture(scope="module")
def quick_bench(tiny_data, tmp_path_factory):
    """One quick benchmark on the tiny dataset; its bench.json, bench.md and stdout."""
    out = tmp_path_factory.mktemp("bench")
    overrides = ["train.micro_batch_size=4", f"data.vocab_size={TINY_VOCAB}", f"data.dir={tiny_data}"]
    result = run_job(["preset=quick", f"out={out}", "train_overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]",
                      f"fusion.fusion_thresholds_bytes={list(FUSION_THRESHOLDS)}",
                      f"throughput.hf_trainer={HF_TRAINER}", f"sections=[{','.join(SECTIONS)}]", *CHECKPOINT,
                      "keep_checkpoints=true"],
                     launcher="none", module="app.bench", timeout=1700)
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), result.stdout, out


@pytest.fixture(scope="module")
def layouts_bench(tiny_data, tmp_path_factory):
    """sections=[layouts] with a cell that runs and one refused until tensor x ZeRO composes."""
    out = tmp_path_factory.mktemp("layouts")
    overrides = ",".join(f"'{o}'" for o in [f"data.vocab_size={TINY_VOCAB}", f"data.dir={tiny_data}"])
    run_job(["sections=[layouts]", "model=llama_tiny", "layouts.model=llama_tiny", f"out={out}",
             "layouts.names=[D4,T2xD2-ZeRO1]", "layouts.warmup_steps=1", "layouts.measure_steps=2",
             f"train_overrides=[{overrides}]"], launcher="none", module="app.bench", timeout=300)
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_checkpoint_section_reports_each_saves_stall_throughput_and_memory_from_the_runs(quick_bench):
    results, out = quick_bench[0], quick_bench[3]
    section = results["checkpoint"]
    assert section["model"] == "llama_tiny" and section["zero_stage"] == 3 and section["processes"] == 2
    assert 0 < section["disk_write_bytes_per_s"] < math.inf
    assert list(section["modes"]) == ["sync"]
    for mode, run in section["modes"].items():
        files = [path for path in (out / "work" / f"checkpoint-{mode}" / "checkpoints").glob("step-*/*")]
        assert run["bytes"] == sum(path.stat().st_size for path in files) > 0, mode
        assert [save["step"] for save in run["saves"]] == [2, 3], mode
        for save in run["saves"]:
            assert 0 < save["write_s"] and 0 < save["stall_s"], (mode, save)
            assert save["write_bytes_per_s"] == pytest.approx(save["shard_bytes"] / save["write_s"])
            assert save["of_disk"] == pytest.approx(save["write_bytes_per_s"] / section["disk_write_bytes_per_s"])
        assert [rank["rank"] for rank in run["memory"]] == [0, 1]
        # Peaks of a whole process (interpreter, torch, the model): a save moves them a little.
        assert all(0.9 < rank["ratio"] < 2 for rank in run["memory"]), run["memory"]
    assert 0 < section["export_peak_rss_bytes"] < 2 * 2**30
    resumed = section["resume"]
    assert resumed["from_step"] == 2 and resumed["step"] == 3
    assert resumed["difference"] == abs(resumed["loss"] - resumed["first_run_loss"]) <= 1e-5
    losses = {row["step"]: row["train/loss"] for row in read_metrics(out / "work" / "checkpoint-sync") if "train/loss" in row}
    assert losses[3] == resumed["first_run_loss"]
    assert [target["met"] for target in section["targets"]][::2] == [True, True]  # the RSS ratio, the export


def _run(results, method, processes):
    return next(r for r in results["throughput"]["runs"] if (r["method"], r["processes"]) == (method, processes))


def test_quick_bench_reports_every_section_in_json_and_markdown(quick_bench):
    results, markdown, stdout, _ = quick_bench
    assert results["errors"] == {}
    for section in SECTIONS:
        assert section in results, section
    for heading in ("## Matmul peak", "## Training throughput", "## Targets", "## Allreduce bandwidth",
                    "## Gradient-set allreduce", "## Step-time breakdown", "## Checkpoints"):
        assert heading in markdown and heading in stdout, heading
    assert results["max_processes"] == 2 and results["config"]["model"] == "llama_tiny"


def test_peak_is_measured_for_fp32_and_bf16_per_thread_and_for_all_cores(quick_bench):
    peak = quick_bench[0]["peak"]
    assert set(peak["precisions"]) == {"fp32", "bf16"}
    for values in peak["precisions"].values():
        assert values["tflops_1_thread"] > 0 and values["tflops_all_cores"] > 0


def test_throughput_runs_trainer_plain_ddp_and_hf_trainer_on_the_same_batch(quick_bench):
    results = quick_bench[0]
    runs = {(r["method"], r["processes"]) for r in results["throughput"]["runs"]}
    assert runs == {("plain", 1), ("trainer", 1), ("trainer", 2), ("ddp", 2), ("trainer_untuned", 2),
                    ("trainer_compile", 1), ("trainer_compile", 2), ("hf_trainer", 1)}
    for run in results["throughput"]["runs"]:
        assert run["tokens_per_second"] > 0 and run["threads_per_process"] == 1
        assert run["tokens_per_second_per_process"] == pytest.approx(run["tokens_per_second"] / run["processes"])


def test_untuned_trainer_runs_with_horovods_defaults_and_unpinned(quick_bench):
    results = quick_bench[0]
    tuned = read_summary(_run(results, "trainer", 2)["run_dir"])
    untuned = read_summary(_run(results, "trainer_untuned", 2)["run_dir"])
    assert tuned["horovod"]["HOROVOD_CYCLE_TIME"] == "10" and untuned["horovod"]["HOROVOD_CYCLE_TIME"] == "1"
    yield_variable = "OMPI_MCA_mpi_yield_when_idle"
    assert tuned["horovod"][yield_variable] == "1" and untuned["horovod"][yield_variable] == "default"
    all_cores = sorted(os.sched_getaffinity(0))
    assert [r["cores"] for r in tuned["replicas"]] == [[all_cores[0]], [all_cores[1]]]
    assert [r["cores"] for r in untuned["replicas"]] == [all_cores, all_cores]
    run, one = _run(results, "trainer_untuned", 2), _run(results, "trainer", 1)
    assert run["scaling_efficiency"] == pytest.approx(run["tokens_per_second"] / (2 * one["tokens_per_second"]))


def test_trainer_fusion_grid_and_breakdown_run_under_the_configured_controller(quick_bench):
    results = quick_bench[0]
    assert results["config"]["launcher"] == results["throughput"]["launcher"] == "mpi"
    for run in results["throughput"]["runs"]:
        if run["method"].startswith("trainer"):
            assert run["controller"] == read_summary(run["run_dir"])["controller"] == "mpi"
    assert {row["controller"] for row in results["fusion"]["rows"]} == {"mpi"}
    assert results["breakdown"]["controller"] == "mpi"


def test_compiled_trainer_reports_its_warmup_and_scales_against_its_own_one_process_run(quick_bench):
    results = quick_bench[0]
    assert results["throughput"]["trainer_compile"] == "model"
    one, two = _run(results, "trainer_compile", 1), _run(results, "trainer_compile", 2)
    for run in (one, two):
        assert run["compile_warmup_s"] > 0
        assert read_metrics(run["run_dir"])[0]["time/compile_warmup_s"] == run["compile_warmup_s"]
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_second"] / (2 * one["tokens_per_second"]))
    assert "| trainer_compile | bf16 | 1 |" in quick_bench[1]


def test_hf_trainer_rows_run_transformers_trainer_and_the_compiled_trainer_is_held_to_them(quick_bench):
    results, markdown = quick_bench[0], quick_bench[1]
    run = _run(results, "hf_trainer", 1)
    assert run["torch_compile"] is False and run["measured_steps"] == results["throughput"]["measure_steps"]
    assert run["tokens_per_second"] > 0 and run["first_step_s"] > 0
    assert "| hf_trainer | bf16 | 1 |" in markdown
    targets = {t["name"]: t for t in results["throughput"]["targets"]}
    compiled = _run(results, "trainer_compile", 1)["tokens_per_second"]
    target = targets["trainer (compile=model) / HF Trainer, 1 process"]
    assert target["value"] == pytest.approx(compiled / run["tokens_per_second"]) and target["threshold"] == 1.3
    # Only the rows that ran have targets: none against the HF Trainer + torch_compile row left out.
    assert not any("torch_compile" in name for name in targets)
    mfu = targets["trainer (compile=model) MFU, 1 process"]
    assert mfu["value"] == _run(results, "trainer_compile", 1)["mfu"] and mfu["threshold"] == 0.5


def test_trainer_tokens_per_second_comes_from_its_metrics_after_warmup(quick_bench):
    results = quick_bench[0]
    for processes in (1, 2):
        run = _run(results, "trainer", processes)
        rows = read_metrics(run["run_dir"])
        warmup = results["throughput"]["warmup_steps"]
        assert rows[-1]["step"] == warmup + results["throughput"]["measure_steps"]
        assert run["tokens_per_second"] == pytest.approx(trainer_tokens_per_second(rows, warmup))


def test_efficiency_and_targets_are_ratios_of_the_measured_tokens_per_second(quick_bench):
    results = quick_bench[0]
    one, two = _run(results, "trainer", 1), _run(results, "trainer", 2)
    efficiency = two["tokens_per_second"] / (2 * one["tokens_per_second"])
    assert two["scaling_efficiency"] == pytest.approx(efficiency)
    assert results["throughput"]["scaling"]["bf16"][-1]["efficiency"] == pytest.approx(efficiency)
    targets = {t["name"]: t for t in results["throughput"]["targets"]}
    plain = targets["trainer / plain PyTorch, 1 process"]
    assert plain["value"] == pytest.approx(one["tokens_per_second"] / _run(results, "plain", 1)["tokens_per_second"])
    assert plain["threshold"] == pytest.approx(0.97) and plain["met"] == (plain["value"] >= 0.97)
    ddp = targets["trainer / DDP (gloo), 2 processes"]
    assert ddp["value"] == pytest.approx(two["tokens_per_second"] / _run(results, "ddp", 2)["tokens_per_second"])
    assert targets["scaling efficiency, 2 processes"]["value"] == pytest.approx(efficiency)


def test_mfu_divides_achieved_flops_by_the_measured_one_thread_peak(quick_bench):
    results = quick_bench[0]
    peak_tflops = results["peak"]["precisions"]["bf16"]["tflops_1_thread"]
    for run in results["throughput"]["runs"]:
        achieved = results["throughput"]["flops_per_token"] * run["tokens_per_second_per_process"]
        assert run["mfu"] == pytest.approx(achieved / (peak_tflops * 1e12))


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_allreduce_bandwidth_follows_the_nccl_tests_definitions(quick_bench, launcher):
    section = quick_bench[0]["bandwidth"]["launchers"][launcher]
    assert section["controller"] == launcher and section["processes"] == 2
    rows = section["rows"]
    assert [r["bytes"] for r in rows] == [4096 * 4**k for k in range(6)]  # 4 KiB .. 4 MiB
    for row in rows:
        assert row["time_s"] > 0 and row["iterations"] >= 3
        assert row["algbw_gbps"] == pytest.approx(row["bytes"] / row["time_s"] / 1e9)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"])  # 2(n-1)/n = 1 for n = 2


def test_fusion_grid_times_the_whole_gradient_set_per_setting(quick_bench):
    results = quick_bench[0]
    rows = results["fusion"]["rows"]
    assert [(r["fusion_threshold_bytes"], r["cycle_time_ms"]) for r in rows] == [
        (threshold, cycle_ms) for threshold in FUSION_THRESHOLDS for cycle_ms in (1.0, 10.0)]
    for row in rows:
        assert row["bytes"] == 4 * results["throughput"]["parameters"]  # every parameter's float32 gradient
        assert row["tensors"] > 10 and row["sets"] == 5
        assert 0 < row["min_s"] <= row["median_s"]


def test_breakdown_phases_fit_inside_the_step(quick_bench):
    section = quick_bench[0]["breakdown"]
    seconds = section["seconds_per_step"]
    phases = ("data", "forward", "backward", "allreduce_wait", "optimizer")
    for phase in phases:
        assert seconds[phase] >= 0, phase
    assert seconds["forward"] > 0 and seconds["backward"] > 0 and seconds["optimizer"] > 0
    assert 0.9 * seconds["step"] <= sum(seconds[p] for p in phases) <= seconds["step"] * 1.0001
    assert 0 <= section["hidden_fraction"] <= 1
    assert section["standalone_allreduce"]["median_s"] > 0 and section["processes"] == 2


def test_trainer_rate_leaves_out_warmup_windows_and_weights_by_time():
    rows = [
        {"step": 2, "tokens_seen": 200, "tokens_per_second": 1.0},  # warm-up: left out
        {"step": 4, "tokens_seen": 400, "tokens_per_second": 100.0},  # 2 s
        {"step": 6, "tokens_seen": 600, "tokens_per_second": 50.0},  # 4 s
    ]
    assert trainer_tokens_per_second(rows, warmup_steps=2) == pytest.approx(400 / 6)
    # A compile warm-up row has no rate: its tokens count in no window, even inside the timed steps.
    compiled = [
        {"step": 1, "tokens_seen": 100, "time/compile_warmup_s": 30.0},
        {"step": 2, "tokens_seen": 200, "tokens_per_second": 50.0},  # 2 s
        {"step": 4, "tokens_seen": 400, "tokens_per_second": 100.0},  # 2 s
    ]
    for warmup_steps in (0, 1):
        assert trainer_tokens_per_second(compiled, warmup_steps) == pytest.approx(300 / 4)


def test_message_sizes_and_bus_bandwidth_factor():
    assert message_sizes(4096, 256 * 2**20, 4)[-1] == 256 * 2**20
    assert len(message_sizes(4096, 256 * 2**20, 4)) == 9
    assert bus_bandwidth(2.0, 4) == pytest.approx(3.0)  # 2(n-1)/n = 1.5 for n = 4


@pytest.mark.parametrize("override,message", [
    ("sections=[peak,speed]", "sections has 'speed', not one of peak, throughput"),
    ("launcher=srun", "launcher has 'srun', not one of gloo, mpi"),
])
def test_bad_bench_config_is_one_line_and_exit_2(tmp_path, override, message):
    result = run_job([override, f"out={tmp_path}"], launcher="none", module="app.bench", check=False, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bench.json").exists()


def test_layouts_rows_measure_each_cell_on_four_ranks_or_say_why_it_was_refused(layouts_bench):
    results, markdown = layouts_bench
    assert results["errors"] == {}
    section = results["layouts"]
    rows = {row["cell"]: row for row in section["rows"]}
    assert list(rows) == ["D4", "T2xD2-ZeRO1"]
    # 4 ranks on this machine's cores: oversubscribed on the 2-core machine the suite runs on.
    cores = len(os.sched_getaffinity(0))
    assert section["cores"] == cores
    plain = rows["D4"]
    mesh = ("processes", "pipeline", "tensor", "data", "zero_stage")
    assert tuple(plain[key] for key in mesh) == (4, 1, 1, 4, 0)
    assert plain["refused"] is None and plain["oversubscribed"] is (4 > cores)
    # The same global batch in every cell: 16 samples of llama_tiny's 64 tokens per step.
    assert plain["global_batch"] == 16 and plain["micro_batch_per_rank"] == 16 // (4 * section["micro_batches"])
    assert plain["tokens_per_second"] == pytest.approx(16 * 64 / plain["seconds_per_step"])
    peaks = plain["peak_memory_bytes_per_rank"]
    # An interpreter with torch and Horovod loaded holds well over 100 MiB.
    assert len(peaks) == 4 and min(peaks) > 100 * 2**20 and plain["max_peak_memory_bytes"] == max(peaks)
    composed = rows["T2xD2-ZeRO1"]
    assert tuple(composed[key] for key in mesh) == (4, 1, 2, 2, 1)
    # Refused until tensor x ZeRO composes; measured once it does.
    if composed["refused"] is None:
        assert composed["tokens_per_second"] > 0 and len(composed["peak_memory_bytes_per_rank"]) == 4
    else:
        assert "parallel.zero_stage" in composed["refused"] and "\n" not in composed["refused"]
        assert f"refused: {composed['refused']} |" in markdown
    assert f"| D4 | 4 | P1 x T1 x D4 | 0 |  | {plain['tokens_per_second']:,.0f} |" in markdown


def test_layouts_worker_refuses_a_config_the_trainer_refuses_in_one_line(tmp_path):
    """Without the trainer's check a bench worker would run another layout under the cell's name."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"overrides": ["model=llama_tiny", "sync=adasum", "parallel.zero_stage=1"],
                                "threads": 1, "warmup_steps": 1, "measure_steps": 1,
                                "result": str(tmp_path / "result.json")}))
    result = run_job([str(spec)], launcher="none", module="app.bench.layouts", check=False, timeout=120)
    assert result.returncode == 2 and not (tmp_path / "result.json").exists()
    assert result.stderr.strip().splitlines() == [
        "error: parallel.zero_stage=1 averages gradients itself; use sync=allreduce (or sync=fp16_compression), "
        "or parallel.zero_stage=0 for sync=adasum"]


@pytest.mark.parametrize("key,value,message", [
    ("checkpoint.modes", ["async"], "must hold sync"),
    ("checkpoint.modes", ["sync", "lazy"], "must hold sync"),
    ("planner.fit_overlap_range", [0.8, 0.2], "must be [low, high]"),
    ("checkpoint.resume_processes", -1, "must be at least 0"),
])
def test_bench_settings_that_cannot_run_are_refused_by_name(key, value, message):
    from omegaconf import OmegaConf

    from app.bench import config as bench_config
    from app.config import ConfigError

    cfg = OmegaConf.structured(bench_config.BenchConfig)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*" + message.replace("[", r"\[")):
        bench_config.validate(cfg)
