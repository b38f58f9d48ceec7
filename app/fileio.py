"""Atomic writes: a reader (or a crash) sees the old file or the new one, never half of one."""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]


def umask() -> int:
    """The process's file-creation mask (Linux reports it without changing it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(mask)
    return mask


def follow_umask(path: PathLike, mode: int) -> None:
    """tempfile makes files 0600 and directories 0700, private even when the user's umask
    shares them: a teammate on a shared cluster could not read a run or load an export. What
    is renamed into place gets the mode a plain open() or mkdir() would have given it."""
    os.chmod(path, mode & ~umask())


def fsync_dir(directory: PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        follow_umask(tmp, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike):
    return json.loads(Path(path).read_text())


def replace_directory(staging: PathLike, final: PathLike) -> None:
    """Make the complete directory `staging` be `final`, syncing it first, with one rename."""
    staging, final = Path(staging), Path(final)
    for path in staging.rglob("*"):
        if path.is_file():
            follow_umask(path, 0o666)  # safetensors writes 0600 too
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(staging)
    if final.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first.
        retired = final.with_name(f".{final.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)


def new_staging_directory(final: PathLike) -> Path:
    """A temporary sibling of `final` (.NAME.*.tmp), for replace_directory to rename into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    follow_umask(staging, 0o777)
    return staging


@contextmanager
def staged_directory(final: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename."""
    staging = new_staging_directory(final)
    try:
        yield staging
        replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
