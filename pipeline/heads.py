"""Linear heads on cached features: the head file and the probes that train it.

A head is multinomial logistic regression on (optionally standardised) pooled features.
Two trainers produce the same :class:`LinearHead`: :class:`LinearProbe` (torch, the whole
regularisation grid trained as one batched problem) and :class:`SklearnProbe` (the
scikit-learn baseline). Both follow the published linear-probe recipe: sweep the L2
strength over a log grid, pick the best by validation accuracy, refit on train + val.

The L2 strength ``lambda`` is weight decay on the mean cross-entropy::

    loss(W, b) = mean_i CE_i + lambda / 2 * ||W||^2        (bias unpenalised)

which is scikit-learn's objective with ``C = 1 / (lambda * n_train)``.
"""

from __future__ import annotations

import inspect
import os
import pickle
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pipeline.errors import PipeError
from pipeline.devices import resolve_device

HEAD_FORMAT = "pipe-head"
HEAD_VERSION = 1
DEFAULT_GRID = tuple(float(s) for s in np.logspace(-6, 0, 16))
VAL_FRACTION = 0.2
CHUNK_ROWS = 8192
PATIENCE_EPOCHS = 3
FTOL = 2.0**-23  # float32 resolution: a smaller relative loss decrease is rounding noise
SPECTRUM_ROWS = 4096
SPECTRUM_RANK = 128
_HEAD_KEYS = ("weight", "bias", "mean", "std", "classes", "fingerprint", "source", "training")


# --------------------------------------------------------------------------- head file


def _standardize(x, mean, std, out=None):
    """Return ``x`` as float32, standardised when ``mean``/``std`` are given.

    With ``out`` (a float32 array of ``x``'s shape) the result is written there, in place.
    """
    if out is None:
        x = np.asarray(x, dtype=np.float32)
        return x if mean is None else (x - mean) / std
    out[:] = x
    if mean is not None:
        out -= mean
        out /= std
    return out


def _row_chunks(n_rows, size=CHUNK_ROWS):
    """Yield ``(start, stop)`` of consecutive row blocks covering ``n_rows``."""
    for start in range(0, n_rows, size):
        yield start, min(start + size, n_rows)


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
        for start, stop in _row_chunks(n_rows):
            x = _standardize(X[start:stop], self.mean, self.std)
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
        """Write the head to ``path`` atomically (temporary file + rename)."""
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


# --------------------------------------------------------------------------- inputs


class RowSubset:
    """A lazy view of some rows of a 2-D array-like (e.g. the train rows of an HDF5 file).

    Supports ``.shape`` and ``view[a:b]``, which is all the mini-batch path reads; each
    slice reads only its own rows (``rows`` are sorted, as h5py requires).
    """

    def __init__(self, data, rows):
        self.data = data
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))

    @property
    def shape(self):
        return (len(self.rows), self.data.shape[1])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return np.asarray(self.data[self.rows[index]])


def _check_split(X, y, name):
    """Validate one split's shapes and labels; return ``y`` as int64."""
    if getattr(X, "ndim", len(getattr(X, "shape", ()))) != 2:
        raise PipeError(f"{name} features must be a 2-D array (samples x dimensions)")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != X.shape[0]:
        raise PipeError(f"{name} has {X.shape[0]} feature rows but {y.size} labels")
    if len(y) == 0:
        raise PipeError(f"{name} split is empty; every class needs labelled images there")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise PipeError(f"{name} labels must be non-negative class indices")
    return y.astype(np.int64)


def _feature_stats(parts):
    """Per-dimension mean and std over all rows of ``parts``; rejects NaN/inf features.

    Reads ``parts`` in row chunks and accumulates in float64 without a float64 copy.
    """
    n_dims = parts[0][1].shape[1]
    total, total_sq, count = np.zeros(n_dims), np.zeros(n_dims), 0
    for name, X, _ in parts:
        part_sum = np.zeros(n_dims)
        for start, stop in _row_chunks(X.shape[0]):
            x = np.asarray(X[start:stop], dtype=np.float32)
            part_sum += x.sum(axis=0, dtype=np.float64)
            total_sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if not np.isfinite(part_sum).all():
            raise PipeError(f"{name} features contain NaN or infinity; re-extract them")
        total += part_sum
        count += X.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std[std < 1e-6 * max(std.max(), 1e-12)] = 1.0  # constant dimensions: leave unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def _holdout(X, y, seed):
    """Split ``(X, y)`` into train and validation parts (stratified when possible)."""
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    train_rows, val_rows = train_test_split(
        np.arange(len(y)), test_size=VAL_FRACTION, stratify=stratify, random_state=seed
    )
    train_rows, val_rows = np.sort(train_rows), np.sort(val_rows)
    take = (lambda rows: X[rows]) if isinstance(X, np.ndarray) else (lambda rows: RowSubset(X, rows))
    return (take(train_rows), y[train_rows]), (take(val_rows), y[val_rows])


def _class_weights(y, n_classes, balanced):
    """Loss weight of each class: 1, or ``n / (n_present_classes * count)`` when balanced."""
    if not balanced:
        return np.ones(n_classes, dtype=np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _accuracies(weights, biases, X, y, mean, std):
    """Accuracy of each of K linear models (K, C, D) / (K, C) on ``(X, y)``, chunked."""
    n_models, n_classes, n_dims = weights.shape
    stacked = np.ascontiguousarray(weights.transpose(2, 0, 1).reshape(n_dims, -1))
    correct = np.zeros(n_models, dtype=np.int64)
    for start, stop in _row_chunks(X.shape[0]):
        scores = _standardize(X[start:stop], mean, std) @ stacked
        predicted = (scores.reshape(-1, n_models, n_classes) + biases).argmax(axis=2)
        correct += (predicted == y[start:stop, None]).sum(axis=0)
    return correct / X.shape[0]


# --------------------------------------------------------------------------- probes


class _SweepProbe:
    """Shared recipe: sweep the L2 strength, select on validation accuracy, refit.

    Subclasses implement ``_fit_grid`` (one model per strength, on train) and
    ``_fit_one`` (one model at the chosen strength, on train + val). Learned attributes:
    ``weight_`` (C, D), ``bias_`` (C,), ``mean_``/``std_`` (D,) or None, ``classes_``
    (class indices seen in train), ``best_strength_``, ``grid_scores_`` (list of
    ``(strength, val_accuracy)``), ``n_iter_`` (optimiser iterations), ``converged_``,
    ``n_train_``, ``n_val_``, ``fit_seconds_``.
    """

    trainer = ""

    def __init__(self, grid, balanced, seed, max_iter, tol, standardize):
        self.grid = grid
        self.balanced = balanced
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize

    def fit(self, X_train, y_train, X_val=None, y_val=None):
        """Train on ``(X_train, y_train)``, selecting the strength on ``(X_val, y_val)``.

        ``X_*`` are (N, D) float arrays or any 2-D array-like with ``.shape`` and row
        slicing (an ``h5py.Dataset``, a :class:`RowSubset`); ``y_*`` are int class indices.
        Without a validation split, a seeded stratified 20% of train is held out for
        selection and the refit uses all of train. A grid of one strength needs no
        selection: the model is fitted once, on train + val, and ``grid_scores_`` is empty.
        Returns ``self``.
        """
        started = time.perf_counter()
        self.grid_ = [float(s) for s in (DEFAULT_GRID if self.grid is None else self.grid)]
        if not self.grid_ or not all(np.isfinite(s) and s > 0 for s in self.grid_):
            raise PipeError(f"L2 strengths must be positive numbers, got {self.grid_}")
        selecting = len(self.grid_) > 1
        y_train = _check_split(X_train, y_train, "train")
        if (X_val is None) != (y_val is None):
            raise PipeError("give both validation features and labels, or neither")
        if X_val is None and selecting:
            (X_train, y_train), (X_val, y_val) = _holdout(X_train, y_train, self.seed)
        parts = [("train", X_train, y_train)]
        if X_val is not None:
            parts.append(("val", X_val, _check_split(X_val, y_val, "val")))
            if X_val.shape[1] != X_train.shape[1]:
                raise PipeError(f"train features have {X_train.shape[1]} dimensions but val has {X_val.shape[1]}")
        self.classes_ = np.unique(y_train)
        if len(self.classes_) < 2:
            raise PipeError(
                f"train-head needs at least 2 classes in the train split, found {len(self.classes_)}"
            )
        unseen = np.setdiff1d(np.unique(parts[-1][2]), self.classes_)
        if len(unseen):
            raise PipeError(f"classes {unseen.tolist()} appear in val but not in train; add train images")
        mean, std = _feature_stats(parts)  # also the finiteness check, so always computed
        self.mean_, self.std_ = (mean, std) if self.standardize else (None, None)
        self.n_train_, self.n_val_ = len(y_train), sum(len(labels) for _, _, labels in parts[1:])
        self.n_iter_ = {}

        if selecting:
            X_val, y_val = parts[1][1:]
            grid_weights, grid_biases = self._fit_grid(parts[:1], val=(X_val, y_val))
            scores = _accuracies(grid_weights, grid_biases, X_val, y_val, self.mean_, self.std_)
            # ties go to the strongest penalty, the simplest model
            best = max(range(len(scores)), key=lambda k: (scores[k], self.grid_[k]))
            self.grid_scores_ = [(s, float(a)) for s, a in zip(self.grid_, scores)]
            init = (grid_weights[best], grid_biases[best])
        else:  # one strength: nothing to choose, so a single fit on train + val
            best, init, self.grid_scores_ = 0, None, []
        self.best_strength_ = self.grid_[best]
        self.weight_, self.bias_ = self._fit_one(parts, best, init)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def to_head(self, classes, fingerprint, source):
        """The fitted model as a :class:`LinearHead` over ``classes`` (all class names).

        Classes absent from train get zero weight and a bias of -inf: never predicted.
        """
        if len(classes) <= self.classes_.max():
            raise PipeError(f"labels go up to {self.classes_.max()} but only {len(classes)} class names were given")
        weight = np.zeros((len(classes), self.weight_.shape[1]), dtype=np.float32)
        bias = np.full(len(classes), -np.inf, dtype=np.float32)
        weight[self.classes_], bias[self.classes_] = self.weight_, self.bias_
        training = {
            "trainer": self.trainer,
            "strength": self.best_strength_,
            "grid_scores": [list(pair) for pair in self.grid_scores_],
            "seconds": round(self.fit_seconds_, 3),
            "n_train": self.n_train_,
            "n_val": self.n_val_,
            "seed": self.seed,
            "balanced": self.balanced,
            "standardize": self.standardize,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
        }
        return LinearHead(weight, bias, self.mean_, self.std_, list(classes), fingerprint, dict(source), training)

    def _encoded(self, parts):
        """Standardised float32 features and class positions (into ``classes_``) of ``parts``."""
        X = np.empty((sum(x.shape[0] for _, x, _ in parts), parts[0][1].shape[1]), dtype=np.float32)
        offset = 0
        for _, x, _ in parts:  # chunk by chunk into place: no full-size temporaries
            for start, stop in _row_chunks(x.shape[0]):
                _standardize(x[start:stop], self.mean_, self.std_, out=X[offset + start: offset + stop])
            offset += x.shape[0]
        y = np.searchsorted(self.classes_, np.concatenate([labels for _, _, labels in parts]))
        return X, y

    def _fit_grid(self, parts, val):
        raise NotImplementedError

    def _fit_one(self, parts, index, init):
        raise NotImplementedError


class LinearProbe(_SweepProbe):
    """Torch linear probe: the whole strength grid is trained at once, in one batched computation.

    Full batch (default): features are moved to ``device`` once and the K grid points
    are trained together by a batched L-BFGS (:func:`_batched_lbfgs`): one (D, K*C)
    matrix product per evaluation serves every model, while each model keeps its own
    curvature history and step length and stops on scikit-learn's rule (largest gradient
    entry <= ``tol``, at most ``max_iter`` iterations). Its initial inverse Hessian is the
    exact one at the start (:class:`_Preconditioner`), which cuts the iterations several-fold
    on real features. The refit starts from the chosen grid solution.

    Mini-batch (``batch_size`` set, or features not an in-memory ndarray such as an
    ``h5py.Dataset``): contiguous row chunks are streamed, the K models trained together
    with Adam (learning rate ``lr``) for up to ``max_epochs``, each kept at its best
    validation epoch (early stopping after ``PATIENCE_EPOCHS`` epochs without any
    improvement); the refit trains from scratch on train + val for the chosen model's
    best epoch count (learned ``best_epochs_``). Memory is bounded by the chunk size.
    """

    trainer = "linear"

    def __init__(self, grid=None, balanced=False, seed=0, device="auto", max_iter=100, tol=1e-4,
                 standardize=True, batch_size=None, max_epochs=30, lr=1e-2):
        super().__init__(grid, balanced, seed, max_iter, tol, standardize)
        self.device = device
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.lr = lr

    def _streaming(self, parts):
        return self.batch_size is not None or not all(isinstance(x, np.ndarray) for _, x, _ in parts)

    def _fit_grid(self, parts, val):
        if self._streaming(parts):
            weights, biases, self.best_epochs_ = self._adam(parts, self.grid_, self.max_epochs, val)
            self.n_iter_["sweep_epochs"] = self.best_epochs_.tolist()
            return weights, biases
        X, y = self._encoded(parts)
        weights, biases, self.n_iter_["sweep"] = self._lbfgs(X, y, self.grid_, init=None)
        return weights, biases

    def _fit_one(self, parts, index, init):
        strength = [self.grid_[index]]
        if self._streaming(parts):
            epochs = self.max_epochs if init is None else max(int(self.best_epochs_[index]), 1)
            weights, biases, _ = self._adam(parts, strength, epochs, val=None)
            self.n_iter_["refit_epochs"] = epochs
            self.converged_ = True
        else:
            X, y = self._encoded(parts)
            start = None if init is None else (init[0][None], init[1][None])
            weights, biases, n_iter = self._lbfgs(X, y, strength, init=start)
            self.n_iter_["refit"] = n_iter[0]
            self.converged_ = max(self.n_iter_.get("sweep", []) + n_iter) < self.max_iter
        return weights[0], biases[0]

    def _lbfgs(self, X, y, strengths, init):
        """Fit one model per strength with batched, preconditioned L-BFGS.

        Returns weights (K, C, D), biases (K, C) and the iterations each model took. A fit
        from scratch measures the feature spectrum behind the preconditioner; a refit
        started from a sweep's solution (``init``) reuses the sweep's.
        """
        device = resolve_device(self.device)
        n_classes = len(self.classes_)
        X_t = torch.from_numpy(X).to(device)
        y_t = torch.from_numpy(y).to(device)
        if init is None:
            self._spectrum = _FeatureSpectrum(X_t, self.seed)
        sw = torch.from_numpy(_class_weights(y, n_classes, self.balanced)[y] / len(y)).to(device)
        lam = torch.tensor(strengths, dtype=torch.float32, device=device)
        if init is None:
            params = torch.zeros(len(strengths), X.shape[1] + 1, n_classes, device=device)
        else:  # rows 0..D-1 hold W (K, D, C), the last row the bias
            weight, bias = init
            params = torch.from_numpy(np.concatenate([weight.transpose(0, 2, 1), bias[:, None]], axis=1)).to(device)
        params, n_iter = _batched_lbfgs(
            lambda P, rows: _loss_and_grad(X_t, y_t, sw, P, lam[rows]), params, self.max_iter, self.tol,
            _Preconditioner(self._spectrum, lam, n_classes),
        )
        params = params.cpu().numpy()
        return np.ascontiguousarray(params[:, :-1].transpose(0, 2, 1)), params[:, -1], n_iter

    def _adam(self, parts, strengths, epochs, val):
        """Mini-batch training of K models over streamed chunks; returns weights, biases, best epochs."""
        device = resolve_device(self.device)
        n_classes, n_dims, n_models = len(self.classes_), parts[0][1].shape[1], len(strengths)
        labels = np.searchsorted(self.classes_, np.concatenate([y for _, _, y in parts]))
        class_weight = torch.from_numpy(_class_weights(labels, n_classes, self.balanced)).to(device)
        lam = torch.tensor(strengths, dtype=torch.float32, device=device)
        generator = torch.Generator().manual_seed(self.seed)
        weight = torch.zeros(n_models, n_dims, n_classes, device=device, requires_grad=True)
        bias = torch.zeros(n_models, n_classes, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.lr)
        batch = self.batch_size or CHUNK_ROWS
        chunks = [(X, y, start, stop) for _, X, y in parts for start, stop in _row_chunks(X.shape[0], batch)]
        best_acc = np.full(n_models, -1.0)
        best_epoch = np.zeros(n_models, dtype=np.int64)
        best_w, best_b = np.zeros((n_models, n_classes, n_dims), np.float32), np.zeros((n_models, n_classes), np.float32)
        for epoch in range(1, epochs + 1):
            for i in torch.randperm(len(chunks), generator=generator).tolist():
                X, y, start, stop = chunks[i]
                x = torch.from_numpy(_standardize(X[start:stop], self.mean_, self.std_)).to(device)
                target = torch.from_numpy(np.searchsorted(self.classes_, y[start:stop])).to(device)
                logits = torch.einsum("nd,kdc->nkc", x, weight) + bias
                ce = torch.nn.functional.cross_entropy(
                    logits.permute(0, 2, 1), target[:, None].expand(-1, n_models),
                    weight=class_weight, reduction="none").mean(0)
                loss = (ce + lam / 2 * weight.square().sum((1, 2))).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            current_w = weight.detach().transpose(1, 2).cpu().numpy()
            current_b = bias.detach().cpu().numpy()
            if val is None:
                best_w, best_b = current_w, current_b
                continue
            acc = _accuracies(current_w, current_b, val[0], np.searchsorted(self.classes_, val[1]), self.mean_, self.std_)
            improved = acc > best_acc
            best_acc[improved], best_epoch[improved] = acc[improved], epoch
            best_w[improved], best_b[improved] = current_w[improved], current_b[improved]
            if epoch - best_epoch.max() >= PATIENCE_EPOCHS:
                break
        return best_w, best_b, best_epoch


def _loss_and_grad(X, y, sw, params, lam):
    """Loss (k,) float64 and gradient (k, D+1, C) of k models on all rows.

    Model j has weight ``params[j, :-1]`` (D, C) and bias ``params[j, -1]``; its loss is
    the ``sw``-weighted sum of cross-entropies (``sw`` sums to 1) plus
    ``lam[j] / 2 * ||W_j||^2``. Rows are processed in chunks so the (rows, k, C)
    intermediates stay bounded; all k models share one (D, k*C) product per chunk.
    """
    n_models, n_rows_w, n_classes = params.shape
    stacked = params[:, :-1].permute(1, 0, 2).reshape(n_rows_w - 1, n_models * n_classes)
    bias = params[:, -1]
    loss = torch.zeros(n_models, dtype=torch.float64, device=X.device)
    grad_stacked = torch.zeros_like(stacked)
    grad_bias = torch.zeros_like(bias)
    for start, stop in _row_chunks(X.shape[0]):
        x, target, w = X[start:stop], y[start:stop], sw[start:stop, None]
        index = target[:, None, None].expand(-1, n_models, 1)
        log_p = torch.log_softmax((x @ stacked).view(-1, n_models, n_classes) + bias, dim=2)
        loss -= (w * log_p.gather(2, index).squeeze(2)).sum(0, dtype=torch.float64)
        residual = log_p.exp_()  # softmax - one_hot, weighted: d loss / d logits
        residual.scatter_add_(2, index, torch.full(index.shape, -1.0, device=X.device))
        residual.mul_(w[:, :, None])
        grad_stacked.addmm_(x.T, residual.view(-1, n_models * n_classes))
        grad_bias += residual.sum(0)
    weight = params[:, :-1]
    loss += (lam / 2 * weight.square().sum((1, 2))).double()
    grad_weight = grad_stacked.view(-1, n_models, n_classes).permute(1, 0, 2) + lam[:, None, None] * weight
    return loss, torch.cat([grad_weight, grad_bias[:, None]], dim=1)


class _FeatureSpectrum:
    """The leading eigenpairs of the (standardised) features' second moment ``E[x x^T]``.

    The preconditioner needs the spectrum's shape, not its exact value, so it is estimated
    on a seeded sample of at most ``SPECTRUM_ROWS`` rows: the top ``SPECTRUM_RANK``
    eigenpairs by seeded randomized subspace iteration, and the rest of the spectrum taken
    as flat at its mean (``rest``). With few dimensions every eigenpair is computed
    exactly and ``rest`` is None. On 1,280-dimensional features 128 eigenpairs save about
    as many iterations as all of them, at a fraction of the cost (``eigh`` grows as D^3).
    """

    def __init__(self, X, seed):
        n_rows, n_dims = X.shape
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n_rows, generator=generator)[:SPECTRUM_ROWS].sort().values
        sample = X[rows.to(X.device)]
        if n_dims <= 4 * SPECTRUM_RANK:
            values, self.vectors = torch.linalg.eigh(sample.T @ sample / len(rows))
            self.values, self.rest = values.clamp_min(0), None
            return
        basis = torch.randn(n_dims, SPECTRUM_RANK, generator=generator).to(X.device)
        for _ in range(3):  # subspace iteration: the basis turns toward the top eigenvectors
            basis = torch.linalg.qr(sample.T @ (sample @ basis)).Q
        projected = sample @ basis
        values, rotation = torch.linalg.eigh(projected.T @ projected / len(rows))
        self.values, self.vectors = values.clamp_min(0), basis @ rotation
        total = float(sample.square().sum()) / len(rows)
        self.rest = max(total - float(self.values.sum()), 0.0) / (n_dims - SPECTRUM_RANK)


class _Preconditioner:
    """The inverse Hessian of k models' losses at the start, applied to (k, D+1, C) tensors.

    At W = 0 every prediction is uniform over the C classes, so model j's Hessian is
    exactly ``S (x) P / C + lambda_j`` on the weights and ``P / C`` on the bias, where S is
    the features' second moment (:class:`_FeatureSpectrum`, V diag(e) V^T) and
    ``P = I - 11^T / C`` centres over classes. Along 1 (every class shifted alike) the
    weights feel only ``lambda_j`` and the bias nothing: softmax ignores such a shift.
    As L-BFGS's initial inverse Hessian it makes the first step Newton's, and the
    curvature pairs only have to follow how the Hessian drifts from there, which cuts the
    iterations on badly conditioned features several-fold. One application costs two
    (D, r) x (r, k*C) products.
    """

    def __init__(self, spectrum, strengths, n_classes):
        self.spectrum, self.strengths, self.curvature = spectrum, strengths, 1.0 / n_classes

    def _parts(self, rows, g):
        """Split ``g`` into its class-mean and class-centred parts, in the eigenbasis."""
        n_models, n_weight_rows, n_classes = g.shape[0], g.shape[1] - 1, g.shape[2]
        mean = g.mean(2, keepdim=True)
        centred = g - mean
        flat = centred[:, :-1].permute(1, 0, 2).reshape(n_weight_rows, n_models * n_classes)
        lam = self.strengths[rows].repeat_interleave(n_classes)
        inverse = 1.0 / (self.curvature * self.spectrum.values[:, None] + lam)
        inverse_rest = None if self.spectrum.rest is None else 1.0 / (self.curvature * self.spectrum.rest + lam)
        return mean, centred, flat, self.spectrum.vectors.T @ flat, inverse, inverse_rest

    def apply(self, rows, g):
        """``M^-1 g`` for the models ``rows``."""
        mean, centred, flat, coef, inverse, inverse_rest = self._parts(rows, g)
        if inverse_rest is None:
            out = self.spectrum.vectors @ (coef * inverse)
        else:  # the unknown eigenvectors span what the known ones leave of flat
            out = self.spectrum.vectors @ (coef * (inverse - inverse_rest)) + flat * inverse_rest
        weights = out.view(g.shape[1] - 1, *g.shape[::2]).permute(1, 0, 2)
        weights += mean[:, :-1] / self.strengths[rows, None, None]
        return torch.cat([weights, centred[:, -1:] / self.curvature], dim=1)

    def inner(self, rows, g):
        """``g . M^-1 g`` (k,) float64 for the models ``rows``, with one matrix product."""
        mean, centred, flat, coef, inverse, inverse_rest = self._parts(rows, g)
        n_classes = g.shape[2]

        def per_model(t):
            return t.view(t.shape[0], -1, n_classes).sum((0, 2), dtype=torch.float64)

        total = per_model(coef.square() * inverse)
        if inverse_rest is not None:
            total += per_model((flat.square().sum(0) - coef.square().sum(0)).clamp_min(0)[None] * inverse_rest)
        total += n_classes * mean[:, :-1].square().sum((1, 2), dtype=torch.float64) / self.strengths[rows].double()
        return total + centred[:, -1].square().sum(1, dtype=torch.float64) / self.curvature


def _batched_lbfgs(objective, params, max_iter, tol, preconditioner, history=10, max_backtracks=20):
    """Minimise K independent smooth functions at once with preconditioned L-BFGS.

    ``objective(P, rows)`` returns the losses (k,) and gradients of the models ``rows``
    at parameters ``P`` (k, ...); ``preconditioner`` (``apply``/``inner``, see
    :class:`_Preconditioner`) is each model's initial inverse Hessian, scaled by the
    latest curvature pair. Every model keeps its own curvature pairs and step length
    (Armijo backtracking with quadratic interpolation) and stops, like scipy and
    scikit-learn, when its largest gradient entry is at most ``tol``, or when an
    iteration no longer lowers its loss by more than float32 can resolve (``FTOL``,
    relative). Stopped models leave the batch, so later evaluations only pay for those
    still running. Returns the parameters and the iterations each model took.

    The losses must be bounded below by 0 (cross-entropy plus a penalty is). A line
    search first tries at most ``2 * loss / |slope|``: the step to the minimum of the
    parabola through the loss and slope whose lowest value is 0. A step predicted to
    lower the loss by more than the loss itself is one the local model cannot be trusted
    for; far from the solution on nearly separable classes, the first (Newton) step is
    such a step, and trying it as is overshoots to a loss several times higher.
    """
    n_models, device = params.shape[0], params.device
    every = torch.arange(n_models, device=device)
    loss, grad = objective(params, every)
    pairs = []  # (s, y, 1 / s.y) per iteration; rho = 0 marks a skipped pair
    scale = torch.ones(n_models, dtype=torch.float64, device=device)  # s.y / y.M^-1.y of the latest pair
    first_step = torch.ones(n_models, dtype=torch.float64, device=device)  # where each line search starts
    n_iter = torch.zeros(n_models, dtype=torch.int64, device=device)
    done = torch.zeros(n_models, dtype=torch.bool, device=device)

    def dot(a, b):
        return (a * b).flatten(1).sum(1, dtype=torch.float64)

    def scaled(factor, t):  # each model's slice of t times its factor
        return factor.view(-1, *[1] * (t.dim() - 1)).to(t.dtype) * t

    for _ in range(max_iter):
        done |= grad.flatten(1).abs().amax(1) <= tol
        rows = every[~done]
        if len(rows) == 0:
            break
        g = grad[rows]
        q, alphas = g.clone(), []
        for s, y, rho in reversed(pairs):
            alpha = rho[rows] * dot(s[rows], q)
            q -= scaled(alpha, y[rows])
            alphas.append(alpha)
        q = scaled(scale[rows], preconditioner.apply(rows, q))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            beta = rho[rows] * dot(y[rows], q)
            q += scaled(alpha - beta, s[rows])
        direction = -q
        slope = dot(g, direction)
        step = torch.minimum(first_step[rows], 2 * loss[rows] / -slope)  # see the docstring
        new_loss, new_grad = objective(params[rows] + scaled(step, direction), rows)
        pending = torch.ones(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_backtracks):
            pending = ~(new_loss <= loss[rows] + 1e-4 * step * slope)  # NaN counts as failure
            if not pending.any():
                break
            # minimiser of the quadratic through loss, slope and the failed trial
            curvature = 2 * (new_loss - loss[rows] - step * slope) / step.square()
            guess = torch.where(curvature > 0, -slope / curvature, 0.5 * step)
            step = torch.where(pending, torch.clamp(guess, 0.1 * step, 0.5 * step), step)
            retry = pending.nonzero().squeeze(1)
            trial = params[rows[retry]] + scaled(step[retry], direction[retry])
            new_loss[retry], new_grad[retry] = objective(trial, rows[retry])
        done[rows[pending]] = True  # no decrease along a descent direction: at float precision
        accepted = ~pending
        ok = rows[accepted]
        decrease = loss[ok] - new_loss[accepted]
        done[ok] |= decrease <= FTOL * torch.maximum(loss[ok].abs(), new_loss[accepted].abs()).clamp_min(1.0)
        s = torch.zeros_like(params)
        y = torch.zeros_like(params)
        s[ok] = scaled(step[accepted], direction[accepted])
        y[ok] = new_grad[accepted] - grad[ok]
        params[ok] += s[ok]
        loss[ok], grad[ok] = new_loss[accepted], new_grad[accepted]
        n_iter[ok] += 1
        # a model that had to backtrack tries at most twice its accepted step next time
        first_step[ok] = (2 * step[accepted]).clamp(max=1.0)
        sy = dot(s, y)
        curved = sy > 1e-10 * dot(y, y).sqrt() * dot(s, s).sqrt()
        pairs = (pairs + [(s, y, torch.where(curved, 1.0 / sy, 0.0))])[-history:]
        fresh = ok[curved[ok]]
        scale[fresh] = sy[fresh] / preconditioner.inner(fresh, y[fresh]).clamp_min(1e-30)
    return params, n_iter.tolist()


class SklearnProbe(_SweepProbe):
    """The scikit-learn baseline: one ``LogisticRegression(solver="lbfgs")`` per strength.

    Strength ``lambda`` maps to ``C = 1 / (lambda * n)`` (``n`` rows being fitted), the
    same objective as :class:`LinearProbe`. Features must fit in memory.
    """

    trainer = "sklearn"

    def __init__(self, grid=None, balanced=False, seed=0, max_iter=1000, tol=1e-4, standardize=True):
        super().__init__(grid, balanced, seed, max_iter, tol, standardize)

    def _fit_grid(self, parts, val):
        X, y = self._encoded(parts)
        fits = [self._logistic(X, y, strength) for strength in self.grid_]
        self.n_iter_["sweep"] = [n_iter for _, _, n_iter in fits]
        return np.stack([w for w, _, _ in fits]), np.stack([b for _, b, _ in fits])

    def _fit_one(self, parts, index, init):
        X, y = self._encoded(parts)
        weight, bias, n_iter = self._logistic(X, y, self.grid_[index])
        self.n_iter_["refit"] = n_iter
        self.converged_ = max(self.n_iter_.get("sweep", []) + [n_iter]) < self.max_iter
        return weight, bias

    def _logistic(self, X, y, strength):
        """Fit one model at ``strength``; returns multinomial (C, D), (C,) and iterations.

        With two classes scikit-learn fits a binary model ``w``; the multinomial model
        with the same penalty is ``[-w/2, w/2]``, which needs ``C = 2 / (lambda * n)``.
        """
        binary = len(self.classes_) == 2
        model = LogisticRegression(
            C=(2.0 if binary else 1.0) / (strength * len(y)), solver="lbfgs",
            max_iter=self.max_iter, tol=self.tol, class_weight="balanced" if self.balanced else None,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported via converged_
            model.fit(X, y)
        weight, bias = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
        if binary:
            weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
        return weight, bias, int(np.max(model.n_iter_))


PROBES = {"linear": LinearProbe, "sklearn": SklearnProbe}


def make_probe(kind, **params):
    """Build the trainer named ``kind`` ("linear" or "sklearn") with its parameters."""
    if kind not in PROBES:
        raise PipeError(f"unknown head trainer {kind!r}; choose one of {', '.join(PROBES)}")
    accepted = inspect.signature(PROBES[kind]).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise PipeError(f"head trainer {kind!r} does not take {', '.join(unknown)}")
    return PROBES[kind](**params)
