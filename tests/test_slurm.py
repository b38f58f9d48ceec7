"""slurm/*.sbatch on a real one-node SLURM cluster (munged, slurmctld, slurmd started by
scripts/slurm_cluster.sh): sbatch, srun with PMIx, mpirun, the time-limit signal and requeue."""
import re
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, job_env, read_metrics, read_summary, tiny_train_args

CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Cluster:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env = {**job_env(), "SLURM_CLUSTER_DIR": str(state_dir), "SLURM_CONF": str(state_dir / "slurm.conf")}

    def run(self, *command, check=True) -> str:
        result = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}{self.daemon_logs()}")
        return result.stdout

    def daemon_logs(self, lines=30) -> str:
        tails = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            tails.append(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "".join(tails)

    def sbatch(self, *args, extra_env=None) -> str:
        env = {**self.env, **(extra_env or {})}
        result = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}{self.daemon_logs()}"
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list:
        """scontrol's record of a job, or of each task of an array job, as dicts."""
        records = []
        for line in self.run("scontrol", "show", "job", "-o", job_id).splitlines():
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
        return records

    def wait_until_finished(self, job_id: str, timeout_s: float, output: Path) -> list:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in FINISHED for r in records):
                return records
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {records}\n"
                             f"{read_outputs(output, 6000)}{self.daemon_logs()}")


def read_outputs(out_dir: Path, tail_chars=None) -> str:
    """The jobs' output files (whole, or their tails for failure messages)."""
    text = "".join(f"\n--- {path.name}\n{path.read_text(errors='replace')}" for path in sorted(out_dir.glob("*.out")))
    return text[-tail_chars:] if tail_chars else text


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start the cluster once for this module and stop it after its last test. A cluster that
    does not come up fails the tests, with the daemons' logs: it is never a skip."""
    cluster = Cluster(tmp_path_factory.mktemp("slurm_cluster"))
    started = subprocess.run([str(CLUSTER_SCRIPT), "start"], env=cluster.env, capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:  # the script has stopped what it started and printed the daemons' logs
        pytest.fail(f"scripts/slurm_cluster.sh start exited {started.returncode}\n{started.stdout}\n{started.stderr}")
    yield cluster
    stopped = subprocess.run([str(CLUSTER_SCRIPT), "stop"], env=cluster.env, capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0, stopped.stderr


def test_train_sbatch_trains_two_ranks_through_srun_pmix(slurm, tiny_data, tmp_path):
    job = slurm.sbatch(
        "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%j.out",
        "slurm/train.sbatch", *tiny_train_args(tiny_data, f"{tmp_path}/runs/${{run_stamp:}}"),
    )
    (record,) = slurm.wait_until_finished(job, timeout_s=180, output=tmp_path)
    output = read_outputs(tmp_path)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", output[-6000:]
    assert "srun --mpi=pmix" in output  # the PMIx plugin was found and used

    run_dir = tmp_path / "runs" / f"slurm-{job}"  # the run dir is named after the job
    summary = read_summary(run_dir)
    assert (summary["step"], summary["world_size"], summary["controller"]) == (6, 2, "mpi")
    assert summary["replicas_identical"] is True
    assert [m["step"] for m in read_metrics(run_dir)] == [2, 4, 6]

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]

    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000006"
    assert (run_dir / "checkpoints" / "step-000006" / "model-rank00000.safetensors").stat().st_size > 0


@pytest.mark.parametrize("launcher", ["srun", "mpi"])
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tiny_data, tmp_path, launcher):
    max_steps = 120  # a few seconds of steps left after the first log step, even on an idle machine
    job = slurm.sbatch(
        "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%j.out",
        "slurm/train.sbatch",
        *tiny_train_args(tiny_data, f"{tmp_path}/runs/${{run_stamp:}}", f"train.max_steps={max_steps}"),
        extra_env={"LAUNCHER": launcher},
    )
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    # The first logged step comes after the ranks install their signal handlers.
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert time.monotonic() < deadline, f"no step logged\n{read_outputs(tmp_path, 6000)}{slurm.daemon_logs()}"
        assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), read_outputs(tmp_path, 6000)
        time.sleep(0.2)
    # What SLURM does 120 s before the time limit (#SBATCH --signal=B:USR1@120): USR1 to the batch shell.
    slurm.run("scancel", "--signal=USR1", "--batch", job)

    (record,) = slurm.wait_until_finished(job, timeout_s=240, output=tmp_path)
    output = read_outputs(tmp_path)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", output[-6000:]
    assert record["Restarts"] == "1", output[-6000:]
    assert f"requeueing job {job}" in output
    assert output.count(f"launcher {launcher}") == 2  # the first run and the requeued one

    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"stop requested by signal: checkpointed at step (\d+)", log)
    assert stopped, log
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < max_steps
    assert f"resumed from {run_dir}/checkpoints/step-{stop_step:06d} at step {stop_step}" in log
    assert read_summary(run_dir)["step"] == max_steps
    # Both runs append to one metrics.jsonl: every log step once, none repeated or skipped.
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(2, max_steps + 1, 2))


def test_sweep_array_trains_one_run_per_learning_rate(slurm, tiny_data, tmp_path):
    job = slurm.sbatch(
        "--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
        f"--output={tmp_path}/%A_%a.out", "slurm/sweep.sbatch",
        *tiny_train_args(tiny_data, f"{tmp_path}/runs/${{run_stamp:}}", "train.max_steps=4"),
        extra_env={"LRS": "1e-3 3e-4"},
    )
    records = slurm.wait_until_finished(job, timeout_s=180, output=tmp_path)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" for r in records), read_outputs(tmp_path, 6000)
    for task, lr in (("0", 1e-3), ("1", 3e-4)):
        run_dir = tmp_path / "runs" / f"slurm-{job}_{task}"
        assert read_summary(run_dir)["step"] == 4
        assert f"\n  lr: {lr}\n" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("request_", [["--nodes=2", "--ntasks-per-node=4"], ["--ntasks-per-node=2", "--cpus-per-task=4"]])
def test_a_job_the_cluster_can_never_run_is_refused_at_submission_not_left_pending(slurm, request_):
    """The main README's multi-node line and the sweep's default size on the one-node cluster:
    refused with the reason, where they used to pend forever with reason PartitionConfig."""
    result = subprocess.run(["sbatch", "--parsable", *request_, "--wrap", "true"], env=slurm.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, f"accepted as job {result.stdout.strip()}: {slurm.run('squeue')}"
    assert "More processors requested than permitted" in result.stderr
