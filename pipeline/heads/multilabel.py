"""Multi-label heads: C independent logistic classifiers (sigmoid outputs), each with its own
decision threshold, and :class:`MultilabelProbe`, the trainer that makes them.

The probe follows the linear probe's recipe (:mod:`pipeline.heads.probes`) with multi-hot
targets: one batched sweep of the L2 strength over every class at once (each (strength, class)
pair is its own problem for the batched L-BFGS, :mod:`pipeline.heads.logistic`), the strength
chosen by mean average precision where :mod:`pipeline.heads.selection` says (val, a hold-out,
k-fold cross-validation or a default), each class's threshold chosen to maximise its F1 on the
same held-out predictions, and a refit on train + val. ``trainer="sklearn"`` fits the same
grid with one scikit-learn ``LogisticRegression`` per strength and class (one-vs-rest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit
from sklearn import metrics

from pipeline.devices import resolve_device
from pipeline.errors import PipeError
from pipeline.heads.features import feature_stats, standardized_parts
from pipeline.heads.head_file import LinearHead
from pipeline.heads.lbfgs import CONVERGED, MAX_ITER
from pipeline.heads.logistic import fit_logistic, start_params
from pipeline.heads.multinomial import FeatureSpectrum, threads_for
from pipeline.heads.probes import sklearn_logistic, strength_grid
from pipeline.heads.selection import DEFAULT_STRENGTH, merge_records, plan_selection, split_parts
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
        return {**super().to_payload(), "thresholds": torch.from_numpy(np.asarray(self.thresholds, np.float32))}


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


def check_targets(X, Y, name, n_classes=None):
    """Validate one split's features and multi-hot targets; return ``Y`` as uint8."""
    if getattr(X, "ndim", 0) != 2:
        raise PipeError(f"{name} features must be a 2-D array (samples x dimensions)")
    Y = np.asarray(Y)
    if Y.ndim != 2 or len(Y) != len(X) or (n_classes is not None and Y.shape[1] != n_classes):
        raise PipeError(f"{name} has {len(X)} feature rows but targets of shape {Y.shape}")
    if len(Y) == 0:
        raise PipeError(f"{name} split is empty; add images there")
    if not np.isin(Y, (0, 1)).all():
        raise PipeError(f"{name} targets must be 0 or 1 (multi-hot)")
    return Y.astype(np.uint8)


class MultilabelProbe:
    """Trains a :class:`MultilabelHead` (see the module docstring).

    Learned attributes, as :class:`~pipeline.heads.probes.LinearProbe` names them:
    ``weight_`` (C, D), ``bias_`` (C,), ``mean_``/``std_``, ``thresholds_`` (C,),
    ``best_strength_``, ``selection_``, ``grid_scores_`` (``(strength, mAP)`` on the rows
    scored: val, a hold-out, or every row once across the cross-validation folds),
    ``n_iter_``/``stop_`` (per strength, over its C classes: the most iterations, and
    "converged" only if every class converged), ``converged_``, ``warnings_``,
    ``n_train_``, ``n_val_``, ``sweep_seconds_`` (choosing the strength and thresholds) and
    ``fit_seconds_`` (all of it).
    """

    score_name = "mAP"

    def __init__(self, *, trainer="linear", grid=None, seed=0, device="auto", max_iter=None, tol=1e-4,
                 standardize=True, selection="auto", class_names=None):
        if trainer not in TRAINERS:
            raise PipeError(f"unknown head trainer {trainer!r}; choose one of {', '.join(TRAINERS)}")
        self.trainer, self.grid, self.seed, self.device = trainer, grid, seed, device
        self.class_names = class_names  # for warnings only
        self.max_iter = max_iter or (100 if trainer == "linear" else 1000)
        self.tol, self.standardize, self.selection = tol, standardize, selection

    def fit(self, X_train, Y_train, X_val=None, Y_val=None):
        """Train on features ``X_train`` (N, D) and multi-hot ``Y_train`` (N, C), choosing
        the strength and the thresholds with ``(X_val, Y_val)`` when given and large enough
        (else a hold-out or k-fold cross-validation over train + val). Returns ``self``."""
        started = time.perf_counter()
        self.grid_ = strength_grid(self.grid)
        parts = [("train", X_train, check_targets(X_train, Y_train, "train"))]
        if X_val is not None:
            parts.append(("val", X_val, check_targets(X_val, Y_val, "val", parts[0][2].shape[1])))
        mean, std = feature_stats(parts)
        self.mean_, self.std_ = (mean, std) if self.standardize else (None, None)
        pool = np.concatenate([Y for _, _, Y in parts])
        strata = np.split(split_strata(pool), [len(parts[0][2])])[:len(parts)]
        self.selection_, splits = plan_selection(strata, len(self.grid_), mode=self.selection, seed=self.seed)
        self.n_train_, self.n_val_ = len(parts[0][2]), len(pool) - len(parts[0][2])
        self.n_iter_, self.stop_, self.grid_scores_, self.warnings_ = {}, {}, [], []
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
        self.n_iter_["refit"], self.stop_["refit"] = record["n_iter"][0], record["stop"][0]
        self._check(pool)
        self.fit_seconds_ = time.perf_counter() - started
        return self

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
        self.n_iter_["sweep"], self.stop_["sweep"] = merged["n_iter"], merged["stop"]
        if len(records) > 1:
            self.n_iter_["folds"], self.stop_["folds"] = [r["n_iter"] for r in records], [r["stop"] for r in records]
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
            result = fit_logistic(X_t, Y_t, lam, params, curvature, self._spectrum, max_iter=self.max_iter, tol=self.tol)
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
        weight, bias, n_iter, stop = sklearn_logistic(X, y, 1.0 / (strength * len(y)), max_iter=self.max_iter,
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
            why = f"reached --max-iter ({self.max_iter})" if self.stop_["refit"] == MAX_ITER else "its line search failed"
            self.warnings_.append(f"the final fit did not converge: {why}; its weights are the last accepted step")
        if self.grid_scores_:
            chance = float(pool.mean(axis=0)[pool.any(axis=0)].mean())  # the mAP of a random ranking
            score = dict(self.grid_scores_)[self.best_strength_]
            if score <= chance + 1e-9:
                self.warnings_.append(f"the head is at chance level: mAP {score:.3f} on held-out images, the same "
                                      f"as a random ranking ({chance:.3f})")

    def to_head(self, classes, fingerprint, source) -> MultilabelHead:
        """The fitted model as a :class:`MultilabelHead` over ``classes`` (names, in target order)."""
        if len(classes) != len(self.bias_):
            raise PipeError(f"the targets have {len(self.bias_)} classes but {len(classes)} class names were given")
        training = {
            "trainer": self.trainer, "strength": self.best_strength_, "score": self.score_name,
            "grid_scores": [list(pair) for pair in self.grid_scores_], "seconds": round(self.fit_seconds_, 3),
            "n_train": self.n_train_, "n_val": self.n_val_, "seed": self.seed, "standardize": self.standardize,
            "n_iter": self.n_iter_, "converged": self.converged_, "stop": self.stop_,
            "selection": self.selection_.record(), "warnings": list(self.warnings_),
        }
        return MultilabelHead(self.weight_, self.bias_, self.mean_, self.std_, list(classes), fingerprint,
                              dict(source), training, thresholds=self.thresholds_)
