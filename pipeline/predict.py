"""Using a trained head: backbone + head on new images, without touching the cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backbones import resolve_backbone
from .data import EvalTransform, ImageFiles, decode_for, image_loader
from .device_decode import decode_batch
from .scan import IMAGE_EXTENSIONS
from .errors import PipeError
from .devices import resolve_device
from .extract import FeatureExtractor
from .heads import Head


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


def spec_for_head(head: Head):
    """The backbone spec a head's features came from, checked to still make the same features
    (e.g. that a weights file was not replaced since extraction)."""
    source, identity = head.source, head.source["identity"]
    spec = resolve_backbone(source["model"], source["weights"], dtype=identity["dtype"], layer=identity.get("layer"),
                            pool=None if identity["pool"] == "default" else identity["pool"],
                            tta=identity.get("tta"), full_decode=identity.get("decode") == "full")
    spec = dataclasses.replace(spec, transform=EvalTransform.from_dict(source["transform"]))
    if spec.fingerprint != head.fingerprint:
        raise PipeError(f"the backbone {spec.name} with weights {spec.weights.given} now gives features "
                        f"{spec.fingerprint}, but the head was trained on {head.fingerprint}; "
                        "were the weights changed? Re-extract and retrain")
    return spec


def backbone_for_head(head: Head):
    """Rebuild the backbone a head's features came from (see :func:`spec_for_head`)."""
    return spec_for_head(head).build()


def classify(head: Head, run: FeatureExtractor, pixels) -> np.ndarray:
    """Class probabilities (N, C) of a batch of uint8 pixels, through ``run``'s backbone and
    ``head``. The features round-trip through the cache's storage dtype: the head saw them stored
    that way."""
    storage = np.dtype(run.backbone.spec.dtype)
    return head.predict_proba(run(pixels).astype(storage).astype(np.float32))


def predict_images(head: Head, inputs, topk: int = 5, device: str = "auto", batch_size: int = 32,
                   workers: int = 0) -> list[Prediction]:
    """Classify image files (or folders of them) with ``head`` and its backbone."""
    files = expand_inputs(inputs)
    backbone = backbone_for_head(head)
    run = FeatureExtractor(backbone, resolve_device(device))
    transform = backbone.spec.transform
    dataset = ImageFiles(Path("."), [str(p) for p in files], transform, decode_for(backbone.spec.full_decode, run.device))
    loader = image_loader(dataset, batch_size, workers, run.device)
    k = min(topk, len(head.classes))
    results = []
    for batch in loader:
        pixels, errors = decode_batch(batch, transform, run.device)
        good = [j for j, e in enumerate(errors) if not e]
        proba = classify(head, run, pixels[good]) if good else None
        row = dict(zip(good, range(len(good))))
        for j, i in enumerate(batch.index.tolist()):
            if errors[j]:
                results.append(Prediction(str(files[i]), [], errors[j]))
                continue
            results.append(Prediction(str(files[i]), head.top_labels(proba[row[j]], k)))
    return results
