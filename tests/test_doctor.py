"""make doctor: what a failing launch needs, readable without knowing horovodrun -cb's layout."""
import subprocess
import sys

from conftest import ROOT, job_env


def test_doctor_shows_horovods_build_check_under_its_section_headers():
    env = {k: v for k, v in job_env().items() if k != "PATH"}  # as `.venv/bin/python -m app.doctor` runs: no venv on PATH
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run([sys.executable, "-m", "app.doctor"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    controllers = lines.index("Available Controllers:")
    operations = lines.index("Available Tensor Operations:")
    assert lines[controllers + 1:controllers + 3] == ["[X] MPI", "[X] Gloo"]
    assert "[X] PyTorch" in lines[lines.index("Available Frameworks:"):controllers]
    assert operations > controllers and any(line.endswith("] NCCL") for line in lines[operations:])
