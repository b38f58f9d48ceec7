"""The image run for real by scripts/container_test.sh: its default command (the 2-rank smoke run)
and a run whose work directory is mounted from here. Building the image takes many minutes (torch,
the Horovod build), so that is `make image`'s job: the suite runs an image already built, and is
skipped, saying why, where no container engine answers or the image is not there."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, read_summary

SCRIPT = ROOT / "scripts" / "container_test.sh"
IMAGE = "llama-horovod"
# conf/experiment/smoke.yaml: the image's default command trains this many steps on 2 ranks.
SMOKE_STEPS = 20
SMOKE_RANKS = 2


def engine() -> str:
    """The engine container_test.sh would pick: docker when its daemon answers, else podman."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    if shutil.which("podman") and shutil.which("runc"):
        return "podman"
    return ""


def image_built(name: str) -> bool:
    if name == "podman":
        return subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True).returncode == 0
    return subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0


def script(*args, env=None, timeout=60):
    environment = {**os.environ, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built_engine() -> str:
    name = engine()
    if not name:
        pytest.skip("no container engine: no Docker daemon answers and podman/runc are not installed "
                    "(make image installs podman and builds the image)")
    if not image_built(name):
        pytest.skip(f"image {IMAGE} is not built in {name}'s store: make image builds it (several minutes)")
    return name


def test_the_image_runs_its_smoke_run_and_a_mounted_run_with_identical_parameters_on_both_ranks(built_engine,
                                                                                              tmp_path):
    result = script("--no-build", "--workdir", str(tmp_path), timeout=900)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    # Every command is printed before it runs: the default-command run and the mounted one.
    commands = [line for line in result.stderr.splitlines() if line.startswith(f"+ {built_engine}")]
    assert any(c.endswith(f" run --rm --network host {IMAGE}") for c in commands), commands
    assert any(f"--volume {tmp_path}:/workspace {IMAGE} -np 2 experiment=smoke" in c for c in commands), commands
    assert "parameters identical on all 2 ranks holding the same part: True" in result.stdout

    summary = read_summary(tmp_path / "runs" / "container-test")
    assert summary["world_size"] == SMOKE_RANKS
    assert sorted(r["rank"] for r in summary["replicas"]) == list(range(SMOKE_RANKS))
    assert len({r["param_sha256"] for r in summary["replicas"]}) == 1 and summary["replicas_identical"] is True
    assert summary["step"] == SMOKE_STEPS
    # The ranks ran in the container: its work directory, not this one.
    assert {r["run_dir"] for r in summary["replicas"]} == {"/workspace/runs/container-test"}


def test_an_image_that_is_not_built_is_named_with_the_fix(built_engine):
    result = script("--no-build", "--image", "llama-horovod-never-built")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "container_test.sh: image llama-horovod-never-built is not built: "
        "run make image (or scripts/container_test.sh without --no-build)")


@pytest.mark.parametrize("args, env, message", [
    (["--bogus"], {}, "unknown argument '--bogus' (see --help)"),
    (["--image"], {}, "--image needs a name"),
    ([], {"CONTAINER_ENGINE": "rkt"}, "CONTAINER_ENGINE must be docker or podman, not 'rkt'"),
])
def test_bad_input_is_one_line_naming_the_problem(args, env, message):
    result = script(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"container_test.sh: {message}"
