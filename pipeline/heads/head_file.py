"""The head file: its on-disk format, the kinds of head, and :class:`LinearHead`.

A head file is a ``torch.save`` of plain types and tensors. It is read back by
:func:`pipeline.heads.torch_zip.load_plain` (numpy arrays, no torch import: reading a head
costs milliseconds instead of torch's 2 s import), or where that reader declines, by
``torch.load(weights_only=True)``; no pickled code ever runs. Every kind stores
``format`` ("pipe-head"), ``version`` (1), ``kind``, ``classes``, ``fingerprint`` (of the
features it was trained on), ``source`` (what predict rebuilds) and ``training`` (free-form
metadata about the fit), plus what the kind needs. A linear head adds ``weight`` (C, D) and
``bias`` (C,) float32, and ``mean`` and ``std`` (D,) or None, and after cross-validation
may hold its out-of-fold probabilities (:class:`OutOfFold`: ``out_of_fold_rows``,
``out_of_fold_proba``, ``out_of_fold_digest``; files without them load as before). Files
written before kinds existed have no ``kind`` and are linear.

Each kind is a subclass of :class:`Head` that names its ``kind`` and ``payload_keys``,
and implements :meth:`Head.to_payload` / :meth:`Head.from_payload` (numpy arrays and plain
types both ways); defining the subclass registers it, and :func:`load_head` reads any kind,
importing the kind's module (:data:`HEAD_KIND_MODULES`) only when it reads a file of that kind.
"""

from __future__ import annotations

import importlib
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipeError
from pipeline.heads.features import row_chunks, standardize
from pipeline.heads.torch_zip import NotPlainTensors, load_plain

HEAD_FORMAT = "pipe-head"
HEAD_VERSION = 1
_COMMON_KEYS = ("classes", "fingerprint", "source", "training")
HEAD_KINDS: dict[str, type[Head]] = {}
# each kind -> the module defining it: imported when a file of that kind is read, so reading a
# linear head loads no torch and no scikit-learn
HEAD_KIND_MODULES = {"linear": __name__, "knn": "pipeline.heads.knn", "multilabel": "pipeline.heads.multilabel"}


def _softmax(z):
    """Row-wise softmax of a 2-D float array, stable for large logits."""
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


class Head:
    """What every kind of head offers: the class names, the fingerprint of the features it
    was trained on, ``source``/``training`` metadata, ``path`` (where it was loaded from or
    saved to), :meth:`predict_proba`, and saving and loading through the head file.

    A subclass sets ``kind`` and ``payload_keys`` (the file keys its :meth:`from_payload`
    needs beyond the common ones) and becomes readable by :func:`load_head`. ``out_of_fold``
    (:class:`OutOfFold`) is None but for a linear head that keeps its cross-validation's.
    """

    kind: str = ""
    payload_keys: tuple[str, ...] = ()
    classes: list[str]
    fingerprint: str
    source: dict
    training: dict
    path: str | None
    out_of_fold: OutOfFold | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            HEAD_KINDS[cls.kind] = cls

    @property
    def feature_dim(self) -> int:
        """The number of feature dimensions the head reads."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line on what the head holds, for ``pipe info``."""
        raise NotImplementedError

    def predict_proba(self, X):
        """Class probabilities (N, C) float32 for features ``X`` (N, D)."""
        raise NotImplementedError

    def to_payload(self) -> dict:
        """The kind's own entries of the head file (numpy arrays and plain types)."""
        raise NotImplementedError

    @classmethod
    def from_payload(cls, payload: dict, path: str) -> Head:
        """The head from a loaded head file whose keys were checked (the shared constructor
        arguments come from :func:`common_fields`)."""
        raise NotImplementedError

    def predict(self, X):
        """Predicted class indices (N,) int64 (indices into ``classes``)."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def top_labels(self, probabilities, k):
        """What ``pipe predict`` shows for one image's ``probabilities`` (C,): the ``k`` most
        probable classes as ``(name, probability)``, most probable first."""
        order = np.argsort(-probabilities)[:k]
        return [(self.classes[c], float(probabilities[c])) for c in order]

    def check_features(self, X):
        """Raise :class:`PipeError` unless ``X`` has the head's number of dimensions."""
        if X.shape[1] != self.feature_dim:
            raise PipeError(
                f"features have {X.shape[1]} dimensions but head {self.path or '(unsaved)'} "
                f"expects {self.feature_dim}; retrain with pipe train-head"
            )

    def check_fingerprint(self, fingerprint, features="the feature file"):
        """Raise :class:`PipeError` unless ``fingerprint`` matches the training features."""
        if fingerprint != self.fingerprint:
            raise PipeError(
                f"head {self.path or '(unsaved)'} was trained on features {self.fingerprint} "
                f"but {features} has {fingerprint}; retrain with pipe train-head"
            )

    def save(self, path):
        """Write the head to ``path`` atomically (temporary file + rename), creating its folder."""
        import torch  # writing needs it; reading a head does not

        path = Path(path)
        payload = {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "kind": self.kind,
            "classes": list(self.classes),
            "fingerprint": self.fingerprint,
            "source": self.source,
            "training": self.training,
            **{key: torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
               for key, value in self.to_payload().items()},
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
    def load(cls, path) -> Head:
        """Read a head file of this class's kind (any kind when called on :class:`Head`)."""
        head = load_head(path)
        if cls is not Head and not isinstance(head, cls):
            raise PipeError(f"{path} is a {head.kind} head; this needs a {cls.kind} head")
        return head


def load_head(path) -> Head:
    """Read a head file of any kind; no pickled code is ever executed."""
    try:
        payload = _read_payload(path)
    except FileNotFoundError:
        raise PipeError(f"head file {path} does not exist; train one with pipe train-head")
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile):
        raise PipeError(f"{path} is not a readable head file (not a torch file, or truncated)")
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise PipeError(f"{path} is a torch file but not a pipe head; train one with pipe train-head")
    if payload.get("version") != HEAD_VERSION:
        raise PipeError(
            f"head {path} has format version {payload.get('version')!r}; this pipe reads "
            f"version {HEAD_VERSION}; retrain with pipe train-head"
        )
    kind = payload.get("kind", "linear")
    if kind not in HEAD_KIND_MODULES:
        raise PipeError(f"head {path} is of kind {kind!r}, which this pipe does not know "
                        f"({', '.join(sorted(HEAD_KIND_MODULES))}); upgrade pipe or retrain with pipe train-head")
    importlib.import_module(HEAD_KIND_MODULES[kind])  # registers the kind
    head_cls = HEAD_KINDS[kind]
    missing = [key for key in _COMMON_KEYS + head_cls.payload_keys if key not in payload]
    if missing:
        raise PipeError(f"head {path} is missing {', '.join(missing)}; retrain with pipe train-head")
    return head_cls.from_payload(payload, str(path))


def _read_payload(path):
    """The head file's object, tensors as numpy arrays: read without torch where the file holds
    only what :mod:`~pipeline.heads.torch_zip` rebuilds, else by ``torch.load(weights_only=True)``."""
    try:
        return load_plain(path)
    except NotPlainTensors:
        import torch

        payload = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(payload, dict):
            return payload
        # numpy has no bfloat16: such a tensor widens to float32
        return {key: (value.float() if value.dtype == torch.bfloat16 else value).numpy()
                if isinstance(value, torch.Tensor) else value for key, value in payload.items()}


def common_fields(payload: dict, path: str) -> dict:
    """The constructor arguments every kind shares, from a loaded head file."""
    return {"classes": list(payload["classes"]), "fingerprint": payload["fingerprint"],
            "source": payload["source"], "training": payload["training"], "path": path}


# A head keeps its cross-validation's out-of-fold probabilities (:class:`OutOfFold`) up to this
# many values (4 MB as float32: 1,000 images of 1,000 classes); beyond, the report fits its own.
OUT_OF_FOLD_MAX_VALUES = 1 << 20
_OUT_OF_FOLD_KEYS = {"rows": "out_of_fold_rows", "proba": "out_of_fold_proba", "rows_digest": "out_of_fold_digest"}


@dataclass
class OutOfFold:
    """What a head's cross-validation learnt about the images it was trained on: ``proba`` (N,
    C) float32, each image's class probabilities (over the head's ``classes``) from the model of
    the folds that left it out, for the feature file's ``rows`` (N,); ``rows_digest`` is the
    file's :meth:`~pipeline.store.FeatureSet.rows_digest` then, so a reader can tell whether the rows
    still hold the same images and labels. The report finds label issues with them instead of
    fitting its own heads."""

    rows: np.ndarray
    proba: np.ndarray
    rows_digest: str

    def to_payload(self) -> dict:
        return {key: getattr(self, name) for name, key in _OUT_OF_FOLD_KEYS.items()}

    @classmethod
    def from_payload(cls, payload: dict) -> OutOfFold | None:
        """The head file's out-of-fold probabilities, or None (files without them)."""
        if any(key not in payload for key in _OUT_OF_FOLD_KEYS.values()):
            return None
        return cls(**{name: payload[key] for name, key in _OUT_OF_FOLD_KEYS.items()})


@dataclass
class LinearHead(Head):
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
    out_of_fold: OutOfFold | None = field(default=None, compare=False)

    kind = "linear"
    payload_keys = ("weight", "bias", "mean", "std")

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[1]

    def describe(self) -> str:
        return f"{len(self.classes)} classes x {self.feature_dim} features (linear)"

    def decision_function(self, X):
        """Class scores (N, C) float32 for features ``X`` (N, D), read in row chunks.

        ``X`` may be any 2-D array-like supporting ``X[a:b]`` (an ndarray, an
        ``h5py.Dataset``), so memory stays bounded for big feature files.
        """
        self.check_features(X)
        weight_t = np.ascontiguousarray(self.weight.T)
        scores = np.empty((X.shape[0], len(self.classes)), dtype=np.float32)
        for start, stop in row_chunks(X.shape[0]):
            x = standardize(X[start:stop], self.mean, self.std)
            scores[start:stop] = x @ weight_t + self.bias
        return scores

    def predict_proba(self, X):
        """Class probabilities (N, C): the softmax of :meth:`decision_function`."""
        return _softmax(self.decision_function(X))

    def to_payload(self) -> dict:
        payload = {key: None if getattr(self, key) is None else np.asarray(getattr(self, key), dtype=np.float32)
                   for key in LinearHead.payload_keys}
        return {**payload, **(self.out_of_fold.to_payload() if self.out_of_fold is not None else {})}

    @classmethod
    def from_payload(cls, payload: dict, path: str) -> LinearHead:
        arrays = {key: None if payload[key] is None else np.asarray(payload[key], dtype=np.float32)
                  for key in cls.payload_keys}
        return cls(**arrays, **common_fields(payload, path), out_of_fold=OutOfFold.from_payload(payload))
