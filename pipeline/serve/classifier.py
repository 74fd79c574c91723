"""The head and its backbone as ``pipe predict`` runs them, for one image at a time to decode
and a batch at a time to classify."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import decode_for, decode_pixels
from ..forward import FeatureExtractor
from ..heads import Head
from ..predict import head_probabilities, predict_precision


class BadImage(Exception):
    """An upload that is not an image the server will decode; the message says why."""


def _reason(exc: Exception) -> str:
    """A decoder's exception as one line, without the in-memory file object PIL names."""
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def check_pixel_count(data: bytes) -> None:
    """Refuse an image over PIL's ``Image.MAX_IMAGE_PIXELS`` from its header alone, before any
    decoder allocates it: a few kB of PNG can claim 30,000 x 30,000 pixels. PIL itself only
    refuses twice that limit, and torchvision's JPEG decoder not at all."""
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise BadImage(f"{width} x {height} pixels is over the limit of {limit} pixels (a decompression bomb?)")


def batch_shapes(max_batch: int) -> list[int]:
    """The batch sizes the model runs at: powers of two below ``max_batch``, and ``max_batch``.
    A batch is padded to the next of them, because the CPU backend keeps buffers (reordered
    weights, scratch space) for every input shape it has seen: with every size from 1 to 32 the
    server's memory grew by about a gigabyte, where with these few, run at start-up, it stays
    where the warm-up left it (measured with efficientnet_lite0; see the README's Serve section)."""
    return [2**i for i in range(max_batch.bit_length()) if 2**i < max_batch] + [max_batch]


@dataclass
class Classifier:
    """``head`` on the features of ``run``'s backbone, decoding uploads the way ``decode`` (a
    :data:`pipeline.data.DECODES` name) says, as ``pipe predict`` decodes files, and running
    batches of at most ``max_batch`` images at the sizes :func:`batch_shapes` gives."""

    head: Head
    run: FeatureExtractor
    decode_way: str
    max_batch: int

    @classmethod
    def load(cls, head: Head, spec, device: torch.device, max_batch: int) -> Classifier:
        """Build ``spec`` (from :func:`pipeline.predict.spec_for_head`) on ``device`` and warm it
        up: each batch shape twice (the second run still allocates on the CPU), so that neither
        the first requests' time nor the memory after start-up grows with what comes later."""
        run = FeatureExtractor(spec.build(), device, precision=predict_precision("auto", spec, device))
        # uploads are decoded on the CPU: on a GPU too, full-size decoding gives the same pixels
        classifier = cls(head, run, decode_for(spec.full_decode, torch.device("cpu")), max_batch)
        crop = spec.transform.crop
        for n in batch_shapes(max_batch) * 2:
            classifier.probabilities(torch.zeros(n, 3, crop, crop, dtype=torch.uint8))
        return classifier

    def decode(self, data: bytes) -> torch.Tensor:
        """One upload to (3, crop, crop) uint8 pixels; :class:`BadImage` says why it cannot be."""
        try:
            check_pixel_count(data)
            pixels, _, _ = decode_pixels(data, self.run.backbone.spec.transform, self.decode_way)
        except BadImage:
            raise
        except Exception as exc:  # any decoder failure is this upload's, never the server's
            raise BadImage(_reason(exc)) from None
        return pixels

    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, C) of a batch of at most ``max_batch`` decoded images."""
        n = len(pixels)
        shape = next(size for size in batch_shapes(self.max_batch) if size >= n)
        padded = torch.cat([pixels, pixels.new_zeros((shape - n, *pixels.shape[1:]))]) if shape > n else pixels
        return head_probabilities(self.head, self.run(padded), self.run.backbone.spec.dtype)[:n]

    def info(self) -> dict:
        """What ``GET /info`` reports about the model."""
        source, precision = self.head.source, self.run.precision
        return {"classes": list(self.head.classes), "model": source["model"], "weights": source["weights"],
                "fingerprint": self.head.fingerprint, "precision": precision, "head_kind": self.head.kind,
                "image_size": self.run.backbone.spec.transform.crop, "device": str(self.run.device)}
