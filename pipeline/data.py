"""Decoding image files into model-ready pixels.

Decoding turns one file into one ``uint8`` tensor, and failures are returned as reasons
instead of raised, so a corrupt file never stops an extraction. Finding the files is
:mod:`pipeline.scan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


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
