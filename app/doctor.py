"""What a user needs when a launch fails: python -m app.doctor (or make doctor)."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def horovod_report() -> list:
    import horovod
    import horovod.torch as hvd

    lines = [
        f"horovod {horovod.__version__}: GPU ops {'NCCL' if hvd.nccl_built() else 'none (CPU build)'}",
        f"  controllers: MPI {'yes' if hvd.mpi_built() else 'no'}, Gloo {'yes' if hvd.gloo_built() else 'no'}",
    ]
    # The venv's own horovodrun first: `.venv/bin/python -m app.doctor` runs without activating it.
    beside_python = Path(sys.executable).parent / "horovodrun"
    horovodrun = str(beside_python) if beside_python.exists() else shutil.which("horovodrun")
    if horovodrun is None:
        return lines + ["  horovodrun: not on PATH (activate .venv)"]
    build = subprocess.run([horovodrun, "-cb"], capture_output=True, text=True).stdout
    return lines + [f"  horovodrun -cb ({horovodrun}):"] + build_check_lines(build)


def build_check_lines(build: str) -> list:
    """horovodrun -cb's sections ("Available Controllers:") and their [X]/[ ] rows, indented under them."""
    lines = []
    for line in build.splitlines():
        if line.strip().endswith(":") and not line.startswith("Horovod"):
            lines.append(f"    {line.strip()}")
        elif "[X]" in line or "[ ]" in line:
            lines.append(f"      {line.strip()}")
    return lines


def mpi_report() -> list:
    lines = []
    mpirun = shutil.which("mpirun")
    if mpirun:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout.splitlines()
        lines.append(f"mpirun: {mpirun} ({version[0] if version else 'unknown version'})")
    else:
        lines.append("mpirun: not found (apt-get install openmpi-bin libopenmpi-dev)")
    try:
        from mpi4py import MPI

        lines.append(f"mpi4py library: {MPI.Get_library_version().splitlines()[0].strip()}")
    except Exception as error:  # noqa: BLE001 - the report must go on whatever MPI does
        lines.append(f"mpi4py: unusable ({error})")
    return lines


def cpu_report() -> list:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    bf16 = [name for name in ("avx512_bf16", "amx_bf16") if name in flags.split()]
    return [
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{len(os.sched_getaffinity(0))} usable by this process",
        f"  bf16 instructions: {', '.join(bf16) or 'none (bf16 autocast will be slow; use train.precision=fp32)'}",
        f"  torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    ]


def gpu_report() -> list:
    if not torch.cuda.is_available():
        return ["gpus: none visible to torch (CUDA_VISIBLE_DEVICES=%s)" % os.environ.get("CUDA_VISIBLE_DEVICES", "unset")]
    return [f"gpu {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def main() -> None:
    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    for section in (horovod_report, mpi_report, cpu_report, gpu_report):
        try:
            lines.extend(section())
        except Exception as error:  # noqa: BLE001 - say what broke and keep reporting the rest
            lines.append(f"{section.__name__}: failed: {error}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
