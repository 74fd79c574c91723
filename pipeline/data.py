"""Decoding image files into model-ready pixels, in DataLoader workers.

Decoding turns one file into one ``uint8`` tensor, and failures are returned as reasons
instead of raised, so a corrupt file never stops an extraction. Three ways, one per
:data:`DECODES` value: ``draft`` decodes JPEGs at a reduced DCT scale (PIL), ``full`` at full
size (torchvision's libjpeg-turbo decoder and tensor resizing: the same pixels as PIL's, to
within one level, several times faster), ``device`` only reads JPEG files, whose bytes
:mod:`pipeline.device_decode` decodes a batch at a time on the GPU. Other formats are decoded
by PIL in every case. Finding the files is :mod:`pipeline.scan`.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .allocator import keep_large_buffers
from .cpu_sharing import yield_to_model
from .images import open_rgb

DECODES = ("draft", "full", "device")
JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


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

    def pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """PIL image or (3, H, W) uint8 tensor (on any device) -> (3, crop, crop) uint8 tensor,
        resized with antialiasing and centre-cropped: torchvision's ``Resize`` + ``CenterCrop``,
        pixel for pixel (tests/test_data.py compares them). A PIL image is resized by PIL, as
        torchvision does it, without importing torchvision (with torch._dynamo, 1.8 s of start-up
        in every decoding process); a tensor (decoded on a GPU) by torchvision."""
        if isinstance(image, Image.Image):
            return self._pil_pixels(image)
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        image = TF.resize(image, self.resize, interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.center_crop(image, [self.crop, self.crop])

    def _pil_pixels(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        short, long = sorted((width, height))
        size = (self.resize, int(self.resize * long / short))  # torchvision's rounding: down
        size = size if width <= height else size[::-1]
        if size != image.size:
            image = image.resize(size, Image.Resampling[self.interpolation.upper()])
        left, top = (int(round((side - self.crop) / 2.0)) for side in size)
        pixels = np.asarray(image.crop((left, top, left + self.crop, top + self.crop)))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

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


def decode_jpeg(data: torch.Tensor | list[torch.Tensor], device="cpu"):
    """torchvision's JPEG decoder to RGB, EXIF orientation not applied (see :func:`upright`).
    It is deprecated in favour of TorchCodec, which pipe does not depend on: its warning is not
    for pipe's users."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as decode

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated", category=DeprecationWarning)
        return decode(data, mode=ImageReadMode.RGB, device=device)


# PIL's exif_transpose for each EXIF orientation, as operations on (C, H, W) tensors
_UPRIGHT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1).flip(-2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1).flip(-2),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(C, H, W)`` pixels turned as EXIF ``orientation`` says (1: as they are), on any device:
    what PIL's ``exif_transpose`` does to an image."""
    turn = _UPRIGHT.get(orientation)
    return pixels if turn is None else turn(pixels)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1 to 8) of an encoded image; 1 (upright) when it has none."""
    with Image.open(io.BytesIO(data)) as image:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def _failure(exc: Exception, path: Path) -> str:
    message = str(exc).replace(f" '{path}'", "").replace(str(path), "the file")
    return f"{type(exc).__name__}: {message}"


def decode_pixels(source: Path | bytes, transform: EvalTransform, decode: str = "draft"):
    """One image, a file or its bytes, decoded the :data:`DECODES` way ``decode``: ``(pixels,
    None, 1)``, or for ``device`` a JPEG's ``(None, bytes, orientation)`` left to the GPU.
    Raises what the decoder raises."""
    if decode == "draft":
        return transform.pixels(open_rgb(source if isinstance(source, Path) else io.BytesIO(source),
                                         transform.resize)), None, 1
    data = source.read_bytes() if isinstance(source, Path) else source
    if data[:3] == JPEG_MAGIC:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if decode == "device":
            return None, raw, exif_orientation(data)
        try:
            return transform.pixels(upright(decode_jpeg(raw), exif_orientation(data))), None, 1
        except RuntimeError:  # a JPEG libjpeg-turbo rejects as torchvision drives it: PIL may still read it
            pass
    return transform.pixels(open_rgb(io.BytesIO(data))), None, 1


class ImageBatch(NamedTuple):
    """A collated batch: ``pixels`` (N, 3, crop, crop) uint8, zeros where ``errors`` is not
    empty or where the image is still a JPEG in ``jpegs`` (its bytes, with its EXIF
    ``orientations``) for :func:`pipeline.device_decode.decode_batch` to decode on the device."""

    index: torch.Tensor
    pixels: torch.Tensor
    jpegs: list[torch.Tensor | None]
    orientations: list[int]
    errors: list[str]


class ImageFiles(torch.utils.data.Dataset):
    """Dataset of images decoded (or, for ``decode="device"``, JPEGs only read) in DataLoader
    workers. An item is ``(index, pixels, jpeg, orientation, error)``; a file that cannot be read
    yields its error message instead of raising. Batch it with :func:`image_loader`."""

    def __init__(self, root, relative_paths: list[str], transform: EvalTransform, decode: str = "draft"):
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        self.root = Path(root)
        self.paths = relative_paths
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        reason = decode_failure_reason(path, self.paths[i])
        if reason is None:
            try:
                return (i, *decode_pixels(path, self.transform, self.decode), "")
            except Exception as exc:  # any decoder failure is a per-file skip, never fatal
                reason = _failure(exc, path)
        return i, None, None, 1, reason

    def collate(self, items) -> ImageBatch:
        index, pixels, jpegs, orientations, errors = zip(*items)
        batch = torch.zeros(len(items), 3, self.transform.crop, self.transform.crop, dtype=torch.uint8)
        for row, image in enumerate(pixels):
            if image is not None:
                batch[row] = image
        return ImageBatch(torch.tensor(index), batch, list(jpegs), list(orientations), list(errors))


def decode_for(full_decode: bool, device: torch.device) -> str:
    """The :data:`DECODES` way for features made with or without ``full_decode`` on ``device``:
    full-size JPEGs are decoded by the GPU when there is one."""
    if not full_decode:
        return "draft"
    return "device" if device.type == "cuda" else "full"


def _worker_start(share_cores: bool, worker_id: int) -> None:
    keep_large_buffers()  # also under the spawn and forkserver start methods, which do not inherit it
    if share_cores:
        yield_to_model()


def image_loader(dataset: ImageFiles, batch_size: int, workers: int, device: torch.device):
    """A DataLoader of :class:`ImageBatch` es over ``dataset``, decoding in ``workers`` processes
    for a model on ``device``: on the CPU the workers decode only on cores the model leaves
    idle (:func:`pipeline.cpu_sharing.yield_to_model`); for CUDA batches come in pinned memory."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=dataset.collate, prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(_worker_start, device.type == "cpu") if workers else None)
