"""One extraction's view of its output file: the writer lock, the check against the previous
file, resumable parts, and the commit that merges everything into a new feature file.

HDF5 is not journalled, so a feature file is never modified in place: an extraction appends
part files (:mod:`.parts`), and when the run completes, the previous file's reusable rows and
the parts are merged into a new file that atomically replaces the old one. Killing the process
at any instant leaves the previous complete file untouched plus whole parts that the next run
resumes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import PipeError
from .feature_file import FeatureSet, FileRows, Key, Rows, combine_extraction, read_features, write_feature_file
from .files import lock_output
from .parts import PartsFolder, PartsIndex


def _flat(identity: dict) -> dict:
    """``{"transform": {"crop": 32}}`` -> ``{"transform.crop": 32}``: one level, enough for an identity."""
    flat = {}
    for key, value in identity.items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _differences(old: dict, new: dict) -> str:
    """What sets two feature identities apart, e.g. ``decode: full in the file, default now``."""
    old, new = _flat(old), _flat(new)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k, 'default')} in the file, {new.get(k, 'default')} now" for k in keys)


@dataclass
class CommitResult:
    """What :meth:`ExtractionCache.commit` did: whether it wrote a new file (False: the previous
    one already held exactly these rows), and the images recorded as failed, with reasons."""

    written: bool
    failed: list[tuple[str, str]] = field(default_factory=list)


class ExtractionCache:
    """One extraction's view of an output file: lock, resumable parts, atomic commit.

    The leader (the only process of a plain run; rank 0 under torchrun) calls
    :meth:`acquire`, which takes an exclusive ``fcntl`` lock on ``<out>.lock`` so a second
    writer fails at once (the OS releases it even on ``kill -9``), checks the previous file and
    prepares the parts folder; other ranks then :meth:`attach`. Each writer names its parts
    with its ``writer`` number, so ranks never collide.
    """

    def __init__(self, out, identity: dict, fingerprint: str, dtype: str, overwrite: bool = False,
                 writer: int = 0):
        self.out = Path(out)
        self.parts = PartsFolder(self.out)
        self.identity = identity  # how the features are made; fingerprint is its hash
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.overwrite = overwrite
        self.writer = writer
        self._lock_fd = None
        self._next_part = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def acquire(self) -> ExtractionCache:
        self._lock_fd = lock_output(self.out)
        old = self.previous
        if old is not None and old.fingerprint != self.fingerprint:
            raise PipeError(
                f"{self.out} holds features made another way ({_differences(old.attrs.get('identity', {}), self.identity)}; "
                f"fingerprint {old.fingerprint}, now {self.fingerprint}); use --out for a new file or --overwrite "
                "to replace it")
        self.parts.prepare(self.fingerprint, self.overwrite)
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):  # a commit killed mid-write
            stale.unlink()
        return self.attach()

    def attach(self) -> ExtractionCache:
        """Join a parts folder the leader prepared: continue this writer's part numbering."""
        self._next_part = self.parts.next_number(self.writer)
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @cached_property
    def previous(self) -> FeatureSet | None:
        """The output file's metadata (None with ``overwrite`` or no file), read once: the
        file only changes when :meth:`commit` replaces it."""
        if self.overwrite or not self.out.exists():
            return None
        return read_features(self.out, with_features=False, checked=False)  # commit rewrites the labels

    # -- what is already done ----------------------------------------------------------------
    def _index(self) -> PartsIndex:
        """Where every image's result is: the previous file's rows, overridden by the parts.
        The previous file's failures are not carried over: they are retried on every run
        (cheap, and a fixed permission or file then just works)."""
        parts = self.parts.index()
        old = self.previous
        if old is None:
            return parts
        keys = zip(old.paths.tolist(), old.size.tolist(), old.mtime_ns.tolist())
        sources = {key: (self.out, row) for row, key in enumerate(keys) if key not in parts.failed}
        return PartsIndex({**sources, **parts.sources}, parts.failed)

    def done_keys(self) -> set[Key]:
        """Images whose features are already stored, in the previous file or in parts of an
        interrupted run, keyed by (path, size, mtime_ns). Failed images are not "done"."""
        return set(self._index().sources)

    # -- writing -----------------------------------------------------------------------------
    def _io_error(self, exc: OSError, target: Path) -> PipeError:
        return PipeError(f"cannot write {target} ({exc}); is the disk full? Progress so far is kept in "
                         f"{self.parts.path}: free some space and re-run the same command to resume")

    def write_part(self, done: Rows, features: np.ndarray, failed: Rows, errors: list[str]) -> None:
        """Commit one batch of results as a new part file (all or nothing)."""
        try:
            self.parts.write(self.writer, self._next_part, done, features.astype(self.dtype, copy=False), failed,
                             errors)
        except OSError as exc:
            raise self._io_error(exc, self.parts.path) from None
        self._next_part += 1

    def commit(self, rows: Rows, labels: np.ndarray, split: np.ndarray, attrs: dict,
               targets: np.ndarray | None = None) -> CommitResult:
        """Merge reusable rows of the previous file and all parts into a new feature file for
        exactly the images in ``rows`` (in that order), atomically replacing ``out``; the
        labels, splits and ``targets`` (multi-label files) are the given ones, so a relabelled
        set only rewrites the file. Writes nothing when the result would equal the previous file."""
        index = self._index()
        stored, sources, failed = [], [], []
        for i, key in enumerate(rows.keys()):
            if key in index.sources:
                stored.append(i)
                sources.append(index.sources[key])
            elif key in index.failed:
                failed.append((i, index.failed[key]))
            else:
                raise RuntimeError(f"no features for {key[0]}: extraction did not finish")  # a bug, not input
        keep = np.array(stored, dtype=np.int64)
        new = FileRows([rows.paths[i] for i in keep], rows.size[keep], rows.mtime_ns[keep], labels[keep],
                       split[keep], attrs["classes"], [rows.paths[i] for i, _ in failed], [e for _, e in failed],
                       targets=None if targets is None else targets[keep])
        result = CommitResult(written=True, failed=list(zip(new.failed_paths, new.failed_errors)))
        old = self.previous
        if old is not None and old.attrs.get("request") == attrs.get("request") and old.same_as(new):
            self.parts.remove()  # the parts can then only hold retried failures
            result.written = False
            return result
        if old is not None:  # its rows are reused: their extraction counts too
            attrs = {**attrs, "extraction": combine_extraction([old.attrs.get("extraction"), attrs.get("extraction")])}
        try:
            write_feature_file(self.out, new, sources, attrs, self.dtype)
        except OSError as exc:
            raise self._io_error(exc, self.out) from None
        self.parts.remove()
        return result
