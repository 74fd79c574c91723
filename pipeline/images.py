"""Opening image files as upright 8-bit RGB PIL images. Needs only PIL and numpy, so that what
shows images without running a model (the report's thumbnails) does not import torch."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
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
        return to_rgb(image)
