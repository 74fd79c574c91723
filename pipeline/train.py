"""Stage 2: train a head on a cached feature file (linear, or multi-label for a multi-label file)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from .errors import PipeError
from .heads import LinearHead, MultilabelProbe, RowSubset, make_probe
from .store import feature_matrix, read_features


def feature_source(features) -> dict:
    """What a head needs to know about its features to rebuild the backbone for predict."""
    keys = ("model", "weights", "weights_id", "transform", "identity")
    return {**{k: features.attrs[k] for k in keys}, "feature_file": str(features.path)}


def train_head(features_path, out="cache/head.pt", kind: str = "linear", **params):
    """Train a ``kind`` head ("linear" or "sklearn") on the train split of a feature file,
    choosing the L2 strength on ``val`` (or a hold-out of train), and save it to ``out``.

    ``params`` go to the probe (grid, balanced, seed, device, max_iter, ...). Returns
    ``(head, probe)``; the probe holds the grid scores and timing. With ``batch_size`` set
    the linear head trains on mini-batches read from the file as it goes, so the features
    never need to fit in memory. A multi-label file gets a multi-label head
    (:func:`train_multilabel_head`).
    """
    streamed = params.get("batch_size") is not None
    features = read_features(features_path, with_features=not streamed)
    if features.multilabel:
        return train_multilabel_head(features, out, kind, **params)
    present = np.unique(features.labels[features.row_indices("train")])
    if len(present) < 2:
        raise PipeError(f"train-head needs at least 2 classes in the train split of {features.path}, "
                        f"found {len(present)} ({', '.join(features.classes[i] for i in present)})")
    with feature_matrix(features.path) if streamed else nullcontext(features.features) as matrix:

        def split_rows(split):
            rows = features.row_indices(split)
            return (RowSubset(matrix, rows) if streamed else matrix[rows]), features.labels[rows]

        X_train, y_train = split_rows("train")
        X_val, y_val = split_rows("val") if features.split_counts()["val"] else (None, None)
        probe = make_probe(kind, **params).fit(X_train, y_train, X_val, y_val)
    head: LinearHead = probe.to_head(features.classes, features.fingerprint, feature_source(features))
    head.save(out)
    return head, probe


MULTILABEL_OPTIONS = ("grid", "selection", "seed", "device", "max_iter", "tol")


def train_multilabel_head(features, out, kind: str = "linear", **params):
    """Train a multi-label head (:class:`~pipeline.heads.MultilabelProbe`, ``kind`` "linear" or
    "sklearn") on a multi-label feature file read with its features, and save it to ``out``.
    Returns ``(head, probe)``."""
    unsupported = sorted(k for k, v in params.items() if k not in MULTILABEL_OPTIONS and v not in (None, False))
    params = {k: v for k, v in params.items() if k in MULTILABEL_OPTIONS}
    if unsupported:
        options = ", ".join("--" + name.replace("_", "-") for name in unsupported)
        raise PipeError(f"{features.path} is multi-label; {options} apply to single-label heads only")
    if features.features is None:
        features = read_features(features.path)

    def split_rows(split):
        rows = features.row_indices(split)
        return features.features[rows], features.targets[rows]

    X_val, Y_val = split_rows("val") if features.split_counts()["val"] else (None, None)
    probe = MultilabelProbe(trainer=kind, class_names=features.classes, **params).fit(*split_rows("train"), X_val, Y_val)
    head = probe.to_head(features.classes, features.fingerprint, feature_source(features))
    head.save(out)
    return head, probe
