"""What can be checked of the Dockerfile without a Docker engine: it is built by
scripts/install.sh and nothing else, from files that exist, on the base image argument, and its
entrypoint and default command are a valid scripts/launch.sh call."""
import json
import os
import re
import shlex
import subprocess

import pytest

from conftest import ROOT, job_env

DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SH = ROOT / "scripts" / "install.sh"


def instructions(text: str) -> list:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped, as Docker reads them."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, f"Dockerfile ends inside a continued instruction: {current}"
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list:
    return instructions(DOCKERFILE.read_text())


def stages(dockerfile) -> dict:
    """Stage name -> its instructions (FROM first); '' for the global ARGs before the first FROM."""
    result, name = {"": []}, ""
    for keyword, arguments in dockerfile:
        if keyword == "FROM":
            name = re.search(r"\bAS\s+(\S+)", arguments, re.IGNORECASE).group(1)
            result[name] = []
        result[name].append((keyword, arguments))
    return result


def copy_sources(arguments: str) -> list:
    words = [w for w in shlex.split(arguments) if not w.startswith("--")]
    return words[:-1]


def covers(copied: list, path: str) -> bool:
    return any(path == c.rstrip("/") or path.startswith(c.rstrip("/") + "/") or c in ("./", ".") for c in copied)


def test_every_copied_file_exists_and_copies_between_stages_name_earlier_stages(dockerfile):
    seen_stages = []
    for keyword, arguments in dockerfile:
        if keyword == "FROM":
            seen_stages.append(re.search(r"\bAS\s+(\S+)", arguments, re.IGNORECASE).group(1))
        if keyword != "COPY":
            continue
        source_stage = re.search(r"--from=(\S+)", arguments)
        if source_stage:
            assert source_stage.group(1) in seen_stages[:-1], f"COPY {arguments}: no earlier stage of that name"
            continue
        for source in copy_sources(arguments):
            assert (ROOT / source).exists(), f"COPY {arguments}: {source} is not in the repository"


def test_every_stage_builds_on_the_base_image_argument_whose_default_is_cpu(dockerfile):
    by_stage = stages(dockerfile)
    global_args = dict(a.split("=", 1) for k, a in by_stage[""] if k == "ARG" and "=" in a)
    assert "BASE_IMAGE" in global_args, "ARG BASE_IMAGE must come before the first FROM to be usable in it"
    assert "cuda" not in global_args["BASE_IMAGE"].lower()
    for name, body in by_stage.items():
        if name:
            image = body[0][1].split()[0]
            assert image == "${BASE_IMAGE}", f"stage {name} builds on {image}, not the BASE_IMAGE argument"
    build_args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in by_stage["build"] if k == "ARG"}
    # CPU by default: no CUDA torch index, no GPU operations in Horovod's build.
    assert build_args == {"TORCH_INDEX_URL": "", "HOROVOD_GPU_OPERATIONS": ""}


def test_every_argument_is_used(dockerfile):
    text = "\n".join(f"{k} {a}" for k, a in dockerfile if k != "ARG")
    for keyword, arguments in dockerfile:
        if keyword == "ARG":
            name = arguments.split("=", 1)[0]
            assert re.search(rf"\$\{{?{name}\b", text), f"ARG {name} is declared but never used"


def test_the_image_is_built_by_install_sh_from_everything_it_reads(dockerfile):
    by_stage = stages(dockerfile)
    runs = [(name, a) for name, body in by_stage.items() for k, a in body if k == "RUN"]
    installs = [(name, a) for name, a in runs if "scripts/install.sh" in a]
    assert [name for name, _ in installs] == ["build"], "exactly one RUN of scripts/install.sh, in the build stage"
    # One recipe: no stage installs Python packages or builds Horovod by itself.
    for name, arguments in runs:
        assert not re.search(r"\bpip3? install\b|\bhorovod\b", arguments, re.IGNORECASE), f"{name}: RUN {arguments}"

    install_sh = INSTALL_SH.read_text()
    # The knobs the build passes are the ones install.sh reads.
    for knob in ("TORCH_INDEX_URL", "HOROVOD_GPU_OPERATIONS"):
        assert knob in installs[0][1] and "${" + knob in install_sh

    # Everything install.sh reads from the checkout is copied before it runs.
    body = by_stage["build"]
    install_at = next(i for i, (k, a) in enumerate(body) if k == "RUN" and "scripts/install.sh" in a)
    copied = [s for k, a in body[:install_at] if k == "COPY" for s in copy_sources(a)]
    needed = {re.split(r"[$\"'}]", path)[0] for path in re.findall(r"\$ROOT/([^\s\"')]+)", install_sh)}
    needed.discard(".venv")  # what install.sh makes, not reads
    needed |= set(re.findall(r"file:\s*(\S+)", (ROOT / "setup.cfg").read_text()))  # long_description
    needed |= {"setup.py", "app/__init__.py"}  # pip install -e . builds the package
    assert {"setup.cfg", "scripts/constraints.txt"} <= needed
    for path in sorted(needed):
        assert covers(copied, path), f"install.sh needs {path}, which is not copied before it runs"


def test_runtime_stage_has_openmpi_and_sshd_no_compilers_and_runs_as_a_user(dockerfile):
    runtime = stages(dockerfile)["runtime"]
    assert list(stages(dockerfile))[-1] == "runtime", "the last stage is the image"
    apt = " ".join(a for k, a in runtime if k == "RUN" and "apt-get install" in a)
    for package in ("openmpi-bin", "openssh-server", "openssh-client", "python3"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", apt), f"runtime stage does not install {package}"
    compilers = re.search(r"(?<!\S)(g\+\+|gcc|cmake|\S+-dev)(?!\S)", apt)
    assert not compilers, f"compilers or headers in the runtime stage: {compilers.group(0)}"
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"


def test_entrypoint_is_launch_sh_from_the_built_tree_and_the_default_command_is_valid_for_it(dockerfile):
    by_stage = stages(dockerfile)
    build_workdir = [a for k, a in by_stage["build"] if k == "WORKDIR"][-1]
    entrypoint = json.loads([a for k, a in by_stage["runtime"] if k == "ENTRYPOINT"][-1])
    command = json.loads([a for k, a in by_stage["runtime"] if k == "CMD"][-1])
    # The runtime stage copies the build stage's tree whole, so the entrypoint is a repo file.
    assert f"--from=build {build_workdir} {build_workdir}" in [a for k, a in by_stage["runtime"] if k == "COPY"]
    assert entrypoint[0].startswith(build_workdir + "/")
    script = ROOT / entrypoint[0][len(build_workdir) + 1:]
    assert script == ROOT / "scripts" / "launch.sh" and os.access(script, os.X_OK)
    # install.sh's venv (VENV=${VENV:-$ROOT/.venv}) is the one on the runtime PATH.
    assert "VENV=${VENV:-$ROOT/.venv}" in INSTALL_SH.read_text()
    env = " ".join(a for k, a in by_stage["runtime"] if k == "ENV")
    assert f"PATH={build_workdir}/.venv/bin:" in env

    dry_run = subprocess.run([str(script), "--dry-run", *command], cwd=ROOT, env=job_env(), capture_output=True,
                             text=True)
    assert dry_run.returncode == 0, dry_run.stderr
    assert "horovodrun --gloo -np 2 -H localhost:2 python -m app.train experiment=smoke" in dry_run.stdout
