"""make doctor: what a failing launch needs, readable without knowing horovodrun -cb's layout."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, job_env, launcher_command


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


def test_horovodrun_asks_whether_gloo_was_built_once_per_build_of_the_extension(tmp_path):
    """Our Horovod patch keeps horovodrun's build checks (each imports torch in a child: over a
    second of CPU a launch) in $XDG_CACHE_HOME/horovod, keyed by the extension's libraries."""
    env = job_env({"XDG_CACHE_HOME": str(tmp_path)})
    checks_file, key = tmp_path / "horovod" / "build_checks.json", "torch: built with Gloo"

    def launch():
        return subprocess.run([*launcher_command(1, "gloo"), sys.executable, "-c", "pass"], env=env,
                              capture_output=True, text=True, timeout=120)

    assert launch().returncode == 0
    entry = json.loads(checks_file.read_text())[key]
    library = Path(entry["stamp"][0][0])
    assert entry["result"] is True and library.name.startswith("mpi_lib") and library.parent.name == "torch"
    assert entry["stamp"] == [[str(library), library.stat().st_size, library.stat().st_mtime_ns]]
    # The kept answer is the one used: told that this build lacks Gloo, horovodrun refuses.
    checks_file.write_text(json.dumps({key: dict(entry, result=False)}))
    refused = launch()
    assert refused.returncode != 0 and "Gloo support has not been built" in refused.stderr
    # An answer kept for other libraries (a rebuilt extension) is asked again, and replaced.
    checks_file.write_text(json.dumps({key: {"stamp": [[str(library), 1, 1]], "result": False}}))
    assert launch().returncode == 0
    assert json.loads(checks_file.read_text())[key] == entry
