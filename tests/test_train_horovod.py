"""Real 2-process Horovod training jobs: replicas stay in sync, every sync mode and accumulation
runs, loss falls, and all ranks share one run directory written by rank 0 alone."""
import json
import math
import os

import pytest

from app import cores
from conftest import read_metrics, read_summary, run_job, tiny_train_args


def test_two_rank_gloo_run_keeps_replicas_identical_and_loss_falls(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_job(tiny_train_args(tiny_data, run_dir, "train.max_steps=12", "optim.lr=3e-3", "train.eval_every=6",
                            "horovod.cycle_time_ms=7", "horovod.fusion_threshold_mb=8"), launcher="gloo")
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2 and summary["controller"] == "gloo"
    # The config reached Horovod, which reads these before Hydra composes the run's config.
    assert summary["horovod"] == {"HOROVOD_CYCLE_TIME": "7", "HOROVOD_FUSION_THRESHOLD": str(8 * 2**20),
                                  "OMPI_MCA_mpi_yield_when_idle": "1"}
    # horovodrun does not bind; each rank pinned itself to its own half of the cores.
    all_cores = sorted(os.sched_getaffinity(0))
    half = len(all_cores) // 2
    assert [r["cores"] for r in summary["replicas"]] == [all_cores[:half], all_cores[half:2 * half]]
    assert summary["replicas_identical"] is True
    train_rows = [row for row in read_metrics(run_dir) if "train/loss" in row]
    losses = [row["train/loss"] for row in train_rows]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3
    validation = [row for row in read_metrics(run_dir) if "val/loss" in row]
    assert [row["step"] for row in validation] == [6, 12]
    assert validation[1]["val/loss"] < validation[0]["val/loss"] < 6.3  # ln(512) = 6.24 untrained
    assert validation[1]["val/perplexity"] == pytest.approx(math.exp(validation[1]["val/loss"]))
    row = train_rows[-1]
    for key in ("lr", "grad_norm", "tokens_per_second", "tokens_per_second_per_rank", "mfu",
                "time/allreduce_wait_s_per_step", "time/compute_s_per_step", "memory/rss_gib_mean"):
        assert row[key] > 0, key
    assert row["tokens_per_second"] == pytest.approx(2 * row["tokens_per_second_per_rank"], rel=0.5)


def test_ranks_a_launcher_bound_keep_their_own_cores():
    mask = cores.affinity()
    bound_elsewhere = [core + len(mask) for core in mask]  # what mpirun --bind-to core gives a neighbour
    assert cores.place(0, 2, [mask, bound_elsewhere], None, bind=True) == len(mask)
    assert cores.affinity() == mask


def test_mpirun_initialises_horovod_from_mpi_comm_world(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # mpirun passes only -x variables to ranks; the config's cycle time needs no forwarding.
    run_job(tiny_train_args(tiny_data, run_dir, "horovod.cycle_time_ms=7", "horovod.mpi_yield_when_idle=false"),
            launcher="mpi")
    summary = read_summary(run_dir)
    assert summary["controller"] == "mpi" and summary["replicas_identical"] is True
    assert summary["horovod"] == {"HOROVOD_CYCLE_TIME": "7", "HOROVOD_FUSION_THRESHOLD": "default",
                                  "OMPI_MCA_mpi_yield_when_idle": "0"}


def test_ranks_share_one_run_dir_and_only_rank_0_writes(tiny_data, tmp_path):
    args = [a for a in tiny_train_args(tiny_data, tmp_path / "unused", "train.bind_cores=false")
            if not a.startswith("hydra.run.dir")]
    # A variable the user set (horovodrun --cycle-time-ms sets it) wins over the config's 10 ms.
    run_job(args, cwd=tmp_path, launcher="gloo", env={"HOROVOD_CYCLE_TIME": "3"})
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    summary = read_summary(run_dirs[0])
    assert summary["horovod"]["HOROVOD_CYCLE_TIME"] == "3"
    all_cores = sorted(os.sched_getaffinity(0))
    assert [r["cores"] for r in summary["replicas"]] == [all_cores, all_cores]  # train.bind_cores=false
    assert {r["run_dir"] for r in summary["replicas"]} == {str(run_dirs[0])}
    assert len(list((run_dirs[0] / "tb").glob("events.out.tfevents.*"))) >= 1
    names = sorted(p.name for p in run_dirs[0].iterdir())
    assert names == ["checkpoints", "config.yaml", "metrics.jsonl", "summary.json", "tb", "tokenizer", "train.log"]


@pytest.mark.parametrize("sync,launcher", [
    ("fp16_compression", "gloo"),
    ("adasum", "mpi"),
    ("param_average", "gloo"),
    ("param_average", "mpi"),
])
def test_each_sync_mode_trains_with_replicas_in_sync(tiny_data, tmp_path, sync, launcher):
    run_dir = tmp_path / "run"
    extra = [f"sync={sync}", "sync.param_average_every=3"] if sync == "param_average" else [f"sync={sync}"]
    if sync == "param_average" and launcher == "mpi":
        extra.append("sync.param_average_backend=mpi")
    run_job(tiny_train_args(tiny_data, run_dir, *extra), launcher=launcher)
    summary = read_summary(run_dir)
    assert summary["replicas_identical"] is True
    assert summary["metrics"]["train/loss"] < 6.3  # ln(512) = 6.24 is where an untrained model starts


def test_local_sgd_replicas_drift_between_averages_and_meet_at_them(tiny_data, tmp_path):
    met, apart = tmp_path / "met", tmp_path / "apart"
    run_job(tiny_train_args(tiny_data, met, "sync=local_sgd", "sync.param_average_every=3"))  # 6 steps: meets at 6
    run_job(tiny_train_args(tiny_data, apart, "sync=local_sgd", "sync.param_average_every=4"))  # last met at 4
    assert read_summary(met)["replicas_identical"] is True
    assert read_summary(apart)["replicas_identical"] is False


def test_gradient_accumulation_runs_without_per_micro_batch_allreduce(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_job(tiny_train_args(tiny_data, run_dir, "train.grad_accum_steps=3"))
    summary = read_summary(run_dir)
    assert summary["replicas_identical"] is True
    assert summary["tokens_seen"] == 6 * 2 * 3 * 4 * 64  # steps x ranks x accum x micro-batch x seq_len


def test_mpi_param_average_backend_refuses_a_gloo_launch(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "sync=param_average",
                                     "sync.param_average_backend=mpi", "sync.param_average_every=2"),
                     launcher="gloo", check=False, timeout=180)
    assert result.returncode != 0
    assert "needs an MPI launch" in result.stdout + result.stderr
