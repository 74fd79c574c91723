"""The parts folder ``<out>.parts/``: the finished batches of an extraction not yet merged into
its feature file, one small HDF5 part file per batch. The part format is written and read here
and nowhere else.

A part holds ``paths``, ``file_size``, ``file_mtime_ns``, ``features`` for the images that were
extracted, and a ``failed`` group with the same per-file keys plus ``errors`` for those that
could not be read. Parts are named ``part-r{writer}-{number}.h5``, so the ranks of one
extraction never collide, and ``meta.json`` records the fingerprint they were made with.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import PipeError
from .feature_file import Key, Rows, write_failed, write_strings
from .files import write_bytes_atomic


@dataclass
class PartsIndex:
    """What the parts hold, by image key (path, size, mtime_ns): where each stored image's
    features are (part file, row), and why each failed image failed. A later part wins."""

    sources: dict[Key, tuple[Path, int]] = field(default_factory=dict)
    failed: dict[Key, str] = field(default_factory=dict)


def _keys(group: h5py.Group) -> list[Key]:
    return list(zip(group["paths"].asstr()[:].tolist(), group["file_size"][:].tolist(),
                    group["file_mtime_ns"][:].tolist()))


class PartsFolder:
    """``<out>.parts/`` of one output file."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".parts")

    def files(self) -> list[Path]:
        return sorted(self.path.glob("part-*.h5"))

    def prepare(self, fingerprint: str, overwrite: bool) -> None:
        """Make the folder ready for parts of ``fingerprint``. Parts of other settings are kept
        for their own command to finish (an error says so), unless ``overwrite`` or there are
        none; half-written parts of a killed run are removed."""
        meta_path = self.path / "meta.json"
        meta = {"fingerprint": fingerprint}
        if self.path.exists():
            try:
                previous = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != meta:
                if not overwrite and previous is not None and self.files():
                    raise PipeError(f"{self.path} holds an unfinished extraction with other settings "
                                    f"(fingerprint {previous.get('fingerprint')}); re-run it with those "
                                    "settings to finish it, or pass --overwrite to discard it")
                shutil.rmtree(self.path)
        if not self.path.exists():
            self.path.mkdir(parents=True)
            tmp = self.path / ".meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, meta_path)
        for stale in self.path.glob(".*.tmp-*"):
            stale.unlink()

    def next_number(self, writer: int) -> int:
        """The number of ``writer``'s next part: after its highest, so a resumed run appends."""
        mine = [int(p.stem.rsplit("-", 1)[1]) for p in self.path.glob(f"part-r{writer}-*.h5")]
        return max(mine, default=-1) + 1

    def write(self, writer: int, number: int, done: Rows, features: np.ndarray, failed: Rows,
              errors: list[str]) -> Path:
        """Write one part, all or nothing; an OSError (a full disk) leaves no part behind."""
        target = self.path / f"part-r{writer}-{number:06d}.h5"
        image = io.BytesIO()  # built in memory: a full disk then fails in plain file I/O, cleanly
        with h5py.File(image, "w") as f:
            write_strings(f, "paths", done.paths)
            f.create_dataset("file_size", data=done.size)
            f.create_dataset("file_mtime_ns", data=done.mtime_ns)
            f.create_dataset("features", data=features)
            write_failed(f.create_group("failed"), failed.paths, errors, failed.size, failed.mtime_ns)
        write_bytes_atomic(target, image.getvalue())
        return target

    def index(self) -> PartsIndex:
        """Every part's stored and failed images, in part order (a later part wins)."""
        index = PartsIndex()
        for part in self.files():
            with h5py.File(part, "r") as f:
                for row, key in enumerate(_keys(f)):
                    index.sources[key] = (part, row)
                    index.failed.pop(key, None)
                for key, error in zip(_keys(f["failed"]), f["failed/errors"].asstr()[:].tolist()):
                    index.failed[key] = error
                    index.sources.pop(key, None)
        return index

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
