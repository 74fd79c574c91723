"""Finding images, assigning splits, and decoding files into model-ready pixels.

Everything here is pure: the scan returns a :class:`Manifest` of plain values, decoding turns one
file into one ``uint8`` tensor, and failures are returned as reasons instead of raised, so a
corrupt file never stops an extraction.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .errors import PipeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class Manifest:
    """The images of a data root: what to extract and how each is labelled.

    ``paths`` are relative to ``root`` with ``/`` separators, sorted; ``size`` and
    ``mtime_ns`` identify each file's content for incremental extraction (-1 when the file
    cannot be stat-ed, e.g. a broken symlink).
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    split: np.ndarray
    classes: list[str]
    size: np.ndarray
    mtime_ns: np.ndarray
    given_splits: bool

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


def _stat_key(path: Path) -> tuple[int, int]:
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
        raise PipeError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
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
                rows.append((path.relative_to(root).as_posix(), index[cls], split_name, _stat_key(path)))
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit and float grey images are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def open_rgb(path, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` to an upright RGB image (EXIF orientation applied, first GIF frame).

    ``draft_size`` lets a JPEG decode at a reduced DCT scale that is still at least that many
    pixels on its shorter side, which is much faster for photos far larger than the model input.
    """
    with Image.open(path) as image:
        if draft_size and image.format == "JPEG":
            width, height = image.size
            scale = draft_size / min(width, height)
            image.draft("RGB", (max(1, int(width * scale + 1)), max(1, int(height * scale + 1))))
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, centre-crop, normalise: the standard ImageNet eval transform."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> EvalTransform:
        return cls(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]), d["interpolation"])

    def with_size(self, size: int) -> EvalTransform:
        """The same transform for a crop of ``size`` pixels, keeping the resize/crop ratio."""
        return EvalTransform(int(round(size * self.resize / self.crop)), size, self.mean, self.std, self.interpolation)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, crop, crop) uint8 tensor (resized with antialiasing, centre-cropped)."""
        image = TF.resize(image, self.resize, interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.pil_to_tensor(TF.center_crop(image, [self.crop, self.crop]))

    def normalize(self, batch: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> normalised float, on whatever device ``batch`` is on."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
        return (batch.to(dtype) - mean) / std


def decode_failure_reason(path: Path, relative: str) -> str | None:
    """A reason to skip ``path`` before decoding, or None: names that cannot be stored as
    UTF-8 and entries that are not regular readable files get a clear message."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8; rename the file"
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    if path.is_dir():
        return "is a directory, not an image file"
    return None


class ImageFiles(torch.utils.data.Dataset):
    """Dataset of ``(index, pixels, error)``: decoding happens in DataLoader workers, and a file
    that cannot be decoded yields zeros and its error message instead of raising."""

    def __init__(self, root, relative_paths: list[str], transform: EvalTransform, draft: bool = True):
        self.root = Path(root)
        self.paths = relative_paths
        self.transform = transform
        self.draft = draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        reason = decode_failure_reason(path, self.paths[i])
        if reason is None:
            try:
                image = open_rgb(path, self.transform.resize if self.draft else None)
                return i, self.transform.pixels(image), ""
            except Exception as exc:  # any decoder failure is a per-file skip, never fatal
                message = str(exc).replace(f" '{path}'", "").replace(str(path), "the file")
                reason = f"{type(exc).__name__}: {message}"
        return i, torch.zeros(3, self.transform.crop, self.transform.crop, dtype=torch.uint8), reason


def display_path(relative: str) -> str:
    """A path as it can be stored and printed (undecodable bytes escaped)."""
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
