"""Elastic training for real: scripts/launch.sh --elastic on two hosts (the loopback names
`localhost` and `127.0.0.1`, one slot each, as Horovod's own elastic tests do), the host file
edited while the job runs, and a worker killed with SIGKILL. No job is given --network-interface,
as a user's first try is not: launch.sh finds the loopback interface itself. Every run is checked against its
journal (run_dir/elastic.jsonl): each optimizer step's global sample range, world size and time;
and against what the ranks really read (train.record_samples: each rank's own record of the
sample indices of the micro-batches it trained on), which must cover the stream once.

Steps are paced by Horovod's cycle time (horovod.cycle_time_ms): every step waits for at least
one round of the background thread, so a fast machine cannot finish the run before a change of
hosts, which Horovod notices within about a second, has taken effect.
"""
import collections
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from app import checkpoint, cli, config, elastic, step
from conftest import ROOT, job_env, read_metrics, read_summary, run_job, tiny_train_args

# Elastic restarts wait on Horovod's discovery and failure timeouts: scripts/test.sh runs the
# tests that run elastic jobs after the parallel pass, alone, as a starved worker would read as a
# failed one. The rest (refusals, dry runs, no job) run in the parallel pass.
serial = pytest.mark.serial

LAUNCH_SH = ROOT / "scripts" / "launch.sh"
BOTH_HOSTS = "localhost:1\n127.0.0.1:1\n"
MICRO_BATCH = 4  # tiny_train_args' train.micro_batch_size
JOB_TIMEOUT_S = 900  # a loaded 2-core machine runs these steps a hundred times slower than an idle one


def set_hosts(hostfile, text: str) -> None:
    """Replace the host file in one rename, as a user should: a half-written file reads as hosts removed."""
    staged = hostfile.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, hostfile)


class ElasticJob:
    """scripts/launch.sh --elastic in the background, and its journal as it grows."""

    def __init__(self, tmp_path, data_dir, *overrides, hosts=BOTH_HOSTS, launch_args=()):
        self.run_dir, self.hostfile, self.output = tmp_path / "run", tmp_path / "hosts.txt", tmp_path / "launch.log"
        set_hosts(self.hostfile, hosts)
        args = tiny_train_args(data_dir, self.run_dir, "horovod.cycle_time_ms=250", "train.record_samples=true",
                               *overrides)
        command = [str(LAUNCH_SH), "--elastic", "--min-np", "1", "--max-np", "2", "--hostfile", str(self.hostfile),
                   *launch_args, *args]
        with open(self.output, "w") as output:
            self.process = subprocess.Popen(command, cwd=ROOT, env=job_env(), stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.started = time.monotonic()

    def rows(self) -> list:
        path = self.run_dir / "elastic.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_for(self, what: str, predicate):
        """Poll the journal until a row satisfies `predicate`; return that row."""
        while time.monotonic() - self.started < JOB_TIMEOUT_S:
            found = [row for row in self.rows() if predicate(row)]
            if found:
                return found[0]
            if self.process.poll() is not None:
                pytest.fail(f"job exited {self.process.returncode} before {what}\n{self.log()}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}\n{self.log()}")

    def finish(self) -> None:
        try:
            returncode = self.process.wait(timeout=max(1, JOB_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"job timed out\n{self.log()}")
        assert returncode == 0, f"job exited {returncode}\n{self.log()}"

    def log(self) -> str:
        return self.output.read_text()[-8000:]

    def descendants(self) -> list:
        parents = {}
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                parents[pid] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        found, frontier = [], [self.process.pid]
        while frontier:
            children = [pid for pid, parent in parents.items() if parent in frontier]
            found += children
            frontier = children
        return found

    def worker(self, rank: int) -> tuple:
        """The training process horovodrun started as `rank`: its pid and its environment."""
        for pid in self.descendants():
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"HOROVOD_RANK={rank}" in env and b"app.train" in cmdline:
                return pid, dict(item.split("=", 1) for item in env if "=" in item)
        pytest.fail(f"no worker of rank {rank}\n{self.log()}")

    def kill_worker(self, rank: int) -> int:
        """SIGKILL the training process horovodrun started as `rank`; return its pid."""
        pid, _ = self.worker(rank)
        os.kill(pid, signal.SIGKILL)
        return pid


def world_sizes(rows) -> list:
    """The world sizes the steps ran at, repeats folded: [2, 1, 2] for a shrink and a regrowth."""
    sizes = [row["world_size"] for row in rows]
    return [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]


def trained_samples(job: ElasticJob) -> list:
    """The global sample indices the ranks recorded as trained on, each as often as trained, less
    the steps that a restart or a rollback undid (as elastic.replay reads the journal): a row of
    step s written before a start or rollback event that went back below s."""
    undoing = [row for row in job.rows() if row.get("event") in ("start", "rollback")]
    trained = []
    for path in job.run_dir.glob("samples.rank*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            if not any(event["step"] < row["step"] and event["time"] > row["time"] for event in undoing):
                trained += row["samples"]
    return sorted(trained)


def assert_one_run_with_every_sample_once(job: ElasticJob, max_steps: int) -> list:
    """The run's steps are 1..max_steps, each on the next world_size x micro-batch samples of the
    global stream, and the ranks really read each sample of that stream once; the checkpoint
    ends where the last step did; the replicas agree; the metrics log each step once. Returns
    the replayed step rows."""
    steps = elastic.replay(job.rows())
    assert [row["step"] for row in steps] == list(range(1, max_steps + 1))
    ends = [0] + [row["samples"][1] for row in steps]
    for row, start in zip(steps, ends):
        assert row["samples"] == [start, start + row["world_size"] * MICRO_BATCH], row
    # The journal counts; this is what the ranks' data path handed their steps, whichever rank
    # each process was in each world.
    trained = trained_samples(job)
    twice = sorted(index for index, times in collections.Counter(trained).items() if times > 1)
    missed = sorted(set(range(ends[-1])) - set(trained))
    assert trained == list(range(ends[-1])), f"trained twice: {twice}; never: {missed}; beyond {ends[-1]}: " \
                                             f"{[index for index in trained if index >= ends[-1]]}"
    state = checkpoint.read_state(checkpoint.latest(job.run_dir))
    assert (state.step, state.samples_seen) == (max_steps, ends[-1])
    # One optimizer step per training step on every rank that ever held the state: a spurious
    # zero-gradient step when a rank joined would count one more (and decay its weights apart).
    optimizer = checkpoint.load_optimizer_state(checkpoint.latest(job.run_dir))
    assert {int(p["step"]) for p in optimizer["state"].values()} == {max_steps}
    summary = read_summary(job.run_dir)
    assert summary["step"] == max_steps and summary["replicas_identical"] is True
    # The logs read as one run: every log step once (tiny_train_args logs every 2), whichever
    # process was rank 0 and whatever was trained twice after a failure.
    logged = [row["step"] for row in read_metrics(job.run_dir) if "train/loss" in row]
    assert logged == list(range(2, max_steps + 1, 2)) + ([max_steps] if max_steps % 2 else [])
    return steps


@serial
def test_two_ranks_shrink_to_one_and_grow_back_training_each_sample_once(tiny_data, tmp_path):
    # The host is back at step 8-10 (measured, idle and loaded alike: the change is noticed at the
    # next commit and the ranks wait in the rendezvous while the new worker starts, so steps
    # cannot run ahead of it); the commits at 12 and 14 are margin for a slower notice.
    max_steps = 16
    job = ElasticJob(tmp_path, tiny_data, f"train.max_steps={max_steps}", "train.elastic_commit_every=2",
                     "optim.lr=3e-3")
    job.wait_for("step 4 on two ranks", lambda row: row.get("step", 0) >= 4 and row.get("world_size") == 2)
    # Rank 0's host leaves (Horovod orders the hosts at random): the survivor, rank 1, becomes
    # rank 0 of one, and must read that world's slice, not its old one.
    leaving = job.worker(rank=0)[1]["HOROVOD_HOSTNAME"]
    set_hosts(job.hostfile, "".join(f"{host}\n" for host in BOTH_HOSTS.split() if not host.startswith(f"{leaving}:")))
    shrunk = job.wait_for("a world of one", lambda row: row.get("event") == "world" and row["world_size"] == 1)
    job.wait_for("two steps on one rank", lambda row: row.get("step", 0) >= shrunk["step"] + 2)
    set_hosts(job.hostfile, BOTH_HOSTS)
    job.finish()

    steps = assert_one_run_with_every_sample_once(job, max_steps)
    assert world_sizes(steps) == [2, 1, 2]
    assert read_summary(job.run_dir)["world_size"] == 2
    assert not [row for row in job.rows() if row.get("event") == "rollback"]  # a change of hosts loses nothing
    # The world size beside each logged loss, and the loss falling through the changes.
    logged = [row for row in read_metrics(job.run_dir) if "train/loss" in row]
    assert {row["world_size"] for row in logged} == {1, 2}
    assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.3


@serial
def test_rank_0_killed_mid_step_is_survived_and_its_host_rejoins(tiny_data, tmp_path):
    # The host rejoins at step 6 (measured, as above: its cooldown is over by the survivor's next
    # commit); the commits at 9 and 12 are margin for a slower rejoin.
    max_steps, commit_every = 15, 3
    # The killed worker's host may be tried again after 1-2 s (otherwise it would stay blacklisted).
    job = ElasticJob(tmp_path, tiny_data, f"train.max_steps={max_steps}", f"train.elastic_commit_every={commit_every}",
                     launch_args=("--blacklist-cooldown-range", "1", "2"))
    # Rank 0, which writes the logs, dies a step after the commit at step 3: during step 5.
    job.wait_for("step 4", lambda row: row.get("step", 0) >= 4)
    job.kill_worker(rank=0)
    rollback = job.wait_for("the survivor's rollback", lambda row: row.get("event") == "rollback")
    job.finish()

    assert rollback["step"] % commit_every == 0 and 0 <= rollback["steps_lost"] <= commit_every
    steps = assert_one_run_with_every_sample_once(job, max_steps)
    assert world_sizes(steps) == [2, 1, 2]  # the survivor alone, then the host back after its cooldown


@serial
def test_a_job_that_cannot_go_on_in_place_is_restarted_from_its_checkpoint(tiny_data, tmp_path):
    """Both ranks on one host: Horovod blacklists hosts, not ranks, so a SIGKILLed rank takes its
    host's survivor out of the job with it and horovodrun fails (this build's behaviour);
    launch.sh --max-restarts then starts the job again from its last checkpoint. One host, and
    no --network-interface: horovodrun's elastic driver alone would wait for a second host."""
    max_steps = 9
    job = ElasticJob(tmp_path, tiny_data, f"train.max_steps={max_steps}", "train.checkpoint_every=3",
                     hosts="localhost:2\n", launch_args=("--max-restarts", "1"))
    job.wait_for("step 4", lambda row: row.get("step", 0) >= 4)
    job.kill_worker(rank=1)
    job.finish()

    log = job.log()
    assert "blacklisted slots count == 2 -> stop running" in log and "restart 1/1 from its last checkpoint" in log
    assert [row["step"] for row in job.rows() if row.get("event") == "start"] == [0, 3]
    steps = assert_one_run_with_every_sample_once(job, max_steps)
    assert world_sizes(steps) == [2]


# --- what is refused, and the scripts' command lines, without running a job --------------------

def test_a_new_world_reads_its_own_slice_and_scales_the_masked_lm_loss_by_its_size(tiny_genre_data):
    """Training.use_world, which join_world calls after every reset: rank 1 of 2 becomes rank 0
    of 1 (its peer was lost), and the next step's batches come from the new world's slice,
    their masked-LM loss scaled for one rank, not from the old prefetcher's thread."""
    cfg = cli.compose_config(["task=mlm", "model=bert_tiny", "data=shakespeare_genre", "data.vocab_size=2048",
                              f"data.dir={tiny_genre_data}", f"train.micro_batch_size={MICRO_BATCH}",
                              "train.prefetch_steps=2"])
    OmegaConf.resolve(cfg)
    task, batches = step.build_data(cfg, torch.device("cpu"), 1, 2)
    # What use_world touches of a Training; the model and layout play no part in it.
    training = SimpleNamespace(device=torch.device("cpu"), task=task, batches=batches)
    try:
        old, _, old_samples = training.batches.get(0)  # the old world's thread is now reading ahead
        assert old_samples == [range(4, 8)]
        assert old[0]["loss_scale"].item() == pytest.approx(2 / task.masked_samples.masked_tokens(0, 8))
        step.Training.use_world(training, cfg, 0, 1)
        new, _, new_samples = training.batches.get(8)
        assert new_samples == [range(8, 12)]
        assert new[0]["loss_scale"].item() == pytest.approx(1 / training.task.masked_samples.masked_tokens(8, 4))
    finally:
        training.batches.close()


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor=2", "train.elastic=true cannot run with parallel.tensor: a reset restarts Horovod without"),
    ("parallel.zero_stage=1", "train.elastic=true cannot run with parallel.zero_stage: its shards are cut for"),
    ("sync=adasum", "train.elastic=true cannot run with sync.op=adasum: Adasum on CPU needs MPI"),
    ("sync.param_average_backend=mpi sync.param_average_every=2",
     "train.elastic=true cannot run with sync.param_average_backend=mpi"),
    ("sync=local_sgd", "train.elastic=true cannot run with sync.gradient_allreduce=false"),
    ("train.elastic_commit_every=0", "train.elastic_commit_every=0 must be at least 1"),
    ("train.checkpoint_async=true", "train.elastic=true cannot run with train.checkpoint_async=true: a reset"),
])
def test_what_cannot_run_under_elastic_is_refused_naming_the_key(override, message):
    cfg = cli.compose_config(["train.elastic=true", *override.split()])
    with pytest.raises(config.ConfigError) as refused:
        config.validate(cfg)
    assert message in str(refused.value)


def test_train_elastic_without_an_elastic_launch_is_one_line(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "train.elastic=true"), np_=1, launcher="none",
                     check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "train.elastic=true needs an elastic launch over Gloo: scripts/launch.sh --elastic" in output
    assert "Traceback" not in output


def test_discovery_reads_the_host_file_at_every_call_and_a_slurm_jobs_nodes(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# spot nodes\nnode1:4\nnode2 slots=2  # a comment\nnode3\n\n")
    discover = [str(ROOT / "scripts" / "discover_hosts.sh")]
    found = subprocess.run(discover, env={**job_env(), "ELASTIC_HOSTFILE": str(hostfile)}, capture_output=True,
                           text=True, check=True)
    assert found.stdout.split() == ["node1:4", "node2:2", "node3:1"]
    # Under SLURM: scontrol expands the node list (a stand-in here), each node with the tasks per node.
    (tmp_path / "scontrol").write_text("#!/bin/sh\n[ \"$*\" = 'show hostnames n[1-2]' ] && printf 'n1\\nn2\\n'\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {**job_env(), "PATH": f"{tmp_path}:{job_env()['PATH']}", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_NTASKS_PER_NODE": "3"}
    env.pop("ELASTIC_HOSTFILE", None)
    found = subprocess.run(discover, env=env, capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["n1:3", "n2:3"]
    missing = subprocess.run(discover, env={**job_env(), "ELASTIC_HOSTFILE": str(tmp_path / "gone")},
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def loopback_interface_names() -> list:
    """This machine's loopback interfaces, from the kernel's flags (IFF_LOOPBACK)."""
    return [path.name for path in Path("/sys/class/net").iterdir() if int((path / "flags").read_text(), 16) & 0x8]


def launch_dry_run(hostfile, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH_SH), "--dry-run", "--elastic", "--hostfile", str(hostfile), *args], cwd=ROOT,
                          env=job_env(env), capture_output=True, text=True, timeout=60)


def test_launch_sh_elastic_prints_horovodruns_elastic_command_with_the_loopback_interface(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(BOTH_HOSTS)
    result = launch_dry_run(hostfile, "--min-np", "1", "--max-np", "2", "--blacklist-cooldown-range", "10", "60",
                            "model=llama_tiny")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.removeprefix("launch: "))[1:]
    [loopback] = loopback_interface_names()
    assert command == ["horovodrun", "--gloo", "-np", "2", "--min-np", "1", "--host-discovery-script",
                       str(ROOT / "scripts" / "discover_hosts.sh"), "--max-np", "2", "--blacklist-cooldown-range",
                       "10", "60", "--network-interface", loopback, "python", "-m", "app.train", "model=llama_tiny",
                       "train.elastic=true"]
    # This machine by its own name, and by a loopback address other than 127.0.0.1, is this machine too.
    hostfile.write_text(f"{socket.gethostname()}:1\n127.0.1.1:1\n")
    assert f" --network-interface {loopback} " in launch_dry_run(hostfile).stdout
    # An interface given is used as it is: no probe, so a host that would fail it does not matter.
    hostfile.write_text("localhost:1\nno-such-host.invalid:1\n")
    given = launch_dry_run(hostfile, "--network-interface", loopback)
    assert given.returncode == 0 and f" --network-interface {loopback} " in given.stdout, given.stderr


@pytest.mark.parametrize("hosts, reason", [
    ("localhost:1\nno-such-host.invalid:1\n", "host 'no-such-host.invalid' does not resolve ("),
    # Not this machine, and (here) no answer: the probe over ssh waits its time, no longer.
    ("10.255.255.1:1\nlocalhost:1\n", ""),
])
def test_launch_sh_elastic_that_cannot_find_the_interface_ends_in_one_line_naming_the_option(tmp_path, hosts, reason):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(hosts)
    started = time.monotonic()
    result = launch_dry_run(hostfile, env={"NIC_PROBE_TIMEOUT_S": "3"})
    assert time.monotonic() - started < 30
    assert (result.returncode, result.stdout, result.stderr.count("\n")) == (2, "", 1), result.stderr
    assert result.stderr.startswith(f"launch.sh: --elastic found no network interface for the hosts ({reason}")
    assert result.stderr.endswith("); give --network-interface IF, the interface they reach each other through\n")


@pytest.mark.parametrize("args, error", [
    (["--elastic", "-np", "2"], "--elastic needs --hostfile FILE (or a SLURM job's nodes)"),
    (["--elastic", "-H", "a:1"], "--elastic reads its hosts from --hostfile FILE (edited while the job runs), not -H"),
    (["--elastic", "--launcher", "mpi"],
     "--elastic runs over Gloo (Horovod's elastic mode has no MPI); drop --launcher mpi"),
    (["--min-np", "1", "-np", "2"], "--min-np, --max-np, --max-restarts and --blacklist-cooldown-range need --elastic"),
    (["--elastic", "--max-restarts", "-1"], "--max-restarts must be 0 or more, not '-1'"),
    (["--elastic", "--hostfile", "HOSTS", "--min-np", "3"],
     "2 ranks to start with, fewer than --min-np 3 (the hosts have 2 slots)"),
    (["--elastic", "--hostfile", "HOSTS", "--min-np", "2", "--max-np", "1"], "--min-np 2 is more than --max-np 1"),
])
def test_launch_sh_elastic_rejects_bad_input_with_a_one_line_error(tmp_path, args, error):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(BOTH_HOSTS)
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}
    result = subprocess.run([str(LAUNCH_SH), "--dry-run", *[str(hostfile) if a == "HOSTS" else a for a in args]],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"launch.sh: {error}\n", "")


def test_replay_keeps_each_steps_last_row_after_a_rollback_or_restart():
    rows = [{"event": "start", "step": 0}, *({"step": s, "samples": [s - 1, s]} for s in (1, 2, 3)),
            {"event": "rollback", "step": 2}, {"step": 3, "samples": [2, 3], "world_size": 1},
            {"step": 4, "samples": [3, 4]}, {"event": "start", "step": 3}, {"step": 4, "samples": [3, 4], "again": 1}]
    assert [(row["step"], row.get("world_size"), row.get("again")) for row in elastic.replay(rows)] == [
        (1, None, None), (2, None, None), (3, 1, None), (4, None, 1)]
