"""What our Horovod patch (scripts/horovod-0.28.1.patch) changes beyond the build, on real launches:
horovodrun keeps its build checks, and a rank waiting on a collective sleeps instead of spinning."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import job_env, last_json_line, launcher_command, run_worker

LATE_S = 2.0


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


def test_a_rank_waiting_on_a_late_peers_allreduce_sleeps_instead_of_spinning():
    # Horovod 0.28.1 waited with yield() in a loop: the waiting rank kept a core busy (mostly in
    # system calls) for the whole wait, taking it from ranks that had work.
    wait = last_json_line(run_worker("late_allreduce.py", [LATE_S]).stdout)
    assert wait["sum"] == 2 and wait["wall_s"] >= 0.8 * LATE_S
    # What is left is Horovod's background thread, which negotiates once a cycle.
    assert wait["cpu_s"] < 0.2 * wait["wall_s"], wait
