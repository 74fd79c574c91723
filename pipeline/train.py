"""Stage 2: train a head (linear, scikit-learn or kNN; multi-label for a multi-label file) on a
cached feature file."""

from __future__ import annotations

import numpy as np

from . import defaults
from .errors import PipeError
from .heads import Head, LinearHead, MultiLabelClassifier, RowSubset, make_estimator
from .heads.head_file import OUT_OF_FOLD_MAX_VALUES, OutOfFold
from .memory import default_budget
from .rows import read_rows_chunked
from .store import FeatureSet, feature_matrix, read_features


def feature_source(features) -> dict:
    """What a head needs to know about its features to rebuild the backbone for predict."""
    keys = ("model", "weights", "weights_id", "transform", "identity")
    return {**{k: features.attrs[k] for k in keys}, "feature_file": str(features.path)}


def train_head(features, *, head: str = defaults.HEAD_KIND, out=None, memory_budget=None, **params) -> Head:
    """Train a head on the train split of ``features`` (a :class:`~pipeline.FeatureSet` or the
    path of a feature file), choosing its parameter (L2 strength, k) on ``val`` or splits of
    train + val (:mod:`pipeline.heads.selection`); what ``pipe train-head`` runs.

    ``head`` is "linear" (:class:`~pipeline.LinearClassifier`), "sklearn" (its scikit-learn
    baseline) or "knn" (:class:`~pipeline.KNNClassifier`); a multi-label feature file gets a
    :class:`~pipeline.MultiLabelClassifier` head ("linear" or "sklearn" trainer). ``params`` are
    the estimator's (``grid``, ``selection``, ``balanced``, ``seed``, ``device``, ``max_iter``,
    ``tol``, ``batch_size``, ``max_epochs``; ``k``, ``temperature``), with its defaults.

    Only the train and val rows are read, at the precision the file stores. The linear heads
    keep them in memory when they fit ``memory_budget`` (bytes; default
    :func:`~pipeline.memory.default_budget`), else the full-batch solver reads them from the
    file, a chunk at a time, on every pass: the same fit, in bounded memory. With
    ``batch_size`` set the linear head trains on mini-batches read from the file as it goes.
    The head is saved to ``out`` when given. Returns the :class:`~pipeline.Head`;
    ``head.training`` records how it was trained (``memory``: the budget, the rows' size and
    whether they were held in memory).
    """
    if not isinstance(features, FeatureSet):
        features = read_features(features, with_features=False, with_paths=False)  # training reads no path
    if features.multilabel:
        trained = fit_multilabel_head(features, head, **params)
    else:
        trained = fit_head(features, head, memory_budget=memory_budget, **params)
    if out is not None:
        trained.save(out)
    return trained


def require_single_label(features: FeatureSet) -> None:
    """Raise :class:`PipeError` for a multi-label feature file (its ``labels`` are -1), where
    a single-label head or evaluation was asked for."""
    if features.multilabel:
        raise PipeError(f"{features.path} is multi-label; this needs a single-label feature file "
                        "(pipe train-head trains multi-label heads)")


def fit_head(features: FeatureSet, kind: str = defaults.HEAD_KIND, matrix=None, *, memory_budget=None,
             **params) -> Head:
    """Fit a ``kind`` head on the train split (and val, when it has images) of single-label
    ``features`` without saving it. ``matrix`` is the feature matrix to read rows from
    (default ``features.features``, or the file's when it was read without them); rows of a
    matrix that is not in memory are read into it when :func:`holds_rows` says so, else read
    from it as they are needed."""
    require_single_label(features)
    present = np.unique(features.labels[features.row_indices("train")])
    if len(present) < 2:
        raise PipeError(f"train-head needs at least 2 classes in the train split of {features.path}, "
                        f"found {len(present)} ({', '.join(features.classes[i] for i in present)})")
    if matrix is None and features.features is None:
        with feature_matrix(features.path) as dataset:
            return fit_head(features, kind, dataset, memory_budget=memory_budget, **params)
    matrix = features.features if matrix is None else matrix
    splits = ["train"] + (["val"] if features.split_counts()["val"] else [])
    n_bytes = sum(len(features.row_indices(s)) for s in splits) * matrix.shape[1] * np.dtype(matrix.dtype).itemsize
    budget = default_budget() if memory_budget is None else memory_budget
    in_memory = isinstance(matrix, np.ndarray) or holds_rows(kind, params, n_bytes, budget)

    def split_rows(split):
        rows = features.row_indices(split)
        if isinstance(matrix, np.ndarray):
            return matrix[rows], features.labels[rows]
        return (read_rows_chunked(matrix, rows) if in_memory else RowSubset(matrix, rows)), features.labels[rows]

    X_train, y_train = split_rows("train")
    X_val, y_val = split_rows("val") if len(splits) > 1 else (None, None)
    estimator = make_estimator(kind, **params).fit(X_train, y_train, X_val, y_val)
    head = estimator.to_head(features.classes, features.fingerprint, feature_source(features))
    head.training["memory"] = {"budget": budget, "rows_bytes": int(n_bytes), "in_memory": bool(in_memory)}
    if isinstance(head, LinearHead):
        head.out_of_fold = out_of_fold(features, estimator, np.concatenate([features.row_indices(s) for s in splits]))
    return head


def out_of_fold(features: FeatureSet, estimator, rows) -> OutOfFold | None:
    """What a linear head keeps of its cross-validation: the estimator's out-of-fold
    probabilities of the feature file's ``rows`` (the pool: train, then val), over every class
    of the file; None after another selection, or above ``OUT_OF_FOLD_MAX_VALUES``."""
    proba = estimator.out_of_fold_proba_
    if proba is None or len(rows) * len(features.classes) > OUT_OF_FOLD_MAX_VALUES:
        return None
    full = np.zeros((len(rows), len(features.classes)), dtype=np.float32)  # classes train lacks: never
    full[:, estimator.classes_] = proba
    return OutOfFold(rows=rows, proba=full, rows_digest=features.rows_digest())


def holds_rows(kind: str, params: dict, n_bytes: int, budget: int | None) -> bool:
    """Whether train-head reads the train and val rows (``n_bytes`` at the file's precision)
    into memory. The full-batch linear and scikit-learn heads read every row on every pass, so
    they hold them when they fit ``budget`` (None: no limit); the kNN head and the mini-batch
    path read each row a few times, straight from the file."""
    if kind == "knn" or params.get("batch_size") is not None:
        return False
    return budget is None or n_bytes <= budget


MULTILABEL_OPTIONS = ("grid", "selection", "seed", "device", "max_iter", "tol")


def fit_multilabel_head(features: FeatureSet, kind: str = defaults.HEAD_KIND, **params) -> Head:
    """Fit a multi-label head (:class:`~pipeline.heads.MultiLabelClassifier`, ``kind`` "linear" or
    "sklearn") on a multi-label feature file read with its features, without saving it."""
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
    estimator = MultiLabelClassifier(trainer=kind, class_names=features.classes, **params)
    estimator.fit(*split_rows("train"), X_val, Y_val)
    return estimator.to_head(features.classes, features.fingerprint, feature_source(features))
