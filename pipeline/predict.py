"""Using a trained head: backbone + head on new images, without touching the cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import defaults
from .devices import resolve_device
from .errors import PipeError
from .forward import check_precision
from .heads import Head
from .scan import IMAGE_EXTENSIONS
from .store import LEGACY_PRECISION

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone, BackboneSpec


@dataclass
class Prediction:
    """The classes shown for one image (its top k; for a multi-label head, every class at or
    above its threshold), or the reason it could not be read."""

    path: str
    top: list[tuple[str, float]]
    error: str = ""


def predictions_json(predictions: list[Prediction], head: Head) -> dict:
    """``pipe predict --json``: each image's classes shown (top-k, or those above their thresholds
    for a multi-label head, whose thresholds are listed too) with their probabilities (in full
    float32 precision), or why it was skipped, in input order, with the head they came from."""
    return {
        "head": head.path,
        "fingerprint": head.fingerprint,
        "classes": list(head.classes),
        **({"thresholds": dict(zip(head.classes, map(float, head.thresholds)))} if head.kind == "multilabel" else {}),
        "predictions": [
            {"path": p.path, "top": [{"class": name, "probability": probability} for name, probability in p.top],
             **({"error": p.error} if p.error else {})}
            for p in predictions
        ],
    }


def expand_inputs(inputs) -> list[Path]:
    """Image files given directly, plus the images found (recursively) in given folders."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif item.exists() or item.is_symlink():
            files.append(item)
        else:
            raise PipeError(f"{item} does not exist")
    if not files:
        raise PipeError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def spec_for_head(head: Head) -> BackboneSpec:
    """The backbone a head's features came from, checked to still make the same features (e.g.
    that a weights file was not replaced since extraction)."""
    from .backbones import resolve_backbone
    from .data import EvalTransform

    source, identity = head.source, head.source["identity"]
    spec = resolve_backbone(source["model"], source["weights"], dtype=identity["dtype"], layer=identity.get("layer"),
                            pool=None if identity["pool"] == "default" else identity["pool"],
                            tta=identity.get("tta"), full_decode=identity.get("decode") == "full",
                            precision=identity.get("precision", LEGACY_PRECISION))
    spec = dataclasses.replace(spec, transform=EvalTransform.from_dict(source["transform"]))
    if spec.fingerprint != head.fingerprint:
        raise PipeError(f"the backbone {spec.name} with weights {spec.weights.given} now gives features "
                        f"{spec.fingerprint}, but the head was trained on {head.fingerprint}; "
                        "were the weights changed? Re-extract and retrain")
    return spec


def backbone_for_head(head: Head) -> Backbone:
    """:func:`spec_for_head`, built."""
    return spec_for_head(head).build()


def predict_precision(precision: str, spec: BackboneSpec, device: torch.device) -> str:
    """The precision predict runs at: ``auto`` is the one the head's features were made at
    (the head saw those features), except bfloat16 on a device that only emulates it, where
    float32 is faster and differs from bfloat16 features by no more than they differ from it."""
    from .forward import native_bfloat16, resolve_precision

    if precision == "auto" and spec.precision == "bfloat16" and not native_bfloat16(device):
        return "float32"
    return resolve_precision(precision, device, existing=spec.precision)


def head_probabilities(head: Head, features: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Class probabilities (N, C) of backbone features (N, D). The features round-trip through
    the cache's storage dtype first: the head saw them stored that way."""
    return head.predict_proba(features.astype(np.dtype(storage_dtype)).astype(np.float32))


def predict_images(head: Head, inputs, topk: int = defaults.TOPK, device: str = defaults.DEVICE,
                   batch_size: int = defaults.PREDICT_BATCH_SIZE,
                   workers: int = 0, precision: str = defaults.PRECISION) -> list[Prediction]:
    """Classify image files (or folders of them) with ``head`` and its backbone, at
    ``precision`` (:func:`predict_precision`)."""
    from .forward import feature_batches

    check_precision(precision)
    files = expand_inputs(inputs)
    spec = spec_for_head(head)
    target = resolve_device(device)
    k = min(topk, len(head.classes))
    results = []
    for batch in feature_batches(spec, ".", [str(p) for p in files], target, batch_size=batch_size, workers=workers,
                                 precision=predict_precision(precision, spec, target)):
        proba = head_probabilities(head, batch.features, spec.dtype) if batch.read else None
        row = {i: r for r, i in enumerate(batch.read)}
        for i, error in zip(batch.index, batch.errors):
            if error:
                results.append(Prediction(str(files[i]), [], error))
            else:
                results.append(Prediction(str(files[i]), head.top_labels(proba[row[i]], k)))
    return results
