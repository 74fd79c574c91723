"""The HDF5 feature file: its schema, reading it, and writing it crash-safely.

This is the only module that touches h5py. HDF5 is not journalled, so a feature file is never
modified in place: an extraction appends small *part* files (each written to a temporary name,
fsync-ed and renamed, so a part either exists whole or not at all) into ``<out>.parts/``, and
when the run completes, the previous file's reusable rows and the parts are merged into a new
file that atomically replaces the old one. Killing the process at any instant leaves the
previous complete file untouched plus whole parts that the next run resumes from.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import resource
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from .errors import PipeError

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")
_STR = h5py.string_dtype("utf-8")
_MERGE_ROWS = 8192  # rows copied per step when merging: bounds memory on huge caches


@dataclass
class FeatureSet:
    """A feature file read into memory (``features`` as float32 unless ``with_features=False``)."""

    path: Path
    features: np.ndarray | None
    labels: np.ndarray
    paths: np.ndarray
    split: np.ndarray
    size: np.ndarray
    mtime_ns: np.ndarray
    classes: list[str]
    attrs: dict
    failed_paths: list[str] = field(default_factory=list)
    failed_errors: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    def __len__(self) -> int:
        return len(self.labels)

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.split == s).sum()) for s in ("train", "val", "test")}

    def row_indices(self, split: str) -> np.ndarray:
        """Sorted row numbers of one split; PipeError if it has no samples."""
        rows = np.flatnonzero(self.split == split)
        if not len(rows):
            counts = ", ".join(f"{k}={v}" for k, v in self.split_counts().items())
            raise PipeError(f"split {split!r} of {self.path} has no samples ({counts})")
        return rows

    def rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split; PipeError if it has no samples."""
        rows = self.row_indices(split)
        return self.features[rows], self.labels[rows]


def _attr(f: h5py.File, name: str):
    value = f.attrs[name]
    return value.decode() if isinstance(value, bytes) else value


def read_features(path, with_features: bool = True) -> FeatureSet:
    """Read and validate a feature file; a missing, truncated or foreign file is a PipeError."""
    path = Path(path)
    if not path.is_file():
        raise PipeError(f"feature file {path} does not exist; run `pipe extract` first")
    try:
        with h5py.File(path, "r") as f:
            if "schema_version" not in f.attrs or "features" not in f:
                raise PipeError(f"{path} is an HDF5 file but not a pipe feature file (no schema_version/features)")
            if int(f.attrs["schema_version"]) != SCHEMA_VERSION:
                raise PipeError(f"{path} has feature schema {f.attrs['schema_version']}, this pipe reads "
                                f"{SCHEMA_VERSION}; re-run pipe extract with --overwrite")
            attrs = {k: _attr(f, k) for k in f.attrs}
            for key in ("classes", "transform", "identity", "request"):
                if key in attrs:
                    attrs[key] = json.loads(attrs[key])
            failed = f["failed"]
            return FeatureSet(
                path=path,
                features=f["features"][:].astype(np.float32) if with_features else None,
                labels=f["labels"][:],
                paths=f["paths"].asstr()[:],
                split=f["split"].asstr()[:],
                size=f["file_size"][:],
                mtime_ns=f["file_mtime_ns"][:],
                classes=attrs["classes"],
                attrs=attrs,
                failed_paths=list(failed["paths"].asstr()[:]),
                failed_errors=list(failed["errors"].asstr()[:]),
            )
    except PipeError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise PipeError(f"{path} is not a readable pipe feature file ({type(exc).__name__}: {exc}); "
                        "re-run pipe extract with --overwrite") from None


@contextmanager
def feature_matrix(path):
    """The ``features`` dataset of a feature file, open for lazy row reads (h5py.Dataset),
    for heads trained on features larger than memory."""
    with h5py.File(path, "r") as f:
        yield f["features"]


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


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _write_bytes_atomic(target: Path, data: bytes) -> None:
    tmp = _tmp_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _atomic_h5(target: Path):
    """Yield an h5py.File at a temporary name, then publish it onto ``target``; on failure
    the temporary file is removed and ``target`` is untouched."""
    tmp = _tmp_name(target)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _writable_bytes(folder: Path) -> float:
    """Bytes one file may still grow to in ``folder``: free disk space, and the process's
    file-size limit (``ulimit -f``) where one is set."""
    limit = shutil.disk_usage(folder).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return min(limit, soft) if soft != resource.RLIM_INFINITY else limit


def _write_strings(group, name: str, values) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=_STR)


def _write_failed(group, paths, errors, size=None, mtime_ns=None) -> None:
    """The ``failed`` group; parts also keep each file's (size, mtime) to resume by."""
    _write_strings(group, "paths", paths)
    _write_strings(group, "errors", errors)
    if size is not None:
        group.create_dataset("file_size", data=np.asarray(size, dtype=np.int64))
        group.create_dataset("file_mtime_ns", data=np.asarray(mtime_ns, dtype=np.int64))


def _feature_dim(sources: list[tuple[Path, int]]) -> int:
    """Feature width, read from the first source (0 when no image has features)."""
    if not sources:
        return 0
    with h5py.File(sources[0][0], "r") as f:
        return f["features"].shape[1]


def _estimated_size(n: int, dim: int, itemsize: int, new: dict) -> int:
    """An upper bound on a feature file's size: the feature matrix, per-row metadata and
    strings (variable-length storage overhead included), and a fixed allowance for HDF5."""
    strings = sum(len(p.encode()) + 32 for p in new["paths"] + new["failed_paths"])
    strings += sum(len(e.encode()) + 32 for e in new["failed_errors"])
    return n * dim * itemsize + n * (3 * 8 + 48) + strings + 256 * 1024


@dataclass
class Rows:
    """Images to store, each identified by (path, size, mtime_ns); ``source_paths`` are the
    names to open (they differ from ``paths`` only for names that are not valid UTF-8)."""

    paths: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    source_paths: list[str] | None = None

    def keys(self):
        return zip(self.paths, self.size.tolist(), self.mtime_ns.tolist())


def lock_output(out: Path) -> int:
    """Take the exclusive writer lock of ``out`` (``<out>.lock``), or fail at once."""
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


class ExtractionCache:
    """One extraction's view of an output file: lock, resumable parts, atomic commit.

    The leader (the only process of a plain run; rank 0 under torchrun) calls
    :meth:`acquire`, which takes an exclusive ``fcntl`` lock on ``<out>.lock`` so a second
    writer fails at once (the OS releases it even on ``kill -9``), checks the previous file and
    prepares the parts folder; other ranks then :meth:`attach`. Each writer names its parts
    with its ``writer`` number, so ranks never collide. As a context manager it acquires.
    """

    def __init__(self, out, fingerprint: str, dtype: str, overwrite: bool = False, writer: int = 0):
        self.out = Path(out)
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.overwrite = overwrite
        self.writer = writer
        self.failed_in_output: list[tuple[str, str]] = []  # set by commit
        self._lock_fd = None
        self._next_part = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def acquire(self) -> ExtractionCache:
        self._lock_fd = lock_output(self.out)
        self._check_previous()
        self._open_parts()
        return self.attach()

    def attach(self) -> ExtractionCache:
        """Join a parts folder the leader prepared: continue this writer's part numbering."""
        mine = [int(p.stem.rsplit("-", 1)[1]) for p in self.parts_dir.glob(f"part-r{self.writer}-*.h5")]
        self._next_part = max(mine, default=-1) + 1
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ExtractionCache:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @cached_property
    def previous(self) -> FeatureSet | None:
        """The output file's metadata (None with ``overwrite`` or no file), read once: the
        file only changes when :meth:`commit` replaces it."""
        if self.overwrite or not self.out.exists():
            return None
        return read_features(self.out, with_features=False)

    def _check_previous(self) -> None:
        old = self.previous
        if old is not None and old.fingerprint != self.fingerprint:
            raise PipeError(
                f"{self.out} holds features of another model/weights/transform (fingerprint "
                f"{old.fingerprint} = {old.attrs['model']} {old.attrs['weights']}, now {self.fingerprint}); "
                "use --out for a new file or --overwrite to replace it")

    def _open_parts(self) -> None:
        meta_path = self.parts_dir / "meta.json"
        meta = {"fingerprint": self.fingerprint}
        if self.parts_dir.exists():
            try:
                previous = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != meta:
                # parts of other settings are kept for their own command to finish, unless there are none
                if not self.overwrite and previous is not None and self._part_files():
                    raise PipeError(f"{self.parts_dir} holds an unfinished extraction with other settings "
                                    f"(fingerprint {previous.get('fingerprint')}); re-run it with those "
                                    "settings to finish it, or pass --overwrite to discard it")
                shutil.rmtree(self.parts_dir)
        if not self.parts_dir.exists():
            self.parts_dir.mkdir(parents=True)
            tmp = self.parts_dir / ".meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, meta_path)
        for stale in self.parts_dir.glob(".*.tmp-*"):  # half-written parts of a killed run
            stale.unlink()

    def _part_files(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.h5"))

    # -- what is already done ----------------------------------------------------------------
    def done_keys(self) -> set[tuple[str, int, int]]:
        """Images whose features are already stored, in the previous file or in parts of an
        interrupted run, keyed by (path, size, mtime_ns). Failed images are not "done": they
        are retried on every run (cheap, and a fixed permission or file then just works)."""
        return set(self._index_sources()[0])

    # -- writing -----------------------------------------------------------------------------
    def _io_error(self, exc: OSError, target: Path) -> PipeError:
        return PipeError(f"cannot write {target} ({exc}); is the disk full? Progress so far is kept in "
                         f"{self.parts_dir}: free some space and re-run the same command to resume")

    def write_part(self, done: Rows, features: np.ndarray, failed: Rows, errors: list[str]) -> None:
        """Commit one batch of results as a new part file (all or nothing)."""
        target = self.parts_dir / f"part-r{self.writer}-{self._next_part:06d}.h5"
        image = io.BytesIO()  # built in memory: a full disk then fails in plain file I/O, cleanly
        with h5py.File(image, "w") as f:
            _write_strings(f, "paths", done.paths)
            f.create_dataset("file_size", data=done.size)
            f.create_dataset("file_mtime_ns", data=done.mtime_ns)
            f.create_dataset("features", data=features.astype(self.dtype, copy=False))
            _write_failed(f.create_group("failed"), failed.paths, errors, failed.size, failed.mtime_ns)
        try:
            _write_bytes_atomic(target, image.getvalue())
        except OSError as exc:
            raise self._io_error(exc, target) from None
        self._next_part += 1

    def commit(self, rows: Rows, labels: np.ndarray, split: np.ndarray, attrs: dict) -> bool:
        """Merge reusable rows of the previous file and all parts into a new feature file for
        exactly the images in ``rows`` (in that order), atomically replacing ``out``. Returns
        False, writing nothing, when the result would equal the previous file."""
        sources, failed = self._index_sources()
        located, failed_rows = [], []
        for i, key in enumerate(rows.keys()):
            if key in sources:
                located.append((i, sources[key]))
            elif key in failed:
                failed_rows.append((i, failed[key]))
            else:
                raise RuntimeError(f"no features for {key[0]}: extraction did not finish")  # a bug, not input
        keep = np.array([i for i, _ in located], dtype=np.int64)
        failed_idx = [i for i, _ in failed_rows]
        new = {
            "paths": [rows.paths[i] for i in keep], "size": rows.size[keep], "mtime_ns": rows.mtime_ns[keep],
            "labels": labels[keep], "split": split[keep],
            "failed_paths": [rows.paths[i] for i in failed_idx], "failed_errors": [e for _, e in failed_rows],
            "classes": attrs["classes"],
        }
        self.failed_in_output = list(zip(new["failed_paths"], new["failed_errors"]))
        if self._equals_previous(new, attrs):  # parts can then only hold retried failures
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return False
        try:
            write_feature_file(self.out, new, [src for _, src in located], attrs, self.dtype)
        except OSError as exc:
            raise self._io_error(exc, self.out) from None
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return True

    def _index_sources(self):
        """(key -> (file, row) for stored features, key -> error for failed images); later
        parts win over earlier ones and over the previous file."""
        sources, failed = {}, {}
        old = self.previous  # its failures are retried, so never reused
        if old is not None:
            keys = zip(old.paths.tolist(), old.size.tolist(), old.mtime_ns.tolist())
            sources.update((key, (self.out, row)) for row, key in enumerate(keys))
        for part in self._part_files():
            with h5py.File(part, "r") as f:
                keys = zip(f["paths"].asstr()[:].tolist(), f["file_size"][:].tolist(), f["file_mtime_ns"][:].tolist())
                for row, key in enumerate(keys):
                    sources[key] = (part, row)
                    failed.pop(key, None)
                g = f["failed"]
                fkeys = zip(g["paths"].asstr()[:].tolist(), g["file_size"][:].tolist(), g["file_mtime_ns"][:].tolist())
                for key, error in zip(fkeys, g["errors"].asstr()[:].tolist()):
                    failed[key] = error
                    sources.pop(key, None)
        return sources, failed

    def _equals_previous(self, new: dict, attrs: dict) -> bool:
        old = self.previous
        return old is not None and old.attrs.get("request") == attrs.get("request") and _same_content(old, new)


def _same_content(old: FeatureSet, new: dict) -> bool:
    """Whether a stored file already holds exactly the rows described by ``new``."""
    return (old.paths.tolist() == list(new["paths"]) and np.array_equal(old.size, new["size"])
            and np.array_equal(old.mtime_ns, new["mtime_ns"]) and np.array_equal(old.labels, new["labels"])
            and old.split.tolist() == list(new["split"]) and old.classes == new["classes"]
            and old.failed_paths == new["failed_paths"] and old.failed_errors == new["failed_errors"])


def is_up_to_date(out, request: dict, rows: Rows, labels: np.ndarray, split: np.ndarray, classes: list[str]) -> bool:
    """True when ``out`` was made by the same ``request`` (the extraction's settings) for
    exactly these images with no failures and no unfinished parts: nothing to do. Cheap:
    metadata only, no lock (the file is only ever replaced atomically)."""
    out = Path(out)
    if not out.is_file() or out.with_name(out.name + ".parts").exists():
        return False
    try:
        old = read_features(out, with_features=False)
    except PipeError:
        return False
    new = {"paths": rows.paths, "size": rows.size, "mtime_ns": rows.mtime_ns, "labels": labels, "split": split,
           "classes": classes, "failed_paths": [], "failed_errors": []}
    return old.attrs.get("request") == request and _same_content(old, new)


def write_feature_file(target: Path, new: dict, sources: list[tuple[Path, int]], attrs: dict, dtype: str) -> None:
    """Write a feature file atomically: metadata from ``new`` (paths, size, mtime_ns, labels,
    split, failed_paths, failed_errors), feature rows copied from ``sources`` ((file, row)
    per output row) a block at a time. Any failure is an OSError and leaves ``target`` as
    it was; HDF5 cannot fail a write cleanly (it may crash the process), so room is checked
    first."""
    n, dim = len(sources), _feature_dim(sources)
    needed = _estimated_size(n, dim, np.dtype(dtype).itemsize, new)
    if needed > _writable_bytes(target.parent):
        raise OSError(f"about {needed / 1e6:.1f} MB needed, not that much room")
    try:
        with _atomic_h5(target) as f:
            _write_rows(f, new, sources, attrs, dtype, n, dim)
    except RuntimeError as exc:  # h5py reports some I/O failures this way
        raise OSError(str(exc)) from None


def _write_rows(f: h5py.File, new: dict, sources, attrs: dict, dtype: str, n: int, dim: int) -> None:
    """The body of :func:`write_feature_file`, into an open file."""
    features = f.create_dataset("features", shape=(n, dim), dtype=dtype,
                                chunks=(min(n, 256), dim) if n else None)
    for start in range(0, n, _MERGE_ROWS):
        chunk = sources[start:start + _MERGE_ROWS]
        block = np.empty((len(chunk), dim), dtype=dtype)
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for pos, (file, row) in enumerate(chunk):
            by_file.setdefault(file, []).append((row, pos))
        for file, pairs in by_file.items():
            pairs.sort()
            src_rows = np.array([r for r, _ in pairs])
            with h5py.File(file, "r") as src:
                lo, hi = src_rows[0], src_rows[-1] + 1
                block[[p for _, p in pairs]] = src["features"][lo:hi][src_rows - lo]
        features[start:start + len(chunk)] = block
    f.create_dataset("labels", data=np.asarray(new["labels"], dtype=np.int64))
    _write_strings(f, "paths", new["paths"])
    _write_strings(f, "split", new["split"])
    f.create_dataset("file_size", data=np.asarray(new["size"], dtype=np.int64))
    f.create_dataset("file_mtime_ns", data=np.asarray(new["mtime_ns"], dtype=np.int64))
    _write_failed(f.create_group("failed"), new["failed_paths"], new["failed_errors"])
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["feature_dim"] = dim
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def is_feature_file(path) -> bool:
    """True when ``path`` is an HDF5 file (whether or not a valid pipe one)."""
    return h5py.is_hdf5(path)


_SHARD_INVARIANTS = ("fingerprint", "classes", "split_seed", "split_fractions", "given_splits", "dtype")


def merge_feature_files(inputs, out, overwrite: bool = False) -> FeatureSet:
    """Merge shard files (``pipe extract --shard I/N``) into one feature file whose rows are
    ordered by path, exactly as a single run over the whole folder would write them.

    Shards must come from the same settings (fingerprint, classes, split); an image in two
    shards, or an existing ``out`` without ``overwrite``, is an error.
    """
    out = Path(out)
    shards = [read_features(p, with_features=False) for p in inputs]
    if not shards:
        raise PipeError("pipe merge needs at least one shard file")
    first = shards[0]
    for shard in shards[1:]:
        for key in _SHARD_INVARIANTS:
            if shard.attrs.get(key) != first.attrs.get(key):
                raise PipeError(f"cannot merge {shard.path} with {first.path}: their {key} differ "
                                f"({shard.attrs.get(key)} vs {first.attrs.get(key)})")
    if out.exists() and not overwrite and out.resolve() not in {s.path.resolve() for s in shards}:
        raise PipeError(f"{out} exists; pass --overwrite to replace it")
    rows = sorted((path, i, row) for i, s in enumerate(shards) for row, path in enumerate(s.paths.tolist()))
    for (a, i, _), (b, j, _) in zip(rows, rows[1:]):
        if a == b:
            raise PipeError(f"{a} is in both {shards[i].path} and {shards[j].path}: shards must not overlap")
    pick = lambda field: np.array([getattr(shards[i], field)[row] for _, i, row in rows])  # noqa: E731
    failed = sorted((p, e) for s in shards for p, e in zip(s.failed_paths, s.failed_errors))
    new = {"paths": [p for p, _, _ in rows], "size": pick("size"), "mtime_ns": pick("mtime_ns"),
           "labels": pick("labels"), "split": pick("split").astype(str),
           "failed_paths": [p for p, _ in failed], "failed_errors": [e for _, e in failed]}
    attrs = {k: v for k, v in first.attrs.items() if k not in ("schema_version", "feature_dim", "shard")}
    fd = lock_output(out)
    try:
        write_feature_file(out, new, [(shards[i].path, row) for _, i, row in rows], attrs, first.attrs["dtype"])
    except OSError as exc:
        raise PipeError(f"cannot write {out} ({exc}); the shard files are untouched") from None
    finally:
        os.close(fd)
    return read_features(out, with_features=False)
