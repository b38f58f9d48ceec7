"""Shared fixtures: a small prepared Shakespeare dataset and a runner for real Horovod jobs."""
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The suite oversubscribes two cores (several ranks per job, two test files at a time). OpenMP
# threads that finish a parallel region spin, by default, waiting for the next one, on a core
# another process needs: waiting passively halved a one-process llama_tiny run's CPU time here,
# with bitwise-equal weights. Set before torch loads OpenMP; every job inherits it (job_env).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 (after the variable above)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Small enough that a 2-rank job takes seconds, large enough to train a visible loss drop.
TINY_VOCAB = 512


def job_env(extra=None) -> dict:
    # Horovod's and MPI's start-up variables come from the config unless a test sets them.
    settings = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "OMPI_MCA_mpi_yield_when_idle")
    env = {k: v for k, v in os.environ.items() if k not in settings}
    env.update({
        "PYTHONPATH": str(ROOT),
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        # OpenMPI refuses root without these; CI and containers run as root.
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    })
    return env


def launcher_command(np_: int, launcher: str) -> list:
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]
    if launcher == "mpi":
        return ["mpirun", "-np", str(np_), "--bind-to", "none", "-x", "PYTHONPATH", "-x", "PATH"]
    if launcher == "none":
        return []
    raise ValueError(launcher)


def run_job(args, np_=2, launcher="gloo", cwd=ROOT, timeout=600, check=True, module="app.train", env=None):
    """Run `python -m module args` under a real launcher (with env's variables added); return
    the CompletedProcess."""
    command = launcher_command(np_, launcher) + [sys.executable, "-m", module, *args]
    result = subprocess.run(command, cwd=cwd, env=job_env(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}"
            f"\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def run_worker(script: str, args=(), np_=2, launcher="gloo", timeout=300):
    """Run tests/workers/<script> under a real launcher."""
    command = launcher_command(np_, launcher) + [sys.executable, str(ROOT / "tests" / "workers" / script), *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def launched_once(tmp_path_factory, launch):
    """A function (np_, *overrides) -> run dir that calls launch(run_dir, np_, *overrides) the first
    time it meets those arguments and returns that run dir every time: tests that read the same
    run (a reference several comparisons share) share one launch of it."""
    @functools.cache
    def run_dir_of(np_, *extra):
        run_dir = tmp_path_factory.mktemp("run") / "run"
        launch(run_dir, np_, *extra)
        return run_dir

    return run_dir_of


class Elsewhere(torch.Tensor):
    """A CPU tensor standing in for one on a GPU, which this machine lacks: each move to the CPU
    is counted, and gives a plain tensor, so what is pickled or saved shows whether it was moved."""
    moves = 0

    def cpu(self, *args, **kwargs):
        Elsewhere.moves += 1
        return self.as_subclass(torch.Tensor)


def last_json_line(output: str) -> dict:
    """The last JSON object printed, without horovodrun's `[rank]<stdout>:` prefix."""
    lines = [re.sub(r"^\[\d+\]<stdout>:", "", line).strip() for line in output.splitlines()]
    return json.loads([line for line in lines if line.startswith("{")][-1])


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir: Path, tag: str) -> list:
    """(step, value) in the order TensorBoard shows them, after it applies purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


# A clip threshold far above any tiny run's gradient norm (below 10): the step still computes
# and logs the global norm (it does only where clipping is on), but never rescales the
# gradient, so a uniform factor in it (a sum for a mean, a world size divided twice) reaches
# SGD's update instead of vanishing in the clip. assert_never_clipped checks that it held.
NEVER_CLIPS = 1e6
UNCLIPPED = f"train.grad_clip={NEVER_CLIPS:g}"
# And one far below it (the tests' llama_tiny and bert_tiny runs log norms of 0.6-1.7), for the
# runs that test clipping itself: every step clips. assert_always_clipped checks that.
ALWAYS_CLIPS = 0.05
CLIPPED = f"train.grad_clip={ALWAYS_CLIPS:g}"
# Every layout's gradient is the one-process gradient but for the order of float32 sums
# (~1e-7 relative per sum), taken at weights up to a few 1e-6 apart after several steps: the
# global norms agree to ~1e-6 relative (measured: 4.4e-7 for 1F1B, 1.1e-7 for masked LM on 2
# ranks). A uniform factor moves them by 2x or more.
GRAD_NORM_RTOL = 1e-4


def grad_norms(run_dir: Path) -> dict:
    """step -> the logged global gradient norm (before any clipping)."""
    return {row["step"]: row["grad_norm"] for row in read_metrics(run_dir) if "grad_norm" in row}


def assert_never_clipped(run_dir: Path) -> None:
    norms = grad_norms(run_dir)
    assert norms and max(norms.values()) < NEVER_CLIPS, norms


def assert_always_clipped(run_dir: Path) -> None:
    norms = grad_norms(run_dir)
    assert norms and min(norms.values()) > ALWAYS_CLIPS, f"a step went unclipped, so clipping went untested: {norms}"


def assert_same_grad_norms(run_dir: Path, reference: Path) -> None:
    """run_dir's logged gradient norms are the reference run's at the same steps (a resumed run
    logs only the steps after its resume)."""
    got, expected = grad_norms(run_dir), grad_norms(reference)
    assert got and set(got) <= set(expected), (got, expected)
    for step, norm in got.items():
        assert norm == pytest.approx(expected[step], rel=GRAD_NORM_RTOL), (step, got, expected)


def made_once_per_session(tmp_path_factory, name: str, make) -> Path:
    """The directory `name`, made by make(path) once per test session, not once per xdist worker
    (scripts/test.sh runs two, each with its own session fixtures): the first worker to ask makes
    it under a lock while the other waits, in the session's directory that both workers' own lie in."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    shared = root / "made_once"
    shared.mkdir(exist_ok=True)
    path, made = shared / name, shared / f"{name}.made"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not made.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed make left
            make(path)
            made.touch()
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Shakespeare with a 512-token BPE vocabulary, prepared once per test session."""
    def prepare(data_dir):
        run_job(["data=shakespeare", f"data.vocab_size={TINY_VOCAB}", f"data.dir={data_dir}"], launcher="none",
                module="app.prepare")

    return made_once_per_session(tmp_path_factory, "shakespeare512", prepare)


def tiny_train_args(data_dir: Path, run_dir: Path, *extra) -> list:
    """A seconds-long llama_tiny run: fp32 and deterministic so runs can be compared exactly."""
    return [
        "model=llama_tiny", f"data.vocab_size={TINY_VOCAB}", f"data.dir={data_dir}",
        "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=2", "train.eval_every=0",
        "train.checkpoint_every=0", "train.sample_tokens=0", "train.progress_bar=false",
        "train.precision=fp32", "train.deterministic=true", "train.peak_tflops=1.0",
        "optim.warmup_steps=2", f"hydra.run.dir={run_dir}", *extra,
    ]


@pytest.fixture(scope="session")
def untrained_run(tiny_data, tmp_path_factory) -> Path:
    """A run of tiny_train_args that stops before its first step: its checkpoint holds the weights
    every tiny run starts from (optimizer and sync settings do not change them), which tests
    measure updates against."""
    def launch(run_dir):
        run_job(tiny_train_args(tiny_data, run_dir, "train.max_steps=0"), launcher="none")

    return made_once_per_session(tmp_path_factory, "untrained", launch)


@pytest.fixture(scope="session")
def tiny_genre_data(tmp_path_factory) -> Path:
    """Genre-labelled Shakespeare passages with a 2048-token WordPiece vocabulary."""
    def prepare(data_dir):
        run_job(["task=classify", "model=bert_tiny", "data=shakespeare_genre", "data.vocab_size=2048",
                 f"data.dir={data_dir}"], launcher="none", module="app.prepare")

    return made_once_per_session(tmp_path_factory, "genre2048", prepare)


def tiny_encoder_args(task: str, data_dir: Path, run_dir: Path, *extra) -> list:
    return [
        f"task={task}", "model=bert_tiny", "data=shakespeare_genre", "data.vocab_size=2048", f"data.dir={data_dir}",
        "train.micro_batch_size=8", "train.max_steps=6", "train.log_every=2", "train.eval_every=0",
        "train.checkpoint_every=0", "train.progress_bar=false", "train.precision=fp32", "train.peak_tflops=1.0",
        "optim.warmup_steps=2", f"hydra.run.dir={run_dir}", *extra,
    ]


def plain_shard(model, optimizer, extra=None, parts=1, index=0):
    """What one rank writes of a checkpoint of a plain model and optimizer: every tensor whole,
    or (parts > 1) rank `index`'s rows of it, as a layout splitting every tensor's first
    dimension `parts` ways would hold them."""
    from app.parallel.placement import Placement
    from app.sharded_checkpoint import shard_of
    from app.state_dicts import by_name, full_model_order, is_per_element
    order = full_model_order(model)
    named = by_name(optimizer.state_dict(), order)
    boxes = {name: Placement.whole(name, param.shape, ()).split(0, parts, index, "tensor")
             for name, param in model.named_parameters()}
    state = [(boxes[name], {key: value[boxes[name].box] if is_per_element(value) else value
                            for key, value in entry.items()}) for name, entry in named["state"].items()]
    return shard_of([(boxes[name], param.detach()[boxes[name].box]) for name, param in model.named_parameters()],
                    state, named["groups"], order, extra)


# scripts/test.sh runs the suite on two pytest-xdist workers (--dist loadfile: each file on one
# worker, so its module fixtures, the launches its tests share, and the daemons test_slurm and
# test_multihost start run once), then the tests marked serial alone. The longest files go first
# (scripts/test.sh keeps this order: xdist would sort files by their number of tests), so the
# files left at the end are short and neither worker idles long: every file over 30 s, by its
# worker time in a full run here (2026-12-07 at b44c96c, the sum of its tests' --durations:
# test_bench 274 s down to test_multihost 31 s).
LONGEST_FIRST = ("test_bench", "test_layouts", "test_checkpoint", "test_train_horovod", "test_slurm", "test_speed",
                 "test_zero", "test_plan", "test_equivalence", "test_tensor_parallel", "test_pipeline", "test_encoder",
                 "test_encoder_equivalence", "test_shards", "test_encoder_tensor", "test_prepare", "test_multihost")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order otherwise
