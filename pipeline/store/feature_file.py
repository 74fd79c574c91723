"""The feature file's HDF5 schema: reading it, writing one (atomically), and merging shards.

A feature file is never modified in place: a new one is written to a temporary name and renamed
over the old (see :mod:`.files`); the extraction cache (:mod:`.cache`) decides what goes in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import PipeError
from ..rows import read_rows_chunked
from .files import atomic_h5, lock_output, writable_bytes

SCHEMA_VERSION = 1
MULTILABEL = "multilabel"  # the ``task`` attribute of a file with ``targets``
FEATURE_DTYPES = ("float16", "float32")
LEGACY_PRECISION = "float32"  # the model precision of files written before pipe recorded it
_STR = h5py.string_dtype("utf-8")
BACKBONE_ATTRS = ("model", "weights", "weights_id", "transform", "identity", "fingerprint", "precision")
_MERGE_ROWS = 8192  # rows copied per step when merging: bounds memory on huge caches


Key = tuple[str, int, int]  # an image as extraction knows it: (path, size, mtime_ns)


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


@dataclass
class FileRows:
    """Everything a feature file holds per image except the features: the rows in file order,
    and the images that could not be read. ``targets`` (N, C) uint8 is the multi-hot label
    matrix of a multi-label file (whose ``labels`` are -1), None otherwise."""

    paths: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    classes: list[str]
    failed_paths: list[str]
    failed_errors: list[str]
    targets: np.ndarray | None = field(default=None, kw_only=True)

    def same_as(self, other: FileRows) -> bool:
        """Whether ``other`` describes exactly the same rows and failures."""
        return all(np.array_equal(np.asarray(getattr(self, f.name)), np.asarray(getattr(other, f.name)))
                   for f in dataclasses.fields(FileRows))


@dataclass
class FeatureSet(FileRows):
    """A feature file read into memory (``features`` as float32 unless ``with_features=False``;
    then :meth:`rows` and :meth:`feature_rows` read just the rows asked for)."""

    path: Path
    features: np.ndarray | None
    attrs: dict

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def backbone(self) -> dict:
        """The attributes that describe the backbone the rows were made with (:data:`BACKBONE_ATTRS`):
        what a run that extracts no image writes again, without resolving the model."""
        return {key: self.attrs[key] for key in BACKBONE_ATTRS if key in self.attrs}

    @property
    def precision(self) -> str:
        """The precision the backbone ran at (:mod:`pipeline.forward`)."""
        return self.attrs.get("precision", LEGACY_PRECISION)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        return self.targets is not None

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
        """(features, labels) of one split; PipeError if it has no samples. Read without its
        features, only that split's rows are read from the file (:meth:`feature_rows`)."""
        rows = self.row_indices(split)
        return self.feature_rows(rows), self.labels[rows]

    def feature_rows(self, rows) -> np.ndarray:
        """The features of ``rows`` (sorted row numbers): from memory when the file was read
        with its features (float32), else read from the file a chunk at a time, at the precision
        stored there (float16 features stay float16: convert them chunk by chunk)."""
        if self.features is not None:
            return self.features[rows]
        try:
            with feature_matrix(self.path) as matrix:
                return read_rows_chunked(matrix, rows)
        except (OSError, KeyError) as exc:
            raise PipeError(f"cannot read the features of {self.path} ({exc}); re-run pipe extract") from None

    def rows_digest(self) -> str:
        """A digest of what the file says about its images besides their features: classes,
        and each row's path, file size and modification time, label and split. What was
        computed from the rows (a head's out-of-fold probabilities) still describes them while
        this is unchanged. The path, size and time columns are read from the file when they
        were not read with it."""
        paths, size, mtime_ns = self.paths, self.size, self.mtime_ns
        if paths is None:
            with h5py.File(self.path, "r") as f:
                paths, size, mtime_ns = f["paths"].asstr()[:], f["file_size"][:], f["file_mtime_ns"][:]
        digest = hashlib.blake2b(digest_size=16)
        for strings in (self.classes, paths, self.split):
            digest.update("\0".join(strings).encode() + b"\1")
        for column in (size, mtime_ns, self.labels):
            digest.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def X(self, split: str | None = None) -> np.ndarray:
        """The features (n_images, feature_dim) float32 of one split ("train", "val",
        "test"), or of every image (``split`` None), in file order."""
        if self.features is None:
            raise PipeError(f"{self.path} was read without its features; read it with read_features({str(self.path)!r})")
        return self.features if split is None else self.features[self.row_indices(split)]

    def y(self, split: str | None = None) -> np.ndarray:
        """The labels of one split (or of every image), rows matching :meth:`X`: class
        indices into ``classes``, or for a multi-label file the multi-hot targets
        (n_images, n_classes) uint8."""
        labels = self.targets if self.multilabel else self.labels
        return labels if split is None else labels[self.row_indices(split)]


def _attr(f: h5py.File, name: str):
    value = f.attrs[name]
    return value.decode() if isinstance(value, bytes) else value


def check_labels(path, labels: np.ndarray, classes: list[str], targets: np.ndarray | None) -> None:
    """Raise :class:`PipeError` naming ``path`` and the first bad rows when a label lies outside
    the class list (a damaged or hand-edited file): a head must never learn a class that has no
    name. A multi-label file's ``targets`` must have one 0/1 column per class instead."""
    if targets is not None:
        if targets.ndim != 2 or targets.shape != (len(labels), len(classes)) or targets.max(initial=0) > 1:
            raise PipeError(f"{path} has multi-label targets of shape {targets.shape} for {len(labels)} images and "
                            f"{len(classes)} classes, or values other than 0 and 1; the file is damaged or was edited: "
                            "re-run pipe extract --overwrite")
        return
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        shown = ", ".join(f"row {row}: {labels[row]}" for row in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise PipeError(f"{path} has {len(bad)} label(s) outside its {len(classes)} classes (0 to "
                        f"{len(classes) - 1}) ({shown}); the file is damaged or was edited: re-run pipe extract, "
                        "which rewrites the labels and keeps the features")


def read_features(path, with_features: bool = True, checked: bool = True, *, with_paths: bool = True) -> FeatureSet:
    """Read and validate a feature file; a missing, truncated or foreign file is a PipeError,
    and so (unless ``checked`` is False, for the extraction that rewrites them) is a label
    outside the class list (:func:`check_labels`). Without ``with_paths``, the images' ``paths``,
    ``size`` and ``mtime_ns`` are left None: commands that only count or score rows skip
    reading a string per image."""
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
            for key in ("classes", "transform", "identity", "request", "extraction"):
                if key in attrs:
                    attrs[key] = json.loads(attrs[key])
            failed = f["failed"]
            features = FeatureSet(
                path=path,
                features=f["features"][:].astype(np.float32) if with_features else None,
                labels=f["labels"][:],
                paths=f["paths"].asstr()[:] if with_paths else None,
                split=f["split"].asstr()[:],
                size=f["file_size"][:] if with_paths else None,
                mtime_ns=f["file_mtime_ns"][:] if with_paths else None,
                classes=attrs["classes"],
                attrs=attrs,
                failed_paths=list(failed["paths"].asstr()[:]),
                failed_errors=list(failed["errors"].asstr()[:]),
                targets=f["targets"][:] if "targets" in f else None,
            )
    except PipeError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise PipeError(f"{path} is not a readable pipe feature file ({type(exc).__name__}: {exc}); "
                        "re-run pipe extract with --overwrite") from None
    if checked:
        check_labels(path, features.labels, features.classes, features.targets)
    return features


@contextmanager
def feature_matrix(path):
    """The ``features`` dataset of a feature file, open for lazy row reads (h5py.Dataset),
    for heads trained on features larger than memory."""
    with h5py.File(path, "r") as f:
        yield f["features"]


def extraction_record(images: int, seconds: float, device: str) -> dict | None:
    """The ``extraction`` attribute: ``images`` run through the backbone in ``seconds`` of
    extraction loop (decode + forward, summed over processes) on ``device`` ("cpu", "cuda";
    "cpu+cuda" after runs on both). None when no image was extracted."""
    return {"images": images, "seconds": round(seconds, 3), "device": device} if images else None


def combine_extraction(records) -> dict | None:
    """One ``extraction`` record for a file whose images several runs or shards extracted:
    images and seconds summed, devices joined (None when none of them was recorded)."""
    records = [r for r in records if r]
    if not records:
        return None
    devices = "+".join(sorted({d for r in records for d in r["device"].split("+")}))
    return extraction_record(sum(r["images"] for r in records), sum(r["seconds"] for r in records), devices)


def images_per_second(attrs: dict) -> float | None:
    """Extraction throughput recorded in a feature file's attributes; None for files written
    before it was recorded."""
    record = attrs.get("extraction")
    return record["images"] / record["seconds"] if record and record["seconds"] > 0 else None


def write_strings(group, name: str, values) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=_STR)


def write_failed(group, paths, errors, size=None, mtime_ns=None) -> None:
    """The ``failed`` group; parts also keep each file's (size, mtime) to resume by."""
    write_strings(group, "paths", paths)
    write_strings(group, "errors", errors)
    if size is not None:
        group.create_dataset("file_size", data=np.asarray(size, dtype=np.int64))
        group.create_dataset("file_mtime_ns", data=np.asarray(mtime_ns, dtype=np.int64))


def _feature_dim(sources: list[tuple[Path, int]]) -> int:
    """Feature width, read from the first source (0 when no image has features)."""
    if not sources:
        return 0
    with h5py.File(sources[0][0], "r") as f:
        return f["features"].shape[1]


def _estimated_size(n: int, dim: int, itemsize: int, new: FileRows) -> int:
    """An upper bound on a feature file's size: the feature matrix, per-row metadata and
    strings (variable-length storage overhead included), and a fixed allowance for HDF5."""
    strings = sum(len(p.encode()) + 32 for p in [*new.paths, *new.failed_paths])
    strings += sum(len(e.encode()) + 32 for e in new.failed_errors)
    return n * dim * itemsize + n * (3 * 8 + 48) + strings + 256 * 1024


def made_by(out, request: dict) -> FeatureSet | None:
    """The feature file ``out``, read without its features, when the same ``request`` (the
    extraction's settings) made it and no extraction into it is unfinished; else None. Enough to
    tell that there is nothing to do (:meth:`FeatureSet.same_as` the rows wanted) or only labels
    to rewrite (:attr:`FeatureSet.backbone`). Cheap: metadata only, no lock (the file is only
    ever replaced atomically)."""
    out = Path(out)
    if not out.is_file() or out.with_name(out.name + ".parts").exists():
        return None
    try:
        old = read_features(out, with_features=False, checked=False)  # labels get rewritten anyway
    except PipeError:
        return None
    return old if old.attrs.get("request") == request else None


def stored_precision(out) -> str | None:
    """The precision the feature file ``out`` was made at; None when there is no file yet."""
    return read_features(out, with_features=False, checked=False, with_paths=False).precision if Path(out).exists() else None


def write_feature_file(target: Path, new: FileRows, sources: list[tuple[Path, int]], attrs: dict,
                       dtype: str) -> None:
    """Write a feature file atomically: the rows ``new`` (``classes`` go in ``attrs``), feature
    rows copied from ``sources`` ((file, row) per output row) a block at a time. Any failure is an OSError and leaves ``target`` as
    it was; HDF5 cannot fail a write cleanly (it may crash the process), so room is checked
    first."""
    n, dim = len(sources), _feature_dim(sources)
    needed = _estimated_size(n, dim, np.dtype(dtype).itemsize, new)
    if needed > writable_bytes(target.parent):
        raise OSError(f"about {needed / 1e6:.1f} MB needed, not that much room")
    try:
        with atomic_h5(target) as f:
            _write_rows(f, new, sources, attrs, dtype, n, dim)
    except RuntimeError as exc:  # h5py reports some I/O failures this way
        raise OSError(str(exc)) from None


def _write_rows(f: h5py.File, new: FileRows, sources, attrs: dict, dtype: str, n: int, dim: int) -> None:
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
    f.create_dataset("labels", data=np.asarray(new.labels, dtype=np.int64))
    write_strings(f, "paths", new.paths)
    write_strings(f, "split", new.split)
    f.create_dataset("file_size", data=np.asarray(new.size, dtype=np.int64))
    f.create_dataset("file_mtime_ns", data=np.asarray(new.mtime_ns, dtype=np.int64))
    write_failed(f.create_group("failed"), new.failed_paths, new.failed_errors)
    if new.targets is not None:
        f.create_dataset("targets", data=np.asarray(new.targets, dtype=np.uint8).reshape(n, len(new.classes)))
        f.attrs["task"] = MULTILABEL
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["feature_dim"] = dim
    for key, value in attrs.items():
        if value is not None:  # e.g. no extraction record: the attribute is absent
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def is_feature_file(path) -> bool:
    """True when ``path`` is an HDF5 file (whether or not a valid pipe one)."""
    return h5py.is_hdf5(path)


_SHARD_INVARIANTS = ("fingerprint", "classes", "task", "split_seed", "split_fractions", "given_splits", "dtype")


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
    pick = lambda column: np.array([getattr(shards[i], column)[row] for _, i, row in rows])  # noqa: E731
    failed = sorted((p, e) for s in shards for p, e in zip(s.failed_paths, s.failed_errors))
    new = FileRows([p for p, _, _ in rows], pick("size"), pick("mtime_ns"), pick("labels"), pick("split").astype(str),
                   first.classes, [p for p, _ in failed], [e for _, e in failed],
                   targets=pick("targets").reshape(len(rows), len(first.classes)) if first.multilabel else None)
    attrs = {k: v for k, v in first.attrs.items()
             if k not in ("schema_version", "feature_dim", "shard", "task", "extraction")}
    extraction = combine_extraction(s.attrs.get("extraction") for s in shards)
    if extraction:
        attrs["extraction"] = extraction
    fd = lock_output(out)
    try:
        write_feature_file(out, new, [(shards[i].path, row) for _, i, row in rows], attrs, first.attrs["dtype"])
    except OSError as exc:
        raise PipeError(f"cannot write {out} ({exc}); the shard files are untouched") from None
    finally:
        os.close(fd)
    return read_features(out, with_features=False)
