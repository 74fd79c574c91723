"""Writing files so that a crash never leaves a half-written one where a reader looks, and the
one-writer lock of an output. Plain files only; HDF5 layouts are the other modules' business."""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
from contextlib import contextmanager
from pathlib import Path

import h5py

from ..errors import PipeError


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path) -> None:
    """fsync ``tmp`` and rename it onto ``target``: readers see the old file or the new one."""
    with open(tmp, "rb+") as raw:
        os.fsync(raw.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def tmp_name(target: Path) -> Path:
    """Where ``target`` is written before it is published (hidden, per process)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def write_bytes_atomic(target: Path, data: bytes) -> None:
    tmp = tmp_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_h5(target: Path):
    """Yield an h5py.File at a temporary name, then publish it onto ``target``; on failure
    the temporary file is removed and ``target`` is untouched."""
    tmp = tmp_name(target)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def writable_bytes(folder: Path) -> float:
    """Bytes one file may still grow to in ``folder``: free disk space, and the process's
    file-size limit (``ulimit -f``) where one is set."""
    limit = shutil.disk_usage(folder).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return min(limit, soft) if soft != resource.RLIM_INFINITY else limit


def lock_output(out: Path) -> int:
    """Take the exclusive writer lock of ``out`` (``<out>.lock``), or fail at once. The OS
    releases it when the process dies, even on ``kill -9``. Returns the descriptor to close."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out.with_name(out.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PipeError(f"cannot create output {out}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PipeError(f"another pipe process is writing {out}; wait for it to finish or choose another --out") from None
    return fd
