"""The head file: :class:`LinearHead`, a trained linear classifier, and its on-disk format.

A head file is a ``torch.save`` of plain types and tensors, read back with
``torch.load(weights_only=True)`` so that no pickled code ever runs: ``format``
("pipe-head"), ``version`` (1), ``weight`` (C, D) and ``bias`` (C,) float32, ``mean`` and
``std`` (D,) or None, ``classes``, ``fingerprint`` (of the features it was trained on),
``source`` (what predict rebuilds) and ``training`` (free-form metadata about the fit).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipeError
from pipeline.heads.features import row_chunks, standardize

HEAD_FORMAT = "pipe-head"
HEAD_VERSION = 1
_HEAD_KEYS = ("weight", "bias", "mean", "std", "classes", "fingerprint", "source", "training")


def _softmax(z):
    """Row-wise softmax of a 2-D float array, stable for large logits."""
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


@dataclass
class LinearHead:
    """A trained linear classifier on features: ``standardise(x) @ weight.T + bias``.

    ``weight`` is (C, D) float32, ``bias`` (C,); ``mean``/``std`` (D,) standardise the
    features first (None when the head was trained on raw features). ``fingerprint`` is
    the feature fingerprint it was trained on; ``source`` and ``training`` are JSON-able
    metadata about the backbone/feature file and about training. ``path`` is where the
    head was loaded from or saved to; it is not stored in the file.
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray | None
    std: np.ndarray | None
    classes: list[str]
    fingerprint: str
    source: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)

    def decision_function(self, X):
        """Class scores (N, C) float32 for features ``X`` (N, D), read in row chunks.

        ``X`` may be any 2-D array-like supporting ``X[a:b]`` (an ndarray, an
        ``h5py.Dataset``), so memory stays bounded for big feature files.
        """
        n_rows, n_dims = X.shape
        if n_dims != self.weight.shape[1]:
            raise PipeError(
                f"features have {n_dims} dimensions but head {self.path or '(unsaved)'} "
                f"expects {self.weight.shape[1]}; retrain with pipe train-head"
            )
        weight_t = np.ascontiguousarray(self.weight.T)
        scores = np.empty((n_rows, len(self.classes)), dtype=np.float32)
        for start, stop in row_chunks(n_rows):
            x = standardize(X[start:stop], self.mean, self.std)
            scores[start:stop] = x @ weight_t + self.bias
        return scores

    def predict_proba(self, X):
        """Class probabilities (N, C): the softmax of :meth:`decision_function`."""
        return _softmax(self.decision_function(X))

    def predict(self, X):
        """Predicted class indices (N,) int64 (indices into ``classes``)."""
        return self.decision_function(X).argmax(axis=1).astype(np.int64)

    def check_fingerprint(self, fingerprint, features="the feature file"):
        """Raise :class:`PipeError` unless ``fingerprint`` matches the training features."""
        if fingerprint != self.fingerprint:
            raise PipeError(
                f"head {self.path or '(unsaved)'} was trained on features {self.fingerprint} "
                f"but {features} has {fingerprint}; retrain with pipe train-head"
            )

    def save(self, path):
        """Write the head to ``path`` atomically (temporary file + rename), creating its folder."""
        path = Path(path)
        payload = {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "weight": torch.from_numpy(np.asarray(self.weight, dtype=np.float32)),
            "bias": torch.from_numpy(np.asarray(self.bias, dtype=np.float32)),
            "mean": None if self.mean is None else torch.from_numpy(self.mean),
            "std": None if self.std is None else torch.from_numpy(self.std),
            "classes": list(self.classes),
            "fingerprint": self.fingerprint,
            "source": self.source,
            "training": self.training,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise PipeError(f"cannot write the head file {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self.path = str(path)

    @classmethod
    def load(cls, path):
        """Read a head written by :meth:`save`; no pickled code is ever executed."""
        try:
            payload = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise PipeError(f"head file {path} does not exist; train one with pipe train-head")
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile):
            raise PipeError(f"{path} is not a readable head file (not a torch file, or truncated)")
        if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
            raise PipeError(f"{path} is a torch file but not a pipe head; train one with pipe train-head")
        if payload.get("version") != HEAD_VERSION:
            raise PipeError(
                f"head {path} has format version {payload.get('version')!r}; this pipe reads "
                f"version {HEAD_VERSION}; retrain with pipe train-head"
            )
        missing = [key for key in _HEAD_KEYS if key not in payload]
        if missing:
            raise PipeError(f"head {path} is missing {', '.join(missing)}; retrain with pipe train-head")
        arrays = {
            key: None if payload[key] is None else payload[key].numpy().astype(np.float32)
            for key in ("weight", "bias", "mean", "std")
        }
        return cls(
            **arrays,
            classes=list(payload["classes"]),
            fingerprint=payload["fingerprint"],
            source=payload["source"],
            training=payload["training"],
            path=str(path),
        )
