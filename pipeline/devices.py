"""Where computation runs: ``--device auto|cpu|cuda`` resolved to a ``torch.device``, and how many
DataLoader workers the machine's cores allow."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import PipeError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for an absent CUDA is a clear error."""
    import torch  # lazily: an up-to-date extraction never imports torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PipeError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when ``--batch-size`` is not given. On the CPU, 32 was faster than
    16 and 64 for efficientnet_lite0 and resnet50 (bench/extract.py --batch-sizes); on CUDA a
    larger batch keeps the GPU busy (not measured here: no GPU was available)."""
    return 32 if device.type == "cpu" else 256


def default_workers() -> int:
    """DataLoader workers: one per available core, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
