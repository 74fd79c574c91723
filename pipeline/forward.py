"""The one forward path: image files -> decoded uint8 batches -> backbone -> feature rows.

``pipe extract``, ``pipe predict``, the benchmarks and the Python API all run images through
:func:`feature_batches` (or, on pixels already decoded, :class:`FeatureExtractor`), so
decoding, normalisation, memory format, BatchNorm folding and precision are decided here once.

Precision. ``float32`` runs the model as it is; ``bfloat16`` runs it under
``torch.autocast`` with bfloat16 (matrix products and convolutions in bf16, accumulation and
numerically sensitive ops in float32), which is about twice as fast on CPUs with native bf16
instructions (AVX512-BF16, AMX) and on CUDA. ``auto`` (the default, :data:`pipeline.defaults.PRECISION`) is bfloat16
where the device has it natively, else float32: emulated bf16 is slower than float32. The
features differ by about bf16's rounding (a cosine of 0.995 or more to float32's), so the
precision is part of the features' identity and fingerprint when it is not float32 (files
written before pipe recorded precision were made in float32 and keep their fingerprint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import defaults
from .errors import PipeError

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone, BackboneSpec
    from .data import EvalTransform

MODEL_PRECISIONS = ("float32", "bfloat16")
PRECISIONS = ("auto", *MODEL_PRECISIONS)
# torch.cpu.get_capabilities() flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 extension
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: CUDA GPUs from Ampere on, CPUs with
    AVX512-BF16, AMX or Arm's BF16. Elsewhere torch emulates it, slower than float32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(torch.cpu.get_capabilities().get(flag, False) for flag in CPU_BFLOAT16_FLAGS)
    return False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise PipeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device, existing: str | None = None) -> str:
    """``auto`` made concrete: ``existing`` (the precision of a feature file being extended, so
    its rows never mix with rows of another precision), else bfloat16 where ``device`` has it
    natively, else float32. ``float32`` and ``bfloat16`` stay as given."""
    check_precision(precision)
    if precision != "auto":
        return precision
    if existing is not None:
        return existing
    return "bfloat16" if native_bfloat16(device) else "float32"


def model_input(pixels: torch.Tensor, transform: EvalTransform, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` pixels -> normalised float32 on ``device``, channels_last: what
    every backbone pipe runs takes (the normalisation runs on the device, after the copy of the
    four-times smaller uint8 batch)."""
    import torch

    x = pixels.to(device, non_blocking=True)
    return transform.normalize(x).contiguous(memory_format=torch.channels_last)


class FeatureExtractor:
    """Runs a :class:`Backbone` on uint8 image batches: normalisation on the device,
    channels_last, BatchNorm folded into the convolutions (:mod:`pipeline.backbones.folding`),
    ``precision`` (resolved with :func:`resolve_precision`; see the module doc), eval mode and
    ``inference_mode``. Returns float32 numpy rows.

    ``compile_batch`` compiles the module with ``torch.compile`` for that batch size; smaller
    batches (the last one) are zero-padded to it, so the graph compiles once. ``fold=False``
    leaves the BatchNorms as they are (bench/extract.py measures what folding gains)."""

    def __init__(self, backbone: Backbone, device: torch.device, compile_batch: int | None = None, fold: bool = True,
                 precision: str = defaults.PRECISION):
        import torch

        from .backbones.folding import fold_batchnorm

        self.backbone = backbone
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.module = backbone.module.to(device).to(memory_format=torch.channels_last)
        crop = backbone.spec.transform.crop
        example = torch.randn(1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
        example = example.to(device).contiguous(memory_format=torch.channels_last)
        self.folded = fold_batchnorm(self.module, example) if fold else 0
        self.compile_batch = compile_batch
        if compile_batch:
            self.module = torch.compile(self.module, dynamic=False)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bfloat16"
                         else nullcontext())

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        import torch

        n = len(pixels)
        if self.compile_batch and n < self.compile_batch:
            pixels = torch.cat([pixels, pixels.new_zeros((self.compile_batch - n, *pixels.shape[1:]))])
        x = model_input(pixels, self.backbone.spec.transform, self.device)
        with torch.inference_mode(), self.autocast:
            return self.module(x)[:n].float().cpu().numpy()


@dataclass
class FeatureBatch:
    """One batch of :func:`feature_batches`: the positions of its images in the input list, why
    each could not be read ('' when it was), and the feature rows of those read, in order."""

    index: list[int]
    errors: list[str]
    features: np.ndarray  # (number read, feature_dim) float32

    @property
    def read(self) -> list[int]:
        """Positions (in the input list) of the images whose rows are in :attr:`features`."""
        return [i for i, error in zip(self.index, self.errors) if not error]


def feature_batches(spec: BackboneSpec, root, paths: list[str], device: torch.device, *, batch_size: int,
                    workers: int = 0, precision: str = defaults.PRECISION, compile: bool = False
                    ) -> Iterator[FeatureBatch]:
    """Features of the images ``paths`` (relative to ``root``), a batch at a time, in order.

    Decoding runs in ``workers`` DataLoader processes (JPEGs on the GPU when ``device`` is one
    and ``spec`` decodes them at full size); an unreadable file is a per-image error, never a
    failure of the batch. The workers start before the model is built, so the first batches are
    ready when it is; the model is built before this returns, so a model that cannot be built
    fails here, before any batch. Close the iterator (``contextlib.closing``) to stop the
    workers at once when the loop ends early."""
    from .data import ImageFiles, decode_for, image_loader
    from .device_decode import decode_batch

    dataset = ImageFiles(Path(root), paths, spec.transform, decode_for(spec.full_decode, device))
    loader = iter(image_loader(dataset, batch_size, workers, device))  # starts the workers
    try:
        run = FeatureExtractor(spec.build(), device, batch_size if compile else None, precision=precision)
    except BaseException:
        # the workers stop now, not whenever the traceback is freed: they share the output's lock
        del loader
        raise

    def batches() -> Iterator[FeatureBatch]:
        for batch in loader:
            pixels, errors = decode_batch(batch, spec.transform, run.device)
            good = [j for j, error in enumerate(errors) if not error]
            if len(good) == len(errors):
                features = run(pixels)
            else:
                features = run(pixels[good]) if good else np.empty((0, 0), np.float32)
            yield FeatureBatch(batch.index.tolist(), errors, features)

    return batches()
