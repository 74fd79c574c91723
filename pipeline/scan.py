"""Finding the images of a data root and assigning train/val/test splits.

Only the standard library and numpy: an extraction that turns out to be up to date never
has to import torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import defaults
from .errors import PipeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = defaults.SPLIT_FRACTIONS
# An accuracy on fewer images of a class than this says little about that class (one image
# moves its recall by 10 points or more), so an automatic split that leaves fewer is worth a warning.
MIN_EVAL_PER_CLASS = 10


@dataclass(frozen=True)
class Manifest:
    """The images of a data root: what to extract and how each is labelled.

    ``paths`` are relative to ``root`` with ``/`` separators (or absolute, from a manifest
    table), sorted; ``size`` and ``mtime_ns`` identify each file's content for incremental
    extraction (-1 when the file cannot be stat-ed, e.g. a broken symlink). ``targets`` (N, C)
    uint8 is the multi-hot label matrix of a multi-label set (``labels`` are then -1: a row has
    several), None for one label per image; ``notes`` are lines worth showing the user (e.g.
    ignored manifest columns).
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    split: np.ndarray
    classes: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    given_splits: bool
    targets: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(class_dir: Path) -> list[Path]:
    """Image-named entries below ``class_dir`` (recursively), including ones that are not
    readable files (directories named like images, broken links): those fail at decode time
    and are reported, instead of vanishing silently."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        for name in [d for d in dirnames if _is_image_name(d)]:
            dirnames.remove(name)
            found.append(Path(dirpath, name))
        found.extend(Path(dirpath, f) for f in sorted(filenames) if _is_image_name(f))
    return found


def stat_key(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def stratified_split(
    paths: list[str], labels: np.ndarray, fractions=DEFAULT_SPLIT_FRACTIONS, seed: int = 0
) -> np.ndarray:
    """Assign each path to train/val/test, stratified by label and deterministic.

    Within a class, images are ranked by a seeded hash of their path, so the assignment does
    not depend on scan order and adding a few images moves only images near the boundaries.
    Every class with at least one image keeps at least one training image.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise PipeError("split fractions must be three non-negative numbers summing to 1, got "
                        f"[{', '.join(f'{f:g}' for f in fractions.ravel())}]")
    split = np.empty(len(paths), dtype=object)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        ranked = sorted(idx, key=lambda i: hashlib.sha1(f"{seed}:{paths[i]}".encode(errors="surrogateescape")).digest())
        n = len(ranked)
        n_test = int(round(n * fractions[2]))
        n_val = int(round(n * fractions[1]))
        if n - n_val - n_test < 1:  # keep one training image per class
            n_test = max(0, min(n_test, n - 1))
            n_val = max(0, n - 1 - n_test)
        n_train = n - n_val - n_test
        for rank, i in enumerate(ranked):
            split[i] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return split.astype(str) if len(paths) else np.array([], dtype=str)


def split_strata(targets) -> np.ndarray:
    """One class per row of a multi-hot matrix (N, C) to stratify by: the row's rarest class
    (fewest positives over all rows), so that rare classes are spread over the splits first."""
    targets = np.asarray(targets, dtype=bool)
    frequency = targets.sum(axis=0)
    return np.where(targets, frequency, np.iinfo(np.int64).max).argmin(axis=1).astype(np.int64)


def split_warnings(labels, split, n_classes, fractions=DEFAULT_SPLIT_FRACTIONS,
                   minimum: int = MIN_EVAL_PER_CLASS) -> list[str]:
    """One line for each of val and test whose share of an automatic split holds fewer than
    ``minimum`` images of some class (a split given a fraction of 0 is left alone). ``labels``
    are class indices (N,) or a multi-hot matrix (N, C), whose rows count for each of their
    classes."""
    warnings = []
    labels = np.asarray(labels)
    for name, fraction in (("val", fractions[1]), ("test", fractions[2])):
        here = labels[np.asarray(split) == name]
        counts = here.sum(axis=0) if labels.ndim == 2 else np.bincount(here, minlength=n_classes)
        if fraction > 0 and counts.min() < minimum:
            held = (f"no {name} images" if not counts.any() else
                    f"{len(here)} {name} images, {counts.min()} to {counts.max()} per class")
            warnings.append(
                f"the automatic split left {held} (fewer than {minimum} in {(counts < minimum).sum()} of "
                f"{n_classes} classes): an accuracy measured on so few is noisy; add images or give the split "
                "yourself (train/ val/ test/ folders, or a manifest's split column)")
    return warnings


def scan_image_folder(root, split_fractions=DEFAULT_SPLIT_FRACTIONS, seed: int = 0) -> Manifest:
    """Scan ``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``.

    Class names are the sorted class-folder names (the union across given splits). Without
    given splits, a seeded stratified split is assigned with ``split_fractions``.
    """
    root = Path(root)
    if not root.is_dir():
        raise PipeError(f"data folder {root} does not exist or is not a folder")
    top = _class_dirs(root)
    given = "train" in top and bool({"val", "test"} & set(top))
    groups = [(s, root / s) for s in SPLITS if s in top] if given else [(None, root)]
    classes = sorted({c for _, folder in groups for c in _class_dirs(folder)})
    if not classes:
        raise PipeError(f"{root} has no class sub-folders; expected {root}/<class>/<image> (see README)")
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for split_name, folder in groups:
        for cls in _class_dirs(folder):
            for path in _images_under(folder / cls):
                rows.append((path.relative_to(root).as_posix(), index[cls], split_name, stat_key(path)))
    if not rows:
        raise PipeError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    rows.sort(key=lambda r: r[0])
    paths = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    split = np.array([r[2] for r in rows]) if given else stratified_split(paths, labels, split_fractions, seed)
    return Manifest(
        root=root,
        paths=paths,
        labels=labels,
        split=split.astype(str),
        classes=classes,
        size=np.array([r[3][0] for r in rows], dtype=np.int64),
        mtime_ns=np.array([r[3][1] for r in rows], dtype=np.int64),
        given_splits=given,
    )


def display_path(relative: str) -> str:
    """A path as it can be stored and printed (undecodable bytes escaped)."""
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
