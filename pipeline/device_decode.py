"""JPEGs decoded on the GPU: a batch of file bytes (read by DataLoader workers) decoded with
nvJPEG in one call, turned upright, resized, centre-cropped and stacked on the device.

On a GPU the CPU cores then only read files, and decoding no longer limits the extraction. It is
full-size decoding (nvJPEG has no reduced DCT scale), the same pixels as ``--full-decode`` on the
CPU to within rounding, so such features carry the ``full`` decode in their fingerprint. A file
the GPU decoder rejects is decoded on the CPU (PIL) instead; one PIL cannot read either is
recorded as failed, alone: the rest of its batch goes on.
"""

from __future__ import annotations

import io

import torch

from .data import EvalTransform, ImageBatch, decode_jpeg, upright
from .images import open_rgb


def _decode_one(jpeg: torch.Tensor, orientation: int, transform: EvalTransform, device) -> torch.Tensor | str:
    """One file's pixels: on the device, else with PIL on the CPU; or why neither could read it."""
    try:
        return transform.pixels(upright(decode_jpeg([jpeg], device)[0], orientation))
    except RuntimeError:
        pass
    try:
        return transform.pixels(open_rgb(io.BytesIO(jpeg.numpy().tobytes()))).to(device)
    except Exception as exc:  # a per-file skip, as in the workers
        return f"{type(exc).__name__}: {exc}"


def decode_batch(batch: ImageBatch, transform: EvalTransform, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """The batch's pixels on ``device``, its JPEG bytes decoded there (one call for all); and the
    errors, with the files that could not be decoded added."""
    pixels = batch.pixels.to(device, non_blocking=True)
    errors = list(batch.errors)
    rows = [row for row, jpeg in enumerate(batch.jpegs) if jpeg is not None and not errors[row]]
    if not rows:
        return pixels, errors
    try:
        images = decode_jpeg([batch.jpegs[row] for row in rows], device)
        decoded = [transform.pixels(upright(image, batch.orientations[row])) for row, image in zip(rows, images)]
    except RuntimeError:  # the decoder rejected some file of the batch: one by one, to find it
        decoded = [_decode_one(batch.jpegs[row], batch.orientations[row], transform, device) for row in rows]
    for row, image in zip(rows, decoded):
        if isinstance(image, str):
            errors[row] = image
        else:
            pixels[row] = image
    return pixels, errors
