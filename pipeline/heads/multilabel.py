"""Multi-label heads: C independent logistic classifiers (sigmoid outputs), each with its own
decision threshold, and :class:`MultiLabelClassifier`, the scikit-learn estimator that trains them.

The estimator follows the linear classifier's recipe (:mod:`pipeline.heads.probes`) with multi-hot
targets: one batched sweep of the L2 strength over every class at once (each (strength, class)
pair is its own problem for the batched L-BFGS, :mod:`pipeline.heads.logistic`), the strength
chosen by mean average precision where :mod:`pipeline.heads.selection` says (val, a hold-out,
k-fold cross-validation or a default), each class's threshold chosen to maximise its F1 on the
same held-out predictions, and a refit on train + val. ``trainer="sklearn"`` fits the same
grid with one scikit-learn ``LogisticRegression`` per strength and class (one-vs-rest).

Like scikit-learn's ``OneVsRestClassifier``, it also takes one label per row: then each class is
one of those logistic classifiers against the rest (a single one for two classes), and the most
probable class is predicted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit
from sklearn import metrics
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d

from pipeline import defaults
from pipeline.devices import resolve_device
from pipeline.errors import PipeValueError
from pipeline.heads.estimator import HeadEstimator
from pipeline.heads.features import feature_stats, standardized_parts
from pipeline.heads.head_file import LinearHead
from pipeline.heads.lbfgs import CONVERGED, MAX_ITER
from pipeline.heads.logistic import fit_logistic, start_params
from pipeline.heads.multinomial import FeatureSpectrum, threads_for
from pipeline.heads.probes import sklearn_logistic, strength_grid
from pipeline.heads.selection import DEFAULT_STRENGTH, STRENGTH, merge_records, plan_selection, split_parts
from pipeline.metrics import average_precisions
from pipeline.scan import split_strata

# The threshold of a class whose threshold could not be chosen (no held-out positives, or no
# held-out rows at all): a probability of one half, the logistic model's own decision point.
DEFAULT_THRESHOLD = 0.5
TRAINERS = ("linear", "sklearn")


@dataclass
class MultilabelHead(LinearHead):
    """A trained multi-label classifier on features: each class's probability is
    ``sigmoid(standardise(x) @ weight[c] + bias[c])``, and a class is predicted when its
    probability is at least ``thresholds[c]``. A class never seen positive in training has
    bias -inf (probability 0). Stored like a linear head plus ``thresholds`` (C,) float32."""

    thresholds: np.ndarray | None = None

    kind = "multilabel"
    payload_keys = LinearHead.payload_keys + ("thresholds",)

    def describe(self) -> str:
        return f"{len(self.classes)} classes x {self.feature_dim} features (multi-label: sigmoid + per-class thresholds)"

    def predict_proba(self, X):
        """Each class's probability (N, C), independently of the others (rows need not sum to 1)."""
        return expit(self.decision_function(X))

    def predict(self, X):
        """Multi-hot predictions (N, C) uint8: 1 where a class's probability reaches its threshold."""
        return (self.predict_proba(X) >= self.thresholds).astype(np.uint8)

    def top_labels(self, probabilities, k):
        """Every class whose probability reaches its threshold, most probable first (``k``
        does not apply: a multi-label head shows all of them)."""
        above = np.flatnonzero(probabilities >= self.thresholds)
        return [(self.classes[c], float(probabilities[c])) for c in above[np.argsort(-probabilities[above])]]

    def to_payload(self) -> dict:
        return {**super().to_payload(), "thresholds": np.asarray(self.thresholds, np.float32)}


def f1_thresholds(targets, proba):
    """Each class's F1-optimal threshold (C,) float32 on held-out ``proba`` against ``targets``
    (N, C): halfway between the lowest probability of the best-F1 cut and the next lower one
    (a margin on both sides), rounded down to float32 so the cut keeps every image it chose;
    ``DEFAULT_THRESHOLD`` for a class without a held-out positive. Returns the thresholds and
    the indices of those defaulted classes."""
    thresholds = np.full(targets.shape[1], DEFAULT_THRESHOLD, dtype=np.float32)
    for c in range(targets.shape[1]):
        if targets[:, c].any():
            precision, recall, cuts = metrics.precision_recall_curve(targets[:, c], proba[:, c])
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            cut = cuts[int(np.argmax(f1[:-1]))]
            below = proba[:, c][proba[:, c] < cut]
            threshold = (cut + below.max()) / 2 if len(below) else cut
            rounded = np.float32(threshold)
            thresholds[c] = np.nextafter(rounded, np.float32(0)) if rounded > threshold else rounded
    return thresholds, np.flatnonzero(~targets.any(axis=0))


class MultiLabelClassifier(HeadEstimator):
    """Trains a :class:`MultilabelHead` (see the module docstring).

    ``trainer`` is "linear" (the batched torch L-BFGS) or "sklearn"; ``max_iter`` None is the
    trainer's default; ``class_names`` name the target columns in warnings. Learned attributes,
    as :class:`~pipeline.heads.LinearClassifier` names them: ``classes_`` (the column indices
    of multi-hot targets; the labels when given one label per row), ``multilabel_`` (whether
    the targets were multi-hot), ``weight_`` (K, D), ``bias_`` (K,) (one row per target
    column: per class, a single one for two labels), ``mean_``/``std_``, ``thresholds_``
    (K,), ``best_strength_``, ``selection_``, ``grid_scores_`` (``(strength, mAP)`` on the
    rows scored: val, a hold-out, or every row once across the cross-validation folds),
    ``iterations_``/``stop_`` (per strength, over its classes: the most iterations, and
    "converged" only if every class converged), ``n_iter_`` (the final fit's most
    iterations), ``converged_``, ``warnings_``, ``n_train_``, ``n_val_``,
    ``sweep_seconds_`` (choosing the strength and thresholds) and ``fit_seconds_`` (all of it).
    """

    parameter = STRENGTH
    score_name = "mAP"
    recorded = {"standardize": "standardize", "n_iter": "iterations_", "converged": "converged_", "stop": "stop_"}

    def __init__(self, *, trainer=defaults.HEAD_KIND, grid=None, seed=defaults.SEED, device=defaults.DEVICE,
                 max_iter=None, tol=defaults.TOL, standardize=True, selection=defaults.SELECTION, class_names=None):
        self.trainer = trainer
        self.grid = grid
        self.seed = seed
        self.device = device
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.selection = selection
        self.class_names = class_names

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.classifier_tags.multi_label = True
        return tags

    @property
    def _iteration_cap(self):
        """``max_iter``, or the trainer's default."""
        return self.max_iter or defaults.MAX_ITER[self.trainer]

    @property
    def best_value_(self):
        """The chosen strength, under the name every trainer shares."""
        return self.best_strength_

    def fit(self, X, Y, X_val=None, Y_val=None):
        """Train on features ``X`` (N, D) and multi-hot ``Y`` (N, C) (or one label
        per row), choosing the strength and the thresholds with ``(X_val, Y_val)`` when given
        and large enough (else a hold-out or k-fold cross-validation over train + val).
        Returns ``self``."""
        started = time.perf_counter()
        if self.trainer not in TRAINERS:
            raise PipeValueError(f"unknown head trainer {self.trainer!r}; choose one of {', '.join(TRAINERS)}")
        self.grid_ = strength_grid(self.grid)
        parts = self._target_parts(X, Y, X_val, Y_val)
        mean, std = feature_stats(parts)
        self.mean_, self.std_ = (mean, std) if self.standardize else (None, None)
        pool = np.concatenate([Y for _, _, Y in parts])
        strata = np.split(split_strata(pool), [len(parts[0][2])])[:len(parts)]
        self.selection_, splits = plan_selection(strata, len(self.grid_), mode=self.selection, seed=self.seed)
        self.n_train_, self.n_val_ = len(parts[0][2]), len(pool) - len(parts[0][2])
        self.iterations_, self.stop_, self.grid_scores_, self.warnings_ = {}, {}, [], []
        self.thresholds_ = np.full(pool.shape[1], DEFAULT_THRESHOLD, dtype=np.float32)
        init, self.sweep_seconds_ = None, 0.0
        if splits:
            init = self._select(parts, splits)
            self.sweep_seconds_ = time.perf_counter() - started
        else:
            self.best_strength_ = self.grid_[0] if self.selection_.method == "given" else DEFAULT_STRENGTH
            self.warnings_.append(f"no held-out images to choose thresholds on: every class's is "
                                  f"{DEFAULT_THRESHOLD:g}" + (f" and the L2 strength is {DEFAULT_STRENGTH:g} "
                                                              f"({self.selection_.reason})"
                                                              if self.selection_.method == "default" else ""))
        weights, biases, record = self._fit_grid(parts, [self.best_strength_], init)
        self.weight_, self.bias_ = weights[0], biases[0]
        self.n_iter_, self.stop_["refit"] = record["n_iter"][0], record["stop"][0]
        self.iterations_["refit"] = self.n_iter_
        self._check(pool)
        self.__dict__.pop("_spectrum", None)  # the sweep's, handed to the refit; not part of the model
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def _target_parts(self, X_train, Y_train, X_val, Y_val):
        """The parts to learn from, checked, with multi-hot targets (N, K) uint8: as given, or
        made from one label per row (one column per class; one column, the second class, for
        two). Sets ``classes_`` and ``multilabel_``."""
        if (X_val is None) != (Y_val is None):
            raise PipeValueError("give both validation features and targets, or neither")
        X_train, Y_train = self._check_Xy(X_train, Y_train, "train", reset=True, multi_output=True)
        if X_val is not None:
            X_val, Y_val = self._check_Xy(X_val, Y_val, "val", reset=False, multi_output=True)
        kind = type_of_target(Y_train, input_name="train targets")
        self.multilabel_ = kind == "multilabel-indicator"
        if self.multilabel_:
            self.classes_ = np.arange(Y_train.shape[1])
            if Y_val is not None and (Y_val.ndim != 2 or Y_val.shape[1] != Y_train.shape[1]
                                      or not np.isin(Y_val, (0, 1)).all()):
                raise PipeValueError(f"val targets must be multi-hot (0 or 1) with {Y_train.shape[1]} columns, "
                                     f"like train's; got shape {Y_val.shape}")
            targets = [Y_train.astype(np.uint8)] + ([Y_val.astype(np.uint8)] if Y_val is not None else [])
        elif kind in ("binary", "multiclass"):
            labels = self._encoded_labels(column_or_1d(Y_train, warn=True),
                                          None if Y_val is None else column_or_1d(Y_val, warn=True))
            columns = np.arange(len(self.classes_))[-1:] if len(self.classes_) == 2 else np.arange(len(self.classes_))
            targets = [(y[:, None] == columns).astype(np.uint8) for y in labels if y is not None]
        else:
            raise PipeValueError(f"Unknown label type {kind!r}: targets must be multi-hot (0 or 1, n_samples x "
                                 "n_classes) or one label per row")
        return [(name, X, Y) for name, X, Y in zip(("train", "val"), (X_train, X_val), targets)]

    def _select(self, parts, splits):
        """Sweep the grid on each split, score every strength by mAP on the rows held out,
        choose it and the thresholds; returns the split's solution at the chosen strength
        to start the refit from (None after cross-validation)."""
        scored, proba, records = [], [], []
        for mask in splits:
            fit_parts, score_parts = split_parts(parts, mask)
            weights, biases, record = self._fit_grid(fit_parts, self.grid_, None)
            X = standardized_parts(score_parts, self.mean_, self.std_)
            proba.append(expit(np.einsum("nd,kcd->knc", X, weights) + biases[:, None]))
            scored.append(np.concatenate([Y for _, _, Y in score_parts]))
            records.append(record)
        scored, proba = np.concatenate(scored), np.concatenate(proba, axis=1)  # each row held out once
        scores = [float(np.nanmean(average_precisions(scored, p))) if scored.any() else 0.0 for p in proba]
        best = max(range(len(scores)), key=lambda k: (scores[k], self.grid_[k]))  # ties: the strongest
        self.grid_scores_ = list(zip(self.grid_, scores))
        self.best_strength_ = self.grid_[best]
        self.thresholds_, defaulted = f1_thresholds(scored, proba[best])
        if len(defaulted):
            self.warnings_.append(f"{len(defaulted)} class(es) have no positive among the {len(scored)} held-out "
                                  f"images ({self._names(defaulted)}): their threshold is {DEFAULT_THRESHOLD:g}")
        merged = merge_records(records)
        self.iterations_["sweep"], self.stop_["sweep"] = merged["n_iter"], merged["stop"]
        if len(records) > 1:
            self.iterations_["folds"], self.stop_["folds"] = [r["n_iter"] for r in records], [r["stop"] for r in records]
            return None
        return weights[best:best + 1], biases[best:best + 1]

    def _fit_grid(self, parts, strengths, init):
        """One model per strength on ``parts``, each of C classes: weights (K, C, D), biases
        (K, C), and a record of iterations and stops per strength (merged over classes)."""
        X = standardized_parts(parts, self.mean_, self.std_)
        Y = np.concatenate([Y for _, _, Y in parts])
        if self.trainer == "sklearn":
            fits = [[self._sklearn_fit(X, Y[:, c], s) for c in range(Y.shape[1])] for s in strengths]
            weights = np.array([[w for w, _, _, _ in row] for row in fits], dtype=np.float32)
            biases = np.array([[b for _, b, _, _ in row] for row in fits], dtype=np.float32)
            n_iter = np.array([[n for _, _, n, _ in row] for row in fits])
            stops = [[stop for _, _, _, stop in row] for row in fits]
        else:
            weights, biases, n_iter, stops = self._torch_fit(X, Y, strengths, init)
        record = {"n_iter": n_iter.max(axis=1).tolist(), "epochs": None,
                  "stop": [next((s for s in row if s != CONVERGED), CONVERGED) for row in stops]}
        return weights, biases, record

    def _torch_fit(self, X, Y, strengths, init):
        device = resolve_device(self.device)
        n_classes, n_dims = Y.shape[1], X.shape[1]
        X_t, Y_t = torch.from_numpy(X).to(device), torch.from_numpy(Y.astype(np.float32)).to(device)
        lam = torch.tensor(strengths, dtype=torch.float32, device=device).repeat_interleave(n_classes)
        params, curvature = start_params(Y_t, n_dims, len(strengths))
        if init is not None:
            params = torch.from_numpy(np.concatenate([init[0], init[1][..., None]], axis=2)).reshape(-1, n_dims + 1)
            params = params.to(device)
        with threads_for(X.size, device):
            if init is None:
                self._spectrum = FeatureSpectrum(X_t, seed=self.seed)
            result = fit_logistic(X_t, Y_t, lam, params, curvature, self._spectrum, max_iter=self._iteration_cap, tol=self.tol)
        params = result.params.cpu().numpy().reshape(len(strengths), n_classes, n_dims + 1)
        shape = (len(strengths), n_classes)
        return (np.ascontiguousarray(params[..., :-1]), np.ascontiguousarray(params[..., -1]),
                np.array(result.n_iter).reshape(shape), np.array(result.stop).reshape(shape).tolist())

    def _sklearn_fit(self, X, y, strength):
        """One-vs-rest: a scikit-learn binary fit of one class at ``strength`` (C = 1 / (lambda n)),
        or, for a class that is all positive or all negative here, zero weights and its
        clipped log-odds."""
        if y.min() == y.max():
            prior = np.clip(y.mean(), 1e-3, 1 - 1e-3)
            return np.zeros(X.shape[1], np.float32), np.float32(np.log(prior / (1 - prior))), 0, CONVERGED
        weight, bias, n_iter, stop = sklearn_logistic(X, y, 1.0 / (strength * len(y)), max_iter=self._iteration_cap,
                                                      tol=self.tol)
        return weight[0], bias[0], n_iter, stop

    def _names(self, indices):
        names = [self.class_names[c] if self.class_names else f"class {c}" for c in indices[:5]]
        return ", ".join(names) + (" ..." if len(indices) > 5 else "")

    def _check(self, pool):
        """Classes with no positive in train + val are never predicted (bias -inf); warn about
        them, an unconverged final fit, and a head no better than chance where it was chosen."""
        self.converged_ = all(stop == CONVERGED for stop in [*(self.stop_.get("sweep") or []), self.stop_["refit"]])
        absent = np.flatnonzero(~pool.any(axis=0))
        if len(absent):
            self.bias_[absent] = -np.inf
            self.warnings_.append(f"{len(absent)} class(es) have no positive image in train + val "
                                  f"({self._names(absent)}): the head never predicts them")
        if self.stop_["refit"] != CONVERGED:
            why = f"reached --max-iter ({self._iteration_cap})" if self.stop_["refit"] == MAX_ITER else "its line search failed"
            self.warnings_.append(f"the final fit did not converge: {why}; its weights are the last accepted step")
        if self.grid_scores_:
            chance = float(pool.mean(axis=0)[pool.any(axis=0)].mean())  # the mAP of a random ranking
            score = dict(self.grid_scores_)[self.best_strength_]
            if score <= chance + 1e-9:
                self.warnings_.append(f"the head is at chance level: mAP {score:.3f} on held-out images, the same "
                                      f"as a random ranking ({chance:.3f})")

    def _class_rows(self, class_names):
        """A multi-label head names every target column; labels given one per row make no head file."""
        check_is_fitted(self)
        if not self.multilabel_:
            raise PipeValueError("a multi-label head is made from multi-hot targets (n_samples x n_classes); "
                                 "for one label per row, use LinearClassifier")
        if class_names is not None and len(class_names) != len(self.classes_):
            raise PipeValueError(f"the targets have {len(self.classes_)} classes but {len(class_names)} class names "
                                 "were given")
        return super()._class_rows(class_names)

    def _head(self, class_names, positions, **metadata):
        return MultilabelHead(self.weight_, self.bias_, self.mean_, self.std_, class_names, thresholds=self.thresholds_,
                              **metadata)

    def _predicting_head(self):
        check_is_fitted(self)
        names = [str(c) for c in self.classes_[-len(self.bias_):]]  # one column per class; two labels: one
        return self._head(names, None, fingerprint="", source={}, training={})

    def decision_function(self, X):
        """Each target column's logit (n_samples, n_classes); for two labels given one per row,
        the second's (n_samples,)."""
        scores = self._predicting_head().decision_function(self._check_X(X))
        return scores[:, 0] if len(self.bias_) == 1 and not self.multilabel_ else scores

    def predict_proba(self, X):
        """Each class's probability (n_samples, n_classes): independent for multi-hot targets
        (rows need not sum to 1); for one label per row, normalised over the classes as
        scikit-learn's ``OneVsRestClassifier`` does."""
        proba = self._predicting_head().predict_proba(self._check_X(X))
        if self.multilabel_:
            return proba
        if proba.shape[1] == 1:
            return np.hstack([1 - proba, proba])
        return proba / np.maximum(proba.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)

    def predict(self, X):
        """Multi-hot predictions (n_samples, n_classes) where each class's probability reaches
        its threshold; for one label per row, the most probable class."""
        check_is_fitted(self)
        if not self.multilabel_:
            return super().predict(X)
        return self._predicting_head().predict(self._check_X(X)).astype(np.int64)
