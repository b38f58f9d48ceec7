"""Starting the trainer and the bench workers under horovodrun (Gloo), mpirun or torchrun.

A worker is `python -m app.bench.<module> SPEC.json`: the spec carries its knobs and where to
write its result, so nothing is parsed back from a launcher's interleaved output. Each launch
writes its whole output to a log file, and a failure raises with the log's tail."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from app import fileio

ROOT = Path(__file__).resolve().parents[2]
# horovodrun and torchrun live next to the interpreter in the virtual environment.
BIN = Path(sys.executable).parent
# After SIGTERM, how long a launcher gets to stop its ranks before everything is killed.
STOP_GRACE_S = 10


class LaunchError(RuntimeError):
    """A launched job failed or ran out of time; the message holds its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(launcher: str, processes: int, module: str, args: List[str], env_names: List[str],
            mpirun_args: List[str]) -> List[str]:
    """The command line that runs `python -m module args` on `processes` local processes."""
    python = [sys.executable, "-m", module, *args]
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(processes), "-H", f"localhost:{processes}", "--gloo", *python]
    if launcher == "mpi":
        # mpirun hands only the variables named with -x to its ranks.
        exported = [arg for name in env_names for arg in ("-x", name)]
        return ["mpirun", "-np", str(processes), *mpirun_args, *exported, *python]
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"), "--nnodes=1", f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", module, *args,
        ]
    if launcher == "none":
        return python
    raise ValueError(f"unknown launcher {launcher!r}")


def run(cmd: List[str], log_path: Path, timeout_s: int, env_extra: Optional[Dict[str, str]] = None) -> None:
    """Run cmd with its output in log_path; on a timeout stop its whole process group: SIGTERM
    first, so horovodrun, mpirun and torchrun can stop ranks they started in groups of their own."""
    env = dict(os.environ)
    env.update(env_extra or {})
    # Workers import `app` whatever the caller's working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            raise LaunchError(f"{' '.join(cmd)} ran past {timeout_s}s; log: {log_path}\n{tail(log_path)}")
    if returncode != 0:
        raise LaunchError(f"{' '.join(cmd)} exited {returncode}; log: {log_path}\n{tail(log_path)}")


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run_worker(module: str, spec: dict, work_dir: Path, launcher: str, processes: int, bench_cfg,
               env_extra: Optional[Dict[str, str]] = None) -> dict:
    """Write spec.json into work_dir, run the worker module on it, return the result it wrote."""
    work_dir.mkdir(parents=True, exist_ok=True)
    result_path = work_dir / "result.json"
    result_path.unlink(missing_ok=True)
    spec_path = work_dir / "spec.json"
    fileio.write_json(spec_path, {**spec, "result": str(result_path)})
    env_extra = env_extra or {}
    cmd = command(launcher, processes, module, [str(spec_path)], ["PYTHONPATH", "PYTHONUNBUFFERED", *env_extra],
                  list(bench_cfg.mpirun_args))
    run(cmd, work_dir / "output.log", bench_cfg.launch_timeout_s, env_extra)
    return json.loads(result_path.read_text())


def read_spec() -> dict:
    """A worker's spec: the JSON file named by its one argument."""
    return json.loads(Path(sys.argv[1]).read_text())
